"""`progress-sse watch`, run for real: a subprocess against the real server and worker.

Exit statuses, `--json`, plain lines without a TTY, the live bar under a pseudo-
terminal, Ctrl-C typed into that terminal, a reader that stops early (`| head -1`),
`--notify` (a fake `notify-send` on the PATH, or none: the bell); and, in-process,
what the bar and the lines show for determinate, indeterminate and switching tasks.
"""

from __future__ import annotations

import asyncio
import fcntl
import io
import json
import os
import pty
import re
import shlex
import signal
import struct
import sys
import termios
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from aiohttp import web
from rich.console import Console

from progress_sse.cli.client import Reconnecting, Reset, TaskEvent
from progress_sse.cli.embedded import free_port
from progress_sse.cli.notify import notifier
from progress_sse.cli.notify import words as notify_words
from progress_sse.cli.terminal import JsonRenderer, LiveRenderer, PlainRenderer, TaskView, make_renderer
from progress_sse.cli.watch import _stopped_watching
from progress_sse.config import Settings
from progress_sse.connections import sync_client
from progress_sse.events import State, make_event
from progress_sse.keys import Keys
from progress_sse.worker.publisher import Publisher

from .conftest import Server

UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
CURSOR = re.compile(r"([a-z2-7]{8})-([0-9]+)")
ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[()][A-Z0-9]")

# Variables that would change how the CLI draws or where it connects.
_CLEAN = (
    "PROGRESS_SSE_URL",
    "PROGRESS_SSE_RETRY_FOR",
    "PROGRESS_SSE_TOKEN",  # a developer's own token must not change these tests
    "FORCE_COLOR",
    "TTY_COMPATIBLE",
    "TTY_INTERACTIVE",
    "NO_COLOR",
)


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _CLEAN}
    env.update(extra)
    return env


@dataclass
class Run:
    status: int
    out: str
    err: str

    @property
    def lines(self) -> list[str]:
        return self.out.splitlines()

    def json_lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.lines]


async def spawn(*args: str, env: dict[str, str] | None = None) -> asyncio.subprocess.Process:
    # The test server runs in this event loop: the CLI must be awaited, never run blocking.
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "progress_sse",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env or cli_env(),
    )


async def finish(proc: asyncio.subprocess.Process, timeout: float = 60) -> Run:
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return Run(proc.returncode, (out or b"").decode(), (err or b"").decode())


async def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> Run:
    return await finish(await spawn(*args, env=env), timeout)


def base(server: Server) -> str:
    return server.url("/")


async def cancel_quietly(server: Server, task_id: str) -> None:
    """Cancel a long test task so it does not hold a worker process; it may have ended."""
    async with server.session.delete(server.url(f"/tasks/{task_id}")) as resp:
        assert resp.status in (202, 409), await resp.text()


# --- against the real server and worker ------------------------------------------------


@pytest.mark.e2e
@pytest.mark.usefixtures("worker")
async def test_a_successful_task_exits_0_with_plain_lines_when_not_a_tty(server: Server) -> None:
    task_id = await server.start_task("demo.count", n=5, delay=0.05)
    # --after 0: the whole history, however late the subprocess starts.
    run = await run_cli("watch", task_id, "--url", base(server), "--after", "0")
    assert run.status == 0, run
    lines = run.lines
    assert lines[:3] == [f"task {task_id} (demo.count)", "queued", "started"]
    progress = [line for line in lines if line.startswith("progress ")]
    assert progress and progress[-1].startswith("progress 5/5 (100.0%) Processed 5 of 5"), lines
    assert any(line.startswith("success 5/5 (100.0%)") for line in lines), lines
    assert lines[-1] == 'result: {"processed": 5}'
    # Lines, not a redraw: no carriage returns, no escape codes, no repeated line.
    assert "\r" not in run.out and "\x1b" not in run.out
    assert len(progress) == len(set(progress))


@pytest.mark.e2e
@pytest.mark.usefixtures("worker")
async def test_json_prints_one_event_per_line_with_increasing_cursors(server: Server) -> None:
    task_id = await server.start_task("demo.count", n=4, delay=0.05)
    run = await run_cli("watch", task_id, "--url", base(server), "--json", "--after", "0")
    assert run.status == 0, run
    events = run.json_lines()
    assert [e["state"] for e in events] == ["queued", "started"] + ["progress"] * (len(events) - 3) + ["success"]
    assert [e["current"] for e in events if e["state"] == "progress"][-1] == 4
    assert {e["task_id"] for e in events} == {task_id}
    # `<epoch>-<n>`: one history, and `n` only increases within it.
    positions = [CURSOR.fullmatch(e["cursor"]) for e in events]
    assert all(positions), [e["cursor"] for e in events]
    assert len({p[1] for p in positions if p}) == 1
    numbers = [int(p[2]) for p in positions if p]
    assert numbers == sorted(set(numbers)), numbers
    assert events[-1]["state"] == "success" and events[-1]["result"] == {"processed": 4}
    assert all(e["state"] != "success" for e in events[:-1])
    assert events[-1]["cursor"] == str((await server.state(task_id))["cursor"])


@pytest.mark.e2e
@pytest.mark.usefixtures("worker")
async def test_a_failed_task_exits_1_and_prints_error_and_traceback(server: Server) -> None:
    task_id = await server.start_task("demo.fail", after=2, delay=0.01)
    run = await run_cli("watch", task_id, "--url", base(server))
    assert run.status == 1, run
    assert "failure RuntimeError: demo.fail gave up after 2 steps, as it was asked to" in run.lines, run.out
    assert "Traceback (most recent call last):" in run.out
    assert run.out.rstrip().endswith("RuntimeError: demo.fail gave up after 2 steps, as it was asked to")


