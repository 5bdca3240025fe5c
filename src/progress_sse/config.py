"""Settings for every process, read from the environment.

`Settings.from_env(environ)` takes a plain mapping so tests feed it a dict, and
every error names the variable and the bad value: a person reading the message
knows exactly what to change.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, TypeVar
from urllib.parse import urlsplit

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
    max_rate: float = 20.0
    key_prefix: str = "progress-sse"
    queue: str = "celery"
    # Seconds without a heartbeat after which a worker counts as gone and its
    # running tasks as lost (it beats every third of that).
    worker_ttl: int = 30
    # "package.module:ATTRIBUTE" naming an AllowList; None means the demo tasks.
    allowlist: str | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Settings:
        d = cls()  # the defaults (slots=True leaves no class attributes to read them from)
        values: dict[str, Any] = {}
        for setting in TABLE:  # in order: a default may be an earlier setting's value
            default = values[setting.default_from] if setting.default_from else getattr(d, setting.attr)
            values[setting.attr] = _get(environ, setting.env, setting.parse, default)
        return cls(**values)

    def to_env(self) -> dict[str, str]:
        """These settings as the environment variables that give them: for child
        processes, which read their settings from the environment."""
        pairs = ((s.env, getattr(self, s.attr)) for s in TABLE)
        return {env: str(value) for env, value in pairs if value is not None}

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


def is_redis_url(url: str) -> bool:
    """A URL redis-py connects to (the broker URL may be another transport)."""
    return urlsplit(url).scheme in ("redis", "rediss", "unix")


def _get(environ: Mapping[str, str], key: str, parse: Callable[[str], _T], default: _T) -> _T:
    raw = environ.get(key)
    if raw is None or raw.strip() == "":
        return default
    try:
        return parse(raw.strip())
    except ValueError as exc:
        raise ConfigError(f"{key}={raw!r} is not valid: {exc}") from None


def _redis_url(raw: str) -> str:
    # Events live in Redis whatever the broker is: an amqp:// URL here would only
    # fail later, with a traceback, when the first client connects.
    if not is_redis_url(raw) or "://" not in raw:
        raise ValueError("expected a Redis URL: redis://host:6379/0, rediss://… or unix:///path/redis.sock")
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
    r"(redis|rediss|unix|sentinel|amqp|amqps|pyamqp|memory)://.*",
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


_SERVERS = frozenset({"web", "worker", "dev"})
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
)
