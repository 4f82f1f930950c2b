"""The operator console (`/`) in headless Chromium (Debian's `chromium`, driven by playwright)
against a live worker and API: the overview's numbers, filters, a conversation page, the accept and
close buttons, dead letters and their retry, channels. Attacker-controlled text (a message body, a
contact id, a WhatsApp profile name, a dead letter's error and key) must show as text and never
run. Screenshots of every page are kept with the test logs (console-*.png); any console error or
warning, page error or dialog fails the test."""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiokafka import AIOKafkaProducer
from playwright.async_api import Browser, ConsoleMessage, Page, async_playwright, expect

from streams.records import DeadLetter
from streams.topics import Topics
from tests.integration.harness import Deployment, GenericChannel, message, wait_until
from tests.integration.test_providers import WhatsApp

CHROMIUM = "/usr/bin/chromium"  # Debian's package; the Makefile installs it
DEPLOYMENT_ENV = {"PARLEY_WORKER_RETRIES": "1", "PARLEY_TIMEOUT_IDLE": "1800"}  # deadlines within the hour
WAIT_MS = 30_000  # playwright's expect() polls the page until then

# Each would set window.__pwned if the page ever parsed it as HTML (and CSP did not stop it).
XSS_TEXT = '<img src=x onerror="window.__pwned=1"> hello <b>bold</b>'
XSS_CONTACT = '<img src=x onerror="window.__pwned=2">'
XSS_NAME = '<img src=x onerror="window.__pwned=5">Ana'  # a WhatsApp contact's profile name
XSS_ERROR = 'undecodable event: <img src=x onerror="window.__pwned=3"><script>window.__pwned=4</script>'


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    """Headless Chromium from /usr/bin/chromium (no Playwright browser download)."""
    async with async_playwright() as p:
        launched = await p.chromium.launch(executable_path=CHROMIUM)
        try:
            yield launched
        finally:
            await launched.close()


async def _send(
    http: aiohttp.ClientSession, dep: Deployment, ch: GenericChannel, contact: str, text: str
) -> None:
    raw, headers = ch.signed(message(f"m-{uuid.uuid4().hex}", contact, text))
    async with http.post(f"{dep.base_url}/webhooks/generic/{ch.id}", data=raw, headers=headers) as r:
        assert r.status in (200, 202), await r.text()


async def _conversation(http: aiohttp.ClientSession, dep: Deployment, contact: str) -> dict[str, Any]:
    async def found() -> dict[str, Any] | None:
        async with http.get(
            f"{dep.base_url}/v1/conversations", params={"contact": contact}, headers=dep.admin_headers()
        ) as r:
            items: list[dict[str, Any]] = (await r.json())["items"]
        return items[0] if items else None

    return await wait_until(found, 30, f"the conversation of {contact!r}")


async def _whatsapp_with_a_hostile_profile_name(
    http: aiohttp.ClientSession, dep: Deployment
) -> tuple[WhatsApp, str]:
    """A WhatsApp channel and one message whose contact's profile name looks like HTML."""
    wa = WhatsApp(dep)
    async with http.post(
        f"{dep.base_url}/v1/channels",
        headers=dep.admin_headers(),
        json={
            "id": wa.id,
            "provider": "whatsapp",
            "phone_number_id": wa.phone,
            "app_secret": wa.app_secret,
            "verify_token": wa.verify_token,
        },
    ) as r:
        assert r.status == 201, await r.text()
    body, contact = wa.fixture("text")
    body["entry"][0]["changes"][0]["value"]["contacts"][0]["profile"]["name"] = XSS_NAME
    status, answer = await wa.post(http, body)
    assert status == 200, answer
    return wa, contact


