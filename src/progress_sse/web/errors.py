"""JSON errors: every one is `{"error": "<a sentence a person can act on>"}`."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from ..connections import REDIS_ERRORS
from ..events import dumps
from .hub import HubUnavailable

# What says Redis is not answering now (a 503, or a stream told to retry later).
UNAVAILABLE: tuple[type[Exception], ...] = (*REDIS_ERRORS, HubUnavailable, ConnectionError)

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error(status: type[web.HTTPException], message: str, **kwargs: object) -> web.HTTPException:
    return status(text=dumps({"error": message}), content_type="application/json", **kwargs)  # type: ignore[arg-type]


REDIS_DOWN = "Redis is not answering, so task state cannot be read or stored; try again shortly."


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn aiohttp's own text errors (no route, wrong method) and outages into JSON;
    a client error never becomes a 500."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400 or exc.content_type == "application/json":
            raise
        if exc.status == 404:
            raise error(web.HTTPNotFound, f"There is no {request.path}; see the API in docs/protocol.md.") from None
        if isinstance(exc, web.HTTPMethodNotAllowed):
            allowed = ", ".join(sorted(exc.allowed_methods))
            raise error(
                web.HTTPMethodNotAllowed,
                f"{request.method} is not allowed on {request.path}; use {allowed}.",
                method=request.method,
                allowed_methods=exc.allowed_methods,
            ) from None
        raise error(type(exc), exc.reason or exc.text or "request refused") from None
    except UNAVAILABLE:
        log.warning("Redis unavailable while serving %s %s", request.method, request.path, exc_info=True)
        raise error(web.HTTPServiceUnavailable, REDIS_DOWN, headers={"Retry-After": "2"}) from None
