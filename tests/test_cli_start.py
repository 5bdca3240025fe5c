"""`progress-sse start`, run for real against the real server and worker (and a recording stub)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from typing import Any

import pytest
from aiohttp import web

from progress_sse.cli.watch import _json_or_string, _keyword

from .conftest import Server, wait_until
from .test_cli_watch import UUID, base, cancel_quietly, cli_env, finish, free_port, pipe_to_head, run_cli, task_of


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("20", 20),
        ("1.5", 1.5),
        ("true", True),
        ("null", None),
        ("[1, 2]", [1, 2]),
        ('{"a": 1}', {"a": 1}),
        ('"20"', "20"),
        ("hello", "hello"),
        ("", ""),
        ("NaN", "NaN"),  # not JSON the server accepts: sent as the string
        ("Infinity", "Infinity"),
        ("1e999", "1e999"),  # would be infinity
        ("12abc", "12abc"),
    ],
)
def test_a_value_is_json_when_it_parses_else_a_string(text: str, value: Any) -> None:
    assert _json_or_string(text) == value
    assert type(_json_or_string(text)) is type(value)


def test_a_keyword_splits_at_the_first_equals_sign() -> None:
    assert _keyword("n=20") == ("n", 20)
    assert _keyword("expr=a=b") == ("expr", "a=b")
    assert _keyword("label=") == ("label", "")
    for bad in ("n", "=3"):
        with pytest.raises(argparse.ArgumentTypeError, match="expected KEY=VALUE"):
            _keyword(bad)


async def test_the_request_body_carries_the_parsed_values(aiohttp_server: Any) -> None:
    bodies: list[Any] = []

    async def record(request: web.Request) -> web.Response:
        bodies.append(await request.json())
        assert request.content_type == "application/json"
        return web.json_response({"id": "task-1", "state": "queued"}, status=202)

    app = web.Application()
    app.router.add_post("/prefix/tasks", record)
    server = await aiohttp_server(app)
    run = await run_cli(
        "start",
        "demo.count",
        "--arg",
        "3",
        "--arg",
        "x",
        "--kw",
        "n=20",
        "--kw",
        "label=hello",
        "--kw",
        'quoted="20"',
        "--kw",
        "flag=true",
        "--url",
        str(server.make_url("/prefix")),
    )
    assert run.status == 0, run
    assert run.out == "task-1\n"
    assert bodies == [
        {"name": "demo.count", "args": [3, "x"], "kwargs": {"n": 20, "label": "hello", "quoted": "20", "flag": True}}
    ]


@pytest.mark.e2e
@pytest.mark.usefixtures("worker")
async def test_start_prints_only_the_id_and_the_task_runs_with_those_kwargs(server: Server) -> None:
    run = await run_cli("start", "demo.count", "--kw", "n=3", "--kw", "delay=0", "--url", base(server))
    assert run.status == 0, run
    assert UUID.fullmatch(run.out.rstrip("\n")) and run.out.endswith("\n") and run.out.count("\n") == 1, run.out
    assert run.err == ""
    task_id = run.out.strip()

    async def ended() -> dict[str, Any] | None:
        state = await server.state(task_id)
        return state if state["state"] == "success" else None

    state = await wait_until(ended, timeout=30, what="the started task to succeed")
    assert state["name"] == "demo.count"
    assert state["result"] == {"processed": 3}  # n=3 arrived as the number 3


@pytest.mark.e2e
@pytest.mark.usefixtures("worker")
async def test_positional_args_are_bound_in_order(server: Server) -> None:
    run = await run_cli("start", "demo.count", "--arg", "2", "--arg", "0", "--url", base(server))
    assert run.status == 0, run
    task_id = run.out.strip()

    async def ended() -> dict[str, Any] | None:
        state = await server.state(task_id)
        return state if state["state"] == "success" else None

    assert (await wait_until(ended, timeout=30, what="success"))["result"] == {"processed": 2}


@pytest.mark.e2e
async def test_a_refused_task_prints_the_servers_message_and_exits_3(server: Server) -> None:
    async with server.session.post(server.url("/tasks"), json={"name": "demo.count", "kwargs": {"n": 0}}) as resp:
        assert resp.status == 422
        message = (await resp.json())["error"]
    run = await run_cli("start", "demo.count", "--kw", "n=0", "--url", base(server))
    assert run.status == 3, run
    assert run.out == ""
    assert run.err == f"progress-sse: the server refused the task (HTTP 422): {message}\n"

    run = await run_cli("start", "os.system", "--arg", "rm -rf /", "--url", base(server))
    assert run.status == 3 and "os.system" in run.err and run.out == "", run


@pytest.mark.e2e
@pytest.mark.usefixtures("worker")
async def test_start_watch_exits_with_the_watch_status(server: Server) -> None:
    run = await run_cli(
        "start", "demo.fail", "--kw", "after=1", "--kw", "delay=0", "--watch", "--json", "--url", base(server)
    )
    assert run.status == 1, run
    events = [json.loads(line) for line in run.out.splitlines()]
    # Every event from queued on, even those that happened before the stream opened.
    assert events[0]["state"] == "queued" and events[-1]["state"] == "failure"
    assert events[-1]["error"]["type"] == "RuntimeError"
    assert len({e["task_id"] for e in events}) == 1

    run = await run_cli("start", "demo.count", "--kw", "n=2", "--kw", "delay=0", "--watch", "--url", base(server))
    assert run.status == 0, run
    lines = run.out.splitlines()
    assert UUID.search(lines[0]) and lines[1] == "queued" and lines[-1] == 'result: {"processed": 2}', lines


@pytest.mark.e2e
@pytest.mark.usefixtures("worker")
@pytest.mark.parametrize("mode", [[], ["--json"]], ids=["plain", "json"])
async def test_start_watch_into_head_1_exits_141_quietly(server: Server, mode: list[str]) -> None:
    # 20 s of progress lines: the watch is still writing when head has gone.
    args = ["start", "demo.count", "--kw", "n=400", "--kw", "delay=0.05", "--watch", *mode, "--url", base(server)]
    run, shown = await pipe_to_head(*args)
    await cancel_quietly(server, task_of(shown))
    assert (run.status, run.err) == (141, ""), run


@pytest.mark.e2e
@pytest.mark.usefixtures("worker")
async def test_start_into_a_closed_pipe_exits_141_quietly(server: Server) -> None:
    # The reader is gone before the id is printed, so that very print meets the broken pipe.
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "progress_sse",
            *("start", "demo.count", "--kw", "n=1", "--kw", "delay=0", "--url", base(server)),
            stdout=write_end,
            stderr=asyncio.subprocess.PIPE,
            env=cli_env(),
        )
    finally:
        os.close(write_end)
    run = await finish(proc, timeout=30)
    assert (run.status, run.err) == (141, ""), run


async def test_an_unreachable_server_exits_3() -> None:
    run = await run_cli("start", "demo.count", "--url", f"http://127.0.0.1:{free_port()}")
    assert run.status == 3, run
    assert run.out == "" and "cannot start a task" in run.err


async def test_usage_errors_exit_2_with_a_message() -> None:
    run = await run_cli("start", "demo.count", "--kw", "n")
    assert run.status == 2 and "expected KEY=VALUE, got 'n'" in run.err, run
    run = await run_cli("start", "demo.count", "--kw", "n=1", "--kw", "n=2")
    assert run.status == 2 and "--kw n is given more than once" in run.err, run
    run = await run_cli("start", "demo.count", "--json")
    assert run.status == 2 and "--json, --retry-for and --notify apply to --watch" in run.err, run


async def test_help_explains_every_option() -> None:
    run = await run_cli("start", "--help")
    assert run.status == 0
    text = " ".join(run.out.split())
    for needle in ("--arg", "--kw", "--kw n=20 sends 20", "--watch", "--url", "PROGRESS_SSE_URL", "exits 3"):
        assert needle in text, needle
    assert "PROGRESS_SSE_RETRY_FOR" in text
    assert "130 interrupted by Ctrl-C (the task keeps running), 141 stdout was closed early" in text
