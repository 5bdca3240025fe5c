"""The in-task progress API and its Coalescer.

Pure-logic tests use a recording publisher; the coalescing bound and the Redis-down
case use the real Publisher. Nothing here sleeps to synchronise: tests wait for the
publish they expect on a condition, with a deadline.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, cast

import pytest
import redis

from progress_sse.config import Settings
from progress_sse.connections import sync_client
from progress_sse.events import State, make_event
from progress_sse.keys import Keys
from progress_sse.worker import progress
from progress_sse.worker.progress import Coalescer, set_message, set_progress, track
from progress_sse.worker.publisher import Publisher

WAIT = 5.0  # seconds: a deadline for something expected within one interval, not a pace

Event = dict[str, Any]


class RecordingPublisher:
    """Stands in for Publisher: records every event, and lets a test wait for one."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.fields: list[dict[str, Any]] = []
        self._changed = threading.Condition()

    def publish_quietly(self, event: Event, **fields: Any) -> int | None:
        with self._changed:
            self.events.append(dict(event))
            self.fields.append(fields)
            self._changed.notify_all()
            return len(self.events)

    def snapshot(self) -> list[Event]:
        with self._changed:
            return list(self.events)

    def wait_for(self, predicate: Callable[[Event], bool], what: str) -> list[Event]:
        """Block until some published event satisfies `predicate`; all events so far."""
        with self._changed:
            if not self._changed.wait_for(lambda: any(predicate(e) for e in self.events), timeout=WAIT):
                raise AssertionError(f"not published within {WAIT}s: {what}; got {self.events}")
            return list(self.events)


class ThreadWatch:
    """Sees the coalescer's background thread: the calls it makes to a publisher, and
    the exception that ends it if one does (caught here, so pytest does not report it
    against whichever test happens to run next)."""

    def __init__(self) -> None:
        self.changed = threading.Condition()
        self.deaths: list[BaseException | None] = []

    def excepthook(self, args: threading.ExceptHookArgs) -> None:
        with self.changed:
            self.deaths.append(args.exc_value)
            self.changed.notify_all()

    def wait_for(self, predicate: Callable[[], bool], what: str) -> None:
        with self.changed:
            if not self.changed.wait_for(predicate, timeout=WAIT):
                raise AssertionError(f"not within {WAIT}s: {what}")


class RaisingPublisher:
    """A publisher that breaks its promise to be quiet: every call raises."""

    def __init__(self, watch: ThreadWatch) -> None:
        self.watch = watch
        self.calls = 0

    def publish_quietly(self, event: Event, **fields: Any) -> int | None:
        with self.watch.changed:
            self.calls += 1
            self.watch.changed.notify_all()
        raise RuntimeError("publisher exploded")


class FailingAfterFirstPublisher(RecordingPublisher):
    """Publishes once, then raises on every later call."""

    def publish_quietly(self, event: Event, **fields: Any) -> int | None:
        if self.snapshot():
            raise RuntimeError("publisher exploded")
        return super().publish_quietly(event, **fields)


def new_task_id() -> str:
    return str(uuid.uuid4())


def values_of(event: Event) -> tuple[Any, Any, Any]:
    return event["current"], event["total"], event["message"]


@pytest.fixture
def use_coalescer() -> Iterator[Callable[..., Coalescer]]:
    """`use_coalescer(publisher, max_rate=...)` installs a Coalescer for the test and
    clears it afterwards, so no test leaks its coalescer into the next."""

    def install(publisher: object, *, max_rate: float) -> Coalescer:
        coalescer = Coalescer(cast(Publisher, publisher), max_rate=max_rate)
        progress.configure(coalescer)
        return coalescer

    yield install
    progress.configure(None)


@pytest.fixture
def recorder() -> RecordingPublisher:
    return RecordingPublisher()


@pytest.fixture
def thread_watch(monkeypatch: pytest.MonkeyPatch) -> ThreadWatch:
    watch = ThreadWatch()
    monkeypatch.setattr(threading, "excepthook", watch.excepthook)
    return watch


# --- what a call reports ----------------------------------------------------------------


