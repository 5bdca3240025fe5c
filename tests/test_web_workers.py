"""`progress-sse web --workers 2`: two real processes on one port (SO_REUSEPORT),
real Redis, events from the real Publisher.

Which process serves a stream is seen in Redis: each process has one hub
connection (named `progress-sse-hub.<prefix>`), and a task's channel is
subscribed by a process while one of its streams watches that task. So with
every stream on one task, `PUBSUB NUMSUB` of its channel is the number of
processes serving those streams.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import IO

import aiohttp
import pytest
import redis

from progress_sse.cli.embedded import free_port, listening
from progress_sse.config import Settings
from progress_sse.connections import hub_client_name
from progress_sse.events import State, make_event
from progress_sse.keys import Keys
from progress_sse.worker.publisher import Publisher

from .conftest import worker_env
from .sse import SSEReader
from .test_dev import alive

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SO_REUSEPORT")]

CONSOLE_SCRIPT = str(Path(sys.executable).with_name("progress-sse"))
# Opened one at a time until both processes serve one: with the kernel's hash over
# two sockets, 40 streams all on one process would happen once in 2**39 runs.
MAX_STREAMS = 40
TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=30)
READY = re.compile(r"^web\.(\d) +\| progress-sse web process (\d)/2 listening \(pid (\d+)\)$")


class Output:
    """The group's merged stdout and stderr, line by line, read by a thread so the
    parent never blocks on a full pipe; waits are for a line, with a timeout."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        assert process.stdout is not None
        threading.Thread(target=self._read, args=(process.stdout,), daemon=True).start()
        self._ended = False

    def _read(self, stream: IO[str]) -> None:
        with stream:
            for line in stream:
                self._queue.put(line)
        self._queue.put(None)

    def _next(self, timeout: float, waiting_for: str) -> str | None:
        """The next line (kept in `lines`), or None at the end of the output."""
        if self._ended:
            return None
        try:
            line = self._queue.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no {waiting_for} after {timeout} s:\n{self.text}") from None
        if line is None:
            self._ended = True
            return None
        self.lines.append(line.rstrip("\n"))
        return self.lines[-1]

    def wait_for(self, predicate: Callable[[str], bool], timeout: float = 60) -> str:
        while (line := self._next(timeout, "such line")) is not None:
            if predicate(line):
                return line
        raise AssertionError(f"the output ended without such a line:\n{self.text}")

    def rest(self, timeout: float = 30) -> str:
        """Everything, once the process has closed its output."""
        while self._next(timeout, "end of the output") is not None:
            pass
        return self.text

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


class Group:
    def __init__(self, process: subprocess.Popen[str], port: int, settings: Settings) -> None:
        self.process = process
        self.port = port
        self.settings = settings
        self.keys = Keys(settings.key_prefix)
        self.output = Output(process)
        self.children: dict[int, int] = {}  # process number: pid

    def wait_serving(self, host: str = "127.0.0.1") -> None:
        self.output.wait_for(lambda line: line.startswith(f"progress-sse web on http://{host}:{self.port} "))
        for line in self.output.lines:
            if match := READY.match(line):
                assert match[1] == match[2]
                self.children[int(match[1])] = int(match[3])
        assert sorted(self.children) == [1, 2], "both said they listen before the group did:\n" + self.output.text

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def stop(self) -> tuple[int, str]:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        status = self.process.wait(timeout=30)  # the platform's grace between SIGTERM and SIGKILL
        return status, self.output.rest()


