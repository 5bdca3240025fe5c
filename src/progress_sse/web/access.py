"""Who may do what: the Host check and access tokens, in front of every route.

One middleware (`guard`) runs before every handler:

1. The Host header must name this service (PROGRESS_SSE_ALLOWED_HOSTS), or the
   request gets 400: a page on another site that rebinds its DNS to this address
   cannot read it.
2. With a key set (PROGRESS_SSE_SECRET or PROGRESS_SSE_PUBLIC_KEY), every request
   but the public ones (/healthz, the page and its assets) must carry a valid token,
   `Authorization: Bearer …` or `?token=…`, or it gets 401. Its grant goes on the
   request; without a key everyone is an operator, as before tokens.

What a request asks for is known only to its handler (a body's task name, a
group's members), so handlers ask `authorize(request, scope, items)` (or, for
tasks to watch, `authorize_watch`, which lets a group's token cover its members),
the one place a 403 comes from. Streams ask in `EventStream.opened`, where every stream and
every reconnect starts (web/delivery.py).
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from ..config import Settings, is_loopback
from ..events import for_watcher
from ..task_names import NameFilter
from ..tokens import DEFAULT_TTL, Grant, TokenError, verify, watch_token
from .cors import Cors
from .errors import Handler, error
from .store import Store

GRANT = web.RequestKey("grant", Grant)
# The grant of every request when no key is set: the service is open.
EVERYTHING = Grant(expires=math.inf, operator=True)
# Names a request on loopback may give as its Host when no list is set (as Django's
# development default does): a page that rebinds its own name to 127.0.0.1 cannot.
LOOPBACK_NAMES = frozenset({"localhost"})
REALM = 'Bearer realm="progress-sse"'


@dataclass(frozen=True, slots=True)
class Access:
    secret: str | None
    public_key: str | None
    # The Host names accepted (".example.com": it and its subdomains); None: any.
    hosts: frozenset[str] | None
    # With no list set, a service listening on loopback answers to loopback names.
    loopback_only: bool = False
    watcher_messages: bool = True
    # Settings.keyed: every route but the public ones needs a token.
    keyed: bool = False

    @classmethod
    def from_settings(cls, settings: Settings) -> Access:
        listed = settings.allowed_hosts
        hosts = None if listed is None or "*" in listed else frozenset(listed)
        loopback_only = listed is None and is_loopback(settings.host)
        return cls(
            settings.secret,
            settings.public_key,
            hosts,
            loopback_only,
            settings.watcher_errors == "message",
            keyed=settings.keyed,
        )

    def host_allowed(self, host: str) -> bool:
        name = _hostname(host)
        if self.loopback_only:
            return _is_loopback_name(name)
        if self.hosts is None:
            return True
        return any(
            name == allowed or (allowed.startswith(".") and (name.endswith(allowed) or name == allowed[1:]))
            for allowed in self.hosts
        )

    def authenticate(self, request: web.Request) -> Grant:
        """The request's grant, or a 401 that says why (never repeating the token)."""
        token = _token(request)
        if token is None:
            raise _unauthorized(
                "This needs an access token: send Authorization: Bearer <token>, or ?token=<token> on a stream.",
                None,
            )
        try:
            return verify(token, secret=self.secret, public_key=self.public_key)
        except TokenError as exc:
            raise _unauthorized(str(exc), "invalid_token") from None

    def watch_token_for(self, task_id: str, grant: Grant) -> str | None:
        """A token to watch a task the bearer of `grant` just started (and cancel it,
        if the grant may cancel): minted only with a secret, since a service that
        holds just the public key cannot sign."""
        if not self.secret:
            return None
        cancel = grant.cancel or grant.operator
        return watch_token([task_id], ttl=DEFAULT_TTL, cancel=cancel, subject=grant.subject, key=self.secret)


