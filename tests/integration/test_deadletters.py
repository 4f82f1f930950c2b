"""The dead-letter projection never acks a letter it did not write, and never loops forever."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import aiohttp
import asyncpg
from aiokafka import AIOKafkaProducer

from streams.records import DeadLetter
from streams.topics import Topics
from tests.integration.harness import Deployment, wait_until

DEPLOYMENT_ENV = {"PARLEY_WORKER_RETRIES": "1"}


def _letter(key: str, attempts: int = 1) -> bytes:
    return (
        DeadLetter.bounded(
            source_topic="somewhere",
            partition=0,
            offset=42,
            key=key,
            raw=b'{"kind": "nope"}',
            error="undecodable event: test",
            attempts=attempts,
            failed_at=datetime.now(UTC),
        )
        .model_dump_json()
        .encode()
    )


async def _park(dep: Deployment, *letters: tuple[str, bytes]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=dep.services.bootstrap, acks="all")
    await producer.start()
    try:
        for key, value in letters:
            await producer.send_and_wait(Topics(dep.name).dead_letters, value, key=key.encode())
    finally:
        await producer.stop()


async def _rows(db: asyncpg.Connection, key: str) -> list[dict[str, object]]:
    return [dict(r) for r in await db.fetch("SELECT * FROM dead_letters WHERE key = $1 ORDER BY id", key)]


async def test_a_letter_postgres_refuses_gets_a_placeholder_and_the_rest_goes_through(
    deployment: Deployment, db: asyncpg.Connection
) -> None:
    bad, good = "bad-" + uuid.uuid4().hex[:6], "good-" + uuid.uuid4().hex[:6]
    # attempts does not fit the int4 column: Postgres can never store this letter as it is.
    await _park(deployment, (bad, _letter(bad, attempts=2**31)), (good, _letter(good)))

    async def both() -> bool:
        return bool(await _rows(db, bad)) and bool(await _rows(db, good))

    await wait_until(both, 60, "the good letter and a placeholder for the bad one")
    [placeholder] = await _rows(db, bad)
    assert "could not be projected" in str(placeholder["error"])
    assert "2147483648" in str(placeholder["value"])  # the raw letter, for the operator
    [row] = await _rows(db, good)
    assert row["source_offset"] == 42 and row["attempts"] == 1


async def test_a_letter_is_not_lost_when_the_worker_stops_mid_retry(
    http: aiohttp.ClientSession, deployment: Deployment, db: asyncpg.Connection
) -> None:
    key = "mid-retry-" + uuid.uuid4().hex[:6]
    failing = "dead letters: projecting 1 failed"
    before = deployment.log_of("worker").count(failing)
    await db.execute("ALTER TABLE dead_letters RENAME TO dead_letters_away")
    try:
        await _park(deployment, (key, _letter(key)))

        async def retrying() -> bool:
            return deployment.log_of("worker").count(failing) > before

        await wait_until(retrying, 60, "the projection to be retrying")
        deployment.stop("worker")  # graceful: Faust commits what was acked
    finally:
        await db.execute("ALTER TABLE dead_letters_away RENAME TO dead_letters")
    deployment.start("worker")

    async def projected() -> bool:
        return bool(await _rows(db, key))

    await wait_until(projected, 90, "the letter, projected by the restarted worker")
    [row] = await _rows(db, key)
    assert row["source_topic"] == "somewhere"