def test_set_progress_publishes_a_determinate_progress_event(
    use_coalescer: Callable[..., Coalescer], recorder: RecordingPublisher
) -> None:
    use_coalescer(recorder, max_rate=20)
    task_id = new_task_id()
    set_progress(3, 10, "Processing item 3", task_id=task_id)
    events = recorder.wait_for(lambda e: e["current"] == 3, "current=3")
    event = events[-1]
    assert list(event) == list(make_event("t", None, "progress"))
    assert event["task_id"] == task_id
    assert event["state"] == State.PROGRESS
    assert (event["current"], event["total"], event["percent"], event["message"]) == (3, 10, 30.0, "Processing item 3")


def test_set_progress_without_total_is_indeterminate_but_still_counts(
    use_coalescer: Callable[..., Coalescer], recorder: RecordingPublisher
) -> None:
    coalescer = use_coalescer(recorder, max_rate=20)
    task_id = new_task_id()
    set_progress(7, task_id=task_id)
    assert coalescer.flush(task_id) == (7, None, None)
    last = recorder.snapshot()[-1]
    assert (last["current"], last["total"], last["percent"]) == (7, None, None)


def test_non_finite_or_non_numeric_values_become_zero_and_unknown(
    use_coalescer: Callable[..., Coalescer], recorder: RecordingPublisher
) -> None:
    coalescer = use_coalescer(recorder, max_rate=20)
    task_id = new_task_id()
    set_progress(float("nan"), float("inf"), task_id=task_id)
    assert coalescer.flush(task_id) == (0, None, None)
    set_progress("4", "8", 12, task_id=task_id)  # type: ignore[arg-type]
    assert coalescer.flush(task_id) == (4.0, 8.0, "12")


def test_set_message_keeps_the_last_count_and_makes_total_unknown(
    use_coalescer: Callable[..., Coalescer], recorder: RecordingPublisher
) -> None:
    coalescer = use_coalescer(recorder, max_rate=20)
    task_id = new_task_id()
    set_progress(5, 10, "half", task_id=task_id)
    set_message("Waiting for the upstream API", task_id=task_id)
    assert coalescer.flush(task_id) == (5, None, "Waiting for the upstream API")
    last = recorder.snapshot()[-1]
    assert (last["current"], last["total"], last["percent"], last["message"]) == (
        5,
        None,
        None,
        "Waiting for the upstream API",
    )


def test_set_message_on_a_fresh_task_starts_at_zero(
    use_coalescer: Callable[..., Coalescer], recorder: RecordingPublisher
) -> None:
    coalescer = use_coalescer(recorder, max_rate=20)
    task_id = new_task_id()
    set_message("Starting", task_id=task_id)
    assert coalescer.flush(task_id) == (0, None, "Starting")


def test_track_uses_len_when_the_iterable_has_one(
    use_coalescer: Callable[..., Coalescer], recorder: RecordingPublisher
) -> None:
    coalescer = use_coalescer(recorder, max_rate=20)
    task_id = new_task_id()
    items = ["a", "b", "c"]
    assert list(track(items, message="Imported {current} of {total}", task_id=task_id)) == items
    assert coalescer.flush(task_id) == (3, 3, "Imported 3 of 3")
    assert recorder.snapshot()[-1]["percent"] == 100.0


def test_track_of_a_generator_is_indeterminate(
    use_coalescer: Callable[..., Coalescer], recorder: RecordingPublisher
) -> None:
    coalescer = use_coalescer(recorder, max_rate=20)
    task_id = new_task_id()
    assert list(track((n * n for n in range(4)), message="Row {current}", task_id=task_id)) == [0, 1, 4, 9]
    assert coalescer.flush(task_id) == (4, None, "Row 4")
    assert recorder.snapshot()[-1]["percent"] is None


def test_track_explicit_total_wins_over_len(
    use_coalescer: Callable[..., Coalescer], recorder: RecordingPublisher
) -> None:
    coalescer = use_coalescer(recorder, max_rate=20)
    task_id = new_task_id()
    list(track(iter(range(2)), total=8, message="{current}/{total}", task_id=task_id))
    assert coalescer.flush(task_id) == (2, 8, "2/8")


def test_track_without_message_reports_counts_only(
    use_coalescer: Callable[..., Coalescer], recorder: RecordingPublisher
) -> None:
    coalescer = use_coalescer(recorder, max_rate=20)
    task_id = new_task_id()
    list(track(range(5), task_id=task_id))
    assert coalescer.flush(task_id) == (5, 5, None)


