"""Operability of a running deployment: JSON log lines (PARLEY_LOG_FORMAT=json) and `parley status`
(readiness, consumer lag, counts; its exit code says whether the deployment is ready)."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from typing import Any

import aiohttp
import asyncpg
from aiokafka import AIOKafkaProducer

from parley.localstack import ROOT
from streams.topics import Topics
from tests.integration.harness import Deployment, GenericChannel, message, wait_until

# The worker and the API log JSON at INFO: what an operator's log shipper would read.
DEPLOYMENT_ENV = {"PARLEY_LOG_FORMAT": "json", "PARLEY_LOG_LEVEL": "INFO"}


def _json_lines(text: str) -> list[dict[str, Any]]:
    """Every line parses as one JSON object (json.loads raises on any that does not)."""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _status(dep: Deployment, *args: str) -> tuple[int, str]:
    done = subprocess.run(
        [sys.executable, "-m", "parley.cli", "status", *args],
        env=dep.env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return done.returncode, done.stdout + done.stderr


async def _post(http: aiohttp.ClientSession, dep: Deployment, channel: GenericChannel, contact: str) -> None:
    raw, headers = channel.signed(message("m-" + uuid.uuid4().hex[:8], contact, "hello"))
    async with http.post(f"{dep.base_url}/webhooks/generic/{channel.id}", data=raw, headers=headers) as r:
        assert r.status == 200, await r.text()


async def test_json_logs_are_one_object_per_line_with_the_thread_of_a_dead_letter(
    deployment: Deployment, db: asyncpg.Connection
) -> None:
    key = f"nowhere/json-{uuid.uuid4().hex[:6]}"
    producer = AIOKafkaProducer(bootstrap_servers=deployment.services.bootstrap, acks="all")
    await producer.start()
    try:  # an undecodable event: the lifecycle agent dead-letters it and logs it with its thread
        await producer.send_and_wait(
            Topics(deployment.name).conversation_events, b"not json", key=key.encode()
        )
    finally:
        await producer.stop()

    async def logged() -> dict[str, Any] | None:
        for line in _json_lines(deployment.log_of("worker")):
            if "dead-lettering" in line["message"] and line.get("thread") == key:
                return line
        return None

    line = await wait_until(logged, 60, "the dead-lettering line")

    async def projected() -> bool:  # settled before the next test counts the dead letters
        return bool(await db.fetchval("SELECT count(*) FROM dead_letters WHERE key = $1", key))

    await wait_until(projected, 60, "the dead letter's row")
    assert line["level"] == "ERROR" and line["logger"] == "agents.lifecycle" and line["time"]
    for part in ("worker", "api"):
        lines = _json_lines(deployment.log_of(part))
        assert lines and all({"time", "level", "logger", "message"} <= set(line) for line in lines)
    # Faust's start-up banners and tables are DEBUG now: none of them at INFO in the worker's log.
    worker = _json_lines(deployment.log_of("worker"))
    assert any(line["logger"] == "agents.scheduler" for line in worker)  # our own INFO lines are there
    assert not [line for line in worker if line["logger"].split(".")[0] in {"faust", "mode", "aiokafka"}]
    assert not [line for line in worker if "Starting..." in line["message"] or "+Topic" in line["message"]]


async def test_status_shows_readiness_lag_and_counts_and_fails_when_not_ready(
    http: aiohttp.ClientSession, deployment: Deployment, channel: GenericChannel, db: asyncpg.Connection
) -> None:
    contact = "status-" + uuid.uuid4().hex[:6]
    await _post(http, deployment, channel, contact)

    async def opened() -> bool:
        return bool(await db.fetchval("SELECT count(*) FROM conversations WHERE contact_id = $1", contact))

    await wait_until(opened, 60, "the conversation")
    conversations = await db.fetchval("SELECT count(*) FROM conversations")
    letters = await db.fetchval("SELECT count(*) FROM dead_letters")
    code, out = _status(deployment)
    assert code == 0, out
    assert "ready:          yes  (api ok, postgres ok, kafka ok, worker ok" in out, out
    topic = Topics(deployment.name).conversation_events
    assert any(line.split()[:1] == [topic] for line in out.splitlines()), out
    code, raw = _status(deployment, "--json")
    doc = json.loads(raw)
    assert code == 0 and doc["ready"] is True and doc["errors"] == {}
    assert sum(doc["counts"]["conversations"].values()) == conversations
    assert sum(doc["counts"].get("dead letters", {}).values()) == letters
    assert set(doc["lag"]) == set(Topics(deployment.name).all())
    assert doc["worker"]["parley_lifecycle_writer_up"] == 1

    # No worker: not ready (exit 1), and a message accepted meanwhile waits in Kafka: lag >= 1.
    deployment.stop("worker")
    lag_before = doc["lag"][topic]["lag"]
    await _post(http, deployment, channel, contact)

    async def not_ready() -> dict[str, Any] | None:
        code, raw = _status(deployment, "--json")
        found: dict[str, Any] = json.loads(raw)
        return found if code == 1 and found["checks"].get("worker") == "not ready" else None

    doc = await wait_until(not_ready, 60, "status to say the worker is not ready")
    assert doc["ready"] is False and doc["checks"]["api"] == "ok"
    assert "worker metrics" in doc["errors"]  # its /metrics port is closed
    # The group committed what the worker processed when it stopped; the new record is not.
    assert doc["lag"][topic]["lag"] >= 1 and doc["lag"][topic]["lag"] >= lag_before
    code, out = _status(deployment)
    assert code == 1 and "ready:          NO" in out and "unavailable:    worker metrics" in out, out

    # No API either: the checks run from here, and say so.
    deployment.stop("api")
    code, raw = _status(deployment, "--json")
    doc = json.loads(raw)
    assert code == 1 and doc["checks"]["api"] == "unreachable"
    assert doc["checks"]["postgres"] == "ok" and doc["checks"]["kafka"] == "ok"
    assert doc["checks"]["worker"] != "ok"
