"""200 conversations with short deadlines get messages, accepts, farewells and closes timed
around their deadlines, through the real API and real timers; then the invariants are checked
in Postgres."""

from __future__ import annotations

import asyncio
import itertools
import random
from collections import defaultdict
from datetime import datetime

import aiohttp
import asyncpg

from domain.lifecycle import CloseReason
from tests.integration.harness import Deployment, GenericChannel, message, wait_until

DEPLOYMENT_ENV = {
    "PARLEY_TIMEOUT_IDLE": "2",
    "PARLEY_TIMEOUT_PROCESSING": "2",
    "PARLEY_TIMEOUT_AWAITING_CONFIRMATION": "1",
    "PARLEY_TIMEOUT_WAITING_CLOSE": "1",
    "PARLEY_CLOSE_GRACE": "1",
    "PARLEY_SWEEP_INTERVAL": "2",
}
CONVERSATIONS = 200
TEXTS = ["oi", "preciso de ajuda", "tchau", "ok, pode fechar", "obrigado", "sim", "não, espera", "hello?"]


async def test_random_traffic_around_deadlines_keeps_every_invariant(
    http: aiohttp.ClientSession, deployment: Deployment, channel: GenericChannel
) -> None:
    rng = random.Random(20261122)
    url = f"{deployment.base_url}/webhooks/generic/{channel.id}"
    sent: list[str] = []
    closes_requested = 0

    async def current(contact: str) -> dict[str, object] | None:
        async with http.get(
            f"{deployment.base_url}/v1/conversations",
            params={"contact": contact},
            headers=deployment.admin_headers(),
        ) as r:
            items = (await r.json())["items"]
            return items[0] if items else None

    async def script(i: int) -> None:
        nonlocal closes_requested
        contact = f"rnd-{deployment.name}-{i:03d}"
        r_ = random.Random(rng.random())
        for step in range(r_.randint(2, 6)):
            action = "message" if step == 0 else r_.choice(["message", "message", "accept", "close"])
            if action == "message":
                mid = f"{contact}-{step}"
                raw, headers = channel.signed(message(mid, contact, r_.choice(TEXTS)))
                async with http.post(url, data=raw, headers=headers) as r:
                    assert r.status == 200, await r.text()
                sent.append(mid)
            else:
                conv = await current(contact)
                if conv is not None:
                    path = f"{deployment.base_url}/v1/conversations/{conv['id']}/{action}"
                    body = (
                        {"agent_id": f"agent-{i % 7}"} if action == "accept" else {"reason": "agent_closed"}
                    )
                    async with http.post(path, json=body, headers=deployment.admin_headers()) as r:
                        assert r.status == 202, await r.text()
                    closes_requested += action == "close"
            # Around the 2 s deadlines: sometimes just before, sometimes just after.
            await asyncio.sleep(r_.uniform(0.5, 2.6))  # the traffic's own pacing, not a wait for state

    await asyncio.gather(*(script(i) for i in range(CONVERSATIONS)))
    db = await asyncpg.connect(deployment.database_url)
    try:
        prefix = f"rnd-{deployment.name}-%"

        async def all_closed() -> bool:
            open_: int = await db.fetchval(
                "SELECT count(*) FROM conversations WHERE contact_id LIKE $1 AND state <> 'closed'", prefix
            )
            stored: int = await db.fetchval(
                "SELECT count(*) FROM messages m JOIN conversations c ON c.id = m.conversation_id"
                " WHERE c.contact_id LIKE $1",
                prefix,
            )
            return open_ == 0 and stored >= len(sent)

        await wait_until(all_closed, 60, "every conversation to close")

        stored = await db.fetch(
            "SELECT m.provider_message_id FROM messages m JOIN conversations c ON c.id = m.conversation_id"
            " WHERE c.contact_id LIKE $1",
            prefix,
        )
        ids = [r["provider_message_id"] for r in stored]
        assert sorted(ids) == sorted(sent), "no message lost, none doubled"

        convs = await db.fetch("SELECT * FROM conversations WHERE contact_id LIKE $1", prefix)
        events = await db.fetch(
            "SELECT e.* FROM conversation_events e JOIN conversations c ON c.id = e.conversation_id"
            " WHERE c.contact_id LIKE $1 ORDER BY e.id",
            prefix,
        )
        log: dict[str, list[asyncpg.Record]] = defaultdict(list)
        for e in events:
            log[str(e["conversation_id"])].append(e)
        assert len({c["contact_id"] for c in convs}) == CONVERSATIONS
        for c in convs:
            entries = log[str(c["id"])]
            closes = [e for e in entries if e["kind"] == "closed"]
            assert len(closes) == 1, (c["id"], [e["kind"] for e in entries])  # one close per instance
            for e in closes:
                source, _, due = e["cause"].partition(":")
                if source in {"timer", "sweep"}:
                    assert e["occurred_at"] >= datetime.fromisoformat(due), "closed before its deadline"
            # Close reasons only move up in priority, and never from explicit to automatic.
            reasons = [CloseReason(e["detail"].split(":")[0]) for e in closes] + [
                CloseReason(e["detail"].split(" -> ")[1]) for e in entries if e["kind"] == "close_upgraded"
            ]
            assert reasons[-1] == CloseReason(c["close_reason"])
            for before, after in itertools.pairwise(reasons):
                assert after.priority > before.priority
                assert not (before.is_explicit and not after.is_explicit)
        # Each thread's conversations chain to their predecessor.
        by_contact: dict[str, list[asyncpg.Record]] = defaultdict(list)
        for c in sorted(convs, key=lambda c: c["opened_at"]):
            by_contact[c["contact_id"]].append(c)
        for chain in by_contact.values():
            assert chain[0]["previous_conversation_id"] is None
            for prev, nxt in itertools.pairwise(chain):
                assert nxt["previous_conversation_id"] == prev["id"]
        assert closes_requested > 0
        # The traffic really exercised the races: every kind of close happened.
        seen_reasons = {c["close_reason"] for c in convs}
        assert seen_reasons >= {"expired", "idle_timeout", "agent_closed", "user_closed"}, seen_reasons
        kinds = {e["kind"] for e in events}
        print(f"\n{len(convs)} conversations, reasons {sorted(seen_reasons)}, log kinds {sorted(kinds)}")
    finally:
        await db.close()
