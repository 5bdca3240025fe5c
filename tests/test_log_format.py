"""`--log-format json` (PROGRESS_SSE_LOG_FORMAT): one JSON object per line, never a token.

First the parts on their own: the formatter, the request id, and the access
logger on a small aiohttp app of the test's own. Then the real commands:
`progress-sse web` (one process, and a group of two), whose every output line
must parse, and `progress-sse worker`, whose Celery logging turns JSON too.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from aiohttp.web_log import AccessLogger
from celery import Celery

from progress_sse.cli import commands as cli
from progress_sse.cli.embedded import free_port
from progress_sse.config import ConfigError, Settings
from progress_sse.json_logs import CeleryTaskJsonFormatter, JsonFormatter, fields
from progress_sse.tokens import watch_token
from progress_sse.web.access_log import TokenlessAccessLogger, without_tokens
from progress_sse.web.request_id import HEADER, echo_request_id
from progress_sse.web.request_id import of as request_id_of
from progress_sse.worker.celery_app import make_celery

from .conftest import worker_env

SECRET = "the-log-format-test-secret-long-enough-for-hs256"
GENERATED_ID = re.compile(r"[0-9a-f]{16}")
BASE_FIELDS = {"ts", "level", "logger", "message"}


def formatted(logger_name: str, formatter: logging.Formatter, log: Callable[[logging.Logger], None]) -> str:
    """What `log` writes through a handler with `formatter`, by the real logging path."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    logger = logging.getLogger(logger_name)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        log(logger)
    finally:
        logger.removeHandler(handler)
    return stream.getvalue()


# --- the formatter ----------------------------------------------------------------


def test_a_record_is_one_line_of_json_with_ts_level_logger_and_message() -> None:
    record = logging.LogRecord("progress_sse.x", logging.WARNING, __file__, 1, "two\nlines, %s: %d", ("é", 3), None)
    record.created = 1763712000.615
    line = JsonFormatter().format(record)
    assert "\n" not in line and line.isascii()
    assert json.loads(line) == {
        "ts": "2025-11-21T08:00:00.615Z",
        "level": "WARNING",
        "logger": "progress_sse.x",
        "message": "two\nlines, é: 3",
    }


def test_an_exception_goes_in_exc_as_text() -> None:
    def log(logger: logging.Logger) -> None:
        try:
            raise ValueError("the cause, on its own line")
        except ValueError:
            logger.exception("it failed")

    output = formatted("test_log_format.exc", JsonFormatter(), log)
    assert output.count("\n") == 1, "one record, one line"
    line = json.loads(output)
    assert line["message"] == "it failed" and line["level"] == "ERROR"
    assert line["exc"].startswith("Traceback (most recent call last):")
    assert line["exc"].endswith("ValueError: the cause, on its own line")


def test_only_the_fields_given_through_fields_are_written_and_never_over_the_four() -> None:
    def log(logger: logging.Logger) -> None:
        logger.info("hello", extra={"token": "SECRET-EXTRA", **fields(route="task", message="not this", when=datetime)})

    line = json.loads(formatted("test_log_format.fields", JsonFormatter(), log))
    assert line["message"] == "hello"
    assert line["route"] == "task"
    assert line["when"] == str(datetime), "a value JSON has no type for is written as its str()"
    assert "token" not in line and "SECRET-EXTRA" not in json.dumps(line), "another extra is never written"


def test_a_task_logs_its_id_and_name_and_nothing_else_does() -> None:
    """Celery's task logger, through the formatter `progress-sse worker` gives it,
    in a real (eager) task run."""
    app = Celery("test_log_format", broker="memory://")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(CeleryTaskJsonFormatter())
    logger = logging.getLogger("test_log_format.task")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False

    @app.task(name="logs.step")
    def step() -> None:
        logger.info("in the task")

    try:
        result = step.apply()
        logger.info("outside")
    finally:
        logger.removeHandler(handler)
        app.close()
    inside, outside = (json.loads(line) for line in stream.getvalue().splitlines())
    assert inside["task_id"] == result.id and inside["task_name"] == "logs.step"
    assert inside["message"] == "in the task"
    assert set(outside) == BASE_FIELDS


CELERY_SETUP = """
import logging
from celery import Celery
from celery.utils.log import get_multiprocessing_logger, get_task_logger
from progress_sse.json_logs import use_in_celery

use_in_celery()
app = Celery("logs", broker="memory://")  # hijacks the root logger, as Celery's default is
app.log.setup(loglevel=logging.INFO)
logging.getLogger("celery.worker").info("from Celery")
get_task_logger("logs.tasks").info("from a task module")  # its own handler: it does not propagate
get_multiprocessing_logger().error("from the pool")
"""


