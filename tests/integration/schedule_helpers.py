"""Helpers for the schedules tests: the API, and what a subscriber sees on outgoing-events."""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition

from tests.integration.harness import Deployment


async def call(
    http: aiohttp.ClientSession,
    dep: Deployment,
    method: str,
    path: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any]:
    """(status, JSON body) of one admin API call."""
    async with http.request(
        method,
        f"{dep.base_url}{path}",
        json=body,
        headers={**dep.admin_headers(), **(headers or {})},
    ) as r:
        return r.status, None if r.status == 204 else await r.json()


def _partitions(dep: Deployment, topic: str) -> list[TopicPartition]:
    return [TopicPartition(topic, p) for p in range(int(dep.env().get("PARLEY_TOPIC_PARTITIONS", "8")))]


async def records_on(dep: Deployment, topic: str) -> int:
    """How many records the topic holds (the sum of its end offsets)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=dep.services.bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        return sum((await consumer.end_offsets(_partitions(dep, topic))).values())
    finally:
        await consumer.stop()


async def outgoing(dep: Deployment) -> list[dict[str, Any]]:
    """Every record on the deployment's outgoing-events topic so far (key added as `_key`)."""
    topic = f"{dep.name}.outgoing-events"
    consumer = AIOKafkaConsumer(bootstrap_servers=dep.services.bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        parts = _partitions(dep, topic)
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        ends = await consumer.end_offsets(parts)
        out: list[dict[str, Any]] = []
        remaining = {tp for tp in parts if ends[tp] > 0}
        while remaining:
            batch = await consumer.getmany(timeout_ms=1000)
            for tp, records in batch.items():
                for rec in records:
                    value = orjson.loads(rec.value or b"{}")
                    value["_key"] = (rec.key or b"").decode()
                    out.append(value)
                    if rec.offset + 1 >= ends[tp]:
                        remaining.discard(tp)
        return out
    finally:
        await consumer.stop()
