"""Pruning of the event ledger (processed_events) and of the published outbox: both only have to
remember what Kafka can still deliver again, i.e. the events within the source topic's retention.

A redelivery (after a crash or a rebalance) or a replay can only bring back an event that is
still in the topic, so a ledger row older than the retention plus a margin can never stop a
duplicate any more. Rows are deleted in bounded chunks (short transactions, no long lock, no
giant WAL burst). Infinite retention (negative) means the topic keeps everything: never prune.

An outbox row stops a re-derived outgoing event from being written twice (its event id is the
source event's id plus its type); once published, and older than the same cut, its source event
can no longer come back, and the event itself stays on <prefix>.outgoing-events for replays. A
row not yet published is never pruned, however old.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

import asyncpg

log = logging.getLogger(__name__)

# Any constant works: one pruner at a time across workers (the others skip that round).
_PRUNE_LOCK = 7_276_537_340
# No index on processed_at: the ledger is append-only, so its oldest rows sit at the start of
# the heap and a LIMITed scan finds a chunk of them quickly.
_DELETE_CHUNK = """
DELETE FROM processed_events WHERE ctid = ANY(ARRAY(
    SELECT ctid FROM processed_events WHERE processed_at < $1 LIMIT $2))
"""


_DELETE_OUTBOX_CHUNK = """
DELETE FROM outbox WHERE ctid = ANY(ARRAY(
    SELECT ctid FROM outbox WHERE published_at IS NOT NULL AND created_at < $1 LIMIT $2))
"""


# One chunk of retention, one statement: its sub-statements see one snapshot, and the foreign
# keys are checked at its end, when the referencing rows are gone too.
_RETENTION_CHUNK = """
WITH gone AS (
    SELECT c.id FROM conversations c
    WHERE c.state = 'closed' AND c.closed_at < $1
      AND NOT EXISTS (SELECT 1 FROM outbound_sends s
                      WHERE s.conversation_id = c.id AND s.status IN ('queued', 'sending'))
    ORDER BY c.closed_at LIMIT $2
    FOR UPDATE SKIP LOCKED
), msgs AS (
    DELETE FROM messages WHERE conversation_id IN (SELECT id FROM gone)
    RETURNING channel_id, provider_message_id
), sends AS (
    DELETE FROM outbound_sends WHERE conversation_id IN (SELECT id FROM gone)
    RETURNING channel_id, provider_message_id
), receipts AS (
    DELETE FROM message_receipts r USING (SELECT * FROM msgs UNION SELECT * FROM sends) m
    WHERE r.channel_id = m.channel_id AND r.provider_message_id = m.provider_message_id
    RETURNING 1
), audit AS (
    DELETE FROM conversation_events WHERE conversation_id IN (SELECT id FROM gone) RETURNING 1
), unlinked AS (
    UPDATE conversations SET previous_conversation_id = NULL
    WHERE previous_conversation_id IN (SELECT id FROM gone) AND id NOT IN (SELECT id FROM gone)
    RETURNING 1
), deleted AS (
    DELETE FROM conversations WHERE id IN (SELECT id FROM gone) RETURNING 1
)
SELECT (SELECT count(*) FROM deleted) AS conversations, (SELECT count(*) FROM msgs) AS messages,
       (SELECT count(*) FROM receipts) AS receipts, (SELECT count(*) FROM audit) AS audit,
       (SELECT count(*) FROM sends) AS sends, (SELECT count(*) FROM unlinked) AS unlinked
