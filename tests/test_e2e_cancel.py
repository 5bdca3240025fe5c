"""Cancelling tasks and losing pool processes, end to end."""

from __future__ import annotations

import asyncio
import os
import signal
from typing import Any

import pytest
import redis

from progress_sse.config import Settings

from .conftest import Server, Worker, wait_until
from .sse import SSEReader

pytestmark = [pytest.mark.e2e, pytest.mark.both_backends, pytest.mark.usefixtures("worker")]


def progressed(e: Any) -> bool:
    return e.event == "progress"


async def test_revoking_a_running_task_terminates_it(server: Server) -> None:
    task_id = await server.start_task("demo.count", n=400, delay=0.05)
    async with server.session.get(server.url(f"/tasks/{task_id}/events")) as resp:
        reader = SSEReader(resp)
        await reader.until(progressed)
        async with server.session.delete(server.url(f"/tasks/{task_id}")) as deleted:
            assert deleted.status == 202
            assert (await deleted.json())["state"] == "revoked"
        rest = await reader.rest(timeout=10)
    assert rest[-1].event == "revoked"
    assert rest[-1].payload["reason"] == "terminated"  # the worker itself reported it
    assert rest[-1].payload["total"] == 400  # the bar keeps its count
    async with server.session.delete(server.url(f"/tasks/{task_id}")) as again:
        assert again.status == 409
        assert "already ended" in (await again.json())["error"]


async def test_revoking_a_queued_task_tells_watchers_at_once(
    make_server: Any, settings: Settings, redis_client: redis.Redis, broker_client: redis.Redis
) -> None:
    # No worker consumes this queue: the task stays queued until it is revoked.
    idle = settings.with_(queue=f"{settings.queue}-nobody")
    server: Server = await make_server(idle)
    task_id = await server.start_task("demo.count", n=3)
    assert broker_client.llen(idle.queue) == 1
    async with server.session.get(server.url(f"/tasks/{task_id}/events")) as resp:
        reader = SSEReader(resp)
        first = await reader.next_event()
        assert first is not None and first.event == "queued"
        async with server.session.delete(server.url(f"/tasks/{task_id}")) as deleted:
            assert deleted.status == 202
        rest = await reader.rest(timeout=10)
    assert [e.event for e in rest] == ["revoked"]
    assert rest[0].payload["reason"] == "revoked"
    assert (await server.state(task_id))["state"] == "revoked"


async def test_cancel_of_unknown_task_is_404(server: Server) -> None:
    for task_id in ("00000000-0000-4000-8000-000000000000", "not a task id"):
        async with server.session.delete(server.url(f"/tasks/{task_id}")) as resp:
            assert resp.status == 404
            assert "error" in await resp.json()


async def test_killed_pool_process_ends_in_failure(server: Server) -> None:
    task_id = await server.start_task("demo.count", n=400, delay=0.05)
    async with server.session.get(server.url(f"/tasks/{task_id}/events")) as resp:
        reader = SSEReader(resp)
        await reader.until(progressed)
        pid = (await server.state(task_id))["worker_pid"]
        assert pid != os.getpid()
        os.kill(pid, signal.SIGKILL)
        rest = await reader.rest(timeout=30)
    failure = rest[-1]
    assert failure.event == "failure"
    assert failure.payload["error"]["type"] == "WorkerLostError"
    assert "SIGKILL" in failure.payload["error"]["message"] or "signal 9" in failure.payload["error"]["message"]


async def test_task_revoked_while_no_worker_was_up_is_not_run_later(
    make_server: Any, settings: Settings, redis_client: redis.Redis, broker_client: redis.Redis, output_dir: Any
) -> None:
    late = settings.with_(queue=f"{settings.queue}-late")
    server: Server = await make_server(late)
    task_id = await server.start_task("demo.count", n=3, delay=0.01)
    async with server.session.delete(server.url(f"/tasks/{task_id}")) as resp:
        assert resp.status == 202
    assert broker_client.llen(late.queue) == 1, "still waiting in the broker"

    worker = Worker(late, output_dir / "late-worker.log", concurrency=1)
    try:
        await asyncio.to_thread(worker.wait_ready)
        await wait_until(lambda: broker_client.llen(late.queue) == 0, what="the late worker to take the message")
        await wait_until(
            lambda: "revoked" in worker.log_path.read_text() and task_id in worker.log_path.read_text(),
            what="the worker to discard the revoked task",
        )
    finally:
        await asyncio.to_thread(worker.stop)
    log = worker.log_path.read_text()
    assert f"Task demo.count[{task_id}] succeeded" not in log
    events = [e async for e in _history(server, task_id)]
    assert [e.event for e in events] == ["queued", "revoked"]


async def _history(server: Server, task_id: str) -> Any:
    async with server.session.get(server.url(f"/tasks/{task_id}/events?last_event_id=0")) as resp:
        for event in await SSEReader(resp).rest():
            yield event
