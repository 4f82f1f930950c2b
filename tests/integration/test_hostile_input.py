"""Hostile and odd input through the real HTTP routes: whatever gets a 2xx is stored in Postgres,
nothing is dead-lettered, and everything else gets a 4xx with a reason (never a 5xx)."""

from __future__ import annotations

import base64
import json
import random
import secrets
import time
import uuid
from typing import Any
from urllib.parse import urlencode

import aiohttp
import asyncpg
import orjson
import pytest

from channels import twilio, whatsapp
from channels.normalize import MAX_NESTING
from channels.signatures import sign_standard_webhook
from tests.integration.harness import Deployment, GenericChannel, message, wait_until

YEAR_9999 = 253402300799  # 9999-12-31T23:59:59Z


def _contact() -> str:
    return "55" + str(random.randint(10**9, 10**10 - 1))


def _nested(levels: int) -> Any:
    value: Any = "leaf"
    for _ in range(levels):
        value = {"n": value}
    return value


def _deep_json(levels: int) -> bytes:
    return b'{"n":' * levels + b'"leaf"' + b"}" * levels


class WhatsApp:
    """A registered WhatsApp channel and Meta-shaped, signed bodies for it."""

    def __init__(self, dep: Deployment) -> None:
        self.dep = dep
        self.id = "wa-" + uuid.uuid4().hex[:8]
        self.phone = str(random.randint(10**14, 10**15 - 1))
        self.app_secret = secrets.token_hex(16)

    def body(self, *messages: dict[str, Any], name: str = "Sheena") -> dict[str, Any]:
        contacts = [{"profile": {"name": name}, "wa_id": m["from"]} for m in messages[:1]]
        value = {
            "messaging_product": "whatsapp",
            "metadata": {"display_phone_number": "15550783881", "phone_number_id": self.phone},
            "contacts": contacts,
            "messages": list(messages),
        }
        return {
            "object": "whatsapp_business_account",
            "entry": [{"id": "102290129340398", "changes": [{"value": value, "field": "messages"}]}],
        }

    @staticmethod
    def text(contact: str, text: str, *, timestamp: str | None = None, **extra: Any) -> dict[str, Any]:
        return {
            "from": contact,
            "id": "wamid." + uuid.uuid4().hex,
            "timestamp": timestamp or str(int(time.time())),
            "type": "text",
            "text": {"body": text},
            **extra,
        }

    async def post(
        self, http: aiohttp.ClientSession, body: dict[str, Any] | bytes, signature: str | None = "sign"
    ) -> tuple[int, Any]:
        raw = body if isinstance(body, bytes) else orjson.dumps(body)
        headers = {"Content-Type": "application/json"}
        if signature == "sign":
            headers["X-Hub-Signature-256"] = whatsapp.sign(self.app_secret, raw)
        elif signature is not None:
            headers["X-Hub-Signature-256"] = signature
        async with http.post(f"{self.dep.base_url}/webhooks/whatsapp", data=raw, headers=headers) as r:
            return r.status, await r.json(content_type=None)


class Twilio:
    """A registered Twilio channel and signed forms for it."""

    def __init__(self, dep: Deployment, url: str) -> None:
        self.dep = dep
        self.id = "tw-" + uuid.uuid4().hex[:8]
        self.account_sid = "AC" + uuid.uuid4().hex
        self.auth_token = secrets.token_hex(16)
        self.url = url

    def inbound(self, contact: str, body: str) -> dict[str, str]:
        sid = "SM" + uuid.uuid4().hex
        return {
            "AccountSid": self.account_sid,
            "MessageSid": sid,
            "SmsMessageSid": sid,
            "From": "whatsapp:+" + contact,
            "To": "whatsapp:+14155238886",
            "Body": body,
            "NumMedia": "0",
        }

    async def post(
        self, http: aiohttp.ClientSession, form: dict[str, str], *, signed_url: str | None = None
    ) -> tuple[int, str]:
        signature = twilio.expected_signature(self.auth_token, signed_url or self.url, form)
        headers = {"Content-Type": "application/x-www-form-urlencoded", "X-Twilio-Signature": signature}
        async with http.post(
            f"{self.dep.base_url}/webhooks/twilio", data=urlencode(form), headers=headers
        ) as r:
            return r.status, await r.text()


