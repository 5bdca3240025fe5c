"""States, the event payload and its wire formats: pure values, no I/O.

Both sides share this module: the worker builds payloads with `make_event`, the
web process turns stored or published payloads into `Frame`s whose SSE bytes are
encoded once and then written to every watcher as they are.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from .cursors import Position


class State(StrEnum):
    QUEUED = "queued"
    STARTED = "started"
    PROGRESS = "progress"
    RETRY = "retry"
    SUCCESS = "success"
    FAILURE = "failure"
    REVOKED = "revoked"
    LOST = "lost"


TERMINAL_STATES: frozenset[str] = frozenset({State.SUCCESS, State.FAILURE, State.REVOKED, State.LOST})

# A comment line: ignored by EventSource, but bytes on the wire for proxies and `curl -N`.
PING = b": ping\n\n"


def is_terminal(state: str) -> bool:
    return state in TERMINAL_STATES


def percent_of(current: float, total: float | None) -> float | None:
    """`100 * current / total`, rounded to 2 places and clamped to 0..100; None if unknown."""
    if total is None:
        return None
    if total <= 0:
        return 100.0 if current >= total else 0.0
    return round(min(100.0, max(0.0, 100.0 * current / total)), 2)


def make_event(
    task_id: str,
    name: str | None,
    state: str,
    *,
    current: float = 0,
    total: float | None = None,
    message: str | None = None,
    ts: float | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The payload of PROTOCOL.md, in its documented key order."""
    event: dict[str, Any] = {
        "task_id": task_id,
        "name": name,
        "state": str(state),
        "current": current,
        "total": total,
        "percent": percent_of(current, total),
        "message": message,
        "ts": round(time.time() if ts is None else ts, 3),
    }
    event.update(extra)
    return event


# What only an operator sees of a task: where it ran, and a failure's traceback.
OPERATOR_ONLY = ("worker", "worker_pid", "pid")
# The keys for_watcher looks at, as they appear in an event's JSON.
_WATCHER_HIDES = tuple(f'"{key}"' for key in (*OPERATOR_ONLY, "error"))


def for_watcher(body: dict[str, Any], *, messages: bool = True) -> dict[str, Any]:
    """An event (or a task's description) as a watcher may see it: without the
    operator-only fields and the traceback, and, when `messages` is off, with a
    failure or retry told by its exception type alone. Returns `body` itself when
    there is nothing to hide, so most events cost nothing."""
    error = body.get("error")
    if not isinstance(error, dict):
        error = None
    if error is None and not any(key in body for key in OPERATOR_ONLY):
        return body
    seen = {key: value for key, value in body.items() if key not in OPERATOR_ONLY}
    if error is not None:
        seen["error"] = {key: error[key] for key in ("type", "message") if key in error}
        if not messages:
            seen["error"].pop("message", None)
            seen["message"] = error.get("type") or "Error"
    return seen


def dumps(value: Any) -> str:
    """Compact JSON, UTF-8 as is; NaN and infinities are refused rather than sent invalid.

    Text with lone surrogates (a file name decoded with `os.fsdecode`, say) cannot be
    UTF-8: it is escaped instead, still valid JSON, so such an event is never lost."""
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    try:
        text.encode()
    except UnicodeEncodeError:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return text


def json_safe(value: Any) -> Any:
    """`value` if JSON can hold it, else its `repr` (PROTOCOL.md: results JSON cannot hold)."""
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return repr(value)
    return value


