"""The browser side of epoch cursors and `reset` frames (docs/protocol.md, "Reset").

static/progress.js runs in a real headless Chromium against a scripted
EventSource: the test sends each frame the server would send (with or without an
`id:` line, as EventSource reports it) and reads what the client did with it: the
handlers it called, the states it holds, the cursor of the stream it reopens. The
page itself (page.js, card.js) then runs against the real server, with the same
scripted stream, to show what a card looks like once its history is lost.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import redis
from aiohttp import web

from progress_sse.config import Settings
from progress_sse.connections import sync_client
from progress_sse.events import State, make_event
from progress_sse.keys import Keys
from progress_sse.web import HUB
from progress_sse.web.pages import asset_dir
from progress_sse.worker.publisher import Publisher

from .browser import Page, page_for_test
from .conftest import Server, wait_until

pytestmark = pytest.mark.browser

# An EventSource the test drives. `emit(type, data, id)` dispatches one frame as the
# browser would: `id` undefined is a frame without an `id:` line, which keeps the
# last id, as EventSource does. Each source is in window.sources, newest last.
SCRIPTED_EVENT_SOURCE = """
window.sources = [];
window.EventSource = class ScriptedEventSource extends EventTarget {
  constructor(url) {
    super();
    this.url = String(url);
    this.lastEventId = "";
    this.closed = false;
    this.onopen = null;
    this.onerror = null;
    window.sources.push(this);
  }
  close() { this.closed = true; }
  emit(type, data, id) {
    if (id !== undefined) this.lastEventId = id;
    this.dispatchEvent(new MessageEvent(type, { data: JSON.stringify(data), lastEventId: this.lastEventId }));
  }
};
"""

OLD, NEW = "k3x7f2ab", "q7zz4mnc"  # two epochs: two histories of the event log


@pytest.fixture
async def origin(aiohttp_server: Any) -> str:
    """A page and the static modules on one origin: progress.js needs no Redis."""
    app = web.Application()

    async def blank(request: web.Request) -> web.Response:
        # No favicon to ask for: a 404 would count as a page error.
        page = '<!doctype html><title>client</title><link rel="icon" href="data:,">'
        return web.Response(text=page, content_type="text/html")

    app.router.add_get("/", blank)
    app.router.add_static("/static", asset_dir("static"))
    server = await aiohttp_server(app)
    return str(server.make_url("/"))


@pytest.fixture
async def client(request: pytest.FixtureRequest, output_dir: Path, origin: str) -> AsyncIterator[Page]:
    """A page with progress.js imported as window.client, the scripted EventSource,
    and window.calls, where `record(name)` handlers write what they were called with."""
    async with page_for_test(request.node.name, output_dir, SCRIPTED_EVENT_SOURCE) as page:
        await page.page.goto(origin)
        await page.page.evaluate(
            """async (url) => {
                 window.client = await import(url);
                 window.calls = [];
                 window.record = (name) => (arg) => window.calls.push([name, arg ?? null]);
               }""",
            f"{origin}static/progress.js",
        )
        yield page


async def sources(page: Page, count: int) -> list[dict[str, Any]]:
    """Wait until `count` streams were opened (the client opens on a timer); each one's
    tasks, fresh tasks and cursor."""
    await page.page.wait_for_function("(count) => window.sources.length >= count", arg=count, timeout=5_000)
    urls: list[str] = await page.page.evaluate("() => window.sources.map((s) => s.url)")
    return [query(url) for url in urls]


def query(url: str) -> dict[str, Any]:
    params = parse_qs(urlsplit(url).query)
    return {"task": params.get("task", []), "fresh": params.get("fresh", []), "cursor": params.get("last_event_id")}


async def emit(page: Page, kind: str, data: dict[str, Any], event_id: str | None = None) -> None:
    """One frame on the newest stream; `event_id` None: a frame without an `id:` line."""
    await page.page.evaluate(
        "([kind, data, id]) => window.sources.at(-1).emit(kind, data, id ?? undefined)", [kind, data, event_id]
    )


def progress(task_id: str, current: int, total: int = 450, state: str = "progress") -> dict[str, Any]:
    return {"task_id": task_id, "name": "demo.count", "state": state, "current": current, "total": total}


async def calls(page: Page) -> list[list[Any]]:
    found: list[list[Any]] = await page.page.evaluate("() => window.calls")
    return found


async def test_is_after_orders_ids_within_an_epoch_and_takes_another_epoch_as_newer(client: Page) -> None:
    cases = [
        (f"{OLD}-10", f"{OLD}-9", True),  # by number, not by text ("10" < "9")
        (f"{OLD}-9", f"{OLD}-10", False),
        (f"{OLD}-10", f"{OLD}-10", False),
        (f"{NEW}-1", f"{OLD}-500", True),  # a new history: what came before no longer counts
        (f"{OLD}-500", f"{NEW}-1", True),
        (f"{OLD}-9007199254740993", f"{OLD}-9007199254740992", True),  # past 2^53, where Numbers collide
        (f"{OLD}-1", None, True),  # nothing seen yet
        (f"{OLD}-1", "0", True),  # the cursor 0: the start
        ("12", "9", True),  # ids of a server from before epochs still order
    ]
    answers = await client.page.evaluate(
        "(cases) => cases.map(([id, than]) => client.isAfter(id, than))", [[a, b] for a, b, _ in cases]
    )
    assert answers == [expected for _, _, expected in cases]


async def test_is_after_compares_composite_ids_by_their_lead_and_takes_any_other_history_as_newer(
    client: Page,
) -> None:
    # Composite ids (a Redis Cluster): `<digest>.<p><n>...`, p one base62 digit, n in
    # base62; the first entry is the lead, the partition of the event the id came with.
    cases = [
        (f"{OLD}.310.0a", f"{OLD}.0a.39", True),  # lead 3: 62 > 9, by number, not by text
        (f"{OLD}.3z.0a", f"{OLD}.0a.3z", False),  # lead equal
        (f"{OLD}.3y.0a", f"{OLD}.0a.3z", False),  # lead smaller
        (f"{OLD}.3z.0Z", f"{OLD}.0a.3z", False),  # only the lead compares, not the other partitions
        (f"{OLD}.0b.3a", f"{OLD}.0a.3z", True),  # lead 0 is ahead, though partition 3 is behind
        (f"{OLD}.310", f"{OLD}.3Z", True),  # 62 > 61: a longer number is larger
        (f"{OLD}.b1", f"{OLD}.0a.3z", True),  # `than` has no count for partition 11
        (f"{NEW}.31", f"{OLD}.3z", True),  # another digest: a new history
        (f"{OLD}.3z", f"{NEW}.3z", True),
        (f"{OLD}.31", f"{OLD}-500", True),  # composite against today's form, both ways
        (f"{OLD}-1", f"{OLD}.3z", True),
        (f"{OLD}.31", "0", True),  # the cursor 0: the start
        ("12", f"{OLD}.3z", True),
        (f"{OLD}.31000000001", f"{OLD}.31000000000", True),  # 62^9 + 1 > 62^9, past 2^53
        (f"{OLD}.31000000000", f"{OLD}.31000000001", False),
        (f"{OLD}.3A", f"{OLD}.3a", True),  # case-sensitive: 'A' is 36, 'a' is 10
        (f"{OLD}.3a", f"{OLD}.3A", False),
        (f"{OLD}.a1", f"{OLD}.A5", True),  # partition 'a' (10) is not partition 'A' (36)
        (f"{OLD}.31", None, True),  # nothing seen yet
        # Malformed: what would otherwise compare as not after is after.
        (f"{OLD}.301", f"{OLD}.3z", True),  # a leading zero
        (f"{OLD}.31.35", f"{OLD}.3z", True),  # a partition twice
        (f"{OLD}.3", f"{OLD}.3z", True),  # an entry without a number
        (f"{OLD}.3_", f"{OLD}.3z", True),  # not a base62 digit
        (f"{OLD}.31.", f"{OLD}.3z", True),  # an empty entry
        (f"{OLD}.31", f"{OLD}.3z.", True),  # `than` malformed
        ("K3X7F2AB.31", "K3X7F2AB.3z", True),  # the digest is lower case
        ("k3x7f2a.31", "k3x7f2a.3z", True),  # the digest is 8 characters
        (OLD, f"{OLD}.3z", True),  # no entry at all
    ]
    answers = await client.page.evaluate(
        "(cases) => cases.map(([id, than]) => client.isAfter(id, than))", [[a, b] for a, b, _ in cases]
    )
    assert answers == [expected for _, _, expected in cases]


async def test_the_cursor_is_the_latest_id_string_and_never_goes_back_within_an_epoch(client: Page) -> None:
    await client.page.evaluate("() => { window.w = client.watch(['a'], { onEvent: record('event') }); }")
    await sources(client, 1)
    await emit(client, "progress", progress("a", 10), f"{OLD}-10")
    await emit(client, "progress", progress("a", 9), f"{OLD}-9")  # older: seen already
    await client.page.evaluate("() => w.add('b')")
    reopened = (await sources(client, 2))[1]
    assert reopened == {"task": ["a", "b"], "fresh": ["b"], "cursor": [f"{OLD}-10"]}
    await emit(client, "queued", progress("b", 0, state="queued"), f"{OLD}-8")  # b's state, with an older id
    await client.page.evaluate("() => w.add('c')")
    assert (await sources(client, 3))[2]["cursor"] == [f"{OLD}-10"], "the cursor did not go back"
    assert [(call[1]["task_id"], call[1]["current"]) for call in await calls(client)] == [("a", 10), ("b", 0)]


async def test_a_reset_applies_the_states_that_follow_and_keeps_missing_tasks_streaming(client: Page) -> None:
    await client.page.evaluate(
        """() => {
             window.w = client.watch(['a', 'b', 'c'], {
               onEvent: record('event'), onReset: record('reset'), onDone: record('done'), onUnknown: record('unknown'),
             });
           }"""
    )
    await sources(client, 1)
    await emit(client, "progress", progress("a", 50), f"{OLD}-20")
    await emit(client, "progress", progress("b", 7), f"{OLD}-21")
    await emit(client, "success", progress("c", 450, state="success"), f"{OLD}-22")
    told = {"reason": "cursor_unknown", "message": "That cursor names no place in this history.", "missing": ["b", "c"]}
    await emit(client, "reset", told)
    assert (await calls(client))[-1] == ["reset", told]
    # b lost its state but not its stream; c's end, seen before, stays an end.
    states = await client.page.evaluate("() => [...w.tasks].map(([id, t]) => [id, t.state])")
    assert states == [["a", "progress"], ["b", None], ["c", "success"]]
    assert await client.page.evaluate("() => w.pending()") == ["a", "b"]

    await emit(client, "progress", progress("a", 3), f"{OLD}-3")  # looks older than 20: applied all the same
    await emit(client, "progress", progress("a", 4))  # no `id:` line: applied, and no place to resume from
    await emit(client, "progress", progress("a", 2), f"{OLD}-2")  # older than the new position: seen already
    applied = [(c[1]["task_id"], c[1]["current"]) for c in await calls(client) if c[0] == "event"]
    assert applied == [("a", 50), ("b", 7), ("c", 450), ("a", 3), ("a", 4)]

    await client.page.evaluate("() => w.add('d')")
    # Resumes at the first id after the reset. b needs no fresh state (it has none; its
    # next event comes after the cursor); d, new, does.
    assert (await sources(client, 2))[1] == {"task": ["a", "b", "d"], "fresh": ["d"], "cursor": [f"{OLD}-3"]}
    await emit(client, "progress", progress("b", 1), f"{NEW}-1")  # b's news, in a new history
    assert (await calls(client))[-1] == ["event", progress("b", 1)]
    assert [c[0] for c in await calls(client)].count("done") == 0


async def test_the_cursor_moves_into_the_new_history_after_a_reset(client: Page) -> None:
    await client.page.evaluate("() => { window.w = client.watch(['a'], { onEvent: record('event') }); }")
    await sources(client, 1)
    await emit(client, "progress", progress("a", 50), f"{OLD}-20")
    await emit(client, "reset", {"reason": "history_lost", "message": "Lost.", "missing": []})
    await client.page.evaluate("() => w.add('z')")  # reopened before any id of the new history
    assert (await sources(client, 2))[1]["cursor"] == [f"{OLD}-20"], "told of the reset again, not skipped"
    await emit(client, "reset", {"reason": "cursor_unknown", "message": "Unknown.", "missing": ["z"]})
    await emit(client, "progress", progress("a", 51), f"{NEW}-4")
    await emit(client, "progress", progress("a", 52), f"{NEW}-5")
    await client.page.evaluate("() => w.remove('z')")
    assert (await sources(client, 3))[2] == {"task": ["a"], "fresh": [], "cursor": [f"{NEW}-5"]}


async def test_unknown_at_the_start_of_a_stream_still_ends_the_task(client: Page) -> None:
    await client.page.evaluate(
        "() => { window.w = client.watch(['x'], { onUnknown: record('unknown'), onDone: record('done') }); }"
    )
    await sources(client, 1)
    await emit(client, "unknown", {"task_id": "x"})
    assert await calls(client) == [["unknown", {"task_id": "x"}], ["done", None]]
    assert await client.page.evaluate("() => [w.pending(), window.sources[0].closed]") == [[], True]


async def test_a_bound_progress_bar_empties_when_its_task_lost_its_history(client: Page) -> None:
    await client.page.evaluate(
        """() => {
             window.bar = document.body.appendChild(document.createElement('progress'));
             client.bindProgress(bar, 'a', { onReset: record('reset') });
           }"""
    )
    await sources(client, 1)
    await emit(client, "progress", progress("a", 50), f"{OLD}-20")
    assert await client.page.evaluate("() => [bar.value, bar.max]") == [50, 450]
    await emit(client, "reset", {"reason": "history_lost", "message": "Lost.", "missing": ["a"]})
    assert await client.page.evaluate("() => bar.value") == 0
    assert [c[0] for c in await calls(client)] == ["reset"]


async def test_a_group_forgets_a_member_whose_history_was_lost(client: Page, origin: str) -> None:
    bars = await client.page.evaluate(
        """async (url) => {
             const { WatchedGroups } = await import(url);
             const groups = new WatchedGroups();
             groups.add("g", ["m1", "m2"]);
             groups.record({ task_id: "m1", state: "progress", current: 1, total: 4, ts: 1 });
             const both = groups.record({ task_id: "m2", state: "progress", current: 2, total: 4, ts: 2 });
             return [both, groups.forget("m2"), groups.forget("stranger")];
           }""",
        f"{origin}static/groups.js",
    )
    both, without, stranger = bars
    assert (both["task_id"], both["current"], both["total"]) == ("g", 3, 8)
    # m2's old figures no longer count: its share is unknown until its news comes.
    assert (without["task_id"], without["current"], without["total"], without["state"]) == ("g", 1, None, "progress")
    assert stranger is None


# --- the page, against the real server -------------------------------------------------------


@pytest.fixture
async def page(request: pytest.FixtureRequest, output_dir: Path) -> AsyncIterator[Page]:
    async with page_for_test(request.node.name, output_dir, SCRIPTED_EVENT_SOURCE) as browser_page:
        yield browser_page


@pytest.mark.e2e
async def test_a_card_whose_history_was_lost_says_so_and_waits_for_news(
    server: Server, page: Page, settings: Settings
) -> None:
    publisher = Publisher(sync_client(settings.redis_url), Keys(settings.key_prefix))
    lost, kept = str(uuid.uuid4()), str(uuid.uuid4())
    publisher.publish(make_event(lost, "demo.count", State.PROGRESS, current=50, total=450, message="Processed 50"))
    publisher.publish(make_event(kept, "demo.count", State.PROGRESS, current=10, total=20, message="Processed 10"))
    publisher.client.close()
    await page.page.goto(server.url("/"))
    await page.page.evaluate("(ids) => localStorage.setItem('progress-sse:watched', JSON.stringify(ids))", [lost, kept])
    await page.page.reload()
    await (
        page.card(lost).locator(".task-count", has_text="50 of 450").wait_for(timeout=5_000)
    )  # as GET /tasks/<id> said
    assert sorted((await sources(page, 1))[0]["task"]) == sorted([lost, kept])

    await emit(page, "reset", {"reason": "history_lost", "message": "The event history was lost.", "missing": [lost]})
    card = page.card(lost)
    await page.wait_state(lost, "history-lost", timeout=5)
    assert await card.locator(".task-state").text_content() == "history lost"
    assert (
        await card.locator(".task-notice").text_content()
        == "The server lost this task's history; waiting for news of it."
    )
    assert await card.locator(".task-notice").is_visible()
    # None of the old figures stand: no "50 of 450", no percent, an empty bar.
    assert [await card.locator(part).text_content() for part in (".task-count", ".task-percent", ".task-message")] == [
        "",
        "",
        "",
    ]
    assert await card.locator("progress").evaluate("(bar) => bar.value") == 0
    assert await card.locator(".task-cancel").is_visible(), "it may still be running"
    assert await page.page.locator("#announcer").text_content() == "The event history was lost."
    await page.screenshot("history-lost")

    # The known task's current state follows the reset and redraws its card, whatever its id.
    await emit(page, "progress", {**progress(kept, 12, 20), "message": "Processed 12"}, f"{NEW}-1")
    await page.card(kept).locator(".task-count", has_text="12 of 20").wait_for(timeout=5_000)
    # News of the lost task: its card is an ordinary one again.
    await emit(page, "progress", {**progress(lost, 60), "message": "Processed 60"}, f"{NEW}-2")
    await page.wait_state(lost, "progress", timeout=5)
    assert await card.locator(".task-count").text_content() == "60 of 450"
    assert await card.locator(".task-notice").is_hidden()
    await page.screenshot("news-after-reset")


@pytest.mark.e2e
async def test_after_a_real_history_loss_the_page_redraws_and_a_lost_task_waits_for_news(
    make_server: Callable[..., Any],
    settings: Settings,
    redis_client: redis.Redis,
    request: pytest.FixtureRequest,
    output_dir: Path,
) -> None:
    own = settings.with_(key_prefix=f"{settings.key_prefix}-lost{uuid.uuid4().hex[:6]}")
    srv = await make_server(own)
    publisher = Publisher(sync_client(own.redis_url), Keys(own.key_prefix))
    running, quiet = str(uuid.uuid4()), str(uuid.uuid4())
    publisher.publish(make_event(running, "demo.count", State.PROGRESS, current=50, total=450))
    publisher.publish(make_event(quiet, "demo.count", State.PROGRESS, current=10, total=20))
    try:
        async with page_for_test(request.node.name, output_dir) as page:  # the browser's own EventSource
            await page.page.goto(srv.url("/"))
            watched = json.dumps([running, quiet])
            await page.page.evaluate("(ids) => localStorage.setItem('progress-sse:watched', ids)", watched)
            await page.page.reload()
            await page.card(quiet).locator(".task-count", has_text="10 of 20").wait_for(timeout=5_000)
            # Not just registered: its first read done and sent, it waits for news. A
            # history lost before that read would make the tasks unknown, not lost.
            await wait_until(
                lambda: [w.idle for w in srv.app[HUB].watchers] == [True], what="the page's stream, waiting"
            )

            # A Redis restart without its data: every key gone; `running` goes on in a new history.
            redis_client.delete(*redis_client.scan_iter(match=f"{own.key_prefix}:*"))
            publisher.publish(make_event(running, "demo.count", State.PROGRESS, current=60, total=450))
            await page.wait_state(quiet, "history-lost", timeout=10)
            await page.card(running).locator(".task-count", has_text="60 of 450").wait_for(timeout=5_000)
            assert await page.card(quiet).locator(".task-count").text_content() == ""
            await page.screenshot("history-lost")

            publisher.publish(make_event(quiet, "demo.count", State.SUCCESS, current=20, total=20, result=1))
            await page.wait_state(quiet, "success", timeout=10)
            assert await page.card(quiet).locator(".task-notice").is_hidden()
    finally:
        publisher.client.close()