async def _register(http: aiohttp.ClientSession, dep: Deployment, body: dict[str, Any]) -> tuple[int, Any]:
    async with http.post(f"{dep.base_url}/v1/channels", json=body, headers=dep.admin_headers()) as r:
        return r.status, await r.json(content_type=None)


@pytest.fixture(scope="module")
async def wa(deployment: Deployment) -> WhatsApp:
    """A WhatsApp channel on the module's deployment."""
    ch = WhatsApp(deployment)
    async with aiohttp.ClientSession() as http:
        status, answer = await _register(
            http,
            deployment,
            {
                "id": ch.id,
                "provider": "whatsapp",
                "phone_number_id": ch.phone,
                "app_secret": ch.app_secret,
                "verify_token": secrets.token_urlsafe(12),
            },
        )
    assert status == 201, answer
    return ch


@pytest.fixture(scope="module")
async def tw(deployment: Deployment) -> Twilio:
    """A Twilio channel whose public URL has no explicit port."""
    ch = Twilio(deployment, "https://parley.example.com/webhooks/twilio")
    async with aiohttp.ClientSession() as http:
        status, answer = await _register(
            http,
            deployment,
            {
                "id": ch.id,
                "provider": "twilio",
                "account_sid": ch.account_sid,
                "auth_token": ch.auth_token,
                "public_url": ch.url,
            },
        )
    assert status == 201, answer
    return ch


async def _stored(db: asyncpg.Connection, channel_id: str, provider_message_id: str) -> asyncpg.Record:
    async def probe() -> asyncpg.Record | None:
        row: asyncpg.Record | None = await db.fetchrow(
            "SELECT * FROM messages WHERE channel_id = $1 AND provider_message_id = $2",
            channel_id,
            provider_message_id,
        )
        return row

    return await wait_until(probe, 30, f"message {provider_message_id[:60]!r} stored")


async def _no_dead_letters(db: asyncpg.Connection) -> None:
    letters = await db.fetch("SELECT source_topic, error FROM dead_letters")
    assert letters == [], letters


async def _generic(
    http: aiohttp.ClientSession, dep: Deployment, ch: GenericChannel, body: dict[str, Any] | bytes
) -> tuple[int, Any]:
    raw, headers = ch.signed(body)
    async with http.post(f"{dep.base_url}/webhooks/generic/{ch.id}", data=raw, headers=headers) as r:
        return r.status, await r.json(content_type=None)


async def test_generic_channel_refuses_what_postgres_cannot_store(
    http: aiohttp.ClientSession, deployment: Deployment, channel: GenericChannel, db: asyncpg.Connection
) -> None:
    contact = _contact()
    now = int(time.time())

    def at(message_id: str, timestamp: object) -> dict[str, Any]:
        return {**message(message_id, contact, "hi"), "timestamp": timestamp}

    deep = orjson.dumps(message("deep-1", contact, "hi"))[:-1] + b',"x":' + _deep_json(500) + b"}"
    cases: list[tuple[str, dict[str, Any] | bytes, str]] = [
        ("NUL in text", message("nul-1", contact, "a\x00b"), "NUL"),
        ("NUL in sender", message("nul-2", contact + "\x00", "hi"), "NUL"),
        ("NUL in message id", message("nul-\x003", contact, "hi"), "NUL"),
        ("year 9999 (unix)", at("ts-1", YEAR_9999), "timestamp"),
        ("past datetime range", at("ts-2", 10**15), "timestamp"),
        ("year 9999 (ISO)", at("ts-3", "9999-12-31T23:59:59Z"), "timestamp"),
        ("year 1 (ISO)", at("ts-4", "0001-01-01T00:00:00+01:00"), "timestamp"),
        ("two days ahead", at("ts-5", now + 2 * 86400), "timestamp"),
        ("unix 0", at("ts-6", 0), "timestamp"),
        ("deep", deep, "deep"),
    ]
    for name, body, reason in cases:
        status, answer = await _generic(http, deployment, channel, body)
        assert (status, reason in answer.get("error", "")) == (422, True), (name, status, answer)
    # One that is fine is stored; the refused ones never reached Kafka.
    status, answer = await _generic(http, deployment, channel, message("fine-1", contact, "ok é 🙂"))
    assert status == 200, answer
    await _stored(db, channel.id, "fine-1")
    assert await db.fetchval("SELECT count(*) FROM messages WHERE channel_id = $1", channel.id) >= 1
    await _no_dead_letters(db)


