"""Celery signal handlers that stream every task's life to Redis.

`install(app)` is the one call: afterwards every task the process publishes gets
`queued`, and every task a worker runs gets `started`, `retry` and its terminal
event, with no change to the task. Handlers are connected strongly (a weak
reference to a function defined here can be collected and then silently stops
firing), accept `**kwargs` (Celery adds arguments over time), and never raise into
Celery: a Redis outage costs neither tasks nor events, as a write Redis does not
take waits in the process for Redis to answer again (outbox.py). Installed in a
worker, it also keeps the tasks the worker had prefetched through a broker outage
(kombu_redis.py).
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from celery import Celery, signals
from redis.sentinel import SentinelConnectionPool

from ..config import Settings, is_redis_url, redacted
from ..connections import LazyCluster
from ..events import State, dumps, json_safe, make_event
from ..redis_urls import from_kombu
from . import broker, kombu_redis, progress
from .outbox import Outbox
from .progress import Coalescer
from .publisher import CONNECTION_ERRORS, Publisher

log = logging.getLogger(__name__)

_UID = "progress-sse"
# A result bigger than this is not copied into every watcher's stream.
MAX_RESULT_BYTES = 64 * 1024

_publisher: Publisher | None = None
_app: Celery | None = None
# Writes that Redis did not take, tried again until it does (outbox.py).
_outbox = Outbox()
_worker_ttl = Settings().worker_ttl
_heartbeat: _Heartbeat | None = None
# This worker process's life: a worker restarted under the same hostname is another
# instance, so the tasks the killed one was running are still found lost. Made at
# import, in the parent, so the pool processes forked from it share it.
_instance = uuid.uuid4().hex


class _Heartbeat(threading.Thread):
    """Keeps `<prefix>:worker:{hostname}` alive while the worker's parent process is.
    When it expires (the worker was killed outright, no signal sent), the web
    process marks the worker's running tasks `lost` (web/reaper.py)."""

    def __init__(self, publisher: Publisher, hostname: str, ttl: int) -> None:
        super().__init__(name="progress-sse heartbeat", daemon=True)
        self.publisher, self.hostname, self.ttl = publisher, hostname, ttl
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                self.publisher.worker_alive(self.hostname, _instance, self.ttl)
            except Exception:
                log.warning("progress-sse could not send the worker heartbeat", exc_info=True)
            self.stopped.wait(self.ttl / 3)


def install(
    app: Celery | None = None,
    settings: Settings | None = None,
    *,
    publisher: Publisher | None = None,
) -> Publisher:
    """Stream the tasks of this process to Redis; idempotent. Returns the publisher.

    Settings default to the environment (`REDIS_URL`, ...). Without `REDIS_URL`,
    events go where the app's own broker is when that is a Redis: the place a user
    expects, rather than a localhost default the web process may not read. Call it
    after the app is configured (after `config_from_object`), so its broker is known.
    Celery's signals are process-wide, so every app in the process is covered.
    """
    global _publisher, _worker_ttl, _app
    if settings is None:
        settings = _settings_for(app)
    publisher = publisher or Publisher.from_settings(settings)
    _publisher = publisher
    _app = app
    _worker_ttl = settings.worker_ttl
    _outbox.ttl = settings.outbox_ttl
    progress.configure(Coalescer(publisher, max_rate=settings.max_rate, outbox=_outbox))
    # A worker's prefetched tasks survive a Redis broker outage (kombu_redis's docstring).
    kombu_redis.apply()
    for signal, handler in _HANDLERS:
        signal.connect(handler, weak=False, dispatch_uid=f"{_UID}:{handler.__name__}")
    _announce(f"progress-sse records events in {_where(publisher)}")
    return publisher


_announced = False


def _announce(line: str) -> None:
    """Say once, at INFO, where events go: a mismatch with the web is then one look
    away. A worker imports the app (and so runs install) before its logging is set
    up; what is said then reaches no handler, so worker_ready says it instead."""
    global _announced
    if log.isEnabledFor(logging.INFO) and log.hasHandlers():
        log.info("%s", line)
        _announced = True


