"""The HTTP API as an OpenAPI 3.1 document, served at `GET /openapi.json`.

docs/protocol.md is the contract in words; this is the same contract for tools
(client generators, Schemathesis: tests/test_openapi.py runs it against a live
server). It describes every route `create_app` registers and nothing else
(tests/test_openapi.py checks both ways).

To describe a route, add its path to `PATHS`, one operation per method, built
with `operation` (or `stream` for a `text/event-stream` route). `HEAD` needs no
entry of its own: every GET route answers it (app.py), and `document` derives
it from the GET (with headers alone), unless the path lists a `head` of its own.
`operation` adds what every route may answer (400 for malformed HTTP or a Host
the service does not answer to, 408) and, for the routes that need a token,
401 and 403 and the security requirement; public routes (app.py PUBLIC_ROUTES)
say `access=PUBLIC`.

The document holds no task data (the route is public). It is built once per
mount point and access mode: `servers` names where the app is mounted, and on a
service with no key (open to all) every operation also admits no token (`{}`).
"""

from __future__ import annotations

import copy
import functools
import json
from typing import Any

from aiohttp import web

from .. import __version__
from ..events import CURSOR_UNKNOWN, FEED_TRIMMED, HISTORY_LOST, State
from ..keys import TASK_ID_PATTERN
from ..task_names import MAX_PATTERN_LENGTH, MAX_PATTERNS
from .context import ACCESS
from .delivery import RETRY_LATER_MS
from .handlers import MAX_BODY, MAX_STREAM_TASKS
from .notices import MAX_TEXT, NOTICE_TTL
from .pages import base_path

OPENAPI_VERSION = "3.1.0"
JSON = "application/json"
SSE = "text/event-stream"
HTML = "text/html"

# Who may call an operation: anyone, a Bearer token, or (streams: EventSource
# cannot send headers) a Bearer token or `?token=`.
PUBLIC, BEARER, STREAM = "public", "bearer", "stream"
_SECURITY: dict[str, list[dict[str, list[str]]]] = {
    PUBLIC: [],
    BEARER: [{"bearerToken": []}],
    STREAM: [{"bearerToken": []}, {"queryToken": []}],
}

# GET /tasks?limit=: as handlers.recent_tasks checks it.
RECENT_LIMIT = {"minimum": 1, "maximum": 500, "default": 50}
_ID = f"^{TASK_ID_PATTERN}$"


def _ref(name: str, kind: str = "schemas") -> dict[str, str]:
    return {"$ref": f"#/components/{kind}/{name}"}


def _nullable(kind: str, description: str | None = None) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": [kind, "null"]}
    if description:
        schema["description"] = description
    return schema


# -- schemas ------------------------------------------------------------------------------


def _frame(event: dict[str, Any], data: str, description: str) -> dict[str, Any]:
    return {
        "type": "object",
        "description": description,
        "required": ["event", "data"],
        "properties": {
            "event": event,
            "id": {"type": "string", "description": "The cursor to resume after this frame (`Last-Event-ID`)."},
            "data": {"type": "string", "contentMediaType": JSON, "contentSchema": _ref(data)},
            "retry": {"type": "integer"},
        },
    }


SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "description": "Every error's body.",
        "required": ["error"],
        "properties": {"error": {"type": "string", "description": "A sentence a person can act on."}},
    },
    "State": {"enum": [str(s) for s in State], "description": "A task's state (docs/protocol.md, States)."},
    "Cursor": {
        "type": "string",
        "description": "An event's id (the SSE `id:`): `<epoch>-<n>` on one Redis, "
        "`<digest>.<entry>…` on a Redis Cluster; `0` is the start of the current history.",
        "examples": ["k3x7f2ab-141378"],
    },
    "TaskError": {
        "type": "object",
        "required": ["type"],
        "properties": {
            "type": {"type": "string", "description": "The exception's type."},
            "message": {"type": "string", "description": "Hidden from watchers with PROGRESS_SSE_WATCHER_ERRORS=type."},
            "traceback": {"type": "string", "description": "For operators only."},
        },
    },
    "Event": {
        "type": "object",
        "description": "One event of a task: the `data:` of a stream's frame (docs/protocol.md, Event payload). "
        "Clients ignore keys they do not know.",
        "required": ["task_id", "name", "state", "current", "total", "percent", "message", "ts"],
        "properties": {
            "task_id": {"type": "string"},
            "name": _nullable("string", "The Celery task's name."),
            "state": _ref("State"),
            "current": {"type": "number"},
            "total": _nullable("number", "null: the amount of work is unknown (an indeterminate bar)."),
            "percent": {"type": ["number", "null"], "minimum": 0, "maximum": 100},
            "message": _nullable("string"),
            "ts": {"type": "number", "description": "Epoch seconds, 3 decimals, when the event was made."},
            "result": {"description": "`success`: the return value (its `repr` if JSON cannot hold it)."},
            "error": _ref("TaskError"),
            "retries": {"type": "integer", "minimum": 1, "description": "`retry`: retries so far, this one included."},
            "eta": {"type": "number", "description": "`retry`: when it runs again (epoch seconds)."},
            "reason": {
                "enum": ["revoked", "terminated", "expired", "worker_gone", "message_gone"],
                "description": "`revoked` and `lost`: why.",
            },
            "worker": {"type": "string", "description": "For operators only: the worker's hostname."},
        },
    },
    "Task": {
        "description": "What is known of a task: its latest event, and more.",
        "allOf": [
            _ref("Event"),
            {
                "type": "object",
                "required": ["created_at", "started_at", "finished_at", "cursor"],
                "properties": {
                    "created_at": _nullable("number", "Epoch seconds."),
                    "started_at": _nullable("number", "Epoch seconds."),
                    "finished_at": _nullable("number", "Epoch seconds."),
                    "cursor": {
                        "description": "The latest event's id: a stream resumed from it continues after it.",
                        "anyOf": [_ref("Cursor"), {"type": "null"}],
                    },
                    "worker_pid": {"type": "integer", "description": "For operators only."},
                    "group_id": {"type": "string", "description": "The Celery group the task belongs to."},
                },
            },
        ],
    },
    "StartTask": {
        "type": "object",
        "required": ["name"],
        "properties": {
            "name": {"type": "string", "description": "An allow-listed task's name."},
            "args": {"type": "array", "description": "Bound to the task's parameters in order."},
            "kwargs": {"type": "object"},
        },
        "examples": [{"name": "demo.count", "kwargs": {"n": 20, "delay": 0.1}}],
    },
    "StartedTask": {
        "type": "object",
        "required": ["id", "name", "state", "status_url", "events_url", "cursor", "workers"],
        "properties": {
            "id": {"type": "string"},
            "name": {"type": "string"},
            "state": {"const": str(State.QUEUED)},
            "status_url": {"type": "string"},
            "events_url": {"type": "string"},
            "cursor": {
                "description": "The `queued` event's id: a stream resumed from it shows every event.",
                "anyOf": [_ref("Cursor"), {"type": "null"}],
            },
            "workers": {"type": "integer", "minimum": 0, "description": "Live workers."},
            "warning": {"type": "string", "description": "When no worker is running."},
            "token": {"type": "string", "description": "With tokens on and a secret: a watch token for the task."},
        },
    },
    "Cancelled": {
        "type": "object",
        "required": ["id", "state"],
        "properties": {"id": {"type": "string"}, "state": _ref("State")},
    },
    "RecentTasks": {
        "type": "object",
        "required": ["tasks"],
        "properties": {"tasks": {"type": "array", "items": _ref("Task"), "description": "Newest first."}},
    },
    "CeleryProgress": {
        "type": "object",
        "description": "The JSON of celery-progress's progress view (docs/integration.md).",
        "required": ["state", "complete", "success", "progress"],
        "properties": {
            "state": {"type": "string"},
            "complete": {"type": "boolean"},
            "success": {"type": ["boolean", "null"]},
            "progress": {
                "type": "object",
                "required": ["pending", "current", "total", "percent"],
                "properties": {
                    "pending": {"type": "boolean"},
                    "current": {"type": "number"},
                    "total": {"type": "number"},
                    "percent": {"type": "number"},
                    "description": {"type": "string"},
                },
            },
            "result": {},
        },
    },
    "Group": {
        "type": "object",
        "description": "A Celery group as one bar: the `data:` of a group stream's `event: group` frame.",
        "required": ["group_id", "state", "current", "total", "percent", "message", "tasks", "done", "counts", "ts"],
        "properties": {
            "group_id": {"type": "string"},
            "state": _ref("State"),
            "current": {"type": "number"},
            "total": _nullable("number", "null while any member's total is unknown."),
            "percent": {"type": ["number", "null"], "minimum": 0, "maximum": 100},
            "message": {"type": "string"},
            "tasks": {"type": "integer", "minimum": 0},
            "done": {"type": "integer", "minimum": 0},
            "counts": {"type": "object", "additionalProperties": {"type": "integer"}},
            "ts": {"type": "number"},
        },
    },
    "GroupState": {
        "allOf": [
            _ref("Group"),
            {
                "type": "object",
                "required": ["members"],
                "properties": {"members": {"type": "array", "items": {"type": "string"}}},
            },
        ]
    },
    "Reset": {
        "type": "object",
        "description": "The data of `event: reset`: the history was lost, or the cursor names no place in it; "
        "the tasks' current states follow.",
        "required": ["reason", "message", "missing"],
        "properties": {
            "reason": {"enum": [HISTORY_LOST, CURSOR_UNKNOWN, FEED_TRIMMED]},
            "message": {"type": "string"},
            "missing": {"type": "array", "items": {"type": "string"}, "description": "Watched tasks with no state."},
        },
    },
    "Notice": {
        "type": "object",
        "description": "The data of `event: notice`: an operator's broadcast (`POST /notices`), on every stream. "
        "It has no `id:` and moves no cursor; a page that reconnects is sent the latest again.",
        "required": ["id", "text", "ts"],
        "properties": {"id": {"type": "string"}, "text": {"type": "string"}, "ts": {"type": "number"}},
    },
    "PostedNotice": {
        "allOf": [
            _ref("Notice"),
            {
                "type": "object",
                "required": ["expires"],
                "properties": {"expires": {"type": "number", "description": "Until when a stream that opens gets it."}},
            },
        ]
    },
    "NewNotice": {
        "type": "object",
        "required": ["text"],
        "properties": {"text": {"type": "string", "minLength": 1, "maxLength": MAX_TEXT}},
    },
    "Unknown": {
        "type": "object",
        "description": "The data of `event: unknown` (`/events`): a task this service does not know; "
        "the stream then ignores it.",
        "required": ["task_id"],
        "properties": {"task_id": {"type": "string"}},
    },
    # One frame of a stream, as EventSource hands it over (`id` is the stream's last
    # id so far, `event` "message" when the frame names none): how OpenAPI 3.2 and
    # Schemathesis read a `text/event-stream` schema; `data` is JSON (contentSchema).
    "EventFrame": _frame({"enum": [str(s) for s in State]}, "Event", "A task's event: `event:` is its state."),
    "ResetFrame": _frame({"const": "reset"}, "Reset", "Start over: current states follow."),
    "UnknownFrame": _frame({"const": "unknown"}, "Unknown", "A task this service does not know."),
    "NoticeFrame": _frame({"const": "notice"}, "Notice", "An operator's broadcast notice."),
    "GroupFrame": _frame({"const": "group"}, "Group", "The group's bar, after a change of any member."),
    "Health": {
        "type": "object",
        "required": ["status", "redis", "workers", "loop"],
        "properties": {
            "status": {"const": "ok"},
            "redis": {"const": "ok"},
            "workers": {"type": "integer", "minimum": 0},
            "warning": {"type": "string", "description": "When no worker is running (still 200)."},
            "loop": {"type": "string", "examples": ["uvloop", "asyncio"]},
        },
    },
    "HealthError": {
        "allOf": [
            _ref("Error"),
            {
                "type": "object",
                "required": ["status", "redis"],
                "properties": {"status": {"const": "error"}, "redis": {"type": "string"}},
            },
        ]
    },
}

