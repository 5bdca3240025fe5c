"""The demo schedule: periodic demo tasks for `celery beat`, so a page opened on
`progress-sse dev --beat` shows tasks arrive that nobody started.

It is opt-in (PROGRESS_SSE_DEMO_SCHEDULE, which `dev --beat` sets): worker/app.py
puts it in the app's `beat_schedule` only then. A user's own app has its own
schedule; nothing here touches it.

Each entry runs once as soon as beat starts with it, then every interval: a new
entry counts as last run one interval ago (`last_run_at`, which Celery's beat
takes from an entry's keys when the entry is new to its schedule file; a beat that
restarts on the same file keeps the times it stored). A run still waiting for a
worker after its interval expires (the worker records it `revoked`, reason
`expired`), so a beat without a worker does not pile up a queue of demo runs.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

# Seconds between runs: a short determinate task, and a longer one in named stages.
COUNT_EVERY = 20.0
STAGES_EVERY = 60.0


def demo_schedule(count_every: float = COUNT_EVERY, stages_every: float = STAGES_EVERY) -> dict[str, dict[str, Any]]:
    """`beat_schedule` entries: demo.count every `count_every` seconds, demo.stages
    every `stages_every`."""
    return {
        f"demo.count every {count_every:g} s": _entry("demo.count", count_every, n=10, delay=0.3),
        f"demo.stages every {stages_every:g} s": _entry("demo.stages", stages_every, delay=1.0),
    }


def _entry(task: str, every: float, **kwargs: Any) -> dict[str, Any]:
    return {
        "task": task,
        "schedule": every,
        "kwargs": kwargs,
        "options": {"expires": every},
        "last_run_at": datetime.now(UTC) - timedelta(seconds=every),
    }
