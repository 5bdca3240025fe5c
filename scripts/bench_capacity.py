"""Benchmark what one Redis shard takes: events stored per second by the write
script, on one Redis or on a Redis Cluster of three masters.

How it runs:

* **Redis**: a redis-server of its own on a free port, without persistence
  (`--shards 1`), or a local cluster of three masters with a replica each
  (`--shards 3`, tests/redis_servers.py `LocalCluster`; Redis 7 on the PATH).
* **writers**: W processes, each a `Publisher` (the worker's writer: one Lua
  script call, one round trip, per event) storing `progress` events for its own
  T tasks in turn, as fast as Redis answers, for S seconds.

It reports events stored per second, the round trip's median and p99, and for
each master the events it stored (its script calls, from INFO commandstats) and
its CPU time per event (from /proc), which gives the ceiling of one master core:
1 s over that time. On the cluster, tasks spread over the partitions, so each
master stores a share of the events.

Run: .venv/bin/python scripts/bench_capacity.py [--shards 3] [--help]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import redis

# The local cluster is the test suite's (one way to make one, not two).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.redis_servers import LocalCluster, redis7_server, wait_for

from progress_sse.cli.embedded import answers, free_port
from progress_sse.config import Settings
from progress_sse.events import State, make_event
from progress_sse.worker.publisher import Publisher


def writer(url: str, prefix: str, tasks: int, seconds: float, one: bool, out: mp.Queue) -> None:  # type: ignore[type-arg]
    publisher = Publisher.from_settings(Settings(redis_url=url, broker_url="redis://unused:6379/0", key_prefix=prefix))
    ids: list[str] = []
    while len(ids) < tasks:  # with `one`, only tasks of partition 0
        task_id = str(uuid.uuid4())
        if not one or publisher.keys.partition_of(task_id) == 0:
            ids.append(task_id)
    for task_id in ids:
        publisher.publish(make_event(task_id, "bench.capacity", State.STARTED))
    times: list[float] = []
    count, deadline = 0, time.monotonic() + seconds
    while time.monotonic() < deadline:
        task_id = ids[count % tasks]
        start = time.perf_counter()
        publisher.publish(make_event(task_id, "bench.capacity", State.PROGRESS, current=count, total=10**9))
        times.append(time.perf_counter() - start)
        count += 1
    out.put((count, times))


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def script_calls(port: int) -> tuple[int, float]:
    """Scripts the Redis on `port` ran since its stats were reset (one per event
    stored), and the microseconds it spent running them (its own count: the
    script alone, without reading the request or writing the reply)."""
    with redis.Redis(port=port, decode_responses=True) as node:
        stats = node.info("commandstats")
    found = [stats.get(f"cmdstat_{name}", {}) for name in ("eval", "evalsha")]
    return sum(int(s.get("calls", 0)) for s in found), sum(float(s.get("usec", 0)) for s in found)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, choices=(1, 3), default=1, help="one Redis, or a cluster of 3 masters")
    parser.add_argument("-W", "--writers", type=int, default=4, help="writer processes (default: 4)")
    parser.add_argument("-T", "--tasks", type=int, default=50, help="tasks per writer (default: 50)")
    parser.add_argument("-S", "--seconds", type=float, default=5.0, help="how long each writer writes (default: 5)")
    parser.add_argument(
        "--one-partition", action="store_true", help="on the cluster, tasks of one partition only: one busy master"
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as directory:
        processes: dict[int, subprocess.Popen[bytes]] = {}
        cluster: LocalCluster | None = None
        if args.shards == 1:
            port = free_port()
            server = subprocess.Popen(
                [redis7_server(), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                stdout=subprocess.DEVNULL,
            )
            processes[port] = server
            wait_for(lambda: answers("127.0.0.1", port), 20, "redis-server", server)
            url = f"redis://127.0.0.1:{port}/0"
        else:
            cluster = LocalCluster(Path(directory) / "cluster")
            cluster.start()
            processes = cluster.processes
            url = cluster.url
        try:
            masters = [p for p in processes if cluster is None or cluster.is_master(p)]
            for port in masters:
                with redis.Redis(port=port) as node:
                    node.config_resetstat()
            before = {p: cpu_seconds(processes[p].pid) for p in masters}
            out: mp.Queue = mp.get_context("spawn").Queue()  # type: ignore[type-arg]
            prefix = f"bench-capacity-{uuid.uuid4().hex[:6]}"
            ctx = mp.get_context("spawn")
            workers = [
                ctx.Process(target=writer, args=(url, prefix, args.tasks, args.seconds, args.one_partition, out))
                for _ in range(args.writers)
            ]
            started = time.monotonic()
            for process in workers:
                process.start()
            results = [out.get(timeout=args.seconds + 60) for _ in workers]
            for process in workers:
                process.join()
            elapsed = time.monotonic() - started
            used = {p: cpu_seconds(processes[p].pid) - before[p] for p in masters}
            calls = {p: script_calls(p) for p in masters}
            stored = {p: calls[p][0] for p in masters}
        finally:
            if cluster is not None:
                cluster.stop()
            else:
                for process in processes.values():
                    process.kill()
                    process.wait()

    events = sum(count for count, _ in results)
    times = sorted(t for _, ts in results for t in ts)
    rate = events / args.seconds
    print(f"shards={args.shards} writers={args.writers} tasks/writer={args.tasks} seconds={args.seconds:g}")
    print(f"  events stored: {events} in {args.seconds:g} s -> {rate:,.0f} events/s (wall {elapsed:.1f} s)")
    print(
        f"  round trip: median {statistics.median(times) * 1e6:.0f} us, "
        f"p99 {times[int(len(times) * 0.99)] * 1e6:.0f} us"
    )
    for port, seconds in sorted(used.items(), key=lambda item: -item[1]):
        per_event = seconds / stored[port] * 1e6 if stored[port] else 0.0
        ceiling = f", one core's ceiling {1e6 / per_event:,.0f} events/s" if per_event else ""
        in_script = calls[port][1] / stored[port] if stored[port] else 0.0
        print(
            f"  master :{port}: {stored[port]} events, {seconds:.2f} s CPU, {per_event:.1f} us per event "
            f"({in_script:.1f} us in the script){ceiling}"
        )
    total = sum(used.values())
    ceilings = sum(stored[p] / used[p] for p in masters if used[p] and stored[p])
    print(
        f"  all masters: {total / events * 1e6:.1f} us of CPU per event; "
        f"with a core each, {ceilings:,.0f} events/s in all"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
