"""Server-Sent Events frames from a byte stream, parsed as the HTML standard says.

The CLI reads the stream with aiohttp, which hands over chunks cut anywhere: in
the middle of a line, between the CR and LF of a CRLF, inside a UTF-8 sequence.
`SSEDecoder.feed` takes such chunks and returns the frames they complete, so the
caller never has to care where the network split the bytes.

https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

# A line ends with CRLF, LF or CR (all three are allowed on the wire).
_EOL = re.compile(rb"\r\n|\r|\n")

# Our server caps one event at well under 1 MiB (results over 64 KiB are not
# streamed). A line far longer than that is not a stream we understand, and
# buffering it without bound would let a wrong URL eat the memory.
MAX_LINE = 4 * 1024 * 1024


class SSEError(ValueError):
    """The bytes are not an event stream we can read."""


@dataclass(frozen=True)
class SSEFrame:
    """One dispatched event: `event` is "message" when the frame named none.

    `id` is the stream's last event id when the frame was dispatched: an `id:`
    line persists until the next one, as in EventSource. None if no frame has
    carried one yet.
    """

    event: str
    data: str
    id: str | None


class SSEDecoder:
    """Incremental parser: feed it bytes, get complete frames back.

    Comments (`: ping`) dispatch nothing, as in EventSource; `on_comment`, if
    given, is told each one's text (the test suite checks the server's pings so)."""

    def __init__(self, *, on_comment: Callable[[str], None] | None = None) -> None:
        self._on_comment = on_comment
        self._buffer = b""
        self._skip_lf = False  # the previous chunk ended in CR: a leading LF belongs to it
        self._first_line = True
        self._data: list[str] = []
        self._event = ""
        # The id lines seen so far; it becomes `last_event_id` only when a blank line
        # ends the frame, so a frame cut off mid-way never moves the cursor.
        self._id_buffer: str | None = None
        self.last_event_id: str | None = None
        # The server's reconnection delay (ms) if it sent one; we keep it for callers.
        self.retry: int | None = None

    def feed(self, chunk: bytes) -> list[SSEFrame]:
        buffer = self._buffer + chunk
        start = 0
        if self._skip_lf and buffer[:1] == b"\n":
            start = 1
        self._skip_lf = False
        frames: list[SSEFrame] = []
        while (match := _EOL.search(buffer, start)) is not None:
            frame = self._line(buffer[start : match.start()])
            if frame is not None:
                frames.append(frame)
            start = match.end()
            if match.group() == b"\r" and start == len(buffer):
                # A CR that ends the chunk may be the first half of a CRLF.
                self._skip_lf = True
        self._buffer = buffer[start:]
        if len(self._buffer) > MAX_LINE:
            raise SSEError(f"an event-stream line longer than {MAX_LINE} bytes")
        return frames

    def _line(self, raw: bytes) -> SSEFrame | None:
        # Splitting bytes on CR/LF is safe: no UTF-8 sequence contains those bytes.
        line = raw.decode("utf-8", errors="replace")
        if self._first_line:
            self._first_line = False
            line = line.removeprefix("\ufeff")  # one optional BOM opens the stream
        if line == "":
            return self._dispatch()
        if line.startswith(":"):  # a comment (": ping"): keeps proxies and idle timers happy
            if self._on_comment is not None:
                self._on_comment(line[1:].strip())
            return None
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]  # exactly one space after the colon is syntax, not data
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id":
            if "\0" not in value:  # the standard ignores ids with NUL
                self._id_buffer = value
        elif name == "retry":
            if value.isascii() and value.isdigit():
                self.retry = int(value)
        # Any other field name is ignored, so the server may add some later.
        return None

    def _dispatch(self) -> SSEFrame | None:
        data, event = self._data, self._event
        self._data, self._event = [], ""
        # As EventSource does: a frame with only an `id:` still moves the cursor.
        self.last_event_id = self._id_buffer
        if not data:
            return None  # a blank line after no data (or only id/event lines) sends nothing
        return SSEFrame(event=event or "message", data="\n".join(data), id=self.last_event_id)
