"""Benchmark progress-sse against its best-practice peer and a polling baseline, in one run.

The servers (each its own process, pinned to one core, measured one at a time):

* **progress-sse**: the real app, `progress_sse.web.create_app(settings)` served by
  `web.AppRunner(app, handler_cancellation=True)` on its default loop (`auto`:
  uvloop when installed), after `freeze_startup()`, as `scripts/bench_fanout.py` runs it;
* **peer** (`serve_peer` below; bench-only, not product code): Starlette +
  sse-starlette's `EventSourceResponse` under uvicorn (httptools, uvloop), with the
  best practice for this job: one shared Redis pub/sub connection per process,
  subscribed per task channel while a stream of it is open, fanning each message
  out to the streams' `asyncio.Queue`s. A stream subscribes, then sends the task's
  state hash (`latest`) as its first frame, then every newer live event, and ends
  after the terminal one. As such a server is usually deployed: no `gc.freeze()`,
  and no limit on what a slow client's queue may hold. Needs the `bench` extra:
  `pip install -e '.[bench]'`;
* **polling** (`serve_polling`): celery-progress's pattern at its cheapest: clients
  `GET /tasks/<id>` every 500 ms (after each answer, as its JS does) from a tiny
  aiohttp app (uvloop) whose one handler does one `HGET latest` of the task's state hash.

Every server reads the same Redis events: the publisher (bench_fanout's
`publisher_process`, progress-sse's own `Publisher`) writes each event once into
Redis (log, state hash, PUBLISH), and a scenario's servers get the same tasks,
event count, rate and payloads. The servers take turns (the order rotates from
run to run) so none competes with another for its core: the server under test
runs alone on the server core (`--server-core`, default the last of
`os.sched_getaffinity(0)`), and this process, the clients, the publisher and
Redis (`sched_setaffinity` on its `process_id`, restored at the end; `--no-pin-redis`
to leave it) on the other core(s). SSE clients are bench_fanout's (one HTTP
connection each, frames read line by line, latency = frame receipt - the
`time.time()` the publisher put in `message`); pollers are `pollers_process` below.

Scenarios (`--scenario NAME`, default all; sizes by flags, `--help`):

* `steady`: 1,000 SSE clients over 50 tasks, 100 events per task at 20/s per task
  (20,000 frames/s): server CPU per delivered frame, latency p50/p99;
* `idle`: 5,000 idle streams (one task each) open, then 100 active clients over
  100 tasks at 10 events/s each (1,000 events/s): latency p50/p99 and CPU per
  frame with the idle streams open, and the memory per idle stream (server VmRSS
  with them open - after warm-up with none, after `gc.collect()` in the server, / 5,000);
  at the end every idle task gets its terminal event;
* `memory`: the idle streams alone (run `idle` for the same figure with the load);
* `burst`: 1,000 clients of one task, 2,000 events published as fast as one
  connection can: frames/s delivered and CPU per frame;
* `polling`: 1,000 watchers over 100 tasks, 50 events per task at 10/s per task,
  by SSE (progress-sse and the peer) and by polling: staleness of every update
  (publish -> the first frame or poll answer that shows it or a later one; a poll
  shows only the latest, so most updates it covers it never shows: their share is
  reported, and `_poll` says how their publish time is known), p50/p99; the
  server's own Redis commands per second
  (every command its redis-py clients sent, counted in the server process, so other
  users of the Redis do not count) and Redis's INFO commandstats delta per second
  (every client: the publisher's script and whatever else uses that Redis); server CPU.

Checks, every run (exit status 1 if one fails): every SSE client got the queued
snapshot first, every progress event once with increasing ids, and the terminal
event; every idle stream its snapshot and terminal event; every poller saw
`current` never go down, the last value and the terminal state; no client error;
no event refused by the store; exactly one pub/sub connection of the server
(`progress-sse-hub.<prefix>`, or the peer's `bench-peer.<prefix>`) while streams
are open; every stream and subscription released at the end.

Report: a line per run, then one table: the median of the runs (min-max) for
each server, and the ratios progress-sse / peer and progress-sse / polling, with
the machine (CPU, cores, Python, library and Redis versions). A run's line gives
the clients' CPU share too: near 100 % the load core, not the server, sets the
pace (likely in `burst`).

Redis: database 14 by default, a random key prefix per server run; only keys under
that prefix are deleted at the end. Run (in a quiet window: the core split is the
measurement):

    .venv/bin/pip install -e '.[bench]'
    .venv/bin/python scripts/bench_peers.py --quick                  # every scenario, small, 1 run: ~30 s
    .venv/bin/python scripts/bench_peers.py                          # the full matrix, 3 runs: ~8-10 min
    .venv/bin/python scripts/bench_peers.py --burst-events 1000      # the same, burst halved: ~6-7 min
    .venv/bin/python scripts/bench_peers.py --scenario steady --runs 5
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import multiprocessing as mp
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field, replace
from importlib import metadata
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import aiohttp
import redis
import redis.asyncio as aioredis
from aiohttp import web

from progress_sse.config import Settings
from progress_sse.connections import hub_client_name, keys_for
from progress_sse.events import TERMINAL_STATES, State, make_event
from progress_sse.web import HUB, create_app
from progress_sse.web.server import freeze_startup, loop_name, new_loop
from progress_sse.worker.publisher import Publisher

sys.path.insert(0, str(Path(__file__).resolve().parent))  # scripts/: bench_fanout's pieces, one copy of each
from bench_fanout import (
    Checks,
    clients_process,
    cpu_seconds,
    percentile,
    publisher_process,
    queue_tasks,
    raise_fd_limit,
    rss_kib,
    settle,
    wait_for,
    warm_up,
)
from bench_fanout import cleanup as delete_keys

PROGRESS_SSE, PEER, POLLING = "progress-sse", "peer", "polling"
LABELS = {PROGRESS_SSE: "progress-sse", PEER: "peer (sse-starlette)", POLLING: "polling"}
FD_LIMIT = 100_000  # raised to the hard limit when that is lower


@dataclass(frozen=True)
class Scenario:
    name: str
    servers: tuple[str, ...]
    clients: int  # active clients (SSE, or pollers for the polling server)
    tasks: int
    events: int  # progress events per task
    rate: float  # per task; 0 = as fast as the publisher can
    idle: int = 0  # idle streams, open before the active clients and during their load
    idle_tasks: int = 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    add = parser.add_argument
    add("--redis-url", default="redis://127.0.0.1:6379/14")
    add("--scenario", choices=("all", "steady", "idle", "memory", "burst", "polling"), default="all")
    add("--runs", type=int, default=3, help="runs of each server in each scenario")
    add("--quick", action="store_true", help="every scenario at small sizes, 1 run (a smoke test: seconds each)")
    add("--servers", default=f"{PROGRESS_SSE},{PEER},{POLLING}", help="which servers to run, comma-separated")
    add("--server-core", type=int, default=None, help="the core of the server under test (default: the last one)")
    add("--no-pin-redis", action="store_true", help="leave Redis's CPU affinity alone")
    add("--steady-clients", type=int, default=1000)
    add("--steady-tasks", type=int, default=50)
    add("--steady-events", type=int, default=100)
    add("--steady-rate", type=float, default=20.0, help="events/s per task")
    add("--idle-streams", type=int, default=5000)
    add("--idle-tasks", type=int, default=0, help="tasks the idle streams watch (0: one each)")
    add("--active-clients", type=int, default=100)
    add("--active-tasks", type=int, default=100)
    add("--active-events", type=int, default=50)
    add("--active-rate", type=float, default=10.0, help="events/s per active task")
    add("--burst-clients", type=int, default=1000)
    add("--burst-events", type=int, default=2000)
    add("--poll-watchers", type=int, default=1000)
    add("--poll-tasks", type=int, default=100)
    add("--poll-events", type=int, default=50)
    add("--poll-rate", type=float, default=10.0, help="events/s per task")
    add("--poll-interval", type=float, default=0.5, help="seconds between a poller's answer and its next poll")
    add("--connect-concurrency", type=int, default=100)
    add("--settle", type=float, default=1.0, help="seconds idle streams settle before the RSS is read")
    add("--timeout", type=float, default=60.0, help="limit for each phase, in seconds")
    args = parser.parse_args(argv)
    args.servers = tuple(s for s in (PROGRESS_SSE, PEER, POLLING) if s in args.servers.split(","))
    if args.quick:
        args.runs = 1
        for flag, value in {
            "steady_clients": 100,
            "steady_tasks": 10,
            "steady_events": 20,
            "idle_streams": 300,
            "active_clients": 20,
            "active_tasks": 20,
            "active_events": 10,
            "burst_clients": 100,
            "burst_events": 200,
            "poll_watchers": 100,
            "poll_tasks": 10,
            "poll_events": 10,
            "settle": 0.5,
        }.items():
            if getattr(args, flag) == parser.get_default(flag):
                setattr(args, flag, value)
    if args.runs < 1 or not args.servers:
        parser.error("--runs must be >= 1 and --servers must name progress-sse, peer or polling")
    return args


def scenarios(args: argparse.Namespace) -> list[Scenario]:
    sse = tuple(s for s in args.servers if s != POLLING)
    idle = Scenario(
        "idle",
        sse,
        args.active_clients,
        args.active_tasks,
        args.active_events,
        args.active_rate,
        idle=args.idle_streams,
        idle_tasks=args.idle_tasks or args.idle_streams,
    )
    every = [
        Scenario("steady", sse, args.steady_clients, args.steady_tasks, args.steady_events, args.steady_rate),
        idle,
        Scenario("burst", sse, args.burst_clients, 1, args.burst_events, 0.0),
        Scenario("polling", args.servers, args.poll_watchers, args.poll_tasks, args.poll_events, args.poll_rate),
    ]
    if args.scenario == "memory":
        return [replace(idle, name="memory", clients=0)]
    return [s for s in every if args.scenario in ("all", s.name)]


# ---------------------------------------------------------------------------- in every server process

COMMANDS = [0]  # Redis commands this process's redis-py clients sent


def count_redis_commands() -> None:
    """Count every command redis-py packs for Redis in this process (asyncio and sync
    clients, pipelines included): the server's own traffic, whatever else uses the Redis."""
    from redis.asyncio.connection import AbstractConnection as AsyncConnection
    from redis.connection import AbstractConnection as SyncConnection

    def one(original: Callable[..., Any]) -> Callable[..., Any]:
        def counted(self: Any, *args: Any, **kwargs: Any) -> Any:
            COMMANDS[0] += 1
            return original(self, *args, **kwargs)

        return counted

    def many(original: Callable[..., Any]) -> Callable[..., Any]:
        def counted(self: Any, commands: Any) -> Any:
            commands = list(commands)
            COMMANDS[0] += len(commands)
            return original(self, commands)

        return counted

    # Async: send_command and pack_commands (pipelines) both pack through pack_command.
    AsyncConnection.pack_command = one(AsyncConnection.pack_command)  # type: ignore[method-assign]
    # Sync: send_command and pack_commands each pack by themselves.
    SyncConnection.send_command = one(SyncConnection.send_command)  # type: ignore[method-assign]
    SyncConnection.pack_commands = many(SyncConnection.pack_commands)  # type: ignore[method-assign]


