"""Access tokens on a real server, real Redis and a real worker: every route, every
kind of token, and what each role sees.

The table below is the contract of docs/protocol.md ("Access tokens"): a missing or
bad token is 401, a valid one without the scope 403, and neither starts, cancels or
reveals anything.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import jwt
import pytest
from celery import Celery

from progress_sse.config import Settings
from progress_sse.tokens import operator_token, start_token, verify, watch_token

from .conftest import Server
from .sse import SSEReader
from .test_groups import publisher_app, start_group  # noqa: F401  (publisher_app is a fixture)

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("worker")]

SECRET = "the-access-test-secret-is-long-enough"
OTHER_SECRET = "another-service-secret-also-long-enough"


@dataclass
class World:
    """Tasks and a group that exist, seen through a server that needs tokens."""

    server: Server
    done: str  # a task that has ended
    other: str  # another task, outside the tokens that name `done`
    group: str


@pytest.fixture
async def world(make_server: Callable[..., Any], settings: Settings, publisher_app: Celery) -> World:  # noqa: F811
    server: Server = await make_server(settings.with_(secret=SECRET))
    operator = bearer(operator_token(key=SECRET))
    ids = []
    for _ in range(2):
        async with server.session.post(
            server.url("/tasks"), json={"name": "demo.count", "kwargs": {"n": 2, "delay": 0}}, headers=operator
        ) as resp:
            assert resp.status == 202, await resp.text()
            ids.append((await resp.json())["id"])
    count = publisher_app.signature("demo.count", kwargs={"n": 2, "delay": 0})
    group_id = await start_group(publisher_app, count, count.clone())
    for task_id in ids:  # ended, so their streams end too
        async with server.session.get(server.url(f"/tasks/{task_id}/events"), headers=operator) as resp:
            await SSEReader(resp).rest(timeout=30)
    return World(server, ids[0], ids[1], group_id)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def expired(**claims: Any) -> str:
    return jwt.encode({**claims, "exp": int(time.time()) - 5}, SECRET, algorithm="HS256")


@dataclass(frozen=True)
class Route:
    method: str
    path: str  # {done}, {other} and {group} are filled in from the World
    right: Callable[[World], str]  # a token with exactly the scope it needs
    wrong: Callable[[World], str]  # a valid token, one scope short
    body: dict[str, Any] | None = None


ROUTES = {
    "state": Route(
        "GET",
        "/tasks/{done}",
        lambda w: watch_token([w.done], key=SECRET),
        lambda w: watch_token([w.other], key=SECRET),
    ),
    "task stream": Route(
        "GET",
        "/tasks/{done}/events",
        lambda w: watch_token([w.done], key=SECRET),
        lambda w: watch_token([w.other], key=SECRET),
    ),
    "many-task stream": Route(
        "GET",
        "/events?task={done}&task={other}",
        lambda w: watch_token([w.done, w.other], key=SECRET),
        lambda w: watch_token([w.done], key=SECRET),  # one of the two: refused whole
    ),
    "group state": Route(
        "GET",
        "/groups/{group}",
        lambda w: watch_token([], groups=[w.group], key=SECRET),
        lambda w: watch_token([w.done], key=SECRET),
    ),
    "group stream": Route(
        "GET",
        "/groups/{group}/events",
        lambda w: watch_token([], groups=[w.group], key=SECRET),
        lambda w: watch_token([w.done], key=SECRET),
    ),
    "start": Route(
        "POST",
        "/tasks",
        lambda w: start_token(["demo.count"], key=SECRET),
        lambda w: start_token(["demo.stages"], key=SECRET),
        body={"name": "demo.count", "kwargs": {"n": 1, "delay": 0}},
    ),
    "cancel": Route(
        "DELETE",
        "/tasks/{done}",
        lambda w: watch_token([w.done], cancel=True, key=SECRET),
        lambda w: watch_token([w.done], key=SECRET),  # may watch, may not cancel
    ),
    "recent": Route(
        "GET",
        "/tasks",
        lambda w: operator_token(key=SECRET),
        lambda w: watch_token([w.done], key=SECRET),
    ),
}
REFUSED = {
    "none": (401, "needs an access token"),
    "bad signature": (401, "not valid here"),
    "expired": (401, "expired"),
    "wrong scope": (403, "scope"),
}
SCOPE_NAMED = {
    "state": "tasks scope",
    "task stream": "tasks scope",
    "many-task stream": "tasks scope",
    "group state": "groups scope",
    "group stream": "groups scope",
    "start": "start scope",
    "cancel": "cancel scope",
    "recent": "operator scope",
}


def token_for(kind: str, route: Route, world: World) -> str | None:
    return {
        "none": lambda: None,
        "bad signature": lambda: operator_token(key=OTHER_SECRET),
        "expired": lambda: expired(operator=True),
        "wrong scope": lambda: route.wrong(world),
    }[kind]()


async def recorded(world: World) -> tuple[int, str]:
    """How many tasks the service knows, and the ended task's state: what a refused
    request must leave as it was."""
    headers = bearer(operator_token(key=SECRET))
    async with world.server.session.get(world.server.url("/tasks?limit=500"), headers=headers) as resp:
        tasks = (await resp.json())["tasks"]
    return len(tasks), next(t["state"] for t in tasks if t["task_id"] == world.done)


@pytest.mark.parametrize("kind", list(REFUSED))
@pytest.mark.parametrize("name", list(ROUTES))
async def test_every_route_refuses_a_token_without_its_scope(world: World, name: str, kind: str) -> None:
    route = ROUTES[name]
    token = token_for(kind, route, world)
    before = await recorded(world)
    path = route.path.format(done=world.done, other=world.other, group=world.group)
    async with world.server.session.request(
        route.method, world.server.url(path), json=route.body, headers=bearer(token) if token else {}
    ) as resp:
        body = await resp.json()
        status, header = resp.status, resp.headers.get("WWW-Authenticate", "")
    expected_status, words = REFUSED[kind]
    assert status == expected_status, body
    assert set(body) == {"error"} and words in body["error"], body
    if kind == "wrong scope":
        assert SCOPE_NAMED[name] in body["error"], body
        assert 'error="insufficient_scope"' in header
    else:
        assert header.startswith('Bearer realm="progress-sse"')
    assert token is None or token not in body["error"]
    if name != "start":  # a start's refusal names the task the client asked for
        assert "demo.count" not in json.dumps(body), "nothing about the task is revealed"
    assert await recorded(world) == before, "nothing was started or cancelled"


@pytest.mark.parametrize("who", ["right", "operator"])
@pytest.mark.parametrize("name", [n for n in ROUTES if n not in ("cancel",)])
async def test_every_route_serves_a_token_with_its_scope(world: World, name: str, who: str) -> None:
    route = ROUTES[name]
    token = route.right(world) if who == "right" else operator_token(key=SECRET)
    path = route.path.format(done=world.done, other=world.other, group=world.group)
    async with world.server.session.request(
        route.method, world.server.url(path), json=route.body, headers=bearer(token)
    ) as resp:
        assert resp.status in (200, 202), await resp.text()
        if resp.content_type == "text/event-stream":
            frames = await SSEReader(resp).rest(timeout=30)
            assert frames and frames[-1].payload["state"] == "success"
        else:
            body = await resp.json()
    if name == "start":
        grant = verify(body["token"], secret=SECRET)  # to watch what it started
        assert grant.tasks == {body["id"]} and grant.cancel == (who == "operator")
        async with world.server.session.get(world.server.url(body["events_url"]), headers=bearer(body["token"])) as s:
            assert s.status == 200
            assert (await SSEReader(s).rest(timeout=30))[-1].payload["state"] == "success"


@pytest.mark.parametrize("who", ["right", "operator"])
async def test_cancel_needs_the_cancel_scope_and_the_task(world: World, who: str) -> None:
    server = world.server
    operator = bearer(operator_token(key=SECRET))
    async with server.session.post(
        server.url("/tasks"), json={"name": "demo.count", "kwargs": {"n": 500, "delay": 0.1}}, headers=operator
    ) as resp:
        task_id = (await resp.json())["id"]
    token = watch_token([task_id], cancel=True, key=SECRET) if who == "right" else operator_token(key=SECRET)
    async with server.session.delete(server.url(f"/tasks/{task_id}"), headers=bearer(token)) as resp:
        assert resp.status == 202, await resp.text()
        assert (await resp.json())["state"] == "revoked"


async def test_public_routes_need_no_token_and_say_nothing_about_tasks(world: World) -> None:
    server = world.server
    async with server.session.get(server.url("/healthz")) as resp:
        assert resp.status == 200
    async with server.session.get(server.url("/")) as resp:
        assert resp.status == 200 and resp.content_type == "text/html"
    async with server.session.get(server.url("/static/progress.js")) as resp:
        assert resp.status == 200 and resp.content_type == "text/javascript"
    pages = {}
    for task_id in (world.done, "no-such-task"):  # the page is the same whether the task exists or not
        async with server.session.get(server.url(f"/tasks/{task_id}"), headers={"Accept": "text/html"}) as resp:
            assert resp.status == 200
            pages[task_id] = (await resp.text()).replace(task_id, "ID")
    assert pages[world.done] == pages["no-such-task"]
    assert "demo.count" not in pages[world.done]
    async with server.session.get(server.url("/no/such/route")) as resp:
        assert resp.status == 401, "not even which routes exist"


async def test_the_token_may_come_in_the_query_and_the_header_must_be_bearer(world: World) -> None:
    server = world.server
    token = watch_token([world.done], key=SECRET)
    async with server.session.get(server.url(f"/tasks/{world.done}/events?token={token}")) as resp:
        assert resp.status == 200
        assert (await SSEReader(resp).rest(timeout=30))[-1].payload["state"] == "success"
    # A proxy's Basic credentials, re-sent by the browser on its own, leave ?token= in charge.
    basic = {"Authorization": "Basic Zm9vOmJhcg=="}
    async with server.session.get(server.url(f"/tasks/{world.done}?token={token}"), headers=basic) as resp:
        assert resp.status == 200
    async with server.session.get(server.url(f"/tasks/{world.done}"), headers=basic) as resp:
        assert resp.status == 401 and "needs an access token" in (await resp.json())["error"]
    async with server.session.get(server.url(f"/tasks/{world.done}"), headers={"Authorization": "Bearer "}) as resp:
        assert resp.status == 401
        assert (await resp.json())["error"] == "The Authorization header must be: Bearer <token>."


async def test_a_resumed_stream_is_checked_again(world: World) -> None:
    server = world.server
    path = f"/events?task={world.done}"
    every = {**bearer(watch_token([world.done], key=SECRET)), "Last-Event-ID": "0"}  # the whole history
    async with server.session.get(server.url(path), headers=every) as resp:
        frames = await SSEReader(resp).rest(timeout=30)
    assert len(frames) >= 3
    resume = {"Last-Event-ID": str(frames[0].id)}
    for token, status in [
        (watch_token([world.other], key=SECRET), 403),
        (expired(tasks=[world.done]), 401),
        (watch_token([world.done], key=SECRET), 200),
    ]:
        async with server.session.get(server.url(path), headers={**resume, **bearer(token)}) as resp:
            assert resp.status == status, await resp.text()
            if status == 200:
                rest = await SSEReader(resp).rest(timeout=30)
                assert [f.id for f in rest] == [f.id for f in frames[1:]], "exactly what followed the cursor"


async def test_a_stream_ends_when_its_token_expires_and_its_reconnect_is_refused(world: World) -> None:
    server = world.server
    operator = bearer(operator_token(key=SECRET))
    async with server.session.post(
        server.url("/tasks"), json={"name": "demo.count", "kwargs": {"n": 600, "delay": 0.1}}, headers=operator
    ) as resp:
        task_id = (await resp.json())["id"]
    token = watch_token([task_id], ttl=2, key=SECRET)
    try:
        async with server.session.get(server.url(f"/tasks/{task_id}/events"), headers=bearer(token)) as resp:
            assert resp.status == 200
            frames = await SSEReader(resp).rest(timeout=30)  # the end of the response, not a timeout
        assert frames and not frames[-1].terminal, "it ended at the token's expiry, not the task's end"
        headers = {**bearer(token), "Last-Event-ID": str(frames[-1].id)}
        async with server.session.get(server.url(f"/tasks/{task_id}/events"), headers=headers) as resp:
            assert resp.status == 401
            assert "expired" in (await resp.json())["error"]
    finally:
        async with server.session.delete(server.url(f"/tasks/{task_id}"), headers=operator) as resp:
            assert resp.status == 202


@pytest.mark.parametrize("watcher_errors", ["message", "type"])
async def test_only_operators_see_tracebacks_workers_and_pids(
    make_server: Callable[..., Any], settings: Settings, watcher_errors: str
) -> None:
    server: Server = await make_server(settings.with_(secret=SECRET, watcher_errors=watcher_errors))
    operator = bearer(operator_token(key=SECRET))
    async with server.session.post(
        server.url("/tasks"), json={"name": "demo.fail", "kwargs": {"after": 1, "delay": 0}}, headers=operator
    ) as resp:
        task_id = (await resp.json())["id"]
    watcher = bearer(watch_token([task_id], key=SECRET))
    seen: dict[str, Any] = {}
    for who, headers in (("operator", operator), ("watcher", watcher)):
        async with server.session.get(server.url(f"/tasks/{task_id}/events"), headers=headers) as resp:
            frames = await SSEReader(resp).rest(timeout=30)
        async with server.session.get(server.url(f"/tasks/{task_id}"), headers=headers) as resp:
            seen[who] = (frames[-1].payload, await resp.json(), [f.data for f in frames])
    streamed, state, _ = seen["operator"]
    assert streamed["error"]["traceback"] and state["error"]["traceback"] and state["worker"] and state["worker_pid"]
    streamed, state, every = seen["watcher"]
    assert "Traceback" not in "".join(every) and "traceback" not in json.dumps(state)
    assert "worker" not in state and "worker_pid" not in state
    error_type = seen["operator"][0]["error"]["type"]
    if watcher_errors == "message":
        assert streamed["error"] == {"type": error_type, "message": seen["operator"][0]["error"]["message"]}
    else:
        assert streamed["error"] == {"type": error_type} and streamed["message"] == error_type
        assert state["error"] == {"type": error_type} and state["message"] == error_type
        async with server.session.get(server.url(f"/tasks/{task_id}?format=celery-progress"), headers=watcher) as resp:
            assert (await resp.json())["result"] == error_type


@pytest.fixture
async def open_server(make_server: Callable[..., Any], settings: Settings) -> AsyncIterator[Server]:
    yield await make_server(settings.with_(allowed_hosts=("progress.example", ".example.org")))


@pytest.mark.parametrize(
    ("host", "status"),
    [("progress.example", 200), ("a.example.org", 200), ("example.org:8000", 200), ("evil.example", 400)],
)
async def test_an_unexpected_host_header_gets_400(open_server: Server, host: str, status: int) -> None:
    async with open_server.session.get(open_server.url("/healthz"), headers={"Host": host}) as resp:
        assert resp.status == status
        if status == 400:
            assert "PROGRESS_SSE_ALLOWED_HOSTS" in (await resp.json())["error"]


@pytest.mark.parametrize(
    ("host", "status"),
    [
        ("localhost:8000", 200),
        ("127.0.0.1", 200),
        ("[::1]:8000", 200),
        ("app.localhost", 200),
        ("rebound.example", 400),
        ("localhost.rebound.example", 400),
        ("[::1]rebound.example", 400),
    ],
)
async def test_on_loopback_only_loopback_names_are_answered(
    make_server: Callable[..., Any], settings: Settings, host: str, status: int
) -> None:
    """A page that rebinds its own name to 127.0.0.1 sends its own name as Host."""
    server: Server = await make_server(settings.with_(host="127.0.0.1"))
    async with server.session.get(server.url("/healthz"), headers={"Host": host}) as resp:
        assert resp.status == status


async def test_cors_answers_listed_origins_on_the_watching_routes_only(
    make_server: Callable[..., Any], settings: Settings
) -> None:
    origin = "https://app.example"
    server: Server = await make_server(settings.with_(secret=SECRET, cors_origins=(origin,)))
    task_path = "/tasks/0f1e2d3c-0000-4000-8000-000000000000"
    preflight = {
        "Origin": origin,
        "Access-Control-Request-Method": "DELETE",
        "Access-Control-Request-Headers": "authorization",
    }
    async with server.session.options(server.url(task_path), headers=preflight) as resp:
        assert resp.status == 204
        assert resp.headers["Access-Control-Allow-Origin"] == origin
        assert resp.headers["Access-Control-Allow-Methods"] == "DELETE"
        assert "Authorization" in resp.headers["Access-Control-Allow-Headers"]
    async with server.session.options(
        server.url(task_path), headers={**preflight, "Origin": "https://evil.example"}
    ) as resp:
        assert resp.status == 403 and "Access-Control-Allow-Origin" not in resp.headers
    recent = {**preflight, "Access-Control-Request-Method": "GET"}
    async with server.session.options(server.url("/tasks"), headers=recent) as resp:
        assert resp.status == 403, "the recent list is not for other origins"
    # A refusal is readable too: the page must see its 401 to renew its token.
    async with server.session.get(server.url(task_path), headers={"Origin": origin}) as resp:
        assert resp.status == 401
        assert resp.headers["Access-Control-Allow-Origin"] == origin and "Origin" in resp.headers["Vary"]
        assert "WWW-Authenticate" in resp.headers["Access-Control-Expose-Headers"]
    async with server.session.get(server.url(task_path), headers={"Origin": "https://evil.example"}) as resp:
        assert "Access-Control-Allow-Origin" not in resp.headers and "Origin" in resp.headers["Vary"]
    async with server.session.get(server.url("/tasks"), headers={"Origin": origin}) as resp:
        assert "Access-Control-Allow-Origin" not in resp.headers


@pytest.mark.parametrize("algorithm", ["RS256", "ES256"])
async def test_tokens_signed_with_the_host_apps_private_key(
    make_server: Callable[..., Any], settings: Settings, algorithm: str
) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    private: Any = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        if algorithm == "RS256"
        else ec.generate_private_key(ec.SECP256R1())
    )
    other: Any = (  # a key of the other kind: its tokens are refused with a 401, never a 500
        ec.generate_private_key(ec.SECP256R1())
        if algorithm == "RS256"
        else rsa.generate_private_key(public_exponent=65537, key_size=2048)
    )
    public = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    server: Server = await make_server(settings.with_(public_key=public.decode()))
    starter = bearer(start_token(["demo.count"], key=private, algorithm=algorithm))
    async with server.session.post(
        server.url("/tasks"), json={"name": "demo.count", "kwargs": {"n": 1, "delay": 0}}, headers=starter
    ) as resp:
        body = await resp.json()
        assert resp.status == 202 and "token" not in body, "holding only the public key, it cannot sign"
    watcher = bearer(watch_token([body["id"]], key=private, algorithm=algorithm))
    async with server.session.get(server.url(body["events_url"]), headers=watcher) as resp:
        assert (await SSEReader(resp).rest(timeout=30))[-1].payload["state"] == "success"
    for token in (
        watch_token([body["id"]], key=SECRET),
        jwt.encode({"operator": True, "exp": int(time.time()) + 60}, None, algorithm="none"),
        operator_token(key=other, algorithm="ES256" if algorithm == "RS256" else "RS256"),
    ):
        async with server.session.get(server.url(f"/tasks/{body['id']}"), headers=bearer(token)) as resp:
            assert resp.status == 401
            assert f"accepts tokens signed with {algorithm}, not" in (await resp.json())["error"]


def test_the_access_log_masks_a_token_in_the_query() -> None:
    import logging

    from aiohttp.test_utils import make_mocked_request
    from aiohttp.web import Response

    from progress_sse.web.access_log import TokenlessAccessLogger

    records: list[logging.LogRecord] = []
    logger = logging.getLogger("test-access-log")
    logger.setLevel(logging.INFO)
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger.addHandler(handler)
    try:
        request = make_mocked_request("GET", "/events?task=t1&token=eyJ.secret.part")
        TokenlessAccessLogger(logger).log(request, Response(), 0.01)
    finally:
        logger.removeHandler(handler)
    line = records[0].getMessage()
    assert "GET /events?task=t1&token=*** HTTP/1.1" in line and "secret" not in line


async def test_a_groups_token_covers_the_groups_members_and_nothing_else(world: World) -> None:
    """A page watches a group by its members (on /events): the group's token must let it."""
    server = world.server
    token = bearer(watch_token([], groups=[world.group], key=SECRET))
    async with server.session.get(server.url(f"/groups/{world.group}"), headers=token) as resp:
        members = (await resp.json())["members"]
    query = "&".join(f"task={member}" for member in members)
    async with server.session.get(server.url(f"/events?{query}"), headers=token) as resp:
        assert resp.status == 200
        frames = await SSEReader(resp).rest(timeout=30)
    assert {f.payload["task_id"] for f in frames if f.terminal} == set(members)
    async with server.session.get(server.url(f"/tasks/{members[0]}"), headers=token) as resp:
        assert resp.status == 200 and (await resp.json())["group_id"] == world.group
    async with server.session.get(server.url(f"/events?{query}&task={world.done}"), headers=token) as resp:
        assert resp.status == 403, "a task outside the group refuses the whole stream"
    cancel = bearer(watch_token([], groups=[world.group], cancel=True, key=SECRET))
    async with server.session.delete(server.url(f"/tasks/{members[0]}"), headers=cancel) as resp:
        assert resp.status == 403, "cancelling needs the task itself in the token"


async def test_a_start_without_a_string_name_is_the_allow_lists_to_refuse(world: World) -> None:
    """A 422 as with no tokens: there is no name for a token to refuse."""
    token = bearer(start_token(["demo.count"], key=SECRET))
    async with world.server.session.post(world.server.url("/tasks"), json={"name": ["demo.count"]}, headers=token) as r:
        assert r.status == 422, await r.text()
