"""Running a README section as written: the machinery of the tests that do it
(tests/test_readme_own_app.py, tests/test_readme_tokens.py).

A test reads its section from README.md and does what a reader does, in the
section's order, in an empty directory:

- a ```python block whose first line is `# <path>`, or an ```html block whose first
  line is `<!-- <path> -->`, is written to that path;
- each `$ ` line of a ```console block (with its `\\` continuation lines) is run
  with bash, from that directory. The lines shown under a command must appear in
  what it prints, in order: `…` stands for anything, and a UUID for any UUID.
- A command marked `# terminal N: keep it running` runs in the background, as in a
  terminal of its own, until the end. Starting one in a terminal whose command
  still runs first stops that one with Ctrl-C (SIGINT to its process group). The
  other commands run one after another in one emulated shell session: a variable a
  command assigns (`id=$(...)`) is set for the commands after it.

What is substituted, mechanically, and nothing else:

- `localhost:6379`, the Redis, becomes 127.0.0.1:<port> of a private redis-server
  of the test's own (the database number stays the README's);
- the web port 8000, and any other port a test names (Flask's 5000), become free
  ports in the section's text; `PORT` and `PROGRESS_SSE_URL`, the variables that
  change the two places where 8000 is a default, are set to the web's free port;
- the install steps (`python3 -m venv .venv`, `source .venv/bin/activate`, and
  `pip install <packages>`) are skipped: the packages are installed in the venv
  running the test (progress-sse, and its test extras), and its bin directory comes
  first on PATH, as activating it would do;
- the commands get no other environment: PATH, PORT and PROGRESS_SSE_URL only.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from progress_sse.cli.embedded import EmbeddedRedis

from .browser import Page
from .sse import SSEReader

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

# The README's addresses, and what the test puts in their place.
README_REDIS = "localhost:6379"
README_WEB_PORT = "8000"
# Skipped, not run: the packages are already installed in this venv (see the docstring).
INSTALL_STEPS = ("python3 -m venv .venv", "source .venv/bin/activate", "pip install progress-sse")
PIP_INSTALL = re.compile(r"pip install [A-Za-z0-9_.\[\], -]+")

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
        return self.text in INSTALL_STEPS or PIP_INSTALL.fullmatch(self.text) is not None


Item = FileBlock | Command


def section_text(readme: str, heading: str) -> str:
    """From the section's heading to the next `## ` heading."""
    start = readme.index(f"\n{heading}\n") + 1
    end = readme.find("\n## ", start)
    return readme[start : end if end != -1 else len(readme)]


def substitute(text: str, redis_port: int, web_port: int, others: Mapping[str, int] | None = None) -> str:
    """The Redis, the web port and `others` (the README's port -> the test's)."""
    text = text.replace(README_REDIS, f"127.0.0.1:{redis_port}")
    for written, port in {README_WEB_PORT: web_port, **(others or {})}.items():
        text = re.sub(rf"\b{written}\b", str(port), text)
    return text


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

    def url(self, as_written: str, web_port: int, others: Mapping[str, int] | None = None) -> str:
        """A URL the section's prose tells the reader to open, with the test's port."""
        assert as_written in self.section, f"the section no longer says {as_written!r}"
        for written, port in {README_WEB_PORT: web_port, **(others or {})}.items():
            as_written = as_written.replace(f":{written}", f":{port}")
        return as_written

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


# --- what the tests share besides -------------------------------------------------------


def mirror_mismatch(items: list[Item], mirror: Path) -> str | None:
    """None when `mirror` holds exactly the section's files (less empty
    `__init__.py`s), with the same text; else what differs. A mirror under
    tests/apps/ is what ruff lints in place of the README's Python."""
    documented = {i.path: i.text for i in items if isinstance(i, FileBlock)}
    mirrored = {
        str(p.relative_to(mirror)): p.read_text()
        for p in sorted(mirror.rglob("*"))
        if p.suffix in {".py", ".html"} and p.name != "__init__.py" and "__pycache__" not in p.parts
    }
    if mirrored.keys() != documented.keys():
        return f"README.md has {sorted(documented)}, {mirror} has {sorted(mirrored)}"
    for path, text in documented.items():
        if mirrored[path] != text:
            return f"README.md and {mirror / path} differ: copy the README's block over"
    return None


@contextlib.contextmanager
def private_redis_server(directory: Path) -> Iterator[int]:
    """A redis-server of the test's own, so the README's default key prefix and
    database are safe to use, and "nothing in any other database" is checkable."""
    server = EmbeddedRedis(directory)
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


async def follow_to_the_end(base: str, task_id: str, token: str | None = None) -> list[dict[str, Any]]:
    """A task's whole life over SSE, until the server ends the stream after its end."""
    timeout = aiohttp.ClientTimeout(total=60)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession(timeout=timeout, headers=headers) as http:
        async with http.get(f"{base}/tasks/{task_id}/events?last_event_id=0") as resp:
            assert resp.status == 200, await resp.text()
            return [e.payload for e in await SSEReader(resp).rest()]


def determinate(values: list[dict[str, Any]], total: int) -> list[float]:
    return [float(v["value"]) for v in values if v["value"] is not None and v["max"] == str(total)]


def console_errors(page: Page) -> list[str]:
    """The page's console errors, less the 404 of /favicon.ico: a README's page,
    kept minimal, has no icon, and Chromium asks for one. (Page.errors holds only the
    message, the same for any 404, so it cannot tell that one from a real one.)"""
    errors: list[str] = []

    def on_console(message: Any) -> None:
        if message.type == "error" and not message.location.get("url", "").endswith("/favicon.ico"):
            errors.append(f"{message.text} ({message.location.get('url')})")

    page.page.on("console", on_console)
    page.page.on("pageerror", lambda error: errors.append(str(error)))
    return errors
