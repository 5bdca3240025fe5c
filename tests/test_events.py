"""The event payload and its wire formats (pure functions, no I/O)."""

from __future__ import annotations

import json
import math
import time
from decimal import Decimal
from typing import Any

import pytest

from progress_sse.cursors import Position
from progress_sse.events import (
    CURSOR_UNKNOWN,
    HISTORY_LOST,
    PING,
    TERMINAL_STATES,
    Frame,
    State,
    dumps,
    encode_sse,
    finite_number,
    is_terminal,
    json_safe,
    make_event,
    percent_of,
    reset_frame,
    unknown_task_frame,
)

# --- states -------------------------------------------------------------------------


def test_terminal_states_are_exactly_success_failure_revoked_lost() -> None:
    assert set(TERMINAL_STATES) == {"success", "failure", "revoked", "lost"}
    assert {s.value for s in State} == {"queued", "started", "progress", "retry", *TERMINAL_STATES}


@pytest.mark.parametrize("state", ["queued", "started", "progress", "retry", "unknown", ""])
def test_non_terminal_states_are_not_terminal(state: str) -> None:
    assert not is_terminal(state)


@pytest.mark.parametrize("state", ["success", "failure", "revoked", "lost", State.SUCCESS])
def test_terminal_states_are_terminal(state: str) -> None:
    assert is_terminal(state)


def test_ping_is_a_comment_frame() -> None:
    assert PING == b": ping\n\n"


# --- percent_of ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("current", "total", "expected"),
    [
        (3, 10, 30.0),
        (1, 3, 33.33),
        (2, 3, 66.67),
        (1, 8, 12.5),
        (1, 7, 14.29),
        (1, 200_000, 0.0),
        (199_999, 200_000, 100.0),  # 99.9995 rounds to 2 places
        (10, 10, 100.0),
        (0, 10, 0.0),
        (2.5, 10, 25.0),
    ],
)
def test_percent_is_100_times_current_over_total_rounded_to_2_places(
    current: float, total: float, expected: float
) -> None:
    assert percent_of(current, total) == expected


@pytest.mark.parametrize(("current", "total", "expected"), [(15, 10, 100.0), (10**9, 1, 100.0), (-1, 10, 0.0)])
def test_percent_is_clamped_to_0_through_100(current: float, total: float, expected: float) -> None:
    assert percent_of(current, total) == expected


@pytest.mark.parametrize("current", [0, 5, -1])
def test_unknown_total_gives_unknown_percent(current: float) -> None:
    assert percent_of(current, None) is None


def test_total_zero_counts_as_done_not_as_division_by_zero() -> None:
    assert percent_of(0, 0) == 100.0
    assert percent_of(3, 0) == 100.0
    assert percent_of(-1, 0) == 0.0


# --- make_event -----------------------------------------------------------------------


def test_make_event_has_the_protocol_keys_in_the_documented_order() -> None:
    event = make_event("t-1", "demo.count", State.PROGRESS, current=3, total=10, message="Processing item 3", ts=5.0)
    assert list(event) == ["task_id", "name", "state", "current", "total", "percent", "message", "ts"]
    assert event == {
        "task_id": "t-1",
        "name": "demo.count",
        "state": "progress",
        "current": 3,
        "total": 10,
        "percent": 30.0,
        "message": "Processing item 3",
        "ts": 5.0,
    }


def test_make_event_state_is_a_plain_string_on_the_wire() -> None:
    event = make_event("t", None, State.SUCCESS)
    assert type(event["state"]) is str
    assert json.loads(dumps(event))["state"] == "success"


def test_make_event_defaults_are_indeterminate_with_no_message() -> None:
    event = make_event("t", None, "started", ts=1.0)
    assert (event["current"], event["total"], event["percent"], event["message"], event["name"]) == (
        0,
        None,
        None,
        None,
        None,
    )


def test_make_event_rounds_the_timestamp_to_milliseconds() -> None:
    assert make_event("t", None, "queued", ts=1763712000.123456)["ts"] == 1763712000.123


