"""The page in a real headless Chromium, against the real server, Redis and worker.

Screenshots of each state land in <test output>/screenshots.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from progress_sse.config import Settings
from progress_sse.events import State, make_event
from progress_sse.keys import Keys
from progress_sse.publisher import Publisher, sync_client
from progress_sse.web import HUB

from .browser import Page, open_browser
from .conftest import Server, wait_until, worker_env

pytestmark = [pytest.mark.e2e, pytest.mark.browser, pytest.mark.usefixtures("worker")]


@pytest.fixture
async def page(request: pytest.FixtureRequest, output_dir: Path) -> AsyncIterator[Page]:
    shots = output_dir / "screenshots"
    shots.mkdir(parents=True, exist_ok=True)
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name)
    async with open_browser(shots, name) as browser_page:
        yield browser_page
    # No CSP violation, no script error, no alert from task text: on every page.
    assert browser_page.unexpected_errors() == [], browser_page.errors
    assert browser_page.dialogs == []


async def start_from_form(page: Page, name: str, **values: Any) -> str:
    form = page.page.locator(f'form[data-task-name="{name}"]')
    for field, value in values.items():
        await form.locator(f'input[name="{field}"]').fill(str(value))
    async with page.page.expect_response(lambda r: r.url.endswith("/tasks") and r.request.method == "POST") as info:
        await form.get_by_role("button", name="Start").click()
    response = await info.value
    assert response.status == 202, await response.text()
    task_id: str = (await response.json())["id"]
    await page.card(task_id).wait_for()
    return task_id


async def test_indeterminate_bar_has_no_value_while_running_and_is_full_on_success(server: Server, page: Page) -> None:
    await page.page.goto(server.url("/"))
    task_id = await start_from_form(page, "demo.mystery", min_s=1.5, max_s=1.5)
    await page.wait_state(task_id, "progress")
    bar = page.card(task_id).locator("progress")
    assert await bar.get_attribute("value") is None  # the browser animates it
    assert "Working on something" in await page.card(task_id).locator(".task-message").text_content()
    await page.screenshot("indeterminate-running")

    await page.wait_state(task_id, "success")
    assert await bar.evaluate("(el) => [el.value, el.max]") == [1, 1]
    assert "success" in await page.card(task_id).locator(".task-state").text_content()
    assert '"seconds"' in await page.card(task_id).locator(".task-result-value").text_content()
    assert "success" in await page.page.locator("#announcer").text_content()
    await page.screenshot("indeterminate-success")


async def test_determinate_bar_rises_monotonically_to_full(server: Server, page: Page) -> None:
    await page.page.goto(server.url("/"))
    task_id = await start_from_form(page, "demo.count", n=12, delay=0.1)
    await page.wait_state(task_id, "progress")
    await page.screenshot("determinate-running")
    card = page.card(task_id)
    await page.wait_state(task_id, "success")
    await page.screenshot("determinate-success")

    values = [float(v["value"]) for v in await page.bar_values(task_id) if v["value"] is not None and v["max"] == "12"]
    assert len(values) >= 3, values
    assert values == sorted(values), f"the bar went backwards: {values}"
    assert values[-1] == 12
    assert await card.locator(".task-count").text_content() == "12 of 12"
    assert await card.locator(".task-percent").text_content() == "100%"
    assert await card.locator(".task-cancel").is_hidden()


async def test_failure_shows_error_type_message_and_traceback(server: Server, page: Page) -> None:
    await page.page.goto(server.url("/"))
    task_id = await start_from_form(page, "demo.fail", after=2, delay=0.05)
    await page.wait_state(task_id, "failure")
    card = page.card(task_id)
    assert await card.locator(".task-error-type").text_content() == "RuntimeError"
    assert "gave up after 2 steps" in await card.locator(".task-error-message").text_content()
    traceback = card.locator(".task-traceback")
    assert await traceback.is_hidden()  # behind a disclosure
    await card.locator("summary").click()
    assert "Traceback" in await traceback.text_content()
    await page.screenshot("failure")


async def test_retry_shows_the_attempt_count(server: Server, page: Page) -> None:
    await page.page.goto(server.url("/"))
    task_id = await start_from_form(page, "demo.flaky", failures=1, delay=0.6)
    await page.wait_state(task_id, "retry")
    assert "retry 1" in await page.card(task_id).locator(".task-attempt").text_content()
    await page.screenshot("retry")
    await page.wait_state(task_id, "success")
    assert await page.card(task_id).locator(".task-attempt").text_content() == "attempt 2"


async def test_cancel_button_ends_in_revoked(server: Server, page: Page) -> None:
    await page.page.goto(server.url("/"))
    task_id = await start_from_form(page, "demo.count", n=400, delay=0.05)
    await page.wait_state(task_id, "progress")
    await page.card(task_id).get_by_role("button", name="Cancel").click()
    await page.wait_state(task_id, "revoked", timeout=10)
    assert "revoked" in await page.card(task_id).locator(".task-state").text_content()
    await page.screenshot("revoked")


async def test_keyboard_alone_starts_a_task(server: Server, page: Page) -> None:
    await page.page.goto(server.url("/"))
    form = page.page.locator('form[data-task-name="demo.stages"]')
    await form.locator('input[name="delay"]').focus()
    await page.page.keyboard.press("Control+A")
    await page.page.keyboard.type("0.1")
    async with page.page.expect_response(lambda r: r.url.endswith("/tasks")) as info:
        await page.page.keyboard.press("Enter")  # submits the form it is in
    task_id = (await (await info.value).json())["id"]
    await page.wait_state(task_id, "success")


async def test_observe_by_id_validates_and_explains(server: Server, page: Page) -> None:
    task_id = await server.start_task("demo.count", n=3, delay=0.05)
    await page.page.goto(server.url("/"))
    field = page.page.get_by_label("Task id")
    error = page.page.locator("#observe-error")

    await field.fill("not a task id!")
    await page.page.get_by_role("button", name="Observe").click()
    assert "not a task id" in await error.text_content()

    await field.fill(str(uuid.uuid4()))
    await page.page.get_by_role("button", name="Observe").click()
    await page.page.locator("#observe-error", has_text="There is no task").wait_for()

    await field.fill(task_id)
    await page.page.get_by_role("button", name="Observe").click()
    await page.wait_state(task_id, "success")
    assert await error.is_hidden()
    page.forgive("404 (Not Found)")  # the unknown id's answer


async def test_twenty_tasks_share_one_stream_connection(server: Server, page: Page) -> None:
    task_ids = [await server.start_task("demo.count", n=4, delay=0.15) for _ in range(20)]
    await page.page.goto(server.url("/"))
    # Watched before the page loads (as after a reload): all twenty at once.
    await page.page.evaluate("(ids) => localStorage.setItem('progress-sse:watched', JSON.stringify(ids))", task_ids)
    await page.page.reload()
    await page.page.locator(".task").nth(19).wait_for()
    await wait_until(lambda: server.app[HUB].watcher_count == 1, what="the page's one stream")
    await page.screenshot("twenty-running")
    for task_id in task_ids:
        await page.wait_state(task_id, "success", timeout=60)
    await page.screenshot("twenty-done")

    streams = await page.streams()
    assert streams["maxOpen"] == 1, streams
    assert len(streams["opened"]) == 1, streams["opened"]
    assert sorted(re.findall(r"task=([^&]+)", streams["opened"][0])) == sorted(task_ids)
    assert streams["open"] == 0, "closed once every task had ended"
    assert await page.page.locator(".connection").text_content() == "idle"


async def test_adding_a_task_keeps_one_connection_and_loses_nothing(server: Server, page: Page) -> None:
    await page.page.goto(server.url("/"))
    first = await start_from_form(page, "demo.count", n=30, delay=0.05)
    await page.wait_state(first, "progress")
    second = await start_from_form(page, "demo.count", n=3, delay=0.05)
    for task_id in (first, second):
        await page.wait_state(task_id, "success")
    streams = await page.streams()
    assert streams["maxOpen"] == 1, streams
    # The first bar kept rising through the reopen.
    values = [float(v["value"]) for v in await page.bar_values(first) if v["value"] is not None and v["max"] == "30"]
    assert values == sorted(values) and values[-1] == 30


async def test_task_text_is_shown_as_text_and_runs_nothing(server: Server, page: Page, settings: Settings) -> None:
    hostile = "<img src=x onerror=alert(1)>"
    task_id = str(uuid.uuid4())
    publisher = Publisher(sync_client(settings.redis_url), Keys(settings.key_prefix))
    publisher.publish(make_event(task_id, "<b>bold</b>", State.STARTED))
    publisher.publish(make_event(task_id, "<b>bold</b>", State.PROGRESS, current=1, total=2, message=hostile))
    publisher.publish(make_event(task_id, "<b>bold</b>", State.SUCCESS, current=2, total=2, result=hostile))
    publisher.client.close()

    await page.page.goto(server.url(f"/tasks/{task_id}"))
    await page.wait_state(task_id, "success")
    card = page.card(task_id)
    assert await card.locator(".task-name").text_content() == "<b>bold</b>"
    assert json.loads(await card.locator(".task-result-value").text_content()) == hostile
    assert await page.page.locator("img").count() == 0
    assert await page.page.locator(".task b").count() == 0
    await page.screenshot("hostile-text")
    # The fixture then checks that no dialog opened and no script error happened.


async def test_task_page_shows_one_shareable_bar(server: Server, page: Page) -> None:
    task_id = await server.start_task("demo.count", n=5, delay=0.1)
    response = await page.page.goto(server.url(f"/tasks/{task_id}"))
    assert response is not None and response.status == 200
    assert "script-src 'self'" in response.headers["content-security-policy"]
    await page.wait_state(task_id, "success")
    assert await page.page.locator(".task").count() == 1
    await page.screenshot("task-page")

    missing = await page.page.goto(server.url(f"/tasks/{uuid.uuid4()}"))
    assert missing is not None and missing.status == 404
    assert "There is no task" in await page.page.locator("main").text_content()
    page.forgive("404 (Not Found)")


async def test_reload_restores_watched_tasks_and_their_state(server: Server, page: Page) -> None:
    await page.page.goto(server.url("/"))
    done = await start_from_form(page, "demo.count", n=2, delay=0.05)
    await page.wait_state(done, "success")
    running = await start_from_form(page, "demo.count", n=60, delay=0.05)
    await page.wait_state(running, "progress")

    await page.page.reload()
    await page.wait_state(done, "success", timeout=5)
    assert await page.card(done).locator(".task-count").text_content() == "2 of 2"
    await page.wait_state(running, "progress", "success", timeout=5)
    await page.wait_state(running, "success")
    assert await page.card(running).locator(".task-count").text_content() == "60 of 60"
    # Newest first.
    assert await page.page.locator(".task .task-id").all_text_contents() == [running, done]
    # The recent list shows both as well.
    await page.page.locator("#recent li", has_text=running).wait_for()


@pytest.fixture
def web_process(settings: Settings, output_dir: Path) -> Iterator[Any]:
    """`progress-sse web` as its own process, which a test may kill and start again."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = worker_env(settings) | {"PORT": str(port), "HOST": "127.0.0.1"}
    log = (output_dir / "web-process.log").open("ab")
    processes: list[subprocess.Popen[bytes]] = []

    def start() -> subprocess.Popen[bytes]:
        process = subprocess.Popen(
            [sys.executable, "-m", "progress_sse", "web"], env=env, stdout=log, stderr=subprocess.STDOUT
        )
        processes.append(process)
        return process

    class Web:
        url = f"http://127.0.0.1:{port}"

        def start(self) -> subprocess.Popen[bytes]:
            return start()

        def ready(self) -> bool:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    return True
            except OSError:
                return False

    yield Web()
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait()
    log.close()


