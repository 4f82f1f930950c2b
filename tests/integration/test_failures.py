"""Nothing accepted is lost: poison events are parked with their error; Kafka down -> 503."""

from __future__ import annotations

import uuid
from pathlib import Path

import aiohttp
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from parley.localstack import KafkaBroker, free_port
from streams.topics import Topics, thread_key
from tests.integration.harness import Deployment, GenericChannel, Services, message, wait_until


async def test_poison_event_is_dead_lettered_and_the_partition_moves_on(
    http: aiohttp.ClientSession, deployment: Deployment, channel: GenericChannel
) -> None:
    topics = Topics(deployment.name)
    contact = "poison-" + uuid.uuid4().hex[:6]
    key = thread_key(channel.id, contact)
    producer = AIOKafkaProducer(bootstrap_servers=deployment.services.bootstrap, acks="all")
    await producer.start()
    try:
        await producer.send_and_wait(topics.conversation_events, b'{"kind": "message.inbound"', key=key)
        await producer.send_and_wait(topics.conversation_events, b'{"kind": "nope"}', key=key)
    finally:
        await producer.stop()
    # A good message on the same partition, after the poison ones.
    raw, headers = channel.signed(message("after-poison", contact, "still here"))
    async with http.post(
        f"{deployment.base_url}/webhooks/generic/{channel.id}", data=raw, headers=headers
    ) as r:
        assert r.status == 200

    async def stored() -> bool:
        async with http.get(
            f"{deployment.base_url}/v1/conversations",
            params={"contact": contact},
            headers=deployment.admin_headers(),
        ) as r:
            return bool((await r.json())["items"])

    await wait_until(stored, 30, "the good message after the poison ones")

    consumer = AIOKafkaConsumer(
        topics.dead_letters,
        bootstrap_servers=deployment.services.bootstrap,
        auto_offset_reset="earliest",
        group_id=None,
    )
    await consumer.start()
    letters: list[dict[str, object]] = []
    try:

        async def two_letters() -> bool:
            batch = await consumer.getmany(timeout_ms=500)
            for records in batch.values():
                letters.extend(orjson.loads(m.value) for m in records if m.key == key)
            return len(letters) >= 2

        await wait_until(two_letters, 30, "two dead letters")
    finally:
        await consumer.stop()
    assert [letter["value"] for letter in letters] == ['{"kind": "message.inbound"', '{"kind": "nope"}']
    for letter in letters:
        assert "undecodable event" in str(letter["error"])
        assert letter["source_topic"] == topics.conversation_events
        assert letter["key"] == key.decode()

    # The admin API lists them (projected from the topic) and can re-drive one.
    async def listed() -> list[dict[str, object]] | None:
        async with http.get(
            f"{deployment.base_url}/v1/dead-letters", headers=deployment.admin_headers()
        ) as r:
            assert r.status == 200
            items = [i for i in (await r.json())["items"] if i["key"] == key.decode()]
        return items if len(items) == 2 else None

    items = await wait_until(listed, 30, "the dead letters in the admin API")
    assert len({i["source_offset"] for i in items}) == 2
    async with http.post(
        f"{deployment.base_url}/v1/dead-letters/{items[0]['id']}/retry", headers=deployment.admin_headers()
    ) as r:
        assert r.status == 202, await r.text()

    async def parked_again() -> bool:
        async with http.get(
            f"{deployment.base_url}/v1/dead-letters", headers=deployment.admin_headers()
        ) as r:
            items = [i for i in (await r.json())["items"] if i["key"] == key.decode()]
        # still poison: re-driving puts it back on its topic, and it is parked again, not lost
        return len(items) == 3 and any(i["retried_at"] for i in items)

    await wait_until(parked_again, 30, "the re-driven poison event to be parked again")
    async with http.post(
        f"{deployment.base_url}/v1/dead-letters/999999/retry", headers=deployment.admin_headers()
    ) as r:
        assert r.status == 404


async def test_webhook_answers_503_when_kafka_is_down(
    http: aiohttp.ClientSession,
    services: Services,
    channel: GenericChannel,
    deployment: Deployment,
    private_dir: Path,
) -> None:
    broker = KafkaBroker(private_dir, free_port())
    broker.start()
    dep = Deployment(
        Services(bootstrap=broker.bootstrap, postgres_url=services.postgres_url),
        extra_env={"PARLEY_PRODUCE_TIMEOUT": "2"},
    )
    await dep.create_database()
    try:
        dep.start("api")
        await dep.wait_api(http)
        async with http.post(
            f"{dep.base_url}/v1/channels",
            headers=dep.admin_headers(),
            json={"id": channel.id, "provider": "generic", "secret": channel.secret},
        ) as r:
            assert r.status == 201
        raw, headers = channel.signed(message("while-up", "5511", "up"))
        async with http.post(f"{dep.base_url}/webhooks/generic/{channel.id}", data=raw, headers=headers) as r:
            assert r.status == 200
        broker.stop()
        raw, headers = channel.signed(message("while-down", "5511", "down"))
        async with http.post(f"{dep.base_url}/webhooks/generic/{channel.id}", data=raw, headers=headers) as r:
            body = await r.json()
            assert r.status == 503 and "retry" in body["error"], body
    finally:
        dep.stop_all()
        broker.stop()