def test_celerys_own_handlers_write_json_once_it_has_made_them() -> None:
    """Celery's whole logging setup, in a process of its own (it is global)."""
    done = subprocess.run([sys.executable, "-c", CELERY_SETUP], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = [parsed(line) for line in done.stderr.splitlines()]
    assert [(line["logger"], line["message"]) for line in lines] == [
        ("celery.worker", "from Celery"),
        ("logs.tasks", "from a task module"),
        ("multiprocessing", "from the pool"),
    ]
    assert done.stdout == ""


# --- the setting ------------------------------------------------------------------


def test_the_setting_is_text_by_default_and_takes_text_or_json() -> None:
    assert Settings.from_env({}).log_format == "text"
    assert Settings.from_env({"PROGRESS_SSE_LOG_FORMAT": "json"}).log_format == "json"
    assert Settings.from_env({"PROGRESS_SSE_LOG_FORMAT": "json"}).to_env()["PROGRESS_SSE_LOG_FORMAT"] == "json"
    with pytest.raises(ConfigError, match="PROGRESS_SSE_LOG_FORMAT='yaml' is not valid"):
        Settings.from_env({"PROGRESS_SSE_LOG_FORMAT": "yaml"})


@pytest.mark.parametrize("command", ["web", "worker", "dev"])
def test_the_server_commands_take_log_format(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([command, "--log-format", "xml"]) == 2
    assert "PROGRESS_SSE_LOG_FORMAT='xml' is not valid" in capsys.readouterr().err


# --- the request id ---------------------------------------------------------------


def test_a_sane_incoming_request_id_is_kept() -> None:
    for sane in ("abc", "req-2025.11.21_08:00:00", "4f1d9c2b-e07a-4e13-9b1a-0c55aa0f6f1c", "x" * 64, "a/b+c=@~"):
        request = make_mocked_request("GET", "/", headers={HEADER: sane})
        assert request_id_of(request) == sane
        assert request_id_of(request) == sane, "the same on every use"


def test_an_insane_or_missing_request_id_is_replaced_by_a_new_one() -> None:
    jwt = watch_token(["t"], key=SECRET)
    for insane in ("", "has space", 'quo"te', "semi;colon", "x" * 65, "caf\u00e9", "a\tb", jwt, None):
        headers = {} if insane is None else {HEADER: insane}
        request = make_mocked_request("GET", "/", headers=headers)
        chosen = request_id_of(request)
        assert GENERATED_ID.fullmatch(chosen), (insane, chosen)
        assert request_id_of(request) == chosen, "chosen once per request"
    ids = {request_id_of(make_mocked_request("GET", "/")) for _ in range(100)}
    assert len(ids) == 100, "each request its own"


# --- the access logger, in process -----------------------------------------------


class Captured(logging.Handler):
    """The access log's records, as they are emitted (after the response is sent)."""

    def __init__(self) -> None:
        super().__init__()
        self.records: asyncio.Queue[logging.LogRecord] = asyncio.Queue()

    def emit(self, record: logging.LogRecord) -> None:
        self.records.put_nowait(record)

    async def next(self) -> dict[str, Any]:
        record = await asyncio.wait_for(self.records.get(), 10)
        line: dict[str, Any] = json.loads(JsonFormatter().format(record))
        return line


@pytest.fixture
def access_records() -> Iterator[Captured]:
    captured = Captured()
    logger = logging.getLogger("aiohttp.access")
    level = logger.level
    logger.addHandler(captured)
    logger.setLevel(logging.INFO)
    try:
        yield captured
    finally:
        logger.removeHandler(captured)
        logger.setLevel(level)


async def test_the_access_log_carries_the_request_and_masks_every_token(
    aiohttp_server: Any, access_records: Captured
) -> None:
    """A format that shows the Authorization header and the Referer, as an
    `access_log_format` of a user's may: no token in the line nor in a field."""

    async def events(request: web.Request) -> web.Response:
        return web.Response(text="x" * 10, status=404)

    app = web.Application()
    app.on_response_prepare.append(echo_request_id)
    app.router.add_get("/tasks/{task_id}/events", events, name="task_events")
    server = await aiohttp_server(
        app,
        access_log_class=TokenlessAccessLogger,
        access_log_format='%a "%r" %s %b "%{Referer}i" "%{Authorization}i"',
    )
    query_token, header_token = "QUERY-TOKEN-1234", "HEADER-TOKEN-5678"
    async with (
        aiohttp.ClientSession() as session,
        session.get(
            server.make_url(f"/tasks/t1/events?token={query_token}&after=0"),
            headers={
                "Authorization": f"Bearer {header_token}",
                "Referer": f"http://app.example/page?x=1&token={query_token}#y",
                HEADER: "client-id.42",
            },
        ) as resp,
    ):
        assert resp.headers[HEADER] == "client-id.42"
        await resp.read()
    line = await access_records.next()
    assert query_token not in json.dumps(line) and header_token not in json.dumps(line)
    assert line["message"] == (
        '127.0.0.1 "GET /tasks/t1/events?token=***&after=0 HTTP/1.1" 404 '
        f'{line["bytes"]} "http://app.example/page?x=1&token=***#y" "***"'
    )
    assert {k: v for k, v in line.items() if k not in BASE_FIELDS | {"duration_ms", "bytes"}} == {
        "request_id": "client-id.42",
        "method": "GET",
        "route": "task_events",
        "path": "/tasks/t1/events?token=***&after=0",
        "status": 404,
    }
    assert isinstance(line["duration_ms"], float) and line["duration_ms"] >= 0
    assert isinstance(line["bytes"], int) and line["bytes"] > 10, "headers and body"

    async with aiohttp.ClientSession() as session, session.get(server.make_url("/nowhere")) as resp:
        generated = resp.headers[HEADER]
    line = await access_records.next()
    assert GENERATED_ID.fullmatch(generated) and line["request_id"] == generated
    assert line["route"] is None and line["status"] == 404


def test_without_a_token_the_text_line_is_aiohttps_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """Text stays as it was: the masking logger writes aiohttp's line, to the byte."""
    monkeypatch.setattr(AccessLogger, "_get_local_time", classmethod(lambda cls: datetime(2025, 11, 21, tzinfo=UTC)))
    request = make_mocked_request(
        "GET", "/tasks/t1/events?after=0", headers={"Referer": "http://app.example/", "User-Agent": "curl/8"}
    )
    response = web.Response(text="{}")

    def line(logger_class: type[AccessLogger]) -> str:
        return formatted(
            "test_log_format.access",
            logging.Formatter("%(message)s"),
            lambda logger: logger_class(logger).log(request, response, 0.25),
        )

    assert line(TokenlessAccessLogger) == line(AccessLogger)
    assert '"GET /tasks/t1/events?after=0 HTTP/1.1"' in line(AccessLogger)


# --- the real commands ------------------------------------------------------------


class Lines:
    """A pipe's lines as they come, read by a thread: a test waits (with a deadline)
    for the line it needs, each parsed as JSON on the way, then takes them all."""

    def __init__(self, pipe: IO[str]) -> None:
        self._pipe = pipe
        self.seen: list[str] = []
        self._ended = False
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._read, args=(pipe,), daemon=True)
        self._thread.start()

    def _read(self, pipe: IO[str]) -> None:
        for line in pipe:
            self._queue.put(line)
        self._queue.put(None)

    def wait_for(self, wanted: Callable[[dict[str, Any]], bool], timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no such line in {timeout} s:\n{''.join(self.seen)}") from None
            if line is None:
                self._ended = True
                raise AssertionError(f"the output ended first:\n{''.join(self.seen)}")
            self.seen.append(line)
            record = parsed(line)
            if wanted(record):
                return record

    def close(self) -> None:
        """Once the process has ended: the rest is read, the pipe closed."""
        self._thread.join(timeout=30)
        self._pipe.close()

    def all(self) -> list[str]:
        """Every line; call once the process has ended."""
        self._thread.join(timeout=30)
        while not self._ended:
            line = self._queue.get_nowait()
            if line is None:
                self._ended = True
            else:
                self.seen.append(line)
        return self.seen


def parsed(line: str) -> dict[str, Any]:
    """A line of JSON output: one object with the four fields at least."""
    try:
        record = json.loads(line)
    except ValueError:
        raise AssertionError(f"not a JSON line: {line!r}") from None
    assert isinstance(record, dict) and BASE_FIELDS <= set(record), line
    assert datetime.fromisoformat(record["ts"]).utcoffset() is not None and record["ts"].endswith("Z"), line
    return record


@contextlib.contextmanager
def running(argv: list[str], env: dict[str, str]) -> Iterator[tuple[subprocess.Popen[str], Lines, Lines]]:
    """`progress-sse ARGV`, with its stdout's and its stderr's lines."""
    process = subprocess.Popen(
        [sys.executable, "-m", "progress_sse", *argv],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own group: whatever it started goes with it
    )
    assert process.stdout is not None and process.stderr is not None
    out, err = Lines(process.stdout), Lines(process.stderr)
    try:
        yield process, out, err
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        out.close()
        err.close()


def get(url: str, headers: dict[str, str]) -> tuple[int, str]:
    """The status and the X-Request-Id of a GET."""
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            resp.read()
            return resp.status, resp.headers[HEADER]
    except urllib.error.HTTPError as exc:
        exc.close()
        return exc.code, exc.headers[HEADER]


def serving(message: str) -> Callable[[dict[str, Any]], bool]:
    return lambda record: str(record["message"]).startswith(message)


@pytest.mark.e2e
@pytest.mark.usefixtures("redis_client")
def test_web_logs_json_lines_with_the_request_and_no_token(settings: Settings) -> None:
    port = free_port()
    env = {**worker_env(settings.with_(secret=SECRET)), "PORT": str(port), "HOST": "127.0.0.1"}
    query_token = watch_token(["no-such-task"], key=SECRET, ttl=600)
    header_token = watch_token(["no-such-task"], key=SECRET, ttl=900)
    assert query_token != header_token
    base = f"http://127.0.0.1:{port}"
    with running(["web", "--log-format", "json"], env) as (process, out, err):
        err.wait_for(serving(f"progress-sse web on {base}"))
        err.wait_for(serving("progress-sse web: access tokens required"))
        stream = get(
            f"{base}/tasks/no-such-task/events?token={query_token}",
            {"Authorization": f"Bearer {header_token}", HEADER: "req-abc.123"},
        )
        health = get(f"{base}/healthz", {HEADER: "not sane: it has spaces"})
        refused = get(f"{base}/tasks/no-such-task", {})
        records = [err.wait_for(lambda record: record["logger"] == "aiohttp.access") for _ in range(3)]
        process.terminate()
        assert process.wait(30) == 0
    output = "".join(out.all() + err.all())
    assert query_token not in output and header_token not in output and SECRET not in output
    assert out.all() == [], "nothing but log records, and those go to stderr"
    for line in err.all():
        parsed(line)

    assert stream == (404, "req-abc.123"), "the task is unknown, but the token was taken"
    assert health[0] == 200 and GENERATED_ID.fullmatch(health[1])
    assert refused[0] == 401 and GENERATED_ID.fullmatch(refused[1]), "a refusal has an id too"
    by_id = {record["request_id"]: record for record in records}
    assert by_id.keys() == {"req-abc.123", health[1], refused[1]}
    line = by_id["req-abc.123"]
    assert (line["method"], line["route"], line["status"]) == ("GET", "task_events", 404)
    assert line["path"] == "/tasks/no-such-task/events?token=***"
    assert isinstance(line["duration_ms"], float) and line["duration_ms"] >= 0
    assert isinstance(line["bytes"], int) and line["bytes"] > 0
    assert line["level"] == "INFO" and "GET /tasks/no-such-task/events?token=*** HTTP/1.1" in line["message"]
    assert (by_id[health[1]]["route"], by_id[health[1]]["status"]) == ("healthz", 200)
    assert (by_id[refused[1]]["route"], by_id[refused[1]]["status"]) == ("task", 401)


@pytest.mark.e2e
@pytest.mark.usefixtures("redis_client")
def test_a_crash_is_one_record_with_its_traceback(settings: Settings) -> None:
    with socket.socket() as taken:  # the web's port, taken
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        env = {**worker_env(settings), "PORT": str(taken.getsockname()[1]), "PROGRESS_SSE_LOG_FORMAT": "json"}
        done = subprocess.run(
            [sys.executable, "-m", "progress_sse", "web"], env=env, capture_output=True, text=True, timeout=60
        )
    assert done.returncode == 1, done.stderr
    crash = [parsed(line) for line in done.stderr.splitlines()][-1]
    assert crash["level"] == "CRITICAL" and crash["message"] == "progress-sse stopped on an uncaught exception"
    assert crash["exc"].startswith("Traceback") and "address already in use" in crash["exc"]
    assert done.stdout == ""


@pytest.mark.e2e
@pytest.mark.usefixtures("redis_client")
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="web --workers needs Linux")
def test_a_group_of_web_processes_writes_json_lines_naming_the_process(settings: Settings) -> None:
    port = free_port()
    env = {
        **worker_env(settings),
        "PORT": str(port),
        "HOST": "127.0.0.1",
        "WEB_CONCURRENCY": "2",
        "PROGRESS_SSE_LOG_FORMAT": "json",
    }
    with running(["web"], env) as (process, out, err):
        announced = err.wait_for(serving(f"progress-sse web on http://127.0.0.1:{port}"))
        status, request_id = get(f"http://127.0.0.1:{port}/healthz", {HEADER: "group-req-1"})
        access = err.wait_for(lambda record: record.get("request_id") == "group-req-1")
        process.terminate()
        assert process.wait(30) == 0
    lines = [parsed(line) for line in err.all()]
    assert out.all() == []
    assert (status, request_id) == (200, "group-req-1")
    assert "process" not in announced, "the parent's own line"
    assert access["logger"] == "aiohttp.access" and access["route"] == "healthz"
    assert access["process"] in ("web.1", "web.2")
    listening = {line["process"] for line in lines if "listening" in line["message"]}
    assert listening == {"web.1", "web.2"}, "a line a process printed becomes a record naming it"


TASK_MODULE = """
from celery.utils.log import get_task_logger

from progress_sse.worker.app import app

logger = get_task_logger(__name__)


@app.task(name="logs.hello")
def hello() -> None:
    logger.info("hello from a task")
"""


@pytest.mark.e2e
@pytest.mark.usefixtures("redis_client")
def test_the_worker_logs_json_lines_through_celerys_own_logging(settings: Settings, tmp_path: Path) -> None:
    """Celery's records from its main process and from a pool process, a task's own
    logger (which does not propagate to the root logger) among them."""
    (tmp_path / "log_format_tasks.py").write_text(TASK_MODULE)
    own = settings.with_(queue=f"{settings.queue}-logs", log_format="json")
    argv = ["worker", "--concurrency=1", "--pool=prefork", "--without-gossip", "--without-mingle"]
    argv += [f"--hostname={own.queue}@%h", "--include=log_format_tasks"]  # unknown to us: to Celery
    env = {**worker_env(own), "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    celery = make_celery(own)
    try:
        with running(argv, env) as (process, out, err):
            err.wait_for(lambda record: " ready." in record["message"])
            hello_id = celery.send_task("logs.hello").id
            hello = err.wait_for(lambda record: record["message"] == "hello from a task")
            fail_id = celery.send_task("demo.fail", kwargs={"after": 1, "delay": 0}).id
            failed = err.wait_for(lambda record: fail_id in record["message"] and "raised" in record["message"])
            process.terminate()
            assert process.wait(30) == 0
    finally:
        celery.close()
    for line in err.all():
        parsed(line)
    # No banner (--quiet): it is no log record. What is left on stdout is what
    # Celery's signal handlers write there directly, such as its shutdown notice.
    assert [line for line in out.all() if line.strip()] == ["worker: Warm shutdown (MainProcess)\n"]
    assert (hello["task_id"], hello["task_name"], hello["logger"]) == (hello_id, "logs.hello", "log_format_tasks")
    assert failed["level"] == "ERROR"
    assert failed["exc"].startswith("Traceback") and "RuntimeError" in failed["exc"], "from a pool process"


@pytest.mark.parametrize(
    ("quoted", "shown"),
    [
        (
            "Invalid char in url query: b'GET /feed?token=eyJhbGciOiJIUzI1NiJ9.PAYLOAD.SIG\\x01x HTTP/1.1'",
            "Invalid char in url query: b'GET /feed?token=*** HTTP/1.1'",
        ),
        (
            "Invalid header token: b'Authorization: Bearer abc.def.ghi\\x01'",
            "Invalid header token: b'Authorization: Bearer ***'",
        ),
        ("b'GET /events?task=t1&token=secret&x=1 HTTP/1.1'", "b'GET /events?task=t1&token=***&x=1 HTTP/1.1'"),
        ("a bare eyJhbGciOiJIUzI1NiJ9.eyJleHAiOjF9.c2ln in a header", "a bare *** in a header"),
    ],
)
def test_what_a_parse_error_quotes_of_a_request_reaches_the_log_without_its_token(quoted: str, shown: str) -> None:
    assert without_tokens(quoted) == shown
