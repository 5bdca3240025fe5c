"""`progress-sse watch | start | cancel --token`, run for real: a subprocess against the
real server (built with a secret, so it checks tokens), the real worker and Redis.

Every refusal is compared with what the server itself answers to the same request,
so the CLI is held to print the server's own sentence. No test lets the token
appear in what the CLI prints.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import jwt
import pytest

from progress_sse.config import Settings
from progress_sse.tokens import operator_token, start_token, watch_token

from .conftest import Server
from .test_cli_watch import Run, base, cli_env, finish, free_port, run_cli, spawn

SECRET = "progress-sse-cli-tests-" + "s3cr3t-" * 5  # at least 32 characters
OTHER_SECRET = "some-other-service-entirely-" + "k3y-" * 5
REFUSED = 4
NO_TOKEN_HINT = " No token was sent: give one with --token or PROGRESS_SSE_TOKEN."


def env(**extra: str) -> dict[str, str]:
    """The CLI's environment: no token of the developer's own, plus `extra`."""
    clean = {k: v for k, v in cli_env().items() if k != "PROGRESS_SSE_TOKEN"}
    return {**clean, **extra}


def auth(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


async def ask(server: Server, method: str, path: str, token: str | None, **kwargs: Any) -> tuple[int, Any]:
    """The server's own answer to a request: its status and JSON body."""
    async with server.session.request(method, server.url(path), headers=auth(token), **kwargs) as resp:
        return resp.status, await resp.json(content_type=None)


async def refusal(server: Server, method: str, path: str, token: str | None) -> tuple[int, str]:
    """The status and `{"error"}` sentence the server refuses this request with."""
    status, body = await ask(server, method, path, token)
    assert status in (401, 403), (status, body)
    return status, str(body["error"])


async def start(server: Server, name: str, **kwargs: Any) -> str:
    status, body = await ask(
        server, "POST", "/tasks", operator_token(key=SECRET), json={"name": name, "kwargs": kwargs}
    )
    assert status == 202, body
    return str(body["id"])


async def state(server: Server, task_id: str) -> dict[str, Any]:
    status, body = await ask(server, "GET", f"/tasks/{task_id}", operator_token(key=SECRET))
    assert status == 200, body
    return dict(body)


async def cancel_quietly(server: Server, task_id: str) -> None:
    """Cancel a long test task so it does not hold a worker process; it may have ended."""
    status, body = await ask(server, "DELETE", f"/tasks/{task_id}", operator_token(key=SECRET))
    assert status in (202, 409), body


def shows_no_token(run: Run, *tokens: str) -> bool:
    return not any(token in run.out or token in run.err for token in tokens)


@pytest.fixture
async def guarded(make_server: Callable[..., Any], settings: Settings) -> Server:
    """A real server that checks tokens signed with SECRET."""
    server: Server = await make_server(settings.with_(secret=SECRET))
    return server


# --- watch ----------------------------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.usefixtures("worker")
async def test_watch_with_a_token_for_the_task_succeeds(guarded: Server) -> None:
    task_id = await start(guarded, "demo.count", n=3, delay=0)
    token = watch_token([task_id], key=SECRET)
    run = await run_cli("watch", task_id, "--url", base(guarded), "--token", token, "--after", "0", env=env())
    assert run.status == 0, run
    assert run.lines[0] == f"task {task_id} (demo.count)" and run.lines[-1] == 'result: {"processed": 3}', run.out
    assert shows_no_token(run, token)


@pytest.mark.e2e
@pytest.mark.usefixtures("worker")
@pytest.mark.parametrize("case", ["none", "other key", "other task", "expired"])
async def test_a_refused_watch_exits_4_with_the_servers_sentence(guarded: Server, case: str) -> None:
    task_id = await start(guarded, "demo.count", n=1, delay=0)
    token = {
        "none": None,
        "other key": watch_token([task_id], key=OTHER_SECRET),
        "other task": watch_token(["00000000-0000-4000-8000-000000000000"], key=SECRET),
        # Minted by hand: the helpers mint only tokens that have yet to expire.
        "expired": jwt.encode({"exp": int(time.time()) - 60, "tasks": [task_id]}, SECRET, algorithm="HS256"),
    }[case]
    status, sentence = await refusal(guarded, "GET", f"/tasks/{task_id}/events", token)
    assert status == (403 if case == "other task" else 401)
    run = await run_cli("watch", task_id, "--url", base(guarded), *(["--token", token] if token else []), env=env())
    hint = NO_TOKEN_HINT if token is None else ""
    assert (run.status, run.out, run.err) == (
        REFUSED,
        "",
        f"progress-sse: access refused ({status}): {sentence}{hint}\n",
    )
    if token is not None:
        assert shows_no_token(run, token)
    if case == "expired":
        assert "expired" in sentence


