"""`make bench`: start real services, measure baselines and Parley in the same run, print ratios."""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
from pathlib import Path

import aiohttp

from bench import baselines, pipeline
from bench.stats import pct, row, summary_ms
from parley.localstack import KafkaBroker, LocalPostgres, free_port
from tests.integration.harness import Deployment, GenericChannel, Services


async def run(services: Services, scale: float) -> None:
    """Every figure, printed as it is measured."""
    n_raw = int(200_000 * scale)
    print("\n== baselines (same run, same machine) ==", flush=True)
    kafka_rate = await baselines.kafka_produce_consume(services.bootstrap, n_raw)
    row("raw aiokafka produce+consume (acks=all, 300 B)", f"{kafka_rate:,.0f} msg/s")
    pg_rate = await baselines.pg_batched_insert(services.postgres_url, n_raw)
    row("raw asyncpg INSERT..unnest, 1000/batch", f"{pg_rate:,.0f} rows/s")

    dep = Deployment(services)
    await dep.create_database()
    dep.start("worker")
    dep.start("api")
    channel = GenericChannel(id="bench")
    try:
        async with aiohttp.ClientSession() as http:
            await dep.wait_ready(http)
            await pipeline.register(http, dep, channel)

        print("\n== worker: Kafka -> lifecycle agent -> Postgres ==", flush=True)
        n_worker = int(100_000 * scale)
        rate = await pipeline.worker_throughput(dep, channel.id, n_worker)
        row(
            f"inbound messages into Postgres ({n_worker:,} events, 2,000 threads)",
            f"{rate:,.0f} msg/s",
            f"= {rate / kafka_rate:.2f}x raw Kafka, {rate / pg_rate:.2f}x raw Postgres",
        )

        print("\n== API: signed webhook -> Kafka ack -> 200 ==", flush=True)
        n_http = int(30_000 * scale)
        accepted, lat, _ = await pipeline.ingress(dep, channel, n_http, concurrency=64)
        row(
            f"signed webhooks accepted, flat out ({n_http:,}, 64 in flight)",
            f"{accepted:,.0f} /s",
            f"= {accepted / kafka_rate:.2f}x raw Kafka",
        )
        row("  ack latency", summary_ms(lat))
        paced_n = int(20_000 * scale)
        accepted, lat, _ = await pipeline.ingress(dep, channel, paced_n, concurrency=128, rate=2000)
        row(f"signed webhooks paced at 2,000/s ({paced_n:,})", f"{accepted:,.0f} /s achieved")
        row("  ack latency", summary_ms(lat))

        print("\n== end to end: webhook -> row ==", flush=True)
        for offered in (1000, 5000):
            n = int(offered * 8 * scale)
            accepted, _, sent = await pipeline.ingress(dep, channel, n, concurrency=256, rate=offered)
            e2e = await pipeline.webhook_to_row(dep, sent)
            row(f"offered {offered:,}/s ({n:,} webhooks)", f"{accepted:,.0f} /s achieved")
            row("  webhook-to-row latency", summary_ms(e2e))
            row("  webhook-to-row p99 (ms)", f"{pct([v * 1000 for v in e2e], 99):.1f}")
    finally:
        dep.stop_all()


def main() -> None:
    """Entry point."""
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every count (0.1 = quick)")
    parser.add_argument("--skip-timers", action="store_true", help="skip the timer-wheel micro-benchmark")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="parley-bench-"))
    os.environ.setdefault("PARLEY_TEST_LOGS", str(root / "logs"))
    started: list[KafkaBroker | LocalPostgres] = []
    try:
        pg_url = os.environ.get("DATABASE_URL", "")
        bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "")
        if not pg_url:
            pg = LocalPostgres(root / "postgres", free_port())
            pg.start()
            started.append(pg)
            pg_url = pg.url
        if not bootstrap:
            kafka = KafkaBroker(root / "kafka", free_port())
            kafka.start()
            started.append(kafka)
            bootstrap = kafka.bootstrap
        print(f"services: Kafka {bootstrap}, Postgres {pg_url}; logs in {root / 'logs'}", flush=True)
        asyncio.run(run(Services(bootstrap, pg_url), args.scale))
    finally:
        for svc in reversed(started):
            svc.stop()
    if not args.skip_timers:
        print("\n== timer wheel (pure, in-process) ==", flush=True)
        from bench import bench_timer_wheel

        bench_timer_wheel.main()


if __name__ == "__main__":
    main()
