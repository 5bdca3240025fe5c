"""The web process's Prometheus metrics, and `GET /metrics`, which serves them.

docs/protocol.md ("Metrics") says what each one means. They are counted where the
thing happens, each with a line or two: streams in web/delivery.py, the hub in
web/hub.py, Redis reads in web/store.py, lost tasks in web/reaper.py, responses
here (`count_response`, as each response is prepared: a stream when it begins).

The hot path stays cheap: the hub's straight writes are counted once per flush
(every stream written to in one turn of the event loop), a stream's own writes
once per write, never per frame per stream; open streams and subscriptions are
gauges moved as they open and close, not read at scrape time.

Several processes on one port (`progress-sse web --workers N`) each count their
own. With PROMETHEUS_MULTIPROC_DIR set (cli/serve.py sets it for its processes)
prometheus-client keeps every process's values in files there, and a scrape of
any process reports the sum over all of them (gauges: over the live ones).

It imports no other module of the web: every one of them imports it.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess
from prometheus_client.core import CounterMetricFamily

from ..connections import REDIS_ERRORS
from ..events import CURSOR_UNKNOWN, FEED_TRIMMED, HISTORY_LOST, State

log = logging.getLogger(__name__)

# Read when prometheus-client is imported, as prometheus-client itself does: set,
# every value lives in a file of this process's there.
MULTIPROCESS_DIR = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None
# The text format every Prometheus reads (these names need none of 1.0.0's escaping,
# so `generate_latest` writes them the same in both).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
RESET_REASONS = (HISTORY_LOST, CURSOR_UNKNOWN, FEED_TRIMMED)
LOST_REASONS = ("worker_gone", "message_gone")
CHANNELS = ("task", "feed")
# Redis reads take well under a millisecond on a near Redis; the tail is what matters.
READ_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

STREAMS_OPEN = Gauge(
    "progress_sse_streams_open",
    "Streams open now: past their checks, subscribed or being served.",
    multiprocess_mode="livesum",
)
STREAM_FRAMES = Counter(
    "progress_sse_stream_frames",
    "SSE frames written to streams: task events, group aggregates, reset, unknown-task and notice frames (not pings).",
)
STREAM_BYTES = Counter(
    "progress_sse_stream_bytes",
    "Bytes of stream bodies handed to client sockets: frames and pings, in HTTP/1.1 chunked framing.",
)
STREAM_RESYNCS = Counter(
    "progress_sse_stream_resyncs",
    "Reads of a stream's logs to catch up: after a resync signal, or a live frame of a history it has no place in.",
)
STREAM_RESETS = Counter("progress_sse_stream_resets", "Reset frames sent to streams, by reason.", ["reason"])
STREAMS_STALLED = Counter(
    "progress_sse_streams_stalled", "Clients disconnected for accepting no bytes for the write timeout."
)
HUB_CONNECTS = Counter(
    "progress_sse_hub_connects",
    "Connects of the hub's subscriber connection, the first included (one per partition): more are reconnects.",
)
HUB_SUBSCRIPTIONS = Gauge(
    "progress_sse_hub_subscriptions",
    "Channels the hub subscribes now for its streams: one per watched task, one per partition's feed.",
    multiprocess_mode="livesum",
)
HUB_EVENTS = Counter(
    "progress_sse_hub_events_received",
    "Events the hub received on the channels its streams watch (not every event stored), by state and channel.",
    ["state", "channel"],
)
REDIS_READS = Histogram(
    "progress_sse_redis_read_seconds",
    "Seconds a stream's read transaction took (one per partition: a stream's start, a catch-up), queueing included.",
    buckets=READ_BUCKETS,
)
TASKS_LOST = Counter("progress_sse_tasks_lost", "Tasks this process's reaper stored as lost, by reason.", ["reason"])
HTTP_RESPONSES = Counter(
    "progress_sse_http_responses",
    "HTTP responses by route name and status; a stream counts when it begins.",
    ["route", "status"],
)

# Made now, so every series is there from the first scrape, at 0, and the hub's
# per-message count is one dict lookup. A state that is none of ours is "other".
_RECEIVED = {(state, channel): HUB_EVENTS.labels(state, channel) for state in [*State, "other"] for channel in CHANNELS}
for _reason in RESET_REASONS:
    STREAM_RESETS.labels(_reason)
for _reason in LOST_REASONS:
    TASKS_LOST.labels(_reason)

# What starts a reset frame (events.reset_frame: compact JSON, the reason first).
_RESET = b'event: reset\ndata: {"reason":"'


def written(data: bytes, piece: int) -> None:
    """A stream's own write (web/delivery.py Live.write): `data`, which aiohttp sends
    as HTTP/1.1 chunks of at most `piece` bytes. Its frames are its `data:` lines
    (a frame's data is one line of JSON; a ping is a comment)."""
    whole, rest = divmod(len(data), piece)
    STREAM_BYTES.inc(len(data) + whole * _framing(piece) + (_framing(rest) if rest else 0))
    frames = data.count(b"\ndata: ") + data.startswith(b"data: ")
    if frames:
        STREAM_FRAMES.inc(frames)
    if _RESET in data:
        _count_resets(data)


def flushed(frames: int, size: int) -> None:
    """The hub's straight writes of one turn of the event loop (web/hub.py `_Flush`):
    `frames` frames, `size` bytes, chunk framing included."""
    if frames:
        STREAM_FRAMES.inc(frames)
        STREAM_BYTES.inc(size)


def received(state: str, feed: bool) -> None:
    """A message the hub dispatched: a task's event, or a feed entry."""
    channel = "feed" if feed else "task"
    found = _RECEIVED.get((state, channel)) or _RECEIVED[("other", channel)]
    found.inc()


def _framing(size: int) -> int:
    return len(b"%x" % size) + 4  # b"<size in hex>\r\n" ... b"\r\n"


def _count_resets(data: bytes) -> None:
    at = data.find(_RESET)
    while at >= 0:
        start = at + len(_RESET)
        reason = data[start : data.find(b'"', start)].decode(errors="replace")
        STREAM_RESETS.labels(reason if reason in RESET_REASONS else "other").inc()
        at = data.find(_RESET, start)


async def count_response(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: every response, as its headers go (a stream's when it begins)."""
    HTTP_RESPONSES.labels(request.match_info.route.name or "none", str(response.status)).inc()


def bears_token(request: web.Request, token: str | None) -> bool:
    """Whether the request's `Authorization: Bearer` is `token` (a scraper's,
    PROGRESS_SSE_METRICS_TOKEN), compared in constant time."""
    if token is None:
        return False
    scheme, _, value = request.headers.get("Authorization", "").strip().partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), token.encode())


def endpoint(
    token: str | None,
    authorize: Callable[[web.Request], object],
    stored: Callable[[web.Request], Awaitable[dict[str, int]]],
) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """`GET /metrics`: for a request that bears `token`, else one `authorize` lets
    through (it raises 401 or 403 otherwise; app.py: the operator scope). `stored`
    reads the events stored by state from Redis (web/store.py): the write script
    counts them there, so every process reports the same totals."""

    async def serve_metrics(request: web.Request) -> web.StreamResponse:
        if not bears_token(request, token):
            authorize(request)
        try:
            counts: dict[str, int] | None = await stored(request)
        except REDIS_ERRORS as exc:  # the rest is still worth a scrape
            log.warning("progress-sse could not read the stored events' counts for /metrics: %s", exc)
            counts = None
        # Off the event loop: with several processes it reads each one's files.
        body = await asyncio.to_thread(exposition, counts)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE, "Cache-Control": "no-store"})

    return serve_metrics


