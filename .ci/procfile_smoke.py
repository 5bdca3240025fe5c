"""CI, before the suite: the Procfile's lines, from a plain install, run a task to success.

Usage: python .ci/procfile_smoke.py VENV_BIN

VENV_BIN is the bin directory of a fresh virtual environment holding
`pip install <checkout>` and nothing else: no extras, so a dependency that only
the test extras bring in cannot hide. The Procfile's `web`, `worker` and `beat`
lines run exactly as written, through the shell, as a platform runs them, with
only PORT and REDIS_URL set, and PROGRESS_SSE_DEMO_SCHEDULE=1 for beat to send
something (TMPDIR keeps its schedule file in this run's directory); REDIS_URL is
a private redis-server of this run's own. Then a demo task is started over HTTP
and its event stream is read until `success`, and a demo task that beat sent is
found among the recent tasks and read from `queued` to `success`. Standard
library only: it must not need what it is checking.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEADLINE = 120.0  # seconds for the whole check; a healthy run takes a few


def main(venv_bin: Path) -> int:
    procfile = dict(line.split(":", 1) for line in (ROOT / "Procfile").read_text().splitlines() if line.strip())
    commands = {name.strip(): command.strip() for name, command in procfile.items()}
    assert set(commands) == {"web", "worker", "beat"}, f"unexpected Procfile: {commands}"

    workdir = Path(tempfile.mkdtemp(prefix="procfile-smoke-"))
    redis_port, web_port = free_port(), free_port()
    # What a platform gives a dyno, and nothing of CI's own: a PYTHONPATH or a
    # PROGRESS_SSE_* variable here could hide what this check is for.
    env = {
        "PATH": f"{venv_bin}{os.pathsep}{os.environ['PATH']}",
        "HOME": str(workdir),
        "LANG": "C.UTF-8",
        "PORT": str(web_port),
        "REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
        "PROGRESS_SSE_DEMO_SCHEDULE": "1",
        "TMPDIR": str(workdir),
    }
    processes: dict[str, subprocess.Popen[bytes]] = {}
    logs = {name: workdir / f"{name}.log" for name in ("redis", *commands)}
    try:
        processes["redis"] = spawn(
            ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            logs["redis"],
            env,
        )
        for name, command in commands.items():
            processes[name] = spawn(["sh", "-c", command], logs[name], env)
        base = f"http://127.0.0.1:{web_port}"
        deadline = time.monotonic() + DEADLINE
        health = wait_for_worker(base, processes, deadline)
        print(f"procfile smoke: /healthz {json.dumps(health)}", flush=True)
        task_id, states = run_task(base, deadline)
        print(f"procfile smoke: demo.count went {' -> '.join(states)}", flush=True)
        if states[-1] != "success":
            raise SmokeFailed(f"the demo task ended {states[-1]!r}, not 'success'")
        beat_id = wait_for_beat_task(base, {task_id}, processes, deadline)
        states = read_events(base, f"/tasks/{beat_id}/events", deadline)
        print(f"procfile smoke: demo.count sent by beat went {' -> '.join(states)}", flush=True)
        if states[0] != "queued" or states[-1] != "success":
            raise SmokeFailed(f"the task beat sent went {states}, not from 'queued' to 'success'")
        return 0
    except SmokeFailed as exc:
        print(f"procfile smoke FAILED: {exc}", file=sys.stderr)
        for name, log in logs.items():
            text = log.read_text(errors="replace") if log.exists() else ""
            print(f"----- {name} (last lines) -----\n{''.join(text.splitlines(True)[-40:])}", file=sys.stderr)
        return 1
    finally:
        for process in reversed(processes.values()):
            stop(process)
        shutil.rmtree(workdir, ignore_errors=True)


class SmokeFailed(Exception):
    pass


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def spawn(argv: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        # Its own process group, so stopping it stops its children (the worker's pool) too.
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the process group, SIGKILL to whatever of it is left after 15 s
    (or at once, for what outlived its leader: the worker's pool processes)."""
    killpg(process, signal.SIGTERM)
    try:
        process.wait(15)
    except subprocess.TimeoutExpired:
        pass
    killpg(process, signal.SIGKILL)
    process.wait()


def killpg(process: subprocess.Popen[bytes], signum: int) -> None:
    try:
        os.killpg(process.pid, signum)
    except ProcessLookupError:  # the whole group is gone already
        pass


def wait_for_worker(base: str, processes: dict[str, subprocess.Popen[bytes]], deadline: float) -> dict[str, object]:
    """/healthz, once it answers and counts a live worker (the worker's heartbeat)."""
    while True:
        for name, process in processes.items():
            if process.poll() is not None:
                raise SmokeFailed(f"the {name} process exited with status {process.returncode}")
        try:
            with urllib.request.urlopen(f"{base}/healthz", timeout=5) as resp:
                health: dict[str, object] = json.load(resp)
            if health.get("workers", 0):
                return health
        except OSError:
            pass  # not listening yet
        if time.monotonic() > deadline:
            raise SmokeFailed("the web did not answer /healthz with a live worker in time")
        time.sleep(0.2)


def run_task(base: str, deadline: float) -> tuple[str, list[str]]:
    """Start demo.count over HTTP and read its stream from before its first event to its end."""
    request = urllib.request.Request(
        f"{base}/tasks",
        data=json.dumps({"name": "demo.count", "kwargs": {"n": 3, "delay": 0.1}}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as resp:
        started = json.load(resp)
    return str(started["id"]), read_events(base, started["events_url"], deadline)


def wait_for_beat_task(
    base: str, ours: set[str], processes: dict[str, subprocess.Popen[bytes]], deadline: float
) -> str:
    """The id of a demo.count this check did not start (beat sent it: the demo
    schedule sends one as soon as beat starts), once it has ended."""
    while True:
        for name, process in processes.items():
            if process.poll() is not None:
                raise SmokeFailed(f"the {name} process exited with status {process.returncode}")
        with urllib.request.urlopen(f"{base}/tasks?limit=50", timeout=5) as resp:
            tasks = json.load(resp)["tasks"]
        for task in tasks:
            if task["name"] == "demo.count" and task["task_id"] not in ours and task["finished_at"] is not None:
                return str(task["task_id"])
        if time.monotonic() > deadline:
            raise SmokeFailed(f"no demo task sent by beat ended in time; recent tasks: {tasks}")
        time.sleep(0.2)


def read_events(base: str, events_path: str, deadline: float) -> list[str]:
    """The names of a task's events, from before its first to its end."""
    # Cursor 0 precedes every event: the stream replays the task's whole life, then ends.
    events_url = f"{base}{events_path}?last_event_id=0"
    states: list[str] = []
    with urllib.request.urlopen(events_url, timeout=max(deadline - time.monotonic(), 1)) as stream:
        for raw in stream:  # a ": ping" comment comes at least every 15 s
            if time.monotonic() > deadline:
                raise SmokeFailed(f"the task did not end in time; its events so far: {states}")
            line = raw.decode().rstrip("\r\n")
            if line.startswith("event: "):
                states.append(line.removeprefix("event: "))
    if not states:
        raise SmokeFailed("the task's event stream ended without an event")
    return states


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    sys.exit(main(Path(sys.argv[1])))