def enter_server(core: int | None) -> None:
    if core is not None:
        os.sched_setaffinity(0, {core})
    raise_fd_limit(FD_LIMIT)
    count_redis_commands()


async def serve_control(conn: Connection, port: int, streams: Callable[[], dict[str, int]]) -> None:
    """Tell the orchestrator the port, then answer it until "stop": "count" (CPU
    time, Redis commands, streams and channels held) and "stats" (the same, plus
    VmRSS after a full collection)."""
    conn.send({"port": port, "pid": os.getpid(), "loop": loop_name()})
    while True:
        command = await asyncio.to_thread(conn.recv)
        if command == "stop":
            return
        reply: dict[str, float] = {"cpu_s": cpu_seconds(), "commands": COMMANDS[0], **streams()}
        if command == "stats":
            gc.collect()
            reply["rss_kib"] = rss_kib()
        conn.send(reply)


def run_server(core: int | None, serve: Coroutine[Any, Any, None]) -> None:
    """A server process's life: on its core, `serve` on the loop `progress-sse web`
    would pick (`auto`: uvloop when installed)."""
    enter_server(core)
    loop = new_loop("auto")
    with asyncio.Runner(loop_factory=lambda: loop) as runner:
        runner.run(serve)


def serve_progress_sse(conn: Connection, settings: Settings, core: int | None) -> None:
    """progress-sse: the real app, as bench_fanout and `progress-sse web` serve it."""
    run_server(core, _serve_progress_sse(conn, settings))


