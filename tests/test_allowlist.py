"""Which tasks a request may start, and the binding and checking of their parameters."""

from __future__ import annotations

import json
import math
import re
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from progress_sse.allowlist import (
    DEFAULT_MAX_ITEMS,
    DEFAULT_MAX_LENGTH,
    AllowedTask,
    AllowList,
    ParamError,
    boolean,
    choice,
    integer,
    list_of,
    load,
    number,
    string,
)
from progress_sse.config import ConfigError
from progress_sse.worker.demo import DEMO_TASKS


def _width_not_above_limit(params: dict[str, Any]) -> None:
    if params["width"] > params["limit"]:
        raise ParamError(f"width ({params['width']}) must not exceed limit ({params['limit']})")


RESIZE = AllowedTask(
    "img.resize",
    {
        "width": (integer(1, 100), 10),
        "scale": (number(0, 2), 1.0),
        "limit": (integer(1, 1000), 100),
    },
    check_all=_width_not_above_limit,
)
NOARGS = AllowedTask("sys.ping")
TASKS = AllowList([RESIZE, NOARGS])


# --- binding ------------------------------------------------------------------------


def test_no_args_fills_every_default() -> None:
    assert RESIZE.check([], {}) == {"width": 10, "scale": 1.0, "limit": 100}


def test_kwargs_override_only_their_own_defaults() -> None:
    assert RESIZE.check([], {"scale": 0.5}) == {"width": 10, "scale": 0.5, "limit": 100}


def test_positional_args_bind_to_parameters_in_declared_order() -> None:
    assert RESIZE.check([20, 1.5], {}) == {"width": 20, "scale": 1.5, "limit": 100}
    assert RESIZE.check([20, 1.5, 300], {}) == {"width": 20, "scale": 1.5, "limit": 300}


def test_positional_and_keyword_args_combine() -> None:
    assert RESIZE.check([30], {"limit": 40}) == {"width": 30, "scale": 1.0, "limit": 40}


def test_task_without_parameters_accepts_nothing_and_returns_nothing() -> None:
    assert NOARGS.check([], {}) == {}


def test_unknown_kwarg_is_named_with_the_parameters_the_task_takes() -> None:
    with pytest.raises(ParamError) as info:
        RESIZE.check([], {"height": 5})
    message = str(info.value)
    assert "'height'" in message
    assert "img.resize" in message
    assert "width, scale, limit" in message


def test_unknown_kwarg_on_a_task_without_parameters_says_it_takes_none() -> None:
    with pytest.raises(ParamError, match=r"'x'.*none"):
        NOARGS.check([], {"x": 1})


def test_parameter_given_positionally_and_as_kwarg_is_refused() -> None:
    with pytest.raises(ParamError) as info:
        RESIZE.check([20], {"width": 30})
    message = str(info.value)
    assert "'width'" in message and "both" in message


def test_too_many_positional_args_says_how_many_it_takes_and_got() -> None:
    with pytest.raises(ParamError) as info:
        RESIZE.check([1, 1.0, 1, 99], {})
    message = str(info.value)
    assert "at most 3" in message
    assert "width, scale, limit" in message
    assert "not 4" in message


def test_any_positional_arg_to_a_task_without_parameters_is_too_many() -> None:
    with pytest.raises(ParamError, match=r"at most 0 .*\(none\), not 1"):
        NOARGS.check([1], {})


@pytest.mark.parametrize(("args", "type_name"), [({}, "dict"), ("1,2", "str"), (None, "NoneType"), (5, "int")])
def test_args_that_are_not_a_list_are_refused_naming_what_they_were(args: Any, type_name: str) -> None:
    with pytest.raises(ParamError) as info:
        RESIZE.check(args, {})
    message = str(info.value)
    assert message.startswith("args ")
    assert type_name in message


@pytest.mark.parametrize(("kwargs", "type_name"), [([], "list"), ("n=1", "str"), (None, "NoneType"), (3.5, "float")])
def test_kwargs_that_are_not_an_object_are_refused_naming_what_they_were(kwargs: Any, type_name: str) -> None:
    with pytest.raises(ParamError) as info:
        RESIZE.check([], kwargs)
    message = str(info.value)
    assert message.startswith("kwargs ")
    assert type_name in message


