"""Benchmark the web side: one Redis subscriber fanning events out to many SSE clients.

How it runs (three processes, so the server is measured on its own):

* **server** (this process): the real app, `progress_sse.web.create_app(settings)`,
  served by `web.AppRunner(app, handler_cancellation=True)` on 127.0.0.1 and a free
  port. It also orchestrates, but does nothing else while it is being measured.
* **clients** (a spawned process, or `--client-procs` of them): `--clients` W SSE
  clients, each its own HTTP connection (one `aiohttp.ClientSession` with no
  connection limit), spread round-robin over `--tasks` T tasks via
  `GET /tasks/<id>/events`, reading frames line by line.
* **publisher** (a spawned process): the sync `progress_sse.worker.publisher.Publisher`.
  It first stores a `queued` event per task (before the server starts), later
  publishes `--events` E `progress` events per task, round-robin over the tasks at
  `--rate` events/s per task (0 = as fast as it can), each carrying
  `time.time()` in its `message`, then one `success` per task so every stream ends.

What it reports:

* delivery latency (publish call start -> frame parsed by a client): median, p99, max;
* frames delivered per second (all clients, from the first publish to the last
  frame received), and the CPU the server process used per delivered frame; with
  `--rate` > 0 the delivered rate is the offered one if the server keeps up, so use
  `--rate 0` (a burst) to see the ceiling;
* how late each process's event loop ran a 10 ms timer (p99/max) while delivering:
  a busy or descheduled loop is where latency comes from;
* every client got the snapshot, every progress event once and in order, and the
  terminal event (checked; exit status 1 if not);
* server RSS with 0 clients (after a warm-up) and with W idle clients, and the
  difference per idle watcher;
* the server's pub/sub connections in `CLIENT LIST TYPE pubsub` named
  `progress-sse-hub.<prefix>` (must be exactly 1; on a cluster one per partition,
  12 in all over its nodes; exit status 1 if not), and that every watcher and
  subscription is released once the streams have ended.

Redis: database 14 by default, a random key prefix; only keys under that prefix are
deleted at the end (on a cluster: every key naming it, on every master). Run:
.venv/bin/python scripts/bench_fanout.py [--help]
Redis Cluster: .venv/bin/python scripts/bench_fanout.py --redis-url redis+cluster://HOST:PORT,HOST:PORT [--broker-url …]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import math
import multiprocessing as mp
import resource
import statistics
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import aiohttp
import redis
import redis.asyncio.cluster
from aiohttp import web

from progress_sse.config import Settings
from progress_sse.connections import hub_client_name, keys_for, sync_client
from progress_sse.cursors import BASE62, Sealed, parse, parse_id
from progress_sse.events import State, make_event
from progress_sse.redis_urls import is_cluster_url
from progress_sse.web import HUB, REDIS, create_app
from progress_sse.web.server import freeze_startup, new_loop
from progress_sse.worker.publisher import Publisher

# The broker when --redis-url is a cluster and --broker-url is not given.
CLUSTER_BROKER_DEFAULT = "redis://127.0.0.1:6379/14"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument(
        "--redis-url",
        default="redis://127.0.0.1:6379/14",
        help="Redis to use: redis://… or, for a Redis Cluster, redis+cluster://host:port,host:port",
    )
    parser.add_argument(
        "--broker-url",
        default=argparse.SUPPRESS,  # worked out below; "(default: None)" in --help would mislead
        help=f"Celery broker of the app (the bench sends it nothing); default: the --redis-url, or, when that is "
        f"a cluster (which cannot be a broker), {CLUSTER_BROKER_DEFAULT}",
    )
    parser.add_argument("-W", "--clients", type=int, default=1000, help="concurrent SSE clients")
    parser.add_argument("-T", "--tasks", type=int, default=50, help="tasks the clients are spread over")
    parser.add_argument("-E", "--events", type=int, default=100, help="progress events published per task")
    parser.add_argument(
        "--rate",
        type=float,
        default=20.0,
        help="progress events/s per task (20 = the coalescer's default cap); 0 = publish as fast as possible",
    )
    parser.add_argument("--client-procs", type=int, default=1, help="processes the clients are split over")
    parser.add_argument("--connect-concurrency", type=int, default=100, help="clients connecting at the same time")
    parser.add_argument("--idle", type=float, default=1.0, help="seconds to let W idle clients settle before RSS")
    parser.add_argument("--timeout", type=float, default=60.0, help="limit for each phase, in seconds")
    parser.add_argument(
        "--loop",
        choices=("auto", "uvloop", "asyncio"),
        default="auto",
        help="the server's event loop, as PROGRESS_SSE_LOOP (default: auto, uvloop when installed)",
    )
    args = parser.parse_args(argv)
    if min(args.clients, args.tasks, args.events, args.client_procs) < 1 or args.rate < 0:
        parser.error("clients, tasks, events and client-procs must be >= 1, rate >= 0")
    if getattr(args, "broker_url", None) is None:
        args.broker_url = CLUSTER_BROKER_DEFAULT if is_cluster_url(args.redis_url) else args.redis_url
    elif is_cluster_url(args.broker_url):
        parser.error("--broker-url cannot be a Redis Cluster (kombu has no cluster transport)")
    return args


# ---------------------------------------------------------------------------- helpers


def rss_kib() -> int:
    """Resident set size of this process now (VmRSS), in KiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def raise_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted, non-empty list."""
    return sorted_values[max(0, math.ceil(q / 100 * len(sorted_values)) - 1)]


async def settle(ready: asyncio.Event, seconds: float) -> None:
    """Wait for `ready` up to `seconds`; the caller reports how many got there."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await ready.wait()


