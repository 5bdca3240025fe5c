"""The API's description, `GET /openapi.json` (src/progress_sse/web/openapi.py).

- It describes every route the app registers, and nothing else: each method and
  path (the HEAD every GET route answers too), with the public routes of app.py's
  PUBLIC_ROUTES, and those alone, needing no token.
- It is valid OpenAPI 3.1 (openapi-spec-validator).
- It is served to anyone, with `servers` naming where the app is mounted.
- A live `progress-sse web` keeps to it: Schemathesis, run against its
  /openapi.json, finds no 500, and every answer has a documented status, content
  type, headers and body (stream frames included).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import aiohttp
import pytest
import redis
from aiohttp import web
from celery import group
from openapi_spec_validator import validate
from openapi_spec_validator.validation.exceptions import OpenAPIValidationError

from progress_sse.cli.embedded import free_port
from progress_sse.config import Settings
from progress_sse.tokens import operator_token
from progress_sse.web import CELERY, create_app
from progress_sse.web.app import PUBLIC_ROUTES
from progress_sse.web.openapi import SSE, document
from progress_sse.worker import bridge
from progress_sse.worker.celery_app import make_celery

from .conftest import Server, Worker, worker_env
from .schemathesis_hooks import ENDING_STREAMS

ROOT = Path(__file__).resolve().parents[1]
SECRET = "the-openapi-test-secret-is-long-enough"
METHODS = frozenset({"get", "head", "post", "put", "patch", "delete", "options", "trace"})
# Routes the document leaves out, and why: none. The page's assets are described
# too: pages of your own import the client from /static/progress.js (README), an
# address as lasting as the API's.
UNDESCRIBED: frozenset[tuple[str, str]] = frozenset()


def registered(app: web.Application) -> dict[tuple[str, str], str]:
    """(method, path) of every route the app registers, and its route's name."""
    return {
        (route.method, route.resource.canonical): route.resource.name or ""
        for route in app.router.routes()
        if route.resource is not None
    }


