"""Task control against Celery: queue a task, cancel one.

Each blocking Celery call runs in a thread, so the event loop never waits on the
broker; a failed call becomes one answer (`broker_failed`) whoever made it.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import web
from kombu.exceptions import OperationalError

from ..events import State, is_terminal, make_event
from .context import CELERY, HUB, PUBLISHER, STORE
from .errors import error
from .hub import Signal

log = logging.getLogger(__name__)

# A broker that does not answer gets two quick retries (0.2 s apart), then the
# request fails with a 503 the client can retry: nobody waits on Celery's defaults.
BROKER_RETRY: dict[str, Any] = {"max_retries": 2, "interval_start": 0, "interval_step": 0.2}
# How long DELETE waits for the worker to confirm a running task's revocation
# before it records the revocation itself (PROTOCOL.md: watchers know within 2 s).
REVOKE_GRACE = 1.5


def queue(app: web.Application, task_id: str, name: str, kwargs: dict[str, Any]) -> str | None:
    """Store `queued`, then publish; if publishing fails, forget the task again so
    nothing is left half-queued. Runs in a thread: both calls block."""
    publisher = app[PUBLISHER]
    cursor = publisher.publish(make_event(task_id, name, State.QUEUED))
    try:
        app[CELERY].send_task(
            name,
            kwargs=kwargs,
            task_id=task_id,
            retry_policy=BROKER_RETRY,
        )
    except Exception as exc:
        publisher.discard(task_id)
        raise broker_failed(exc, f"publish task {task_id} ({name})", "nothing was queued.") from None
    return cursor


def broker_failed(exc: Exception, action: str, consequence: str) -> web.HTTPException:
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


async def cancel(app: web.Application, task_id: str) -> str:
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
            await asyncio.to_thread(_revoke, app, task_id)
        except Exception as exc:
            if not waiting:
                raise broker_failed(exc, f"revoke task {task_id}", "the running task cannot be stopped.") from None
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


def _revoke(app: web.Application, task_id: str) -> None:
    """Broadcast the revocation (terminate=True: a running task gets SIGTERM).

    Like publishing a task, it gives a broker that does not answer two quick
    retries, then fails: left to Celery's defaults it kept DELETE waiting ~12 s."""
    celery = app[CELERY]
    with celery.connection_or_acquire() as connection:  # from the broker pool, as send_task's is
        connection.ensure_connection(**BROKER_RETRY)
        celery.control.revoke(task_id, connection=connection, terminate=True, signal="SIGTERM")


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
