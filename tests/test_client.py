"""The CLI's client side: the SSE parser, and `follow()`'s resume logic.

The parser is fed bytes cut at every possible place. The resume logic runs
against small aiohttp servers that drop the connection, end it early, answer 204,
fail for good or go silent, and check the `Last-Event-ID` they get back. Then,
against the real server, a restart mid-stream loses nothing.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from progress_sse.cli.client import (
    AccessRefused,
    CannotConnect,
    Reconnecting,
    Rejected,
    Reset,
    RetryPolicy,
    TaskEvent,
    TaskNotFound,
    cancel_task,
    fetch_state,
    follow,
    new_session,
    start_task,
)
from progress_sse.cli.decoder import MAX_LINE, SSEDecoder, SSEError, SSEFrame
from progress_sse.config import Settings
from progress_sse.web import create_app

from .conftest import wait_until

TASK = "t-1"
FAST = RetryPolicy(initial=0.01, maximum=0.05, give_up_after=5)


def parse(*chunks: bytes) -> list[SSEFrame]:
    decoder = SSEDecoder()
    return [frame for chunk in chunks for frame in decoder.feed(chunk)]


# --- the parser ------------------------------------------------------------------


def test_a_frame_has_its_id_event_and_data() -> None:
    assert parse(b'id: 7\nevent: progress\ndata: {"a":1}\n\n') == [SSEFrame("progress", '{"a":1}', "7")]


def test_multi_line_data_is_joined_with_newlines() -> None:
    assert parse(b"data: one\ndata:two\ndata:  three\n\n")[0].data == "one\ntwo\n three"


def test_comments_and_blank_lines_alone_dispatch_nothing() -> None:
    assert parse(b": ping\n\n: another\n\n\n\n") == []
    assert parse(b": ping\ndata: x\n: mid-frame comment\n\n") == [SSEFrame("message", "x", None)]


def test_comments_are_told_to_whoever_asks_in_order_even_split_across_chunks() -> None:
    heard: list[str] = []
    decoder = SSEDecoder(on_comment=heard.append)
    frames = [*decoder.feed(b": pi"), *decoder.feed(b"ng\r\ndata: x\n:second \n\n"), *decoder.feed(b":\n\n")]
    assert heard == ["ping", "second", ""]
    assert frames == [SSEFrame("message", "x", None)], "comments still dispatch nothing"


def test_event_defaults_to_message_and_resets_after_each_frame() -> None:
    frames = parse(b"event: queued\ndata: 1\n\ndata: 2\n\n")
    assert [f.event for f in frames] == ["queued", "message"]


def test_the_id_persists_until_the_next_id_line() -> None:
    frames = parse(b"id: 1\ndata: a\n\ndata: b\n\nid: 2\ndata: c\n\n")
    assert [f.id for f in frames] == ["1", "1", "2"]


def test_an_id_only_frame_moves_the_cursor_but_is_not_dispatched() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"id: 41\n\n") == []
    assert decoder.last_event_id == "41"


def test_a_frame_cut_off_before_its_blank_line_is_never_dispatched_nor_moves_the_cursor() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"id: 1\ndata: a\n\nid: 2\ndata: b\n") == [SSEFrame("message", "a", "1")]
    assert decoder.last_event_id == "1"


def test_an_id_with_nul_is_ignored() -> None:
    assert parse(b"id: 5\ndata: a\n\nid: 6\x00\ndata: b\n\n")[1].id == "5"


def test_field_without_colon_and_only_one_leading_space_stripped() -> None:
    # "data" alone is an empty data line; "event:x" has no space to strip.
    assert parse(b"data\ndata\n\n") == [SSEFrame("message", "\n", None)]
    assert parse(b"event:x\ndata:  two spaces\n\n") == [SSEFrame("x", " two spaces", None)]


def test_unknown_fields_are_ignored_and_retry_is_kept() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"foo: bar\nretry: 2500\nretry: soon\ndata: x\n\n") == [SSEFrame("message", "x", None)]
    assert decoder.retry == 2500


@pytest.mark.parametrize("eol", [b"\n", b"\r\n", b"\r"])
def test_every_line_ending_is_understood(eol: bytes) -> None:
    stream = eol.join([b"id: 3", b"event: progress", b"data: x", b"data: y", b"", b""])
    assert parse(stream) == [SSEFrame("progress", "x\ny", "3")]


def test_bytes_cut_anywhere_give_the_same_frames() -> None:
    stream = (
        '\ufeff: ping\r\n\r\nid: 1\r\nevent: progress\r\ndata: {"message": "caf\u00e9 \u2713"}\r\n\r\n'
        "id: 2\revent: success\rdata: done\r\r"
    ).encode()
    whole = parse(stream)
    assert whole == [
        SSEFrame("progress", '{"message": "caf\u00e9 \u2713"}', "1"),
        SSEFrame("success", "done", "2"),
    ]
    for cut in range(1, len(stream)):
        assert parse(stream[:cut], stream[cut:]) == whole, cut
    assert parse(*(stream[i : i + 1] for i in range(len(stream)))) == whole


def test_a_cr_at_a_chunk_end_followed_by_lf_is_one_line_end() -> None:
    # CR | LF split over two chunks must not count as two line ends (that would be a blank line).
    assert parse(b"data: a\r", b"\ndata: b\r\n\r\n") == [SSEFrame("message", "a\nb", None)]


def test_invalid_utf8_is_replaced_not_fatal() -> None:
    assert parse(b"data: \xff\xfe ok\n\n")[0].data == "\ufffd\ufffd ok"


def test_an_endless_line_is_refused() -> None:
    decoder = SSEDecoder()
    with pytest.raises(SSEError):
        for _ in range(MAX_LINE // 65536 + 2):
            decoder.feed(b"x" * 65536)


# --- follow() against scripted servers ---------------------------------------------


# Ids as the server sends them: `<epoch>-<n>`, opaque strings to the client.
EPOCH, NEW_EPOCH = "k3x7f2ab", "q7zz4mnc"


def cid(n: int, epoch: str = EPOCH) -> str:
    return f"{epoch}-{n}"


def frame(
    seq: int | None, state: str, current: int = 0, total: int | None = 5, epoch: str = EPOCH, **extra: Any
) -> bytes:
    """A state frame; `seq` None: one with no `id:` line."""
    payload = {"task_id": TASK, "name": "demo.count", "state": state, "current": current, "total": total, **extra}
    id_line = "" if seq is None else f"id: {cid(seq, epoch)}\n"
    return f"{id_line}event: {state}\ndata: {json.dumps(payload)}\n\n".encode()


STORY = [
    frame(1, "queued"),
    frame(2, "started"),
    frame(3, "progress", 1),
    frame(4, "progress", 2),
    frame(5, "progress", 3),
    frame(6, "success", 5, result={"processed": 5}),
]


Handler = Callable[[web.Request, int], Awaitable[web.StreamResponse]]


class Scripted:
    """A server whose /tasks/<id>/events handler is given per test; it records each request's cursor."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.cursors: list[str | None] = []
        self.release = asyncio.Event()  # lets hanging handlers finish at teardown
        self.app = web.Application()
        self.app.router.add_get("/tasks/{id}/events", self._events)
        self.app.router.add_get("/tasks/{id}", self._state)
        self.state: dict[str, Any] = {"state": "success", "task_id": TASK, "cursor": cid(9), "result": 1}

    async def _events(self, request: web.Request) -> web.StreamResponse:
        self.cursors.append(request.headers.get("Last-Event-ID"))
        return await self.handler(request, len(self.cursors))

    async def _state(self, request: web.Request) -> web.Response:
        return web.json_response(self.state)


