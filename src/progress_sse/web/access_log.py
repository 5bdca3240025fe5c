"""The access log, without tokens: a stream's `?token=` is a credential.

Each line is aiohttp's (its default format, `%a %t "%r" %s %b "%{Referer}i"
"%{User-Agent}i"`), with every place a token could show masked. The record also
carries the request's fields for the JSON log (json_logs.py): `request_id`,
`method`, `route` (the route's name, e.g. `task_events`), `path` (masked), `status`,
`duration_ms` and `bytes` (as sent, headers included). aiohttp's own `extra` (the
raw headers among them) is not passed on.
"""

from __future__ import annotations

import re

from aiohttp import web
from aiohttp.web_log import AccessLogger
from multidict import CIMultiDict

from ..json_logs import fields
from . import request_id

MASK = "***"
# A token in the query of a URL a header names: the page that opened a stream (Referer).
_TOKEN_IN_URL = re.compile(r"([?&]token=)[^&#\s]*")
# In text quoted from a request (a parse error quotes the line it could not read):
# a query's token, an Authorization header's credentials, anything shaped like a JWT.
_TOKEN_IN_TEXT = re.compile(
    r"(?P<keep>[?&]token=|authorization:\s*(?:bearer\s+)?)[^&#\s'\"]*|eyJ[\w-]*\.[\w-]*\.[\w-]*",
    re.IGNORECASE,
)


def without_tokens(text: str) -> str:
    """`text` (a request line or header quoted by a parse error) with every token
    in it masked, for the log."""
    return _TOKEN_IN_TEXT.sub(lambda m: (m.group("keep") or "") + MASK, text)


class TokenlessAccessLogger(AccessLogger):
    """aiohttp's access log, with a token masked wherever the request carries one:
    the value of a `token` query parameter, the `Authorization` header (which the
    default format does not show, but an `access_log_format` may) and a `token` in
    the Referer's query."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        try:
            masked = _masked(request)
            # aiohttp's AccessLogger.log, less its `extra`: the same line, our fields.
            line = self._log_format % tuple(value for _, value in self._format_line(masked, response, time))
            self.logger.info(
                line,
                extra=fields(
                    request_id=request_id.of(request),
                    method=request.method,
                    route=_route(request),
                    path=masked.path_qs,
                    status=response.status,
                    duration_ms=round(time * 1000, 1),
                    bytes=response.body_length,
                ),
            )
        except Exception:
            self.logger.exception("Error in logging")


def _masked(request: web.BaseRequest) -> web.BaseRequest:
    """The request as the log may show it (itself when nothing needs masking)."""
    rel_url = request.rel_url.update_query(token=MASK) if "token" in request.query else request.rel_url
    referer = request.headers.get("Referer")
    if "Authorization" not in request.headers and not (referer and _TOKEN_IN_URL.search(referer)):
        return request if rel_url is request.rel_url else request.clone(rel_url=rel_url)
    headers = CIMultiDict(request.headers)
    if "Authorization" in headers:
        headers["Authorization"] = MASK
    if referer:
        headers["Referer"] = _TOKEN_IN_URL.sub(rf"\g<1>{MASK}", referer)
    return request.clone(rel_url=rel_url, headers=headers)


def _route(request: web.BaseRequest) -> str | None:
    """The name of the route that served the request; None when none did (a 404)."""
    if not isinstance(request, web.Request):
        return None
    try:
        return request.match_info.route.name
    except AssertionError:  # never routed: aiohttp refused it before (its match_info is unset)
        return None
