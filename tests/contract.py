"""The OpenAPI contract as a test helper: validates real answers and event frames against the
document the daemon serves (jsonschema, Draft 2020-12).  Used by tests/test_openapi.py and
tests/test_cluster_ray.py; a helper module, not a test module."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from ondemand.sdk.sse import ServerEvent


class Contract:
    """Validates an answer against the operation's response schema in the served document."""

    def __init__(self, doc: dict[str, Any]) -> None:
        self.doc = doc
        self.registry: Registry[Any] = Registry().with_resource(
            "urn:ondemand:openapi", Resource.from_contents(doc, default_specification=DRAFT202012))
        self.checked: set[tuple[str, str, str]] = set()

    def check(self, method: str, route: str, status: int, ctype: str, body: bytes) -> None:
        responses = self.doc["paths"][route][method.lower()]["responses"]
        assert str(status) in responses, f"{method} {route}: {status} is not in the contract"
        content = responses[str(status)].get("content", {})
        media = ctype.split(";")[0]
        if not content:  # 304
            assert not body, (method, route, status)
        else:
            assert media in content or any(m.endswith("/*") and media.startswith(m[:-1])
                                           for m in content), (method, route, status, media)
        if media == "application/json":
            pointer = "/".join(("#", "paths", route.replace("~", "~0").replace("/", "~1"),
                                method.lower(), "responses", str(status), "content",
                                "application~1json", "schema"))
            self.validate(pointer, json.loads(body))
        self.checked.add((method.upper(), route, str(status)))

    def validate(self, pointer: str, value: Any) -> None:
        jsonschema.Draft202012Validator({"$ref": f"urn:ondemand:openapi{pointer}"},
                                        registry=self.registry).validate(value)

    def check_event(self, ev: ServerEvent) -> None:
        """A parsed frame of GET /v1/events against `ServerEvent` (its data: `Event<Name>`)."""
        frame = {"event": ev.event, "data": ev.json(), **({"id": ev.id} if ev.id is not None
                                                            else {})}
        self.validate("#/components/schemas/ServerEvent", frame)
        self.checked.add(("EVENT", ev.event, "id" if ev.id is not None else ""))
