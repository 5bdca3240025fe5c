"""Settings for every process, read from the environment.

`Settings.from_env(environ)` takes a plain mapping so tests feed it a dict, and
every error names the variable and the bad value: a person reading the message
knows exactly what to change.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from .redis_urls import CLUSTER_FORM, is_cluster_url, is_sentinel_url, parse_cluster, parse_sentinel
from .redis_urls import FORM as SENTINEL_FORM

DEFAULT_REDIS_URL = "redis://localhost:6379/0"

_T = TypeVar("_T")


class ConfigError(ValueError):
    """A setting has a value the service cannot run with."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    redis_url: str = DEFAULT_REDIS_URL
    broker_url: str = DEFAULT_REDIS_URL
    host: str = "0.0.0.0"
    port: int = 8000
    heartbeat: float = 15.0
    history_ttl: int = 86_400
    history_max: int = 10_000
    # The all-tasks feed (web/feed.py): at most one progress entry per task in this
    # many seconds, and entries kept per partition.
    feed_interval: float = 1.0
    feed_max: int = 10_000
    max_rate: float = 20.0
    key_prefix: str = "progress-sse"
    queue: str = "celery"
    # Seconds without a heartbeat after which a worker counts as gone and its
    # running tasks as lost (it beats every third of that).
    worker_ttl: int = 30
    # "package.module:ATTRIBUTE" naming an AllowList; None means the demo tasks.
    allowlist: str | None = None
    # Whether `progress-sse beat` sends the demo schedule (worker/schedule.py).
    demo_schedule: bool = False
    # Access tokens (web/access.py): with neither key the service is open.
    secret: str | None = None  # HS256
    public_key: str | None = None  # PEM of an RSA or EC public key: RS256 / ES256
    # A Prometheus scraper's static bearer token for GET /metrics (web/metrics.py), when
    # tokens are on: it need not mint JWTs. An operator's token serves too.
    metrics_token: str | None = None
    # Host headers accepted; None: loopback names when listening on loopback, else any.
    allowed_hosts: tuple[str, ...] | None = None
    cors_origins: tuple[str, ...] = ()
    # What a watcher (a token that is not an operator's) sees of a failure.
    watcher_errors: str = "message"
    # Slow clients (web/hub.py, web/delivery.py): bytes of frames a stream may have
    # waiting, and seconds a client may accept no bytes before it is disconnected.
    stream_buffer: int = 256 * 1024
    write_timeout: float = 30.0
    # Open streams per web process; None: derived from the file-descriptor limit.
    max_streams: int | None = None
    # Web processes serving one port (`progress-sse web --workers`, cli/serve.py).
    web_workers: int = 1
    # The web's event loop: uvloop when installed, asyncio's own, or `auto`
    # (uvloop if it imports; web/server.py `new_loop`).
    event_loop: str = "auto"
    # Request limits (web/server.py): seconds a request's headers, then its body,
    # may take to arrive, and an idle connection stays open; client connections
    # per process (None: derived from the file-descriptor limit, web/limits.py).
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    keepalive_timeout: float = 75.0
    max_connections: int | None = None
    # Seconds a task may stay `queued` before, its message gone from a Redis broker, it
    # ends as lost (web/reaper.py; docs/protocol.md, States).
    queued_timeout: int = 300
    # Seconds a worker or publisher keeps an event Redis did not take, trying it
    # again (worker/outbox.py; docs/protocol.md, Redis outages).
    outbox_ttl: int = 300
    # How the server commands write their log: `text` lines, or one JSON object per
    # line for a platform to parse (json_logs.py; cli/serve.py sets it up).
    log_format: str = "text"

    @property
    def keyed(self) -> bool:
        """Whether every route but /healthz and the page's assets needs a token."""
        return bool(self.secret or self.public_key)

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Settings:
        d = cls()  # the defaults (slots=True leaves no class attributes to read them from)
        values: dict[str, Any] = {}
        for setting in TABLE:  # in order: a default may be an earlier setting's value
            default = values[setting.default_from] if setting.default_from else getattr(d, setting.attr)
            values[setting.attr] = _get(environ, setting, default)
        return cls(**values)

    def to_env(self) -> dict[str, str]:
        """These settings as the environment variables that give them: for child
        processes, which read their settings from the environment."""
        pairs = ((s, getattr(self, s.attr)) for s in TABLE)
        return {s.env: s.unparse(value) for s, value in pairs if value is not None}

    def with_(self, **changes: Any) -> Settings:
        """A copy with some fields changed (tests and the CLI's flags use it)."""
        return replace(self, **changes)


