"""Outgoing events: what a conversation change publishes on <prefix>.outgoing-events.

The batch that makes a change writes its events to the `outbox` table in the same transaction
(one bulk INSERT, `write_outbox`), and the relay (agents/outbox.py) publishes them. Each event's
id is derived from its source event's id, so a redelivered or replayed source event yields the
same ids (and the outbox's unique `event_id` keeps one row): `<source event id>:<type>`, and
`<source event id>:<type>:<n>` for the n-th (n >= 2) event of one type from one source event.
The record key is the outbox key (a conversation's thread `channel/contact`); its `partition`
column is that key's partition, what the relay orders by. The data shapes are documented in the
README ("Outgoing events"); builders here are pure.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, NamedTuple

import asyncpg
import orjson

from domain.lifecycle import CloseReason, Conversation, State
from streams import jsonrows

OPENED = "conversation.opened"
STATE_CHANGED = "conversation.state_changed"
CLOSED = "conversation.closed"
REOPENED = "conversation.reopened"
MESSAGE_RECEIVED = "message.received"
STATUS_UPDATED = "message.status_updated"

Conn = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy


class Outgoing(NamedTuple):
    """One outbox row; `position` is its source event's place in the batch (rows keep log order)."""

    event_id: str
    type: str
    key: str
    data: str  # a JSON object
    created_at: datetime  # the source event's time: the record's "timestamp"
    position: int = 0


class Ids:
    """Outgoing ids of one source event: `<source>:<type>`, then `<source>:<type>:2`, ..."""

    __slots__ = ("seen", "source")

    def __init__(self, source: str) -> None:
        self.source = source
        self.seen: dict[str, int] = {}

    def next(self, type_: str) -> str:
        """The id of this source event's next event of `type_` (deterministic: order of emission)."""
        n = self.seen.get(type_, 0) + 1
        self.seen[type_] = n
        return f"{self.source}:{type_}" if n == 1 else f"{self.source}:{type_}:{n}"


def _value(x: State | CloseReason | None) -> str | None:
    return x.value if x is not None else None


def conversation_data(
    conv: Conversation,
    state: State | None,
    previous_state: State | None,
    previous_close_reason: CloseReason | None,
    occurred_at: datetime,
) -> str:
    """The data of every conversation.* event (one flat shape), as JSON."""
    return orjson.dumps(
        {
            "conversation_id": conv.id,
            "channel_id": conv.channel_id,
            "contact_id": conv.contact_id,
            "state": _value(state or conv.state),
            "previous_state": _value(previous_state),
            "version": conv.version,
            "close_reason": _value(conv.close_reason),
            "previous_close_reason": _value(previous_close_reason),
            "closed_at": conv.closed_at,
            "assigned_agent": conv.assigned_agent,
            "previous_conversation_id": conv.previous_conversation_id,
            "occurred_at": occurred_at,
        }
    ).decode()


def message_data(
    conversation_id: str,
    channel_id: str,
    contact_id: str,
    provider_message_id: str,
    type_: str,
    text: str | None,
    sent_at: datetime,
    occurred_at: datetime,
) -> str:
    """The data of message.received, as JSON."""
    return orjson.dumps(
        {
            "conversation_id": conversation_id,
            "channel_id": channel_id,
            "contact_id": contact_id,
            "provider_message_id": provider_message_id,
            "type": type_,
            "text": text,
            "sent_at": sent_at,
            "occurred_at": occurred_at,
        }
    ).decode()


def status_data(
    conversation_id: str,
    channel_id: str,
    contact_id: str,
    provider_message_id: str,
    status: str,
    previous_status: str | None,
    provider_status: str,
    status_at: datetime,
    occurred_at: datetime,
) -> str:
    """The data of message.status_updated, as JSON."""
    return orjson.dumps(
        {
            "conversation_id": conversation_id,
            "channel_id": channel_id,
            "contact_id": contact_id,
            "provider_message_id": provider_message_id,
            "status": status,
            "previous_status": previous_status,
            "provider_status": provider_status,
            "status_at": status_at,
            "occurred_at": occurred_at,
        }
    ).decode()


def insert_outbox(param: int) -> str:
    """The outbox INSERT of the rows in parameter $param (`outbox_rows`), in their order."""
    return f"""
INSERT INTO outbox (event_id, type, key, payload, created_at, partition)
SELECT o.event_id, o.type, o.key, o.payload, o.created_at, o.partition
FROM ({jsonrows.select("text text text jsonb timestamptz int".split(), param)})
  AS o(event_id, type, key, payload, created_at, partition, n)
ORDER BY o.n
ON CONFLICT (event_id) DO NOTHING
"""


_INSERT = insert_outbox(1)


def outbox_rows(rows: Sequence[Outgoing], partition: Callable[[str], int]) -> list[tuple[Any, ...]]:
    """The rows as `insert_outbox` takes them, each with its key's partition."""
    return [(r.event_id, r.type, r.key, r.data, r.created_at, partition(r.key)) for r in rows]


async def write_outbox(conn: Conn, rows: Sequence[Outgoing], partition: Callable[[str], int]) -> None:
    """Insert the rows in this order (the relay publishes a partition's rows in id order)."""
    if rows:
        await conn.execute(_INSERT, jsonrows.dumps(outbox_rows(rows, partition)))