def _settings_for(app: Celery | None) -> Settings:
    settings = Settings.from_env(os.environ)
    if os.environ.get("REDIS_URL", "").strip() or app is None:
        return settings
    broker = app.conf.broker_url
    if isinstance(broker, list | tuple):  # failover brokers: the first is the primary
        broker = broker[0] if broker else None
    if isinstance(broker, str):
        behind_sentinel = from_kombu(broker, dict(app.conf.broker_transport_options or {}))
        if behind_sentinel is not None:
            return settings.with_(redis_url=behind_sentinel)
        broker = broker.split(";", 1)[0].strip()
        if is_redis_url(broker):
            return settings.with_(redis_url=broker)
    return settings


def _where(publisher: Publisher) -> str:
    """Where events go, for the one log line that makes a mismatch with the web visible."""
    if isinstance(publisher.client, LazyCluster):  # not connected yet: said as configured
        return f"{redacted(publisher.client.url)} under the key prefix {publisher.keys.prefix!r}"
    pool = publisher.client.connection_pool
    kwargs = pool.connection_kwargs  # read back from the client: it never holds the password in view
    if isinstance(pool, SentinelConnectionPool):  # the master Sentinel names, whichever node that is now
        service = pool.service_name
        addresses = (s.connection_pool.connection_kwargs for s in pool.sentinel_manager.sentinels)
        sentinels = ",".join(f"{a.get('host')}:{a.get('port')}" for a in addresses)
        place = f"redis+sentinel://{sentinels}/{service}/{kwargs.get('db', 0)}"
    elif "path" in kwargs:
        place = f"unix://{kwargs['path']}?db={kwargs.get('db', 0)}"
    else:
        scheme = "rediss" if pool.connection_class.__name__ == "SSLConnection" else "redis"
        place = f"{scheme}://{kwargs.get('host')}:{kwargs.get('port')}/{kwargs.get('db', 0)}"
    return f"{place} under the key prefix {publisher.keys.prefix!r}"


def uninstall() -> None:
    global _publisher, _app
    for signal, handler in _HANDLERS:
        signal.disconnect(handler, dispatch_uid=f"{_UID}:{handler.__name__}")
    progress.configure(None)
    _publisher = None
    _app = None


def _never_raises(handler: Callable[..., None]) -> Callable[..., None]:
    """Celery would log a handler's exception, but a bug of ours must not even do
    that much to a task: log it as ours and carry on."""

    @functools.wraps(handler)
    def guarded(*args: Any, **kwargs: Any) -> None:
        try:
            handler(*args, **kwargs)
        except Exception:
            log.warning("progress-sse: %s failed", handler.__name__, exc_info=True)

    return guarded


def _tracked(name: str | None) -> bool:
    # Celery's own housekeeping tasks (chord_unlock, backend_cleanup, ...) are not jobs.
    return bool(name) and not str(name).startswith("celery.")


@_never_raises
def _on_before_publish(
    sender: str | None = None,
    headers: dict[str, Any] | None = None,
    body: Any = None,
    **kwargs: Any,
) -> None:
    publisher = _publisher
    headers = headers or {}
    name = headers.get("task") or sender
    if publisher is None or not _tracked(name):
        return
    if headers.get("retries"):  # a retry publishing itself again: `retry` tells that story
        return
    task_id = headers.get("id") or (body.get("id") if isinstance(body, dict) else None)
    if not task_id:
        return
    # Where the message goes: the reaper looks for a stale queued task's message only there.
    fields: dict[str, str] = {"broker": _broker_fingerprint()}
    group_id = headers.get("group")
    if group_id:  # a member of a Celery group: watchable as one bar at /groups/<id>
        try:
            publisher.join_group(str(group_id), str(task_id))
        except Exception:
            log.warning("progress-sse could not record group %s", group_id, exc_info=True)
        fields["group"] = str(group_id)
    event = make_event(str(task_id), str(name), State.QUEUED)

    def queue(late: bool = False) -> None:
        publisher.publish(event, only_if=(), **fields)

    _write(str(task_id), "queued", queue, event)


def _broker_fingerprint() -> str:
    """The fingerprint of the broker this process publishes to: the installed app's,
    else Celery's current app's (install() without an app)."""
    app = _app
    if app is None:
        from celery import current_app

        app = current_app
    return broker.fingerprint(app.conf.broker_url)


@_never_raises
def _on_received(sender: Any = None, request: Any = None, **kwargs: Any) -> None:
    # Runs in the worker's parent when a message arrives. Celery keeps revocations
    # only in the memory of workers that heard the broadcast; one revoked while no
    # worker was up (DELETE stores `revoked` then) would otherwise still run.
    publisher = _publisher
    task_id = getattr(request, "id", None)
    if publisher is None or task_id is None or not _tracked(getattr(request, "name", None)):
        return
    if publisher.state(task_id) == State.REVOKED:
        from celery.worker import state as worker_state

        worker_state.revoked.add(task_id)  # the pool skips it and reports it revoked


