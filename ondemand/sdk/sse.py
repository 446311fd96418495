"""Server-Sent Events, the wire format of `GET /v1/events`: a decoder without I/O, shared by the
sync and the async client (each only moves bytes into it).

It follows the HTML standard's "event stream interpretation" (what a browser's `EventSource`
does), not just the daemon's own frames, so a proxy that re-chunks or re-wraps the stream cannot
confuse it:

- lines end in CRLF, LF or CR, and a chunk may end between the CR and the LF of one line ending;
  bytes are decoded as UTF-8 incrementally (a chunk may end inside a character), a leading BOM
  is dropped;
- `:` starts a comment (the daemon's `: ping` heartbeat): counted, never an event;
- `field: value` drops one space after the colon; a line without a colon is a field with an
  empty value; unknown fields are ignored;
- `data` lines accumulate (joined with LF); a blank line dispatches the event, and an event
  with no `data` at all is not dispatched; `event` names it (default `message`);
- `id` sets the last event id, which persists across events until another `id` line changes it
  (an id holding NUL is ignored): it is what a reconnect sends as `Last-Event-ID`.  Each event
  also says whether it carried an id itself (the daemon's snapshots do not);
- `retry` (digits only) sets the reconnection delay in milliseconds;
- an event cut off by the end of the stream (no blank line yet) is discarded.
"""

from __future__ import annotations

import codecs
import json
import re
from dataclasses import dataclass
from typing import Any

_EOL = re.compile(r"\r\n|\r|\n")


@dataclass(frozen=True)
class ServerEvent:
    """One dispatched event: its name, its data (text), its own `id` (None: the frame had no
    `id:` line) and `last_id`, the stream's last event id then (EventSource's `lastEventId`:
    what a reconnect sends as Last-Event-ID)."""

    event: str
    data: str
    id: str | None = None
    last_id: str = ""

    def json(self) -> Any:
        return json.loads(self.data)


class Decoder:
    """Feed it the stream's bytes as they come; it returns the events they complete."""

    def __init__(self) -> None:
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""  # text after the last line ending
        self._started = False  # past the optional BOM
        self._skip_lf = False  # the last chunk ended in CR: an LF first in the next is its pair
        self._event = ""
        self._data: list[str] = []
        self._id: str | None = None  # this event's own id line
        self.last_id = ""
        self.retry_ms: int | None = None
        self.comments = 0

    def feed(self, chunk: bytes) -> list[ServerEvent]:
        text = self._utf8.decode(chunk)
        if not text:
            return []
        if not self._started:
            self._started = True
            text = text.removeprefix("\ufeff")
        if self._skip_lf:
            self._skip_lf = False
            text = text.removeprefix("\n")
        text = self._pending + text
        out: list[ServerEvent] = []
        start = 0
        for m in _EOL.finditer(text):
            if m.group() == "\r" and m.end() == len(text):
                self._skip_lf = True
            self._line(text[start:m.start()], out)
            start = m.end()
        self._pending = text[start:]
        return out

    def _line(self, line: str, out: list[ServerEvent]) -> None:
        if not line:
            self._dispatch(out)
            return
        if line.startswith(":"):
            self.comments += 1
            return
        name, colon, value = line.partition(":")
        if colon:
            value = value.removeprefix(" ")
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        elif name == "id" and "\0" not in value:
            self.last_id = self._id = value
        elif name == "retry" and value.isascii() and value.isdigit():
            self.retry_ms = int(value)

    def _dispatch(self, out: list[ServerEvent]) -> None:
        data, event, own_id = self._data, self._event, self._id
        self._data, self._event, self._id = [], "", None
        if data:
            out.append(ServerEvent(event or "message", "\n".join(data), own_id, self.last_id))
