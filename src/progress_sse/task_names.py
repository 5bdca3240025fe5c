"""Which task names the all-tasks feed shows: the `name=` filter of `GET /feed`,
and the `feed` scope of a token (tokens.py), in one rule.

A pattern that ends with `.` is a prefix: `reports.` matches `reports.daily` and
`reports.pdf.render`, as Celery names tasks by module. Any other pattern is one
name, exactly. No patterns at all match every name.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

# Patterns per filter: a query string or a token with more is a mistake, not a need.
MAX_PATTERNS = 50
MAX_PATTERN_LENGTH = 200


class PatternError(ValueError):
    """A pattern that names no task: the reason is safe to show the client."""


def is_prefix(pattern: str) -> bool:
    return pattern.endswith(".")


def matches(pattern: str, name: str) -> bool:
    """A task of this name is one the pattern shows. Given another pattern as the
    name, whether every name that one shows, this one shows too (a prefix ends in
    a dot, so only a prefix can show what another prefix shows)."""
    return name.startswith(pattern) if is_prefix(pattern) else name == pattern


@dataclass(frozen=True, slots=True)
class NameFilter:
    patterns: tuple[str, ...] = ()

    @classmethod
    def parse(cls, values: Iterable[str]) -> NameFilter:
        """`name=a,b&name=c`: every pattern given, or PatternError saying what is wrong."""
        patterns: list[str] = []
        for value in values:
            for pattern in value.split(","):
                pattern = pattern.strip()
                if not pattern:
                    continue
                if len(pattern) > MAX_PATTERN_LENGTH or not pattern.isprintable() or pattern.startswith("."):
                    raise PatternError(f"{pattern[:40]!r} is not a task name or a prefix like 'reports.'")
                if pattern not in patterns:
                    patterns.append(pattern)
        if len(patterns) > MAX_PATTERNS:
            raise PatternError(f"At most {MAX_PATTERNS} task names or prefixes, not {len(patterns)}.")
        return cls(tuple(patterns))

    @property
    def everything(self) -> bool:
        return not self.patterns

    def match(self, name: str | None) -> bool:
        """A task of this name is on the feed (a task whose name is not known only
        on a feed of every task)."""
        if not self.patterns:
            return True
        return name is not None and any(matches(pattern, name) for pattern in self.patterns)

    def within(self, allowed: NameFilter) -> bool:
        """Everything this filter lets through, `allowed` lets through too."""
        if allowed.everything:
            return True
        if self.everything:
            return False
        return all(any(matches(grant, pattern) for grant in allowed.patterns) for pattern in self.patterns)

    def __str__(self) -> str:
        return ",".join(self.patterns) or "every task"