@pytest.mark.e2e
@pytest.mark.usefixtures("worker")
async def test_the_token_comes_from_the_environment_and_the_flag_wins(guarded: Server) -> None:
    task_id = await start(guarded, "demo.count", n=2, delay=0)
    good, bad = watch_token([task_id], key=SECRET), watch_token([task_id], key=OTHER_SECRET)
    watch = ("watch", task_id, "--url", base(guarded), "--after", "0")

    run = await run_cli(*watch, env=env(PROGRESS_SSE_TOKEN=good))
    assert run.status == 0 and run.lines[-1] == 'result: {"processed": 2}', run
    assert shows_no_token(run, good)

    run = await run_cli(*watch, "--token", good, env=env(PROGRESS_SSE_TOKEN=bad))
    assert run.status == 0, run
    assert shows_no_token(run, good, bad)

    _, sentence = await refusal(guarded, "GET", f"/tasks/{task_id}/events", bad)
    run = await run_cli(*watch, "--token", bad, env=env(PROGRESS_SSE_TOKEN=good))
    assert (run.status, run.err) == (REFUSED, f"progress-sse: access refused (401): {sentence}\n"), run
    assert shows_no_token(run, good, bad)

    # An empty flag sends no token at all, whatever the environment holds.
    _, sentence = await refusal(guarded, "GET", f"/tasks/{task_id}/events", None)
    run = await run_cli(*watch, "--token", "", env=env(PROGRESS_SSE_TOKEN=good))
    assert (run.status, run.err) == (REFUSED, f"progress-sse: access refused (401): {sentence}{NO_TOKEN_HINT}\n"), run


@pytest.mark.e2e
@pytest.mark.usefixtures("worker")
async def test_a_watch_whose_token_expires_mid_task_ends_with_the_expiry_sentence(guarded: Server) -> None:
    # 20 s of work; the token lasts a few seconds of it.
    task_id = await start(guarded, "demo.count", n=400, delay=0.05)
    token = watch_token([task_id], ttl=6, key=SECRET)
    try:
        proc = await spawn("watch", task_id, "--url", base(guarded), "--json", env=env(PROGRESS_SSE_TOKEN=token))
        assert proc.stdout is not None
        async with asyncio.timeout(30):  # the token worked: events arrived
            while json.loads(await proc.stdout.readline())["state"] != "progress":
                pass
        run = await finish(proc, timeout=60)  # ended by the expiry, long before the task could
        running = await state(guarded, task_id)
        status, sentence = await refusal(guarded, "GET", f"/tasks/{task_id}/events", token)
    finally:
        await cancel_quietly(guarded, task_id)
    assert running["state"] == "progress", "the watch ended, not the task"
    assert status == 401 and "expired" in sentence
    assert run.status == REFUSED, run
    assert run.err.splitlines()[-1] == f"progress-sse: access refused (401): {sentence}", run.err
    assert all(json.loads(line)["state"] in ("started", "progress") for line in run.lines), run.out
    assert shows_no_token(run, token)


# --- start ----------------------------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.usefixtures("worker")
async def test_start_watch_with_a_start_only_token_watches_with_the_token_the_server_sends_back(
    guarded: Server,
) -> None:
    token = start_token(["demo.count"], key=SECRET)
    args = ("start", "demo.count", "--kw", "n=2", "--kw", "delay=0", "--url", base(guarded))
    run = await run_cli(*args, "--watch", env=env(PROGRESS_SSE_TOKEN=token))
    assert run.status == 0, run
    assert run.lines[1] == "queued" and run.lines[-1] == 'result: {"processed": 2}', run.out
    assert shows_no_token(run, token)

    # That token alone may start the task, but not watch it: the watch above used another.
    run = await run_cli(*args, "--token", token, env=env())
    assert run.status == 0, run
    task_id = run.out.strip()
    status, _ = await refusal(guarded, "GET", f"/tasks/{task_id}/events", token)
    assert status == 403


