"""The aiohttp application: routes, typed app keys, Redis lifetime, shutdown.

`create_app(settings)` is the whole web process. Blocking Celery calls (publishing,
revoking) and the worker-side publisher run in threads so the event loop never
waits on them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError
from celery import Celery
from kombu.exceptions import OperationalError

from . import groups, pages, reaper
from .allowlist import AllowList, ParamError
from .allowlist import load as load_allowlist
from .celery_progress import celery_progress_json
from .celeryapp import make_celery
from .config import Settings
from .connections import hub_client, web_client
from .demo import DEMO_TASKS
from .errors import error, json_errors
from .events import State, is_terminal, make_event
from .hub import Hub, Signal
from .keys import Keys, is_task_id
from .publisher import Publisher
from .store import Store, describe
from .streams import EventStream

log = logging.getLogger(__name__)

MAX_BODY = 64 * 1024
# /events?task=…&fresh=… for 100 ids of the longest allowed length (keys.is_task_id)
# is about 41 KB of request line; aiohttp's default limit is 8 KiB.
MAX_REQUEST_LINE = 64 * 1024
# What `web.run_app` (or an AppRunner) needs to serve these routes well; `progress-sse
# web` passes exactly these. handler_cancellation: a handler whose client went away
# is cancelled at once, releasing its watcher instead of waiting for a write to fail.
# The others go to each connection's request handler (aiohttp has no `handler_args`
# for run_app: unknown arguments are dropped there with a warning, limits and all).
RUN_OPTIONS: dict[str, Any] = {
    "handler_cancellation": True,
    "max_line_size": MAX_REQUEST_LINE,
    "keepalive_timeout": 75.0,
}
MAX_STREAM_TASKS = 100
# How long DELETE waits for the worker to confirm a running task's revocation
# before it records the revocation itself (PROTOCOL.md: watchers know within 2 s).
REVOKE_GRACE = 1.5

SETTINGS = web.AppKey("settings", Settings)
ALLOWLIST = web.AppKey("allowlist", AllowList)
CELERY = web.AppKey("celery", Celery)
REDIS = web.AppKey("redis", aioredis.Redis)
STORE = web.AppKey("store", Store)
HUB = web.AppKey("hub", Hub)
STREAMS = web.AppKey("streams", EventStream)
PUBLISHER = web.AppKey("publisher", Publisher)


def create_app(
    settings: Settings,
    *,
    allowlist: AllowList | None = None,
    celery: Celery | None = None,
) -> web.Application:
    """The progress service. Mount it in your own aiohttp app with
    `app.add_subapp("/progress/", create_app(settings, allowlist=...))`: your
    middlewares (auth, ...) run in front of it and its URLs carry the prefix.

    `allowlist` defaults to `settings.allowlist` (PROGRESS_SSE_ALLOWLIST), else the
    demo tasks."""
    app = web.Application(middlewares=[json_errors])
    app[SETTINGS] = settings
    if allowlist is None:
        allowlist = load_allowlist(settings.allowlist) if settings.allowlist else DEMO_TASKS
    app[ALLOWLIST] = allowlist
    app[CELERY] = celery or make_celery(settings)
    pages.setup(app)
    app.cleanup_ctx.append(_redis_ctx)
    app.on_shutdown.append(_end_streams)
    app.add_routes(
        [
            web.post("/tasks", start_task),
            web.get("/tasks", recent_tasks),
            web.get("/tasks/{task_id}", task_state, name="task"),
            web.delete("/tasks/{task_id}", cancel_task),
            web.get("/tasks/{task_id}/events", task_events),
            web.get("/events", many_events),
            web.get("/groups/{group_id}", group_state),
            web.get("/groups/{group_id}/events", group_events),
            web.get("/healthz", healthz),
        ]
    )
    return app


async def _redis_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    keys = Keys(settings.key_prefix)
    client = web_client(settings)
    hub_redis = hub_client(settings)
    hub = Hub(hub_redis, keys)
    app[REDIS] = client
    app[STORE] = Store(client, keys)
    app[HUB] = hub
    app[STREAMS] = EventStream(hub, app[STORE], heartbeat=settings.heartbeat)
    app[PUBLISHER] = Publisher.from_settings(settings)
    await hub.start()
    reaper_task = asyncio.create_task(reaper.run(client, keys, app[PUBLISHER], settings.worker_ttl))
    try:
        yield
    finally:
        reaper_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reaper_task
        await hub.close()
        await hub_redis.aclose()
        await client.aclose()
        app[PUBLISHER].client.close()
        await asyncio.to_thread(app[CELERY].close)


async def _end_streams(app: web.Application) -> None:
    if HUB in app:
        app[HUB].close_watchers()


def _json(body: Any, status: int = 200, **kwargs: Any) -> web.Response:
    return web.json_response(body, status=status, dumps=_dumps, **kwargs)


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _task_id(request: web.Request) -> str:
    task_id = request.match_info["task_id"]
    if not is_task_id(task_id):
        raise error(web.HTTPNotFound, f"{task_id!r} is not a task id.")
    return task_id


async def start_task(request: web.Request) -> web.Response:
    if request.content_type != "application/json":
        raise error(
            web.HTTPUnsupportedMediaType,
            f"Send the task as JSON with Content-Type: application/json (got {request.content_type!r}).",
        )
    body = await _read_body(request)
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise error(web.HTTPBadRequest, f"The body is not valid JSON: {exc}.") from None
    except RecursionError:
        raise error(web.HTTPBadRequest, "The body nests JSON too deeply.") from None
    if not isinstance(data, dict):
        raise error(
            web.HTTPBadRequest, 'The body must be a JSON object like {"name": "demo.count", "kwargs": {"n": 20}}.'
        )
    name = data.get("name")
    try:
        kwargs = request.app[ALLOWLIST].check(name, data.get("args", []), data.get("kwargs", {}))
    except ParamError as exc:
        raise error(web.HTTPUnprocessableEntity, f"{exc}.") from None

    # Counted first: once the task is queued, a failure here must not turn its 202
    # into an error the client would answer by starting it again.
    workers = await _workers(request.app)
    task_id = str(uuid.uuid4())
    cursor = await asyncio.to_thread(_queue, request.app, task_id, str(name), kwargs)
    # url_for includes the prefix when this app is mounted as a sub-app.
    location = str(request.app.router["task"].url_for(task_id=task_id))
    answer = {
        "id": task_id,
        "name": name,
        "state": State.QUEUED,
        "status_url": location,
        "events_url": f"{location}/events",
        # The queued event's: a stream resumed from just before it shows every event.
        "cursor": str(cursor),
        **workers,
    }
    return _json(answer, status=202, headers={"Location": location})


NO_WORKER = "No worker is running: started tasks wait in the queue."


async def _workers(app: web.Application) -> dict[str, Any]:
    """`workers` (live heartbeats), and a `warning` when there are none: a task
    queued then waits, and its page would otherwise just sit at "queued"."""
    count = await reaper.live_workers(app[REDIS], app[STORE].keys)
    return {"workers": count, "warning": NO_WORKER} if count == 0 else {"workers": count}


async def _read_body(request: web.Request) -> bytes:
    too_big = f"The body is larger than {MAX_BODY // 1024} KiB."
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise error(web.HTTPRequestEntityTooLarge, too_big, max_size=MAX_BODY, actual_size=request.content_length)
    body = bytearray()
    try:
        async for chunk in request.content.iter_chunked(16 * 1024):
            body += chunk
            if len(body) > MAX_BODY:  # chunked uploads have no Content-Length to check first
                raise error(web.HTTPRequestEntityTooLarge, too_big, max_size=MAX_BODY, actual_size=len(body))
    except (HttpProcessingError, RequestPayloadError) as exc:  # e.g. Content-Encoding: gzip on a body that is not
        cause = exc.__cause__ if isinstance(exc.__cause__, HttpProcessingError) else exc
        detail = getattr(cause, "message", "") or "it is malformed"
        raise error(web.HTTPBadRequest, f"The body could not be read: {detail}.") from None
    return bytes(body)


def _queue(app: web.Application, task_id: str, name: str, kwargs: dict[str, Any]) -> int | None:
    """Store `queued`, then publish; if publishing fails, forget the task again so
    nothing is left half-queued. Runs in a thread: both calls block."""
    publisher = app[PUBLISHER]
    cursor = publisher.publish(make_event(task_id, name, State.QUEUED))
    try:
        app[CELERY].send_task(
            name,
            kwargs=kwargs,
            task_id=task_id,
            retry_policy={"max_retries": 2, "interval_start": 0, "interval_step": 0.2},
        )
    except Exception as exc:
        publisher.discard(task_id)
        raise _broker_failed(exc, f"publish task {task_id} ({name})", "nothing was queued.") from None
    return cursor


def _broker_failed(exc: Exception, action: str, consequence: str) -> web.HTTPException:
    """The answer to a failed call to the Celery broker.

    503 when the broker does not answer: that passes, and the client may retry.
    Anything else means this process cannot use its broker at all (a transport
    that fails to import, a bad URL): a 500 that says so, since blaming the broker
    would send its operator the wrong way. The exception's own text stays in the
    log; it may describe this server's internals."""
    if isinstance(exc, OperationalError | OSError):  # kombu wraps connection failures in OperationalError
        log.warning("could not %s: the broker does not answer: %s", action, exc)
        return error(
            web.HTTPServiceUnavailable,
            f"The task queue (Celery broker) is not answering; {consequence} Try again shortly.",
            headers={"Retry-After": "2"},
        )
    log.error("could not %s: this process cannot use its broker", action, exc_info=exc)
    return error(
        web.HTTPInternalServerError,
        f"This server cannot use its task queue ({type(exc).__name__}); {consequence} "
        "Its operator will find the cause in the web process's log.",
    )


