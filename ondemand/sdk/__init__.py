"""A typed Python client for the ondemand daemon (docs/client.md).

    from ondemand.sdk import Client
    c = Client("http://127.0.0.1:8321", token="...")
    job = c.wait(c.submit("clip.wav").id)
    print(job.result.label if job.result else job.error)

`Client` (sync, stdlib only) and `AsyncClient` (aiohttp) cover the whole API v1 with typed
results (`ondemand.sdk.models`); error answers raise the classes of `ondemand.errors`
(`NotFound`, `QueueFull`, `TooManyRequests`, ...; a code this version does not know:
`RemoteError`), no answer `DaemonUnreachable`.  `wait` follows the event stream
(`event_stream`, with `on_update` for progress) or long-polls (`long_poll`); `events()` opens
the stream itself.  `verify_webhook` checks a callback's signature.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ondemand.sdk.models import (
    Accepted,
    Callback,
    CostReport,
    ErrorInfo,
    Job,
    JobUpdate,
    Prediction,
    Readiness,
    Removed,
    Status,
    Timings,
    TokenUsage,
    WorkerStatus,
)
from ondemand.sdk.sse import ServerEvent
from ondemand.sdk.sync import URL_ENV, Client, EventStream, Transport, event_stream, long_poll
from ondemand.sdk.webhooks import InvalidSignature, verify_webhook

if TYPE_CHECKING:
    from ondemand.sdk.aio import AsyncClient


def __getattr__(name: str) -> Any:
    """`AsyncClient` loads aiohttp only when asked for (the CLI's sync client never does)."""
    if name == "AsyncClient":
        from ondemand.sdk.aio import AsyncClient

        return AsyncClient
    raise AttributeError(f"module 'ondemand.sdk' has no attribute {name!r}")

__all__ = [
    "URL_ENV", "Accepted", "AsyncClient", "Callback", "Client", "CostReport", "ErrorInfo",
    "EventStream", "InvalidSignature", "Job", "JobUpdate", "Prediction", "Readiness", "Removed",
    "ServerEvent", "Status", "Timings", "TokenUsage", "Transport", "WorkerStatus",
    "event_stream", "long_poll", "verify_webhook",
]