# -- parameters ---------------------------------------------------------------------------

_IDS = "1 to 200 characters of letters, digits and `_ . : @ + = -`, starting with a letter or digit"
_CURSOR = (
    "Resume after this cursor: every later event arrives once, in order. A cursor that names "
    "no place in the current history gets `event: reset` and current states."
)
PARAMETERS: dict[str, Any] = {
    "TaskId": {
        "name": "task_id",
        "in": "path",
        "required": True,
        "description": f"A task id: {_IDS}. Anything else names no task (404).",
        "schema": {"type": "string", "pattern": _ID},
    },
    "GroupId": {
        "name": "group_id",
        "in": "path",
        "required": True,
        "description": f"A Celery group's id: {_IDS}. Anything else names no group (404).",
        "schema": {"type": "string", "pattern": _ID},
    },
    "LastEventIdHeader": {
        "name": "Last-Event-ID",
        "in": "header",
        "description": f"{_CURSOR} EventSource sends it on reconnect; it wins over `last_event_id`.",
        "schema": {"type": "string"},
    },
    "LastEventIdQuery": {
        "name": "last_event_id",
        "in": "query",
        "description": f"{_CURSOR} The `Last-Event-ID` header wins when both are sent.",
        "schema": {"type": "string"},
    },
    "Tasks": {
        "name": "task",
        "in": "query",
        "required": True,
        "description": f"The tasks to watch, 1 to {MAX_STREAM_TASKS} in all: repeat it, or separate ids with "
        "commas (empty ones are skipped, duplicates ignored). A malformed id is a 400, an unknown one "
        "gets `event: unknown`.",
        "style": "form",
        "explode": True,
        "schema": {
            "type": "array",
            "minItems": 1,
            "items": {"type": "string", "pattern": f"^({TASK_ID_PATTERN})?(,({TASK_ID_PATTERN})?)*$"},
        },
    },
    "Names": {
        "name": "name",
        "in": "query",
        "description": "The task names the feed shows: a name, or a prefix ending in a dot (`reports.`); "
        "repeat it, or separate them with commas. None: every task (or a feed token's own names).",
        "style": "form",
        "explode": True,
        "schema": {"type": "array", "items": {"type": "string"}},
    },
    "Fresh": {
        "name": "fresh",
        "in": "query",
        "description": "Tasks of this stream (repeat it, or comma-separated) that start from their current "
        "state even with a cursor: tasks a client adds to its stream. Ids not on the stream are ignored.",
        "style": "form",
        "explode": True,
        "schema": {"type": "array", "items": {"type": "string"}},
    },
}

