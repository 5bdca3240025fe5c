"""The README's "Show your users their own tasks", run as written.

The section is run the way tests/test_readme_own_app.py runs its own, with the same
machinery (tests/readme_run.py) and the same substitutions: the Redis becomes a
private redis-server of the test's own, the web's port 8000 and Flask's port 5000
become free ports, and `pip install flask` is skipped (Flask is in the test
extras). Nothing else changes.

The section starts from the five-minute section's `myapp`, so the test first does
what that section leaves behind in the directory: its `mkdir` and its files (none
of its commands that keep running: the reader has stopped them). Then it does this
section in order, and checks what it promises:

- (a) the Flask view, reached by pressing its button, sends the browser to the
  service's own page for the task it started, with a token in the fragment that
  watches that task; the bar there fills to full, live, and the token is gone from
  the address (it is in the tab's sessionStorage);
- without a token the service answers 401, the README's curl included; with a
  token minted with the same secret it answers;
- (b) the page of your own, on Flask's origin, shows a bar that fills to full,
  live, over a stream from the service's origin (CORS);
- the same page, when the web runs with the README's command less its
  PROGRESS_SSE_CORS_ORIGINS, is refused by the browser: Chromium reports the
  stream blocked by CORS policy, again after the task has ended (when a stream
  that was let through would get its success), and the bar never moves.

Every wait is for a line, a console message, a URL or an element, with a deadline.
`tests/apps/owntasks/` holds the section's files, so that ruff lints its Python.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest

from progress_sse.cli.embedded import free_port
from progress_sse.tokens import verify, watch_token

from .browser import Page, chromium_path, open_browser
from .readme_run import (
    README,
    UUID,
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
HEADING = "## Show your users their own tasks"
FIVE_MINUTES = "## Your own Celery app in five minutes"
MIRROR = ROOT / "tests" / "apps" / "owntasks"
README_FLASK_PORT = "5000"
SECRET_FILE = ".progress-sse-secret"  # where the section keeps the secret the web and Flask share
CORS_SETTING = re.compile(r"PROGRESS_SSE_CORS_ORIGINS=\S+\s+")
TOKEN_KEY = "progress-sse-token"  # where the service's page keeps its token (static/tokens.js)
ROWS = 50  # what the section's views import


def section_items() -> list[Item]:
    """The section as written, nothing substituted."""
    return parse(section_text(README.read_text(), HEADING))


def commands(items: list[Item]) -> list[Command]:
    return [i for i in items if isinstance(i, Command)]


# --- what the section says ----------------------------------------------------------------


def test_every_block_of_the_section_is_a_file_or_a_command() -> None:
    items = section_items()
    assert [i.path for i in items if isinstance(i, FileBlock)] == [
        "myapp/website.py",
        "myapp/ownpage.py",
        "myapp/templates/import.html",
    ]
    assert [c.text for c in commands(items) if c.skipped] == ["pip install flask"]
    kept: dict[str, list[str]] = {}
    for c in commands(items):
        if c.terminal:
            kept.setdefault(c.terminal, []).append(c.text)
    assert list(kept) == ["terminal 1", "terminal 2", "terminal 3"], kept
    (worker,), (web,), flasks = kept["terminal 1"], kept["terminal 2"], kept["terminal 3"]
    assert worker.startswith("celery -A myapp worker"), worker
    apps = [re.findall(r"flask --app (\S+) run --port 5000 ", f) for f in flasks]
    assert apps == [["myapp.website"], ["myapp.ownpage"]], flasks
    share = f"PROGRESS_SSE_SECRET=$(cat {SECRET_FILE})"
    assert all(text.startswith(share) for text in [web, *flasks]), "the web and Flask read the one secret"
    assert "PROGRESS_SSE_CORS_ORIGINS=http://localhost:5000 " in web and "progress-sse web" in web
    minted = [c.text for c in commands(items) if SECRET_FILE in c.text and "secrets.token_urlsafe(32)" in c.text]
    assert minted == [f"python3 -c 'import secrets; print(secrets.token_urlsafe(32))' > {SECRET_FILE}"]


def test_the_short_path_is_as_short_as_the_section_says() -> None:
    """Code lines of the redirecting view's file (no blank or comment-only lines):
    under 15, and the number the section's opening paragraph gives."""
    website = next(i for i in section_items() if isinstance(i, FileBlock) and i.path == "myapp/website.py")
    lines = [line for line in website.text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert len(lines) < 15, lines
    assert f"in {len(lines)} lines of your code" in section_text(README.read_text(), HEADING)


def test_the_views_mint_tokens_for_the_one_task_they_started() -> None:
    for item in section_items():
        if isinstance(item, FileBlock) and item.path.endswith(".py"):
            assert "watch_token([task.id])" in item.text, item.path
            assert "operator_token" not in item.text and "start_token" not in item.text, item.path
        if isinstance(item, FileBlock) and item.path.endswith(".html"):
            # Values reach the <script> through Flask's tojson, never as raw text.
            assert re.findall(r"\{\{(.*?)\}\}", item.text) == [" task_id|tojson ", " token|tojson "], item.text


def test_every_redis_url_of_the_section_is_the_five_minute_one() -> None:
    urls = set(re.findall(r"redis://[^\s\"')]+", section_text(README.read_text(), HEADING)))
    assert urls == {"redis://localhost:6379/3"}, urls


def test_the_section_s_files_are_the_ones_in_tests_apps_owntasks() -> None:
    """So that ruff lints the README's Python (tests/apps/owntasks/ is in its path)."""
    mismatch = mirror_mismatch(section_items(), MIRROR)
    assert mismatch is None, mismatch


# --- running it ----------------------------------------------------------------------------


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[int]:
    with private_redis_server(tmp_path / "redis") as port:
        yield port


def five_minute_files(redis_port: int, web_port: int) -> list[Item]:
    """What the five-minute section leaves in the directory: its `mkdir` and its files."""
    items = parse(substitute(section_text(README.read_text(), FIVE_MINUTES), redis_port, web_port))
    kept = [i for i in items if isinstance(i, FileBlock) or i.text.startswith("mkdir myapp")]
    assert len(kept) >= 4 and isinstance(kept[0], Command), kept
    return kept


@pytest.mark.e2e
@pytest.mark.browser
async def test_the_section_runs_as_written(private_redis: int, tmp_path: Path, output_dir: Path) -> None:
    import flask  # noqa: F401  # the test extras install it: `pip install flask` is skipped

    chromium_path()  # skip (or, in CI, fail) before starting anything
    web_port, flask_port = free_port(), free_port()
    while flask_port == web_port:
        flask_port = free_port()
    ports = {README_FLASK_PORT: flask_port}
    logs = output_dir / "readme-tokens"
    logs.mkdir(parents=True, exist_ok=True)
    for old in logs.glob("*.log"):
        old.unlink()
    shots = output_dir / "screenshots"
    shots.mkdir(parents=True, exist_ok=True)
    project = tmp_path / "project"
    project.mkdir()
    env = environment(web_port)
    five = section_text(README.read_text(), FIVE_MINUTES)
    first = logs / "five-minute-files"
    first.mkdir(exist_ok=True)
    Session(five_minute_files(private_redis, web_port), project, env, first, five).finish()

    section = section_text(README.read_text(), HEADING)
    session = Session(parse(substitute(section, private_redis, web_port, ports)), project, env, logs, section)
    run = Run(session, project, web_port, flask_port)
    stopped_badly: list[str] = []
    try:
        async with open_browser(shots, "readme-tokens") as page:
            errors = console_errors(page)
            task_id = await run.redirect_to_the_service_page(page)
            await run.no_token_no_task(task_id)
            await run.own_page(page)
            assert errors == [], errors
            assert page.dialogs == []
            await run.own_page_blocked_without_the_origin(page, errors)
    finally:
        stopped_badly = await blocking(session.close)
    assert stopped_badly == [], "\n".join(stopped_badly)


def is_cors_refusal(web_port: int) -> Any:
    """Chromium's console message for a stream of the service refused by CORS."""

    def check(message: Any) -> bool:
        return (
            message.type == "error"
            and "blocked by CORS policy" in message.text
            and f"http://localhost:{web_port}/events?" in message.text
        )

    return check


class Run:
    def __init__(self, session: Session, project: Path, web_port: int, flask_port: int) -> None:
        self.session = session
        self.project = project
        self.web_port = web_port
        self.flask_port = flask_port
        self.base = f"http://127.0.0.1:{web_port}"  # the web, for the test's own requests

    def url(self, as_written: str) -> str:
        return self.session.url(as_written, self.web_port, {README_FLASK_PORT: self.flask_port})

    @property
    def secret(self) -> str:
        return (self.project / SECRET_FILE).read_text().strip()

    async def redirect_to_the_service_page(self, page: Page) -> str:
        """§1-§3: the secret, the worker, the web, the Flask app; its button leads to
        the service's page for the new task, whose bar fills to full."""
        self.curl = await blocking(self.session.upto, r"^curl ")  # runs §1-§3's commands on the way
        await page.page.goto(self.url("http://localhost:5000/"))
        async with page.page.expect_response(lambda r: r.url.endswith("/import")) as answer:
            await page.page.get_by_role("button", name="Import 50 rows").click()
        location = (await answer.value).headers["location"]
        found = re.fullmatch(rf"http://localhost:{self.web_port}/tasks/({UUID})#token=(\S+)", location)
        assert found, location
        task_id, token = found.groups()
        grant = verify(token, secret=self.secret)
        assert grant.tasks == {task_id} and not grant.operator and not grant.cancel, grant
        assert not grant.start and not grant.groups, grant

        await page.wait_state(task_id, "success", timeout=30)
        await page.screenshot("service-page-success")
        card = page.card(task_id)
        assert await card.locator("progress").evaluate("(el) => [el.value, el.max]") == [ROWS, ROWS]
        values = determinate(await page.bar_values(task_id), ROWS)
        assert len(set(values)) >= 3, f"the bar did not move live: {values}"
        assert values == sorted(values) and values[-1] == ROWS, values
        # The token left the address for the tab's storage.
        assert await page.page.evaluate("() => location.href") == f"http://localhost:{self.web_port}/tasks/{task_id}"
        assert await page.page.evaluate("(key) => sessionStorage.getItem(key)", TOKEN_KEY) == token
        return task_id

    async def no_token_no_task(self, task_id: str) -> None:
        """The README's curl gets the 401's body; the test's own requests check its
        status, and that a token of the same secret is what the service wants."""
        output = await blocking(self.session.run, self.curl)
        assert json.loads(output)["error"].startswith("This needs an access token"), output
        json_only = {"Accept": "application/json"}
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
            async with http.get(f"{self.base}/tasks/{task_id}", headers=json_only) as resp:
                assert resp.status == 401, await resp.text()
                assert resp.headers["WWW-Authenticate"].startswith("Bearer "), resp.headers
            bearer = {**json_only, "Authorization": f"Bearer {watch_token([task_id], key=self.secret)}"}
            async with http.get(f"{self.base}/tasks/{task_id}", headers=bearer) as resp:
                assert resp.status == 200, await resp.text()
                assert (await resp.json())["state"] == "success"
            wrong = {**json_only, "Authorization": f"Bearer {watch_token([task_id], key='x' * 43)}"}
            async with http.get(f"{self.base}/tasks/{task_id}", headers=wrong) as resp:
                assert resp.status == 401, "a token of another secret"

    async def import_on_own_page(self, page: Page) -> str:
        """Press the own page's button; the id of the task its page watches."""
        await page.page.goto("about:blank")
        await page.page.goto(self.url("http://localhost:5000/"))
        await page.page.get_by_role("button", name="Import 50 rows").click()
        await page.page.wait_for_url(f"http://localhost:{self.flask_port}/import")
        await page.page.wait_for_function("() => window.__streams.opened.length > 0")
        stream = urlsplit((await page.streams())["opened"][0])
        assert f"{stream.scheme}://{stream.netloc}" == f"http://localhost:{self.web_port}", stream
        query = parse_qs(stream.query)
        (task_id,), (token,) = query["task"], query["token"]
        assert verify(token, secret=self.secret).tasks == {task_id}
        return task_id

    async def cors_answer(self, task_id: str) -> str | None:
        """The web's Access-Control-Allow-Origin for the own page's origin."""
        headers = {
            "Origin": f"http://localhost:{self.flask_port}",
            "Authorization": f"Bearer {watch_token([task_id], key=self.secret)}",
        }
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
            async with http.get(f"{self.base}/tasks/{task_id}", headers=headers) as resp:
                assert resp.status == 200, await resp.text()
                return resp.headers.get("Access-Control-Allow-Origin")

    async def own_page(self, page: Page) -> None:
        """§4: Flask again, with the page of your own; its bar fills through CORS."""
        await page.page.goto("about:blank")
        await blocking(self.session.finish)  # Ctrl-C in terminal 3, then the second Flask app
        task_id = await self.import_on_own_page(page)
        await page.page.locator("#text", has_text=f"Imported {ROWS} rows").wait_for(timeout=30_000)
        await page.screenshot("own-page-success")
        assert await page.page.locator("#bar").evaluate("(el) => [el.value, el.max]") == [ROWS, ROWS]
        values = determinate(await page.page.evaluate("() => window.__bars"), ROWS)
        assert len(set(values)) >= 3, f"the page's bar did not move live: {values}"
        assert values == sorted(values) and values[-1] == ROWS, values
        assert await self.cors_answer(task_id) == f"http://localhost:{self.flask_port}"

    async def own_page_blocked_without_the_origin(self, page: Page, errors: list[str]) -> None:
        """The web's command less PROGRESS_SSE_CORS_ORIGINS: the browser refuses the
        own page's stream, before and after the task ends, and the bar stays still."""
        await page.page.goto("about:blank")
        web = next(c for c in commands(self.session.items) if c.terminal == "terminal 2")
        closed = Command(CORS_SETTING.sub("", web.text, count=1), web.expected, web.terminal)
        assert "PROGRESS_SSE_CORS_ORIGINS" not in closed.text and "PROGRESS_SSE_SECRET" in closed.text
        await blocking(lambda: self.session.keep_running(closed).wait_for_output())

        refused = is_cors_refusal(self.web_port)
        async with page.page.expect_console_message(refused, timeout=30_000):
            task_id = await self.import_on_own_page(page)
        assert await self.cors_answer(task_id) is None
        events = await follow_to_the_end(self.base, task_id, token=watch_token([task_id], key=self.secret))
        assert events[-1]["state"] == "success", events[-1]
        opened = len((await page.streams())["opened"])
        # The next attempt after the end would get the success, were it let through.
        async with page.page.expect_console_message(refused, timeout=30_000):
            pass
        assert len((await page.streams())["opened"]) > opened
        await page.screenshot("own-page-blocked")
        assert await page.page.locator("#bar").evaluate("(el) => [el.value, el.max]") == [0, 1]
        assert await page.page.locator("#text").text_content() == ""
        assert await page.page.evaluate("() => window.__bars") == [], "the bar never moved"
        assert errors and all(f"localhost:{self.web_port}/events?" in e for e in errors), errors