async def _serve_progress_sse(conn: Connection, settings: Settings) -> None:
    app = create_app(settings)
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0, backlog=4096)
        await site.start()
        freeze_startup()
        hub = app[HUB]
        if not await wait_for(lambda: hub.connections >= 1, 30):
            raise TimeoutError("the hub did not connect to Redis")
        port = runner.addresses[0][1]
        await serve_control(conn, port, lambda: {"streams": hub.watcher_count, "channels": len(hub.subscribed_tasks)})
    finally:
        await runner.cleanup()


def peer_client_name(prefix: str) -> str:
    return f"bench-peer.{prefix}"


def serve_peer(conn: Connection, settings: Settings, core: int | None) -> None:
    """THE PEER (bench-only, not product code): Starlette + sse-starlette under uvicorn
    with httptools and uvloop, and one shared Redis subscription per process."""
    import uvicorn
    from sse_starlette import EventSourceResponse, ServerSentEvent
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    enter_server(core)
    keys = keys_for(settings)
    pool = aioredis.BlockingConnectionPool.from_url(
        settings.redis_url, max_connections=32, decode_responses=True, client_name=peer_client_name(keys.prefix)
    )
    client = aioredis.Redis(connection_pool=pool)

    class Hub:
        """One pub/sub connection for the process; each channel's messages go to the
        queues of the streams that watch it."""

        def __init__(self) -> None:
            self.pubsub = client.pubsub()
            self.queues: dict[str, set[asyncio.Queue[str]]] = {}
            self.pending: dict[str, asyncio.Event] = {}  # SUBSCRIBEs sent, not confirmed yet

        async def run(self) -> None:
            async for message in self.pubsub.listen():
                channel = message["channel"]
                if message["type"] == "message":
                    for queue in self.queues.get(channel, ()):
                        queue.put_nowait(message["data"])
                elif message["type"] == "subscribe" and channel in self.pending:
                    self.pending.pop(channel).set()

        async def watch(self, channel: str) -> asyncio.Queue[str]:
            """A queue of the channel's messages, once Redis confirmed the subscription."""
            queue: asyncio.Queue[str] = asyncio.Queue()
            streams = self.queues.setdefault(channel, set())
            streams.add(queue)
            if len(streams) == 1:
                confirmed = self.pending[channel] = asyncio.Event()
                await self.pubsub.subscribe(channel)
                await confirmed.wait()
            elif channel in self.pending:
                await self.pending[channel].wait()
            return queue

        async def unwatch(self, channel: str, queue: asyncio.Queue[str]) -> None:
            streams = self.queues.get(channel)
            if streams is not None:
                streams.discard(queue)
                if not streams:
                    del self.queues[channel]
                    await self.pubsub.unsubscribe(channel)

    hub = Hub()
    terminal = set(TERMINAL_STATES)

    async def events(request: Request) -> Response:
        task_id = request.path_params["task_id"]
        channel = keys.channel(task_id)
        queue = await hub.watch(channel)  # before the state is read: no event can fall in between
        fields: list[Any] = await client.hmget(keys.state(task_id), ["state", "latest", "epoch", "seq"])
        state, latest, epoch, seq = fields
        if latest is None:
            await hub.unwatch(channel, queue)
            return Response(status_code=404)

        async def stream() -> AsyncIterator[ServerSentEvent]:
            try:
                yield ServerSentEvent(data=latest, event=state, id=f"{epoch}-{seq}")
                last, ended = int(seq), state in terminal
                while not ended:
                    cursor, name, payload = (await queue.get()).split("\n", 2)
                    n = int(cursor.rpartition("-")[2])
                    if n > last:  # not already in the first frame
                        last, ended = n, name in terminal
                        yield ServerSentEvent(data=payload, event=name, id=cursor)
            finally:
                await hub.unwatch(channel, queue)

        return EventSourceResponse(stream(), ping=15, headers={"X-Accel-Buffering": "no"})

    app = Starlette(routes=[Route("/tasks/{task_id}/events", events)])
    config = uvicorn.Config(
        app,
        loop="uvloop",
        http="httptools",
        lifespan="off",
        log_level="warning",
        access_log=False,
        backlog=4096,
        timeout_graceful_shutdown=5,
    )

    async def main() -> None:
        await hub.pubsub.subscribe(f"{keys.root}:bench-peer")  # listen() needs one subscription
        listening = asyncio.create_task(hub.run())
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        server = uvicorn.Server(config)
        serving = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started:
            if serving.done():
                await serving  # raises what stopped it
                raise RuntimeError("uvicorn stopped before it started")
            await asyncio.sleep(0.01)
        await serve_control(
            conn,
            sock.getsockname()[1],
            lambda: {"streams": sum(map(len, hub.queues.values())), "channels": len(hub.queues)},
        )
        server.should_exit = True
        await serving
        listening.cancel()
        await client.aclose()

    with asyncio.Runner(loop_factory=config.get_loop_factory()) as runner:
        runner.run(main())


