"""Log records as JSON lines (PROGRESS_SSE_LOG_FORMAT=json), for a platform to parse.

Each record is one JSON object on one line: `ts` (ISO-8601, UTC), `level`,
`logger` and `message` always, `exc` (the traceback as text) when it carries an
exception, and the fields the code that logged it put under `FIELDS` (`fields()`:
the access log's request id, route, status, ...). Nothing else of a record is
written: the `extra` a library adds to its records could hold anything, a
credential included, so a field reaches the line only when our code chose it.

`handler()` is the web's (cli/serve.py installs it on the root logger);
`use_in_celery()` gives a Celery worker's (or beat's) own handlers this format.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, TextIO

# The record attribute that holds a record's own fields (a dict), set through `fields()`.
FIELDS = "progress_sse_fields"


def fields(**values: Any) -> dict[str, dict[str, Any]]:
    """The `extra=` of a record whose JSON line carries these fields too."""
    return {FIELDS: values}


class JsonFormatter(logging.Formatter):
    """One JSON object per record; newlines in a message or a traceback are escaped
    by JSON, so a record never spans two lines. ASCII only (non-ASCII text is
    `\\u`-escaped), so any encoding of the stream carries it."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in self.fields(record).items():
            line.setdefault(key, value)  # a field never hides one of the four above
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exc"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, default=str)  # a value JSON has no type for is written as its str()

    def fields(self, record: logging.LogRecord) -> Mapping[str, Any]:
        """The record's own fields for its line."""
        values = getattr(record, FIELDS, None)
        return values if isinstance(values, Mapping) else {}


class CeleryTaskJsonFormatter(JsonFormatter):
    """For Celery's task logger (`get_task_logger`), as its TaskFormatter does for
    text: the task the record was logged in, as `task_id` and `task_name`."""

    def fields(self, record: logging.LogRecord) -> Mapping[str, Any]:
        from celery._state import get_current_task  # where Celery's own TaskFormatter gets it

        task = get_current_task()
        if task is None or not task.request:
            return super().fields(record)
        return {"task_id": task.request.id, "task_name": task.name, **super().fields(record)}


def handler(stream: TextIO | None = None) -> logging.Handler:
    """A handler writing JSON lines to `stream` (stderr, as the text log)."""
    json_handler = logging.StreamHandler(stream)
    json_handler.setFormatter(JsonFormatter())
    return json_handler


def use_in_celery() -> None:
    """JSON lines from a Celery worker or beat started in this process.

    Celery sets up its own logging when it starts (the root logger's handler, the
    task logger's, the redirect of a task's prints to a logger). All of that stays;
    only the formatters of the handlers it made change, through the signals it sends
    once they exist. A prefork pool's processes are forked after that, so they
    write with the same formatters."""
    from celery import signals

    signals.after_setup_logger.connect(_json_celery_handlers, weak=False)
    signals.after_setup_task_logger.connect(_json_celery_task_handlers, weak=False)


def _json_celery_handlers(logger: logging.Logger, **_: Any) -> None:
    from celery.utils.log import get_multiprocessing_logger

    # The pool's own logger (billiard's), which Celery sets up beside the root logger.
    pool = get_multiprocessing_logger()
    for each in (logger, *([pool] if pool is not None else [])):
        for each_handler in each.handlers:
            each_handler.setFormatter(JsonFormatter())


def _json_celery_task_handlers(logger: logging.Logger, **_: Any) -> None:
    for each_handler in logger.handlers:
        each_handler.setFormatter(CeleryTaskJsonFormatter())
