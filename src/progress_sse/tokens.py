"""Scoped access tokens: standard JWTs (PyJWT), so any language can mint them.

A token says what its bearer may do, and until when (`exp`, required):

- `tasks`: the task ids it may watch and read;
- `groups`: the same for Celery groups, and their members;
- `start`: the task names it may start;
- `cancel`: it may also cancel the tasks it may watch;
- `feed`: the task names it may see on the all-tasks feed, exactly or by prefix
  (`reports.`: see task_names.py);
- `operator`: everything, including the list of recent tasks and tracebacks;
- `sub`: optional, who it was minted for (for logs).

Tokens are signed with HS256 and a shared secret (`PROGRESS_SSE_SECRET`), or with
RS256/ES256 and a private key the host app keeps, the service holding only the
public key. A Django or Flask view mints one with `watch_token(...)`: this module
imports no aiohttp, so a process that only publishes tasks can use it.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from .task_names import NameFilter, PatternError

SECRET_ENV = "PROGRESS_SSE_SECRET"
MIN_SECRET_LENGTH = 32  # RFC 7518 3.2: an HS256 key at least as long as the hash


def check_secret(raw: str) -> str:
    """An HS256 secret, or ValueError saying how to make one."""
    if len(raw) < MIN_SECRET_LENGTH:
        raise ValueError(
            f"expected at least {MIN_SECRET_LENGTH} characters (got {len(raw)}); make one with "
            "python3 -c 'import secrets; print(secrets.token_urlsafe(32))'"
        )
    return raw


DEFAULT_TTL = 3600  # seconds: a long job's page stays open that long without renewing
ASYMMETRIC = ("RS256", "ES256")


class TokenError(ValueError):
    """The token cannot be used: its reason is safe to show the client (it never
    repeats the token)."""


@dataclass(frozen=True, slots=True)
class Grant:
    """What a verified token allows."""

    expires: float
    tasks: frozenset[str] = frozenset()
    groups: frozenset[str] = frozenset()
    start: frozenset[str] = frozenset()
    cancel: bool = False
    operator: bool = False
    subject: str | None = None
    # The names it may see on the all-tasks feed; empty: none (an operator: all).
    feed: NameFilter = field(default_factory=NameFilter)

    def may_watch(self, task_id: str, group: str | None = None) -> bool:
        """A task it lists, or a member of a group it lists (`group`: the task's)."""
        return self.operator or task_id in self.tasks or (group is not None and group in self.groups)

    def may_watch_group(self, group_id: str) -> bool:
        return self.operator or group_id in self.groups

    def may_start(self, name: str) -> bool:
        return self.operator or name in self.start

    def may_cancel(self, task_id: str) -> bool:
        return self.operator or (self.cancel and task_id in self.tasks)

    def feed_refusal(self, wanted: NameFilter) -> str | None:
        """None when this grant may see the feed through `wanted`, else why not."""
        if self.operator:
            return None
        if self.feed.everything:
            return "This token may not see the all-tasks feed: it has neither a feed scope nor the operator scope."
        if wanted.within(self.feed):
            return None
        return (
            f"This token may see the feed of {self.feed} only, not of {wanted}: ask with ?name= within its feed scope."
        )

    def refusal(self, scope: str, items: Sequence[str] = (), groups: Mapping[str, str] | None = None) -> str | None:
        """None when this grant covers `scope` for every one of `items`; otherwise
        the reason, naming the scope that is missing (the sentence of a 403).
        `groups` maps tasks to their groups, for the tasks scope."""
        if self.operator:
            return None
        if scope == "operator":
            return "This needs an operator token (the operator scope)."
        group_of = groups or {}
        allowed: dict[str, Callable[[str], bool]] = {
            "tasks": lambda task_id: self.may_watch(task_id, group_of.get(task_id)),
            "groups": self.may_watch_group,
            "start": self.may_start,
        }
        if scope == "cancel":
            if not self.cancel:
                return "This token may not cancel tasks: it has no cancel scope."
            allowed["cancel"] = self.may_cancel
        outside = [item for item in items if not allowed[scope](item)]
        if not outside:
            return None
        what = {"tasks": "watch task", "groups": "watch group", "start": "start", "cancel": "cancel task"}[scope]
        listed = "the tasks" if scope == "cancel" else f"the {scope}"
        others = f" and {len(outside) - 1} more" if len(outside) > 1 else ""
        return f"This token may not {what} {outside[0]!r}{others}: {listed} scope of the token does not list it."


def watch_token(
    task_ids: Iterable[str],
    *,
    ttl: float = DEFAULT_TTL,
    cancel: bool = False,
    groups: Iterable[str] = (),
    subject: str | None = None,
    key: Any = None,
    algorithm: str = "HS256",
) -> str:
    """A token to watch (and, with `cancel`, cancel) these tasks and groups."""
    _not_one_string(task_ids, "task_ids")
    _not_one_string(groups, "groups")
    claims = {"tasks": sorted(set(task_ids)), "groups": sorted(set(groups)), "cancel": cancel}
    return _mint(claims, ttl=ttl, subject=subject, key=key, algorithm=algorithm)


def start_token(
    names: Iterable[str],
    *,
    ttl: float = DEFAULT_TTL,
    subject: str | None = None,
    key: Any = None,
    algorithm: str = "HS256",
) -> str:
    """A token to start these allow-listed tasks (the service answers with a watch
    token for each task it starts)."""
    _not_one_string(names, "names")
    return _mint({"start": sorted(set(names))}, ttl=ttl, subject=subject, key=key, algorithm=algorithm)


def feed_token(
    names: Iterable[str],
    *,
    ttl: float = DEFAULT_TTL,
    subject: str | None = None,
    key: Any = None,
    algorithm: str = "HS256",
) -> str:
    """A token to see the all-tasks feed of these task names (`reports.`: every
    name that starts so), for a dashboard that is not an operator's."""
    _not_one_string(names, "names")
    try:
        patterns = NameFilter.parse(names).patterns
    except PatternError as exc:
        raise TokenError(str(exc)) from None
    if not patterns:
        raise TokenError("A feed token names at least one task name or prefix.")
    return _mint({"feed": list(patterns)}, ttl=ttl, subject=subject, key=key, algorithm=algorithm)


def operator_token(
    *, ttl: float = DEFAULT_TTL, subject: str | None = None, key: Any = None, algorithm: str = "HS256"
) -> str:
    """A token for everything: every task, the recent list, tracebacks."""
    return _mint({"operator": True}, ttl=ttl, subject=subject, key=key, algorithm=algorithm)


def verify(token: str, *, secret: str | None = None, public_key: Any = None) -> Grant:
    """The grant of a token signed with `secret` (HS256) or the private half of
    `public_key` (RS256 for an RSA key, ES256 for an EC P-256 one); raises
    TokenError saying why not.

    Each configured key admits only its own algorithm, whatever the token's header
    claims: the header merely picks which of the configured keys to try. So a token
    cannot choose `none`, nor pass as HS256 signed with the (public) RSA key."""
    keys: dict[str, Any] = {}
    if secret:
        keys["HS256"] = secret
    if public_key is not None:
        loaded = load_public_key(public_key)
        keys[key_algorithm(loaded)] = loaded
    if not keys:
        raise TokenError("This server has no key to check tokens with.")
    try:
        algorithm = jwt.get_unverified_header(token).get("alg")
    except jwt.PyJWTError:
        raise TokenError("The token is malformed: expected a JWT (three base64url parts joined by dots).") from None
    if algorithm not in keys:
        raise TokenError(f"This server accepts tokens signed with {' or '.join(keys)}, not {algorithm!r}.")
    try:
        claims = jwt.decode(token, keys[algorithm], algorithms=[algorithm], options={"require": ["exp"]})
    except jwt.ExpiredSignatureError:
        raise TokenError("The token has expired; get a new one.") from None
    except jwt.MissingRequiredClaimError:
        raise TokenError("The token has no expiry (exp); tokens must expire.") from None
    except jwt.PyJWTError:
        raise TokenError("The token is not valid here (malformed, or not signed with this server's key).") from None
    return _grant(claims)


PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey


@functools.lru_cache(maxsize=8)
def _load_pem(pem: bytes) -> PublicKey:
    key = serialization.load_pem_public_key(pem)
    if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
        raise TokenError("The public key must be an RSA key (RS256) or an EC P-256 key (ES256).")
    return key


def load_public_key(key: Any) -> PublicKey:
    """An RSA or EC public key, from itself or its PEM (parsed once per PEM)."""
    if isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
        return key
    try:
        return _load_pem(key.encode() if isinstance(key, str) else bytes(key))
    except ValueError:
        raise TokenError(
            "The public key is not a PEM public key (-----BEGIN PUBLIC KEY-----; the private key stays with "
            "the app that signs)."
        ) from None


def key_algorithm(key: PublicKey) -> str:
    """The one algorithm a public key checks: RS256 for RSA, ES256 for EC P-256."""
    if isinstance(key, rsa.RSAPublicKey):
        return "RS256"
    if isinstance(key.curve, ec.SECP256R1):
        return "ES256"
    raise TokenError(f"An EC key for ES256 must be on the P-256 curve, not {key.curve.name}.")


def _not_one_string(values: Iterable[str], name: str) -> None:
    # A string is an iterable of its characters: watch_token("0b5c…") would mint a
    # token for single letters and digits, and watch nothing.
    if isinstance(values, str):
        raise TypeError(f"{name} must be a list of strings, not one string: write [{values!r}].")


def _mint(claims: dict[str, Any], *, ttl: float, subject: str | None, key: Any, algorithm: str) -> str:
    if key is None:
        key = os.environ.get(SECRET_ENV, "").strip() or None
    if key is None:
        raise TokenError(f"Set {SECRET_ENV}, or pass key= (a secret for HS256, a private key for RS256/ES256).")
    if algorithm != "HS256" and algorithm not in ASYMMETRIC:
        raise TokenError(f"Tokens are signed with HS256, RS256 or ES256, not {algorithm}.")
    if algorithm == "HS256" and isinstance(key, str):
        try:
            check_secret(key)
        except ValueError as exc:
            raise TokenError(f"The HS256 secret is too short: {exc}.") from None
    if not ttl > 0:
        raise TokenError(f"ttl must be a positive number of seconds, not {ttl!r}.")
    payload = {"exp": int(time.time() + ttl), **claims}
    if subject is not None:
        payload["sub"] = subject
    return jwt.encode(payload, key, algorithm=algorithm)


def _grant(claims: dict[str, Any]) -> Grant:
    def names(claim: str) -> frozenset[str]:
        value = claims.get(claim, [])
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise TokenError(f"The token's {claim!r} claim must be a list of strings.")
        return frozenset(value)

    def flag(claim: str) -> bool:
        value = claims.get(claim, False)
        if not isinstance(value, bool):
            raise TokenError(f"The token's {claim!r} claim must be true or false.")
        return value

    subject = claims.get("sub")
    try:
        feed = NameFilter.parse(sorted(names("feed")))
    except PatternError as exc:
        raise TokenError(f"The token's 'feed' claim is not valid: {exc}") from None
    return Grant(
        expires=float(claims["exp"]),
        tasks=names("tasks"),
        groups=names("groups"),
        start=names("start"),
        cancel=flag("cancel"),
        operator=flag("operator"),
        subject=subject if isinstance(subject, str) else None,
        feed=feed,
    )
