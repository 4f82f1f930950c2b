"""Outbound messages and their delivery receipts, applied in the lifecycle batch's transaction.

Receipts and outbound records share the thread's partition, so they are applied in one order
per thread; within a batch the outbound messages are stored first, and since the status is the
join of all receipts (domain.delivery_status) the result does not depend on that order. A
receipt for a message not stored yet is kept (applied = false) and applied when it appears.
Every receipt that moves a status (now, or later when its message appears) yields a
`message.status_updated` outgoing event, id `<receipt event id>:message.status_updated`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import asyncpg
import orjson

from domain.delivery_status import DeliveryStatus, advance, from_provider
from streams.outgoing import STATUS_UPDATED, Outgoing, status_data
from streams.records import OutboundMessage, StatusReceipt

_INSERT_OUTBOUND = """
INSERT INTO messages (conversation_id, channel_id, contact_id, provider_message_id, direction, type,
                      text, payload, status, sent_at)
SELECT m.c, m.ch, m.k, m.p, 'outbound', m.t, m.x, m.j::jsonb, 'queued', m.s
FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[],
            $8::timestamptz[]) WITH ORDINALITY AS m(c, ch, k, p, t, x, j, s, n)
ORDER BY m.n
ON CONFLICT (channel_id, direction, contact_id, provider_message_id) DO NOTHING
"""
_KNOWN = """
SELECT m.channel_id, m.provider_message_id, m.status, m.status_at, m.conversation_id, m.contact_id
FROM messages m
JOIN unnest($1::text[], $2::text[]) AS k(ch, p) ON m.channel_id = k.ch AND m.provider_message_id = k.p
WHERE m.direction = 'outbound'
"""
_PENDING = """
SELECT r.id, r.event_id, r.channel_id, r.provider_message_id, r.provider_status, r.provider_at
FROM message_receipts r
JOIN unnest($1::text[], $2::text[]) AS k(ch, p) ON r.channel_id = k.ch AND r.provider_message_id = k.p
WHERE NOT r.applied ORDER BY r.id
"""
_INSERT_RECEIPTS = """
INSERT INTO message_receipts (event_id, channel_id, provider_message_id, provider_status, status,
                              provider_at, errors, payload, applied)
SELECT e, ch, p, ps, st, pa, er::jsonb, pl::jsonb, ap
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::timestamptz[],
            $7::text[], $8::text[], $9::bool[]) WITH ORDINALITY AS r(e, ch, p, ps, st, pa, er, pl, ap, n)
ORDER BY n
ON CONFLICT (event_id) DO NOTHING
"""
_UPDATE_STATUS = """
UPDATE messages m SET status = u.st, status_at = u.at
FROM unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[]) AS u(ch, p, st, at)
WHERE m.channel_id = u.ch AND m.direction = 'outbound' AND m.provider_message_id = u.p
"""

Key = tuple[str, str]


def _dump(value: Any) -> str:
    return orjson.dumps(value).decode()


async def apply_receipts(
    conn: asyncpg.Connection | asyncpg.pool.PoolConnectionProxy,
    outbound: Sequence[OutboundMessage],
    receipts: Sequence[StatusReceipt],
    position: Mapping[str, int],
) -> list[Outgoing]:
    """Store outbound messages, record receipts, and move statuses forward; returns the
    outgoing events of the statuses that moved (`position`: event id -> place in the batch)."""
    if outbound:
        cols = [
            [m.conversation_id for m in outbound],
            [m.channel_id for m in outbound],
            [m.contact_id for m in outbound],
            [m.provider_message_id for m in outbound],
            [m.type for m in outbound],
            [m.text for m in outbound],
            [_dump(m.payload) for m in outbound],
            [m.sent_at for m in outbound],
        ]
        await conn.execute(_INSERT_OUTBOUND, *cols)
    keys = sorted(
        {(m.channel_id, m.provider_message_id) for m in outbound}
        | {(r.channel_id, r.provider_message_id) for r in receipts}
    )
    chans, pmids = [k[0] for k in keys], [k[1] for k in keys]
    status: dict[Key, tuple[DeliveryStatus, datetime | None]] = {}
    owner: dict[Key, tuple[str, str]] = {}  # the message's conversation and contact
    for known_row in await conn.fetch(_KNOWN, chans, pmids):
        key = (known_row["channel_id"], known_row["provider_message_id"])
        status[key] = (DeliveryStatus(known_row["status"]), known_row["status_at"])
        owner[key] = (str(known_row["conversation_id"]), known_row["contact_id"])
    changed: set[Key] = set()
    events: list[Outgoing] = []

    def fold(
        key: Key, word: str, at: datetime, event_id: str, occurred: datetime, pos: int
    ) -> DeliveryStatus | None:
        # status_at is the provider time of the receipt that moved the status last.
        incoming = from_provider(word)
        if incoming is None:
            return None  # not a delivery step (e.g. "deleted"): recorded, status unchanged
        current = status[key][0]
        new = advance(current, incoming)
        if new != current:
            status[key] = (new, at)
            changed.add(key)
            conversation_id, contact_id = owner[key]
            data = status_data(
                conversation_id, key[0], contact_id, key[1], new.value, current.value, word, at, occurred
            )
            thread = f"{key[0]}/{contact_id}"
            out_id = f"{event_id}:{STATUS_UPDATED}"
            events.append(Outgoing(out_id, STATUS_UPDATED, thread, data, occurred, pos))
        return incoming

    # Receipts that arrived before their message: apply them now that it exists (as of the
    # message's own event: its time, its place in the batch).
    stored = {(m.channel_id, m.provider_message_id): m for m in outbound}
    applied_pending: list[int] = []
    for row in await conn.fetch(_PENDING, chans, pmids):
        key = (row["channel_id"], row["provider_message_id"])
        if key in status:
            msg = stored.get(key)
            occurred = msg.sent_at if msg is not None else row["provider_at"]
            pos = position.get(msg.event_id, 0) if msg is not None else 0
            fold(key, row["provider_status"], row["provider_at"], row["event_id"], occurred, pos)
            applied_pending.append(row["id"])
    if applied_pending:
        await conn.execute(
            "UPDATE message_receipts SET applied = true WHERE id = ANY($1::bigint[])", applied_pending
        )

    rows = []
    for r in receipts:
        key = (r.channel_id, r.provider_message_id)
        known = key in status
        pos = position.get(r.event_id, 0)
        mapped = (
            fold(key, r.provider_status, r.provider_at, r.event_id, r.received_at, pos)
            if known
            else from_provider(r.provider_status)
        )
        rows.append(
            (
                r.event_id,
                r.channel_id,
                r.provider_message_id,
                r.provider_status,
                mapped.value if mapped else None,
                r.provider_at,
                _dump(r.errors),
                _dump(r.payload),
                known,
            )
        )
    if rows:
        await conn.execute(_INSERT_RECEIPTS, *[[row[i] for row in rows] for i in range(9)])
    if changed:
        ordered = sorted(changed)
        await conn.execute(
            _UPDATE_STATUS,
            [k[0] for k in ordered],
            [k[1] for k in ordered],
            [status[k][0].value for k in ordered],
            [status[k][1] for k in ordered],
        )
    return events
