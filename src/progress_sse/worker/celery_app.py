"""A Celery app configured from Settings, shared by the worker and the web process."""

from __future__ import annotations

import os

from celery import Celery

from ..config import Settings, check_broker
from ..redis_urls import is_sentinel_url, parse_sentinel


def make_celery(settings: Settings, *, main: str = "progress_sse") -> Celery:
    check_broker(settings)
    broker, transport_options = settings.broker_url, dict[str, object]()
    if is_sentinel_url(broker):  # kombu names a Redis behind Sentinel its own way
        broker, transport_options = parse_sentinel(broker).kombu()
        # Celery takes CELERY_BROKER_URL from the environment over any broker it is
        # given (its Settings.broker_url), and `progress-sse worker` exports the
        # settings there: our form must not be what it finds.
        if is_sentinel_url(os.environ.get("CELERY_BROKER_URL", "")):
            os.environ["CELERY_BROKER_URL"] = broker
    app = Celery(main, broker=broker)
    app.conf.update(
        broker_transport_options=transport_options,
        task_default_queue=settings.queue,
        broker_connection_retry_on_startup=True,
        # Progress lives in Redis; a result backend is the app's own choice, not ours.
        result_backend=None,
        task_ignore_result=True,
        # One task at a time per pool process: a long job must not hold shorter ones
        # back in its prefetch buffer while their bars sit at "queued".
        worker_prefetch_multiplier=1,
        worker_hijack_root_logger=False,
    )
    return app
