"""Checking a webhook from the daemon on the receiving side (docs/webhooks.md)."""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Mapping


class InvalidSignature(ValueError):
    """The webhook is not from a daemon holding the secret, or too old (a replay)."""


def verify_webhook(secret: str, body: bytes, headers: Mapping[str, str], *,
                   tolerance_s: float = 300.0, now: float | None = None) -> None:
    """Raise InvalidSignature unless `body` was signed with `secret` within `tolerance_s`.
    `headers`: the request's (any mapping; names are matched without regard to case).
    Deduplicate on the `Ondemand-Delivery` header: a delivery may arrive more than once."""
    lower = {k.lower(): v for k, v in headers.items()}
    stamp = lower.get("ondemand-timestamp", "")
    given = lower.get("ondemand-signature", "")
    try:
        sent = int(stamp)
    except ValueError:
        raise InvalidSignature("no valid Ondemand-Timestamp header") from None
    if abs((time.time() if now is None else now) - sent) > tolerance_s:
        raise InvalidSignature(f"Ondemand-Timestamp is more than {tolerance_s:g} s off")
    mac = hmac.new(secret.encode(), stamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(given.encode(), f"sha256={mac}".encode()):
        raise InvalidSignature("the signature does not match")
