"""Request limits and correct HTTP, probed with raw sockets against a real web.

`progress-sse web` in a subprocess, with small timeouts: half-sent headers, a
declared body never sent and idle keep-alive connections are closed; malformed
requests get `400` JSON and one WARNING line; at a low `ulimit -n`, filled with
raw connections, `/healthz` still answers and the log has one line per incident.
Every wait is for a byte or the end of a connection, bounded by WAIT.
"""

from __future__ import annotations

import asyncio
import json
import re
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp import web

from progress_sse.cli.embedded import free_port
from progress_sse.config import Settings
from progress_sse.web import RUN_OPTIONS, create_app
from progress_sse.web.limits import MIN_SPARE_CONNECTIONS, OWN_FDS, REDIS_POOL_FDS, default_max_streams, max_connections
from progress_sse.web.server import Runner

from .conftest import worker_env

pytestmark = [pytest.mark.fault, pytest.mark.usefixtures("redis_client")]

# The bound on every wait for a response or for the server to close; the limits
# under test are far below it, and aiohttp's own (keep-alive 75 s, lingering 10 s)
# are not.
WAIT = 8.0
# Small limits, so each test is quick; the keep-alive stays above WAIT unless a
# test is about it, so that it cannot be what closes a connection.
SMALL = {
    "PROGRESS_SSE_HEADER_TIMEOUT": "0.5",
    "PROGRESS_SSE_BODY_TIMEOUT": "0.5",
    "PROGRESS_SSE_KEEPALIVE_TIMEOUT": "60",
}
HOST = b"Host: 127.0.0.1\r\n"
# A log line as `progress-sse web` writes them: anything else (a traceback) is not one.
LOG_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) \S+: ")


@dataclass
class Web:
    process: subprocess.Popen[str]
    port: int

    def stop(self) -> str:
        """Stop it; its whole output."""
        if self.process.poll() is None:
            self.process.terminate()
        out, _ = self.process.communicate(timeout=15)
        return out


@pytest.fixture
def start_web(settings: Settings) -> Iterator[Callable[..., Web]]:
    """`start_web(nofile=None, **env)`: `progress-sse web` on a free port, serving."""
    with ExitStack() as stack:

        def start(nofile: int | None = None, **env: str) -> Web:
            port = free_port()
            # Its own queue, which no worker consumes: a task it starts stays queued.
            serving = settings.with_(queue=f"{settings.queue}-limits", port=port, host="127.0.0.1")
            environ = {**worker_env(serving), **SMALL, **env}
            process = subprocess.Popen(
                [sys.executable, "-m", "progress_sse", "web"],
                env={**environ, "PYTHONUNBUFFERED": "1"},
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                preexec_fn=None if nofile is None else lambda: _limit_fds(nofile),
            )
            web_ = Web(process, port)
            stack.callback(web_.stop)
            assert process.stdout is not None
            first = process.stdout.readline()  # blocks until the line, or EOF if it dies
            assert first.startswith("progress-sse web on"), first + web_.stop()
            return web_

        yield start


def _limit_fds(nofile: int) -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))


def exchange(port: int, *parts: bytes) -> bytes:
    """Send `parts`, then read until the server closes; fail if it has not within
    WAIT. A connection the server closed unread (reset) gives what came before."""
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as sock:
        try:
            for part in parts:
                sock.sendall(part)
        except (BrokenPipeError, ConnectionResetError):
            pass  # closed before all was sent: its answer (if any) is still read below
        return read_to_close(sock)


def read_to_close(sock: socket.socket) -> bytes:
    sock.settimeout(WAIT)
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except TimeoutError:
        raise AssertionError(f"the connection is still open after {WAIT} s; got {received!r}") from None
    except ConnectionResetError:
        pass  # closed with our bytes unread: the end, all the same
    return received


def read_response(sock: socket.socket) -> Response:
    """One whole response (with a Content-Length), leaving the connection open."""
    sock.settimeout(WAIT)
    received = b""
    while True:
        head, found, body = received.partition(b"\r\n\r\n")
        if found:
            length = int(re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)[1])  # type: ignore[index]
            if len(body) >= length:
                return parse(received)
        chunk = sock.recv(65536)
        assert chunk, f"the server closed the connection; got {received!r}"
        received += chunk


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        assert self.headers["content-type"].startswith("application/json"), self.headers
        return json.loads(self.body)