@dataclass(frozen=True, slots=True)
class Setting:
    """One setting, declared once: `Settings.from_env`, the server commands' flags,
    the environment handed to child processes and the README's configuration table
    (checked by tests/test_config.py) all come from `TABLE`."""

    attr: str  # the Settings field
    env: str
    parse: Callable[[str], Any]
    help: str
    # The command-line flag, on the server commands in `commands`.
    flag: str | None = None
    commands: frozenset[str] = frozenset()
    # An earlier setting whose value is the default, e.g. the broker is the Redis.
    default_from: str | None = None
    # How the default reads in --help, when not as the field's value.
    default_text: str | None = None
    # The value back as the variable's text (the inverse of `parse`).
    unparse: Callable[[Any], str] = str
    # A key: an error about it names the variable, never the value.
    sensitive: bool = False

    def default_help(self, settings: Settings) -> str:
        if self.default_text is not None:
            return self.default_text
        value = getattr(settings, self.attr)
        return f"{value:g}" if isinstance(value, float) else str(value)


def redacted(url: str) -> str:
    """The URL with its password masked: for logs and start-up lines."""
    parts = urlsplit(url)
    if parts.password:
        return url.replace(f":{parts.password}@", ":***@", 1)
    return url


def check_broker(settings: Settings) -> None:
    """Where progress-sse makes the Celery app (the web, `progress-sse worker`), not
    where it joins one: an app of the user's brings its own broker."""
    if is_cluster_url(settings.broker_url):
        raise ConfigError(
            "REDIS_URL names a Redis Cluster, which holds the events but cannot be Celery's broker "
            "(kombu has no cluster transport): set CELERY_BROKER_URL to a Redis or another broker"
        )


def is_redis_url(url: str) -> bool:
    """A URL redis-py connects to (the broker URL may be another transport)."""
    return urlsplit(url).scheme in ("redis", "rediss", "unix")


