"""Broadcast notices: `POST /notices` puts a short text in front of every open page.

An operator posts `{"text": "…"}`. One script stores it (for NOTICE_TTL seconds)
and announces it on the first partition's hub channel, which every web process
keeps subscribed (web/hub.py), in one round trip. Each process keeps the latest
notice and writes it as an `event: notice` frame to every stream it serves: task
streams, `/events`, groups and the feed (web/delivery.py `EventStream.broadcast`).
A stream that opens (a page that reconnects) gets the latest one first, if it has
not expired; pages tell repeats apart by the notice's `id`.

A notice frame has no `id:` line: it is no event of any task, and moves no cursor.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from ..events import dumps, encode_sse
from ..keys import Keys
from .access import authorize
from .context import STORE
from .errors import error
from .handlers import json_object

log = logging.getLogger(__name__)

MAX_TEXT = 500  # characters: a banner, not a page
NOTICE_TTL = 600  # seconds a notice is kept for the pages that (re)connect

# KEYS[1]: the notice's key; ARGV[1]: its JSON; ARGV[2]: seconds to keep it;
# ARGV[3]: the channel (in the key's slot: the first partition's hub channel).
_POST_LUA = """
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
redis.call('{publish}', ARGV[3], ARGV[1])
return 1
"""


@dataclass(frozen=True, slots=True)
class Notice:
    id: str
    text: str
    ts: float
    # When it stops being shown to streams that open, on the wall clock.
    expires: float

    @classmethod
    def parse(cls, raw: str) -> Notice:
        """A stored or announced notice, or ValueError."""
        data = json.loads(raw)
        return cls(str(data["id"]), str(data["text"]), float(data["ts"]), float(data["expires"]))

    def body(self) -> dict[str, Any]:
        return {"id": self.id, "text": self.text, "ts": self.ts}

    def frame(self) -> bytes:
        return encode_sse(event="notice", data=dumps(self.body()))


class Notices:
    """The latest notice of this process, and the way to post one."""

    def __init__(self, keys: Keys) -> None:
        self.keys = keys
        self.latest: Notice | None = None
        self._frame = b""  # the latest's, encoded once: every stream that opens is sent it
        self._script = _POST_LUA.replace("{publish}", "SPUBLISH" if keys.cluster else "PUBLISH")

    @property
    def key(self) -> str:
        return self.keys.notice

    def current(self) -> bytes:
        """The latest notice's frame, while it is kept; else nothing."""
        latest = self.latest
        return self._frame if latest is not None and time.time() < latest.expires else b""

    def heard(self, raw: str) -> Notice | None:
        """A notice announced on the hub channel: the latest now (None: not one of ours)."""
        try:
            notice = Notice.parse(raw)
        except (ValueError, KeyError, TypeError):
            log.warning("progress-sse ignored a malformed notice: %.80r", raw)
            return None
        self.latest, self._frame = notice, notice.frame()
        return notice

    async def load(self, client: Any) -> None:
        """The notice stored before this process started, if one is still kept."""
        raw = await client.get(self.key)
        if raw is not None:
            self.heard(raw)

    async def post(self, client: Any, text: str) -> Notice:
        now = time.time()
        notice = Notice(secrets.token_hex(8), text, round(now, 3), now + NOTICE_TTL)
        raw = dumps({**notice.body(), "expires": notice.expires})
        await client.eval(self._script, 1, self.key, raw, NOTICE_TTL, self.keys.control_channel(0))
        return notice


NOTICES = web.AppKey("notices", Notices)


async def post_notice(request: web.Request) -> web.Response:
    authorize(request, "operator")
    data = await json_object(request, "the notice", '{"text": "Deploying at 18:00: streams reconnect."}')
    text = data.get("text")
    if not isinstance(text, str) or not text.strip():
        raise error(web.HTTPUnprocessableEntity, 'Give the notice a text: {"text": "…"}, not empty.')
    text = text.strip()
    if len(text) > MAX_TEXT:
        raise error(
            web.HTTPUnprocessableEntity, f"A notice is at most {MAX_TEXT} characters, not {len(text)}: keep it short."
        )
    store = request.app[STORE]
    notice = await request.app[NOTICES].post(store.partitions[0], text)
    return web.json_response({**notice.body(), "expires": notice.expires}, status=202, dumps=dumps)