# --- value checks -----------------------------------------------------------------------


@pytest.mark.parametrize("bad", [True, False, 2.0, 2.5, "5", None, [5]])
def test_integer_parameter_rejects_bools_floats_and_non_numbers(bad: Any) -> None:
    with pytest.raises(ParamError) as info:
        RESIZE.check([], {"width": bad})
    message = str(info.value)
    assert message.startswith("width ")
    assert repr(bad) in message
    assert "whole number" in message


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_number_parameter_rejects_nan_and_infinities(bad: float) -> None:
    with pytest.raises(ParamError) as info:
        RESIZE.check([], {"scale": bad})
    message = str(info.value)
    assert message.startswith("scale ")
    assert repr(bad) in message


@pytest.mark.parametrize("bad", [True, "1.0", None, {"v": 1}])
def test_number_parameter_rejects_bools_and_non_numbers(bad: Any) -> None:
    with pytest.raises(ParamError) as info:
        RESIZE.check([], {"scale": bad})
    message = str(info.value)
    assert message.startswith("scale ") and repr(bad) in message


@pytest.mark.parametrize(("name", "bad"), [("width", 0), ("width", 101), ("width", -5), ("limit", 1001)])
def test_integer_out_of_range_names_parameter_range_and_value(name: str, bad: int) -> None:
    with pytest.raises(ParamError) as info:
        RESIZE.check([], {name: bad} if name == "width" else {name: bad, "width": 1})
    message = str(info.value)
    assert message.startswith(f"{name} ")
    assert f"not {bad}" in message
    assert "from 1 to" in message


@pytest.mark.parametrize("bad", [-0.1, 2.01, 1e9])
def test_number_out_of_range_names_parameter_range_and_value(bad: float) -> None:
    with pytest.raises(ParamError) as info:
        RESIZE.check([], {"scale": bad})
    message = str(info.value)
    assert message.startswith("scale ")
    assert f"not {bad}" in message
    assert "from 0 to 2" in message


def test_positional_value_is_checked_under_its_parameter_name() -> None:
    with pytest.raises(ParamError, match=r"^scale .*not 9"):
        RESIZE.check([5, 9], {})


@pytest.mark.parametrize(("name", "edge"), [("width", 1), ("width", 100), ("scale", 0), ("scale", 2)])
def test_range_edges_are_accepted(name: str, edge: float) -> None:
    assert RESIZE.check([], {name: edge})[name] == edge


def test_number_parameter_accepts_an_int() -> None:
    assert RESIZE.check([], {"scale": 1})["scale"] == 1


def test_cross_check_sees_defaults_and_given_values_together() -> None:
    with pytest.raises(ParamError, match=r"width \(60\) must not exceed limit \(50\)"):
        RESIZE.check([60], {"limit": 50})


def test_checkers_can_be_used_on_their_own() -> None:
    assert integer(0, 3)("n", 3) == 3
    assert number(0, 1)("x", 0.5) == 0.5
    with pytest.raises(ParamError, match=r"^n must be from 0 to 3, not 4$"):
        integer(0, 3)("n", 4)


# --- the allow-list -------------------------------------------------------------------


def test_allow_list_checks_the_named_task() -> None:
    assert TASKS.check("img.resize", [7], {}) == {"width": 7, "scale": 1.0, "limit": 100}
    with pytest.raises(ParamError, match="width"):
        TASKS.check("img.resize", [0], {})


@pytest.mark.parametrize("name", ["os.system", "", "IMG.RESIZE", None, 42, ["img.resize"]])
def test_unknown_task_name_is_refused_listing_the_known_names(name: Any) -> None:
    with pytest.raises(ParamError) as info:
        TASKS.check(name, [], {})
    message = str(info.value)
    assert repr(name) in message
    assert "img.resize, sys.ping" in message


def test_empty_allow_list_says_it_starts_none() -> None:
    with pytest.raises(ParamError, match=r"it starts: none"):
        AllowList([]).check("demo.count", [], {})


def test_allow_list_membership_and_iteration() -> None:
    assert "img.resize" in TASKS and "nope" not in TASKS
    assert [task.name for task in TASKS] == ["img.resize", "sys.ping"]


