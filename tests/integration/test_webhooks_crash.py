"""kill -9 of the worker in the middle of 1,000 events to 3 endpoints: nothing missing, each
conversation's order kept at every endpoint, a repeat only ever with the same webhook-id."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiokafka import AIOKafkaProducer

from tests.integration.harness import Deployment, wait_until
from tests.integration.webhook_helpers import Received, Receiver, create_endpoint

DEPLOYMENT_ENV = {
    "PARLEY_OUTBOUND_ALLOW_HTTP": "true",
    "PARLEY_OUTBOUND_ALLOW_PRIVATE": "true",
    "PARLEY_WEBHOOK_RETRY_SCHEDULE": "0,0.2,0.5,1,1,1,1,1",
    "PARLEY_KAFKA_SESSION_TIMEOUT": "6",
}
KEYS, PER_KEY = 100, 10
ENDPOINTS = ("a", "b", "c")


@pytest.fixture(scope="module")
async def receiver() -> AsyncIterator[Receiver]:
    r = await Receiver().start()
    yield r
    await r.stop()


async def slow_ok(_: Received) -> web.StreamResponse:
    await asyncio.sleep(0.005)  # a real endpoint's think time, so the kill lands mid-way
    return web.Response(status=200)


async def test_kill_minus_9_during_deliveries_loses_nothing_and_keeps_order(
    http: aiohttp.ClientSession, deployment: Deployment, receiver: Receiver
) -> None:
    for path in ENDPOINTS:
        await create_endpoint(http, deployment, receiver, path, ["test.crash"])
        receiver.answers[path] = slow_ok
    # Events as the outbox relay publishes them: keyed by conversation, in order per key.
    producer = AIOKafkaProducer(bootstrap_servers=deployment.services.bootstrap, acks="all")
    await producer.start()
    sent: dict[str, bytes] = {}
    try:
        for i in range(PER_KEY):
            for k in range(KEYS):
                event_id = f"crash-{k}-{i}"
                body = orjson.dumps(
                    {
                        "type": "test.crash",
                        "id": event_id,
                        "timestamp": "2026-12-02T00:00:00+00:00",
                        "data": {"key": k, "seq": i},
                    }
                )
                sent[event_id] = body
                await producer.send(f"{deployment.name}.outgoing-events", body, key=f"conv/{k}".encode())
        await producer.flush()
    finally:
        await producer.stop()

    total = KEYS * PER_KEY * len(ENDPOINTS)
    await wait_until(lambda: _received(receiver, total // 3), 120, "a third of the deliveries")
    deployment.kill("worker")  # kill -9 with deliveries in flight and most still pending
    at_kill = len(receiver.requests)
    deployment.start("worker", label="worker-2")

    async def all_in() -> bool:
        return all({r.id for r in receiver.at(path)} >= set(sent) for path in ENDPOINTS)

    await wait_until(all_in, 180, "every event at every endpoint after the restart")
    assert at_kill < total, "the kill came after everything was delivered: nothing was tested"
    for path in ENDPOINTS:
        got = receiver.at(path)
        assert all(r.verified for r in got)
        assert {r.id for r in got} == set(sent)  # nothing missing, nothing invented
        assert all(r.body == sent[r.id] for r in got)  # a repeat is the same event, same id
        seen: dict[int, int] = {}  # key -> how many of its events arrived so far (in order)
        for r in got:
            data = r.event["data"]
            k, i = data["key"], data["seq"]
            assert i <= seen.get(k, 0), f"{path}: key {k} event {i} before event {seen.get(k, 0)}"
            seen[k] = max(seen.get(k, 0), i + 1)
    repeats = len(receiver.requests) - total
    print(f"kill at {at_kill}/{total} deliveries; {repeats} repeats (same ids)")


async def _received(receiver: Receiver, n: int) -> bool:
    return len(receiver.requests) >= n
