"""Outbound messages over Twilio (WhatsApp senders) against the provider simulator's Twilio route:
sent with Parley's message id in the StatusCallback, the simulator's signed status callbacks
accepted by Parley's /webhooks/twilio and applied, 21211 failing the message, 20429 retried."""

from __future__ import annotations

import asyncio
import random
import secrets
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, quote, urlencode, urlsplit

import aiohttp
import asyncpg
import pytest

from channels import twilio
from sandbox.simulator import Failure, Simulator, TwilioAccount
from tests.integration.harness import Deployment, wait_until
from tests.integration.schedule_helpers import call
from tests.integration.test_sending import send, status_of

DEPLOYMENT_ENV = {
    "PARLEY_OUTBOUND_ALLOW_HTTP": "true",
    "PARLEY_OUTBOUND_ALLOW_PRIVATE": "true",  # the simulator is on loopback
    "PARLEY_SEND_BACKOFF_BASE": "0.2",
    "PARLEY_SEND_BACKOFF_CAP": "1",
    "PARLEY_SEND_IN_DOUBT_WAIT": "3",
}


@dataclass
class Account:
    """A Twilio channel registered in Parley and configured at the simulator."""

    channel_id: str
    account_sid: str
    auth_token: str
    sender: str  # From, "whatsapp:+1555..."
    public_url: str


@pytest.fixture(scope="module")
async def sim(deployment: Deployment) -> AsyncIterator[Simulator]:
    async with Simulator(host="127.0.0.1", port=0, parley_base_url=deployment.base_url) as s:
        yield s


async def register(http: aiohttp.ClientSession, dep: Deployment, sim: Simulator, rate: int = 10) -> Account:
    a = Account(
        "tw-" + uuid.uuid4().hex[:8],
        "AC" + uuid.uuid4().hex,
        secrets.token_hex(16),
        f"whatsapp:+1555{random.randint(10**6, 10**7 - 1)}",
        f"{dep.base_url}/webhooks/twilio",
    )
    sim.configure_twilio(TwilioAccount(account_sid=a.account_sid, auth_token=a.auth_token, sender_rate=rate))
    code, body = await call(
        http,
        dep,
        "POST",
        "/v1/channels",
        {
            "id": a.channel_id,
            "provider": "twilio",
            "account_sid": a.account_sid,
            "auth_token": a.auth_token,
            "public_url": a.public_url,
            "sender": a.sender,
            "api_base": sim.url,
            "throughput": rate,
        },
    )
    assert code == 201, body
    return a


async def user_says(http: aiohttp.ClientSession, dep: Deployment, a: Account, phone: str, text: str) -> str:
    """A signed inbound WhatsApp message through Twilio (From whatsapp:<phone>); the conversation id."""
    sid = "SM" + uuid.uuid4().hex
    form = {
        "SmsMessageSid": sid,
        "NumMedia": "0",
        "ProfileName": "Ana",
        "MessageType": "text",
        "SmsSid": sid,
        "WaId": phone.removeprefix("+"),
        "SmsStatus": "received",
        "Body": text,
        "To": a.sender,
        "NumSegments": "1",
        "ReferralNumMedia": "0",
        "MessageSid": sid,
        "AccountSid": a.account_sid,
        "From": "whatsapp:" + phone,
        "ApiVersion": "2010-04-01",
    }
    headers = {
        "Content-Type": "application/x-www-form-urlencoded",
        "X-Twilio-Signature": twilio.expected_signature(a.auth_token, a.public_url, form),
    }
    async with http.post(f"{dep.base_url}/webhooks/twilio", data=urlencode(form), headers=headers) as r:
        assert r.status == 200, await r.text()

    async def conversation() -> str | None:
        path = f"/v1/conversations?channel={a.channel_id}&contact={quote(phone, safe='')}"
        code, page = await call(http, dep, "GET", path)
        items = page["items"] if code == 200 else []
        return items[0]["id"] if items and items[0].get("window_expires_at") else None

    return await wait_until(conversation, 30, f"the conversation of {phone}")


def phone() -> str:
    return "+55119" + str(random.randint(10**7, 10**8 - 1))


def accepted_for(sim: Simulator, a: Account) -> list[Any]:
    return [x for x in sim.stats().accepted if x.account == a.account_sid]


