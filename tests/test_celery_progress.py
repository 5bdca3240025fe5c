"""celery-progress compatibility: the JSON of its progress view for every state, and
its ProgressRecorder on top of the coalesced progress API.

The expected bodies are written out in full from celery-progress's
`celery_progress/backend.py` (`Progress.get_info`, `_get_completed_progress`,
`_get_unknown_progress`), so any drift in keys or values fails here. Recorder tests
use a real Coalescer over a recording publisher and wait for publishes on a
condition with a deadline, never a sleep.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any, cast

import pytest

from progress_sse.celery_progress import PROGRESS_STATE, ProgressRecorder, celery_progress_json
from progress_sse.events import State, dumps, make_event
from progress_sse.web.store import describe
from progress_sse.worker import progress
from progress_sse.worker.progress import Coalescer
from progress_sse.worker.publisher import Publisher

WAIT = 5.0
TASK = "shop.generate_invoices"
COMPLETED = {"pending": False, "current": 100, "total": 100, "percent": 100}

Event = dict[str, Any]


def task_state(state: str, **fields: Any) -> dict[str, Any]:
    """What GET /tasks/<id> returns for a task whose latest event is `state`."""
    event = make_event(str(uuid.uuid4()), TASK, state, **fields)
    stored = {"state": state, "seq": "7", "latest": dumps(event), "name": TASK, "created_at": str(event["ts"])}
    return describe(stored)


# --- celery_progress_json: one test per state ----------------------------------------------


def test_queued_is_pending() -> None:
    assert celery_progress_json(task_state(State.QUEUED)) == {
        "state": "PENDING",
        "complete": False,
        "success": None,
        "progress": {"pending": True, "current": 0, "total": 100, "percent": 0},
    }


def test_an_id_the_service_does_not_know_is_pending_as_celery_reports_it() -> None:
    assert celery_progress_json(None) == celery_progress_json(task_state(State.QUEUED))


def test_started_is_started_and_no_longer_pending() -> None:
    assert celery_progress_json(task_state(State.STARTED)) == {
        "state": "STARTED",
        "complete": False,
        "success": None,
        "progress": {"pending": False, "current": 0, "total": 100, "percent": 0},
    }


def test_determinate_progress_carries_count_percent_and_description() -> None:
    state = task_state(State.PROGRESS, current=3, total=8, message="Invoice 3 of 8")
    assert celery_progress_json(state) == {
        "state": "PROGRESS",
        "complete": False,
        "success": None,
        "progress": {"pending": False, "current": 3, "total": 8, "percent": 37.5, "description": "Invoice 3 of 8"},
    }


def test_indeterminate_progress_has_celery_progress_unknown_total_zero() -> None:
    state = task_state(State.PROGRESS, current=4, total=None, message=None)
    assert celery_progress_json(state) == {
        "state": "PROGRESS",
        "complete": False,
        "success": None,
        "progress": {"pending": False, "current": 4, "total": 0, "percent": 0, "description": ""},
    }


def test_retry_is_complete_unsuccessful_with_the_countdown_and_cause() -> None:
    cause = "ConnectionError: refused"
    state = task_state(State.RETRY, current=2, total=5, message=cause, ts=1000.0, retries=1, eta=1030.2)
    assert celery_progress_json(state) == {
        "state": "RETRY",
        "complete": True,
        "success": False,
        "progress": COMPLETED,
        "result": {"next_retry_seconds": 30, "message": cause},
    }
    # A retry whose eta is not known.
    unknown = celery_progress_json(task_state(State.RETRY, message="retrying", retries=2))
    assert unknown["result"] == {"next_retry_seconds": "Unknown", "message": "retrying"}


def test_success_carries_the_result() -> None:
    state = task_state(State.SUCCESS, current=8, total=8, result={"invoices": 8, "ids": [1, 2]})
    assert celery_progress_json(state) == {
        "state": "SUCCESS",
        "complete": True,
        "success": True,
        "progress": COMPLETED,
        "result": {"invoices": 8, "ids": [1, 2]},
    }


def test_success_of_an_indeterminate_task_with_a_null_result() -> None:
    state = task_state(State.SUCCESS, result=None)
    assert celery_progress_json(state) == {
        "state": "SUCCESS",
        "complete": True,
        "success": True,
        "progress": COMPLETED,
        "result": None,
    }


def test_failure_result_is_the_exception_message() -> None:
    error = {"type": "ValueError", "message": "bad row 7", "traceback": "Traceback (most recent call last): ..."}
    state = task_state(State.FAILURE, current=6, total=8, message="bad row 7", error=error)
    assert celery_progress_json(state) == {
        "state": "FAILURE",
        "complete": True,
        "success": False,
        "progress": COMPLETED,
        "result": "bad row 7",
    }


def test_failure_without_a_message_names_the_exception_type() -> None:
    error = {"type": "KeyError", "message": "", "traceback": ""}
    state = task_state(State.FAILURE, message="KeyError", error=error)
    assert celery_progress_json(state)["result"] == "KeyError"


@pytest.mark.parametrize("reason", ["revoked", "terminated", "expired"])
def test_revoked_says_task_and_the_reason(reason: str) -> None:
    state = task_state(State.REVOKED, current=1, total=4, message=f"Task {reason}", reason=reason)
    assert celery_progress_json(state) == {
        "state": "REVOKED",
        "complete": True,
        "success": False,
        "progress": COMPLETED,
        "result": f"Task {reason}",
    }


def test_lost_has_no_celery_state_and_is_reported_as_failure() -> None:
    state = task_state(State.LOST, current=2, total=4, message="Worker stopped reporting")
    assert celery_progress_json(state) == {
        "state": "FAILURE",
        "complete": True,
        "success": False,
        "progress": COMPLETED,
        "result": "Worker stopped reporting",
    }
    assert celery_progress_json(task_state(State.LOST))["result"].startswith("Task lost")


def test_a_state_it_does_not_know_looks_as_celery_progress_shows_unknown_states() -> None:
    state = task_state("paused")
    assert celery_progress_json(state) == {
        "state": "PAUSED",
        "complete": True,
        "success": False,
        "progress": {"pending": False, "current": 0, "total": 100, "percent": 0},
        "result": "Unknown state PAUSED",
    }


def test_every_state_has_the_keys_a_celery_progress_front_end_reads() -> None:
    for state in State:
        body = celery_progress_json(task_state(state))
        assert list(body)[:4] == ["state", "complete", "success", "progress"], state
        assert ("result" in body) is body["complete"], state
        assert {"pending", "current", "total", "percent"} <= set(body["progress"]), state


# --- ProgressRecorder -------------------------------------------------------------------


class RecordingPublisher:
    """Stands in for Publisher: records every event; a test can wait for one."""

    def __init__(self, *, fail: bool = False) -> None:
        self.events: list[Event] = []
        self.fail = fail
        self._changed = threading.Condition()

    def publish_quietly(self, event: Event, **fields: Any) -> int | None:
        with self._changed:
            self.events.append(dict(event))
            self._changed.notify_all()
        if self.fail:
            raise RuntimeError("Redis is down")
        return len(self.events)

    def wait_for(self, predicate: Callable[[Event], bool], what: str) -> list[Event]:
        with self._changed:
            if not self._changed.wait_for(lambda: any(predicate(e) for e in self.events), timeout=WAIT):
                raise AssertionError(f"not published within {WAIT}s: {what}; got {self.events}")
            return list(self.events)


@pytest.fixture
def use_coalescer() -> Iterator[Callable[..., Coalescer]]:
    """Installs a Coalescer for one test and clears it afterwards."""

    def install(publisher: object, *, max_rate: float = 1000) -> Coalescer:
        coalescer = Coalescer(cast(Publisher, publisher), max_rate=max_rate)
        progress.configure(coalescer)
        return coalescer

    yield install
    progress.configure(None)


def bound_task(task_id: str | None = None) -> Any:
    """What celery-progress's recorder is given: a bound task (`self`), with its request."""
    return SimpleNamespace(name=TASK, request=SimpleNamespace(id=task_id or str(uuid.uuid4())))


