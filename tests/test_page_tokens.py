"""Access tokens in the browser: the page and static/progress.js against a real
server that wants tokens (settings.secret), the real worker, and Chromium.

Nothing here sleeps to synchronise: each step waits for the DOM or the frames it
expects, with a deadline.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from progress_sse.config import Settings
from progress_sse.tokens import operator_token, start_token, watch_token
from progress_sse.web.pages import ASSETS

from .browser import Page, page_for_test
from .conftest import Server
from .sse import SSEReader

pytestmark = [pytest.mark.e2e, pytest.mark.browser, pytest.mark.usefixtures("worker")]

SECRET = "page-tokens-test-secret-0123456789-abcdefghij"
NEEDS_TOKEN = "This page needs a valid access token; ask for a new link."

# Every frame any EventSource of the page delivers, before progress.js sees it:
# the wire, so a duplicate the client would drop still shows here.
FRAMES = """
window.__frames = [];
const StreamBefore = window.EventSource;
window.EventSource = class extends StreamBefore {
  constructor(url, init) {
    super(url, init);
    for (const type of ["queued", "started", "progress", "retry", "success", "failure", "revoked", "lost", "unknown"]) {
      super.addEventListener(type, (m) => {
        window.__frames.push({ url: String(url), type, id: m.lastEventId, current: JSON.parse(m.data).current });
      });
    }
  }
};
"""


@pytest.fixture
async def page(request: pytest.FixtureRequest, output_dir: Path) -> AsyncIterator[Page]:
    async with page_for_test(request.node.name, output_dir, FRAMES) as browser_page:
        yield browser_page


@pytest.fixture
async def keyed(make_server: Any, settings: Settings) -> Server:
    """A server that wants a token for everything but the page shell and its assets."""
    server: Server = await make_server(settings.with_(secret=SECRET))
    return server


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def start(server: Server, name: str, **kwargs: Any) -> str:
    async with server.session.post(
        server.url("/tasks"), json={"name": name, "kwargs": kwargs}, headers=bearer(operator_token(key=SECRET))
    ) as resp:
        body = await resp.json()
        assert resp.status == 202, body
        return str(body["id"])


async def history(server: Server, task_id: str) -> list[dict[str, Any]]:
    """The task's whole life as the server stored it: (id, state, current) of each event."""
    async with server.session.get(
        server.url(f"/tasks/{task_id}/events"),
        params={"last_event_id": "0"},
        headers=bearer(operator_token(key=SECRET)),
    ) as resp:
        assert resp.status == 200
        events = await SSEReader(resp).rest()
    return [{"id": e.id, "type": e.event, "current": e.payload["current"]} for e in events]


def token_of(url: str) -> str | None:
    values = parse_qs(urlsplit(url).query).get("token")
    return values[0] if values else None


async def frames(page: Page) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = await page.page.evaluate("() => window.__frames")
    return found


async def test_a_link_with_a_token_shows_the_live_bar_and_the_token_leaves_the_address(
    keyed: Server, page: Page
) -> None:
    task_id = await start(keyed, "demo.count", n=12, delay=0.1)
    token = watch_token([task_id], ttl=600, key=SECRET)
    await page.page.goto(keyed.url(f"/tasks/{task_id}#token={token}&view=compact"))
    await page.wait_state(task_id, "success")
    card = page.card(task_id)
    assert await card.locator(".task-count").text_content() == "12 of 12"
    values = [float(v["value"]) for v in await page.bar_values(task_id) if v["value"] is not None and v["max"] == "12"]
    assert values == sorted(values) and values[-1] == 12, values

    href = await page.page.evaluate("() => location.href")
    assert token not in href
    assert href == keyed.url(f"/tasks/{task_id}") + "#view=compact"  # the rest of the fragment stays
    assert await page.page.evaluate("() => sessionStorage.getItem('progress-sse-token')") == token
    opened = (await page.streams())["opened"]
    assert opened and all(token_of(url) == token for url in opened), opened
    assert await page.page.locator("#access-notice").is_hidden()

    # A reload has no fragment: the tab's stored token still opens the task.
    await page.page.reload()
    await page.wait_state(task_id, "success")
    await page.screenshot("token-link")