def serve_polling(conn: Connection, settings: Settings, core: int | None) -> None:
    """The polling baseline: `GET /tasks/<id>` answers the state hash's `latest`, one HGET."""
    run_server(core, _serve_polling(conn, settings))


async def _serve_polling(conn: Connection, settings: Settings) -> None:
    keys = keys_for(settings)
    client = aioredis.Redis(
        connection_pool=aioredis.BlockingConnectionPool.from_url(settings.redis_url, max_connections=32)
    )

    async def task(request: web.Request) -> web.Response:
        latest = await client.hget(keys.state(request.match_info["task_id"]), "latest")
        if latest is None:
            raise web.HTTPNotFound()
        return web.Response(body=latest, content_type="application/json")

    app = web.Application()
    app.router.add_get("/tasks/{task_id}", task)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0, backlog=4096)
        await site.start()
        await serve_control(conn, runner.addresses[0][1], lambda: {"streams": 0, "channels": 0})
    finally:
        await runner.cleanup()
        await client.aclose()


SERVERS: dict[str, Callable[[Connection, Settings, int | None], None]] = {
    PROGRESS_SSE: serve_progress_sse,
    PEER: serve_peer,
    POLLING: serve_polling,
}


# ---------------------------------------------------------------------------- pollers process


@dataclass
class PollResult:
    polls: list[float] = field(default_factory=list)  # when each answer came
    last: int = 0  # the highest `current` shown so far (queued: 0)
    shown: int = 0  # progress events a poll showed (it shows only the latest)
    terminal: bool = False
    in_order: bool = True
    error: str | None = None
    staleness: list[float] = field(default_factory=list)  # one per update, see _poll
    age: list[float] = field(default_factory=list)  # of the progress event a poll showed first


async def _poll(
    session: aiohttp.ClientSession, url: str, cfg: dict[str, Any], r: PollResult, ready: Callable[[], None]
) -> None:
    """One celery-progress watcher: poll, handle the answer, wait `interval`, again.

    The staleness of update k: from its publish to the first answer showing k or a
    later update. An update no answer showed was published 1/rate before the next
    one of its task (the publisher's schedule), so its time comes from the last
    progress event an answer showed (`message` holds its publish time)."""
    interval, gap = cfg["interval"], 1.0 / cfg["rate"] if cfg["rate"] else 0.0
    reference: tuple[int, float] | None = None
    await asyncio.sleep(random.uniform(0, interval))  # pages are not opened in step
    try:
        while True:
            async with session.get(url) as resp:
                if resp.status != 200:
                    r.error = f"HTTP {resp.status}"
                    return
                body = json.loads(await resp.read())
            now = time.time()
            r.polls.append(now)
            if len(r.polls) == 1:
                ready()
            current = int(body.get("current") or 0)
            if current < r.last:
                r.in_order = False
            if body["state"] == State.PROGRESS:
                reference = (current, float(body["message"]))
                if current > r.last:
                    r.shown += 1
                    r.age.append(now - reference[1])
            if current > r.last and reference is not None:
                n, published = reference
                r.staleness += [now - published - (k - n) * gap for k in range(r.last + 1, current + 1)]
            r.last = max(r.last, current)
            if body["state"] == State.SUCCESS:
                r.terminal = True
                return
            await asyncio.sleep(interval)
    except Exception as exc:  # reported, and counted as a failed watcher
        r.error = f"{type(exc).__name__}: {exc}"
    finally:
        if not r.polls:
            ready()