async def task_state(request: web.Request) -> web.Response:
    if pages.wants_html(request):
        task_id = request.match_info["task_id"]
        known = is_task_id(task_id) and await request.app[STORE].task(task_id) is not None
        return await pages.task_page(request, task_id, known)
    task_id = _task_id(request)
    state = await request.app[STORE].task(task_id)
    if request.query.get("format") == "celery-progress":
        # celery-progress's view shape, for polling front ends mid-migration. An id
        # not seen yet is PENDING there (its JS stops polling on any non-200).
        return _json(celery_progress_json(describe(state) if state else None))
    if state is None:
        raise error(web.HTTPNotFound, f"There is no task {task_id!r} (or its history has expired).")
    return _json(describe(state))


async def task_events(request: web.Request) -> web.StreamResponse:
    task_id = _task_id(request)
    return await request.app[STREAMS].serve(request, [task_id], single=True)


async def many_events(request: web.Request) -> web.StreamResponse:
    task_ids: list[str] = []
    for value in request.query.getall("task", []):
        for task_id in value.split(","):
            if task_id and task_id not in task_ids:
                task_ids.append(task_id)
    if not task_ids:
        raise error(web.HTTPBadRequest, "Name the tasks to watch: /events?task=<id>&task=<id>.")
    if len(task_ids) > MAX_STREAM_TASKS:
        raise error(
            web.HTTPBadRequest,
            f"At most {MAX_STREAM_TASKS} tasks per stream, not {len(task_ids)}; open another stream for the rest.",
        )
    bad = [t for t in task_ids if not is_task_id(t)]
    if bad:
        raise error(web.HTTPBadRequest, f"{bad[0]!r} is not a task id.")
    fresh = {t for value in request.query.getall("fresh", []) for t in value.split(",")}
    return await request.app[STREAMS].serve(request, task_ids, single=False, fresh=fresh & set(task_ids))


