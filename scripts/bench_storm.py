"""Benchmark a reconnect storm: W SSE clients all resuming at once after the web restarts.

How it runs:

* **web**: `progress-sse web` as a child process on a free port (the real app, as
  the Procfile runs it), Redis database 14 by default and a random key prefix.
* **clients** (a spawned process): W asyncio clients, each following one of T
  tasks on `GET /tasks/<id>/events` as EventSource does: it sends `Last-Event-ID`,
  and when a response ends or a connection fails it reconnects, after the
  `retry:` delay the server sent if any, else at once (`--retry-ms 0`, the worst
  case); a refused connection (the web is down) is retried every 50 ms.
* **publisher** (this process): `progress` events on every task at `--rate` per
  task per second, from before the restart until after every client resumed,
  then one `success` per task so every stream ends.

The storm: once all W clients are live, the web gets SIGTERM (it ends every
stream, as on a deploy) and a new web starts on the same port. All W clients
come back within one 50 ms retry of it listening.

It reports how each reconnect was answered (a stream, a `retry:` 200, an error
status), how long after the new web listened every client had resumed (its
first frame after the restart), and checks that every client got every event of
its task exactly once and in order, compared with the task's log in Redis
(exit status 1 if not, or if any answer was an error status).

Run: .venv/bin/python scripts/bench_storm.py [--help]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import aiohttp
import redis
from bench_fanout import raise_fd_limit  # this directory is first on sys.path when run as a script

from progress_sse.cli.decoder import SSEDecoder
from progress_sse.cli.embedded import free_port, listening
from progress_sse.config import Settings
from progress_sse.cursors import parse_id
from progress_sse.events import State, make_event
from progress_sse.worker.publisher import Publisher

CONSOLE_SCRIPT = str(Path(sys.executable).with_name("progress-sse"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/14", help="Redis to use")
    parser.add_argument("-W", "--clients", type=int, default=1000, help="concurrent SSE clients")
    parser.add_argument("-T", "--tasks", type=int, default=50, help="tasks the clients are spread over")
    parser.add_argument("--rate", type=float, default=5.0, help="progress events/s per task, throughout")
    parser.add_argument("--retry-ms", type=int, default=0, help="client reconnect delay when the server sent none")
    parser.add_argument("--timeout", type=float, default=120.0, help="limit for each phase, in seconds")
    args = parser.parse_args(argv)
    if min(args.clients, args.tasks) < 1 or args.rate <= 0 or args.retry_ms < 0:
        parser.error("clients and tasks must be >= 1, rate > 0, retry-ms >= 0")
    return args


# ---------------------------------------------------------------------------- clients


class Client:
    """One EventSource-like follower of one task."""

    def __init__(self, base: str, task_id: str, retry_ms: int) -> None:
        self.url = f"{base}/tasks/{task_id}/events"
        self.retry_ms = retry_ms
        self.cursor: str | None = None
        self.frames: list[tuple[int, str]] = []  # (id, state) of every frame, in order
        self.answers: Counter[str] = Counter()
        self.resumed_at: float | None = None  # first frame after the restart, time.time()
        self.restarted = False
        self.ended = False

    async def run(self, session: aiohttp.ClientSession, stop: asyncio.Event) -> None:
        while not self.ended and not stop.is_set():
            headers = {"Accept": "text/event-stream"}
            if self.cursor is not None:
                headers["Last-Event-ID"] = self.cursor
            delay = self.retry_ms / 1000
            try:
                async with session.get(self.url, headers=headers) as resp:
                    if resp.status == 204:
                        self.answers["204"] += 1
                        self.ended = True
                        return
                    if resp.status != 200:
                        self.answers[str(resp.status)] += 1
                    else:
                        decoder = SSEDecoder()
                        got = False
                        async for chunk in resp.content.iter_any():
                            for frame in decoder.feed(chunk):
                                got = True
                                self._frame(frame.id, frame.event, frame.data)
                        self.answers["stream" if got else "retry-later"] += 1
                        if decoder.retry is not None:
                            delay = decoder.retry / 1000
            except (TimeoutError, aiohttp.ClientConnectionError):
                self.answers["refused"] += 1
                delay = 0.05
            if not self.ended:
                await asyncio.sleep(delay)  # EventSource's reconnection time

    def _frame(self, frame_id: str | None, event: str, data: str) -> None:
        assert frame_id is not None, "every task frame has an id"
        self.cursor = frame_id
        self.frames.append((parse_id(frame_id).n, event))
        if self.restarted and self.resumed_at is None:
            self.resumed_at = time.time()
        if event in ("success", "failure", "revoked", "lost"):
            self.ended = True


def client_process(conn: Connection, base: str, task_ids: list[str], clients: int, retry_ms: int) -> None:
    async def main() -> None:
        stop = asyncio.Event()
        everyone = [Client(base, task_ids[i % len(task_ids)], retry_ms) for i in range(clients)]
        connector = aiohttp.TCPConnector(limit=0, force_close=True)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as session:
            runs = [asyncio.create_task(c.run(session, stop)) for c in everyone]
            loop = asyncio.get_running_loop()
            while True:
                command = await loop.run_in_executor(None, conn.recv)
                if command == "live?":
                    conn.send(sum(1 for c in everyone if c.frames))
                elif command == "restarted":
                    for c in everyone:
                        c.restarted = True
                    conn.send("ok")
                elif command == "resumed?":
                    conn.send(sum(1 for c in everyone if c.resumed_at is not None or c.ended))
                elif command == "ended?":
                    conn.send(sum(1 for c in everyone if c.ended))
                elif command == "report":
                    stop.set()
                    for run in runs:
                        run.cancel()
                    await asyncio.gather(*runs, return_exceptions=True)
                    conn.send(
                        [
                            {"url": c.url, "frames": c.frames, "answers": dict(c.answers), "resumed_at": c.resumed_at}
                            for c in everyone
                        ]
                    )
                    return

    asyncio.run(main())


# ---------------------------------------------------------------------------- web


def start_web(settings: Settings, port: int, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, **settings.to_env(), "PORT": str(port), "HOST": "127.0.0.1"}
    with log.open("ab") as out:
        web = subprocess.Popen([CONSOLE_SCRIPT, "web"], env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while not listening("127.0.0.1", port, timeout=0.2):
        if web.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the web did not start; see {log}")
        time.sleep(0.02)
    return web


def ask(conn: Connection, command: str) -> Any:
    conn.send(command)
    return conn.recv()


def wait_for(conn: Connection, command: str, wanted: int, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while (got := ask(conn, command)) < wanted:
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what} ({got} of {wanted})")
        time.sleep(0.05)


class Publishing(threading.Thread):
    """progress events on every task at `rate` per task, until stopped."""

    def __init__(self, publisher: Publisher, task_ids: list[str], rate: float) -> None:
        super().__init__(daemon=True)
        self.publisher, self.task_ids, self.rate = publisher, task_ids, rate
        self.stopped = threading.Event()
        self.sent = 0

    def run(self) -> None:
        step = 0
        while not self.stopped.wait(1 / self.rate):
            step += 1
            for task_id in self.task_ids:
                self.publisher.publish(make_event(task_id, "bench.storm", State.PROGRESS, current=step))
                self.sent += 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    raise_fd_limit(args.clients + 512)  # inherited by the clients' process and the web
    prefix = f"bench-storm-{uuid.uuid4().hex[:8]}"
    settings = Settings(redis_url=args.redis_url, broker_url=args.redis_url, key_prefix=prefix)
    client = redis.Redis.from_url(args.redis_url, decode_responses=True)
    publisher = Publisher.from_settings(settings)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = Path(tempfile.gettempdir()) / f"{prefix}-web.log"
    task_ids = [f"storm-{i}-{uuid.uuid4().hex[:6]}" for i in range(args.tasks)]
    for task_id in task_ids:
        publisher.publish(make_event(task_id, "bench.storm", State.QUEUED))
        publisher.publish(make_event(task_id, "bench.storm", State.STARTED))
    web = start_web(settings, port, log)
    parent, child = mp.get_context("spawn").Pipe()
    clients = mp.get_context("spawn").Process(
        target=client_process, args=(child, base, task_ids, args.clients, args.retry_ms), daemon=True
    )
    clients.start()
    failed = False
    try:
        print(
            f"Set-up: web (progress-sse web) on {base}; {args.clients} clients over {args.tasks} tasks in one process"
        )
        wait_for(parent, "live?", args.clients, args.timeout, "every client's first frame")
        publishing = Publishing(publisher, task_ids, args.rate)
        publishing.start()
        time.sleep(1.0)  # the storm hits streams that are moving, not idle ones
        web.send_signal(signal.SIGTERM)
        web.wait(timeout=30)
        ask(parent, "restarted")
        restart = time.time()
        web = start_web(settings, port, log)
        listening_at = time.time()
        wait_for(parent, "resumed?", args.clients, args.timeout, "every client to resume")
        time.sleep(1.0)  # live frames after the storm, too
        publishing.stopped.set()
        publishing.join()
        for task_id in task_ids:
            publisher.publish(make_event(task_id, "bench.storm", State.SUCCESS))
        wait_for(parent, "ended?", args.clients, args.timeout, "every client's success")
        report = ask(parent, "report")
    finally:
        web.send_signal(signal.SIGTERM)
        web.wait(timeout=30)
        clients.join(timeout=10)
        for key in client.scan_iter(match=f"{prefix}:*", count=1000):
            client.delete(key)

    answers: Counter[str] = Counter()
    for one in report:
        answers.update(one["answers"])
    resumed = sorted(one["resumed_at"] - listening_at for one in report if one["resumed_at"] is not None)
    print(f"  web restart: down for {listening_at - restart:.2f} s (SIGTERM to the new web listening)")
    print(f"  answers to reconnects: {dict(sorted(answers.items()))}")
    if resumed:
        print(
            f"  every client resumed {resumed[-1]:.2f} s after the new web listened "
            f"(median {resumed[len(resumed) // 2]:.2f} s)"
        )
    bad = {k: v for k, v in answers.items() if k not in ("stream", "retry-later", "refused", "204")}
    if bad:
        print(f"  FAIL: error statuses {bad}")
        failed = True
    failed |= not check(report, publishing.sent // args.tasks)
    print("FAIL" if failed else "OK")
    client.close()
    publisher.client.close()
    return 1 if failed else 0


def check(report: list[dict[str, Any]], steps: int) -> bool:
    """Every client: ids strictly increasing (no duplicate), then queued/started as its
    first frames allow, every progress step 1..steps once, and the success."""
    ok = True
    gaps = dupes = 0
    for one in report:
        ids = [i for i, _ in one["frames"]]
        if ids != sorted(set(ids)):
            dupes += 1
            ok = False
        states = [s for _, s in one["frames"]]
        if states[-1] != "success" or states.count("progress") != steps:
            gaps += 1
            ok = False
    print(
        f"  every client: ids increasing {len(report) - dupes}/{len(report)}, "
        f"every progress event and the success {len(report) - gaps}/{len(report)} ({steps} steps each)"
    )
    return ok


if __name__ == "__main__":
    sys.exit(main())