def guard(access: Access, cors: Cors, is_public: Callable[[web.Request], bool]) -> Any:
    """The middleware: Host, CORS preflight, then token (see the module's docstring)."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not access.host_allowed(request.host):
            raise error(
                web.HTTPBadRequest,
                f"This service does not answer to the host {_hostname(request.host)!r}; "
                "its operator can add it to PROGRESS_SSE_ALLOWED_HOSTS.",
            )
        preflight = await cors.preflight(request)
        if preflight is not None:
            return preflight
        if not access.keyed:
            request[GRANT] = EVERYTHING
        elif not is_public(request):
            request[GRANT] = access.authenticate(request)
        return await handler(request)

    return middleware


def authorize(
    request: web.Request, scope: str, items: Sequence[str] = (), groups: Mapping[str, str] | None = None
) -> Grant:
    """The request's grant if it covers `scope` for `items` (tokens.Grant.refusal),
    else 403 with the reason."""
    grant = request[GRANT]
    reason = grant.refusal(scope, items, groups)
    if reason is not None:
        raise _forbidden(reason, scope)
    return grant


def authorize_feed(request: web.Request, names: NameFilter) -> Grant:
    """The request's grant if it may see the all-tasks feed of `names` (an operator,
    or a token whose feed scope covers them), else 403 with the reason."""
    grant = request[GRANT]
    reason = grant.feed_refusal(names)
    if reason is not None:
        raise _forbidden(reason, "feed")
    return grant


def _forbidden(reason: str, scope: str) -> web.HTTPException:
    return error(
        web.HTTPForbidden,
        reason,
        headers={"WWW-Authenticate": f'{REALM}, error="insufficient_scope", scope="{scope}"'},
    )


async def authorize_watch(request: web.Request, store: Store, task_ids: Sequence[str]) -> Grant:
    """`authorize(request, "tasks", task_ids)`, where a token's groups cover their
    members too: the groups of the tasks it does not list are looked up (one round
    trip, and only then)."""
    grant = request[GRANT]
    outside = [task_id for task_id in task_ids if not grant.may_watch(task_id)]
    groups = await store.groups_of(outside) if outside and grant.groups else None
    return authorize(request, "tasks", task_ids, groups)


def sees_everything(request: web.Request) -> bool:
    """Operators (and everyone, with no key) see tracebacks, workers and pids."""
    return request[GRANT].operator


def frame_variant(request: web.Request, access: Access) -> bool | None:
    """How this request's stream writes a frame (events.Frame.bytes_for): as stored
    for an operator (None), as events.for_watcher shapes it for anyone else (with
    or without messages)."""
    return None if sees_everything(request) else access.watcher_messages


def body_for(request: web.Request, access: Access, body: dict[str, Any]) -> dict[str, Any]:
    """A task's description (GET /tasks/<id>) as this request may see it."""
    return body if sees_everything(request) else for_watcher(body, messages=access.watcher_messages)


def _token(request: web.Request) -> str | None:
    """The Bearer token of the Authorization header, else `?token=`. Another kind of
    Authorization (a proxy's Basic credentials, which browsers re-send on their own,
    EventSource requests included) is not ours: the query's token still counts."""
    scheme, _, value = request.headers.get("Authorization", "").strip().partition(" ")
    if scheme.lower() == "bearer":
        if not value.strip():
            raise _unauthorized("The Authorization header must be: Bearer <token>.", "invalid_request")
        return value.strip()
    return request.query.get("token") or None


def _unauthorized(reason: str, code: str | None) -> web.HTTPException:
    challenge = REALM if code is None else f'{REALM}, error="{code}"'
    return error(web.HTTPUnauthorized, reason, headers={"WWW-Authenticate": challenge})


def _hostname(host: str) -> str:
    """The name of a Host header, without its port: "[::1]:8000" is "[::1]"."""
    host = host.strip().lower()
    if host.startswith("["):
        name, _, rest = host.partition("]")
        # Only a port may follow the brackets: anything else names no host we know.
        return f"{name}]" if rest == "" or (rest.startswith(":") and rest[1:].isdigit()) else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _is_loopback_name(name: str) -> bool:
    if name in LOOPBACK_NAMES or name.endswith(".localhost"):  # RFC 6761: *.localhost is loopback
        return True
    try:
        return ipaddress.ip_address(name.strip("[]")).is_loopback
    except ValueError:
        return False
