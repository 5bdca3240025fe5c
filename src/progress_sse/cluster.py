"""A Redis Cluster, used as one Redis that moves.

On a cluster all of progress-sse's keys and channels share one hash slot (keys.py),
so all its work is done by the master that serves that slot. The web talks to
that master as to any Redis, through a pool whose connections ask where the slot
is each time they open a socket, and drop it when the node answers that the
slot moved (a failover, a migration): redis-py's retry then reconnects, to the
new master. redis-py's Sentinel pools do the same for a master that moves. (Not
redis-py's asyncio cluster client: its transactions run each queued command in a
thread of its own, with its own event loop.)
"""

from __future__ import annotations

import asyncio
import weakref
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.connection import Connection, ConnectionPool
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.exceptions import AskError, ClusterDownError, ConnectionError, MovedError, RedisError, TryAgainError

from .redis_urls import ClusterURL

# Answers of a node that does not serve the slot (now): connect again, to its master.
_ELSEWHERE = (MovedError, AskError, TryAgainError, ClusterDownError)


class SlotConnection(Connection):
    """A connection to the master that serves its pool's slot: every time it opens
    a socket (its first connect, and each reconnect of redis-py's retries), it
    asks its pool where the slot is now."""

    def __init__(self, **kwargs: Any) -> None:
        self.connection_pool: SlotConnectionPool = kwargs.pop("connection_pool")
        super().__init__(**kwargs)

    async def _connect(self) -> None:
        self.host, self.port = await self.connection_pool.owner()
        try:
            await super()._connect()  # type: ignore[no-untyped-call]
        except BaseException:
            self.connection_pool.forget_owner()  # refused, timed out, gone: ask again next time
            raise

    async def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().read_response(*args, **kwargs)
        except _ELSEWHERE as error:
            if isinstance(error, MovedError):  # it names the node that serves the slot now
                self.connection_pool.moved_to(error.host or self.host, int(error.port))
            elif not isinstance(error, AskError):  # ASK: one key of a slot that is moving
                self.connection_pool.forget_owner()
            await self.disconnect()
            raise ConnectionError(f"the cluster serves progress-sse's slot elsewhere now ({error})") from error


class SlotConnectionPool(ConnectionPool):
    """Connections to whichever master serves the slot of `slot_key`, found by
    asking the nodes of `cluster` (CLUSTER SLOTS) and remembered until a
    connection finds the slot gone."""

    def __init__(self, cluster: ClusterURL, slot_key: str, **kwargs: Any) -> None:
        kwargs["connection_class"] = SlotConnection
        super().__init__(**kwargs)
        self.connection_kwargs["connection_pool"] = weakref.proxy(self)
        self.cluster, self.slot = cluster, key_slot(slot_key.encode())
        self._owner: tuple[str, int] | None = None
        self._asking: asyncio.Lock | None = None

    def forget_owner(self) -> None:
        self._owner = None

    def moved_to(self, host: str, port: int) -> None:
        self._owner = (host, port)

    async def owner(self) -> tuple[str, int]:
        if self._asking is None:
            self._asking = asyncio.Lock()
        async with self._asking:  # one question at a time: connections opening together share it
            if self._owner is None:
                self._owner = await self._ask()
            return self._owner

    async def _ask(self) -> tuple[str, int]:
        kwargs = {k: v for k, v in self.connection_kwargs.items() if k in ("username", "password")}
        failures: list[str] = []
        for host, port in self.cluster.nodes:
            node = aioredis.Redis(
                host=host,
                port=port,
                socket_connect_timeout=2.0,
                socket_timeout=2.0,
                retry=Retry(NoBackoff(), 0),
                **kwargs,
            )
            try:
                slots = await node.execute_command("CLUSTER SLOTS")  # type: ignore[no-untyped-call]
                for start, end, master, *_ in slots:
                    if int(start) <= self.slot <= int(end):
                        return _text(master[0]) or host, int(master[1])
                failures.append(f"{host}:{port}: no master serves slot {self.slot}")
            except (RedisError, OSError) as error:
                failures.append(f"{host}:{port}: {error}")
            finally:
                # Shielded: a connect cancelled here (a hub closing) must still let
                # go of this one-off connection.
                await asyncio.shield(node.aclose())
        raise ConnectionError(f"no node of the cluster said where slot {self.slot} is ({'; '.join(failures)})")


class BlockingSlotConnectionPool(SlotConnectionPool, aioredis.BlockingConnectionPool):
    """The slot's pool with the waiting of BlockingConnectionPool (connections.py
    WEB_POOL_SIZE)."""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