async def recv(conn: Connection, seconds: float, what: str) -> Any:
    """The next message from a child process within `seconds`, without blocking the event loop."""
    if not await asyncio.to_thread(conn.poll, seconds):
        raise TimeoutError(f"timed out after {seconds:.0f}s waiting for {what}")
    # In a thread too: a client process's results are megabytes, and reading them
    # from the pipe as it sends them would stall the loop being measured.
    return await asyncio.to_thread(conn.recv)


class LoopLag:
    """How late the event loop runs a 10 ms timer: a busy loop delays every stream."""

    def __init__(self, period: float = 0.01) -> None:
        self.period = period
        self.samples: list[float] = []
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> list[float]:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        return sorted(self.samples)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + self.period
            await asyncio.sleep(self.period)
            self.samples.append(loop.time() - due)


class GcPauses:
    """How long each garbage collection of the server stopped it (gc.callbacks),
    by generation: a full collection walks every object of every stream. Both
    wall time and the process's CPU time: on a machine shared with the clients, a
    collection can be descheduled, which is the machine's doing, not its own."""

    def __init__(self) -> None:
        self.pauses: dict[int, list[float]] = {0: [], 1: [], 2: []}
        self.cpu: list[float] = []
        self._started = (0.0, 0.0)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = (time.perf_counter(), time.thread_time())
        else:
            self.pauses[info["generation"]].append(time.perf_counter() - self._started[0])
            self.cpu.append(time.thread_time() - self._started[1])

    def start(self) -> None:
        gc.callbacks.append(self._callback)

    def stop(self) -> None:
        gc.callbacks.remove(self._callback)


async def wait_for(predicate: Callable[[], bool], seconds: float) -> bool:
    """Poll a cheap condition (a counter) until it holds or `seconds` pass."""
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


# ---------------------------------------------------------------------------- clients process


@dataclass
class ClientResult:
    snapshot: bool = False
    progress: int = 0
    terminal: bool = False
    in_order: bool = True
    error: str | None = None
    latencies: list[float] = field(default_factory=list)
    last_receipt: float = 0.0


