"""Celery beat, end to end: a task beat sends streams its whole life, from `queued`,
exactly like one started over HTTP.

`queued` is written by the process that sends a task (the bridge's
before_task_publish), so it is beat's to write: a user's app that installs the
bridge where it is defined has it in `celery -A app beat`, and `progress-sse beat`
(the Procfile's line) has it for the demo app. Real parts throughout: real
`celery beat` processes, a real prefork worker, the test Redis, a real web. The
tests never know a beat task's id: they find it on the all-tasks feed (`/feed`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from progress_sse.cli.embedded import free_port, listening
from progress_sse.cli.serve import default_schedule
from progress_sse.config import Settings
from progress_sse.events import TERMINAL_STATES

from .conftest import Server, Worker, worker_env
from .sse import SSEReader
from .test_dev import alive, descendants, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("redis_client")]  # its clean-up at the end

ROOT = Path(__file__).resolve().parents[1]

# A user's own app, as the README's "Run beat with the bridge" has it: the bridge
# installed where the app is defined, and a schedule of its own (every second).
OWN_APP = """
import os

from celery import Celery

import progress_sse
from progress_sse import set_progress

app = Celery("beatapp", broker=os.environ["CELERY_BROKER_URL"])
app.conf.update(
    task_default_queue=os.environ["PROGRESS_SSE_QUEUE"],
    task_ignore_result=True,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    beat_schedule={"tick every second": {"task": "beatapp.tick", "schedule": 1.0, "kwargs": {"steps": 3}}},
)
progress_sse.install(app)  # in the worker, and in beat: beat records `queued` as it sends


@app.task(name="beatapp.tick")
def tick(steps: int) -> dict[str, int]:
    for i in range(1, steps + 1):
        set_progress(i, steps, f"Tick {i} of {steps}")
    return {"ticks": steps}
"""


def own(settings: Settings, name: str) -> Settings:
    """A key prefix and queue of the test's own: the recent list holds only its
    tasks, and no other test's worker takes them."""
    return settings.with_(key_prefix=f"{settings.key_prefix}-{name}", queue=f"{settings.queue}-{name}")


@contextlib.contextmanager
def process(argv: list[str], env: dict[str, str], cwd: Path, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A process in its own group, with its output in `log`; stopped (SIGTERM, then
    SIGKILL to whatever of its group is left) however the test ends."""
    with log.open("wb") as out:
        run = subprocess.Popen(argv, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield run
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(run.pid, signal.SIGTERM)
        try:
            run.wait(15)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(run.pid, signal.SIGKILL)
            run.wait()


async def state_of(server: Server, task_id: str) -> dict[str, Any]:
    async with server.session.get(server.url(f"/tasks/{task_id}")) as resp:
        assert resp.status == 200
        body: dict[str, Any] = await resp.json()
        return body


async def life(server: Server, task_id: str) -> list[str]:
    """The task's whole life: every event from cursor 0 to its terminal one."""
    async with server.session.get(server.url(f"/tasks/{task_id}/events?last_event_id=0")) as resp:
        assert resp.status == 200
        return [str(event.event) for event in await SSEReader(resp).rest()]


async def test_a_task_beat_sends_streams_from_queued_to_success(
    settings: Settings,
    make_server: Callable[..., Any],
    tmp_path: Path,
    output_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    mine = own(settings, "beat")
    (tmp_path / "beatapp.py").write_text(textwrap.dedent(OWN_APP))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))  # the worker (conftest's) imports it from there
    server: Server = await make_server(mine)
    worker = Worker(mine, output_dir / "beat-worker.log", concurrency=1, app="beatapp")
    try:
        worker.wait_ready()
        beat = [sys.executable, "-m", "celery", "-A", "beatapp", "beat", "--loglevel=INFO"]
        beat_log = output_dir / "beat-own-app.log"
        # The all-tasks feed, open before beat starts: its tasks appear there unasked.
        async with server.session.get(server.url("/feed?name=beatapp.")) as feed:
            reader = SSEReader(feed)
            with process([*beat, f"--schedule={tmp_path / 'schedule'}"], worker_env(mine), tmp_path, beat_log):
                fed: dict[str, list[str]] = {}
                while len([t for t, states in fed.items() if states[-1] in TERMINAL_STATES]) < 2:
                    event = await reader.next_event(timeout=60)
                    assert event is not None, "the feed ended"
                    if event.event not in ("notice", "reset"):
                        fed.setdefault(event.payload["task_id"], []).append(str(event.event))
        ended = [await state_of(server, t) for t, states in fed.items() if states[-1] in TERMINAL_STATES]
        # Beat said where it records the tasks it sends, as a worker does.
        db = mine.redis_url.rsplit("/", 1)[1]
        said = [line for line in beat_log.read_text().splitlines() if "beat records the tasks it sends in" in line]
        assert len(said) == 1 and said[0].endswith(f"/{db} under the key prefix {mine.key_prefix!r}"), said
    finally:
        worker.stop()
    for task in ended:
        # On the feed: every change of state (its progress came faster than once a second).
        assert re.fullmatch(r"queued started( progress)* success", " ".join(fed[task["task_id"]])), fed
        assert task["name"] == "beatapp.tick", task
        assert task["state"] == "success" and task["result"] == {"ticks": 3}, task
        assert str(task["worker"]).startswith(f"{worker.name}@"), task
        events = await life(server, task["task_id"])
        # `queued` first: beat recorded it as it sent the task (a worker never writes it).
        assert re.fullmatch(r"queued started( progress)+ success", " ".join(events)), events
    assert ended[0]["task_id"] != ended[1]["task_id"]


