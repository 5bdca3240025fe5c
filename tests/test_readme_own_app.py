"""The README's "Your own Celery app in five minutes", run as written.

The test reads that section from README.md and does what a reader does, in the
section's order, in an empty directory, with the machinery of tests/readme_run.py
(which says how files and commands are taken from the section).

What is substituted, mechanically, and nothing else:

- `localhost:6379`, the Redis, becomes 127.0.0.1:<port> of a private redis-server
  of the test's own. The database number stays the README's (3, not the default
  0), so events really follow the app's broker to a non-default database.
- The web port 8000 becomes a free port in the section's text. The section also
  relies on 8000 as a default twice, and names the variable that changes each:
  `PORT` (for `progress-sse web` and `python -m myapp.web`) and `PROGRESS_SSE_URL`
  (for `progress-sse watch` and `start`). Those two are set to the free port.
- `python3 -m venv .venv`, `source .venv/bin/activate` and `pip install
  progress-sse` are skipped: progress-sse is installed in the venv running this
  test, and its bin directory comes first on PATH, as activating it would do.
- The commands get no other environment: PATH, PORT and PROGRESS_SSE_URL only.

Then it checks what the section promises: the worker (started without REDIS_URL)
records events in database 3, the app broker's, and nowhere else; a task observed
by id on the page shows a live bar that fills up (real headless Chromium);
`progress-sse watch` prints the task's progress and exits 0; with the allow-list,
`POST /tasks` and `progress-sse start` start tasks that succeed; and the page of
your own shows its bar filling to full. `progress-sse watch` is started while the
observed bar still moves (a reader has both open at once), so that it has progress
to print. Every wait is for a line, a frame or an element, with a deadline; only
`python -m myapp.web`, whose "Running on" line sits in a pipe's buffer, is waited
for by its page answering.

`tests/apps/fiveminutes/` holds the same files as the section, so that ruff checks
the README's Python; a test here keeps the two identical.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
import redis

from progress_sse.cli.embedded import free_port

from .browser import Page, chromium_path, open_browser
from .readme_run import (
    INSTALL_STEPS,
    README,
    Command,
    FileBlock,
    Item,
    Session,
    blocking,
    console_errors,
    determinate,
    environment,
    follow_to_the_end,
    mirror_mismatch,
    parse,
    private_redis_server,
    section_text,
    substitute,
)

ROOT = Path(__file__).resolve().parents[1]
HEADING = "## Your own Celery app in five minutes"
MIRROR = ROOT / "tests" / "apps" / "fiveminutes"


def section_items() -> list[Item]:
    """The section as written, nothing substituted."""
    return parse(section_text(README.read_text(), HEADING))


# --- what the section promises ----------------------------------------------------------


def test_every_block_of_the_section_is_a_file_or_a_command() -> None:
    items = section_items()
    files = [i.path for i in items if isinstance(i, FileBlock)]
    commands = [i for i in items if isinstance(i, Command)]
    assert files == ["myapp/celery.py", "myapp/tasks.py", "myapp/progress.py", "myapp/page.html", "myapp/web.py"]
    assert [c.text for c in commands if c.skipped] == list(INSTALL_STEPS)
    workers = [c for c in commands if re.search(r"\bcelery -A myapp worker\b", c.text)]
    webs = [c for c in commands if c.terminal and c not in workers]
    assert len(workers) == 1 and workers[0].terminal, "one worker, kept running"
    assert "REDIS_URL" not in workers[0].text, "the point: the worker follows its app's broker"
    assert len(webs) == 3 and all(c.terminal == webs[0].terminal for c in webs), "each web replaces the last"


def test_every_redis_url_of_the_section_is_the_same_non_default_database() -> None:
    urls = set(re.findall(r"redis://[^\s\"')]+", section_text(README.read_text(), HEADING)))
    assert urls == {"redis://localhost:6379/3"}, urls


def test_the_section_s_files_are_the_ones_in_tests_apps_fiveminutes() -> None:
    """So that ruff lints the README's Python (tests/apps/fiveminutes/ is in its path)."""
    mismatch = mirror_mismatch(section_items(), MIRROR)
    assert mismatch is None, mismatch


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[int]:
    """A redis-server of this test's own, so the README's default key prefix and
    database 3 are safe to use, and "nothing in any other database" is checkable."""
    with private_redis_server(tmp_path / "redis") as port:
        yield port


async def wait_for_page(url: str, timeout: float = 30) -> None:
    """Until `url` answers 200: `python -m myapp.web` prints nothing we can wait on
    (aiohttp's "Running on" line sits in a pipe's buffer until it exits)."""
    deadline = asyncio.get_running_loop().time() + timeout
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
        while True:
            try:
                async with http.get(url) as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientConnectionError:
                pass
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"{url} did not answer within {timeout}s")
            await asyncio.sleep(0.05)


