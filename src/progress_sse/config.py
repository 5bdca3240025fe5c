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
        redis_url = _get(environ, "REDIS_URL", _redis_url, d.redis_url)
        return cls(
            redis_url=redis_url,
            broker_url=_get(environ, "CELERY_BROKER_URL", _broker_url, redis_url),
            host=_get(environ, "HOST", _nonempty, d.host),
            port=_get(environ, "PORT", _port, d.port),
            heartbeat=_get(environ, "PROGRESS_SSE_HEARTBEAT", _positive_float, d.heartbeat),
            history_ttl=_get(environ, "PROGRESS_SSE_HISTORY_TTL", _positive_int, d.history_ttl),
            history_max=_get(environ, "PROGRESS_SSE_HISTORY_MAX", _positive_int, d.history_max),
            max_rate=_get(environ, "PROGRESS_SSE_MAX_RATE", _positive_float, d.max_rate),
            key_prefix=_get(environ, "PROGRESS_SSE_KEY_PREFIX", _key_prefix, d.key_prefix),
            queue=_get(environ, "PROGRESS_SSE_QUEUE", _nonempty, d.queue),
            allowlist=_get(environ, "PROGRESS_SSE_ALLOWLIST", _import_path, d.allowlist),
            worker_ttl=_get(environ, "PROGRESS_SSE_WORKER_TTL", _positive_int, d.worker_ttl),
        )

    def with_(self, **changes: Any) -> Settings:
        """A copy with some fields changed (tests and the CLI's flags use it)."""
        return replace(self, **changes)


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


def _broker_url(raw: str) -> str:
    # The transports Celery users run; Sentinel is a Redis one.
    if not re.match(r"^(redis|rediss|unix|sentinel|amqp|amqps|pyamqp|memory)://", raw):
        raise ValueError("expected a Celery broker URL such as redis://localhost:6379/0 or amqp://host//")
    return raw


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


def _import_path(raw: str) -> str:
    if not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", raw):
        raise ValueError("expected package.module:ATTRIBUTE, e.g. myapp.progress:ALLOWED")
    return raw


def _key_prefix(raw: str) -> str:
    # Braces would break the {task_id} hash tags, spaces the key-name parsing of redis-cli users.
    if not re.fullmatch(r"[A-Za-z0-9_.:-]{1,64}", raw):
        raise ValueError("expected 1 to 64 letters, digits or _ . : -")
    return raw