async def _pollers_main(conn: Connection, base: str, task_ids: list[str], count: int, cfg: dict[str, Any]) -> None:
    raise_fd_limit(count + 256)
    results = [PollResult() for _ in range(count)]
    pending = count
    all_ready = asyncio.Event()

    def ready() -> None:
        nonlocal pending
        pending -= 1
        if pending == 0:
            all_ready.set()

    timeout = aiohttp.ClientTimeout(total=cfg["timeout"])
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:
        runs = [
            asyncio.create_task(_poll(session, f"{base}/tasks/{task_ids[i % len(task_ids)]}", cfg, r, ready))
            for i, r in enumerate(results)
        ]
        await settle(all_ready, cfg["timeout"])
        conn.send({"ready": sum(bool(r.polls) for r in results)})
        cpu0 = cpu_seconds()
        _done, not_done = await asyncio.wait(runs, timeout=cfg["deliver_timeout"])
        for run in not_done:
            run.cancel()
        await asyncio.gather(*not_done, return_exceptions=True)
        cpu = cpu_seconds() - cpu0
    errors: dict[str, int] = {}
    for r in results:
        if r.error is None and not r.terminal:
            r.error = "no terminal state before the timeout"
        if r.error:
            errors[r.error] = errors.get(r.error, 0) + 1
    conn.send(
        {
            "polls": sorted(t for r in results for t in r.polls),
            "shown": sum(r.shown for r in results),
            "finals": [r.last for r in results],
            "terminals": sum(r.terminal for r in results),
            "out_of_order": sum(not r.in_order for r in results),
            "errors": errors,
            "staleness": [x for r in results for x in r.staleness],
            "age": sorted(x for r in results for x in r.age),
            "cpu_deliver_s": cpu,
        }
    )


def pollers_process(
    conn: Connection, base: str, task_ids: list[str], count: int, offset: int, cfg: dict[str, Any]
) -> None:
    try:
        asyncio.run(_pollers_main(conn, base, task_ids[offset:] + task_ids[:offset], count, cfg))
    finally:
        conn.close()


# ---------------------------------------------------------------------------- one run of one server


def recv(conn: Connection, seconds: float, what: str) -> Any:
    if not conn.poll(seconds):
        raise TimeoutError(f"timed out after {seconds:.0f}s waiting for {what}")
    return conn.recv()


def ask(conn: Connection, command: str) -> dict[str, float]:
    conn.send(command)
    reply: dict[str, float] = recv(conn, 60, f"the server's answer to {command!r}")
    return reply


def commandstats_calls(admin: redis.Redis) -> int:
    """Every command Redis ran so far, all clients (INFO commandstats)."""
    return sum(int(v["calls"]) for v in admin.info("commandstats").values())


def pubsub_named(admin: redis.Redis, name: str) -> int:
    return len([c for c in admin.client_list(_type="pubsub") if c.get("name") == name])


def sse_verdict(checks: Checks, what: str, result: dict[str, Any], clients: int, events: int) -> None:
    """bench_fanout's rules for its clients' results, for `clients` clients of `events` progress events."""
    short = sum(1 for n in result["progress"] if n != events)
    checks.check(
        result["snapshots"] == clients, f"{what}: {clients - result['snapshots']} clients had no snapshot first"
    )
    checks.check(short == 0, f"{what}: {short} clients did not get exactly {events} progress events")
    checks.check(result["terminals"] == clients, f"{what}: {clients - result['terminals']} clients had no terminal")
    checks.check(result["out_of_order"] == 0, f"{what}: {result['out_of_order']} clients saw ids that did not increase")
    checks.check(not result["errors"], f"{what}: client errors: {result['errors']}")