@pytest.mark.e2e
@pytest.mark.usefixtures("worker")
async def test_start_watch_with_an_operator_token_keeps_it_and_so_shows_the_traceback(guarded: Server) -> None:
    """The 202's watch token would hide the traceback (watchers never see one)."""
    token = operator_token(key=SECRET)
    args = ("start", "demo.fail", "--kw", "after=1", "--kw", "delay=0", "--url", base(guarded), "--watch")
    run = await run_cli(*args, env=env(PROGRESS_SSE_TOKEN=token))
    assert run.status == 1, run
    assert "Traceback (most recent call last):" in run.out, run.out
    assert shows_no_token(run, token)


@pytest.mark.e2e
async def test_start_of_a_task_the_token_does_not_list_exits_4(guarded: Server) -> None:
    token = start_token(["demo.mystery"], key=SECRET)
    status, body = await ask(guarded, "POST", "/tasks", token, json={"name": "demo.count", "args": [], "kwargs": {}})
    assert status == 403, body
    run = await run_cli("start", "demo.count", "--url", base(guarded), "--token", token, env=env())
    assert (run.status, run.out) == (REFUSED, ""), run
    assert run.err == f"progress-sse: access refused (403): {body['error']}\n"
    assert shows_no_token(run, token)


# --- cancel ---------------------------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.usefixtures("worker")
async def test_cancel_needs_a_token_with_cancel(guarded: Server) -> None:
    task_id = await start(guarded, "demo.count", n=400, delay=0.05)
    watch_only, with_cancel = watch_token([task_id], key=SECRET), watch_token([task_id], cancel=True, key=SECRET)
    try:
        status, sentence = await refusal(guarded, "DELETE", f"/tasks/{task_id}", watch_only)
        assert status == 403
        refused = await run_cli("cancel", task_id, "--url", base(guarded), "--token", watch_only, env=env())
        left = (await state(guarded, task_id))["state"]
        cancelled = await run_cli("cancel", task_id, "--url", base(guarded), env=env(PROGRESS_SSE_TOKEN=with_cancel))
    finally:
        await cancel_quietly(guarded, task_id)
    assert (refused.status, refused.out) == (REFUSED, ""), refused
    assert refused.err == f"progress-sse: access refused (403): {sentence}\n"
    assert left != "revoked"
    assert (cancelled.status, cancelled.out) == (0, f"cancelled {task_id} (revoked)\n"), cancelled
    assert shows_no_token(refused, watch_only) and shows_no_token(cancelled, with_cancel)


# --- no server needed -----------------------------------------------------------------------


@pytest.mark.parametrize("command", [["watch", "t"], ["start", "demo.count"], ["cancel", "t"]])
async def test_a_token_that_cannot_be_sent_stops_at_start_without_being_shown(command: list[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    secret = "s3cr3t-part"
    run = await run_cli(*command, "--url", url, "--token", f"Bearer {secret}", env=env())
    assert (run.status, run.out) == (2, ""), run
    assert "--token is not valid" in run.err and secret not in run.err
    run = await run_cli(*command, "--url", url, env=env(PROGRESS_SSE_TOKEN=f"{secret}\u2713"))
    assert (run.status, run.out) == (2, ""), run
    assert "PROGRESS_SSE_TOKEN is not valid" in run.err and secret not in run.err


async def test_an_unreachable_server_does_not_show_the_token() -> None:
    token = watch_token(["t"], key=SECRET)
    for command in (["watch", "t"], ["start", "demo.count", "--watch"], ["cancel", "t"]):
        run = await run_cli(*command, "--url", f"http://127.0.0.1:{free_port()}", "--token", token, env=env())
        assert run.status == 3 and run.err, run
        assert shows_no_token(run, token)


@pytest.mark.parametrize("command", ["watch", "start", "cancel"])
async def test_help_explains_the_token(command: str) -> None:
    run = await run_cli(command, "--help", env=env())
    assert run.status == 0
    text = " ".join(run.out.split())
    for needle in ("--token TOKEN", "PROGRESS_SSE_TOKEN", "'Authorization: Bearer TOKEN'", "never in the URL"):
        assert needle in text, needle
    assert "4 access refused (401 or 403" in text