async def stream(request: web.Request, *chunks: bytes) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    await resp.write(b": ping\n\n")
    for chunk in chunks:
        await resp.write(chunk)
    return resp


async def drop(request: web.Request, resp: web.StreamResponse) -> web.StreamResponse:
    """Cut the connection mid-response, as a crashed server or a network failure would."""
    assert request.transport is not None
    request.transport.abort()
    return resp


ALL = [cid(n) for n in range(1, len(STORY) + 1)]


def after(cursor: str | None) -> list[bytes]:
    start = ALL.index(cursor) + 1 if cursor else 0
    return STORY[start:]


@pytest.fixture
async def scripted(aiohttp_server: Any) -> AsyncIterator[Callable[[Handler], Awaitable[tuple[Scripted, str]]]]:
    made: list[Scripted] = []

    async def make(handler: Handler) -> tuple[Scripted, str]:
        script = Scripted(handler)
        made.append(script)
        server = await aiohttp_server(script.app)
        return script, str(server.make_url("/"))

    yield make
    for script in made:
        script.release.set()


Item = TaskEvent | Reconnecting | Reset


async def collect(base: str, policy: RetryPolicy = FAST, cursor: str | None = None, **kwargs: Any) -> list[Item]:
    async with new_session(**kwargs) as session:
        return [item async for item in follow(session, base, TASK, policy=policy, cursor=cursor)]


