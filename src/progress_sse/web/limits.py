"""What the file-descriptor limit leaves for clients: connections and streams.

Every client connection holds one descriptor for as long as it is open. The web
process needs others of its own: its Redis pool and the hub's pub/sub, Celery's
broker connection, the event loop, listening sockets, logs and a file being sent.
If clients took those, Redis calls would fail and `/healthz` could not be
accepted, so clients get the limit less that headroom (web/server.py closes idle
connections, then refuses new ones, beyond it), and streams, which are never idle,
get a tenth less again: there is always room for `/healthz` and the API.
"""

from __future__ import annotations

import resource

from ..connections import WEB_POOL_SIZE

# Descriptors the process uses besides its clients' connections and its Redis
# pool: stdio, the event loop's, listening sockets, logs, files being sent, the
# hub's pub/sub, the publisher's and Celery's broker connections (kombu's pool
# holds up to 10).
OWN_FDS = 64
REDIS_POOL_FDS = WEB_POOL_SIZE
# When the limit is too low for that headroom, clients get half of it.
_LOW_LIMIT_SHARE = 2
# Connections kept free of streams: a tenth, and at least this many.
MIN_SPARE_CONNECTIONS = 8
# What "no limit" (RLIM_INFINITY) counts as: more than any process holds.
UNLIMITED = 1 << 20


def fd_limit() -> int:
    """This process's soft RLIMIT_NOFILE (`ulimit -n`), or UNLIMITED."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return UNLIMITED if soft == resource.RLIM_INFINITY or soft > UNLIMITED else soft


def max_connections(fds: int | None = None, *, redis_connections: int = REDIS_POOL_FDS) -> int:
    """Client connections the process may hold with `fds` descriptors (default: its
    own limit), leaving room for its own descriptors and `redis_connections`."""
    fds = fd_limit() if fds is None else fds
    return max(fds - OWN_FDS - redis_connections, fds // _LOW_LIMIT_SHARE, 1)


def default_max_streams(
    fds: int | None = None, *, redis_connections: int = REDIS_POOL_FDS, connections: int | None = None
) -> int:
    """The default number of concurrent streams per process: the client
    connections allowed (`connections`, e.g. PROGRESS_SSE_MAX_CONNECTIONS, else
    what `max_connections` derives from `fds`), less a tenth (at least
    MIN_SPARE_CONNECTIONS) kept for requests that are not streams, `/healthz` among
    them."""
    if connections is None:
        connections = max_connections(fds, redis_connections=redis_connections)
    spare = max(connections // 10, MIN_SPARE_CONNECTIONS)
    return max(connections - spare, 1)