def event_number(frame_id: str | None, partitions: int) -> tuple[int, int]:
    """(partition, number) of a frame's event, from its id: one Redis, `<epoch>-<n>`
    (partition 0); a cluster, the composite cursor's lead entry, the event's own
    partition and number (cursors.composite). (-1, -1) for a frame without an id."""
    if frame_id is None:
        return (-1, -1)
    if partitions == 1:
        return (0, parse_id(frame_id).n)
    if not isinstance(parse(frame_id, partitions=partitions), Sealed):
        raise ValueError(f"not a composite event id: {frame_id[:40]!r}")
    lead = frame_id.split(".", 2)[1]
    n = 0
    for char in lead[1:]:
        n = n * 62 + BASE62.index(char)
    return (BASE62.index(lead[0]), n)


async def _one_client(
    session: aiohttp.ClientSession,
    url: str,
    gate: asyncio.Semaphore,
    ready: Callable[[bool], None],
    result: ClientResult,
    partitions: int,
) -> None:
    """One SSE client of one task: per task, ids come in order, all of its partition."""
    released = False
    await gate.acquire()
    try:
        async with session.get(url) as resp:
            if resp.status != 200:
                result.error = f"HTTP {resp.status}"
                return
            last_id = (-1, -1)
            event: str | None = None
            frame_id: str | None = None
            data: str | None = None
            while True:
                raw = await resp.content.readline()
                if not raw:
                    result.error = result.error or "stream ended before the terminal event"
                    return
                line = raw.decode().rstrip("\r\n")
                if line:
                    name, _, value = line.partition(": ")
                    if name == "data":
                        data = value
                    elif name == "event":
                        event = value
                    elif name == "id":
                        frame_id = value
                    continue  # comments (": ping") are ignored
                if data is None:
                    continue  # end of a comment-only frame
                now = result.last_receipt = time.time()
                seq = event_number(frame_id, partitions)
                if seq[1] <= last_id[1] or (last_id[0] >= 0 and seq[0] != last_id[0]):
                    result.in_order = False
                last_id = seq
                if not result.snapshot:
                    result.snapshot = event == State.QUEUED
                    if not result.snapshot:
                        result.error = f"first frame was {event!r}, not the queued snapshot"
                    gate.release()
                    released = True
                    ready(result.snapshot)
                elif event == State.PROGRESS:
                    result.progress += 1
                    result.latencies.append(now - float(json.loads(data)["message"]))
                elif event == State.SUCCESS:
                    result.terminal = True
                    return
                event = frame_id = data = None
    except Exception as exc:  # reported, and counted as a failed client
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        if not released:
            gate.release()
            ready(False)


async def _clients_main(
    conn: Connection, base: str, task_ids: list[str], count: int, offset: int, cfg: dict[str, Any]
) -> None:
    raise_fd_limit(count + 256)
    results = [ClientResult() for _ in range(count)]
    pending = count
    connected = 0
    all_ready = asyncio.Event()

    def ready(ok: bool) -> None:
        nonlocal pending, connected
        pending -= 1
        connected += ok
        if pending == 0:
            all_ready.set()

    timeout = aiohttp.ClientTimeout(total=None, sock_connect=cfg["timeout"], sock_read=cfg["timeout"])
    connector = aiohttp.TCPConnector(limit=0)
    gate = asyncio.Semaphore(cfg["connect_concurrency"])
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        start = time.monotonic()
        cpu0 = cpu_seconds()
        runs = [
            asyncio.create_task(
                _one_client(
                    session,
                    f"{base}/tasks/{task_ids[(offset + i) % len(task_ids)]}/events",
                    gate,
                    ready,
                    r,
                    cfg["partitions"],
                )
            )
            for i, r in enumerate(results)
        ]
        await settle(all_ready, cfg["timeout"])
        conn.send({"ready": connected, "connect_s": time.monotonic() - start, "rss_kib": rss_kib()})
        cpu1 = cpu_seconds()
        lag = LoopLag()
        lag.start()
        collections = GcPauses()
        collections.start()
        _done, not_done = await asyncio.wait(runs, timeout=cfg["deliver_timeout"])
        for run in not_done:
            run.cancel()
        await asyncio.gather(*not_done, return_exceptions=True)
        cpu2 = cpu_seconds()
        lags = await lag.stop()
    errors: dict[str, int] = {}
    for r in results:
        if r.error is None and not r.terminal:
            r.error = "no terminal event before the timeout"
        if r.error:
            errors[r.error] = errors.get(r.error, 0) + 1
    latencies = [x for r in results for x in r.latencies]
    conn.send(
        {
            "clients": count,
            "snapshots": sum(r.snapshot for r in results),
            "progress": [r.progress for r in results],
            "terminals": sum(r.terminal for r in results),
            "out_of_order": sum(not r.in_order for r in results),
            "errors": errors,
            "latencies": latencies,
            "last_receipt": max((r.last_receipt for r in results), default=0.0),
            "cpu_connect_s": cpu1 - cpu0,
            "cpu_deliver_s": cpu2 - cpu1,
            "lag_p99": percentile(lags, 99) if lags else 0.0,
            "lag_max": lags[-1] if lags else 0.0,
        }
    )


