"""The aiohttp application: its routes, and the Redis, hub and reaper it runs on.

`create_app(settings)` is the whole web process; `RUN_OPTIONS` is how to serve it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web
from celery import Celery

from ..allowlist import AllowList
from ..allowlist import load as load_allowlist
from ..config import Settings
from ..connections import REDIS_ERRORS, hub_clients, keys_for, partition_clients, web_client
from ..worker.celery_app import make_celery
from ..worker.demo import DEMO_TASKS
from ..worker.publisher import Publisher
from . import feed, handlers, metrics, openapi, pages, reaper
from .access import Access, authorize, guard
from .access_log import TokenlessAccessLogger
from .context import ACCESS, ALLOWLIST, CELERY, HUB, PUBLISHER, REDIS, SETTINGS, STORE, STREAMS
from .cors import Cors
from .delivery import EventStream
from .errors import Handler, json_errors
from .hub import Hub, Hubs
from .limits import default_max_streams
from .notices import NOTICES, Notices, post_notice
from .request_id import echo_request_id
from .store import Store

log = logging.getLogger(__name__)

# /events?task=…&fresh=… for 100 ids of the longest allowed length (keys.is_task_id)
# is about 41 KB of request line; aiohttp's default limit is 8 KiB.
MAX_REQUEST_LINE = 64 * 1024
# What `web.run_app` (or an AppRunner) needs to serve these routes well; `progress-sse
# web` passes exactly these to web/server.py's run_app, which adds the header timeout,
# JSON parser errors and the connection limit. handler_cancellation: a handler whose
# client went away is cancelled at once, releasing its watcher instead of waiting
# for a write to fail. The others go to each connection's request handler (unknown
# ones make aiohttp drop them all, with a warning). The keep-alive timeout is the
# app's own (create_app's handler_args), from the settings.
RUN_OPTIONS: dict[str, Any] = {
    "handler_cancellation": True,
    "max_line_size": MAX_REQUEST_LINE,
    # A stream's ?token= must not reach the log.
    "access_log_class": TokenlessAccessLogger,
}
# Open to anyone even with a key set: they hold no task data (the page reads its
# token from the URL fragment, which is never sent).
PUBLIC_ROUTES = frozenset({"index", "static", "static_latest", "healthz", "openapi"})
# (method, route) pairs a page on another origin may call (PROGRESS_SSE_CORS_ORIGINS).
CORS_ROUTES = frozenset(
    {
        ("GET", "task"),
        ("DELETE", "task"),
        ("POST", "tasks"),
        ("GET", "task_events"),
        ("GET", "events"),
        ("GET", "feed"),
        ("GET", "group"),
        ("GET", "group_events"),
    }
)


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
    demo tasks. Mounted, the keep-alive timeout is your app's: aiohttp takes
    handler_args from the app it serves."""
    access = Access.from_settings(settings)
    cors = Cors(settings.cors_origins, CORS_ROUTES)
    app = web.Application(
        middlewares=[json_errors, guard(access, cors, _public)],
        # To each connection's request handler, however the app is served (the
        # header and body timeouts and the connection limit need web/server.py's run_app).
        handler_args={"keepalive_timeout": settings.keepalive_timeout},
    )
    app[SETTINGS] = settings
    app[ACCESS] = access
    if allowlist is None:
        allowlist = load_allowlist(settings.allowlist) if settings.allowlist else DEMO_TASKS
    app[ALLOWLIST] = allowlist
    app[CELERY] = celery or make_celery(settings)
    pages.setup(app)
    app.cleanup_ctx.append(_redis_ctx)
    app.on_shutdown.append(_end_streams)
    app.on_response_prepare.append(_security_headers)
    app.on_response_prepare.append(cors.on_prepare)
    app.on_response_prepare.append(echo_request_id)  # its access log line carries the same id
    app.on_response_prepare.append(metrics.count_response)
    # One named resource per path: the names are what PUBLIC_ROUTES and CORS_ROUTES
    # (and url_for) refer to, whatever the method.
    routes: dict[tuple[str, str], dict[str, Handler]] = {
        ("/tasks", "tasks"): {"POST": handlers.start_task, "GET": handlers.recent_tasks},
        ("/tasks/{task_id}", "task"): {"GET": handlers.task_state, "DELETE": handlers.cancel_task},
        ("/tasks/{task_id}/events", "task_events"): {"GET": handlers.task_events},
        ("/events", "events"): {"GET": handlers.many_events},
        ("/feed", "feed"): {"GET": feed.serve},
        ("/groups/{group_id}", "group"): {"GET": handlers.group_state},
        ("/groups/{group_id}/events", "group_events"): {"GET": handlers.group_events},
        ("/healthz", "healthz"): {"GET": handlers.healthz},
        ("/notices", "notices"): {"POST": post_notice},
        ("/openapi.json", "openapi"): {"GET": openapi.openapi_json},
        ("/metrics", "metrics"): {
            "GET": metrics.endpoint(
                settings.metrics_token,
                lambda request: authorize(request, "operator"),
                lambda request: request.app[STORE].stored_by_state(),
            )
        },
    }
    for (path, name), methods in routes.items():
        resource = app.router.add_resource(path, name=name)
        for method, handler in methods.items():
            if method == "GET":  # as aiohttp's add_get: HEAD too, with GET's headers
                resource.add_route("HEAD", handler)
            resource.add_route(method, handler)
    return app


