"""`progress-sse dev` supervises what it starts: real processes, real signals.

A child that dies (the worker on an import error, a Redis that cannot bind) ends
the run with its name and last lines, and nothing is left running; Ctrl-C stops
every process it started.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from progress_sse.cli import supervisor
from progress_sse.cli.embedded import EmbeddedRedis, answers, free_port, listening
from progress_sse.config import Settings

from .conftest import worker_env

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("redis_client")]  # its clean-up at the end

PYTHON = [sys.executable, "-c"]


def descendants(pid: int) -> set[int]:
    """Every live process below `pid`, from /proc (Linux)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def own(settings: Settings) -> Settings:
    """A key prefix and queue of its own: the worker /healthz counts is this dev's."""
    return settings.with_(key_prefix=f"{settings.key_prefix}-dev", queue=f"{settings.queue}-dev")


def dev(settings: Settings, port: int, env_extra: dict[str, str], tmp_path: Path) -> subprocess.Popen[str]:
    env = {**worker_env(settings), **env_extra, "PORT": str(port)}
    env.pop("HOST")  # dev's own default: loopback
    return subprocess.Popen(
        [sys.executable, "-m", "progress_sse", "dev", "--concurrency=1"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def test_dev_names_a_worker_that_cannot_start_and_stops_the_web(settings: Settings, tmp_path: Path) -> None:
    # kombu's Redis transport imports `packaging`; a broken one is what a fresh
    # install without it looked like: the worker dies at start.
    shadow = tmp_path / "shadow" / "packaging"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text('raise ImportError("No module named packaging (shadowed)")\n')
    port = free_port()
    run = dev(
        own(settings),
        port,
        {"PYTHONPATH": str(tmp_path / "shadow")},
        tmp_path,
    )
    out, err = run.communicate(timeout=90)
    assert run.returncode == 1, (out, err)
    assert "progress-sse dev: the worker exited with status 1. Its last lines:" in err
    assert "ImportError: No module named packaging (shadowed)" in err, err
    assert "Stopped the others." in err
    assert not listening("127.0.0.1", port), "the web process must not be left serving"


@pytest.fixture
def running_dev(settings: Settings, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], int, set[int]]]:
    """`progress-sse dev` once its web answers and counts its worker; the pids it
    started. Whatever happens, every process of the tree is gone afterwards."""
    port = free_port()
    run = dev(own(settings), port, {}, tmp_path)
    tree: set[int] = set()

    def worker_counted() -> bool:
        if run.poll() is not None:
            raise AssertionError(f"dev exited early: {run.communicate()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as resp:
                return bool(json.load(resp)["workers"] >= 1)
        except OSError:
            return False

    try:
        wait_for(worker_counted, 60, "the web to answer and count the worker")
        tree = descendants(run.pid)
        assert len(tree) >= 3, "web, worker and the worker's pool process"
        yield run, port, tree
    finally:
        for pid in [run.pid, *tree]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        run.communicate(timeout=30)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGHUP])
def test_dev_stops_everything_on_ctrl_c_or_a_closed_terminal(
    running_dev: tuple[subprocess.Popen[str], int, set[int]], signum: signal.Signals
) -> None:
    run, port, tree = running_dev
    run.send_signal(signum)
    out, err = run.communicate(timeout=60)
    assert run.returncode == 0, (out, err)
    assert f"the page is at http://localhost:{port}/" in out
    # No HOST given: dev listens on loopback only, not on every interface as `web` does.
    assert out.index(f"web    | progress-sse web on http://127.0.0.1:{port} ") < out.index("the page is at"), (
        "the URL is printed once the web listens"
    )
    assert "worker | " in out and " ready." in out
    assert [pid for pid in tree if alive(pid)] == []
    assert not listening("127.0.0.1", port)


