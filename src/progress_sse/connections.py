"""Every Redis client progress-sse makes, built in one place.

Each kind has its own timeouts and retry policy, chosen for who waits on it, and
a client name, so `CLIENT LIST` tells them apart (tests and benchmarks find the
hub's one connection by `hub_client_name`).
"""

from __future__ import annotations

import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.retry import Retry

from .config import Settings


def sync_client(url: str, *, name: str = "progress-sse") -> redis.Redis:
    """For the worker side (and the web's writes, run in threads): fails fast. A
    task must never hang on, or retry for ever against, a Redis that is down."""
    return redis.Redis.from_url(
        url,
        socket_timeout=2.0,
        socket_connect_timeout=2.0,
        retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), 2),
        health_check_interval=30,
        client_name=name,
    )


# The web's reads share this many connections. A call finding them all busy (a
# thousand streams reopening after a deploy) waits for one, up to WEB_POOL_WAIT
# seconds, instead of failing at once as redis-py's default pool does: each read is
# a single round trip, so the queue moves fast.
WEB_POOL_SIZE = 32
WEB_POOL_WAIT = 10.0


def web_client(settings: Settings) -> aioredis.Redis:
    """The web process's reads and control calls: a short retry rides out a blip."""
    pool = aioredis.BlockingConnectionPool.from_url(
        settings.redis_url,
        max_connections=WEB_POOL_SIZE,
        timeout=WEB_POOL_WAIT,
        decode_responses=True,
        socket_connect_timeout=2.0,
        retry=AsyncRetry(ExponentialBackoff(cap=0.5, base=0.05), 2),
        client_name="progress-sse-web",
    )
    return aioredis.Redis.from_pool(pool)  # closing the client closes its pool


def hub_client(settings: Settings) -> aioredis.Redis:
    """The hub's one pub/sub connection, without retries: the hub reconnects by
    itself, and must know when it has to (web/hub.py)."""
    return aioredis.Redis.from_url(
        settings.redis_url,
        decode_responses=True,
        socket_connect_timeout=2.0,
        retry=AsyncRetry(NoBackoff(), 0),
        client_name=hub_client_name(settings.key_prefix),
    )


def hub_client_name(key_prefix: str) -> str:
    return f"progress-sse-hub.{key_prefix}"
