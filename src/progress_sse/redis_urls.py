"""The Redis URLs progress-sse takes beyond redis-py's own, named wherever a Redis
URL goes: a Redis watched by Sentinel (README.md, "Redis Sentinel") and a Redis
Cluster (README.md, "Redis Cluster").

    redis+cluster://[[user]:password@]host:port[,host:port…]

names a cluster by some of its nodes (any will do: the rest are found from them).

    redis+sentinel://[[user]:password@]host[:port][,host[:port]…]/<service>[/<db>]

`host:port` pairs are Sentinels (26379 when no port is given), `service` is the
master's name in their configuration (`sentinel monitor <service> …`). The user
and password are the data nodes' (the master and its replicas); Sentinels that
ask for a password of their own get it as `?sentinel_password=…`
(`&sentinel_username=…`). Pure parsing: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qs, quote, unquote, urlsplit

SENTINEL_SCHEME = "redis+sentinel"
SENTINEL_PORT = 26379
FORM = "redis+sentinel://[:password@]host[:port][,host[:port]…]/<service>[/<db>]"


@dataclass(frozen=True, slots=True)
class SentinelURL:
    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_username: str | None = None
    sentinel_password: str | None = None

    def kombu(self) -> tuple[str, dict[str, object]]:
        """The same Redis as a Celery broker: kombu's `sentinel://` URL, one per
        Sentinel joined by `;`, and the transport options it needs."""
        auth = ""
        if self.password is not None:  # kombu splits the URL at `;`, `/`, `@`…: quoted
            auth = f"{quote(self.username or '', safe='')}:{quote(self.password, safe='')}@"
        url = ";".join(f"sentinel://{auth}{_host(host)}:{port}/{self.db}" for host, port in self.sentinels)
        options: dict[str, object] = {"master_name": self.service}
        if self.sentinel_password is not None:
            options["sentinel_kwargs"] = {"password": self.sentinel_password, "username": self.sentinel_username}
        return url, options


CLUSTER_SCHEME = "redis+cluster"
CLUSTER_FORM = "redis+cluster://[:password@]host:port[,host:port…]"


@dataclass(frozen=True, slots=True)
class ClusterURL:
    nodes: tuple[tuple[str, int], ...]
    username: str | None = None
    password: str | None = None


def is_cluster_url(url: str) -> bool:
    return url.startswith(f"{CLUSTER_SCHEME}://")


def parse_cluster(url: str) -> ClusterURL:
    """ValueError, saying what is wrong, for anything not of the form in CLUSTER_FORM."""
    if not is_cluster_url(url):
        raise ValueError(f"expected {CLUSTER_FORM}")
    authority, _, rest = url[len(CLUSTER_SCHEME) + 3 :].partition("/")
    if rest.strip("/"):
        raise ValueError(f"a cluster has no databases or options here: expected {CLUSTER_FORM}")
    hosts, username, password = _authority(authority)
    nodes = tuple(_address(part, default_port=6379) for part in hosts.split(",") if part.strip())
    if not nodes:
        raise ValueError(f"no node address: expected {CLUSTER_FORM}")
    return ClusterURL(nodes, username, password)


def _authority(authority: str) -> tuple[str, str | None, str | None]:
    """`[[user]:password@]hosts` as hosts, user and password (percent-decoded)."""
    credentials, at, hosts = authority.rpartition("@")
    if not at:
        return authority, None, None
    user, colon, secret = credentials.partition(":")
    return hosts, unquote(user) or None, unquote(secret) if colon else None


def from_kombu(broker: str, options: dict[str, object]) -> str | None:
    """A Celery app's broker, in kombu's Sentinel form (`sentinel://…;sentinel://…`
    with `master_name` in its transport options), as a URL of ours; None if it is
    not one."""
    master = options.get("master_name")
    parts = [urlsplit(part.strip()) for part in broker.split(";") if part.strip()]
    if not isinstance(master, str) or not parts or any(p.scheme != "sentinel" for p in parts):
        return None
    first = parts[0]
    auth = ""
    if first.password is not None:
        auth = f"{quote(unquote(first.username or ''), safe='')}:{quote(unquote(first.password), safe='')}@"
    hosts = ",".join(f"{_host(p.hostname or 'localhost')}:{p.port or SENTINEL_PORT}" for p in parts)
    db = first.path.strip("/") or "0"
    return f"{SENTINEL_SCHEME}://{auth}{hosts}/{quote(master, safe='')}/{db}"


def is_sentinel_url(url: str) -> bool:
    return url.startswith(f"{SENTINEL_SCHEME}://")


def parse_sentinel(url: str) -> SentinelURL:
    """ValueError, saying what is wrong, for anything not of the form in FORM."""
    if not is_sentinel_url(url):
        raise ValueError(f"expected {FORM}")
    rest = url[len(SENTINEL_SCHEME) + 3 :]
    authority, _, path_and_query = rest.partition("/")
    path, _, query = path_and_query.partition("?")
    hosts, username, password = _authority(authority)
    sentinels = tuple(_address(part) for part in hosts.split(",") if part.strip())
    if not sentinels:
        raise ValueError(f"no Sentinel address: expected {FORM}")
    segments = [unquote(segment) for segment in path.split("/") if segment]
    if not segments or len(segments) > 2:
        raise ValueError(f"expected the service name (and a database number) after the hosts: {FORM}")
    db = 0
    if len(segments) == 2:
        if not segments[1].isdigit():
            raise ValueError(f"the database must be a number, not {segments[1]!r}")
        db = int(segments[1])
    options = {key: values[-1] for key, values in parse_qs(query).items()}
    unknown = set(options) - {"sentinel_password", "sentinel_username"}
    if unknown:
        raise ValueError(f"unknown option {sorted(unknown)[0]!r}: only sentinel_password and sentinel_username")
    return SentinelURL(
        sentinels,
        segments[0],
        db,
        username,
        password,
        options.get("sentinel_username"),
        options.get("sentinel_password"),
    )


def _address(part: str, default_port: int = SENTINEL_PORT) -> tuple[str, int]:
    # urlsplit knows IPv6 brackets and ports; a scheme makes it read the part as a host.
    parsed = urlsplit(f"//{part.strip()}")
    if not parsed.hostname:
        raise ValueError(f"{part!r} is not a host[:port]")
    try:
        port = parsed.port or default_port
    except ValueError:
        raise ValueError(f"{part!r} has no valid port") from None
    return parsed.hostname, port


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