def events(items: list[Item]) -> list[TaskEvent]:
    return [i for i in items if isinstance(i, TaskEvent)]


async def test_a_dropped_stream_resumes_from_the_last_event_id_and_misses_nothing(scripted: Any) -> None:
    async def handler(request: web.Request, n: int) -> web.StreamResponse:
        if n == 1:
            # Three frames, the third split over two writes, then the connection dies.
            third = STORY[2]
            resp = await stream(request, STORY[0], STORY[1], third[:10])
            await resp.write(third[10:])
            return await drop(request, resp)
        resp = await stream(request, *after(request.headers.get("Last-Event-ID")))
        await resp.write_eof()
        return resp

    script, base = await scripted(handler)
    items = await collect(base)
    assert script.cursors == [None, cid(3)]
    assert [e.cursor for e in events(items)] == ALL
    assert [e.state for e in events(items)] == ["queued", "started", "progress", "progress", "progress", "success"]
    assert events(items)[-1].payload["result"] == {"processed": 5}
    notices = [i for i in items if isinstance(i, Reconnecting)]
    assert len(notices) == 1 and notices[0].attempt == 1


async def test_a_frame_cut_in_half_by_the_drop_is_asked_for_again(scripted: Any) -> None:
    async def handler(request: web.Request, n: int) -> web.StreamResponse:
        if n == 1:
            return await drop(request, await stream(request, STORY[0], STORY[1], STORY[2][:-3]))
        resp = await stream(request, *after(request.headers.get("Last-Event-ID")))
        await resp.write_eof()
        return resp

    script, base = await scripted(handler)
    items = await collect(base)
    assert script.cursors == [None, cid(2)]
    assert [e.cursor for e in events(items)] == ALL


async def test_a_stream_that_ends_before_the_task_is_resumed_too(scripted: Any) -> None:
    # What the real server does on shutdown: the response ends, no terminal event.
    async def handler(request: web.Request, n: int) -> web.StreamResponse:
        frames = STORY[:2] if n == 1 else after(request.headers.get("Last-Event-ID"))
        resp = await stream(request, *frames)
        await resp.write_eof()
        return resp

    script, base = await scripted(handler)
    items = await collect(base)
    assert script.cursors == [None, cid(2)]
    assert [e.cursor for e in events(items)] == ALL


