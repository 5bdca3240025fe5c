"""The HTML side over plain HTTP: versioned assets, caching, CSP, negotiation."""

from __future__ import annotations

import re
import uuid
from pathlib import Path
from typing import Any

import pytest

from progress_sse.config import Settings
from progress_sse.cursors import parse_id
from progress_sse.web.pages import ASSETS, CSP, Assets, asset_dir, wants_html

from .conftest import Server

pytestmark = pytest.mark.e2e


async def test_index_links_versioned_assets_and_sends_csp(server: Server) -> None:
    async with server.session.get(server.url("/")) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Security-Policy"] == CSP
        assert "'unsafe-inline'" not in CSP
        html = await resp.text()
    version = server.app[ASSETS].version
    assert f"/static/{version}/page.js" in html
    assert f"/static/{version}/progress.css" in html
    assert "<script>" not in html and " on" + "click=" not in html  # no inline script to allow
    for form in ("demo.count", "demo.mystery", "demo.stages", "demo.fail", "demo.flaky"):
        assert f'data-task-name="{form}"' in html
    assert re.search(r'name="n"[^>]*min="1"[^>]*max="100000"[^>]*step="1"[^>]*value="50"', html)


async def test_current_assets_are_cached_for_a_year_and_old_versions_are_not(server: Server) -> None:
    version = server.app[ASSETS].version
    async with server.session.get(server.url(f"/static/{version}/progress.js")) as resp:
        assert resp.status == 200
        assert resp.content_type == "text/javascript"
        assert resp.headers["Cache-Control"] == "public, max-age=31536000, immutable"
        assert "export function watch" in await resp.text()
    async with server.session.get(server.url("/static/0123456789ab/progress.js")) as resp:
        assert resp.status == 200
        assert resp.headers["Cache-Control"] == "no-cache"
    async with server.session.get(server.url(f"/static/{version}/nope.js")) as resp:
        assert resp.status == 404
        assert "error" in await resp.json()


async def test_an_unversioned_asset_url_redirects_to_the_current_version(server: Server) -> None:
    """What a page of your own can write down: /static/progress.js."""
    version = server.app[ASSETS].version
    async with server.session.get(server.url("/static/progress.js"), allow_redirects=False) as resp:
        assert resp.status == 302
        assert resp.headers["Location"] == f"/static/{version}/progress.js"
        assert resp.headers["Cache-Control"] == "no-cache", "an upgrade must be picked up at once"
    async with server.session.get(server.url("/static/progress.js")) as resp:
        assert resp.status == 200
        assert "export function bindProgress" in await resp.text()
    async with server.session.get(server.url("/static/nope.js"), allow_redirects=False) as resp:
        assert resp.status == 404
        assert "error" in await resp.json()


def test_asset_version_changes_with_any_file_content(tmp_path: Path) -> None:
    (tmp_path / "a.js").write_text("export const a = 1;")
    first = Assets.load(tmp_path).version
    (tmp_path / "a.js").write_text("export const a = 2;")
    assert Assets.load(tmp_path).version != first
    assert (asset_dir("static") / "progress.js").exists()
    assert (asset_dir("templates") / "index.html").exists()


async def test_task_url_is_a_page_for_browsers_and_json_for_clients(server: Server) -> None:
    task_id = await server.start_task("demo.count", n=1, delay=0)
    page_headers = {"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"}
    async with server.session.get(server.url(f"/tasks/{task_id}"), headers=page_headers) as resp:
        assert resp.status == 200
        assert resp.content_type == "text/html"
        assert resp.headers["Content-Security-Policy"] == CSP
        assert f'data-task="{task_id}"' in await resp.text()
    async with server.session.get(server.url(f"/tasks/{task_id}"), headers={"Accept": "*/*"}) as resp:
        assert resp.content_type == "application/json"
    async with server.session.get(server.url(f"/tasks/{uuid.uuid4()}"), headers=page_headers) as resp:
        assert resp.status == 404
        assert "There is no task" in await resp.text()
    async with server.session.get(server.url("/tasks/%3Cscript%3E"), headers=page_headers) as resp:
        assert resp.status == 404
        assert "<script>" not in await resp.text()  # escaped


@pytest.mark.parametrize(
    ("accept", "html"),
    [
        ("text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8", True),
        ("application/json", False),
        ("*/*", False),
        ("", False),
        ("application/json, text/html", False),
    ],
)
def test_wants_html_follows_the_accept_header(accept: str, html: bool) -> None:
    from aiohttp.test_utils import make_mocked_request

    assert wants_html(make_mocked_request("GET", "/tasks/x", headers={"Accept": accept})) is html


@pytest.mark.usefixtures("worker")
async def test_fresh_task_on_a_resumed_stream_starts_from_its_current_state(server: Server) -> None:
    from .sse import SSEReader

    older = await server.start_task("demo.count", n=1, delay=0)
    async with server.session.get(server.url(f"/tasks/{older}/events?last_event_id=0")) as resp:
        events = await SSEReader(resp).rest()
    cursor = events[-1].id
    # A task the cursor says nothing about, added with fresh=: its current state comes.
    url = f"/events?task={older}&last_event_id={cursor}&fresh={older}"
    async with server.session.get(server.url(url)) as resp:
        assert resp.status == 200
        got = await SSEReader(resp).rest()
    assert [e.event for e in got] == ["success"]
    # Sent with the stream's position, never an id below the cursor: a reconnect
    # from it must not repeat anything.
    assert parse_id(str(got[0].id)).covers(parse_id(str(cursor)))


async def test_text_parameters_render_as_escaped_json_in_the_start_form(make_server: Any, settings: Settings) -> None:
    from progress_sse.allowlist import AllowedTask, AllowList

    def any_text(name: str, value: Any) -> Any:
        return value

    allowed = AllowList([AllowedTask("shop.export", {"fmt": (any_text, 'p"df'), "tags": (any_text, ["a"])})])
    server: Server = await make_server(settings, allowlist=allowed)
    async with server.session.get(server.url("/")) as resp:
        html = await resp.text()
    assert 'value="&#34;p\\&#34;df&#34;"' in html  # the JSON "p\"df", every quote escaped
    assert 'value="[&#34;a&#34;]"' in html