async def test_whatsapp_nul_and_extreme_timestamps_are_normalised_and_stored(
    http: aiohttp.ClientSession, wa: WhatsApp, db: asyncpg.Connection
) -> None:
    contact = _contact()
    nul = wa.text(contact, "a\x00b", extra_field={"k\x00ey": ["v\x00"]})
    nul_id = dict(wa.text(contact, "id with NUL"), id="wamid.nul\x00" + uuid.uuid4().hex)
    future = wa.text(contact, "from year 9999", timestamp=str(YEAR_9999))
    beyond = wa.text(contact, "past year 9999", timestamp="99999999999999")
    epoch = wa.text(contact, "from 1970", timestamp="0")
    before = time.time()
    for item in (nul, nul_id, future, beyond, epoch):
        status, answer = await wa.post(http, wa.body(item, name="Na\x00me"))
        assert (status, answer) == (200, {"accepted": 1, "parked": 0}), (item["text"], status, answer)
    row = await _stored(db, wa.id, nul["id"])
    assert row["text"] == "a\ufffdb"
    payload = json.loads(row["payload"])
    assert payload["extra_field"] == {"k\ufffdey": ["v\ufffd"]}
    assert payload["contact_profile"] == {"name": "Na\ufffdme"}
    await _stored(db, wa.id, nul_id["id"].replace("\x00", "\ufffd"))
    for item in (future, beyond, epoch):
        row = await _stored(db, wa.id, item["id"])
        assert before - 5 <= row["sent_at"].timestamp() <= time.time() + 5, (item["text"], row["sent_at"])
    await _no_dead_letters(db)


async def test_twilio_nul_is_normalised_and_stored(
    http: aiohttp.ClientSession, tw: Twilio, db: asyncpg.Connection
) -> None:
    form = tw.inbound(_contact(), "a\x00b")
    form["Extra\x00Param"] = "x\x00"
    status, answer = await tw.post(http, form)
    assert status == 200, answer
    row = await _stored(db, tw.id, form["MessageSid"])
    assert row["text"] == "a\ufffdb"
    assert json.loads(row["payload"])["Extra\ufffdParam"] == "x\ufffd"
    await _no_dead_letters(db)


async def test_too_deep_provider_bodies_get_a_4xx_and_are_not_produced(
    http: aiohttp.ClientSession, wa: WhatsApp, db: asyncpg.Connection
) -> None:
    contact = _contact()
    # The envelope takes 8 levels down to a message; a payload near the limit is still fine.
    ok = wa.text(contact, "deep but fine", extra=_nested(MAX_NESTING - 9))
    deep = wa.text(contact, "too deep", extra=_nested(150))
    status, answer = await wa.post(http, wa.body(ok))
    assert status == 200, answer
    status, answer = await wa.post(http, wa.body(deep))
    assert status == 422 and "nests deeper" in answer["error"], answer
    await _stored(db, wa.id, ok["id"])
    assert await db.fetchval("SELECT count(*) FROM messages WHERE provider_message_id = $1", deep["id"]) == 0
    await _no_dead_letters(db)


async def test_big_bodies_are_stored_once_or_refused_with_413_never_503(
    http: aiohttp.ClientSession, wa: WhatsApp, tw: Twilio, db: asyncpg.Connection
) -> None:
    contact = _contact()
    big = wa.text(contact, "x" * 600_000)
    status, answer = await wa.post(http, wa.body(big))
    assert status == 200, answer
    row = await _stored(db, wa.id, big["id"])
    assert len(row["text"]) == 600_000 and "body" not in json.loads(row["payload"])["text"]

    form = tw.inbound(_contact(), "y" * 600_000)
    status, text = await tw.post(http, form)
    assert status == 200, text
    row = await _stored(db, tw.id, form["MessageSid"])
    assert len(row["text"]) == 600_000 and "Body" not in json.loads(row["payload"])

    # Under the 1 MiB body limit, but the location text repeats the place's name: over a record.
    place = {"latitude": 1.5, "longitude": 2.5, "name": "n" * 470_000, "address": "a" * 470_000}
    huge = dict(wa.text(contact, ""), type="location", location=place)
    del huge["text"]
    status, answer = await wa.post(http, wa.body(huge))
    assert status == 413 and "limit" in answer["error"], answer
    await _no_dead_letters(db)