async def _replies_one_read(
    http: aiohttp.ClientSession, dep: Deployment, wa: WhatsApp, contact: str, conv_id: str
) -> list[str]:
    """Two replies recorded as sent by the business, the first then read by the user (Meta's
    receipt); their statuses once the worker has applied everything."""
    wamids = [f"wamid.out-{uuid.uuid4().hex}" for _ in range(2)]
    for i, wamid in enumerate(wamids):
        async with http.post(
            f"{dep.base_url}/v1/conversations/{conv_id}/messages",
            json={"provider_message_id": wamid, "text": f"reply {i + 1}"},
            headers=dep.admin_headers(),
        ) as r:
            assert r.status == 202, await r.text()
    receipt, _ = wa.fixture("status_read", contact)
    receipt["entry"][0]["changes"][0]["value"]["statuses"][0].update(
        {"id": wamids[0], "status": "read", "timestamp": str(int(datetime.now(UTC).timestamp()))}
    )
    assert (await wa.post(http, receipt))[0] == 200

    async def statuses() -> list[str] | None:
        async with http.get(
            f"{dep.base_url}/v1/conversations/{conv_id}/messages", headers=dep.admin_headers()
        ) as r:
            out = [m["status"] for m in (await r.json())["items"] if m["direction"] == "outbound"]
        return out if len(out) == 2 and out[0] == "read" else None

    return await wait_until(statuses, 30, "the replies, the first one read")


async def _park_letter(dep: Deployment, key: str) -> None:
    """A dead letter of a poison conversation event, with attacker-looking error and key."""
    letter = DeadLetter.bounded(
        source_topic=Topics(dep.name).conversation_events,
        partition=0,
        offset=0,
        key=key,
        raw=b'{"kind": "nope"}',
        error=XSS_ERROR,
        attempts=1,
        failed_at=datetime.now(UTC),
    )
    producer = AIOKafkaProducer(bootstrap_servers=dep.services.bootstrap, acks="all")
    await producer.start()
    try:
        await producer.send_and_wait(
            Topics(dep.name).dead_letters, letter.model_dump_json().encode(), key=key.encode()
        )
    finally:
        await producer.stop()


async def _shot(page: Page, name: str) -> None:
    await page.screenshot(path=str(Path(os.environ["PARLEY_TEST_LOGS"]) / f"console-{name}.png"))


