"""The vertical slice end to end: signed webhook -> Kafka -> worker -> Postgres -> admin API."""

from __future__ import annotations

import io
import time
import uuid
from typing import Any

import aiohttp

from tests.integration.harness import Deployment, GenericChannel, message, wait_until


async def _post_webhook(
    http: aiohttp.ClientSession, dep: Deployment, ch: GenericChannel, body: dict[str, Any] | bytes, **kw: Any
) -> tuple[int, Any]:
    raw, headers = ch.signed(body, **kw)
    async with http.post(f"{dep.base_url}/webhooks/generic/{ch.id}", data=raw, headers=headers) as r:
        return r.status, await r.json(content_type=None)


async def _conversations(http: aiohttp.ClientSession, dep: Deployment, **params: str) -> list[Any]:
    async with http.get(f"{dep.base_url}/v1/conversations", params=params, headers=dep.admin_headers()) as r:
        assert r.status == 200, await r.text()
        items: list[Any] = (await r.json())["items"]
        return items


async def _messages(http: aiohttp.ClientSession, dep: Deployment, conv_id: str) -> list[Any]:
    async with http.get(
        f"{dep.base_url}/v1/conversations/{conv_id}/messages", headers=dep.admin_headers()
    ) as r:
        assert r.status == 200, await r.text()
        items: list[Any] = (await r.json())["items"]
        return items


async def test_signed_message_becomes_a_conversation_with_its_message(
    http: aiohttp.ClientSession, deployment: Deployment, channel: GenericChannel
) -> None:
    contact = "55119" + uuid.uuid4().hex[:8]
    status, body = await _post_webhook(http, deployment, channel, message("wamid-1", contact, "olá"))
    assert status == 200 and body["accepted"] == f"generic:{channel.id}:{contact}:wamid-1"

    convs = await wait_until(
        lambda: _conversations(http, deployment, contact=contact), 30, "the conversation row"
    )
    assert len(convs) == 1
    conv = convs[0]
    assert conv["channel_id"] == channel.id and conv["state"] == "idle" and conv["version"] >= 1
    async with http.get(
        f"{deployment.base_url}/v1/conversations/{conv['id']}", headers=deployment.admin_headers()
    ) as r:
        assert r.status == 200 and (await r.json())["id"] == conv["id"]
    msgs = await _messages(http, deployment, conv["id"])
    assert [(m["provider_message_id"], m["direction"], m["type"], m["text"], m["status"]) for m in msgs] == [
        ("wamid-1", "inbound", "text", "olá", "received")
    ]
    assert msgs[0]["id"] and msgs[0]["created_at"]


async def test_same_webhook_three_times_gives_one_row(
    http: aiohttp.ClientSession, deployment: Deployment, channel: GenericChannel
) -> None:
    contact = "55118" + uuid.uuid4().hex[:8]
    body = message("dup-1", contact, "once")
    for _ in range(3):
        assert (await _post_webhook(http, deployment, channel, body))[0] == 200
    # A later message on the same thread is processed after the duplicates (same partition).
    assert (await _post_webhook(http, deployment, channel, message("dup-2", contact, "after")))[0] == 200

    async def both() -> list[Any] | None:
        convs = await _conversations(http, deployment, contact=contact)
        msgs = await _messages(http, deployment, convs[0]["id"]) if convs else []
        return msgs if len(msgs) >= 2 else None

    msgs = await wait_until(both, 30, "both messages")
    assert [m["provider_message_id"] for m in msgs] == ["dup-1", "dup-2"]
    assert len(await _conversations(http, deployment, contact=contact)) == 1


