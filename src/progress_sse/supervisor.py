"""Runs `progress-sse dev`'s processes together, as a Procfile runner would.

Each child's output is shown with its name in front. When any child exits, the
others are stopped and the run ends with an error that names the child and
repeats the last lines it wrote, where the real cause is (an import error, a
port in use): one process dying must never leave the others serving as if all
were well. Ctrl-C (or SIGTERM) stops them all and ends the run cleanly.
"""

from __future__ import annotations

import asyncio
import contextlib
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


@dataclass
class Child:
    name: str
    argv: Sequence[str]
    env: Mapping[str, str] | None = None
    # Waited for after the child starts and before the next one does (e.g. Redis
    # answering); returns True when ready. Polled every 50 ms.
    ready: Callable[[], bool] | None = None
    ready_timeout: float = 10.0
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=TAIL_LINES))
    process: asyncio.subprocess.Process | None = None


class ChildExited(Exception):
    def __init__(self, child: Child, status: int | None) -> None:
        super().__init__(child.name)
        self.child, self.status = child, status


def run(children: Sequence[Child], *, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """Start `children` in order and supervise them; the exit status of the run:
    0 when stopped by a signal, 1 when a child exited (or never got ready)."""
    return asyncio.run(_supervise(list(children), out, err))


async def _supervise(children: list[Child], out: TextIO, err: TextIO) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    width = max(len(c.name) for c in children)
    exits: list[asyncio.Task[None]] = []
    try:
        for child in children:
            exits.append(asyncio.create_task(_run_child(child, width, out)))
            if child.ready is not None:
                await _wait_ready(child, exits[-1], stop)
            if stop.is_set():
                return 0
        stopping = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait([*exits, stopping], return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        for task in done:
            if task is not stopping:
                task.result()  # raises ChildExited
        return 0
    except ChildExited as exc:
        _report(exc, err)
        return 1
    finally:
        # A second Ctrl-C while stopping kills at once instead of waiting out the grace.
        loop.add_signal_handler(signal.SIGINT, lambda: _kill_all(children))
        await _stop_all(children)
        for task in exits:
            task.cancel()
        await asyncio.gather(*exits, return_exceptions=True)
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)


async def _run_child(child: Child, width: int, out: TextIO) -> None:
    """Start the child, copy its output line by line, and raise ChildExited when it ends."""
    child.process = await asyncio.create_subprocess_exec(
        *child.argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        stdin=asyncio.subprocess.DEVNULL,
        env=dict(child.env) if child.env is not None else None,
        # Its own process group: Ctrl-C reaches only us, and we stop each child (and a
        # worker's pool processes) in order, as a group.
        start_new_session=True,
        limit=1 << 20,  # the longest line it may write (a huge log line must not end the run)
    )
    assert child.process.stdout is not None
    prefix = f"{child.name:<{width}} | "
    async for raw in child.process.stdout:
        line = raw.decode(errors="replace").rstrip("\r\n")
        child.tail.append(line)
        out.write(prefix + line + "\n")
        out.flush()
    raise ChildExited(child, await child.process.wait())


async def _wait_ready(child: Child, running: asyncio.Task[None], stop: asyncio.Event) -> None:
    assert child.ready is not None
    deadline = asyncio.get_running_loop().time() + child.ready_timeout
    while not stop.is_set():
        if running.done():
            running.result()  # it exited before it was ready: raises ChildExited
        if await asyncio.to_thread(child.ready):
            return
        if asyncio.get_running_loop().time() > deadline:
            child.tail.append(f"(not ready after {child.ready_timeout:g} s)")
            raise ChildExited(child, None)
        await asyncio.sleep(0.05)


def _report(exc: ChildExited, err: TextIO) -> None:
    child = exc.child
    if exc.status is None:
        what = "did not get ready"
    elif exc.status < 0:
        what = f"was killed by {signal.Signals(-exc.status).name}"
    else:
        what = f"exited with status {exc.status}"
    lines = "\n".join(f"    {line}" for line in child.tail) or "    (it wrote nothing)"
    err.write(f"progress-sse dev: the {child.name} {what}. Its last lines:\n{lines}\nStopped the others.\n")
    err.flush()


async def _stop_all(children: Sequence[Child]) -> None:
    """SIGTERM to every running child, later ones first (Redis outlives its clients);
    SIGKILL to any still running after the grace."""
    for child in reversed(children):
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