async def test_a_204_on_reconnect_means_it_ended_and_the_state_says_how(scripted: Any) -> None:
    async def handler(request: web.Request, n: int) -> web.StreamResponse:
        if n == 1:
            return await drop(request, await stream(request, *STORY[:3]))
        return web.Response(status=204)

    script, base = await scripted(handler)
    script.state = {"task_id": TASK, "state": "failure", "error": {"type": "E", "message": "m"}, "cursor": cid(9)}
    items = await collect(base)
    assert script.cursors == [None, cid(3)]
    final = events(items)[-1]
    assert (final.state, final.cursor, final.terminal) == ("failure", cid(9), True)
    assert final.payload["error"]["type"] == "E"


async def test_a_404_is_task_not_found_with_the_servers_message(scripted: Any) -> None:
    async def handler(request: web.Request, n: int) -> web.StreamResponse:
        return web.json_response({"error": "There is no task 't-1'."}, status=404)

    _, base = await scripted(handler)
    with pytest.raises(TaskNotFound, match="There is no task 't-1'"):
        await collect(base)


async def test_the_first_connection_fails_fast(unused_tcp_port: int) -> None:
    loop = asyncio.get_running_loop()
    began = loop.time()
    with pytest.raises(CannotConnect, match="cannot watch"):
        await collect(f"http://127.0.0.1:{unused_tcp_port}", RetryPolicy(give_up_after=60))
    assert loop.time() - began < 5  # no minute of retries for a wrong URL


async def test_a_page_that_is_not_an_event_stream_is_refused(scripted: Any) -> None:
    async def handler(request: web.Request, n: int) -> web.StreamResponse:
        return web.Response(text="<html>", content_type="text/html")

    _, base = await scripted(handler)
    with pytest.raises(CannotConnect, match="not an event stream"):
        await collect(base)


async def test_reconnects_back_off_and_give_up_when_the_server_stays_down(scripted: Any) -> None:
    async def handler(request: web.Request, n: int) -> web.StreamResponse:
        if n == 1:
            return await drop(request, await stream(request, STORY[0]))
        return web.json_response({"error": "Redis does not answer."}, status=503)

    script, base = await scripted(handler)
    policy = RetryPolicy(initial=0.02, maximum=0.1, give_up_after=0.6)
    seen: list[Item] = []
    loop = asyncio.get_running_loop()
    began = loop.time()
    with pytest.raises(CannotConnect, match="Redis does not answer"):
        async with new_session() as session:
            async for item in follow(session, base, TASK, policy=policy):
                seen.append(item)
    took = loop.time() - began
    notices = [i for i in seen if isinstance(i, Reconnecting)]
    assert [n.attempt for n in notices] == list(range(1, len(notices) + 1))
    assert all(n.delay <= policy.maximum for n in notices)
    assert 3 <= len(notices) <= 30, notices  # backed off, not hammered
    assert 0.6 <= took < 5
    assert set(script.cursors[1:]) == {cid(1)}  # every retry asks for what follows event 1


async def test_a_silent_connection_is_abandoned_and_resumed(scripted: Any) -> None:
    async def handler(request: web.Request, n: int) -> web.StreamResponse:
        if n == 1:
            resp = await stream(request, STORY[0])
            await script.release.wait()  # then nothing, not even a ping
            return resp
        resp = await stream(request, *after(request.headers.get("Last-Event-ID")))
        await resp.write_eof()
        return resp

    script, base = await scripted(handler)
    items = await collect(base, idle_timeout=0.3)
    assert script.cursors == [None, cid(1)]
    assert [e.cursor for e in events(items)] == ALL


# --- reset frames: the server's history started over ---------------------------------------


def reset(reason: str = "history_lost", *missing: str) -> bytes:
    """A reset frame as the server sends it: no `id:` line."""
    data = {"reason": reason, "message": "The event history was lost.", "missing": list(missing)}
    return f"event: reset\ndata: {json.dumps(data)}\n\n".encode()


def kinds(items: list[Item]) -> list[str]:
    """Each item as `reset`, `reconnecting`, or its state and cursor."""
    return [
        "reset" if isinstance(i, Reset) else "reconnecting" if isinstance(i, Reconnecting) else f"{i.state}@{i.cursor}"
        for i in items
    ]


