"""A Celery group watched as one aggregate bar."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery, group

from progress_sse.config import Settings
from progress_sse.web.groups import aggregate
from progress_sse.worker import bridge
from progress_sse.worker.celery_app import make_celery

from .conftest import Server
from .sse import SSEReader, numbers


def member(state: str, current: float = 0, total: float | None = None) -> dict[str, Any]:
    return {"state": state, "current": current, "total": total}


def test_aggregate_sums_members_and_is_indeterminate_while_any_total_is_unknown() -> None:
    bar = aggregate("g", {"a": member("progress", 2, 10), "b": member("queued")}, 2)
    assert (bar["current"], bar["total"], bar["percent"], bar["state"]) == (2, None, None, "progress")
    bar = aggregate("g", {"a": member("progress", 2, 10), "b": member("progress", 3, 10)}, 2)
    assert (bar["current"], bar["total"], bar["percent"]) == (5, 20, 25.0)
    assert bar["message"] == "0 of 2 tasks done" and bar["counts"] == {"progress": 2}


def test_aggregate_waits_for_members_it_has_not_seen() -> None:
    bar = aggregate("g", {"a": member("success", 10, 10)}, 3)
    assert bar["total"] is None and bar["state"] == "progress" and bar["done"] == 1


@pytest.mark.parametrize(
    ("states", "expected"),
    [
        (["success", "success"], "success"),
        (["success", "failure"], "failure"),
        (["revoked", "success"], "revoked"),
        (["queued", "queued"], "queued"),
        (["queued", "started"], "progress"),
        (["success", "queued"], "progress"),
    ],
)
def test_group_state_is_terminal_only_when_every_member_is(states: list[str], expected: str) -> None:
    bar = aggregate("g", {str(i): member(s) for i, s in enumerate(states)}, len(states))
    assert bar["state"] == expected


@pytest.fixture
def publisher_app(settings: Settings) -> Iterator[Celery]:
    """A user's publishing process: its own Celery app with the bridge installed."""
    app = make_celery(settings, main="publisher")
    bridge.install(app, settings)
    yield app
    bridge.uninstall()
    app.close()


async def start_group(app: Celery, *signatures: Any) -> str:
    result = await asyncio.to_thread(lambda: group(list(signatures)).apply_async())
    return str(result.id)


@pytest.mark.e2e
@pytest.mark.usefixtures("worker")
async def test_group_streams_one_aggregate_bar_until_every_member_ends(server: Server, publisher_app: Celery) -> None:
    count = publisher_app.signature("demo.count", kwargs={"n": 4, "delay": 0.05})
    group_id = await start_group(publisher_app, count, count.clone(), count.clone())
    async with server.session.get(server.url(f"/groups/{group_id}/events")) as resp:
        assert resp.status == 200
        frames = await SSEReader(resp).rest(timeout=60)
    assert {f.event for f in frames} == {"group"}
    bars = [f.payload for f in frames]
    ids = numbers(frames)
    assert ids == sorted(ids)
    assert [b["done"] for b in bars] == sorted(b["done"] for b in bars)
    last = bars[-1]
    assert (last["state"], last["done"], last["current"], last["total"], last["percent"]) == ("success", 3, 12, 12, 100)

    async with server.session.get(server.url(f"/groups/{group_id}")) as resp:
        body = await resp.json()
    assert body["state"] == "success" and len(body["members"]) == 3
    member_state = await server.state(body["members"][0])
    assert member_state["group_id"] == group_id
    # A reconnect after the end: nothing more to say.
    async with server.session.get(
        server.url(f"/groups/{group_id}/events"), headers={"Last-Event-ID": str(frames[-1].id)}
    ) as resp:
        assert resp.status == 204


