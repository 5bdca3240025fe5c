"""The page's All tasks view, completion notices and notice banner, in a real
headless Chromium against the real server, Redis and worker.

Nothing here sleeps to synchronise: each step waits for the DOM state, the frame
or the request it expects, with a deadline. Where a test needs frames the server
cannot be made to send on cue (a reset, a notice), the page's feed request is
answered by the test with exactly those frames, and the rest is real.
"""

from __future__ import annotations

import json
import sys
import textwrap
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from progress_sse.config import Settings
from progress_sse.events import State, make_event
from progress_sse.keys import Keys
from progress_sse.tokens import feed_token, operator_token, watch_token
from progress_sse.worker.publisher import Publisher

from .browser import Page, page_for_test
from .conftest import Server, Worker, worker_env
from .test_beat import OWN_APP, own, process
from .test_page import start_from_form as start_watched

pytestmark = [pytest.mark.e2e, pytest.mark.browser, pytest.mark.usefixtures("worker")]

SECRET = "page-feed-test-secret-0123456789-abcdefghijkl"

# Records every desktop notification the page makes (title, body) and every
# permission request, and lets a test hide the tab: a headless tab is always
# visible, so visibilityState is the test's to say, with the event a browser sends.
NOTIFICATIONS = """
window.__notifications = [];
window.__notificationTags = [];
window.__permissionRequests = 0;
const NativeNotification = window.Notification;
if (NativeNotification) {
  window.Notification = class extends NativeNotification {
    constructor(title, options = {}) {
      window.__notifications.push({ title, body: options.body ?? "" });
      window.__notificationTags.push(options.tag ?? null);
      super(title, options);
    }
  };
  const request = NativeNotification.requestPermission.bind(NativeNotification);
  window.Notification.requestPermission = (...args) => {
    window.__permissionRequests += 1;
    return request(...args);
  };
}
let tabHidden = false;
Object.defineProperty(document, "visibilityState", {
  configurable: true,
  get: () => (tabHidden ? "hidden" : "visible"),
});
Object.defineProperty(document, "hidden", { configurable: true, get: () => tabHidden });
window.__setHidden = (value) => {
  tabHidden = value;
  document.dispatchEvent(new Event("visibilitychange"));
};
// Every frame any EventSource of the page receives, before the page sees it: the
// wire, so a test knows what came even when the page rightly shows nothing of it.
window.__noticeFrames = [];
window.__feedFrames = [];
const SourceBefore = window.EventSource;
window.EventSource = class extends SourceBefore {
  constructor(url, init) {
    super(url, init);
    super.addEventListener("notice", (m) => window.__noticeFrames.push(JSON.parse(m.data).id));
    if (!new URL(String(url), location.href).pathname.endsWith("/feed")) return;
    for (const type of ["queued", "started", "progress", "retry", "success", "failure", "revoked", "lost"]) {
      super.addEventListener(type, (m) => window.__feedFrames.push([JSON.parse(m.data).task_id, type]));
    }
  }
};
"""


@pytest.fixture
async def page(request: pytest.FixtureRequest, output_dir: Path) -> AsyncIterator[Page]:
    async with page_for_test(request.node.name, output_dir, NOTIFICATIONS) as browser_page:
        yield browser_page


def feed_card(page: Page, task_id: str) -> Any:
    return page.page.locator("#feed .task", has=page.page.locator(".task-id", has_text=task_id))


def watched_card(page: Page, task_id: str) -> Any:
    return page.page.locator("#tasks .task", has=page.page.locator(".task-id", has_text=task_id))


async def feed_urls(page: Page) -> list[str]:
    return [url for url in (await page.streams())["opened"] if urlsplit(url).path.endswith("/feed")]


async def show_feed(page: Page, names: str = "") -> None:
    """Ask the All tasks view for `names` and wait until its stream is live."""
    await page.page.get_by_label("Task name").fill(names)
    before = len(await feed_urls(page))
    await page.page.get_by_role("button", name="Show tasks").click()
    await page.page.wait_for_function(
        """(before) => window.__streams.opened
             .filter((u) => new URL(u, location.href).pathname.endsWith("/feed")).length > before""",
        arg=before,
    )
    await page.page.locator('#connection[data-status="live"]').wait_for()


