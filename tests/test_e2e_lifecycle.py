"""Every demo task's life, end to end: real Redis, real worker, real aiohttp server."""

from __future__ import annotations

import re
from typing import Any

import pytest

from .conftest import Server
from .sse import SSEEvent, SSEReader, numbers

pytestmark = [pytest.mark.e2e, pytest.mark.both_backends, pytest.mark.usefixtures("worker")]


async def history(server: Server, task_id: str) -> list[SSEEvent]:
    """The task's whole life: a cursor of 0 precedes every event, so all of them come."""
    async with server.session.get(server.url(f"/tasks/{task_id}/events?last_event_id=0")) as resp:
        assert resp.status == 200
        return await SSEReader(resp).rest()


def states(events: list[SSEEvent]) -> str:
    return " ".join(str(e.event) for e in events)


def assert_ids_increase(events: list[SSEEvent]) -> None:
    ids = numbers(events)
    assert ids == sorted(set(ids)), ids


async def test_count_streams_queued_started_progress_success(server: Server) -> None:
    task_id = await server.start_task("demo.count", n=5, delay=0.1)
    events = await history(server, task_id)
    assert re.fullmatch(r"queued started( progress)+ success", states(events)), states(events)
    assert_ids_increase(events)
    progress = [e.payload for e in events if e.event == "progress"]
    currents = [p["current"] for p in progress]
    assert currents == sorted(currents) and currents[-1] == 5
    assert all(p["total"] == 5 for p in progress)
    assert progress[-1]["message"] == "Processed 5 of 5"
    success = events[-1].payload
    assert success["result"] == {"processed": 5}
    assert success["percent"] == 100 and success["current"] == 5 and success["total"] == 5


async def test_mystery_is_indeterminate_until_it_succeeds(server: Server) -> None:
    task_id = await server.start_task("demo.mystery", min_s=0.2, max_s=0.4)
    events = await history(server, task_id)
    assert re.fullmatch(r"queued started progress success", states(events)), states(events)
    progress = events[2].payload
    assert progress["total"] is None and progress["percent"] is None
    assert progress["message"]
    success = events[-1].payload
    assert success["total"] is None and success["percent"] is None
    assert 0.2 <= success["result"]["seconds"] <= 0.4


async def test_stages_report_named_stages_at_quarter_steps(server: Server) -> None:
    task_id = await server.start_task("demo.stages", delay=0.3)
    events = await history(server, task_id)
    assert re.fullmatch(r"queued started progress progress progress progress success", states(events)), states(events)
    progress = [e.payload for e in events if e.event == "progress"]
    assert [p["percent"] for p in progress] == [25, 50, 75, 100]
    assert [p["message"] for p in progress] == ["Fetching", "Parsing", "Indexing", "Publishing"]


async def test_fail_ends_in_failure_with_type_message_and_traceback(server: Server) -> None:
    task_id = await server.start_task("demo.fail", after=3, delay=0.05)
    events = await history(server, task_id)
    assert re.fullmatch(r"queued started( progress)+ failure", states(events)), states(events)
    error = events[-1].payload["error"]
    assert error["type"] == "RuntimeError"
    assert "after 3 steps" in error["message"]
    assert "Traceback" in error["traceback"] and "RuntimeError" in error["traceback"]
    # The bar keeps its last count: 3 of 6.
    assert events[-1].payload["current"] == 3 and events[-1].payload["total"] == 6
    state = await server.state(task_id)
    assert state["state"] == "failure" and state["error"]["type"] == "RuntimeError"
    assert state["finished_at"] >= state["started_at"] >= state["created_at"]


async def test_flaky_retries_then_succeeds(server: Server) -> None:
    task_id = await server.start_task("demo.flaky", failures=2, delay=0.1)
    events = await history(server, task_id)
    pattern = r"queued started progress retry started progress retry started progress success"
    assert re.fullmatch(pattern, states(events)), states(events)
    retries: list[dict[str, Any]] = [e.payload for e in events if e.event == "retry"]
    assert [r["retries"] for r in retries] == [1, 2]
    assert all(r["eta"] >= r["ts"] for r in retries)
    assert "ConnectionError" in retries[0]["message"]
    assert events[-1].payload["result"] == {"attempts": 3}
