"""Helpers for tests that watch workers: their /metrics, and the firings they produced."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import aiohttp
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from parley.status import parse_metrics
from streams.topics import Topics
from tests.integration.harness import Deployment, wait_until
from tests.integration.lifecycle_helpers import Thread


async def metrics(http: aiohttp.ClientSession, dep: Deployment) -> dict[str, float]:
    """A worker's /metrics as numbers ({} while it does not answer yet); a labelled series is
    keyed by its whole name, e.g. `parley_consumer_lag{topic="t",partition="0"}`."""
    try:
        async with http.get(f"http://127.0.0.1:{dep.metrics_port}/metrics") as r:
            return parse_metrics(await r.text())
    except aiohttp.ClientError:
        return {}


async def firings(dep: Deployment) -> list[dict[str, Any]]:
    """Every timer firing on the conversation topic so far."""
    topic = Topics(dep.name).conversation_events
    consumer = AIOKafkaConsumer(bootstrap_servers=dep.services.bootstrap, group_id=None)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(8)]  # the deployment's 8 partitions
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        end = await consumer.end_offsets(tps)
        out: list[dict[str, Any]] = []
        seen = dict.fromkeys(tps, -1)

        async def done() -> bool:
            for tp, records in (await consumer.getmany(timeout_ms=200)).items():
                for m in records:
                    seen[tp] = m.offset
                    value = orjson.loads(m.value) if m.value and m.value.startswith(b"{") else {}
                    if value.get("kind") == "timer.fired":
                        out.append(value)
            return all(seen[tp] >= end[tp] - 1 for tp in tps if end[tp] > 0)

        await wait_until(done, 30, "the whole topic read")
        return out
    finally:
        await consumer.stop()


async def open_threads(dep: Deployment, threads: list[Thread], at: datetime) -> None:
    """One first message per thread, straight onto the topic (acked): a conversation each."""
    producer = AIOKafkaProducer(bootstrap_servers=dep.services.bootstrap, acks="all", linger_ms=5)
    await producer.start()
    try:
        topic = Topics(dep.name).conversation_events
        futs = [
            await producer.send(topic, t.message("oi", at, "m").model_dump_json().encode(), key=t.key)
            for t in threads
        ]
        for fut in futs:
            await fut
    finally:
        await producer.stop()