def described(doc: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    """(method, path) of every operation the document describes, and the operation."""
    return {
        (method.upper(), path): op
        for path, item in doc["paths"].items()
        for method, op in item.items()
        if method in METHODS
    }


@pytest.fixture
def app(settings: Settings) -> Iterator[web.Application]:
    """The app as `progress-sse web` makes it, not started: its routes are all it is for."""
    made = create_app(settings)
    yield made
    made[CELERY].close()


def test_every_route_the_app_registers_is_described_and_nothing_else(app: web.Application) -> None:
    routes = set(registered(app)) - UNDESCRIBED
    operations = set(described(document()))
    assert ("HEAD", "/tasks/{task_id}/events") in routes, "a GET route answers HEAD too, and is described so"
    missing, stale = sorted(routes - operations), sorted(operations - routes)
    assert not missing, f"routes that web/openapi.py's PATHS does not describe: {missing}"
    assert not stale, f"operations of no route (a route renamed or removed?): {stale}"


def test_the_public_routes_and_only_they_need_no_token(app: web.Application) -> None:
    keyed, open_ = described(document(keyed=True)), described(document(keyed=False))
    for route, name in registered(app).items():
        if route not in keyed:
            continue  # the test above names it
        public = name in PUBLIC_ROUTES
        assert (keyed[route]["security"] == []) is public, (route, name, keyed[route]["security"])
        # Open (no key): a token is still accepted, and none is needed.
        assert open_[route]["security"] == ([] if public else [*keyed[route]["security"], {}]), route
        assert ("401" in keyed[route]["responses"]) is not public, route


def test_the_document_is_valid_openapi_3_1() -> None:
    for doc in (document(), document("/progress", keyed=False)):
        assert doc["openapi"].startswith("3.1.")
        validate(doc)  # raises, naming what is wrong


def test_a_broken_document_is_refused_by_the_validator() -> None:
    """The validator really looks: an operation whose path parameter is not declared fails."""
    doc = document()
    del doc["paths"]["/tasks/{task_id}"]["delete"]["parameters"]
    with pytest.raises(OpenAPIValidationError, match="task_id"):
        validate(doc)


async def test_it_is_served_as_built_and_with_tokens_on_to_anyone(make_server: Any, settings: Settings) -> None:
    open_: Server = await make_server(settings)
    async with open_.session.get(open_.url("/openapi.json")) as resp:
        assert resp.status == 200 and resp.content_type == "application/json"
        assert await resp.json() == json.loads(json.dumps(document(keyed=False)))
    async with open_.session.head(open_.url("/openapi.json")) as resp:
        assert resp.status == 200 and resp.content_type == "application/json"
    keyed: Server = await make_server(settings.with_(secret=SECRET))
    async with keyed.session.get(keyed.url("/tasks")) as resp:
        assert resp.status == 401, "tokens are on"
    async with keyed.session.get(keyed.url("/openapi.json")) as resp:
        assert resp.status == 200
        assert await resp.json() == json.loads(json.dumps(document(keyed=True)))


async def test_mounted_under_a_prefix_its_servers_say_so(
    aiohttp_server: Any, settings: Settings, redis_client: redis.Redis
) -> None:
    host = web.Application()
    host.add_subapp("/progress/", create_app(settings))
    server = await aiohttp_server(host)
    async with aiohttp.ClientSession() as session:
        async with session.get(server.make_url("/progress/openapi.json")) as resp:
            assert resp.status == 200
            body = await resp.json()
        assert body["servers"] == [{"url": "/progress"}]
        async with session.get(server.make_url(body["servers"][0]["url"] + "/healthz")) as resp:
            assert resp.status == 200, "a described path, under the servers' URL, is served"


# -- Schemathesis against a live server -------------------------------------------------------

# Generated requests per operation in the fuzzing phase; how long one request may take (a
# stream included), and the whole run (about 7 s on a 2-core machine).
MAX_EXAMPLES = 30
REQUEST_TIMEOUT = 10
RUN_TIMEOUT = 150


class Live(NamedTuple):
    url: str
    token: str
    finished: list[str]  # tasks that ended: success, failure, revoked, and a group's members
    groups: list[str]  # a finished group
    cursors: list[str]  # the finished tasks' last cursors: a stream resumed from one has no more


def _request(url: str, token: str, method: str = "GET", body: dict[str, Any] | None = None) -> tuple[int, bytes]:
    """The status and whole body of a request; a stream's, once it ends."""
    headers = {"Authorization": f"Bearer {token}"}
    data = None
    if body is not None:
        data, headers["Content-Type"] = json.dumps(body).encode(), "application/json"
    request = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as refused:
        return refused.code, refused.read()


@pytest.fixture
def live(settings: Settings, redis_client: redis.Redis, output_dir: Path) -> Iterator[Live]:
    """`progress-sse web` with tokens on, and finished tasks of every ending to watch.

    Its own key prefix: GET /tasks lists only what this test made. Its tasks were
    run by a real worker on a queue of their own; the web's queue has no worker,
    so what Schemathesis starts stays queued (the run does not follow it)."""
    own = settings.with_(key_prefix=f"{settings.key_prefix}-oa-{uuid.uuid4().hex[:6]}", secret=SECRET)
    own = own.with_(queue=own.key_prefix)
    token = operator_token(key=SECRET, ttl=3600)
    port = free_port()
    # A ping a second: a stream that stays open is seen to (tests/schemathesis_hooks.py).
    serving = own.with_(queue=f"{own.queue}-idle", port=port, host="127.0.0.1", heartbeat=1.0)
    web_ = subprocess.Popen(
        [sys.executable, "-m", "progress_sse", "web"],
        env={**worker_env(serving), "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    worker = Worker(own, output_dir / "worker-openapi.log", concurrency=2)
    publisher = make_celery(own, main="openapi-publisher")
    web_log = (output_dir / "web-openapi.log").open("w")
    drain = threading.Thread(target=lambda: shutil.copyfileobj(web_.stdout, web_log), daemon=True)
    try:
        assert web_.stdout is not None
        first = web_.stdout.readline()  # blocks until the line, or EOF if it dies
        assert first.startswith("progress-sse web on"), first + web_.stdout.read()
        drain.start()  # its log, read as it comes: a pipe nobody reads would block the web once full
        url = f"http://127.0.0.1:{port}"
        worker.wait_ready()
        bridge.install(publisher, own)
        try:
            ends = [
                publisher.send_task("demo.count", kwargs={"n": 2, "delay": 0}).id,
                publisher.send_task("demo.fail", kwargs={"after": 1, "delay": 0}).id,
            ]
            count = publisher.signature("demo.count", kwargs={"n": 1, "delay": 0})
            members = group([count, count.clone()]).apply_async()
        finally:
            bridge.uninstall()
        # Each stream ends at its task's end (or the group's): waited for, not slept on.
        for task_id in ends:
            assert _request(f"{url}/tasks/{task_id}/events", token)[0] == 200
        assert _request(f"{url}/groups/{members.id}/events", token)[0] == 200
        status, body = _request(f"{url}/tasks", token, "POST", {"name": "demo.count"})
        assert status == 202, body
        cancelled = json.loads(body)["id"]
        assert _request(f"{url}/tasks/{cancelled}", token, "DELETE")[0] == 202
        finished = [*ends, cancelled, *(str(member.id) for member in members.results)]
        states = [json.loads(_request(f"{url}/tasks/{task_id}", token)[1]) for task_id in finished]
        assert [s["state"] for s in states] == ["success", "failure", "revoked", "success", "success"]
        worker.stop()  # nothing more to run: the run has the machine's cores
        yield Live(url, token, finished, [str(members.id)], [s["cursor"] for s in states])
    finally:
        worker.stop()
        publisher.close()
        web_.terminate()
        web_.wait(timeout=15)
        if drain.is_alive():
            drain.join(timeout=15)  # to the end of its output
        web_log.close()
        web_.stdout.close()
        made = list(redis_client.scan_iter(match=f"*{own.key_prefix}*", count=1000))
        if made:
            redis_client.delete(*made)


def schemathesis_config(live: Live) -> str:
    """The run's settings (TOML). Its requests carry an operator's token, so every
    answer but the refusals of a missing or bad token (which Schemathesis checks
    too, `ignored_auth`) is the one the API gives its data. Path and query
    parameters draw half the time from the finished tasks, so answers with data
    (200, 204, 409) are checked, not only 404s."""
    operations = described(document())
    public = sorted({path for (_, path), op in operations.items() if op["security"] == []})
    streams = {
        path
        for (_, path), op in operations.items()
        if any(SSE in r.get("content", {}) for r in op["responses"].values())
    }
    return f"""
seed = 1
request-timeout = {REQUEST_TIMEOUT}
# A stream is read to its end: no stream here has that many frames (100 tasks, a few events each).
max-stream-events = 10000

[generation]
database = "none"
max-examples = {MAX_EXAMPLES}

[checks]
# It expects every schema-valid request to be accepted, but the schema cannot say
# which tasks the allow-list holds, nor that `task` values add up to 1 to 100 ids.
positive_data_acceptance.enabled = false

[auth.openapi.bearerToken]
bearer = "{live.token}"

# Ids in a response (POST /tasks's) are not reused: they name queued tasks,
# whose streams would stay open.
[phases.examples.extra-data-sources]
responses = false
[phases.coverage.extra-data-sources]
responses = false
[phases.fuzzing.extra-data-sources]
responses = false
[phases.stateful]
enabled = false

[dictionaries.tasks]
values = {json.dumps(live.finished)}
[dictionaries.groups]
values = {json.dumps(live.groups)}
[dictionaries.cursors]
values = {json.dumps([*live.cursors, "0"])}
[dictionaries.assets]
values = ["progress.js", "progress.css"]

[parameters]
"path.task_id" = {{ dictionary = "tasks", probability = 0.5 }}
"path.group_id" = {{ dictionary = "groups", probability = 0.5 }}
"header.Last-Event-ID" = {{ dictionary = "cursors", probability = 0.5 }}
"query.last_event_id" = {{ dictionary = "cursors", probability = 0.5 }}
"path.name" = {{ dictionary = "assets", probability = 0.5 }}

# With tokens on, a method a path does not take is 401 before 405 for a request
# without a token, public paths' included (docs/protocol.md, "Errors everywhere"):
# Schemathesis sends public operations none, and expects 405.
[[operations]]
include-path = {json.dumps(public)}
checks.unsupported_method.enabled = false
""" + _endless(sorted(streams - ENDING_STREAMS))


def _endless(streams: list[str]) -> str:
    """Streams that never end by design (the all-tasks feed) are read for a second,
    and asked fewer times: each answer takes that second."""
    if not streams:
        return ""
    return f"""
[[operations]]
include-path = {json.dumps(streams)}
request-timeout = 1
generation.max-examples = 5
phases.coverage.enabled = false
"""


@pytest.mark.e2e
@pytest.mark.timeout(RUN_TIMEOUT + 60)
def test_a_live_server_keeps_to_its_description(live: Live, tmp_path: Path, output_dir: Path) -> None:
    config = tmp_path / "schemathesis.toml"
    config.write_text(schemathesis_config(live))
    log = output_dir / "schemathesis.log"  # its report, as it goes
    started = time.monotonic()
    with log.open("w") as out:
        run = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "schemathesis.cli",
                "--config-file",
                str(config),
                "run",
                f"{live.url}/openapi.json",
                "--phases=examples,coverage,fuzzing",
                "--workers=1",  # Python 3.11's ast.parse, which Hypothesis calls, is not thread-safe
                "--no-shrink",  # a failure is reported as found: shrinking one that waits on a stream takes minutes
                "--no-color",
            ],
            cwd=tmp_path,  # where Schemathesis and Hypothesis keep their caches
            env={
                **os.environ,
                "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
                "SCHEMATHESIS_HOOKS": "tests.schemathesis_hooks",
                "OPENAPI_FINISHED_TASKS": ",".join(live.finished),
                "PYTHONUNBUFFERED": "1",
            },
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            code = run.wait(timeout=RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            run.kill()
            run.wait()
            pytest.fail(f"Schemathesis ran for more than {RUN_TIMEOUT} s:\n{log.read_text()}")
    report = log.read_text()
    assert code == 0, report
    print(f"Schemathesis took {time.monotonic() - started:.1f} s\n{report[-1200:]}")
