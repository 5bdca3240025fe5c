"""progress_sse.tokens: scoped JWTs minted by a host app and verified by the service.

Real PyJWT and real keys (a secret for HS256, RSA and EC key pairs made here);
nothing waits on a clock: expired tokens are minted already expired.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from progress_sse.tokens import SECRET_ENV, TokenError, operator_token, start_token, verify, watch_token

SECRET = "a-test-secret-that-is-long-enough-for-hs256"


def pem(public: Any) -> bytes:
    return bytes(public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))


def test_a_watch_token_allows_its_tasks_and_nothing_else() -> None:
    grant = verify(watch_token(["t1", "t2"], groups=["g1"], subject="user-7", key=SECRET), secret=SECRET)
    assert grant.may_watch("t1") and grant.may_watch("t2") and not grant.may_watch("t3")
    assert grant.may_watch_group("g1") and not grant.may_watch_group("g2")
    assert not grant.may_cancel("t1"), "cancelling needs its own scope"
    assert not grant.may_start("demo.count") and not grant.operator
    assert grant.subject == "user-7"
    assert time.time() < grant.expires <= time.time() + 3600


def test_cancel_covers_only_the_tasks_it_may_watch() -> None:
    grant = verify(watch_token(["t1"], cancel=True, key=SECRET), secret=SECRET)
    assert grant.may_cancel("t1") and not grant.may_cancel("t2")


def test_a_start_token_starts_its_names_only_and_watches_nothing() -> None:
    grant = verify(start_token(["reports.build"], key=SECRET), secret=SECRET)
    assert grant.may_start("reports.build") and not grant.may_start("reports.delete")
    assert not grant.may_watch("t1")


def test_an_operator_token_allows_everything() -> None:
    grant = verify(operator_token(key=SECRET), secret=SECRET)
    assert (
        grant.may_watch("any") and grant.may_watch_group("any") and grant.may_start("any") and grant.may_cancel("any")
    )


def test_minting_reads_the_secret_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SECRET_ENV, SECRET)
    assert verify(watch_token(["t1"]), secret=SECRET).may_watch("t1")
    monkeypatch.delenv(SECRET_ENV)
    with pytest.raises(TokenError, match=SECRET_ENV):
        watch_token(["t1"])


# Claims, and the token's expiry in seconds from when the test runs (None: no exp).
@pytest.mark.parametrize(
    ("claims", "expires_in", "words"),
    [
        ({"tasks": ["t1"]}, -10, "expired"),
        ({"tasks": ["t1"]}, None, "no expiry"),
        ({"tasks": "t1"}, 600, "'tasks' claim must be a list of strings"),
        ({"operator": "yes"}, 600, "'operator' claim must be true or false"),
    ],
)
def test_tokens_that_cannot_be_used_say_why_without_repeating_the_token(
    claims: dict[str, Any], expires_in: int | None, words: str
) -> None:
    payload = claims if expires_in is None else {**claims, "exp": int(time.time()) + expires_in}
    token = jwt.encode(payload, SECRET, algorithm="HS256")
    with pytest.raises(TokenError, match=words) as info:
        verify(token, secret=SECRET)
    assert token not in str(info.value)


@pytest.mark.parametrize(
    ("token", "words"),
    [
        (watch_token(["t1"], key="another-secret-that-is-long-enough-for-hs256"), "not valid here"),  # not our key
        (  # unsigned
            jwt.encode({"tasks": ["t1"], "exp": int(time.time()) + 86_400}, None, algorithm="none"),
            "accepts tokens signed with HS256, not 'none'",
        ),
        ("not.a.token", "malformed"),
        ("", "malformed"),
    ],
)
def test_a_token_not_signed_with_our_key_is_refused(token: str, words: str) -> None:
    with pytest.raises(TokenError, match=words):
        verify(token, secret=SECRET)


def test_with_both_keys_each_admits_only_its_own_algorithms() -> None:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = pem(private.public_key())
    assert verify(watch_token(["a"], key=SECRET), secret=SECRET, public_key=public).may_watch("a")
    assert verify(watch_token(["b"], key=private, algorithm="RS256"), secret=SECRET, public_key=public).may_watch("b")
    with pytest.raises(TokenError, match="not valid here"):  # HS256 is checked with the secret, never the public key
        verify(hmac_signed({"operator": True, "exp": int(time.time()) + 60}, public), secret=SECRET, public_key=public)


@pytest.mark.parametrize("algorithm", ["RS256", "ES256"])
def test_a_host_app_signs_with_its_private_key_and_the_service_checks_the_public_one(algorithm: str) -> None:
    private = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        if algorithm == "RS256"
        else ec.generate_private_key(ec.SECP256R1())
    )
    token = watch_token(["t1"], key=private, algorithm=algorithm)
    assert verify(token, public_key=pem(private.public_key())).may_watch("t1")
    with pytest.raises(TokenError):  # a service that only has a shared secret cannot take it
        verify(token, secret=SECRET)


def test_an_hs256_token_signed_with_the_public_key_is_refused() -> None:
    """The classic algorithm confusion: the public key is public, so an HMAC made
    with it as the secret must never pass where RS256 is expected."""
    public = pem(rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key())
    with pytest.raises(TokenError, match="not 'HS256'"):
        verify(hmac_signed({"operator": True, "exp": int(time.time()) + 60}, public), public_key=public)


def hmac_signed(claims: dict[str, Any], key: bytes) -> str:
    """An HS256 JWT made by hand: PyJWT itself refuses to use a PEM key as a secret."""

    def part(value: dict[str, Any]) -> bytes:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=")

    signing_input = part({"alg": "HS256", "typ": "JWT"}) + b"." + part(claims)
    signature = base64.urlsafe_b64encode(hmac.new(key, signing_input, hashlib.sha256).digest()).rstrip(b"=")
    return (signing_input + b"." + signature).decode()


def test_a_server_without_a_key_refuses_every_token() -> None:
    with pytest.raises(TokenError, match="no key"):
        verify(operator_token(key=SECRET))


def test_minting_refuses_a_bad_ttl_or_algorithm() -> None:
    with pytest.raises(TokenError, match="ttl"):
        watch_token(["t1"], ttl=0, key=SECRET)
    with pytest.raises(TokenError, match="HS256, RS256 or ES256"):
        watch_token(["t1"], key=SECRET, algorithm="none")


def test_a_refusal_names_the_missing_scope_and_what_it_does_not_list() -> None:
    watcher = verify(watch_token(["t1", "t2"], groups=["g1"], key=SECRET), secret=SECRET)
    assert watcher.refusal("tasks", ["t1", "t2"]) is None
    assert watcher.refusal("tasks", ["t1", "x", "y"]) == (
        "This token may not watch task 'x' and 1 more: the tasks scope of the token does not list it."
    )
    assert watcher.refusal("groups", ["g1"]) is None
    assert "the groups scope" in str(watcher.refusal("groups", ["g2"]))
    assert watcher.refusal("cancel", ["t1"]) == "This token may not cancel tasks: it has no cancel scope."
    assert "operator scope" in str(watcher.refusal("operator"))
    assert "the start scope" in str(watcher.refusal("start", ["demo.count"]))
    canceller = verify(watch_token(["t1"], cancel=True, key=SECRET), secret=SECRET)
    assert canceller.refusal("cancel", ["t1"]) is None
    assert "the tasks scope" in str(canceller.refusal("cancel", ["t2"]))
    operator = verify(operator_token(key=SECRET), secret=SECRET)
    assert all(operator.refusal(scope, ["any"]) is None for scope in ("tasks", "groups", "start", "cancel", "operator"))


def test_minting_refuses_a_short_secret() -> None:
    with pytest.raises(TokenError, match="at least 32 characters"):
        watch_token(["t1"], key="short")


def test_a_groups_token_covers_members_of_its_groups_only() -> None:
    grant = verify(watch_token([], groups=["g1"], key=SECRET), secret=SECRET)
    assert grant.may_watch("m1", "g1") and not grant.may_watch("m1", "g2") and not grant.may_watch("m1")
    assert grant.refusal("tasks", ["m1", "m2"], {"m1": "g1", "m2": "g1"}) is None
    assert "'m2'" in str(grant.refusal("tasks", ["m1", "m2"], {"m1": "g1"}))


def test_each_public_key_checks_its_own_algorithm_only() -> None:
    """An ES256 token for a server holding an RSA key is refused as such (a
    TokenError, so a 401), not an error of the library (a 500)."""
    rsa_private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_token = watch_token(["t1"], key=ec.generate_private_key(ec.SECP256R1()), algorithm="ES256")
    with pytest.raises(TokenError, match="accepts tokens signed with RS256, not 'ES256'"):
        verify(ec_token, public_key=pem(rsa_private.public_key()))
    p384 = ec.generate_private_key(ec.SECP384R1())
    with pytest.raises(TokenError, match="P-256 curve, not secp384r1"):  # ES256 is P-256's alone
        verify(ec_token, public_key=pem(p384.public_key()))


def test_minting_refuses_one_string_for_a_list() -> None:
    with pytest.raises(TypeError, match=r"write \['0b5c'\]"):
        watch_token("0b5c", key=SECRET)
    with pytest.raises(TypeError, match="names must be a list"):
        start_token("demo.count", key=SECRET)