async def test_a_reset_is_yielded_then_the_new_history_is_followed_and_resumed_in(scripted: Any) -> None:
    new = frame(1, "progress", 2, epoch=NEW_EPOCH)  # the task's current state in the new history

    async def handler(request: web.Request, n: int) -> web.StreamResponse:
        if n == 1:
            return await drop(request, await stream(request, *STORY[:3], reset(), new))
        resp = await stream(request, frame(2, "success", 5, epoch=NEW_EPOCH, result=1))
        await resp.write_eof()
        return resp

    script, base = await scripted(handler)
    items = await collect(base)
    assert script.cursors == [None, cid(1, NEW_EPOCH)], "resumed in the new history, not the lost one"
    assert kinds(items) == [
        *(f"{state}@{cid(n)}" for n, state in ((1, "queued"), (2, "started"), (3, "progress"))),
        "reset",
        f"progress@{cid(1, NEW_EPOCH)}",
        "reconnecting",
        f"success@{cid(2, NEW_EPOCH)}",
    ]
    told = items[3]
    assert told == Reset("history_lost", "The event history was lost.", (), cid(3))  # the cursor it leaves


async def test_a_task_missing_after_a_reset_is_still_followed_to_its_end(scripted: Any) -> None:
    async def handler(request: web.Request, n: int) -> web.StreamResponse:
        later = [frame(1, "progress", 4, epoch=NEW_EPOCH), frame(2, "success", 5, epoch=NEW_EPOCH, result=1)]
        resp = await stream(request, *STORY[:2], reset("history_lost", TASK), *later)
        await resp.write_eof()
        return resp

    script, base = await scripted(handler)
    items = await collect(base)
    assert script.cursors == [None], "one stream: a missing task is not an end"
    assert kinds(items) == [
        f"queued@{cid(1)}",
        f"started@{cid(2)}",
        "reset",
        *(f"{s}@{cid(n, NEW_EPOCH)}" for n, s in ((1, "progress"), (2, "success"))),
    ]
    assert [i.missing for i in items if isinstance(i, Reset)] == [(TASK,)]


async def test_a_state_without_an_id_is_yielded_and_keeps_the_cursor(scripted: Any) -> None:
    # A state that outlived its history comes with no `id:` line: shown, but no place to resume from.
    survivor = frame(None, "progress", 3)

    async def handler(request: web.Request, n: int) -> web.StreamResponse:
        if n == 1:
            return await drop(request, await stream(request, reset("cursor_unknown"), survivor))
        resp = await stream(request, reset("cursor_unknown"), survivor, frame(1, "success", 5, epoch=NEW_EPOCH))
        await resp.write_eof()
        return resp

    script, base = await scripted(handler)
    items = await collect(base, cursor=cid(2))
    assert script.cursors == [cid(2), cid(2)], "the frame without an id neither cleared nor moved the cursor"
    assert kinds(items) == [
        "reset",
        f"progress@{cid(2)}",
        "reconnecting",
        "reset",
        f"progress@{cid(2)}",
        f"success@{cid(1, NEW_EPOCH)}",
    ]
    assert [i.reason for i in items if isinstance(i, Reset)] == ["cursor_unknown", "cursor_unknown"]


async def test_start_task_reports_the_servers_refusal(aiohttp_server: Any) -> None:
    app = web.Application()

    async def refuse(request: web.Request) -> web.Response:
        return web.json_response({"error": "n must be at least 1, not 0."}, status=422)

    app.router.add_post("/tasks", refuse)
    server = await aiohttp_server(app)

    async with new_session() as session:
        with pytest.raises(Rejected, match="n must be at least 1") as caught:
            await start_task(session, str(server.make_url("/")), "demo.count", kwargs={"n": 0})
    assert caught.value.status == 422


# --- the access token --------------------------------------------------------------------