def test_dev_killed_outright_takes_its_processes_with_it(
    running_dev: tuple[subprocess.Popen[str], int, set[int]],
) -> None:
    run, port, tree = running_dev
    children = {pid for pid in tree if parent_of(pid) == run.pid}
    run.kill()  # no chance to stop anything: the kernel tells each child (PR_SET_PDEATHSIG)
    run.communicate(timeout=30)
    wait_for(lambda: not any(alive(pid) for pid in children), 30, "web and worker to exit")
    wait_for(lambda: not listening("127.0.0.1", port), 30, "the port to close")


def test_a_redis_that_cannot_start_is_named_with_its_own_words(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        redis = EmbeddedRedis(tmp_path / "redis", port=port)
        web = supervisor.Child("web", [*PYTHON, "print('never started')"])
        err = io.StringIO()
        status = supervisor.run(
            [supervisor.Child("redis", redis.command(logfile=""), ready=redis.answers), web],
            out=io.StringIO(),
            err=err,
        )
    assert status == 1
    report = err.getvalue()
    assert report.startswith("progress-sse dev: the redis exited with status 1. Its last lines:"), report
    assert "Address already in use" in report
    assert web.process is None, "nothing starts after a child that never got ready"


def test_a_child_killed_by_a_signal_stops_the_others(tmp_path: Path) -> None:
    marker = tmp_path / "web.pid"
    web = supervisor.Child(
        "web",
        [
            *PYTHON,
            f"import os, time; open({str(marker)!r}, 'w').write(str(os.getpid()))\n"
            "print('serving', flush=True); time.sleep(600)",
        ],
    )
    worker = supervisor.Child(
        "worker",
        [
            *PYTHON,
            f"import os, signal, time\nwhile not os.path.exists({str(marker)!r}): time.sleep(0.01)\n"
            "print('about to die', flush=True); os.kill(os.getpid(), signal.SIGKILL)",
        ],
    )
    out, err = io.StringIO(), io.StringIO()
    assert supervisor.run([web, worker], out=out, err=err) == 1
    assert "the worker was killed by SIGKILL. Its last lines:\n    about to die\n" in err.getvalue()
    assert "web    | serving\n" in out.getvalue()
    assert web.process is not None and web.process.returncode == -signal.SIGTERM
    assert not alive(int(marker.read_text()))


def test_embedded_redis_removes_the_directory_it_made() -> None:
    redis = EmbeddedRedis()
    with redis as url:
        assert redis.workdir.is_dir()
        assert answers("127.0.0.1", redis.port), url
    assert not redis.workdir.exists()
    assert not answers("127.0.0.1", redis.port)


def test_embedded_redis_keeps_a_directory_it_was_given(tmp_path: Path) -> None:
    with EmbeddedRedis(tmp_path / "given"):
        pass
    assert (tmp_path / "given").is_dir(), "the caller owns it (the test suite's tmp_path)"


def test_a_huge_line_or_a_reader_that_went_away_does_not_end_the_run_early() -> None:
    """A line longer than any buffer is shown in pieces, and a stdout that closes
    (`dev | head`) stops the copying only: the run still supervises and reports."""
    code = "import sys; sys.stdout.write('x' * 200_000 + '\\nlast words\\n'); sys.stdout.flush(); sys.exit(3)"
    loud = supervisor.Child("worker", [*PYTHON, code])
    out, err = io.StringIO(), io.StringIO()
    assert supervisor.run([loud], out=out, err=err) == 1
    assert out.getvalue().count("worker | ") >= 4, "in pieces of at most MAX_LINE"
    assert "".join(line.removeprefix("worker | ") for line in out.getvalue().splitlines()).count("x") == 200_000
    assert "the worker exited with status 3. Its last lines:" in err.getvalue()
    assert err.getvalue().rstrip().endswith("last words\nStopped the others.")

    closed = io.StringIO()
    closed.close()
    err = io.StringIO()
    quiet = supervisor.Child("worker", [*PYTHON, code])
    assert supervisor.run([quiet], out=closed, err=err) == 1
    assert "last words" in err.getvalue()
