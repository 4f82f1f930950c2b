"""Close timers: a Faust table (the durable truth) plus an in-memory timer wheel (the index).

The table is keyed by thread, like the conversation topic, and uses the producer's
partitioner, so each timer's changelog partition is its conversation's partition. The wheel
holds every timer of the partitions this worker owns, and only those: it is emptied of a
partition's timers when the partition is revoked, and rebuilt after each rebalance/recovery from
the table (minus the partitions that moved away) and from Postgres, which is the truth for
deadlines (see reconcile). A due timer is not acted on here: it becomes a TimerFired event on its
conversation's own partition, applied by the lifecycle agent in order with everything else.
Firing twice is harmless: the event id is the timer's identity, so the ledger drops a repeat.
"""

from __future__ import annotations

import asyncio
import logging
import math
import struct
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from datetime import UTC, datetime
from typing import Any, Literal

import asyncpg
import faust
from aiokafka.partitioner import murmur2

from domain.lifecycle import CancelTimer, SetTimer
from domain.timer_wheel import TimerWheel
from streams.records import TimerFiredRecord
from streams.topics import split_thread_key, thread_key

log = logging.getLogger(__name__)

# Table value: conversation uuid, version, due ms. 28 bytes, no per-timer Python object graph.
_VALUE = struct.Struct(">16sIq")


def due_ms(at: datetime) -> int:
    """A deadline in whole ms, rounded up so a timer never fires before its deadline."""
    return math.ceil(at.timestamp() * 1000)


def timer_event_id(conversation_id: str, version: int, due: int) -> str:
    """The identity of one timer firing; the sweep uses the same one, so repeats dedupe."""
    return f"timer:{conversation_id}:{version}:{due}"


def fired_event(
    channel_id: str,
    contact_id: str,
    conversation_id: str,
    version: int,
    due: int,
    fired_at: datetime,
    source: Literal["timer", "sweep"] = "timer",
) -> TimerFiredRecord:
    """The event of one timer firing (due in whole ms, see due_ms); the timer and the sweep
    both build it here, so the same deadline always has the same event id."""
    due_at = datetime.fromtimestamp(due / 1000, UTC)
    return TimerFiredRecord(
        event_id=timer_event_id(conversation_id, version, due),
        channel_id=channel_id,
        contact_id=contact_id,
        conversation_id=conversation_id,
        version=version,
        due_at=due_at,
        fired_at=max(fired_at, due_at),  # never before its deadline, whoever fires it
        source=source,
    )


def partition_of(key: bytes, partitions: int) -> int:
    """The partition the producer's default partitioner (aiokafka, Java client) picks for a key."""
    return int(murmur2(key) & 0x7FFFFFFF) % partitions


def owned_partitions(app: faust.App, topic: faust.TopicT) -> set[int]:
    """Partitions of `topic` assigned to this worker's consumer now (none before it started)."""
    name = topic.get_topic_name()
    try:
        assignment = app.consumer.assignment()
    except Exception:  # noqa: BLE001 - consumer not started yet: nothing is ours
        return set()
    return {tp.partition for tp in assignment if tp.topic == name}


# Every open conversation with a deadline; filtered by partition in Python (no partition column).
_OPEN_DEADLINES = """
SELECT id, channel_id, contact_id, version, deadline_at FROM conversations
WHERE state <> 'closed' AND deadline_at IS NOT NULL
"""


def pack(conversation_id: str, version: int, due: int) -> bytes:
    """Encode a table value."""
    return _VALUE.pack(uuid.UUID(conversation_id).bytes, version, due)


def unpack(value: bytes) -> tuple[str, int, int]:
    """Decode a table value."""
    raw, version, due = _VALUE.unpack(value)
    return str(uuid.UUID(bytes=raw)), version, due


