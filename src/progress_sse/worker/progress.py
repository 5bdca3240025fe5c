"""The in-task progress API: determinate, indeterminate and an iterable helper.

Calls only record the latest value in memory; one background thread per process
publishes it, at most `max_rate` times a second per task. So a tight loop of a
million calls costs the task a lock and a tuple per call and never waits on, or
fails because of, Redis; the latest value goes out within one interval even if the
task then goes quiet; and the bridge flushes the last value synchronously before it
stores the task's terminal event. A publish Redis does not take waits in the
outbox (outbox.py), where the task's pending values collapse to the latest.
"""

from __future__ import annotations

import functools
import heapq
import logging
import os
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

from ..events import State, dumps, finite_number, make_event
from .outbox import Outbox
from .publisher import CONNECTION_ERRORS, Publisher

log = logging.getLogger(__name__)

_T = TypeVar("_T")

# (current, total, message): what a task last reported.
Values = tuple[float, float | None, str | None]


@dataclass(slots=True, eq=False)
class _Slot:
    name: str | None
    last: Values = (0, None, None)
    pending: bool = False
    scheduled: bool = False
    last_sent: float = float("-inf")
    # Held while publishing so a flush and the thread never send out of order.
    io: threading.Lock = field(default_factory=threading.Lock)


class Coalescer:
    """Rate-limits progress publishes per task; see the module docstring."""

    def __init__(self, publisher: Publisher, *, max_rate: float, outbox: Outbox | None = None) -> None:
        self.publisher = publisher
        # Where a publish Redis does not take waits; None: it is dropped (logged once).
        self.outbox = outbox
        self.interval = 1.0 / max_rate
        self._reset()
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        # A forked pool process inherits the parent's memory but not its thread.
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._slots: dict[str, _Slot] = {}
        self._due: list[tuple[float, str]] = []
        self._thread: threading.Thread | None = None

    def report(self, task_id: str, name: str | None, values: Values) -> None:
        with self._lock:
            slot = self._slots.get(task_id)
            if slot is None:
                slot = self._slots[task_id] = _Slot(name)
            slot.last = values
            slot.pending = True
            if slot.scheduled:
                return
            slot.scheduled = True
            heapq.heappush(self._due, (max(time.monotonic(), slot.last_sent + self.interval), task_id))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="progress-sse", daemon=True)
                self._thread.start()
            self._wake.notify()

    def last_current(self, task_id: str) -> float:
        slot = self._slots.get(task_id)
        return slot.last[0] if slot else 0

    def flush(self, task_id: str) -> Values | None:
        """Publish the task's pending value now and forget the task.

        Returns the last values it reported in this process, or None if it reported none.
        """
        with self._lock:
            slot = self._slots.pop(task_id, None)
        if slot is None:
            return None
        self._send(task_id, slot)
        return slot.last

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._due:
                    self._wake.wait()
                due, task_id = self._due[0]
                delay = due - time.monotonic()
                if delay > 0:
                    self._wake.wait(delay)
                    continue
                heapq.heappop(self._due)
                slot = self._slots.get(task_id)
                if slot is None:  # flushed meanwhile
                    continue
                slot.scheduled = False
                slot.last_sent = time.monotonic()
            self._send(task_id, slot)

    def _send(self, task_id: str, slot: _Slot) -> None:
        with slot.io:
            with self._lock:
                if not slot.pending:
                    return
                slot.pending = False
                current, total, message = slot.last
            event = make_event(task_id, slot.name, State.PROGRESS, current=current, total=total, message=message)
            outbox = self.outbox
            try:
                if outbox is None:
                    self.publisher.publish_quietly(event)
                    return
                if not outbox.holds(task_id):  # else behind the task's writes already waiting
                    try:
                        self.publisher.publish(event)
                        return
                    except CONNECTION_ERRORS:
                        pass
                write = functools.partial(self.publisher.publish, event)
                outbox.add(task_id, "progress", write, size=len(dumps(event)), collapses=True)
            except Exception:  # the thread must outlive any publisher, and a flush never raise
                log.warning("progress-sse could not publish progress of task %s", task_id, exc_info=True)


_coalescer: Coalescer | None = None


def configure(coalescer: Coalescer | None) -> None:
    """Set (or with None, clear) the process's coalescer; `bridge.install` calls this."""
    global _coalescer
    _coalescer = coalescer


def active() -> Coalescer | None:
    return _coalescer


def set_progress(
    current: float,
    total: float | None = None,
    message: str | None = None,
    *,
    task_id: str | None = None,
) -> None:
    """Report `current` of `total` (determinate). With `total=None` the bar is
    indeterminate while `current` still counts. Never raises into the task."""
    try:
        _report(task_id, current, total, message)
    except Exception:
        log.warning("progress-sse could not record progress", exc_info=True)


def set_message(message: str, *, task_id: str | None = None) -> None:
    """Report work of unknown length (an indeterminate bar) with a message."""
    try:
        _report(task_id, None, None, message)
    except Exception:
        log.warning("progress-sse could not record progress", exc_info=True)


def track(
    iterable: Iterable[_T],
    *,
    total: int | None = None,
    message: str | None = None,
    task_id: str | None = None,
) -> Iterator[_T]:
    """Yield from `iterable`, reporting each item taken: determinate when `total` is
    given or the iterable has a length, indeterminate otherwise.

    `message` may use `{current}` and `{total}`, e.g. "Imported {current} of {total}".
    """
    if total is None:
        try:
            total = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            total = None
    for count, item in enumerate(iterable, start=1):
        yield item
        try:
            text = message.format(current=count, total=total) if message else None
        except (KeyError, IndexError, ValueError, AttributeError):
            text = message  # a message it cannot format is shown as written
        set_progress(count, total, text, task_id=task_id)


def _report(task_id: str | None, current: float | None, total: float | None, message: str | None) -> None:
    coalescer = _coalescer
    if coalescer is None:
        return
    name: str | None = None
    if task_id is None:
        task_id, name = _current_task()
        if task_id is None:
            return
    if current is None:  # set_message keeps the count it had
        current = coalescer.last_current(task_id)
    current_n = finite_number(current)
    total_n = finite_number(total) if total is not None else None
    values: Values = (current_n if current_n is not None else 0, total_n, None if message is None else str(message))
    coalescer.report(task_id, name, values)


def _current_task() -> tuple[str | None, str | None]:
    from celery import current_task

    task = current_task
    if not task or task.request.id is None:
        log.debug("progress-sse: progress reported outside a task and without a task_id")
        return None, None
    return str(task.request.id), str(task.name)
