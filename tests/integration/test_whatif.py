"""`parley whatif` on a log this module produces: reproduces Postgres, honours changed deadlines,
counts users coming back after a simulated close, and writes nothing anywhere."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from streams.records import conversation_id_for
from streams.topics import Topics
from tests.integration.harness import Deployment, GenericChannel, message, wait_until
from tests.integration.lifecycle_helpers import Thread, now

IDLE_S = 3
DEPLOYMENT_ENV = {
    "PARLEY_TIMEOUT_IDLE": str(IDLE_S),
    "PARLEY_TIMEOUT_PROCESSING": "30",
    "PARLEY_TIMEOUT_AWAITING_CONFIRMATION": "2",
    "PARLEY_TIMEOUT_WAITING_CLOSE": "1",
}


@dataclass
class Scenario:
    """The log the module produced, once every conversation closed in Postgres."""

    since: datetime
    idle: Thread  # one message through a webhook: expires
    idle_conv: str
    agent: Thread  # accepted and closed by an agent through the admin API
    bye: Thread  # says goodbye: user_closed after waiting_close
    back: Thread  # writes again 2 s later: one conversation today, two under a 1 s idle timeout


async def _webhook(
    http: aiohttp.ClientSession, dep: Deployment, ch: GenericChannel, t: Thread, text: str
) -> None:
    raw, headers = ch.signed(message(f"{t.contact_id}-{text}", t.contact_id, text))
    async with http.post(f"{dep.base_url}/webhooks/generic/{ch.id}", data=raw, headers=headers) as r:
        assert r.status == 200, await r.text()


@pytest.fixture(scope="module")
async def scenario(deployment: Deployment, channel: GenericChannel) -> AsyncIterator[Scenario]:
    since = now() - timedelta(seconds=5)
    db = await asyncpg.connect(deployment.database_url)
    try:
        async with aiohttp.ClientSession() as http:
            await deployment.wait_ready(http)
            idle, agent, bye, back = (Thread(deployment, channel.id) for _ in range(4))
            await _webhook(http, deployment, channel, idle, "oi")
            await _webhook(http, deployment, channel, agent, "preciso de ajuda")
            [conv] = await agent.wait(db, "the agent's conversation", lambda c: len(c) == 1)
            headers = deployment.admin_headers()
            base = f"{deployment.base_url}/v1/conversations/{conv['id']}"
            async with http.post(f"{base}/accept", json={"agent_id": "ana"}, headers=headers) as r:
                assert r.status == 202, await r.text()
            await agent.wait(db, "processing", lambda c: c[0]["state"] == "processing")
            async with http.post(
                f"{base}/close", json={"reason": "agent_closed", "by": "ana"}, headers=headers
            ) as r:
                assert r.status == 202, await r.text()
            t0 = now()
            await bye.produce(
                bye.message("oi", t0), bye.message("obrigado, pode fechar", t0 + timedelta(seconds=0.5))
            )
            first = back.message("oi", t0, "first")
            await back.produce(first, back.message("ainda preciso", t0 + timedelta(seconds=2), "again"))

            async def settled() -> bool:
                counts = await db.fetchrow(
                    "SELECT count(*) AS n, count(*) FILTER (WHERE state = 'closed') AS closed"
                    " FROM conversations"
                )
                return counts is not None and counts["n"] == counts["closed"] == 4

            await wait_until(settled, 60, "all four conversations closed")
            [idle_conv] = await idle.conversations(db)
            assert idle_conv["close_reason"] == "expired"
            [back_conv] = await back.conversations(db)
            assert back_conv["id"] == conversation_id_for(first.event_id)
        yield Scenario(since, idle, idle_conv["id"], agent, bye, back)
    finally:
        await db.close()


def _run(dep: Deployment, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "parley.cli", "whatif", *args],
        env=dep.env(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def _whatif(dep: Deployment, *args: str) -> dict[str, Any]:
    done = _run(dep, "--json", "--progress", "none", *args)
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def _example(result: dict[str, Any], conversation_id: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = [e for e in result["examples"] if e["conversation_id"] == conversation_id]
    assert found, [e["conversation_id"] for e in result["examples"]]
    return found[0]


async def test_current_policy_reproduces_every_conversation_in_postgres(
    deployment: Deployment, scenario: Scenario, db: asyncpg.Connection
) -> None:
    result = _whatif(deployment, "--since", scenario.since.isoformat())
    rows = await db.fetch("SELECT state, close_reason FROM conversations")
    by_reason: dict[str, int] = {}
    for r in rows:
        by_reason[r["close_reason"]] = by_reason.get(r["close_reason"], 0) + 1
    assert by_reason == {"expired": 2, "agent_closed": 1, "user_closed": 1}
    current = result["current"]
    assert current["opened"] == len(rows) and current["closed"] == len(rows)
    assert current["closed_by_reason"] == by_reason
    assert current["open_at_end"] == 0
    assert result["check"] == {"checked": len(rows), "matched": len(rows), "mismatched": {}}
    assert result["recorded_firings"] >= 3  # the log's firings exist, and were not used
    # nothing --set: both runs are the same
    assert result["comparison"]["different_outcome"] == 0 and result["changed"] == current


async def test_a_shorter_idle_timeout_closes_a_known_conversation_earlier_as_expired(
    deployment: Deployment, scenario: Scenario, db: asyncpg.Connection
) -> None:
    result = _whatif(
        deployment,
        "--since",
        scenario.since.isoformat(),
        "--set",
        "PARLEY_TIMEOUT_IDLE=1",
        "--examples",
        "20",
    )
    assert result["policy"]["changed"]["idle_timeout_s"] == 1
    example = _example(result, scenario.idle_conv)
    cur, chg = example["current"], example["changed"]
    assert (cur["state"], cur["close_reason"]) == ("closed", "expired")
    assert (chg["state"], chg["close_reason"]) == ("closed", "expired")
    opened = datetime.fromisoformat(chg["opened_at"])
    assert datetime.fromisoformat(chg["closed_at"]) == opened + timedelta(seconds=1)
    assert datetime.fromisoformat(cur["closed_at"]) == opened + timedelta(seconds=IDLE_S)
    [row] = await scenario.idle.conversations(db)
    assert row["closed_at"] >= datetime.fromisoformat(cur["closed_at"])  # production fires at due or later
    assert result["comparison"]["closed_earlier"]["count"] >= 1
    assert any(r["event"] == "deadline (simulated)" for r in example["timeline"])
    assert result["check"]["matched"] == result["check"]["checked"] == 4


async def test_a_longer_idle_timeout_keeps_it_open(deployment: Deployment, scenario: Scenario) -> None:
    result = _whatif(
        deployment,
        "--since",
        scenario.since.isoformat(),
        "--set",
        "PARLEY_TIMEOUT_IDLE=PT1H",
        "--examples",
        "20",
    )
    example = _example(result, scenario.idle_conv)
    assert example["current"]["close_reason"] == "expired"
    assert example["changed"]["state"] == "idle" and example["changed"]["closed_at"] is None
    assert result["changed"]["open_at_end"] >= 2  # the idle one and the one that came back
    assert result["comparison"]["closed_only_in_current"] >= 2


async def test_a_user_writing_after_the_simulated_close_counts_as_reopened(
    deployment: Deployment, scenario: Scenario
) -> None:
    result = _whatif(deployment, "--since", scenario.since.isoformat(), "--set", "PARLEY_TIMEOUT_IDLE=1")
    # today the second message (2 s later) extends the conversation; with 1 s it had expired
    assert result["current"]["reopened_after_close"] == 0
    assert result["changed"]["reopened_after_close"] == 1
    assert result["comparison"]["only_in_changed"] == 1
    assert result["changed"]["opened"] == result["current"]["opened"] + 1


async def test_a_channel_filter_and_a_bad_setting(deployment: Deployment, scenario: Scenario) -> None:
    other = _whatif(deployment, "--since", scenario.since.isoformat(), "--channel", "no-such-channel")
    assert other["events"] == 0 and other["other_channels"] == other["records_read"] > 0
    bad = _run(deployment, "--since", "PT1H", "--set", "PARLEY_TIMEOUT_IDLE=P1M")
    assert bad.returncode == 2 and "PARLEY_TIMEOUT_IDLE" in bad.stderr and "months" in bad.stderr


async def test_the_api_runs_the_same_comparison_as_a_job(
    http: aiohttp.ClientSession, deployment: Deployment, scenario: Scenario
) -> None:
    url = f"{deployment.base_url}/v1/whatif"
    body = {"since": scenario.since.isoformat(), "set": {"PARLEY_TIMEOUT_IDLE": "1"}, "examples": 3}
    async with http.post(url, json=body) as r:
        assert r.status == 401
    headers = deployment.admin_headers()
    async with http.post(url, json={**body, "set": {"PARLEY_TIMEOUT_IDLE": "P1M"}}, headers=headers) as r:
        assert r.status == 422 and "months" in (await r.json())["error"]
    async with http.post(url, json={**body, "since": "yesterday"}, headers=headers) as r:
        assert r.status == 422
    async with http.post(url, json=body, headers=headers) as r:
        assert r.status == 202, await r.text()
        job = await r.json()
    assert job["status"] == "running" and r.headers["Location"] == f"/v1/whatif/{job['id']}"

    async def finished() -> dict[str, Any] | None:
        async with http.get(f"{deployment.base_url}/v1/whatif/{job['id']}", headers=headers) as r:
            assert r.status == 200
            view: dict[str, Any] = await r.json()
            return view if view["status"] != "running" else None

    view = await wait_until(finished, 120, "the what-if job to finish")
    assert view["status"] == "done", view["error"]
    result = view["result"]
    assert view["progress"]["records_read"] == view["progress"]["records_total"] == result["records_read"]
    assert result["changed"]["reopened_after_close"] == 1 and result["current"]["reopened_after_close"] == 0
    assert result["policy"]["current"]["idle_timeout_s"] == IDLE_S  # the API process's own policy
    assert result["check"]["matched"] == result["check"]["checked"] == 4
    assert len(result["examples"]) == 3
    async with http.get(f"{deployment.base_url}/v1/whatif/{uuid.uuid4()}", headers=headers) as r:
        assert r.status == 404


async def _end_offsets(dep: Deployment) -> dict[str, dict[int, int]]:
    consumer = AIOKafkaConsumer(bootstrap_servers=dep.services.bootstrap, group_id=None)
    await consumer.start()
    try:
        out: dict[str, dict[int, int]] = {}
        for topic in Topics(dep.name).all():
            parts = consumer.partitions_for_topic(topic)
            if not parts:
                await consumer._client.force_metadata_update()
                parts = consumer.partitions_for_topic(topic) or set()
            ends = await consumer.end_offsets([TopicPartition(topic, p) for p in parts])
            out[topic] = {tp.partition: offset for tp, offset in ends.items()}
        return out
    finally:
        await consumer.stop()


async def _groups(dep: Deployment) -> set[str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=dep.services.bootstrap)
    await admin.start()
    try:
        return {g[0] for g in await admin.list_consumer_groups()}
    finally:
        await admin.close()


async def _row_counts(db: asyncpg.Connection) -> dict[str, int]:
    tables = await db.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY tablename")
    return {t["tablename"]: await db.fetchval(f'SELECT count(*) FROM "{t["tablename"]}"') for t in tables}


async def test_nothing_is_written_anywhere(
    http: aiohttp.ClientSession, deployment: Deployment, scenario: Scenario, db: asyncpg.Connection
) -> None:
    deployment.stop("worker")  # its own housekeeping (ledger pruning, offsets) must not blur the check
    try:
        offsets, rows, groups = (
            await _end_offsets(deployment),
            await _row_counts(db),
            await _groups(deployment),
        )
        assert sum(sum(p.values()) for p in offsets.values()) > 0 and rows["conversations"] == 4
        _whatif(
            deployment,
            "--since",
            scenario.since.isoformat(),
            "--set",
            "PARLEY_TIMEOUT_IDLE=1",
            "--examples",
            "5",
        )
        assert await _end_offsets(deployment) == offsets
        assert await _row_counts(db) == rows
        assert await _groups(deployment) == groups  # no consumer group joined or created
    finally:
        deployment.start("worker")
        await deployment.wait_ready(http)