@_never_raises
def _on_prerun(task_id: str | None = None, task: Any = None, **kwargs: Any) -> None:
    publisher = _publisher
    name = getattr(task, "name", None)
    if publisher is None or task_id is None or not _tracked(name):
        return
    event = make_event(task_id, name, State.STARTED)
    request = getattr(task, "request", None)
    fields: dict[str, Any] = {"worker": getattr(request, "hostname", None) or "", "pid": os.getpid()}
    if not getattr(request, "retries", 0):  # started_at is the first attempt's
        fields["started_at"] = event["ts"]

    def start(late: bool = False) -> None:
        # Late (from the outbox), only while still queued: progress stored since says more.
        only_if = (State.QUEUED, None) if late else ()
        if publisher.publish(event, only_if=only_if, **fields) is None and not late:
            return  # refused: the task had already ended (revoked meanwhile)
        if fields["worker"]:
            publisher.task_running(task_id, fields["worker"], _instance)

    _write(task_id, "started", start, event)


@_never_raises
def _on_worker_ready(sender: Any = None, **kwargs: Any) -> None:
    global _heartbeat
    hostname = getattr(sender, "hostname", None)
    if _publisher is None or not hostname or _heartbeat is not None:
        return
    _heartbeat = _Heartbeat(_publisher, str(hostname), _worker_ttl)
    _heartbeat.start()
    if not _announced:
        _announce(f"progress-sse: worker {hostname} records events in {_where(_publisher)}")


@_never_raises
def _on_beat_init(sender: Any = None, **kwargs: Any) -> None:
    # `celery beat` records `queued` for each task it sends (before_task_publish runs
    # in the sending process). Like a worker, it imports the app before its logging
    # is set up, so this is where it can say where those events go.
    if _publisher is not None and not _announced:
        _announce(f"progress-sse: beat records the tasks it sends in {_where(_publisher)}")


# Seconds a stopping process gives the starts and ends still waiting for Redis.
OUTBOX_GRACE = 2.0


@_never_raises
def _on_process_shutdown(**kwargs: Any) -> None:
    # A pool process that exits (worker shutdown, max-tasks-per-child) takes its outbox along.
    if len(_outbox):
        _outbox.flush(OUTBOX_GRACE)


@_never_raises
def _on_worker_shutdown(sender: Any = None, **kwargs: Any) -> None:
    global _heartbeat
    if len(_outbox):
        _outbox.flush(OUTBOX_GRACE)
    if _heartbeat is None:
        return
    _heartbeat.stopped.set()
    # Tasks a cold shutdown cut short are then marked lost at once, not after the TTL.
    _heartbeat.publisher.worker_gone(_heartbeat.hostname, _instance)
    _heartbeat = None


@_never_raises
def _on_retry(sender: Any = None, request: Any = None, reason: Any = None, **kwargs: Any) -> None:
    task_id = getattr(request, "id", None)
    name = getattr(sender, "name", None)
    if _publisher is None or task_id is None or not _tracked(name):
        return
    extra: dict[str, Any] = {"retries": int(getattr(request, "retries", 0) or 0) + 1}
    when = getattr(reason, "when", None)
    if isinstance(when, int | float):
        extra["eta"] = round(time.time() + when, 3)
    elif when is not None and hasattr(when, "timestamp"):
        extra["eta"] = round(when.timestamp(), 3)
    exc = getattr(reason, "exc", None)
    message = f"{type(exc).__name__}: {exc}" if exc is not None else str(reason or "retrying")
    if exc is not None:  # as a failure's: events.for_watcher can then hide the message
        extra["error"] = {"type": type(exc).__name__, "message": str(exc)}
    _finish(task_id, name, State.RETRY, message=message, **extra)


@_never_raises
def _on_success(sender: Any = None, result: Any = None, **kwargs: Any) -> None:
    request = getattr(sender, "request", None)
    task_id = getattr(request, "id", None)
    name = getattr(sender, "name", None)
    if _publisher is None or task_id is None or not _tracked(name):
        return
    _finish(task_id, name, State.SUCCESS, result=_result(result))