"""


async def expire(pool: asyncpg.Pool, cut: datetime, chunk: int = 500) -> dict[str, int]:
    """Delete conversations closed before `cut` and what belongs to them, chunk by chunk;
    returns how many rows of each kind went."""
    totals = {"conversations": 0, "messages": 0, "receipts": 0, "audit": 0, "sends": 0, "unlinked": 0}
    async with pool.acquire() as conn:
        while True:
            row = await conn.fetchrow(_RETENTION_CHUNK, cut, chunk)
            assert row is not None
            for k in totals:
                totals[k] += row[k]
            if row["conversations"] < chunk:
                return totals


def prune_cut(now: datetime, retention: timedelta, margin: timedelta) -> datetime | None:
    """Rows processed before this can go; None when the retention is infinite."""
    if retention < timedelta(0):
        return None
    return now - retention - margin


async def prune(pool: asyncpg.Pool, cut: datetime, chunk: int = 10_000) -> tuple[int, int]:
    """Delete ledger rows processed before `cut`, and published outbox rows created before it,
    chunk by chunk; returns how many of each."""
    async with pool.acquire() as conn:
        if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", _PRUNE_LOCK):
            return 0, 0  # another worker is pruning right now
        try:
            ledger = await _in_chunks(conn, _DELETE_CHUNK, cut, chunk)
            outbox = await _in_chunks(conn, _DELETE_OUTBOX_CHUNK, cut, chunk)
            return ledger, outbox
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", _PRUNE_LOCK)


async def _in_chunks(conn: asyncpg.pool.PoolConnectionProxy, delete: str, cut: datetime, chunk: int) -> int:
    deleted = 0
    while True:
        status = await conn.execute(delete, cut, chunk)
        n = int(status.split()[-1])  # "DELETE <n>"
        deleted += n
        if n < chunk:
            return deleted


class LedgerPruner:
    """Prunes the ledger every interval, forever."""

    def __init__(
        self,
        pool: Callable[[], Awaitable[asyncpg.Pool]],
        retention: timedelta,
        margin: timedelta,
        interval: timedelta,
        keep_closed: timedelta | None = None,
    ) -> None:
        self.pool = pool
        self.retention = retention
        self.margin = margin
        self.interval = interval
        self.keep_closed = keep_closed  # PARLEY_RETENTION_DAYS; None: closed conversations stay
        self.pruned_total = 0
        self.outbox_pruned_total = 0
        self.expired_total = 0  # closed conversations deleted by retention

    async def expire_once(self, now: datetime | None = None) -> dict[str, int]:
        """One retention round (nothing when PARLEY_RETENTION_DAYS is not set)."""
        if self.keep_closed is None:
            return {}
        cut = (now or datetime.now(UTC)) - self.keep_closed
        gone = await expire(await self.pool(), cut)
        self.expired_total += gone["conversations"]
        log.log(
            logging.INFO if gone["conversations"] else logging.DEBUG,
            "retention: deleted %s (conversations closed before %s)",
            ", ".join(f"{n} {what}" for what, n in gone.items()),
            cut.isoformat(),
        )
        return gone

    async def run_once(self, now: datetime | None = None) -> int:
        """One pruning round; returns how many rows it deleted."""
        cut = prune_cut(now or datetime.now(UTC), self.retention, self.margin)
        if cut is None:
            return 0
        n, published = await prune(await self.pool(), cut)
        self.pruned_total += n
        self.outbox_pruned_total += published
        # A round that deleted nothing is not news at INFO (it runs at start and every interval).
        log.log(
            logging.INFO if n or published else logging.DEBUG,
            "ledger: pruned %d processed_events and %d published outbox rows older than %s",
            n,
            published,
            cut.isoformat(),
        )
        return n

    async def run(self) -> None:
        """Prune (and expire) at start and then every interval; a failed round is logged and
        tried again."""
        if self.interval <= timedelta(0):
            log.info("ledger: never pruned (interval 0)")
            return
        if self.retention < timedelta(0):
            log.info("ledger: never pruned (infinite topic retention)")
        while True:
            for step in (self.run_once, self.expire_once):
                try:
                    await step()
                except Exception as exc:  # noqa: BLE001 - the next round retries
                    log.warning("ledger: %s failed: %s: %s", step.__name__, type(exc).__name__, exc)
            await asyncio.sleep(self.interval.total_seconds())  # the pruner's own period
