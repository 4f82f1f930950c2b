"""Ordered lanes of work that talk to the outside world (outgoing webhooks, outbound messages).

A lane is a queue of items that must go out one at a time, in order (an endpoint's deliveries of
one conversation; a conversation's messages). Lanes belong to a group (an endpoint, a channel)
that bounds how many of its lanes are in flight. A lane is in one state:

    idle -> ready (its head can go) -> busy (its head is out) -> ready / waiting / dormant / gone
    waiting: its head waits for a time (a retry, a rate limit), on the timer wheel
    dormant: its group is switched off (endpoint disabled, channel paused) until woken

Items come from Postgres (reloaded after an assignment) and from the agent that created them, so
`add` ignores an id it holds already, and, while a reload reads, one that finished meanwhile.
`GroupCommit` stores the outcomes of many concurrent attempts in one transaction.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Hashable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

import asyncpg
import faust

from agents import batching
from agents.scheduler import owned_partitions
from domain.timer_wheel import TimerWheel

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")
LaneKey = tuple[str, str]  # (group, lane)


async def retry_forever(call: Callable[[], Awaitable[R]], what: str) -> R:
    """Retry a Postgres call until it passes: an outcome must not be lost (logged each time)."""
    delay = 0.05
    while True:
        try:
            return await call()
        except Exception as exc:  # noqa: BLE001 - keep trying; nothing moves on meanwhile
            log.warning("%s failed (%s: %s); retrying in %.2fs", what, type(exc).__name__, exc, delay)
            await asyncio.sleep(delay)  # backoff between retries, not synchronisation
            delay = min(delay * 2, 5.0)


@dataclass
class Lane(Generic[T]):
    """One lane's items in order (seq, id, item); the head goes next."""

    partition: int
    queue: list[tuple[int, Hashable, T]] = field(default_factory=list)
    state: str = "idle"  # idle | ready | busy | waiting | dormant


class Lanes(Generic[T]):
    """Every lane of this worker's partitions, the ready ones per group, the waiting ones on a wheel."""

    def __init__(self) -> None:
        self.lanes: dict[LaneKey, Lane[T]] = {}
        self.known: set[Hashable] = set()  # item ids held in a lane
        self.ready: dict[str, deque[LaneKey]] = {}
        self.wheel: TimerWheel[LaneKey] = TimerWheel(int(time.time() * 1000))
        self.finished: set[Hashable] | None = None  # ids finished while a reload reads

    def add(
        self, key: LaneKey, partition: int, seq: int, item_id: Hashable, item: T, due_ms: int | None
    ) -> bool:
        """Queue an item in its lane (by seq); a lane that was idle becomes ready, or waits until
        `due_ms` if that is later than now. False if the item was known already."""
        if item_id in self.known or (self.finished is not None and item_id in self.finished):
            return False
        self.known.add(item_id)
        lane = self.lanes.get(key)
        if lane is None:
            lane = self.lanes[key] = Lane(partition)
        bisect.insort(lane.queue, (seq, item_id, item), key=lambda entry: (entry[0], str(entry[1])))
        if lane.state == "idle":
            now = int(time.time() * 1000)
            if due_ms is not None and due_ms > now:
                self.wait(key, due_ms)
            else:
                self.make_ready(key)
        return True

    def make_ready(self, key: LaneKey) -> None:
        """The lane's head can go now."""
        lane = self.lanes[key]
        lane.state = "ready"
        self.ready.setdefault(key[0], deque()).append(key)

    def make_ready_first(self, key: LaneKey) -> None:
        """Back to the front of its group's ready queue (taken, but the group had no room)."""
        lane = self.lanes[key]
        lane.state = "ready"
        self.ready.setdefault(key[0], deque()).appendleft(key)

    def wait(self, key: LaneKey, due_ms: int) -> None:
        """The lane's head waits until due_ms."""
        self.lanes[key].state = "waiting"
        self.wheel.schedule(key, due_ms)

    def sleep(self, key: LaneKey) -> None:
        """The lane waits for its group to be switched on again (see wake_group)."""
        self.lanes[key].state = "dormant"

    def wake_group(self, group: str) -> None:
        """Dormant lanes of a group go again."""
        for key, lane in self.lanes.items():
            if key[0] == group and lane.state == "dormant":
                self.make_ready(key)

    def due(self, now_ms: int) -> None:
        """Waiting lanes whose time came become ready."""
        for key, _ in self.wheel.pop_due(now_ms):
            lane = self.lanes.get(key)
            if lane is not None and lane.state == "waiting":
                self.make_ready(key)

    def next_due_ms(self) -> int | None:
        return self.wheel.next_due_ms()

    def take(self, group: str) -> Iterator[tuple[LaneKey, T]]:
        """Ready lanes of a group, each marked busy as it is yielded (stop early to leave the rest)."""
        queue = self.ready.get(group)
        while queue:
            key = queue.popleft()
            lane = self.lanes.get(key)
            if lane is None or lane.state != "ready" or not lane.queue:
                continue
            lane.state = "busy"
            yield key, lane.queue[0][2]

    def groups(self) -> list[str]:
        return [group for group, queue in self.ready.items() if queue]

    def replace_head(self, key: LaneKey, item: T) -> None:
        """The head after an attempt that did not finish it."""
        seq, item_id, _ = self.lanes[key].queue[0]
        self.lanes[key].queue[0] = (seq, item_id, item)

    def finish_head(self, key: LaneKey) -> None:
        """The head is done (sent, or given up): the next item, if any, is ready."""
        lane = self.lanes.get(key)
        if lane is None:
            return
        _, item_id, _ = lane.queue.pop(0)
        self.known.discard(item_id)
        if self.finished is not None:
            self.finished.add(item_id)
        if lane.queue:
            self.make_ready(key)
        else:
            del self.lanes[key]

    def drop(self, key: LaneKey) -> None:
        """Forget a lane (its group was deleted, or its partition moved to another worker)."""
        lane = self.lanes.pop(key, None)
        if lane is None:
            return
        for _, item_id, _ in lane.queue:
            self.known.discard(item_id)
        self.wheel.cancel(key)

    def of_partitions(self, partitions: set[int]) -> list[LaneKey]:
        return [key for key, lane in self.lanes.items() if lane.partition in partitions]

    def states(self) -> Iterable[tuple[LaneKey, Lane[T]]]:
        return list(self.lanes.items())