def test_progress_sse_beat_keeps_its_schedule_out_of_the_working_directory_and_stops_cleanly(
    settings: Settings, tmp_path: Path
) -> None:
    """The Procfile's `beat:` line as it runs with no demo schedule: it says that it
    sends nothing, keeps its state in the temporary directory, and SIGTERM (what a
    platform sends) ends it with status 0."""
    mine = own(settings, "beat-alone")
    workdir, temp = tmp_path / "release", tmp_path / "tmp"
    workdir.mkdir()
    temp.mkdir()
    log = tmp_path / "beat.log"
    with process(
        [sys.executable, "-m", "progress_sse", "beat"], {**worker_env(mine), "TMPDIR": str(temp)}, workdir, log
    ) as run:
        wait_for(lambda: run.poll() is not None or "beat: Starting..." in log.read_text(), 30, "beat to start")
        run.send_signal(signal.SIGTERM)
        run.wait(30)
    text = log.read_text()
    assert run.returncode == 0, text
    assert "the schedule is empty, so beat sends nothing" in text
    # <temporary directory>/progress-sse-beat-<uid>/<key prefix>.schedule (dbm may add suffixes)
    default = default_schedule(mine)
    where = temp / default.parent.name / default.name
    assert f". db -> {where}" in text, text
    assert [p for p in where.parent.iterdir() if p.name.startswith(where.name)], "beat stored its schedule there"
    assert list(workdir.iterdir()) == [], "nothing in the working directory"


def dev_beat(settings: Settings, port: int, cwd: Path, log: Path) -> subprocess.Popen[bytes]:
    env = {**worker_env(settings), "PORT": str(port)}
    env.pop("HOST")  # dev's own default: loopback
    with log.open("wb") as out:  # a file, not a pipe: the web's access log of the polling must not fill it
        return subprocess.Popen(
            [sys.executable, "-m", "progress_sse", "dev", "--beat", "--concurrency=1"],
            env=env,
            cwd=cwd,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def get(port: int, path: str) -> Any:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
        return json.load(resp)


def events_of(port: int, task_id: str) -> list[str]:
    """The task's whole life over SSE; the server ends the stream after its terminal event."""
    url = f"http://127.0.0.1:{port}/tasks/{task_id}/events?last_event_id=0"
    with urllib.request.urlopen(url, timeout=30) as stream:
        return [line.decode().removeprefix("event: ").strip() for line in stream if line.startswith(b"event: ")]


def test_dev_beat_runs_the_demo_schedule_and_stops_everything(settings: Settings, tmp_path: Path) -> None:
    """`progress-sse dev --beat`: demo tasks arrive that nobody started, each
    recorded from `queued` (by beat) to `success` (by the worker); Ctrl-C stops
    web, worker, pool and beat, and removes beat's schedule directory."""
    port = free_port()
    workdir, log = tmp_path / "workdir", tmp_path / "dev.log"
    workdir.mkdir()
    run = dev_beat(own(settings, "dev-beat"), port, workdir, log)
    tree: set[int] = set()
    ended: dict[str, dict[str, Any]] = {}
    try:

        def demo_tasks_ended() -> bool:
            if run.poll() is not None:
                raise AssertionError(f"dev exited early:\n{log.read_text()}")
            try:
                tasks = get(port, "/tasks?limit=50")["tasks"]
            except OSError:
                return False  # not listening yet
            for task in tasks:
                if task["state"] == "success":
                    ended.setdefault(task["name"], task)
            return {"demo.count", "demo.stages"} <= set(ended)

        wait_for(demo_tasks_ended, 90, "beat's first demo.count and demo.stages to succeed")
        tree = descendants(run.pid)
        assert len(tree) >= 4, "web, worker, its pool process and beat"
        for name, task in ended.items():
            events = events_of(port, task["task_id"])
            assert events[:2] == ["queued", "started"] and events[-1] == "success", (name, events)
        run.send_signal(signal.SIGINT)
        run.wait(60)
    finally:
        for pid in [run.pid, *tree]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        run.wait(30)
    out = log.read_text()
    assert run.returncode == 0, out
    assert "beat sends demo.count every 20 s and demo.stages every minute" in out
    assert "beat   | " in out and "Sending due task demo.count every 20 s (demo.count)" in out, out
    schedule = re.search(r"\. db -> (\S+)", out)
    assert schedule, out
    assert not Path(schedule.group(1)).parent.exists(), "dev removes beat's schedule directory"
    assert list(workdir.iterdir()) == [], "nothing in the working directory"
    assert [pid for pid in tree if alive(pid)] == []
    assert not listening("127.0.0.1", port)