class Run:
    """One server, one scenario, one run: its processes, its keys, its figures and checks."""

    def __init__(self, kind: str, sc: Scenario, args: argparse.Namespace, label: str) -> None:
        self.kind, self.sc, self.args, self.label = kind, sc, args, label
        prefix = f"bench-{uuid.uuid4().hex[:10]}"
        self.settings = Settings(
            redis_url=args.redis_url, broker_url=args.redis_url, key_prefix=prefix, queue=prefix, host="127.0.0.1"
        )
        self.ctx = mp.get_context("spawn")
        self.procs: list[Any] = []
        self.checks = Checks()
        self.m: dict[str, float] = {}
        self.notes: list[str] = []
        self.server: Connection | None = None

    def spawn(self, target: Callable[..., None], *args: Any) -> Connection:
        parent, child = self.ctx.Pipe()
        proc = self.ctx.Process(target=target, args=(child, *args), daemon=True)
        proc.start()
        child.close()  # a child that dies shows up as EOF
        self.procs.append(proc)
        return parent

    def execute(self) -> None:
        prefix = self.settings.key_prefix
        admin = redis.Redis.from_url(self.args.redis_url)
        try:
            self._execute(admin)
        except Exception as exc:
            self.checks.check(False, f"{type(exc).__name__}: {exc}")
        finally:
            if self.server is not None:
                try:
                    self.server.send("stop")
                except OSError:
                    pass
            for proc in self.procs:
                proc.join(10)
                if proc.is_alive():
                    proc.terminate()
                    proc.join(5)
            delete_keys(self.args.redis_url, prefix)
            admin.close()

    def _execute(self, admin: redis.Redis) -> None:
        sc, args, url, prefix = self.sc, self.args, self.args.redis_url, self.settings.key_prefix
        task_ids = queue_tasks(url, prefix, sc.tasks) if sc.clients else []
        idle_ids = queue_tasks(url, prefix, sc.idle_tasks) if sc.idle else []
        publisher = Publisher.from_settings(self.settings)
        try:
            warm_task = queue_tasks(url, prefix, 1)[0]
            publisher.publish(make_event(warm_task, "bench.warmup", State.SUCCESS, current=1, total=1))

            server = self.server = self.spawn(SERVERS[self.kind], self.settings, args.server_core)
            hello = recv(server, args.timeout, "the server to start")
            base = f"http://127.0.0.1:{hello['port']}"
            self.notes.append(f"loop {hello['loop']}")
            if self.kind == POLLING:
                for _ in range(50):
                    with urllib.request.urlopen(f"{base}/tasks/{warm_task}", timeout=10) as resp:
                        resp.read()
            else:
                warm_up(base, warm_task, 50)
            if not wait_for_streams(server, 0, 5):
                self.checks.check(False, "the warm-up streams were not released")
            rss0 = ask(server, "stats")["rss_kib"]
            pubsub_name = {PROGRESS_SSE: hub_client_name(prefix), PEER: peer_client_name(prefix)}.get(self.kind)

            sse_cfg = {"timeout": args.timeout, "connect_concurrency": args.connect_concurrency, "partitions": 1}
            idle_conn: Connection | None = None
            if sc.idle:
                # bench_fanout's clients; they end when their task does, after the load.
                idle_cfg = {**sse_cfg, "deliver_timeout": 3600.0}
                idle_conn = self.spawn(clients_process, base, idle_ids, sc.idle, 0, idle_cfg)
                ready = recv(idle_conn, args.timeout + 30, "the idle streams to open")["ready"]
                self.checks.check(ready == sc.idle, f"only {ready} of {sc.idle} idle streams got their snapshot")
                time.sleep(args.settle)
                stats = ask(server, "stats")
                self.checks.check(
                    stats["streams"] == sc.idle, f"the server holds {stats['streams']} streams, not {sc.idle}"
                )
                self.m["kib_per_idle"] = (stats["rss_kib"] - rss0) / sc.idle
                self.m["rss0_mib"] = rss0 / 1024
                if not sc.clients and pubsub_name:
                    self.m["pubsub"] = pubsub_named(admin, pubsub_name)

            if sc.clients:
                self._load(server, admin, base, task_ids, sse_cfg, pubsub_name)

            if idle_conn is not None:
                for task_id in idle_ids:
                    publisher.publish(make_event(task_id, "bench.idle", State.SUCCESS, current=0, total=0))
                idle = recv(idle_conn, args.timeout + 30, "the idle streams to end")
                sse_verdict(self.checks, "idle streams", idle, sc.idle, 0)
        finally:
            publisher.client.close()
        if pubsub_name:
            self.checks.check(
                self.m.get("pubsub") == 1, f"{self.m.get('pubsub')} pub/sub connections named {pubsub_name}, not 1"
            )
        released = wait_for_streams(server, 0, 10)
        self.checks.check(released, "streams or subscriptions were left after every stream ended")

    def _load(
        self,
        server: Connection,
        admin: redis.Redis,
        base: str,
        task_ids: list[str],
        sse_cfg: dict[str, Any],
        pubsub_name: str | None,
    ) -> None:
        """The active clients and the publisher: latency or staleness, CPU, Redis commands."""
        sc, args = self.sc, self.args
        expected_s = sc.events / sc.rate if sc.rate else sc.clients * sc.events / 5000
        cfg = {**sse_cfg, "deliver_timeout": args.timeout + expected_s, "interval": args.poll_interval, "rate": sc.rate}
        polling = self.kind == POLLING
        clients = self.spawn(pollers_process if polling else clients_process, base, task_ids, sc.clients, 0, cfg)
        pub = self.spawn(publisher_process, args.redis_url, self.settings.key_prefix, task_ids, sc.events, sc.rate)
        ready = recv(clients, args.timeout + 30, "the clients to connect")["ready"]
        self.checks.check(ready == sc.clients, f"only {ready} of {sc.clients} clients got their first answer")
        if pubsub_name:
            self.m["pubsub"] = pubsub_named(admin, pubsub_name)
        recv(pub, 30, "the publisher to start")
        before = ask(server, "count")
        calls0, t0, wall0 = commandstats_calls(admin), time.monotonic(), time.time()
        pub.send("go")
        result = recv(clients, cfg["deliver_timeout"] + 30, "the clients' results")
        after = ask(server, "count")
        calls1, window, wall1 = commandstats_calls(admin), time.monotonic() - t0, time.time()
        published = recv(pub, 30, "the publisher's report")
        self.checks.check(published["refused"] == 0, f"{published['refused']} events were refused by the store")

        cpu = after["cpu_s"] - before["cpu_s"]
        self.m["cpu_share"] = cpu / window
        self.m["commands_s"] = (after["commands"] - before["commands"]) / window
        self.m["redis_calls_s"] = (calls1 - calls0) / window
        self.m["clients_cpu_share"] = result["cpu_deliver_s"] / window
        if polling:
            finals = result["finals"]
            checks = self.checks
            checks.check(
                result["terminals"] == sc.clients, f"{sc.clients - result['terminals']} pollers saw no terminal"
            )
            checks.check(all(f == sc.events for f in finals), f"pollers whose last current was not {sc.events}")
            checks.check(result["out_of_order"] == 0, f"{result['out_of_order']} pollers saw current go down")
            checks.check(not result["errors"], f"poller errors: {result['errors']}")
            stale = sorted(result["staleness"])
            polls = sum(1 for t in result["polls"] if wall0 <= t <= wall1)
            self.m["seen_pct"] = 100 * result["shown"] / (sc.clients * sc.events)
            self.m["measured_pct"] = 100 * len(stale) / (sc.clients * sc.events)
            self.m["polls_s"] = polls / window
            self.m["cpu_us_per_poll"] = cpu / max(1, polls) * 1e6
            if result["age"]:
                self.m["age_p50_ms"] = statistics.median(result["age"]) * 1000
        else:
            sse_verdict(self.checks, "clients", result, sc.clients, sc.events)
            stale = sorted(result["latencies"])
            frames = sum(result["progress"]) + result["terminals"]
            span = max(1e-9, result["last_receipt"] - published["start"])
            self.m["frames_s"] = frames / span
            self.m["cpu_us_per_frame"] = cpu / max(1, frames) * 1e6
            self.m["seen_pct"] = 100 * sum(result["progress"]) / (sc.clients * sc.events)
        if stale:
            self.m["p50_ms"] = statistics.median(stale) * 1000
            self.m["p99_ms"] = percentile(stale, 99) * 1000

    def line(self) -> str:
        m = self.m
        parts = [f"{self.label} {LABELS[self.kind] + ':':<22}", *self.notes]
        if "frames_s" in m:
            parts.append(f"{m['frames_s']:,.0f} frames/s, {m['cpu_us_per_frame']:.1f} us CPU/frame")
        if "polls_s" in m:
            parts.append(
                f"{m['polls_s']:,.0f} polls/s, {m['cpu_us_per_poll']:.1f} us CPU/poll; polls showed "
                f"{m['seen_pct']:.0f}% of the updates (age when shown p50 {m.get('age_p50_ms', 0):.0f} ms); "
                f"staleness of {m['measured_pct']:.0f}% of the updates"
            )
        if "p50_ms" in m:
            parts.append(f"p50 {m['p50_ms']:.1f} ms, p99 {m['p99_ms']:.1f} ms")
        if "cpu_share" in m:
            parts.append(f"server {m['cpu_share']:.0%} / clients {m['clients_cpu_share']:.0%} of a core")
            parts.append(f"Redis cmds/s: server {m['commands_s']:,.0f}, all {m['redis_calls_s']:,.0f}")
        if "kib_per_idle" in m:
            parts.append(f"{m['kib_per_idle']:.1f} KiB per idle stream (RSS0 {m['rss0_mib']:.1f} MiB)")
        if "pubsub" in m:
            parts.append(f"pub/sub {m['pubsub']:.0f}")
        return f"{parts[0]} " + "; ".join([*parts[1:], "OK" if not self.checks.failures else "FAILED"])


