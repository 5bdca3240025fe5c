"""How the web is served: request limits, the fd limit and correct HTTP on every connection.

aiohttp reads requests in its own `RequestHandler`, before any middleware runs,
and leaves these to us (`Connection`, made by `Server`):

- A header timeout: from the first byte of a request to the end of its headers
  (PROGRESS_SSE_HEADER_TIMEOUT). The clock starts at the first byte, not at
  connect: browsers open connections ahead of use, and an idle connection is the
  keep-alive timeout's (aiohttp's own; create_app sets it).
- A body timeout: from the end of the headers to the end of the body the request
  declares (PROGRESS_SSE_BODY_TIMEOUT). aiohttp would wait for ever.
  Either answers `408` and closes the connection.
- Its own parser errors (bad request line, header too long, bad chunking, ...):
  `{"error": ...}` JSON like every other 4xx, and one WARNING line, no traceback.
  Bad chunking after the headers fails the handler's read (aiohttp would leave it
  waiting), and the handler answers 400.
- A connection limit below the file-descriptor limit (PROGRESS_SSE_MAX_CONNECTIONS,
  by default web/limits.py's headroom): a new connection beyond it closes the
  oldest idle one (no request under way: keep-alive or half-sent), or is closed
  itself when none is idle, so `/healthz` and the API find room and Redis keeps
  its descriptors. Streams are never idle; their own limit is lower.
- The fd limit itself, should the process reach it anyway (a burst is accepted
  before any connection limit can act): asyncio then stops accepting for a second
  (ACCEPT_RETRY_DELAY), but logs a traceback for every failed `accept` of its
  backlog loop. An event-loop exception handler turns those into one WARNING line
  per incident and closes the idle connections, so the connections waiting in
  the backlog, `/healthz` among them, are accepted a second later. (uvloop,
  `new_loop`, accepts and closes them at once instead: docs/protocol.md,
  "Request limits".)

`run_app(app, ...)` is aiohttp's `web.run_app` serving through these; `Runner`
is the AppRunner, for tests and for embedding.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import logging
import socket
import time
from asyncio.constants import ACCEPT_RETRY_DELAY
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler, RequestPayloadError

from ..config import ConfigError, Settings
from ..events import dumps
from .access_log import without_tokens
from .context import SETTINGS
from .incidents import Incidents
from .limits import fd_limit, max_connections

log = logging.getLogger(__name__)

# Connections the kernel queues before they are accepted (capped by the kernel's
# net.core.somaxconn). aiohttp's 128 is passed by a thousand clients reconnecting
# at once after a deploy: the SYNs beyond it are retransmitted a second later,
# which is most of such a storm's tail.
LISTEN_BACKLOG = 1024
# The errors asyncio's accept loop reports as "out of system resource".
_OUT_OF_RESOURCE = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# Every response we write ourselves carries the headers the app adds to its own.
_SAFE_HEADERS = {"X-Content-Type-Options": "nosniff", "Cross-Origin-Resource-Policy": "same-origin"}


# What of aiohttp's internals this module builds on (RequestHandler's slots,
# AppRunner's server factory): checked once at import, so that an aiohttp that
# changed them fails at start with this message, not later with limits silently gone.
_AIOHTTP_INTERNALS = {
    RequestHandler: (
        "_request_count",
        "_messages",
        "_request_in_progress",
        "_payload_parser",
        "_upgraded",
        "_lingering_time",
    ),
    web.AppRunner: ("_make_server",),
}
_missing = [
    f"{cls.__name__}.{name}" for cls, names in _AIOHTTP_INTERNALS.items() for name in names if not hasattr(cls, name)
]
if _missing:  # pragma: no cover - only on an aiohttp this version was not made for
    raise ImportError(
        f"progress_sse.web.server needs aiohttp internals this aiohttp lacks ({', '.join(_missing)}); "
        f"install an aiohttp that progress-sse supports (see pyproject.toml)"
    )


class BodyTimeout(asyncio.TimeoutError):
    """A request's body did not arrive within the body timeout. A TimeoutError, so
    that aiohttp's lingering read of an unread body takes it as the end, too."""