async def start_from_form(page: Page, name: str, **values: Any) -> str:
    """test_page.py's, waiting for the watched card (the task may be in All tasks too)."""
    return await start_watched(page, name, shown=watched_card, **values)


async def wait_state(card: Any, page: Page, *states: str, timeout: float = 30) -> None:
    selector = ", ".join(f'[data-state="{s}"]' for s in states)
    await card.and_(page.page.locator(selector)).wait_for(timeout=timeout * 1000)


# --- the All tasks view against the real feed ------------------------------------------------


async def test_a_task_started_elsewhere_appears_as_queued_and_its_bar_fills(server: Server, page: Page) -> None:
    await page.page.goto(server.url("/"))
    assert await page.page.locator("#feed .task").count() == 0, "opened when asked for, not on load"
    await show_feed(page)
    # Not from the page; long enough for the feed to carry a progress (one a second at most).
    task_id = await server.start_task("demo.count", n=8, delay=0.2)
    card = feed_card(page, task_id)
    await card.wait_for()
    await wait_state(card, page, "progress")
    await page.screenshot("all-tasks-running")
    await wait_state(card, page, "success")
    await page.screenshot("all-tasks-success")

    assert await card.locator(".task-name").text_content() == "demo.count"
    assert await card.locator("progress").evaluate("(el) => [el.value, el.max]") == [8, 8]
    assert await card.locator(".task-percent").text_content() == "100%"
    assert await card.locator(".task-cancel").is_hidden(), "cancelled from a closer look, not from the overview"
    values = [float(v["value"]) for v in await page.bar_values(task_id) if v["value"] is not None and v["max"] == "8"]
    assert values == sorted(values) and values[-1] == 8, values
    # Its whole life came on the feed, from the moment it was queued.
    states = [state for task, state in await page.page.evaluate("() => window.__feedFrames") if task == task_id]
    assert states[:2] == ["queued", "started"] and states[-1] == "success", states
    assert "progress" in states, states
    # Finished, it stays listed; the newest first.
    assert await page.page.locator("#feed .task .task-id").first.text_content() == task_id
    # One EventSource for the view, on /feed, with no filter.
    urls = await feed_urls(page)
    assert len(urls) == 1 and parse_qs(urlsplit(urls[0]).query).get("name") is None, urls


async def test_the_name_filter_reopens_the_feed_with_only_the_names_asked_for(server: Server, page: Page) -> None:
    await page.page.goto(server.url("/"))
    await show_feed(page, "demo.stages")
    assert parse_qs(urlsplit((await feed_urls(page))[-1]).query)["name"] == ["demo.stages"]
    counted = await server.start_task("demo.count", n=2, delay=0.01)
    staged = await server.start_task("demo.stages", delay=0.01)
    await feed_card(page, staged).wait_for()
    # One Redis numbers every event in one sequence, and the feed sends them in order:
    # the count's frames would have come before the stages' first one.
    assert await feed_card(page, counted).count() == 0
    assert set(await page.page.locator("#feed .task .task-name").all_text_contents()) == {"demo.stages"}

    # A prefix shows both; the view starts from the newest tasks' states.
    await show_feed(page, "demo.")
    await feed_card(page, counted).wait_for()
    await feed_card(page, staged).wait_for()
    assert len(await feed_urls(page)) == 2, "the old stream closed, one new one"
    assert (await page.streams())["open"] == 1

    # A filter the server would refuse is explained before any request.
    await page.page.get_by_label("Task name").fill(".demo")
    await page.page.get_by_role("button", name="Show tasks").click()
    await page.page.locator("#feed-problem", has_text='".demo" is not a task name').wait_for()
    assert await page.page.get_by_label("Task name").get_attribute("aria-invalid") == "true"
    assert len(await feed_urls(page)) == 2
    await page.screenshot("all-tasks-filtered")


