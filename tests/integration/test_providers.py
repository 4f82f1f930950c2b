"""WhatsApp Cloud API and Twilio ingress end to end, with the providers' real payload shapes
(tests/fixtures, each citing its source), signatures, duplicates, statuses and dead letters."""

from __future__ import annotations

import io
import json
import random
import secrets
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode

import aiohttp
import asyncpg
import pytest

from channels import twilio, whatsapp
from tests.integration.harness import Deployment, wait_until

FIXTURES = Path(__file__).parents[1] / "fixtures"
FIXTURE_PHONE = "106540352242922"
MESSAGE_TYPES = {
    "text": ("text", "Does it come in another color?"),
    "image": ("image", None),
    "audio": ("audio", None),
    "video": ("video", None),
    "document": ("document", None),
    "sticker": ("sticker", None),
    "location": ("location", None),
    "contacts": ("contacts", None),
    "interactive_button_reply": ("interactive", None),
    "interactive_list_reply": ("interactive", None),
    "button": ("button", None),
    "reaction": ("reaction", None),
    "system": ("system", None),
    "unsupported": ("unsupported", None),
}


class WhatsApp:
    """A registered WhatsApp channel and a signer for Meta's webhooks."""

    def __init__(self, dep: Deployment) -> None:
        self.dep = dep
        self.id = "wa-" + uuid.uuid4().hex[:8]
        self.phone = str(random.randint(10**14, 10**15 - 1))
        self.app_secret = secrets.token_hex(16)
        self.verify_token = secrets.token_urlsafe(12)

    def fixture(self, name: str, contact: str | None = None) -> tuple[dict[str, Any], str]:
        """A fixture envelope rewritten to this channel, with fresh message ids and a fresh contact."""
        text = (FIXTURES / "whatsapp" / f"{name}.json").read_text()
        contact = contact or "55" + str(random.randint(10**9, 10**10 - 1))
        suffix = uuid.uuid4().hex[:8]
        text = text.replace(FIXTURE_PHONE, self.phone).replace("16505551234", contact)
        text = text.replace('"wamid.', f'"wamid.{suffix}.')
        body = json.loads(text)
        body.pop("_source")
        return body, contact

    async def post(
        self, http: aiohttp.ClientSession, body: dict[str, Any] | bytes, signature: str | None = "sign"
    ) -> tuple[int, Any]:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if signature == "sign":
            headers["X-Hub-Signature-256"] = whatsapp.sign(self.app_secret, raw)
        elif signature is not None:
            headers["X-Hub-Signature-256"] = signature
        async with http.post(f"{self.dep.base_url}/webhooks/whatsapp", data=raw, headers=headers) as r:
            return r.status, await r.json(content_type=None)


@pytest.fixture(scope="module")
async def wa(deployment: Deployment) -> WhatsApp:
    """A WhatsApp channel registered on the module's deployment."""
    ch = WhatsApp(deployment)
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{deployment.base_url}/v1/channels",
            headers=deployment.admin_headers(),
            json={
                "id": ch.id,
                "provider": "whatsapp",
                "phone_number_id": ch.phone,
                "app_secret": ch.app_secret,
                "verify_token": ch.verify_token,
            },
        ) as r,
    ):
        assert r.status == 201, await r.text()
        assert "app_secret" not in await r.text()
    return ch


async def _messages(db: asyncpg.Connection, channel_id: str, contact: str) -> list[asyncpg.Record]:
    return await db.fetch(
        "SELECT m.* FROM messages m JOIN conversations c ON c.id = m.conversation_id"
        " WHERE c.channel_id = $1 AND c.contact_id = $2 ORDER BY m.id",
        channel_id,
        contact,
    )


async def _wait_messages(
    db: asyncpg.Connection, channel_id: str, contact: str, n: int
) -> list[asyncpg.Record]:
    async def probe() -> list[asyncpg.Record] | None:
        rows = await _messages(db, channel_id, contact)
        return rows if len(rows) >= n else None

    return await wait_until(probe, 30, f"{n} message(s) of {contact}")


