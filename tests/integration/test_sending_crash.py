"""A crash must not send twice, nor lose a send: kill -9 of the worker, three times, while 200
messages over 20 conversations are on their way to the provider simulator (which answers after a
small latency, so requests are in flight at every kill). Counted at the simulator, not in logs.

- status webhooks on: every in-doubt send is settled by its status webhook (which carries Parley's
  message id): every message sent, each accepted by the provider exactly once, each
  conversation's messages accepted in the order the API accepted them;
- status webhooks off: an in-doubt send is sent again once after PARLEY_SEND_IN_DOUBT_WAIT: every
  message sent, accepted at most once more than the kills it was in doubt at (twice for one kill),
  order kept; the measured duplicates are printed;
- a 130429 throughput storm: every message retried until sent, order kept.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import asyncpg
import pytest

from sandbox.simulator import Failure, Simulator, WebhookSettings
from tests.integration.harness import Deployment, wait_until
from tests.integration.test_sending import Number, accepted_for, register, send, user_says

DEPLOYMENT_ENV = {
    "PARLEY_OUTBOUND_ALLOW_HTTP": "true",
    "PARLEY_OUTBOUND_ALLOW_PRIVATE": "true",  # the simulator is on loopback
    "PARLEY_SEND_BACKOFF_BASE": "0.2",
    "PARLEY_SEND_BACKOFF_CAP": "1",
    "PARLEY_SEND_IN_DOUBT_WAIT": "3",
    "PARLEY_KAFKA_SESSION_TIMEOUT": "6",
}
CONVERSATIONS, PER_CONVERSATION = 20, 10
TOTAL = CONVERSATIONS * PER_CONVERSATION
KILLS_AT = (0.2, 0.45, 0.7)  # share of the messages accepted by the provider when each kill lands
LATENCY_S = 0.3  # the provider's think time: several requests are always in flight


@pytest.fixture(scope="module")
async def sim(deployment: Deployment) -> AsyncIterator[Simulator]:
    async with Simulator(host="127.0.0.1", port=0, parley_base_url=deployment.base_url) as s:
        yield s


async def open_conversations(
    http: aiohttp.ClientSession, dep: Deployment, n: Number, count: int, prefix: str
) -> dict[str, str]:
    """contact -> conversation id, each opened by a signed inbound message."""
    contacts = [f"{prefix}{i:02d}{random.randint(10**5, 10**6 - 1)}" for i in range(count)]
    convs = await asyncio.gather(*(user_says(http, dep, n, c, "oi") for c in contacts))
    return dict(zip(contacts, convs, strict=True))


async def send_wave(
    http: aiohttp.ClientSession, dep: Deployment, convs: dict[str, str], per: int, order: dict[str, list[str]]
) -> None:
    """`per` messages to each conversation: one after the other within a conversation (so the
    API's acceptance order is known), conversations side by side. Appends to `order`."""

    async def one(contact: str, conv: str) -> None:
        for _ in range(per):
            i = len(order[contact])
            code, body = await send(http, dep, conv, f"{contact} #{i}")
            assert code == 202, body
            order[contact].append(body["id"])

    await asyncio.gather(*(one(c, conv) for c, conv in convs.items()))


def collapsed(ids: list[str]) -> list[str]:
    """Consecutive repeats of one id as one (a resend right after its in-doubt original)."""
    out: list[str] = []
    for x in ids:
        if not out or out[-1] != x:
            out.append(x)
    return out


def accepted_by_contact(sim: Simulator, n: Number) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for a in accepted_for(sim, n):
        assert a.parley_message_id is not None
        out.setdefault(a.recipient, []).append(a.parley_message_id)
    return out


def distinct(sim: Simulator, n: Number) -> set[str | None]:
    """The messages the provider accepted at least once."""
    return {a.parley_message_id for a in accepted_for(sim, n)}


def worker_label(dep: Deployment) -> str:
    [label] = [k for k in dep.processes if k.startswith("worker")]
    return label


async def statuses(db: asyncpg.Connection, channel_id: str) -> dict[str, int]:
    """How many of the channel's sends are in each status (queued, sending, sent, failed)."""
    sql = "SELECT status, count(*) FROM outbound_sends WHERE channel_id = $1 GROUP BY status"
    return {r["status"]: int(r["count"]) for r in await db.fetch(sql, channel_id)}


async def kill_loop(
    http: aiohttp.ClientSession,
    dep: Deployment,
    sim: Simulator,
    db: asyncpg.Connection,
    name: str,
) -> tuple[Number, dict[str, list[str]], Counter[str]]:
    """Send TOTAL messages and kill -9 the worker three times while they go out. Returns the
    number, each contact's message ids in the API's order, and the sends in doubt (stored
    `sending`, no outcome) right after a kill, with how many kills found each so."""
    n = await register(http, dep, sim, throughput=20)  # ~10 s of sending at 20/s
    convs = await open_conversations(http, dep, n, CONVERSATIONS, "5511")
    sim.inject(Failure(provider="whatsapp", action="delay", number=n.phone, times=None, latency_s=LATENCY_S))
    order: dict[str, list[str]] = {c: [] for c in convs}
    await send_wave(http, dep, convs, PER_CONVERSATION // 2, order)
    in_doubt: Counter[str] = Counter()  # send -> kills it was in doubt at (leaving, no outcome)
    for i, share in enumerate(KILLS_AT, start=1):

        async def reached(share: float = share) -> int | None:
            """This share of the messages accepted (resends not counted: their burst of accepts
            would time the kill to them), and an attempt stored as leaving."""
            count = len(distinct(sim, n))
            if count < share * TOTAL:
                return None
            return count if (await statuses(db, n.channel_id)).get("sending") else None

        await wait_until(reached, 120, f"{share:.0%} of the messages at the provider before kill {i}")
        dep.kill(worker_label(dep))  # kill -9, requests in flight
        at_kill = len(distinct(sim, n))
        states = await statuses(db, n.channel_id)
        leaving = await db.fetch(
            "SELECT id::text FROM outbound_sends WHERE channel_id = $1 AND status = 'sending'", n.channel_id
        )
        in_doubt.update(r["id"] for r in leaving)
        print(f"{name}: kill -9 #{i} with {at_kill}/{TOTAL} accepted, {len(leaving)} in doubt; {states}")
        assert at_kill < TOTAL, "the kill came after everything was sent: nothing was tested"
        if i == 1:  # the rest is accepted by the API while no worker runs
            await send_wave(http, dep, convs, PER_CONVERSATION - PER_CONVERSATION // 2, order)
        dep.start("worker", label=f"worker-{name}-{i}")

    ids = [x for xs in order.values() for x in xs]
    assert len(set(ids)) == TOTAL

    async def all_sent() -> bool:
        count = await db.fetchval(
            "SELECT count(*) FROM outbound_sends WHERE id = ANY($1::uuid[]) AND status = 'sent'", ids
        )
        return bool(count == TOTAL)

    try:
        await wait_until(all_sent, 240, f"all {TOTAL} messages sent after the kills")
    finally:
        sim.clear_failures()
    print(f"{name}: refused by the provider: {sim.stats().rejected}")
    assert await statuses(db, n.channel_id) == {"sent": TOTAL}  # none left queued or sending
    return n, order, in_doubt


async def outbound_rows(db: asyncpg.Connection, n: Number) -> int:
    """The channel's outbound `messages` rows: one per sent message, where its receipts land."""
    return int(
        await db.fetchval(
            "SELECT count(*) FROM messages WHERE channel_id = $1 AND direction = 'outbound'", n.channel_id
        )
    )


async def test_storm_of_130429_is_retried_in_order(
    http: aiohttp.ClientSession, deployment: Deployment, sim: Simulator, db: asyncpg.Connection
) -> None:
    n = await register(http, deployment, sim)
    convs = await open_conversations(http, deployment, n, 8, "5512")
    storm = 20
    sim.inject(Failure(provider="whatsapp", action="error", code=130429, times=storm))
    order: dict[str, list[str]] = {c: [] for c in convs}
    await send_wave(http, deployment, convs, 5, order)
    ids = [x for xs in order.values() for x in xs]

    async def all_sent() -> bool:
        count = await db.fetchval(
            "SELECT count(*) FROM outbound_sends WHERE id = ANY($1::uuid[]) AND status = 'sent'", ids
        )
        return bool(count == len(ids))

    await wait_until(all_sent, 120, "every message sent through the storm")
    assert sim.stats().rejected.get("130429") == storm  # the storm hit, all of it
    got = accepted_by_contact(sim, n)
    assert got == order  # each once, each conversation in the API's order
    rows = await db.fetch("SELECT id::text, attempts FROM outbound_sends WHERE id = ANY($1::uuid[])", ids)
    attempts: dict[str, int] = {r["id"]: r["attempts"] for r in rows}
    retried = [i for i, a in attempts.items() if a > 1]
    assert retried, attempts
    assert sum(attempts.values()) == len(ids) + storm  # every refusal cost exactly one attempt
    print(f"130429 storm: {len(ids)} messages, {storm} refused, {len(retried)} retried, all sent in order")


async def test_a_receipt_that_came_while_no_worker_ran_settles_the_send(
    http: aiohttp.ClientSession, deployment: Deployment, sim: Simulator, db: asyncpg.Connection
) -> None:
    """The narrow case behind the loop below: the worker dies with a request in flight, the
    provider takes it and its status webhook reaches the API while no worker runs, and the worker
    comes back after PARLEY_SEND_IN_DOUBT_WAIT has passed since the attempt left. The receipt
    is in the log but not applied yet: the send must wait for it, not go again at once."""
    n = await register(http, deployment, sim)
    [(contact, conv)] = (await open_conversations(http, deployment, n, 1, "5513")).items()
    sim.inject(Failure(provider="whatsapp", action="delay", number=n.phone, latency_s=1.0))
    _, first = await send(http, deployment, conv, "in flight at the kill")

    async def leaving() -> Any:
        return await db.fetchrow(
            "SELECT sending_at FROM outbound_sends WHERE id = $1::uuid AND status = 'sending'", first["id"]
        )

    row = await wait_until(leaving, 30, "the attempt stored as leaving")
    deployment.kill(worker_label(deployment))

    async def receipt_posted() -> bool:
        return any(
            d.status == "sent" and d.http_status == 200
            for d in sim.stats().deliveries
            if d.provider_message_id in {a.provider_message_id for a in accepted_for(sim, n)}
        )

    await wait_until(receipt_posted, 30, "the provider taking it and its status webhook accepted by the API")
    wait_s = float(DEPLOYMENT_ENV["PARLEY_SEND_IN_DOUBT_WAIT"])
    over_at: float = row["sending_at"].timestamp() + wait_s + 0.5

    async def wait_over() -> bool:  # the scenario: the in-doubt wait ran out while no worker ran
        return time.time() > over_at

    await wait_until(wait_over, wait_s + 5, "the in-doubt wait to run out")
    deployment.start("worker", label="worker-receipt-in-log")
    _, second = await send(http, deployment, conv, "after the restart")

    async def both_sent() -> bool:
        count = await db.fetchval(
            "SELECT count(*) FROM outbound_sends WHERE id = ANY($1::uuid[]) AND status = 'sent'",
            [first["id"], second["id"]],
        )
        return bool(count == 2)

    await wait_until(both_sent, 90, "both messages sent after the restart")
    # The lane sends the second only after the first is settled: a resend would precede it.
    assert accepted_by_contact(sim, n) == {contact: [first["id"], second["id"]]}


async def test_kill_minus_9_with_receipts_sends_each_once_in_order(
    http: aiohttp.ClientSession, deployment: Deployment, sim: Simulator, db: asyncpg.Connection
) -> None:
    n, order, in_doubt = await kill_loop(http, deployment, sim, db, "receipts")
    accepted = [a.parley_message_id for a in accepted_for(sim, n)]
    duplicates = len(accepted) - len(set(accepted))
    print(
        f"kill -9 x3 with status webhooks: {TOTAL} messages, {len(in_doubt)} in doubt at the kills,"
        f" {duplicates} duplicates at the provider"
    )
    assert in_doubt, "no send was in flight at any kill: nothing was in doubt"
    assert duplicates == 0, [x for x in set(accepted) if accepted.count(x) > 1]
    assert accepted_by_contact(sim, n) == order  # exactly once, in the API's order per conversation
    assert await outbound_rows(db, n) == TOTAL


async def test_kill_minus_9_without_receipts_resends_once_per_kill_in_doubt(
    http: aiohttp.ClientSession, deployment: Deployment, sim: Simulator, db: asyncpg.Connection
) -> None:
    sim.configure_webhooks(WebhookSettings(enabled=False))
    try:
        n, order, in_doubt = await kill_loop(http, deployment, sim, db, "no-receipts")
    finally:
        sim.configure_webhooks(WebhookSettings())
    counts = Counter(a.parley_message_id for a in accepted_for(sim, n))
    duplicates = sum(counts.values()) - len(counts)
    thrice = [x for x, c in counts.items() if c > 2]
    print(
        f"kill -9 x3 without status webhooks: {TOTAL} messages, {len(in_doubt)} in doubt at the kills"
        f" ({sum(1 for c in in_doubt.values() if c > 1)} at two), {duplicates} duplicates at the provider"
        f" ({sum(1 for c in counts.values() if c == 2)} twice,"
        f" {len(thrice)} three times)"
    )
    assert in_doubt, "no send was in flight at any kill: nothing was in doubt"
    assert set(counts) == {x for xs in order.values() for x in xs}  # none lost
    # Sent again only after a kill left it in doubt, and once per such kill: a message in doubt
    # at one kill goes at most twice; three times only when its resend was in flight at the next.
    over = {x: (c, in_doubt[x]) for x, c in counts.items() if c > 1 + in_doubt[x]}
    assert not over, over
    got = accepted_by_contact(sim, n)
    assert {c: collapsed(xs) for c, xs in got.items()} == order  # a resend never overtakes