async def test_page_survives_a_forced_server_restart_mid_task(server: Server, page: Page, web_process: Any) -> None:
    web = web_process.start()
    await wait_until(web_process.ready, what="the web process to listen")
    await page.page.goto(f"{web_process.url}/")
    task_id = await start_from_form(page, "demo.count", n=50, delay=0.1)
    await page.wait_state(task_id, "progress")

    os.kill(web.pid, signal.SIGKILL)  # no graceful anything
    await asyncio.to_thread(web.wait)
    await page.page.locator(".connection", has_text="reconnecting").wait_for(timeout=10_000)
    await page.screenshot("restart-reconnecting")

    web_process.start()
    await page.wait_state(task_id, "success", timeout=60)
    await page.screenshot("restart-recovered")
    card = page.card(task_id)
    assert await card.locator(".task-count").text_content() == "50 of 50"
    values = [float(v["value"]) for v in await page.bar_values(task_id) if v["value"] is not None and v["max"] == "50"]
    assert values == sorted(values) and values[-1] == 50
    assert await page.page.locator(".connection").text_content() == "idle"
    # A killed server makes Chromium log the failed stream requests; they are expected here.
    page.forgive("net::ERR_")  # every request cut or refused by the kill


async def test_page_reconnects_by_itself_after_error_responses(server: Server, page: Page) -> None:
    """A 503 (as during a deploy) ends an EventSource for good; the page must come
    back by itself, with backoff, and show that it is reconnecting meanwhile."""
    refused: list[str] = []

    async def deploy_in_progress(route: Any) -> None:
        if len(refused) < 2:
            refused.append(route.request.url)
            await route.fulfill(status=503, content_type="application/json", body='{"error": "deploying"}')
        else:
            await route.continue_()

    await page.page.route("**/events?*", deploy_in_progress)
    await page.page.goto(server.url("/"))
    task_id = await start_from_form(page, "demo.count", n=10, delay=0.2)
    await page.page.locator(".connection", has_text="reconnecting").wait_for(timeout=10_000)
    await page.wait_state(task_id, "success", timeout=30)
    assert len(refused) == 2
    streams = await page.streams()
    assert len(streams["opened"]) == 3, "two refused, then one that worked"
    assert await page.card(task_id).locator(".task-count").text_content() == "10 of 10"
    page.forgive("503")


