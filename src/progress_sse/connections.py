"""Every Redis client progress-sse makes, built in one place.

Each kind has its own timeouts and retry policy, chosen for who waits on it, and
a client name, so `CLIENT LIST` tells them apart (tests and benchmarks find the
hub's one connection by `hub_client_name`).

A `redis+sentinel://` URL (redis_urls.py) gives the same clients, connected to
whichever node the Sentinels name as the master: redis-py asks them again
whenever a connection is made, so after a failover the next connection, and
with it every retry and the hub's reconnect, goes to the new master. A
`redis+cluster://` URL gives redis-py's cluster clients, which route each command
to the master of its key's slot, and, for what must run on one partition's
master (the web's transactions and its sharded subscriptions), a client per
partition that follows that partition's slot (cluster.py).
"""

from __future__ import annotations

import threading
from typing import Any

import redis
import redis.asyncio as aioredis
import redis.asyncio.cluster
import redis.cluster
import redis.sentinel
from redis._parsers.encoders import Encoder
from redis.asyncio.retry import Retry as AsyncRetry
from redis.asyncio.sentinel import Sentinel as AsyncSentinel
from redis.asyncio.sentinel import SentinelConnectionPool
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.commands.core import Script
from redis.exceptions import RedisClusterException, RedisError
from redis.retry import Retry

from .cluster import BlockingSlotConnectionPool, SlotConnectionPool
from .config import Settings
from .keys import Keys
from .redis_urls import SentinelURL, is_cluster_url, is_sentinel_url, parse_cluster, parse_sentinel

# What a Redis that does not answer raises: RedisError, and, from redis-py's cluster
# clients, RedisClusterException (no node named could be reached), which is not one.
REDIS_ERRORS: tuple[type[Exception], ...] = (RedisError, RedisClusterException)


def sync_client(url: str, *, name: str = "progress-sse") -> redis.Redis:
    """For the worker side (and the web's writes, run in threads): fails fast. A
    task must never hang on, or retry for ever against, a Redis that is down."""
    options: dict[str, Any] = {
        "socket_timeout": 2.0,
        "socket_connect_timeout": 2.0,
        "retry": Retry(ExponentialBackoff(cap=0.2, base=0.02), 2),
        "health_check_interval": 30,
        "client_name": name,
    }
    if is_cluster_url(url):
        lazy: redis.Redis = LazyCluster(url, options)  # type: ignore[assignment]  # the commands are the same
        return lazy
    if is_sentinel_url(url):
        where = parse_sentinel(url)
        # redis-py's sync Sentinel has no type hints.
        sentinels = redis.sentinel.Sentinel(where.sentinels, sentinel_kwargs=_sentinel_kwargs(where))  # type: ignore[no-untyped-call]
        client: redis.Redis = sentinels.master_for(  # type: ignore[no-untyped-call]
            where.service, redis_class=_SentinelClient, **_node_kwargs(where), **options
        )
        return client
    return redis.Redis.from_url(url, **options)


# The web's reads share this many connections. A call finding them all busy (a
# thousand streams reopening after a deploy) waits for one, up to WEB_POOL_WAIT
# seconds, instead of failing at once as redis-py's default pool does: each read is
# a single round trip, so the queue moves fast, and streams opening together share
# their reads (web/delivery.py SharedReads): 1,000 streams resuming at once after a
# restart are served as fast with 8 connections as with 32 (docs/benchmarks.md).
# redis-py's pool never closes a connection it opened, so this is also what the web
# holds at rest after a burst. On a cluster each partition's transactions have a
# pool of PARTITION_POOL_SIZE, each node's other reads one of WEB_POOL_SIZE.
WEB_POOL_SIZE = 16
PARTITION_POOL_SIZE = 8
WEB_POOL_WAIT = 10.0


def _web_options(max_connections: int) -> dict[str, Any]:
    """The web's reads and control calls: a short retry rides out a blip."""
    return {
        "max_connections": max_connections,
        "decode_responses": True,
        "socket_connect_timeout": 2.0,
        "retry": AsyncRetry(ExponentialBackoff(cap=0.5, base=0.05), 2),
        "client_name": "progress-sse-web",
    }


def web_client(settings: Settings) -> aioredis.Redis:
    """The web process's reads and control calls, for any key."""
    options = _web_options(WEB_POOL_SIZE)
    if is_cluster_url(settings.redis_url):
        nodes = parse_cluster(settings.redis_url)
        startup = [redis.asyncio.cluster.ClusterNode(host, port) for host, port in nodes.nodes]
        cluster = redis.asyncio.cluster.RedisCluster(
            startup_nodes=startup, username=nodes.username, password=nodes.password, **options
        )
        return cluster  # type: ignore[return-value]  # the commands the web uses are the same
    options["timeout"] = WEB_POOL_WAIT
    if is_sentinel_url(settings.redis_url):
        return _async_sentinel_client(settings.redis_url, _BlockingSentinelPool, options)
    pool = aioredis.BlockingConnectionPool.from_url(settings.redis_url, **options)
    return aioredis.Redis.from_pool(pool)  # closing the client closes its pool