# --- the demo allow-list ----------------------------------------------------------------


def test_demo_allow_list_holds_exactly_the_protocol_demo_tasks() -> None:
    assert sorted(task.name for task in DEMO_TASKS) == [
        "demo.count",
        "demo.fail",
        "demo.flaky",
        "demo.mystery",
        "demo.stages",
    ]


@pytest.mark.parametrize(
    ("name", "defaults"),
    [
        ("demo.count", {"n": 50, "delay": 0.1}),
        ("demo.mystery", {"min_s": 10, "max_s": 20}),
        ("demo.stages", {"delay": 2.0}),
        ("demo.fail", {"after": 5, "delay": 0.1}),
        ("demo.flaky", {"failures": 2, "delay": 0.5}),
    ],
)
def test_demo_defaults_match_the_protocol(name: str, defaults: dict[str, Any]) -> None:
    assert DEMO_TASKS.check(name, [], {}) == defaults


def test_demo_mystery_refuses_min_above_max_naming_both_values() -> None:
    with pytest.raises(ParamError) as info:
        DEMO_TASKS.check("demo.mystery", [], {"min_s": 5, "max_s": 2})
    message = str(info.value)
    assert "min_s (5)" in message and "max_s (2)" in message


def test_demo_mystery_cross_check_uses_the_default_max() -> None:
    with pytest.raises(ParamError, match=r"min_s \(30\).*max_s \(20\)"):
        DEMO_TASKS.check("demo.mystery", [], {"min_s": 30})


def test_demo_mystery_accepts_min_equal_to_max() -> None:
    assert DEMO_TASKS.check("demo.mystery", [3, 3], {}) == {"min_s": 3, "max_s": 3}


def test_demo_count_refuses_a_bool_n() -> None:
    with pytest.raises(ParamError, match=r"^n .*not True$"):
        DEMO_TASKS.check("demo.count", [], {"n": True})


def test_demo_allow_list_has_its_own_title() -> None:
    assert DEMO_TASKS.title == "Start a demo task"


def test_allow_list_title_defaults_to_start_a_task() -> None:
    assert AllowList([]).title == "Start a task"
    assert AllowList([], title="Start a report").title == "Start a report"


# --- integer and number: edges ------------------------------------------------------------


def test_integer_and_number_describe_their_kind_and_bounds() -> None:
    assert integer(1, 5).describe() == {"kind": "integer", "min": 1, "max": 5}
    assert number(0, 2.5).describe() == {"kind": "number", "min": 0, "max": 2.5}


def test_a_huge_int_is_compared_exactly_and_quoted_cut_short() -> None:
    assert number(0, 1e308)("x", 10**300) == 10**300  # no OverflowError from float()
    with pytest.raises(ParamError) as info:
        integer(0, 10)("n", 10**400)
    message = str(info.value)
    assert message.startswith("n must be from 0 to 10, not 1000")
    assert message.endswith("…") and len(message) < 100


def test_an_int_too_long_to_print_is_still_refused_as_a_param_error() -> None:
    with pytest.raises(ParamError, match=r"^n must be from 0 to 1, not a value too large to print$"):
        integer(0, 1)("n", 10**5000)


@pytest.mark.parametrize(
    ("make", "error"),
    [
        (lambda: integer(5, 1), ValueError),
        (lambda: integer(0, 1.5), TypeError),
        (lambda: integer(True, 5), TypeError),
        (lambda: number(0, math.inf), TypeError),
        (lambda: number(math.nan, 1), TypeError),
        (lambda: number(2.0, 1.0), ValueError),
    ],
)
def test_nonsensical_bounds_fail_when_the_allow_list_is_defined(make: Any, error: type[Exception]) -> None:
    with pytest.raises(error) as info:
        make()
    assert not isinstance(info.value, ParamError)  # a programming error, never a 422


# --- string -------------------------------------------------------------------------


def test_string_accepts_text_up_to_its_max_length_and_returns_it() -> None:
    assert string(5)("title", "abcde") == "abcde"
    assert string(5)("title", "") == ""
    assert string(1)("title", "\N{SNAIL}") == "\N{SNAIL}"  # one character, four UTF-8 bytes