def test_make_event_stamps_the_current_time_when_none_is_given() -> None:
    before = time.time()
    ts = make_event("t", None, "queued")["ts"]
    after = time.time()
    assert round(before, 3) <= ts <= round(after, 3)


def test_make_event_appends_extra_keys_after_the_protocol_keys() -> None:
    error = {"type": "ValueError", "message": "bad", "traceback": "..."}
    event = make_event("t", "n", "failure", ts=1.0, error=error, retries=2)
    assert list(event)[-2:] == ["error", "retries"]
    assert event["error"] == error and event["retries"] == 2


# --- dumps / json_safe / finite_number --------------------------------------------------


def test_dumps_is_compact_json() -> None:
    assert dumps({"a": [1, 2], "b": None, "c": {"d": 1.5}}) == '{"a":[1,2],"b":null,"c":{"d":1.5}}'


def test_dumps_keeps_non_ascii_text_as_utf8() -> None:
    assert dumps({"message": "Täglich ✓"}) == '{"message":"Täglich ✓"}'


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_dumps_refuses_nan_and_infinities(bad: float) -> None:
    with pytest.raises(ValueError):
        dumps({"current": bad})


@pytest.mark.parametrize("value", [None, True, 3, 2.5, "text", [1, "a", None], {"k": [1, {"n": 2}]}])
def test_json_safe_returns_json_values_as_they_are(value: Any) -> None:
    assert json_safe(value) is value


class Opaque:
    def __repr__(self) -> str:
        return "<Opaque thing>"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ({1, 2}, "{1, 2}"),
        (b"raw", "b'raw'"),
        (Opaque(), "<Opaque thing>"),
        (math.nan, "nan"),
        (math.inf, "inf"),
        ({"nested": Opaque()}, "{'nested': <Opaque thing>}"),
        (Decimal("1.5"), "Decimal('1.5')"),
    ],
)
def test_json_safe_sends_a_value_json_cannot_hold_as_its_repr(value: Any, expected: str) -> None:
    assert json_safe(value) == expected


def test_json_safe_handles_a_self_referencing_value() -> None:
    loop: list[Any] = []
    loop.append(loop)
    assert json_safe(loop) == "[[...]]"


@pytest.mark.parametrize(
    ("value", "expected"),
    [(3, 3), (0, 0), (-2, -2), (2.5, 2.5), (10**20, 10**20), ("4", 4.0), (" 7.5 ", 7.5), (Decimal("1.25"), 1.25)],
)
def test_finite_number_accepts_ints_floats_and_numeric_values(value: Any, expected: float) -> None:
    result = finite_number(value)
    assert result == expected
    assert type(result) is type(expected)


@pytest.mark.parametrize("value", [None, "abc", "", [], {}, object(), math.nan, math.inf, -math.inf, "inf", "nan"])
def test_finite_number_turns_anything_else_into_none(value: Any) -> None:
    assert finite_number(value) is None


def test_finite_number_never_passes_a_bool_through() -> None:
    result = finite_number(True)
    assert not isinstance(result, bool)
    assert dumps(result) != "true"


# --- SSE encoding -------------------------------------------------------------------


def test_encode_sse_writes_id_event_data_and_a_blank_line() -> None:
    assert encode_sse(id="7", event="progress", data='{"a":1}') == b'id: 7\nevent: progress\ndata: {"a":1}\n\n'


def test_encode_sse_frame_ends_with_exactly_one_blank_line() -> None:
    frame = encode_sse(data="x")
    assert frame == b"data: x\n\n"
    assert frame.endswith(b"\n\n") and not frame.endswith(b"\n\n\n")


def test_encode_sse_omits_id_and_event_when_not_given() -> None:
    assert encode_sse(data="only") == b"data: only\n\n"


@pytest.mark.parametrize("newline", ["\n", "\r", "\r\n"])
def test_encode_sse_strips_newlines_from_id_and_event(newline: str) -> None:
    frame = encode_sse(id=f"1{newline}2", event=f"pro{newline}gress", data="d")
    assert frame == b"id: 12\nevent: progress\ndata: d\n\n"


