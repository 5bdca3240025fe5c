"""The feed's name rule (task_names.py) and the feed scope of tokens (tokens.py)."""

from __future__ import annotations

import jwt
import pytest

from progress_sse.task_names import MAX_PATTERNS, NameFilter, PatternError
from progress_sse.tokens import TokenError, feed_token, operator_token, verify, watch_token

SECRET = "the-task-names-test-secret-long-enough"


@pytest.mark.parametrize(
    ("patterns", "name", "shown"),
    [
        ((), "anything.at.all", True),
        ((), None, True),
        (("reports.",), "reports.daily", True),
        (("reports.",), "reports.pdf.render", True),
        (("reports.",), "reportsdaily", False),
        (("reports.",), "reports", False),
        (("mail.send",), "mail.send", True),
        (("mail.send",), "mail.sender", False),
        (("mail.send", "reports."), "reports.daily", True),
        (("mail.send",), None, False),
    ],
)
def test_a_pattern_ending_in_a_dot_is_a_prefix_and_any_other_one_name(
    patterns: tuple[str, ...], name: str | None, shown: bool
) -> None:
    assert NameFilter(patterns).match(name) is shown


def test_parsing_splits_commas_drops_blanks_and_repeats() -> None:
    assert NameFilter.parse(["a.b, reports.", "", "a.b"]).patterns == ("a.b", "reports.")


@pytest.mark.parametrize("value", [".x", "x" * 201, "a\nb", ",".join(f"n{i}" for i in range(MAX_PATTERNS + 1))])
def test_patterns_that_name_no_task_are_refused_with_a_reason(value: str) -> None:
    with pytest.raises(PatternError, match=r"\S"):
        NameFilter.parse([value])


@pytest.mark.parametrize(
    ("wanted", "allowed", "within"),
    [
        (("reports.daily",), ("reports.",), True),
        (("reports.pdf.",), ("reports.",), True),
        (("reports.",), ("reports.daily",), False),
        (("mail.send", "reports.x"), ("mail.send", "reports."), True),
        (("mail.send", "other"), ("mail.send",), False),
        ((), ("reports.",), False),  # everything is wider than any scope
        (("x",), (), True),  # no scope asked of it: everything
    ],
)
def test_a_filter_is_within_another_when_it_lets_through_nothing_more(
    wanted: tuple[str, ...], allowed: tuple[str, ...], within: bool
) -> None:
    assert NameFilter(wanted).within(NameFilter(allowed)) is within


def test_a_feed_token_sees_its_names_only_and_watches_no_task() -> None:
    grant = verify(feed_token(["reports.", "mail.send"], key=SECRET), secret=SECRET)
    assert grant.feed_refusal(NameFilter(("reports.daily",))) is None
    assert grant.feed_refusal(NameFilter(("mail.send",))) is None
    refusal = grant.feed_refusal(NameFilter(("billing.",)))
    assert refusal is not None and "billing." in refusal
    assert grant.feed_refusal(NameFilter()) is not None, "the whole feed is wider than its scope"
    assert grant.refusal("tasks", ["some-task"]) is not None


def test_only_operators_and_feed_scopes_see_the_feed() -> None:
    assert verify(operator_token(key=SECRET), secret=SECRET).feed_refusal(NameFilter()) is None
    refusal = verify(watch_token(["t1"], key=SECRET), secret=SECRET).feed_refusal(NameFilter(("x",)))
    assert refusal is not None and "feed scope" in refusal


def test_a_feed_token_must_name_something() -> None:
    with pytest.raises(TokenError, match="at least one"):
        feed_token([], key=SECRET)
    with pytest.raises(TokenError, match="not a task name"):
        feed_token([".x"], key=SECRET)


def test_a_malformed_feed_claim_makes_the_token_unusable() -> None:
    token = jwt.encode({"exp": 2**40, "feed": [".bad"]}, SECRET, algorithm="HS256")
    with pytest.raises(TokenError, match="'feed' claim"):
        verify(token, secret=SECRET)