def exposition(stored: dict[str, int] | None = None) -> bytes:
    """Every metric in the text format: this process's (with prometheus-client's own
    process_ and python_ ones), or, with PROMETHEUS_MULTIPROC_DIR, every process's
    summed; then the events stored by state (read from Redis, not summed)."""
    if MULTIPROCESS_DIR is None:
        body = generate_latest(REGISTRY)
    else:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=MULTIPROCESS_DIR)  # type: ignore[no-untyped-call]
        body = generate_latest(registry)
    if stored is None:
        return body
    family = CounterMetricFamily(
        "progress_sse_events_stored",
        "Events the write script stored, by state, over every worker and web process (counted in Redis).",
        labels=["state"],
    )
    for state in sorted({*map(str, State), *stored}):
        family.add_metric([state], stored.get(state, 0))
    extra = CollectorRegistry()
    extra.register(_Fixed(family))
    return body + generate_latest(extra)


class _Fixed:
    """A collector of one family read beforehand (prometheus-client collects synchronously)."""

    def __init__(self, family: CounterMetricFamily) -> None:
        self.family = family

    def collect(self) -> list[CounterMetricFamily]:
        return [self.family]


def process_ended() -> None:
    """This process stops serving: its gauges leave the sum (its counters stay)."""
    if MULTIPROCESS_DIR is not None:
        multiprocess.mark_process_dead(os.getpid(), MULTIPROCESS_DIR)  # type: ignore[no-untyped-call]