async def test_watch_takes_a_task_of_the_feed_to_the_watched_cards(server: Server, page: Page) -> None:
    await page.page.goto(server.url("/"))
    await show_feed(page, "demo.count")
    task_id = await server.start_task("demo.count", n=30, delay=0.05)
    card = feed_card(page, task_id)
    await card.wait_for()
    await card.get_by_role("button", name="Watch").click()
    watched = watched_card(page, task_id)
    await wait_state(watched, page, "success")
    # Closely: every step on its own stream, where the feed shows one a second at most.
    values = [v for v in await page.bar_values(task_id) if v["value"] is not None and v["max"] == "30"]
    assert len(values) > 5, values
    assert any(f"task={task_id}" in url for url in (await page.streams())["opened"])
    await wait_state(card, page, "success")
    # A reload brings both back: the watched task, and the view open as it was.
    await page.page.reload()
    await wait_state(watched_card(page, task_id), page, "success")
    assert await page.page.get_by_label("Task name").input_value() == "demo.count"
    await wait_state(feed_card(page, task_id), page, "success")


async def test_a_refused_feed_is_said_in_words(make_server: Any, settings: Settings, page: Page) -> None:
    keyed: Server = await make_server(settings.with_(secret=SECRET))
    page.forgive("403", "401")  # the refusals asked for (and the recent list's, an operator's only)
    watch_only = watch_token(["some-task"], ttl=600, key=SECRET)
    await page.page.goto(keyed.url(f"/#token={watch_only}"))
    await page.page.get_by_role("button", name="Show tasks").click()
    problem = page.page.locator("#feed-problem")
    await problem.filter(has_text="does not allow seeing every task").wait_for()
    assert "operator scope, or a feed scope" in await problem.text_content()
    assert await feed_urls(page) == [], "no stream for a feed the token may not read"
    await page.screenshot("all-tasks-refused")

    # A token with the feed scope of demo. tasks sees them: the view opens again on
    # load (it was asked for), and the stream carries the token.
    scoped = feed_token(["demo."], ttl=600, key=SECRET)
    await page.page.goto(keyed.url(f"/#token={scoped}"))
    await page.page.reload()  # a fragment change alone does not load the page again
    await page.page.locator('#connection[data-status="live"]').wait_for()
    async with keyed.session.post(
        keyed.url("/tasks"),
        json={"name": "demo.count", "kwargs": {"n": 2, "delay": 0.01}},
        headers={"Authorization": f"Bearer {operator_token(key=SECRET)}"},
    ) as resp:
        assert resp.status == 202
        started = (await resp.json())["id"]
    await wait_state(feed_card(page, started), page, "success")
    urls = await feed_urls(page)
    assert parse_qs(urlsplit(urls[-1]).query)["token"] == [scoped]
    assert await problem.is_hidden()

    # No token at all: a 401, said as such.
    await page.page.goto(keyed.url("/#token="))
    await page.page.reload()
    await problem.filter(has_text="needs a valid access token").wait_for()


async def test_a_token_that_expires_while_the_view_is_open_is_said_in_words(
    make_server: Any, settings: Settings, page: Page
) -> None:
    keyed: Server = await make_server(settings.with_(secret=SECRET))
    page.forgive("401", "403")  # the expired token's refusals (and the recent list's, an operator's only)
    await page.page.goto(keyed.url(f"/#token={feed_token(['demo.'], ttl=3, key=SECRET)}"))
    await page.page.get_by_role("button", name="Show tasks").click()
    await page.page.locator('#connection[data-status="live"]').wait_for()  # the token was good
    # The server ends the stream at the token's expiry; the reconnect is refused, and
    # an EventSource never learns why: the view asks, and says it.
    problem = page.page.locator("#feed-problem")
    await problem.filter(has_text="needs a valid access token").wait_for(timeout=15_000)
    assert await page.page.locator("#feed-stop").is_hidden()
    assert (await page.streams())["open"] == 0, "no stream left retrying a token that cannot work"


# --- the view's reset and the notice banner: frames the test sends ------------------------------


def sse(event: str, data: dict[str, Any], event_id: str | None = None) -> str:
    id_line = f"id: {event_id}\n" if event_id else ""
    return f"{id_line}event: {event}\ndata: {json.dumps(data)}\n\n"