def clients_process(
    conn: Connection, base: str, task_ids: list[str], count: int, offset: int, cfg: dict[str, Any]
) -> None:
    try:
        asyncio.run(_clients_main(conn, base, task_ids, count, offset, cfg))
    finally:
        conn.close()


# ---------------------------------------------------------------------------- publisher process


def publisher_process(
    conn: Connection, redis_url: str, prefix: str, task_ids: list[str], events: int, rate: float
) -> None:
    """Publish E progress events per task, round-robin, paced at `rate`/s per task."""
    publisher = Publisher.from_settings(Settings(redis_url=redis_url, key_prefix=prefix))
    try:
        publisher.client.ping()
        conn.send("ready")
        conn.recv()  # go
        interval = 1.0 / (rate * len(task_ids)) if rate > 0 else 0.0
        durations: list[float] = []
        refused = 0
        start_wall = time.time()
        start = time.perf_counter()
        for k in range(events):
            for j, task_id in enumerate(task_ids):
                if interval:
                    delay = start + (k * len(task_ids) + j) * interval - time.perf_counter()
                    if delay > 0:
                        time.sleep(delay)
                t0 = time.perf_counter()
                event = make_event(
                    task_id, "bench.fanout", State.PROGRESS, current=k + 1, total=events, message=repr(time.time())
                )
                if publisher.publish(event) is None:
                    refused += 1
                durations.append(time.perf_counter() - t0)
        progress_s = time.perf_counter() - start
        for task_id in task_ids:
            publisher.publish(make_event(task_id, "bench.fanout", State.SUCCESS, current=events, total=events))
        durations.sort()
        conn.send(
            {
                "start": start_wall,
                "progress_s": progress_s,
                "published": len(durations),
                "refused": refused,
                "publish_median_us": statistics.median(durations) * 1e6,
                "publish_p99_us": percentile(durations, 99) * 1e6,
            }
        )
    finally:
        publisher.client.close()
        conn.close()


# ---------------------------------------------------------------------------- server process (this one)


def queue_tasks(redis_url: str, prefix: str, count: int) -> list[str]:
    publisher = Publisher.from_settings(Settings(redis_url=redis_url, key_prefix=prefix))
    try:
        task_ids = [str(uuid.uuid4()) for _ in range(count)]
        for task_id in task_ids:
            if publisher.publish(make_event(task_id, "bench.fanout", State.QUEUED)) is None:
                raise RuntimeError(f"the queued event of {task_id} was refused")
        return task_ids
    finally:
        publisher.client.close()


def warm_up(base: str, task_id: str, times: int) -> None:
    """Serve a few complete (terminal, so finite) streams before the baseline RSS."""
    for _ in range(times):
        with urllib.request.urlopen(f"{base}/tasks/{task_id}/events", timeout=10) as resp:
            body = resp.read()
            if b"event: success" not in body:
                raise RuntimeError(f"warm-up stream did not end with success: {body[-200:]!r}")


