"""Benchmark the worker side: the in-task progress API and one publish round trip.

What it measures, against a real Redis (database 14 by default, a random key prefix,
and only keys under that prefix are deleted at the end):

1. `set_progress(i, n, message, task_id=...)` called `--calls` times (default
   1,000,000) in a tight loop, with a real `Publisher` and `Coalescer`
   (`--max-rate`, default 20/s) installed exactly as the Celery bridge installs
   them. Reported: ns per call (and, for reference, the same loop with an empty
   function), how many `progress` events were actually stored in the task's log,
   and how many the rate allows (`loop_seconds * max_rate`, plus the final flush).
2. `Publisher.publish()` round trip for a progress event (the Lua append+publish
   script): median, p99 and max over `--publishes` calls (default 5,000) after a
   short warm-up, timed one by one with `time.perf_counter_ns()`; and, for scale,
   the median PING round trip on the same connection (the floor any command pays).

Correctness checks (exit status 1 if one fails): the number of stored progress
events stays within the rate bound, and the last stored event carries the last
value the loop reported (the flush before a terminal event works).

Run: .venv/bin/python scripts/bench_progress.py [--help]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import uuid
from collections.abc import Callable

import redis

from progress_sse.config import Settings
from progress_sse.events import State, make_event
from progress_sse.keys import Keys
from progress_sse.worker import progress
from progress_sse.worker.outbox import Outbox
from progress_sse.worker.progress import Coalescer, set_progress
from progress_sse.worker.publisher import Publisher


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/14", help="Redis to use (default: %(default)s)")
    parser.add_argument(
        "--calls", type=int, default=1_000_000, help="set_progress calls in the loop (default: %(default)s)"
    )
    parser.add_argument(
        "--max-rate", type=float, default=20.0, help="coalescer publishes/s per task (default: %(default)s)"
    )
    parser.add_argument(
        "--publishes", type=int, default=5_000, help="timed Publisher.publish calls (default: %(default)s)"
    )
    parser.add_argument("--warmup", type=int, default=200, help="untimed publishes first (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.calls < 1 or args.publishes < 1 or args.warmup < 0 or args.max_rate <= 0:
        parser.error("calls and publishes must be >= 1, warmup >= 0, max-rate > 0")
    return args


def _noop(
    current: float, total: float | None = None, message: str | None = None, *, task_id: str | None = None
) -> None:
    return None


def time_loop(fn: Callable[..., None], calls: int, task_id: str) -> float:
    """Seconds for `calls` calls of `fn(i, calls, message, task_id=...)`."""
    message = "Processing"
    start = time.perf_counter()
    for i in range(calls):
        fn(i, calls, message, task_id=task_id)
    return time.perf_counter() - start


def percentile(sorted_values: list[int], q: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    index = max(0, math.ceil(q / 100 * len(sorted_values)) - 1)
    return float(sorted_values[index])


def bench_set_progress(args: argparse.Namespace, settings: Settings, publisher: Publisher) -> bool:
    keys = Keys(settings.key_prefix)
    coalescer = Coalescer(publisher, max_rate=args.max_rate, outbox=Outbox())
    progress.configure(coalescer)
    task_id = str(uuid.uuid4())
    publisher.publish(make_event(task_id, "bench.loop", State.QUEUED))
    try:
        empty_s = time_loop(_noop, args.calls, task_id)
        loop_s = time_loop(set_progress, args.calls, task_id)
        flushed = coalescer.flush(task_id)  # what the bridge does before the terminal event
    finally:
        progress.configure(None)

    entries = publisher.client.xrange(keys.log(task_id))
    stored = [json.loads(fields[b"d"]) for _, fields in entries if fields[b"s"] == b"progress"]
    allowed = math.floor(loop_s * args.max_rate) + 2  # one per interval, the first at once, and the flush
    last_ok = bool(stored) and stored[-1]["current"] == args.calls - 1 and flushed is not None
    count_ok = 1 <= len(stored) <= allowed

    per_call = loop_s / args.calls * 1e9
    per_empty = empty_s / args.calls * 1e9
    print(f"set_progress x {args.calls:,} (max_rate {args.max_rate:g}/s, real Publisher + Coalescer, one task)")
    print(f"  loop time          {loop_s:8.3f} s")
    print(
        f"  per call           {per_call:8.0f} ns   "
        f"(empty-function loop: {per_empty:.0f} ns; API alone ~{per_call - per_empty:.0f} ns)"
    )
    print(
        f"  progress stored    {len(stored):8d}     "
        f"(expected ~{loop_s * args.max_rate + 1:.0f} = {loop_s:.2f} s x {args.max_rate:g}/s + the flush; "
        f"at most {allowed})"
    )
    print(f"  last stored value  {stored[-1]['current'] if stored else None!s:>8}     (expected {args.calls - 1})")
    if not count_ok:
        print(f"FAIL: {len(stored)} progress events stored, the rate allows at most {allowed}")
    if not last_ok:
        print("FAIL: the last reported value was not stored by the flush")
    return count_ok and last_ok


def bench_publish(args: argparse.Namespace, publisher: Publisher) -> None:
    task_id = str(uuid.uuid4())
    publisher.publish(make_event(task_id, "bench.publish", State.QUEUED))
    total = args.warmup + args.publishes
    samples: list[int] = []
    clock = time.perf_counter_ns
    wall = time.perf_counter()
    for i in range(total):
        event = make_event(task_id, "bench.publish", State.PROGRESS, current=i, total=total, message="Processing")
        start = clock()
        publisher.publish(event)
        if i >= args.warmup:
            samples.append(clock() - start)
    wall = time.perf_counter() - wall
    samples.sort()
    median_us = statistics.median(samples) / 1000
    pings: list[int] = []
    for _ in range(min(args.publishes, 2_000)):
        start = clock()
        publisher.client.ping()
        pings.append(clock() - start)
    print(f"Publisher.publish round trip x {args.publishes:,} (Lua XADD+HSET+EXPIRE+PUBLISH, no subscribers)")
    print(
        f"  median {median_us:6.1f} us   p99 {percentile(samples, 99) / 1000:6.1f} us   "
        f"max {samples[-1] / 1000:7.1f} us   ({total / wall:,.0f} publishes/s incl. make_event)"
    )
    print(f"  for scale: PING round trip on the same client, median {statistics.median(pings) / 1000:.1f} us")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    prefix = f"bench-{uuid.uuid4().hex[:10]}"
    settings = Settings(redis_url=args.redis_url, key_prefix=prefix, max_rate=args.max_rate)
    publisher = Publisher.from_settings(settings)
    print(f"Redis {args.redis_url}, key prefix {prefix!r}, Python {sys.version.split()[0]}")
    try:
        ok = bench_set_progress(args, settings, publisher)
        bench_publish(args, publisher)
    finally:
        cleanup(args.redis_url, prefix)
        publisher.client.close()
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


def cleanup(url: str, prefix: str) -> None:
    """Delete the keys this run made (its prefix only; never FLUSHDB)."""
    client = redis.Redis.from_url(url)
    try:
        doomed = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        for start in range(0, len(doomed), 500):
            client.delete(*doomed[start : start + 500])
    finally:
        client.close()


if __name__ == "__main__":
    sys.exit(main())