def parse(raw: bytes) -> Response:
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    assert re.fullmatch(r"HTTP/1\.[01] \d{3} .*", status_line), raw
    assert len(body) == int(headers["content-length"]), raw
    return Response(int(status_line.split()[1]), headers, body)


def warnings_in(log: str) -> list[str]:
    return [line for line in log.splitlines() if " WARNING " in line]


def assert_only_log_lines(log: str) -> None:
    """Nothing but whole log lines (and the start-up line): no traceback, no aiohttp text."""
    for line in log.splitlines():
        assert LOG_LINE.match(line) or line.startswith("progress-sse web"), f"not a log line: {line!r}\n{log}"
    assert "Traceback" not in log and " ERROR " not in log, log


# -- timeouts ---------------------------------------------------------------------------------


def test_half_sent_headers_get_408_and_the_connection_ends(start_web: Callable[..., Web]) -> None:
    web_ = start_web()
    response = parse(exchange(web_.port, b"GET /healthz HTTP/1.1\r\n" + HOST + b"X-Still-Typing: y"))
    assert response.status == 408
    assert "PROGRESS_SSE_HEADER_TIMEOUT" in response.json["error"]
    assert response.headers["connection"] == "close"
    assert_only_log_lines(web_.stop())


def test_half_sent_headers_after_a_request_on_the_connection_get_408(start_web: Callable[..., Web]) -> None:
    web_ = start_web()
    with socket.create_connection(("127.0.0.1", web_.port), timeout=WAIT) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\n" + HOST + b"\r\n")
        assert read_response(sock).status == 200
        sock.sendall(b"GET /healthz HTTP/1.1\r\n" + HOST)
        response = parse(read_to_close(sock))
    assert response.status == 408


def test_headers_trickled_in_still_end_at_the_header_timeout(start_web: Callable[..., Web]) -> None:
    """The clock runs from the first byte: more bytes do not restart it."""
    web_ = start_web(PROGRESS_SSE_HEADER_TIMEOUT="1")
    with socket.create_connection(("127.0.0.1", web_.port), timeout=WAIT) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\n")
        sock.settimeout(0.2)
        received = b""
        for i in range(int(WAIT / 0.2)):  # a header line every 0.2 s, until the server answers
            try:
                received = sock.recv(65536)
            except TimeoutError:
                sock.sendall(f"X-Line-{i}: y\r\n".encode())
                continue
            break
        assert received.startswith(b"HTTP/1.1 408 "), received
        received += read_to_close(sock)
    assert parse(received).status == 408


def test_a_declared_body_never_sent_gets_408_and_the_connection_ends(start_web: Callable[..., Web]) -> None:
    web_ = start_web()
    request = b"POST /tasks HTTP/1.1\r\n" + HOST + b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"
    response = parse(exchange(web_.port, request))
    assert response.status == 408
    assert "PROGRESS_SSE_BODY_TIMEOUT" in response.json["error"]
    assert_only_log_lines(web_.stop())


def test_a_body_that_arrives_is_read_as_before(start_web: Callable[..., Web]) -> None:
    web_ = start_web()
    body = json.dumps({"name": "no.such.task"}).encode()
    head = b"POST /tasks HTTP/1.1\r\n" + HOST + b"Content-Type: application/json\r\nConnection: close\r\n"
    response = parse(exchange(web_.port, head + b"Content-Length: %d\r\n\r\n" % len(body), body))
    assert response.status == 422  # the allow-list's answer: the body was read whole
    assert "no.such.task" in response.json["error"]


def test_an_idle_keepalive_connection_is_closed(start_web: Callable[..., Web]) -> None:
    web_ = start_web(PROGRESS_SSE_KEEPALIVE_TIMEOUT="0.5")
    with socket.create_connection(("127.0.0.1", web_.port), timeout=WAIT) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\n" + HOST + b"\r\n")
        raw = read_to_close(sock)  # the response, then the close: nothing is sent after it
    response = parse(raw)
    assert response.status == 200 and response.headers.get("connection") != "close"


def test_a_connection_that_never_sends_is_closed_at_the_keepalive_timeout(start_web: Callable[..., Web]) -> None:
    web_ = start_web(PROGRESS_SSE_KEEPALIVE_TIMEOUT="0.5")
    assert exchange(web_.port) == b""