async def test_a_message_is_sent_and_its_signed_status_callbacks_are_applied(
    http: aiohttp.ClientSession, deployment: Deployment, sim: Simulator, db: asyncpg.Connection
) -> None:
    a = await register(http, deployment, sim)
    contact = phone()
    conv = await user_says(http, deployment, a, contact, "oi")
    code, queued = await send(http, deployment, conv, "Olá pelo Twilio")
    assert code == 202, queued
    sent = await status_of(http, deployment, queued["id"], "sent")
    [got] = accepted_for(sim, a)
    assert got.parley_message_id == queued["id"]  # read back from the StatusCallback's query
    assert got.number == a.sender and got.recipient == "whatsapp:" + contact  # one channel: 21910 else
    assert sent["provider_message_id"] == got.provider_message_id and sent["attempts"] == 1

    async def read() -> bool:
        row = await db.fetchrow(
            "SELECT status FROM messages WHERE channel_id = $1 AND provider_message_id = $2",
            a.channel_id,
            got.provider_message_id,
        )
        return bool(row and row["status"] == "read")

    await wait_until(read, 30, "the read status callback applied to the sent message")
    mine = [d for d in sim.stats().deliveries if d.provider_message_id == got.provider_message_id]
    assert {d.status for d in mine} == {"sent", "delivered", "read"}
    assert all(d.http_status == 200 for d in mine), mine  # each signed callback accepted at once
    callback = urlsplit(mine[0].url)
    assert parse_qs(callback.query) == {"parley_message_id": [queued["id"]]}

    # The signature covers the callback URL, Parley's message id included: the same signed form
    # posted under another message id is refused.
    form = {
        "MessageSid": got.provider_message_id,
        "MessageStatus": "delivered",
        "AccountSid": a.account_sid,
        "From": a.sender,
        "To": got.recipient,
    }
    signed_for = f"{a.public_url}?parley_message_id={queued['id']}"
    headers = {
        "Content-Type": "application/x-www-form-urlencoded",
        "X-Twilio-Signature": twilio.expected_signature(a.auth_token, signed_for, form),
    }
    for message_id, expected in ((str(uuid.uuid4()), 401), (queued["id"], 200)):
        async with http.post(
            f"{deployment.base_url}/webhooks/twilio?parley_message_id={message_id}",
            data=urlencode(form),
            headers=headers,
        ) as r:
            assert r.status == expected, (message_id, await r.text())


async def test_an_invalid_recipient_fails_with_twilio_code(
    http: aiohttp.ClientSession, deployment: Deployment, sim: Simulator
) -> None:
    a = await register(http, deployment, sim)
    contact = phone()
    conv = await user_says(http, deployment, a, contact, "oi")
    sim.inject(Failure(provider="twilio", number=a.account_sid, recipient=contact, code=21211))
    _, msg = await send(http, deployment, conv, "to an invalid number")
    failed = await status_of(http, deployment, msg["id"], "failed")
    assert failed["error_code"] == "21211" and failed["attempts"] == 1, failed
    assert not accepted_for(sim, a)
    _, after = await send(http, deployment, conv, "the next one goes")  # the lane is not stuck
    await status_of(http, deployment, after["id"], "sent")
    assert [x.parley_message_id for x in accepted_for(sim, a)] == [after["id"]]


async def test_a_20429_storm_is_retried_until_every_message_is_sent(
    http: aiohttp.ClientSession, deployment: Deployment, sim: Simulator, db: asyncpg.Connection
) -> None:
    a = await register(http, deployment, sim)
    contacts = [phone() for _ in range(5)]
    convs = await asyncio.gather(*(user_says(http, deployment, a, c, "oi") for c in contacts))
    storm = 12
    sim.inject(Failure(provider="twilio", number=a.account_sid, code=20429, times=storm))
    before = sim.stats().rejected.get("20429", 0)
    order: dict[str, list[str]] = {"whatsapp:" + c: [] for c in contacts}

    async def conversation(contact: str, conv: str) -> None:
        for i in range(4):
            code, body = await send(http, deployment, conv, f"part {i}")
            assert code == 202, body
            order["whatsapp:" + contact].append(body["id"])

    await asyncio.gather(*(conversation(c, conv) for c, conv in zip(contacts, convs, strict=True)))
    ids = [x for xs in order.values() for x in xs]

    async def all_sent() -> bool:
        count = await db.fetchval(
            "SELECT count(*) FROM outbound_sends WHERE id = ANY($1::uuid[]) AND status = 'sent'", ids
        )
        return bool(count == len(ids))

    await wait_until(all_sent, 120, "every message sent through the 20429 storm")
    assert sim.stats().rejected.get("20429", 0) - before == storm
    got: dict[str, list[str]] = {}
    for x in accepted_for(sim, a):
        got.setdefault(x.recipient, []).append(x.parley_message_id)
    assert got == order  # each once, each conversation in the API's order
    rows = await db.fetch("SELECT attempts FROM outbound_sends WHERE id = ANY($1::uuid[])", ids)
    assert sum(r["attempts"] for r in rows) == len(ids) + storm
    assert any(r["attempts"] > 1 for r in rows)
