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
from urllib.parse import parse_qs, urlsplit

import pytest

from progress_sse.allowlist import AllowedTask, AllowList, boolean, choice, integer, list_of, number, string
from progress_sse.cli.embedded import free_port
from progress_sse.config import Settings
from progress_sse.connections import sync_client
from progress_sse.events import State, make_event
from progress_sse.keys import Keys
from progress_sse.web import HUB
from progress_sse.worker.publisher import Publisher

from .browser import Page, page_for_test
from .conftest import Server, Worker, wait_until, worker_env

pytestmark = [pytest.mark.e2e, pytest.mark.browser, pytest.mark.usefixtures("worker")]


@pytest.fixture
async def page(request: pytest.FixtureRequest, output_dir: Path) -> AsyncIterator[Page]:
    async with page_for_test(request.node.name, output_dir) as browser_page:
        yield browser_page


async def start_from_form(page: Page, name: str, *, shown: Any = None, **values: Any) -> str:
    """Start `name` from its form with `values`; its id, once its card is shown
    (`shown(page, task_id)`: where; by default any card of the task)."""
    form = page.page.locator(f'form[data-task-name="{name}"]')
    for field, value in values.items():
        await form.locator(f'input[name="{field}"]').fill(str(value))
    async with page.page.expect_response(lambda r: r.url.endswith("/tasks") and r.request.method == "POST") as info:
        await form.get_by_role("button", name="Start").click()
    response = await info.value
    assert response.status == 202, await response.text()
    task_id: str = (await response.json())["id"]
    await (shown(page, task_id) if shown else page.card(task_id)).wait_for()
    return task_id


async def test_indeterminate_bar_has_no_value_while_running_and_is_full_on_success(server: Server, page: Page) -> None:
    await page.page.goto(server.url("/"))
    task_id = await start_from_form(page, "demo.mystery", min_s=1.5, max_s=1.5)
    await page.wait_state(task_id, "progress")
    card = page.card(task_id)
    bar = card.locator("progress")
    assert await bar.get_attribute("value") is None  # the browser animates it
    assert "Working on something" in await card.locator(".task-message").text_content()
    # No count, so the elapsed time comes first in its line, flush with the bar: an
    # empty part must not leave its gap in front of it.
    elapsed = card.locator(".task-elapsed")
    await elapsed.filter(has_text="elapsed").wait_for()
    assert await card.locator(".task-count").text_content() == ""
    assert (await elapsed.bounding_box())["x"] == (await bar.bounding_box())["x"]
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


async def test_retry_reads_retrying_everywhere_and_shows_the_attempt_count(server: Server, page: Page) -> None:
    await page.page.goto(server.url("/"))
    task_id = await start_from_form(page, "demo.flaky", failures=1, delay=0.6)
    await page.wait_state(task_id, "retry")
    card = page.card(task_id)
    assert "retry 1" in await card.locator(".task-attempt").text_content()
    assert await card.locator(".task-state").text_content() == "retrying"
    assert await page.page.locator("#announcer").text_content() == f"demo.flaky {task_id[:8]}: retrying"
    # The recent list's badge follows the stream too, not the state it was loaded with.
    badge = page.page.locator(f'#recent li[data-task-id="{task_id}"] .badge')
    await badge.filter(has_text="retrying").wait_for(timeout=5_000)
    await page.screenshot("retry")
    await page.wait_state(task_id, "success")
    assert await page.card(task_id).locator(".task-attempt").text_content() == "attempt 2"