async def test_verification_handshake(
    http: aiohttp.ClientSession, deployment: Deployment, wa: WhatsApp
) -> None:
    url = f"{deployment.base_url}/webhooks/whatsapp"
    ok = {"hub.mode": "subscribe", "hub.verify_token": wa.verify_token, "hub.challenge": "1158201444"}
    async with http.get(url, params=ok) as r:
        assert (r.status, await r.text()) == (200, "1158201444")
    async with http.get(url, params={**ok, "hub.verify_token": "wrong-token"}) as r:
        assert r.status == 403
    async with http.get(url, params={"hub.mode": "subscribe"}) as r:
        assert r.status == 400


@pytest.mark.parametrize("name", sorted(MESSAGE_TYPES))
async def test_every_message_type_is_stored(
    http: aiohttp.ClientSession, wa: WhatsApp, db: asyncpg.Connection, name: str
) -> None:
    body, contact = wa.fixture(name)
    status, answer = await wa.post(http, body)
    assert status == 200 and answer["accepted"] >= 1, answer
    raw_message = body["entry"][0]["changes"][0]["value"]["messages"][0]
    [row] = await _wait_messages(db, wa.id, contact, 1)
    kind, text = MESSAGE_TYPES[name]
    assert row["type"] == kind and row["direction"] == "inbound"
    assert row["provider_message_id"] == raw_message["id"]
    if text is not None:
        assert row["text"] == text
    payload = json.loads(row["payload"]) if isinstance(row["payload"], str) else row["payload"]
    media = raw_message.get(kind, {}) if isinstance(raw_message.get(kind), dict) else {}
    if "id" in media:  # media keep their provider ids and metadata
        assert payload[kind]["id"] == media["id"]
        assert payload[kind].get("mime_type") == media.get("mime_type")


async def test_one_post_with_many_messages_and_statuses_gives_one_event_each(
    http: aiohttp.ClientSession, deployment: Deployment, wa: WhatsApp, db: asyncpg.Connection
) -> None:
    # The fixture's value-level errors come from a second number of the same Meta app.
    second = str(random.randint(10**14, 10**15 - 1))
    async with http.post(
        f"{deployment.base_url}/v1/channels",
        headers=deployment.admin_headers(),
        json={
            "id": wa.id + "-2",
            "provider": "whatsapp",
            "phone_number_id": second,
            "app_secret": wa.app_secret,
            "verify_token": secrets.token_urlsafe(12),
        },
    ) as r:
        assert r.status == 201, await r.text()
    body, _ = wa.fixture("batch_mixed")
    body = json.loads(json.dumps(body).replace("114896151713920", second))
    values = [c["value"] for e in body["entry"] for c in e["changes"] if c["field"] == "messages"]
    messages = [m for v in values for m in v.get("messages", [])]
    statuses = [s for v in values for s in v.get("statuses", [])]
    status, answer = await wa.post(http, body)
    assert status == 200 and answer["accepted"] == len(messages) + len(statuses), answer
    for v in values:
        channel_id = wa.id if v["metadata"]["phone_number_id"] == wa.phone else wa.id + "-2"
        for m in v.get("messages", []):
            await _wait_messages(db, channel_id, m["from"], 1)

    async def receipts() -> bool:
        n: int = await db.fetchval(
            "SELECT count(*) FROM message_receipts WHERE provider_message_id = ANY($1::text[])",
            [s["id"] for s in statuses],
        )
        return n == len(statuses)

    await wait_until(receipts, 30, "every receipt")


