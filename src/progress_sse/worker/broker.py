"""Which broker a task's message went to, and where kombu's Redis transport keeps it.

The bridge records a fingerprint of the publishing app's broker with each task's
`queued` event; the web's reaper looks for a stale queued task's message only in
a broker with the same fingerprint (web/reaper.py, docs/protocol.md "States").

The layout is kombu's Redis transport with its default transport options
(kombu/transport/redis.py): a queue is a list named after it, plus one list per
priority step above 0 (`<queue>\\x06\\x16<step>`); a message a consumer has taken
but not acknowledged (prefetched, or an ETA/countdown task waiting in a worker) is
in the `unacked` hash until it is acked or put back; `_kombu.binding.<exchange>`
sets name the queues bound to each exchange.
"""

from __future__ import annotations

import functools
import hashlib
from urllib.parse import parse_qs, urlsplit

SEP = "\x06\x16"
UNACKED = "unacked"
BINDING_PREFIX = "_kombu.binding."


@functools.lru_cache(maxsize=16)
def fingerprint(url: object) -> str:
    """A short, credential-free name for a broker: equal for two URLs of the same
    Redis database, `other` for anything that is not a Redis URL (AMQP, SQS,
    Sentinel, a failover list...), whose messages the reaper never looks for."""
    if not isinstance(url, str):
        return "other"
    url = url.split(";", 1)[0].strip()  # failover URLs: the first is the primary
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return "other"
    query = parse_qs(parts.query)
    if parts.scheme in ("redis", "rediss"):
        host = (parts.hostname or "127.0.0.1").lower()
        host = "127.0.0.1" if host == "localhost" else host
        where = f"{host}:{port or 6379}"
        db = parts.path.strip("/") or query.get("virtual_host", ["0"])[0]
    elif parts.scheme in ("unix", "redis+socket"):
        where = parts.path
        db = (query.get("virtual_host") or query.get("db") or ["0"])[0]
    else:
        return "other"
    place = f"redis://{where}/{db or 0}"
    return hashlib.sha256(place.encode()).hexdigest()[:16]
