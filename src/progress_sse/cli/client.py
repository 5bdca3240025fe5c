"""The HTTP side of `progress-sse watch`, `start` and `cancel`: follow one task's stream, resume it,
start and cancel tasks.

`follow()` is the part that has to be right. It yields the task's events until a
terminal one, reconnecting with the cursor (`Last-Event-ID`) whenever the
connection drops, so the caller sees every event exactly once, in order, however
often the network fails. When the server lost the history the stream followed
(or cannot place the cursor in its current one), it sends `event: reset`:
`follow()` yields it as a `Reset`, then the task's current state as the server
sends it, and keeps following. It gives up (`CannotConnect`) only when no connection
has been healthy for `RetryPolicy.give_up_after` seconds, and at once when the
server refuses access (`AccessRefused`: a reconnect after the token expired).

An access token goes in the `Authorization: Bearer` header of every request,
reconnects included, never in the URL: URLs end up in access logs, proxies'
logs and error messages. No message of this module repeats it.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aiohttp

from ..events import TERMINAL_STATES
from .decoder import SSEDecoder, SSEError, SSEFrame

# The server pings every 15 s by default. Three missed pings means the connection
# is dead even if TCP has not noticed (a NAT box forgot it, a laptop slept).
DEFAULT_IDLE_TIMEOUT = 45.0

# A request that is not a stream (start, cancel) is answered within this, or the
# server counts as unreachable. DELETE waits up to 1.5 s for the worker's word.
REQUEST_TIMEOUT = 30.0


class ClientError(Exception):
    """Anything that ends a watch, a start or a cancel before a result: exit status 3
    (`AlreadyEnded` excepted: a cancel that found nothing to cancel, status 1)."""


class TaskNotFound(ClientError):
    """The server does not know the task (404), or no longer: its history expired."""


class CannotConnect(ClientError):
    """The server could not be reached, answered with an error, or was gone for too long."""


class AlreadyEnded(ClientError):
    """`DELETE /tasks/<id>` found the task ended (409): there is nothing to cancel."""


class AccessRefused(ClientError):
    """401 or 403: no token, a wrong or expired one, or one without the scope asked for.
    `reason` is the server's `{"error"}` sentence (which never repeats the token)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"access refused ({status}): {reason}")
        self.status = status
        self.reason = reason


class Rejected(ClientError):
    """`POST /tasks` was refused; the message is the server's `{"error"}`."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class _Transient(Exception):
    """A failure worth retrying (5xx, an inconsistent answer); never leaves this module."""


@dataclass(frozen=True)
class TaskEvent:
    """One event of the task: the protocol's payload and the cursor that follows it."""

    state: str
    payload: dict[str, Any]
    cursor: str | None

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES


@dataclass(frozen=True)
class Reset:
    """`event: reset`: the server's history of events was lost (`history_lost`), or it
    could not place our cursor in its current one (`cursor_unknown`). The task's
    current state follows, unless the task is in `missing`: then no state of it
    survived, and its next event (if it is still running) comes on the same stream.

    A reset frame has no id, so `cursor` is the one it leaves in place: resuming
    from it gives the reset again, then the current state."""

    reason: str
    message: str
    missing: tuple[str, ...]
    cursor: str | None


@dataclass(frozen=True)
class Reconnecting:
    """The connection dropped; the next attempt comes after `delay` seconds."""

    attempt: int
    delay: float
    reason: str


@dataclass(frozen=True)
class RetryPolicy:
    """Backoff between reconnects: `initial` doubling up to `maximum`, with jitter.

    A connection counts as healthy once it delivered an event or stayed open for
    `healthy_after` seconds; only then does the backoff start over. So a server
    that accepts and at once closes every connection is retried with a growing
    delay and given up on, not hammered forever.
    """

    initial: float = 0.5
    maximum: float = 5.0
    give_up_after: float = 60.0
    healthy_after: float = 10.0

    def delay(self, attempt: int) -> float:
        base = min(self.maximum, self.initial * 2.0 ** max(0, attempt - 1))
        # Jitter spreads out many watchers that lost the same server at once.
        return base * random.uniform(0.5, 1.0)