async def test_three_deliveries_give_one_message_and_one_event(
    http: aiohttp.ClientSession, wa: WhatsApp, db: asyncpg.Connection
) -> None:
    body, contact = wa.fixture("text")
    for _ in range(3):
        assert (await wa.post(http, body))[0] == 200
    later, _ = wa.fixture("image", contact)
    assert (await wa.post(http, later))[0] == 200
    rows = await _wait_messages(db, wa.id, contact, 2)
    assert [r["type"] for r in rows] == ["text", "image"]
    ledger = await db.fetchval(
        "SELECT count(*) FROM processed_events WHERE event_id = $1",
        f"whatsapp:{wa.id}:{rows[0]['provider_message_id']}",
    )
    causes = await db.fetchval(
        "SELECT count(*) FROM conversation_events WHERE cause = $1",
        f"message:{rows[0]['provider_message_id']}",
    )
    assert (ledger, causes) == (1, 1)


async def test_bad_requests_get_a_reason(
    http: aiohttp.ClientSession, deployment: Deployment, wa: WhatsApp
) -> None:
    body, _ = wa.fixture("text")
    raw = json.dumps(body).encode()
    cases: list[tuple[str, dict[str, Any] | bytes, str | None, int, str]] = [
        # Every unverified request gets the same answer (the log says why).
        ("wrong signature", body, "sha256=" + "0" * 64, 401, "signature rejected"),
        ("missing signature", body, None, 401, "signature rejected"),
        ("other secret", body, whatsapp.sign("not-the-secret", raw), 401, "signature rejected"),
        (
            "malformed JSON",
            b'{"phone_number_id": "' + wa.phone.encode() + b'", nope',
            "sign",
            400,
            "not valid JSON",
        ),
        (
            "wrong envelope",
            {"object": "page", "metadata": {"phone_number_id": wa.phone}},
            "sign",
            422,
            "envelope",
        ),
        (
            "unknown phone",
            json.loads(raw.decode().replace(wa.phone, "999")),
            "sign",
            401,
            "signature rejected",
        ),
    ]
    for name, payload, signature, want, reason in cases:
        status, answer = await wa.post(http, payload, signature)
        assert (status, reason in answer["error"]) == (want, True), (name, status, answer)
    # A body naming no phone number (e.g. an account update) has nothing to verify or produce.
    assert await wa.post(http, {"object": "page", "entry": []}) == (200, {"accepted": 0, "parked": 0})
    big = b'{"object": "whatsapp_business_account", "entry": [], "pad": "' + b"x" * (1024 * 1024) + b'"}'
    async with http.post(f"{deployment.base_url}/webhooks/whatsapp", data=io.BytesIO(big)) as r:
        assert r.status == 413


async def test_service_window_tracks_the_users_last_message(
    http: aiohttp.ClientSession, deployment: Deployment, wa: WhatsApp, db: asyncpg.Connection
) -> None:
    body, contact = wa.fixture("text")
    assert (await wa.post(http, body))[0] == 200
    await _wait_messages(db, wa.id, contact, 1)
    conv = await db.fetchrow(
        "SELECT * FROM conversations WHERE channel_id = $1 AND contact_id = $2", wa.id, contact
    )
    assert conv is not None
    sent = int(body["entry"][0]["changes"][0]["value"]["messages"][0]["timestamp"])
    assert conv["window_expires_at"].timestamp() == sent + 24 * 3600
    async with http.get(
        f"{deployment.base_url}/v1/conversations/{conv['id']}", headers=deployment.admin_headers()
    ) as r:
        assert (await r.json())["window_expires_at"] == conv["window_expires_at"].isoformat()


async def _receipt(
    http: aiohttp.ClientSession,
    wa: WhatsApp,
    contact: str,
    wamid: str,
    status: str,
    ts: int,
    errors: list[dict[str, Any]] | None = None,
) -> None:
    body, _ = wa.fixture("status_failed" if errors else "status_delivered", contact)
    st = body["entry"][0]["changes"][0]["value"]["statuses"][0]
    st.update({"id": wamid, "status": status, "timestamp": str(ts), "recipient_id": contact})
    if errors:
        st["errors"] = errors
    assert (await wa.post(http, body))[0] == 200