async def hub_pubsub(client: Any, prefix: str) -> tuple[int, int]:
    """The hub's pub/sub connections in CLIENT LIST (named hub_client_name), and the
    nodes they are on: one Redis, its own; a cluster, every node asked in turn."""
    name = hub_client_name(prefix)
    if not isinstance(client, redis.asyncio.cluster.RedisCluster):
        return len([c for c in await client.client_list(_type="pubsub") if c.get("name") == name]), 1
    await client.initialize()  # it learns the nodes on its first command, which may not have come yet
    per_node = []
    for node in client.get_nodes():
        listed = await client.client_list(_type="pubsub", target_nodes=node)
        per_node.append(len([c for c in listed if c.get("name") == name]))
    return sum(per_node), sum(1 for n in per_node if n)


@dataclass
class Checks:
    failures: list[str] = field(default_factory=list)

    def check(self, ok: bool, message: str) -> None:
        if not ok:
            self.failures.append(message)


async def run(args: argparse.Namespace, settings: Settings, checks: Checks) -> None:
    ctx = mp.get_context("spawn")
    prefix = settings.key_prefix
    cluster = is_cluster_url(settings.redis_url)
    # The hub's pub/sub connections: one Redis, 1; a cluster, one per partition.
    expected = keys_for(settings).partitions
    task_ids = queue_tasks(settings.redis_url, prefix, args.tasks)
    warm_task = queue_tasks(settings.redis_url, prefix, 1)[0]
    warm = Publisher.from_settings(settings)
    warm.publish(make_event(warm_task, "bench.warmup", State.SUCCESS, current=1, total=1))
    warm.client.close()

    app = create_app(settings)
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    procs: list[Any] = []
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0, backlog=1024)
        await site.start()
        freeze_startup()  # as progress-sse web does (web/server.py)
        port = runner.addresses[0][1]
        base = f"http://127.0.0.1:{port}"
        hub = app[HUB]
        if not await wait_for(lambda: hub.connections >= expected, args.timeout):
            raise TimeoutError("the hub did not connect to Redis")

        await asyncio.to_thread(warm_up, base, warm_task, 50)
        await wait_for(lambda: hub.watcher_count == 0 and not hub.subscribed_tasks, 5)
        gc.collect()
        rss0 = rss_kib()

        # Clients and publisher are spawned now; they import while the server idles.
        cfg = {
            "timeout": args.timeout,
            "connect_concurrency": max(1, args.connect_concurrency // args.client_procs),
            "deliver_timeout": args.timeout + (args.events / args.rate if args.rate else 0),
            "partitions": expected,
        }
        client_conns: list[Connection] = []
        share, extra = divmod(args.clients, args.client_procs)
        offset = 0
        for n in range(args.client_procs):
            count = share + (1 if n < extra else 0)
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=clients_process, args=(child, base, task_ids, count, offset, cfg), daemon=True)
            proc.start()
            child.close()  # so a child that dies shows up here as EOF, not as a silent wait
            procs.append(proc)
            client_conns.append(parent)
            offset += count
        pub_conn, pub_child = ctx.Pipe()
        pub = ctx.Process(
            target=publisher_process,
            args=(pub_child, settings.redis_url, prefix, task_ids, args.events, args.rate),
            daemon=True,
        )
        pub.start()
        pub_child.close()
        procs.append(pub)

        readies = [await recv(c, args.timeout + 30, "the clients to connect") for c in client_conns]
        ready = sum(r["ready"] for r in readies)
        connect_s = max(r["connect_s"] for r in readies)
        client_rss = sum(r["rss_kib"] for r in readies)
        await wait_for(lambda: hub.watcher_count >= args.clients, 5)
        watchers = hub.watcher_count
        subscribed = len(hub.subscribed_tasks)
        await asyncio.sleep(args.idle)
        gc.collect()
        rss_w = rss_kib()
        pubsub, pubsub_nodes = await hub_pubsub(app[REDIS], prefix)
        checks.check(ready == args.clients, f"only {ready} of {args.clients} clients got their first frame")
        checks.check(watchers == args.clients, f"the hub has {watchers} watchers, not {args.clients}")
        checks.check(
            pubsub == expected, f"{pubsub} pub/sub connections named progress-sse-hub.{prefix}, not {expected}"
        )
        checks.check(hub.connections == expected, f"the hub connected {hub.connections} times")

        await recv(pub_conn, 30, "the publisher to start")
        lag = LoopLag()
        lag.start()
        collections = GcPauses()
        collections.start()
        cpu0 = cpu_seconds()
        pub_conn.send("go")
        results = [await recv(c, cfg["deliver_timeout"] + 30, "the clients' results") for c in client_conns]
        cpu_server = cpu_seconds() - cpu0
        collections.stop()
        server_lag = await lag.stop()
        published = await recv(pub_conn, 30, "the publisher's report")
        released = await wait_for(lambda: hub.watcher_count == 0 and not hub.subscribed_tasks, 10)
        pubsub_after, _ = await hub_pubsub(app[REDIS], prefix)
    finally:
        await runner.cleanup()
        for proc in procs:
            proc.join(5)
            if proc.is_alive():
                proc.terminate()
                proc.join(5)

    # ------------------------------------------------------------------ checks and report
    progress_counts = [n for r in results for n in r["progress"]]
    snapshots = sum(r["snapshots"] for r in results)
    terminals = sum(r["terminals"] for r in results)
    out_of_order = sum(r["out_of_order"] for r in results)
    errors: dict[str, int] = {}
    for r in results:
        for message, n in r["errors"].items():
            errors[message] = errors.get(message, 0) + n
    short = sum(1 for n in progress_counts if n != args.events)
    checks.check(published["refused"] == 0, f"{published['refused']} progress events were refused by the store")
    checks.check(
        snapshots == args.clients, f"{args.clients - snapshots} clients did not start with the queued snapshot"
    )
    checks.check(short == 0, f"{short} clients did not get exactly {args.events} progress events")
    checks.check(terminals == args.clients, f"{args.clients - terminals} clients did not get the terminal event")
    checks.check(out_of_order == 0, f"{out_of_order} clients saw ids that did not increase")
    checks.check(not errors, f"client errors: {errors}")
    checks.check(
        released, f"{hub.watcher_count} watchers / {len(hub.subscribed_tasks)} subscriptions left after the end"
    )
    checks.check(pubsub_after == expected, f"{pubsub_after} hub pub/sub connections after the run, not {expected}")

    latencies = sorted(x for r in results for x in r["latencies"])
    frames = sum(progress_counts) + terminals
    span = max(1e-9, max(r["last_receipt"] for r in results) - published["start"])
    rate = "as fast as possible" if not args.rate else f"{args.rate:g}/s per task = {args.rate * args.tasks:g}/s in all"
    per_watcher = (rss_w - rss0) / max(1, watchers)
    cpu_clients = sum(r["cpu_deliver_s"] for r in results)

    print(
        f"Set-up: server (real app, AppRunner handler_cancellation=True) in this process; {args.clients} clients in "
        f"{args.client_procs} other process(es); publisher in another; Redis {settings.redis_url}, prefix {prefix!r}"
        + (f"; Redis Cluster, {expected} partitions, broker {settings.broker_url}" if cluster else "")
    )
    print(
        f"  {args.clients} clients over {args.tasks} tasks ({subscribed} channels subscribed): "
        f"{ready} connected and on their snapshot in {connect_s:.2f} s"
    )
    print(
        f"Memory (server VmRSS): 0 clients {rss0 / 1024:.1f} MiB, {watchers} idle clients {rss_w / 1024:.1f} MiB"
        f" -> {per_watcher:.1f} KiB per idle watcher (client process(es): {client_rss / 1024:.1f} MiB)"
    )
    print(
        f"Pub/sub connections named progress-sse-hub.{prefix}: {pubsub} with {watchers} watchers, "
        f"{pubsub_after} after the run; hub connects: {hub.connections}"
        + (f" (one per partition: {expected} expected, on {pubsub_nodes} node(s))" if cluster else "")
    )
    print(
        f"Load: {args.events} progress events x {args.tasks} tasks = {published['published']} publishes ({rate}), "
        f"then 1 success per task"
    )
    print(
        f"  publishing took {published['progress_s']:.2f} s; "
        f"publish() median {published['publish_median_us']:.0f} us, p99 {published['publish_p99_us']:.0f} us"
    )
    if latencies:
        print(
            f"  delivery latency publish -> client: median {statistics.median(latencies) * 1000:.2f} ms, "
            f"p99 {percentile(latencies, 99) * 1000:.2f} ms, max {latencies[-1] * 1000:.2f} ms "
            f"({len(latencies)} samples)"
        )
    offered = f"offered {args.rate * args.clients:,.0f}/s" if args.rate else "offered: unpaced burst"
    print(
        f"  frames delivered {frames:,} in {span:.2f} s = {frames / span:,.0f} frames/s ({offered}); "
        f"server CPU {cpu_server:.2f} s ({cpu_server / frames * 1e6:.1f} us/frame, "
        f"{cpu_server / span:.0%} of a core), clients CPU {cpu_clients:.2f} s"
    )
    print(
        f"  event-loop lag (10 ms timer) p99/max: server {percentile(server_lag, 99) * 1000:.1f}/"
        f"{server_lag[-1] * 1000:.1f} ms, clients {max(r['lag_p99'] for r in results) * 1000:.1f}/"
        f"{max(r['lag_max'] for r in results) * 1000:.1f} ms"
    )
    gen2 = collections.pauses[2]
    print(
        f"  garbage collections while delivering: {sum(len(p) for p in collections.pauses.values())}, "
        f"longest {max((x for p in collections.pauses.values() for x in p), default=0) * 1000:.1f} ms; "
        f"full ones {len(gen2)}, longest {max(gen2, default=0) * 1000:.1f} ms; "
        f"most CPU in one {max(collections.cpu, default=0) * 1000:.1f} ms"
    )
    print(
        f"  every client: snapshot {snapshots}/{args.clients}, all {args.events} progress {args.clients - short}/"
        f"{args.clients}, terminal {terminals}/{args.clients}, ids increasing {args.clients - out_of_order}/"
        f"{args.clients}; released after the end: {'yes' if released else 'no'}"
    )


