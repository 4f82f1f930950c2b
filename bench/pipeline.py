"""Parley's own figures: webhook ingress, worker throughput into Postgres, webhook-to-row latency."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime

import aiohttp
import asyncpg
import orjson
from aiokafka import AIOKafkaProducer

from bench.progress import waiting
from channels import whatsapp
from parley.status import consumer_lag
from streams.records import InboundMessage
from streams.topics import Topics, thread_key
from tests.integration.harness import Deployment, GenericChannel, message


async def register(http: aiohttp.ClientSession, dep: Deployment, ch: GenericChannel) -> None:
    """Create the generic channel the load is signed for."""
    async with http.post(
        f"{dep.base_url}/v1/channels",
        headers=dep.admin_headers(),
        json={"id": ch.id, "provider": "generic", "secret": ch.secret},
    ) as r:
        assert r.status == 201, await r.text()


async def produce_messages(
    bootstrap: str, topic: str, channel_id: str, items: Iterable[tuple[str, str, datetime]]
) -> None:
    """Put inbound messages (event id, contact, time) straight on the topic, acks=all, in chunks."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        acks="all",
        enable_idempotence=True,
        linger_ms=5,
        max_batch_size=256 * 1024,
    )
    await producer.start()
    try:
        futs = []
        for event_id, contact, at in items:
            rec = InboundMessage(
                event_id=event_id,
                channel_id=channel_id,
                contact_id=contact,
                provider="generic",
                provider_message_id=event_id.replace(":", "-"),
                text="hello",
                sent_at=at,
                received_at=at,
            )
            key = thread_key(channel_id, contact)
            futs.append(await producer.send(topic, rec.model_dump_json().encode(), key=key))
            if len(futs) >= 5000:
                await asyncio.gather(*futs)
                futs.clear()
        await asyncio.gather(*futs)
    finally:
        await producer.stop()


def events(run: str, n: int, contacts: int) -> Iterator[tuple[str, str, datetime]]:
    """n inbound messages of one run over `contacts` threads: (event id, contact, time)."""
    now = datetime.now(UTC)
    return ((f"bench:{run}:{i}", f"w{run}-{i % contacts}", now) for i in range(n))


async def stored_rows(db: asyncpg.Connection) -> int:
    """Messages inserted so far: the id sequence, read without scanning the table."""
    n: int = await db.fetchval("SELECT COALESCE(max(id), 0) FROM messages")
    return n


async def reached(db: asyncpg.Connection, n: int) -> bool:
    return await stored_rows(db) >= n


async def worker_throughput(dep: Deployment, channel_id: str, n: int, contacts: int = 2000) -> float:
    """Events per second from Kafka into Postgres rows, the worker alone: the events are produced
    while the worker is stopped, then it starts and drains them; timed from first to last row."""
    run = uuid.uuid4().hex[:6]
    topic = Topics(dep.name).conversation_events
    db = await asyncpg.connect(dep.database_url)
    dep.stop("worker")
    try:
        await produce_messages(dep.services.bootstrap, topic, channel_id, events(run, n, contacts))
        base = await stored_rows(db)
        dep.start("worker")
        await waiting(lambda: reached(db, base + 1), 120, "the first row")
        start = time.perf_counter()
        first = await stored_rows(db) - base
        await waiting(lambda: reached(db, base + n), 600, "all rows")
        return (n - first) / (time.perf_counter() - start)
    finally:
        await db.close()


Request = tuple[bytes, dict[str, str]]


def generic_requests(ch: GenericChannel, n: int) -> tuple[str, list[str], list[Request]]:
    """n signed generic-channel webhooks over 2,000 contacts: (path, message ids, requests)."""
    run = uuid.uuid4().hex[:6]
    ids = [f"h{run}-{i}" for i in range(n)]
    requests = [ch.signed(message(m, f"h{run}-{i % 2000}", "hello")) for i, m in enumerate(ids)]
    return f"/webhooks/generic/{ch.id}", ids, requests