def partition_clients(settings: Settings) -> list[aioredis.Redis] | None:
    """On a cluster, a client for each partition's transactions, connected to the
    master of its slot (web/store.py); elsewhere None: the web client serves them."""
    if not is_cluster_url(settings.redis_url):
        return None
    options = {**_web_options(PARTITION_POOL_SIZE), "timeout": WEB_POOL_WAIT}
    keys = keys_for(settings)
    return [
        _slot_client(settings, keys.history(p), BlockingSlotConnectionPool, options) for p in range(keys.partitions)
    ]


def hub_clients(settings: Settings) -> list[aioredis.Redis]:
    """The hubs' pub/sub connections, one per partition (one Redis: one), without
    retries: a hub reconnects by itself, and must know when it has to (web/hub.py)."""
    options: dict[str, Any] = {
        "decode_responses": True,
        "socket_connect_timeout": 2.0,
        "retry": AsyncRetry(NoBackoff(), 0),
        "client_name": hub_client_name(settings.key_prefix),
    }
    if is_cluster_url(settings.redis_url):
        keys = keys_for(settings)
        return [_slot_client(settings, keys.history(p), SlotConnectionPool, options) for p in range(keys.partitions)]
    if is_sentinel_url(settings.redis_url):
        return [_async_sentinel_client(settings.redis_url, SentinelConnectionPool, options)]
    return [aioredis.Redis.from_url(settings.redis_url, **options)]


class LazyCluster:
    """redis-py's sync RedisCluster, made on first use. Made at once, it connects to
    the nodes there and then: a worker could not start while the cluster is away,
    where with one Redis it starts and keeps its events in its outbox. A cluster out
    of reach is a ConnectionError, as a Redis that does not answer is."""

    def __init__(self, url: str, options: dict[str, Any]) -> None:
        self.url, self._options = url, options
        self._client: redis.cluster.RedisCluster | None = None
        self._making = threading.Lock()

    def _cluster(self) -> redis.cluster.RedisCluster:
        with self._making:
            if self._client is None:
                nodes = parse_cluster(self.url)
                startup = [redis.cluster.ClusterNode(host, port) for host, port in nodes.nodes]  # type: ignore[no-untyped-call]
                try:
                    self._client = redis.cluster.RedisCluster(
                        startup_nodes=startup, username=nodes.username, password=nodes.password, **self._options
                    )
                except RedisClusterException as exc:
                    raise redis.ConnectionError(f"the cluster at {self.url} is out of reach: {exc}") from exc
            return self._client

    def register_script(self, script: str) -> Script:
        return Script(self, script)  # type: ignore[arg-type]  # its hash is worked out here, unconnected

    def get_encoder(self) -> Encoder:  # what Script asks its client for
        return Encoder("utf-8", "strict", False)  # type: ignore[no-untyped-call]

    def close(self) -> None:
        if self._client is not None:
            self._client.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cluster(), name)


def keys_for(settings: Settings) -> Keys:
    """The key names for the Redis `settings` name (on a cluster, in partitions)."""
    return Keys(settings.key_prefix, cluster=is_cluster_url(settings.redis_url))


def _slot_client(
    settings: Settings, slot_key: str, pool_class: type[SlotConnectionPool], options: dict[str, Any]
) -> aioredis.Redis:
    """A client of the master that serves `slot_key`'s slot, wherever it moves."""
    nodes = parse_cluster(settings.redis_url)
    pool = pool_class(nodes, slot_key, username=nodes.username, password=nodes.password, **options)
    return aioredis.Redis.from_pool(pool)


def hub_client_name(key_prefix: str) -> str:
    return f"progress-sse-hub.{key_prefix}"


class _BlockingSentinelPool(SentinelConnectionPool, aioredis.BlockingConnectionPool):
    """Sentinel's pool (the master's address asked of the Sentinels) with the
    waiting of BlockingConnectionPool: see WEB_POOL_SIZE."""


class _SentinelClient(redis.Redis):
    """A client of the master that also closes its connections to the Sentinels."""

    def close(self) -> None:
        super().close()
        for sentinel in self.connection_pool.sentinel_manager.sentinels:  # type: ignore[attr-defined]
            sentinel.close()


class _AsyncSentinelClient(aioredis.Redis):
    """A client of the master that also closes its connections to the Sentinels."""

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        for sentinel in self.connection_pool.sentinel_manager.sentinels:  # type: ignore[attr-defined]
            await sentinel.aclose()


def _async_sentinel_client(
    url: str, pool_class: type[SentinelConnectionPool], options: dict[str, Any]
) -> aioredis.Redis:
    where = parse_sentinel(url)
    sentinels = AsyncSentinel(where.sentinels, sentinel_kwargs=_sentinel_kwargs(where))  # type: ignore[no-untyped-call]
    client: aioredis.Redis = sentinels.master_for(
        where.service,
        redis_class=_AsyncSentinelClient,
        connection_pool_class=pool_class,
        **_node_kwargs(where),
        **options,
    )
    return client


def _node_kwargs(where: SentinelURL) -> dict[str, Any]:
    return {"db": where.db, "username": where.username, "password": where.password}


def _sentinel_kwargs(where: SentinelURL) -> dict[str, Any]:
    # The Sentinels are asked on every new connection: they must answer fast too.
    kwargs: dict[str, Any] = {"socket_timeout": 2.0, "socket_connect_timeout": 2.0}
    if where.sentinel_password is not None:
        kwargs.update(username=where.sentinel_username, password=where.sentinel_password)
    return kwargs