def is_loopback(host: str) -> bool:
    """Whether listening on `host` keeps the service to this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: only "localhost" is known to stay on this machine
        return False


def _get(environ: Mapping[str, str], setting: Setting, default: _T) -> _T:
    raw = environ.get(setting.env)
    if raw is None or raw.strip() == "":
        return default
    try:
        value: _T = setting.parse(raw.strip())
    except ValueError as exc:
        shown = setting.env if setting.sensitive else f"{setting.env}={raw!r}"
        raise ConfigError(f"{shown} is not valid: {exc}") from None
    return value


def _redis_url(raw: str) -> str:
    # Events live in Redis whatever the broker is: an amqp:// URL here would only
    # fail later, with a traceback, when the first client connects.
    if is_sentinel_url(raw):
        parse_sentinel(raw)  # says what is wrong with it
        return raw
    if is_cluster_url(raw):
        parse_cluster(raw)
        return raw
    if not is_redis_url(raw) or "://" not in raw:
        raise ValueError(
            "expected a Redis URL: redis://host:6379/0, rediss://…, unix:///path/redis.sock "
            f"or, for a Redis watched by Sentinel, {SENTINEL_FORM}, or, for a Redis Cluster, {CLUSTER_FORM}"
        )
    return raw


def _matching(pattern: str, expected: str) -> Callable[[str], str]:
    """A parser that takes the whole value if it matches `pattern`."""
    compiled = re.compile(pattern)

    def parse(raw: str) -> str:
        if not compiled.fullmatch(raw):
            raise ValueError(f"expected {expected}")
        return raw

    return parse


# The transports Celery users run; Sentinel is a Redis one.
_broker_url = _matching(
    r"(redis|rediss|unix|sentinel|redis\+sentinel|amqp|amqps|pyamqp|memory)://.*",
    "a Celery broker URL such as redis://localhost:6379/0 or amqp://host//",
)


def _nonempty(raw: str) -> str:
    return raw


def _port(raw: str) -> int:
    value = _whole(raw)
    if not 1 <= value <= 65_535:
        raise ValueError("expected a port number from 1 to 65535")
    return value


def _positive_int(raw: str) -> int:
    value = _whole(raw)
    if value < 1:
        raise ValueError("expected a whole number of at least 1")
    return value


def _positive_float(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ValueError("expected a number greater than 0") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError("expected a number greater than 0")
    return value


def _whole(raw: str) -> int:
    try:
        return int(raw)
    except ValueError:
        raise ValueError("expected a whole number") from None


_import_path = _matching(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", "package.module:ATTRIBUTE, e.g. myapp.progress:ALLOWED")
# Braces would break the {task_id} hash tags, spaces the key-name parsing of redis-cli users.
_key_prefix = _matching(r"[A-Za-z0-9_.:-]{1,64}", "1 to 64 letters, digits or _ . : -")


def _secret(raw: str) -> str:
    from .tokens import check_secret  # here: tokens (PyJWT, cryptography) is for the processes that use it

    return check_secret(raw)


def _public_key(raw: str) -> str:
    """The PEM text of an RSA or EC public key: given as is, or as a file's path."""
    text = raw
    if not raw.startswith("-----BEGIN"):
        try:
            text = Path(raw).read_text()
        except OSError as exc:
            raise ValueError(f"expected a PEM public key or the path of a file holding one ({exc.strerror})") from None
    from .tokens import TokenError, key_algorithm, load_public_key  # here, as in _secret

    try:
        key_algorithm(load_public_key(text))
    except TokenError as exc:
        raise ValueError(str(exc).rstrip(".")) from None
    return text


def _words(raw: str) -> list[str]:
    return [word.strip() for word in raw.split(",") if word.strip()]


def _joined(values: tuple[str, ...]) -> str:
    return ",".join(values)


_HOST = re.compile(r"\*|\.?[a-z0-9]([a-z0-9.-]*[a-z0-9])?|\[[0-9a-f:.]+\]")


def _hosts(raw: str) -> tuple[str, ...]:
    hosts = tuple(word.lower() for word in _words(raw))
    for host in hosts:
        if not _HOST.fullmatch(host):
            raise ValueError(
                f"{host!r} is not a host name: expected names like example.com, .example.com (and its "
                "subdomains), 127.0.0.1, [::1] or *, comma-separated, without ports"
            )
    return hosts


_ORIGIN = re.compile(r"https?://[^/\s:*]+(:[0-9]{1,5})?")


def _origins(raw: str) -> tuple[str, ...]:
    origins = tuple(_words(raw))
    for origin in origins:
        if not _ORIGIN.fullmatch(origin):
            raise ValueError(
                f"{origin!r} is not an exact origin: expected scheme://host[:port] such as "
                "https://app.example.com, with no path, no trailing slash and no wildcard"
            )
    return origins


_watcher_errors = _matching("message|type", "message (a failure's type and message) or type (its type alone)")
_event_loop = _matching("auto|uvloop|asyncio", "auto (uvloop if it is installed), uvloop or asyncio")
_log_format = _matching("text|json", "text (lines as written) or json (one JSON object per line)")
# Sent as `Authorization: Bearer <token>`: visible ASCII only, long enough not to be guessed.
_metrics_token = _matching(r"[!-~]{16,}", "16 or more visible ASCII characters, no spaces")


