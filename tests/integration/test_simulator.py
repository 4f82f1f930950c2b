"""The provider simulator (sandbox.simulator) over real loopback HTTP.

Only the simulator runs here (no Kafka, no Postgres). A tiny aiohttp app stands in for Parley's
webhook routes and checks every status webhook the way Parley does: X-Hub-Signature-256 with
channels.whatsapp.verify_signature, X-Twilio-Signature with channels.twilio.verify_signature, and
the bodies with Parley's own parsers. Waiting is done on conditions, never on fixed sleeps.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlencode

import aiohttp
import pytest
from aiohttp import web

from channels import twilio, whatsapp
from channels.signatures import SignatureError
from sandbox.limits import max_in_window
from sandbox.simulator import Failure, Simulator, TwilioAccount, WebhookSettings, WhatsAppNumber

PHONE_ID = "106540352242922"
TOKEN = "EAAG-sim-token-1"
APP_SECRET = "app-secret-for-tests"
ACCOUNT_SID = "AC" + "0123456789abcdef" * 2
AUTH_TOKEN = "twilio-auth-token-0123"
PUBLIC = "https://parley.example.com"  # what Parley's StatusCallback URLs name
FAST_WEBHOOKS = WebhookSettings(first_delay_s=0.0, interval_s=0.01, retry_delay_s=0.05)


@dataclass
class StandIn:
    """Parley's webhook routes, reduced to: verify, parse, record."""

    url: str = ""
    whatsapp: list[whatsapp.WaStatus] = field(default_factory=list)
    twilio: list[tuple[str, twilio.TwStatus]] = field(default_factory=list)  # (signed URL, status)
    refused: list[str] = field(default_factory=list)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def wait_for(self, probe: Callable[[], bool], what: str, timeout: float = 10) -> None:
        """Return once probe() holds; checked again whenever a webhook arrives."""
        try:
            async with asyncio.timeout(timeout), self.changed:
                await self.changed.wait_for(probe)
        except TimeoutError:
            raise AssertionError(f"timed out waiting for {what}; refused={self.refused}") from None

    def wa_statuses(self, wamid: str) -> list[str]:
        return [s.status for s in self.whatsapp if s.provider_message_id == wamid]

    def tw_statuses(self, sid: str) -> list[str]:
        return [s.status for _, s in self.twilio if s.provider_message_id == sid]


@pytest.fixture
async def parley() -> AsyncIterator[StandIn]:
    stand_in = StandIn()

    async def refuse(why: str) -> web.Response:
        async with stand_in.changed:
            stand_in.refused.append(why)
            stand_in.changed.notify_all()
        return web.Response(status=401, text=why)

    async def on_whatsapp(request: web.Request) -> web.Response:
        raw = await request.read()
        try:
            whatsapp.verify_signature(APP_SECRET, raw, request.headers.get(whatsapp.SIGNATURE_HEADER))
        except SignatureError as exc:
            return await refuse(f"whatsapp: {exc}")
        batch = whatsapp.parse_envelope(json.loads(raw))
        assert not batch.unparseable, batch.unparseable
        async with stand_in.changed:
            stand_in.whatsapp.extend(batch.statuses)
            stand_in.changed.notify_all()
        return web.json_response({"accepted": len(batch.statuses)})

    async def on_twilio(request: web.Request) -> web.Response:
        form = dict(parse_qsl((await request.read()).decode(), keep_blank_values=True))
        signed_url = PUBLIC + request.path_qs  # the public URL Twilio was given
        try:
            twilio.verify_signature(
                AUTH_TOKEN, signed_url, form, request.headers.get(twilio.SIGNATURE_HEADER)
            )
        except SignatureError as exc:
            return await refuse(f"twilio: {exc}")
        item = twilio.parse_form(form)
        assert isinstance(item, twilio.TwStatus)
        async with stand_in.changed:
            stand_in.twilio.append((signed_url, item))
            stand_in.changed.notify_all()
        return web.Response(text="<Response/>", content_type="application/xml")

    app = web.Application()
    app.router.add_post("/webhooks/whatsapp", on_whatsapp)
    app.router.add_post("/webhooks/twilio", on_twilio)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    stand_in.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    yield stand_in
    await runner.cleanup()


@pytest.fixture
async def sim(parley: StandIn) -> AsyncIterator[Simulator]:
    async with Simulator(parley_base_url=parley.url, seed=7) as simulator:
        simulator.configure_whatsapp(
            WhatsAppNumber(phone_number_id=PHONE_ID, token=TOKEN, app_secret=APP_SECRET)
        )
        simulator.configure_twilio(TwilioAccount(account_sid=ACCOUNT_SID, auth_token=AUTH_TOKEN))
        simulator.configure_webhooks(FAST_WEBHOOKS)
        yield simulator


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as session:
        yield session


