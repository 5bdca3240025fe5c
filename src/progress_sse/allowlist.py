"""Which tasks a web request may start, and with which parameters.

The web process never publishes a task name it did not list here. Each allowed
task declares its parameters, in order, with a checker; `check(args, kwargs)` binds
a request's args and kwargs to them the way Python would and returns the kwargs to
publish, or raises `ParamError` with a sentence a person can act on.

A checker is any callable `(name, value) -> value to publish` that raises
`ParamError` to refuse. The shipped ones (`integer`, `number`, `string`, `choice`,
`boolean`, `list_of`) also have `describe()`, from which the page renders inputs.
"""

from __future__ import annotations

import importlib
import inspect
import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from celery.utils.imports import cwd_in_path

__all__ = [
    "DEFAULT_MAX_ITEMS",
    "DEFAULT_MAX_LENGTH",
    "AllowList",
    "AllowedTask",
    "Boolean",
    "Checker",
    "Choice",
    "ListOf",
    "ParamError",
    "Range",
    "String",
    "boolean",
    "check_value",
    "choice",
    "describe_checker",
    "integer",
    "list_of",
    "load",
    "number",
    "same_json",
    "string",
]

Checker = Callable[[str, Any], Any]

# Bounds for when a task does not choose its own: generous for a form, and small
# enough that nobody can make a task chew through a million items.
DEFAULT_MAX_LENGTH = 1_000
DEFAULT_MAX_ITEMS = 100

# A refused value is shown cut to this many characters: a 64 KiB body must not
# come back whole in its 422.
SHOW_AT_MOST = 60


class ParamError(ValueError):
    """The request's args or kwargs are not what the task accepts."""


# --- messages -------------------------------------------------------------------------


def _show(value: Any) -> str:
    """A refused value as a message quotes it: its repr, cut short."""
    try:
        text = repr(value)
    except ValueError:  # an int longer than sys.get_int_max_str_digits() cannot be printed
        return "a value too large to print"
    return text if len(text) <= SHOW_AT_MOST else text[:SHOW_AT_MOST] + "…"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _refuse(name: str, sentence: str) -> ParamError:
    """A shipped checker's refusal: the parameter's name, then what it must be."""
    return ParamError(f"{name} {sentence}")


def _sentence(message: str) -> str:
    # The server ends every error with its own full stop; one here would make two.
    return message.strip().removesuffix(".").rstrip()


def _named(name: str, message: str, value: Any) -> str:
    """`message` as a sentence that starts with the parameter's name.

    A message that already starts with it ("count must be even", "tags[2] ...")
    is kept; any other gets "name: " in front ("count: must be even"). Only the
    start counts: a short name like "a" is a word in most sentences."""
    sentence = _sentence(message)
    if not sentence:
        return f"{name} cannot be {_show(value)}"
    if re.match(rf"{re.escape(name)}(?!\w)", sentence):
        return sentence
    return f"{name}: {sentence}"


def check_value(checker: Checker, name: str, value: Any) -> Any:
    """Run one checker on one value, so that every refusal is a ParamError that
    names the parameter. A user's checker that raises ValueError or TypeError
    (int("x"), a failed parse) refuses the value: a 422, not a 500."""
    try:
        return checker(name, value)
    except (ValueError, TypeError) as exc:  # ParamError is a ValueError too
        message = _named(name, str(exc), value)
        if isinstance(exc, ParamError) and message == str(exc):
            raise
        raise ParamError(message) from exc


def describe_checker(checker: Checker) -> dict[str, Any] | None:
    """What the page needs to render an input for `checker`, or None (it then
    shows a JSON input). Describing is optional for a checker."""
    describe = getattr(checker, "describe", None)
    return describe() if callable(describe) else None


# --- the shipped checkers ----------------------------------------------------------------


def _is_whole(value: Any) -> bool:
    # bool is an int in Python but true/false in JSON: never a number here.
    return isinstance(value, int) and not isinstance(value, bool)


def _is_count(value: Any) -> bool:
    return _is_whole(value) and value >= 0


def _is_finite_number(value: Any) -> bool:
    # Only a float can be NaN or infinite; math.isfinite would overflow on a huge int.
    return _is_whole(value) or (isinstance(value, float) and math.isfinite(value))