class LaneEngine(Generic[T]):
    """The part of an engine (webhook Dispatcher, message Sender) that is about partitions: open
    work is reloaded from Postgres after an assignment or a NOTIFY, and dropped on revocation.
    Subclasses give `open_work` (the query) and `add` (how an item joins its lane)."""

    def __init__(self) -> None:
        self.lanes: Lanes[T] = Lanes()
        self.busy: dict[LaneKey, asyncio.Task[None]] = {}  # lanes whose head is out now
        # The partitions assigned to this worker, from the assignment until the revocation
        # starts (work handed over in-process is taken only for these; see Sender.take_local).
        self.held: set[int] = set()
        self._reloading = asyncio.Lock()
        # An operator's pause (POST /v1/admin/pause): no request is started; those out finish.
        self.paused = False

    @property
    def pending(self) -> int:
        return len(self.lanes.known)

    async def open_work(self, partitions: set[int]) -> list[T]:
        raise NotImplementedError

    def add(self, items: Iterable[T]) -> None:
        raise NotImplementedError

    async def reload(self, partitions: Iterable[int]) -> int:
        """Add the open work Postgres has for these partitions; returns how many were new here.
        What finishes while the query runs is not taken back in (see Lanes.finished)."""
        wanted = set(partitions)
        if not wanted:
            return 0
        async with self._reloading:
            before = self.pending
            self.lanes.finished = set()
            try:
                self.add(await self.open_work(wanted))
            finally:
                self.lanes.finished = None
            return self.pending - before

    async def revoke(self, partitions: set[int]) -> None:
        """Another worker owns these from now on: cancel the requests in flight (an old attempt
        must not land after the new owner's next one; one that had left is in doubt for it) and
        forget the lanes."""
        self.held -= partitions
        keys = self.lanes.of_partitions(partitions)
        tasks = [self.busy[key] for key in keys if key in self.busy]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for key in keys:
            self.lanes.drop(key)


class GroupCommit(Generic[R]):
    """Many concurrent attempts hand their outcome here; one transaction stores all that queued
    up meanwhile, and each `store` returns once its outcome is in Postgres."""

    def __init__(self, write: Callable[[list[R]], Awaitable[Any]], what: str) -> None:
        self.write = write
        self.what = what
        self._queue: list[tuple[R, asyncio.Future[None]]] = []
        self._ready = asyncio.Event()

    async def store(self, item: R) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append((item, fut))
        self._ready.set()
        await fut

    async def run(self) -> None:
        while True:
            await self._ready.wait()
            batch, self._queue = self._queue, []
            self._ready.clear()
            items = [item for item, _ in batch]

            async def write(items: list[R] = items) -> None:
                await self.write(items)

            await retry_forever(write, f"{self.what}: storing {len(items)}")
            for _, fut in batch:
                if not fut.done():
                    fut.set_result(None)


class Engine(Protocol):
    """What a LaneAgent drives: the lanes of the partitions this worker holds."""

    held: set[int]

    async def reload(self, partitions: Iterable[int]) -> int: ...

    async def revoke(self, partitions: set[int]) -> None: ...

    async def run(self) -> None: ...