def finite_number(value: Any) -> float | int | None:
    """An int or finite float from what a task passed as current/total, else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        try:
            value = float(value)
        except (TypeError, ValueError):
            return None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    number: float | int = value
    return number


def encode_sse(*, data: str, event: str | None = None, id: str | None = None) -> bytes:
    """One SSE frame. Newlines would end a field early, so `id`/`event` lose them and
    multi-line data becomes several `data:` lines (which EventSource joins with \\n)."""
    lines = []
    if id is not None:
        lines.append("id: " + _one_line(id))
    if event is not None:
        lines.append("event: " + _one_line(event))
    for line in data.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        lines.append("data: " + line)
    return ("\n".join(lines) + "\n\n").encode()


def _one_line(value: str) -> str:
    return value.replace("\r", "").replace("\n", "")


@dataclass(frozen=True, slots=True)
class Frame:
    """One stored event of one task, ready to be written to any number of streams.

    `seq` is the event's number in the sequence its `partition`'s tasks share (see
    keys.py) and `epoch` names the history that sequence belongs to, so on one Redis
    `<epoch>-<seq>` is the SSE cursor (src/progress_sse/cursors.py). On a cluster a
    stream's cursor names its place in every partition it follows: the stream gives
    each frame it sends that `cursor` (`with_cursor`, web/delivery.py `stamp`). A frame without an
    epoch (a task's state kept from a lost history) has no `id:` line: it moves no
    cursor.
    """

    task_id: str
    seq: int
    state: str
    data: str
    epoch: str | None
    partition: int = 0
    cursor: str | None = None
    # The task's name, on the all-tasks feed (web/feed.py), which filters by it.
    name: str | None = None
    encoded: bytes = field(init=False, repr=False, compare=False)
    # The frame without its `id:` line: encoded once, shared by its copies of other cursors.
    body: bytes = field(init=False, repr=False, compare=False)
    # for_watcher's bodies, by `messages`: made once, shared by every watcher and copy.
    _watcher_bodies: dict[bool, bytes] = field(init=False, repr=False, compare=False, default_factory=dict)
    # `chunk`'s, by variant: made once, written as they are to every idle stream.
    _chunks: dict[bool | None, bytes] = field(init=False, repr=False, compare=False, default_factory=dict)
    # `<epoch>-<seq>` as a value, made once: every stream that takes the frame keeps it.
    position: Position | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "position", None if self.epoch is None else Position(self.epoch, self.seq))
        object.__setattr__(self, "body", encode_sse(event=self.state, data=self.data))
        object.__setattr__(self, "encoded", self._id_line() + self.body)

    def _id_line(self) -> bytes:
        """What encode_sse puts first: the `id:` line, if the frame has an id."""
        id = self.id
        return b"" if id is None else f"id: {_one_line(id)}\n".encode()

    def with_cursor(self, cursor: str) -> Frame:
        """The frame as one stream sends it, with that stream's `cursor` as its id
        (on a cluster: web/delivery.py `stamp`). Its body is not encoded again."""
        copy: Frame = object.__new__(Frame)
        for name in (
            "task_id",
            "seq",
            "state",
            "data",
            "epoch",
            "partition",
            "name",
            "position",
            "body",
            "_watcher_bodies",
        ):
            object.__setattr__(copy, name, getattr(self, name))
        object.__setattr__(copy, "cursor", cursor)
        object.__setattr__(copy, "encoded", copy._id_line() + self.body)
        object.__setattr__(copy, "_chunks", {})
        return copy

    def bytes_for(self, variant: bool | None) -> bytes:
        """The frame as a stream of `variant` writes it: None, as stored (an
        operator); True or False, as events.for_watcher shapes it with or without
        messages (web/access.py `frame_variant`)."""
        return self.encoded if variant is None else self.encoded_for_watcher(messages=variant)

    def chunk(self, variant: bool | None) -> bytes:
        """`bytes_for(variant)` in HTTP/1.1 chunked framing, made once per frame: what
        the hub writes straight to the socket of every idle stream (web/hub.py)."""
        found = self._chunks.get(variant)
        if found is None:
            data = self.bytes_for(variant)
            found = self._chunks[variant] = b"%x\r\n%b\r\n" % (len(data), data)
        return found

    @property
    def id(self) -> str | None:
        if self.cursor is not None:
            return self.cursor
        return None if self.epoch is None else f"{self.epoch}-{self.seq}"

    def encoded_for_watcher(self, *, messages: bool) -> bytes:
        """`encoded`, as a watcher may see it (for_watcher), worked out once per frame
        and then shared by every watcher. A frame whose JSON names none of the fields
        for_watcher changes is its one encoding (the test is on the text: a false
        alarm only costs a parse)."""
        body = self._watcher_bodies.get(messages)
        if body is None:
            if not any(name in self.data for name in _WATCHER_HIDES):
                body = self.body
            else:
                payload = self.payload()
                seen = for_watcher(payload, messages=messages)
                body = self.body if seen is payload else encode_sse(event=self.state, data=dumps(seen))
            self._watcher_bodies[messages] = body
        return self.encoded if body is self.body else self._id_line() + body

    @property
    def terminal(self) -> bool:
        return is_terminal(self.state)

    def payload(self) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self.data)
        return result


# Why a stream starts over from current states: the `reason` of its reset frame.
HISTORY_LOST = "history_lost"  # the history the open stream followed is gone
CURSOR_UNKNOWN = "cursor_unknown"  # the client's cursor names no place in the current one
FEED_TRIMMED = "feed_trimmed"  # the all-tasks feed no longer holds what came after the cursor
_RESET_MESSAGES = {
    HISTORY_LOST: "The event history started over (Redis restarted, failed over to another node, or "
    "lost its data): earlier event ids no longer count. The states that follow are current.",
    CURSOR_UNKNOWN: "The cursor (Last-Event-ID) names no place in the current event history: it is "
    "from a history that was lost, or from another server. The states that follow are current.",
    FEED_TRIMMED: "The feed no longer holds the events after the cursor (Last-Event-ID): it keeps the "
    "latest PROGRESS_SSE_FEED_MAX. The states that follow are current.",
}


def reset_frame(reason: str, missing: list[str]) -> bytes:
    """The history a stream followed is gone, or the client's cursor names no place
    in the current one: current states follow, and `missing` are the stream's tasks
    that have none now. No `id:`, so a client cut off before those states reconnects
    with its old cursor and is told again."""
    body = {"reason": reason, "message": _RESET_MESSAGES[reason], "missing": missing}
    return encode_sse(event="reset", data=dumps(body))


def unknown_task_frame(task_id: str) -> bytes:
    """`/events` tells about an id it does not know once, without an `id:` (the cursor stays)."""
    return encode_sse(event="unknown", data=dumps({"task_id": task_id}))