def wait_for_streams(server: Connection, count: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while True:
        stats = ask(server, "count")
        if stats["streams"] == count and stats["channels"] == 0:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)


# ---------------------------------------------------------------------------- the machine, the table

# (scenario, metric key, what it is); ratios are progress-sse / peer and progress-sse / polling.
ROWS = [
    ("steady", "cpu_us_per_frame", "server CPU per frame, us"),
    ("steady", "p50_ms", "latency p50, ms"),
    ("steady", "p99_ms", "latency p99, ms"),
    ("steady", "frames_s", "frames/s delivered"),
    ("steady", "cpu_share", "server CPU, share of its core"),
    ("idle", "kib_per_idle", "memory per idle stream, KiB"),
    ("idle", "p50_ms", "latency p50 with the idle streams, ms"),
    ("idle", "p99_ms", "latency p99 with the idle streams, ms"),
    ("idle", "cpu_us_per_frame", "server CPU per frame, us"),
    ("idle", "cpu_share", "server CPU, share of its core"),
    ("memory", "kib_per_idle", "memory per idle stream, KiB"),
    ("burst", "frames_s", "frames/s delivered (burst)"),
    ("burst", "cpu_us_per_frame", "server CPU per frame, us"),
    ("burst", "p99_ms", "latency p99 (queueing), ms"),
    ("polling", "p50_ms", "staleness p50, ms"),
    ("polling", "p99_ms", "staleness p99, ms"),
    ("polling", "seen_pct", "updates shown, %"),
    ("polling", "commands_s", "the server's Redis commands/s"),
    ("polling", "redis_calls_s", "Redis commands/s, all clients (commandstats)"),
    ("polling", "cpu_share", "server CPU, share of its core"),
]


