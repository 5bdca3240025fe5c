"""The worker's Celery app: `celery -A progress_sse.worker.app worker` (or `progress-sse worker`).

Configured from the environment, with the bridge installed and the demo tasks
registered; `celery beat` for it (`progress-sse beat`) sends the demo schedule when
PROGRESS_SSE_DEMO_SCHEDULE is on, and nothing otherwise.
"""

from __future__ import annotations

import os

from ..config import Settings
from . import demo
from .bridge import install
from .celery_app import make_celery
from .schedule import demo_schedule

settings = Settings.from_env(os.environ)
app = make_celery(settings)
install(app, settings)
demo.register(app)
if settings.demo_schedule:
    app.conf.beat_schedule = demo_schedule()