async def _redis_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    keys = keys_for(settings)
    client = web_client(settings)
    partitions = partition_clients(settings)
    hub_redis = hub_clients(settings)
    app[REDIS] = client
    store = app[STORE] = Store(client, keys, history_ttl=settings.history_ttl, partitions=partitions)
    notices = app[NOTICES] = Notices(keys)

    def heard(raw: str) -> None:  # a notice announced: every stream of this process shows it
        frame = notices.current() if notices.heard(raw) is not None else b""
        if frame:
            app[STREAMS].broadcast(frame)

    async def reheard() -> None:  # the subscriber was away: a notice may have come meanwhile
        before = notices.latest
        try:
            await notices.load(client)
        except REDIS_ERRORS as exc:
            log.warning("progress-sse could not read the latest notice: %s", exc)
            return
        after = notices.latest
        if after is not None and (before is None or after.id != before.id) and notices.current():
            app[STREAMS].broadcast(notices.current())

    hubs = [
        Hub(
            hub_redis[p],
            keys,
            buffer=settings.stream_buffer,
            new_epoch=functools.partial(store.new_epoch, partition=p),
            sharded=keys.cluster,
            partition=p,
            # Notices are announced on the first partition's control channel.
            on_control=heard if p == 0 else None,
            on_reconnect=reheard if p == 0 else None,
        )
        for p in range(keys.partitions)
    ]
    # One Redis, one hub; a cluster's partitions each have theirs, served as one.
    hub: Hub | Hubs = hubs[0] if len(hubs) == 1 else Hubs(hubs, keys, buffer=settings.stream_buffer)
    app[HUB] = hub
    app[STREAMS] = EventStream(
        hub,
        app[STORE],
        app[ACCESS],
        heartbeat=settings.heartbeat,
        write_timeout=settings.write_timeout,
        max_streams=settings.max_streams or default_max_streams(connections=settings.max_connections),
        latest_notice=notices.current,
    )
    app[PUBLISHER] = Publisher.from_settings(settings)
    await hub.start()
    try:
        await notices.load(client)
    except REDIS_ERRORS as exc:  # Redis may come later; the next notice is heard anyway
        log.warning("progress-sse could not read the latest notice: %s", exc)
    reaper_task = asyncio.create_task(reaper.run(client, keys, app[PUBLISHER], settings.worker_ttl))
    try:
        yield
    finally:
        reaper_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reaper_task
        await hub.close()
        await app[STREAMS].close()
        for connection in [*hub_redis, *(partitions or ()), client]:
            await connection.aclose()
        app[PUBLISHER].client.close()
        await asyncio.to_thread(app[CELERY].close)


def _public(request: web.Request) -> bool:
    name = request.match_info.route.name
    if name == "metrics":  # a scraper's static token (PROGRESS_SSE_METRICS_TOKEN) is no JWT: its handler checks it
        return metrics.bears_token(request, request.app[SETTINGS].metrics_token)
    if name == "task" and request.method in ("GET", "HEAD"):
        return pages.wants_html(request)  # the task page's shell; its data comes with the page's token
    return name in PUBLIC_ROUTES


async def _security_headers(request: web.Request, response: web.StreamResponse) -> None:
    # Every response, JSON and streams included: a browser must never guess that a
    # body holding task text is HTML or script, nor hand it to another site's
    # <script> or <img> (CORP; reads through CORS are CORS's to allow). The static
    # assets set their own, cross-origin, policy (web/pages.py).
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Cross-Origin-Resource-Policy", "same-origin")


async def _end_streams(app: web.Application) -> None:
    if HUB in app:
        app[HUB].close_watchers()
