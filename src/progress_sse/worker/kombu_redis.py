"""Prefetched tasks survive a Redis broker outage: a workaround for kombu's Redis transport.

When a worker loses its broker connection, Celery drops the messages it had
prefetched (received, not yet started) from memory, and kombu's Redis QoS is to
put them back on their queue: it moves them from the broker's `unacked` hash to
their list. It tries that once (`QoS.restore_unacked_once`), at once, against the
Redis that has just gone away, so during an outage it cannot work:

- it raises a ConnectionError (what kombu 5.7 does here), or
- run by a channel closed after `Connection.collect` detached its transport, it
  raises `AttributeError: 'NoneType' object has no attribute 'hostname'` from
  `Channel._connparams` (https://github.com/celery/kombu/issues/970). Celery
  closes its consumers through `ignore_errors`, which passes only connection and
  channel errors, so that one can stop the worker.

Either way the messages stay in the `unacked` hash. Only `restore_visible` brings
them back, once they are older than `visibility_timeout` (1 hour by default), so
their tasks sit at `queued` that long. kombu never restores unacked messages on
reconnection (https://github.com/celery/celery/issues/1307, closed unfixed).

The patch: a restore that fails remembers the messages' delivery tags, and the
next `restore_visible` call puts them back. kombu calls it when a new connection
joins the worker's event loop (`MultiChannelPoller.on_poll_init`) and every
`unacked_restore_interval` seconds after, or after each empty poll without an
event loop. The restore is kombu's own `restore_by_tag`: one transaction that
moves the message only if it is still in the `unacked` hash, so a message acked
or restored meanwhile is not queued twice. Nothing changes while restores work.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

# Delivery tags whose restore failed, in delivery order, by the name of the unacked
# hash they are in (an insertion-ordered dict as an ordered set).
_stranded: dict[str, dict[str, None]] = {}
_lock = threading.Lock()
_applied = False


def apply() -> bool:
    """Patch kombu's Redis QoS, once per process. False when kombu's Redis transport
    cannot be imported (no redis-py), or does not have the methods this patches."""
    global _applied
    with _lock:
        if _applied:
            return True
        try:
            from kombu.transport import redis as transport
        except ImportError:
            return False
        qos: Any = getattr(transport, "QoS", None)
        needed = ("restore_unacked", "restore_visible", "restore_by_tag")
        if not all(callable(getattr(qos, name, None)) for name in needed):
            return False
        qos.restore_unacked = _deferring(qos.restore_unacked)
        qos.restore_visible = _restoring_first(qos.restore_visible)
        _applied = True
        return True


def stranded() -> int:
    """How many messages wait to be put back (for tests and logs)."""
    with _lock:
        return sum(len(tags) for tags in _stranded.values())


def _deferring(restore_unacked: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(restore_unacked)
    def patched(self: Any, client: Any = None) -> Any:
        dirty: set[str] = getattr(self, "_dirty", set())
        tags = [tag for tag in self._delivered if tag not in dirty]
        try:
            return restore_unacked(self, client)
        except Exception as exc:
            # Ours to restore now; cleared, as kombu would have, so that a later
            # restore_unacked_once of this QoS finds nothing (it asserts that).
            self._delivered.clear()
            if tags:
                with _lock:
                    _stranded.setdefault(_key(self), {}).update(dict.fromkeys(tags))
                log.warning(
                    "progress-sse: kombu could not put %d prefetched message(s) back on their queue (%s: %s); "
                    "they go back when the broker connection is restored (kombu#970 workaround)",
                    len(tags),
                    type(exc).__name__,
                    exc,
                )
            return None

    return patched


def _restoring_first(restore_visible: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(restore_visible)
    def patched(self: Any, *args: Any, **kwargs: Any) -> Any:
        _restore_stranded(self)
        return restore_visible(self, *args, **kwargs)

    return patched


def _restore_stranded(qos: Any) -> None:
    key = _key(qos)
    with _lock:
        tags = list(_stranded.get(key, ()))
    if not tags:
        return
    restored, gone = [], 0
    try:
        with qos.channel.conn_or_acquire() as client:
            for tag in tags:
                if not client.hexists(qos.unacked_key, tag):
                    gone += 1  # acked meanwhile, or the broker lost its data
                qos.restore_by_tag(tag, client=client)
                restored.append(tag)
    except Exception:  # the broker is still away: the next call tries again
        log.debug("progress-sse: prefetched messages not put back yet", exc_info=True)
    if restored:
        with _lock:
            left = _stranded.get(key, {})
            for tag in restored:
                left.pop(tag, None)
            if not left:
                _stranded.pop(key, None)
        log.warning(
            "progress-sse: put %d prefetched message(s) back on their queue after the broker came back%s",
            len(restored) - gone,
            f" ({gone} no longer in the broker)" if gone else "",
        )


def _key(qos: Any) -> str:
    return str(getattr(qos.channel, "unacked_key", "unacked"))