def start_group(settings: Settings, port: int, host: str = "127.0.0.1", extra: dict[str, str] | None = None) -> Group:
    env = {**worker_env(settings), "PORT": str(port), "HOST": host, **(extra or {})}
    process = subprocess.Popen(
        [CONSOLE_SCRIPT, "web", "--workers", "2"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    return Group(process, port, settings)


@pytest.fixture
def own(settings: Settings, redis_client: redis.Redis) -> Iterator[Settings]:
    """Settings on a key prefix of this test's own: its hub connections and channels
    are only this group's. Its keys are deleted afterwards."""
    prefix = f"{settings.key_prefix}-ww{uuid.uuid4().hex[:6]}"
    yield settings.with_(key_prefix=prefix)
    found = list(redis_client.scan_iter(match=f"{prefix}:*", count=1000))
    if found:
        redis_client.delete(*found)


@pytest.fixture
def group(own: Settings) -> Iterator[Group]:
    running = start_group(own, free_port())
    try:
        running.wait_serving()
        yield running
    finally:
        if running.process.poll() is None:
            running.process.kill()
            running.process.wait(timeout=30)


@pytest.fixture
def publisher(own: Settings) -> Iterator[Publisher]:
    publisher = Publisher.from_settings(own)
    yield publisher
    publisher.client.close()


def hub_connections(redis_client: redis.Redis, settings: Settings) -> int:
    name = hub_client_name(settings.key_prefix)
    return sum(1 for client in redis_client.client_list() if client["name"] == name)


def subscribers(redis_client: redis.Redis, keys: Keys, task_id: str) -> int:
    [(_, count)] = redis_client.pubsub_numsub(keys.channel(task_id))
    return int(count)


async def streams_on_both(
    stack: AsyncExitStack,
    group: Group,
    redis_client: redis.Redis,
    task_id: str,
    at_least: int = 4,
) -> list[SSEReader]:
    """Streams of `task_id` from the start of its log, opened one at a time (each a
    new connection) until there are `at_least` and both processes serve some. Each
    has read the task's first event: its process has subscribed the channel."""
    readers: list[SSEReader] = []
    while len(readers) < at_least or subscribers(redis_client, group.keys, task_id) < 2:
        assert len(readers) < MAX_STREAMS, f"{MAX_STREAMS} streams and only one process serves them"
        # A session each: a new connection each, which the kernel hashes to a process.
        session = await stack.enter_async_context(aiohttp.ClientSession(timeout=TIMEOUT))
        response = await stack.enter_async_context(session.get(group.url(f"/tasks/{task_id}/events?last_event_id=0")))
        assert response.status == 200
        reader = SSEReader(response)
        first = await reader.next_event()
        assert first is not None and first.event == "queued", first
        readers.append(reader)
    assert subscribers(redis_client, group.keys, task_id) == 2
    return readers


async def test_streams_on_both_processes_get_every_event_over_two_subscriptions(
    group: Group, publisher: Publisher, redis_client: redis.Redis
) -> None:
    task_id = f"ww-{uuid.uuid4().hex}"
    queued = publisher.publish(make_event(task_id, "demo.count", State.QUEUED))
    assert queued is not None
    async with AsyncExitStack() as stack:
        readers = await streams_on_both(stack, group, redis_client, task_id)
        assert hub_connections(redis_client, group.settings) == 2, "one pub/sub connection per process"
        published = [str(queued)]
        events = [
            make_event(task_id, "demo.count", State.STARTED),
            *(make_event(task_id, "demo.count", State.PROGRESS, current=i, total=5) for i in range(1, 6)),
            make_event(task_id, "demo.count", State.SUCCESS, current=5, total=5),
        ]
        for event in events:
            cursor = publisher.publish(event)
            assert cursor is not None
            published.append(str(cursor))
        for reader in readers:
            rest = await reader.rest()
            assert [str(e.id) for e in rest] == published[1:]
            assert [e.event for e in rest] == ["started", *["progress"] * 5, "success"]
            assert [e.payload["current"] for e in rest[1:6]] == [1, 2, 3, 4, 5]
        assert hub_connections(redis_client, group.settings) == 2
    status, output = group.stop()
    assert status == 0, output
    assert output.count("progress-sse web on http://") == 1, output


@pytest.mark.parametrize("everyone", [False, True], ids=["to-the-parent", "to-every-process"])
async def test_sigterm_ends_every_stream_and_every_process_cleanly(
    group: Group, publisher: Publisher, redis_client: redis.Redis, everyone: bool
) -> None:
    """SIGTERM to the parent, or to every process at once as platforms send it (then
    each process gets two: the platform's and the parent's)."""
    task_id = f"ww-{uuid.uuid4().hex}"
    publisher.publish(make_event(task_id, "demo.count", State.QUEUED))
    async with AsyncExitStack() as stack:
        readers = await streams_on_both(stack, group, redis_client, task_id)
        publisher.publish(make_event(task_id, "demo.count", State.STARTED))
        for reader in readers:
            started = await reader.next_event()
            assert started is not None and started.event == "started"
        for pid in [group.process.pid, *(group.children.values() if everyone else [])]:
            os.kill(pid, signal.SIGTERM)
        for reader in readers:
            # The task never ends: the stream ends because the server stops, cleanly
            # (a cut connection raises here instead of reading the end).
            assert await reader.rest() == []
    status = group.process.wait(timeout=30)
    output = group.output.rest()
    assert status == 0, output
    assert "when stopped" not in output, output
    assert not any(alive(pid) for pid in group.children.values()), output
    assert not listening("127.0.0.1", group.port)
    assert hub_connections(redis_client, group.settings) == 0


def test_a_process_that_dies_stops_the_group_which_says_so(own: Settings) -> None:
    """Here on every interface with no key: the warning comes once, from the parent."""
    port = free_port()
    running = start_group(own, port, host="0.0.0.0")
    try:
        running.wait_serving(host="0.0.0.0")
        os.kill(running.children[1], signal.SIGKILL)
        status = running.process.wait(timeout=30)
        output = running.output.rest()
    finally:
        if running.process.poll() is None:
            running.process.kill()
            running.process.wait(timeout=30)
    assert status == 1, output
    assert "progress-sse web: the web.1 was killed by SIGKILL. Its last lines:" in output
    assert not alive(running.children[2]), "the other process was stopped"
    assert not listening("127.0.0.1", port)
    assert output.count("NO ACCESS CONTROL") == 1, output


def test_a_port_in_use_is_refused_before_any_process_starts(own: Settings) -> None:
    """Even by a listener with SO_REUSEPORT, as another group's: the processes would
    otherwise share the port with it without a word."""
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        running = start_group(own, port)
        try:
            status = running.process.wait(timeout=30)
            output = running.output.rest()
        finally:
            if running.process.poll() is None:
                running.process.kill()  # its processes get SIGTERM from the kernel (PR_SET_PDEATHSIG)
                running.process.wait(timeout=30)
    assert status == 1, output
    assert f"progress-sse: cannot listen on 127.0.0.1:{port}: Address already in use" in output
    assert "web.1 |" not in output


def test_one_process_unless_told(own: Settings) -> None:
    """WEB_CONCURRENCY defaults to 1 and names a whole number of at least 1."""
    assert Settings.from_env({}).web_workers == 1
    assert Settings.from_env({"WEB_CONCURRENCY": "3"}).web_workers == 3
    process = subprocess.run(
        [CONSOLE_SCRIPT, "web"],
        env={**worker_env(own), "WEB_CONCURRENCY": "0"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert process.returncode == 2
    assert "WEB_CONCURRENCY='0' is not valid: expected a whole number of at least 1" in process.stderr


def test_dev_runs_one_web_process_whatever_web_concurrency_says(own: Settings, tmp_path: Path) -> None:
    """A platform's WEB_CONCURRENCY left in a laptop's environment: dev still runs
    one web process, with its own lines, not a group of them."""
    port = free_port()
    env = {**worker_env(own.with_(queue=f"{own.key_prefix}-dev")), "PORT": str(port), "WEB_CONCURRENCY": "2"}
    process = subprocess.Popen(
        [sys.executable, "-m", "progress_sse", "dev", "--concurrency=1"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output = Output(process)
    try:
        output.wait_for(lambda line: "progress-sse dev: the page is at" in line)
        process.send_signal(signal.SIGINT)
        status = process.wait(timeout=60)
        text = output.rest()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)
    assert status == 0, text
    assert f"web    | progress-sse web on http://127.0.0.1:{port} (Redis {own.redis_url})\n" in text + "\n", text
    assert "web.1" not in text and "processes" not in text
