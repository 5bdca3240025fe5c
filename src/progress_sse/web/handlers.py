"""The HTTP API's request handlers: read and check what the client sent, then
answer from the store, the delivery loop or the control path.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from ..allowlist import ParamError
from ..celery_progress import celery_progress_json
from ..cursors import parse_id
from ..events import State
from ..keys import is_task_id
from . import control, groups, pages, reaper
from .access import authorize, authorize_watch, body_for
from .context import ACCESS, ALLOWLIST, HUB, REDIS, STORE, STREAMS
from .errors import error
from .server import loop_name
from .store import describe, task_cursor

MAX_BODY = 64 * 1024
MAX_STREAM_TASKS = 100


def _json(body: Any, status: int = 200, **kwargs: Any) -> web.Response:
    return web.json_response(body, status=status, dumps=_dumps, **kwargs)


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _id(request: web.Request, kind: str = "task") -> str:
    """The `{task_id}` (or `{group_id}`) of the URL; a malformed one names nothing here."""
    value = request.match_info[f"{kind}_id"]
    if not is_task_id(value):  # group ids are Celery ids too
        raise error(web.HTTPNotFound, f"{value!r} is not a {kind} id.")
    return value


async def start_task(request: web.Request) -> web.Response:
    data = await json_object(request, "the task", '{"name": "demo.count", "kwargs": {"n": 20}}')
    name = data.get("name")
    # Before the allow-list is consulted: a token's refusal says nothing about it.
    # (A name that is not a string names nothing to refuse: the allow-list says so.)
    grant = authorize(request, "start", [name] if isinstance(name, str) else [])
    try:
        kwargs = request.app[ALLOWLIST].check(name, data.get("args", []), data.get("kwargs", {}))
    except ParamError as exc:
        raise error(web.HTTPUnprocessableEntity, f"{exc}.") from None

    # Counted first: once the task is queued, a failure here must not turn its 202
    # into an error the client would answer by starting it again.
    workers = await _workers(request.app)
    task_id = str(uuid.uuid4())
    cursor = await asyncio.to_thread(control.queue, request.app, task_id, str(name), kwargs)
    # url_for includes the prefix when this app is mounted as a sub-app.
    location = str(request.app.router["task"].url_for(task_id=task_id))
    answer = {
        "id": task_id,
        "name": name,
        "state": State.QUEUED,
        "status_url": location,
        "events_url": f"{location}/events",
        # The queued event's: a stream resumed from just before it shows every event.
        "cursor": cursor and task_cursor(request.app[STORE].keys, task_id, parse_id(cursor)),
        **workers,
    }
    token = request.app[ACCESS].watch_token_for(task_id, grant)
    if token is not None:  # so the starter can watch what it started
        answer["token"] = token
    return _json(answer, status=202, headers={"Location": location})


NO_WORKER = "No worker is running: started tasks wait in the queue."


async def _workers(app: web.Application) -> dict[str, Any]:
    """`workers` (live heartbeats), and a `warning` when there are none: a task
    queued then waits, and its page would otherwise just sit at "queued"."""
    count = await reaper.live_workers(app[REDIS], app[STORE].keys)
    return {"workers": count, "warning": NO_WORKER} if count == 0 else {"workers": count}


async def json_object(request: web.Request, what: str, example: str) -> dict[str, Any]:
    """The request's body, a JSON object (`what` it is, and an `example` of one for
    the error a person reads), or the 415, 413 or 400 that says what is wrong."""
    if request.content_type != "application/json":
        raise error(
            web.HTTPUnsupportedMediaType,
            f"Send {what} as JSON with Content-Type: application/json (got {request.content_type!r}).",
        )
    body = await _read_body(request)
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise error(web.HTTPBadRequest, f"The body is not valid JSON: {exc}.") from None
    except RecursionError:
        raise error(web.HTTPBadRequest, "The body nests JSON too deeply.") from None
    if not isinstance(data, dict):
        raise error(web.HTTPBadRequest, f"The body must be a JSON object like {example}.")
    return data


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


async def task_state(request: web.Request) -> web.Response:
    access = request.app[ACCESS]
    if pages.wants_html(request):
        task_id = request.match_info["task_id"]
        # With tokens on, the page is public, so it must not tell which tasks exist:
        # it learns that with its token, like any other client.
        known = access.keyed or (is_task_id(task_id) and await request.app[STORE].task(task_id) is not None)
        return await pages.task_page(request, task_id, known)
    task_id = _id(request)
    await authorize_watch(request, request.app[STORE], [task_id])
    state = await request.app[STORE].task(task_id)
    body = body_for(request, access, describe(state, request.app[STORE].keys)) if state else None
    if request.query.get("format") == "celery-progress":
        # celery-progress's view shape, for polling front ends mid-migration. An id
        # not seen yet is PENDING there (its JS stops polling on any non-200).
        return _json(celery_progress_json(body))
    if body is None:
        raise error(web.HTTPNotFound, f"There is no task {task_id!r} (or its history has expired).")
    return _json(body)


async def task_events(request: web.Request) -> web.StreamResponse:
    task_id = _id(request)
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


async def group_state(request: web.Request) -> web.Response:
    group_id = _id(request, "group")
    authorize(request, "groups", [group_id])
    return await groups.group_state(request, request.app[STORE], group_id)


async def group_events(request: web.Request) -> web.StreamResponse:
    return await groups.serve(request, request.app[STREAMS], _id(request, "group"))


async def cancel_task(request: web.Request) -> web.Response:
    task_id = _id(request)
    authorize(request, "cancel", [task_id])
    # Shielded: a client that hangs up must not leave the revocation half done.
    final = await asyncio.shield(control.cancel(request.app, task_id))
    return _json({"id": task_id, "state": final}, status=202)


async def recent_tasks(request: web.Request) -> web.Response:
    authorize(request, "operator")
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
    return _json({"status": "ok", "redis": "ok", **workers, "loop": loop_name()})
