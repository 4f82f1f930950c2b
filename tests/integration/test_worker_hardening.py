"""The worker never stalls silently, and clocks that disagree never wedge a thread."""

from __future__ import annotations

import re
import uuid
from typing import Any

import aiohttp
import asyncpg
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from parley.localstack import free_port
from streams.records import LETTER_VALUE_CHARS
from streams.topics import Topics, thread_key
from tests.integration.harness import Deployment, GenericChannel, Services, message, wait_until


async def _post(
    http: aiohttp.ClientSession, base: str, channel: GenericChannel, body: dict[str, Any]
) -> None:
    raw, headers = channel.signed(body)
    async with http.post(f"{base}/webhooks/generic/{channel.id}", data=raw, headers=headers) as r:
        assert r.status == 200, await r.text()


async def _stored(db: asyncpg.Connection, contact: str, text: str) -> bool:
    return bool(
        await db.fetchval(
            "SELECT count(*) FROM messages m JOIN conversations c ON c.id = m.conversation_id"
            " WHERE c.contact_id = $1 AND m.text = $2",
            contact,
            text,
        )
    )


async def _metric(http: aiohttp.ClientSession, deployment: Deployment, name: str) -> float:
    async with http.get(f"http://127.0.0.1:{deployment.metrics_port}/metrics") as r:
        for line in (await r.text()).splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"no metric {name}")


async def _produce_raw(deployment: Deployment, key: bytes, value: bytes) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=deployment.services.bootstrap, acks="all")
    await producer.start()
    try:
        await producer.send_and_wait(Topics(deployment.name).conversation_events, value, key=key)
    finally:
        await producer.stop()


async def test_an_oversize_poison_event_is_parked_bounded_and_the_partition_moves_on(
    http: aiohttp.ClientSession, deployment: Deployment, channel: GenericChannel, db: asyncpg.Connection
) -> None:
    # ~900 KB of quotes and a NUL: escaped twice, the letter used to be ~1.8 MB, over Faust's
    # producer limit; parking failed, the writer died and the partition stopped for good.
    contact = "huge-" + uuid.uuid4().hex[:6]
    key = thread_key(channel.id, contact)
    await _produce_raw(deployment, key, b'"' * 900_000 + b"\x00")
    await _post(http, deployment.base_url, channel, message("after-huge", contact, "after the huge one"))
    await wait_until(lambda: _stored(db, contact, "after the huge one"), 60, "the message after the huge one")

    async def parked() -> asyncpg.Record | None:
        return await db.fetchrow(
            "SELECT id, value, error, value_bytes, truncated FROM dead_letters WHERE key = $1", key.decode()
        )

    letter = await wait_until(parked, 30, "the huge event's letter")
    assert len(letter["value"]) == LETTER_VALUE_CHARS
    assert "undecodable event" in letter["error"]
    assert (letter["value_bytes"], letter["truncated"]) == (900_001, True)

    # Re-driving it puts the ORIGINAL record back (fetched from its topic position), not the
    # truncated head: parked again, the new letter counts all 900,001 bytes.
    async with http.post(
        f"{deployment.base_url}/v1/dead-letters/{letter['id']}/retry", headers=deployment.admin_headers()
    ) as r:
        assert r.status == 202, await r.text()

    async def parked_again() -> list[asyncpg.Record] | None:
        rows = await db.fetch(
            "SELECT value_bytes, source_offset FROM dead_letters WHERE key = $1 ORDER BY id", key.decode()
        )
        return rows if len(rows) == 2 else None

    first, again = await wait_until(parked_again, 30, "the re-driven original to be parked again")
    assert again["value_bytes"] == 900_001 and again["source_offset"] > first["source_offset"]
    async with http.get(f"http://127.0.0.1:{deployment.metrics_port}/healthz") as r:
        assert r.status == 200, await r.text()


async def test_parking_is_retried_until_the_dead_letter_topic_takes_it(
    http: aiohttp.ClientSession, deployment: Deployment, channel: GenericChannel, db: asyncpg.Connection
) -> None:
    topics = Topics(deployment.name)
    admin = AIOKafkaAdminClient(bootstrap_servers=deployment.services.bootstrap)
    await admin.start()
    contact = "park-" + uuid.uuid4().hex[:6]
    key = thread_key(channel.id, contact)
    try:
        # The broker now refuses every letter (RecordTooLarge): parking fails until it is undone.
        await admin.alter_configs(
            [ConfigResource(ConfigResourceType.TOPIC, topics.dead_letters, {"max.message.bytes": "64"})]
        )
        failures_before = await _metric(http, deployment, "parley_lifecycle_parking_failures_total")
        await _produce_raw(deployment, key, b'{"kind": "nope"}')
        await _post(
            http, deployment.base_url, channel, message("after-refused", contact, "behind the refused letter")
        )

        async def failing() -> bool:
            return (
                await _metric(http, deployment, "parley_lifecycle_parking_failures_total") > failures_before
            )

        await wait_until(failing, 30, "parking to fail")
        # Nothing behind the poison event was applied: the partition is held, not skipped.
        assert not await _stored(db, contact, "behind the refused letter")
    finally:
        await admin.alter_configs(
            [ConfigResource(ConfigResourceType.TOPIC, topics.dead_letters, {"max.message.bytes": "1048588"})]
        )
        await admin.close()
    await wait_until(
        lambda: _stored(db, contact, "behind the refused letter"), 60, "the held partition to move on"
    )

    async def parked() -> bool:
        return bool(await db.fetchval("SELECT count(*) FROM dead_letters WHERE key = $1", key.decode()))

    await wait_until(parked, 30, "the letter, once the topic takes it")


