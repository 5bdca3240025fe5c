"""Read an SSE response frame by frame (never `await resp.text()` on an open stream)."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from progress_sse.events import TERMINAL_STATES


@dataclass
class SSEEvent:
    id: str | None
    event: str | None
    data: str
    comments: list[str] = field(default_factory=list)

    @property
    def payload(self) -> dict[str, Any]:
        value: dict[str, Any] = json.loads(self.data)
        return value

    @property
    def terminal(self) -> bool:
        return self.event in TERMINAL_STATES


class SSEReader:
    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response
        self.comments: list[str] = []

    async def _frame(self) -> SSEEvent | None:
        """The next frame (events and comment-only frames alike); None at the end."""
        fields: dict[str, list[str]] = {}
        comments: list[str] = []
        while True:
            raw = await self.response.content.readline()
            if not raw:
                return None
            line = raw.decode().rstrip("\n").rstrip("\r")
            if line == "":
                if fields or comments:
                    data = "\n".join(fields.get("data", []))
                    last = lambda k: fields[k][-1] if k in fields else None  # noqa: E731
                    return SSEEvent(last("id"), last("event"), data, comments)
                continue
            if line.startswith(":"):
                comments.append(line[1:].strip())
                self.comments.append(line[1:].strip())
                continue
            key, _, value = line.partition(":")
            fields.setdefault(key, []).append(value[1:] if value.startswith(" ") else value)

    async def next_event(self, timeout: float = 15) -> SSEEvent | None:
        """The next frame with data (comments skipped); None when the stream ends."""
        async with asyncio.timeout(timeout):
            while True:
                frame = await self._frame()
                if frame is None or frame.data or frame.event:
                    return frame

    async def next_comment(self, timeout: float = 15) -> str:
        async with asyncio.timeout(timeout):
            while True:
                frame = await self._frame()
                assert frame is not None, "stream ended before a comment"
                if frame.comments and not frame.data:
                    return frame.comments[0]

    async def until(self, predicate: Any, timeout: float = 30) -> list[SSEEvent]:
        """Events up to and including the first that satisfies `predicate`."""
        events: list[SSEEvent] = []
        async with asyncio.timeout(timeout):
            while True:
                event = await self.next_event(timeout)
                assert event is not None, f"stream ended before the expected event; got {[e.event for e in events]}"
                events.append(event)
                if predicate(event):
                    return events

    async def rest(self, timeout: float = 30) -> list[SSEEvent]:
        """Every event until the server ends the stream."""
        events: list[SSEEvent] = []
        async with asyncio.timeout(timeout):
            while (event := await self.next_event(timeout)) is not None:
                events.append(event)
        return events
