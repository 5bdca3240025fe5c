"""Moving off celery-progress: its `ProgressRecorder`, and its progress view's JSON.

A task written for celery-progress keeps working by changing one import::

    from celery_progress.backend import ProgressRecorder      # before
    from progress_sse.celery_progress import ProgressRecorder  # after

`celery_progress_json(state)` turns a task's state (the body of `GET /tasks/<id>`)
into the JSON that celery-progress's `get_progress` view returns, so a front end
that polls that view keeps working while it moves to the event stream.

Both follow celery-progress's `celery_progress/backend.py` (`BaseProgressRecorder`,
`ProgressRecorder`, `Progress.get_info`) as of the release that added
`increment_progress`. See docs/integration.md for the mapping of states.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

from .events import State, finite_number
from .worker import progress

log = logging.getLogger(__name__)

# celery-progress's name for the Celery state a ProgressRecorder sets.
PROGRESS_STATE = "PROGRESS"


class ProgressRecorder:
    """celery-progress's recorder, reporting through progress-sse.

    Calls are coalesced like `progress_sse.set_progress` and never raise into the
    task. Unlike celery-progress it does not call `task.update_state`, so it needs
    no result backend. A `total` of 0 or less, which is how celery-progress says
    "unknown total" (`increment_progress` before any `set_progress`), is streamed
    as an indeterminate bar (`total: null`).
    """

    def __init__(self, task: Any) -> None:
        self.task = task
        self.current: float = 0
        self.total: float = 0
        self.description: str = ""

    def set_progress(self, current: float, total: float, description: str = "") -> tuple[str, dict[str, Any]]:
        """Report `current` of `total`; returns celery-progress's `(state, meta)`."""
        self.current = current
        self.total = total
        if description:
            self.description = description
        meta = {
            "pending": False,
            "current": current,
            "total": total,
            "percent": _percent(current, total),
            "description": description,
        }
        self._report(current, total, description)
        return PROGRESS_STATE, meta

    def increment_progress(self, by: float = 1, description: str = "") -> None:
        """Add `by` to the count, keeping the last total (0 until one is set)."""
        try:
            current = self.current + by
        except TypeError:  # never into the task, whatever it passes
            log.warning("progress-sse: increment_progress(by=%r) is not a number", by)
            return
        self.set_progress(current, self.total, description)

    def _report(self, current: float, total: float | None, description: str) -> None:
        try:
            coalescer = progress.active()
            task_id = getattr(getattr(self.task, "request", None), "id", None)
            if coalescer is None or task_id is None:
                return
            count = finite_number(current)
            whole = finite_number(total) if total is not None else None
            if whole is not None and whole <= 0:
                whole = None
            text = str(description) if description else None
            values: progress.Values = (count if count is not None else 0, whole, text)
            coalescer.report(str(task_id), getattr(self.task, "name", None), values)
        except Exception:
            log.warning("progress-sse could not record progress", exc_info=True)


def _percent(current: Any, total: Any) -> float:
    """celery-progress's percent: 0 unless total > 0, else 100 * current / total to 2 places."""
    count, whole = finite_number(current), finite_number(total)
    if count is None or whole is None or whole <= 0:
        return 0
    try:
        return float(round(Decimal(count) / Decimal(whole) * 100, 2))
    except ArithmeticError:  # beyond Decimal's precision
        return 0


def celery_progress_json(state: Mapping[str, Any] | None) -> dict[str, Any]:
    """celery-progress's `Progress.get_info()` for a task's state.

    `state` is the body of `GET /tasks/<id>` (`store.describe`), or None for an id
    the service does not know: celery-progress reports those as PENDING, because
    Celery does.
    """
    if state is None:
        return _running("PENDING")
    kind = state.get("state")
    message = state.get("message")
    if kind == State.QUEUED:
        return _running("PENDING")
    if kind == State.STARTED:
        return _running("STARTED")
    if kind == State.PROGRESS:
        total = state.get("total")
        return {
            "state": PROGRESS_STATE,
            "complete": False,
            "success": None,
            "progress": {
                "pending": False,
                "current": state.get("current") or 0,
                # celery-progress's "unknown total" is 0, with percent 0.
                "total": total if total is not None else 0,
                "percent": state.get("percent") or 0,
                "description": message or "",
            },
        }
    if kind == State.RETRY:
        return _ended("RETRY", False, {"next_retry_seconds": _retry_seconds(state), "message": message or ""})
    if kind == State.SUCCESS:
        return _ended("SUCCESS", True, state.get("result"))
    if kind == State.FAILURE:
        error = state.get("error") or {}
        return _ended("FAILURE", False, error.get("message") or error.get("type") or message or "")
    if kind == State.REVOKED:
        return _ended("REVOKED", False, f"Task {state.get('reason') or 'revoked'}")
    if kind == State.LOST:
        # No Celery state says this; Celery reports a task whose worker died as FAILURE.
        return _ended("FAILURE", False, message or "Task lost: it stopped reporting and will never finish")
    # What celery-progress answers for a state it does not know.
    unknown = str(kind).upper()
    return {
        "state": unknown,
        "complete": True,
        "success": False,
        "progress": _unknown_progress(unknown),
        "result": f"Unknown state {unknown}",
    }


def _running(state: str) -> dict[str, Any]:
    return {"state": state, "complete": False, "success": None, "progress": _unknown_progress(state)}


def _ended(state: str, success: bool, result: Any) -> dict[str, Any]:
    completed = {"pending": False, "current": 100, "total": 100, "percent": 100}
    return {"state": state, "complete": True, "success": success, "progress": completed, "result": result}


def _unknown_progress(state: str) -> dict[str, Any]:
    return {"pending": state == "PENDING", "current": 0, "total": 100, "percent": 0}


def _retry_seconds(state: Mapping[str, Any]) -> int | str:
    """The countdown the retry asked for (celery-progress reads it from "Retry in Ns")."""
    eta, ts = finite_number(state.get("eta")), finite_number(state.get("ts"))
    if eta is None or ts is None:
        return "Unknown"
    return max(0, round(eta - ts))
