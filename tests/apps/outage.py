"""`progress-sse worker`'s app with one more task, for tests/test_worker_outage.py: a
task that reports progress and ends exactly while its Redis is down, so its
progress and its end must wait for Redis.

    celery -A tests.apps.outage worker
"""

from __future__ import annotations

import os
import time

import redis

from progress_sse import set_message, set_progress
from progress_sse.worker import progress
from progress_sse.worker.app import app

__all__ = ["app"]


REPORTS = 5


@app.task(name="outage.ends_while_redis_is_down", bind=True)
def ends_while_redis_is_down(self: object, timeout: float = 60) -> str:
    set_message("Waiting for Redis to go away")
    client = redis.Redis.from_url(os.environ["REDIS_URL"], socket_timeout=1, socket_connect_timeout=1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            client.ping()
        except redis.ConnectionError:
            break
        time.sleep(0.05)
    else:
        raise TimeoutError(f"Redis did not go away within {timeout}s")
    # Each report is handed to the outbox before the next is made, so they collapse
    # there (not in the coalescer): only the last may reach Redis.
    task_id = str(self.request.id)  # type: ignore[attr-defined]
    coalescer = progress.active()
    assert coalescer is not None and coalescer.outbox is not None
    for i in range(1, REPORTS + 1):
        set_progress(i, REPORTS, f"Reported {i} of {REPORTS} while Redis was down")
        while coalescer._slots[task_id].pending or not coalescer.outbox.holds(task_id):
            if time.monotonic() > deadline:
                raise TimeoutError("the progress report did not reach the outbox")
            time.sleep(0.01)
    return "ended while Redis was down"
