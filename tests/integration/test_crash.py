"""kill -9 the worker while 2,000 messages over 100 contacts flow in: nothing lost, nothing
doubled, and every conversation keeps its order."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable

import aiohttp
import asyncpg

from tests.integration.harness import Deployment, GenericChannel, message, wait_until

CONTACTS = 100
PER_CONTACT = 20


async def test_worker_crash_loses_nothing_and_keeps_order(
    http: aiohttp.ClientSession, deployment: Deployment, channel: GenericChannel
) -> None:
    run = uuid.uuid4().hex[:6]
    contacts = [f"crash-{run}-{i:03d}" for i in range(CONTACTS)]
    url = f"{deployment.base_url}/webhooks/generic/{channel.id}"
    db = await asyncpg.connect(deployment.database_url)

    async def stored() -> int:
        n: int = await db.fetchval(
            "SELECT count(*) FROM messages m JOIN conversations c ON c.id = m.conversation_id"
            " WHERE c.contact_id LIKE $1",
            f"crash-{run}-%",
        )
        return n

    async def contact_flow(contact: str) -> None:
        # One contact's messages are sent one after another, so their order is defined.
        for k in range(PER_CONTACT):
            raw, headers = channel.signed(message(f"{contact}-{k:02d}", contact, str(k)))
            while True:
                async with http.post(url, data=raw, headers=headers) as r:
                    if r.status == 200:
                        break
                    assert r.status == 503, await r.text()  # only "retry later" is acceptable

    try:
        senders = asyncio.gather(*(contact_flow(c) for c in contacts))
        await wait_until(lambda: _at_least(stored, 300), 60, "some messages before the crash")
        deployment.kill("worker")
        killed_at = await stored()
        deployment.start("worker")
        await senders
        await wait_until(lambda: _at_least(stored, CONTACTS * PER_CONTACT), 120, "every message")

        assert killed_at < CONTACTS * PER_CONTACT, "the crash must happen mid-flow"
        rows = await db.fetch(
            "SELECT c.contact_id, m.provider_message_id, m.text FROM messages m"
            " JOIN conversations c ON c.id = m.conversation_id WHERE c.contact_id LIKE $1"
            " ORDER BY m.id",
            f"crash-{run}-%",
        )
        assert len(rows) == CONTACTS * PER_CONTACT
        assert len({r["provider_message_id"] for r in rows}) == len(rows)  # exactly once
        by_contact: dict[str, list[int]] = {}
        for r in rows:
            by_contact.setdefault(r["contact_id"], []).append(int(r["text"]))
        assert set(by_contact) == set(contacts)
        for contact, seq in by_contact.items():
            assert seq == list(range(PER_CONTACT)), (contact, seq)
        convs = await db.fetchval(
            "SELECT count(*) FROM conversations WHERE contact_id LIKE $1", f"crash-{run}-%"
        )
        assert convs == CONTACTS
    finally:
        await db.close()


async def _at_least(probe: Callable[[], Awaitable[int]], n: int) -> bool:
    return await probe() >= n
