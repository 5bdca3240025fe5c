"""Runs `progress-sse dev`'s processes together, as a Procfile runner would, and
the processes of `progress-sse web --workers N` (`together=True`).

Each child's output is shown with its name in front. When any child exits, the
others are stopped and the run ends with an error that names the child and
repeats the last lines it wrote, where the real cause is (an import error, a
port in use): one process dying must never leave the others serving as if all
were well. Ctrl-C, SIGTERM, SIGHUP (the terminal closing) or SIGQUIT stop them
all and end the run cleanly; if the supervisor itself is killed outright, the
kernel sends each child SIGTERM (Linux), so none is left behind either way.

With `together=True` the children are peers (web processes sharing a port): all
start at once, all get SIGTERM at once, and with `strict_stop=True` the run ends
0 only if every one of them then exits 0 within the grace.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import sys
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TextIO

# What a child's exit report repeats: enough for a traceback's end.
TAIL_LINES = 20
# How long a child gets to stop on SIGTERM before its process group is killed.
STOP_GRACE = 10.0
# After a child exits, how long its output may still drain (a grandchild that
# inherited the pipe could hold it open for ever).
DRAIN_GRACE = 1.0
# A longer line is shown in pieces rather than held in memory whole.
MAX_LINE = 64 * 1024
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


@dataclass
class Child:
    name: str
    argv: Sequence[str]
    env: Mapping[str, str] | None = None
    # Waited for after the child starts and before the next one does (e.g. Redis
    # answering); returns True when ready. Polled every 50 ms.
    ready: Callable[[], bool] | None = None
    ready_timeout: float = 10.0
    # Or ready once it writes a line for which this returns True (e.g. "listening").
    ready_line: Callable[[str], bool] | None = None
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=TAIL_LINES))
    process: asyncio.subprocess.Process | None = None
    saw_ready_line: asyncio.Event = field(default_factory=asyncio.Event)


class ChildExited(Exception):
    def __init__(self, child: Child, status: int | None) -> None:
        super().__init__(child.name)
        self.child, self.status = child, status


def run(
    children: Sequence[Child],
    *,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
    started: Callable[[], None] | None = None,
    name: str = "progress-sse dev",
    together: bool = False,
    strict_stop: bool = False,
) -> int:
    """Start `children` in order and supervise them; the exit status of the run:
    0 when stopped by a signal, 1 when a child exited (or never got ready).
    `started` is called once every child has started and is ready; `name` begins
    the report of a child's exit. `together`: start them all before waiting for
    any to get ready, and stop them all at once. `strict_stop`: a child that exits
    other than 0 (or by the SIGTERM sent to it) when stopped makes the run fail."""
    how = _How(name, together, strict_stop)
    return asyncio.run(_supervise(list(children), _Output(out), err, started, how))


@dataclass(frozen=True)
class _How:
    name: str
    together: bool
    strict_stop: bool


async def _supervise(
    children: list[Child], out: _Output, err: TextIO, started: Callable[[], None] | None, how: _How
) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in STOP_SIGNALS:
        loop.add_signal_handler(signum, stop.set)
    width = max(len(c.name) for c in children)
    watchers: list[asyncio.Task[None]] = []
    status = 0
    try:
        for child in children:
            # Spawned here, not in its watcher task: a stop that comes meanwhile
            # then always finds the process to signal.
            child.process = await _spawn(child)
            watchers.append(asyncio.create_task(_watch(child, f"{child.name:<{width}} | ", out)))
            if not how.together:
                await _wait_ready(child, watchers[-1], stop)
            if stop.is_set():
                break
        if how.together:
            for child, watcher in zip(children, watchers, strict=True):
                await _wait_ready(child, watcher, stop)
        if not stop.is_set():
            if started is not None:
                started()
            stopping = asyncio.create_task(stop.wait())
            done, _ = await asyncio.wait([*watchers, stopping], return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            for task in done:
                if task is not stopping and not stop.is_set():
                    task.result()  # raises ChildExited
    except ChildExited as exc:
        _report(exc, err, how.name)
        status = 1
    finally:
        # Another stop signal while stopping kills at once instead of waiting out the grace.
        for signum in STOP_SIGNALS:
            loop.add_signal_handler(signum, _kill_all, children)
        await _stop_all(children, how.together)
        for task in watchers:
            task.cancel()
        await asyncio.gather(*watchers, return_exceptions=True)
        for signum in STOP_SIGNALS:
            loop.remove_signal_handler(signum)
    if status == 0 and how.strict_stop:
        for child in children:
            returncode = None if child.process is None else child.process.returncode
            if returncode not in (None, 0, -signal.SIGTERM):
                _report(ChildExited(child, returncode), err, how.name, "when stopped")
                status = 1
    return status


async def _spawn(child: Child) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        *child.argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        stdin=asyncio.subprocess.DEVNULL,
        env=dict(child.env) if child.env is not None else None,
        # Its own process group: Ctrl-C reaches only us, and we stop each child (and a
        # worker's pool processes) in order, as a group.
        start_new_session=True,
        preexec_fn=_die_with(os.getpid()) if _prctl is not None else None,
    )


# Looked up here, in the parent: between fork and exec the child should do no more
# than call it.
_prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _die_with(parent: int) -> Callable[[], None]:
    """For the child, before exec: SIGTERM when the supervisor dies, even by SIGKILL."""

    def arrange() -> None:
        assert _prctl is not None
        _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # it died before the request was in place
            os.kill(os.getpid(), signal.SIGTERM)

    return arrange


async def _watch(child: Child, prefix: str, out: _Output) -> None:
    """Copy the child's output line by line; raise ChildExited when it exits."""
    assert child.process is not None and child.process.stdout is not None
    copying = asyncio.create_task(_copy_lines(child, child.process.stdout, prefix, out))
    try:
        status = await child.process.wait()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(copying), DRAIN_GRACE)
    finally:
        copying.cancel()
    raise ChildExited(child, status)


