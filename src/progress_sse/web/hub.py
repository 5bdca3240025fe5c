"""Web side: the one pub/sub connection of a process and the fan-out to watchers.

However many streams are open, the process holds one subscriber connection. A
task's channel is subscribed while at least one local watcher wants it, and
`watch()` returns only once Redis has confirmed the subscription, so a watcher
that reads history afterwards cannot miss an event published in between.

When the connection drops, the hub reconnects with backoff, subscribes again and
then tells every watcher to resync: the watcher reads the log from its position,
so nothing published while the connection was down is lost. A watcher whose
inbox passes its bytes (a slow client) sheds intermediate progress, and if state
changes alone overflow it, is told the same thing instead of holding an unbounded
backlog: the log is the buffer (see Watcher).

An idle watcher costs no Redis command at all; the hub pings only its own
connection, and only when it has heard nothing for a while.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import weakref
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from ..cursors import Position, parse_id
from ..events import Frame
from ..keys import Keys
from ..task_names import NameFilter
from . import metrics

log = logging.getLogger(__name__)


class Signal(enum.Enum):
    # Read the log from your position: live messages may be missing, or the history
    # may have changed (then the stream starts over from current states).
    RESYNC = "resync"
    CLOSE = "close"  # the server is shutting down
    # The stream has been quiet for a heartbeat, but its socket is not taking bytes
    # fast: write the ping the stream's own way, which lets go of a stalled client.
    PING = "ping"
    # A feed passed entries of names it does not show: its place may move past them
    # (FeedWatcher.passed), and its client's cursor with it.
    PASSED = "passed"


# Bytes: a frame that is no task's (a broadcast notice, web/notices.py), written as it is.
Item = Frame | Signal | bytes


def news(frame: Frame, at: dict[int, Position], waiting: Collection[str]) -> bool | None:
    """What a live frame is to a stream that stands at `at` (a place per partition)
    and waits for the tasks `waiting`: True, news to send (it moves the place);
    False, none (a task it no longer waits for, or at or before its place); None,
    of a history the stream has no place in, so only a read of where it stands
    can tell. The one rule for the hub's writes (Watcher) and the stream's loop
    (web/delivery.py Live.batches)."""
    if frame.task_id not in waiting:
        return False
    mine = at.get(frame.partition)
    if mine is None or frame.epoch != mine.epoch:
        return None
    return frame.seq > mine.n


class Direct:
    """What it takes to write a frame straight to an idle stream's socket, from the
    hub's dispatch, without waking the stream's task (web/delivery.py `Live`):
    its transport, how it writes frames (`variant`), the places it has had
    (`at`, the dict the stream itself keeps), the tasks it still waits for, and
    the time its token expires on the loop's clock.

    The frames of one turn of the event loop (a burst the hub reads in one go)
    are written together at its end (`_Flush`): one write per stream, not one
    per frame, however many came."""

    __slots__ = ("at", "chunks", "clock", "deadline", "flush", "high", "transport", "variant", "waiting")

    def __init__(
        self,
        transport: asyncio.Transport,
        variant: bool | None,
        at: dict[int, Position],
        waiting: Callable[[], Collection[str]],
        deadline: float,
    ) -> None:
        self.transport, self.variant, self.at, self.waiting = transport, variant, at, waiting
        self.deadline = deadline
        loop = asyncio.get_running_loop()
        self.clock = loop.time
        # Bytes waiting in the transport at which asyncio pauses the writer: above
        # them, the stream is under back-pressure, and its own loop writes.
        self.high = transport.get_write_buffer_limits()[1]
        self.chunks: list[bytes] | None = None  # written at the end of this turn of the loop
        self.flush = _flushes.setdefault(loop, _Flush(loop))

    def write(self, chunk: bytes) -> None:
        if self.chunks is None:
            self.chunks = [chunk]
            self.flush.add(self)
        else:
            self.chunks.append(chunk)


class _Flush:
    """The streams written to in this turn of an event loop, written once each at
    its end. Scheduled with call_soon when the first of them is: a stream's task
    woken later in the same turn runs after it, so it never overtakes these."""

    __slots__ = ("loop", "pending", "scheduled")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop, self.scheduled = loop, False
        self.pending: list[Direct] = []

    def add(self, direct: Direct) -> None:
        self.pending.append(direct)
        if not self.scheduled:
            self.scheduled = True
            self.loop.call_soon(self.run)

    def run(self) -> None:
        self.scheduled = False
        pending, self.pending = self.pending, []
        written: list[bytes] = []  # counted once per flush, not per frame (web/metrics.py)
        for direct in pending:
            chunks, direct.chunks = direct.chunks or [], None
            if not direct.transport.is_closing():
                direct.transport.write(chunks[0] if len(chunks) == 1 else b"".join(chunks))
                written += chunks
        metrics.flushed(len(written), sum(map(len, written)))


_flushes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Flush] = weakref.WeakKeyDictionary()


class Watcher:
    """One stream's inbox: frames in publish order, or a signal.

    The inbox is bounded in bytes (`limit`: the frames' encoded size), not in
    frames: a slow client's backlog costs at most that much memory, whatever the
    events weigh. When it would pass the bound, the `progress` frames waiting for a
    task collapse to that task's latest (a bar needs only where it is now); state
    changes and terminal events are never dropped. If those alone still pass the
    bound, the backlog is dropped for one RESYNC: the stream reads it back from
    the log, which is the buffer of last resort.
    """

    __slots__ = (
        "_bytes",
        "_held",
        "_held_bytes",
        "_items",
        "_limit",
        "_wakeup",
        "closed",
        "confirmed",
        "direct",
        "last_write",
        "task_ids",
    )

    def __init__(self, task_ids: Iterable[str], *, limit: int) -> None:
        self.task_ids = frozenset(task_ids)
        self.closed = False
        # Hub.generation just after this watcher was registered and its channels
        # confirmed: a read issued at or after it is one it may share (web/delivery.py).
        self.confirmed = 0
        # Set while the stream may be written straight to (Direct); when it last
        # wrote, on the loop's clock (the one heartbeat of web/delivery.py reads it).
        self.direct: Direct | None = None
        self.last_write = 0.0
        self._limit = limit
        # A list, not a deque: an empty deque weighs 600 bytes, and an inbox is
        # empty nearly always (frames go straight to the socket: Direct).
        self._items: list[Item] = []
        self._bytes = 0
        self._wakeup: asyncio.Future[None] | None = None
        # Partition -> its live frames kept aside while its subscription is restored.
        self._held: dict[int, list[Frame]] = {}
        self._held_bytes = 0

    def hold(self, partition: int = 0) -> None:
        """The subscription of `partition` dropped: keep its live frames aside until
        it resumes. Otherwise a frame published after the reconnect could move the
        stream past the events published while it was down, before it has read
        them from the log. (Positions are per partition: another partition's
        frames need not wait.)"""
        self._held.setdefault(partition, [])

    def resume(self, partition: int = 0) -> None:
        """Subscribed again: read the log first (RESYNC), then the frames held meanwhile."""
        held = self._held.pop(partition, None)
        if held is None:
            return
        self._held_bytes -= sum(len(frame.encoded) for frame in held)
        self.deliver(Signal.RESYNC)
        for frame in held:
            self.deliver(frame)

    @property
    def idle(self) -> bool:
        """The stream's task waits for the next item, with nothing waiting for it:
        it is not writing, so its socket may be written to from outside."""
        return not self._items and self._wakeup is not None and not self._wakeup.done()

    def deliver(self, item: Item) -> None:
        """Queue `item` for the stream's task; or, for a live frame that a stream
        written straight to can take as it is, write it now (`_write_direct`)."""
        if self.direct is not None and isinstance(item, Frame) and self.idle and self._write_direct(item):
            return
        if self._held and isinstance(item, Frame) and item.partition in self._held:
            if self._held_bytes >= self._limit:
                for frames in self._held.values():
                    frames.clear()  # the RESYNC each `resume` queues reads them from the log
                self._held_bytes = 0
            self._held[item.partition].append(item)
            self._held_bytes += len(item.encoded)
            return
        self._items.append(item)
        if isinstance(item, Frame):
            self._bytes += len(item.encoded)
            if self._bytes > self._limit:
                self._collapse()
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    def _write_direct(self, frame: Frame) -> bool:
        """Write `frame` straight to the idle stream's socket, or drop it as no news,
        as the stream's own loop would (web/delivery.py `Live.batches`): True when
        done. False leaves it to the loop: a frame of another history, a terminal
        one (the stream may end), a partition being resubscribed, a socket that
        is not taking bytes (back-pressure: the loop's write waits, and lets go
        of a stalled client), or a token that has expired."""
        direct = self.direct
        assert direct is not None
        if frame.terminal or frame.partition in self._held:
            return False
        verdict = news(frame, direct.at, direct.waiting())
        if verdict is None:
            return False
        if not verdict:
            return True  # no news to this stream
        transport = direct.transport
        now = direct.clock()
        if transport.is_closing() or transport.get_write_buffer_size() >= direct.high or now >= direct.deadline:
            return False
        direct.write(frame.chunk(direct.variant))
        direct.at[frame.partition] = frame.position  # type: ignore[assignment]  # it has an epoch
        self.last_write = now
        return True

    def _collapse(self) -> None:
        latest = {item.task_id: item for item in self._items if isinstance(item, Frame) and item.state == "progress"}
        kept = [
            item
            for item in self._items
            if not (isinstance(item, Frame) and item.state == "progress" and latest[item.task_id] is not item)
        ]
        self._items = kept
        self._bytes = sum(len(item.encoded) for item in kept if isinstance(item, Frame))
        if self._bytes > self._limit:  # state changes alone: read them back from the log
            notices = [item for item in kept if isinstance(item, bytes)]  # no log holds them
            self._items = [*notices, Signal.CLOSE if Signal.CLOSE in kept else Signal.RESYNC]
            self._bytes = 0

    @property
    def backlog(self) -> int:
        """Bytes of frames waiting."""
        return self._bytes

    def pending(self) -> list[Item]:
        """Every item already waiting, without waiting for more."""
        items, self._items = self._items, []
        self._bytes = 0
        return items

    def close(self) -> None:
        self.closed = True
        self._items.append(Signal.CLOSE)
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    async def next(self, timeout: float | None = None) -> Item | None:
        """The next item, or None after `timeout` seconds of silence (None: no
        timeout, and no timer)."""
        if not self._items:
            self._wakeup = asyncio.get_running_loop().create_future()
            try:
                if timeout is None:
                    await self._wakeup
                else:
                    async with asyncio.timeout(timeout):
                        await self._wakeup
            except TimeoutError:
                return None
            finally:
                self._wakeup = None
        item = self._items.pop(0)
        if isinstance(item, Frame):
            self._bytes -= len(item.encoded)
        return item


class FeedWatcher(Watcher):
    """The inbox of an all-tasks feed (web/feed.py): the hub's feed frames of the
    names it shows. The others take no room in it, but the feed passed them: it
    keeps where (`passed`, a place per partition), and PASS_EVERY seconds after
    the first it passed tells its stream (Signal.PASSED), which moves its place
    and its client's cursor past all it passed by then. Otherwise a narrow filter
    on a busy service would keep a place so far back that the capped log no
    longer reaches it (a reset for nothing, after any reconnect)."""

    __slots__ = ("_timer", "floor", "names", "passed")

    PASS_EVERY = 1.0

    def __init__(self, names: NameFilter, *, limit: int) -> None:
        super().__init__((), limit=limit)
        self.names = names
        self.passed: dict[int, Position] = {}
        # Per partition, a number below which every entry it shows has left its
        # inbox: entries trimmed from the log below it were none it still needs
        # (web/feed.py reads it when the log was trimmed past the stream's place).
        self.floor: dict[int, Position] = {}
        self._timer: asyncio.TimerHandle | None = None

    def deliver(self, item: Item) -> None:
        if isinstance(item, Frame) and not self.names.match(item.name):
            if item.position is not None:
                self.passed[item.partition] = item.position
                if not self._items:
                    self.floor[item.partition] = item.position
                if self._timer is None and not self.closed:
                    self._timer = asyncio.get_running_loop().call_later(self.PASS_EVERY, self._tell)
            return
        super().deliver(item)

    def _tell(self) -> None:
        self._timer = None
        if not self.closed:
            super().deliver(Signal.PASSED)

    def take_passed(self) -> dict[int, Position]:
        passed, self.passed = self.passed, {}
        return passed


class _Channel:
    __slots__ = ("ready", "watchers")

    def __init__(self) -> None:
        self.watchers: set[Watcher] = set()
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()


class HubUnavailable(Exception):
    """Redis did not confirm a subscription in time."""


class Hub:
    """The subscriber of one partition's channels (one Redis is one partition)."""

    def __init__(
        self,
        client: aioredis.Redis,
        keys: Keys,
        *,
        buffer: int = 256 * 1024,
        subscribe_timeout: float = 10.0,
        idle_ping: float = 30.0,
        backoff: tuple[float, float] = (0.05, 5.0),
        new_epoch: Callable[[str], Awaitable[str]] | None = None,
        sharded: bool = False,
        partition: int = 0,
        on_control: Callable[[str], None] | None = None,
        on_reconnect: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        # `client` must not retry on its own: redis-py's pub/sub would reconnect
        # and resubscribe silently, and the messages in between would be lost.
        self._client = client
        # Sharded pub/sub (a cluster: SSUBSCRIBE, which only the slot's nodes carry).
        # A `sunsubscribe` we did not ask for says the slot left this node.
        self._sharded = sharded
        self._dropping: Counter[str] = Counter()  # sunsubscribes asked for, not yet answered
        self._keys = keys
        self.partition = partition
        self._feed = keys.feed_channel(partition)
        # What is published on the partition's control channel (a notice, on the
        # first partition's: web/notices.py) goes to `on_control`.
        self._control = keys.control_channel(partition)
        self._on_control = on_control
        # Run once subscribed again after a drop: what was published meanwhile on
        # the control channel is lost to pub/sub (a notice's is kept: web/notices.py).
        self._on_reconnect = on_reconnect
        self._buffer = buffer
        self._subscribe_timeout = subscribe_timeout
        self._idle_ping = idle_ping
        self._backoff = backoff
        # Renames a history whose sequence went back (Store.new_epoch).
        self._new_epoch = new_epoch
        self._last: Position | None = None  # the last message's number
        self._channels: dict[str, _Channel] = {}
        self._watchers: set[Watcher] = set()
        self._active: set[str] = set()  # SUBSCRIBE sent on this connection, not undone
        self._unconfirmed: Counter[str] = Counter()
        self._dirty = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._closing = False
        self._pubsub: Any = None
        self._resync: asyncio.Task[None] | None = None
        self.connections = 0  # how many times the subscriber connected (tests read it)
        # Since the subscriber lost its connection, until it has it back: a new
        # watcher of a channel not subscribed yet is refused at once, not after
        # `subscribe_timeout` (its stream is told to retry later).
        self.down = False
        # Counts watchers registered and subscribed: a read issued when it stood at N
        # covers the watchers up to N (web/delivery.py shares such reads).
        self.generation = 0

    async def start(self) -> None:
        self._runner = asyncio.create_task(self._run(), name="progress-sse hub")
        self._runner.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("progress-sse hub stopped", exc_info=task.exception())

    @property
    def running(self) -> bool:
        return self._runner is not None and not self._runner.done()

    async def close(self) -> None:
        self._closing = True
        self.close_watchers()
        for task in [self._runner, *self._background]:
            if task is not None:
                task.cancel()
        if self._runner is not None:
            _, pending = await asyncio.wait({self._runner}, timeout=1)
            if pending and self._pubsub is not None:
                # redis-py can lose a cancellation that lands mid-read; a closed
                # connection ends the read for certain.
                with contextlib.suppress(Exception):
                    await self._pubsub.aclose()
        for task in [self._runner, *self._background]:
            if task is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._runner = None

    def _spawn(self, coro: Any) -> asyncio.Task[None]:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    def close_watchers(self) -> None:
        """End every open stream (on shutdown); clients resume elsewhere with their cursor."""
        for watcher in list(self._watchers):
            watcher.close()

    def feed_watcher(self, names: NameFilter) -> FeedWatcher:
        return FeedWatcher(names, limit=self._buffer)

    @property
    def watchers(self) -> frozenset[Watcher]:
        return frozenset(self._watchers)

    @property
    def watcher_count(self) -> int:
        return len(self._watchers)

    @property
    def subscribed_tasks(self) -> set[str]:
        return {self._keys.task_of_channel(c) for c in self._channels if c != self._feed}

    @contextlib.asynccontextmanager
    async def watch(
        self, task_ids: Iterable[str], watcher: Watcher | None = None, *, feed: bool = False
    ) -> AsyncIterator[Watcher]:
        """A watcher of `task_ids`, subscribed; or, given `watcher` (a stream whose
        tasks are in several partitions: Hubs), that one, for these of its tasks.
        With `feed`, `watcher` takes the partition's all-tasks feed instead."""
        task_ids = frozenset(task_ids)
        watcher = watcher or Watcher(task_ids, limit=self._buffer)
        channels = [self._feed] if feed else [self._keys.channel(t) for t in task_ids]
        self._watchers.add(watcher)
        for name in channels:
            channel = self._channels.get(name)
            if channel is None:
                channel = self._channels[name] = _Channel()
                metrics.HUB_SUBSCRIPTIONS.inc()
            channel.watchers.add(watcher)
        self._dirty.set()
        try:
            if self.down and not all(self._channels[name].ready.done() for name in channels):
                raise HubUnavailable("the subscriber connection to Redis is down")
            try:
                async with asyncio.timeout(self._subscribe_timeout):
                    for name in channels:
                        await asyncio.shield(self._channels[name].ready)
            except TimeoutError:
                raise HubUnavailable("Redis did not confirm the subscription in time") from None
            # A read issued from here on covers this watcher (web/delivery.py SharedReads).
            self.generation += 1
            watcher.confirmed = self.generation
            yield watcher
        finally:
            self._watchers.discard(watcher)
            for name in channels:
                channel = self._channels.get(name)
                if channel is not None:
                    channel.watchers.discard(watcher)
                    if not channel.watchers:
                        del self._channels[name]
                        metrics.HUB_SUBSCRIPTIONS.dec()
                        if not channel.ready.done():
                            channel.ready.cancel()
            self._dirty.set()

    async def _run(self) -> None:
        delay = self._backoff[0]
        first = True
        while not self._closing:
            pubsub = self._client.pubsub()
            syncer: asyncio.Task[None] | None = None
            try:
                self._pubsub = pubsub
                await self._subscribe(pubsub, self._keys.control_channel(self.partition))
                if self._closing:  # the cancellation may have been lost in redis-py's connect
                    return
                self.connections += 1
                metrics.HUB_CONNECTS.inc()
                self.down = False
                delay = self._backoff[0]
                self._active.clear()
                self._unconfirmed.clear()
                self._dropping.clear()
                syncer = asyncio.create_task(self._sync(pubsub))
                self._dirty.set()
                if not first:
                    self._resync = self._spawn(self._resync_all())
                    if self._on_reconnect is not None:
                        self._spawn(self._on_reconnect())
                first = False
                await self._read(pubsub)
            except (RedisError, OSError) as exc:
                # redis-py may turn a cancellation that lands mid-read into a
                # ConnectionError; a hub that is closing must not take that for an outage.
                if self._closing or _cancelling():
                    raise asyncio.CancelledError from exc
                log.warning("progress-sse lost its Redis subscription (%s); reconnecting in %.2fs", exc, delay)
            finally:
                if syncer is not None:
                    syncer.cancel()
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
            self.down = True
            if self._resync is not None:
                self._resync.cancel()  # it belonged to the connection that just dropped
            for watcher in self._watchers:
                watcher.hold(self.partition)
            # New watchers must wait for the next connection's confirmation.
            for channel in self._channels.values():
                if channel.ready.done():
                    channel.ready = asyncio.get_running_loop().create_future()
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._backoff[1])

    async def _read(self, pubsub: Any) -> None:
        awaiting_pong = False
        while True:
            message = await pubsub.get_message(timeout=self._idle_ping)
            if message is None:
                if awaiting_pong:
                    raise ConnectionError("the subscriber connection stopped answering")
                await pubsub.ping()
                awaiting_pong = True
                continue
            awaiting_pong = False
            kind = message["type"]
            if kind in ("message", "smessage"):
                self._dispatch(message["channel"], message["data"])
            elif kind in ("subscribe", "ssubscribe"):
                self._confirmed(message["channel"])
            elif kind == "sunsubscribe" and message["channel"] not in self._dropping:
                raise ConnectionError(f"the slot of {message['channel']} left this node")
            elif kind == "sunsubscribe":
                self._dropping[message["channel"]] -= 1
                if self._dropping[message["channel"]] <= 0:
                    del self._dropping[message["channel"]]

    def _dispatch(self, name: str, data: str) -> None:
        if name == self._control:
            if self._on_control is not None:
                self._on_control(data)
            return
        feed = name == self._feed
        try:
            if feed:  # the write script announces a feed entry right after its task's event
                id, state, task_id, task_name, payload = data.split("\n", 4)
            else:
                id, state, payload = data.split("\n", 2)
                task_id, task_name = self._keys.task_of_channel(name), None
            position = parse_id(id)
        except ValueError:
            # Not ours (someone PUBLISHed by hand): drop it, never let it stop the hub.
            log.warning("progress-sse ignored a malformed message on %s: %.80r", name, data)
            return
        metrics.received(state, feed)
        self._follow(position, again=feed)
        channel = self._channels.get(name)
        if channel is None:
            return  # unsubscribed meanwhile
        frame = Frame(task_id, position.n, state, payload, position.epoch, self.partition, name=task_name or None)
        for watcher in channel.watchers:
            watcher.deliver(frame)

    def _follow(self, position: Position, *, again: bool = False) -> None:
        """Messages come in the order their numbers were given out (`again`: a feed
        entry, which may repeat the number its task's event just had). One of another
        history, or numbered at or below the last one heard, means the history was
        lost (a restart without data, a failover to a replica that lagged): every
        stream then reads where it stands, and starts over if its history is gone.
        A sequence that went back first gets a new epoch, so that no cursor handed
        out before can pass for a position in what follows."""
        last, self._last = self._last, position
        if last is None or (position.epoch == last.epoch and (position.n > last.n or (again and position.n == last.n))):
            return
        log.warning("progress-sse: the event history changed (%s after %s): streams start over", position, last)
        if position.epoch == last.epoch and self._new_epoch is not None:
            self._spawn(self._renamed(self._new_epoch(position.epoch)))
        else:
            self._resync_every()

    async def _renamed(self, renaming: Awaitable[str]) -> None:
        try:
            await renaming
        except (RedisError, OSError) as exc:  # the streams' own reads try again
            log.warning("progress-sse could not give the event history a new epoch: %s", exc)
        self._resync_every()

    def _resync_every(self) -> None:
        for watcher in list(self._watchers):
            watcher.deliver(Signal.RESYNC)

    def _confirmed(self, name: str) -> None:
        self._unconfirmed[name] -= 1
        if self._unconfirmed[name] <= 0:
            del self._unconfirmed[name]
            channel = self._channels.get(name)
            if channel is not None and name in self._active and not channel.ready.done():
                self._ready(channel)

    def _ready(self, channel: _Channel) -> None:
        channel.ready.set_result(None)

    async def _sync(self, pubsub: Any) -> None:
        """Make the connection's subscriptions match what watchers want. One coroutine
        sends every SUBSCRIBE/UNSUBSCRIBE, so they reach Redis in the order decided."""
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            try:
                await self._apply(pubsub)
            except (RedisError, OSError) as exc:
                # The reader sees the same broken connection and reconnects.
                log.debug("progress-sse could not change subscriptions: %s", exc)
                return

    async def _apply(self, pubsub: Any) -> None:
        wanted = set(self._channels)
        add, drop = wanted - self._active, self._active - wanted
        self._active = wanted
        for name in add:
            self._unconfirmed[name] += 1
        # A channel given up and wanted again before we ran is still subscribed.
        for name in wanted - add:
            channel = self._channels[name]
            if not self._unconfirmed[name] and not channel.ready.done():
                self._ready(channel)
        if add:
            await self._subscribe(pubsub, *add)
        if drop:
            if self._sharded:
                self._dropping.update(drop)  # Counter: one more answer due per channel
                await pubsub.sunsubscribe(*drop)
            else:
                await pubsub.unsubscribe(*drop)

    async def _subscribe(self, pubsub: Any, *channels: str) -> None:
        if self._sharded:
            await pubsub.ssubscribe(*channels)
        else:
            await pubsub.subscribe(*channels)

    async def _resync_all(self) -> None:
        """After a reconnect: once every channel is confirmed again, each watcher reads
        what it missed from the log, then gets what was held meanwhile. If some channel
        is still unconfirmed after the timeout, resume anyway: a silent stream is worse."""
        waiting = [channel.ready for channel in self._channels.values()]
        if waiting:
            await asyncio.wait(waiting, timeout=self._subscribe_timeout)
        for watcher in list(self._watchers):
            watcher.resume(self.partition)


def _cancelling() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


class Hubs:
    """The hubs of every partition, as one: a stream of tasks in several partitions
    (on a cluster) has one watcher, subscribed through each of their hubs. Each hub
    holds its own sharded subscription, to the master of its partition's slot, and
    follows that slot by itself; a process holds at most one per partition,
    however many streams it serves."""

    def __init__(self, hubs: list[Hub], keys: Keys, *, buffer: int = 256 * 1024) -> None:
        self.hubs, self._keys, self._buffer = hubs, keys, buffer
        # Counts watchers registered and subscribed in every hub they need: a read
        # issued when it stood at N covers the watchers up to N (web/delivery.py).
        self.generation = 0

    async def start(self) -> None:
        for hub in self.hubs:
            await hub.start()

    async def close(self) -> None:
        await asyncio.gather(*(hub.close() for hub in self.hubs))

    def close_watchers(self) -> None:
        for hub in self.hubs:
            hub.close_watchers()

    def feed_watcher(self, names: NameFilter) -> FeedWatcher:
        return self.hubs[0].feed_watcher(names)  # one watcher, subscribed through every hub

    @property
    def running(self) -> bool:
        return all(hub.running for hub in self.hubs)

    @property
    def watcher_count(self) -> int:
        return len(frozenset().union(*(hub.watchers for hub in self.hubs)))

    @property
    def subscribed_tasks(self) -> set[str]:
        return {task for hub in self.hubs for task in hub.subscribed_tasks}

    @property
    def connections(self) -> int:
        return sum(hub.connections for hub in self.hubs)

    @contextlib.asynccontextmanager
    async def watch(
        self, task_ids: Iterable[str], watcher: Watcher | None = None, *, feed: bool = False
    ) -> AsyncIterator[Watcher]:
        watcher = watcher or Watcher(task_ids, limit=self._buffer)
        by_partition: dict[int, list[str]] = {}
        for task_id in watcher.task_ids:
            by_partition.setdefault(self._keys.partition_of(task_id), []).append(task_id)
        if feed:  # every partition's feed
            by_partition = {p: [] for p in range(len(self.hubs))}
        async with contextlib.AsyncExitStack() as watching:
            for partition, ids in sorted(by_partition.items()):
                await watching.enter_async_context(self.hubs[partition].watch(ids, watcher, feed=feed))
            self.generation += 1
            watcher.confirmed = self.generation
            yield watcher
