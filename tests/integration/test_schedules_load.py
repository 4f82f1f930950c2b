"""10,000 schedules due within a minute, 2,000 rescheduled and 1,000 cancelled while pending, one
kill -9 of the worker in the middle: each takes effect exactly once, never early, no cancelled one
fires, and the API shows the right status for all of them."""

from __future__ import annotations

import asyncio
import time
from collections import Counter, defaultdict
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp

from tests.integration.harness import Deployment, wait_until
from tests.integration.schedule_helpers import call, outgoing

N, RESCHEDULED, CANCELLED = 10_000, 2_000, 1_000


async def _all(http: aiohttp.ClientSession, dep: Deployment, status: str) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    cursor = None
    while True:
        query = f"/v1/schedules?status={status}&event_type=load&limit=1000" + (
            f"&cursor={cursor}" if cursor else ""
        )
        code, page = await call(http, dep, "GET", query)
        assert code == 200, page
        out.update({item["key"]: item for item in page["items"]})
        cursor = page["next_cursor"]
        if cursor is None:
            return out


async def test_ten_thousand_schedules_with_reschedules_cancels_and_a_worker_crash(
    http: aiohttp.ClientSession, deployment: Deployment
) -> None:
    start = datetime.now(UTC) + timedelta(seconds=25)
    keys = [f"load:{i:05d}" for i in range(N)]
    run_at = {k: start + timedelta(milliseconds=3 * i) for i, k in enumerate(keys)}  # over 30 s

    async def batch(chunk: list[str]) -> None:
        items = [
            {"key": k, "run_at": run_at[k].isoformat(), "event_type": "load", "payload": {"k": k}}
            for k in chunk
        ]
        code, answer = await call(http, deployment, "POST", "/v1/schedules:batch", {"items": items})
        assert code == 200, answer
        assert [a["code"] for a in answer["items"]] == [201] * len(chunk), answer["items"][:3]

    t0 = time.perf_counter()
    await asyncio.gather(*(batch(keys[i : i + 1000]) for i in range(0, N, 1000)))
    created_s = time.perf_counter() - t0

    moved, cancelled = keys[:RESCHEDULED], keys[RESCHEDULED : RESCHEDULED + CANCELLED]
    sem = asyncio.Semaphore(64)
    latencies: list[float] = []

    async def one(method: str, key: str, body: Any = None) -> None:
        async with sem:
            t = time.perf_counter()
            code, answer = await call(http, deployment, method, f"/v1/schedules/{key}", body)
            latencies.append(time.perf_counter() - t)
            assert code == 200, answer

    t0 = time.perf_counter()
    jobs = []
    for k in moved:
        run_at[k] += timedelta(seconds=20)
        jobs.append(
            one("PUT", k, {"run_at": run_at[k].isoformat(), "event_type": "load", "payload": {"k": k}})
        )
    jobs += [one("DELETE", k) for k in cancelled]
    await asyncio.gather(*jobs)
    changed_s = time.perf_counter() - t0
    assert datetime.now(UTC) < start, "the commands must be answered before the first is due"

    # kill -9 the worker while the schedules are firing, then start it again
    await wait_until(
        lambda: asyncio.sleep(0, datetime.now(UTC) > start + timedelta(seconds=12)), 60, "mid-run"
    )
    deployment.kill("worker")
    deployment.start("worker")

    expected = N - CANCELLED

    async def all_fired() -> dict[str, dict[str, Any]] | None:
        fired = await _all(http, deployment, "fired")
        return fired if len(fired) >= expected else None

    fired = await wait_until(all_fired, 120, "every schedule to fire")
    assert set(fired) == set(keys) - set(cancelled)
    assert set(await _all(http, deployment, "cancelled")) == set(cancelled)
    for k, item in fired.items():
        assert item["attempts"] == 1 and item["fired_at"] >= run_at[k].isoformat(), item
        assert item["version"] == (2 if k in moved else 1)

    async def all_published() -> list[dict[str, Any]] | None:
        records = [r for r in await outgoing(deployment) if r["type"] == "schedule.fired"]
        return records if len({r["id"] for r in records}) >= expected else None

    records = await wait_until(all_published, 60, "every schedule.fired on outgoing-events")
    ids_per_key: defaultdict[str, set[str]] = defaultdict(set)
    for r in records:
        assert r["_key"].startswith("schedule:")  # keyed by the owner key, `schedule:<key>`
        key = r["_key"].removeprefix("schedule:")
        ids_per_key[key].add(r["id"])
        assert r["data"]["fired_at"] >= run_at[key].isoformat()
        assert r["data"]["version"] == (2 if key in moved else 1)
    assert set(ids_per_key) == set(keys) - set(cancelled)  # no cancelled one fired
    assert all(len(ids) == 1 for ids in ids_per_key.values())  # exactly one firing each
    repeats = sum(n - 1 for n in Counter(r["id"] for r in records).values())
    latencies.sort()
    p50, p99 = latencies[len(latencies) // 2], latencies[int(0.99 * len(latencies))]
    print(
        f"\ncreated {N} via the batch route in {created_s:.2f}s ({N / created_s:.0f}/s); "
        f"{len(latencies)} reschedules+cancels in {changed_s:.2f}s ({len(latencies) / changed_s:.0f}/s, "
        f"64 in flight, p50 {1000 * p50:.0f} ms, p99 {1000 * p99:.0f} ms); "
        f"{repeats} re-published duplicates (same id) after the kill"
    )