async def test_statuses_only_move_forward_and_wait_for_their_message(
    http: aiohttp.ClientSession, deployment: Deployment, wa: WhatsApp, db: asyncpg.Connection
) -> None:
    body, contact = wa.fixture("text")
    assert (await wa.post(http, body))[0] == 200
    await _wait_messages(db, wa.id, contact, 1)
    conv_id = await db.fetchval(
        "SELECT id FROM conversations WHERE channel_id = $1 AND contact_id = $2", wa.id, contact
    )
    early, late = f"wamid.out-{uuid.uuid4().hex}", f"wamid.out-{uuid.uuid4().hex}"
    # A receipt before the outbound record: kept, applied when the message appears.
    await _receipt(http, wa, contact, early, "delivered", 1_750_000_010)
    for wamid in (early, late):
        async with http.post(
            f"{deployment.base_url}/v1/conversations/{conv_id}/messages",
            headers=deployment.admin_headers(),
            json={"provider_message_id": wamid, "text": "Temos azul e verde."},
        ) as r:
            assert r.status == 202, await r.text()
    # Out of order and duplicated: read before sent, sent twice, a failure from another device.
    await _receipt(http, wa, contact, late, "read", 1_750_000_030)
    await _receipt(http, wa, contact, late, "sent", 1_750_000_005)
    await _receipt(http, wa, contact, late, "sent", 1_750_000_005)
    await _receipt(
        http,
        wa,
        contact,
        late,
        "failed",
        1_750_000_040,
        errors=[{"code": 131026, "title": "Message undeliverable"}],
    )

    async def settled() -> dict[str, str] | None:
        rows = await db.fetch(
            "SELECT provider_message_id, status FROM messages WHERE channel_id = $1"
            " AND direction = 'outbound' AND provider_message_id = ANY($2::text[])",
            wa.id,
            [early, late],
        )
        got = {r["provider_message_id"]: r["status"] for r in rows}
        n = await db.fetchval("SELECT count(*) FROM message_receipts WHERE provider_message_id = $1", late)
        return got if len(got) == 2 and n == 3 else None

    got = await wait_until(settled, 30, "outbound messages and receipts")
    assert got == {early: "delivered", late: "read"}
    failed = await db.fetchrow(
        "SELECT * FROM message_receipts WHERE provider_message_id = $1 AND provider_status = 'failed'", late
    )
    assert failed is not None
    errors = json.loads(failed["errors"]) if isinstance(failed["errors"], str) else failed["errors"]
    assert errors[0]["code"] == 131026 and failed["provider_at"].timestamp() == 1_750_000_040
    pending = await db.fetchval(
        "SELECT count(*) FROM message_receipts WHERE provider_message_id = $1 AND NOT applied", early
    )
    assert pending == 0


async def test_unreadable_item_is_parked_and_can_be_redriven(
    http: aiohttp.ClientSession, deployment: Deployment, wa: WhatsApp, db: asyncpg.Connection
) -> None:
    body, contact = wa.fixture("text")
    value = body["entry"][0]["changes"][0]["value"]
    broken = dict(value["messages"][0], id=value["messages"][0]["id"] + ".broken")
    del broken["timestamp"]
    value["messages"].append(broken)
    status, answer = await wa.post(http, body)
    assert status == 200 and answer == {"accepted": 1, "parked": 1}
    await _wait_messages(db, wa.id, contact, 1)

    async def letter() -> dict[str, Any] | None:
        async with http.get(
            f"{deployment.base_url}/v1/dead-letters", headers=deployment.admin_headers()
        ) as r:
            items = (await r.json())["items"]
        return next(
            (i for i in items if i["source_topic"] == "webhook:whatsapp" and broken["id"] in i["value"]), None
        )

    parked = await wait_until(letter, 30, "the parked item in /v1/dead-letters")
    assert "timestamp" in parked["error"]
    async with http.post(
        f"{deployment.base_url}/v1/dead-letters/{parked['id']}/retry", headers=deployment.admin_headers()
    ) as r:
        assert r.status == 202, await r.text()
    assert len(await _messages(db, wa.id, contact)) == 1  # the good sibling is not doubled