class Connection(RequestHandler):
    """aiohttp's request handler (one per connection), with the header and body
    timeouts, JSON errors and the idleness `Server` evicts by."""

    __slots__ = ("_body", "_body_timeout", "_body_timer", "_header_timeout", "_header_timer")

    def __init__(self, manager: web.Server, *, header_timeout: float, body_timeout: float, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._header_timeout = header_timeout
        self._body_timeout = body_timeout
        self._header_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._body: StreamReader | None = None  # the last request's body, while it arrives

    @property
    def idle(self) -> bool:
        """Open with no request under way: between requests, or part-way through
        one's headers. Closing it loses nothing a client does not retry."""
        return self.transport is not None and not self._request_in_progress and not self._messages

    def data_received(self, data: bytes) -> None:
        parsed, body = self._request_count, self._body
        super().data_received(data)
        if self._request_count != parsed:  # a request's headers are complete (or could not be parsed)
            self._cancel_timers()
            message, payload = self._messages[-1] if self._messages else (None, None)
            if not isinstance(message, RawRequestMessage) and body is not None and not body.is_eof():
                self._body_failed(body, getattr(message, "exc", None))
            self._body = payload if payload is not None and not payload.is_eof() else None
            if self._body is not None:
                self._body_timer = self._loop.call_later(self._body_timeout, self._body_too_slow, self._body)
        elif self._body is not None and self._body.is_eof():
            self._body = None
            self._cancel_timers()
        elif data and self._header_timer is None and self._reading_headers():
            self._header_timer = self._loop.call_later(self._header_timeout, self._headers_too_slow)

    def _reading_headers(self) -> bool:
        if self._force_close or self._close or self._upgraded or self._payload_parser is not None:
            return False
        return self._body is None

    def _cancel_timers(self) -> None:
        for timer in (self._header_timer, self._body_timer):
            if timer is not None:
                timer.cancel()
        self._header_timer = self._body_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if not self.idle or self._force_close:
            return  # a request is under way: the partial one behind it waits its turn
        assert self.transport is not None
        log.info(
            "Request headers from %s not complete within %g s: answered 408 and closed",
            _peer(self.transport),
            self._header_timeout,
        )
        message = (
            f"The request's headers did not arrive within {self._header_timeout:g} seconds "
            "(PROGRESS_SSE_HEADER_TIMEOUT); send them whole, at once."
        )
        self.transport.write(_raw_response(408, "Request Timeout", message))
        self.force_close()  # the transport sends what it holds, then closes

    def _body_too_slow(self, body: StreamReader) -> None:
        """The handler reading it gets BodyTimeout (answered 408 in handle_error);
        one that is not answers as it would, and the connection closes after."""
        self._body_timer = None
        if not body.is_eof() and body.exception() is None:
            self._lingering_time = 0.0  # what is left of the body is not worth waiting for
            body.set_exception(BodyTimeout())

    def _body_failed(self, body: StreamReader, exc: BaseException | None) -> None:
        """The parser failed inside the body being read (bad chunking). aiohttp
        queues a 400 for after this request, whose read would wait for ever: the
        read fails instead (the handler answers 400), and the connection closes."""
        peer = _peer(self.transport) if self.transport is not None else "a client"
        log.warning("Malformed request body from %s: %s; its request fails", peer, _one_line(exc or "?"))
        self._lingering_time = 0.0
        failure = RequestPayloadError(_one_line(exc or "malformed body"))
        if exc is None:
            body.set_exception(failure)
        else:
            body.set_exception(failure, exc)  # the handler reports the parser's message

    def connection_lost(self, exc: BaseException | None) -> None:
        self._cancel_timers()
        super().connection_lost(exc)

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """aiohttp's answer to what it could not parse (400) or a handler that raised
        (500; 504 for a TimeoutError): JSON here. A parse error is the client's, so
        one WARNING line and no traceback; a body that did not arrive, 408."""
        if isinstance(request.content.exception(), BodyTimeout):
            status = 408
            log.info(
                "Request body from %s did not arrive within %g s: answered 408", request.remote, self._body_timeout
            )
            text = (
                f"The request body did not arrive within {self._body_timeout:g} seconds "
                "(PROGRESS_SSE_BODY_TIMEOUT); send it whole, at once."
            )
        elif status >= 500:
            super().handle_error(request, status, exc, message)  # logs the traceback: a bug of ours
            text = "The server failed to answer this request; its log has the error."
        else:
            reason = _one_line(exc if isinstance(exc, HttpProcessingError) else message or "malformed request")
            # What it quotes of the request may hold a token: the client sees its own, the log none.
            log.warning("Malformed request from %s: %s; answered %d", request.remote, without_tokens(reason), status)
            text = f"The request could not be read as HTTP: {reason}."
        if request.writer.output_size > 0:  # as aiohttp: too late for a response
            raise ConnectionError("Response is sent already, cannot send another response with the error message")
        response = web.Response(
            status=status, text=dumps({"error": text}), content_type="application/json", headers=_SAFE_HEADERS
        )
        response.force_close()
        return response


class Server(web.Server):
    """aiohttp's low-level server, making `Connection`s and keeping their number
    under `max_connections`."""

    def __init__(
        self, handler: Any, *, header_timeout: float, body_timeout: float, max_connections: int, **kwargs: Any
    ) -> None:
        super().__init__(handler, **kwargs)
        self.header_timeout = header_timeout
        self.body_timeout = body_timeout
        self.max_connections = max_connections
        # The open connections, in the order to look for an idle one: oldest first,
        # except that one found busy goes to the back, so that a search does not
        # walk past the same long-lived streams every time.
        self._open: OrderedDict[Connection, None] = OrderedDict()
        self.incidents = Incidents(log)
        self._evicted_at = -float(ACCEPT_RETRY_DELAY)
        self._refused_at = -float(ACCEPT_RETRY_DELAY)

    def __call__(self) -> Connection:
        # No fallback on a TypeError as aiohttp's has: a bad option fails loudly here
        # rather than serving without its limits.
        return Connection(
            self, loop=self._loop, header_timeout=self.header_timeout, body_timeout=self.body_timeout, **self._kwargs
        )

    def connection_made(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        assert isinstance(handler, Connection)
        self._open[handler] = None
        if len(self._open) <= self.max_connections:
            return
        closed = self.close_idle(1, sparing=handler)
        self.incidents.warning(
            "connections",
            "%d client connections reached PROGRESS_SSE_MAX_CONNECTIONS=%d (file-descriptor limit %d): closing "
            "the oldest idle connections to make room, or new ones while none is idle",
            len(self._open) + closed - 1,
            self.max_connections,
            fd_limit(),
        )
        if not closed:
            self._close(handler)  # a closed connection, not an error status: EventSource retries it

    def connection_lost(self, handler: RequestHandler, exc: BaseException | None = None) -> None:
        self._open.pop(handler, None)  # type: ignore[call-overload]
        super().connection_lost(handler, exc)

    def close_idle(self, count: int | None = None, *, sparing: Connection | None = None) -> int:
        """Close up to `count` (default: all) idle connections, oldest first."""
        closed = 0
        for _ in range(len(self._open)):
            if count is not None and closed >= count:
                break
            connection = next(iter(self._open))
            if connection is not sparing and connection.idle:
                self._close(connection)
                closed += 1
            else:
                self._open.move_to_end(connection)
        return closed

    def _close(self, connection: Connection) -> None:
        self._open.pop(connection, None)
        connection.force_close()

    def at_fd_limit(self, exc: OSError) -> None:
        """asyncio could not accept a connection for want of descriptors; it
        accepts again in ACCEPT_RETRY_DELAY. Python's accept loop calls this for
        every connection of its backlog: the idle connections are closed once."""
        now = time.monotonic()
        self._refused_at = now
        closed = 0
        if now - self._evicted_at >= ACCEPT_RETRY_DELAY:
            self._evicted_at = now
            closed = self.close_idle()
        self.incidents.warning(
            "fds",
            "Out of file descriptors (%s; limit %d) with %d client connections: accepting again in %g s; closed "
            "%d idle connections to make room",
            errno.errorcode.get(exc.errno or 0, exc.strerror),
            fd_limit(),
            len(self._open) + closed,
            ACCEPT_RETRY_DELAY,
            closed,
        )

    async def accept_retry_passed(self) -> None:
        """Wait until asyncio's pending accept retry (if the fd limit paused it) has
        run. Nothing cancels that timer: run after its listening socket closed, it
        fails on a closed socket and the loop logs a traceback. A retry that is
        refused again schedules one more: while clients that went away still fill
        the listen backlog, each accepted one takes a descriptor, so that can go on
        for a few seconds. Bounded, well within a platform's 30 s to stop."""
        for _ in range(10):
            left = self._refused_at + ACCEPT_RETRY_DELAY - time.monotonic()
            if left <= 0:
                return
            await asyncio.sleep(left + 0.05)


class Runner(web.AppRunner):
    """aiohttp's AppRunner serving `Connection`s through `Server`, with the limits
    in the app's settings (create_app's; the defaults otherwise), and the event
    loop's exception handler taking asyncio's accept errors while it runs."""

    def __init__(self, app: web.Application, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._previous_handler: Any = None

    async def _make_server(self) -> web.Server:
        base = await super()._make_server()  # the app's startup, its request handler and options
        settings = self.app.get(SETTINGS) or Settings()
        server = Server(
            base.request_handler,
            request_factory=base.request_factory,
            handler_cancellation=base.handler_cancellation,
            loop=asyncio.get_running_loop(),
            header_timeout=settings.header_timeout,
            body_timeout=settings.body_timeout,
            max_connections=settings.max_connections or max_connections(),
            **base._kwargs,
        )
        loop = asyncio.get_running_loop()
        self._previous_handler = loop.get_exception_handler()
        loop.set_exception_handler(_accept_errors(server, self._previous_handler))
        return server

    async def cleanup(self) -> None:
        if isinstance(self.server, Server):  # before the listening sockets close
            await self.server.accept_retry_passed()
        await super().cleanup()

    async def _cleanup_server(self) -> None:
        asyncio.get_running_loop().set_exception_handler(self._previous_handler)
        await super()._cleanup_server()


def _accept_errors(server: Server, previous: Any) -> Callable[[asyncio.AbstractEventLoop, dict[str, Any]], None]:
    def handle(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno in _OUT_OF_RESOURCE and "socket" in context:
            server.at_fd_limit(exc)
        elif previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    return handle


def freeze_startup() -> None:
    """What start-up made (modules, the app, its clients) lives as long as the
    process: moved out of the collector's way, so that a full collection with
    thousands of open streams walks only what the streams made, and stalls the
    loop for less (docs/benchmarks.md)."""
    gc.collect()
    gc.freeze()


def new_loop(kind: str = "auto") -> asyncio.AbstractEventLoop:
    """The web's event loop (PROGRESS_SSE_LOOP): `uvloop`, `asyncio` (the standard
    library's), or `auto`: uvloop when it is installed. uvloop runs the same
    streams with less CPU per frame (docs/benchmarks.md)."""
    if kind != "asyncio":
        try:
            import uvloop
        except ImportError:
            if kind == "uvloop":
                raise ConfigError(
                    "PROGRESS_SSE_LOOP is uvloop, but uvloop is not installed: pip install 'progress-sse[uvloop]'"
                ) from None
        else:
            return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def loop_name() -> str:
    """`uvloop` or `asyncio`: which event loop runs this coroutine."""
    return "uvloop" if type(asyncio.get_running_loop()).__module__.startswith("uvloop") else "asyncio"


def run_app(
    app: web.Application | Awaitable[web.Application],
    *,
    host: str | None = None,
    port: int | None = None,
    sock: socket.socket | None = None,
    reuse_port: bool | None = None,
    backlog: int = LISTEN_BACKLOG,
    shutdown_timeout: float = 60.0,
    handle_signals: bool = True,
    print: Callable[[str], None] | None = print,
    event_loop: str = "auto",
    **kwargs: Any,
) -> None:
    """`aiohttp.web.run_app` (its arguments, TCP only), serving through `Runner`.
    Blocks until SIGINT or SIGTERM (with handle_signals) or KeyboardInterrupt,
    then shuts down as aiohttp's does: streams end, requests get
    `shutdown_timeout` seconds, then the loop's remaining tasks are cancelled.
    `event_loop`: which one (`new_loop`)."""
    loop = new_loop(event_loop)
    asyncio.set_event_loop(loop)
    main = loop.create_task(
        _serve(app, host, port, sock, reuse_port, backlog, shutdown_timeout, handle_signals, print, kwargs)
    )
    try:
        loop.run_until_complete(main)
    except (web.GracefulExit, KeyboardInterrupt):
        pass
    finally:
        try:
            if not main.done():
                main.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    loop.run_until_complete(main)
        finally:
            _cancel(asyncio.all_tasks(loop), loop)
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()
            asyncio.set_event_loop(None)


async def _serve(
    app: web.Application | Awaitable[web.Application],
    host: str | None,
    port: int | None,
    sock: socket.socket | None,
    reuse_port: bool | None,
    backlog: int,
    shutdown_timeout: float,
    handle_signals: bool,
    print: Callable[[str], None] | None,
    kwargs: dict[str, Any],
) -> None:
    if not isinstance(app, web.Application):
        app = await app
    runner = Runner(app, handle_signals=handle_signals, shutdown_timeout=shutdown_timeout, **kwargs)
    await runner.setup()
    try:
        site: web.BaseSite
        if sock is not None:
            site = web.SockSite(runner, sock, backlog=backlog)
        else:
            site = web.TCPSite(runner, host, port, backlog=backlog, reuse_port=reuse_port)
        await site.start()
        if print is not None:
            print(f"======== Running on {site.name} ========\n(Press CTRL+C to quit)")
        freeze_startup()  # after the line: whoever waits for it need not wait for a collection
        await asyncio.Event().wait()  # until cancelled, or a signal raises GracefulExit
    finally:
        await runner.cleanup()


def _cancel(tasks: Iterable[asyncio.Task[Any]], loop: asyncio.AbstractEventLoop) -> None:
    tasks = [task for task in tasks if not task.done()]
    for task in tasks:
        task.cancel()
    if tasks:
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))


def _raw_response(status: int, reason: str, message: str) -> bytes:
    """A whole `{"error": ...}` response that closes its connection, for when
    aiohttp's response machinery is not in play (no request was parsed)."""
    body = dumps({"error": message}).encode()
    headers = "".join(f"{name}: {value}\r\n" for name, value in _SAFE_HEADERS.items())
    return (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n{headers}Connection: close\r\n\r\n"
    ).encode() + body


def _one_line(value: object, limit: int = 300) -> str:
    """An error about a client's bytes as one printable line, without aiohttp's
    caret diagrams: no newline in it can forge another log line."""
    text = value.message if isinstance(value, HttpProcessingError) else str(value)
    lines = (line.strip() for line in text.splitlines())
    text = " ".join(line for line in lines if line.strip("^ ")).rstrip(".:")
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _peer(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    return str(peer[0]) if isinstance(peer, tuple) else str(peer)
