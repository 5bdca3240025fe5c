"""progress-sse in a user's own Celery app, with real parts throughout.

`tests/apps/shop.py` is the user's app (its own name, tasks and queue; the bridge
added in one line). A real prefork worker runs it, a real aiohttp server serves its
streams with the shop's own allow-list, and `tests/apps/publisher_only.py` plays a
Django/Flask process that only publishes tasks. Every wait is for a frame or a
process, with a deadline.
"""

from __future__ import annotations

import asyncio
import re
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from progress_sse.allowlist import AllowedTask, AllowList, integer, number
from progress_sse.celery_progress import celery_progress_json
from progress_sse.config import Settings

from .conftest import Server, Worker, worker_env
from .sse import SSEEvent, SSEReader, numbers

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]

# What the shop lets its web process start, with its own parameter checks.
SHOP_TASKS = AllowList(
    [
        AllowedTask("shop.import_products", {"count": (integer(1, 10_000), 5), "delay": (number(0, 5), 0.0)}),
        AllowedTask("shop.rebuild_search_index", {"seconds": (number(0, 60), 0.1)}),
        AllowedTask("shop.send_newsletter", {"recipients": (integer(1, 10_000), 4), "delay": (number(0, 5), 0.0)}),
        AllowedTask("shop.generate_invoices", {"count": (integer(1, 1_000), 3), "delay": (number(0, 5), 0.0)}),
    ]
)


@pytest.fixture(scope="module")
def shop_settings(settings: Settings) -> Settings:
    # The shop's own queue, so neither the demo worker nor this one takes the other's tasks.
    return settings.with_(queue=f"{settings.queue}-shop")


@pytest.fixture(scope="module")
def shop_worker(shop_settings: Settings, redis_client: redis.Redis, output_dir: Path) -> Iterator[Worker]:
    worker = Worker(shop_settings, output_dir / "shop-worker.log", app="tests.apps.shop")
    try:
        worker.wait_ready()
        yield worker
    finally:
        worker.stop()


@pytest.fixture
async def shop(make_server: Callable[..., Any], shop_settings: Settings, shop_worker: Worker) -> Server:
    """The progress service for the shop: its allow-list, its queue."""
    server: Server = await make_server(shop_settings, allowlist=SHOP_TASKS)
    return server


async def history(server: Server, task_id: str) -> list[SSEEvent]:
    """The task's whole life over SSE, until the server ends the stream after its
    terminal event (a cursor of 0 precedes every event)."""
    async with server.session.get(server.url(f"/tasks/{task_id}/events?last_event_id=0")) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        return await SSEReader(resp).rest()


def states(events: list[SSEEvent]) -> str:
    return " ".join(str(e.event) for e in events)


# name, kwargs, total (None: indeterminate), message for a count, result
CASES = [
    pytest.param(
        "shop.import_products",
        {"count": 5, "delay": 0.02},
        5,
        lambda i: f"Imported {i} of 5 products",
        {"imported": 5},
        id="determinate-set_progress",
    ),
    pytest.param(
        "shop.rebuild_search_index",
        {"seconds": 0.1},
        None,
        lambda i: "Rebuilding the search index",
        "rebuilt",
        id="indeterminate-set_message",
    ),
    pytest.param(
        "shop.send_newsletter",
        {"recipients": 4, "delay": 0.02},
        4,
        lambda i: f"Sent {i} of 4",
        {"sent": 4},
        id="iterable-track",
    ),
    pytest.param(
        "shop.generate_invoices",
        {"count": 3, "delay": 0.02},
        3,
        lambda i: "Starting" if i == 0 else f"Rendered invoice {i} of 3",
        3,
        id="celery_progress-ProgressRecorder",
    ),
]


