"""Benchmark frozen clients: what F clients that stop reading cost the server and the
clients that still read.

How it runs (the server is the real app, in this process, served by an AppRunner
with `RUN_OPTIONS`, so its memory and its streams can be read directly):

* **readers** (a spawned process): R SSE clients on one task, each frame's
  delivery latency measured from the publish time the event carries;
* **frozen** (this process, raw sockets): F clients that send their request, read
  the response's head and then never read again (a receive buffer of 4 KiB);
* **publisher** (a thread here): E `progress` events of `--size` bytes on the
  task at `--rate` per second, then its `success`.

Two runs, the same load: without the frozen clients, then with them. Reported
for each: the readers' latency (median, p99), the server's peak RSS above its
idle RSS, and with F frozen clients the seconds from the first publish until the
server had let every one of them go (each after `--write-timeout` seconds in
which it accepted nothing), and whether their watchers were released. Exit
status 1 if a reader missed the success or a frozen client was never let go.

Run: .venv/bin/python scripts/bench_frozen.py [--help]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import socket
import statistics
import sys
import threading
import time
import uuid
from multiprocessing.connection import Connection
from typing import Any

import aiohttp
import redis
from aiohttp import web
from bench_fanout import percentile, rss_kib  # this directory is first on sys.path when run as a script

from progress_sse.cli.decoder import SSEDecoder
from progress_sse.cli.embedded import free_port
from progress_sse.config import Settings
from progress_sse.events import State, make_event
from progress_sse.web import HUB, RUN_OPTIONS, STREAMS, create_app
from progress_sse.worker.publisher import Publisher


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/14", help="Redis to use")
    parser.add_argument("-R", "--readers", type=int, default=100, help="clients that read")
    parser.add_argument("-F", "--frozen", type=int, default=100, help="clients that stop reading")
    parser.add_argument("-E", "--events", type=int, default=600, help="progress events published")
    parser.add_argument("--size", type=int, default=20_000, help="bytes of each event's message")
    parser.add_argument("--rate", type=float, default=60.0, help="events per second")
    parser.add_argument("--write-timeout", type=float, default=5.0, help="PROGRESS_SSE_WRITE_TIMEOUT for the run")
    args = parser.parse_args(argv)
    if min(args.readers, args.frozen, args.events, args.size) < 1 or args.rate <= 0:
        parser.error("every count must be >= 1, rate > 0")
    return args


# ---------------------------------------------------------------------------- readers


def readers_process(conn: Connection, url: str, readers: int) -> None:
    async def read(session: aiohttp.ClientSession, latencies: list[float]) -> bool:
        async with session.get(url) as resp:
            decoder = SSEDecoder()
            async for chunk in resp.content.iter_any():
                now = time.time()
                for frame in decoder.feed(chunk):
                    sent = json.loads(frame.data).get("message")
                    if frame.event == "progress" and sent:
                        latencies.append(now - float(sent.split(" ", 1)[0]))
                    if frame.event == "success":
                        return True
        return False

    async def main() -> None:
        latencies: list[float] = []
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as session:
            runs = [asyncio.create_task(read(session, latencies)) for _ in range(readers)]
            conn.send("connected")
            done = await asyncio.gather(*runs)
        conn.send({"ended": sum(done), "latencies": latencies})

    asyncio.run(main())


# ---------------------------------------------------------------------------- frozen


def frozen_client(port: int, path: str) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    return sock


# ---------------------------------------------------------------------------- a run


async def run(args: argparse.Namespace, settings: Settings, frozen: int) -> dict[str, Any]:
    app = create_app(settings)
    runner = web.AppRunner(app, **RUN_OPTIONS)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    publisher = Publisher.from_settings(settings)
    task_id = f"frozen-{uuid.uuid4().hex[:8]}"
    publisher.publish(make_event(task_id, "bench.frozen", State.STARTED))
    path = f"/tasks/{task_id}/events"
    streams, hub = app[STREAMS], app[HUB]
    try:
        idle_rss = rss_kib()
        parent, child = mp.get_context("spawn").Pipe()
        readers = mp.get_context("spawn").Process(
            target=readers_process, args=(child, f"http://127.0.0.1:{port}{path}", args.readers), daemon=True
        )
        readers.start()
        assert await asyncio.to_thread(parent.poll, 60), "the readers did not connect"
        parent.recv()
        sockets = [await asyncio.to_thread(frozen_client, port, path) for _ in range(frozen)]
        while True:  # the server counts its streams; nothing to wait on but that count
            if streams.open >= args.readers + frozen:
                break
            await asyncio.sleep(0.01)

        padding = "x" * args.size
        peak = idle_rss
        started = time.time()
        all_gone: float | None = None

        def publish() -> None:
            for i in range(1, args.events + 1):
                message = f"{time.time()} {padding}"
                publisher.publish(make_event(task_id, "bench.frozen", State.PROGRESS, current=i, message=message))
                time.sleep(1 / args.rate)

        publishing = threading.Thread(target=publish, daemon=True)
        publishing.start()
        while True:  # sampled: memory has no event to wait on
            peak = max(peak, rss_kib())
            if frozen and all_gone is None and streams.stalled >= frozen:
                all_gone = time.time() - started
            waiting = frozen and all_gone is None and time.time() - started < 120
            if not publishing.is_alive() and not waiting:
                break
            await asyncio.sleep(0.05)
        publisher.publish(make_event(task_id, "bench.frozen", State.SUCCESS, current=args.events))
        assert await asyncio.to_thread(parent.poll, 120), "the readers did not end"
        result = parent.recv()
        readers.join(timeout=10)
        for sock in sockets:
            sock.close()
        return {
            "ended": result["ended"],
            "latencies": result["latencies"],
            "peak_kib": peak - idle_rss,
            "all_gone": all_gone,
            "stalled": streams.stalled,
            "watchers_after": hub.watcher_count,
        }
    finally:
        await runner.cleanup()
        publisher.client.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    settings = Settings(
        redis_url=args.redis_url, broker_url=args.redis_url, key_prefix=prefix, write_timeout=args.write_timeout
    )
    print(
        f"Set-up: server in this process; {args.readers} readers in another; {args.events} events of "
        f"{args.size / 1000:g} kB at {args.rate:g}/s; write timeout {args.write_timeout:g} s; "
        f"stream buffer {settings.stream_buffer // 1024} KiB"
    )
    failed = False
    try:
        for frozen in (0, args.frozen):
            got = asyncio.run(run(args, settings, frozen))
            lat = [x * 1000 for x in got["latencies"]]
            line = (
                f"  {frozen:>4} frozen: readers' latency median {statistics.median(lat):.1f} ms, "
                f"p99 {percentile(sorted(lat), 99):.1f} ms; server RSS peak +{got['peak_kib'] / 1024:.1f} MiB over idle"
            )
            if frozen:
                gone = got["all_gone"]
                line += (
                    f"; every frozen client let go {gone:.1f} s after the first publish"
                    if gone is not None
                    else f"; only {got['stalled']} of {frozen} frozen clients let go"
                )
                failed |= gone is None
            print(line)
            if got["ended"] != args.readers or got["watchers_after"] != 0:
                print(f"  FAIL: {got['ended']} of {args.readers} readers got the success; {got['watchers_after']} held")
                failed = True
    finally:
        client = redis.Redis.from_url(args.redis_url)
        for key in client.scan_iter(match=f"{prefix}:*", count=1000):
            client.delete(key)
        client.close()
    print("FAIL" if failed else "OK")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