@pytest.mark.e2e
@pytest.mark.browser
async def test_the_section_runs_as_written(private_redis: int, tmp_path: Path, output_dir: Path) -> None:
    chromium_path()  # skip (or, in CI, fail) before starting anything
    web_port = free_port()
    logs = output_dir / "readme-own-app"
    logs.mkdir(parents=True, exist_ok=True)
    for old in logs.glob("*.log"):
        old.unlink()
    shots = output_dir / "screenshots"
    shots.mkdir(parents=True, exist_ok=True)
    project = tmp_path / "project"
    project.mkdir()
    section = section_text(README.read_text(), HEADING)
    session = Session(
        parse(substitute(section, private_redis, web_port)), project, environment(web_port), logs, section
    )
    base = f"http://127.0.0.1:{web_port}"
    stopped_badly: list[str] = []
    try:
        async with open_browser(shots, "readme-own-app") as page:
            errors = console_errors(page)
            await observe_and_watch(session, page, web_port, private_redis)
            await allow_list(session, page, base, web_port)
            await own_page(session, page, web_port)
            assert errors == [], errors
            assert page.dialogs == []
    finally:
        stopped_badly = await blocking(session.close)
    assert stopped_badly == [], "\n".join(stopped_badly)


async def observe_and_watch(session: Session, page: Page, web_port: int, redis_port: int) -> None:
    """§1-§6: the app, its worker, the web, a task started from Python, observed by id
    on the page while `progress-sse watch` follows it in the terminal."""
    echo = await blocking(session.upto, r"^echo \$id$")
    task_id = (await blocking(session.run, echo)).strip()

    await page.page.goto(session.url("http://localhost:8000/", web_port))
    await page.page.get_by_label("Task id").fill(task_id)
    await page.page.get_by_role("button", name="Observe").click()
    await page.wait_state(task_id, "progress")
    # §6 while the bar is still moving, so that `watch` has progress to print.
    watch = session.start(await blocking(session.upto, r"^progress-sse watch "))
    await page.wait_state(task_id, "success", timeout=30)
    await page.screenshot("observed-success")
    card = page.card(task_id)
    assert await card.locator("progress").evaluate("(el) => [el.value, el.max]") == [100, 100]
    values = determinate(await page.bar_values(task_id), 100)
    assert len(set(values)) >= 3, f"the observed bar did not move live: {values}"
    assert values == sorted(values) and values[-1] == 100, values

    status, output = await blocking(watch.wait, 30)
    assert status == 0, output
    progress = re.findall(r"^progress (\d+)/100 \(\S+%\) Imported \1 of 100 rows", output, re.MULTILINE)
    assert len(progress) >= 3, f"watch printed no progress:\n{output}"
    assert re.search(r"^success 100/100 \(100\.0%\)", output, re.MULTILINE), output
    assert 'result: {"imported": 100}' in output, output

    # The worker was given no REDIS_URL: its events are in its broker's database, 3.
    for db in range(16):
        client = redis.Redis(port=redis_port, db=db, decode_responses=True)
        try:
            found = set(client.scan_iter(match="progress-sse:*"))
        finally:
            client.close()
        if db == 3:
            assert f"progress-sse:task:{{{task_id}}}:log" in found, found
        else:
            assert found == set(), f"events in database {db}: {found}"


async def allow_list(session: Session, page: Page, base: str, web_port: int) -> None:
    """§7: the web again, with the allow-list; a task started with curl, one with
    `progress-sse start --watch`."""
    await page.page.goto("about:blank")  # not reconnecting to a web being restarted: no refused connections
    curl = await blocking(session.upto, r"^curl ")  # restarts the web (Ctrl-C) on the way
    await page.page.goto(session.url("http://localhost:8000/", web_port))
    await page.page.get_by_role("heading", name="Start a job").wait_for()
    for name in ("myapp.tasks.import_rows", "myapp.tasks.send_mails"):
        assert await page.page.locator(f'form[data-task-name="{name}"]').count() == 1, name
    await page.screenshot("allow-list")

    answer = json.loads(await blocking(session.run, curl))
    events = await follow_to_the_end(base, answer["id"])
    assert [e["state"] for e in events][:2] == ["queued", "started"], events
    assert events[-1]["state"] == "success" and events[-1]["result"] == {"sent": 20}, events[-1]
    assert "Sent 20 of 20" in [e["message"] for e in events if e["state"] == "progress"]

    start = await blocking(session.upto, r"^progress-sse start ")
    output = await blocking(session.run, start)  # exit status 0: the task succeeded
    assert re.search(r"^progress \d+/20 \(\S+%\) Imported \d+ of 20 rows", output, re.MULTILINE), output
    assert re.search(r"^success 20/20 \(100\.0%\)", output, re.MULTILINE), output


async def own_page(session: Session, page: Page, web_port: int) -> None:
    """§8: `python -m myapp.web` in place of `progress-sse web`, and its page."""
    await page.page.goto("about:blank")
    await blocking(session.finish)
    url = session.url("http://localhost:8000/import", web_port)
    await wait_for_page(url)
    await page.page.goto(url)
    await page.page.get_by_role("button", name="Import 50 rows").click()
    await page.page.locator("#text", has_text="Imported 50 rows").wait_for(timeout=30_000)
    await page.screenshot("own-page-success")
    assert await page.page.locator("#bar").evaluate("(el) => [el.value, el.max]") == [50, 50]
    values = determinate(await page.page.evaluate("() => window.__bars"), 50)
    assert len(set(values)) >= 3, f"the page's bar did not move live: {values}"
    assert values == sorted(values) and values[-1] == 50, values