def test_set_progress_returns_celery_progress_state_and_meta() -> None:
    recorder = ProgressRecorder(bound_task())
    assert recorder.set_progress(1, 3, "one") == (
        "PROGRESS",
        {"pending": False, "current": 1, "total": 3, "percent": 33.33, "description": "one"},
    )
    assert PROGRESS_STATE == "PROGRESS"
    assert recorder.set_progress(2, 3)[1]["description"] == ""
    assert recorder.set_progress(5, 0)[1]["percent"] == 0  # celery-progress: 0 unless total > 0
    assert recorder.set_progress(1, 8)[1]["percent"] == 12.5


def test_set_progress_publishes_count_total_and_description_as_message(
    use_coalescer: Callable[..., Coalescer],
) -> None:
    publisher = RecordingPublisher()
    coalescer = use_coalescer(publisher)
    task = bound_task()
    ProgressRecorder(task).set_progress(3, 10, description="Invoice 3 of 10")
    coalescer.flush(task.request.id)
    event = publisher.wait_for(lambda e: e["current"] == 3, "current=3")[-1]
    assert event["task_id"] == task.request.id and event["name"] == TASK
    assert event["state"] == State.PROGRESS
    assert (event["current"], event["total"], event["percent"], event["message"]) == (3, 10, 30.0, "Invoice 3 of 10")