def machine(admin: redis.Redis, args: argparse.Namespace, load: set[int]) -> list[str]:
    model = "?"
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    versions = []
    for dist in ("aiohttp", "redis", "hiredis", "uvloop", "starlette", "sse-starlette", "uvicorn", "httptools"):
        try:
            versions.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{dist} (not installed)")
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=False,
            cwd=Path(__file__).parent,
        ).stdout.strip()
    except OSError:
        commit = "?"
    server = admin.info("server")
    pinning = f"this run's {sorted(load | {args.server_core})}" if args.server_core is not None else "no pinning"
    return [
        f"CPU: {model}; {os.cpu_count()} logical CPUs ({pinning})",
        f"Cores: server under test on {args.server_core}; orchestrator, clients, publisher"
        f"{', Redis' if args.pinned_redis else ''} on {sorted(load)}",
        f"Python {platform.python_version()} on {platform.system()} {platform.release()}; " + ", ".join(versions),
        f"Redis {server['redis_version']} at {args.redis_url}; code {commit or '?'}",
    ]


def fmt(values: list[float]) -> str:
    if not values:
        return "-"
    med = statistics.median(values)
    digits = 0 if med >= 100 else 1 if med >= 10 else 2
    text = f"{med:,.{digits}f}"
    if len(values) > 1:
        text += f" ({min(values):,.{digits}f}-{max(values):,.{digits}f})"
    return text


def ratio(a: list[float], b: list[float]) -> str:
    if not a or not b:
        return "-"
    denominator = statistics.median(b)
    if not denominator:
        return "-"
    value = statistics.median(a) / denominator
    return f"{value:.2f}" if value >= 0.1 else f"{value:.2g}"


def table(results: dict[tuple[str, str], list[dict[str, float]]]) -> list[str]:
    def values(scenario: str, kind: str, key: str) -> list[float]:
        return [m[key] for m in results.get((scenario, kind), []) if key in m]

    rows = [("scenario", "metric", LABELS[PROGRESS_SSE], LABELS[PEER], LABELS[POLLING], "ps/peer", "ps/poll")]
    for scenario, key, what in ROWS:
        ps, peer, poll = (values(scenario, kind, key) for kind in (PROGRESS_SSE, PEER, POLLING))
        if ps or peer or poll:
            rows.append((scenario, what, fmt(ps), fmt(peer), fmt(poll), ratio(ps, peer), ratio(ps, poll)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        " | ".join(
            cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    ]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return lines


# ---------------------------------------------------------------------------- main


def pin_redis(admin: redis.Redis, cores: set[int]) -> Callable[[], None] | None:
    """Put Redis on the load cores, when it is a process of this machine; returns the undo."""
    pid = int(admin.info("server")["process_id"])
    try:
        if not Path(f"/proc/{pid}/comm").read_text().startswith("redis"):
            return None
        before = os.sched_getaffinity(pid)
        os.sched_setaffinity(pid, cores)
    except OSError as exc:
        print(f"Redis (pid {pid}) not pinned: {exc}")
        return None

    def undo() -> None:
        try:
            os.sched_setaffinity(pid, before)
        except OSError:
            pass

    return undo


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    raise_fd_limit(FD_LIMIT)
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        print(f"Only CPU {cores} is available: nothing is pinned, the server shares it with the load.")
        args.server_core = None
    elif args.server_core is None:
        args.server_core = cores[-1]
    elif args.server_core not in cores:
        print(f"--server-core {args.server_core} is not one of {cores}")
        return 2
    load = set(cores) - {args.server_core} if args.server_core is not None else set(cores)
    os.sched_setaffinity(0, load)  # the children inherit it; a server process moves itself
    admin = redis.Redis.from_url(args.redis_url)
    admin.ping()
    undo = None if args.no_pin_redis or args.server_core is None else pin_redis(admin, load)
    args.pinned_redis = undo is not None
    started = time.monotonic()
    results: dict[tuple[str, str], list[dict[str, float]]] = {}
    failures: list[str] = []
    try:
        for sc in scenarios(args):
            offered = (
                f"{sc.clients} clients over {sc.tasks} tasks, {sc.events} events per task at "
                + (f"{sc.rate:g}/s per task" if sc.rate else "full speed")
                if sc.clients
                else "no load"
            )
            print(
                f"== {sc.name}: {offered}"
                + (f", {sc.idle} idle streams over {sc.idle_tasks} tasks" if sc.idle else ""),
                flush=True,
            )
            for n in range(args.runs):
                servers = sc.servers[n % len(sc.servers) :] + sc.servers[: n % len(sc.servers)]  # order rotates
                for kind in servers:
                    run = Run(kind, sc, args, f"run {n + 1}/{args.runs}")
                    run.execute()
                    print(f"  {run.line()}", flush=True)
                    for failure in run.checks.failures:
                        print(f"    FAIL: {failure}", flush=True)
                        failures.append(f"{sc.name} {run.label} {kind}: {failure}")
                    results.setdefault((sc.name, kind), []).append(run.m)
        print()
        print(f"Machine and set-up ({time.monotonic() - started:.0f} s in all):")
        for line in machine(admin, args, load):
            print(f"  {line}")
        print(f"Median of {args.runs} run(s) (min-max); ratio = progress-sse / other (frames/s: higher is better;")
        print("updates shown: more is better; the rest: lower is better)")
        for line in table(results):
            print(f"  {line}")
    finally:
        if undo is not None:
            undo()
        admin.close()
    for failure in failures:
        print(f"FAIL: {failure}")
    print("OK" if not failures else "FAILED")
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
