"""Outgoing webhooks: the delivery engine alone (fan-out agent + dispatcher, agents/webhooks.py).

Events are produced straight onto `<prefix>.outgoing-events` with aiokafka, so the lifecycle is
not in the way; a separate receiver process (bench/webhook_receiver.py) answers 200 at once and
records each webhook-id with its receipt time. Three figures:

1. deliveries/s from one worker to one endpoint subscribed to "*" (first to last receipt), beside
   two baselines from the same run: raw aiokafka produce+consume and raw aiohttp POSTs to the same
   receiver with the same concurrency (PARLEY_WEBHOOK_CONCURRENCY, 16 in flight);
2. event-to-endpoint latency at a paced 1,000 events/s (produce call -> receipt);
3. isolation: the deliveries/s of 9 healthy endpoints out of 10, all 10 healthy vs one of them
   hanging (a path that never answers; the worker's PARLEY_WEBHOOK_TIMEOUT, 10 s, frees it).
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime

import aiohttp
import orjson
from aiokafka import AIOKafkaProducer

from bench import baselines, cpu
from bench.progress import waiting
from bench.stats import row, summary_ms
from parley.localstack import ROOT, die_with_parent, free_port, stop
from tests.integration.harness import Deployment, Services, wait_until
from tests.integration.schedule_helpers import call

ENV = {
    "PARLEY_OUTBOUND_ALLOW_HTTP": "true",
    "PARLEY_OUTBOUND_ALLOW_PRIVATE": "true",  # the receiver is on loopback
}
CONCURRENCY = 16  # PARLEY_WEBHOOK_CONCURRENCY's default: the raw baseline uses the same
PAD = 120  # bytes of padding in each event's data: ~250-byte bodies


@dataclass
class Receiver:
    """The receiver process and its control routes."""

    port: int
    proc: subprocess.Popen[bytes]

    def url(self, path: str) -> str:
        """An endpoint URL on this receiver."""
        return f"http://127.0.0.1:{self.port}/{path}"

    async def counts(self, http: aiohttp.ClientSession) -> dict[str, int]:
        """Requests received so far, by path."""
        async with http.get(self.url("_count")) as r:
            got: dict[str, int] = orjson.loads(await r.read())
            return got

    async def results(self, http: aiohttp.ClientSession, path: str) -> list[tuple[str, float]]:
        """(webhook-id, receipt unix time) of every request to `path`."""
        async with http.get(self.url("_results"), params={"path": path}) as r:
            return [(i, t) for i, t in orjson.loads(await r.read())]

    async def reset(self, http: aiohttp.ClientSession) -> None:
        """Forget everything received."""
        async with http.post(self.url("_reset")) as r:
            assert r.status == 200

    async def wait_for(self, http: aiohttp.ClientSession, want: dict[str, int], timeout: float) -> None:
        """Until every path in `want` got at least that many requests."""

        async def done() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError("the receiver exited")
            got = await self.counts(http)
            return all(got.get(p, 0) >= n for p, n in want.items())

        await waiting(done, timeout, f"receipts {want}")


@contextmanager
def receiver_process() -> Iterator[Receiver]:
    """Start `python -m bench.webhook_receiver serve PORT`; stop it afterwards."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.webhook_receiver", "serve", str(port)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        preexec_fn=die_with_parent,
    )
    try:
        yield Receiver(port, proc)
    finally:
        stop(proc)


def event(run: str, i: int, key: str) -> tuple[str, bytes]:
    """(event id, record value) of one outgoing event, shaped like the ones Parley publishes."""
    eid = f"evt_{run}_{i}"
    value = {
        "type": "bench.event",
        "id": eid,
        "timestamp": datetime.now(UTC).isoformat(),
        "data": {"key": key, "i": i, "pad": "x" * PAD},
    }
    return eid, orjson.dumps(value)


def producer(dep: Deployment, linger_ms: int) -> AIOKafkaProducer:
    """A producer like the outbox relay's (acks=all)."""
    return AIOKafkaProducer(
        bootstrap_servers=dep.services.bootstrap, acks="all", linger_ms=linger_ms, max_batch_size=256 * 1024
    )


async def produce_all(dep: Deployment, run: str, n: int, keys: int) -> list[str]:
    """n events over `keys` event keys onto outgoing-events as fast as possible; their ids."""
    topic = f"{dep.name}.outgoing-events"
    prod = producer(dep, 5)
    await prod.start()
    ids: list[str] = []
    try:
        for chunk in range(0, n, 5000):
            futs = []
            for i in range(chunk, min(n, chunk + 5000)):
                key = f"bench/{i % keys}"
                eid, value = event(run, i, key)
                ids.append(eid)
                futs.append(await prod.send(topic, value, key=key.encode()))
            await asyncio.gather(*futs)
    finally:
        await prod.stop()
    return ids