async def test_cancel_button_ends_in_revoked_which_reads_cancelled(server: Server, page: Page) -> None:
    await page.page.goto(server.url("/"))
    task_id = await start_from_form(page, "demo.count", n=400, delay=0.05)
    await page.wait_state(task_id, "progress")
    card = page.card(task_id)
    await card.get_by_role("button", name="Cancel").click()
    await page.wait_state(task_id, "revoked", timeout=10)  # the protocol's state, kept for styles and tests
    assert await card.locator(".task-state").text_content() == "⊘ cancelled"
    assert (await card.locator(".task-message").text_content()).startswith("Cancelled")
    assert "revoked" not in (await card.inner_text()).lower()
    assert await page.page.locator("#announcer").text_content() == f"demo.count {task_id[:8]}: cancelled"
    badge = page.page.locator(f'#recent li[data-task-id="{task_id}"] .badge')
    await badge.filter(has_text="cancelled").wait_for(timeout=5_000)
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
    # The first two (the two the worker's processes take first) run 3 s, so that no
    # task has ended before the reloaded page loads them: one that has is rightly not
    # put on the stream, and the stream's ids below would be short of it.
    task_ids = [await server.start_task("demo.count", n=20 if i < 2 else 4, delay=0.15) for i in range(20)]
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
    port = free_port()
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
    from progress_sse.web.pages import ASSETS

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


def elapsed_seconds(text: str) -> int:
    found = re.fullmatch(r"(\d+) s elapsed", text)
    assert found, f"not an elapsed time under a minute: {text!r}"
    return int(found.group(1))


async def assert_counts_from_the_real_start(page: Page, server: Server, task_id: str) -> None:
    """The card's elapsed time is the time since the task's first start (GET
    /tasks/<id> started_at), not since the card heard of it; with a known total it
    also has an estimate."""
    card = page.card(task_id)
    await card.locator(".task-eta").filter(has_text=re.compile(r"^about \d+ s left$")).wait_for(timeout=5_000)
    started_at = (await server.state(task_id))["started_at"]
    since_start = await page.page.evaluate("(t) => Date.now() / 1000 - t", started_at)
    shown = elapsed_seconds(await card.locator(".task-elapsed").text_content())
    # The text is refreshed once a second and rounded: within 2 s of the truth, and
    # at least 3 s in, where counting from the card's first frame would show 0 or 1.
    assert since_start >= 3
    assert abs(shown - since_start) <= 2, (shown, since_start)


async def progressed(server: Server, task_id: str, current: int) -> None:
    async def there() -> bool:
        return bool((await server.state(task_id))["current"] >= current)

    await wait_until(there, timeout=30, what=f"{task_id} to reach {current}")


async def test_elapsed_and_estimate_count_from_the_start_when_the_first_frame_is_progress(
    server: Server, page: Page
) -> None:
    """A worker picks the task up before the page's stream opens: the card's first
    frame is a `progress`, and the page never sees `started`."""

    async def late_stream(route: Any) -> None:
        task_id = parse_qs(urlsplit(route.request.url).query)["task"][0]
        await progressed(server, task_id, 12)  # 3 s of work done before the stream opens
        await route.continue_()

    await page.page.route("**/events?*", late_stream)
    await page.page.goto(server.url("/"))
    task_id = await start_from_form(page, "demo.count", n=60, delay=0.25)
    await page.wait_state(task_id, "progress")
    await assert_counts_from_the_real_start(page, server, task_id)
    await page.screenshot("first-frame-progress")
    await server.session.delete(server.url(f"/tasks/{task_id}"))  # free the worker


async def test_a_task_observed_mid_run_shows_elapsed_from_its_start_and_an_estimate(server: Server, page: Page) -> None:
    task_id = await server.start_task("demo.count", n=60, delay=0.25)
    await progressed(server, task_id, 12)
    await page.page.goto(server.url("/"))
    await page.page.get_by_label("Task id").fill(task_id)
    await page.page.get_by_role("button", name="Observe").click()
    await page.wait_state(task_id, "progress")
    await assert_counts_from_the_real_start(page, server, task_id)
    await server.session.delete(server.url(f"/tasks/{task_id}"))


