"""cursors.py: what a client's Last-Event-ID means, as pure values."""

from __future__ import annotations

import re

import pytest

from progress_sse.cursors import Foreign, Position, Sealed, composite, digest, new_epoch, parse, parse_id
from progress_sse.events import Frame
from progress_sse.web.delivery import stamp


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


# Composite cursors: a place in each partition of a Redis Cluster.
EPOCHS = {0: "aaaaaaaa", 3: "bbbbbbbb", 11: "cccccccc"}


def test_a_composite_cursor_names_each_partition_with_its_lead_first_and_parses_back() -> None:
    places = {p: Position(epoch, n) for (p, epoch), n in zip(EPOCHS.items(), (10, 35, 1), strict=True)}
    cursor = composite(places, lead=3)
    assert cursor == f"{digest(EPOCHS)}.3z.0a.b1", "base62, the event's own partition first"
    sealed = parse(cursor, partitions=12)
    assert sealed == Sealed(digest(EPOCHS), ((0, 10), (3, 35), (11, 1)))
    assert isinstance(sealed, Sealed) and sealed.opened(EPOCHS) == places


def test_a_composite_cursor_of_a_lost_history_opens_nowhere() -> None:
    sealed = parse(composite({0: Position("aaaaaaaa", 5), 3: Position("bbbbbbbb", 7)}, lead=0), partitions=12)
    assert isinstance(sealed, Sealed)
    assert sealed.opened({0: "aaaaaaaa", 3: "dddddddd"}) is None, "partition 3 began a new history"
    assert sealed.opened({0: "aaaaaaaa"}) is None, "a partition it lists is not known now"


def test_the_longest_composite_cursor_is_128_bytes() -> None:
    largest = 62**8 - 1  # the largest number of 8 base62 digits
    places = {p: Position("aaaaaaaa", largest) for p in range(12)}
    cursor = composite(places, lead=5)
    assert len(cursor) == 128 and cursor.isascii()
    expected = Sealed(digest(dict.fromkeys(range(12), "aaaaaaaa")), tuple((p, largest) for p in range(12)))
    assert parse(cursor, partitions=12) == expected


@pytest.mark.parametrize(
    "raw",
    [
        "aaaaaaaa-12",  # one Redis's form
        "aaaaaaaa.c1",  # partition 12 of 12
        "aaaaaaaa.11.12",  # partition 1 twice
        "aaaaaaaa.101",  # a leading zero
        "aaaaaaaa.1",  # no number
        "aaaaaaaa.1ZZZZZZZZZ",  # past 2^53: no sequence gets there
        "aaaaaaaa.1zzzzzzzzzzz",  # past what a stream ID holds
        "aaaaaaa.11",  # a 7-character digest
        "aaaaaaaa",
        "aaaaaaaa.1!",
    ],
)
def test_anything_else_is_no_composite_cursor(raw: str) -> None:
    assert isinstance(parse(raw, partitions=12), Foreign)


def test_a_stream_s_place_never_goes_back_for_a_frame_numbered_before_it() -> None:
    """A task added to a resumed stream may come with a state numbered below where
    the stream stands: its id keeps the stream's place (web/delivery.py stamp)."""
    places = {3: Position("bbbbbbbb", 50)}
    older, newer = Frame("t", 5, "queued", "{}", "bbbbbbbb", 3), Frame("t", 51, "started", "{}", "bbbbbbbb", 3)
    ids = [frame.id for frame in stamp([older, newer], places, composite=True)]
    assert [parse(str(i), partitions=12) for i in ids] == [
        Sealed(digest({3: "bbbbbbbb"}), ((3, 50),)),
        Sealed(digest({3: "bbbbbbbb"}), ((3, 51),)),
    ]
    assert stamp([older], {}, composite=False) == [older], "one Redis: a frame's own id, on every stream"
