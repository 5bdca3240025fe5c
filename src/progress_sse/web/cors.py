"""CORS for the pages of a host app on another origin (PROGRESS_SSE_CORS_ORIGINS).

Only exact origins are listed, and only the routes a watching page needs answer
them: a task's or group's state and stream, start and cancel. Credentials
(cookies) are never allowed: the pages send tokens, which a browser does not
attach on its own. Every answer on those routes says `Vary: Origin`, so a cache
never hands one origin's answer to another.

Written here rather than taken from aiohttp-cors: that package registers an
OPTIONS route per resource (its preflight answers bypass the JSON errors every
other answer has) and sends no `Vary: Origin`.
"""

from __future__ import annotations

from collections.abc import Collection

from aiohttp import hdrs, web

from .errors import error

# Headers a page sends: the token, a JSON body, and EventSource's own on reconnect.
ALLOW_HEADERS = "Authorization, Content-Type, Last-Event-ID"
# Headers a page may read: where a started task lives, when to retry, why a 401.
EXPOSE_HEADERS = "Location, Retry-After, WWW-Authenticate"
MAX_AGE = "600"  # seconds a browser may reuse a preflight's answer


class Cors:
    def __init__(self, origins: Collection[str], routes: Collection[tuple[str, str]]) -> None:
        self.origins = frozenset(origins)
        # (method, route name) of the routes that answer other origins.
        self.routes = frozenset(routes)

    async def preflight(self, request: web.Request) -> web.Response | None:
        """The answer to a preflight (OPTIONS with Access-Control-Request-Method),
        or None for any other request."""
        method = request.headers.get(hdrs.ACCESS_CONTROL_REQUEST_METHOD)
        origin = request.headers.get(hdrs.ORIGIN)
        if request.method != "OPTIONS" or method is None or origin is None:
            return None
        match = await request.app.router.resolve(request.clone(method=method.upper()))
        if (method.upper(), match.route.name or "") not in self.routes:
            raise error(web.HTTPForbidden, f"{request.path} does not take {method} requests from other origins.")
        if origin not in self.origins:
            raise error(
                web.HTTPForbidden,
                f"The origin {origin} may not call this service; its operator can add it to PROGRESS_SSE_CORS_ORIGINS.",
            )
        return web.Response(
            status=204,
            headers={
                hdrs.ACCESS_CONTROL_ALLOW_ORIGIN: origin,
                hdrs.ACCESS_CONTROL_ALLOW_METHODS: method.upper(),
                hdrs.ACCESS_CONTROL_ALLOW_HEADERS: ALLOW_HEADERS,
                hdrs.ACCESS_CONTROL_MAX_AGE: MAX_AGE,
                hdrs.VARY: "Origin",
            },
        )

    async def on_prepare(self, request: web.Request, response: web.StreamResponse) -> None:
        """Every answer on a CORS route, errors included: a page must be able to read
        a 401 to renew its token."""
        if not self.origins or (request.method, request.match_info.route.name or "") not in self.routes:
            return
        _vary_origin(response)
        origin = request.headers.get(hdrs.ORIGIN)
        if origin in self.origins and hdrs.ACCESS_CONTROL_ALLOW_ORIGIN not in response.headers:
            response.headers[hdrs.ACCESS_CONTROL_ALLOW_ORIGIN] = origin
            response.headers[hdrs.ACCESS_CONTROL_EXPOSE_HEADERS] = EXPOSE_HEADERS


def _vary_origin(response: web.StreamResponse) -> None:
    vary = response.headers.get(hdrs.VARY)
    if vary is None:
        response.headers[hdrs.VARY] = "Origin"
    elif "origin" not in vary.lower():
        response.headers[hdrs.VARY] = f"{vary}, Origin"