class Timers:
    """The timer table, its wheel, and the loop that turns due timers into events."""

    def __init__(self, app: faust.App, source: faust.TopicT, partitions: int) -> None:
        self.app = app
        self.source = source
        self.partitions = partitions
        self.table = app.Table(
            "timers",
            key_type=bytes,  # bytes -> the raw codec for the table and its changelog
            value_type=bytes,
            partitions=partitions,
            use_partitioner=True,
            help="close deadline per conversation thread",
        )
        self.wheel: TimerWheel[bytes] = TimerWheel(int(time.time() * 1000))
        self.pool: Callable[[], Awaitable[asyncpg.Pool]] | None = None  # set by attach_postgres
        self.reconcile_timeout = 60.0
        self._wake = asyncio.Event()
        self._ready = asyncio.Event()
        self._confirming: set[asyncio.Future[None]] = set()
        self._touched: set[bytes] | None = None  # keys apply() changed while a reconcile reads
        self._retry: asyncio.Task[None] | None = None
        self.fired = 0
        self.repaired = 0  # timers put back from Postgres after an assignment
        self.dropped = 0  # timers of partitions that moved to another worker
        self.lateness_ms: list[float] = []  # a bounded sample, for the metrics endpoint
        self.table.on_recover(self.rebuild)
        app.on_partitions_revoked.connect(self._on_revoked)  # type: ignore[arg-type]  # mode types it loosely

    def attach_postgres(self, pool: Callable[[], Awaitable[asyncpg.Pool]]) -> None:
        """Where reconcile reads the deadlines from (the lifecycle agent's pool)."""
        self.pool = pool

    def owned(self) -> set[int]:
        """Partitions of the conversation topic this worker is assigned now."""
        return owned_partitions(self.app, self.source)

    async def _on_revoked(self, sender: Any, *args: Any, signal: Any, **kwargs: Any) -> None:
        # Stop firing what another worker may own in a moment; the store keeps its entries until
        # the new assignment is known (Faust does not re-read the changelog of a kept partition).
        topic = self.source.get_topic_name()
        revoked: Iterable[Any] = args[0] if args else kwargs.get("revoked", ())
        gone = {tp.partition for tp in revoked if tp.topic == topic}
        if gone:
            self._reindex(lambda p: p not in gone)

    def _reindex(self, keep: Callable[[int], bool]) -> None:
        n = self.partitions
        items = (
            (key, unpack(value)[2]) for key, value in self.table.data.items() if keep(partition_of(key, n))
        )
        self.wheel = TimerWheel.build(items, int(time.time() * 1000))
        self._wake.set()

    async def rebuild(self) -> None:
        """After assignment/recovery: keep only the owned partitions' timers, re-index them, and
        put back from Postgres every deadline the table misses (Faust awaits this before it
        resumes the partitions, so the lifecycle agent consumes only afterwards)."""
        started = time.perf_counter()
        owned = self.owned()
        store = self.table.data
        gone = [key for key in store if partition_of(key, self.partitions) not in owned]
        for key in gone:
            del store[key]  # memory only: the changelog belongs to the new owner now
        self.dropped += len(gone)
        self._reindex(lambda p: p in owned)
        repaired: int | str = "not checked"
        if self.pool is not None:
            try:
                repaired = await asyncio.wait_for(self.reconcile(), self.reconcile_timeout)
            except Exception as exc:  # noqa: BLE001 - Postgres unreachable: retry in the background
                log.warning("timers: reconcile with Postgres failed (%s); retrying in the background", exc)
                self._retry_later()
        self._ready.set()
        self._wake.set()
        log.info(
            "timers: index rebuilt for partitions %s with %d timers (%d of other partitions dropped,"
            " %s put back from Postgres) in %.0f ms",
            sorted(owned),
            len(self.wheel),
            len(gone),
            repaired,
            1000 * (time.perf_counter() - started),
        )

    def _retry_later(self) -> None:
        if self._retry is not None and not self._retry.done():
            return

        async def retry() -> None:
            delay = 1.0
            while True:
                await asyncio.sleep(delay)  # backoff while Postgres is unreachable
                try:
                    n = await self.reconcile()
                    log.info("timers: reconcile with Postgres done: %d put back", n)
                    return
                except Exception as exc:  # noqa: BLE001 - keep trying; the sweep covers meanwhile
                    log.warning("timers: reconcile with Postgres failed again (%s)", exc)
                    delay = min(delay * 2, 30.0)

        self._retry = asyncio.ensure_future(retry())

    async def reconcile(self) -> int:
        """Put into the table and wheel every open deadline of an owned partition that the table
        lacks or holds for another conversation or an older version; returns how many.

        Postgres is the truth: a crash between a batch's commit and its timer writes leaves
        deadlines only there (a redelivered batch is a ledger duplicate and derives nothing). A
        key the lifecycle agent changes while this reads is left alone: the agent applies
        effects after their commit, so its value is at least as new as the row read here.
        """
        assert self.pool is not None
        pool = await self.pool()
        owned = self.owned()
        n = self.partitions
        found: list[tuple[bytes, str, int, int]] = []
        self._touched = set()
        try:
            async with pool.acquire() as conn, conn.transaction(readonly=True):
                async for r in conn.cursor(_OPEN_DEADLINES, prefetch=5000):
                    key = thread_key(r["channel_id"], r["contact_id"])
                    if partition_of(key, n) in owned:
                        found.append((key, str(r["id"]), r["version"], due_ms(r["deadline_at"])))
            touched = self._touched
        finally:
            self._touched = None
        owned &= self.owned()  # a rebalance meanwhile: touch only what is still ours
        store = self.table.data
        repaired = 0
        for key, conversation_id, version, due in found:
            if key in touched or partition_of(key, n) not in owned:
                continue
            old = store.get(key)
            if old is not None:
                old_id, old_version, _ = unpack(old)
                if old_id == conversation_id and old_version >= version:
                    continue
            self.table[key] = pack(conversation_id, version, due)  # store + changelog
            self.wheel.schedule(key, due)
            repaired += 1
        self.repaired += repaired
        if repaired:
            self._wake.set()
        return repaired

    def apply(self, effects: Iterable[tuple[bytes, SetTimer | CancelTimer]]) -> None:
        """Carry out the timer effects of a committed batch: per thread only the last one counts.

        The in-memory store always holds the real timer (the firing loop reads it). The
        changelog is written only when a deadline moves earlier or the thread's conversation
        changes: the common case, a message pushing the deadline later, writes nothing. So the
        changelog may hold an earlier deadline of an older version; after a crash that one fires
        first, the lifecycle sees a stale timer of the current conversation and re-arms the real
        deadline (domain.lifecycle), so timers still fire once, on time, never early.
        """
        last: dict[bytes, SetTimer | CancelTimer] = {}
        for key, effect in effects:
            last.pop(key, None)
            last[key] = effect
        if self._touched is not None:
            self._touched.update(last)
        earliest = self.wheel.next_due_ms()
        store = self.table.data
        for key, effect in last.items():
            if isinstance(effect, SetTimer):
                due = due_ms(effect.due_at)
                value = pack(effect.conversation_id, effect.version, due)
                old = store.get(key)
                if old is None or unpack(old)[0] != effect.conversation_id or due < unpack(old)[2]:
                    self.table[key] = value  # store + changelog (flushed before offsets commit)
                else:
                    store[key] = value  # later deadline: memory only, see the docstring
                self.wheel.schedule(key, due)
                if earliest is None or due < earliest:
                    earliest = due
                    self._wake.set()
            else:
                current = store.get(key)
                if current is not None and unpack(current)[0] == effect.conversation_id:
                    del self.table[key]
                self.wheel.cancel(key)

    async def run(self) -> None:
        """Sleep until the next due timer (or a wake-up), fire what is due, repeat."""
        await self._ready.wait()
        while True:
            now = int(time.time() * 1000)
            due = self.wheel.pop_due(now)
            if due:
                # Hand the records to the producer and move on: waiting for the acks here would
                # make every timer due meanwhile late by a broker round trip.
                futures = await self._fire(due, now)
                task = asyncio.ensure_future(self._confirm(due, futures))
                self._confirming.add(task)
                task.add_done_callback(self._confirming.discard)
                continue
            nxt = self.wheel.next_due_ms()
            timeout = 1.0 if nxt is None else max(0.0, min(1.0, (nxt - now) / 1000))
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except TimeoutError:
                pass

    async def _confirm(self, due: list[tuple[bytes, int]], futures: list[Any]) -> None:
        """Wait for the acks; if Kafka failed, put the timers back so they fire again."""
        try:
            for fut in futures:
                await fut  # acks=all: a due timer is either on its partition or re-armed here
            self.fired += len(futures)
        except Exception as exc:  # noqa: BLE001 - Kafka trouble: keep the timers, retry
            log.warning("timers: firing %d timers failed (%s); re-arming them", len(due), exc)
            retry_at = int(time.time() * 1000) + 1000
            for key, due_at in due:
                if self.wheel.due_of(key) is None:
                    self.wheel.schedule(key, max(due_at, retry_at))
            self._wake.set()

    async def _fire(self, due: list[tuple[bytes, int]], now: int) -> list[Any]:
        fired_at = datetime.fromtimestamp(now / 1000, UTC)
        futures: list[Any] = []
        for key, due_at in due:
            value = self.table.get(key)
            if value is None:
                continue  # cancelled after it was indexed
            conversation_id, version, table_due = unpack(value)
            if table_due != due_at:
                continue  # rescheduled; the wheel holds the newer due
            channel_id, contact_id = split_thread_key(key)
            record = fired_event(channel_id, contact_id, conversation_id, version, due_at, fired_at)
            try:
                futures.append(await self.source.send(key=key, value=record.model_dump_json().encode()))
            except Exception as exc:  # noqa: BLE001 - the producer refused: re-arm, try again soon
                log.warning("timers: producing a firing failed (%s); re-arming", exc)
                self.wheel.schedule(key, int(time.time() * 1000) + 1000)
                continue
            self._observe(now - due_at)
        return futures

    def _observe(self, lateness: float) -> None:
        if len(self.lateness_ms) >= 10_000:
            del self.lateness_ms[:5_000]
        self.lateness_ms.append(lateness)