def test_track_counts_an_item_once_the_loop_body_is_done_with_it(
    use_coalescer: Callable[..., Coalescer], recorder: RecordingPublisher
) -> None:
    coalescer = use_coalescer(recorder, max_rate=20)
    task_id = new_task_id()
    it = track(["a", "b", "c"], task_id=task_id)
    assert next(it) == "a"
    assert coalescer.last_current(task_id) == 0  # "a" is still being worked on
    assert next(it) == "b"
    assert coalescer.last_current(task_id) == 1
    assert list(it) == ["c"]
    assert coalescer.last_current(task_id) == 3


# --- coalescing -------------------------------------------------------------------------


def test_latest_value_becomes_visible_within_the_interval_even_if_the_task_goes_quiet(
    use_coalescer: Callable[..., Coalescer], recorder: RecordingPublisher
) -> None:
    use_coalescer(recorder, max_rate=20)
    task_id = new_task_id()
    set_progress(1, 2, "first", task_id=task_id)
    set_progress(2, 2, "second", task_id=task_id)  # coalesced: inside the first interval
    # No further call and no flush: the background thread alone must publish it.
    events = recorder.wait_for(lambda e: e["message"] == "second", "the second, coalesced value")
    assert values_of(events[-1]) == (2, 2, "second")
    assert [e["current"] for e in events] in ([1, 2], [2])


def test_rapid_calls_publish_the_latest_value_not_every_value(
    use_coalescer: Callable[..., Coalescer], recorder: RecordingPublisher
) -> None:
    use_coalescer(recorder, max_rate=20)
    task_id = new_task_id()
    for i in range(1, 1001):
        set_progress(i, 1000, task_id=task_id)
    events = recorder.wait_for(lambda e: e["current"] == 1000, "current=1000")
    currents = [e["current"] for e in events]
    assert currents == sorted(currents)
    assert len(currents) < 1000


def test_flush_publishes_the_pending_value_synchronously_and_returns_the_last_values(
    use_coalescer: Callable[..., Coalescer], recorder: RecordingPublisher
) -> None:
    # One publish per 100 s: after the first, nothing but flush can publish in this test.
    coalescer = use_coalescer(recorder, max_rate=0.01)
    task_id = new_task_id()
    set_progress(1, 4, "one", task_id=task_id)
    recorder.wait_for(lambda e: e["current"] == 1, "the first value")
    set_progress(2, 4, "two", task_id=task_id)
    set_progress(3, 4, "three", task_id=task_id)
    assert [e["current"] for e in recorder.snapshot()] == [1]

    assert coalescer.flush(task_id) == (3, 4, "three")
    events = recorder.snapshot()
    assert [values_of(e) for e in events] == [(1, 4, "one"), (3, 4, "three")]
    assert events[-1]["percent"] == 75.0


def test_flush_sends_nothing_again_when_the_latest_value_is_already_out(
    use_coalescer: Callable[..., Coalescer], recorder: RecordingPublisher
) -> None:
    coalescer = use_coalescer(recorder, max_rate=20)
    task_id = new_task_id()
    set_progress(1, 2, task_id=task_id)
    recorder.wait_for(lambda e: e["current"] == 1, "current=1")
    assert coalescer.flush(task_id) == (1, 2, None)
    assert [e["current"] for e in recorder.snapshot()] == [1]


def test_flush_of_a_task_that_never_reported_returns_none_and_publishes_nothing(
    use_coalescer: Callable[..., Coalescer], recorder: RecordingPublisher
) -> None:
    coalescer = use_coalescer(recorder, max_rate=20)
    assert coalescer.flush(new_task_id()) is None
    assert recorder.snapshot() == []


def test_flush_forgets_the_task_so_a_second_flush_returns_none(
    use_coalescer: Callable[..., Coalescer], recorder: RecordingPublisher
) -> None:
    coalescer = use_coalescer(recorder, max_rate=20)
    task_id = new_task_id()
    set_progress(1, 1, task_id=task_id)
    assert coalescer.flush(task_id) == (1, 1, None)
    assert coalescer.flush(task_id) is None
    assert coalescer.last_current(task_id) == 0