TOKEN = "eyJhbGciOiJIUzI1NiJ9.eyJ0YXNrcyI6WyJ0LTEiXX0.c2lnbmF0dXJl"


async def test_the_token_rides_every_request_in_the_header_never_in_the_url(aiohttp_server: Any) -> None:
    # A first stream that drops, a reconnect answered 204, then the state: three requests.
    seen: list[tuple[str, str | None]] = []

    async def stream_or_204(request: web.Request) -> web.StreamResponse:
        seen.append((str(request.rel_url), request.headers.get("Authorization")))
        if len(seen) == 1:
            return await drop(request, await stream(request, *STORY[:3]))
        return web.Response(status=204)

    async def state(request: web.Request) -> web.Response:
        seen.append((str(request.rel_url), request.headers.get("Authorization")))
        return web.json_response({"task_id": TASK, "state": "success", "cursor": cid(9), "result": 1})

    app = web.Application()
    app.router.add_get("/tasks/{id}/events", stream_or_204)
    app.router.add_get("/tasks/{id}", state)
    server = await aiohttp_server(app)
    async with new_session() as session:
        items = [i async for i in follow(session, str(server.make_url("/")), TASK, policy=FAST, token=TOKEN)]
    assert events(items)[-1].state == "success"
    assert [path for path, _ in seen] == [f"/tasks/{TASK}/events", f"/tasks/{TASK}/events", f"/tasks/{TASK}"]
    assert {auth for _, auth in seen} == {f"Bearer {TOKEN}"}


async def test_no_token_sends_no_authorization_header(scripted: Any) -> None:
    headers: list[str | None] = []

    async def handler(request: web.Request, n: int) -> web.StreamResponse:
        headers.append(request.headers.get("Authorization"))
        resp = await stream(request, *STORY)
        await resp.write_eof()
        return resp

    _, base = await scripted(handler)
    await collect(base)
    assert headers == [None]


@pytest.mark.parametrize("status", [401, 403])
async def test_a_refusal_on_reconnect_ends_the_watch_with_the_servers_sentence(scripted: Any, status: int) -> None:
    # The server ends the stream when the token expires; the reconnect is refused.
    sentence = "The token has expired; get a new one."

    async def handler(request: web.Request, n: int) -> web.StreamResponse:
        if n == 1:
            resp = await stream(request, *STORY[:3])
            await resp.write_eof()
            return resp
        return web.json_response({"error": sentence}, status=status)

    script, base = await scripted(handler)
    seen: list[Item] = []
    with pytest.raises(AccessRefused) as caught:
        async with new_session() as session:
            async for item in follow(session, base, TASK, policy=FAST, token=TOKEN):
                seen.append(item)
    assert (caught.value.status, caught.value.reason) == (status, sentence)
    assert str(caught.value) == f"access refused ({status}): {sentence}"
    assert script.cursors == [None, cid(3)], "refused once, and not asked again"
    assert [e.cursor for e in events(seen)] == ALL[:3]


async def test_a_refusal_without_a_sentence_still_says_what_happened(scripted: Any) -> None:
    async def handler(request: web.Request, n: int) -> web.StreamResponse:
        return web.Response(status=401, text="<html>Unauthorized</html>", content_type="text/html")

    _, base = await scripted(handler)
    with pytest.raises(AccessRefused, match=r"^access refused \(401\): the server asks for a token"):
        await collect(base)