@pytest.mark.e2e
@pytest.mark.usefixtures("worker")
async def test_a_cancelled_task_exits_2(server: Server) -> None:
    task_id = await server.start_task("demo.count", n=400, delay=0.05)
    proc = await spawn("watch", task_id, "--url", base(server), "--json")
    assert proc.stdout is not None
    seen: list[dict[str, Any]] = []
    async with asyncio.timeout(30):
        while not seen or seen[-1]["state"] != "progress":
            line = await proc.stdout.readline()
            assert line, "watch ended before any progress"
            seen.append(json.loads(line))
    async with server.session.delete(server.url(f"/tasks/{task_id}")) as resp:
        assert resp.status == 202
    run = await finish(proc, timeout=30)
    assert run.status == 2, run
    last = json.loads(run.lines[-1])
    assert last["state"] == "revoked" and last["task_id"] == task_id


@pytest.mark.e2e
@pytest.mark.usefixtures("worker")
async def test_retries_are_shown(server: Server) -> None:
    task_id = await server.start_task("demo.flaky", failures=1, delay=0.05)
    run = await run_cli("watch", task_id, "--url", base(server), "--after", "0")
    assert run.status == 0, run
    retries = [line for line in run.lines if line.startswith("retry #")]
    assert retries and retries[0].startswith("retry #1: "), run.out
    assert "refused attempt 1" in retries[0]
    assert run.lines[-1] == 'result: {"attempts": 2}'


@pytest.mark.e2e
@pytest.mark.usefixtures("worker")
async def test_an_indeterminate_task_says_its_total_is_unknown(server: Server) -> None:
    task_id = await server.start_task("demo.mystery", min_s=0.2, max_s=0.3)
    run = await run_cli("watch", task_id, "--url", base(server), "--after", "0")
    assert run.status == 0, run
    assert "progress (total unknown) Working on something of unknown length" in run.lines, run.out
    assert not any("%" in line for line in run.lines), run.out


@pytest.mark.e2e
@pytest.mark.usefixtures("worker")
async def test_watching_a_task_that_already_ended_gives_its_end_once(server: Server) -> None:
    task_id = await server.start_task("demo.fail", after=0, delay=0)
    first = await run_cli("watch", task_id, "--url", base(server), "--json")
    assert first.status == 1
    again = await run_cli("watch", task_id, "--url", base(server), "--json")
    assert again.status == 1
    assert [e["state"] for e in again.json_lines()] == ["failure"]


@pytest.mark.e2e
async def test_an_unknown_task_exits_3_with_the_servers_reason(server: Server) -> None:
    run = await run_cli("watch", "00000000-0000-4000-8000-000000000000", "--url", base(server))
    assert run.status == 3, run
    assert run.out == ""
    assert "There is no task '00000000-0000-4000-8000-000000000000'" in run.err


async def test_an_unreachable_server_exits_3_at_once() -> None:
    loop = asyncio.get_running_loop()
    began = loop.time()
    run = await run_cli("watch", "some-task", "--url", f"http://127.0.0.1:{free_port()}")
    assert run.status == 3, run
    assert "cannot watch" in run.err and "127.0.0.1" in run.err
    assert loop.time() - began < 20


@pytest.mark.e2e
async def test_the_url_comes_from_the_environment(server: Server) -> None:
    # The server answers (404 for this id), so the URL was taken from PROGRESS_SSE_URL.
    run = await run_cli("watch", "no-such-task", env=cli_env(PROGRESS_SSE_URL=base(server)))
    assert run.status == 3 and "There is no task 'no-such-task'" in run.err, run


async def test_bad_settings_stop_at_start_naming_them() -> None:
    run = await run_cli("watch", "x", env=cli_env(PROGRESS_SSE_URL="localhost:8000"))
    assert run.status == 2 and "PROGRESS_SSE_URL='localhost:8000' is not valid" in run.err, run
    run = await run_cli("watch", "x", "--retry-for", "soon")
    assert run.status == 2 and "--retry-for='soon' is not valid" in run.err, run


async def test_help_explains_every_option_and_its_environment_variable() -> None:
    run = await run_cli("watch", "--help")
    assert run.status == 0
    text = " ".join(run.out.split())
    for needle in ("--url", "PROGRESS_SSE_URL", "http://localhost:8000", "--json", "cursor", "--retry-for", "--after"):
        assert needle in text
    assert "PROGRESS_SSE_RETRY_FOR" in text
    assert "0 the task succeeded, 1 it failed, 2 it was revoked (cancelled) or lost, 3" in text
    assert "130 interrupted by Ctrl-C (the task keeps running), 141 stdout was closed early" in text


# --- resets from the real server: a cursor of another history, a history lost ---------------


async def read_json_line(proc: asyncio.subprocess.Process) -> dict[str, Any]:
    assert proc.stdout is not None
    async with asyncio.timeout(30):
        line = await proc.stdout.readline()
    assert line, "watch ended early"
    found: dict[str, Any] = json.loads(line)
    return found


@pytest.mark.e2e
async def test_a_task_missing_after_a_reset_is_watched_until_its_news_ends_it(
    server: Server, settings: Settings
) -> None:
    # A cursor of another history, for a task of which nothing is known: the server
    # says so with a reset that lists it, and keeps the stream open for its news.
    task_id = str(uuid.uuid4())
    proc = await spawn("watch", task_id, "--url", base(server), "--after", "zzzzzzzz-5", "--json")
    told = await read_json_line(proc)
    assert (told["reset"], told["missing"], told["cursor"]) == ("cursor_unknown", [task_id], "zzzzzzzz-5"), told
    assert "state" not in told and told["message"]
    publisher = Publisher(sync_client(settings.redis_url), Keys(settings.key_prefix))
    try:
        publisher.publish(make_event(task_id, "demo.count", State.PROGRESS, current=1, total=2))
        publisher.publish(make_event(task_id, "demo.count", State.SUCCESS, current=2, total=2, result=1))
    finally:
        publisher.client.close()
    run = await finish(proc, timeout=30)
    assert run.status == 0, run
    assert [(e["state"], bool(CURSOR.fullmatch(e["cursor"]))) for e in run.json_lines()] == [
        ("progress", True),
        ("success", True),
    ]