class LaneAgent:
    """What the webhook and the send agents share around their engine (Dispatcher, Sender):

    - a Faust agent on `topic` whose records name work for the engine (`handle`, given batches
      of Faust Messages by agents/batching.py, acked once handled; the work itself is already in
      Postgres);
    - after an assignment, the engine reloads the new partitions' open work from Postgres; before
      a revocation completes, it stops (cancelling requests in flight) and forgets them;
    - a LISTEN connection for the NOTIFY channels in `listeners()`; after every (re)connect
      `connected()` runs, so nothing announced while it was down is missed;
    - the HTTP client is opened before the engine runs and closed after.
    """

    name = "lanes"

    def __init__(
        self,
        app: faust.App,
        settings: Any,
        topic: faust.TopicT,
        engine: Engine,
        http: Any,
        on_fatal: Callable[[BaseException], None],
        *,
        linger: float,
    ) -> None:
        self.app = app
        self.settings = settings
        self.topic = topic
        self.engine = engine
        self.http = http
        self.on_fatal = on_fatal
        self.linger = linger

    def register(self) -> None:
        """Attach the agent, the engine, the listener and the rebalance hooks to the app."""
        self.intake = batching.register(self.app, self.topic, self.settings.worker_batch_size)
        self.app.agent(self.topic, name=self.name)(self._run)
        self.app.task(self._engine)
        self.app.task(self._listen)
        self.app.on_partitions_revoked.connect(self._on_revoked)  # type: ignore[arg-type]
        self.app.on_partitions_assigned.connect(self._on_assigned)  # type: ignore[arg-type]

    def owned(self) -> set[int]:
        """Partitions of the topic this worker consumes now."""
        return owned_partitions(self.app, self.topic)

    def listeners(self) -> dict[str, Callable[[str], None]]:
        """NOTIFY channel -> what to do with a payload."""
        return {}

    async def connected(self) -> None:
        """After (re)connecting the listener: catch up on what it may have missed."""
        await self.engine.reload(self.owned())

    async def handle(self, batch: list[Any]) -> None:
        raise NotImplementedError

    def reload_later(self, partition: int) -> None:
        """A NOTIFY said this partition has open work again: reload it, if it is ours."""
        if partition in self.owned():
            task = asyncio.ensure_future(self.engine.reload({partition}))
            task.add_done_callback(lambda t: t.cancelled() or t.exception())

    def _mine(self, args: tuple[Any, ...], kwargs: dict[str, Any], key: str) -> set[int]:
        name = self.topic.get_topic_name()
        tps: Iterable[Any] = args[0] if args else kwargs.get(key, ())
        return {tp.partition for tp in tps if tp.topic == name}

    async def _on_assigned(self, sender: Any, *args: Any, signal: Any, **kwargs: Any) -> None:
        mine = self._mine(args, kwargs, "assigned")
        if mine:
            self.engine.held |= mine
            what = f"{self.name}: reloading {sorted(mine)}"
            n = await retry_forever(lambda: self.engine.reload(mine), what)
            log.info("%s: partitions %s assigned, %d open items loaded", self.name, sorted(mine), n)

    async def _on_revoked(self, sender: Any, *args: Any, signal: Any, **kwargs: Any) -> None:
        gone = self._mine(args, kwargs, "revoked")
        if gone:
            await self.engine.revoke(gone)

    async def _engine(self) -> None:
        await self.http.start()
        try:
            await self.engine.run()
        finally:
            await self.http.close()

    async def _listen(self) -> None:
        while True:
            conn: asyncpg.Connection | None = None
            try:
                conn = await asyncpg.connect(self.settings.database_url)
                for channel, react in self.listeners().items():
                    await conn.add_listener(channel, _payload_only(react))
                await self.connected()
                while not conn.is_closed():
                    await asyncio.sleep(5)  # keepalive probe interval, not synchronisation
                    await conn.execute("SELECT 1")
            except Exception as exc:  # noqa: BLE001 - reconnect; connected() catches up
                log.warning("%s: listener lost (%s: %s); reconnecting", self.name, type(exc).__name__, exc)
                await asyncio.sleep(1)  # reconnect backoff
            finally:
                if conn is not None:
                    await conn.close()

    async def _run(self, stream: faust.StreamT[bytes]) -> None:
        await batching.consume_batches(
            self.intake,
            linger=self.linger,
            handle=self.handle,
            name=f"{self.name} intake",
            on_fatal=self.on_fatal,
        )


def _payload_only(react: Callable[[str], None]) -> Callable[..., None]:
    def listener(conn: Any, pid: int, channel: str, payload: object) -> None:
        react(str(payload))

    return listener
