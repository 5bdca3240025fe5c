"""Which tasks a web request may start, and with which parameters.

The web process never publishes a task name it did not list here. Each allowed
task declares its parameters, in order, with a checker; `check(args, kwargs)` binds
a request's args and kwargs to them the way Python would and returns the kwargs to
publish, or raises `ParamError` with a sentence a person can act on.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

Checker = Callable[[str, Any], Any]


class ParamError(ValueError):
    """The request's args or kwargs are not what the task accepts."""


def integer(minimum: int, maximum: int) -> Checker:
    def check(name: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamError(f"{name} must be a whole number from {minimum} to {maximum}, not {value!r}")
        if not minimum <= value <= maximum:
            raise ParamError(f"{name} must be from {minimum} to {maximum}, not {value}")
        return value

    return check


def number(minimum: float, maximum: float) -> Checker:
    def check(name: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ParamError(f"{name} must be a number from {minimum} to {maximum}, not {value!r}")
        if not minimum <= value <= maximum:
            raise ParamError(f"{name} must be from {minimum} to {maximum}, not {value}")
        return value

    return check


@dataclass(frozen=True)
class AllowedTask:
    """A startable task: its Celery name, its parameters (name -> (checker, default)),
    and an optional check across parameters (e.g. min <= max)."""

    name: str
    params: Mapping[str, tuple[Checker, Any]] = field(default_factory=dict)
    check_all: Callable[[dict[str, Any]], None] | None = None
    description: str = ""

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
            checked[key] = checker(key, bound[key]) if key in bound else default
        if self.check_all is not None:
            self.check_all(checked)
        return checked


class AllowList:
    def __init__(self, tasks: Iterable[AllowedTask]) -> None:
        self._tasks = {task.name: task for task in tasks}

    def __contains__(self, name: object) -> bool:
        return name in self._tasks

    def __iter__(self) -> Any:
        return iter(self._tasks.values())

    def check(self, name: Any, args: Any, kwargs: Any) -> dict[str, Any]:
        if not isinstance(name, str) or name not in self._tasks:
            known = ", ".join(sorted(self._tasks)) or "none"
            raise ParamError(f"{name!r} is not a task this server starts (it starts: {known})")
        return self._tasks[name].check(args, kwargs)
