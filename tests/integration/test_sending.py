"""Outbound messages on a real worker, Kafka and Postgres, against the provider simulator
(sandbox/simulator.py speaks the Graph API and sends signed status webhooks back to Parley's own
routes). What the provider received is counted at the simulator, not in our logs."""

from __future__ import annotations

import random
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest

from channels import whatsapp
from sandbox.simulator import Failure, Simulator, WebhookSettings, WhatsAppNumber
from tests.integration.harness import Deployment, wait_until
from tests.integration.schedule_helpers import call
from tests.integration.worker_helpers import metrics

DEPLOYMENT_ENV = {
    "PARLEY_OUTBOUND_ALLOW_HTTP": "true",
    "PARLEY_OUTBOUND_ALLOW_PRIVATE": "true",  # the simulator is on loopback
    "PARLEY_SEND_BACKOFF_BASE": "0.2",
    "PARLEY_SEND_BACKOFF_CAP": "1",
    "PARLEY_SEND_IN_DOUBT_WAIT": "3",
}


@dataclass
class Number:
    """A WhatsApp channel registered in Parley and configured at the simulator."""

    channel_id: str
    phone: str
    token: str
    app_secret: str


@pytest.fixture(scope="module")
async def sim(deployment: Deployment) -> AsyncIterator[Simulator]:
    async with Simulator(host="127.0.0.1", port=0, parley_base_url=deployment.base_url) as s:
        yield s


async def register(
    http: aiohttp.ClientSession, dep: Deployment, sim: Simulator, *, throughput: int = 80, **limits: Any
) -> Number:
    n = Number(
        "wa-" + uuid.uuid4().hex[:8],
        str(random.randint(10**14, 10**15 - 1)),
        secrets.token_hex(16),
        secrets.token_hex(16),
    )
    sim.configure_whatsapp(
        WhatsAppNumber(phone_number_id=n.phone, token=n.token, app_secret=n.app_secret, throughput=throughput)
    )
    code, body = await call(
        http,
        dep,
        "POST",
        "/v1/channels",
        {
            "id": n.channel_id,
            "provider": "whatsapp",
            "phone_number_id": n.phone,
            "app_secret": n.app_secret,
            "verify_token": secrets.token_hex(8),
            "access_token": n.token,
            "graph_base": sim.url,
            "throughput": throughput,
            **limits,
        },
    )
    assert code == 201, body
    return n


async def user_says(http: aiohttp.ClientSession, dep: Deployment, n: Number, contact: str, text: str) -> str:
    """A signed inbound WhatsApp message: opens the conversation and its 24 h window; its id."""
    body = {
        "object": "whatsapp_business_account",
        "entry": [
            {
                "id": "100000000000000",
                "changes": [
                    {
                        "field": "messages",
                        "value": {
                            "messaging_product": "whatsapp",
                            "metadata": {"display_phone_number": "15550000000", "phone_number_id": n.phone},
                            "contacts": [{"profile": {"name": "Ana"}, "wa_id": contact}],
                            "messages": [
                                {
                                    "from": contact,
                                    "id": "wamid.in." + uuid.uuid4().hex,
                                    "timestamp": str(int(time.time())),
                                    "type": "text",
                                    "text": {"body": text},
                                }
                            ],
                        },
                    }
                ],
            }
        ],
    }
    raw = orjson.dumps(body)
    headers = {"Content-Type": "application/json", "X-Hub-Signature-256": whatsapp.sign(n.app_secret, raw)}
    async with http.post(f"{dep.base_url}/webhooks/whatsapp", data=raw, headers=headers) as r:
        assert r.status == 200, await r.text()

    async def conversation() -> str | None:
        code, page = await call(
            http, dep, "GET", f"/v1/conversations?channel={n.channel_id}&contact={contact}"
        )
        items = page["items"] if code == 200 else []
        return items[0]["id"] if items and items[0].get("window_expires_at") else None

    return await wait_until(conversation, 30, f"the conversation of {contact}")