@pytest.mark.parametrize(("name", "kwargs", "total", "message", "result"), CASES)
async def test_each_shop_task_streams_its_whole_life(
    shop: Server,
    shop_worker: Worker,
    name: str,
    kwargs: dict[str, Any],
    total: int | None,
    message: Callable[[int], str],
    result: Any,
) -> None:
    task_id = await shop.start_task(name, **kwargs)
    events = await history(shop, task_id)

    assert re.fullmatch(r"queued started( progress)+ success", states(events)), states(events)
    ids = numbers(events)
    assert ids == sorted(set(ids)), ids
    assert {e.payload["name"] for e in events} == {name}
    assert {e.payload["task_id"] for e in events} == {task_id}

    progress = [e.payload for e in events if e.event == "progress"]
    currents = [p["current"] for p in progress]
    assert currents == sorted(currents), currents
    assert currents[-1] == (total or 0)  # the last value is always published before the end
    for p in progress:
        assert p["total"] == total, p
        assert p["message"] == message(p["current"]), p  # each event's message goes with its count
        assert p["percent"] == (None if total is None else round(100 * p["current"] / total, 2)), p

    success = events[-1].payload
    assert success["result"] == result
    if total is None:
        assert success["total"] is None and success["percent"] is None
    else:
        assert (success["current"], success["total"], success["percent"]) == (total, total, 100)

    # It ran on the shop's worker, and the polling body agrees with the stream.
    state = await shop.state(task_id)
    assert state["state"] == "success" and state["result"] == result
    assert str(state["worker"]).startswith(f"{shop_worker.name}@")
    assert state["created_at"] <= state["started_at"] <= state["finished_at"]
    assert celery_progress_json(state) == {
        "state": "SUCCESS",
        "complete": True,
        "success": True,
        "progress": {"pending": False, "current": 100, "total": 100, "percent": 100},
        "result": result,
    }


async def test_the_server_starts_only_the_shops_tasks(shop: Server) -> None:
    async def post(body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        async with shop.session.post(shop.url("/tasks"), json=body) as resp:
            return resp.status, await resp.json()

    status, body = await post({"name": "demo.count", "kwargs": {"n": 3}})
    assert status == 422, body
    assert "'demo.count' is not a task this server starts" in body["error"]
    assert "shop.import_products" in body["error"]

    status, body = await post({"name": "shop.import_products", "kwargs": {"count": 0}})
    assert status == 422 and "count" in body["error"], body
    status, body = await post({"name": "shop.send_newsletter", "kwargs": {"to": "everyone"}})
    assert status == 422 and "'to'" in body["error"], body

    status, body = await post({"name": "shop.import_products", "kwargs": {"count": 2}})
    assert status == 202, body
    assert [e.event for e in await history(shop, body["id"])][-1] == "success"


async def test_a_process_that_only_publishes_records_queued_and_the_service_streams_the_rest(
    shop: Server, shop_settings: Settings
) -> None:
    before = time.time()
    publisher = await asyncio.create_subprocess_exec(
        sys.executable,
        str(ROOT / "tests" / "apps" / "publisher_only.py"),
        "4",
        cwd=ROOT,
        env=worker_env(shop_settings),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(60):
        out, err = await publisher.communicate()
    after = time.time()
    assert publisher.returncode == 0, err.decode()
    task_id = out.decode().strip().splitlines()[-1]

    # The publisher stored `queued` in its own process before it sent the task (no
    # worker records `queued`, and this server never saw the task): the service knows
    # the task from the moment the publisher ran, and `queued` opens its history.
    state = await shop.state(task_id)
    assert state["name"] == "shop.import_products"
    assert before <= state["created_at"] <= after

    events = await history(shop, task_id)
    assert events[0].event == "queued", f"the publisher did not record queued: {states(events)}"
    assert events[0].payload["ts"] == state["created_at"]
    assert re.fullmatch(r"queued started( progress)+ success", states(events)), states(events)
    assert events[-1].payload["result"] == {"imported": 4}
    assert [e.payload["current"] for e in events if e.event == "progress"][-1] == 4

    final = await shop.state(task_id)
    assert final["created_at"] <= final["started_at"] <= final["finished_at"]


def test_the_worker_says_once_where_it_records_events(shop_worker: Worker, shop_settings: Settings) -> None:
    """`celery -A` imports the app (and runs install) before the worker's logging is
    set up; the line must still appear, once, naming the Redis and the key prefix."""
    db = shop_settings.redis_url.rsplit("/", 1)[1]
    lines = [line for line in shop_worker.log_path.read_text().splitlines() if "records events in" in line]
    assert len(lines) == 1, lines
    assert lines[0].endswith(f"/{db} under the key prefix {shop_settings.key_prefix!r}"), lines


async def test_a_task_the_worker_does_not_have_fails_instead_of_waiting_for_ever(
    make_server: Callable[..., Any], shop_settings: Settings, shop_worker: Worker
) -> None:
    """The demo allow-list in front of the shop's worker: demo.count reaches a worker
    that does not know it. Celery drops it; its watchers must learn that."""
    server: Server = await make_server(shop_settings)  # the default allow-list: the demo tasks
    task_id = await server.start_task("demo.count", n=1)
    events = await asyncio.wait_for(history(server, task_id), 30)
    assert states(events) == "queued failure"
    error = events[-1].payload["error"]
    assert error["type"] == "NotRegistered"
    assert "does not know the task 'demo.count'" in error["message"]
    assert events[-1].payload["worker"].startswith(f"{shop_worker.name}@")  # which worker: for operators