async def load_client(page: Page, server: Server) -> None:
    """The reusable client itself, imported into a page of the same origin."""
    from progress_sse.pages import ASSETS

    await page.page.goto(server.url(f"/tasks/{uuid.uuid4()}"))  # any page of the origin
    page.forgive("404 (Not Found)")
    url = server.url(f"/static/{server.app[ASSETS].version}/progress.js")
    await page.page.evaluate(
        """async (url) => {
             window.client = await import(url);
             window.calls = [];
             window.record = (e) =>
               window.calls.push(`${e.task_id.slice(0, 8)}:${e.state}${e.retries ? "#" + e.retries : ""}`);
           }""",
        url,
    )


async def calls_include(page: Page, entry: str) -> None:
    await page.page.wait_for_function("(entry) => window.calls.includes(entry)", arg=entry, timeout=10_000)


async def test_client_adding_tasks_repeats_and_loses_nothing(server: Server, page: Page, settings: Settings) -> None:
    publisher = Publisher(sync_client(settings.redis_url), Keys(settings.key_prefix))
    a, c, d = (str(uuid.uuid4()) for _ in range(3))
    for state, extra in ((State.QUEUED, {}), (State.STARTED, {}), (State.RETRY, {"retries": 1}), (State.STARTED, {})):
        publisher.publish(make_event(a, "demo.flaky", state, **extra))
    await load_client(page, server)
    await page.page.evaluate("(a) => { window.w = client.watch([a], { onEvent: record }); }", a)
    await calls_include(page, f"{a[:8]}:started")
    for task_id in (c, d):  # each add reopens the stream
        publisher.publish(make_event(task_id, "demo.count", State.QUEUED))
        await page.page.evaluate("(id) => w.add(id)", task_id)
        await calls_include(page, f"{task_id[:8]}:queued")
    publisher.publish(make_event(a, "demo.flaky", State.RETRY, retries=2))
    publisher.publish(make_event(a, "demo.flaky", State.SUCCESS))
    await calls_include(page, f"{a[:8]}:success")
    publisher.client.close()
    calls = await page.page.evaluate("() => window.calls")
    assert calls == [f"{a[:8]}:started", f"{c[:8]}:queued", f"{d[:8]}:queued", f"{a[:8]}:retry#2", f"{a[:8]}:success"]


