"""Which tasks a web request may start, and with which parameters.

The web process never publishes a task name it did not list here. Each allowed
task declares its parameters, in order, with a checker; `check(args, kwargs)` binds
a request's args and kwargs to them the way Python would and returns the kwargs to
publish, or raises `ParamError` with a sentence a person can act on.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

Checker = Callable[[str, Any], Any]


class ParamError(ValueError):
    """The request's args or kwargs are not what the task accepts."""


@dataclass(frozen=True)
class Range:
    """A numeric parameter check that can also describe itself (the page renders
    its inputs from it)."""

    kind: str  # "integer" or "number"
    minimum: float
    maximum: float

    def __call__(self, name: str, value: Any) -> Any:
        whole = self.kind == "integer"
        if whole:
            ok_type = isinstance(value, int)
        else:  # math.isfinite would overflow on a huge int: only floats can be inf/nan
            ok_type = isinstance(value, int) or (isinstance(value, float) and math.isfinite(value))
        if isinstance(value, bool) or not ok_type:
            what = "a whole number" if whole else "a number"
            raise ParamError(f"{name} must be {what} from {self.minimum} to {self.maximum}, not {value!r}")
        if not self.minimum <= value <= self.maximum:
            raise ParamError(f"{name} must be from {self.minimum} to {self.maximum}, not {value}")
        return value


def integer(minimum: int, maximum: int) -> Range:
    return Range("integer", minimum, maximum)


def number(minimum: float, maximum: float) -> Range:
    return Range("number", minimum, maximum)


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


def load(path: str) -> AllowList:
    """The AllowList named by "package.module:ATTRIBUTE" (PROGRESS_SSE_ALLOWLIST)."""
    from .config import ConfigError

    module_name, _, attribute = path.partition(":")
    try:
        value = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"PROGRESS_SSE_ALLOWLIST={path!r} cannot be loaded: {exc}") from None
    if isinstance(value, AllowList):
        return value
    if isinstance(value, Iterable) and all(isinstance(t, AllowedTask) for t in value):
        return AllowList(value)
    raise ConfigError(f"PROGRESS_SSE_ALLOWLIST={path!r} is a {type(value).__name__}, not an AllowList")
