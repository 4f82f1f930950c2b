"""The backup sweep: overdue actions in Postgres' scheduled_actions get their firing re-produced.

It never acts itself: it puts the action's firing event (same id as the scheduler's own, from
streams/firings.py) on the owner's partition, and the lifecycle agent decides. A healthy system
re-fires 0; a growing count means firings are being lost (a crashed worker, a lost write).

Each worker sweeps only the partitions it is assigned (the rows' partition column, indexed),
and only what cannot still be queued: a firing produced before the partition's
consumer caught up is already on its way, so re-firing it would only grow a backlog. Per
partition, with `committed` the consumer's committed offset and `end` the log end offset:

- committed >= end now (no lag): every overdue row is lost for sure; re-fire them all;
- committed >= the end offset recorded at the previous sweep (after its own firings): what was
  in the log then has been applied, so rows overdue already then (deadline <= that sweep's
  time - slack) are lost; re-fire those, newer ones may still be in the backlog;
- otherwise the partition is still behind: skip it (counted and logged) until it catches up.

So a lagging partition gets at most one sweep firing per overdue row per catch-up, from one
worker, and a run re-fires at most `max_refires` (oldest deadlines first; the rest next run).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import faust
from faust.types import TP

from agents.scheduler import owned_partitions
from domain.actions import due_ms
from streams.firings import firing

log = logging.getLogger(__name__)

# Keyset pagination over (partition, due_at): each page starts after the last one.
_OVERDUE = """
SELECT owner, name, token, due_at, partition FROM scheduled_actions
WHERE partition = ANY($5::int[]) AND due_at <= $1 AND (due_at, owner, name) > ($3, $4, $6)
ORDER BY due_at, owner, name LIMIT $2
"""
_FIRST_KEY = (datetime.min.replace(tzinfo=UTC), "", "")


class Sweep:
    """Finds overdue actions of the owned partitions through their due-time index."""

    def __init__(
        self,
        pool: Callable[[], Awaitable[asyncpg.Pool]],
        source: faust.TopicT,
        interval: timedelta,
        *,
        app: faust.App,
        partitions: int,
        max_refires: int = 10_000,
        slack: timedelta = timedelta(seconds=2),
        batch: int = 1000,
    ) -> None:
        self.pool = pool
        self.source = source
        self.interval = interval  # 0 or negative: disabled
        self.app = app
        self.partitions = partitions
        self.max_refires = max_refires
        self.slack = slack  # the timer itself fires within ms; give it room before re-firing
        self.batch = batch
        self.refired_total = 0
        self.skipped_total = 0  # overdue rows left alone because their partition lagged
        self.runs = 0
        self._marks: dict[int, tuple[int, datetime]] = {}  # partition -> (end offset, when)

    def owned(self) -> set[int]:
        """Partitions of the conversation topic assigned to this worker now."""
        return owned_partitions(self.app, self.source)

    async def _offsets(self, owned: set[int]) -> dict[int, tuple[int, int]]:
        """partition -> (committed, end) as this worker's consumer sees them."""
        consumer = self.app.consumer
        topic = self.source.get_topic_name()
        tps = [TP(topic, p) for p in sorted(owned)]
        ends = await consumer.highwaters(*tps)
        # Faust keeps the offsets it committed (next offset to read) per partition; None = none yet.
        committed: Any = getattr(consumer, "_committed_offset", {})
        return {tp.partition: (committed.get(tp) or 0, ends.get(tp) or 0) for tp in tps}

    async def run_once(self, now: datetime | None = None) -> int:
        """One sweep of the owned partitions; returns how many timers it re-fired."""
        now = now or datetime.now(UTC)
        owned = self.owned()
        if not owned:
            log.info("sweep: no partitions assigned; nothing to do")
            return 0
        # Per owned partition, the newest deadline that cannot still be queued (see the docstring).
        cutoffs: dict[int, datetime] = {}
        lagging: list[int] = []
        for p, (committed, end) in (await self._offsets(owned)).items():
            mark = self._marks.get(p)
            if committed >= end:
                cutoffs[p] = now - self.slack
            elif mark is not None and committed >= mark[0]:
                cutoffs[p] = mark[1] - self.slack
            else:
                lagging.append(p)
        pool = await self.pool()
        refired = skipped = 0
        capped = False
        after: tuple[datetime, str, str] = _FIRST_KEY
        while not capped:
            rows = await pool.fetch(
                _OVERDUE, now - self.slack, self.batch, after[0], after[1], sorted(owned), after[2]
            )
            futures: list[Any] = []
            for r in rows:
                cutoff = cutoffs.get(r["partition"])
                if cutoff is None or r["due_at"] > cutoff:
                    skipped += 1
                    continue
                if refired + len(futures) >= self.max_refires:
                    capped = True
                    break
                record = firing(r["owner"], r["name"], r["token"], due_ms(r["due_at"]), now, "sweep")
                value = record.model_dump_json().encode()
                futures.append(await self.source.send(key=r["owner"].encode(), value=value))
            for fut in futures:
                await fut
            refired += len(futures)
            if len(rows) < self.batch:
                break
            after = (rows[-1]["due_at"], rows[-1]["owner"], rows[-1]["name"])
        # The log end after our own firings: the next run re-fires only once they are consumed.
        marked = datetime.now(UTC)
        self._marks = {p: (end, marked) for p, (_, end) in (await self._offsets(owned)).items()}
        self.runs += 1
        self.refired_total += refired
        self.skipped_total += skipped
        # A sweep that found nothing overdue is not news at INFO (it runs every minute).
        log.log(
            logging.INFO if refired or skipped or lagging else logging.DEBUG,
            "sweep: re-fired %d overdue actions on partitions %s; %d overdue left for later (partitions"
            " behind: %s)%s",
            refired,
            sorted(owned),
            skipped,
            sorted(lagging),
            f"; cap of {self.max_refires} reached, the rest next run" if capped else "",
        )
        return refired

    async def run(self) -> None:
        """Sweep every interval, forever (never, if the interval is 0); a failed sweep is logged
        and tried next time."""
        if self.interval <= timedelta(0):
            log.info("sweep: disabled (PARLEY_SWEEP_INTERVAL=0)")
            return
        while True:
            await asyncio.sleep(self.interval.total_seconds())  # the sweep's own period
            try:
                await self.run_once()
            except Exception as exc:  # noqa: BLE001 - the next sweep retries
                log.warning("sweep failed: %s: %s", type(exc).__name__, exc)