async def test_client_streams_tasks_beyond_the_first_hundred_as_slots_free(
    server: Server, page: Page, settings: Settings
) -> None:
    publisher = Publisher(sync_client(settings.redis_url), Keys(settings.key_prefix))
    ids = [str(uuid.uuid4()) for _ in range(101)]
    for task_id in ids:
        publisher.publish(make_event(task_id, "demo.count", State.QUEUED))
    await load_client(page, server)
    await page.page.evaluate("(ids) => { window.w = client.watch(ids, { onEvent: record }); }", ids)
    await calls_include(page, f"{ids[99][:8]}:queued")
    assert f"{ids[100][:8]}:queued" not in await page.page.evaluate("() => window.calls"), "101st waits"
    publisher.publish(make_event(ids[0], "demo.count", State.SUCCESS))  # frees a slot
    await calls_include(page, f"{ids[100][:8]}:queued")
    publisher.publish(make_event(ids[100], "demo.count", State.STARTED))
    await calls_include(page, f"{ids[100][:8]}:started")
    publisher.client.close()


async def test_reload_while_the_server_cannot_answer_keeps_the_watched_tasks(
    server: Server, page: Page, settings: Settings
) -> None:
    publisher = Publisher(sync_client(settings.redis_url), Keys(settings.key_prefix))
    task_id = str(uuid.uuid4())
    publisher.publish(make_event(task_id, "demo.count", State.QUEUED))
    await page.page.goto(server.url("/"))
    await page.page.evaluate("(id) => localStorage.setItem('progress-sse:watched', JSON.stringify([id]))", task_id)

    async def deploying(route: Any) -> None:
        await route.fulfill(status=503, content_type="application/json", body='{"error": "deploying"}')

    await page.page.route(f"**/tasks/{task_id}", deploying)
    await page.page.reload()
    await page.card(task_id).wait_for()  # kept, not dropped as unknown
    stored = await page.page.evaluate("() => JSON.parse(localStorage.getItem('progress-sse:watched'))")
    assert stored == [task_id]
    publisher.publish(make_event(task_id, "demo.count", State.SUCCESS, current=1, total=1))
    publisher.client.close()
    await page.wait_state(task_id, "success")  # the stream brings its state
    page.forgive("503")
