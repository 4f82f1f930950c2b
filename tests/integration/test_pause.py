"""The emergency switch on a live worker: a paused lifecycle takes no event (webhooks are still
accepted and wait in Kafka), stays paused across a worker restart, and applies everything once
resumed."""

from __future__ import annotations

import asyncio
import sys
import time
import uuid
from typing import Any

import aiohttp

from tests.integration.harness import Deployment, GenericChannel, message, wait_until
from tests.integration.schedule_helpers import call
from tests.integration.worker_helpers import metrics

PAUSED = 'parley_paused{part="lifecycle"}'


async def _worker_paused(http: aiohttp.ClientSession, dep: Deployment, paused: bool) -> None:
    async def seen() -> bool:
        return (await metrics(http, dep)).get(PAUSED) == (1.0 if paused else 0.0)

    await wait_until(seen, 60, f"the worker to report lifecycle paused={paused}")


async def _held_unapplied(http: aiohttp.ClientSession, dep: Deployment, contact: str, when: str = "") -> None:
    """The worker holds the event fetched and unapplied, and keeps it so for a full second: an
    agent that is not paused takes a batch within its 10 ms linger. (Absence can only be shown
    over time: this is the one wait here that is a duration, not a condition.)"""
    held_since: float | None = None

    async def held_long_enough() -> bool:
        nonlocal held_since
        got = await metrics(http, dep)
        if got.get("parley_lifecycle_intake_pending", 0) < 1:
            held_since = None
            return False
        held_since = held_since or time.monotonic()
        return time.monotonic() - held_since >= 1.0

    await wait_until(held_long_enough, 90, f"the event held, fetched but not applied {when}")
    _, page = await call(http, dep, "GET", f"/v1/conversations?contact={contact}")
    assert page["items"] == [], page


async def test_a_paused_lifecycle_takes_nothing_stays_paused_across_a_restart_and_resumes(
    http: aiohttp.ClientSession, deployment: Deployment, channel: GenericChannel
) -> None:
    code, answer = await call(
        http, deployment, "POST", "/v1/admin/pause", {"what": "lifecycle", "reason": "test"}
    )
    assert code == 200 and set(answer["paused"]) == {"lifecycle"}, answer
    await _worker_paused(http, deployment, True)

    contact = "5511" + str(uuid.uuid4().int)[:9]
    raw, headers = channel.signed(message(uuid.uuid4().hex, contact, "while paused"))
    async with http.post(
        f"{deployment.base_url}/webhooks/generic/{channel.id}", data=raw, headers=headers
    ) as r:
        assert r.status == 200, await r.text()  # accepted into Kafka while paused
    await _held_unapplied(http, deployment, contact)
    done = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "parley.cli", "status", env=deployment.env(), stdout=asyncio.subprocess.PIPE
    )
    out, _ = await asyncio.wait_for(done.communicate(), 60)
    assert "paused:         lifecycle" in out.decode(), out.decode()

    deployment.stop("worker")
    deployment.start("worker")
    await deployment.wait_ready(http)
    await _worker_paused(http, deployment, True)  # read back from Postgres at start
    await _held_unapplied(http, deployment, contact, "after the restart")

    code, answer = await call(http, deployment, "POST", "/v1/admin/resume", {"what": "all"})
    assert code == 200 and answer["paused"] == {}, answer
    await _worker_paused(http, deployment, False)

    async def applied() -> list[Any]:
        _, page = await call(http, deployment, "GET", f"/v1/conversations?contact={contact}")
        items: list[Any] = page["items"]
        return items

    [conversation] = await wait_until(applied, 60, "the conversation once resumed")
    assert conversation["state"] != "closed" and conversation["version"] >= 1


async def test_pause_lists_what_is_paused_and_refuses_an_unknown_part(
    http: aiohttp.ClientSession, deployment: Deployment
) -> None:
    code, answer = await call(http, deployment, "POST", "/v1/admin/pause", {"what": "everything"})
    assert code == 422 and "what" in str(answer), answer
    await call(http, deployment, "POST", "/v1/admin/pause", {"what": "webhooks"})
    code, answer = await call(http, deployment, "GET", "/v1/admin/paused")
    assert code == 200 and set(answer["paused"]) >= {"webhooks"}, answer
    code, answer = await call(http, deployment, "POST", "/v1/admin/resume", {"what": "webhooks"})
    assert code == 200 and "webhooks" not in answer["paused"], answer