def whatsapp_requests(phone_number_id: str, app_secret: str, n: int) -> tuple[str, list[str], list[Request]]:
    """n signed WhatsApp Cloud API webhooks (one text message each, Meta's envelope)."""
    run = uuid.uuid4().hex[:6]
    ids = [f"wamid.{run}.{i}" for i in range(n)]
    requests = []
    for i, wamid in enumerate(ids):
        contact = f"55{i % 2000}"
        value = {
            "messaging_product": "whatsapp",
            "metadata": {"display_phone_number": "15550000000", "phone_number_id": phone_number_id},
            "contacts": [{"profile": {"name": "Bench"}, "wa_id": contact}],
            "messages": [
                {
                    "from": contact,
                    "id": wamid,
                    "timestamp": str(int(time.time())),
                    "type": "text",
                    "text": {"body": "hello"},
                }
            ],
        }
        body = orjson.dumps(
            {
                "object": "whatsapp_business_account",
                "entry": [{"id": "1", "changes": [{"field": "messages", "value": value}]}],
            }
        )
        requests.append(
            (
                body,
                {"Content-Type": "application/json", "X-Hub-Signature-256": whatsapp.sign(app_secret, body)},
            )
        )
    return "/webhooks/whatsapp", ids, requests


async def ingress(
    dep: Deployment,
    ch: GenericChannel,
    n: int,
    concurrency: int = 64,
    rate: float | None = None,
    prepared: tuple[str, list[str], list[Request]] | None = None,
) -> tuple[float, list[float], list[tuple[str, float]]]:
    """Send n signed webhooks (flat out, or paced at `rate`/s); returns (accepted/s, latencies, sent)."""
    path, ids, bodies = prepared or generic_requests(ch, n)
    latencies: list[float] = []
    sent: list[tuple[str, float]] = []
    url = f"{dep.base_url}{path}"
    queue: asyncio.Queue[int] = asyncio.Queue()
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as http:

        async def client() -> None:
            while True:
                i = await queue.get()
                if i < 0:
                    return
                raw, headers = bodies[i]
                t0 = time.perf_counter()
                wall = time.time()
                async with http.post(url, data=raw, headers=headers) as r:
                    await r.read()
                    if r.status == 200:
                        latencies.append(time.perf_counter() - t0)
                        sent.append((ids[i], wall))

        workers = [asyncio.create_task(client()) for _ in range(concurrency)]
        start = time.perf_counter()
        for i in range(n):
            if rate:
                delay = start + i / rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)  # pacing the offered load
            queue.put_nowait(i)
        for _ in workers:
            queue.put_nowait(-1)
        await asyncio.gather(*workers)
        elapsed = time.perf_counter() - start
    return len(latencies) / elapsed, latencies, sent


async def webhook_to_row(dep: Deployment, sent: list[tuple[str, float]]) -> list[float]:
    """Seconds from a webhook's send to its row's insert, for every message in `sent`."""
    db = await asyncpg.connect(dep.database_url)
    try:
        ids = [s[0] for s in sent]
        await waiting(lambda: _all_in(db, ids), 300, "every paced message")
        rows = await db.fetch(
            "SELECT provider_message_id, extract(epoch FROM created_at) AS at FROM messages"
            " WHERE channel_id = 'bench' AND direction = 'inbound'"
            " AND provider_message_id = ANY($1::text[])",
            ids,
        )
        at = {r["provider_message_id"]: float(r["at"]) for r in rows}
        return [at[i] - t for i, t in sent]
    finally:
        await db.close()


async def _all_in(db: asyncpg.Connection, ids: list[str]) -> bool:
    # Cheap probe first (the last id sent is usually among the last stored), exact check after.
    if not await db.fetchval(
        "SELECT 1 FROM messages WHERE channel_id = 'bench' AND direction = 'inbound'"
        " AND provider_message_id = $1",
        ids[-1],
    ):
        return False
    n: int = await db.fetchval(
        "SELECT count(*) FROM messages WHERE channel_id = 'bench' AND direction = 'inbound'"
        " AND provider_message_id = ANY($1::text[])",
        ids,
    )
    return n >= len(ids)


async def lag(dep: Deployment) -> int:
    """Records of the conversation topic not yet committed by the worker's consumer group
    (`parley status`'s reading: committed offsets against end offsets, from Kafka)."""
    topic = Topics(dep.name).conversation_events
    return (await consumer_lag(dep.services.bootstrap, dep.name, [topic]))[topic].lag


async def drained(dep: Deployment, what: str = "phase") -> None:
    """Print the backlog at the start of a phase, then wait until the group's lag is 0."""
    print(f"    lag at the start of the {what}: {await lag(dep):,} records", flush=True)

    async def empty() -> bool:
        return await lag(dep) == 0

    await waiting(empty, 900, "the worker's backlog to reach 0")
