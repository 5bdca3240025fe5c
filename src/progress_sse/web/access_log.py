"""The access log, without tokens: a stream's `?token=` is a credential."""

from __future__ import annotations

from aiohttp import web
from aiohttp.web_log import AccessLogger


class TokenlessAccessLogger(AccessLogger):
    """aiohttp's access log, with the value of a `token` query parameter masked.

    (A token in the Authorization header never reaches the default format.)"""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        if "token" in request.query:
            request = request.clone(rel_url=request.rel_url.update_query(token="***"))
        super().log(request, response, time)