@pytest.mark.parametrize("bad", [5, None, True, ["a"], {"a": 1}, b"abc"])
def test_string_refuses_anything_but_a_str(bad: Any) -> None:
    with pytest.raises(ParamError) as info:
        string(10)("title", bad)
    assert str(info.value) == f"title must be a string of at most 10 characters, not {bad!r}"


def test_string_too_long_says_the_limit_and_the_length_not_the_text() -> None:
    with pytest.raises(ParamError) as info:
        string(5)("title", "x" * 5000)
    assert str(info.value) == "title must be at most 5 characters long, not 5000"


@pytest.mark.parametrize(
    ("checker", "value", "message"),
    [
        (string(5, min_length=1), "", "title must be at least 1 character long, not 0"),
        (string(5, min_length=3), "ab", "title must be at least 3 characters long, not 2"),
        (string(1), "ab", "title must be at most 1 character long, not 2"),
    ],
)
def test_string_length_messages_count_characters_in_good_english(checker: Any, value: str, message: str) -> None:
    with pytest.raises(ParamError) as info:
        checker("title", value)
    assert str(info.value) == message


def test_string_refuses_an_unpaired_surrogate_that_json_can_carry() -> None:
    value = json.loads('"a\\ud800b"')
    with pytest.raises(ParamError, match=r"^title must be valid Unicode, not .*unpaired surrogate"):
        string(10)("title", value)


def test_string_describes_its_max_length_and_only_a_min_length_that_is_set() -> None:
    assert string(80).describe() == {"kind": "string", "max_length": 80}
    assert string(80, min_length=2).describe() == {"kind": "string", "max_length": 80, "min_length": 2}
    assert string().describe() == {"kind": "string", "max_length": DEFAULT_MAX_LENGTH}


@pytest.mark.parametrize(("max_length", "min_length"), [(3, 4), (-1, 0), (5, -1), (True, 0)])
def test_string_with_impossible_lengths_fails_when_defined(max_length: int, min_length: int) -> None:
    with pytest.raises(ValueError, match=r"string\(\) needs 0 <= min_length <= max_length"):
        string(max_length, min_length=min_length)


# --- choice -------------------------------------------------------------------------


def test_choice_accepts_each_value_and_publishes_the_declared_one() -> None:
    check = choice(["pdf", 2.0, None, True])
    assert [check("f", v) for v in ["pdf", 2.0, None, True]] == ["pdf", 2.0, None, True]
    published = check("f", 2)  # JSON has one number type: 2 is 2.0
    assert published == 2.0 and isinstance(published, float)


@pytest.mark.parametrize(
    ("values", "bad"),
    [([1, 2], True), ([0, 1], False), ([True], 1), ([False], 0), ([1], "1"), (["a"], None), (["a"], ["a"])],
)
def test_choice_compares_as_json_does(values: list[Any], bad: Any) -> None:
    with pytest.raises(ParamError) as info:
        choice(values)("mode", bad)
    message = str(info.value)
    assert message.startswith("mode must be one of ")
    assert message.endswith(f", not {bad!r}")


def test_choice_refusal_lists_every_choice() -> None:
    with pytest.raises(ParamError) as info:
        choice(["pdf", "csv", None])("format", "doc")
    assert str(info.value) == "format must be one of 'pdf', 'csv', None, not 'doc'"


def test_choice_describes_its_choices_as_a_list() -> None:
    assert choice(("a", 1, None)).describe() == {"kind": "choice", "choices": ["a", 1, None]}


@pytest.mark.parametrize(
    ("values", "error"),
    [([], ValueError), ("abc", TypeError), ([{"a": 1}], TypeError), ([math.nan], TypeError), ([1, 1.0], ValueError)],
)
def test_choice_of_no_values_non_scalars_or_repeats_fails_when_defined(values: Any, error: type[Exception]) -> None:
    with pytest.raises(error):
        choice(values)


def test_choice_may_hold_both_1_and_true() -> None:
    check = choice([1, True])
    assert check("x", True) is True and check("x", 1) == 1 and check("x", 1) is not True


# --- boolean ------------------------------------------------------------------------


def test_boolean_accepts_true_and_false() -> None:
    assert boolean()("draft", True) is True
    assert boolean()("draft", False) is False