def cleanup(url: str, prefix: str) -> None:
    """Delete the keys this run made (its prefix only; never FLUSHDB)."""
    if is_cluster_url(url):
        cleanup_cluster(url, prefix)
        return
    client = redis.Redis.from_url(url)
    try:
        doomed = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        for start in range(0, len(doomed), 500):
            client.delete(*doomed[start : start + 500])
    finally:
        client.close()


def cleanup_cluster(url: str, prefix: str) -> None:
    """On a cluster names start with a hash tag (`{<prefix>.<p>}`, `{<prefix>}`), so
    every key naming the prefix, on every master (RedisCluster.scan_iter scans them
    all), deleted one at a time: they are in many slots."""
    client = sync_client(url, name="progress-sse-bench")
    try:
        for key in list(client.scan_iter(match=f"*{prefix}*", count=1000)):
            client.delete(key)
    finally:
        client.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    raise_fd_limit(args.clients + 256)
    prefix = f"bench-{uuid.uuid4().hex[:10]}"
    settings = Settings(
        redis_url=args.redis_url, broker_url=args.broker_url, key_prefix=prefix, queue=prefix, host="127.0.0.1"
    )
    sync_client(args.redis_url).ping()  # fail early and clearly if Redis is not there
    checks = Checks()
    loop = new_loop(args.loop)
    print(f"Server event loop: {type(loop).__module__}.{type(loop).__name__}")
    try:
        with asyncio.Runner(loop_factory=lambda: loop) as runner:
            runner.run(run(args, settings, checks))
    finally:
        cleanup(args.redis_url, prefix)
    for failure in checks.failures:
        print(f"FAIL: {failure}")
    print("OK" if not checks.failures else "FAILED")
    return 0 if not checks.failures else 1


if __name__ == "__main__":
    sys.exit(main())