@_never_raises
def _on_failure(
    sender: Any = None,
    task_id: str | None = None,
    exception: BaseException | None = None,
    einfo: Any = None,
    **kwargs: Any,
) -> None:
    name = getattr(sender, "name", None)
    if _publisher is None or task_id is None or not _tracked(name):
        return
    error = {
        "type": type(exception).__name__ if exception is not None else "Error",
        "message": str(exception) if exception is not None else "",
        "traceback": str(getattr(einfo, "traceback", "") or ""),
    }
    _finish(task_id, name, State.FAILURE, message=error["message"] or error["type"], error=error)


@_never_raises
def _on_revoked(
    sender: Any = None,
    request: Any = None,
    terminated: bool = False,
    expired: bool = False,
    **kwargs: Any,
) -> None:
    # Runs in the worker's parent process: the pool process may be gone, so the
    # request (not the task's context) is what says which task this was.
    task_id = getattr(request, "id", None)
    name = getattr(sender, "name", None) or getattr(request, "task_name", None)
    if _publisher is None or task_id is None or not _tracked(name):
        return
    reason = "expired" if expired else "terminated" if terminated else "revoked"
    _finish(task_id, name, State.REVOKED, message=f"Task {reason}", reason=reason)


@_never_raises
def _on_unknown(sender: Any = None, name: str | None = None, id: str | None = None, **kwargs: Any) -> None:
    # A worker got a task it does not have (the web's allow-list names a task this
    # worker's app lacks, or the worker runs old code). Celery drops the message and
    # records NotRegistered; without this the task's watchers would wait at
    # "queued" for ever.
    if _publisher is None or not id or not _tracked(name):
        return
    # The worker's name goes in its own field, which only operators see.
    host = getattr(sender, "hostname", None)  # sender: the worker's Consumer
    message = (
        f"A worker does not know the task {name!r} and dropped it: register it in the worker's app, "
        "or start the worker that has it on this queue"
    )
    error = {"type": "NotRegistered", "message": message, "traceback": ""}
    _finish(str(id), name, State.FAILURE, message=message, error=error, **({"worker": host} if host else {}))


def _finish(task_id: str, name: str | None, state: State, *, message: str | None = None, **extra: Any) -> None:
    """Publish the last pending progress, then `state` with the counts it carried:
    this process knows them better than Redis does while they are unsent."""
    publisher = _publisher
    assert publisher is not None
    coalescer = progress.active()
    last = coalescer.flush(task_id) if coalescer is not None else None
    counts = (last[0], last[1]) if last is not None else None
    ts = round(time.time(), 3)  # when it ended, even if it is stored later

    def end(late: bool = False) -> None:
        publisher.finish(task_id, name, state, counts=counts, message=message, ts=ts, **extra)

    _write(task_id, str(state), end, {"message": message, **extra})


def _write(task_id: str, what: str, write: Callable[..., None], sized: Mapping[str, Any]) -> None:
    """`write()` now; if Redis does not answer, `write(late=True)` from the outbox,
    until it does. Behind any earlier write of the task still waiting there.
    `sized`: what the event carries, whose JSON counts against the outbox's bound."""
    if not _outbox.holds(task_id):
        try:
            write()
            return
        except CONNECTION_ERRORS:
            pass
        except Exception:
            log.warning("progress-sse could not store the %s event of task %s", what, task_id, exc_info=True)
            return
    _outbox.add(task_id, what, functools.partial(write, late=True), size=len(dumps(sized)) + _EVENT_BYTES)


# Bytes of an event's JSON beyond what `_write` is given (id, name, state, counts, ts).
_EVENT_BYTES = 200


def _result(result: Any) -> Any:
    safe = json_safe(result)
    size = len(dumps(safe).encode())
    if size > MAX_RESULT_BYTES:
        return f"<result of {size} bytes not streamed>"
    return safe


_HANDLERS = (
    (signals.before_task_publish, _on_before_publish),
    (signals.task_received, _on_received),
    (signals.task_prerun, _on_prerun),
    (signals.worker_ready, _on_worker_ready),
    (signals.beat_init, _on_beat_init),
    (signals.worker_shutdown, _on_worker_shutdown),
    (signals.worker_process_shutdown, _on_process_shutdown),
    (signals.task_retry, _on_retry),
    (signals.task_success, _on_success),
    (signals.task_failure, _on_failure),
    (signals.task_revoked, _on_revoked),
    (signals.task_unknown, _on_unknown),
)