async def test_api_processes_with_clocks_30s_apart_never_wedge_a_thread(
    http: aiohttp.ClientSession, deployment: Deployment, channel: GenericChannel, db: asyncpg.Connection
) -> None:
    # A second API process whose clock is 30 s behind. The current conversation used to be the
    # one with the greatest opened_at: a conversation opened through the slow process looked
    # older than the closed one before it, and the thread's next message failed forever.
    behind_port = free_port()
    label = "api-behind-" + uuid.uuid4().hex[:4]
    deployment.start("api", label=label, env={"PARLEY_HTTP_PORT": str(behind_port)}, clock_offset=-30)
    behind = f"http://127.0.0.1:{behind_port}"
    try:

        async def up() -> bool:
            try:
                async with http.get(f"{behind}/healthz") as r:
                    return r.status == 200
            except aiohttp.ClientError:
                return False

        await wait_until(up, 60, "the second API process")
        contact = "skew-" + uuid.uuid4().hex[:6]
        await _post(http, deployment.base_url, channel, message("s1", contact, "first, on time"))
        first = await wait_until(
            lambda: db.fetchrow("SELECT id FROM conversations WHERE contact_id = $1", contact), 30, "first"
        )
        async with http.post(
            f"{deployment.base_url}/v1/conversations/{first['id']}/close",
            json={"reason": "agent_closed"},
            headers=deployment.admin_headers(),
        ) as r:
            assert r.status == 202

        async def closed() -> bool:
            state = await db.fetchval("SELECT state FROM conversations WHERE id = $1", first["id"])
            return bool(state == "closed")

        await wait_until(closed, 30, "the agent's close")
        await _post(http, behind, channel, message("s2", contact, "second, from the slow clock"))

        async def two() -> list[asyncpg.Record] | None:
            rows = await db.fetch(
                "SELECT id, state, opened_at, closed_at, thread_seq FROM conversations"
                " WHERE contact_id = $1 ORDER BY thread_seq",
                contact,
            )
            return rows if len(rows) == 2 else None

        old, new = await wait_until(two, 30, "the second conversation")
        assert new["state"] == "idle" and new["opened_at"] >= old["closed_at"]
        await _post(http, deployment.base_url, channel, message("s3", contact, "third, on time again"))
        await wait_until(lambda: _stored(db, contact, "third, on time again"), 30, "the third message")
        conv_of_third = await db.fetchval(
            "SELECT conversation_id FROM messages WHERE text = $1", "third, on time again"
        )
        assert conv_of_third == new["id"]
        assert await db.fetchval("SELECT count(*) FROM conversations WHERE contact_id = $1", contact) == 2
        assert not await db.fetchval("SELECT count(*) FROM dead_letters WHERE key LIKE $1", f"%/{contact}")
    finally:
        deployment.stop(label)


async def test_a_worker_whose_writer_dies_leaves_with_exit_code_1(
    http: aiohttp.ClientSession, services: Services
) -> None:
    # Its own deployment: the broken worker is the only member of its group.
    dep = Deployment(services)
    await dep.create_database()
    dep.start("api")
    broken = dep.start("worker", module="tests.integration.broken_writer")
    try:
        await dep.wait_api(http)
        ch = GenericChannel(id="ch-" + dep.name)
        async with http.post(
            f"{dep.base_url}/v1/channels",
            json={"id": ch.id, "provider": "generic", "secret": ch.secret},
            headers=dep.admin_headers(),
        ) as r:
            assert r.status == 201
        await _post(http, dep.base_url, ch, message("boom", "5511", "the first batch"))

        async def exited() -> int | None:
            return broken.poll()

        code = await wait_until(exited, 90, "the worker with the dead writer to exit")
        assert code == 1
        # one writer per part of the split intake (PARLEY_WORKER_WRITERS): "lifecycle writer 0 died"
        died = r"lifecycle writer( \d+)? died: RuntimeError: injected writer bug"
        assert re.search(died, dep.log_of("worker"))
    finally:
        dep.stop_all()
