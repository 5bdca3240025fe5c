"""Schemathesis hooks for tests/test_openapi.py's run against a live server
(`st run` loads this module, named by SCHEMATHESIS_HOOKS): every stream ends.

A stream ends once each of its tasks is terminal, so the run watches finished
tasks (OPENAPI_FINISHED_TASKS, comma-separated) and ids the server never knew,
which it tells about (404, or `event: unknown`) and lets go. One case would not
end: a cursor together with a task the server does not know. The server takes
that task for one whose history was lost while a worker may still run it, and
watches it until the client leaves (docs/protocol.md, "Reset"), as it should;
Schemathesis would then read until its request timeout. Such a case is sent
without its cursor. Any other of these streams still open at the request
timeout (the test's web pings every second, so Schemathesis gets to look) fails
the run. A stream that never ends by design (not in ENDING_STREAMS) is read
until its own, short, request timeout (tests/test_openapi.py's config).

The finished tasks are also the example of `/events?task=` (the run's config
gives them to the other parameters; a dictionary cannot fill an array).
"""

from __future__ import annotations

import os
from typing import Any

import schemathesis

# The streams that end once their tasks (or group) have ended (docs/protocol.md).
ENDING_STREAMS = frozenset({"/tasks/{task_id}/events", "/events", "/groups/{group_id}/events"})
FINISHED = frozenset(filter(None, os.environ.get("OPENAPI_FINISHED_TASKS", "").split(",")))
CURSOR_HEADER = "last-event-id"
CURSOR_QUERY = "last_event_id"


@schemathesis.hook
def before_load_schema(context: Any, raw_schema: dict[str, Any]) -> None:
    tasks = raw_schema["components"]["parameters"]["Tasks"]
    tasks["examples"] = {"finished": {"value": sorted(FINISHED)}}


@schemathesis.hook
def before_call(context: Any, case: Any, kwargs: dict[str, Any]) -> None:
    if case.method.upper() != "GET":
        return  # HEAD looks nothing up and holds nothing open
    watched = _watched(case)
    if watched is None or watched <= FINISHED:
        return
    for name in [name for name in case.headers or () if name.lower() == CURSOR_HEADER]:
        del case.headers[name]
    if case.query:
        case.query.pop(CURSOR_QUERY, None)


def _watched(case: Any) -> set[str] | None:
    """The task ids a task stream names (as the server reads them), or None for any
    other operation."""
    path = case.operation.path
    if path == "/tasks/{task_id}/events":
        return {str((case.path_parameters or {}).get("task_id"))}
    if path == "/events":
        values = (case.query or {}).get("task", [])
        values = values if isinstance(values, list) else [values]
        return {task_id for value in values for task_id in str(value).split(",") if task_id}
    return None


@schemathesis.hook
def after_call(context: Any, case: Any, response: Any) -> None:
    if getattr(response, "stream_cut_short", False) and case.operation.path in ENDING_STREAMS:
        cursor = {name: value for name, value in (case.headers or {}).items() if name.lower() == CURSOR_HEADER}
        raise AssertionError(
            f"{case.method} {case.formatted_path} {case.query} {cursor} stayed open: a stream of ended tasks must end"
        )