@dataclass(frozen=True)
class Started:
    """What `POST /tasks` answered: the new task's id and, when the server checks
    tokens, a token to watch it (`None` otherwise)."""

    id: str
    token: str | None = None


# The characters of a JWT (base64url and dots) and of any other bearer token worth
# sending: visible ASCII. Anything else (a space, a newline, a non-ASCII character)
# would fail deep inside the HTTP library with an error that might quote it.
_TOKEN = re.compile(r"[\x21-\x7e]+")
REFUSED = (401, 403)


def is_token(text: str) -> bool:
    """Whether `text` can be sent as a bearer token."""
    return _TOKEN.fullmatch(text) is not None


def bearer(token: str | None) -> dict[str, str]:
    """The header that carries `token`; none without one."""
    return {"Authorization": f"Bearer {token}"} if token else {}


def task_url(base_url: str, task_id: str) -> str:
    # quote: an id with a slash or a space must not change the path.
    return f"{base_url.rstrip('/')}/tasks/{quote(task_id, safe='')}"


def new_session(idle_timeout: float = DEFAULT_IDLE_TIMEOUT) -> aiohttp.ClientSession:
    """A session for the CLI: no total timeout (a watch lasts as long as the task)."""
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=idle_timeout)
    # trust_env: HTTP(S)_PROXY and NO_PROXY apply, as they do for curl.
    return aiohttp.ClientSession(timeout=timeout, trust_env=True)


async def follow(
    session: aiohttp.ClientSession,
    base_url: str,
    task_id: str,
    *,
    cursor: str | None = None,
    policy: RetryPolicy | None = None,
    token: str | None = None,
) -> AsyncIterator[TaskEvent | Reconnecting | Reset]:
    """Every event of the task from now (or after `cursor`) to its terminal one, and
    a `Reset` wherever the server's history started over.

    Raises `TaskNotFound` on a 404, `AccessRefused` on a 401 or 403 (also on a
    reconnect: a token that expired mid-stream is not retried), and `CannotConnect` when the first connection
    fails (a wrong URL should fail fast, not after a minute of retries) or when
    later reconnects keep failing for `policy.give_up_after` seconds. Ends after
    yielding the terminal event.
    """
    policy = policy or RetryPolicy()
    url = f"{task_url(base_url, task_id)}/events"
    clock = asyncio.get_running_loop().time
    connected_once = False
    attempt = 0
    failing_since: float | None = None
    while True:
        opened_at = clock()
        healthy = False
        headers = {"Accept": "text/event-stream", "Cache-Control": "no-cache", **bearer(token)}
        if cursor:
            headers["Last-Event-ID"] = cursor
        try:
            async with session.get(url, headers=headers) as resp:
                if resp.status == 404:
                    raise TaskNotFound(await _error_message(resp, f"There is no task {task_id!r}."))
                if resp.status in REFUSED:
                    raise await _access_refused(resp)
                if resp.status == 204:
                    # Our cursor is at or after the terminal event: the task ended while
                    # we were away. Its state says how.
                    yield await _final_state(session, base_url, task_id, token)
                    return
                if resp.status >= 500:
                    raise _Transient(await _error_message(resp, f"the server answered {resp.status}"))
                if resp.status != 200:
                    raise CannotConnect(await _error_message(resp, f"{url} answered {resp.status}"))
                if resp.content_type != "text/event-stream":
                    raise CannotConnect(f"{url} is not an event stream (it sent {resp.content_type}); check --url")
                connected_once = True
                decoder = SSEDecoder()
                async for chunk in resp.content.iter_any():
                    for frame in decoder.feed(chunk):
                        # `frame.id` persists from the last frame that had an `id:` line (None
                        # before any on this connection), so a frame without one, such as a
                        # reset or a state that survived an older history, keeps the cursor.
                        cursor = frame.id or cursor
                        event = _item(frame, cursor)
                        if event is None:
                            continue
                        healthy = True
                        yield event
                        if isinstance(event, TaskEvent) and event.terminal:
                            return
                    cursor = decoder.last_event_id or cursor
            reason = "the server ended the stream before the task ended"
        except (aiohttp.ClientError, TimeoutError, SSEError, _Transient) as exc:
            if not connected_once:
                raise CannotConnect(f"cannot watch {url}: {_describe(exc)}") from exc
            reason = _describe(exc)

        now = clock()
        if healthy or now - opened_at >= policy.healthy_after:
            attempt, failing_since = 0, None
        failing_since = now if failing_since is None else failing_since
        deadline = failing_since + policy.give_up_after
        if now >= deadline:
            raise CannotConnect(f"gave up on {url} after {policy.give_up_after:g} s of failed reconnects: {reason}")
        attempt += 1
        delay = min(policy.delay(attempt), deadline - now)
        yield Reconnecting(attempt, delay, reason)
        await asyncio.sleep(delay)