async def send(
    http: aiohttp.ClientSession, dep: Deployment, conv: str, text: str, key: str | None = None
) -> tuple[int, Any]:
    headers = {"Idempotency-Key": key} if key else None
    return await call(
        http, dep, "POST", f"/v1/conversations/{conv}/messages", {"type": "text", "text": text}, headers
    )


async def status_of(http: aiohttp.ClientSession, dep: Deployment, message_id: str, *wanted: str) -> Any:
    async def probe() -> Any:
        code, body = await call(http, dep, "GET", f"/v1/messages/{message_id}")
        return body if code == 200 and body["status"] in wanted else None

    return await wait_until(probe, 60, f"{message_id} to be {wanted}")


def accepted_for(sim: Simulator, n: Number) -> list[Any]:
    return [a for a in sim.stats().accepted if a.number == n.phone]


async def test_a_text_is_sent_and_its_receipts_arrive(
    http: aiohttp.ClientSession, deployment: Deployment, sim: Simulator, db: asyncpg.Connection
) -> None:
    n = await register(http, deployment, sim)
    contact = "5511" + str(random.randint(10**7, 10**8 - 1))
    conv = await user_says(http, deployment, n, contact, "oi, preciso de ajuda")
    handed_before = (await metrics(http, deployment))["parley_sends_taken_in_process_total"]
    code, queued = await send(http, deployment, conv, "Olá! Como posso ajudar?")
    assert code == 202 and queued["status"] == "queued", queued
    sent = await status_of(http, deployment, queued["id"], "sent")
    # One worker holds every partition: its lifecycle agent handed the send to its sender
    # directly, without the round trip through the outbox relay and <prefix>.sends.
    assert (await metrics(http, deployment))["parley_sends_taken_in_process_total"] == handed_before + 1
    [got] = accepted_for(sim, n)
    assert got.recipient == contact and got.parley_message_id == queued["id"]
    assert sent["provider_message_id"] == got.provider_message_id and sent["attempts"] == 1

    async def read() -> bool:
        row = await db.fetchrow(
            "SELECT status FROM messages WHERE channel_id = $1 AND provider_message_id = $2",
            n.channel_id,
            got.provider_message_id,
        )
        return bool(row and row["status"] == "read")

    await wait_until(read, 30, "the read receipt applied to the sent message")


async def test_a_business_message_to_a_plus_number_joins_the_users_thread(
    http: aiohttp.ClientSession, deployment: Deployment, sim: Simulator
) -> None:
    # WhatsApp names the user by wa_id ("5511..."); a business writing "+5511..." means the same
    # person, and its template joins the conversation the user's own message opened.
    n = await register(http, deployment, sim)
    contact = "5511" + str(random.randint(10**7, 10**8 - 1))
    conv = await user_says(http, deployment, n, contact, "oi")
    code, body = await call(
        http,
        deployment,
        "POST",
        f"/v1/channels/{n.channel_id}/messages",
        {"to": "+" + contact, "type": "template", "name": "promo", "language": "en_US"},
    )
    assert code == 202, body
    sent = await status_of(http, deployment, body["id"], "sent")
    assert sent["conversation_id"] == conv and sent["contact_id"] == contact
    [got] = accepted_for(sim, n)
    assert got.recipient == contact


async def test_idempotency_key_and_window(
    http: aiohttp.ClientSession, deployment: Deployment, sim: Simulator
) -> None:
    n = await register(http, deployment, sim)
    contact = "5521" + str(random.randint(10**7, 10**8 - 1))
    conv = await user_says(http, deployment, n, contact, "oi")
    code, first = await send(http, deployment, conv, "one", key="k-1")
    assert code == 202, first
    code, again = await send(http, deployment, conv, "one", key="k-1")
    assert code == 202 and again["id"] == first["id"]
    code, other = await send(http, deployment, conv, "two", key="k-1")
    assert code == 422 and "another body" in other["error"], other
    await status_of(http, deployment, first["id"], "sent")
    assert len(accepted_for(sim, n)) == 1
    # A business-initiated free-form message has no window: refused at once, a template goes.
    stranger = "5531" + str(random.randint(10**7, 10**8 - 1))
    code, refused = await call(
        http,
        deployment,
        "POST",
        f"/v1/channels/{n.channel_id}/messages",
        {"to": stranger, "type": "text", "text": "hi"},
    )
    assert code == 422 and "24 h window" in refused["error"], refused
    code, template = await call(
        http,
        deployment,
        "POST",
        f"/v1/channels/{n.channel_id}/messages",
        {"to": stranger, "type": "template", "name": "order_update", "language": "pt_BR"},
    )
    assert code == 202, template
    await status_of(http, deployment, template["id"], "sent")
    code, page = await call(
        http, deployment, "GET", f"/v1/conversations?channel={n.channel_id}&contact={stranger}"
    )
    assert code == 200 and len(page["items"]) == 1  # the template opened the thread's conversation