def payload(task_id: str, state: str, current: int, total: int = 4) -> dict[str, Any]:
    percent = round(100 * current / total, 2)
    return {"task_id": task_id, "name": "demo.count", "state": state, "current": current, "total": total,
            "percent": percent, "message": f"Processed {current} of {total}", "ts": 1763712000.0}  # fmt: skip


class ScriptedFeed:
    """Answers the page's feed requests (GET /feed) with the frames given, one body
    per request in turn (the last one again after that), and lets HEAD through to
    the real server. Each body ends the response, so the page reconnects."""

    def __init__(self, *bodies: str) -> None:
        self.bodies = bodies
        self.requests: list[str] = []

    async def __call__(self, route: Any) -> None:
        if route.request.method != "GET":
            await route.continue_()
            return
        self.requests.append(route.request.url)
        body = self.bodies[min(len(self.requests), len(self.bodies)) - 1]
        await route.fulfill(status=200, headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"},
                            body=body)  # fmt: skip

    async def cursor_of_request(self, page: Page, number: int) -> str | None:
        """The Last-Event-ID (as `last_event_id`) of the page's `number`th feed request."""
        while len(self.requests) < number:
            await page.page.wait_for_event("request", predicate=lambda r: "/feed" in r.url, timeout=10_000)
        return parse_qs(urlsplit(self.requests[number - 1]).query).get("last_event_id", [None])[0]


def is_feed(url: str) -> bool:
    return urlsplit(url).path.endswith("/feed")


async def test_on_reset_the_view_redraws_from_the_states_that_follow(server: Server, page: Page) -> None:
    lost = "The event history started over (Redis lost its data). The states that follow are current."
    feed = ScriptedFeed(
        sse("progress", payload("task-a", "progress", 1), "k3x7f2ab-5")
        + sse("progress", payload("task-b", "progress", 2), "k3x7f2ab-6")
        + sse("reset", {"reason": "history_lost", "message": lost, "missing": []})
        + sse("success", payload("task-a", "success", 4), "q7zz4mnc-1"),
        ": ping\n\n",
    )
    await page.page.route(is_feed, feed)
    await page.page.goto(server.url("/"))
    await page.page.get_by_role("button", name="Show tasks").click()
    await wait_state(feed_card(page, "task-a"), page, "success")
    # task-b's bar was from the lost history: gone, with nothing shown in its place.
    assert await page.page.locator("#feed .task .task-id").all_text_contents() == ["task-a"]
    assert await feed_card(page, "task-a").locator(".task-count").text_content() == "4 of 4"
    # Reconnecting, the feed resumes in the new history: after the state that followed the reset.
    assert await feed.cursor_of_request(page, 2) == "q7zz4mnc-1"


async def test_a_notice_is_a_banner_once_whatever_repeats_it_and_stays_dismissed(server: Server, page: Page) -> None:
    hostile = "Deploy at 18:00 <img src=x onerror=alert(1)>"
    notice = "event: notice\ndata: " + json.dumps({"id": "n-1", "text": hostile, "ts": 1763712000.5}) + "\n\n"
    # The latest notice comes on every (re)connect, and on every stream of the page.
    feed = ScriptedFeed(notice + sse("progress", payload("task-a", "progress", 1), "k3x7f2ab-5") + notice)
    await page.page.route(is_feed, feed)
    await page.page.goto(server.url("/"))
    await page.page.get_by_role("button", name="Show tasks").click()
    banner = page.page.locator("#notices .broadcast")
    await banner.wait_for()
    await feed_card(page, "task-a").wait_for()
    assert await banner.count() == 1
    assert await banner.locator(".broadcast-text").text_content() == hostile
    assert await page.page.locator("main img").count() == 0
    await page.screenshot("notice-banner")
    # A notice has no id: it does not move the cursor the feed resumes from.
    assert await feed.cursor_of_request(page, 2) == "k3x7f2ab-5"
    assert await banner.count() == 1, "sent again on the reconnect, shown once"

    await banner.get_by_role("button", name="Dismiss").click()
    assert await banner.count() == 0
    await page.page.reload()  # the view reopens, and the stream sends the notice again
    await page.page.wait_for_function("() => window.__noticeFrames.includes('n-1')")
    assert await banner.count() == 0, "dismissed for the tab"


