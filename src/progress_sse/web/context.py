"""The web app's shared objects, as typed aiohttp app keys.

Their own module so that the handlers, the control path and the pages can all
reach them without importing the app factory (which imports all of those).
"""

from __future__ import annotations

import redis.asyncio as aioredis
from aiohttp import web
from celery import Celery

from ..allowlist import AllowList
from ..config import Settings
from ..worker.publisher import Publisher
from .access import Access
from .delivery import EventStream
from .hub import Hub, Hubs
from .store import Store

SETTINGS = web.AppKey("settings", Settings)
ACCESS = web.AppKey("access", Access)
ALLOWLIST = web.AppKey("allowlist", AllowList)
CELERY = web.AppKey("celery", Celery)
REDIS = web.AppKey("redis", aioredis.Redis)
STORE = web.AppKey("store", Store)
HUB: web.AppKey[Hub | Hubs] = web.AppKey("hub")
STREAMS = web.AppKey("streams", EventStream)
PUBLISHER = web.AppKey("publisher", Publisher)
