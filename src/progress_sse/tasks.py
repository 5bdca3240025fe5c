"""`celery -A progress_sse.tasks worker` keeps working: the worker's app now lives
in worker/app.py."""

from .worker.app import app

__all__ = ["app"]