@pytest.mark.e2e
async def test_a_history_lost_mid_watch_is_one_line_then_the_task_goes_on_in_the_new_one(
    make_server: Callable[..., Any], settings: Settings, redis_client: redis.Redis
) -> None:
    own = settings.with_(key_prefix=f"{settings.key_prefix}-lost{uuid.uuid4().hex[:6]}")
    srv = await make_server(own)
    publisher = Publisher(sync_client(own.redis_url), Keys(own.key_prefix))
    task_id = str(uuid.uuid4())
    try:
        publisher.publish(make_event(task_id, "demo.count", State.PROGRESS, current=1, total=4))
        proc = await spawn("watch", task_id, "--url", base(srv), "--json")
        before = await read_json_line(proc)
        assert (before["state"], before["current"]) == ("progress", 1)
        # What a Redis restart without its data does: every key gone. The next event
        # starts a new history, and the open stream hears of it.
        redis_client.delete(*redis_client.scan_iter(match=f"{own.key_prefix}:*"))
        publisher.publish(make_event(task_id, "demo.count", State.PROGRESS, current=2, total=4))
        told = await read_json_line(proc)
        assert (told.get("reset"), told["missing"], told["cursor"]) == ("history_lost", [], before["cursor"]), told
        publisher.publish(make_event(task_id, "demo.count", State.SUCCESS, current=4, total=4, result=1))
        run = await finish(proc, timeout=30)
    finally:
        publisher.client.close()
    assert run.status == 0, run
    after = run.json_lines()
    assert [(e["state"], e["current"]) for e in after] == [("progress", 2), ("success", 4)], after
    epochs = {CURSOR.fullmatch(e["cursor"])[1] for e in [before, *after]}  # type: ignore[index]
    assert len(epochs) == 2, "the states after the reset are of a new history"


# --- a reader that stops early: `progress-sse watch … | head -1` ---------------------------


async def pipe_to_head(*args: str) -> tuple[Run, str]:
    """Run the CLI with its stdout piped into a real `head -n 1`, which exits after one
    line. The CLI's run (its stderr; its stdout went to head) and what head printed."""
    read_end, write_end = os.pipe()
    try:
        cli = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "progress_sse", *args, stdout=write_end, stderr=asyncio.subprocess.PIPE, env=cli_env()
        )
        head = await asyncio.create_subprocess_exec("head", "-n", "1", stdin=read_end, stdout=asyncio.subprocess.PIPE)
    finally:
        # Head alone holds the read end: once it exits, the CLI's next write has no reader.
        os.close(read_end)
        os.close(write_end)
    shown, _ = await asyncio.wait_for(head.communicate(), 30)
    run = await finish(cli, timeout=30)
    return run, shown.decode()


def task_of(first_line: str) -> str:
    """The task id in the first line of any output mode: `task <id> (name)` or a JSON event."""
    if first_line.startswith("{"):
        return str(json.loads(first_line)["task_id"])
    match = UUID.search(first_line)
    assert match, first_line
    return match.group()


@pytest.mark.e2e
@pytest.mark.usefixtures("worker")
@pytest.mark.parametrize("mode", [[], ["--json"]], ids=["plain", "json"])
async def test_watch_into_head_1_exits_141_quietly(server: Server, mode: list[str]) -> None:
    # 20 s of progress lines: the watch is still writing when head has gone.
    task_id = await server.start_task("demo.count", n=400, delay=0.05)
    try:
        run, shown = await pipe_to_head("watch", task_id, "--url", base(server), *mode)
    finally:
        await cancel_quietly(server, task_id)
    assert task_of(shown) == task_id and shown.count("\n") == 1, shown
    # No traceback, no "Exception ignored … BrokenPipeError" at exit, not "failure" (1).
    assert (run.status, run.err) == (141, ""), run


# --- under a pseudo-terminal: the live bar -------------------------------------------------


def _take_terminal() -> None:
    """In the child: make the pty on stdin its controlling terminal, in a session of its
    own, so a Ctrl-C typed into the pty reaches it as the tty driver sends it."""
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


PTY_WIDTH = 160


