"""The writes Redis did not take, kept in the process and tried again until it does.

A task that ends while Redis is down would stay `started` (or at its last
`progress`) for ever: its worker is alive, so the reaper has no reason to end it.
One whose start was lost is in no worker's running index, so nothing would end it
if its worker were then killed. And a bar frozen at the count it had when Redis
went away says less than the count the task reached. So every write that fails for
want of a connection (`queued`, `started`, `progress`, `retry` and the terminal
events: bridge.py, progress.py) is handed here. One thread per process tries the
writes again, oldest first, with backoff, until Redis answers.

- Order per task is kept: a task's later writes queue behind its earlier ones
  (`holds`), so its end is never stored before its start.
- A task's `progress` values collapse to the latest: a new one replaces the task's
  queued `progress` when nothing of the task came after it, and is put at the end
  of the queue (so after every earlier write of the task). State changes and
  terminal events are all kept.
- Bounded in time (`ttl`, PROGRESS_SSE_OUTBOX_TTL) and in memory (`max_bytes` of
  event JSON): beyond either the oldest writes are dropped, logged once per outage.
- Nothing here runs on a task's thread but `add`: a lock, an append, and no I/O.

The writes are idempotent, so a write that did reach Redis before its reply was
lost is harmless to repeat: a second end is refused by the write script, a
`progress` after the end too, and a late start is stored only while the task is
still `queued`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from .publisher import CONNECTION_ERRORS

log = logging.getLogger(__name__)

# Seconds a write waits for Redis before it is dropped (PROGRESS_SSE_OUTBOX_TTL's default).
DEFAULT_TTL = 300.0
# Bytes of event JSON kept per process; beyond it the oldest writes go. 16 MiB holds
# about 80,000 typical events (~200 bytes), or 256 of the biggest (a 64 KiB result):
# enough for a busy worker's outage of minutes, and little next to a worker's memory.
MAX_BYTES = 16 * 1024 * 1024
# Seconds between attempts while Redis does not answer: doubling from the first to the second.
RETRY_EVERY = (0.2, 2.0)


@dataclass(slots=True, eq=False)
class _Write:
    task_id: str
    what: str
    write: Callable[[], object]
    since: float
    size: int
    collapses: bool
    done: bool = False  # stored, superseded or dropped: skipped when it reaches the head


class Outbox:
    def __init__(
        self,
        *,
        ttl: float = DEFAULT_TTL,
        max_bytes: int = MAX_BYTES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl = ttl
        self.max_bytes = max_bytes
        self._clock = clock  # how old a write is: injectable, so a test need not wait
        self._reset()
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        # A forked pool process inherits the parent's memory but not its thread, nor its writes.
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._writes: deque[_Write] = deque()  # oldest first; may hold done ones
        self._pending: dict[str, int] = {}  # task id -> writes of it waiting
        self._last: dict[str, _Write] = {}  # task id -> its latest waiting write
        self._live = 0
        self._bytes = 0
        self._dropped = 0  # in this outage
        self._thread: threading.Thread | None = None

    def __len__(self) -> int:
        with self._lock:
            return self._live

    @property
    def bytes(self) -> int:
        with self._lock:
            return self._bytes

    def holds(self, task_id: str) -> bool:
        """Whether an earlier write of the task waits: its next write must queue behind it."""
        with self._lock:
            return task_id in self._pending

    def add(self, task_id: str, what: str, write: Callable[[], object], *, size: int, collapses: bool = False) -> None:
        """Keep `write` (of `size` bytes of event JSON) until Redis takes it. With
        `collapses` (a `progress`), it replaces the task's waiting write of the same
        kind when that is the task's latest. Never raises, never waits on Redis."""
        with self._lock:
            now = self._clock()
            self._expire(now)
            if not self._live:
                if self._dropped:  # every write of an earlier outage expired before Redis came back
                    log.warning("progress-sse dropped %d events that waited for Redis", self._dropped)
                    self._dropped = 0
                log.warning("progress-sse will store the %s event of task %s when Redis answers again", what, task_id)
            if collapses:
                last = self._last.get(task_id)
                if last is not None and last.collapses and not last.done:
                    self._forget(last)
            entry = _Write(task_id, what, write, now, size, collapses)
            self._writes.append(entry)
            self._live += 1
            self._bytes += size
            self._pending[task_id] = self._pending.get(task_id, 0) + 1
            self._last[task_id] = entry
            while self._bytes > self.max_bytes and self._live:
                self._drop_oldest(f"more than {self.max_bytes} bytes of events wait for Redis")
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="progress-sse outbox", daemon=True)
                self._thread.start()
            self._wake.notify()

    def flush(self, timeout: float) -> bool:
        """Try the waiting writes now, for up to `timeout` seconds (a process about to
        exit). True when none is left."""
        deadline = time.monotonic() + timeout
        while True:
            waiting = self._attempt()
            if waiting is None:
                return True
            if time.monotonic() >= deadline:
                return False
            if waiting:
                with self._lock:
                    self._wake.wait(RETRY_EVERY[0])

    def _run(self) -> None:
        delay = RETRY_EVERY[0]
        while True:
            with self._lock:
                while not self._live:
                    self._wake.wait()
            if not self._attempt():  # stored, dropped, or none left
                delay = RETRY_EVERY[0]
                continue
            with self._lock:
                self._wake.wait(delay)
            delay = min(delay * 2, RETRY_EVERY[1])

    def _attempt(self) -> bool | None:
        """Try the oldest write: None when none waits, False when it was stored (or
        dropped), True when Redis still does not answer."""
        with self._lock:
            self._expire(self._clock())
            self._skip_done()
            if not self._writes:
                return None
            head = self._writes[0]
        try:
            head.write()
        except CONNECTION_ERRORS:
            return True
        except Exception:
            log.warning("progress-sse could not store the %s event of task %s", head.what, head.task_id, exc_info=True)
        else:
            log.log(
                logging.DEBUG if head.collapses else logging.INFO,
                "progress-sse stored the %s event of task %s late",
                head.what,
                head.task_id,
            )
        with self._lock:
            if not head.done:  # superseded or dropped meanwhile: already forgotten
                self._forget(head)
            self._skip_done()
            if not self._live and self._dropped:
                log.warning(
                    "progress-sse: Redis answers again; %d events that waited for it were dropped", self._dropped
                )
                self._dropped = 0
        return False

    # The helpers below run with the lock held.

    def _forget(self, entry: _Write) -> None:
        entry.done = True
        self._live -= 1
        self._bytes -= entry.size
        left = self._pending[entry.task_id] - 1
        if left:
            self._pending[entry.task_id] = left
        else:
            del self._pending[entry.task_id]
        if self._last.get(entry.task_id) is entry:
            del self._last[entry.task_id]

    def _skip_done(self) -> None:
        while self._writes and self._writes[0].done:
            self._writes.popleft()

    def _expire(self, now: float) -> None:
        self._skip_done()
        while self._writes and now - self._writes[0].since > self.ttl:
            self._drop_oldest(f"older than {self.ttl:g} s")

    def _drop_oldest(self, why: str) -> None:
        self._skip_done()
        entry = self._writes.popleft()
        self._forget(entry)
        if not self._dropped:
            log.warning(
                "progress-sse dropped the %s event of task %s: %s (further drops are not logged until Redis answers)",
                entry.what,
                entry.task_id,
                why,
            )
        self._dropped += 1
