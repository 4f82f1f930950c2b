"""The scheduler's time horizon on a real worker: actions due beyond it live only in Postgres until
the loader reads them in, and still fire on time, never early, once; a reschedule or a cancel of
such an action wins; a restart loses none.

The horizon is 2 s here (the loader advances every second) and the sweep is off: every firing
must come from the worker's memory, put there by the lifecycle agent or by the loader."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition

from domain.actions import due_ms
from streams.topics import Topics
from tests.integration.harness import Deployment, wait_until
from tests.integration.schedule_helpers import call, outgoing
from tests.integration.worker_helpers import metrics

HORIZON_S = 2
DEPLOYMENT_ENV = {"PARLEY_SCHEDULER_HORIZON": str(HORIZON_S), "PARLEY_SWEEP_INTERVAL": "0"}
ON_TIME = timedelta(seconds=2)  # a firing is within ms of its due; room for a loaded, shared box


def _key(name: str) -> str:
    return f"hz-{name}:{uuid.uuid4().hex[:8]}"


def _at(seconds: float) -> datetime:
    return datetime.now(UTC) + timedelta(seconds=seconds)


async def _put(http: aiohttp.ClientSession, dep: Deployment, key: str, run_at: datetime) -> dict[str, Any]:
    code, body = await call(
        http, dep, "PUT", f"/v1/schedules/{key}", {"run_at": run_at.isoformat(), "event_type": "hz"}
    )
    assert code in (200, 201), body
    return dict(body)


async def _status(http: aiohttp.ClientSession, dep: Deployment, key: str, status: str) -> dict[str, Any]:
    async def probe() -> dict[str, Any] | None:
        code, body = await call(http, dep, "GET", f"/v1/schedules/{key}")
        return dict(body) if code == 200 and body["status"] == status else None

    return await wait_until(probe, 60, f"{key} to be {status}")


async def _dues(dep: Deployment, keys: set[str]) -> list[tuple[str, int, dict[str, Any]]]:
    """(key, Kafka timestamp ms, record) of every schedule.due the worker put on the topic for
    `keys`: the timestamp is when the producer took it, so it shows an early firing, which the
    record's own fired_at (clamped to the due) cannot."""
    topic = Topics(dep.name).conversation_events
    consumer = AIOKafkaConsumer(bootstrap_servers=dep.services.bootstrap, group_id=None)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(8)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        end = await consumer.end_offsets(tps)
        seen = dict.fromkeys(tps, -1)
        out: list[tuple[str, int, dict[str, Any]]] = []

        async def done() -> bool:
            for tp, records in (await consumer.getmany(timeout_ms=200)).items():
                for m in records:
                    seen[tp] = m.offset
                    value = orjson.loads(m.value) if m.value and m.value.startswith(b"{") else {}
                    if value.get("kind") == "schedule.due" and value.get("key") in keys:
                        out.append((value["key"], m.timestamp, value))
            return all(seen[tp] >= end[tp] - 1 for tp in tps if end[tp] > 0)

        await wait_until(done, 30, "the conversation topic read")
        return out
    finally:
        await consumer.stop()


def _assert_fired_once_on_time(
    fired: list[tuple[str, int, dict[str, Any]]], due: dict[str, datetime]
) -> None:
    assert sorted(k for k, _, _ in fired) == sorted(due), "each action fires exactly once"
    for key, produced_ms, record in fired:
        want = due_ms(due[key])
        assert record["source"] == "timer"
        assert abs(due_ms(datetime.fromisoformat(record["due_at"])) - want) <= 1, (key, record)
        assert produced_ms >= want, f"{key} fired {want - produced_ms} ms early"
        assert produced_ms < want + ON_TIME / timedelta(milliseconds=1), f"{key} {produced_ms - want} ms late"


async def _held(http: aiohttp.ClientSession, dep: Deployment) -> dict[str, float]:
    got = await metrics(http, dep)
    assert got, "the worker's metrics answer"
    return got


