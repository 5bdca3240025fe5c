"""`web --workers N` with `--log-format json`: the group's output, one JSON object a line.

The supervisor (supervisor.py) shows each process's lines with its name in front,
`web.1 | {...}`, which no platform parses as JSON. `JsonLines` takes the place of
the supervisor's stdout and stderr: a process's JSON line is written as it came,
with the process's name added as `process`, and any other text (a line a process
printed, the supervisor's report of a process that exited) becomes a record of
its own, through the parent's JSON logging (json_logs.py).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable
from typing import Any, TextIO

from ..json_logs import fields

log = logging.getLogger(__name__)

# The supervisor's prefix: the process's name, padded to the longest name, then " | ".
_PREFIXED = re.compile(r"(?P<name>\S+) *\| (?P<line>.*)", re.S)


class JsonLines:
    """A text stream for `supervisor.run`'s `out` or `err`. The supervisor flushes
    after each line of a process (out) and each report (err): one flush, one line
    written to `stream`."""

    def __init__(self, stream: TextIO, names: Iterable[str] = (), level: int = logging.INFO) -> None:
        self._stream = stream
        self._names = frozenset(names)  # the processes whose prefixed lines to look for
        self._level = level  # of a record made from plain text
        self._pending: list[str] = []

    def write(self, text: str) -> int:
        self._pending.append(text)
        return len(text)

    def flush(self) -> None:
        text = "".join(self._pending).rstrip("\n")
        self._pending.clear()
        if not text:
            return
        match = _PREFIXED.fullmatch(text)
        if match is None or match["name"] not in self._names:
            log.log(self._level, "%s", text)
            return
        name, line = match["name"], match["line"]
        record = _json_object(line)
        if record is None:  # a plain line the process printed (web's "listening" line)
            log.log(self._level, "%s", line, extra=fields(process=name))
            return
        record.setdefault("process", name)
        self._stream.write(json.dumps(record) + "\n")
        self._stream.flush()


def _json_object(line: str) -> dict[str, Any] | None:
    if not line.startswith("{"):
        return None
    try:
        value = json.loads(line)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None
