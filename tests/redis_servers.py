"""redis-servers of a test's own, for the tests that kill or restart one: never the
shared Redis (tests/conftest.py)."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from progress_sse.cli.embedded import answers, free_port, redis_server_binary


class RestartableRedis:
    """A redis-server on a free port that a test kills and starts again, on the same
    port and with the same data (the append-only file, fsynced on every write)."""

    def __init__(self, directory: Path, *, persistent: bool = True) -> None:
        self.directory = directory
        self.persistent = persistent
        directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                str(redis_server_binary()),
                *("--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.directory)),
                *("--save", "", "--appendonly", "yes" if self.persistent else "no", "--appendfsync", "always"),
                *("--logfile", str(self.directory / "redis.log")),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for(lambda: answers("127.0.0.1", self.port), 20, "the private redis-server to answer", self.process)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)
        self.process = None


def wait_for(check: Callable[[], Any], timeout: float, what: str, process: Any = None) -> Any:
    """Poll a condition that has nothing to wait on, with a deadline (blocking: for threads)."""
    deadline = time.monotonic() + timeout
    while not (result := check()):
        if process is not None and process.poll() is not None:
            raise AssertionError(f"{what}: the process exited with {process.returncode}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)
    return result
