"""Close timers: a Faust table (the durable truth) plus an in-memory timer wheel (the index).

The table is keyed by thread, like the conversation topic, and uses the producer's
partitioner, so each timer's changelog partition is its conversation's partition. The wheel
holds every timer of the partitions this worker owns and is rebuilt from the table after each
rebalance/recovery. A due timer is not acted on here: it becomes a TimerFired event on its
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
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any, Literal

import faust

from domain.lifecycle import CancelTimer, SetTimer
from domain.timer_wheel import TimerWheel
from streams.records import TimerFiredRecord
from streams.topics import split_thread_key

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
        self.table = app.Table(
            "timers",
            key_type=bytes,  # bytes -> the raw codec for the table and its changelog
            value_type=bytes,
            partitions=partitions,
            use_partitioner=True,
            help="close deadline per conversation thread",
        )
        self.wheel: TimerWheel[bytes] = TimerWheel(int(time.time() * 1000))
        self._wake = asyncio.Event()
        self._ready = asyncio.Event()
        self._confirming: set[asyncio.Future[None]] = set()
        self.fired = 0
        self.lateness_ms: list[float] = []  # a bounded sample, for the metrics endpoint
        self.table.on_recover(self.rebuild)

    async def rebuild(self) -> None:
        """Re-index every timer of the partitions we hold (after assignment or recovery)."""
        started = time.perf_counter()
        items = ((key, unpack(value)[2]) for key, value in self.table.items())
        self.wheel = TimerWheel.build(items, int(time.time() * 1000))
        self._ready.set()
        self._wake.set()
        log.info(
            "timers: index rebuilt with %d timers in %.0f ms",
            len(self.wheel),
            1000 * (time.perf_counter() - started),
        )

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