def _is_json_scalar(value: Any) -> bool:
    return value is None or isinstance(value, str | bool) or _is_finite_number(value)


def _require(ok: bool, error: type[Exception], message: str) -> None:
    """A misdeclared checker fails when the allow-list is defined, not at a request."""
    if not ok:
        raise error(message)


def _require_checker(checker: Any, where: str) -> None:
    # A checker that cannot take (name, value) would raise TypeError at every
    # request, which check_value reports as the user's mistake: catch it here.
    _require(callable(checker), TypeError, f"{where} needs a checker, a (name, value) callable, not {checker!r}")
    try:
        signature = inspect.signature(checker)
    except (TypeError, ValueError):  # some builtins have none to inspect; trust them
        return
    try:
        signature.bind("name", "value")
    except TypeError:
        shown = getattr(checker, "__name__", type(checker).__name__)
        raise TypeError(f"{where} needs a checker that takes (name, value), not {shown}{signature}") from None


@dataclass(frozen=True)
class Range:
    """`integer(min, max)` or `number(min, max)`: a whole or any finite number
    within both bounds. Never a bool, NaN or an infinity."""

    kind: str  # "integer" or "number"
    minimum: float
    maximum: float

    def __post_init__(self) -> None:
        _require(self.kind in ("integer", "number"), ValueError, f"Range kind {self.kind!r} is not integer or number")
        fits = _is_whole if self.kind == "integer" else _is_finite_number
        for bound in (self.minimum, self.maximum):
            _require(fits(bound), TypeError, f"{self.kind}() bounds must be {self._what}s, not {bound!r}")
        _require(self.minimum <= self.maximum, ValueError, f"{self.kind}() has minimum > maximum")

    @property
    def _what(self) -> str:
        return "whole number" if self.kind == "integer" else "number"

    def __call__(self, name: str, value: Any) -> Any:
        fits = _is_whole if self.kind == "integer" else _is_finite_number
        if not fits(value):
            raise _refuse(name, f"must be a {self._what} from {self.minimum} to {self.maximum}, not {_show(value)}")
        if not self.minimum <= value <= self.maximum:
            raise _refuse(name, f"must be from {self.minimum} to {self.maximum}, not {_show(value)}")
        return value

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "min": self.minimum, "max": self.maximum}


def integer(minimum: int, maximum: int) -> Range:
    """A whole number from `minimum` to `maximum`, both included."""
    return Range("integer", minimum, maximum)


def number(minimum: float, maximum: float) -> Range:
    """Any finite number (int or float) from `minimum` to `maximum`, both included."""
    return Range("number", minimum, maximum)


@dataclass(frozen=True)
class String:
    """`string(max_length, min_length=...)`: a str whose length (in characters)
    is within both bounds."""

    max_length: int = DEFAULT_MAX_LENGTH
    min_length: int = 0

    def __post_init__(self) -> None:
        _require(
            _is_count(self.min_length) and _is_count(self.max_length) and self.min_length <= self.max_length,
            ValueError,
            f"string() needs 0 <= min_length <= max_length, not {self.min_length} and {self.max_length}",
        )

    def __call__(self, name: str, value: Any) -> str:
        most = _count(self.max_length, "character")
        if not isinstance(value, str):
            raise _refuse(name, f"must be a string of at most {most}, not {_show(value)}")
        if len(value) > self.max_length:
            raise _refuse(name, f"must be at most {most} long, not {len(value)}")
        if len(value) < self.min_length:
            raise _refuse(name, f"must be at least {_count(self.min_length, 'character')} long, not {len(value)}")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # JSON can carry a lone "\ud800"; UTF-8 cannot, so the task could not use it
            raise _refuse(name, f"must be valid Unicode, not {_show(value)} (it holds an unpaired surrogate)") from None
        return value

    def describe(self) -> dict[str, Any]:
        described: dict[str, Any] = {"kind": "string", "max_length": self.max_length}
        if self.min_length:
            described["min_length"] = self.min_length
        return described


def string(max_length: int = DEFAULT_MAX_LENGTH, *, min_length: int = 0) -> String:
    """A string of `min_length` to `max_length` characters."""
    return String(max_length, min_length)