async def test_a_cancelled_group_reads_cancelled(
    server: Server, page: Page, settings: Settings, redis_client: Any
) -> None:
    """Members recorded as the bridge records a Celery group's, then cancelled while watched."""
    keys = Keys(settings.key_prefix)
    group_id, *members = (str(uuid.uuid4()) for _ in range(3))
    publisher = Publisher(sync_client(settings.redis_url), keys)
    for member in members:
        redis_client.sadd(keys.group(group_id), member)
        publisher.publish(make_event(member, "demo.count", State.QUEUED))
        publisher.publish(make_event(member, "demo.count", State.PROGRESS, current=1, total=4))
    await page.page.goto(server.url("/"))
    await page.page.get_by_label("Task id").fill(group_id)
    await page.page.get_by_role("button", name="Observe").click()
    page.forgive("404 (Not Found)")  # the page asks /tasks/<id> first, then /groups/<id>
    await page.wait_state(group_id, "progress")
    for member in members:
        publisher.publish(make_event(member, "demo.count", State.REVOKED, current=1, total=4, reason="revoked"))
    publisher.client.close()
    await page.wait_state(group_id, "revoked")
    card = page.card(group_id)
    assert await card.locator(".task-state").text_content() == "⊘ cancelled"
    assert await card.locator(".task-message").text_content() == "2 of 2 tasks done"
    assert "revoked" not in (await card.inner_text()).lower()
    for member in members:  # listed among the recent tasks, which follow the stream too
        await page.page.locator(f'#recent li[data-task-id="{member}"] .badge', has_text="cancelled").wait_for()
    await page.screenshot("group-cancelled")


@pytest.fixture
def idle_settings(settings: Settings) -> Settings:
    """Keys and a queue no worker heartbeats under or consumes: tasks started there wait."""
    return settings.with_(key_prefix=f"{settings.key_prefix}-noworker", queue=f"{settings.queue}-noworker")


NO_WORKER = "No worker is running: started tasks wait in the queue."


async def test_no_worker_notice_shows_until_a_worker_runs(
    server: Server, make_server: Any, idle_settings: Settings, page: Page, output_dir: Path
) -> None:
    notice = page.page.get_by_role("status").and_(page.page.locator("#worker-notice"))
    # With the session's worker alive: no notice, once /healthz has said so.
    await page.page.goto(server.url("/"))
    await page.page.locator('#worker-notice[data-workers="1"]').wait_for(state="attached")
    assert await notice.text_content() == ""

    idle: Server = await make_server(idle_settings)
    await page.page.goto(idle.url("/"))
    await notice.filter(has_text=NO_WORKER).wait_for()  # from /healthz, on load
    waiting = await start_from_form(page, "demo.count", n=2, delay=0.05)
    assert await notice.text_content() == NO_WORKER  # the POST's answer says so too
    await page.screenshot("no-worker")
    assert await page.card(waiting).get_attribute("data-state") == "queued"

    late = Worker(idle_settings, output_dir / "late-page-worker.log")
    try:
        await asyncio.to_thread(late.wait_ready)

        async def one_worker() -> bool:
            async with idle.session.get(idle.url("/healthz")) as resp:
                return bool((await resp.json())["workers"] == 1)

        await wait_until(one_worker, timeout=30, what="the late worker's heartbeat")
        # No polling: the notice goes with the next start's answer.
        assert await notice.text_content() == NO_WORKER
        await start_from_form(page, "demo.count", n=2, delay=0.05)
        await page.page.locator('#worker-notice[data-workers="1"]').wait_for(state="attached")
        assert await notice.text_content() == ""
        await page.wait_state(waiting, "success", timeout=30)  # it waited in the queue, then ran
        await page.screenshot("worker-arrived")
    finally:
        await asyncio.to_thread(late.stop)


async def test_start_section_is_titled_by_the_allow_list(
    server: Server, make_server: Any, settings: Settings, page: Page
) -> None:
    heading = page.page.locator("#start-heading")
    await page.page.goto(server.url("/"))
    assert await heading.text_content() == "Start a demo task"
    own: Server = await make_server(
        settings, allowlist=AllowList([AllowedTask("demo.count", {"n": (integer(1, 9), 3)})])
    )
    await page.page.goto(own.url("/"))
    assert await heading.text_content() == "Start a task"


