"""cursors.py: what a client's Last-Event-ID means, as pure values."""

from __future__ import annotations

import re

import pytest

from progress_sse.cursors import Foreign, Position, new_epoch, parse, parse_id


def test_new_epochs_are_short_header_safe_and_differ() -> None:
    epochs = {new_epoch() for _ in range(1000)}
    assert len(epochs) == 1000
    assert all(re.fullmatch(r"[a-z2-7]{8}", epoch) for epoch in epochs)


def test_a_cursor_is_its_epoch_and_number() -> None:
    assert parse("k3x7f2ab-141378") == Position("k3x7f2ab", 141378)
    assert str(Position("k3x7f2ab", 141378)) == "k3x7f2ab-141378"
    assert parse(" k3x7f2ab-7 ") == Position("k3x7f2ab", 7), "EventSource may add no spaces, people may"


def test_no_cursor_and_the_start_of_the_history() -> None:
    assert parse(None) is None
    assert parse("") is None and parse("  ") is None
    assert parse("0") == Position("", 0), "0: the start of whichever history is current"


@pytest.mark.parametrize(
    "raw",
    [
        "141378",  # an integer cursor from before epochs
        "K3X7F2AB-1",  # upper case is not what the server hands out
        "k3x9f2a-1",  # 7 characters
        "k3x7f2ab-",
        "k3x7f2ab-1-2",
        "k3x7f2ab-" + "9" * 19,  # more digits than a sequence reaches
        "k3x7f2ab-١٢",  # digits, but not ASCII ones
        "garbage",
    ],
)
def test_anything_else_is_a_cursor_of_no_place_here(raw: str) -> None:
    cursor = parse(raw)
    assert isinstance(cursor, Foreign) and cursor.raw == raw.strip()[:64]


def test_a_foreign_cursor_keeps_little_of_what_was_sent() -> None:
    cursor = parse("x" * 10_000)
    assert isinstance(cursor, Foreign) and len(cursor.raw) == 64


def test_covers_compares_numbers_within_one_history_only() -> None:
    at = Position("aaaaaaaa", 10)
    assert at.covers(Position("aaaaaaaa", 10)) and at.covers(Position("aaaaaaaa", 9))
    assert not at.covers(Position("aaaaaaaa", 11))
    assert not at.covers(Position("bbbbbbbb", 1)), "numbers of two histories do not compare"


def test_parse_id_refuses_what_is_not_a_stored_id() -> None:
    assert parse_id("aaaaaaaa-3") == Position("aaaaaaaa", 3)
    for raw in ("3", "0", "aaaaaaaa-x"):
        with pytest.raises(ValueError):
            parse_id(raw)
