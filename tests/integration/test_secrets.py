"""Channel secrets are sealed at rest, rotate without a window of rejected webhooks, and every API
process sees a channel change at once (Postgres LISTEN/NOTIFY drops its cache)."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from urllib.parse import urlencode

import aiohttp
import asyncpg
import orjson
import pytest

from channels import twilio, whatsapp
from parley.localstack import ROOT
from streams.channel_secrets import Sealer
from tests.integration.harness import Deployment, GenericChannel, message, wait_until
from tests.integration.test_providers import Twilio, WhatsApp


@pytest.fixture(scope="module")
async def second_api(deployment: Deployment) -> AsyncIterator[Deployment]:
    """Another API process of the same deployment (same database and topics), on its own port."""
    other = Deployment(
        deployment.services,
        name=deployment.name,
        admin_token=deployment.admin_token,
        secrets_key=deployment.secrets_key,
        logs=deployment.logs / "second",
    )
    other.start("api")
    async with aiohttp.ClientSession() as http:
        await other.wait_api(http)
    try:
        yield other
    finally:
        other.stop_all()


async def _generic(
    http: aiohttp.ClientSession, dep: Deployment, ch: GenericChannel, key: bytes | None = None
) -> int:
    signer = GenericChannel(ch.id, key or ch.key)
    raw, headers = signer.signed(message("m-" + uuid.uuid4().hex, "5511999990000", "oi"))
    async with http.post(f"{dep.base_url}/webhooks/generic/{ch.id}", data=raw, headers=headers) as r:
        return r.status


async def _admin(
    http: aiohttp.ClientSession, dep: Deployment, method: str, path: str, body: object = None
) -> tuple[int, object]:
    async with http.request(method, f"{dep.base_url}{path}", json=body, headers=dep.admin_headers()) as r:
        text = await r.text()
        return r.status, orjson.loads(text) if text else None


async def _whatsapp(http: aiohttp.ClientSession, dep: Deployment, wa: WhatsApp, app_secret: str) -> int:
    body, _ = wa.fixture("text")
    raw = orjson.dumps(body)
    headers = {"Content-Type": "application/json", "X-Hub-Signature-256": whatsapp.sign(app_secret, raw)}
    async with http.post(f"{dep.base_url}/webhooks/whatsapp", data=raw, headers=headers) as r:
        return r.status


async def _verify(http: aiohttp.ClientSession, dep: Deployment, token: str) -> int:
    params = {"hub.mode": "subscribe", "hub.verify_token": token, "hub.challenge": "1158201444"}
    async with http.get(f"{dep.base_url}/webhooks/whatsapp", params=params) as r:
        assert r.status != 200 or await r.text() == "1158201444"
        return r.status


async def _twilio(http: aiohttp.ClientSession, dep: Deployment, tw: Twilio, auth_token: str) -> int:
    form = tw.fixture("inbound_sms", "+5511999990000")
    headers = {
        "Content-Type": "application/x-www-form-urlencoded",
        "X-Twilio-Signature": twilio.expected_signature(auth_token, tw.url, form),
    }
    async with http.post(f"{dep.base_url}/webhooks/twilio", data=urlencode(form), headers=headers) as r:
        return r.status


async def _register(http: aiohttp.ClientSession, dep: Deployment) -> tuple[GenericChannel, WhatsApp, Twilio]:
    gen, wa, tw = GenericChannel("gen-" + uuid.uuid4().hex[:8]), WhatsApp(dep), Twilio(dep)
    for body in (
        {"id": gen.id, "provider": "generic", "secret": gen.secret},
        {
            "id": wa.id,
            "provider": "whatsapp",
            "phone_number_id": wa.phone,
            "app_secret": wa.app_secret,
            "verify_token": wa.verify_token,
        },
        {
            "id": tw.id,
            "provider": "twilio",
            "account_sid": tw.account_sid,
            "auth_token": tw.auth_token,
            "public_url": tw.url,
        },
    ):
        status, answer = await _admin(http, dep, "POST", "/v1/channels", body)
        assert status == 201, answer
    return gen, wa, tw


async def test_secrets_are_sealed_in_postgres_and_webhooks_still_verify(
    http: aiohttp.ClientSession, deployment: Deployment, db: asyncpg.Connection
) -> None:
    gen, wa, tw = await _register(http, deployment)
    rows = await db.fetch(
        "SELECT id, config::text AS config, sealed FROM channels WHERE id = ANY($1)", [gen.id, wa.id, tw.id]
    )
    assert len(rows) == 3
    stored = " ".join(f"{r['config']} {r['sealed']}" for r in rows)
    for secret in (
        gen.secret,
        gen.secret.removeprefix("whsec_"),
        wa.app_secret,
        wa.verify_token,
        tw.auth_token,
    ):
        assert secret not in stored
    assert all(r["sealed"] for r in rows)
    assert wa.phone in stored and tw.account_sid in stored  # lookup fields stay in clear

    assert await _generic(http, deployment, gen) == 200
    assert await _whatsapp(http, deployment, wa, wa.app_secret) == 200
    assert await _verify(http, deployment, wa.verify_token) == 200
    assert await _verify(http, deployment, "not-the-token") == 403
    assert await _twilio(http, deployment, tw, tw.auth_token) == 200
    assert await _generic(http, deployment, gen, key=b"0" * 32) == 401
    assert await _whatsapp(http, deployment, wa, "wrong-secret") == 401
    assert await _twilio(http, deployment, tw, "0" * 32) == 401
    status, listed = await _admin(http, deployment, "GET", "/v1/channels")
    assert status == 200 and gen.secret not in str(listed) and wa.verify_token not in str(listed)


async def _soon(probe: Callable[[], Awaitable[int]], status: int) -> None:
    """The other API process answers `status` within a second: it hears the change by a NOTIFY
    sent at the commit, which can reach it a few milliseconds after the first API answered."""

    async def seen() -> bool:
        return await probe() == status

    await wait_until(seen, 1.0, f"the second API to answer {status}")


async def test_a_rotation_through_one_api_is_seen_by_another_within_a_second(
    http: aiohttp.ClientSession, deployment: Deployment, second_api: Deployment
) -> None:
    gen, wa, tw = await _register(http, deployment)
    # The second process has the channels cached (and an unknown id cached as unknown).
    unknown = GenericChannel("later-" + uuid.uuid4().hex[:8])
    assert await _generic(http, second_api, gen) == 200
    assert await _generic(http, second_api, unknown) == 401  # unknown: like a bad signature
    assert await _whatsapp(http, second_api, wa, wa.app_secret) == 200
    assert await _twilio(http, second_api, tw, tw.auth_token) == 200

    # Generic: rotate through the first API; both secrets verify through the second, right away.
    new = GenericChannel(gen.id)
    status, body = await _admin(http, deployment, "PATCH", f"/v1/channels/{gen.id}", {"secret": new.secret})
    assert status == 200, body
    assert isinstance(body, dict) and body["secrets"]["secret"]["active"] == 2
    await _soon(lambda: _generic(http, second_api, new), 200)
    assert await _generic(http, second_api, gen) == 200  # the previous one, during the grace period
    raw, headers = new.signed(message("both-" + uuid.uuid4().hex, "5511999990000", "oi"))
    headers["webhook-signature"] += (
        " "
        + gen.signed(raw, msg_id=headers["webhook-id"], timestamp=int(headers["webhook-timestamp"]))[1][
            "webhook-signature"
        ]
    )
    async with http.post(f"{second_api.base_url}/webhooks/generic/{gen.id}", data=raw, headers=headers) as r:
        assert r.status == 200  # a sender signing with both (Standard Webhooks) is accepted too
    status, _ = await _admin(http, deployment, "PATCH", f"/v1/channels/{gen.id}", {"revoke_previous": True})
    assert status == 200
    await _soon(lambda: _generic(http, second_api, gen), 401)
    assert await _generic(http, second_api, new) == 200

    # WhatsApp and Twilio: same, and with keep_previous_for=0 the old secret stops at once.
    status, _ = await _admin(
        http,
        deployment,
        "PATCH",
        f"/v1/channels/{wa.id}",
        {"app_secret": "new-app-secret", "verify_token": "new-verify-token"},
    )
    assert status == 200
    await _soon(lambda: _whatsapp(http, second_api, wa, "new-app-secret"), 200)
    assert await _whatsapp(http, second_api, wa, wa.app_secret) == 200
    assert await _verify(http, second_api, "new-verify-token") == 200
    assert await _verify(http, second_api, wa.verify_token) == 200
    status, _ = await _admin(
        http, deployment, "PATCH", f"/v1/channels/{tw.id}", {"auth_token": "n" * 32, "keep_previous_for": 0}
    )
    assert status == 200
    await _soon(lambda: _twilio(http, second_api, tw, "n" * 32), 200)
    assert await _twilio(http, second_api, tw, tw.auth_token) == 401

    # A wrong field for the provider, or nothing to do: 422; unknown channel: 404.
    assert (await _admin(http, deployment, "PATCH", f"/v1/channels/{tw.id}", {"secret": new.secret}))[
        0
    ] == 422
    assert (await _admin(http, deployment, "PATCH", f"/v1/channels/{tw.id}", {}))[0] == 422
    assert (await _admin(http, deployment, "PATCH", "/v1/channels/nope", {"revoke_previous": True}))[0] == 404

    # Created through the first: the second forgets that the id was unknown.
    status, _ = await _admin(
        http,
        deployment,
        "POST",
        "/v1/channels",
        {"id": unknown.id, "provider": "generic", "secret": unknown.secret},
    )
    assert status == 201
    await _soon(lambda: _generic(http, second_api, unknown), 200)

    # Deleted through the first: gone for the second.
    status, _ = await _admin(http, deployment, "DELETE", f"/v1/channels/{gen.id}")
    assert status == 204
    await _soon(lambda: _generic(http, second_api, new), 401)  # deleted: unknown from then on
    assert (await _admin(http, deployment, "DELETE", f"/v1/channels/{gen.id}"))[0] == 404


def _rotate_secrets(dep: Deployment, keys: str) -> str:
    env = {**dep.env(), "PARLEY_SECRETS_KEY": keys}
    done = subprocess.run(
        [sys.executable, "-m", "parley.cli", "rotate-secrets"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


async def test_plaintext_rows_keep_working_and_rotate_secrets_seals_them_and_changes_keys(
    http: aiohttp.ClientSession, deployment: Deployment, second_api: Deployment, db: asyncpg.Connection
) -> None:
    legacy = GenericChannel("legacy-" + uuid.uuid4().hex[:8])
    # As an earlier version stored it: the secret in clear in config, nothing sealed.
    await db.execute(
        "INSERT INTO channels (id, provider, config) VALUES ($1, 'generic', $2::jsonb)",
        legacy.id,
        orjson.dumps({"secret": legacy.secret}).decode(),
    )
    assert await _generic(http, second_api, legacy) == 200

    assert "1 channel(s) sealed from clear" in _rotate_secrets(deployment, deployment.secrets_key)
    row = await db.fetchrow("SELECT config::text AS config, sealed FROM channels WHERE id = $1", legacy.id)
    assert row is not None
    assert legacy.secret not in row["config"] and row["sealed"]
    assert await _generic(http, deployment, legacy) == 200
    assert await _generic(http, second_api, legacy) == 200

    # Key rotation: a new key first re-encrypts every row; then only the new key is needed.
    # Webhook endpoint secrets are sealed with the same key and rotate with the channels'.
    hook_in = {"url": "https://hooks.example.com/", "events": ["*"]}
    code, endpoint = await _admin(http, deployment, "POST", "/v1/webhook-endpoints", hook_in)
    assert code == 201, endpoint
    new_key = Sealer.generate_key()
    out = _rotate_secrets(deployment, f"{new_key},{deployment.secrets_key}")
    assert "0 channel(s) sealed from clear" in out and "1 webhook endpoint(s) re-encrypted" in out
    sealed = [r["sealed"] for r in await db.fetch("SELECT sealed FROM channels")]
    assert sealed and all(Sealer(new_key).open(s) for s in sealed)
    [hook] = await db.fetch("SELECT secret FROM webhook_endpoints")
    assert Sealer(new_key).open(hook["secret"]) == {"secret": endpoint["secret"]}  # type: ignore[index]
    # (Back under the deployment's key, which the running API processes hold.)
    _rotate_secrets(deployment, f"{deployment.secrets_key},{new_key}")
    assert await _generic(http, second_api, legacy) == 200


def test_the_api_refuses_to_start_without_a_secrets_key(deployment: Deployment, tmp_path: Path) -> None:
    env = {**deployment.env(), "PARLEY_SECRETS_KEY": ""}
    done = subprocess.run(
        [sys.executable, "-m", "parley.cli", "api"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2 and "PARLEY_SECRETS_KEY" in done.stderr