def text_message(to: str, parley_id: str | None = None, text: str = "hello") -> dict[str, Any]:
    body: dict[str, Any] = {
        "messaging_product": "whatsapp",
        "recipient_type": "individual",
        "to": to,
        "type": "text",
        "text": {"body": text},
    }
    if parley_id is not None:
        body["biz_opaque_callback_data"] = parley_id
    return body


async def wa_send(
    http: aiohttp.ClientSession, sim: Simulator, body: Any, token: str = TOKEN
) -> tuple[int, dict[str, Any]]:
    url = f"{sim.url}/v21.0/{PHONE_ID}/messages"
    async with http.post(url, json=body, headers={"Authorization": f"Bearer {token}"}) as r:
        return r.status, await r.json()


async def tw_send(
    http: aiohttp.ClientSession, sim: Simulator, form: dict[str, str], password: str = AUTH_TOKEN
) -> tuple[int, dict[str, Any]]:
    url = f"{sim.url}/2010-04-01/Accounts/{ACCOUNT_SID}/Messages.json"
    headers = {
        "Content-Type": "application/x-www-form-urlencoded",
        "Authorization": aiohttp.encode_basic_auth(ACCOUNT_SID, password),
    }
    async with http.post(url, data=urlencode(form), headers=headers) as r:
        return r.status, await r.json()


def tw_form(to: str, parley_id: str, sender: str = "whatsapp:+14155238886") -> dict[str, str]:
    callback = f"{PUBLIC}/webhooks/twilio?ch=tw1&parley_message_id={parley_id}"
    return {"To": to, "From": sender, "Body": "hello", "StatusCallback": callback}


def assert_graph_error(body: dict[str, Any], code: int) -> None:
    error = body["error"]
    assert error["code"] == code
    assert error["message"].startswith(f"(#{code})") or code == 190
    assert error["type"] == "OAuthException"
    assert error["error_data"]["messaging_product"] == "whatsapp"
    assert error["fbtrace_id"]


async def test_whatsapp_send_answers_metas_shape_and_signed_statuses_follow(
    sim: Simulator, parley: StandIn, http: aiohttp.ClientSession
) -> None:
    status, body = await wa_send(http, sim, text_message("+1 (415) 555-0100", "msg-1"))

    assert status == 200
    assert body["messaging_product"] == "whatsapp"
    assert body["contacts"] == [{"input": "+1 (415) 555-0100", "wa_id": "14155550100"}]
    wamid = body["messages"][0]["id"]
    assert wamid.startswith("wamid.")
    await parley.wait_for(lambda: len(parley.wa_statuses(wamid)) == 3, "sent, delivered and read")
    assert parley.wa_statuses(wamid) == ["sent", "delivered", "read"]
    for item in parley.whatsapp:
        assert item.phone_number_id == PHONE_ID
        assert item.recipient_id == "14155550100"
        assert item.payload["biz_opaque_callback_data"] == "msg-1"
    assert parley.refused == []
    [accepted] = sim.stats().accepted
    assert (accepted.provider_message_id, accepted.parley_message_id) == (wamid, "msg-1")