async def test_an_action_beyond_the_horizon_waits_in_postgres_then_fires_on_time_once(
    http: aiohttp.ClientSession, deployment: Deployment
) -> None:
    key = _key("far")
    due = _at(10)
    created = await _put(http, deployment, key, due)
    assert created["status"] == "scheduled"
    # The same PUT again is answered after the first one's batch was applied (same partition,
    # in order), so from here on the worker has carried out that arming.
    assert (await _put(http, deployment, key, due))["result"] == "unchanged"
    held = await _held(http, deployment)
    assert held["parley_timers_loaded_until_seconds"] * 1000 < due_ms(due), (
        "the test ran too slowly to see it"
    )
    assert held["parley_timers_active"] == 0, "an action beyond the horizon is held in memory"
    loaded_before = held["parley_timers_loaded_total"]

    fired = await _status(http, deployment, key, "fired")
    assert fired["attempts"] == 1
    _assert_fired_once_on_time(await _dues(deployment, {key}), {key: due})
    assert (await _held(http, deployment))["parley_timers_loaded_total"] >= loaded_before + 1

    async def published() -> list[dict[str, Any]] | None:
        owner = f"schedule:{key}"
        mine = [r for r in await outgoing(deployment) if r["_key"] == owner and r["type"] == "schedule.fired"]
        return mine or None

    assert len(await wait_until(published, 30, "schedule.fired on outgoing-events")) == 1


async def test_a_far_action_moved_near_fires_at_the_near_time(
    http: aiohttp.ClientSession, deployment: Deployment
) -> None:
    inside, beyond = _key("near-inside"), _key("near-beyond")
    for key in (inside, beyond):
        await _put(http, deployment, key, _at(120))
    # one moved within the horizon (to memory at once), one still beyond it (via the loader)
    due = {inside: _at(1.5), beyond: _at(5)}
    for key, at in due.items():
        moved = await _put(http, deployment, key, at)
        assert moved["result"] == "rescheduled" and moved["version"] == 2
    for key in due:
        assert (await _status(http, deployment, key, "fired"))["version"] == 2
    _assert_fired_once_on_time(await _dues(deployment, set(due)), due)


async def test_a_cancelled_far_action_never_fires(
    http: aiohttp.ClientSession, deployment: Deployment
) -> None:
    cancelled, moved_then_cancelled, sentinel = _key("cancel"), _key("cancel-moved"), _key("sentinel")
    due = _at(4)
    await _put(http, deployment, cancelled, due)
    await _put(http, deployment, moved_then_cancelled, _at(60))
    await _put(http, deployment, moved_then_cancelled, due)  # in memory once the loader reads it
    await _put(http, deployment, sentinel, due + timedelta(seconds=1))

    async def loaded_past_due() -> bool:
        return (await _held(http, deployment))["parley_timers_loaded_until_seconds"] * 1000 > due_ms(due)

    # Cancel one while it lives only in Postgres, the other once the loader brought it in.
    code, _ = await call(http, deployment, "DELETE", f"/v1/schedules/{cancelled}")
    assert code == 200
    await wait_until(loaded_past_due, 30, "the horizon to pass the cancelled actions' due")
    code, _ = await call(http, deployment, "DELETE", f"/v1/schedules/{moved_then_cancelled}")
    assert code == 200
    assert datetime.now(UTC) < due, "the test ran too slowly: the second cancel came after the due"
    # Firings come out in due order: once the sentinel, due a second later, has fired, the
    # cancelled ones would have.
    await _status(http, deployment, sentinel, "fired")
    fired = await _dues(deployment, {cancelled, moved_then_cancelled, sentinel})
    assert [k for k, _, _ in fired] == [sentinel]
    for key in (cancelled, moved_then_cancelled):
        code, body = await call(http, deployment, "GET", f"/v1/schedules/{key}")
        assert body["status"] == "cancelled" and body["attempts"] == 0


async def test_a_restart_loses_no_action_beyond_the_horizon(
    http: aiohttp.ClientSession, deployment: Deployment
) -> None:
    n = 40
    keys = [_key(f"restart-{i}") for i in range(n)]
    start = datetime.now(UTC)
    due = {k: start + timedelta(seconds=25, milliseconds=100 * i) for i, k in enumerate(keys)}
    sem = asyncio.Semaphore(16)

    async def put(key: str) -> None:
        async with sem:
            await _put(http, deployment, key, due[key])

    await asyncio.gather(*(put(k) for k in keys))
    deployment.stop("worker")
    deployment.start("worker")
    await deployment.wait_ready(http)

    async def loaded() -> bool:
        return (await metrics(http, deployment)).get("parley_timers_loaded_until_seconds", 0) > 0

    await wait_until(loaded, 60, "the restarted worker's first load")
    assert datetime.now(UTC) < min(due.values()) - timedelta(seconds=HORIZON_S), "restarted too late"
    for key in keys:
        await _status(http, deployment, key, "fired")
    _assert_fired_once_on_time(await _dues(deployment, set(keys)), due)