async def run_in_pty(
    *args: str,
    timeout: float = 60,
    interrupt_on: str | None = None,
    width: int = PTY_WIDTH,
    env: dict[str, str] | None = None,
) -> tuple[int, str]:
    """Run the CLI with a terminal as stdin, stdout and stderr; everything the terminal
    showed, escape codes and all.

    With `interrupt_on`, Ctrl-C is typed into the terminal once that text has been
    written: the tty driver then echoes `^C` and sends SIGINT, as for a person."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, width, 0, 0))
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "progress_sse",
        *args,
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env=cli_env(TERM="xterm-256color", **(env or {})),
        start_new_session=True,
        preexec_fn=_take_terminal,
    )
    os.close(slave)
    os.set_blocking(master, False)
    loop = asyncio.get_running_loop()
    chunks: list[bytes] = []
    closed = asyncio.Event()
    interrupted = False

    def readable() -> None:
        nonlocal interrupted
        try:
            data = os.read(master, 65536)
        except BlockingIOError:
            return
        except OSError:  # EIO: the child's side of the terminal is gone
            data = b""
        if data:
            chunks.append(data)
            if not interrupted and interrupt_on is not None and interrupt_on.encode() in b"".join(chunks):
                interrupted = True
                os.write(master, b"\x03")  # Ctrl-C
        else:
            loop.remove_reader(master)
            closed.set()

    loop.add_reader(master, readable)
    try:
        async with asyncio.timeout(timeout):
            await closed.wait()
            status = await proc.wait()
    finally:
        loop.remove_reader(master)
        os.close(master)
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return status, b"".join(chunks).decode(errors="replace")


@pytest.mark.e2e
@pytest.mark.usefixtures("worker")
async def test_on_a_terminal_it_draws_a_live_bar_then_the_result(server: Server, output_dir: Any) -> None:
    # Long enough (5 s) that the bar is drawn while the task runs, after the CLI's start-up.
    task_id = await server.start_task("demo.count", n=50, delay=0.1)
    status, raw = await run_in_pty("watch", task_id, "--url", base(server))
    (output_dir / "watch-tty.txt").write_text(raw)
    assert status == 0, raw
    text = ANSI.sub("", raw).replace("\r", "\n")
    assert f"task {task_id}" in text
    # Redrawn in place (cursor movement and line erasing), not printed line by line.
    assert "\x1b[2K" in raw or "\x1b[1A" in raw, raw
    # A percent between 0 and 100 was on screen while the task ran, then the full bar.
    partial = {float(m) for m in re.findall(r"(\d+\.\d)% \d+/50", text)}
    assert any(0 < p < 100 for p in partial), text
    assert "100.0% 50/50" in text
    assert "━" in text
    assert "demo.count succeeded" in text
    assert '"processed": 50' in text


CSI = re.compile(r"\x1b\[([0-9;?]*)[ -/]*([@-~])")


def screen(raw: str, width: int = PTY_WIDTH) -> list[str]:
    """The lines a terminal `width` columns wide shows once `raw` is written to it.

    Just enough of a VT100 for what rich and the tty driver write: text, with the
    cursor held at the right margin until the next character wraps (as xterm does),
    CR, LF, cursor up (CSI n A) and erase line (CSI 2 K). Other escape codes
    (colours, showing the cursor) change no text."""
    rows: list[list[str]] = [[]]
    row = col = 0
    wrap_pending = False
    i = 0
    while i < len(raw):
        if code := CSI.match(raw, i):
            params, final = code.groups()
            if final == "A":
                row, wrap_pending = max(0, row - int(params or 1)), False
            elif final == "K" and params == "2":
                rows[row] = []
            i = code.end()
            continue
        char, i = raw[i], i + 1
        if char == "\r":
            col, wrap_pending = 0, False
        elif char == "\n":
            row, wrap_pending = row + 1, False
        elif char >= " ":
            if wrap_pending:
                row, col, wrap_pending = row + 1, 0, False
            while len(rows) <= row:
                rows.append([])
            line = rows[row]
            line.extend(" " * (col + 1 - len(line)))
            line[col] = char
            col, wrap_pending = (col, True) if col == width - 1 else (col + 1, False)
        while len(rows) <= row:
            rows.append([])
    lines = ["".join(r).rstrip() for r in rows]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def test_the_screen_wraps_at_the_margin_and_redraws_in_place() -> None:
    # The emulator the Ctrl-C tests rely on: a full row leaves the next character for the next line.
    assert screen("abcd^C\r\x1b[2Kabcd\r\n", width=4) == ["abcd", "abcd"]
    assert screen("abc^C\r\x1b[2Kabc\r\n", width=5) == ["abc"]
    assert screen("one\r\ntwo\x1b[1A\r\x1b[2Kuno\r\n\n\x1b[31mred\x1b[0m", width=10) == ["uno", "two", "red"]


ENDLESS = {"task_id": "t", "name": "demo.slow", "state": "progress", "current": 1, "total": 4, "percent": 25.0}


@pytest.fixture
async def endless_task(aiohttp_server: Any) -> AsyncIterator[str]:
    """The URL of a server whose task `t` never ends: one progress event, then the
    stream stays open."""
    done = asyncio.Event()

    async def events(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        payload = {**ENDLESS, "message": "Processing one"}
        await resp.write(f"id: 1\nevent: progress\ndata: {json.dumps(payload)}\n\n".encode())
        await done.wait()
        return resp

    app = web.Application()
    app.router.add_get("/tasks/{id}/events", events)
    server = await aiohttp_server(app)
    yield str(server.make_url("/"))
    done.set()


def sse(event: str, data: dict[str, Any], event_id: str | None = None) -> bytes:
    id_line = f"id: {event_id}\n" if event_id else ""
    return f"{id_line}event: {event}\ndata: {json.dumps(data)}\n\n".encode()


LOST_MESSAGE = "The event history was lost (Redis restarted without its data). The states that follow are current."


@pytest.fixture
async def reset_mid_task(aiohttp_server: Any) -> str:
    """The URL of a server whose task `t` makes progress, loses its history (a reset
    that lists `t` as missing), then goes on in a new history to its end."""

    async def events(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(sse("progress", {**ENDLESS, "message": "Processing one"}, "k3x7f2ab-1"))
        await resp.write(sse("reset", {"reason": "history_lost", "message": LOST_MESSAGE, "missing": ["t"]}))
        two = {**ENDLESS, "current": 2, "percent": 50.0, "message": "Processing two"}
        await resp.write(sse("progress", two, "q7zz4mnc-1"))
        done = {**ENDLESS, "state": "success", "current": 4, "percent": 100.0, "message": None, "result": 1}
        await resp.write(sse("success", done, "q7zz4mnc-2"))
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get("/tasks/{id}/events", events)
    server = await aiohttp_server(app)
    return str(server.make_url("/"))


async def test_a_broadcast_notice_on_the_stream_is_not_taken_for_the_tasks_news(aiohttp_server: Any) -> None:
    async def events(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(sse("progress", {**ENDLESS, "message": "Processing one"}, "k3x7f2ab-1"))
        await resp.write(sse("notice", {"id": "n-1", "text": "Deploy at 18:00", "ts": 1763712000.5}))
        done = {**ENDLESS, "state": "success", "current": 4, "percent": 100.0, "message": None, "result": 1}
        await resp.write(sse("success", done, "k3x7f2ab-2"))
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get("/tasks/{id}/events", events)
    url = str((await aiohttp_server(app)).make_url("/"))
    run = await run_cli("watch", "t", "--url", url, "--json")
    assert run.status == 0, run
    assert [(line["state"], line["cursor"]) for line in run.json_lines()] == [
        ("progress", "k3x7f2ab-1"),
        ("success", "k3x7f2ab-2"),
    ]


async def test_watch_says_a_reset_in_one_line_and_follows_the_task_on(reset_mid_task: str) -> None:
    run = await run_cli("watch", "t", "--url", reset_mid_task)
    assert run.status == 0, run
    assert run.lines == [
        "task t (demo.slow)",
        "progress 1/4 (25.0%) Processing one",
        f"reset (history_lost): {LOST_MESSAGE} No state of this task survived; waiting for its next event.",
        "progress 2/4 (50.0%) Processing two",
        "success 4/4 (100.0%)",
        "result: 1",
    ]
    assert run.err == ""


async def test_watch_json_gives_a_reset_its_own_line_with_the_cursor_it_leaves(reset_mid_task: str) -> None:
    run = await run_cli("watch", "t", "--url", reset_mid_task, "--json")
    assert run.status == 0, run
    lines = run.json_lines()
    assert lines[1] == {"reset": "history_lost", "message": LOST_MESSAGE, "missing": ["t"], "cursor": "k3x7f2ab-1"}
    assert [(line.get("state"), line["cursor"]) for line in lines] == [
        ("progress", "k3x7f2ab-1"),
        (None, "k3x7f2ab-1"),
        ("progress", "q7zz4mnc-1"),
        ("success", "q7zz4mnc-2"),
    ]


async def test_ctrl_c_leaves_the_row_once_and_says_how_to_cancel(endless_task: str) -> None:
    url = endless_task
    status, raw = await run_in_pty("watch", "t", "--url", url, interrupt_on="25.0% 1/4")
    assert status == 130, raw
    assert "Traceback" not in raw
    assert raw.rfind("\x1b[?25h") > raw.rfind("\x1b[?25l") >= 0  # the cursor is shown again
    assert "^C" in raw  # the terminal echoed it: what follows must cope with that
    shown = screen(raw)
    assert [line for line in shown if "25.0% 1/4" in line] == [shown[1]], shown  # the row, once
    # Whole: spinner (whichever frame), name, bar, figures, message.
    assert re.fullmatch(r". demo\.slow ━+╸?━* +25\.0% 1/4 .* Processing one", shown[1]), shown
    assert shown == [
        "task t",
        shown[1],
        f"Stopped watching. Task t keeps running; cancel it with: progress-sse cancel t --url {url}",
    ]


async def test_ctrl_c_on_a_terminal_without_the_bar_writes_the_note_over_the_echo(endless_task: str) -> None:
    # --json on a terminal: lines, no redraw that would wipe the `^C`.
    status, raw = await run_in_pty("watch", "t", "--url", endless_task, "--json", interrupt_on='"cursor": "1"}')
    assert status == 130, raw
    assert "^C" in raw
    line, note = screen(raw)
    assert json.loads(line)["percent"] == 25.0
    assert note == f"Stopped watching. Task t keeps running; cancel it with: progress-sse cancel t --url {endless_task}"


@pytest.mark.e2e
@pytest.mark.usefixtures("worker")
async def test_after_ctrl_c_the_command_it_shows_cancels_the_task(server: Server) -> None:
    task_id = await server.start_task("demo.count", n=400, delay=0.05)
    try:
        # Wide enough for the note, two task ids long, on one line.
        status, raw = await run_in_pty("watch", task_id, "--url", base(server), interrupt_on="/400", width=300)
        assert status == 130, raw
        assert (await server.state(task_id))["state"] == "progress", "Ctrl-C stops the watch, not the task"
        note = screen(raw, width=300)[-1]
        assert note.startswith(f"Stopped watching. Task {task_id} keeps running; cancel it with: "), note
        command = shlex.split(note.partition("cancel it with: ")[2])
        assert command[:2] == ["progress-sse", "cancel"], command
        run = await run_cli(*command[1:])
    finally:
        await cancel_quietly(server, task_id)
    assert (run.status, run.out) == (0, f"cancelled {task_id} (revoked)\n"), run
    assert (await server.state(task_id))["state"] == "revoked"


@pytest.mark.e2e
@pytest.mark.usefixtures("worker")
async def test_ctrl_c_without_a_terminal_says_the_same_on_stderr(server: Server) -> None:
    task_id = await server.start_task("demo.count", n=400, delay=0.05)
    try:
        proc = await spawn("watch", task_id, "--json", env=cli_env(PROGRESS_SSE_URL=base(server)))
        assert proc.stdout is not None
        async with asyncio.timeout(30):
            while json.loads(await proc.stdout.readline())["state"] != "progress":
                pass
        proc.send_signal(signal.SIGINT)
        run = await finish(proc, timeout=30)
    finally:
        await cancel_quietly(server, task_id)
    assert run.status == 130, run
    # The URL came from the environment, so the command needs no --url; no \r off a terminal.
    assert run.err == f"Stopped watching. Task {task_id} keeps running; cancel it with: progress-sse cancel {task_id}\n"
    assert all(json.loads(line)["task_id"] == task_id for line in run.lines)  # no line cut short


# --- --notify: the end told by a desktop notifier, else the bell ------------------------------


def fake_notify_send(directory: Any, status: int = 0) -> Path:
    """A `notify-send` that records its arguments (one per line) and exits `status`."""
    record = directory / "notify-send.args"
    script = directory / "notify-send"
    script.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > "{record}"\nexit {status}\n')
    script.chmod(0o755)
    return record


async def test_notify_rings_the_bell_on_stderr_once_the_task_ended_when_no_notifier_is_there(
    reset_mid_task: str, tmp_path: Any
) -> None:
    # A PATH with no notify-send: the CLI runs from sys.executable and needs none.
    run = await run_cli("watch", "t", "--url", reset_mid_task, "--notify", env=cli_env(PATH=str(tmp_path)))
    assert run.status == 0, run
    assert run.err == "\a"
    assert "\a" not in run.out, "stdout is data: lines a script reads"
    assert run.lines[-2:] == ["success 4/4 (100.0%)", "result: 1"]


async def test_notify_on_a_terminal_rings_after_the_outcome_and_not_on_ctrl_c(
    reset_mid_task: str, endless_task: str, tmp_path: Any
) -> None:
    status, raw = await run_in_pty("watch", "t", "--url", reset_mid_task, "--notify", env={"PATH": str(tmp_path)})
    assert status == 0, raw
    assert raw.count("\a") == 1
    assert raw.index("\a") > raw.index("demo.slow succeeded"), "at the end, below what the task came to"
    # Ctrl-C stops the watch, not the task: nothing ended, nothing to tell.
    status, raw = await run_in_pty(
        "watch", "t", "--url", endless_task, "--notify", interrupt_on="25.0% 1/4", env={"PATH": str(tmp_path)}
    )
    assert status == 130, raw
    assert "\a" not in raw


async def test_notify_uses_notify_send_when_it_is_on_the_path(reset_mid_task: str, tmp_path: Any) -> None:
    record = fake_notify_send(tmp_path)
    run = await run_cli("watch", "t", "--url", reset_mid_task, "--notify", env=cli_env(PATH=str(tmp_path)))
    assert run.status == 0, run
    assert record.read_text().splitlines() == ["--app-name=progress-sse", "--", "demo.slow succeeded", "Result: 1"]
    assert run.err == "", "the notification told it: no bell"


async def test_notify_falls_back_to_the_bell_when_notify_send_fails(reset_mid_task: str, tmp_path: Any) -> None:
    record = fake_notify_send(tmp_path, status=1)  # as with no desktop session, over SSH
    run = await run_cli("watch", "t", "--url", reset_mid_task, "--notify", "--json", env=cli_env(PATH=str(tmp_path)))
    assert run.status == 0, run
    assert record.exists()
    assert run.err == "\a"
    assert [line.get("state") for line in run.json_lines()][-1] == "success"


@pytest.mark.e2e
@pytest.mark.usefixtures("worker")
async def test_start_watch_notify_tells_a_failure_with_its_error(server: Server, tmp_path: Any) -> None:
    record = fake_notify_send(tmp_path)
    run = await run_cli(
        "start", "demo.fail", "--kw", "after=1", "--kw", "delay=0.01", "--watch", "--notify", "--url", base(server),
        env=cli_env(PATH=str(tmp_path)),
    )  # fmt: skip
    assert run.status == 1, run
    assert record.read_text().splitlines()[2:] == [
        "demo.fail failed",
        "RuntimeError: demo.fail gave up after 1 steps, as it was asked to",
    ]


async def test_notify_without_watch_is_a_usage_error() -> None:
    run = await run_cli("start", "demo.count", "--notify")
    assert run.status == 2 and "--notify apply to --watch" in run.err, run


def test_the_notification_says_how_the_task_ended(monkeypatch: pytest.MonkeyPatch) -> None:
    view = TaskView("t")
    view.apply(event("revoked", 3, 10, reason="terminated", message="Task terminated"))
    assert notify_words(view) == ("demo.x was cancelled", "Task terminated")
    view.apply(event("failure", error={"type": "ValueError", "message": "bad\x1b[31m input"}))
    assert notify_words(view) == ("demo.x failed", "ValueError: bad\\x1b[31m input")  # escaped, as everywhere
    view.apply(event("success", 10, 10, result="x" * 500))
    title, body = notify_words(view)
    assert title == "demo.x succeeded" and len(body) == 200 and body.endswith("…")
    # macOS: osascript, with the words as arguments, never quoted into the script.
    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.setattr("shutil.which", lambda name: f"/usr/bin/{name}" if name == "osascript" else None)
    command = notifier('say "hi"', "-body")
    assert command is not None and command[0] == "/usr/bin/osascript"
    assert command[-3:] == ["--", 'say "hi"', "-body"]


def test_the_note_after_ctrl_c_never_says_an_ended_task_keeps_running(capsys: pytest.CaptureFixture[str]) -> None:
    _stopped_watching("t-1", "success", "http://x/")
    assert capsys.readouterr().err == "Stopped watching. Task t-1 had already ended (success).\n"
    _stopped_watching("odd id; rm -rf", None, "http://x/")  # quoted, ready to paste
    assert capsys.readouterr().err.endswith("cancel it with: progress-sse cancel 'odd id; rm -rf' --url http://x/\n")


# --- in-process: what the renderers show --------------------------------------------------


def event(state: str, current: float = 0, total: float | None = None, ts: float = 100.0, **extra: Any) -> TaskEvent:
    percent = None if total is None else round(100 * current / total, 2)
    payload = {"task_id": "t", "name": "demo.x", "state": state, "current": current, "total": total}
    payload.update(percent=percent, ts=ts, **extra)
    return TaskEvent(state, payload, str(int(ts)))


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_rate_eta_and_elapsed_come_from_the_events_timestamps() -> None:
    clock = FakeClock()
    view = TaskView("t", clock)
    view.apply(event("started", ts=100))
    view.apply(event("progress", 2, 10, ts=101))
    view.apply(event("progress", 4, 10, ts=102))
    assert view.rate == pytest.approx(2.0)
    assert view.eta() == pytest.approx(3.0)
    assert view.elapsed() == pytest.approx(2.0)
    clock.now += 1  # no event for a second: the ETA counts down, elapsed counts up
    assert view.eta() == pytest.approx(2.0)
    assert view.elapsed() == pytest.approx(3.0)
    view.apply(event("success", 10, 10, ts=105, result=1))
    clock.now += 50
    assert view.elapsed() == pytest.approx(5.0)  # frozen at the end
    assert view.eta() is None


def test_a_burst_of_stored_events_keeps_the_tasks_real_pace() -> None:
    # A resume delivers old events all at once; their ts, not arrival, set the rate.
    view = TaskView("t", FakeClock())
    for i in range(1, 11):
        view.apply(event("progress", i, 100, ts=100 + i * 0.5))
    assert view.rate == pytest.approx(2.0)
    assert view.eta() == pytest.approx(45.0)


def test_switching_to_indeterminate_drops_percent_and_eta() -> None:
    view = TaskView("t", FakeClock())
    view.apply(event("progress", 1, 4, ts=100))
    view.apply(event("progress", 2, 4, ts=101))
    assert view.determinate and view.figures() == "2/4 (50.0%)"
    view.apply(event("progress", 3, None, ts=102, message="thinking"))
    assert not view.determinate
    assert view.figures() == "3 (total unknown)"
    assert view.eta() is None


def render(renderer: LiveRenderer) -> str:
    out = Console(file=io.StringIO(), width=160, force_terminal=False, color_system=None)
    out.print(renderer.progress.get_renderable())
    return out.file.getvalue()  # type: ignore[attr-defined,no-any-return]


def test_the_live_bar_is_a_spinner_while_indeterminate_and_a_bar_with_numbers_while_determinate() -> None:
    screen = io.StringIO()
    renderer = LiveRenderer("t", Console(file=screen, width=160, force_terminal=True, color_system=None))
    with renderer:
        renderer.event(event("started", ts=100))
        renderer.event(event("progress", 0, None, ts=101, message="Thinking hard"))
        row = render(renderer)
        assert "Thinking hard" in row and "demo.x" in row and "0:00:01" in row
        assert "%" not in row and "eta" not in row

        renderer.event(event("progress", 3, 10, ts=102, message="Processed 3 of 10"))
        renderer.event(event("progress", 4, 10, ts=103, message="Processed 4 of 10"))
        row = render(renderer)
        assert "40.0% 4/10" in row and "1.0/s" in row and "eta 0:00:06" in row and "Processed 4 of 10" in row

        renderer.event(event("progress", 5, None, ts=104, message="Back to unknown"))
        row = render(renderer)
        assert "%" not in row and "5/?" in row and "Back to unknown" in row

        renderer.event(event("retry", 5, None, ts=105, retries=1, message="ConnectionError: nope", eta=107.5))
        renderer.reconnecting(Reconnecting(2, 1.5, "the server ended the stream"))
        assert "reconnecting in 1.5 s (attempt 2)" in render(renderer)
        renderer.event(event("success", 10, 10, ts=108, result={"processed": 10, "name": "café"}))
        assert "100.0% 10/10" in render(renderer)
    text = ANSI.sub("", screen.getvalue())
    assert "↻ retry #1: ConnectionError: nope (next attempt in 2.5 s)" in text
    assert "demo.x succeeded in 0:00:08" in text
    assert '"processed": 10' in text and '"café"' in text


def test_the_live_bar_prints_the_error_and_traceback_of_a_failure() -> None:
    screen = io.StringIO()
    renderer = LiveRenderer("t", Console(file=screen, width=120, force_terminal=True, color_system=None))
    with renderer:
        renderer.event(event("progress", 1, 2, ts=100))
        error = {"type": "ValueError", "message": "bad [input]", "traceback": "Traceback (most recent call last):\n  x"}
        renderer.event(event("failure", 1, 2, ts=101, error=error, message="bad [input]"))
    text = ANSI.sub("", screen.getvalue())
    # Square brackets are text, not rich markup.
    assert "demo.x failed: ValueError: bad [input]" in text
    assert "Traceback (most recent call last):\n  x" in text


def test_plain_lines_one_per_change_and_no_repeats() -> None:
    out, err = io.StringIO(), io.StringIO()
    renderer = PlainRenderer("t", out, err)
    with renderer:
        renderer.event(event("queued", ts=99))
        renderer.event(event("started", ts=100))
        renderer.event(event("progress", 1, 4, ts=101, message="one"))
        renderer.event(event("progress", 1, 4, ts=101.5, message="one"))  # nothing new: no line
        renderer.event(event("progress", 2, 4, ts=102, message="two"))
        renderer.reconnecting(Reconnecting(1, 0.5, "boom"))
        renderer.event(event("progress", 2, None, ts=103, message="who knows"))
        renderer.event(event("revoked", 2, None, ts=104, reason="terminated", message="Task terminated"))
    assert out.getvalue().splitlines() == [
        "task t (demo.x)",
        "queued",
        "started",
        "progress 1/4 (25.0%) one",
        "progress 2/4 (50.0%) two [1.0/s, eta 0:00:02]",
        "progress 2 (total unknown) who knows",  # a new total, a new pace: no rate yet
        "revoked (terminated) Task terminated",
    ]
    assert err.getvalue() == "progress-sse: connection lost (boom); reconnecting in 0.5 s (attempt 1)\n"


LOST = Reset("history_lost", "The event history was lost.", ("t",), "k3x7f2ab-7")
UNPLACED = Reset("cursor_unknown", "That cursor names no place in the current history.", (), "k3x7f2ab-7")


def test_plain_lines_say_a_reset_once_and_show_the_state_that_follows_even_if_unchanged() -> None:
    out, err = io.StringIO(), io.StringIO()
    with PlainRenderer("t", out, err) as renderer:
        renderer.event(event("progress", 2, 4, ts=101, message="two"))
        renderer.reset(UNPLACED)
        renderer.event(event("progress", 2, 4, ts=101, message="two"))  # the current state: as before, still news
        renderer.reset(LOST)
        renderer.event(event("progress", 1, 4, ts=110, message="one again"))
    assert out.getvalue().splitlines() == [
        "task t (demo.x)",
        "progress 2/4 (50.0%) two",
        "reset (cursor_unknown): That cursor names no place in the current history.",
        "progress 2/4 (50.0%) two",
        "reset (history_lost): The event history was lost. No state of this task survived; waiting for its next event.",
        "progress 1/4 (25.0%) one again",  # counting went back: no rate across the two histories
    ]
    assert err.getvalue() == ""


def test_json_says_a_reset_in_one_line_that_has_no_state() -> None:
    out = io.StringIO()
    with make_renderer("t", json_lines=True, out=out, err=io.StringIO()) as renderer:
        renderer.reset(LOST)
    line = {"reset": "history_lost", "message": "The event history was lost.", "missing": ["t"], "cursor": "k3x7f2ab-7"}
    assert [json.loads(text) for text in out.getvalue().splitlines()] == [line]


def test_the_live_bar_of_a_task_whose_history_was_lost_drops_its_old_figures_and_waits() -> None:
    screen = io.StringIO()
    renderer = LiveRenderer("t", Console(file=screen, width=160, force_terminal=True, color_system=None))
    with renderer:
        renderer.event(event("progress", 50, 450, ts=100, message="Processed 50 of 450"))
        renderer.event(event("progress", 60, 450, ts=101, message="Processed 60 of 450"))
        assert "60/450" in render(renderer) and "10.0/s" in render(renderer)
        renderer.reset(LOST)
        row = render(renderer)
        assert "history lost; waiting for the task's next event" in row
        assert not any(stale in row for stale in ("60/450", "%", "/s", "eta", "Processed")), row
        renderer.event(event("progress", 61, 450, ts=102, message="Processed 61 of 450"))
        row = render(renderer)
        assert "61/450" in row and "waiting" not in row
    text = ANSI.sub("", screen.getvalue())
    assert text.count("↺ reset (history_lost): The event history was lost. No state of this task survived") == 1


def test_the_renderer_follows_the_output(monkeypatch: pytest.MonkeyPatch) -> None:
    # FORCE_COLOR asks rich for colours; it must not turn a pipe into a redrawn bar.
    monkeypatch.setenv("FORCE_COLOR", "1")
    assert isinstance(make_renderer("t", json_lines=False, out=io.StringIO()), PlainRenderer)
    assert isinstance(make_renderer("t", json_lines=True, out=io.StringIO()), JsonRenderer)
    master, slave = pty.openpty()
    try:
        with open(slave, "w", closefd=False) as tty:
            assert isinstance(make_renderer("t", json_lines=False, out=tty), LiveRenderer)
            monkeypatch.setenv("TERM", "dumb")
            assert isinstance(make_renderer("t", json_lines=False, out=tty), PlainRenderer)
    finally:
        os.close(master)
        os.close(slave)


def test_json_lines_are_the_payload_plus_the_cursor() -> None:
    out = io.StringIO()
    with make_renderer("t", json_lines=True, out=out, err=io.StringIO()) as renderer:
        renderer.event(event("progress", 1, 2, ts=100, message="caf\u00e9"))
    line = out.getvalue()
    assert line.endswith("\n") and line.isascii()
    assert json.loads(line) == {**event("progress", 1, 2, ts=100, message="caf\u00e9").payload, "cursor": "100"}


def test_control_characters_in_task_text_are_shown_escaped_never_sent_to_the_terminal() -> None:
    out = io.StringIO()
    with PlainRenderer("t", out, io.StringIO()) as renderer:
        renderer.event(event("progress", 1, 2, ts=100, message="file \x1b[2Jname\nline two"))
        error = {"type": "OSError", "message": "bad\x1b]0;pwned\x07", "traceback": "Traceback:\n  \x1b[31mred"}
        renderer.event(event("failure", 1, 2, ts=101, error=error))
    assert out.getvalue().splitlines() == [
        "task t (demo.x)",
        "progress 1/2 (50.0%) file \\x1b[2Jname\\nline two",
        "failure OSError: bad\\x1b]0;pwned\\x07",
        "Traceback:",
        "  \\x1b[31mred",
    ]
    live = LiveRenderer("t", Console(file=io.StringIO(), width=160, force_terminal=False, color_system=None))
    live.event(event("progress", 1, 2, ts=100, message="x\x1b[2Jy"))
    row = render(live)
    assert "\x1b" not in row and "x\\x1b[2Jy" in row
