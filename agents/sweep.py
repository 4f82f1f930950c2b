"""The backup sweep: overdue open conversations in Postgres get their timer re-fired.

It never closes anything itself: it puts a TimerFired event (same id as the timer's own) on
the conversation's partition, and the lifecycle agent decides. A healthy system re-fires 0;
a growing count means timers are being lost (a crashed worker, a lost changelog write).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import faust

from agents.timers import due_ms, fired_event
from streams.records import keyed

log = logging.getLogger(__name__)

# Keyset pagination over the partial deadline index: each page starts after the last one.
_OVERDUE = """
SELECT id, channel_id, contact_id, version, deadline_at FROM conversations
WHERE state <> 'closed' AND deadline_at <= $1 AND (deadline_at, id) > ($3, $4::uuid)
ORDER BY deadline_at, id LIMIT $2
"""
_FIRST_KEY = (datetime.min.replace(tzinfo=UTC), "00000000-0000-0000-0000-000000000000")


class Sweep:
    """Finds overdue conversations through the deadline index, in batches."""

    def __init__(
        self,
        pool: Callable[[], Awaitable[asyncpg.Pool]],
        source: faust.TopicT,
        interval: timedelta,
        slack: timedelta = timedelta(seconds=2),
        batch: int = 1000,
    ) -> None:
        self.pool = pool
        self.source = source
        self.interval = interval
        self.slack = slack  # the timer itself fires within ms; give it room before re-firing
        self.batch = batch
        self.refired_total = 0
        self.runs = 0

    async def run_once(self, now: datetime | None = None) -> int:
        """One sweep: re-fire every overdue timer; returns how many."""
        now = now or datetime.now(UTC)
        pool = await self.pool()
        cutoff = now - self.slack
        refired = 0
        after: tuple[datetime, str] = _FIRST_KEY
        while True:
            rows = await pool.fetch(_OVERDUE, cutoff, self.batch, *after)
            if not rows:
                break
            futures: list[Any] = []
            for r in rows:
                record = fired_event(
                    r["channel_id"],
                    r["contact_id"],
                    str(r["id"]),
                    r["version"],
                    due_ms(r["deadline_at"]),
                    now,
                    source="sweep",
                )
                key, value = keyed(record)
                futures.append(await self.source.send(key=key, value=value))
            for fut in futures:
                await fut
            refired += len(rows)
            after = (rows[-1]["deadline_at"], str(rows[-1]["id"]))
            if len(rows) < self.batch:
                break
        self.runs += 1
        self.refired_total += refired
        log.info("sweep: re-fired %d overdue timers", refired)
        return refired

    async def run(self) -> None:
        """Sweep every interval, forever; a failed sweep is logged and tried next time."""
        while True:
            await asyncio.sleep(self.interval.total_seconds())  # the sweep's own period
            try:
                await self.run_once()
            except Exception as exc:  # noqa: BLE001 - the next sweep retries
                log.warning("sweep failed: %s: %s", type(exc).__name__, exc)