async def test_image_and_template_bodies_are_accepted_unknown_template_is_132001(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    image = {
        "messaging_product": "whatsapp",
        "to": "14155550101",
        "type": "image",
        "image": {"link": "https://example.com/a.png", "caption": "a"},
    }
    template = {
        "messaging_product": "whatsapp",
        "to": "14155550101",
        "type": "template",
        "template": {"name": "order_update", "language": {"code": "en_US"}, "components": []},
    }
    assert (await wa_send(http, sim, image))[0] == 200
    assert (await wa_send(http, sim, template))[0] == 200

    sim.configure_whatsapp(
        WhatsAppNumber(phone_number_id=PHONE_ID, token=TOKEN, app_secret=APP_SECRET, templates=["hello"])
    )
    status, body = await wa_send(http, sim, template)
    assert status == 400
    assert_graph_error(body, 132001)


@pytest.mark.parametrize(
    "body",
    [
        "not json at all",
        {"to": "14155550100", "type": "text", "text": {"body": "no messaging_product"}},
        {"messaging_product": "whatsapp", "type": "text", "text": {"body": "no to"}},
        {"messaging_product": "whatsapp", "to": "1415", "type": "text", "text": {}},
        {"messaging_product": "whatsapp", "to": "1415", "type": "image", "image": {"caption": "no link"}},
        {"messaging_product": "whatsapp", "to": "1415", "type": "template", "template": {"name": "x"}},
        {"messaging_product": "whatsapp", "to": "1415", "type": "hologram", "hologram": {}},
    ],
)
async def test_malformed_graph_bodies_are_400_code_100(
    sim: Simulator, http: aiohttp.ClientSession, body: Any
) -> None:
    url = f"{sim.url}/v21.0/{PHONE_ID}/messages"
    data = body if isinstance(body, str) else json.dumps(body)
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    async with http.post(url, data=data, headers=headers) as r:
        assert r.status == 400
        assert_graph_error(await r.json(), 100)
    assert sim.stats().accepted == []


async def test_token_wrong_expired_and_renewed_through_the_control_api(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    status, body = await wa_send(http, sim, text_message("14155550100"), token="EAAG-wrong")
    assert status == 401
    assert_graph_error(body, 190)
    assert "error_subcode" not in body["error"]

    async with http.post(f"{sim.url}/_sim/whatsapp/numbers/{PHONE_ID}/token/expire") as r:
        assert r.status == 200
    status, body = await wa_send(http, sim, text_message("14155550100"))
    assert status == 401
    assert_graph_error(body, 190)
    assert body["error"]["error_subcode"] == 463

    renew = f"{sim.url}/_sim/whatsapp/numbers/{PHONE_ID}/token/renew"
    async with http.post(renew, json={"token": "EAAG-renewed"}) as r:
        assert r.status == 200
    assert (await wa_send(http, sim, text_message("14155550100"), token="EAAG-renewed"))[0] == 200
    assert (await wa_send(http, sim, text_message("14155550100")))[0] == 401  # the old token is gone
    assert sim.stats().rejected == {"190": 3}


async def test_twilio_create_answers_the_message_resource_and_signed_callbacks_follow(
    sim: Simulator, parley: StandIn, http: aiohttp.ClientSession
) -> None:
    status, body = await tw_send(http, sim, tw_form("whatsapp:+14155550100", "msg-7"))

    assert status == 201
    assert re.fullmatch(r"SM[0-9a-f]{32}", body["sid"])
    assert body["status"] == "queued"
    assert (body["account_sid"], body["to"], body["from"]) == (
        ACCOUNT_SID,
        "whatsapp:+14155550100",
        "whatsapp:+14155238886",
    )
    assert body["direction"] == "outbound-api"
    assert body["uri"] == f"/2010-04-01/Accounts/{ACCOUNT_SID}/Messages/{body['sid']}.json"
    sid = body["sid"]
    await parley.wait_for(lambda: len(parley.tw_statuses(sid)) == 3, "sent, delivered and read")
    assert parley.tw_statuses(sid) == ["sent", "delivered", "read"]
    for signed_url, item in parley.twilio:
        assert signed_url.endswith("parley_message_id=msg-7")
        assert (item.account_sid, item.recipient_id) == (ACCOUNT_SID, "+14155550100")
    assert parley.refused == []
    assert sim.stats().accepted[0].parley_message_id == "msg-7"


async def test_twilio_bad_credentials_are_20003_and_bad_forms_their_codes(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    status, body = await tw_send(http, sim, tw_form("+14155550100", "m"), password="nope-nope-nope")
    assert status == 401
    assert body == {
        "code": 20003,
        "message": "Authenticate",
        "more_info": "https://www.twilio.com/docs/errors/20003",
        "status": 401,
    }
    assert (await tw_send(http, sim, tw_form("not-a-number", "m")))[1]["code"] == 21211
    assert (await tw_send(http, sim, {"From": "+14155238886", "Body": "x"}))[1]["code"] == 21604
    assert (await tw_send(http, sim, {"To": "+14155550100", "From": "+14155238886"}))[1]["code"] == 21619
    # a WhatsApp sender to a plain number: Twilio refuses a From/To pair of two channels
    assert (await tw_send(http, sim, tw_form("+14155550100", "m")))[1]["code"] == 21910
    assert sim.stats().accepted == []


async def test_throughput_never_exceeds_80_in_any_second_the_rest_is_130429(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    # Configured through the control API, as a benchmark in another process would.
    number = {"phone_number_id": PHONE_ID, "token": TOKEN, "app_secret": APP_SECRET, "throughput": 80}
    async with http.post(f"{sim.url}/_sim/whatsapp/numbers", json=number) as r:
        assert r.status == 200
    sim.configure_webhooks(WebhookSettings(enabled=False))

    # Distinct recipients, so only the throughput limit can refuse.
    answers = await asyncio.gather(*(wa_send(http, sim, text_message(f"1415555{i:04d}")) for i in range(200)))

    accepted = [body for status, body in answers if status == 200]
    refused = [body for status, body in answers if status != 200]
    assert {status for status, _ in answers} <= {200, 429}
    stats = sim.stats()
    times = [sent.mono for sent in stats.accepted]
    assert len(times) == len(accepted) >= 80
    assert max_in_window(times) == stats.max_in_any_second[PHONE_ID] == 80
    assert len(refused) == 200 - len(accepted) > 0
    for body in refused:
        assert_graph_error(body, 130429)
    assert stats.rejected == {"130429": len(refused)}


async def test_twilio_sender_rate_is_per_sender(sim: Simulator, http: aiohttp.ClientSession) -> None:
    sim.configure_twilio(TwilioAccount(account_sid=ACCOUNT_SID, auth_token=AUTH_TOKEN, sender_rate=5))
    busy = [tw_send(http, sim, tw_form(f"+1415555{i:04d}", f"a{i}", sender="+15550001")) for i in range(20)]
    quiet = [tw_send(http, sim, tw_form(f"+1415555{i:04d}", f"b{i}", sender="+15550002")) for i in range(5)]

    answers = await asyncio.gather(*busy, *quiet)

    busy_answers, quiet_answers = answers[:20], answers[20:]
    assert [status for status, _ in quiet_answers] == [201] * 5
    throttled = [body for status, body in busy_answers if status == 429]
    assert throttled and all(body["code"] == 20429 and body["status"] == 429 for body in throttled)
    assert sim.stats().max_in_any_second["+15550001"] == 5


async def test_pair_rate_refuses_one_recipient_and_not_another(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    sim.configure_whatsapp(
        WhatsAppNumber(
            phone_number_id=PHONE_ID, token=TOKEN, app_secret=APP_SECRET, pair_burst=3, pair_refill_s=600
        )
    )
    busy = [await wa_send(http, sim, text_message("+14155550100")) for _ in range(5)]
    other = await wa_send(http, sim, text_message("+14155550199"))

    assert [status for status, _ in busy] == [200, 200, 200, 429, 429]
    for _, body in busy[3:]:
        assert_graph_error(body, 131056)
    assert other[0] == 200
    assert sim.stats().per_recipient[PHONE_ID] == {"+14155550100": 3, "+14155550199": 1}


async def test_injected_errors_hit_the_next_n_requests_for_that_recipient_only(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    async with http.post(
        f"{sim.url}/_sim/failures",
        json={"provider": "whatsapp", "recipient": "+14155550100", "code": 131000, "times": 2},
    ) as r:
        assert r.status == 201
    sim.inject(Failure(provider="twilio", code=21610))
    sim.inject(Failure(provider="whatsapp", recipient="14155550300", http_status=503, body={"oops": 1}))

    first = await wa_send(http, sim, text_message("14155550100"))
    bystander = await wa_send(http, sim, text_message("14155550200"))
    second = await wa_send(http, sim, text_message("14155550100"))
    third = await wa_send(http, sim, text_message("14155550100"))
    raw = await wa_send(http, sim, text_message("14155550300"))
    blocked = await tw_send(http, sim, tw_form("whatsapp:+14155550100", "m1"))
    unblocked = await tw_send(http, sim, tw_form("whatsapp:+14155550100", "m2"))

    assert first[0] == second[0] == 500
    assert_graph_error(first[1], 131000)
    assert bystander[0] == third[0] == 200
    assert raw == (503, {"oops": 1})
    assert blocked[0] == 400 and blocked[1]["code"] == 21610
    assert unblocked[0] == 201


async def test_latency_and_hang(sim: Simulator, http: aiohttp.ClientSession) -> None:
    sim.inject(Failure(provider="whatsapp", action="delay", latency_s=0.3))
    started = time.monotonic()
    assert (await wa_send(http, sim, text_message("14155550100")))[0] == 200
    assert time.monotonic() - started >= 0.3

    sim.inject(Failure(provider="whatsapp", action="hang"))
    url = f"{sim.url}/v21.0/{PHONE_ID}/messages"
    with pytest.raises(TimeoutError):
        async with http.post(
            url,
            json=text_message("14155550100"),
            headers={"Authorization": f"Bearer {TOKEN}"},
            timeout=aiohttp.ClientTimeout(total=0.5),
        ):
            pass
    assert len(sim.stats().accepted) == 1  # the hung send was never handled
    sim.clear_failures()
    assert (await wa_send(http, sim, text_message("14155550100")))[0] == 200


async def test_dropped_connection_still_counts_as_sent_and_gets_its_webhooks(
    sim: Simulator, parley: StandIn, http: aiohttp.ClientSession
) -> None:
    sim.inject(Failure(provider="whatsapp", action="drop"))
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await wa_send(http, sim, text_message("14155550100", "in-doubt-1"))

    [accepted] = sim.stats().accepted
    assert (accepted.answered, accepted.parley_message_id) == (False, "in-doubt-1")
    wamid = accepted.provider_message_id
    await parley.wait_for(lambda: len(parley.wa_statuses(wamid)) == 3, "the dropped send's statuses")
    assert {s.payload["biz_opaque_callback_data"] for s in parley.whatsapp} == {"in-doubt-1"}


async def test_async_failure_reports_failed_with_the_error(
    sim: Simulator, parley: StandIn, http: aiohttp.ClientSession
) -> None:
    sim.inject(Failure(provider="whatsapp", action="fail_async", code=131047))
    sim.inject(Failure(provider="twilio", action="fail_async", code=63016))

    status, body = await wa_send(http, sim, text_message("14155550100", "late"))
    tw_status, tw_body = await tw_send(http, sim, tw_form("whatsapp:+14155550100", "late-tw"))

    assert (status, tw_status) == (200, 201)
    wamid, sid = body["messages"][0]["id"], tw_body["sid"]
    await parley.wait_for(
        lambda: parley.wa_statuses(wamid) == ["failed"] and parley.tw_statuses(sid) == ["failed"],
        "one failed status from each provider",
    )
    [wa_failed] = parley.whatsapp
    assert [e["code"] for e in wa_failed.errors] == [131047]
    [(_, tw_failed)] = parley.twilio
    assert tw_failed.error_code == "63016"


async def test_statuses_duplicated_and_reordered_when_asked(
    sim: Simulator, parley: StandIn, http: aiohttp.ClientSession
) -> None:
    async with http.put(
        f"{sim.url}/_sim/webhooks",
        json={"order": "reversed", "duplicate": 1.0, "first_delay_s": 0, "interval_s": 0.01},
    ) as r:
        assert r.status == 200
    status, body = await wa_send(http, sim, text_message("14155550100", "dup"))
    assert status == 200
    wamid = body["messages"][0]["id"]

    await parley.wait_for(lambda: len(parley.wa_statuses(wamid)) == 6, "every status twice")
    assert parley.wa_statuses(wamid) == ["read", "read", "delivered", "delivered", "sent", "sent"]
    assert parley.refused == []


async def test_webhooks_switched_off_send_nothing(
    sim: Simulator, parley: StandIn, http: aiohttp.ClientSession
) -> None:
    sim.configure_webhooks(WebhookSettings(enabled=False))
    assert (await wa_send(http, sim, text_message("14155550100", "quiet")))[0] == 200
    assert (await tw_send(http, sim, tw_form("whatsapp:+14155550100", "quiet-tw")))[0] == 201

    await sim.drain_webhooks()  # nothing was scheduled, so nothing can still arrive

    assert parley.whatsapp == [] and parley.twilio == []
    assert sim.stats().deliveries == []


async def test_stats_and_reset_over_the_control_api(sim: Simulator, http: aiohttp.ClientSession) -> None:
    sim.configure_webhooks(WebhookSettings(enabled=False))
    assert (await wa_send(http, sim, text_message("14155550100", "s1")))[0] == 200
    assert (await wa_send(http, sim, text_message("14155550100"), token="bad"))[0] == 401

    async with http.get(f"{sim.url}/_sim/stats") as r:
        stats = await r.json()
    assert stats["accepted_count"] == 1
    assert stats["accepted"][0]["parley_message_id"] == "s1"
    assert stats["rejected"] == {"190": 1}
    assert stats["max_in_any_second"] == {PHONE_ID: 1}

    async with http.post(f"{sim.url}/_sim/reset") as r:
        assert r.status == 200
    async with http.get(f"{sim.url}/_sim/stats?sends=0") as r:
        assert await r.json() == {
            "max_in_any_second": {},
            "per_recipient": {},
            "rejected": {},
            "accepted_count": 0,
        }
    async with http.post(f"{sim.url}/_sim/failures", json={"provider": "fax"}) as r:
        assert r.status == 400
