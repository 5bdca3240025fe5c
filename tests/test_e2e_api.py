"""The HTTP API's answers, and every bad input: a clear JSON error, nothing queued."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis
from celery import Celery

from progress_sse.config import Settings
from progress_sse.connections import keys_for, sync_client
from progress_sse.events import State, make_event
from progress_sse.keys import Keys
from progress_sse.web import NO_WORKER
from progress_sse.worker.publisher import Publisher

from .conftest import Server

pytestmark = [pytest.mark.e2e, pytest.mark.both_backends]

UNKNOWN = "00000000-0000-4000-8000-000000000000"


@pytest.fixture
async def idle(make_server: Any, settings: Settings) -> AsyncIterator[Server]:
    """A server whose tasks go to a queue no worker reads: what is queued stays countable."""
    server: Server = await make_server(settings.with_(queue=f"{settings.queue}-idle"))
    yield server


def indexed(redis_client: redis.Redis, settings: Settings) -> int:
    """Tasks in the recent index (every partition's, on a cluster)."""
    keys = keys_for(settings)
    return sum(redis_client.zcard(keys.recent(p)) for p in range(keys.partitions))


def queued_count(redis_client: redis.Redis, settings: Settings) -> tuple[int, int]:
    """Messages waiting in the idle queue (on the broker) and tasks in the recent index."""
    with redis.Redis.from_url(settings.broker_url) as broker:
        waiting = broker.llen(f"{settings.queue}-idle")
    return (
        waiting,
        indexed(redis_client, settings),
    )


async def test_start_task_answers_202_with_links_and_queued_already_stored(
    idle: Server, settings: Settings, redis_client: redis.Redis
) -> None:
    before = queued_count(redis_client, settings)
    async with idle.session.post(idle.url("/tasks"), json={"name": "demo.count", "kwargs": {"n": 3}}) as resp:
        assert resp.status == 202
        body = await resp.json()
    task_id = body["id"]
    assert resp.headers["Location"] == f"/tasks/{task_id}"
    assert body == {
        "id": task_id,
        "name": "demo.count",
        "state": "queued",
        "status_url": f"/tasks/{task_id}",
        "events_url": f"/tasks/{task_id}/events",
        "cursor": body["cursor"],
        "workers": body["workers"],
        **({"warning": body["warning"]} if body["workers"] == 0 else {}),
    }
    state = await idle.state(task_id)
    assert state["state"] == "queued" and state["name"] == "demo.count"
    assert state["cursor"] == body["cursor"], "the 202's cursor is the queued event's"
    assert state["created_at"] and state["started_at"] is None
    assert queued_count(redis_client, settings) == (before[0] + 1, before[1] + 1)


BAD_STARTS = [
    # (content type, body, status, words the error must contain)
    ("text/plain", b'{"name": "demo.count"}', 415, "application/json"),
    ("application/json", b"{not json", 400, "not valid JSON"),
    ("application/json", b'["demo.count"]', 400, "JSON object"),
    ("application/json", b'{"name": "os.system"}', 422, "'os.system' is not a task"),
    ("application/json", b'{"name": 42}', 422, "not a task"),
    ("application/json", b'{"name": "demo.count", "args": {"n": 1}}', 422, "args must be a JSON array"),
    ("application/json", b'{"name": "demo.count", "kwargs": [1]}', 422, "kwargs must be a JSON object"),
    ("application/json", b'{"name": "demo.count", "kwargs": {"m": 1}}', 422, "no parameter 'm'"),
    ("application/json", b'{"name": "demo.count", "kwargs": {"n": "ten"}}', 422, "n must be a whole number"),
    ("application/json", b'{"name": "demo.count", "kwargs": {"n": 0}}', 422, "n must be from 1"),
    ("application/json", b'{"name": "demo.count", "args": [1, 2, 3]}', 422, "at most 2 positional"),
    ("application/json", b'{"name": "demo.mystery", "kwargs": {"min_s": 5, "max_s": 1}}', 422, "min_s (5) must not"),
    ("application/json", b'{"name": "demo.fail", "kwargs": {"delay": true}}', 422, "delay must be a number"),
    ("application/json", b"[" * 60_000, 400, "nests JSON too deeply"),
    (
        "application/json",
        b'{"name": "demo.count", "kwargs": {"delay": 1' + b"0" * 400 + b"}}",
        422,
        "delay must be from",
    ),
    ("application/json", b'{"name": "demo.count", "kwargs": {"n": 1' + b"0" * 5000 + b"}}", 400, "not valid JSON"),
]


@pytest.mark.parametrize(("content_type", "body", "status", "words"), BAD_STARTS)
async def test_bad_start_gets_clear_error_and_queues_nothing(
    idle: Server,
    settings: Settings,
    redis_client: redis.Redis,
    content_type: str,
    body: bytes,
    status: int,
    words: str,
) -> None:
    before = queued_count(redis_client, settings)
    async with idle.session.post(idle.url("/tasks"), data=body, headers={"Content-Type": content_type}) as resp:
        assert resp.status == status
        assert resp.content_type == "application/json"
        assert words in (await resp.json())["error"]
    assert queued_count(redis_client, settings) == before


async def test_oversized_body_is_refused_with_413(idle: Server, settings: Settings, redis_client: redis.Redis) -> None:
    before = queued_count(redis_client, settings)
    big = b'{"name": "demo.count", "pad": "' + b"x" * (70 * 1024) + b'"}'
    async with idle.session.post(idle.url("/tasks"), data=big, headers={"Content-Type": "application/json"}) as resp:
        assert resp.status == 413
        assert "64 KiB" in (await resp.json())["error"]

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: refused while reading
        for _ in range(200):
            yield b" " * 1024

    headers = {"Content-Type": "application/json"}
    async with idle.session.post(idle.url("/tasks"), data=chunks(), headers=headers) as resp:
        assert resp.status == 413
    assert queued_count(redis_client, settings) == before


async def test_body_that_is_not_the_encoding_it_claims_gets_400(
    idle: Server, settings: Settings, redis_client: redis.Redis
) -> None:
    before = queued_count(redis_client, settings)
    headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
    async with idle.session.post(idle.url("/tasks"), data=b'{"name": "demo.count"}', headers=headers) as resp:
        assert resp.status == 400
        assert "could not be read" in (await resp.json())["error"]
    assert queued_count(redis_client, settings) == before


async def test_cancel_without_a_broker_still_cancels_waiting_tasks_and_says_so_for_running_ones(
    make_server: Any, settings: Settings
) -> None:
    server: Server = await make_server(settings.with_(broker_url="redis://127.0.0.1:1/0"))
    publisher = Publisher(sync_client(settings.redis_url), keys_for(settings))
    waiting, running = str(uuid.uuid4()), str(uuid.uuid4())
    publisher.publish(make_event(waiting, "demo.count", State.QUEUED))
    publisher.publish(make_event(running, "demo.count", State.STARTED))
    publisher.client.close()
    async with server.session.delete(server.url(f"/tasks/{waiting}")) as resp:
        assert resp.status == 202
        assert (await resp.json())["state"] == "revoked"  # workers honour it when they get the message
    async with server.session.delete(server.url(f"/tasks/{running}")) as resp:
        assert resp.status == 503
        assert "cannot be stopped" in (await resp.json())["error"]
    assert (await server.state(running))["state"] == "started"


async def test_a_server_that_cannot_publish_says_why_instead_of_blaming_the_broker(
    make_server: Any, settings: Settings, redis_client: redis.Redis
) -> None:
    # A transport that does not load stands for the import error of a missing dependency.
    celery = Celery("broken", broker="nosuchtransport://localhost")
    server: Server = await make_server(settings, celery=celery)
    recent = indexed(redis_client, settings)
    async with server.session.post(server.url("/tasks"), json={"name": "demo.count"}) as resp:
        assert resp.status == 500
        error = (await resp.json())["error"]
    assert error.startswith("This server cannot use its task queue (KeyError); nothing was queued."), error
    assert "broker" not in error.lower(), "the broker is not at fault"
    assert "nosuchtransport" not in error, "the details are for the log, not for any client"
    assert indexed(redis_client, settings) == recent

    # Cancelling a running task needs the broker too: the same answer, not "not answering".
    running = str(uuid.uuid4())
    publisher = Publisher(sync_client(settings.redis_url), keys_for(settings))
    publisher.publish(make_event(running, "demo.count", State.STARTED))
    publisher.client.close()
    async with server.session.delete(server.url(f"/tasks/{running}")) as resp:
        assert resp.status == 500
        error = (await resp.json())["error"]
    assert error.startswith("This server cannot use its task queue (KeyError); the running task cannot be stopped.")


async def test_workers_are_counted_by_their_heartbeats(
    make_server: Any, settings: Settings, keys: Keys, publisher: Publisher
) -> None:
    """/healthz and the 202 say how many workers are alive; with none, they say
    that started tasks wait, and the answer is still 200/202 (the web is fine)."""
    server: Server = await make_server(settings.with_(key_prefix=keys.prefix, queue=f"{settings.queue}-idle"))

    async def health() -> dict[str, Any]:
        async with server.session.get(server.url("/healthz")) as resp:
            assert resp.status == 200
            body: dict[str, Any] = await resp.json()
            return body

    async def start() -> dict[str, Any]:
        async with server.session.post(server.url("/tasks"), json={"name": "demo.count"}) as resp:
            assert resp.status == 202
            body: dict[str, Any] = await resp.json()
            return body

    assert (await health())["workers"] == 0
    body = await start()
    assert body["workers"] == 0 and body["warning"] == NO_WORKER

    publisher.worker_alive("one@host", "i1", ttl=30)
    publisher.worker_alive("two@host", "i2", ttl=30)
    assert await health() == {"status": "ok", "redis": "ok", "workers": 2, "loop": "asyncio"}  # pytest's loop
    body = await start()
    assert body["workers"] == 2 and "warning" not in body

    publisher.worker_gone("one@host", "i1")  # a clean shutdown
    publisher.client.delete(keys.worker("two@host"))  # what expiry does to a killed one's heartbeat
    assert (await health())["workers"] == 0
    assert publisher.client.smembers(keys.workers) == set(), "expired hostnames are pruned"


@pytest.mark.usefixtures("worker")
async def test_healthz_counts_a_real_worker(server: Server) -> None:
    async with server.session.get(server.url("/healthz")) as resp:
        body = await resp.json()
    assert body["workers"] >= 1 and "warning" not in body, body


async def test_unreachable_broker_gets_503_and_leaves_nothing_behind(
    make_server: Any, settings: Settings, redis_client: redis.Redis
) -> None:
    server: Server = await make_server(settings.with_(broker_url="redis://127.0.0.1:1/0"))
    recent = indexed(redis_client, settings)
    async with server.session.post(server.url("/tasks"), json={"name": "demo.count"}) as resp:
        assert resp.status == 503
        assert resp.headers["Retry-After"] == "2"
        assert "not answering; nothing was queued" in (await resp.json())["error"]
    assert indexed(redis_client, settings) == recent


@pytest.mark.parametrize(
    ("method", "path", "status", "words"),
    [
        ("GET", f"/tasks/{UNKNOWN}", 404, "no task"),
        ("GET", "/tasks/not%20an%20id", 404, "not a task id"),
        ("GET", f"/tasks/{UNKNOWN}/events", 404, "no task"),
        ("GET", "/tasks/%7Bbraces%7D/events", 404, "There is no"),
        ("GET", "/events", 400, "Name the tasks"),
        ("GET", "/events?task=", 400, "Name the tasks"),
        ("GET", "/events?task=bad%20id", 400, "not a task id"),
        ("GET", "/events?" + "&".join(f"task=t{i}" for i in range(101)), 400, "At most 100"),
        ("GET", "/tasks?limit=0", 400, "limit must be"),
        ("GET", "/tasks?limit=501", 400, "limit must be"),
        ("GET", "/tasks?limit=ten", 400, "limit must be"),
        ("GET", "/tasks?limit=1.5", 400, "limit must be"),
        ("GET", "/tasks?limit=" + "9" * 5000, 400, "limit must be"),
        ("PUT", "/tasks", 405, "PUT is not allowed"),
        ("GET", "/nowhere", 404, "There is no /nowhere"),
    ],
)
async def test_bad_requests_get_json_errors(server: Server, method: str, path: str, status: int, words: str) -> None:
    async with server.session.request(method, server.url(path)) as resp:
        assert resp.status == status
        assert resp.content_type == "application/json"
        assert words in (await resp.json())["error"]


async def test_recent_tasks_are_newest_first_and_limited(idle: Server) -> None:
    ids = [await idle.start_task("demo.count", n=1) for _ in range(3)]
    async with idle.session.get(idle.url("/tasks?limit=2")) as resp:
        assert resp.status == 200
        tasks = (await resp.json())["tasks"]
    assert [t["task_id"] for t in tasks] == ids[::-1][:2]
    assert all(t["state"] == "queued" and t["name"] == "demo.count" for t in tasks)


async def test_healthz_reports_redis(make_server: Any, settings: Settings) -> None:
    alone: Server = await make_server(settings.with_(key_prefix=f"{settings.key_prefix}-alone"))
    async with alone.session.get(alone.url("/healthz")) as resp:
        assert resp.status == 200
        assert await resp.json() == {
            "status": "ok",
            "redis": "ok",
            "workers": 0,
            "warning": NO_WORKER,
            "loop": "asyncio",
        }
    down: Server = await make_server(settings.with_(redis_url="redis://127.0.0.1:1/0"))
    async with down.session.get(down.url("/healthz")) as resp:
        assert resp.status == 503
        body = await resp.json()
    assert body["status"] == "error" and "Redis is not answering" in body["error"]
    async with down.session.get(down.url(f"/tasks/{UNKNOWN}")) as resp:
        assert resp.status == 503
        assert "Redis is not answering" in (await resp.json())["error"]


@pytest.mark.usefixtures("worker")
async def test_celery_progress_format_keeps_a_polling_front_end_working(server: Server) -> None:
    from .sse import SSEReader

    task_id = await server.start_task("demo.count", n=2, delay=0.01)
    async with server.session.get(server.url(f"/tasks/{task_id}/events?last_event_id=0")) as resp:
        assert (await SSEReader(resp).rest())[-1].event == "success"
    async with server.session.get(server.url(f"/tasks/{task_id}?format=celery-progress")) as resp:
        body = await resp.json()
    assert body["state"] == "SUCCESS" and body["complete"] is True and body["success"] is True
    assert body["result"] == {"processed": 2}
    assert body["progress"]["percent"] == 100
    async with server.session.get(server.url(f"/tasks/{UNKNOWN}?format=celery-progress")) as resp:
        assert resp.status == 200  # celery-progress's JS would stop polling on a 404
        assert (await resp.json())["state"] == "PENDING"


@pytest.mark.parametrize("path", ["/healthz", f"/tasks/{UNKNOWN}", f"/events?task={UNKNOWN}", "/nowhere", "/"])
async def test_every_response_says_nosniff_and_stays_on_its_origin(server: Server, path: str) -> None:
    """JSON, errors, streams and pages alike: a browser must never guess a body is
    HTML, nor let another site's <script> or <img> load it."""
    async with server.session.get(server.url(path)) as resp:
        assert resp.headers["X-Content-Type-Options"] == "nosniff", (path, resp.status)
        assert resp.headers["Cross-Origin-Resource-Policy"] == "same-origin", (path, resp.status)


async def test_the_assets_may_be_imported_by_a_page_on_another_origin(server: Server) -> None:
    """A module script from another origin is fetched with CORS, redirect included."""
    async with server.session.get(server.url("/static/progress.js"), allow_redirects=False) as resp:
        assert resp.status == 302
        assert resp.headers["Access-Control-Allow-Origin"] == "*"
        location = resp.headers["Location"]
    async with server.session.get(server.url(location)) as resp:
        assert resp.status == 200 and resp.headers["Access-Control-Allow-Origin"] == "*"
        assert resp.headers["Cross-Origin-Resource-Policy"] == "cross-origin"
