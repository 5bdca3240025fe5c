"""The demo tasks of PROTOCOL.md and their allow-list entries.

The task bodies run in the worker (`register(app)`); the allow-list is what the web
process checks requests against, so bad parameters get a 422 and are never queued.
"""

from __future__ import annotations

import random
import time
from typing import Any

from celery import Celery, Task

from ..allowlist import AllowedTask, AllowList, ParamError, integer, number
from .progress import set_message, set_progress


def _min_not_above_max(params: dict[str, Any]) -> None:
    if params["min_s"] > params["max_s"]:
        raise ParamError(f"min_s ({params['min_s']}) must not be greater than max_s ({params['max_s']})")


def _demo(name: str, description: str, *, check_all: Any = None, **params: tuple[Any, Any]) -> AllowedTask:
    """An allow-list entry for `demo.<name>`: its parameters, in order, as
    name=(check, default); the description is the page's hint."""
    return AllowedTask(f"demo.{name}", params, check_all=check_all, description=description)


DEMO_TASKS = AllowList(
    [
        _demo(
            "count", "determinate: n steps, 'Processed i of n'", n=(integer(1, 100_000), 50), delay=(number(0, 60), 0.1)
        ),
        _demo(
            "mystery",
            "indeterminate: runs a random time, reports no total",
            check_all=_min_not_above_max,
            min_s=(number(0, 3600), 10),
            max_s=(number(0, 3600), 20),
        ),
        _demo("stages", "named stages at 25/50/75/100 %", delay=(number(0, 600), 2.0)),
        _demo(
            "fail", "progresses, then raises RuntimeError", after=(integer(0, 100_000), 5), delay=(number(0, 60), 0.1)
        ),
        _demo(
            "flaky",
            "retries `failures` times, then succeeds",
            failures=(integer(0, 10), 2),
            delay=(number(0, 600), 0.5),
        ),
    ],
    title="Start a demo task",
)

STAGES = ("Fetching", "Parsing", "Indexing", "Publishing")


def count(n: int = 50, delay: float = 0.1) -> dict[str, int]:
    for i in range(1, n + 1):
        time.sleep(delay)
        set_progress(i, n, f"Processed {i} of {n}")
    return {"processed": n}


def mystery(min_s: float = 10, max_s: float = 20) -> dict[str, float]:
    seconds = random.uniform(min_s, max_s)
    set_message("Working on something of unknown length")
    time.sleep(seconds)
    return {"seconds": round(seconds, 2)}


def stages(delay: float = 2.0) -> dict[str, int]:
    for i, stage in enumerate(STAGES, start=1):
        time.sleep(delay)
        set_progress(25 * i, 100, stage)
    return {"stages": len(STAGES)}


def fail(after: int = 5, delay: float = 0.1) -> None:
    total = after * 2
    for i in range(1, after + 1):
        time.sleep(delay)
        set_progress(i, total, f"Processed {i} of {total}")
    raise RuntimeError(f"demo.fail gave up after {after} steps, as it was asked to")


def flaky(self: Task, failures: int = 2, delay: float = 0.5) -> dict[str, int]:
    attempt = self.request.retries + 1
    set_message(f"Attempt {attempt}")
    time.sleep(delay)
    if self.request.retries < failures:
        raise self.retry(
            exc=ConnectionError(f"flaky dependency refused attempt {attempt}"),
            countdown=delay,
            max_retries=failures,
        )
    return {"attempts": attempt}


def register(app: Celery) -> None:
    app.task(name="demo.count")(count)
    app.task(name="demo.mystery")(mystery)
    app.task(name="demo.stages")(stages)
    app.task(name="demo.fail")(fail)
    app.task(name="demo.flaky", bind=True)(flaky)