def _switch(raw: str) -> bool:
    word = raw.lower()
    if word not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
        raise ValueError("expected 1 or 0 (or true/false, yes/no, on/off)")
    return word in ("1", "true", "yes", "on")


def _switch_text(value: bool) -> str:
    return "1" if value else "0"


_SERVERS = frozenset({"web", "worker", "beat", "dev"})
_WEB = frozenset({"web", "dev"})

TABLE: tuple[Setting, ...] = (
    Setting(
        "redis_url",
        "REDIS_URL",
        _redis_url,
        "Redis for events, and the Celery broker unless CELERY_BROKER_URL is set",
        "--redis-url",
        _SERVERS,
    ),
    Setting(
        "broker_url",
        "CELERY_BROKER_URL",
        _broker_url,
        "Celery broker",
        "--broker-url",
        _SERVERS,
        default_from="redis_url",
        default_text="the Redis URL",
    ),
    Setting("port", "PORT", _port, "port to listen on", "--port", _WEB),
    Setting("host", "HOST", _nonempty, "interface to listen on", "--host", _WEB),
    Setting(
        "heartbeat", "PROGRESS_SSE_HEARTBEAT", _positive_float, "seconds between ': ping' comments", "--heartbeat", _WEB
    ),
    Setting(
        "history_ttl",
        "PROGRESS_SSE_HISTORY_TTL",
        _positive_int,
        "seconds a task's events are kept after its last event",
    ),
    Setting(
        "history_max", "PROGRESS_SSE_HISTORY_MAX", _positive_int, "events kept per task (the log is capped, roughly)"
    ),
    Setting("max_rate", "PROGRESS_SSE_MAX_RATE", _positive_float, "progress publishes per second per task"),
    Setting(
        "feed_interval",
        "PROGRESS_SSE_FEED_INTERVAL",
        _positive_float,
        "seconds between a task's progress entries on the all-tasks feed",
    ),
    Setting("feed_max", "PROGRESS_SSE_FEED_MAX", _positive_int, "entries the all-tasks feed keeps (per partition)"),
    Setting(
        "key_prefix",
        "PROGRESS_SSE_KEY_PREFIX",
        _key_prefix,
        "prefix of every Redis key and channel",
        "--key-prefix",
        _SERVERS,
    ),
    Setting("queue", "PROGRESS_SSE_QUEUE", _nonempty, "Celery queue for tasks started over HTTP", "--queue", _SERVERS),
    Setting(
        "worker_ttl",
        "PROGRESS_SSE_WORKER_TTL",
        _positive_int,
        "seconds without a heartbeat after which a worker's running tasks end as lost",
    ),
    Setting(
        "allowlist",
        "PROGRESS_SSE_ALLOWLIST",
        _import_path,
        "package.module:ATTRIBUTE naming the AllowList of tasks POST /tasks may start",
        "--allowlist",
        _WEB,
        default_text="the demo tasks",
    ),
    Setting(
        "demo_schedule",
        "PROGRESS_SSE_DEMO_SCHEDULE",
        _switch,
        "1: `progress-sse beat` sends the demo schedule (demo tasks every 20 s and every minute)",
        default_text="0",
        unparse=_switch_text,
    ),
    # The keys have no flags: a command line is visible to every user of the machine.
    Setting(
        "secret",
        "PROGRESS_SSE_SECRET",
        _secret,
        "HS256 key for access tokens (at least 32 characters); set, every route needs a token",
        default_text="none: the service is open",
        sensitive=True,
    ),
    Setting(
        "public_key",
        "PROGRESS_SSE_PUBLIC_KEY",
        _public_key,
        "PEM public key (or its file) for RS256/ES256 access tokens; set, every route needs a token",
        default_text="none: the service is open",
    ),
    Setting(
        "metrics_token",
        "PROGRESS_SSE_METRICS_TOKEN",
        _metrics_token,
        "static bearer token (16+ characters) a Prometheus scraper sends to GET /metrics when tokens are on",
        default_text="none: with tokens on, /metrics needs an operator token",
        sensitive=True,
    ),
    Setting(
        "allowed_hosts",
        "PROGRESS_SSE_ALLOWED_HOSTS",
        _hosts,
        "Host headers accepted, comma-separated (.example.com takes subdomains, * any); others get 400",
        "--allowed-hosts",
        _WEB,
        default_text="loopback names when HOST is loopback, else any",
        unparse=_joined,
    ),
    Setting(
        "cors_origins",
        "PROGRESS_SSE_CORS_ORIGINS",
        _origins,
        "exact origins (https://app.example.com) whose pages may call the API, comma-separated",
        "--cors-origins",
        _WEB,
        default_text="none",
        unparse=_joined,
    ),
    Setting(
        "watcher_errors",
        "PROGRESS_SSE_WATCHER_ERRORS",
        _watcher_errors,
        "what a watcher sees of a failure: message (type and message) or type; tracebacks are for operators only",
    ),
    Setting(
        "stream_buffer",
        "PROGRESS_SSE_STREAM_BUFFER",
        _positive_int,
        "bytes of frames a stream may have waiting for a slow client; beyond, its progress frames collapse",
    ),
    Setting(
        "write_timeout",
        "PROGRESS_SSE_WRITE_TIMEOUT",
        _positive_float,
        "seconds a client may accept no bytes of its stream before it is disconnected",
    ),
    Setting(
        "max_streams",
        "PROGRESS_SSE_MAX_STREAMS",
        _positive_int,
        "open streams per web process; beyond, a new stream is told to retry later",
        default_text="the connection limit less a tenth",
    ),
    Setting(
        "web_workers",
        "WEB_CONCURRENCY",
        _positive_int,
        "web processes serving the port together (SO_REUSEPORT, Linux); each holds its own subscription",
        "--workers",
        frozenset({"web"}),
    ),
    Setting(
        "event_loop",
        "PROGRESS_SSE_LOOP",
        _event_loop,
        "the web's event loop: uvloop (the `uvloop` extra), asyncio, or auto: uvloop when it is installed",
        "--loop",
        _WEB,
    ),
    Setting(
        "header_timeout",
        "PROGRESS_SSE_HEADER_TIMEOUT",
        _positive_float,
        "seconds from a request's first byte to the end of its headers; slower gets 408 and is closed",
    ),
    Setting(
        "body_timeout",
        "PROGRESS_SSE_BODY_TIMEOUT",
        _positive_float,
        "seconds a request's declared body may take to arrive; slower gets 408 and is closed",
    ),
    Setting(
        "keepalive_timeout",
        "PROGRESS_SSE_KEEPALIVE_TIMEOUT",
        _positive_float,
        "seconds an idle connection (no request under way) stays open",
    ),
    Setting(
        "max_connections",
        "PROGRESS_SSE_MAX_CONNECTIONS",
        _positive_int,
        "client connections per web process; beyond, idle ones are closed, else the new one",
        default_text="the file-descriptor limit less headroom",
    ),
    Setting(
        "queued_timeout",
        "PROGRESS_SSE_QUEUED_TIMEOUT",
        _positive_int,
        "seconds after which a task still queued whose message a Redis broker no longer holds ends as lost",
    ),
    Setting(
        "outbox_ttl",
        "PROGRESS_SSE_OUTBOX_TTL",
        _positive_int,
        "seconds a process keeps an event Redis did not take, trying it again, before dropping it",
    ),
    Setting(
        "log_format",
        "PROGRESS_SSE_LOG_FORMAT",
        _log_format,
        "log lines: text, or json: one JSON object per line (the access log's included), for a platform to parse",
        "--log-format",
        _SERVERS,
    ),
)