@pytest.mark.e2e
@pytest.mark.usefixtures("worker")
async def test_a_failing_member_fails_the_group(server: Server, publisher_app: Celery) -> None:
    group_id = await start_group(
        publisher_app,
        publisher_app.signature("demo.count", kwargs={"n": 2, "delay": 0.01}),
        publisher_app.signature("demo.fail", kwargs={"after": 1, "delay": 0.01}),
    )
    async with server.session.get(server.url(f"/groups/{group_id}/events")) as resp:
        frames = await SSEReader(resp).rest(timeout=60)
    last = frames[-1].payload
    assert last["state"] == "failure" and last["counts"] == {"failure": 1, "success": 1}


@pytest.mark.e2e
async def test_unknown_group_is_404(server: Server) -> None:
    for path in (f"/groups/{uuid.uuid4()}", f"/groups/{uuid.uuid4()}/events", "/groups/bad%20id"):
        async with server.session.get(server.url(path)) as resp:
            assert resp.status == 404
            assert "group" in (await resp.json())["error"]


@pytest.mark.e2e
@pytest.mark.browser
@pytest.mark.usefixtures("worker")
async def test_page_shows_a_group_as_one_bar_on_the_shared_stream(
    server: Server, publisher_app: Celery, output_dir: Any
) -> None:
    from .browser import open_browser

    count = publisher_app.signature("demo.count", kwargs={"n": 5, "delay": 0.1})
    group_id = await start_group(publisher_app, count, count.clone())
    shots = output_dir / "screenshots"
    shots.mkdir(parents=True, exist_ok=True)
    async with open_browser(shots, "group") as page:
        await page.page.goto(server.url("/"))
        await page.page.get_by_label("Task id").fill(group_id)
        await page.page.get_by_role("button", name="Observe").click()
        await page.wait_state(group_id, "success", timeout=60)
        card = page.card(group_id)
        assert await card.locator(".task-name").text_content() == "group of 2 tasks"
        assert await card.locator(".task-message").text_content() == "2 of 2 tasks done"
        assert await card.locator(".task-count").text_content() == "10 of 10"
        assert await card.locator("progress").evaluate("(el) => [el.value, el.max]") == [10, 10]
        assert await page.page.locator(".task").count() == 1, "members feed the group's bar, not bars of their own"
        streams = await page.streams()
        assert streams["maxOpen"] == 1
        await page.screenshot("group-success")
        page.forgive("404 (Not Found)")  # the page asks /tasks/<id> first, then /groups/<id>
        assert page.errors == []


@pytest.mark.e2e
@pytest.mark.browser
@pytest.mark.usefixtures("worker")
async def test_a_member_keeps_its_own_card_and_a_dropped_group_releases_its_members(
    server: Server, publisher_app: Celery, output_dir: Any
) -> None:
    from .browser import open_browser

    count = publisher_app.signature("demo.count", kwargs={"n": 30, "delay": 0.1})
    group_id = await start_group(publisher_app, count, count.clone())
    async with server.session.get(server.url(f"/groups/{group_id}")) as resp:
        first, second = (await resp.json())["members"]
    shots = output_dir / "screenshots"
    shots.mkdir(parents=True, exist_ok=True)
    async with open_browser(shots, "group-members") as page:
        await page.page.goto(server.url("/"))
        for watched in (first, group_id):  # a member on its own, then its group
            await page.page.get_by_label("Task id").fill(watched)
            await page.page.get_by_role("button", name="Observe").click()
            await page.card(watched).wait_for()
        await page.wait_state(group_id, "progress")

        await page.card(group_id).get_by_role("button", name="Stop watching").click()
        # The stream reopens with what is still watched: the member with its own card.
        await page.page.wait_for_function(
            """([keep, drop]) => {
                 const last = window.__streams.opened.at(-1);
                 return last.includes(keep) && !last.includes(drop);
               }""",
            arg=[first, second],
            timeout=10_000,
        )
        await page.wait_state(first, "success", timeout=60)
        assert await page.card(first).locator(".task-count").text_content() == "30 of 30"
        assert await page.page.locator(".task").count() == 1
        page.forgive("404 (Not Found)")  # /tasks/<group id> is asked first
        assert page.errors == []