async def test_unreadable_items_of_one_body_make_one_bounded_letter(
    http: aiohttp.ClientSession, wa: WhatsApp, db: asyncpg.Connection
) -> None:
    contact = _contact()
    good = wa.text(contact, "good one")
    broken = []
    for i in range(3):
        item = wa.text(contact, f"broken {i} " + "z" * 150_000)
        del item["timestamp"]
        broken.append(item)
    status, answer = await wa.post(http, wa.body(good, *broken))
    assert (status, answer) == (200, {"accepted": 1, "parked": 1}), answer
    await _stored(db, wa.id, good["id"])

    async def letters() -> list[asyncpg.Record] | None:
        rows: list[asyncpg.Record] = await db.fetch(
            "SELECT * FROM dead_letters WHERE source_topic = 'webhook:whatsapp'"
        )
        return rows or None

    [letter] = await wait_until(letters, 30, "the parked body")
    assert letter["error"].count("timestamp is missing") == 3, letter["error"]
    assert letter["key"] == wa.phone
    await db.execute("DELETE FROM dead_letters")  # this test's letter is expected; others are not


async def test_unsigned_callers_learn_nothing_and_unknown_ids_are_401(
    http: aiohttp.ClientSession, deployment: Deployment, wa: WhatsApp, tw: Twilio, channel: GenericChannel
) -> None:
    contact = _contact()
    body = wa.body(wa.text(contact, "hi"))
    raw = orjson.dumps(body)
    unknown = raw.replace(wa.phone.encode(), b"999")
    other = whatsapp.sign("not-the-secret", raw)
    answers = [
        await wa.post(http, raw, None),
        await wa.post(http, raw, "sha256=" + "0" * 64),
        await wa.post(http, raw, other),
        await wa.post(http, unknown, whatsapp.sign(wa.app_secret, unknown)),
        # Unsigned garbage gets no parser's opinion (no JSON error, no schema path).
        await wa.post(http, b'{"phone_number_id": "' + wa.phone.encode() + b'", nope', None),
        await wa.post(http, {"object": "page", "metadata": {"phone_number_id": wa.phone}}, "sha256=00"),
    ]
    assert {status for status, _ in answers} == {401}, answers
    assert len({json.dumps(answer, sort_keys=True) for _, answer in answers}) == 1, answers

    generic_raw, headers = channel.signed(message("u-1", contact, "hi"))
    async with http.post(
        f"{deployment.base_url}/webhooks/generic/no-such-channel", data=generic_raw, headers=headers
    ) as r:
        assert r.status == 401, await r.text()
        assert "no signature matches" in (await r.json())["error"]
    status, _ = await tw.post(http, dict(tw.inbound(contact, "hi"), AccountSid="AC" + "0" * 32))
    assert status == 401


async def test_twilio_signature_with_or_without_the_default_port(
    http: aiohttp.ClientSession, tw: Twilio, db: asyncpg.Connection
) -> None:
    form = tw.inbound(_contact(), "signed with :443")
    status, text = await tw.post(http, form, signed_url="https://parley.example.com:443/webhooks/twilio")
    assert status == 200, text
    await _stored(db, tw.id, form["MessageSid"])
    form = tw.inbound(_contact(), "signed with another port")
    status, _ = await tw.post(http, form, signed_url="https://parley.example.com:8443/webhooks/twilio")
    assert status == 401


async def test_generic_secrets_must_decode_and_unpadded_ones_work(
    http: aiohttp.ClientSession, deployment: Deployment, db: asyncpg.Connection
) -> None:
    for bad in ("whsec_" + "A" * 17, "whsec_" + "A" * 15 + "=" + "A" * 4, "whsec_" + "-_" * 12):
        status, answer = await _register(
            http, deployment, {"id": "bad-" + uuid.uuid4().hex[:6], "provider": "generic", "secret": bad}
        )
        assert status == 422, (bad, status, answer)
    key = secrets.token_bytes(32)  # 43 base64 characters + "=": unpadded is what svix-like tools print
    ch_id = "unpadded-" + uuid.uuid4().hex[:6]
    secret = "whsec_" + base64.b64encode(key).decode().rstrip("=")
    status, answer = await _register(http, deployment, {"id": ch_id, "provider": "generic", "secret": secret})
    assert status == 201, answer
    raw = orjson.dumps(message("unpadded-1", _contact(), "hi"))
    ts = int(time.time())
    headers = {
        "webhook-id": "msg_unpadded",
        "webhook-timestamp": str(ts),
        "webhook-signature": sign_standard_webhook(key, "msg_unpadded", ts, raw),
    }
    async with http.post(f"{deployment.base_url}/webhooks/generic/{ch_id}", data=raw, headers=headers) as r:
        assert r.status == 200, await r.text()
    await _stored(db, ch_id, "unpadded-1")