async def test_the_console_shows_filters_opens_and_closes_and_never_runs_data_as_html(
    http: aiohttp.ClientSession, deployment: Deployment, channel: GenericChannel, browser: Browser
) -> None:
    run = uuid.uuid4().hex[:6]
    plain, hostile = f"5511900{run}", f"5511911{run}"
    await _send(http, deployment, channel, plain, "hi, my order is late")
    await _send(http, deployment, channel, hostile, XSS_TEXT)
    await _send(http, deployment, channel, XSS_CONTACT, "a contact id that looks like HTML")
    wa, wa_contact = await _whatsapp_with_a_hostile_profile_name(http, deployment)
    conv_plain = await _conversation(http, deployment, plain)
    conv_wa = await _conversation(http, deployment, wa_contact)
    reply_statuses = await _replies_one_read(http, deployment, wa, wa_contact, conv_wa["id"])
    conv_hostile = await _conversation(http, deployment, hostile)
    conv_xss_contact = await _conversation(http, deployment, XSS_CONTACT)
    letter_key = f"{channel.id}/<b>{run}</b>"
    await _park_letter(deployment, letter_key)

    page = await browser.new_page(viewport={"width": 1280, "height": 900})
    problems: list[str] = []

    def on_console(msg: ConsoleMessage) -> None:
        if msg.type in ("error", "warning"):
            problems.append(f"console {msg.type}: {msg.text}")

    page.on("console", on_console)
    page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
    page.on("dialog", lambda dialog: problems.append(f"dialog: {dialog.message}"))

    # The link `make run` prints: the token goes to sessionStorage and leaves the address bar.
    await page.goto(f"{deployment.base_url}/#token={deployment.admin_token}")
    await expect(page).to_have_url(re.compile(r"/#/overview$"), timeout=WAIT_MS)
    assert await page.evaluate("sessionStorage.getItem('parleyToken')") == deployment.admin_token
    assert await page.evaluate("localStorage.length") == 0

    # Overview: counts, timers, dead letters, lag; polled without a reload.
    await expect(page.locator("#ov-open")).to_have_text("4", timeout=WAIT_MS)
    await expect(page.locator("#ov-state-idle")).to_have_text("4")
    await expect(page.locator("#ov-closed-24h")).to_have_text("0")
    await expect(page.locator("#ov-timers-hour")).to_have_text("4")  # idle timeout 30 min
    await expect(page.locator("#ov-timers-minute")).to_have_text("0")
    await expect(page.locator("#ov-dead-letters")).to_have_text("1", timeout=WAIT_MS)
    await expect(page.locator("#ov-newest-error")).to_have_text(XSS_ERROR)
    await expect(page.locator("#ov-lag-total")).to_have_text("0", timeout=WAIT_MS)
    await expect(page.locator("#ov-events-in")).not_to_have_text("…", timeout=WAIT_MS)  # two lag samples
    assert await page.locator("svg rect.bar-opened").count() == 60
    await _shot(page, "overview")

    # Conversations: every one, then filtered by contact, state and channel.
    await page.click("nav a[data-view=conversations]")
    rows = page.locator("#conversations tbody tr")
    await expect(rows).to_have_count(4, timeout=WAIT_MS)
    await expect(
        page.locator(f'#conversations tr[data-id="{conv_xss_contact["id"]}"] td.contact')
    ).to_have_text(XSS_CONTACT)
    await expect(page.locator("#conversations .deadline").first).to_contain_text(
        re.compile(r"closes in 2\d min")
    )
    await _shot(page, "conversations")
    await page.fill("#filter-contact", plain)
    await page.click("#filters button[type=submit]")
    await expect(rows).to_have_count(1, timeout=WAIT_MS)
    await expect(rows.first).to_have_attribute("data-id", conv_plain["id"])
    await expect(page).to_have_url(re.compile(r"#/conversations\?contact=" + plain + "$"))
    await page.select_option("#filter-state", "closed")
    await expect(rows).to_have_count(0, timeout=WAIT_MS)
    await page.fill("#filter-contact", "")
    await page.select_option("#filter-state", "idle")
    await expect(rows).to_have_count(4, timeout=WAIT_MS)
    await page.select_option("#filter-channel", channel.id)
    await expect(page).to_have_url(re.compile(r"state=idle&channel="))
    await expect(rows).to_have_count(3, timeout=WAIT_MS)

    # The hostile message's conversation: its body is text, nothing ran.
    await page.click(f'#conversations tr[data-id="{conv_hostile["id"]}"]')
    await expect(page).to_have_url(re.compile("#/conversations/" + conv_hostile["id"] + "$"))
    await expect(page.locator("#messages .message-text")).to_have_text([XSS_TEXT], timeout=WAIT_MS)
    await expect(page.locator("#messages .direction")).to_have_text(["→ in"])
    await expect(page.locator("#conv-state")).to_have_text("idle")
    await expect(page.locator("#conv-deadline")).to_contain_text("closes in")
    await expect(page.locator("#timeline tbody tr")).not_to_have_count(0)
    assert await page.locator("main img, main b, main script").count() == 0

    # Accept, then close, with the buttons; the page follows the worker's decisions by polling
    # (the same document all along: a reload would drop this marker).
    await page.evaluate("window.__same_page = true")
    await page.fill("#agent-id", "ana")
    await page.click("#accept")
    await expect(page.locator("#action-result")).to_contain_text("accept accepted", timeout=WAIT_MS)
    await expect(page.locator("#conv-state")).to_have_text("processing", timeout=WAIT_MS)
    await page.select_option("#close-reason", "agent_closed")
    await page.click("#close")
    await expect(page.locator("#conv-state")).to_have_text("closed", timeout=WAIT_MS)
    await expect(page.locator("#conv-reason")).to_have_text("agent_closed")
    await expect(page.locator("#conv-deadline")).to_contain_text(re.compile(r"closed \d+ s ago"))
    await expect(page.locator("#close")).to_be_disabled()
    await expect(page.locator("#timeline")).to_contain_text("processing → closed")
    assert await page.evaluate("window.__same_page") is True
    await _shot(page, "conversation")

    # The close reason filter finds it, and the overview counted it without a reload.
    await page.goto(f"{deployment.base_url}/#/conversations?reason=agent_closed")
    await expect(rows).to_have_count(1, timeout=WAIT_MS)
    await expect(rows.first).to_have_attribute("data-id", conv_hostile["id"])
    await page.click("nav a[data-view=overview]")
    await expect(page.locator("#ov-closed-24h")).to_have_text("1", timeout=WAIT_MS)
    await expect(page.locator("#ov-open")).to_have_text("3")
    await expect(page.locator("#card-close-reasons")).to_contain_text("agent_closed")
    await _shot(page, "overview-after-close")

    # The contact id that looks like HTML, on its conversation page.
    await page.goto(f"{deployment.base_url}/#/conversations/{conv_xss_contact['id']}")
    await expect(page.locator("#conv-contact")).to_have_text(XSS_CONTACT, timeout=WAIT_MS)
    # The WhatsApp contact's profile name (from the provider's payload), as text.
    await page.goto(f"{deployment.base_url}/#/conversations/{conv_wa['id']}")
    await expect(page.locator("#conv-contact-name")).to_have_text(XSS_NAME, timeout=WAIT_MS)
    await expect(page.locator("#messages .message-text")).to_have_text(
        ["Does it come in another color?", "reply 1", "reply 2"]
    )
    # Direction and status ticks: none inbound, ○ queued, ✓ sent, ✓✓ delivered, blue ✓✓ read.
    await expect(page.locator("#messages .direction")).to_have_text(["→ in", "← out", "← out"])
    marks = {"queued": "○", "sent": "✓", "delivered": "✓✓", "read": "✓✓"}
    await expect(page.locator("#messages .ticks")).to_have_text(["", *(marks[s] for s in reply_statuses)])
    await expect(page.locator("#messages .ticks").nth(1)).to_have_class("ticks read")
    await _shot(page, "conversation-whatsapp")

    # Dead letters: the error and key as text; retry re-drives it, and the poison is parked again.
    await page.click("nav a[data-view=dead-letters]")
    letters = page.locator("#dead-letters tbody tr")
    await expect(letters).to_have_count(1, timeout=WAIT_MS)
    await expect(letters.first.locator(".letter-error")).to_have_text(XSS_ERROR)
    await expect(letters.first).to_contain_text(letter_key)
    await letters.first.locator("button.retry").click()
    await expect(letters.first.locator(".retry-result")).to_have_text(
        "re-driven: 1 event(s)", timeout=WAIT_MS
    )
    await expect(letters).to_have_count(2, timeout=WAIT_MS)  # parked again by the worker
    await expect(page.locator("#dead-letters")).to_contain_text("retried")
    await _shot(page, "dead-letters")

    await page.click("nav a[data-view=channels]")
    await expect(page.locator("#channels tbody tr")).to_have_count(2, timeout=WAIT_MS)
    await expect(page.locator("#channels")).to_contain_text(channel.id)
    await _shot(page, "channels")

    # The emergency switch on the overview: pause the lifecycle, see it paused, resume it.
    await page.click("nav a[data-view=overview]")
    await page.click("#pause-lifecycle")
    await expect(page.locator("#ov-paused-lifecycle")).to_contain_text("paused", timeout=WAIT_MS)
    await expect(page.locator("#ov-paused-sender")).to_have_text("running")
    await page.click("#resume-lifecycle")
    await expect(page.locator("#ov-paused-lifecycle")).to_have_text("running", timeout=WAIT_MS)

    # What-if: a run over the retained log from the form, its comparison as text.
    await page.click("nav a[data-view=whatif]")
    await page.fill("#whatif input[name=PARLEY_TIMEOUT_IDLE]", "600")
    await page.click("#whatif button[type=submit]")
    await expect(page.locator("#whatif-table")).to_contain_text("conversations opened", timeout=90_000)
    await expect(page.locator("#whatif-result")).to_contain_text("PARLEY_TIMEOUT_IDLE=600")
    await _shot(page, "whatif")

    assert await page.evaluate("window.__pwned") is None
    assert await page.locator("main img, main script").count() == 0
    assert problems == []


async def test_without_a_token_the_console_asks_for_one_and_calls_nothing(
    deployment: Deployment, browser: Browser
) -> None:
    page = await browser.new_page()
    requests: list[str] = []
    page.on("request", lambda req: requests.append(req.url))
    await page.goto(f"{deployment.base_url}/")
    await expect(page.locator("#need-token")).to_contain_text("PARLEY_ADMIN_TOKEN")
    assert not [u for u in requests if "/v1/" in u]
    await page.fill("#token", deployment.admin_token)
    await page.click("#token-form button[type=submit]")
    await expect(page.locator("#ov-open")).to_be_visible(timeout=WAIT_MS)
    await page.click("#forget")
    await expect(page.locator("#need-token")).to_be_visible()
    assert await page.evaluate("sessionStorage.length") == 0