async def test_without_a_token_the_page_says_it_needs_one_and_shows_no_task_data(keyed: Server, page: Page) -> None:
    page.forgive("401", "403")  # Chromium logs each refused request
    task_id = await start(keyed, "demo.count", n=2, delay=0.05)
    notice = page.page.get_by_role("alert").and_(page.page.locator("#access-notice"))

    await page.page.goto(keyed.url(f"/tasks/{task_id}"))
    await notice.filter(has_text=NEEDS_TOKEN).wait_for()
    assert await page.page.locator(".task").count() == 0
    assert "demo.count" not in await page.page.locator("main").text_content()
    assert (await page.streams())["opened"] == []
    assert await page.page.evaluate("() => sessionStorage.getItem('progress-sse-token')") is None
    await page.screenshot("needs-token")

    # A valid token for another task: the page says the token does not allow it.
    other = watch_token([str(uuid.uuid4())], ttl=600, key=SECRET)
    await page.page.goto(keyed.url(f"/tasks/{task_id}#token={other}"))
    await page.page.reload()  # a fragment change alone does not load the page again
    await notice.filter(has_text="access token does not allow that").wait_for()
    assert task_id in await notice.text_content()  # the server's sentence names what is outside the scope
    assert await page.page.locator(".task").count() == 0
    assert (await page.streams())["opened"] == []


async def test_a_start_only_token_watches_the_started_task_with_its_own_token(keyed: Server, page: Page) -> None:
    page.forgive("403")  # the recent list is for operators
    token = start_token(["demo.count"], ttl=600, key=SECRET)
    await page.page.goto(keyed.url(f"/#token={token}"))
    assert await page.page.evaluate("() => location.hash") == ""
    form = page.page.locator('form[data-task-name="demo.count"]')
    await form.locator('input[name="n"]').fill("5")
    await form.locator('input[name="delay"]').fill("0.1")
    async with page.page.expect_response(lambda r: r.url.endswith("/tasks") and r.request.method == "POST") as info:
        await form.get_by_role("button", name="Start").click()
    response = await info.value
    assert response.status == 202
    assert (await response.request.all_headers())["authorization"] == f"Bearer {token}"
    body = await response.json()
    task_id, task_token = body["id"], body["token"]

    await page.wait_state(task_id, "success")
    opened = (await page.streams())["opened"]
    assert opened and all(token_of(url) == task_token for url in opened), opened
    link = await page.card(task_id).locator(".task-link").get_attribute("href")
    assert link.endswith(f"/tasks/{task_id}#token={task_token}")
    await page.page.locator("section[hidden]:has(#recent)").wait_for(state="attached")
    assert await page.page.locator("#access-notice").is_hidden()


async def load_client(page: Page, server: Server) -> None:
    """progress.js itself, imported into a page of the server's origin (the page's
    shell is public; its own requests are refused without a token)."""
    page.forgive("401")  # Chromium logs each refused request, streams included
    await page.page.goto(server.url(f"/tasks/{uuid.uuid4()}"))
    await page.page.locator("#access-notice").filter(has_text=NEEDS_TOKEN).wait_for()
    url = server.url(f"/static/{server.app[ASSETS].version}/progress.js")
    await page.page.evaluate(
        """async (url) => {
             window.client = await import(url);
             window.events = [];
             window.statuses = [];
             window.tokenErrors = [];
             window.renewals = 0;
           }""",
        url,
    )