async def _copy_lines(child: Child, stream: asyncio.StreamReader, prefix: str, out: _Output) -> None:
    pending = b""
    while chunk := await stream.read(MAX_LINE):
        *lines, pending = (pending + chunk).split(b"\n")
        if len(pending) >= MAX_LINE:  # no newline in sight: show what there is
            lines.append(pending)
            pending = b""
        for raw in lines:
            _line(child, raw.decode(errors="replace").rstrip("\r"), prefix, out)
    if pending:
        _line(child, pending.decode(errors="replace").rstrip("\r"), prefix, out)


def _line(child: Child, line: str, prefix: str, out: _Output) -> None:
    child.tail.append(line)
    out.write(prefix + line + "\n")
    if child.ready_line is not None and not child.saw_ready_line.is_set() and child.ready_line(line):
        child.saw_ready_line.set()


class _Output:
    """The supervisor's stdout; a reader that goes away (`dev | head`) stops the
    copying, not the run."""

    def __init__(self, stream: TextIO) -> None:
        self.stream: TextIO | None = stream

    def write(self, text: str) -> None:
        if self.stream is None:
            return
        try:
            self.stream.write(text)
            self.stream.flush()
        except (BrokenPipeError, ValueError):  # ValueError: the stream was closed
            self.stream = None


async def _wait_ready(child: Child, watching: asyncio.Task[None], stop: asyncio.Event) -> None:
    if child.ready_line is not None:
        await _wait_ready_line(child, watching, stop)
    if child.ready is None:
        return
    deadline = asyncio.get_running_loop().time() + child.ready_timeout
    while not stop.is_set():
        if watching.done():
            watching.result()  # it exited before it was ready: raises ChildExited
        if await asyncio.to_thread(child.ready):
            return
        if asyncio.get_running_loop().time() > deadline:
            child.tail.append(f"(not ready after {child.ready_timeout:g} s)")
            raise ChildExited(child, None)
        await asyncio.sleep(0.05)


async def _wait_ready_line(child: Child, watching: asyncio.Task[None], stop: asyncio.Event) -> None:
    seen = asyncio.create_task(child.saw_ready_line.wait())
    stopping = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait([seen, stopping, watching], timeout=child.ready_timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        seen.cancel()
        stopping.cancel()
    if child.saw_ready_line.is_set() or stop.is_set():
        return
    if watching.done():
        watching.result()  # it exited before it was ready: raises ChildExited
    child.tail.append(f"(not ready after {child.ready_timeout:g} s)")
    raise ChildExited(child, None)


def _report(exc: ChildExited, err: TextIO, name: str, when: str = "") -> None:
    child = exc.child
    if exc.status is None:
        what = "did not get ready"
    elif exc.status < 0:
        what = f"was killed by {signal.Signals(-exc.status).name}"
    else:
        what = f"exited with status {exc.status}"
    lines = "\n".join(f"    {line}" for line in child.tail) or "    (it wrote nothing)"
    if when:
        err.write(f"{name}: the {child.name} {what} {when}. Its last lines:\n{lines}\n")
    else:
        err.write(f"{name}: the {child.name} {what}. Its last lines:\n{lines}\nStopped the others.\n")
    err.flush()


async def _stop_all(children: Sequence[Child], together: bool = False) -> None:
    """SIGTERM to every running child, later ones first (Redis outlives its clients),
    or all at once if `together`; SIGKILL to any still running after the grace."""
    if together:  # each gets its one SIGTERM as its _stop starts: all before any wait
        await asyncio.gather(*(_stop(child) for child in children))
        return
    for child in reversed(children):
        await _stop(child)


async def _stop(child: Child) -> None:
    _signal(child, signal.SIGTERM)
    if child.process is not None and child.process.returncode is None:
        try:
            await asyncio.wait_for(child.process.wait(), STOP_GRACE)
        except TimeoutError:
            _signal(child, signal.SIGKILL)
            await child.process.wait()
    _signal(child, signal.SIGKILL)  # whatever is left of its group (e.g. orphaned pool processes)


def _kill_all(children: Sequence[Child]) -> None:
    for child in children:
        _signal(child, signal.SIGKILL)


def _signal(child: Child, signum: int) -> None:
    if child.process is None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(child.process.pid, signum)