@pytest.mark.parametrize("bad", [0, 1, "true", "false", None, 1.0])
def test_boolean_refuses_what_merely_looks_like_one(bad: Any) -> None:
    with pytest.raises(ParamError) as info:
        boolean()("draft", bad)
    assert str(info.value) == f"draft must be true or false, not {bad!r}"


def test_boolean_describes_itself() -> None:
    assert boolean().describe() == {"kind": "boolean"}


# --- list_of ------------------------------------------------------------------------


def test_list_of_checks_every_item_and_publishes_what_the_item_check_returns() -> None:
    assert list_of(choice([1.0, 2.0]))("ids", [1, 2]) == [1.0, 2.0]
    assert list_of(integer(0, 9))("ids", []) == []


def test_list_of_names_a_refused_item_by_its_index() -> None:
    with pytest.raises(ParamError) as info:
        list_of(integer(0, 9))("ids", [1, 2, 30])
    assert str(info.value) == "ids[2] must be from 0 to 9, not 30"


def test_nested_lists_name_the_item_by_both_indexes() -> None:
    with pytest.raises(ParamError, match=r"^grid\[1\]\[0\] must be true or false, not 'x'$"):
        list_of(list_of(boolean()))("grid", [[True], ["x"]])


@pytest.mark.parametrize("bad", ["abc", ("a",), {"a": 1}, None, 3])
def test_list_of_refuses_anything_but_a_list(bad: Any) -> None:
    with pytest.raises(ParamError) as info:
        list_of(string())("tags", bad)
    assert str(info.value) == f"tags must be a list (a JSON array), not {bad!r}"


def test_list_of_is_bounded_by_default() -> None:
    check = list_of(integer(0, 1))
    assert len(check("ids", [0] * DEFAULT_MAX_ITEMS)) == DEFAULT_MAX_ITEMS
    with pytest.raises(ParamError, match=rf"^ids must have at most {DEFAULT_MAX_ITEMS} items, not 1000000$"):
        check("ids", [0] * 1_000_000)


def test_list_of_min_and_max_items() -> None:
    check = list_of(string(), min_items=1, max_items=1)
    assert check("to", ["a"]) == ["a"]
    with pytest.raises(ParamError, match=r"^to must have at least 1 item, not 0$"):
        check("to", [])
    with pytest.raises(ParamError, match=r"^to must have at most 1 item, not 2$"):
        check("to", ["a", "b"])


def test_list_of_describes_its_item_and_bounds() -> None:
    assert list_of(integer(0, 9), max_items=5).describe() == {
        "kind": "list",
        "item": {"kind": "integer", "min": 0, "max": 9},
        "max_items": 5,
    }
    assert list_of(_even).describe() == {"kind": "list", "item": None, "max_items": DEFAULT_MAX_ITEMS}
    assert list_of(boolean(), min_items=2).describe()["min_items"] == 2


def test_an_items_own_check_gets_its_index_as_name_and_its_value_error_refuses() -> None:
    with pytest.raises(ParamError) as info:
        list_of(_parse_int)("ids", ["1", "x"])
    assert str(info.value) == "ids[1]: invalid literal for int() with base 10: 'x'"


@pytest.mark.parametrize(
    ("make", "error"),
    [
        (lambda: list_of(5), TypeError),  # type: ignore[arg-type]
        (lambda: list_of(lambda value: value), TypeError),
        (lambda: list_of(boolean(), min_items=3, max_items=2), ValueError),
        (lambda: list_of(boolean(), max_items=-1), ValueError),
    ],
)
def test_list_of_with_a_bad_item_check_or_bounds_fails_when_defined(make: Any, error: type[Exception]) -> None:
    with pytest.raises(error):
        make()


# --- every refusal names the parameter ------------------------------------------------------


def _even(name: str, value: Any) -> Any:
    if not isinstance(value, int) or value % 2:
        raise ParamError(f"{name} must be even, not {value!r}")
    return value


def _parse_int(name: str, value: Any) -> int:
    return int(value)  # a ValueError or TypeError of the user's own


def _raising(exc: Exception) -> Any:
    def check(name: str, value: Any) -> Any:
        raise exc

    return check


def _task(checker: Any, default: Any = 0) -> AllowedTask:
    return AllowedTask("t.run", {"count": (checker, default)})


