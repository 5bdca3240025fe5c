"""An existing Celery app, as a user has it: its own name, its own tasks, configured
from its environment. Adding progress-sse took the `install` line and the progress
calls inside the tasks; `generate_invoices` was written for celery-progress and only
changed its import.

    python -m celery -A tests.apps.shop worker -Q "$PROGRESS_SSE_QUEUE"
"""

from __future__ import annotations

import os
import time
from typing import Any

from celery import Celery

import progress_sse
from progress_sse import set_message, set_progress, track
from progress_sse.celery_progress import ProgressRecorder  # was: from celery_progress.backend import ...

app = Celery("shop", broker=os.environ.get("CELERY_BROKER_URL") or os.environ.get("REDIS_URL"))
app.conf.update(
    task_default_queue=os.environ.get("PROGRESS_SSE_QUEUE", "shop"),
    task_ignore_result=True,
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)
progress_sse.install(app)  # REDIS_URL, PROGRESS_SSE_KEY_PREFIX, ... from the environment


@app.task(name="shop.import_products")
def import_products(count: int = 5, delay: float = 0.0) -> dict[str, int]:
    """Determinate: a known number of rows."""
    for i in range(1, count + 1):
        time.sleep(delay)  # stands for saving one product
        set_progress(i, count, f"Imported {i} of {count} products")
    return {"imported": count}


@app.task(name="shop.rebuild_search_index")
def rebuild_search_index(seconds: float = 0.1) -> str:
    """Indeterminate: no idea how long it takes, only what it is doing."""
    set_message("Rebuilding the search index")
    time.sleep(seconds)  # stands for the rebuild
    return "rebuilt"


@app.task(name="shop.send_newsletter")
def send_newsletter(recipients: int = 4, delay: float = 0.0) -> dict[str, int]:
    """The iterable helper counts the items for the task."""
    addresses = [f"customer{i}@shop.example" for i in range(recipients)]
    for _address in track(addresses, message="Sent {current} of {total}"):
        time.sleep(delay)  # stands for sending one mail
    return {"sent": recipients}


@app.task(bind=True, name="shop.generate_invoices")
def generate_invoices(self: Any, count: int = 3, delay: float = 0.0) -> int:
    """Written for celery-progress: a ProgressRecorder with set_progress and increment_progress."""
    progress_recorder = ProgressRecorder(self)
    progress_recorder.set_progress(0, count, description="Starting")
    for i in range(1, count + 1):
        time.sleep(delay)  # stands for rendering one invoice
        progress_recorder.increment_progress(description=f"Rendered invoice {i} of {count}")
    return count