async def test_signature_and_input_failures_are_rejected_with_a_reason(
    http: aiohttp.ClientSession, deployment: Deployment, channel: GenericChannel
) -> None:
    url = f"{deployment.base_url}/webhooks/generic/{channel.id}"
    good = message("bad-1", "5511000", "x")
    raw, headers = channel.signed(good)

    tampered = dict(headers, **{"webhook-signature": "v1,AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="})
    other_key = GenericChannel(id=channel.id)
    cases: list[tuple[str, bytes, dict[str, str], int, str]] = [
        ("wrong signature", raw, tampered, 401, "no signature matches"),
        ("other secret", *other_key.signed(good), 401, "no signature matches"),
        ("missing headers", raw, {"Content-Type": "application/json"}, 401, "missing"),
        ("too old", *channel.signed(good, timestamp=int(time.time()) - 301), 401, "too old"),
        ("in the future", *channel.signed(good, timestamp=int(time.time()) + 301), 401, "future"),
        ("body changed after signing", raw + b" ", headers, 401, "no signature matches"),
        ("malformed JSON", *channel.signed(b"{not json"), 400, "not valid JSON"),
        ("missing fields", *channel.signed({"message_id": "x"}), 422, "schema"),
    ]
    for name, data, hdrs, want, reason in cases:
        async with http.post(url, data=data, headers=hdrs) as r:
            body = await r.json()
            assert (r.status, reason in body["error"]) == (want, True), (name, r.status, body)

    async with http.post(f"{deployment.base_url}/webhooks/generic/nope", data=raw, headers=headers) as r:
        assert r.status == 401  # like a wrong signature: channel ids cannot be probed
    big = message("big-1", "5511000", "x" * (1024 * 1024 + 10))
    big_raw, big_headers = channel.signed(big)
    async with http.post(url, data=io.BytesIO(big_raw), headers=big_headers) as r:
        assert r.status == 413


async def test_admin_api_needs_the_token(http: aiohttp.ClientSession, deployment: Deployment) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        async with http.get(f"{deployment.base_url}/v1/conversations", headers=headers) as r:
            assert r.status == 401
    async with http.get(f"{deployment.base_url}/v1/conversations", headers=deployment.admin_headers()) as r:
        assert r.status == 200


async def test_channel_secrets_are_never_returned(
    http: aiohttp.ClientSession, deployment: Deployment, channel: GenericChannel
) -> None:
    async with http.get(f"{deployment.base_url}/v1/channels", headers=deployment.admin_headers()) as r:
        text = await r.text()
    assert channel.id in text and channel.secret not in text and "secret" not in text
    async with http.post(
        f"{deployment.base_url}/v1/channels",
        headers=deployment.admin_headers(),
        json={"id": channel.id, "provider": "generic", "secret": channel.secret},
    ) as r:
        assert r.status == 409
    async with http.post(
        f"{deployment.base_url}/v1/channels",
        headers=deployment.admin_headers(),
        json={"id": "x y", "provider": "generic", "secret": "nope"},
    ) as r:
        assert r.status == 422


async def test_listing_paginates_with_a_cursor(
    http: aiohttp.ClientSession, deployment: Deployment, channel: GenericChannel
) -> None:
    prefix = "5521" + uuid.uuid4().hex[:6]
    contacts = [f"{prefix}{i}" for i in range(5)]
    for c in contacts:
        assert (await _post_webhook(http, deployment, channel, message(f"p-{c}", c, "hi")))[0] == 200

    async def all_there() -> bool:
        convs = await _conversations(http, deployment, channel=channel.id, limit="500")
        return len({c["contact_id"] for c in convs} & set(contacts)) == 5

    await wait_until(all_there, 30, "five conversations")
    seen: list[str] = []
    cursor: str | None = None
    while True:
        params = {"channel": channel.id, "limit": "2", **({"cursor": cursor} if cursor else {})}
        async with http.get(
            f"{deployment.base_url}/v1/conversations", params=params, headers=deployment.admin_headers()
        ) as r:
            page = await r.json()
        assert len(page["items"]) <= 2
        seen += [c["id"] for c in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert len(seen) == len(set(seen)) and len(seen) >= 5
    async with http.get(
        f"{deployment.base_url}/v1/conversations",
        params={"cursor": "garbage"},
        headers=deployment.admin_headers(),
    ) as r:
        assert r.status == 400


async def test_health_and_readiness(http: aiohttp.ClientSession, deployment: Deployment) -> None:
    async with http.get(f"{deployment.base_url}/healthz") as r:
        assert r.status == 200
    async with http.get(f"{deployment.base_url}/readyz") as r:
        body = await r.json()
        assert r.status == 200 and body["checks"]["postgres"] == "ok", body
        assert body["checks"]["worker"] == "ok"  # coarse names only: the detail is in the log
    async with http.get(f"{deployment.base_url}/readyz", params={"worker": "false"}) as r:
        body = await r.json()
        assert r.status == 200 and "worker" not in body["checks"] and body["checks"]["kafka"] == "ok"