# -- responses ----------------------------------------------------------------------------


def _error(description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    response: dict[str, Any] = {"description": description, "content": {JSON: {"schema": _ref("Error")}}}
    if headers:
        response["headers"] = headers
    return response


def _header(description: str, schema: dict[str, Any] | None = None, required: bool = True) -> dict[str, Any]:
    return {"description": description, "required": required, "schema": schema or {"type": "string"}}


_CHALLENGE = {"WWW-Authenticate": _header('`Bearer realm="progress-sse"`, with `error=` when a token was sent.')}
_RETRY_AFTER = {"Retry-After": _header("Seconds to wait: 2.", {"type": "string", "pattern": "^[0-9]+$"})}
RESPONSES: dict[str, Any] = {
    "Unauthorized": _error(
        "With tokens on: no token, or one that is malformed, badly signed, of an algorithm not accepted, or expired.",
        _CHALLENGE,
    ),
    "Forbidden": _error(
        "With tokens on: the token is valid but does not grant this (the message names the scope).",
        {"WWW-Authenticate": _header('`Bearer …, error="insufficient_scope", scope="<scope>"`.')},
    ),
    "RequestTimeout": _error(
        "The request's headers or declared body did not arrive in time (`progress-sse web`); the connection is closed."
    ),
    "RedisDown": _error("Redis is not answering; try again shortly.", _RETRY_AFTER),
}
_BAD_REQUEST = "malformed HTTP, or a `Host` the service does not answer to (PROGRESS_SSE_ALLOWED_HOSTS)"

SSE_FRAMES = f"""`text/event-stream`: the schema describes each frame as EventSource
hands it over (as OpenAPI 3.2's `itemSchema` does), its `data` being JSON. On the wire:

    id: <cursor>
    event: <state>
    data: <the Event, as JSON on one line>

- `: ping` (a comment) comes first, right after the headers, then after each
  PROGRESS_SSE_HEARTBEAT seconds of silence.
- Frames without `id:` move no cursor: `event: reset` (ResetFrame), `event: unknown`
  (UnknownFrame, on `/events`).
- The response ends once every task is terminal.

A stream that cannot be served now (Redis not answering, the process at its stream
limit) is a 200 too, holding only a comment and `retry: <ms>` (between
{RETRY_LATER_MS[0]} and {RETRY_LATER_MS[1]} ms), then the end: EventSource comes back
after that long, where an error status would stop it for good."""


def _stream_ok(*frames: str) -> dict[str, Any]:
    return {
        "description": "The stream; or, when it cannot be served now, only `retry:`.",
        "headers": {
            "Cache-Control": _header("`no-cache`."),
            "X-Accel-Buffering": _header("`no`: proxies must not buffer the stream."),
        },
        "content": {
            SSE: {"schema": {"description": SSE_FRAMES, "oneOf": [_ref(frame) for frame in (*frames, "NoticeFrame")]}}
        },
    }


_DONE = {"description": "The request's cursor is at or after the end: there is nothing more (EventSource stops)."}

# -- operations ---------------------------------------------------------------------------


def operation(
    operation_id: str,
    summary: str,
    *,
    access: str,
    tag: str,
    responses: dict[int, Any],
    bad_request: str | None = None,
    description: str | None = None,
    parameters: list[Any] | None = None,
    body: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One operation, with what every route may answer added to `responses`."""
    answers = dict(responses)
    answers[400] = _error(
        f"{bad_request}; or {_BAD_REQUEST}." if bad_request else f"{_BAD_REQUEST[0].upper()}{_BAD_REQUEST[1:]}."
    )
    answers[408] = _ref("RequestTimeout", "responses")
    if access != PUBLIC:
        answers[401] = _ref("Unauthorized", "responses")
        answers[403] = _ref("Forbidden", "responses")
    op: dict[str, Any] = {"operationId": operation_id, "summary": summary, "tags": [tag]}
    if description:
        op["description"] = description
    if parameters:
        op["parameters"] = parameters
    if body:
        op["requestBody"] = body
    op["responses"] = {str(status): answers[status] for status in sorted(answers)}
    op["x-access"] = access  # `document` turns it into `security`
    return op


def stream(
    operation_id: str,
    summary: str,
    *,
    tag: str,
    ok: dict[str, Any],
    responses: dict[int, Any],
    head_responses: dict[int, Any],
    **kwargs: Any,
) -> dict[str, dict[str, Any]]:
    """A `text/event-stream` route's GET, and its HEAD: the stream's headers, once the
    request passed its checks (token, ids); nothing is looked up or held open."""
    get = operation(operation_id, summary, access=STREAM, tag=tag, responses={200: ok, **responses}, **kwargs)
    head_ok = {"description": "The stream's headers, no body.", "headers": ok["headers"], "content": {SSE: {}}}
    head = operation(
        f"{operation_id}Head",
        f"{summary}: headers only",
        access=STREAM,
        tag=tag,
        responses={200: head_ok, **head_responses},
        **kwargs,
    )
    head["description"] = "The stream's headers without opening it: a task or group is not looked up."
    return {"get": get, "head": head}


def _json_body(schema: str) -> dict[str, Any]:
    """A request body of JSON (web/handlers.py `json_object` reads it)."""
    return {
        "required": True,
        "description": f"At most {MAX_BODY // 1024} KiB.",
        "content": {JSON: {"schema": _ref(schema)}},
    }


_BAD_BODY = "The body is not JSON, not a JSON object, or could not be read"
# What json_object answers before a handler looks at the body's content.
_BODY_REFUSED = {
    413: _error(f"The body is larger than {MAX_BODY // 1024} KiB."),
    415: _error("The Content-Type is not `application/json`."),
}
_TASK_ID = _ref("TaskId", "parameters")
_GROUP_ID = _ref("GroupId", "parameters")
_CURSORS = [_ref("LastEventIdHeader", "parameters"), _ref("LastEventIdQuery", "parameters")]
_NO_TASK = _error("There is no such task (or its history has expired), or the id is not a task id.")
_NO_GROUP = _error("There is no such group (or its history has expired), or the id is not a group id.")
_NOT_AN_ID = _error("The id is not a task id (HEAD does not look the task up).")
_BROKER_FAILED = _error(
    "This server cannot use its task queue (a broker transport that fails to import, say): the message "
    "names the exception's type; the rest is in the web process's log. Nothing was queued."
)
_BROKER_DOWN = _error("Redis or the Celery broker is not answering; try again shortly.", _RETRY_AFTER)

# Every route `create_app` registers, by path (its canonical form in aiohttp's router).
PATHS: dict[str, dict[str, dict[str, Any]]] = {
    "/tasks": {
        "post": operation(
            "startTask",
            "Start an allow-listed task",
            access=BEARER,
            tag="tasks",
            description="Queues the task: its `queued` event is stored before the task reaches the broker. "
            "Token scope: `start` lists the body's `name`.",
            body=_json_body("StartTask"),
            bad_request=_BAD_BODY,
            responses={
                202: {
                    "description": "Queued.",
                    "headers": {"Location": _header("The task's URL (`status_url`).")},
                    "content": {JSON: {"schema": _ref("StartedTask")}},
                },
                **_BODY_REFUSED,
                422: _error(
                    "The name is not on the allow-list, `args` is not an array, `kwargs` not an object, "
                    "or a parameter is unknown, given twice or refused by the task's check."
                ),
                500: _BROKER_FAILED,
                503: _BROKER_DOWN,
            },
        ),
        "get": operation(
            "recentTasks",
            "The most recent tasks",
            access=BEARER,
            tag="tasks",
            description="Newest first (by first event); tasks whose history expired drop out. Token scope: `operator`.",
            parameters=[
                {
                    "name": "limit",
                    "in": "query",
                    "description": "How many tasks.",
                    "schema": {"type": "integer", **RECENT_LIMIT},
                }
            ],
            bad_request=f"`limit` is not a whole number from {RECENT_LIMIT['minimum']} to {RECENT_LIMIT['maximum']}",
            responses={
                200: {"description": "The tasks.", "content": {JSON: {"schema": _ref("RecentTasks")}}},
                503: _ref("RedisDown", "responses"),
            },
        ),
    },
    "/tasks/{task_id}": {
        "get": operation(
            "taskState",
            "A task's state",
            access=BEARER,
            tag="tasks",
            description="JSON, unless the request's `Accept` prefers `text/html` (a browser's navigation): "
            "then the one-task page, which is public, and with tokens on always 200. "
            "Token scope: `tasks` lists the id, or `groups` lists its group.",
            parameters=[
                _TASK_ID,
                {
                    "name": "format",
                    "in": "query",
                    "description": "`celery-progress`: answer in the shape of celery-progress's view "
                    "(CeleryProgress), an unknown id being `PENDING` (200). Any other value is ignored.",
                    "schema": {"type": "string", "examples": ["celery-progress"]},
                },
            ],
            responses={
                200: {
                    "description": "The task (or, with `format=celery-progress`, its celery-progress view; "
                    "or the page).",
                    "content": {
                        JSON: {"schema": {"anyOf": [_ref("Task"), _ref("CeleryProgress")]}},
                        HTML: {"schema": {"type": "string"}},
                    },
                },
                404: {
                    "description": "No such task (or its history has expired), or not a task id; "
                    "for a browser, the page with this status.",
                    "content": {JSON: {"schema": _ref("Error")}, HTML: {"schema": {"type": "string"}}},
                },
                503: _ref("RedisDown", "responses"),
            },
        ),
        "delete": operation(
            "cancelTask",
            "Cancel a task",
            access=BEARER,
            tag="tasks",
            description="Revokes it (SIGTERM to a running task). Watchers hear `revoked` within 2 s. "
            "Token scope: `cancel`, and `tasks` lists the id.",
            parameters=[_TASK_ID],
            responses={
                202: {"description": "Cancelled.", "content": {JSON: {"schema": _ref("Cancelled")}}},
                404: _NO_TASK,
                409: _error("The task has already ended."),
                500: _BROKER_FAILED,
                503: _error(
                    "Redis, or (for a running task) the Celery broker, is not answering; try again shortly.",
                    _RETRY_AFTER,
                ),
            },
        ),
    },
    "/tasks/{task_id}/events": stream(
        "taskEvents",
        "A task's events",
        tag="streams",
        description="Without a cursor the task's current state comes first, then live events; with one, "
        "every event after it. Token scope: `tasks` lists the id, or `groups` lists its group.",
        parameters=[_TASK_ID, *_CURSORS],
        ok=_stream_ok("EventFrame", "ResetFrame"),
        responses={204: _DONE, 404: _NO_TASK},
        head_responses={404: _NOT_AN_ID},
    ),
    "/events": stream(
        "manyEvents",
        f"The events of 1 to {MAX_STREAM_TASKS} tasks",
        tag="streams",
        description="The same frames and rules as a task's stream, for every task named; one cursor "
        "covers them all. Token scope: the same as a task's stream, for every id.",
        parameters=[_ref("Tasks", "parameters"), _ref("Fresh", "parameters"), *_CURSORS],
        ok=_stream_ok("EventFrame", "ResetFrame", "UnknownFrame"),
        bad_request=f"No task named, more than {MAX_STREAM_TASKS}, or a malformed id",
        responses={204: _DONE},
        head_responses={},
    ),
    "/feed": stream(
        "feed",
        "Every task's changes of state, live",
        tag="streams",
        description="The all-tasks feed (docs/protocol.md, GET /feed): every `queued`, `started`, `retry` and "
        "terminal event of every task, and a task's `progress` at most once per PROGRESS_SSE_FEED_INTERVAL. "
        "Without a cursor, the newest tasks' states first. It never ends on its own. Token scope: `operator`, "
        "or a `feed` scope that covers every `name` asked for.",
        parameters=[_ref("Names", "parameters"), *_CURSORS],
        ok=_stream_ok("EventFrame", "ResetFrame"),
        bad_request=f"A malformed name filter: more than {MAX_PATTERNS} patterns, one longer than "
        f"{MAX_PATTERN_LENGTH} characters, or one starting with a dot",
        responses={},
        head_responses={},
    ),
    "/notices": {
        "post": operation(
            "postNotice",
            "A notice on every open page",
            access=BEARER,
            tag="service",
            description="An `event: notice` frame to every stream of every web process; the latest is kept "
            f"for {NOTICE_TTL // 60} minutes for the streams that open meanwhile. Token scope: `operator`.",
            body=_json_body("NewNotice"),
            bad_request=_BAD_BODY,
            responses={
                202: {"description": "Sent.", "content": {JSON: {"schema": _ref("PostedNotice")}}},
                **_BODY_REFUSED,
                422: _error(f"The text is missing, not a string, empty, or longer than {MAX_TEXT} characters."),
                503: _ref("RedisDown", "responses"),
            },
        ),
    },
    "/groups/{group_id}": {
        "get": operation(
            "groupState",
            "A Celery group as one bar",
            access=BEARER,
            tag="groups",
            description="Token scope: `groups` lists the id.",
            parameters=[_GROUP_ID],
            responses={
                200: {"description": "The group.", "content": {JSON: {"schema": _ref("GroupState")}}},
                404: _NO_GROUP,
                503: _ref("RedisDown", "responses"),
            },
        ),
    },
    "/groups/{group_id}/events": stream(
        "groupEvents",
        "A Celery group's bar, live",
        tag="streams",
        description="`event: group` with the aggregate, then one more after each change of any member; "
        "each frame's `id:` is the cursor of the member event behind it. Token scope: `groups` lists the id.",
        parameters=[_GROUP_ID, *_CURSORS],
        ok=_stream_ok("GroupFrame", "ResetFrame"),
        responses={204: _DONE, 404: _NO_GROUP},
        head_responses={404: _error("The id is not a group id (HEAD does not look the group up).")},
    ),
    "/healthz": {
        "get": operation(
            "healthz",
            "Is this process serving",
            access=PUBLIC,
            tag="service",
            responses={
                200: {"description": "Serving (with no worker too).", "content": {JSON: {"schema": _ref("Health")}}},
                503: {
                    "description": "Redis does not answer within 2 s, or the event hub stopped.",
                    "content": {JSON: {"schema": _ref("HealthError")}},
                },
            },
        ),
    },
    "/openapi.json": {
        "get": operation(
            "openapi",
            "This document",
            access=PUBLIC,
            tag="service",
            responses={
                200: {
                    "description": "The OpenAPI 3.1 description of this service's HTTP API.",
                    "content": {JSON: {"schema": {"type": "object", "required": ["openapi", "info", "paths"]}}},
                }
            },
        ),
    },
    "/metrics": {
        "get": operation(
            "metrics",
            "This service's Prometheus metrics",
            access=BEARER,
            tag="service",
            description="The Prometheus text format (docs/protocol.md, Metrics); with `--workers N`, the sum "
            "over the processes. With tokens on: an operator token, or PROGRESS_SSE_METRICS_TOKEN as "
            "`Authorization: Bearer <token>`.",
            responses={
                200: {
                    "description": "Every metric, as `text/plain; version=0.0.4`.",
                    "content": {"text/plain": {"schema": {"type": "string"}}},
                }
            },
        ),
    },
    "/": {
        "get": operation(
            "index",
            "The page: start tasks and watch them",
            access=PUBLIC,
            tag="pages",
            responses={200: {"description": "The page.", "content": {HTML: {"schema": {"type": "string"}}}}},
        ),
    },
    "/static/{name}": {
        "get": operation(
            "latestStaticFile",
            "A page asset's lasting address",
            access=PUBLIC,
            tag="pages",
            description="Redirects to the current version's URL, e.g. `/static/progress.js`: the address "
            "a page of your own imports the client from.",
            parameters=[{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}],
            responses={
                302: {
                    "description": "To `/static/<version>/<name>`; never cached.",
                    "headers": {"Location": _header("The current version's URL.")},
                },
                404: _error("No such asset."),
            },
        ),
    },
    "/static/{version}/{name}": {
        "get": operation(
            "staticFile",
            "A page asset",
            access=PUBLIC,
            tag="pages",
            description="The current version is cached for a year; any other version gets the current file, "
            "not cached.",
            parameters=[
                {"name": "version", "in": "path", "required": True, "schema": {"type": "string"}},
                {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}},
            ],
            responses={
                200: {
                    "description": "The asset.",
                    "content": {
                        "text/javascript": {"schema": {"type": "string"}},
                        "text/css": {"schema": {"type": "string"}},
                    },
                },
                404: _error("No such asset."),
            },
        ),
    },
}

INFO_DESCRIPTION = """Live progress for Celery tasks over Server-Sent Events. The contract in
words, with every choice explained, is the project's docs/protocol.md.

- Every error body is `{"error": "<a sentence a person can act on>"}`. A client
  error never becomes a 500.
- An unknown path gets 404, a method a path does not take 405 with an `Allow`
  header (with tokens on, a request without a valid token gets 401 first).
- Tokens (docs/protocol.md, Access tokens): with PROGRESS_SSE_SECRET or
  PROGRESS_SSE_PUBLIC_KEY set, every operation but the public ones needs a JWT,
  `Authorization: Bearer <token>`, or `?token=` on a stream (EventSource cannot
  send headers). With neither set, the service is open and needs none.
- CORS (PROGRESS_SSE_CORS_ORIGINS): a preflight (`OPTIONS`) of a listed origin
  gets 204 on the routes a watching page needs; any other gets 403."""

SECURITY_SCHEMES = {
    "bearerToken": {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "JWT",
        "description": "A JWT signed with HS256 (PROGRESS_SSE_SECRET) or RS256/ES256 (PROGRESS_SSE_PUBLIC_KEY), "
        "with `exp`; its claims (`tasks`, `groups`, `start`, `cancel`, `operator`) are its scopes.",
    },
    "queryToken": {
        "type": "apiKey",
        "in": "query",
        "name": "token",
        "description": "The same JWT, on a stream's URL. The `Authorization` header wins when both are sent.",
    },
}


def document(prefix: str = "", *, keyed: bool = True) -> dict[str, Any]:
    """The OpenAPI document of an app mounted at `prefix` ("" at the root, "/progress"
    as a sub-app there); `keyed`: the service needs tokens (Settings.keyed)."""
    paths: dict[str, Any] = {}
    for path, methods in PATHS.items():
        item: dict[str, Any] = {}
        for method, op in methods.items():
            item[method] = _secured(op, keyed)
            if method == "get" and "head" not in methods:
                item["head"] = _secured(_head_of(op), keyed)
        paths[path] = item
    doc = {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "progress-sse",
            "version": __version__,
            "description": INFO_DESCRIPTION,
            "license": {"name": "MIT", "identifier": "MIT"},
        },
        "servers": [{"url": prefix or "/"}],
        "tags": [
            {"name": "tasks", "description": "Start, read and cancel tasks."},
            {"name": "streams", "description": "`text/event-stream`: live events, resumable by cursor."},
            {"name": "groups", "description": "A Celery group as one bar."},
            {"name": "service", "description": "Health and this description."},
            {"name": "pages", "description": "The page and its assets."},
        ],
        "paths": paths,
        "components": {
            "schemas": SCHEMAS,
            "parameters": PARAMETERS,
            "responses": RESPONSES,
            "securitySchemes": SECURITY_SCHEMES,
        },
    }
    return copy.deepcopy(doc)  # the caller's to change: PATHS and the components stay as they are


def _secured(op: dict[str, Any], keyed: bool) -> dict[str, Any]:
    op = dict(op)
    security = list(_SECURITY[op.pop("x-access")])
    if security and not keyed:
        security.append({})  # an open service: no token needed
    op["security"] = security
    return op


def _head_of(get: dict[str, Any]) -> dict[str, Any]:
    """A GET route's HEAD (aiohttp answers it on every GET route): the same answers,
    headers only."""
    head = copy.deepcopy(get)
    head["operationId"] = f"{get['operationId']}Head"
    head["summary"] = f"{get['summary']}: headers only"
    head["description"] = "As GET, without the body."
    for response in head["responses"].values():
        if "content" in response:
            response["content"] = {media: {} for media in response["content"]}
    return head


@functools.cache
def _encoded(prefix: str, keyed: bool) -> bytes:
    return json.dumps(document(prefix, keyed=keyed), ensure_ascii=False, indent=1).encode()


async def openapi_json(request: web.Request) -> web.Response:
    """`GET /openapi.json`."""
    body = _encoded(base_path(request), request.app[ACCESS].keyed)
    return web.Response(body=body, content_type=JSON, charset="utf-8")
