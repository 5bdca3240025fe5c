"""`progress-sse cancel`, run for real: a subprocess against the real server and worker
(and a recording stub for what the real server cannot be made to answer on demand)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from aiohttp import web

from .conftest import Server, wait_until
from .test_cli_watch import base, cancel_quietly, cli_env, finish, free_port, run_cli, spawn

UNKNOWN = "00000000-0000-4000-8000-000000000000"


@pytest.mark.e2e
@pytest.mark.usefixtures("worker")
async def test_cancel_terminates_a_running_task_and_watch_ends_revoked(server: Server) -> None:
    task_id = await server.start_task("demo.count", n=400, delay=0.05)
    try:
        watcher = await spawn("watch", task_id, "--url", base(server), "--json")
        assert watcher.stdout is not None
        # Wait until the task runs: cancelling a queued task is another path on the server.
        async with asyncio.timeout(30):
            while json.loads(await watcher.stdout.readline())["state"] != "progress":
                pass
        run = await run_cli("cancel", task_id, "--url", base(server))
    finally:
        await cancel_quietly(server, task_id)  # in case the CLI did not
    assert (run.status, run.out, run.err) == (0, f"cancelled {task_id} (revoked)\n", ""), run

    watched = await finish(watcher, timeout=30)
    assert watched.status == 2, watched  # the watch's "revoked or lost"
    last = json.loads(watched.lines[-1])
    assert (last["state"], last["reason"]) == ("revoked", "terminated")  # the worker stopped it
    assert last["current"] < 400


@pytest.mark.e2e
async def test_cancel_of_an_unknown_task_exits_3_with_the_servers_reason(server: Server) -> None:
    # The URL from the environment, as for watch and start.
    run = await run_cli("cancel", UNKNOWN, env=cli_env(PROGRESS_SSE_URL=base(server)))
    assert (run.status, run.out) == (3, ""), run
    assert run.err == f"progress-sse: There is no task '{UNKNOWN}' (or its history has expired).\n"


@pytest.mark.e2e
@pytest.mark.usefixtures("worker")
async def test_cancel_of_a_finished_task_exits_1_and_says_how_it_ended(server: Server) -> None:
    task_id = await server.start_task("demo.count", n=1, delay=0)

    async def ended() -> bool:
        return (await server.state(task_id))["state"] == "success"

    await wait_until(ended, timeout=30, what="the task to succeed")
    run = await run_cli("cancel", task_id, "--url", base(server))
    assert (run.status, run.out) == (1, ""), run
    assert run.err == f"progress-sse: Task {task_id} has already ended (success); there is nothing to cancel.\n"
    assert (await server.state(task_id))["state"] == "success"  # nothing was changed


async def test_cancel_sends_delete_to_the_tasks_url_and_reports_a_task_that_ended_first(aiohttp_server: Any) -> None:
    # A task that ends on its own while the server revokes it: 202, but not revoked.
    # The real server answers so only in a race, hence the stub.
    seen: list[tuple[str, str]] = []

    async def cancel(request: web.Request) -> web.Response:
        seen.append((request.method, request.raw_path))
        return web.json_response({"id": request.match_info["id"], "state": "success"}, status=202)

    app = web.Application()
    app.router.add_delete("/prefix/tasks/{id}", cancel)
    server = await aiohttp_server(app)
    run = await run_cli("cancel", "a/b c", "--url", str(server.make_url("/prefix/")))
    assert seen == [("DELETE", "/prefix/tasks/a%2Fb%20c")]  # the id is one path segment, as for watch
    assert (run.status, run.out) == (1, ""), run
    assert run.err == "progress-sse: Task a/b c ended (success) before it could be cancelled.\n"


async def test_a_server_that_cannot_cancel_exits_3_with_its_reason(aiohttp_server: Any) -> None:
    async def refuse(request: web.Request) -> web.Response:
        error = "The task queue (Celery broker) is not answering, so the running task cannot be stopped."
        return web.json_response({"error": error}, status=503)

    app = web.Application()
    app.router.add_delete("/tasks/{id}", refuse)
    server = await aiohttp_server(app)
    run = await run_cli("cancel", "t", "--url", str(server.make_url("/")))
    assert (run.status, run.out) == (3, ""), run
    assert "not answering, so the running task cannot be stopped" in run.err


async def test_an_unreachable_server_exits_3() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    run = await run_cli("cancel", "t", "--url", url)
    assert (run.status, run.out) == (3, ""), run
    assert run.err.startswith(f"progress-sse: cannot cancel the task at {url}/tasks/t: "), run.err


async def test_usage_errors_exit_2() -> None:
    run = await run_cli("cancel")
    assert run.status == 2 and "TASK_ID" in run.err, run
    run = await run_cli("cancel", "t", env=cli_env(PROGRESS_SSE_URL="localhost:8000"))
    assert run.status == 2 and "PROGRESS_SSE_URL='localhost:8000' is not valid" in run.err, run
    # A watch setting cannot break a cancel: cancel does not reconnect, so it does not read it.
    run = await run_cli(
        "cancel", "t", "--url", f"http://127.0.0.1:{free_port()}", env=cli_env(PROGRESS_SSE_RETRY_FOR="x")
    )
    assert run.status == 3, run


async def test_help_explains_the_exit_statuses() -> None:
    run = await run_cli("cancel", "--help")
    assert run.status == 0
    text = " ".join(run.out.split())
    for needle in ("DELETE <url>/tasks/<id>", "--url", "PROGRESS_SSE_URL", "cancelled <id> (revoked)"):
        assert needle in text, needle
    assert "exit status: 0 cancelled, 1 not cancelled because the task had already ended" in text
    assert "3 the server cannot be reached, does not know the task, or could not cancel it" in text
