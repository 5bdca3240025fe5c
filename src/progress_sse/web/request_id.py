"""Each request's id: the one in its `X-Request-Id` header when that is a sane
one (a proxy's or a client's), else a new one. It is echoed in the response's
`X-Request-Id` and written on the request's access log line, so a client's
report, a proxy's log and ours can be matched line to line.

create_app registers `echo_request_id`, so every response the app sends carries it:
errors, refusals and streams too.
"""

from __future__ import annotations

import re
import secrets

from aiohttp import web

HEADER = "X-Request-Id"
# Where a request keeps its id (its own state, which the access log reads).
REQUEST_ID = web.RequestKey("request_id", str)
# Short, and characters that are safe in a header and a log line (no spaces, quotes,
# commas or semicolons). 64 at most also keeps any access token out: the shortest
# JWT, an empty HS256 one, is 68 characters.
_SANE = re.compile(r"[A-Za-z0-9._:+=@/~-]{1,64}")


def of(request: web.BaseRequest) -> str:
    """The request's id, chosen on first use: the incoming one if sane, else new."""
    if REQUEST_ID in request:
        return request[REQUEST_ID]
    incoming = request.headers.get(HEADER, "")
    chosen = request[REQUEST_ID] = incoming if _SANE.fullmatch(incoming) else secrets.token_hex(8)
    return chosen


async def echo_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """An app's on_response_prepare signal: the id goes on every response."""
    response.headers[HEADER] = of(request)