def same_json(a: Any, b: Any) -> bool:
    # 1 == True and 0 == False in Python, but not in JSON; 1 == 1.0 in both.
    return isinstance(a, bool) == isinstance(b, bool) and a == b


@dataclass(frozen=True)
class Choice:
    """`choice(values)`: one of a fixed set of JSON scalars."""

    values: tuple[Any, ...]

    def __post_init__(self) -> None:
        _require(bool(self.values), ValueError, "choice() needs at least one value")
        for i, value in enumerate(self.values):
            _require(_is_json_scalar(value), TypeError, f"choice() values must be JSON scalars, not {value!r}")
            _require(
                not any(same_json(value, seen) for seen in self.values[:i]), ValueError, f"choice() repeats {value!r}"
            )

    def __call__(self, name: str, value: Any) -> Any:
        for allowed in self.values:
            if same_json(value, allowed):
                return allowed  # the declared value: 2 given for 2.0 publishes 2.0
        shown = ", ".join(_show(allowed) for allowed in self.values)
        raise _refuse(name, f"must be one of {shown}, not {_show(value)}")

    def describe(self) -> dict[str, Any]:
        return {"kind": "choice", "choices": list(self.values)}


def choice(values: Iterable[Any]) -> Choice:
    """One of `values` (strings, numbers, true/false or null), compared as JSON
    compares them: `true` is not `1`."""
    _require(not isinstance(values, str), TypeError, f"choice() takes a list of values, not the string {values!r}")
    return Choice(tuple(values))


@dataclass(frozen=True)
class Boolean:
    """`boolean()`: JSON true or false, and nothing that merely looks like one."""

    def __call__(self, name: str, value: Any) -> bool:
        if not isinstance(value, bool):  # not 0/1, not "true": a typo must not flip a switch
            raise _refuse(name, f"must be true or false, not {_show(value)}")
        return value

    def describe(self) -> dict[str, Any]:
        return {"kind": "boolean"}


def boolean() -> Boolean:
    """true or false."""
    return Boolean()


@dataclass(frozen=True)
class ListOf:
    """`list_of(item, max_items=...)`: a JSON array of a bounded length whose
    every item passes `item`; an item is named `name[i]` in errors."""

    item: Checker
    max_items: int = DEFAULT_MAX_ITEMS
    min_items: int = 0

    def __post_init__(self) -> None:
        _require_checker(self.item, "list_of()")
        _require(
            _is_count(self.min_items) and _is_count(self.max_items) and self.min_items <= self.max_items,
            ValueError,
            f"list_of() needs 0 <= min_items <= max_items, not {self.min_items} and {self.max_items}",
        )

    def __call__(self, name: str, value: Any) -> list[Any]:
        if not isinstance(value, list):
            raise _refuse(name, f"must be a list (a JSON array), not {_show(value)}")
        if len(value) > self.max_items:
            raise _refuse(name, f"must have at most {_count(self.max_items, 'item')}, not {len(value)}")
        if len(value) < self.min_items:
            raise _refuse(name, f"must have at least {_count(self.min_items, 'item')}, not {len(value)}")
        return [check_value(self.item, f"{name}[{i}]", item) for i, item in enumerate(value)]

    def describe(self) -> dict[str, Any]:
        described: dict[str, Any] = {"kind": "list", "item": describe_checker(self.item), "max_items": self.max_items}
        if self.min_items:
            described["min_items"] = self.min_items
        return described


def list_of(item: Checker, *, max_items: int = DEFAULT_MAX_ITEMS, min_items: int = 0) -> ListOf:
    """A list of `min_items` to `max_items` values, each checked by `item`."""
    return ListOf(item, max_items, min_items)


# --- tasks and the allow-list ----------------------------------------------------------------


