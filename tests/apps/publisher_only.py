"""A web app in another framework (Django, Flask, ...) that only publishes tasks.

It has no task code and serves no streams: it creates its Celery app, installs the
bridge there (so this process records `queued` the moment it sends a task), sends a
shop task by name and prints its id. The progress service, running beside it on the
same Redis, serves the task's stream. Run as a plain script:

    python tests/apps/publisher_only.py [COUNT]
"""

from __future__ import annotations

import os
import sys

from celery import Celery

import progress_sse


def main(argv: list[str]) -> int:
    count = int(argv[1]) if len(argv) > 1 else 3
    app = Celery("storefront", broker=os.environ.get("CELERY_BROKER_URL") or os.environ.get("REDIS_URL"))
    app.conf.task_default_queue = os.environ.get("PROGRESS_SSE_QUEUE", "shop")
    progress_sse.install(app)  # in Django: proj/celery.py, next to `app = Celery(...)`
    result = app.send_task("shop.import_products", kwargs={"count": count})
    print(result.id, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