def test_encode_sse_splits_multi_line_data_into_several_data_lines() -> None:
    assert encode_sse(data="one\ntwo\nthree") == b"data: one\ndata: two\ndata: three\n\n"


@pytest.mark.parametrize("newline", ["\r\n", "\r"])
def test_encode_sse_treats_cr_and_crlf_in_data_as_line_breaks(newline: str) -> None:
    frame = encode_sse(data=f"one{newline}two")
    assert frame == b"data: one\ndata: two\n\n"
    assert b"\r" not in frame


def test_encode_sse_keeps_empty_lines_of_data() -> None:
    # EventSource joins data lines with \n, so "a\n\nb" must come back as three lines.
    assert encode_sse(data="a\n\nb") == b"data: a\ndata: \ndata: b\n\n"


def test_encode_sse_encodes_utf8() -> None:
    assert encode_sse(data='"✓"') == 'data: "✓"\n\n'.encode()


def test_frame_encoded_is_the_sse_frame_with_epoch_and_seq_as_id() -> None:
    data = dumps(make_event("t", "demo.count", "progress", current=1, total=2, ts=1.0))
    frame = Frame("t", 42, "progress", data, "k3x7f2ab")
    assert frame.encoded == f"id: k3x7f2ab-42\nevent: progress\ndata: {data}\n\n".encode()
    assert frame.id == "k3x7f2ab-42" and frame.position == Position("k3x7f2ab", 42)
    assert frame.payload()["percent"] == 50.0


def test_a_frame_without_an_epoch_has_no_id_line() -> None:
    frame = Frame("t", 42, "progress", "{}", None)
    assert frame.encoded == b"event: progress\ndata: {}\n\n"
    assert frame.id is None and frame.position is None


def test_frame_terminal_follows_its_state() -> None:
    assert Frame("t", 1, "success", "{}", "e").terminal
    assert not Frame("t", 1, "progress", "{}", "e").terminal


def test_frames_compare_by_value_not_by_encoding() -> None:
    assert Frame("t", 1, "queued", "{}", "e") == Frame("t", 1, "queued", "{}", "e")
    assert Frame("t", 1, "queued", "{}", "e") != Frame("t", 2, "queued", "{}", "e")
    assert Frame("t", 1, "queued", "{}", "e") != Frame("t", 1, "queued", "{}", "f")


@pytest.mark.parametrize("reason", [HISTORY_LOST, CURSOR_UNKNOWN])
def test_reset_frame_has_no_id_and_says_why_and_what_is_missing(reason: str) -> None:
    frame = reset_frame(reason, ["a", "b"])
    lines = frame.decode().split("\n")
    assert lines[0] == "event: reset" and lines[1].startswith("data: ")
    assert lines[2:] == ["", ""], "one data line, no id"
    body = json.loads(lines[1].removeprefix("data: "))
    assert body["reason"] == reason and body["missing"] == ["a", "b"]
    assert "states that follow are current" in body["message"]


def test_unknown_task_frame_has_no_id_line_so_the_cursor_stays() -> None:
    frame = unknown_task_frame("abc-123")
    assert frame == b'event: unknown\ndata: {"task_id":"abc-123"}\n\n'
    assert not frame.startswith(b"id:") and b"\nid:" not in frame


def test_a_frame_with_a_stream_s_cursor_is_the_same_frame_under_that_id() -> None:
    frame = Frame("t", 7, "failure", dumps({"task_id": "t", "error": {"type": "E", "traceback": "x"}}), "e", 3)
    copy = frame.with_cursor("aaaaaaaa.37.01")
    assert copy.id == "aaaaaaaa.37.01" and copy.body is frame.body, "the body is shared, not encoded again"
    assert copy.encoded == encode_sse(id="aaaaaaaa.37.01", event="failure", data=frame.data)
    hidden = copy.encoded_for_watcher(messages=True)
    assert hidden.startswith(b"id: aaaaaaaa.37.01\n") and b"traceback" not in hidden
    assert frame.encoded_for_watcher(messages=True).startswith(b"id: e-7\n")