async def test_order_per_conversation_holds_under_retries(
    http: aiohttp.ClientSession, deployment: Deployment, sim: Simulator
) -> None:
    n = await register(http, deployment, sim)
    contact = "5541" + str(random.randint(10**7, 10**8 - 1))
    conv = await user_says(http, deployment, n, contact, "oi")
    sim.inject(Failure(provider="whatsapp", number=n.phone, recipient=contact, times=3, http_status=503))
    ids = []
    for i in range(6):
        code, body = await send(http, deployment, conv, f"part {i}")
        assert code == 202
        ids.append(body["id"])
    await status_of(http, deployment, ids[-1], "sent")
    order = [a.parley_message_id for a in accepted_for(sim, n)]
    assert order == ids, order  # the first one retried three times, the others waited for it
    first = await status_of(http, deployment, ids[0], "sent")
    assert first["attempts"] == 4


async def test_the_number_limit_holds_at_the_provider(
    http: aiohttp.ClientSession, deployment: Deployment, sim: Simulator
) -> None:
    n = await register(http, deployment, sim, throughput=10)
    ids = []
    started = time.monotonic()
    for i in range(40):  # 40 users, one template each: only the number's limit applies
        code, body = await call(
            http,
            deployment,
            "POST",
            f"/v1/channels/{n.channel_id}/messages",
            {"to": f"5551{i:08d}", "type": "template", "name": "promo", "language": "en_US"},
        )
        assert code == 202, body
        ids.append(body["id"])
    # 40 conversations, 40 lanes: they may leave in any order (the number's window lets whichever
    # send wakes first go), so wait for every one, not for the last accepted.
    for message_id in ids:
        await status_of(http, deployment, message_id, "sent")
    took = time.monotonic() - started
    stats = sim.stats()
    assert stats.max_in_any_second[n.phone] <= 10, stats.max_in_any_second
    assert not stats.rejected.get("130429"), stats.rejected  # we paced, the provider never refused
    assert len(accepted_for(sim, n)) == 40
    assert took >= 3.0, took  # 40 at 10/s cannot take much less than 4 s


async def test_a_burst_to_one_user_does_not_delay_others(
    http: aiohttp.ClientSession, deployment: Deployment, sim: Simulator
) -> None:
    n = await register(http, deployment, sim, recipient_burst=3, recipient_rate=0.5)
    busy = "5561" + str(random.randint(10**7, 10**8 - 1))
    calm = "5562" + str(random.randint(10**7, 10**8 - 1))
    busy_conv = await user_says(http, deployment, n, busy, "oi")
    calm_conv = await user_says(http, deployment, n, calm, "oi")
    for i in range(6):
        await send(http, deployment, busy_conv, f"burst {i}")
    started = time.monotonic()
    _, calm_msg = await send(http, deployment, calm_conv, "hello")
    await status_of(http, deployment, calm_msg["id"], "sent")
    assert time.monotonic() - started < 1.5  # not behind the 3 that wait for the busy user
    sent_to_busy = [a for a in accepted_for(sim, n) if a.recipient == busy]
    assert len(sent_to_busy) <= 4  # burst of 3 (+1 refilled), the rest wait 2 s each
    assert not sim.stats().rejected.get("131056")


