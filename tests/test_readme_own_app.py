"""The README's "Your own Celery app in five minutes", run as written.

The test reads that section from README.md and does what a reader does, in the
section's order, in an empty directory:

- a ```python block whose first line is `# <path>`, or an ```html block whose first
  line is `<!-- <path> -->`, is written to that path;
- each `$ ` line of a ```console block (with its `\\` continuation lines) is run
  with bash, from that directory. The lines shown under a command must appear in
  what it prints, in order: `…` stands for anything, and a UUID for any UUID.
- A command marked `# terminal N: keep it running` runs in the background, as in a
  terminal of its own, until the end. Starting one in a terminal whose command
  still runs first stops that one with Ctrl-C (SIGINT to its process group), as the
  section tells the reader to. The other commands run one after another in one
  emulated shell session: a variable a command assigns (`id=$(...)`) is set for
  the commands after it.

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
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis

from progress_sse.cli.embedded import EmbeddedRedis, free_port

from .browser import Page, chromium_path, open_browser
from .sse import SSEReader

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
HEADING = "## Your own Celery app in five minutes"
MIRROR = ROOT / "tests" / "apps" / "fiveminutes"

# The README's addresses, and what the test puts in their place.
README_REDIS = "localhost:6379"
README_WEB_PORT = "8000"
# Skipped, not run: the package is already installed in this venv (see the docstring).
INSTALL_STEPS = ("python3 -m venv .venv", "source .venv/bin/activate", "pip install progress-sse")

UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
KEEP_RUNNING = re.compile(r"#\s*(terminal \d+): keep it running\s*$")
ASSIGNMENT = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)=\$\(.*\)", re.DOTALL)
FENCE = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)


# --- reading the section ------------------------------------------------------------


@dataclass(frozen=True)
class FileBlock:
    path: str
    text: str


@dataclass(frozen=True)
class Command:
    text: str  # as bash gets it, continuation lines included
    expected: tuple[str, ...]  # the output lines shown under it
    terminal: str | None  # "terminal 1" for a command that keeps running

    @property
    def skipped(self) -> bool:
        return self.text in INSTALL_STEPS


Item = FileBlock | Command


def section_text(readme: str) -> str:
    """From the section's heading to the next `## ` heading."""
    start = readme.index(f"\n{HEADING}\n") + 1
    end = readme.find("\n## ", start)
    return readme[start : end if end != -1 else len(readme)]


def substitute(text: str, redis_port: int, web_port: int) -> str:
    text = text.replace(README_REDIS, f"127.0.0.1:{redis_port}")
    return re.sub(rf"\b{README_WEB_PORT}\b", str(web_port), text)


def parse(section: str) -> list[Item]:
    """The section's files and commands, in the order a reader meets them. A block
    that is neither fails the test: everything the section shows must be run."""
    items: list[Item] = []
    for match in FENCE.finditer(section):
        lang, body = match.group(1), match.group(2)
        first = body.split("\n", 1)[0]
        path = {"python": r"# (\S+\.py)", "html": r"<!-- (\S+\.html) -->"}.get(lang)
        found = re.fullmatch(path, first) if path else None
        if found:
            items.append(FileBlock(found.group(1), body))
        elif lang == "console":
            items.extend(parse_console(body))
        else:
            raise AssertionError(f"a ```{lang} block the test cannot run or write:\n{body}")
    return items


def parse_console(body: str) -> list[Command]:
    commands: list[Command] = []
    lines = body.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.startswith("$ "):
            assert commands, f"output before any command: {line!r}"
            last = commands[-1]
            commands[-1] = Command(last.text, (*last.expected, line), last.terminal)
            i += 1
            continue
        text = line[2:]
        while text.endswith("\\") and i + 1 < len(lines):
            i += 1
            text += "\n" + lines[i]
        marker = KEEP_RUNNING.search(text)
        commands.append(Command(text.strip(), (), marker.group(1) if marker else None))
        i += 1
    return commands


def line_pattern(expected: str) -> re.Pattern[str]:
    """`…` matches anything, a UUID any UUID; the rest literally."""
    parts = re.split(rf"(…|{UUID})", expected.strip())
    regex = "".join(".*" if p == "…" else UUID if re.fullmatch(UUID, p) else re.escape(p) for p in parts)
    return re.compile(regex)


def missing_line(expected: tuple[str, ...], output: str) -> str | None:
    """The first expected line not found (in order) in the output, or None."""
    lines = [ANSI.sub("", line).strip() for line in output.splitlines()]
    at = 0
    for wanted in expected:
        pattern = line_pattern(wanted)
        while at < len(lines) and not pattern.fullmatch(lines[at]):
            at += 1
        if at == len(lines):
            return wanted
        at += 1
    return None


