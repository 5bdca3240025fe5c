"""The web process: the HTTP API, the event streams and the page.

`create_app(settings)` builds it; serve it with `RUN_OPTIONS`, or mount it in
your own aiohttp app. One pub/sub connection (web/hub.py) feeds every stream
(web/delivery.py); the store reads state and history; the control path queues and
cancels tasks; the reaper ends the tasks of workers that vanished.
"""

from .app import MAX_REQUEST_LINE, RUN_OPTIONS, create_app
from .context import ALLOWLIST, CELERY, HUB, PUBLISHER, REDIS, SETTINGS, STORE, STREAMS
from .handlers import NO_WORKER

__all__ = [
    "ALLOWLIST",
    "CELERY",
    "HUB",
    "MAX_REQUEST_LINE",
    "NO_WORKER",
    "PUBLISHER",
    "REDIS",
    "RUN_OPTIONS",
    "SETTINGS",
    "STORE",
    "STREAMS",
    "create_app",
]
