"""Cursors: where a client stands in one history of the event log. Pure values.

Every event gets the next number `n` of one sequence, and the sequence belongs
to an *epoch*: a random name given to one history of the Redis event log. A
Redis that restarts without its data, a failover to a replica that lagged, or an
eviction loses the sequence, and its numbers start over; the new history gets a
new epoch. A cursor names both, `<epoch>-<n>`, so a number from a lost history
can never pass for a position in the new one (docs/protocol.md, "Cursors").
"""

from __future__ import annotations

import base64
import os
import re
from dataclasses import dataclass

# An epoch: 8 characters of RFC 4648 base32, lowercased (new_epoch): 40 random bits,
# so two histories of one deployment never share a name, in a header-safe alphabet
# with no `-`.
_CURSOR = re.compile(r"([a-z2-7]{8})-([0-9]{1,18})")
# The cursor `0`: the start of whichever history is current (replays a whole log).
START = "0"


def new_epoch() -> str:
    return base64.b32encode(os.urandom(5)).decode().lower()


@dataclass(frozen=True, slots=True)
class Position:
    """A place in one history: every event numbered up to `n` in `epoch`."""

    epoch: str
    n: int

    def __str__(self) -> str:
        return f"{self.epoch}-{self.n}"

    def covers(self, other: Position) -> bool:
        """Whether this position is at or after `other` in the same history."""
        return self.epoch == other.epoch and self.n >= other.n


@dataclass(frozen=True, slots=True)
class Foreign:
    """A cursor the server cannot honour: of another history, from before epochs,
    or not a cursor at all. The stream starts over from current states, after a
    `reset` frame that says so."""

    raw: str


Cursor = Position | Foreign


def parse(raw: str | None) -> Cursor | None:
    """A client's `Last-Event-ID`: None when it sent none, the start of the current
    history for `0`, else a Position, or Foreign for anything else."""
    if raw is None:
        return None
    raw = raw.strip()
    if not raw:
        return None
    if raw == START:
        return Position("", 0)  # `epoch` empty: resolved to the current one by the reader
    found = _CURSOR.fullmatch(raw)
    if found is None:
        return Foreign(raw[:64])
    return Position(found[1], int(found[2]))


def parse_id(raw: str) -> Position:
    """A stored or published id, `<epoch>-<n>`: ValueError if it is not one."""
    found = _CURSOR.fullmatch(raw)
    if found is None:
        raise ValueError(f"not an event id: {raw[:40]!r}")
    return Position(found[1], int(found[2]))
