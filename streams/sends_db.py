"""Postgres side of outbound messages: the queued sends, their attempts' outcomes, paused channels.

A send row is written by the lifecycle agent when it accepts the message (in the conversation's
order), then only by the sender: `sending` before each request leaves (so a crash leaves the
send "in doubt", never silently re-sent), and the outcome after. A sent message also becomes a
`messages` row (so the provider's receipts update it) and a `message.sent` event; a failed one a
`message.failed` event. Manual retries and token updates NOTIFY `parley_sends` with the
partition, so the worker that sends it picks it up at once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
import orjson

from streams.outgoing import Outgoing as OutboxRow
from streams.outgoing import write_outbox
from streams.schema import CUSTOM_PLAN
from streams.topics import partition_of, partitioner, thread_key

Conn = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy
SENDS_CHANNEL = "parley_sends"
OPEN = ("queued", "sending")


@dataclass(frozen=True)
class Send:
    """A send as the sender holds it."""

    id: str
    conversation_id: str
    channel_id: str
    contact_id: str
    partition: int
    seq: int
    type: str
    content: dict[str, Any]
    status: str  # queued | sending (in doubt when read back after a crash)
    attempts: int
    retry_base: int
    next_attempt_at: datetime | None
    sending_at: datetime | None


_SEND_COLUMNS = (
    "id::text, conversation_id::text, channel_id, contact_id, partition, seq, type, content, status,"
    " attempts, retry_base, next_attempt_at, sending_at"
)


def send_of(row: Any) -> Send:
    return Send(**dict(row))


async def open_sends(conn: Conn, partitions: Iterable[int]) -> list[Send]:
    """Every queued or in-doubt send of these partitions, in acceptance order."""
    rows = await conn.fetch(
        f"SELECT {_SEND_COLUMNS} FROM outbound_sends WHERE status = ANY($2::text[])"
        " AND partition = ANY($1::int[]) ORDER BY seq",
        sorted(set(partitions)),
        list(OPEN),
    )
    return [send_of(r) for r in rows]


async def open_sends_by_id(conn: Conn, ids: Sequence[str]) -> list[Send]:
    """These sends, if still queued or in doubt, in acceptance order."""
    rows = await conn.fetch(
        f"SELECT {_SEND_COLUMNS} FROM outbound_sends WHERE id = ANY($1::uuid[]) AND status = ANY($2::text[])"
        " ORDER BY seq",
        list(ids),
        list(OPEN),
    )
    return [send_of(r) for r in rows]


async def remember_request(conn: Conn, send_id: str, digest: str) -> str:
    """Remember the first body of an Idempotency-Key; returns the hash of that first body."""
    found = await conn.fetchval(
        "WITH put AS (INSERT INTO send_requests (id, body_hash) VALUES ($1::uuid, $2)"
        " ON CONFLICT (id) DO NOTHING RETURNING body_hash)"
        " SELECT body_hash FROM put UNION ALL SELECT body_hash FROM send_requests WHERE id = $1::uuid",
        send_id,
        digest,
    )
    return str(found)


async def send_row(conn: Conn, send_id: str) -> asyncpg.Record | None:
    """One send with everything the API shows."""
    return await conn.fetchrow(
        "SELECT id::text, conversation_id::text, channel_id, contact_id, type, content, status, attempts,"
        " next_attempt_at, provider_message_id, error_code, error_title, accepted_at, sent_at, updated_at,"
        " body_hash FROM outbound_sends WHERE id = $1::uuid",
        send_id,
    )


def send_json(row: asyncpg.Record) -> dict[str, Any]:
    """A send as the API shows it."""
    out = {k: v for k, v in dict(row).items() if k != "body_hash"}
    for k in ("next_attempt_at", "accepted_at", "sent_at", "updated_at"):
        out[k] = out[k].isoformat() if out[k] else None
    return out


async def paused_channels(conn: Conn) -> dict[str, str]:
    """Channels the provider refused the token of: id -> reason."""
    rows = await conn.fetch("SELECT channel_id, reason FROM channel_send_state WHERE paused")
    return {r["channel_id"]: r["reason"] or "paused" for r in rows}


@dataclass(frozen=True)
class Leaving:
    """An attempt about to leave: stored before the request, so a crash leaves it in doubt."""

    send_id: str
    attempt: int
    at: datetime


_LEAVING = """
UPDATE outbound_sends s SET status = 'sending', attempts = f.a, sending_at = f.at, updated_at = f.at
FROM unnest($1::uuid[], $2::int[], $3::timestamptz[]) AS f(id, a, at)
WHERE s.id = f.id
"""


@dataclass(frozen=True)
class Outcome:
    """What an attempt came to, as stored."""

    send: Send
    status: str  # queued (retry / wait) | sending (in doubt) | sent | failed
    at: datetime
    next_attempt_at: datetime | None = None
    provider_message_id: str | None = None
    error_code: str | None = None
    error_title: str | None = None


_OUTCOMES = """
UPDATE outbound_sends s SET status = f.st, next_attempt_at = f.n, provider_message_id = COALESCE(f.pid,
    s.provider_message_id), error_code = f.code, error_title = f.title, updated_at = f.at,
    sent_at = CASE WHEN f.st = 'sent' THEN f.at ELSE s.sent_at END
