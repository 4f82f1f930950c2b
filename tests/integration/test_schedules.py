"""The schedules API on a real worker, Kafka and Postgres: answers, firing, who wins, results."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
from aiokafka import AIOKafkaProducer

from streams.records import SchedulePut, bundle_puts
from streams.topics import Topics, partition_of, partitioner
from tests.integration.harness import Deployment, wait_until
from tests.integration.schedule_helpers import call, outgoing, records_on


def _key(name: str) -> str:
    return f"{name}:{uuid.uuid4().hex[:8]}"


def _at(seconds: float) -> str:
    return (datetime.now(UTC) + timedelta(seconds=seconds)).isoformat()


async def _status_is(http: aiohttp.ClientSession, dep: Deployment, key: str, status: str, **more: Any) -> Any:
    async def probe() -> Any:
        code, body = await call(http, dep, "GET", f"/v1/schedules/{key}")
        ok = code == 200 and body["status"] == status and all(body.get(k) == v for k, v in more.items())
        return body if ok else None

    return await wait_until(probe, 30, f"{key} to be {status} {more}")


async def test_create_unchanged_reschedule_cancel_and_404(
    http: aiohttp.ClientSession, deployment: Deployment
) -> None:
    key = _key("close")
    body = {
        "run_at": _at(3600),
        "event_type": "reservation.pin.generate",
        "payload": {"r": 1},
        "max_attempts": 5,
    }
    code, created = await call(http, deployment, "PUT", f"/v1/schedules/{key}", body)
    assert code == 201, created
    assert (created["key"], created["status"], created["version"], created["late"]) == (
        key,
        "scheduled",
        1,
        False,
    )
    code, same = await call(http, deployment, "PUT", f"/v1/schedules/{key}", body)
    assert (code, same["result"], same["version"]) == (200, "unchanged", 1)
    code, moved = await call(http, deployment, "PUT", f"/v1/schedules/{key}", {**body, "run_at": _at(7200)})
    assert (code, moved["result"], moved["version"]) == (200, "rescheduled", 2)
    code, cancelled = await call(http, deployment, "DELETE", f"/v1/schedules/{key}")
    assert (code, cancelled["status"]) == (200, "cancelled")
    code, again = await call(http, deployment, "DELETE", f"/v1/schedules/{key}")
    assert (code, again["result"]) == (200, "unchanged")
    code, got = await call(http, deployment, "GET", f"/v1/schedules/{key}")
    assert code == 200 and got["status"] == "cancelled" and got["max_attempts"] == 5
    assert [h["kind"] for h in got["history"]] == ["created", "rescheduled", "cancelled"]
    code, missing = await call(http, deployment, "DELETE", f"/v1/schedules/{_key('nobody')}")
    assert code == 404, missing
    code, _ = await call(http, deployment, "GET", f"/v1/schedules/{_key('nobody')}")
    assert code == 404


async def test_idempotency_key_repeats_the_first_answer(
    http: aiohttp.ClientSession, deployment: Deployment
) -> None:
    key = _key("idem")
    body = {"delay": "PT1H", "event_type": "t"}
    headers = {"Idempotency-Key": "abc-1"}
    first = await call(http, deployment, "PUT", f"/v1/schedules/{key}", body, headers)
    second = await call(http, deployment, "PUT", f"/v1/schedules/{key}", body, headers)
    assert first[0] == 201 and second == first


async def test_fires_once_at_or_after_run_at_then_late_changes_answer_409(
    http: aiohttp.ClientSession, deployment: Deployment
) -> None:
    key = _key("pin")
    body = {"delay": 1, "event_type": "reservation.pin.generate", "payload": {"reservation": "r-9"}}
    code, created = await call(http, deployment, "PUT", f"/v1/schedules/{key}", body)
    assert code == 201, created
    fired = await _status_is(http, deployment, key, "fired")
    assert fired["fired_at"] >= created["run_at"] and fired["attempts"] == 1

    async def published() -> list[dict[str, Any]] | None:
        mine = [r for r in await outgoing(deployment) if r["_key"] == f"schedule:{key}"]  # the owner key
        return mine if len(mine) >= 2 else None

    mine = await wait_until(published, 30, "the fired events on outgoing-events")
    assert sorted(r["type"] for r in mine) == ["reservation.pin.generate", "schedule.fired"]
    [event] = [r for r in mine if r["type"] == "schedule.fired"]
    assert event["data"]["key"] == key and event["data"]["version"] == 1
    assert event["data"]["payload"] == {"reservation": "r-9"} and event["id"].startswith(f"schedule:{key}:")
    [own] = [r for r in mine if r["type"] == "reservation.pin.generate"]
    assert own["data"] == {"reservation": "r-9"} and own["id"] != event["id"]
    code, late = await call(http, deployment, "PUT", f"/v1/schedules/{key}", {**body, "delay": 60})
    assert code == 409 and late["schedule"]["status"] == "fired"
    code, late = await call(http, deployment, "DELETE", f"/v1/schedules/{key}")
    assert code == 409 and late["schedule"]["status"] == "fired"


async def test_a_schedule_in_the_past_fires_at_once_and_says_late(
    http: aiohttp.ClientSession, deployment: Deployment
) -> None:
    key = _key("past")
    code, created = await call(
        http, deployment, "PUT", f"/v1/schedules/{key}", {"run_at": _at(-60), "event_type": "t"}
    )
    assert code == 201 and created["late"] is True
    await _status_is(http, deployment, key, "fired")


async def test_reschedule_to_later_and_cancel_before_due_win(
    http: aiohttp.ClientSession, deployment: Deployment
) -> None:
    moved, cancelled = _key("moved"), _key("cancelled")
    for key in (moved, cancelled):
        code, _ = await call(http, deployment, "PUT", f"/v1/schedules/{key}", {"delay": 2, "event_type": "t"})
        assert code == 201
    code, later = await call(
        http, deployment, "PUT", f"/v1/schedules/{moved}", {"run_at": _at(4), "event_type": "t"}
    )
    assert code == 200 and later["version"] == 2
    code, _ = await call(http, deployment, "DELETE", f"/v1/schedules/{cancelled}")
    assert code == 200
    fired = await _status_is(http, deployment, moved, "fired")
    assert fired["fired_at"] >= later["run_at"] and fired["version"] == 2
    code, c = await call(http, deployment, "GET", f"/v1/schedules/{cancelled}")
    assert c["status"] == "cancelled" and c["attempts"] == 0

    async def both() -> list[dict[str, Any]] | None:
        records = await outgoing(deployment)
        fired = any(r["_key"] == f"schedule:{moved}" and r["type"] == "schedule.fired" for r in records)
        return records if fired else None

    records = await wait_until(both, 30, "the moved schedule's event")
    assert [
        r["data"]["version"]
        for r in records
        if r["_key"] == f"schedule:{moved}" and r["type"] == "schedule.fired"
    ] == [2]
    assert not [r for r in records if r["_key"] == f"schedule:{cancelled}"]


async def test_results_retry_with_backoff_then_failed_then_retry_endpoint(
    http: aiohttp.ClientSession, deployment: Deployment
) -> None:
    key = _key("flaky")
    body = {"delay": 0, "event_type": "t", "max_attempts": 3, "backoff": 0.5}
    assert (await call(http, deployment, "PUT", f"/v1/schedules/{key}", body))[0] == 201
    await _status_is(http, deployment, key, "fired", attempts=1)
    code, r = await call(
        http, deployment, "POST", f"/v1/schedules/{key}/result", {"ok": False, "error": "lock offline"}
    )
    assert (code, r["result"], r["status"], r["last_error"]) == (
        200,
        "retry_scheduled",
        "scheduled",
        "lock offline",
    )
    second = await _status_is(http, deployment, key, "fired", attempts=2)
    assert second["fired_at"] >= r["next_attempt_at"]
    code, r = await call(
        http, deployment, "POST", f"/v1/schedules/{key}/result", {"ok": False, "error": "again"}
    )
    assert code == 200 and r["result"] == "retry_scheduled"
    gap = datetime.fromisoformat(r["next_attempt_at"]) - datetime.fromisoformat(r["updated_at"])
    assert gap == timedelta(seconds=1)  # 0.5 s, then doubled
    await _status_is(http, deployment, key, "fired", attempts=3)
    code, r = await call(
        http, deployment, "POST", f"/v1/schedules/{key}/result", {"ok": False, "error": "third"}
    )
    assert (code, r["status"], r["attempts"], r["last_error"]) == (200, "failed", 3, "third")
    code, r = await call(http, deployment, "POST", f"/v1/schedules/{key}/result", {"ok": True})
    assert code == 409
    code, r = await call(http, deployment, "POST", f"/v1/schedules/{key}/retry")
    assert (code, r["status"], r["version"], r["attempts"]) == (200, "scheduled", 2, 0)
    await _status_is(http, deployment, key, "fired", version=2, attempts=1)
    code, r = await call(http, deployment, "POST", f"/v1/schedules/{key}/result", {"ok": True, "version": 2})
    assert (code, r["status"]) == (200, "succeeded")
    code, r = await call(http, deployment, "POST", f"/v1/schedules/{key}/retry")
    assert code == 409
    kinds = [h["kind"] for h in (await call(http, deployment, "GET", f"/v1/schedules/{key}"))[1]["history"]]
    assert kinds.count("fired") == 4 and kinds[-1] == "succeeded" and "retried" in kinds


async def test_bad_input_answers_422_with_the_field(
    http: aiohttp.ClientSession, deployment: Deployment
) -> None:
    url = f"/v1/schedules/{_key('bad')}"

    async def loc(body: Any) -> list[Any]:
        code, answer = await call(http, deployment, "PUT", url, body)
        assert code == 422, answer
        return [d["loc"][0] for d in answer["details"]]

    assert await loc({"run_at": _at(60), "event_type": "t", "color": "red"}) == ["color"]
    assert await loc({"run_at": _at(60), "event_type": "t", "payload": {"x": "y" * 70_000}}) == ["payload"]
    assert await loc({"run_at": "next tuesday", "event_type": "t"}) == ["run_at"]
    assert await loc({"run_at": _at(11 * 366 * 86400), "event_type": "t"}) == ["run_at"]
    assert await loc({"run_at": _at(60), "delay": 5, "event_type": "t"}) == ["run_at"]
    assert await loc({"delay": "soon", "event_type": "t"}) == ["delay"]
    code, answer = await call(
        http, deployment, "PUT", "/v1/schedules/bad%20key", {"delay": 1, "event_type": "t"}
    )
    assert code == 422 and answer["details"][0]["loc"] == ["key"]
    async with http.put(f"{deployment.base_url}{url}", json={"delay": 1, "event_type": "t"}) as r:
        assert r.status == 401


async def test_batch_list_cursor_and_cleanup(http: aiohttp.ClientSession, deployment: Deployment) -> None:
    kind = "batch." + uuid.uuid4().hex[:8]
    keys = [_key("b") for _ in range(5)]
    items: list[Any] = [{"key": k, "run_at": _at(3600 + i), "event_type": kind} for i, k in enumerate(keys)]
    items.append({"key": "no spaces", "delay": 1, "event_type": kind})
    code, answer = await call(http, deployment, "POST", "/v1/schedules:batch", {"items": items})
    assert code == 200, answer
    assert [a["code"] for a in answer["items"]] == [201] * 5 + [422]
    seen: list[str] = []
    cursor = None
    while True:
        query = f"/v1/schedules?event_type={kind}&status=scheduled&limit=2" + (
            f"&cursor={cursor}" if cursor else ""
        )
        code, page = await call(http, deployment, "GET", query)
        assert code == 200, page
        seen += [item["key"] for item in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == keys
    code, _ = await call(http, deployment, "GET", "/v1/schedules?cursor=bm90LWEtY3Vyc29y")
    assert code == 400
    code, _ = await call(http, deployment, "GET", "/v1/schedules?status=sleeping")
    assert code == 400
    for key in keys[:2]:
        assert (await call(http, deployment, "DELETE", f"/v1/schedules/{key}"))[0] == 200
    code, _ = await call(
        http, deployment, "DELETE", "/v1/schedules?status=scheduled&before=2100-01-01T00:00:00Z"
    )
    assert code == 400  # only finished schedules can be cleaned up
    before = (datetime.now(UTC) + timedelta(seconds=1)).isoformat().replace("+00:00", "Z")
    code, gone = await call(http, deployment, "DELETE", f"/v1/schedules?status=cancelled&before={before}")
    assert code == 200 and gone["deleted"] >= 2
    assert (await call(http, deployment, "GET", f"/v1/schedules/{keys[0]}"))[0] == 404
    assert (await call(http, deployment, "GET", f"/v1/schedules/{keys[2]}"))[0] == 200
    # a cleaned-up key starts over as a new schedule, and fires (no firing id of the old one reused)
    code, again = await call(
        http, deployment, "PUT", f"/v1/schedules/{keys[0]}", {"delay": 0, "event_type": kind}
    )
    assert code == 201 and again["version"] == 1
    await _status_is(http, deployment, keys[0], "fired")


async def test_many_commands_at_once_all_answered(
    http: aiohttp.ClientSession, deployment: Deployment
) -> None:
    keys = [_key("many") for _ in range(200)]
    sem = asyncio.Semaphore(64)

    async def put(key: str) -> int:
        async with sem:
            return (
                await call(
                    http, deployment, "PUT", f"/v1/schedules/{key}", {"delay": 3600, "event_type": "t"}
                )
            )[0]

    assert await asyncio.gather(*(put(k) for k in keys)) == [201] * 200


async def test_a_batch_travels_as_one_record_per_partition(
    http: aiohttp.ClientSession, deployment: Deployment
) -> None:
    topic = Topics(deployment.name).conversation_events
    kind = "bundle." + uuid.uuid4().hex[:8]
    keys = [_key("bundle") for _ in range(300)]
    before = await records_on(deployment, topic)
    items = [
        {"key": k, "run_at": _at(3600), "event_type": kind, "payload": {"n": i}} for i, k in enumerate(keys)
    ]
    code, answer = await call(http, deployment, "POST", "/v1/schedules:batch", {"items": items})
    assert code == 200, answer
    assert [(a["code"], a["key"], a["payload"]["n"]) for a in answer["items"]] == [
        (201, k, i) for i, k in enumerate(keys)
    ]
    assert 1 <= await records_on(deployment, topic) - before <= 8  # 8 partitions, not 300 records
    code, page = await call(http, deployment, "GET", f"/v1/schedules?event_type={kind}&limit=1000")
    assert code == 200 and sorted(i["key"] for i in page["items"]) == sorted(keys)


async def test_a_poison_put_in_a_bundle_is_parked_alone(
    http: aiohttp.ClientSession, deployment: Deployment
) -> None:
    # Postgres refuses U+0000 in jsonb; the API refuses it too, so it comes straight from Kafka,
    # in a bundle as the batch route makes them: three puts whose keys share a partition.
    topics = Topics(deployment.name)
    keys: list[str] = []
    while len(keys) < 3:
        key = _key("p")
        if not keys or partition_of(f"schedule:{key}".encode(), 8) == partition_of(
            f"schedule:{keys[0]}".encode(), 8
        ):
            keys.append(key)
    now = datetime.now(UTC)
    puts = [
        SchedulePut(
            event_id=f"sched:poison-test.{k}",
            key=k,
            run_at=now + timedelta(hours=1),
            event_type="t",
            payload={"bad": "\x00"} if i == 1 else {},
            issued_at=now,
        )
        for i, k in enumerate(keys)
    ]
    records = bundle_puts(puts, partitioner(8), limit=900_000)
    assert len(records) == 1
    producer = AIOKafkaProducer(bootstrap_servers=deployment.services.bootstrap, acks="all")
    await producer.start()
    try:
        [(record_key, value)] = records
        await producer.send_and_wait(topics.conversation_events, value, key=record_key)
    finally:
        await producer.stop()
    for good in (keys[0], keys[2]):
        await _status_is(http, deployment, good, "scheduled")
    assert (await call(http, deployment, "GET", f"/v1/schedules/{keys[1]}"))[0] == 404

    async def parked() -> list[dict[str, Any]] | None:
        code, body = await call(http, deployment, "GET", "/v1/dead-letters")
        assert code == 200
        items = [i for i in body["items"] if i["key"] == f"schedule:{keys[1]}"]
        return items or None

    [letter] = await wait_until(parked, 30, "the poison put's dead letter")
    assert SchedulePut.model_validate_json(letter["value"]) == puts[1]  # the put alone, not the bundle