# --- completion notices -------------------------------------------------------------------------


async def notifications(page: Page) -> list[dict[str, str]]:
    found: list[dict[str, str]] = await page.page.evaluate("() => window.__notifications")
    return found


async def test_a_watched_task_ending_in_a_hidden_tab_is_notified_and_titled(server: Server, page: Page) -> None:
    await page.page.context.grant_permissions(["notifications"], origin=server.url("/").rstrip("/"))
    await page.page.goto(server.url("/"))
    toggle = page.page.get_by_role("button", name="Notify me when tasks end")
    assert await toggle.get_attribute("aria-pressed") == "true", "permitted already: on"

    # Visible: the card says it, nothing else does.
    seen = await start_from_form(page, "demo.count", n=3, delay=0.05)
    await wait_state(watched_card(page, seen), page, "success")
    assert await notifications(page) == []
    assert await page.page.title() == "progress-sse"

    await page.page.evaluate("() => window.__setHidden(true)")
    done = await start_from_form(page, "demo.count", n=3, delay=0.05)
    await wait_state(watched_card(page, done), page, "success")
    assert await notifications(page) == [{"title": "demo.count succeeded", "body": 'Result: {"processed":3}'}]
    assert await page.page.title() == "✓ demo.count — progress-sse"
    failed = await start_from_form(page, "demo.fail", after=1, delay=0.05)
    await wait_state(watched_card(page, failed), page, "failure")
    assert (await notifications(page))[1] == {
        "title": "demo.fail failed",
        "body": "RuntimeError: demo.fail gave up after 1 steps, as it was asked to",
    }
    assert await page.page.title() == "✗ demo.fail (+1) — progress-sse"

    await page.page.evaluate("() => window.__setHidden(false)")
    assert await page.page.title() == "progress-sse"
    # Turned off, a hidden tab's title still says it; no notification does.
    await toggle.click()
    assert await toggle.get_attribute("aria-pressed") == "false"
    await page.page.evaluate("() => window.__setHidden(true)")
    quiet = await start_from_form(page, "demo.count", n=2, delay=0.05)
    await wait_state(watched_card(page, quiet), page, "success")
    assert len(await notifications(page)) == 2
    assert await page.page.title() == "✓ demo.count — progress-sse"
    assert await page.page.evaluate("() => window.__permissionRequests") == 0, "granted already: nothing to ask"


async def test_a_task_of_the_all_tasks_view_ending_in_a_hidden_tab_is_notified_once(server: Server, page: Page) -> None:
    """Nobody on the page started or watched it (beat, another service): the view saw
    it end. One that is both watched and in the view is told of once."""
    await page.page.context.grant_permissions(["notifications"], origin=server.url("/").rstrip("/"))
    await page.page.goto(server.url("/"))
    await show_feed(page, "demo.")
    await page.page.evaluate("() => window.__setHidden(true)")
    elsewhere = await server.start_task("demo.count", n=2, delay=0.05)
    await wait_state(feed_card(page, elsewhere), page, "success")
    assert await notifications(page) == [{"title": "demo.count succeeded", "body": 'Result: {"processed":2}'}]
    # The view's notifications share a tag: each replaces the one before, however busy the feed.
    assert await page.page.evaluate("() => window.__notificationTags") == ["progress-sse:all-tasks"]

    both = await start_from_form(page, "demo.fail", after=1, delay=0.05)
    await wait_state(watched_card(page, both), page, "failure")
    await wait_state(feed_card(page, both), page, "failure")
    assert [n["title"] for n in await notifications(page)] == ["demo.count succeeded", "demo.fail failed"]