@pytest.mark.parametrize(
    ("checker", "bad"),
    [
        (integer(0, 5), 9),
        (number(0, 5), "x"),
        (string(3), "long"),
        (choice(["a"]), "b"),
        (boolean(), 1),
        (list_of(boolean()), [1]),
        (_even, 3),
        (_parse_int, "x"),
        (_parse_int, [1]),
        (_raising(ParamError("must be positive")), 1),
        (_raising(ValueError("")), 1),
    ],
)
def test_every_refusal_starts_with_the_parameters_name(checker: Any, bad: Any) -> None:
    with pytest.raises(ParamError) as info:
        _task(checker).check([bad], {})  # positionally too: named by the parameter it binds to
    assert re.match(r"count\b", str(info.value)), str(info.value)


@pytest.mark.parametrize(
    ("raised", "message"),
    [
        (ParamError("must be positive"), "count: must be positive"),
        (ParamError("must be positive."), "count: must be positive"),  # the server adds the full stop
        (ParamError("counter must be set first"), "count: counter must be set first"),  # a different word
        (ParamError(""), "count cannot be 7"),
        (ValueError("not a prime"), "count: not a prime"),
        (TypeError("unsupported operand"), "count: unsupported operand"),
        (ParamError("count must be a prime, not 7"), "count must be a prime, not 7"),
        (ValueError("count: not a prime"), "count: not a prime"),
    ],
)
def test_a_users_refusal_is_prefixed_with_the_name_unless_it_starts_with_it(raised: Exception, message: str) -> None:
    with pytest.raises(ParamError) as info:
        _task(_raising(raised)).check([], {"count": 7})
    assert str(info.value) == message


def test_a_refusal_that_already_names_the_parameter_is_raised_unchanged() -> None:
    raised = ParamError("count must be a prime")
    with pytest.raises(ParamError) as info:
        _task(_raising(raised)).check([], {"count": 7})
    assert info.value is raised


def test_a_users_value_error_becomes_a_param_error_caused_by_it() -> None:
    with pytest.raises(ParamError) as info:
        _task(_parse_int).check([], {"count": "seven"})
    assert str(info.value) == "count: invalid literal for int() with base 10: 'seven'"
    assert isinstance(info.value.__cause__, ValueError) and not isinstance(info.value.__cause__, ParamError)


@pytest.mark.parametrize("bug", [KeyError("k"), AttributeError("a"), RuntimeError("r")])
def test_any_other_exception_of_a_check_is_a_bug_and_propagates(bug: Exception) -> None:
    with pytest.raises(type(bug)):
        _task(_raising(bug)).check([], {"count": 7})


def test_the_checks_return_value_is_what_gets_published() -> None:
    assert _task(_parse_int).check([], {"count": "42"}) == {"count": 42}


def test_a_default_is_published_unchecked() -> None:
    assert _task(string(3), None).check([], {}) == {"count": None}


def test_a_kwarg_with_a_non_string_key_is_an_unknown_parameter() -> None:
    with pytest.raises(ParamError, match=r"^t\.run has no parameter 1 \(it takes: count\)$"):
        _task(boolean()).check([], {1: True})


# --- check_all ----------------------------------------------------------------------


def _together(exc: Exception) -> AllowedTask:
    def check_all(params: dict[str, Any]) -> None:
        raise exc

    return AllowedTask("t.run", {"a": (boolean(), True)}, check_all=check_all)


@pytest.mark.parametrize(
    ("raised", "message"),
    [
        (ParamError("a and b clash"), "a and b clash"),
        (ValueError("a and b clash."), "a and b clash"),
        (ValueError(""), "t.run cannot take these parameters together"),
    ],
)
def test_check_all_refusals_are_param_errors_sent_without_a_prefix(raised: Exception, message: str) -> None:
    with pytest.raises(ParamError) as info:
        _together(raised).check([], {})
    assert str(info.value) == message


