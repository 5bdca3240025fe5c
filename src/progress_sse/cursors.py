"""Cursors: where a client stands in the histories of the event log. Pure values.

Every event gets the next number `n` of its partition's sequence, and the
sequence belongs to an *epoch*: a random name given to one history of that
partition's log. A Redis that restarts without its data, a failover to a replica
that lagged, or an eviction loses the sequence, and its numbers start over; the
new history gets a new epoch. A cursor names both, so a number from a lost
history can never pass for a position in the new one (docs/protocol.md, "Cursors").

One Redis holds one partition, and its cursors are `<epoch>-<n>`. A Redis Cluster
spreads tasks over PARTITIONS (keys.py), each with its own sequence, so a stream
of many tasks stands somewhere in each of its tasks' partitions: its cursor is
`<digest>.<entry>.<entry>…`, one entry `<p><n>` (both base62) per partition and
a digest of their epochs (`composite`).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import os
import re
from collections.abc import Mapping
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


# Where a stream stands: a position in the history of each partition it follows.
Places = dict[int, Position]

# The cursor `0`: the start of whichever history is current, in every partition.
STARTS = Position("", 0)


@dataclass(frozen=True, slots=True)
class Sealed:
    """A composite cursor as a client sent it back: a number in each partition it
    lists, and the digest of the epochs they are numbers of. The reader, who knows
    the current epochs, tells whether it is a place in them (`opened`)."""

    digest: str
    numbers: tuple[tuple[int, int], ...]  # (partition, n), in partition order

    def opened(self, epochs: Mapping[int, str]) -> Places | None:
        """The places it names, if every partition it lists is still in the history
        its digest names; else None."""
        listed = {partition: epochs.get(partition, "") for partition, _ in self.numbers}
        if digest(listed) != self.digest:
            return None
        return {partition: Position(listed[partition], n) for partition, n in self.numbers}


Cursor = Position | Sealed | Foreign


def parse(raw: str | None, *, partitions: int = 1) -> Cursor | None:
    """A client's `Last-Event-ID`: None when it sent none; STARTS for `0`; else, in
    the form the server hands out for `partitions` (one Redis: a Position; a
    cluster: Sealed), or Foreign for anything else."""
    if raw is None:
        return None
    raw = raw.strip()
    if not raw:
        return None
    if raw == START:
        return STARTS  # `epoch` empty: every partition's current one, resolved by the reader
    if partitions > 1:
        sealed = _parse_composite(raw, partitions)
        return Foreign(raw[:64]) if sealed is None else sealed
    found = _CURSOR.fullmatch(raw)
    if found is None:
        return Foreign(raw[:64])
    return Position(found[1], int(found[2]))


# Composite cursors. Base62 keeps a number of 14 digits to 8 characters: with
# 12 partitions the longest cursor is then 8 + 12 * 10 = 128 bytes, the most a
# cross-origin EventSource reconnect may send without a preflight.
BASE62 = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
_DIGIT = {char: value for value, char in enumerate(BASE62)}
_COMPOSITE = re.compile(r"([a-z2-7]{8})((?:\.[0-9A-Za-z]{2,10})+)")
# The most a sequence reaches: the write script's numbers are Lua's doubles, exact
# up to 2^53 (worker/publisher.py), and a larger one could not even be read back.
MAX_N = 2**53


def base62(n: int) -> str:
    digits = ""
    while True:
        n, digit = divmod(n, 62)
        digits = BASE62[digit] + digits
        if not n:
            return digits


def composite(places: Mapping[int, Position], lead: int) -> str:
    """The cursor of a stream at `places`, sent with an event of partition `lead`:
    that partition's entry comes first (a client compares an event's own number
    with what it has seen of its task: static/progress.js `isAfter`), the others in
    partition order."""
    order = [lead, *sorted(p for p in places if p != lead)]
    entries = "".join(f".{BASE62[p]}{base62(places[p].n)}" for p in order)
    return digest({p: places[p].epoch for p in places}) + entries


def digest(epochs: Mapping[int, str]) -> str:
    """8 base32 characters naming the epochs of the partitions listed."""
    return _digest(tuple(sorted(epochs.items())))


@functools.lru_cache(maxsize=1024)
def _digest(epochs: tuple[tuple[int, str], ...]) -> str:
    text = ";".join(f"{partition}:{epoch}" for partition, epoch in epochs)
    return base64.b32encode(hashlib.blake2b(text.encode(), digest_size=5).digest()).decode().lower()


def _parse_composite(raw: str, partitions: int) -> Sealed | None:
    found = _COMPOSITE.fullmatch(raw)
    if found is None:
        return None
    numbers: dict[int, int] = {}
    for entry in found[2][1:].split("."):
        partition, n = _DIGIT[entry[0]], 0
        for char in entry[1:]:
            n = n * 62 + _DIGIT[char]
        if partition >= partitions or partition in numbers or (len(entry) > 2 and entry[1] == "0") or n > MAX_N:
            return None  # not one the server hands out
        numbers[partition] = n
    return Sealed(found[1], tuple(sorted(numbers.items())))


def parse_id(raw: str) -> Position:
    """A stored or published id, `<epoch>-<n>`: ValueError if it is not one."""
    found = _CURSOR.fullmatch(raw)
    if found is None:
        raise ValueError(f"not an event id: {raw[:40]!r}")
    return Position(found[1], int(found[2]))