class Twilio:
    """A registered Twilio channel and a signer for its webhooks."""

    def __init__(self, dep: Deployment) -> None:
        self.dep = dep
        self.id = "tw-" + uuid.uuid4().hex[:8]
        self.account_sid = "AC" + uuid.uuid4().hex
        self.auth_token = secrets.token_hex(16)
        self.url = f"https://parley.example.com/webhooks/twilio?ch={self.id}"

    def fixture(self, name: str, contact: str) -> dict[str, str]:
        lines = (FIXTURES / "twilio" / f"{name}.txt").read_text().splitlines()
        form = dict(parse_qsl("&".join(line for line in lines if line and not line.startswith("#"))))
        sid = ("SM" if "MessageSid" in form else "MM") + uuid.uuid4().hex
        form.update({"AccountSid": self.account_sid, "MessageSid": sid})
        if "SmsMessageSid" in form:
            form["SmsMessageSid"] = sid
        if "SmsSid" in form:
            form["SmsSid"] = sid
        prefix = "whatsapp:" if "whatsapp" in name else ""
        key = "From" if name.startswith("inbound") else "To"
        form[key] = prefix + contact
        return form

    async def post(self, http: aiohttp.ClientSession, form: dict[str, str], sign: bool = True) -> int:
        headers = {"Content-Type": "application/x-www-form-urlencoded"}
        if sign:
            headers["X-Twilio-Signature"] = twilio.expected_signature(self.auth_token, self.url, form)
        async with http.post(
            f"{self.dep.base_url}/webhooks/twilio", data=urlencode(form), headers=headers
        ) as r:
            return r.status


@pytest.fixture(scope="module")
async def tw(deployment: Deployment) -> Twilio:
    """A Twilio channel registered on the module's deployment."""
    ch = Twilio(deployment)
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{deployment.base_url}/v1/channels",
            headers=deployment.admin_headers(),
            json={
                "id": ch.id,
                "provider": "twilio",
                "account_sid": ch.account_sid,
                "auth_token": ch.auth_token,
                "public_url": ch.url,
            },
        ) as r,
    ):
        assert r.status == 201, await r.text()
    return ch


async def test_twilio_messages_statuses_and_signatures(
    http: aiohttp.ClientSession, tw: Twilio, db: asyncpg.Connection
) -> None:
    contact = "+55" + str(random.randint(10**9, 10**10 - 1))
    inbound = tw.fixture("inbound_whatsapp_text", contact)
    for _ in range(3):  # Twilio retries: one row
        assert await tw.post(http, inbound) == 200
    media = tw.fixture("inbound_whatsapp_media", contact)
    assert await tw.post(http, media) == 200
    rows = await _wait_messages(db, tw.id, contact, 2)
    assert [r["provider_message_id"] for r in rows] == [inbound["MessageSid"], media["MessageSid"]]
    assert rows[0]["text"] == inbound["Body"] and rows[1]["type"] != "text"

    assert await tw.post(http, inbound, sign=False) == 401
    tampered = dict(inbound, Body="changed after signing")
    headers = {
        "Content-Type": "application/x-www-form-urlencoded",
        "X-Twilio-Signature": twilio.expected_signature(tw.auth_token, tw.url, inbound),
    }
    async with http.post(
        f"{tw.dep.base_url}/webhooks/twilio", data=urlencode(tampered), headers=headers
    ) as r:
        assert r.status == 401
    assert await tw.post(http, dict(inbound, AccountSid="AC" + "0" * 32)) == 401

    status = tw.fixture("status_delivered", contact)
    assert await tw.post(http, status) == 200

    async def receipt() -> bool:
        return bool(
            await db.fetchval(
                "SELECT count(*) FROM message_receipts WHERE provider_message_id = $1", status["MessageSid"]
            )
        )

    await wait_until(receipt, 30, "the Twilio receipt")
