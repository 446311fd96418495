"""The error table: one class per code, the status belongs to the class, and docs/api.md lists
exactly the classes' codes with their statuses."""

from __future__ import annotations

import re
from pathlib import Path

from ondemand import errors

DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"


def documented() -> dict[str, str]:
    text = DOC.read_text(encoding="utf-8")
    table = text.split("<!-- error-codes:start -->")[1].split("<!-- error-codes:end -->")[0]
    rows = re.findall(r"^\| `(\w+)` \| (\d{3}|—) \|", table, flags=re.M)
    return dict(rows)


def test_docs_list_every_code_with_its_status() -> None:
    classes = {code: cls for code, cls in errors.by_code().items()}
    want = {code: (str(cls.status) if cls.status != 500 or code == "internal" else "—")
            for code, cls in classes.items()}
    assert documented() == want


def test_subclasses_sharing_a_code_share_its_status() -> None:
    table = errors.by_code()
    for cls in errors.all_errors()[1:]:
        assert table[cls.code].status == cls.status, cls


def test_from_code_rebuilds_the_class_and_unknown_codes_are_internal() -> None:
    oom = errors.from_code("out_of_memory", "too big")
    assert type(oom) is errors.OutOfMemory and oom.message == "too big"
    assert type(errors.from_code("no_such_code", "x")) is errors.InternalError


def test_retry_after_is_typed_and_defaults_for_503s() -> None:
    assert errors.QueueFull("full").retry_after_s == 5.0
    assert errors.ShuttingDown("bye").retry_after_s == 10.0
    assert errors.LoadFailed("x", retry_after_s=30).retry_after_s == 30
    assert errors.BadRequest("x").retry_after_s is None
