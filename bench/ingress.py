"""Ingress alone: generic signed webhooks -> Kafka ack -> 200, with 1 and with 2 API processes
behind one port (`PARLEY_API_PROCESSES`), beside the raw aiokafka baseline of the same run.

No worker runs here: on this 2-core box a worker consuming what the API accepts takes as much CPU
as the API itself, so it would measure the box, not the ingress (the inbound phase measures
webhooks with the worker running). What shares the cores: the API, Kafka and the Python load
generator (this process). CPU is reported per process (api-0, api-1: the children of
`parley api`; `api`: their parent, which only waits), and as API CPU per accepted webhook.
"""

from __future__ import annotations

import time

import aiohttp

from bench import baselines, cpu, pipeline, wrk
from bench.stats import row, summary_ms
from tests.integration.harness import Deployment, GenericChannel, Services


async def run(services: Services, scale: float, rounds: int = 2) -> None:
    """Every ingress figure, printed as measured, with its ratio to the same run's raw Kafka."""
    n_raw = int(200_000 * scale)
    print("\n== ingress: baseline (same run) ==", flush=True)
    kafka_rate = await baselines.kafka_produce_consume(services.bootstrap, n_raw)
    row("raw aiokafka produce+consume (acks=all, 300 B)", f"{kafka_rate:,.0f} msg/s")
    for processes in (1, 2):
        print(f"\n== ingress: signed generic webhook -> Kafka ack -> 200, {processes} API process(es) ==")
        dep = Deployment(services, extra_env={"PARLEY_API_PROCESSES": str(processes)})
        await dep.create_database()
        dep.start("api")
        channel = GenericChannel(id="bench")
        try:
            async with aiohttp.ClientSession() as http:
                await dep.wait_api(http)
                await pipeline.register(http, dep, channel)
            await pipeline.ingress(dep, channel, 2_000, concurrency=64)  # warm-up: connections, caches
            n = int(30_000 * scale)
            for i in range(rounds):
                usage: dict[str, float] = {}
                t0 = time.monotonic()
                with cpu.accounting(usage):
                    rate, lat, _ = await pipeline.ingress(dep, channel, n, concurrency=64)
                wall = time.monotonic() - t0
                row(
                    f"round {i + 1}: flat out ({n:,}, 64 in flight)",
                    f"{rate:,.0f} /s",
                    f"= {rate / kafka_rate:.3f}x raw Kafka (target 0.15x, 5,000/s)",
                )
                row("  ack latency", summary_ms(lat))
                print(f"    CPU: {cpu.describe(usage)}; {api_cost(usage, wall, len(lat))}", flush=True)
            if wrk.available():  # the same, from a load generator in C (bench/wrk.py)
                await _from_wrk(dep, channel, kafka_rate, scale, rounds)
            paced = int(20_000 * scale)
            for i in range(rounds):
                usage = {}
                t0 = time.monotonic()
                with cpu.accounting(usage):
                    rate, lat, _ = await pipeline.ingress(dep, channel, paced, concurrency=128, rate=2000)
                wall = time.monotonic() - t0
                row(f"round {i + 1}: paced at 2,000/s ({paced:,})", f"{rate:,.0f} /s achieved")
                row("  ack latency", summary_ms(lat), "(target p99 25 ms)")
                print(f"    CPU: {cpu.describe(usage)}; {api_cost(usage, wall, len(lat))}", flush=True)
        finally:
            dep.stop_all()


async def _from_wrk(
    dep: Deployment, channel: GenericChannel, kafka_rate: float, scale: float, rounds: int
) -> None:
    path, _, requests = pipeline.generic_requests(channel, 20_000)
    seconds = float(max(3, round(10 * scale)))
    for i in range(rounds):
        usage: dict[str, float] = {}
        with cpu.accounting(usage):
            got = await wrk.flat_out(dep.base_url, path, requests, seconds=seconds)
        row(
            f"round {i + 1}: flat out from wrk ({seconds:.0f} s, 64 connections)",
            f"{got.rate:,.0f} /s",
            f"= {got.rate / kafka_rate:.3f}x raw Kafka (target 0.15x, 5,000/s); {got.errors} errors",
        )
        row("  ack latency", f"p50 {got.p50_ms:.1f} ms, p99 {got.p99_ms:.1f} ms, max {got.max_ms:.1f} ms")
        print(
            f"    CPU: {cpu.describe(usage)}; {api_cost(usage, seconds, int(got.rate * seconds))}", flush=True
        )


def api_cost(usage: dict[str, float], wall: float, accepted: int) -> str:
    """API CPU time (all its processes) per accepted webhook: steadier than rates on a shared box."""
    used = sum(v for k, v in usage.items() if k.startswith("api")) / 100 * wall
    return f"API CPU {1e6 * used / max(accepted, 1):,.0f} us per webhook"
