"""What a test run leaves in a shared Redis database, and how it removes only that.

A run names everything it makes with one marker (`pst-<run id>`: its key prefix,
its queues and its workers' hostnames). Its own keys carry the marker in their
names. Celery's transport also writes to tables that every app on the database
shares (kombu's binding tables, their deadlines, the unacked index): from those,
only the entries that name the marker go.
"""

from __future__ import annotations

import redis

UNACKED, UNACKED_INDEX = "unacked", "unacked_index"
BINDING_DEADLINES = "_kombu.binding_deadlines"


def forget_run(client: redis.Redis, marker: str) -> None:
    own = list(client.scan_iter(match=f"*{marker}*", count=1000))
    if own:
        client.delete(*own)
    emptied: list[str] = []
    for prefix in ("_kombu.binding.", "_kombu.binding_permanent."):
        for table in client.scan_iter(match=f"{prefix}*", count=1000):
            if client.type(table) in ("set", b"set"):
                ours = [m for m in client.smembers(table) if marker in _text(m)]
                if ours:
                    client.srem(table, *ours)  # Redis deletes a set that becomes empty
                    if prefix == "_kombu.binding." and not client.exists(table):
                        emptied.append(_text(table).removeprefix(prefix))
    # The deadline of a binding table this run emptied now refers to nothing. Those
    # of other tables are kombu's own business, even when their table is missing.
    for exchange in emptied:
        if not client.exists(f"_kombu.binding.{exchange}"):  # nobody bound again meanwhile
            client.zrem(BINDING_DEADLINES, exchange)
    for tag, payload in client.hscan_iter(UNACKED):
        if marker in _text(payload):
            client.hdel(UNACKED, tag)
            client.zrem(UNACKED_INDEX, tag)


def _text(value: str | bytes) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value