@pytest.mark.parametrize("runner_class", [web.AppRunner, Runner], ids=["AppRunner", "Runner"])
async def test_the_keepalive_setting_applies_through_an_app_runner(
    settings: Settings, runner_class: type[web.AppRunner]
) -> None:
    """For apps served by aiohttp's own runner too (the README's own-app snippet):
    it comes with the app (handler_args), not with RUN_OPTIONS."""
    runner = runner_class(create_app(settings.with_(keepalive_timeout=0.5)), **RUN_OPTIONS)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /healthz HTTP/1.1\r\n" + HOST + b"\r\n")
        raw = await asyncio.wait_for(reader.read(), WAIT)  # to EOF: the server closes it
        writer.close()
        assert parse(raw).status == 200
    finally:
        await runner.cleanup()


# -- malformed requests -----------------------------------------------------------------------

MALFORMED = {
    "bad request line": [b"GET / HTTP/1.1 x\r\n" + HOST + b"\r\n"],
    "not HTTP (TLS)": [b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n"],
    "request line too long": [b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n" + HOST + b"\r\n"],
    "header too long": [b"GET /healthz HTTP/1.1\r\n" + HOST + b"X-Big: " + b"a" * 9_000 + b"\r\n\r\n"],
    "header without colon": [b"GET /healthz HTTP/1.1\r\n" + HOST + b"No colon here\r\n\r\n"],
    "bad content-length": [b"POST /tasks HTTP/1.1\r\n" + HOST + b"Content-Length: ten\r\n\r\n"],
    "bad chunk size": [b"POST /tasks HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n"],
    # The headers are read and the handler is reading the body when the bad chunk comes.
    "bad chunk after the headers": [
        b"POST /tasks HTTP/1.1\r\n" + HOST + b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"2\r\n{}\r\nzz\r\n",
    ],
}


def test_malformed_requests_get_400_json_and_one_warning_line_each(start_web: Callable[..., Web]) -> None:
    web_ = start_web()
    for name, parts in MALFORMED.items():
        response = parse(exchange(web_.port, *parts))
        assert response.status == 400, (name, response)
        assert response.json["error"], name
        assert response.headers["x-content-type-options"] == "nosniff", name
    log = web_.stop()
    assert_only_log_lines(log)
    malformed = [line for line in warnings_in(log) if "Malformed request" in line]
    assert len(malformed) == len(MALFORMED), log


def test_the_connection_limit_closes_idle_connections_for_new_ones(start_web: Callable[..., Web]) -> None:
    web_ = start_web(PROGRESS_SSE_MAX_CONNECTIONS="3")
    with ExitStack() as stack:
        idle = [stack.enter_context(socket.create_connection(("127.0.0.1", web_.port))) for _ in range(3)]
        # The fourth connection closes the oldest idle one, and is served.
        response = parse(exchange(web_.port, b"GET /healthz HTTP/1.1\r\n" + HOST + b"Connection: close\r\n\r\n"))
        assert response.status == 200
        assert read_to_close(idle[0]) == b""
    log = web_.stop()
    assert_only_log_lines(log)
    assert len([line for line in warnings_in(log) if "PROGRESS_SSE_MAX_CONNECTIONS=3" in line]) == 1, log


def test_beyond_the_connection_limit_with_none_idle_a_new_connection_is_closed(
    start_web: Callable[..., Web],
) -> None:
    """Closed at once, without a response: EventSource retries that, not an error status."""
    web_ = start_web(PROGRESS_SSE_MAX_CONNECTIONS="2", PROGRESS_SSE_MAX_STREAMS="10")
    task_id = queued_task(web_.port)
    with ExitStack() as stack:
        streams = [stack.enter_context(socket.create_connection(("127.0.0.1", web_.port))) for _ in range(2)]
        for stream in streams:  # open streams: requests under way, never idle
            stream.sendall(f"GET /tasks/{task_id}/events HTTP/1.1\r\n".encode() + HOST + b"\r\n")
            assert read_head(stream).startswith(b"HTTP/1.1 200 "), "the stream did not start"
        assert exchange(web_.port, b"GET /healthz HTTP/1.1\r\n" + HOST + b"\r\n") == b""
        streams[0].close()  # once the server has seen it go, there is room again
        assert wait_for_healthz(web_.port).status == 200
    log = web_.stop()
    assert_only_log_lines(log)
    assert len([line for line in warnings_in(log) if "PROGRESS_SSE_MAX_CONNECTIONS=2" in line]) == 1, log


def queued_task(port: int) -> str:
    """A task that stays queued: no worker consumes the web's queue in these tests."""
    body = json.dumps({"name": "demo.count", "kwargs": {"n": 1}}).encode()
    head = b"POST /tasks HTTP/1.1\r\n" + HOST + b"Content-Type: application/json\r\nConnection: close\r\n"
    response = parse(exchange(port, head + b"Content-Length: %d\r\n\r\n" % len(body) + body))
    assert response.status == 202, response
    return str(response.json["id"])


def read_head(sock: socket.socket) -> bytes:
    """A response's status line and headers, leaving the rest (a stream) unread."""
    sock.settimeout(WAIT)
    received = b""
    while b"\r\n\r\n" not in received:
        chunk = sock.recv(1)
        assert chunk, f"the server closed the connection; got {received!r}"
        received += chunk
    return received


def wait_for_healthz(port: int) -> Response:
    """/healthz once it is served; each refused attempt is a connection closed unanswered."""
    deadline = time.monotonic() + WAIT
    while True:
        raw = exchange(port, b"GET /healthz HTTP/1.1\r\n" + HOST + b"Connection: close\r\n\r\n")
        if raw:
            return parse(raw)
        assert time.monotonic() < deadline, f"/healthz refused for {WAIT} s"


# -- the file-descriptor limit ----------------------------------------------------------------

NOFILE = 128


def fill(port: int, count: int, stack: ExitStack) -> None:
    """`count` raw connections that send nothing (accepted or waiting in the backlog)."""
    for _ in range(count):
        stack.enter_context(socket.create_connection(("127.0.0.1", port), timeout=WAIT))


def healthz(port: int) -> Response:
    return parse(exchange(port, b"GET /healthz HTTP/1.1\r\n" + HOST + b"Connection: close\r\n\r\n"))


def test_at_the_fd_limit_healthz_answers_and_the_log_has_one_line(start_web: Callable[..., Web]) -> None:
    """A connection limit above the fd limit, so the process really runs out:
    asyncio pauses accepting, the idle connections are closed, and the ones
    waiting, /healthz last, are accepted."""
    web_ = start_web(nofile=NOFILE, PROGRESS_SSE_MAX_CONNECTIONS="100000", PROGRESS_SSE_LOOP="asyncio")
    assert healthz(web_.port).status == 200  # the Redis pool holds its connection from here on
    with ExitStack() as stack:
        fill(web_.port, 2 * NOFILE, stack)
        response = healthz(web_.port)
        assert response.status == 200, response
        assert response.json["redis"] == "ok"
    log = web_.stop()
    assert_only_log_lines(log)
    assert "out of system resource" not in log
    out_of_fds = [line for line in warnings_in(log) if "Out of file descriptors" in line]
    assert len(out_of_fds) == 1, log


def test_on_uvloop_at_the_fd_limit_the_burst_is_turned_away_and_the_web_serves_again(
    start_web: Callable[..., Web],
) -> None:
    """uvloop (libuv) at the fd limit accepts a waiting connection and closes it at
    once, where asyncio pauses: the burst's extra connections, /healthz among
    them, are turned away, and once it is over the process serves as before
    (docs/protocol.md, "Request limits")."""
    web_ = start_web(nofile=NOFILE, PROGRESS_SSE_MAX_CONNECTIONS="100000", PROGRESS_SSE_LOOP="uvloop")
    assert healthz(web_.port).json["loop"] == "uvloop"
    with ExitStack() as stack:
        fill(web_.port, 2 * NOFILE, stack)
    assert healthz(web_.port).status == 200
    assert_only_log_lines(web_.stop())


def test_below_the_fd_limit_by_default_healthz_answers(start_web: Callable[..., Web]) -> None:
    """The default connection limit keeps room for the process's own descriptors."""
    web_ = start_web(nofile=NOFILE)
    assert healthz(web_.port).status == 200
    with ExitStack() as stack:
        fill(web_.port, 2 * NOFILE, stack)
        assert healthz(web_.port).status == 200
    log = web_.stop()
    assert_only_log_lines(log)
    limit_lines = [line for line in warnings_in(log) if "PROGRESS_SSE_MAX_CONNECTIONS" in line]
    assert len(limit_lines) == 1, log
    assert len([line for line in warnings_in(log) if "Out of file descriptors" in line]) <= 1, log


def test_the_default_limits_leave_headroom_below_the_fd_limit() -> None:
    for fds in (64, 128, 256, 1024, 65_536):
        connections = max_connections(fds)
        streams = default_max_streams(fds)
        assert 0 < streams < connections < fds
        assert connections - streams >= MIN_SPARE_CONNECTIONS
    assert max_connections(1024) == 1024 - OWN_FDS - REDIS_POOL_FDS
    assert default_max_streams(connections=1000) == 900