def test_increment_progress_counts_from_zero_and_keeps_the_last_total(
    use_coalescer: Callable[..., Coalescer],
) -> None:
    publisher = RecordingPublisher()
    coalescer = use_coalescer(publisher)
    task = bound_task()
    recorder = ProgressRecorder(task)
    recorder.set_progress(0, 4, "Starting")
    assert recorder.increment_progress() is None  # as celery-progress's
    recorder.increment_progress(2, description="Rendered invoice 3")
    assert (recorder.current, recorder.total, recorder.description) == (3, 4, "Rendered invoice 3")
    coalescer.flush(task.request.id)
    last = publisher.wait_for(lambda e: e["current"] == 3, "current=3")[-1]
    assert (last["current"], last["total"], last["message"]) == (3, 4, "Rendered invoice 3")


def test_increment_without_a_description_sends_no_message(use_coalescer: Callable[..., Coalescer]) -> None:
    publisher = RecordingPublisher()
    coalescer = use_coalescer(publisher)
    task = bound_task()
    recorder = ProgressRecorder(task)
    recorder.set_progress(1, 4, "first")
    recorder.increment_progress()
    coalescer.flush(task.request.id)
    last = publisher.wait_for(lambda e: e["current"] == 2, "current=2")[-1]
    assert last["message"] is None
    assert recorder.description == "first"  # kept, as celery-progress keeps it


@pytest.mark.parametrize("total", [0, -1])
def test_a_total_celery_progress_calls_unknown_streams_indeterminate(
    use_coalescer: Callable[..., Coalescer], total: int
) -> None:
    publisher = RecordingPublisher()
    coalescer = use_coalescer(publisher)
    task = bound_task()
    recorder = ProgressRecorder(task)
    recorder.set_progress(0, total)
    recorder.increment_progress(description="Scanned a page")
    coalescer.flush(task.request.id)
    last = publisher.wait_for(lambda e: e["current"] == 1, "current=1")[-1]
    assert (last["current"], last["total"], last["percent"], last["message"]) == (1, None, None, "Scanned a page")


def test_calls_are_coalesced_and_the_last_value_goes_out(use_coalescer: Callable[..., Coalescer]) -> None:
    rate = 5.0
    publisher = RecordingPublisher()
    use_coalescer(publisher, max_rate=rate)
    recorder = ProgressRecorder(bound_task())
    began = time.monotonic()
    for i in range(1, 10_001):
        recorder.set_progress(i, 10_000, f"Row {i}")
    elapsed = time.monotonic() - began
    # No flush: the coalescer's own thread must deliver the latest value.
    events = publisher.wait_for(lambda e: e["current"] == 10_000, "the last value")
    assert events[-1]["message"] == "Row 10000"
    assert len(events) <= 2 + (elapsed + WAIT) * rate, len(events)
    assert len(events) < 100


def test_never_raises_into_the_task(use_coalescer: Callable[..., Coalescer]) -> None:
    recorder = ProgressRecorder(bound_task())
    recorder.set_progress(1, 2, "no bridge installed")  # no coalescer: a no-op

    publisher = RecordingPublisher(fail=True)
    coalescer = use_coalescer(publisher)
    task = bound_task()
    recorder = ProgressRecorder(task)
    recorder.set_progress(1, 2, "Redis is down")
    coalescer.flush(task.request.id)  # the publish raises inside; nothing reaches here
    publisher.wait_for(lambda e: e["current"] == 1, "the attempt")

    # Values celery-progress itself would choke on.
    assert recorder.set_progress(float("nan"), 2)[1]["percent"] == 0
    assert recorder.set_progress(1, cast(float, None))[1]["percent"] == 0
    assert recorder.set_progress(cast(float, "x"), cast(float, "y"))[1]["percent"] == 0
    ProgressRecorder(SimpleNamespace()).set_progress(1, 2)  # not a bound task
    ProgressRecorder(bound_task()).increment_progress(cast(float, "one"))