@dataclass(frozen=True)
class AllowedTask:
    """A startable task: its Celery name, its parameters (name -> (checker, default)),
    and an optional check across parameters (e.g. min <= max).

    A default is published as it is, unchecked, so it may be something a request
    could not send (None for "not given", say)."""

    name: str
    params: Mapping[str, tuple[Checker, Any]] = field(default_factory=dict)
    check_all: Callable[[dict[str, Any]], None] | None = None
    description: str = ""

    def __post_init__(self) -> None:
        for key, entry in self.params.items():
            where = f"AllowedTask {self.name!r}: parameter {key!r}"
            # JSON object keys are strings, so a parameter named otherwise could never be given.
            _require(isinstance(key, str), TypeError, f"{where} must be named by a string")
            ok = isinstance(entry, tuple) and len(entry) == 2
            _require(ok, TypeError, f"{where} must be (checker, default), e.g. (integer(1, 10), 5), not {entry!r}")
            _require_checker(entry[0], where)

    def check(self, args: Any, kwargs: Any) -> dict[str, Any]:
        if not isinstance(args, list):
            raise ParamError(f"args must be a JSON array, not {type(args).__name__}")
        if not isinstance(kwargs, dict):
            raise ParamError(f"kwargs must be a JSON object, not {type(kwargs).__name__}")
        names = list(self.params)
        if len(args) > len(names):
            takes = ", ".join(names) or "none"
            raise ParamError(f"{self.name} takes at most {len(names)} positional arguments ({takes}), not {len(args)}")
        bound: dict[str, Any] = dict(zip(names, args, strict=False))
        for key, value in kwargs.items():
            if key not in self.params:
                allowed = ", ".join(names) or "none"
                raise ParamError(f"{self.name} has no parameter {key!r} (it takes: {allowed})")
            if key in bound:
                raise ParamError(f"{self.name} got {key!r} both as a positional argument and in kwargs")
            bound[key] = value
        checked = {}
        for key, (checker, default) in self.params.items():
            checked[key] = check_value(checker, key, bound[key]) if key in bound else default
        if self.check_all is not None:
            self._check_together(self.check_all, checked)
        return checked

    def _check_together(self, check_all: Callable[[dict[str, Any]], None], checked: dict[str, Any]) -> None:
        # Its message may concern several parameters, so it is not prefixed with one.
        # A ValueError or TypeError is still a refusal (422), as from a checker: a
        # check such as p["lo"] > p["hi"] raises TypeError when a client leaves out
        # a parameter whose default is None, and a client must never get a 500.
        try:
            check_all(checked)
        except ParamError:
            raise
        except (ValueError, TypeError) as exc:
            message = _sentence(str(exc)) or f"{self.name} cannot take these parameters together"
            raise ParamError(message) from exc


class AllowList:
    """The tasks a server starts; `title` heads the page's start section."""

    def __init__(self, tasks: Iterable[AllowedTask], *, title: str = "Start a task") -> None:
        self._tasks = {task.name: task for task in tasks}
        self.title = title

    def __contains__(self, name: object) -> bool:
        return name in self._tasks

    def __iter__(self) -> Iterator[AllowedTask]:
        return iter(self._tasks.values())

    def check(self, name: Any, args: Any, kwargs: Any) -> dict[str, Any]:
        if not isinstance(name, str) or name not in self._tasks:
            known = ", ".join(sorted(self._tasks)) or "none"
            raise ParamError(f"{name!r} is not a task this server starts (it starts: {known})")
        return self._tasks[name].check(args, kwargs)


def load(path: str) -> AllowList:
    """The AllowList named by "package.module:ATTRIBUTE" (PROGRESS_SSE_ALLOWLIST)."""
    from .config import ConfigError

    module_name, _, attribute = path.partition(":")
    try:
        # From the current directory too, as `celery -A myapp` finds the app: a user
        # runs `progress-sse web` from their project, where the console script's own
        # sys.path would not look.
        with cwd_in_path():
            value = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"PROGRESS_SSE_ALLOWLIST={path!r} cannot be loaded: {exc}") from None
    except Exception as exc:  # the module itself is broken: a SyntaxError, a misdeclared AllowedTask
        raise ConfigError(f"PROGRESS_SSE_ALLOWLIST={path!r} cannot be loaded: {type(exc).__name__}: {exc}") from exc
    if isinstance(value, AllowList):
        return value
    if isinstance(value, Iterable) and all(isinstance(t, AllowedTask) for t in value):
        return AllowList(value)
    raise ConfigError(f"PROGRESS_SSE_ALLOWLIST={path!r} is a {type(value).__name__}, not an AllowList")