FROM unnest($1::uuid[], $2::text[], $3::timestamptz[], $4::text[], $5::text[], $6::text[], $7::timestamptz[])
    AS f(id, st, n, pid, code, title, at)
WHERE s.id = f.id
"""
# A sent message joins the conversation's messages, where the provider's receipts find it.
_MESSAGES = """
INSERT INTO messages (conversation_id, channel_id, contact_id, provider_message_id, direction, type, text,
                      payload, status, sent_at)
SELECT f.conv, f.ch, f.contact, f.pid, 'outbound', f.type, f.text, f.payload::jsonb, 'sent', f.at
FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[],
            $8::timestamptz[]) AS f(conv, ch, contact, pid, type, text, payload, at)
ON CONFLICT DO NOTHING
"""


def _event(o: Outcome) -> OutboxRow:
    s = o.send
    kind = "message.sent" if o.status == "sent" else "message.failed"
    data = {
        "message_id": s.id,
        "conversation_id": s.conversation_id,
        "channel_id": s.channel_id,
        "contact_id": s.contact_id,
        "type": s.type,
        "provider_message_id": o.provider_message_id,
        "attempts": s.attempts,
        "error_code": o.error_code,
        "error_title": o.error_title,
        "at": o.at.isoformat(),
    }
    key = thread_key(s.channel_id, s.contact_id).decode()
    return OutboxRow(f"send:{s.id}:{kind}:{s.attempts}", kind, key, orjson.dumps(data).decode(), o.at)


async def mark_leaving(conn: Conn, leaving: Sequence[Leaving]) -> None:
    """Store that these attempts are about to leave (one statement).

    Committed without waiting for the WAL flush (synchronous_commit off, this transaction only):
    the mark exists for a sender that dies after its request left, and Postgres, which did not
    die, has it the moment COMMIT returns (visible to every session; on disk within
    wal_writer_delay, and at once with any later synchronous commit such as the outcome's). Only
    losing the database host and the worker together within that fraction of a second loses a
    mark, and that send then goes once more. Waiting for the flush was the larger part of every
    send's time before its request could leave (each send waits for its mark)."""
    async with conn.transaction():
        await conn.execute(f"SET LOCAL synchronous_commit = off; {CUSTOM_PLAN}")
        await conn.execute(
            _LEAVING, [x.send_id for x in leaving], [x.attempt for x in leaving], [x.at for x in leaving]
        )


async def record_outcomes(conn: Conn, outcomes: Sequence[Outcome], partitions: int) -> None:
    """Store a group of outcomes, the sent ones' messages rows and the final ones' events."""
    async with conn.transaction():
        await conn.execute(CUSTOM_PLAN)
        await conn.execute(
            _OUTCOMES,
            [o.send.id for o in outcomes],
            [o.status for o in outcomes],
            [o.next_attempt_at for o in outcomes],
            [o.provider_message_id for o in outcomes],
            [o.error_code for o in outcomes],
            [o.error_title for o in outcomes],
            [o.at for o in outcomes],
        )
        await _messages_and_events(conn, outcomes, partitions)


async def _messages_and_events(conn: Conn, outcomes: Sequence[Outcome], partitions: int) -> None:
    """A sent message's `messages` row, and the final outcomes' events."""
    sent = [o for o in outcomes if o.status == "sent" and o.provider_message_id]
    if sent:
        await conn.execute(
            _MESSAGES,
            [o.send.conversation_id for o in sent],
            [o.send.channel_id for o in sent],
            [o.send.contact_id for o in sent],
            [o.provider_message_id for o in sent],
            [o.send.type for o in sent],
            [_text_of(o.send.content) for o in sent],
            [orjson.dumps(o.send.content).decode() for o in sent],
            [o.at for o in sent],
        )
    final = [_event(o) for o in outcomes if o.status in ("sent", "failed")]
    await write_outbox(conn, final, partitioner(partitions))


def _text_of(content: dict[str, Any]) -> str | None:
    text = content.get("text") or content.get("caption") or content.get("name")
    return str(text) if text is not None else None


_SETTLE = """
UPDATE outbound_sends s SET status = 'sent', provider_message_id = f.pid, sent_at = f.at, updated_at = f.at
FROM unnest($1::uuid[], $2::text[], $3::timestamptz[]) AS f(id, pid, at)
WHERE s.id = f.id AND s.status = 'sending' AND s.provider_message_id IS NULL
RETURNING s.id::text, s.conversation_id::text, s.channel_id, s.contact_id, s.partition, s.seq, s.type,
          s.content, s.status, s.attempts, s.retry_base, s.next_attempt_at, s.sending_at, f.pid, f.at
"""


async def settle_from_receipts(conn: Conn, receipts: Sequence[Any], partitions: int) -> int:
    """Status webhooks of sends whose answer never came (in doubt): the provider did take them.
    Mark them sent with the provider's id, so the sender does not send them again, before the
    receipts themselves are applied to the messages they create."""
    mine = [r for r in receipts if getattr(r, "message_id", None)]
    if not mine:
        return 0
    first: dict[str, Any] = {}
    for r in mine:
        first.setdefault(r.message_id, r)
    rows = await conn.fetch(
        _SETTLE,
        list(first),
        [r.provider_message_id for r in first.values()],
        [r.received_at for r in first.values()],
    )
    if rows:
        outcomes = [
            Outcome(
                send_of({k: row[k] for k in row.keys() if k not in ("pid", "at")}),
                "sent",
                row["at"],
                provider_message_id=row["pid"],
            )
            for row in rows
        ]
        await _messages_and_events(conn, outcomes, partitions)
        for row in rows:  # the sender may be waiting for exactly this: wake that conversation now
            await conn.execute(
                "SELECT pg_notify($1, $2)", SENDS_CHANNEL, f"settled:{row['channel_id']}\n{row['contact_id']}"
            )
    return len(rows)


async def still_in_doubt(conn: Conn, send_id: str) -> bool:
    """Is this send still waiting for a sign of life (no status webhook came for it)?"""
    row = await conn.fetchrow(
        "SELECT status, provider_message_id FROM outbound_sends WHERE id = $1::uuid", send_id
    )
    return bool(row and row["status"] == "sending" and row["provider_message_id"] is None)


async def pause_channel(conn: Conn, channel_id: str, reason: str, now: datetime, partitions: int) -> bool:
    """Pause a channel's sends and emit `channel.paused` (False if it was paused already)."""
    async with conn.transaction():
        done = await conn.fetchval(
            "INSERT INTO channel_send_state (channel_id, paused, reason, updated_at)"
            " VALUES ($1, true, $2, $3)"
            " ON CONFLICT (channel_id) DO UPDATE SET paused = true, reason = $2, updated_at = $3"
            " WHERE NOT channel_send_state.paused RETURNING 1",
            channel_id,
            reason,
            now,
        )
        if not done:
            return False
        key = f"channel:{channel_id}"
        data = orjson.dumps({"channel_id": channel_id, "reason": reason}).decode()
        row = OutboxRow(f"{key}:paused:{int(now.timestamp() * 1000)}", "channel.paused", key, data, now)
        await write_outbox(conn, [row], partitioner(partitions))
    return True


async def resume_channel(conn: Conn, channel_id: str, now: datetime) -> None:
    """The channel's token was updated: its sends go again."""
    async with conn.transaction():
        await conn.execute(
            "UPDATE channel_send_state SET paused = false, reason = NULL, updated_at = $2"
            " WHERE channel_id = $1",
            channel_id,
            now,
        )
        await conn.execute("SELECT pg_notify($1, $2)", SENDS_CHANNEL, f"channel:{channel_id}")


async def retry_send(conn: Conn, send_id: str, now: datetime) -> asyncpg.Record | None:
    """A failed send queued again now with a fresh retry budget (NOTIFY the sender)."""
    async with conn.transaction():
        row = await conn.fetchrow(
            "UPDATE outbound_sends SET status = 'queued', retry_base = attempts, next_attempt_at = $2,"
            " error_code = NULL, error_title = NULL, updated_at = $2"
            " WHERE id = $1::uuid AND status = 'failed' RETURNING partition",
            send_id,
            now,
        )
        if row is None:
            return None
        await conn.execute("SELECT pg_notify($1, $2)", SENDS_CHANNEL, str(row["partition"]))
    return await send_row(conn, send_id)


_QUEUE = """
INSERT INTO outbound_sends (id, conversation_id, channel_id, contact_id, partition, type, content, body_hash,
                            status, accepted_at, updated_at)
SELECT f.id, f.conv, f.ch, f.contact, f.p, f.type, f.content::jsonb, f.hash, 'queued', f.at, f.at
FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::int[], $6::text[], $7::text[], $8::text[],
            $9::timestamptz[]) WITH ORDINALITY AS f(id, conv, ch, contact, p, type, content, hash, at, n)
ORDER BY f.n
ON CONFLICT (id) DO NOTHING
RETURNING id::text, seq
"""
_TO_SENDER = """
INSERT INTO outbox (event_id, type, key, payload, created_at, partition, topic)
SELECT f.event_id, 'message.send', f.key, f.payload::jsonb, f.at, f.p, 'sends'
FROM unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[], $5::int[]) WITH ORDINALITY
    AS f(event_id, key, payload, at, p, n)
ORDER BY f.n
ON CONFLICT (event_id) DO NOTHING
"""


async def queue_sends(conn: Conn, sends: Sequence[tuple[Any, str]], partitions: int) -> list[Send]:
    """Queue accepted sends (records.SendRequested, conversation id) in their order, and hand each
    to the sender through the outbox (<prefix>.sends, keyed by channel). A repeat queues nothing.
    Returns the sends queued (their `partition`s are the outbox partitions written)."""
    rows = [
        (
            r.message_id,
            conv_id,
            r.channel_id,
            r.contact_id,
            partition_of(r.channel_id.encode(), partitions),
            str(r.content.get("type", "text")),
            orjson.dumps(r.content).decode(),
            r.body_hash,
            r.requested_at,
        )
        for r, conv_id in sends
    ]
    queued = {row["id"]: row["seq"] for row in await conn.fetch(_QUEUE, *map(list, zip(*rows, strict=True)))}
    handed = []
    queued_sends = []
    for row in rows:
        if row[0] not in queued:
            continue
        payload = {
            "id": row[0],
            "conversation_id": row[1],
            "channel_id": row[2],
            "contact_id": row[3],
            "partition": row[4],
            "seq": queued[row[0]],
            "type": row[5],
            "content": orjson.loads(row[6]),
            "status": "queued",
            "attempts": 0,
            "retry_base": 0,
        }
        handed.append((f"send:{row[0]}", row[2], orjson.dumps(payload).decode(), row[8], row[4]))
        queued_sends.append(Send(**payload, next_attempt_at=None, sending_at=None))
    if handed:
        await conn.execute(_TO_SENDER, *map(list, zip(*handed, strict=True)))
    return queued_sends


def body_hash(content: dict[str, Any]) -> str:
    """The hash an Idempotency-Key's first body is remembered by."""
    return hashlib.sha256(orjson.dumps(content, option=orjson.OPT_SORT_KEYS)).hexdigest()