def test_tasks_are_coalesced_independently(
    use_coalescer: Callable[..., Coalescer], recorder: RecordingPublisher
) -> None:
    coalescer = use_coalescer(recorder, max_rate=0.01)
    a, b = new_task_id(), new_task_id()
    set_progress(1, 10, task_id=a)
    set_progress(5, 10, task_id=b)  # not held back by a's interval
    events = recorder.wait_for(lambda e: e["task_id"] == b, "task b's first value")
    assert {(e["task_id"], e["current"]) for e in events} == {(a, 1), (b, 5)}
    set_progress(2, 10, task_id=a)
    assert coalescer.flush(a) == (2, 10, None)
    assert coalescer.flush(b) == (5, 10, None)
    assert [(e["task_id"], e["current"]) for e in recorder.snapshot()][-1] == (a, 2)


# --- never in the task's way ------------------------------------------------------------


@pytest.mark.usefixtures("use_coalescer")  # for its teardown: nothing is configured after
def test_calls_without_a_configured_coalescer_do_nothing() -> None:
    progress.configure(None)
    set_progress(1, 2, "x", task_id=new_task_id())
    set_message("y", task_id=new_task_id())
    assert list(track([1, 2], task_id=new_task_id())) == [1, 2]
    assert progress.active() is None


def test_calls_outside_a_task_without_task_id_do_nothing(
    use_coalescer: Callable[..., Coalescer], recorder: RecordingPublisher
) -> None:
    coalescer = use_coalescer(recorder, max_rate=1000)
    set_progress(1, 2, "outside")
    set_message("outside")
    assert list(track(["a", "b"], message="outside {current}")) == ["a", "b"]
    # Anything those calls had scheduled would be due before this marker, and the one
    # thread publishes in due order: once the marker is out, the rest would be too.
    marker = new_task_id()
    set_progress(1, 1, "marker", task_id=marker)
    events = recorder.wait_for(lambda e: e["task_id"] == marker, "the marker")
    assert [e["message"] for e in events] == ["marker"]
    assert coalescer.flush(marker) == (1, 1, "marker")


def test_calls_inside_a_celery_task_use_its_id_and_name(
    use_coalescer: Callable[..., Coalescer], recorder: RecordingPublisher
) -> None:
    from celery import Celery

    coalescer = use_coalescer(recorder, max_rate=20)
    app = Celery("progress-sse-test", broker="memory://", backend="cache+memory://", set_as_current=False)

    @app.task(name="tests.report")
    def report() -> None:
        set_progress(2, 5, "inside")

    task_id = new_task_id()
    assert report.apply(task_id=task_id).successful()
    assert coalescer.flush(task_id) == (2, 5, "inside")
    last = recorder.snapshot()[-1]
    assert (last["task_id"], last["name"]) == (task_id, "tests.report")


def test_a_publisher_that_raises_never_raises_into_the_caller(
    use_coalescer: Callable[..., Coalescer], thread_watch: ThreadWatch
) -> None:
    publisher = RaisingPublisher(thread_watch)
    use_coalescer(publisher, max_rate=1000)
    task_id = new_task_id()
    set_progress(1, 3, "one", task_id=task_id)
    thread_watch.wait_for(lambda: publisher.calls >= 1, "the background thread's first publish")
    set_progress(2, 3, "two", task_id=task_id)
    set_message("still going", task_id=task_id)
    assert list(track([1, 2, 3], message="{current}/{total}", task_id=task_id)) == [1, 2, 3]
    # Settle before the hook is restored: the thread either died of the error (see
    # test_background_thread_survives_a_publisher_error) or went on to publish again.
    thread_watch.wait_for(lambda: bool(thread_watch.deaths) or publisher.calls >= 2, "the thread to settle")


def test_bad_arguments_never_raise_into_the_caller(
    use_coalescer: Callable[..., Coalescer], recorder: RecordingPublisher
) -> None:
    coalescer = use_coalescer(recorder, max_rate=20)
    task_id = new_task_id()
    set_progress(object(), [], task_id=task_id)  # type: ignore[arg-type]
    set_message(None, task_id=task_id)  # type: ignore[arg-type]
    assert coalescer.flush(task_id) == (0, None, None)