async def test_start_and_cancel_send_the_token_and_start_returns_the_servers_watch_token(aiohttp_server: Any) -> None:
    auth: list[str | None] = []
    answers: list[Any] = ["watch.token.x", 42, None]

    async def start(request: web.Request) -> web.Response:
        auth.append(request.headers.get("Authorization"))
        body: dict[str, Any] = {"id": f"task-{len(auth)}", "state": "queued"}
        if (answer := answers[len(auth) - 1]) is not None:
            body["token"] = answer
        return web.json_response(body, status=202)

    async def cancel(request: web.Request) -> web.Response:
        auth.append(request.headers.get("Authorization"))
        return web.json_response({"error": "This token may not cancel tasks: it has no cancel scope."}, status=403)

    app = web.Application()
    app.router.add_post("/tasks", start)
    app.router.add_delete("/tasks/{id}", cancel)
    server = await aiohttp_server(app)
    base = str(server.make_url("/"))
    async with new_session() as session:
        started = [await start_task(session, base, "demo.count", token=TOKEN) for _ in answers]
        with pytest.raises(AccessRefused, match=r"^access refused \(403\): This token may not cancel") as caught:
            await cancel_task(session, base, "task-1", token=TOKEN)
    assert [(s.id, s.token) for s in started] == [("task-1", "watch.token.x"), ("task-2", None), ("task-3", None)]
    assert caught.value.status == 403
    assert auth == [f"Bearer {TOKEN}"] * 4


# --- follow() against the real server ----------------------------------------------------


@pytest.mark.e2e
@pytest.mark.usefixtures("worker")
async def test_a_real_server_restart_mid_stream_loses_and_repeats_nothing(
    settings: Settings, redis_client: Any, unused_tcp_port_factory: Callable[[], int]
) -> None:
    port = unused_tcp_port_factory()
    first = TestServer(create_app(settings), port=port)
    await first.start_server()
    second: TestServer | None = None
    base = f"http://127.0.0.1:{port}"
    items: list[Item] = []
    try:
        async with new_session() as session:
            task_id = (await start_task(session, base, "demo.count", kwargs={"n": 30, "delay": 0.05})).id
            policy = RetryPolicy(initial=0.05, maximum=0.2, give_up_after=30)
            async for item in follow(session, base, task_id, policy=policy):
                items.append(item)
                if isinstance(item, TaskEvent) and item.state == "progress" and not first.closed:
                    await first.close()  # the server shuts down: its streams end, no terminal event
                elif isinstance(item, Reconnecting) and second is None:
                    second = TestServer(create_app(settings), port=port)
                    await second.start_server()
            async with session.get(f"{base}/tasks/{task_id}/events?last_event_id=0") as resp:
                history = await resp.text()  # a finished task's whole log: the response ends
    finally:
        await first.close()
        if second is not None:
            await second.close()
    assert second is not None, "the stream never dropped"
    got = events(items)
    cursors = [e.cursor for e in got]
    stored = [line[4:] for line in history.splitlines() if line.startswith("id: ")]
    # Exactly the stored events from the first one we saw on: no gap, no repeat. The
    # ids are compared as the opaque strings they are.
    assert cursors[0] in stored, (cursors, stored)
    assert cursors == stored[stored.index(cursors[0]) :]
    assert got[-1].state == "success" and got[-1].payload["result"] == {"processed": 30}
    assert any(isinstance(i, Reconnecting) for i in items)


@pytest.mark.e2e
@pytest.mark.usefixtures("worker")
async def test_following_a_real_finished_task_from_its_last_cursor_gets_204_then_its_state(server: Any) -> None:
    task_id = await server.start_task("demo.count", n=2, delay=0)

    async def finished() -> bool:
        return (await server.state(task_id))["state"] == "success"

    await wait_until(finished, timeout=30, what="demo.count to succeed")
    state = await server.state(task_id)
    async with new_session() as session:
        assert (await fetch_state(session, server.url("/"), task_id))["cursor"] == state["cursor"]
        async with session.get(
            server.url(f"/tasks/{task_id}/events"), headers={"Last-Event-ID": str(state["cursor"])}
        ) as resp:
            assert resp.status == 204
        items = [i async for i in follow(session, server.url("/"), task_id, cursor=str(state["cursor"]))]
    assert len(items) == 1 and isinstance(items[0], TaskEvent)
    assert items[0].state == "success" and items[0].payload["result"] == {"processed": 2}