def _group_id(request: web.Request) -> str:
    group_id = request.match_info["group_id"]
    if not is_task_id(group_id):
        raise error(web.HTTPNotFound, f"{group_id!r} is not a group id.")
    return group_id


async def group_state(request: web.Request) -> web.Response:
    return await groups.group_state(request, request.app[STORE], _group_id(request))


async def group_events(request: web.Request) -> web.StreamResponse:
    app = request.app
    return await groups.serve(request, app[HUB], app[STORE], _group_id(request), app[SETTINGS].heartbeat)


async def cancel_task(request: web.Request) -> web.Response:
    task_id = _task_id(request)
    # Shielded: a client that hangs up must not leave the revocation half done.
    final = await asyncio.shield(_cancel(request.app, task_id))
    return _json({"id": task_id, "state": final}, status=202)


async def _cancel(app: web.Application, task_id: str) -> str:
    async with app[HUB].watch([task_id]) as watcher:
        state = await app[STORE].task(task_id)
        if state is None:
            raise error(web.HTTPNotFound, f"There is no task {task_id!r} (or its history has expired).")
        if is_terminal(state["state"]):
            raise error(
                web.HTTPConflict, f"Task {task_id} has already ended ({state['state']}); there is nothing to cancel."
            )
        waiting = state["state"] in (State.QUEUED, State.RETRY)
        try:
            await asyncio.to_thread(app[CELERY].control.revoke, task_id, terminate=True, signal="SIGTERM")
        except Exception as exc:
            if not waiting:
                raise _broker_failed(exc, f"revoke task {task_id}", "the running task cannot be stopped.") from None
            # A waiting task is cancelled all the same: workers check the stored state
            # when its message reaches them (bridge._on_received).
            log.warning("could not broadcast the revocation of waiting task %s: %s", task_id, exc)
        # A queued task has no worker process to report its revocation soon (it may
        # sit behind others, or no worker may be up): record it now. A running one
        # is terminated by its worker, which reports it; if none does in time, the
        # task is recorded as revoked all the same.
        if not waiting:
            await _wait_terminal(watcher, REVOKE_GRACE)
        await asyncio.to_thread(_record_revoked, app, task_id, state.get("name"))
    final = await app[STORE].task(task_id)
    return final["state"] if final else State.REVOKED


