"""The writes a task must not lose to a short Redis outage: its start and its end.

A task that ends while Redis is down would stay `started` (or at its last
`progress`) for ever: its worker is alive, so the reaper has no reason to end it.
One whose start was lost is in no worker's running index, so nothing would end it
if its worker were then killed. So when one of those writes fails for want of a
connection, the bridge hands it here. One thread per process tries the writes
again, oldest first, until Redis answers. A task's later writes queue behind its
earlier ones, so its end is never stored before its start. Progress is not kept:
the next report supersedes it.

The writes are idempotent, so a write that did reach Redis before its reply was
lost is harmless to repeat: a second end is refused by the write script, and a
late start is stored only while the task is still `queued`.
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

# A write older than this is dropped: Redis was away for longer than anyone waits.
MAX_AGE = 3600.0
# Writes kept at most; beyond it the oldest go (a worker should not grow without bound).
MAX_WRITES = 10_000
# Seconds between attempts while Redis does not answer.
RETRY_EVERY = (0.2, 2.0)


@dataclass(slots=True)
class _Write:
    task_id: str
    what: str
    write: Callable[[], object]
    since: float


class Outbox:
    def __init__(self) -> None:
        self._reset()
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        # A forked pool process inherits the parent's memory but not its thread, nor its writes.
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._writes: deque[_Write] = deque()
        self._thread: threading.Thread | None = None

    def __len__(self) -> int:
        with self._lock:
            return len(self._writes)

    def holds(self, task_id: str) -> bool:
        """Whether an earlier write of the task waits: its next write must queue behind it."""
        with self._lock:
            return any(w.task_id == task_id for w in self._writes)

    def add(self, task_id: str, what: str, write: Callable[[], object]) -> None:
        with self._lock:
            if not self._writes:
                log.warning("progress-sse will store the %s event of task %s when Redis answers again", what, task_id)
            self._writes.append(_Write(task_id, what, write, time.monotonic()))
            while len(self._writes) > MAX_WRITES:
                dropped = self._writes.popleft()
                log.warning(
                    "progress-sse dropped the %s event of task %s: too many waiting", dropped.what, dropped.task_id
                )
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
                while not self._writes:
                    self._wake.wait()
            failed = self._attempt()
            if failed is None:
                delay = RETRY_EVERY[0]
                continue
            with self._lock:
                self._wake.wait(delay)
            delay = min(delay * 2, RETRY_EVERY[1])

    def _attempt(self) -> bool | None:
        """Try the oldest write: None when none waits, False when it was stored (or
        dropped), True when Redis still does not answer."""
        with self._lock:
            if not self._writes:
                return None
            head = self._writes[0]
        try:
            head.write()
        except CONNECTION_ERRORS:
            if time.monotonic() - head.since <= MAX_AGE:
                return True
            log.warning("progress-sse gave up storing the %s event of task %s", head.what, head.task_id)
        except Exception:
            log.warning("progress-sse could not store the %s event of task %s", head.what, head.task_id, exc_info=True)
        else:
            log.info("progress-sse stored the %s event of task %s late", head.what, head.task_id)
        with self._lock:
            if self._writes and self._writes[0] is head:
                self._writes.popleft()
        return False
