"""progress-sse inside someone else's aiohttp app: under a prefix, behind the host
app's own auth middleware, with the host app's own allow-list."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from progress_sse.allowlist import AllowedTask, AllowList, integer, number
from progress_sse.config import ConfigError, Settings
from progress_sse.web import create_app

from .sse import SSEReader

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("worker")]

ONLY_COUNT = AllowList([AllowedTask("demo.count", {"n": (integer(1, 50), 5), "delay": (number(0, 1), 0.05)})])
TOKEN = "Bearer let-me-in"


@web.middleware
async def require_login(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """The host app's auth: a header or a session cookie, as real apps have."""
    if request.headers.get("Authorization") != TOKEN and request.cookies.get("session") != "ok":
        raise web.HTTPUnauthorized(text="log in first")
    return await handler(request)


async def home(request: web.Request) -> web.Response:
    return web.Response(text="the host app")


@pytest.fixture
async def host(aiohttp_server: Any, settings: Settings) -> AsyncIterator[tuple[Any, aiohttp.ClientSession]]:
    app = web.Application(middlewares=[require_login])
    app.router.add_get("/", home)
    progress = create_app(settings, allowlist=ONLY_COUNT)
    app.add_subapp("/progress/", progress)
    server = await aiohttp_server(app)
    async with aiohttp.ClientSession(headers={"Authorization": TOKEN}) as session:
        yield server, session


async def test_mounted_app_is_behind_the_host_auth(host: tuple[Any, aiohttp.ClientSession]) -> None:
    server, _ = host
    async with aiohttp.ClientSession() as anonymous:
        async with anonymous.post(server.make_url("/progress/tasks"), json={"name": "demo.count"}) as resp:
            assert resp.status == 401
        async with anonymous.get(server.make_url("/progress/healthz")) as resp:
            assert resp.status == 401


async def test_mounted_app_starts_and_streams_with_prefixed_urls(host: tuple[Any, aiohttp.ClientSession]) -> None:
    server, session = host
    async with session.post(
        server.make_url("/progress/tasks"), json={"name": "demo.count", "kwargs": {"n": 3}}
    ) as resp:
        assert resp.status == 202
        body = await resp.json()
    task_id = body["id"]
    assert resp.headers["Location"] == f"/progress/tasks/{task_id}"
    assert body["status_url"] == f"/progress/tasks/{task_id}"
    assert body["events_url"] == f"/progress/tasks/{task_id}/events"
    async with session.get(server.make_url(body["events_url"] + "?last_event_id=0")) as resp:
        events = await SSEReader(resp).rest()
    assert [e.event for e in events][:2] == ["queued", "started"]
    assert events[-1].event == "success"


async def test_mounted_app_uses_the_host_allow_list(host: tuple[Any, aiohttp.ClientSession]) -> None:
    server, session = host
    async with session.post(server.make_url("/progress/tasks"), json={"name": "demo.fail"}) as resp:
        assert resp.status == 422
        assert "it starts: demo.count" in (await resp.json())["error"]
    async with session.post(
        server.make_url("/progress/tasks"), json={"name": "demo.count", "kwargs": {"n": 500}}
    ) as resp:
        assert resp.status == 422  # the host's own limit, not the demo's
    async with session.get(server.make_url("/progress/nowhere")) as resp:
        assert resp.status == 404
        assert "error" in await resp.json()


async def test_mounted_page_links_its_assets_under_the_prefix(host: tuple[Any, aiohttp.ClientSession]) -> None:
    server, session = host
    async with session.get(server.make_url("/progress/")) as resp:
        assert resp.status == 200
        html = await resp.text()
    found = re.search(r'src="/progress/static/([0-9a-f]{12})/page\.js"', html)
    assert found, "the page's script is linked under the prefix"
    version = found.group(1)
    assert 'data-base="/progress"' in html
    assert 'data-task-name="demo.count"' in html and 'data-task-name="demo.fail"' not in html
    async with session.get(server.make_url(f"/progress/static/{version}/progress.js")) as resp:
        assert resp.status == 200
    async with session.get(server.make_url("/progress/healthz")) as resp:
        assert resp.headers["X-Content-Type-Options"] == "nosniff", "the sub-app's own responses too"
    async with session.get(server.make_url("/progress/static/progress.js"), allow_redirects=False) as resp:
        assert resp.status == 302
        assert resp.headers["Location"] == f"/progress/static/{version}/progress.js"
    async with session.get(server.make_url("/")) as resp:
        assert await resp.text() == "the host app"


async def test_page_under_a_prefix_works_in_a_browser(host: tuple[Any, aiohttp.ClientSession], output_dir: Any) -> None:
    from .browser import open_browser

    server, _ = host
    base = str(server.make_url("/progress/"))
    shots = output_dir / "screenshots"
    shots.mkdir(parents=True, exist_ok=True)
    async with open_browser(shots, "embedded") as page:
        await page.page.context.add_cookies([{"name": "session", "value": "ok", "url": base}])
        await page.page.goto(base)
        form = page.page.locator('form[data-task-name="demo.count"]')
        async with page.page.expect_response(lambda r: r.url.endswith("/progress/tasks")) as info:
            await form.get_by_role("button", name="Start").click()
        task_id = (await (await info.value).json())["id"]
        await page.wait_state(task_id, "success")
        assert await page.card(task_id).locator(".task-link").get_attribute("href") == f"/progress/tasks/{task_id}"
        streams = await page.streams()
        assert all(url.startswith("/progress/events?") for url in streams["opened"]), streams
        await page.screenshot("embedded-success")
        assert page.errors == []


def test_allow_list_comes_from_configuration(settings: Settings) -> None:
    app = create_app(settings.with_(allowlist="tests.test_embedding:ONLY_COUNT"))
    from progress_sse.web import ALLOWLIST

    assert [t.name for t in app[ALLOWLIST]] == ["demo.count"]
    with pytest.raises(ConfigError, match=r"PROGRESS_SSE_ALLOWLIST='tests.nope:X' cannot be loaded"):
        create_app(settings.with_(allowlist="tests.nope:X"))
    with pytest.raises(ConfigError, match="not an AllowList"):
        create_app(settings.with_(allowlist="tests.test_embedding:TOKEN"))
    with pytest.raises(ConfigError, match="PROGRESS_SSE_ALLOWLIST='no colon'"):
        Settings.from_env({"PROGRESS_SSE_ALLOWLIST": "no colon"})