async def test_admin_token_needs_the_bearer_scheme_and_cursors_are_checked(
    http: aiohttp.ClientSession, deployment: Deployment
) -> None:
    url = f"{deployment.base_url}/v1/conversations"
    async with http.get(url, headers={"Authorization": deployment.admin_token}) as r:
        assert r.status == 401
    async with http.get(url, headers={"Authorization": "bearer " + deployment.admin_token}) as r:
        assert r.status == 200  # the scheme is case-insensitive (RFC 9110)
    for shape in (["2024-01-01T00:00:00+00:00", "not-a-uuid"], ["2024-01-01T00:00:00", str(uuid.uuid4())]):
        cursor = base64.urlsafe_b64encode(orjson.dumps(shape)).decode()
        async with http.get(url, params={"cursor": cursor}, headers=deployment.admin_headers()) as r:
            assert r.status == 400, (shape, r.status, await r.text())


async def test_two_senders_reusing_a_message_id_are_two_messages(
    http: aiohttp.ClientSession, deployment: Deployment, channel: GenericChannel, db: asyncpg.Connection
) -> None:
    first, second = _contact(), _contact()
    answers = [
        await _generic(http, deployment, channel, message("same-id", c, "hi")) for c in [first, second]
    ]
    assert [s for s, _ in answers] == [200, 200], answers
    assert answers[0][1]["accepted"] != answers[1][1]["accepted"]

    async def both() -> bool:
        n = await db.fetchval(
            "SELECT count(*) FROM conversations WHERE channel_id = $1 AND contact_id = ANY($2::text[])",
            channel.id,
            [first, second],
        )
        return bool(n == 2)

    await wait_until(both, 30, "a conversation for each sender")

    async def two_messages() -> bool:
        n = await db.fetchval(
            "SELECT count(*) FROM messages WHERE channel_id = $1 AND provider_message_id = 'same-id'"
            " AND contact_id = ANY($2::text[])",
            channel.id,
            [first, second],
        )
        return bool(n == 2)

    await wait_until(two_messages, 30, "a message row for each sender")


async def test_commands_with_an_idempotency_key_apply_once(
    http: aiohttp.ClientSession, deployment: Deployment, channel: GenericChannel, db: asyncpg.Connection
) -> None:
    contact = _contact()
    status, answer = await _generic(http, deployment, channel, message("idem-1", contact, "hi"))
    assert status == 200, answer

    async def conversation() -> str | None:
        found: str | None = await db.fetchval(
            "SELECT id::text FROM conversations WHERE channel_id = $1 AND contact_id = $2",
            channel.id,
            contact,
        )
        return found

    conv = await wait_until(conversation, 30, "the conversation")
    url = f"{deployment.base_url}/v1/conversations/{conv}"
    accepted = []
    for _ in range(2):
        headers = {**deployment.admin_headers(), "Idempotency-Key": "accept-once-1"}
        async with http.post(f"{url}/accept", json={"agent_id": "ana"}, headers=headers) as r:
            assert r.status == 202, await r.text()
            accepted.append((await r.json())["accepted"])
    assert accepted[0] == accepted[1], accepted
    headers = {**deployment.admin_headers(), "Idempotency-Key": "accept-once-1"}
    async with http.post(f"{url}/close", json={}, headers=headers) as r:
        assert r.status == 202
        assert (await r.json())["accepted"] != accepted[0]  # the key is scoped per route
    for bad in ("x" * 256, ""):
        headers = {**deployment.admin_headers(), "Idempotency-Key": bad}
        async with http.post(f"{url}/close", json={}, headers=headers) as r:
            assert r.status == 400, bad

    async def closed() -> bool:
        return bool(await db.fetchval("SELECT state = 'closed' FROM conversations WHERE id = $1::uuid", conv))

    await wait_until(closed, 30, "the close applied")
    applied = await db.fetchval("SELECT count(*) FROM processed_events WHERE event_id = $1", accepted[0])
    assert applied == 1
    accepts = await db.fetchval(
        "SELECT count(*) FROM conversation_events"
        " WHERE conversation_id = $1::uuid AND to_state = 'processing'",
        conv,
    )
    assert accepts == 1
