"""Which tasks a request may start, and the binding and checking of their parameters."""

from __future__ import annotations

import math
from typing import Any

import pytest

from progress_sse.allowlist import AllowedTask, AllowList, ParamError, integer, number
from progress_sse.demo import DEMO_TASKS


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