def options_object(name: str, value: Any) -> Any:
    """A user's own check, with no describe(): the page gives it the JSON field."""
    if not isinstance(value, dict):
        raise ValueError(f"must be an object, not {value!r}")
    return value


EVERY_KIND = AllowList(
    [
        AllowedTask(
            "shop.export",
            {
                "count": (integer(1, 10), 3),
                "ratio": (number(0, 1), 0.5),
                "title": (string(max_length=20), "Report"),
                "note": (string(max_length=50), None),  # blank: left out, the server uses None
                "fmt": (choice(["pdf", "csv"]), "pdf"),
                "level": (choice([1, 2, 3]), 2),
                "draft": (boolean(), False),
                "ids": (list_of(integer(1, 100), max_items=3), [1, 2]),
                "tags": (list_of(string(max_length=10)), ["a"]),
                "options": (options_object, {"a": 1}),
            },
            description="every kind of parameter",
        )
    ]
)


async def test_every_parameter_kind_has_a_usable_input_that_sends_its_json_type(
    make_server: Any, idle_settings: Settings, page: Page
) -> None:
    own: Server = await make_server(idle_settings, allowlist=EVERY_KIND)  # nothing runs them: they wait
    await page.page.goto(own.url("/"))
    form = page.page.locator('form[data-task-name="shop.export"]')
    field = form.get_by_label
    assert await field("count").get_attribute("type") == "number"
    assert await field("ratio").get_attribute("step") == "any"
    assert await field("title").get_attribute("type") == "text"
    assert await field("title").get_attribute("maxlength") == "20"
    assert await field("fmt").evaluate("(el) => el.tagName") == "SELECT"
    assert await field("draft").get_attribute("type") == "checkbox"
    assert await field("ids").input_value() == "1, 2"
    assert await field("options").input_value() == '{"a": 1}'
    await page.screenshot("every-kind")

    page.forgive("422")  # the last request is refused on purpose
    posts: list[Any] = []
    page.page.on("request", lambda r: posts.append(r) if r.method == "POST" else None)
    error = form.locator(".form-error")

    async def refused_here(text: str, what: str) -> None:
        await error.filter(has_text=text).wait_for()
        assert posts == [], "nothing is sent while a value is wrong"
        assert await field(what).get_attribute("aria-invalid") == "true"

    await field("options").fill("pdf")
    await form.get_by_role("button", name="Start").click()
    await refused_here('options is not valid JSON. Text needs quotes: "pdf".', "options")
    await page.screenshot("every-kind-bad-json")
    await field("options").fill('{"b": [1, 2]}')
    await field("ids").fill("4, x")
    await form.get_by_role("button", name="Start").click()
    await refused_here('ids: "x" is not a number.', "ids")

    await field("ids").fill("4, 5,")  # a stray comma is no item
    await field("title").fill("Q3, final")
    await field("fmt").select_option("csv")
    await field("level").select_option("3")
    await field("draft").check()
    await field("tags").fill("x, y")
    async with page.page.expect_response(lambda r: r.url.endswith("/tasks")) as info:
        await form.get_by_role("button", name="Start").click()
    response = await info.value
    assert response.status == 202, await response.text()
    sent = json.loads(response.request.post_data or "")
    expected = {
        "count": 3,
        "ratio": 0.5,
        "title": "Q3, final",
        "fmt": "csv",
        "level": 3,
        "draft": True,
        "ids": [4, 5],
        "tags": ["x", "y"],
        "options": {"b": [1, 2]},
    }
    # Compared as JSON text: true is not 1, and "3" is not 3.
    assert json.dumps(sent, sort_keys=True) == json.dumps({"name": "shop.export", "kwargs": expected}, sort_keys=True)
    assert await error.is_hidden()

    await field("ids").fill("1, 2, 3, 4")
    await form.get_by_role("button", name="Start").click()
    await error.filter(has_text="ids must have at most 3 items").wait_for()  # the server's answer, by its form
