"""The worker's Celery app: `celery -A progress_sse.worker.app worker` (or `progress-sse worker`).

Configured from the environment, with the bridge installed and the demo tasks registered.
"""

from __future__ import annotations

import os

from ..config import Settings
from . import demo
from .bridge import install
from .celery_app import make_celery

settings = Settings.from_env(os.environ)
app = make_celery(settings)
install(app, settings)
demo.register(app)