async def fetch_state(
    session: aiohttp.ClientSession, base_url: str, task_id: str, token: str | None = None
) -> dict[str, Any]:
    """`GET /tasks/<id>`: the task's latest event plus what is known of it."""
    headers = {"Accept": "application/json", **bearer(token)}
    async with session.get(task_url(base_url, task_id), headers=headers) as resp:
        if resp.status == 404:
            raise TaskNotFound(await _error_message(resp, f"There is no task {task_id!r}."))
        if resp.status in REFUSED:
            raise await _access_refused(resp)
        if resp.status != 200:
            raise _Transient(await _error_message(resp, f"GET /tasks/{task_id} answered {resp.status}"))
        body = await resp.json()
    if not isinstance(body, dict) or not isinstance(body.get("state"), str):
        raise _Transient(f"GET /tasks/{task_id} did not answer with a task state")
    return body


async def start_task(
    session: aiohttp.ClientSession,
    base_url: str,
    name: str,
    args: Sequence[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    token: str | None = None,
) -> Started:
    """`POST /tasks`; the new task's id, and the token to watch it with if the server
    sent one. Raises `AccessRefused`, `Rejected` or `CannotConnect`."""
    url = f"{base_url.rstrip('/')}/tasks"
    body = {"name": name, "args": list(args), "kwargs": dict(kwargs or {})}
    async with _request(session, "POST", url, "start a task", json=body, headers=bearer(token)) as resp:
        if resp.status in REFUSED:
            raise await _access_refused(resp)
        if resp.status != 202:
            raise Rejected(resp.status, await _error_message(resp, f"{url} answered {resp.status}"))
        answer = await resp.json()
    if not isinstance(answer, dict) or not isinstance(answer.get("id"), str):
        raise CannotConnect(f"{url} accepted the task but sent no id; check --url")
    watch_token = answer.get("token")
    return Started(str(answer["id"]), watch_token if isinstance(watch_token, str) and is_token(watch_token) else None)


async def cancel_task(session: aiohttp.ClientSession, base_url: str, task_id: str, token: str | None = None) -> str:
    """`DELETE /tasks/<id>`; the task's state once the server is done: `revoked`, or how
    it ended if it ended on its own meanwhile.

    Raises `TaskNotFound` (404), `AccessRefused` (401, 403), `AlreadyEnded` (409) or
    `CannotConnect` (anything else)."""
    url = task_url(base_url, task_id)
    headers = {"Accept": "application/json", **bearer(token)}
    async with _request(session, "DELETE", url, "cancel the task", headers=headers) as resp:
        if resp.status == 404:
            raise TaskNotFound(await _error_message(resp, f"There is no task {task_id!r}."))
        if resp.status in REFUSED:
            raise await _access_refused(resp)
        if resp.status == 409:
            raise AlreadyEnded(await _error_message(resp, f"Task {task_id} has already ended."))
        if resp.status != 202:
            raise CannotConnect(await _error_message(resp, f"{url} answered {resp.status}"))
        answer = await resp.json()
    if not isinstance(answer, dict) or not isinstance(answer.get("state"), str):
        raise CannotConnect(f"{url} answered 202 but sent no state; check --url")
    return str(answer["state"])


@asynccontextmanager
async def _request(
    session: aiohttp.ClientSession, method: str, url: str, action: str, **kwargs: Any
) -> AsyncIterator[aiohttp.ClientResponse]:
    """One request and its answer (not a stream). A network failure or timeout, also
    while the body is read, becomes `CannotConnect`: "cannot <action> at <url>: …"."""
    try:
        timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
        async with session.request(method, url, timeout=timeout, **kwargs) as resp:
            yield resp
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise CannotConnect(f"cannot {action} at {url}: {_describe(exc)}") from exc


async def _final_state(session: aiohttp.ClientSession, base_url: str, task_id: str, token: str | None) -> TaskEvent:
    state = await fetch_state(session, base_url, task_id, token)
    event = TaskEvent(state["state"], state, _cursor(state.get("cursor")))
    if not event.terminal:
        # 204 means "nothing follows", yet the state says otherwise: ask again.
        raise _Transient(f"the server answered 204 but the task is still {event.state}")
    return event


def _item(frame: SSEFrame, cursor: str | None) -> TaskEvent | Reset | None:
    """What `follow()` yields for a frame; None for one it ignores."""
    if frame.event == "notice":
        # The service's broadcast to every stream (POST /notices), not the task's;
        # it has no `id:`, so it moves no cursor either.
        return None
    if frame.event == "reset":
        return _reset(frame.data, cursor)
    return _task_event(frame.event, frame.data, cursor)


def _reset(data: str, cursor: str | None) -> Reset | None:
    """A reset frame's `{"reason", "message", "missing"}`; None if it is not readable (ignored)."""
    payload = _json_object(data)
    if payload is None:
        return None
    reason, message, missing = payload.get("reason"), payload.get("message"), payload.get("missing")
    return Reset(
        reason if isinstance(reason, str) else "reset",
        message if isinstance(message, str) else "",
        tuple(m for m in missing if isinstance(m, str)) if isinstance(missing, list) else (),
        cursor,
    )


def _task_event(name: str, data: str, cursor: str | None) -> TaskEvent | None:
    """The frame as a task event; None for a frame that is not one (ignored, as the protocol asks)."""
    payload = _json_object(data)
    if payload is None:
        return None
    state = payload.get("state")
    return TaskEvent(state if isinstance(state, str) else name, payload, cursor)


def _json_object(data: str) -> dict[str, Any] | None:
    """A frame's data as a JSON object, or None when it is not one."""
    try:
        payload = json.loads(data)
    except ValueError:
        return None
    return payload if isinstance(payload, dict) else None


def _cursor(value: Any) -> str | None:
    return None if value is None else str(value)


async def _error_message(resp: aiohttp.ClientResponse, default: str) -> str:
    """The server's `{"error": ...}` sentence when it sent one, else `default`."""
    try:
        body = await resp.json(content_type=None)
    except (ValueError, aiohttp.ClientError):
        return default
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        return str(body["error"])
    return default


async def _access_refused(resp: aiohttp.ClientResponse) -> AccessRefused:
    if resp.status == 401:
        default = "the server asks for a token, and none it accepts was sent."
    else:
        default = "the token does not allow this."
    return AccessRefused(resp.status, await _error_message(resp, default))


def _describe(exc: BaseException) -> str:
    text = str(exc)
    if isinstance(exc, _Transient | SSEError):
        return text
    if isinstance(exc, TimeoutError) and not text:
        return "timed out waiting for the server"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
