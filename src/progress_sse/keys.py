"""Redis key and channel names.

Some keys are shared by the tasks of a partition: the history's sequence that
orders their events (and so lets one SSE cursor cover many tasks) and the task
indexes. The write script touches them with the task's own keys, so they must
share a slot with them. One Redis is one partition, and names start with `P:`. On
a Redis Cluster tasks are spread over PARTITIONS by their id, and the names of
partition `p` start with its hash tag `{P.p.k}` (`partition_tags`): each
partition is one slot, and the slots spread over the shards. What belongs to no task (workers, the running
index, groups) starts with `{P}` there (docs/protocol.md, "Redis layout").
"""

from __future__ import annotations

import functools
import re
import zlib
from dataclasses import dataclass, field

from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

# Celery ids are UUIDs, but apps may choose their own; this admits those while
# keeping out braces (hash tags), whitespace and anything unreasonably long.
TASK_ID_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.:@+=-]{0,199}"
_TASK_ID = re.compile(TASK_ID_PATTERN)


def is_task_id(value: str) -> bool:
    return _TASK_ID.fullmatch(value) is not None


# Partitions on a Redis Cluster: as many slots (so shards) as the event log can
# spread over. 12 spreads evenly over 2, 3, 4, 6 and 12 shards, and keeps the
# longest composite cursor within 128 bytes (cursors.py); docs/protocol.md,
# "Partitions", has the measurements.
CLUSTER_PARTITIONS = 12


@functools.lru_cache(maxsize=64)
def partition_tags(prefix: str) -> tuple[str, ...]:
    """The hash tags of the partitions: `P.<p>.<k>`, with `k` the first number that
    puts the tag's slot in the middle half of the p-th twelfth of the slots. A
    cluster made by `redis-cli --cluster create` gives its masters equal runs of
    slots, so with 2, 3, 4, 6 or 12 masters each serves as many partitions as
    the others (a tag hashed at random could put most of them on one master)."""
    band = REDIS_CLUSTER_HASH_SLOTS / CLUSTER_PARTITIONS
    tags = []
    for p in range(CLUSTER_PARTITIONS):
        low, high = (p + 0.25) * band, (p + 0.75) * band
        k = 0
        while not low <= key_slot(f"{prefix}.{p}.{k}".encode()) < high:
            k += 1
        tags.append(f"{prefix}.{p}.{k}")
    return tuple(tags)


@dataclass(frozen=True, slots=True)
class Keys:
    prefix: str = "progress-sse"
    # On a Redis Cluster names start with a hash tag: partition p's with
    # `{partition_tags(P)[p]}`, the rest with `{P}` (see the module's docstring).
    cluster: bool = False
    root: str = field(init=False, repr=False, compare=False)
    partitions: int = field(init=False, repr=False, compare=False)
    _roots: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.cluster:
            roots = tuple(f"{{{tag}}}" for tag in partition_tags(self.prefix))
            object.__setattr__(self, "root", f"{{{self.prefix}}}")
        else:
            roots = (self.prefix,)
            object.__setattr__(self, "root", self.prefix)
        object.__setattr__(self, "_roots", roots)
        object.__setattr__(self, "partitions", len(roots))

    def partition_of(self, task_id: str) -> int:
        """The partition whose sequence numbers the task's events: CRC-32 of its id
        (the same in every process, unlike Python's `hash`)."""
        return zlib.crc32(task_id.encode()) % self.partitions if self.partitions > 1 else 0

    def _task(self, task_id: str) -> str:
        return f"{self._roots[self.partition_of(task_id)]}:task:{{{task_id}}}"

    def state(self, task_id: str) -> str:
        """Hash: the task's latest event, its cursor and what is known of the task."""
        return f"{self._task(task_id)}:state"

    def state_key_parts(self, partition: int) -> tuple[str, str]:
        """A state key of the partition's tasks before and after the task id: for a
        script that reads the states of the ids it finds in an index (web/feed.py)."""
        return f"{self._roots[partition]}:task:{{", "}:state"

    def log(self, task_id: str) -> str:
        """Stream: every event of the task, entry id `<seq>-0`."""
        return f"{self._task(task_id)}:log"

    def channel(self, task_id: str) -> str:
        return f"{self._task(task_id)}:events"

    def task_of_channel(self, channel: str) -> str:
        start, end = channel.rfind("{"), channel.rfind("}")
        return channel[start + 1 : end]

    def group(self, group_id: str) -> str:
        """Set: the task ids of a Celery group, as their publisher sent them."""
        return f"{self.root}:group:{{{group_id}}}:members"

    def worker(self, hostname: str) -> str:
        """String with a TTL: present while the worker's parent process is alive."""
        return f"{self.root}:worker:{{{hostname}}}"

    @property
    def workers(self) -> str:
        """Set: hostnames that have sent a heartbeat; each counts as alive only while
        its `worker` key exists (reaper.live_workers prunes the rest)."""
        return f"{self.root}:workers"

    @property
    def running(self) -> str:
        """Hash: task id -> hostname of the worker running it."""
        return f"{self.root}:running"

    def history(self, partition: int = 0) -> str:
        """Hash: `epoch`, the name of the partition's current history, and `n`, the
        last number its sequence gave out (src/progress_sse/cursors.py). One key, so
        the two are lost together or not at all."""
        return f"{self._roots[partition]}:history"

    def recent(self, partition: int = 0) -> str:
        """Sorted set: the partition's task ids, scored by the time each was first seen."""
        return f"{self._roots[partition]}:recent"

    def control_channel(self, partition: int = 0) -> str:
        """Kept subscribed by the partition's subscriber, so its connection is never
        idle-empty (in the partition's slot: a sharded subscription is to one slot's node)."""
        return f"{self._roots[partition]}:hub"

    def feed_log(self, partition: int = 0) -> str:
        """Stream: the partition's entries of the all-tasks feed (web/feed.py), each
        under its event's own number (`<seq>-0`), capped at PROGRESS_SSE_FEED_MAX."""
        return f"{self._roots[partition]}:feed:log"

    def feed_channel(self, partition: int = 0) -> str:
        """Where the write script announces what it adds to the feed."""
        return f"{self._roots[partition]}:feed:events"

    def stats(self, partition: int = 0) -> str:
        """Hash: state -> how many events of that state the write script stored in
        the partition (GET /metrics' progress_sse_events_stored_total)."""
        return f"{self._roots[partition]}:stats"

    @property
    def notice(self) -> str:
        """String with a TTL: the latest broadcast notice (web/notices.py), in the first
        partition's slot, as the hub channel it is announced on."""
        return f"{self._roots[0]}:notice"

    def queued(self, partition: int = 0) -> str:
        """Sorted set: the partition's ids of tasks whose state is `queued`, scored by
        when they were queued (the write script keeps it; the reaper's queued rule reads it)."""
        return f"{self._roots[partition]}:queued"