# --- running it --------------------------------------------------------------------


class Background:
    """A command that keeps running in a terminal of its own; its output goes to a log."""

    def __init__(self, command: Command, cwd: Path, env: dict[str, str], log_path: Path) -> None:
        self.command = command
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.process = subprocess.Popen(
            ["bash", "-c", command.text],
            cwd=cwd,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, as a terminal's job is: Ctrl-C reaches all of it
        )

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_output(self, timeout: float = 30) -> None:
        """Until the lines the section shows under the command have been printed."""
        deadline = time.monotonic() + timeout
        while (missing := missing_line(self.command.expected, self.output())) is not None:
            if self.process.poll() is not None:
                raise AssertionError(f"{self.command.text!r} exited ({self.process.returncode}):\n{self.output()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.command.text!r} did not print {missing!r}:\n{self.output()}")
            time.sleep(0.05)

    def ctrl_c(self, timeout: float = 20) -> int:
        """What Ctrl-C in its terminal does: SIGINT to its process group. Its exit
        status, or -SIGKILL if it had to be killed because it did not stop in time."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGINT)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
                self._log.close()
                return -signal.SIGKILL
        self._log.close()
        return self.process.returncode


class Running:
    """A foreground command the test lets run while it does something else."""

    def __init__(self, process: subprocess.Popen[bytes], log: Any, log_path: Path) -> None:
        self.process, self._log, self.log_path = process, log, log_path

    def wait(self, timeout: float) -> tuple[int, str]:
        try:
            status = self.process.wait(timeout)
        finally:
            if self.process.poll() is None:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
            self._log.close()
        return status, self.log_path.read_text(errors="replace")


class Session:
    """The reader at work: the section's items in order, terminals, one shell's variables."""

    def __init__(self, items: list[Item], workdir: Path, env: dict[str, str], logs: Path, section: str) -> None:
        self.items = items
        self.next = 0
        self.workdir = workdir
        self.env = env
        self.logs = logs
        self.section = section  # as written, before substitution
        self.terminals: dict[str, Background] = {}
        self.variables: list[str] = []  # `declare -p` lines, replayed before each command
        self.state = workdir.parent / "variables.sh"
        self.count = 0

    def url(self, as_written: str, web_port: int) -> str:
        """A URL the section's prose tells the reader to open, with the test's port."""
        assert as_written in self.section, f"the section no longer says {as_written!r}"
        return as_written.replace(f":{README_WEB_PORT}", f":{web_port}")

    def upto(self, pattern: str) -> Command:
        """Do every item before the next command that matches `pattern`, and return that
        command, not yet run: the caller runs it its own way."""
        while self.next < len(self.items):
            item = self.items[self.next]
            self.next += 1
            if isinstance(item, Command) and re.search(pattern, item.text):
                return item
            self.do(item)
        raise AssertionError(f"no command matching {pattern!r} is left in the section")

    def finish(self) -> None:
        while self.next < len(self.items):
            self.next += 1
            self.do(self.items[self.next - 1])

    def do(self, item: Item) -> None:
        if isinstance(item, FileBlock):
            path = self.workdir / item.path
            assert path.parent.is_dir(), f"{item.path}: the section has not made its directory yet"
            path.write_text(item.text)
        elif item.skipped:
            pass
        elif item.terminal:
            self.keep_running(item).wait_for_output()
        else:
            self.run(item)

    def _log(self, command: Command) -> Path:
        self.count += 1
        return self.logs / f"{self.count:02d}-{re.sub(r'[^A-Za-z0-9.]+', '-', command.text)[:60]}.log"

    def keep_running(self, command: Command) -> Background:
        assert command.terminal is not None
        previous = self.terminals.pop(command.terminal, None)
        if previous is not None:
            status = previous.ctrl_c()
            assert status == 0, f"Ctrl-C stopped {previous.command.text!r} with status {status}:\n{previous.output()}"
        job = Background(command, self.workdir, self.env, self._log(command))
        self.terminals[command.terminal] = job
        return job

    def _script(self, command: Command) -> str:
        """The command, after the variables earlier commands set; a command that sets
        one (`id=$(...)`) also saves it for the commands after it, as a shell keeps it."""
        lines = [*self.variables, command.text]
        assigned = ASSIGNMENT.fullmatch(command.text)
        if assigned:
            lines += ["status=$?", f"declare -p {assigned.group(1)} > {self.state}", "exit $status"]
        return "\n".join(lines)

    def _remember(self) -> None:
        if self.state.exists():
            self.variables.append(self.state.read_text().strip())
            self.state.unlink()

    def run(self, command: Command, timeout: float = 60) -> str:
        """Run a command to its end; it must exit 0 and print what the section shows."""
        done = subprocess.run(
            ["bash", "-c", self._script(command)],
            cwd=self.workdir,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=timeout,
        )
        output = done.stdout.decode(errors="replace")
        self._log(command).write_text(output)
        assert done.returncode == 0, f"{command.text!r} exited {done.returncode}:\n{output}"
        missing = missing_line(command.expected, output)
        assert missing is None, f"{command.text!r} did not print {missing!r}:\n{output}"
        self._remember()
        return output

    def start(self, command: Command) -> Running:
        """Start a command and let it run while the test does the reader's other steps."""
        assert not ASSIGNMENT.fullmatch(command.text) and not command.expected
        log_path = self._log(command)
        log = log_path.open("wb")
        process = subprocess.Popen(
            ["bash", "-c", self._script(command)],
            cwd=self.workdir,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return Running(process, log, log_path)

    def close(self) -> list[str]:
        """Ctrl-C in every terminal; the commands it did not stop. (Any exit status:
        Celery's worker exits 1 after the warm shutdown that Ctrl-C asks for.)"""
        failed = []
        for terminal, job in self.terminals.items():
            if job.ctrl_c() == -signal.SIGKILL:
                failed.append(f"{terminal}: Ctrl-C did not stop {job.command.text!r}:\n{job.output()[-3000:]}")
        self.terminals.clear()
        return failed


def section_items() -> list[Item]:
    """The section as written, nothing substituted."""
    return parse(section_text(README.read_text()))


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
    urls = set(re.findall(r"redis://[^\s\"')]+", section_text(README.read_text())))
    assert urls == {"redis://localhost:6379/3"}, urls


def test_the_section_s_files_are_the_ones_in_tests_apps_fiveminutes() -> None:
    """So that ruff lints the README's Python (tests/apps/fiveminutes/ is in its path)."""
    documented = {i.path: i.text for i in section_items() if isinstance(i, FileBlock)}
    mirrored = {
        str(p.relative_to(MIRROR)): p.read_text()
        for p in sorted(MIRROR.rglob("*"))
        if p.suffix in {".py", ".html"} and p.name != "__init__.py" and "__pycache__" not in p.parts
    }
    assert mirrored.keys() == documented.keys()
    for path, text in documented.items():
        assert mirrored[path] == text, f"README.md and {MIRROR / path} differ: copy the README's block over"


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[int]:
    """A redis-server of this test's own, so the README's default key prefix and
    database 3 are safe to use, and "nothing in any other database" is checkable."""
    server = EmbeddedRedis(tmp_path / "redis")
    server.start()
    try:
        yield server.port
    finally:
        server.stop()


def environment(web_port: int) -> dict[str, str]:
    venv_bin = str(Path(sys.executable).parent)  # what `source .venv/bin/activate` puts first
    return {
        "PATH": os.pathsep.join([venv_bin, os.environ.get("PATH", "/usr/bin:/bin")]),
        "PORT": str(web_port),
        "PROGRESS_SSE_URL": f"http://localhost:{web_port}",
    }


async def blocking(function: Any, *args: Any) -> Any:
    """A blocking step (a process, a log) off the event loop Playwright talks on."""
    return await asyncio.to_thread(function, *args)


async def follow_to_the_end(base: str, task_id: str) -> list[dict[str, Any]]:
    """A task's whole life over SSE, until the server ends the stream after its end."""
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        async with http.get(f"{base}/tasks/{task_id}/events?last_event_id=0") as resp:
            assert resp.status == 200, await resp.text()
            return [e.payload for e in await SSEReader(resp).rest()]


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


def determinate(values: list[dict[str, Any]], total: int) -> list[float]:
    return [float(v["value"]) for v in values if v["value"] is not None and v["max"] == str(total)]


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
    section = section_text(README.read_text())
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


def console_errors(page: Page) -> list[str]:
    """The page's console errors, less the 404 of /favicon.ico: the README's page,
    kept minimal, has no icon, and Chromium asks for one. (Page.errors holds only the
    message, the same for any 404, so it cannot tell that one from a real one.)"""
    errors: list[str] = []

    def on_console(message: Any) -> None:
        if message.type == "error" and not message.location.get("url", "").endswith("/favicon.ico"):
            errors.append(f"{message.text} ({message.location.get('url')})")

    page.page.on("console", on_console)
    page.page.on("pageerror", lambda error: errors.append(str(error)))
    return errors


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