async def produce_paced(dep: Deployment, run: str, n: int, keys: int, rate: float) -> dict[str, float]:
    """n events at `rate`/s; event id -> unix time of its send() call (the produce time)."""
    topic = f"{dep.name}.outgoing-events"
    # linger 2 ms, as the outbox relay that publishes these in production (agents/outbox.py): with
    # 0, every event was a produce request of its own, and the broker's CPU for 1,000 of those a
    # second competed with the worker on these two cores (the latency counts from send()).
    prod = producer(dep, 2)
    await prod.start()
    sent: dict[str, float] = {}
    futs = []
    try:
        start = time.perf_counter()
        for i in range(n):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)  # pacing the offered load
            key = f"bench/{i % keys}"
            eid, value = event(run, i, key)
            sent[eid] = time.time()
            futs.append(await prod.send(topic, value, key=key.encode()))
        await asyncio.gather(*futs)
    finally:
        await prod.stop()
    return sent


async def deployment(services: Services, http: aiohttp.ClientSession) -> Deployment:
    """A fresh worker + API, own topics and database, allowed to post to loopback over http."""
    dep = Deployment(services, extra_env=ENV)
    await dep.create_database()
    dep.start("worker")
    dep.start("api")
    await dep.wait_ready(http)
    return dep


async def endpoints(
    http: aiohttp.ClientSession, dep: Deployment, rx: Receiver, paths: list[str], healthy: list[str]
) -> None:
    """Register one endpoint per path (all events), then warm up: 20 events, until every healthy
    path got them (the worker knows the endpoints and holds open connections), then reset."""
    for path in paths:
        code, body = await call(
            http, dep, "POST", "/v1/webhook-endpoints", {"url": rx.url(path), "events": ["*"]}
        )
        assert code == 201, body
    # The worker learns of new endpoints by NOTIFY: events fanned out before that skip them, so
    # warm up in rounds until every healthy endpoint got a whole round.
    deadline = time.monotonic() + 90
    while True:
        await produce_all(dep, "warm" + uuid.uuid4().hex[:6], 20, 20)
        try:
            await rx.wait_for(http, {p: 20 for p in healthy}, 5)
            break
        except AssertionError:
            if time.monotonic() > deadline:
                raise
    await asyncio.sleep(1)  # the last round's stragglers (a hanging endpoint's lanes) settle
    await rx.reset(http)


def span_rate(receipts: list[tuple[str, float]]) -> tuple[float, int, float, float]:
    """(unique deliveries per second from first to last receipt, unique count, first, last)."""
    unique = {i: t for i, t in receipts}
    first, last = min(unique.values()), max(unique.values())
    return len(unique) / (last - first), len(unique), first, last


async def raw_http(rx: Receiver, n: int) -> tuple[float, dict[str, float]]:
    """The raw aiohttp POST baseline in its own process (uvloop, 16 in flight): requests/s and
    CPU use by component."""
    usage: dict[str, float] = {}
    with cpu.accounting(usage):
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bench.webhook_receiver",
            "post",
            rx.url("raw"),
            str(n),
            str(CONCURRENCY),
            str(PAD),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            cwd=ROOT,
        )
        out, _ = await asyncio.wait_for(proc.communicate(), 600)
    found = re.search(r"RATE (\d+)", out.decode(errors="replace"))
    if found is None:
        raise RuntimeError(f"the raw POST run printed no rate: {out[-500:]!r}")
    return float(found.group(1)), usage


