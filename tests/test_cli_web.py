"""`progress-sse web` as a user runs it: the console script, from their app's directory.

A real process on a free port, its allow-list imported from the current
directory (as `celery -A` does), long stream URLs accepted, and a bad allow-list
refused before the process says it is serving.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from progress_sse.cli.embedded import free_port
from progress_sse.config import Settings
from progress_sse.web import MAX_REQUEST_LINE

from .conftest import worker_env

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("redis_client")]

CONSOLE_SCRIPT = str(Path(sys.executable).with_name("progress-sse"))
LONGEST_ID = "a" + "b" * 199  # keys.is_task_id admits up to 200 characters


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    """A user's project: a package that is importable only from its own directory."""
    package = tmp_path / "myapp"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "progress.py").write_text(
        textwrap.dedent(
            """
            from progress_sse.allowlist import AllowedTask, AllowList, integer

            TASKS = AllowList([AllowedTask("myapp.hello", {"times": (integer(1, 3), 1)})])
            """
        )
    )
    return tmp_path


def web(
    settings: Settings, cwd: Path, port: int, allowlist: str, host: str = "127.0.0.1", **changes: Any
) -> subprocess.Popen[str]:
    env = {
        **worker_env(settings.with_(queue=f"{settings.queue}-web", **changes)),
        "PORT": str(port),
        "HOST": host,
        "PROGRESS_SSE_ALLOWLIST": allowlist,
    }
    env.pop("PYTHONPATH", None)  # only the current directory may make myapp importable
    return subprocess.Popen(
        [CONSOLE_SCRIPT, "web"], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


@pytest.fixture
def serving(settings: Settings, app_dir: Path) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    port = free_port()
    process = web(settings, app_dir, port, "myapp.progress:TASKS")
    try:
        assert process.stdout is not None
        first = process.stdout.readline()  # blocks until the line, or EOF if it dies
        assert first.startswith(f"progress-sse web on http://127.0.0.1:{port}"), first + process.stdout.read()
        yield f"http://127.0.0.1:{port}", process
    finally:
        process.terminate()
        process.communicate(timeout=15)


def test_web_imports_its_allowlist_from_the_current_directory(serving: tuple[str, subprocess.Popen[str]]) -> None:
    base, _ = serving
    with urllib.request.urlopen(base + "/", timeout=10) as resp:
        assert 'data-task-name="myapp.hello"' in resp.read().decode()
    request = urllib.request.Request(
        base + "/tasks",
        data=json.dumps({"name": "myapp.hello", "kwargs": {"times": 2}}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as resp:
        assert resp.status == 202
        assert json.load(resp)["name"] == "myapp.hello"


def test_a_stream_of_100_tasks_with_the_longest_ids_is_served(serving: tuple[str, subprocess.Popen[str]]) -> None:
    base, process = serving
    ids = [f"{i:03d}{LONGEST_ID[3:]}" for i in range(100)]
    # The page's form: every id as task= and as fresh=, about 41 KB of request line.
    url = base + "/events?" + "&".join(f"task={i}" for i in ids) + "&" + "&".join(f"fresh={i}" for i in ids)
    assert 40_000 < len(url) < MAX_REQUEST_LINE
    with urllib.request.urlopen(url, timeout=10) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        body = resp.read().decode()  # none of them exists: 100 `unknown` frames, then the end
    assert body.count("event: unknown") == 100
    process.terminate()
    output = process.communicate(timeout=15)[0]
    assert process.returncode == 0, output
    assert "no access control" not in output.lower(), "loopback needs no warning"
    # aiohttp drops handler arguments it does not know with this warning, and the limits with them.
    assert "Failed to create request handler" not in output


def test_a_bad_allowlist_stops_web_before_it_says_it_serves(settings: Settings, app_dir: Path) -> None:
    process = web(settings, app_dir, free_port(), "myapp.progress:NOPE")
    output = process.communicate(timeout=30)[0]
    assert process.returncode == 2, output
    assert "PROGRESS_SSE_ALLOWLIST='myapp.progress:NOPE' cannot be loaded" in output
    assert "progress-sse web on" not in output


def test_listening_beyond_loopback_with_no_access_control_says_so_loudly(settings: Settings, app_dir: Path) -> None:
    port = free_port()
    process = web(settings, app_dir, port, "myapp.progress:TASKS", host="0.0.0.0")
    try:
        assert process.stdout is not None
        lines = [process.stdout.readline() for _ in range(2)]  # the serving line, then the warning
    finally:
        process.terminate()
        output = "".join(lines) + process.communicate(timeout=15)[0]
    assert lines[0].startswith(f"progress-sse web on http://0.0.0.0:{port}"), output
    assert (
        "WARNING" in lines[1]
        and "listens on http://0.0.0.0:" in lines[1]
        and "NO ACCESS CONTROL" in lines[1]
        and "PROGRESS_SSE_ALLOWED_HOSTS" in lines[1]
        and "PROGRESS_SSE_SECRET" in lines[1]
    )


def test_with_a_key_it_says_tokens_are_required_and_warns_of_nothing(settings: Settings, app_dir: Path) -> None:
    """The same 0.0.0.0 as above, but with a secret: every route but /healthz and the
    page needs a token, and the access log never shows one."""
    from progress_sse.tokens import watch_token

    secret = "the-cli-web-test-secret-long-enough-for-hs256"
    port = free_port()
    process = web(settings, app_dir, port, "myapp.progress:TASKS", host="0.0.0.0", secret=secret)
    try:
        assert process.stdout is not None
        lines = [process.stdout.readline() for _ in range(2)]
        assert "access tokens required" in lines[1], lines
        token = watch_token(["no-such-task"], key=secret)
        url = f"http://127.0.0.1:{port}/tasks/no-such-task?token={token}"
        with urllib.request.urlopen(url, timeout=10) as resp:
            raise AssertionError(f"an unknown task answered {resp.status}")
    except urllib.error.HTTPError as exc:
        assert exc.code == 404, "the token was taken: the task is simply not there"
    finally:
        process.terminate()
        output = "".join(lines) + process.communicate(timeout=15)[0]
    assert "NO ACCESS CONTROL" not in output
    assert "GET /tasks/no-such-task?token=*** HTTP/1.1" in output, output
    assert token not in output


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_the_web_runs_on_the_event_loop_it_is_told(settings: Settings, app_dir: Path, loop: str) -> None:
    port = free_port()
    process = web(settings, app_dir, port, "myapp.progress:TASKS", event_loop=loop)
    try:
        assert process.stdout is not None
        first = process.stdout.readline()
        assert first.startswith(f"progress-sse web on http://127.0.0.1:{port}"), first
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as resp:
            assert json.load(resp)["loop"] == loop
        url = f"http://127.0.0.1:{port}/tasks/{LONGEST_ID}/events"
        with pytest.raises(urllib.error.HTTPError) as unknown:  # a stream's whole path, on that loop
            urllib.request.urlopen(url, timeout=10)
        unknown.value.close()
        assert unknown.value.code == 404
    finally:
        process.terminate()
        output = process.communicate(timeout=15)[0]
    assert process.returncode == 0, output