def test_a_type_error_in_check_all_refuses_the_request_instead_of_a_500() -> None:
    """A real case: a comparison with a parameter the client left out, whose default is None."""

    def lo_not_above_hi(params: dict[str, Any]) -> None:
        if params["lo"] > params["hi"]:
            raise ParamError("lo must not be above hi")

    task = AllowedTask("t.range", {"lo": (integer(0, 9), None), "hi": (integer(0, 9), 5)}, check_all=lo_not_above_hi)
    with pytest.raises(ParamError, match="'>' not supported") as info:
        task.check([], {"hi": 3})
    assert isinstance(info.value.__cause__, TypeError)
    assert task.check([], {"lo": 1, "hi": 3}) == {"lo": 1, "hi": 3}


# --- declaring tasks --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "words"),
    [
        ({1: (boolean(), True)}, "must be named by a string"),
        ({"n": integer(1, 10)}, "must be (checker, default)"),
        ({"n": (integer(1, 10),)}, "must be (checker, default)"),
        ({"n": (5, 1)}, "needs a checker"),
        ({"n": (lambda value: value, 1)}, "takes (name, value)"),
    ],
)
def test_a_misdeclared_parameter_fails_when_the_task_is_defined(params: Any, words: str) -> None:
    with pytest.raises(TypeError) as info:
        AllowedTask("t.run", params)
    assert words in str(info.value) and "'t.run'" in str(info.value)


def test_any_callable_that_takes_name_and_value_is_a_checker() -> None:
    class Even:
        def __call__(self, name: str, value: Any, *, strict: bool = True) -> Any:
            return _even(name, value)

    task = AllowedTask("t.run", {"a": (Even(), 0), "b": (_even, 0), "c": (lambda name, value: value, 0)})
    assert task.check([2, 4, "x"], {}) == {"a": 2, "b": 4, "c": "x"}


# --- the example in docs/integration.md ----------------------------------------------------

DOC = Path(__file__).resolve().parents[1] / "docs" / "integration.md"


def _doc_section() -> str:
    text = DOC.read_text()
    start = text.index("### Parameter checks\n")
    end = re.compile(r"^#{2,3} ", re.MULTILINE).search(text, start + 1)
    return text[start : end.start() if end else len(text)]


def _doc_namespace() -> dict[str, Any]:
    blocks = re.findall(r"```python\n(.*?)```", _doc_section(), re.DOTALL)
    assert blocks, "the section has a Python example"
    namespace: dict[str, Any] = {}
    for block in blocks:
        exec(compile(block, str(DOC), "exec"), namespace)
    return namespace


def test_doc_example_publishes_what_the_doc_says() -> None:
    tasks = _doc_namespace()["REPORT_TASKS"]
    assert tasks.title == "Start a report"
    assert tasks.check("reports.build", [], {"regions": ["us"]}) == {
        "year": 2026,
        "scale": 1.0,
        "title": "Sales",
        "format": "pdf",
        "draft": False,
        "regions": ["us"],
        "since": None,
    }
    assert tasks.check("reports.build", [], {"since": "2026-03-01"})["since"] == "2026-03-01"


def test_doc_refusal_table_is_what_the_checks_answer() -> None:
    tasks = _doc_namespace()["REPORT_TASKS"]
    rows = re.findall(r"^\| `(\{.*\})` \| `(.*)` \|$", _doc_section(), re.MULTILINE)
    assert len(rows) >= 5
    for kwargs, error in rows:
        with pytest.raises(ParamError) as info:
            tasks.check("reports.build", [], json.loads(kwargs))
        assert f"{info.value}." == error  # the server ends the sentence with a full stop


def test_load_imports_from_the_current_directory_and_names_a_broken_module(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    package = f"userapp_{uuid.uuid4().hex[:8]}"  # a fresh name: nothing cached in sys.modules
    (tmp_path / package).mkdir()
    (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / package / "good.py").write_text(
        "from progress_sse.allowlist import AllowList, AllowedTask\nTASKS = AllowList([AllowedTask('u.run')])\n"
    )
    (tmp_path / package / "broken.py").write_text("TASKS = [\n")
    monkeypatch.chdir(tmp_path)
    assert "u.run" in load(f"{package}.good:TASKS")
    with pytest.raises(ConfigError, match=rf"PROGRESS_SSE_ALLOWLIST='{package}.broken:TASKS' cannot be loaded: Syntax"):
        load(f"{package}.broken:TASKS")
    assert str(tmp_path) not in sys.path, "the current directory is on the path only while loading"
