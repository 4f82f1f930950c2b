"""Outgoing webhooks on a real worker, Kafka, Postgres and real receivers on loopback: the
endpoints API, signatures (checked by the independent `standardwebhooks` package), retries,
Retry-After, 410, parking and manual retry, isolation of a hanging endpoint, rotation, replay."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import asyncpg
import pytest

from parley.localstack import free_port
from tests.integration.harness import Deployment, GenericChannel, message, wait_until
from tests.integration.schedule_helpers import call
from tests.integration.webhook_helpers import Receiver, create_endpoint, fail_first, hang, status

DEPLOYMENT_ENV = {
    "PARLEY_OUTBOUND_ALLOW_HTTP": "true",
    "PARLEY_OUTBOUND_ALLOW_PRIVATE": "true",  # the receivers are on loopback
    "PARLEY_WEBHOOK_RETRY_SCHEDULE": "0,0.3,0.6,1,1,1,1,1",
    "PARLEY_WEBHOOK_DISABLE_AFTER": "8",
    "PARLEY_WEBHOOK_TIMEOUT": "10",
}


@pytest.fixture(scope="module")
async def receiver() -> AsyncIterator[Receiver]:
    r = await Receiver().start()
    yield r
    await r.stop()


async def fire(
    http: aiohttp.ClientSession, dep: Deployment, event_type: str = "test.tick", **payload: Any
) -> str:
    """A schedule due now: it fires at once and emits schedule.fired and `event_type` (whose data
    is the payload, here with the key in it too)."""
    key = f"hook:{uuid.uuid4().hex[:10]}"
    past = (datetime.now(UTC) - timedelta(seconds=1)).isoformat()
    body = {"run_at": past, "event_type": event_type, "payload": {"key": key, **payload}}
    code, body = await call(http, dep, "PUT", f"/v1/schedules/{key}", body)
    assert code == 201, body
    return key


def keys_of(received: list[Any]) -> set[str]:
    return {r.event["data"].get("key") for r in received if r.event["type"] == "schedule.fired"}


def of_key(received: list[Any], key: str) -> list[Any]:
    return [r for r in received if r.event["data"].get("key") == key]


async def test_endpoint_crud_never_shows_the_secret(
    http: aiohttp.ClientSession, deployment: Deployment
) -> None:
    code, created = await call(
        http,
        deployment,
        "POST",
        "/v1/webhook-endpoints",
        {"url": "https://hooks.example.com/parley", "events": ["conversation.closed"], "description": "crm"},
    )
    assert code == 201, created
    assert created["secret"].startswith("whsec_") and created["id"].startswith("ep_")
    ep = created["id"]
    code, one = await call(http, deployment, "GET", f"/v1/webhook-endpoints/{ep}")
    assert code == 200 and "secret" not in one and one["events"] == ["conversation.closed"]
    code, listed = await call(http, deployment, "GET", "/v1/webhook-endpoints")
    assert code == 200 and ep in [e["id"] for e in listed["items"]]
    assert all("secret" not in e for e in listed["items"])
    code, patched = await call(
        http, deployment, "PATCH", f"/v1/webhook-endpoints/{ep}", {"events": ["*"], "enabled": False}
    )
    assert code == 200 and patched["events"] == ["*"] and patched["enabled"] is False
    code, rotated = await call(http, deployment, "POST", f"/v1/webhook-endpoints/{ep}/rotate-secret")
    assert code == 200 and rotated["secret"].startswith("whsec_") and rotated["secret"] != created["secret"]
    code, _ = await call(http, deployment, "DELETE", f"/v1/webhook-endpoints/{ep}")
    assert code == 204
    code, gone = await call(http, deployment, "GET", f"/v1/webhook-endpoints/{ep}")
    assert code == 404, gone


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"url": "https://user:pw@hooks.example.com/", "events": ["*"]}, "url"),
        ({"url": "ftp://hooks.example.com/", "events": ["*"]}, "url"),
        ({"url": "https://hooks.example.com/", "events": []}, "events"),
        ({"url": "https://hooks.example.com/", "events": ["no spaces allowed"]}, "events"),
        ({"url": "https://hooks.example.com/", "events": ["*"], "secret": "mine"}, "secret"),
    ],
)
async def test_bad_endpoints_are_422_with_the_field(
    http: aiohttp.ClientSession, deployment: Deployment, body: dict[str, Any], field: str
) -> None:
    code, answer = await call(http, deployment, "POST", "/v1/webhook-endpoints", body)
    assert code == 422, answer
    assert field in str(answer)


async def test_registration_refuses_private_targets_unless_allowed(
    http: aiohttp.ClientSession, deployment: Deployment
) -> None:
    port = free_port()
    strict = {
        "PARLEY_HTTP_PORT": str(port),
        "PARLEY_OUTBOUND_ALLOW_PRIVATE": "false",
        "PARLEY_OUTBOUND_ALLOW_HTTP": "false",
    }
    deployment.start("api", label="api-strict", env=strict)
    base = f"http://127.0.0.1:{port}"

    async def up() -> bool:
        try:
            async with http.get(f"{base}/healthz") as r:
                return r.status == 200
        except aiohttp.ClientError:
            return False

    await wait_until(up, 60, "the strict API")
    try:
        for url in (
            "http://hooks.example.com/",
            "https://127.0.0.1/",
            "https://localhost/",
            "https://[::1]/",
            "https://10.0.0.1/",
            "https://172.16.0.1/",
            "https://192.168.1.1/",
            "https://169.254.169.254/latest/meta-data/",
            "https://100.64.0.1/",
            "https://0.0.0.0/",
        ):
            async with http.post(
                f"{base}/v1/webhook-endpoints",
                json={"url": url, "events": ["*"]},
                headers=deployment.admin_headers(),
            ) as r:
                answer = await r.json()
                assert r.status == 422, (url, answer)
                assert answer["error"].startswith("url refused"), answer
    finally:
        deployment.stop("api-strict")


async def test_ping_is_signed_and_answered(
    http: aiohttp.ClientSession, deployment: Deployment, receiver: Receiver
) -> None:
    ep = await create_endpoint(http, deployment, receiver, "ping")
    receiver.answers["ping"] = status(202)
    code, answer = await call(http, deployment, "POST", f"/v1/webhook-endpoints/{ep['id']}/test")
    assert code == 200, answer
    assert (answer["ok"], answer["status"], answer["body"]) == (True, 202, "answered 202")
    [got] = receiver.at("ping")
    assert got.verified and got.event["type"] == "ping" and got.id == answer["id"]
    receiver.answers["ping"] = status(500)
    _, failed = await call(http, deployment, "POST", f"/v1/webhook-endpoints/{ep['id']}/test")
    assert (failed["ok"], failed["status"], failed["error"]) == (False, 500, "HTTP 500")


async def test_events_are_delivered_signed_in_order(
    http: aiohttp.ClientSession, deployment: Deployment, receiver: Receiver
) -> None:
    await create_endpoint(http, deployment, receiver, "all")
    keys = [await fire(http, deployment, n=i) for i in range(10)]

    async def all_in() -> bool:
        return keys_of(receiver.at("all")) >= set(keys)

    await wait_until(all_in, 30, "10 schedules' events")
    await wait_until(lambda: _count(receiver, "all", 20), 30, "both events of each schedule")
    got = receiver.at("all")
    assert all(r.verified for r in got)
    for r in got:
        assert set(r.event) == {"type", "id", "timestamp", "data"} and r.event["id"] == r.id
        assert abs(int(r.headers["webhook-timestamp"]) - time.time()) < 60
    for key in keys:
        assert [r.event["type"] for r in of_key(got, key)] == ["schedule.fired", "test.tick"], key


async def _count(receiver: Receiver, path: str, n: int) -> bool:
    return len(receiver.at(path)) >= n


async def test_down_then_up_delivers_each_once_in_order(
    http: aiohttp.ClientSession, deployment: Deployment, receiver: Receiver
) -> None:
    ep = await create_endpoint(http, deployment, receiver, "flaky")
    receiver.answers["flaky"] = fail_first(2)
    keys = [await fire(http, deployment, n=i) for i in range(20)]

    async def delivered() -> list[Any]:
        ok_ids = {r.id for r in receiver.at("flaky")}
        _, page = await call(
            http, deployment, "GET", f"/v1/webhook-endpoints/{ep['id']}/deliveries?status=succeeded"
        )
        return page["items"] if len(page["items"]) >= 40 and len(ok_ids) >= 40 else []

    items = await wait_until(delivered, 60, "40 deliveries after 2 failures each")
    got = receiver.at("flaky")
    by_id: dict[str, int] = {}
    for r in got:
        by_id[r.id] = by_id.get(r.id, 0) + 1
    assert set(by_id.values()) == {3}, by_id  # two refused, then exactly one accepted
    assert all(item["attempts"] == 3 for item in items)
    # per key, the second event is attempted only after the first was accepted
    for key in keys:
        mine = of_key(got, key)
        assert [r.event["type"] for r in mine] == ["schedule.fired"] * 3 + ["test.tick"] * 3, key
    detail_code, detail = await call(http, deployment, "GET", f"/v1/webhook-deliveries/{items[0]['id']}")
    assert detail_code == 200
    assert [a["status"] for a in detail["attempt_log"]] == [503, 503, 200]
    assert all(a["latency_ms"] >= 0 for a in detail["attempt_log"])


async def test_gone_disables_the_endpoint_at_once(
    http: aiohttp.ClientSession, deployment: Deployment, receiver: Receiver
) -> None:
    watcher = await create_endpoint(http, deployment, receiver, "watcher", ["webhook_endpoint.disabled"])
    ep = await create_endpoint(http, deployment, receiver, "gone", ["test.gone"])
    receiver.answers["gone"] = status(410)
    await fire(http, deployment, "test.gone")

    async def disabled() -> Any:
        _, body = await call(http, deployment, "GET", f"/v1/webhook-endpoints/{ep['id']}")
        return body if body["enabled"] is False else None

    body = await wait_until(disabled, 30, "the endpoint disabled by 410")
    assert "410" in body["disabled_reason"]
    await wait_until(lambda: _count(receiver, "watcher", 1), 30, "the disabled event")
    [note] = receiver.at("watcher")
    assert note.event["type"] == "webhook_endpoint.disabled" and note.event["data"]["endpoint_id"] == ep["id"]
    assert note.verified and watcher["id"] != ep["id"]
    await fire(http, deployment, "test.gone")
    await fire(http, deployment, "test.tick")  # a marker: once the others got it, so would "gone" have
    await wait_until(lambda: _has_type(receiver, "all", "test.tick", 12), 30, "the marker elsewhere")
    assert len(receiver.at("gone")) == 1  # no attempt after the 410


async def test_an_endpoint_changed_without_notify_gets_the_next_event(
    http: aiohttp.ClientSession, deployment: Deployment, receiver: Receiver
) -> None:
    """The fan-out decides once who gets an event, so it may not trust NOTIFY alone to learn of a
    change: here the change is plain SQL, which sends none, and the event right after still goes
    to the endpoint (migration 0013's version counter). With NOTIFY as the only signal the cached
    subscription, reloaded every 30 s, would keep it from this endpoint."""
    ep = await create_endpoint(http, deployment, receiver, "unnotified", ["test.before"])
    await fire(http, deployment, "test.before")
    await wait_until(lambda: _count(receiver, "unnotified", 1), 30, "the first event")  # cache loaded
    conn = await asyncpg.connect(deployment.database_url)
    try:
        await conn.execute("UPDATE webhook_endpoints SET events = '{test.after}' WHERE id = $1", ep["id"])
    finally:
        await conn.close()
    key = await fire(http, deployment, "test.after")
    await wait_until(lambda: _count(receiver, "unnotified", 2), 30, "the event after the SQL change")
    assert receiver.at("unnotified")[1].event["data"]["key"] == key


async def _has_type(receiver: Receiver, path: str, event_type: str, n: int) -> bool:
    return sum(1 for r in receiver.at(path) if r.event["type"] == event_type) >= n


async def test_retry_after_is_honoured(
    http: aiohttp.ClientSession, deployment: Deployment, receiver: Receiver
) -> None:
    await create_endpoint(http, deployment, receiver, "busy", ["test.busy"])
    seen: list[float] = []

    async def answer(got: Any) -> Any:
        seen.append(got.at)
        return await (status(429, {"Retry-After": "2"}) if len(seen) == 1 else status(200))(got)

    receiver.answers["busy"] = answer
    await fire(http, deployment, "test.busy")
    await wait_until(lambda: _count(receiver, "busy", 2), 30, "the attempt after Retry-After")
    assert seen[1] - seen[0] >= 2.0, seen  # the schedule said 0.3 s; Retry-After said 2 s


async def test_a_hanging_endpoint_does_not_delay_another(
    http: aiohttp.ClientSession, deployment: Deployment, receiver: Receiver
) -> None:
    await create_endpoint(http, deployment, receiver, "stuck", ["test.iso"])
    await create_endpoint(http, deployment, receiver, "quick", ["test.iso"])
    receiver.answers["stuck"] = hang(30)
    started = time.monotonic()
    for i in range(20):
        await fire(http, deployment, "test.iso", n=i)
    await wait_until(lambda: _count(receiver, "quick", 20), 30, "the quick endpoint's 20 events")
    took = time.monotonic() - started
    print(f"quick endpoint got 20 events in {took:.2f}s while the other hangs")
    assert took < 8, took  # the stuck one's first answer would come after 30 s (timeout 10 s)
    assert len(receiver.at("stuck")) >= 1  # it was being attempted meanwhile


async def test_parked_then_manual_retry(
    http: aiohttp.ClientSession, deployment: Deployment, receiver: Receiver
) -> None:
    ep = await create_endpoint(http, deployment, receiver, "parked", ["test.park"])
    receiver.answers["parked"] = status(500)
    await fire(http, deployment, "test.park")

    async def parked() -> Any:
        _, page = await call(
            http, deployment, "GET", f"/v1/webhook-endpoints/{ep['id']}/deliveries?status=failed"
        )
        return page["items"]

    [item] = await wait_until(parked, 60, "the delivery parked after 8 attempts")
    assert item["attempts"] == 8 and item["last_status"] == 500
    assert len(receiver.at("parked")) == 8
    receiver.answers["parked"] = status(200)
    code, again = await call(http, deployment, "POST", f"/v1/webhook-deliveries/{item['id']}/retry")
    assert code == 202 and again["status"] == "pending", again
    await wait_until(lambda: _count(receiver, "parked", 9), 30, "the manual retry")
    last = receiver.at("parked")[-1]
    assert last.id == receiver.at("parked")[0].id and last.verified

    async def succeeded() -> Any:
        _, body = await call(http, deployment, "GET", f"/v1/webhook-deliveries/{item['id']}")
        return body if body["status"] == "succeeded" else None

    assert (await wait_until(succeeded, 30, "succeeded"))["attempts"] == 9


async def test_rotation_signs_with_both_secrets(
    http: aiohttp.ClientSession, deployment: Deployment, receiver: Receiver
) -> None:
    ep = await create_endpoint(http, deployment, receiver, "rotating", ["test.rot"])
    old = receiver.secrets["rotating"][0]
    _, rotated = await call(http, deployment, "POST", f"/v1/webhook-endpoints/{ep['id']}/rotate-secret")
    await fire(http, deployment, "test.rot")
    await wait_until(lambda: _count(receiver, "rotating", 1), 30, "a delivery after the rotation")
    [got] = receiver.at("rotating")
    assert len(got.headers["webhook-signature"].split(" ")) == 2
    for secret in (old, rotated["secret"]):
        receiver.secrets["rotating"] = [secret]
        assert receiver._verify("rotating", got.body, got.headers), secret
    receiver.secrets["rotating"] = ["whsec_" + "A" * 43 + "="]
    assert not receiver._verify("rotating", got.body, got.headers)


async def test_replay_resends_the_same_ids_even_to_a_newer_endpoint(
    http: aiohttp.ClientSession, deployment: Deployment, receiver: Receiver
) -> None:
    since = datetime.now(UTC) - timedelta(seconds=1)
    await create_endpoint(http, deployment, receiver, "first", ["test.replay"])
    for i in range(5):
        await fire(http, deployment, "test.replay", n=i)
    await wait_until(lambda: _count(receiver, "first", 5), 30, "5 replayable events")
    late = await create_endpoint(http, deployment, receiver, "late", ["test.replay"])
    assert receiver.at("late") == []
    code, answer = await call(
        http, deployment, "POST", f"/v1/webhook-endpoints/{late['id']}/replay", {"since": since.isoformat()}
    )
    assert code == 202 and answer["count"] == 5, answer
    await wait_until(lambda: _count(receiver, "late", 5), 30, "the replayed events")
    assert {r.id for r in receiver.at("late")} == {r.id for r in receiver.at("first")}
    assert all(r.verified for r in receiver.at("late"))


async def test_failing_for_the_whole_window_disables(
    http: aiohttp.ClientSession, deployment: Deployment, receiver: Receiver
) -> None:
    ep = await create_endpoint(http, deployment, receiver, "dead", ["test.dead"])
    receiver.answers["dead"] = status(500)

    async def disabled() -> Any:
        await fire(http, deployment, "test.dead")  # keep it busy failing
        _, body = await call(http, deployment, "GET", f"/v1/webhook-endpoints/{ep['id']}")
        return body if body["enabled"] is False else None

    body = await wait_until(disabled, 60, "disabled after failing for 8 s")
    assert body["disabled_reason"].startswith("every attempt failed since"), body
    n = len(receiver.at("dead"))
    await fire(http, deployment, "test.dead")
    await asyncio.sleep(1.5)  # proving an absence: nothing may arrive within a retry period
    assert len(receiver.at("dead")) == n


async def test_conversation_events_reach_a_flaky_endpoint_once_each_in_order(
    http: aiohttp.ClientSession, deployment: Deployment, receiver: Receiver, channel: GenericChannel
) -> None:
    """The issue's case: endpoint down for its first attempts, then up; real conversation events
    (opened, message.received x3, closed) of 10 conversations, each delivered once per id, and
    every conversation's events in the order the lifecycle agent emitted them."""
    types = ["conversation.opened", "message.received", "conversation.closed"]
    await create_endpoint(http, deployment, receiver, "convs", types)
    receiver.answers["convs"] = fail_first(2)
    contacts = [f"5511{uuid.uuid4().int % 10**8:08d}" for _ in range(10)]
    for text in ("oi", "preciso de ajuda", "meu pedido atrasou"):
        for contact in contacts:
            raw, headers = channel.signed(message(uuid.uuid4().hex, contact, text))
            async with http.post(
                f"{deployment.base_url}/webhooks/generic/{channel.id}", data=raw, headers=headers
            ) as resp:
                assert resp.status == 200, await resp.text()

    async def opened() -> list[str]:
        got = {r.event["data"].get("contact_id") for r in receiver.at("convs") if r.event["type"] == types[0]}
        return [c for c in contacts if c not in got]

    await wait_until(lambda: _none_left(opened), 60, "every conversation opened at the endpoint")
    convs = {}
    for contact in contacts:
        code, page = await call(
            http, deployment, "GET", f"/v1/conversations?channel={channel.id}&contact={contact}"
        )
        convs[contact] = page["items"][0]["id"]
        code, _ = await call(
            http, deployment, "POST", f"/v1/conversations/{convs[contact]}/close", {"reason": "agent_closed"}
        )
        assert code == 202

    async def all_closed() -> bool:
        counts: dict[str, int] = {}
        for r in receiver.at("convs"):
            counts[r.id] = counts.get(r.id, 0) + 1
        return len(counts) == 50 and min(counts.values()) >= 3  # each refused twice, then taken

    await wait_until(all_closed, 90, "every conversation closed at the endpoint")
    got = receiver.at("convs")
    per_id: dict[str, int] = {}
    for r in got:
        per_id[r.id] = per_id.get(r.id, 0) + 1
    assert set(per_id.values()) == {3}, per_id  # refused twice, accepted exactly once
    for contact in contacts:
        firsts: list[str] = []
        for r in got:
            if r.event["data"].get("contact_id") == contact and r.id not in firsts:
                firsts.append(r.id)
        kinds = [next(x.event["type"] for x in got if x.id == i) for i in firsts]
        assert kinds == [types[0], types[1], types[1], types[1], types[2]], (contact, kinds)
        texts = [next(x.event["data"].get("text") for x in got if x.id == i) for i in firsts[1:4]]
        assert texts == ["oi", "preciso de ajuda", "meu pedido atrasou"], (contact, texts)


async def _none_left(probe: Any) -> bool:
    return not await probe()