@pytest.mark.parametrize("message", ["Importing {name}", "JSON {", "{0}"])
def test_track_with_a_message_it_cannot_format_never_raises_into_the_task(
    use_coalescer: Callable[..., Coalescer], recorder: RecordingPublisher, message: str
) -> None:
    use_coalescer(recorder, max_rate=20)
    task_id = new_task_id()
    assert list(track([1, 2], message=message, task_id=task_id)) == [1, 2]


def test_background_thread_survives_a_publisher_error(
    use_coalescer: Callable[..., Coalescer], thread_watch: ThreadWatch
) -> None:
    publisher = RaisingPublisher(thread_watch)
    use_coalescer(publisher, max_rate=1000)
    set_progress(1, 2, task_id=new_task_id())  # the thread's first publish raises
    thread_watch.wait_for(lambda: publisher.calls >= 1, "the first publish")
    set_progress(1, 2, "after the error", task_id=new_task_id())
    thread_watch.wait_for(lambda: bool(thread_watch.deaths) or publisher.calls >= 2, "the thread to settle")
    assert publisher.calls >= 2, f"the background thread died of {thread_watch.deaths!r}"
    assert thread_watch.deaths == []


def test_flush_with_a_publisher_that_raises_never_raises(use_coalescer: Callable[..., Coalescer]) -> None:
    publisher = FailingAfterFirstPublisher()
    coalescer = use_coalescer(publisher, max_rate=0.01)  # after the first, only flush publishes
    task_id = new_task_id()
    set_progress(1, 2, task_id=task_id)
    publisher.wait_for(lambda e: e["current"] == 1, "the first value")
    set_progress(2, 2, task_id=task_id)
    assert coalescer.flush(task_id) == (2, 2, None)


# --- the real Publisher -----------------------------------------------------------------


@pytest.fixture
def real_publisher(settings: Settings, redis_client: redis.Redis) -> Iterator[Publisher]:
    # Depending on redis_client makes the session clean up this run's keys.
    client = sync_client(settings.redis_url)
    yield Publisher(
        client, Keys(settings.key_prefix), history_ttl=settings.history_ttl, history_max=settings.history_max
    )
    client.close()


def test_a_tight_loop_publishes_at_most_max_rate_per_second_and_ends_on_the_last_value(
    use_coalescer: Callable[..., Coalescer],
    real_publisher: Publisher,
    redis_client: redis.Redis,
    settings: Settings,
) -> None:
    max_rate = 20
    coalescer = use_coalescer(real_publisher, max_rate=max_rate)
    task_id = new_task_id()
    assert real_publisher.publish(make_event(task_id, "tests.loop", State.QUEUED)) is not None

    calls = 100_000
    started = time.monotonic()
    for i in range(1, calls + 1):
        set_progress(i, calls, task_id=task_id)
    elapsed = time.monotonic() - started
    assert coalescer.flush(task_id) == (calls, calls, None)

    entries = redis_client.xrange(Keys(settings.key_prefix).log(task_id))
    progress_entries = [fields for _, fields in entries if fields["s"] == "progress"]
    print(f"\n{calls} set_progress calls in {elapsed:.3f} s -> {len(progress_entries)} progress events stored")
    assert entries[0][1]["s"] == "queued"
    assert 1 <= len(progress_entries) <= max_rate * elapsed + 2
    payload = json.loads(progress_entries[-1]["d"])
    assert (payload["current"], payload["total"], payload["percent"]) == (calls, calls, 100.0)
    currents = [json.loads(f["d"])["current"] for f in progress_entries]
    assert currents == sorted(currents)


def test_redis_down_never_raises_into_the_task(
    use_coalescer: Callable[..., Coalescer], settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    client = sync_client("redis://127.0.0.1:1/0")  # nothing listens on port 1
    try:
        coalescer = use_coalescer(Publisher(client, Keys(settings.key_prefix)), max_rate=20)
        task_id = new_task_id()
        with caplog.at_level(logging.WARNING, logger="progress_sse.worker.publisher"):
            set_progress(1, 3, "one", task_id=task_id)
            set_progress(2, 3, "two", task_id=task_id)
            set_message("three", task_id=task_id)
            assert list(track([1], task_id=task_id)) == [1]
            assert coalescer.flush(task_id) == (1, 1, None)
        assert any("could not store the progress event" in r.getMessage() for r in caplog.records)
    finally:
        client.close()
