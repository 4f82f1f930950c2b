"""Baselines measured in the same run: raw aiokafka produce+consume, raw batched asyncpg insert."""

from __future__ import annotations

import asyncio
import re
import sys
import time
import uuid
from datetime import UTC, datetime

import asyncpg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic


async def kafka_produce_consume(bootstrap: str, n: int, size: int = 300, partitions: int = 8) -> float:
    """Messages per second to produce n records (acks=all, idempotent) and consume them back."""
    topic = "bench-raw-" + uuid.uuid4().hex[:8]
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    await admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)])
    await admin.close()
    payload = b"x" * size
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        enable_idempotence=True,
        acks="all",
        linger_ms=5,
        max_batch_size=256 * 1024,
    )
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest", max_poll_records=5000
    )
    await producer.start()
    await consumer.start()
    try:
        start = time.perf_counter()
        for chunk in range(0, n, 5000):
            futs = [
                await producer.send(topic, payload, key=str(i % 1000).encode())
                for i in range(chunk, min(n, chunk + 5000))
            ]
            await asyncio.gather(*futs)
        got = 0
        while got < n:
            batch = await consumer.getmany(timeout_ms=1000, max_records=5000)
            got += sum(len(v) for v in batch.values())
        return n / (time.perf_counter() - start)
    finally:
        await producer.stop()
        await consumer.stop()


async def pg_batched_insert(dsn: str, n: int, batch: int = 1000) -> float:
    """Rows per second of INSERT ... SELECT unnest(...) in batches, one transaction each."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            "CREATE TEMP TABLE bench_raw (id bigserial PRIMARY KEY, conversation_id uuid, channel_id text,"
            " provider_message_id text UNIQUE, text text, sent_at timestamptz,"
            " created_at timestamptz DEFAULT clock_timestamp())"
        )
        now = datetime.now(UTC)
        conv = uuid.uuid4()
        start = time.perf_counter()
        for off in range(0, n, batch):
            ids = [f"m{i}" for i in range(off, min(n, off + batch))]
            async with conn.transaction():
                await conn.execute(
                    "INSERT INTO bench_raw (conversation_id, channel_id, provider_message_id, text, sent_at)"
                    " SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[],"
                    " $5::timestamptz[])",
                    [conv] * len(ids),
                    ["ch"] * len(ids),
                    ids,
                    ["hello"] * len(ids),
                    [now] * len(ids),
                )
        return n / (time.perf_counter() - start)
    finally:
        await conn.close()


async def faust_noop(bootstrap: str, n: int, partitions: int = 8, path: str = "events") -> float:
    """Events per second through Faust's stream machinery alone (no-op agent, manual acks), by
    Faust's per-event path (`events`) or the batch path the worker's agents use (`batches`)."""
    topic = "bench-noop-" + uuid.uuid4().hex[:8]
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    await admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)])
    await admin.close()
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", linger_ms=5, max_batch_size=256 * 1024
    )
    await producer.start()
    try:
        for chunk in range(0, n, 5000):
            futs = [
                await producer.send(topic, b"x" * 300, key=str(i % 2000).encode())
                for i in range(chunk, min(n, chunk + 5000))
            ]
            await asyncio.gather(*futs)
    finally:
        await producer.stop()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.faust_noop",
        bootstrap,
        topic,
        str(n),
        path,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 600)
    found = re.search(r"RATE (\d+)", out.decode(errors="replace"))
    if found is None:
        raise RuntimeError(f"the Faust no-op run printed no rate: {out[-500:]!r} {err[-3000:].decode()}")
    return float(found.group(1))
