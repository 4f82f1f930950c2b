"""Real timers: deadlines in the Faust table fire on time, in order with messages and commands."""

from __future__ import annotations

from datetime import datetime, timedelta

import aiohttp
import asyncpg

from tests.integration.harness import Deployment, GenericChannel, message
from tests.integration.lifecycle_helpers import Thread, now

DEPLOYMENT_ENV = {
    "PARLEY_TIMEOUT_IDLE": "2",
    "PARLEY_TIMEOUT_PROCESSING": "3",
    "PARLEY_TIMEOUT_AWAITING_CONFIRMATION": "2",
    "PARLEY_TIMEOUT_WAITING_CLOSE": "1",
}


async def _send(
    http: aiohttp.ClientSession, dep: Deployment, ch: GenericChannel, t: Thread, text: str, mid: str
) -> datetime:
    raw, headers = ch.signed(message(mid, t.contact_id, text))
    sent = now()
    async with http.post(f"{dep.base_url}/webhooks/generic/{ch.id}", data=raw, headers=headers) as r:
        assert r.status == 200, await r.text()
    return sent


def _closed(convs: list[dict[str, object]]) -> bool:
    return bool(convs) and convs[-1]["state"] == "closed"


async def test_idle_conversation_expires_at_its_deadline_never_before(
    http: aiohttp.ClientSession, deployment: Deployment, channel: GenericChannel, db: asyncpg.Connection
) -> None:
    t = Thread(deployment, channel.id)
    sent = await _send(http, deployment, channel, t, "oi", "exp-1")
    [conv] = await t.wait(db, "the conversation to close", _closed)
    assert conv["close_reason"] == "expired"
    assert conv["closed_at"] >= sent + timedelta(seconds=2)
    # On time: the timer fires within a second of the deadline (the sweep runs every minute).
    assert conv["closed_at"] <= sent + timedelta(seconds=3)
    closed = [e for e in await t.events(db, conv["id"]) if e["kind"] == "closed"]
    assert len(closed) == 1 and closed[0]["cause"].startswith("timer:")


async def test_a_new_message_pushes_the_deadline(
    http: aiohttp.ClientSession, deployment: Deployment, channel: GenericChannel, db: asyncpg.Connection
) -> None:
    t = Thread(deployment, channel.id)
    await _send(http, deployment, channel, t, "primeira", "push-1")
    await t.wait(db, "the conversation", lambda c: len(c) == 1)
    last = now()
    for i in range(2, 5):  # keep talking past the first deadline
        last = await _send(http, deployment, channel, t, f"msg {i}", f"push-{i}")
        await t.wait(db, "the message", lambda c, i=i: c[0]["version"] >= i)
    [conv] = await t.wait(db, "the close", _closed)
    assert conv["closed_at"] >= last + timedelta(seconds=2)
    assert await t.messages(db) == ["push-1", "push-2", "push-3", "push-4"]


async def test_user_farewell_closes_as_user_closed(
    http: aiohttp.ClientSession, deployment: Deployment, channel: GenericChannel, db: asyncpg.Connection
) -> None:
    t = Thread(deployment, channel.id)
    await _send(http, deployment, channel, t, "preciso de ajuda", "bye-1")
    await _send(http, deployment, channel, t, "ok, pode fechar então", "bye-2")
    [conv] = await t.wait(db, "the close", _closed)
    assert conv["close_reason"] == "user_closed"
    kinds = [(e["kind"], e["to_state"]) for e in await t.events(db, conv["id"])]
    assert ("transition", "waiting_close") in kinds and ("closed", "closed") in kinds


async def test_accepted_conversation_closes_as_idle_timeout_and_commands_go_through_kafka(
    http: aiohttp.ClientSession, deployment: Deployment, channel: GenericChannel, db: asyncpg.Connection
) -> None:
    t = Thread(deployment, channel.id)
    await _send(http, deployment, channel, t, "alô", "acc-1")
    [conv] = await t.wait(db, "the conversation", lambda c: len(c) == 1)
    async with http.post(
        f"{deployment.base_url}/v1/conversations/{conv['id']}/accept",
        json={"agent_id": "ana"},
        headers=deployment.admin_headers(),
    ) as r:
        assert r.status == 202
    await t.wait(db, "processing", lambda c: c[0]["state"] == "processing")
    [conv] = await t.wait(db, "the close", _closed)
    assert conv["close_reason"] == "idle_timeout" and conv["assigned_agent"] == "ana"


async def test_agent_close_then_user_writes_again_opens_a_linked_conversation(
    http: aiohttp.ClientSession, deployment: Deployment, channel: GenericChannel, db: asyncpg.Connection
) -> None:
    t = Thread(deployment, channel.id)
    await _send(http, deployment, channel, t, "oi", "again-1")
    [conv] = await t.wait(db, "the conversation", lambda c: len(c) == 1)
    async with http.post(
        f"{deployment.base_url}/v1/conversations/{conv['id']}/close",
        json={"reason": "agent_closed"},
        headers=deployment.admin_headers(),
    ) as r:
        assert r.status == 202
    async with http.post(
        f"{deployment.base_url}/v1/conversations/{conv['id']}/close",
        json={"reason": "expired"},
        headers=deployment.admin_headers(),
    ) as r:
        assert r.status == 422  # automatic reasons are not for people to choose
    await t.wait(db, "the close", _closed)
    await _send(http, deployment, channel, t, "esqueci uma coisa", "again-2")
    first, second = await t.wait(db, "a second conversation", lambda c: len(c) == 2)
    assert first["close_reason"] == "agent_closed"
    assert second["previous_conversation_id"] == first["id"] and second["state"] == "idle"
    async with http.get(
        f"{deployment.base_url}/v1/conversations/{second['id']}", headers=deployment.admin_headers()
    ) as r:
        shown = await r.json()
    for field in ("state", "close_reason", "deadline_at", "closed_at", "version", "previous_conversation_id"):
        assert field in shown
    async with http.get(
        f"{deployment.base_url}/v1/conversations/{first['id']}/events", headers=deployment.admin_headers()
    ) as r:
        log = (await r.json())["items"]
    assert log[0]["kind"] == "opened" and any(e["kind"] == "closed" for e in log)