async def test_permission_is_asked_only_when_the_button_is_pressed(server: Server, page: Page) -> None:
    await page.page.goto(server.url("/"))
    toggle = page.page.get_by_role("button", name="Notify me when tasks end")
    await toggle.wait_for()
    assert await toggle.get_attribute("aria-pressed") == "false"
    # A task ends in a hidden tab: the title says it, with no permission asked for.
    await page.page.evaluate("() => window.__setHidden(true)")
    task_id = await start_from_form(page, "demo.count", n=2, delay=0.05)
    await wait_state(watched_card(page, task_id), page, "success")
    assert await page.page.title() == "✓ demo.count — progress-sse"
    assert await page.page.evaluate("() => window.__permissionRequests") == 0
    assert await notifications(page) == []

    await toggle.click()
    await page.page.wait_for_function("() => window.__permissionRequests === 1")
    # Headless Chromium denies what was not granted: the toggle stays off and says why.
    await page.page.locator("#notify-toggle[disabled]").wait_for(state="attached")
    assert await toggle.get_attribute("aria-pressed") == "false"


# --- broadcast notices from the real server ---------------------------------------------------


async def test_a_posted_notice_reaches_every_open_page_and_one_that_reconnects(
    make_server: Any, settings: Settings, keys: Keys, publisher: Publisher, page: Page
) -> None:
    # A server on key names of this test's own: the service keeps a notice for every
    # stream that opens in the next minutes, and other tests' streams must not get it.
    server: Server = await make_server(settings.with_(key_prefix=keys.prefix))
    running = str(uuid.uuid4())  # a task that runs for as long as the test: its stream stays open
    for state, extra in ((State.QUEUED, {}), (State.STARTED, {}), (State.PROGRESS, {"current": 1, "total": 4})):
        publisher.publish(make_event(running, "demo.count", state, **extra))
    text = "Maintenance at 18:00: streams will reconnect by themselves."
    # One page with the All tasks view (the feed), one with a task's own page (/events).
    first = page.page
    await first.goto(server.url("/"))
    await show_feed(page)
    second = await first.context.new_page()
    await second.goto(server.url(f"/tasks/{running}"))
    await second.locator('#connection[data-status="live"]').wait_for()

    async with server.session.post(server.url("/notices"), json={"text": text}) as resp:
        assert resp.status == 202, await resp.text()
    for tab in (first, second):
        await tab.locator("#notices .broadcast-text", has_text=text).wait_for()
    await page.screenshot("notice-posted")

    await first.locator("#notices .broadcast").get_by_role("button", name="Dismiss").click()
    # A page that (re)connects is sent the latest notice: shown where it was not dismissed.
    await second.reload()
    await second.locator("#notices .broadcast-text", has_text=text).wait_for()
    assert await second.locator("#notices .broadcast").count() == 1
    await first.reload()
    await first.wait_for_function("() => window.__noticeFrames.length > 0")  # sent again on connect
    assert await first.locator("#notices .broadcast").count() == 0
    await second.close()


# --- beat, end to end -------------------------------------------------------------------------


async def test_tasks_beat_sends_appear_on_the_page_and_finish_unasked(
    settings: Settings,
    make_server: Any,
    page: Page,
    tmp_path: Path,
    output_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A real `celery beat` of a user's own app (every second) and a real worker: the
    view, opened before beat starts, shows its tasks from `queued` to success, though
    nobody on the page (nor this test) knows their ids."""
    mine = own(settings, "beat-page")
    (tmp_path / "beatapp.py").write_text(textwrap.dedent(OWN_APP))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))  # the worker imports it from there
    server: Server = await make_server(mine)
    worker = Worker(mine, output_dir / "beat-page-worker.log", concurrency=1, app="beatapp")
    try:
        worker.wait_ready()
        await page.page.goto(server.url("/"))
        await show_feed(page, "beatapp.")
        beat = [sys.executable, "-m", "celery", "-A", "beatapp", "beat", f"--schedule={tmp_path / 'schedule'}"]
        with process(beat, worker_env(mine), tmp_path, output_dir / "beat-page.log"):
            done = page.page.locator('#feed .task[data-state="success"]')
            await done.nth(1).wait_for(timeout=60_000)  # two runs of the schedule
    finally:
        worker.stop()
    assert await done.nth(0).locator(".task-name").text_content() == "beatapp.tick"
    frames: list[list[str]] = await page.page.evaluate("() => window.__feedFrames")
    ended = await done.nth(1).locator(".task-id").text_content()
    assert ended is not None
    seen = [state for task_id, state in frames if task_id == ended]
    assert seen[0] == "queued" and seen[-1] == "success", seen
