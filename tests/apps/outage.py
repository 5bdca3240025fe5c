"""`progress-sse worker`'s app with one more task, for tests/test_worker_outage.py: a
task that ends exactly while its Redis is down, so its end must wait for Redis.

    celery -A tests.apps.outage worker
"""

from __future__ import annotations

import os
import time

import redis

from progress_sse import set_message
from progress_sse.worker.app import app

__all__ = ["app"]


@app.task(name="outage.ends_while_redis_is_down")
def ends_while_redis_is_down(timeout: float = 60) -> str:
    set_message("Waiting for Redis to go away")
    client = redis.Redis.from_url(os.environ["REDIS_URL"], socket_timeout=1, socket_connect_timeout=1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            client.ping()
        except redis.ConnectionError:
            return "ended while Redis was down"
        time.sleep(0.05)
    raise TimeoutError(f"Redis did not go away within {timeout}s")
