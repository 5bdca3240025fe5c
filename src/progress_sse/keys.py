"""Redis key and channel names.

Some keys are shared by all tasks: the history's sequence that orders every event
(and so lets one SSE cursor cover many tasks) and the task indexes. The write
script touches them with the task's own keys, so on a Redis Cluster every name
starts with the prefix as its hash tag, `{P}:…`, and all share one slot
(docs/protocol.md, "Redis layout"); elsewhere names start with `P:`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

# Celery ids are UUIDs, but apps may choose their own; this admits those while
# keeping out braces (hash tags), whitespace and anything unreasonably long.
TASK_ID_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.:@+=-]{0,199}"
_TASK_ID = re.compile(TASK_ID_PATTERN)


def is_task_id(value: str) -> bool:
    return _TASK_ID.fullmatch(value) is not None


@dataclass(frozen=True, slots=True)
class Keys:
    prefix: str = "progress-sse"
    # On a Redis Cluster every name starts with the prefix as a hash tag, `{P}:…`,
    # so all keys and channels share one slot: the write script's keys must, and
    # the web's reads and its one sharded subscription then need one node.
    cluster: bool = False
    root: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", f"{{{self.prefix}}}" if self.cluster else self.prefix)

    def state(self, task_id: str) -> str:
        """Hash: the task's latest event, its cursor and what is known of the task."""
        return f"{self.root}:task:{{{task_id}}}:state"

    def log(self, task_id: str) -> str:
        """Stream: every event of the task, entry id `<seq>-0`."""
        return f"{self.root}:task:{{{task_id}}}:log"

    def channel(self, task_id: str) -> str:
        return f"{self.root}:task:{{{task_id}}}:events"

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

    @property
    def history(self) -> str:
        """Hash: `epoch`, the name of the event log's current history, and `n`, the
        last number its sequence gave out (src/progress_sse/cursors.py). One key, so
        the two are lost together or not at all."""
        return f"{self.root}:history"

    @property
    def recent(self) -> str:
        """Sorted set: task id scored by the time it was first seen."""
        return f"{self.root}:recent"

    @property
    def control_channel(self) -> str:
        """Kept subscribed by the web process so its pub/sub connection is never idle-empty."""
        return f"{self.root}:hub"

    @property
    def queued(self) -> str:
        """Sorted set: ids of the tasks whose state is `queued`, scored by when they
        were queued (the write script keeps it; the reaper's queued rule reads it)."""
        return f"{self.root}:queued"