async def _wait_terminal(watcher: Any, timeout: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while (left := deadline - loop.time()) > 0:
        item = await watcher.next(left)
        if item is None or item is Signal.CLOSE:
            return
        if item is not Signal.RESYNC and item.terminal:
            return


def _record_revoked(app: web.Application, task_id: str, name: str | None) -> None:
    # Refused (a no-op) if the worker already ended it.
    app[PUBLISHER].finish(task_id, name, State.REVOKED, message="Task revoked", reason="revoked")


async def recent_tasks(request: web.Request) -> web.Response:
    raw = request.query.get("limit", "50")
    digits = raw.lstrip("0") or "0"
    if not (raw.isascii() and raw.isdigit() and len(digits) <= 3 and 1 <= int(digits) <= 500):
        raise error(web.HTTPBadRequest, f"limit must be a whole number from 1 to 500, not {raw!r}.")
    return _json({"tasks": await request.app[STORE].recent(int(raw))})


async def healthz(request: web.Request) -> web.Response:
    if not request.app[HUB].running:
        body = {"status": "error", "redis": "ok", "error": "The event hub has stopped; restart this process."}
        return _json(body, status=503)
    try:
        async with asyncio.timeout(2):
            await request.app[REDIS].ping()
            workers = await _workers(request.app)
    except Exception as exc:
        reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        body = {"status": "error", "redis": reason, "error": f"Redis is not answering ({reason})."}
        return _json(body, status=503)
    # No worker is not an error of this process: still 200, with the warning.
    return _json({"status": "ok", "redis": "ok", **workers})