async def test_terminal_failure_then_manual_retry(
    http: aiohttp.ClientSession, deployment: Deployment, sim: Simulator
) -> None:
    n = await register(http, deployment, sim)
    contact = "5571" + str(random.randint(10**7, 10**8 - 1))
    conv = await user_says(http, deployment, n, contact, "oi")
    sim.inject(Failure(provider="whatsapp", number=n.phone, recipient=contact, code=131026))
    _, msg = await send(http, deployment, conv, "will bounce")
    failed = await status_of(http, deployment, msg["id"], "failed")
    assert failed["error_code"] == "131026" and failed["attempts"] == 1, failed

    async def letter() -> Any:
        _, page = await call(http, deployment, "GET", "/v1/dead-letters?limit=50")
        return [x for x in page["items"] if msg["id"] in (x.get("error") or "")]

    assert await wait_until(letter, 30, "the failed send's dead letter")
    code, again = await call(http, deployment, "POST", f"/v1/messages/{msg['id']}/retry")
    assert code == 202, again
    await status_of(http, deployment, msg["id"], "sent")
    code, twice = await call(http, deployment, "POST", f"/v1/messages/{msg['id']}/retry")
    assert code == 409, twice


async def test_expired_token_pauses_the_channel_until_it_is_updated(
    http: aiohttp.ClientSession, deployment: Deployment, sim: Simulator
) -> None:
    n = await register(http, deployment, sim)
    contact = "5581" + str(random.randint(10**7, 10**8 - 1))
    conv = await user_says(http, deployment, n, contact, "oi")
    sim.expire_token(n.phone)
    _, msg = await send(http, deployment, conv, "after expiry")

    async def refused() -> bool:
        return bool(sim.stats().rejected.get("190"))

    await wait_until(refused, 30, "the provider refusing the token")
    _, body = await call(http, deployment, "GET", f"/v1/messages/{msg['id']}")
    assert body["status"] == "queued" and body["error_code"] == "190", body
    new_token = secrets.token_hex(16)
    sim.renew_token(n.phone, new_token)
    code, patched = await call(
        http, deployment, "PATCH", f"/v1/channels/{n.channel_id}", {"access_token": new_token}
    )
    assert code == 200, patched
    await status_of(http, deployment, msg["id"], "sent")


async def test_in_doubt_with_receipts_never_sends_twice(
    http: aiohttp.ClientSession, deployment: Deployment, sim: Simulator
) -> None:
    n = await register(http, deployment, sim)
    contact = "5591" + str(random.randint(10**7, 10**8 - 1))
    conv = await user_says(http, deployment, n, contact, "oi")
    sim.inject(Failure(provider="whatsapp", number=n.phone, recipient=contact, action="drop"))
    _, msg = await send(http, deployment, conv, "the answer is lost")
    await status_of(http, deployment, msg["id"], "sent")  # settled by the status webhook
    _, again = await send(http, deployment, conv, "next one")
    await status_of(http, deployment, again["id"], "sent")
    mine = [a.parley_message_id for a in accepted_for(sim, n)]
    assert mine == [msg["id"], again["id"]], mine  # 0 duplicates, order kept


async def test_in_doubt_without_receipts_resends_once(
    http: aiohttp.ClientSession, deployment: Deployment, sim: Simulator
) -> None:
    n = await register(http, deployment, sim)
    contact = "5599" + str(random.randint(10**7, 10**8 - 1))
    conv = await user_says(http, deployment, n, contact, "oi")
    sim.configure_webhooks(WebhookSettings(enabled=False))
    try:
        sim.inject(Failure(provider="whatsapp", number=n.phone, recipient=contact, action="drop"))
        started = time.monotonic()
        _, msg = await send(http, deployment, conv, "no receipts")
        sent = await status_of(http, deployment, msg["id"], "sent")
        assert time.monotonic() - started >= 3.0  # waited PARLEY_SEND_IN_DOUBT_WAIT first
        assert sent["attempts"] == 2
        assert [a.parley_message_id for a in accepted_for(sim, n)] == [msg["id"], msg["id"]]
    finally:
        sim.configure_webhooks(WebhookSettings())