async def test_the_client_renews_an_expiring_token_and_loses_or_repeats_nothing(keyed: Server, page: Page) -> None:
    task_id = await start(keyed, "demo.count", n=50, delay=0.25)
    minted: list[str] = []

    def mint() -> str:
        minted.append(watch_token([task_id], ttl=3, key=SECRET))
        return minted[-1]

    await page.page.expose_function("mintToken", mint)
    await load_client(page, keyed)
    await page.page.evaluate(
        """([id, token]) => {
             window.w = client.watch([id], {
               onEvent: (e) => window.events.push({ state: e.state, current: e.current, cursor: window.w.cursor }),
               onTokenError: (error) => window.tokenErrors.push(String(error)),
             }, {
               token,
               getToken: async () => { window.renewals += 1; return await window.mintToken(); },
             });
           }""",
        [task_id, mint()],
    )
    await page.page.wait_for_function(
        "() => window.events.some((e) => e.state === 'success')", polling=100, timeout=60_000
    )
    renewals = await page.page.evaluate("() => window.renewals")
    assert renewals >= 1 and len(minted) == renewals + 1
    assert await page.page.evaluate("() => window.tokenErrors") == []
    opened = (await page.streams())["opened"]
    used = [token_of(url) for url in opened]
    assert used[0] == minted[0]
    assert set(minted[1:]) <= set(used), "every new token was used at once"
    for url in opened[1:]:
        assert "last_event_id=" in url, f"a reopen without the cursor: {url}"

    # Against the server's own record of the task: every event after the page's
    # first one arrived once, in order, across every expiry.
    life = await history(keyed, task_id)
    wire = await frames(page)
    ids = [frame["id"] for frame in wire]
    assert len(ids) == len(set(ids)), f"a frame came twice: {ids}"
    first = [event["id"] for event in life].index(ids[0])
    expected = life[first:]
    assert [(f["id"], f["type"], f["current"]) for f in wire] == [(e["id"], e["type"], e["current"]) for e in expected]
    seen = await page.page.evaluate("() => window.events")
    assert [(e["state"], e["current"], str(e["cursor"])) for e in seen] == [
        (e["type"], e["current"], e["id"]) for e in expected
    ]
    assert len({frame["url"] for frame in wire}) >= 2, "the stream was reopened across an expiry"
    assert seen[-1]["current"] == 50


async def test_a_failing_get_token_is_reported_and_set_token_resumes(keyed: Server, page: Page) -> None:
    task_id = await start(keyed, "demo.count", n=3, delay=0.05)
    await load_client(page, keyed)
    await page.page.evaluate(
        """(id) => {
             window.w = client.watch([id], {
               onEvent: (e) => window.events.push({ state: e.state, current: e.current }),
               onStatus: (s) => window.statuses.push(s),
               onTokenError: (error) => window.tokenErrors.push(String(error)),
             }, {
               token: "not-a-jwt",
               getToken: async () => { window.renewals += 1; throw new Error("no session"); },
             });
           }""",
        task_id,
    )
    await page.page.wait_for_function("() => window.tokenErrors.length === 1", polling=50, timeout=10_000)
    assert await page.page.evaluate("() => window.tokenErrors") == ["Error: no session"]
    assert "reconnecting" in await page.page.evaluate("() => window.statuses")
    assert await page.page.evaluate("() => window.events") == []

    await page.page.evaluate("(token) => window.w.setToken(token)", watch_token([task_id], ttl=600, key=SECRET))
    await page.page.wait_for_function(
        "() => window.events.some((e) => e.state === 'success')", polling=100, timeout=30_000
    )
    # One call for the run of failures: the refusals that followed it backed off instead.
    assert await page.page.evaluate("() => window.renewals") == 1
    assert await page.page.evaluate("() => window.tokenErrors.length") == 1


async def test_with_an_operator_token_the_page_works_as_without_tokens(keyed: Server, page: Page) -> None:
    """The recent list, a start from a form and a cancel, all with the operator's token."""
    earlier = await start(keyed, "demo.count", n=2, delay=0.05)
    token = operator_token(ttl=600, key=SECRET)
    await page.page.goto(keyed.url(f"/#token={token}"))
    await page.page.locator(f'#recent li[data-task-id="{earlier}"]').wait_for()
    form = page.page.locator('form[data-task-name="demo.count"]')
    await form.locator('input[name="n"]').fill("500")
    await form.locator('input[name="delay"]').fill("0.1")
    async with page.page.expect_response(lambda r: r.url.endswith("/tasks") and r.request.method == "POST") as info:
        await form.get_by_role("button", name="Start").click()
    task_id = (await (await info.value).json())["id"]
    await page.wait_state(task_id, "progress")
    await page.card(task_id).get_by_role("button", name="Cancel").click()
    await page.wait_state(task_id, "revoked")
    await page.page.locator(f'#recent li[data-task-id="{task_id}"] .badge', has_text="cancelled").wait_for()
    assert await page.page.locator("#access-notice").is_hidden()
