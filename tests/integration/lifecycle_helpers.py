"""Helpers for lifecycle tests: produce exact event sequences, read conversations back."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import aiohttp
import asyncpg
from aiokafka import AIOKafkaProducer

from domain.actions import close_token, due_ms
from domain.lifecycle import CloseReason
from streams.firings import close_firing
from streams.records import AcceptCommand, CloseCommand, InboundMessage, Record, TimerFiredRecord
from streams.topics import Topics, thread_key
from tests.integration.harness import Deployment, wait_until


class Thread:
    """One (channel, contact) thread; builds its events with explicit times and order."""

    def __init__(self, dep: Deployment, channel_id: str) -> None:
        self.dep = dep
        self.channel_id = channel_id
        self.contact_id = "c-" + uuid.uuid4().hex[:10]
        self.key = thread_key(channel_id, self.contact_id)
        self.topic = Topics(dep.name).conversation_events

    def message(self, text: str, at: datetime, message_id: str | None = None) -> InboundMessage:
        """A user's message received at `at`."""
        # Provider ids are unique per channel: scope the readable name to this thread.
        mid = f"{self.contact_id}:{message_id or uuid.uuid4().hex[:10]}"
        return InboundMessage(
            event_id=f"generic:{self.channel_id}:{mid}",
            channel_id=self.channel_id,
            contact_id=self.contact_id,
            provider="generic",
            provider_message_id=mid,
            text=text,
            sent_at=at,
            received_at=at,
        )

    def close(
        self, conv: dict[str, Any], at: datetime, reason: CloseReason = CloseReason.AGENT_CLOSED
    ) -> CloseCommand:
        """An agent's close command issued at `at`."""
        return CloseCommand(
            event_id=f"cmd:{uuid.uuid4()}",
            channel_id=self.channel_id,
            contact_id=self.contact_id,
            conversation_id=conv["id"],
            reason=reason,
            by="agent-1",
            issued_at=at,
        )

    def accept(self, conv: dict[str, Any], agent: str, at: datetime) -> AcceptCommand:
        """An agent takes the conversation at `at`."""
        return AcceptCommand(
            event_id=f"cmd:{uuid.uuid4()}",
            channel_id=self.channel_id,
            contact_id=self.contact_id,
            conversation_id=conv["id"],
            agent_id=agent,
            issued_at=at,
        )

    def timer(
        self,
        conv: dict[str, Any],
        source: Literal["timer", "sweep"] = "timer",
        fired_at: datetime | None = None,
    ) -> TimerFiredRecord:
        """The conversation's current deadline firing (as the timer table or sweep would)."""
        due = due_ms(datetime.fromisoformat(conv["deadline_at"]))
        at = fired_at or datetime.now(UTC)
        owner = f"{self.channel_id}/{self.contact_id}"
        return close_firing(owner, close_token(conv["id"], conv["version"]), due, at, source)

    async def produce(self, *records: Record) -> None:
        """Put records on the thread's partition, in this order, acked."""
        producer = AIOKafkaProducer(
            bootstrap_servers=self.dep.services.bootstrap, acks="all", enable_idempotence=True
        )
        await producer.start()
        try:
            for record in records:
                await producer.send_and_wait(self.topic, record.model_dump_json().encode(), key=self.key)
        finally:
            await producer.stop()

    async def conversations(self, db: asyncpg.Connection) -> list[dict[str, Any]]:
        """The thread's conversations, oldest first, as the API would show them."""
        rows = await db.fetch(
            "SELECT * FROM conversations WHERE channel_id = $1 AND contact_id = $2 ORDER BY opened_at, id",
            self.channel_id,
            self.contact_id,
        )
        out = []
        for r in rows:
            d = dict(r)
            d["id"] = str(d["id"])
            d["deadline_at"] = d["deadline_at"].isoformat() if d["deadline_at"] else None
            if d["previous_conversation_id"]:
                d["previous_conversation_id"] = str(d["previous_conversation_id"])
            out.append(d)
        return out

    async def wait(
        self, db: asyncpg.Connection, what: str, check: Any, timeout: float = 30
    ) -> list[dict[str, Any]]:
        """Until check(conversations) is true."""

        async def probe() -> list[dict[str, Any]] | None:
            convs = await self.conversations(db)
            return convs if check(convs) else None

        return await wait_until(probe, timeout, what)

    async def events(self, db: asyncpg.Connection, conv_id: str) -> list[dict[str, Any]]:
        """A conversation's audit log."""
        return [
            dict(r)
            for r in await db.fetch(
                "SELECT kind, from_state, to_state, cause, detail, version, occurred_at"
                " FROM conversation_events WHERE conversation_id = $1 ORDER BY id",
                conv_id,
            )
        ]

    async def messages(self, db: asyncpg.Connection) -> list[str]:
        """Every stored message id of the thread, in order."""
        rows = await db.fetch(
            "SELECT m.provider_message_id FROM messages m JOIN conversations c ON c.id = m.conversation_id"
            " WHERE c.channel_id = $1 AND c.contact_id = $2 ORDER BY m.id",
            self.channel_id,
            self.contact_id,
        )
        return [r["provider_message_id"].split(":", 1)[-1] for r in rows]


async def register_channel(
    http: aiohttp.ClientSession, dep: Deployment, channel_id: str, secret: str
) -> None:
    """Register a generic channel."""
    async with http.post(
        f"{dep.base_url}/v1/channels",
        headers=dep.admin_headers(),
        json={"id": channel_id, "provider": "generic", "secret": secret},
    ) as r:
        assert r.status == 201, await r.text()


def now() -> datetime:
    """Wall clock, UTC."""
    return datetime.now(UTC)


__all__ = ["Thread", "now", "register_channel", "timedelta"]