async def run(services: Services, scale: float) -> None:
    """Every webhooks figure, printed as measured, with its ratio to the same run's baselines."""
    n = int(20_000 * scale)
    keys = 2_000
    print("\n== outgoing webhooks: baselines (same run) ==", flush=True)
    kafka_rate = await baselines.kafka_produce_consume(services.bootstrap, int(200_000 * scale))
    row("raw aiokafka produce+consume (acks=all, 300 B)", f"{kafka_rate:,.0f} msg/s")
    with receiver_process() as rx:
        async with aiohttp.ClientSession() as http:
            await wait_until(lambda: _alive(http, rx), 30, "the receiver to listen")
            http_rate, usage = await raw_http(rx, n)
            await rx.reset(http)
            row(f"raw aiohttp POST -> receiver ({n:,}, {CONCURRENCY} in flight)", f"{http_rate:,.0f} req/s")
            print(f"    CPU: {cpu.describe(usage)}", flush=True)

            print(
                "\n== outgoing webhooks: outgoing-events -> fan-out -> dispatcher -> receiver ==", flush=True
            )
            dep = await deployment(services, http)
            try:
                await endpoints(http, dep, rx, ["a"], ["a"])
                run_id = uuid.uuid4().hex[:6]
                usage = {}
                with cpu.accounting(usage):
                    started = time.time()
                    await produce_all(dep, run_id, n, keys)
                    produced = time.time()
                    await rx.wait_for(http, {"a": n}, 600)
                wall = time.time() - started
                got = await rx.results(http, "a")
                rate, unique, first, last = span_rate(got)
                row(
                    f"deliveries/s, one endpoint ({n:,} events, {keys:,} keys)",
                    f"{rate:,.0f} /s",
                    f"= {rate / http_rate:.2f}x raw aiohttp POST, {rate / kafka_rate:.3f}x raw Kafka"
                    " (target 3,000/s)",
                )
                row(
                    "  produce start -> last receipt",
                    f"{last - started:.1f} s",
                    f"(produced in {produced - started:.1f} s; first receipt after {first - started:.2f} s;"
                    f" {len(got) - unique} duplicates)",
                )
                print(f"    CPU: {cpu.describe(usage)}; {worker_cost(usage, wall, n)}", flush=True)

                await rx.reset(http)
                offered = 1000
                m = int(offered * 20 * scale)
                run_id = uuid.uuid4().hex[:6]
                usage = {}
                t0 = time.time()
                with cpu.accounting(usage):
                    sent = await produce_paced(dep, run_id, m, keys, offered)
                    await rx.wait_for(http, {"a": m}, 600)
                wall = time.time() - t0
                got = await rx.results(http, "a")
                seen: dict[str, float] = {}
                for i, t in got:
                    seen.setdefault(i, t)  # the first receipt of each id
                lat = [seen[i] - s for i, s in sent.items()]
                row(
                    f"event-to-endpoint latency at {offered:,}/s ({m:,} events)",
                    summary_ms(lat),
                    "(target p99 50 ms)",
                )
                print(f"    CPU: {cpu.describe(usage)}; {worker_cost(usage, wall, m)}", flush=True)
            finally:
                dep.stop_all()

            print("\n== outgoing webhooks: 10 endpoints, one of them hanging ==", flush=True)
            m = int(5_000 * scale)
            healthy = [f"h{j}" for j in range(9)]
            rates: dict[str, float] = {}
            for case, tenth in (("all 10 healthy", "h9"), ("1 hanging (never answers)", "hang/h9")):
                await rx.reset(http)
                dep = await deployment(services, http)
                try:
                    await endpoints(http, dep, rx, [*healthy, tenth], healthy)
                    usage = {}
                    t0 = time.time()
                    with cpu.accounting(usage):
                        await produce_all(dep, uuid.uuid4().hex[:6], m, keys)
                        await rx.wait_for(http, {p: m for p in healthy}, 900)
                    wall = time.time() - t0
                    receipts = {(p, i): t for p in healthy for i, t in await rx.results(http, p)}
                    tenth_got = len(await rx.results(http, tenth))
                    rates[case] = len(receipts) / (max(receipts.values()) - min(receipts.values()))
                    row(
                        f"9 healthy endpoints' deliveries/s, {case} ({m:,} events)",
                        f"{rates[case]:,.0f} /s",
                        f"(the 10th got {tenth_got:,} requests meanwhile)",
                    )
                    cost = worker_cost(usage, wall, len(receipts) + tenth_got)
                    print(f"    CPU: {cpu.describe(usage)}; {cost}", flush=True)
                finally:
                    dep.stop_all()
            kept = rates["1 hanging (never answers)"] / rates["all 10 healthy"]
            row("  the 9 keep, with one hanging", f"{kept:.2f}x", "(target >= 0.90x)")


def worker_cost(usage: dict[str, float], wall: float, deliveries: int) -> str:
    """Worker CPU time per delivery during a phase: steadier than rates on a shared box."""
    used = usage.get("worker", 0.0) / 100 * wall
    return f"worker CPU {1e6 * used / max(deliveries, 1):,.0f} us per delivery ({used:.1f} s)"


async def _alive(http: aiohttp.ClientSession, rx: Receiver) -> bool:
    try:
        await rx.counts(http)
        return True
    except aiohttp.ClientError:
        return False
