"""Broadcast notices (`POST /notices`) end to end: every kind of stream shows them,
in every web process, a stream that opens later gets the latest, bad input and
missing scopes get their errors."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from progress_sse.config import Settings
from progress_sse.connections import hub_client_name, keys_for
from progress_sse.tokens import operator_token, watch_token
from progress_sse.web.notices import MAX_TEXT

from .conftest import Server, kill_connections
from .sse import SSEEvent, SSEReader

pytestmark = [pytest.mark.e2e, pytest.mark.both_backends, pytest.mark.usefixtures("worker")]

SECRET = "the-notices-test-secret-is-long-enough"


@pytest.fixture(autouse=True)
def forget_notices(settings: Settings, redis_client: redis.Redis) -> Iterator[None]:
    """A notice is kept for ten minutes, and every stream that opens is sent it: the
    tests after these must not get theirs."""
    yield
    redis_client.delete(keys_for(settings).notice)


async def post(server: Server, body: Any, **kwargs: Any) -> tuple[int, dict[str, Any]]:
    async with server.session.post(server.url("/notices"), json=body, **kwargs) as resp:
        return resp.status, await resp.json()


def notice(text: str) -> Callable[[SSEEvent], bool]:
    return lambda e: e.event == "notice" and e.payload["text"] == text


async def test_a_notice_reaches_every_kind_of_stream_in_every_process(
    make_server: Callable[..., Any], settings: Settings
) -> None:
    one: Server = await make_server(settings)
    other: Server = await make_server(settings)  # another web process of the same Redis
    task_id = await one.start_task("demo.count", n=200, delay=0.05)
    text = f"Deploying in 5 minutes ({task_id[:8]}): streams will reconnect."
    async with (
        one.session.get(one.url(f"/tasks/{task_id}/events")) as task_stream,
        other.session.get(other.url(f"/events?task={task_id}")) as many,
        other.session.get(other.url("/feed")) as feed,
    ):
        readers = [SSEReader(r) for r in (task_stream, many, feed)]
        # Each stream is open and has had its first frame of the task before the notice.
        firsts = [
            (await reader.until(lambda e: e.event != "notice" and e.payload.get("task_id") == task_id))[-1]
            for reader in readers
        ]
        status, body = await post(one, {"text": f"  {text}  "})
        assert status == 202 and body["text"] == text and body["id"]
        for reader, first in zip(readers, firsts, strict=True):
            *before, shown = await reader.until(notice(text))
            assert shown.payload == {"id": body["id"], "text": text, "ts": body["ts"]}
            assert shown.id == (before[-1] if before else first).id, "a notice moves no cursor"
    async with one.session.delete(one.url(f"/tasks/{task_id}")) as resp:  # it would hold a worker for 10 s
        assert resp.status == 202


async def test_a_stream_that_opens_later_gets_the_latest_notice_first(server: Server) -> None:
    _, first = await post(server, {"text": "first"})
    _, latest = await post(server, {"text": "the latest"})
    task_id = await server.start_task("demo.count", n=2, delay=0.01)
    async with server.session.get(server.url(f"/tasks/{task_id}/events")) as resp:
        events = await SSEReader(resp).rest()
    assert events[0].event == "notice" and events[0].payload["id"] == latest["id"] != first["id"]
    assert [e.event for e in events].count("notice") == 1
    assert events[-1].event == "success"


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({"text": ""}, 422, "not empty"),
        ({"text": "   "}, 422, "not empty"),
        ({"text": 5}, 422, "Give the notice a text"),
        ({}, 422, "Give the notice a text"),
        ({"text": "x" * (MAX_TEXT + 1)}, 422, f"at most {MAX_TEXT}"),
        (["text"], 400, "JSON object"),
    ],
)
async def test_a_notice_the_client_got_wrong_says_what_is_wrong(
    server: Server, body: Any, status: int, words: str
) -> None:
    got, answer = await post(server, body)
    assert (got, words in answer["error"]) == (status, True), answer


async def test_a_body_that_is_not_json_is_refused(server: Server) -> None:
    async with server.session.post(
        server.url("/notices"), data=b"{not json", headers={"Content-Type": "application/json"}
    ) as resp:
        assert resp.status == 400 and "not valid JSON" in (await resp.json())["error"]
    async with server.session.post(server.url("/notices"), data=b"hello") as resp:
        assert resp.status == 415 and "Content-Type: application/json" in (await resp.json())["error"]


async def test_posting_a_notice_needs_an_operator(make_server: Callable[..., Any], settings: Settings) -> None:
    server: Server = await make_server(settings.with_(secret=SECRET))
    assert (await post(server, {"text": "hi"}))[0] == 401
    watcher = {"Authorization": f"Bearer {watch_token(['t1'], key=SECRET)}"}
    status, answer = await post(server, {"text": "hi"}, headers=watcher)
    assert status == 403 and "operator" in answer["error"]
    operator = {"Authorization": f"Bearer {operator_token(key=SECRET)}"}
    assert (await post(server, {"text": "hi"}, headers=operator))[0] == 202


async def test_a_notice_stored_while_the_subscriber_was_away_is_shown_when_it_is_back(
    server: Server, settings: Settings, redis_client: redis.Redis
) -> None:
    """Pub/sub keeps nothing for a connection that is down: the kept notice is read
    again once the hub is subscribed again."""
    task_id = await server.start_task("demo.count", n=200, delay=0.05)
    try:
        async with server.session.get(server.url(f"/tasks/{task_id}/events")) as resp:
            reader = SSEReader(resp)
            await reader.until(lambda e: e.event != "notice")
            keys = keys_for(settings)
            missed = {"id": "missed-1", "text": "said while you were away", "ts": 1.0, "expires": time.time() + 60}
            redis_client.set(keys.notice, json.dumps(missed), ex=60)  # stored, its announcement unheard
            assert kill_connections(redis_client, hub_client_name(settings.key_prefix)) == keys.partitions
            shown = (await reader.until(notice("said while you were away")))[-1]
        assert shown.payload == {"id": "missed-1", "text": "said while you were away", "ts": 1.0}
    finally:
        async with server.session.delete(server.url(f"/tasks/{task_id}")) as resp:
            assert resp.status == 202
