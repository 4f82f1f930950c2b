"""`make bench`: start real services, measure baselines and Parley in the same run, print ratios."""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
from datetime import UTC, datetime, timedelta

import aiohttp

from bench import (
    baselines,
    batches,
    cpu,
    ingress,
    peers,
    pipeline,
    recovery,
    scaling,
    schedules,
    sends,
    timers,
    webhooks,
    whatif,
)
from bench.stats import pct, row, summary_ms
from tests.integration.harness import Deployment, GenericChannel, Services, local_services


async def noop_paths(services: Services, scale: float, rounds: int = 3) -> None:
    """Faust's per-event path and the batch path, back to back, `rounds` times (a shared box)."""
    n = int(100_000 * scale)
    print(f"\n== Faust no-op agent, {n:,} events, per-event path vs batch path ==", flush=True)
    for i in range(rounds):
        events = await baselines.faust_noop(services.bootstrap, n)
        batched = await baselines.faust_noop(services.bootstrap, n, path="batches")
        row(f"round {i + 1}", f"{events:,.0f} vs {batched:,.0f} events/s", f"= {batched / events:.2f}x")


async def worker_processes(services: Services, scale: float) -> None:
    """1, 2 and 4 worker processes sharing the partitions, each count draining the same backlog."""
    n = int(100_000 * scale)
    print(f"\n== worker processes sharing 8 partitions ({n:,} events each) ==", flush=True)
    found = await scaling.workers(services, (1, 2, 4), n)
    one = found[1][0]
    for count, (rate, usage) in found.items():
        row(f"{count} worker process(es)", f"{rate:,.0f} msg/s", f"= {rate / one:.2f}x one")
        print(f"    CPU: {cpu.describe(usage)}", flush=True)


async def crash_phase(services: Services, scale: float) -> None:
    """The worker killed (-9) at 40% of a backlog, restarted: lost and doubled events."""
    dep = Deployment(services)
    await dep.create_database()
    dep.start("worker")
    dep.start("api")
    channel = GenericChannel(id="bench")
    try:
        async with aiohttp.ClientSession() as http:
            await dep.wait_ready(http)
            await pipeline.register(http, dep, channel)
        print("\n== kill -9 of the worker at 40% of a backlog (the peer's crash phase) ==", flush=True)
        for _ in range(2):
            crash = await scaling.kill_9(dep, channel.id, int(20_000 * max(scale, 0.25)))
            scaling.print_crash(crash)
    finally:
        dep.stop_all()


async def run(services: Services, scale: float, skip_timers: bool, inbound_only: bool = False) -> None:
    """Every figure, printed as it is measured (`inbound_only`: up to the end-to-end phase)."""
    n_raw = int(200_000 * scale)
    print("\n== baselines (same run, same machine) ==", flush=True)
    kafka_rate = await baselines.kafka_produce_consume(services.bootstrap, n_raw)
    row("raw aiokafka produce+consume (acks=all, 300 B)", f"{kafka_rate:,.0f} msg/s")
    pg_rate = await baselines.pg_batched_insert(services.postgres_url, n_raw)
    row("raw asyncpg INSERT..unnest, 1000/batch", f"{pg_rate:,.0f} rows/s")
    faust_rate = await baselines.faust_noop(services.bootstrap, int(100_000 * scale))
    row("Faust stream machinery alone (no-op agent, manual acks)", f"{faust_rate:,.0f} events/s")
    batch_rate = await baselines.faust_noop(services.bootstrap, int(100_000 * scale), path="batches")
    row(
        "  the same through the batch path (agents/batching.py)",
        f"{batch_rate:,.0f} events/s",
        f"= {batch_rate / faust_rate:.2f}x Faust's per-event path",
    )
    await projection(services)

    dep = Deployment(services)
    await dep.create_database()
    dep.start("worker")
    dep.start("api")
    channel = GenericChannel(id="bench")
    wa_phone, wa_secret = "100000000000001", secrets.token_hex(16)
    try:
        async with aiohttp.ClientSession() as http:
            await dep.wait_ready(http)
            await pipeline.register(http, dep, channel)
            async with http.post(
                f"{dep.base_url}/v1/channels",
                headers=dep.admin_headers(),
                json={
                    "id": "bench-wa",
                    "provider": "whatsapp",
                    "phone_number_id": wa_phone,
                    "app_secret": wa_secret,
                    "verify_token": secrets.token_urlsafe(12),
                },
            ) as r:
                assert r.status == 201, await r.text()

        print("\n== worker: Kafka -> lifecycle agent -> Postgres ==", flush=True)
        n_worker = int(100_000 * scale)
        rate = await pipeline.worker_throughput(dep, channel.id, n_worker)
        row(
            f"inbound messages into Postgres ({n_worker:,} events, 2,000 threads)",
            f"{rate:,.0f} msg/s",
            f"= {rate / kafka_rate:.3f}x raw Kafka, {rate / pg_rate:.3f}x raw Postgres, "
            f"{rate / faust_rate:.2f}x Faust no-op",
        )
        row("  timer updates as a side effect (one per message)", f"{rate:,.0f} /s")

        print("\n== catch-up: a backlog, then the worker started with live traffic arriving ==", flush=True)
        caught = await scaling.catch_up(
            dep, channel.id, int(200_000 * scale), live_rate=min(1000.0, rate / 4)
        )
        scaling.print_catch_up(caught, rate)

        print("\n== kill -9 of the worker at 40% of a backlog (the peer's crash phase) ==", flush=True)
        scaling.print_crash(await scaling.kill_9(dep, channel.id, int(20_000 * max(scale, 0.25))))

        print("\n== API: signed webhook -> Kafka ack -> 200 ==", flush=True)
        n_http = int(30_000 * scale)
        await pipeline.drained(dep, "ingress phase")  # the worker idle: no backlog competes
        accepted, lat, _ = await pipeline.ingress(dep, channel, n_http, concurrency=64)
        row(
            f"generic webhooks accepted, flat out ({n_http:,}, 64 in flight)",
            f"{accepted:,.0f} /s",
            f"= {accepted / kafka_rate:.3f}x raw Kafka",
        )
        row("  ack latency", summary_ms(lat))
        wa_req = pipeline.whatsapp_requests(wa_phone, wa_secret, n_http)
        await pipeline.drained(dep, "WhatsApp ingress phase")
        wa_rate, wa_lat, _ = await pipeline.ingress(dep, channel, n_http, concurrency=64, prepared=wa_req)
        row(
            f"WhatsApp webhooks accepted, flat out ({n_http:,}, X-Hub-Signature-256)",
            f"{wa_rate:,.0f} /s",
            f"= {wa_rate / accepted:.2f}x generic",
        )
        row("  ack latency", summary_ms(wa_lat))
        await pipeline.drained(dep, "paced ingress phase")
        paced_n = int(20_000 * scale)
        accepted, lat, _ = await pipeline.ingress(dep, channel, paced_n, concurrency=128, rate=2000)
        row(f"generic webhooks paced at 2,000/s ({paced_n:,})", f"{accepted:,.0f} /s achieved")
        row("  ack latency", summary_ms(lat))

        print("\n== end to end: webhook -> row (worker drained first) ==", flush=True)
        for offered in (200, 1000, 5000):
            await pipeline.drained(dep, f"{offered:,}/s phase")
            n = int(offered * 8 * scale)
            usage: dict[str, float] = {}
            with cpu.accounting(usage):
                accepted, _, sent = await pipeline.ingress(dep, channel, n, concurrency=256, rate=offered)
                e2e = await pipeline.webhook_to_row(dep, sent)
            row(f"offered {offered:,}/s ({n:,} webhooks)", f"{accepted:,.0f} /s achieved")
            row("  webhook-to-row latency", summary_ms(e2e))
            print(f"    CPU: {cpu.describe(usage)}", flush=True)
    finally:
        dep.stop_all()
    await ingress.run(services, scale)
    await worker_processes(services, scale)
    if inbound_only:
        return
    await schedule_phase(services, scale)
    await webhooks.run(services, scale)
    await sends.run(services, scale)
    if skip_timers:
        return
    await restart(services, int(1_000_000 * scale))

    await timer_phase(services, scale)


async def timer_phase(services: Services, scale: float) -> None:
    """Worker memory per timer, and n close timers due within one minute (firing lateness)."""
    print("\n== timers ==", flush=True)
    for n in (100_000, 1_000_000):
        with_keys, wheel_only = timers.memory_per_timer(n)
        row(
            f"worker memory per active timer @{n:,} (table + wheel + keys)",
            f"{with_keys:,.0f} B",
            f"(wheel alone, keys excluded: {wheel_only:.0f} B; BullMQ: 430-870 B/job in Redis)",
        )
    n_fire = int(100_000 * scale)
    idle_s = 120
    tdep = Deployment(services, extra_env={"PARLEY_TIMEOUT_IDLE": str(idle_s)})
    await tdep.create_database()
    tdep.start("worker")
    tdep.start("api")
    try:
        async with aiohttp.ClientSession() as http:
            await tdep.wait_ready(http)
        result = await timers.firing(tdep, "bench", n_fire, spread_s=60, idle_s=idle_s)
        lateness_ms = [v * 1000 for v in result.lateness]
        row(f"{n_fire:,} timers due within one minute: closes", f"{result.closes:,}")
        row(
            "  firing lateness (fired - due)",
            f"p50 {pct(lateness_ms, 50):.1f} ms, p99 {pct(lateness_ms, 99):.1f} ms, "
            f"max {max(lateness_ms):.1f} ms",
            "(BullMQ: p99 107 ms, max 134-303 ms)",
        )
        row(
            "  early firings / duplicate firings",
            f"{result.early} / {result.duplicates}",
            f"({result.timer_events:,} timer events on the topic)",
        )
        row("  close events into Postgres", f"{result.close_rate:,.0f} /s")
        row("  fire-to-row latency", summary_ms(result.fire_to_row))
    finally:
        tdep.stop_all()


async def projection(services: Services) -> None:
    """The projection alone (Postgres, no Kafka): batch cost by size, and a poison batch."""
    print("\n== projection: one batch applied all or nothing (Postgres only) ==", flush=True)
    per_event = await batches.per_event_by_batch_size(services.postgres_url, (10, 100, 1000, 10_000))
    for size, us in per_event.items():
        row(f"apply a batch of {size:,} messages (open conversations)", f"{us:,.0f} us/event")
    spread = max(per_event.values()) / min(per_event.values())
    row("  largest / smallest per-event cost", f"{spread:.2f}x", "(linear batches: flat within 2x)")
    enc = await batches.encoding(services.postgres_url)
    for name, (cpu_us, wall_us) in enc.items():
        row(
            f"insert 1,000 nine-column rows, {name} parameters",
            f"{cpu_us:.2f} us CPU, {wall_us:.2f} us wall per row",
            "(the batched statements take JSON: streams/jsonrows.py)" if name == "json" else "",
        )
    clean, bisect, before = await batches.poison_cost(services.postgres_url)
    row("a batch of 1,000, clean", f"{clean * 1000:,.0f} ms")
    row(
        "  with one poison event, bisected (today)",
        f"{bisect * 1000:,.0f} ms",
        f"= {bisect / clean:.1f}x clean",
    )
    row(
        "  with one poison event, event by event (before)",
        f"{before * 1000:,.0f} ms",
        f"= {before / clean:.1f}x clean",
    )


async def schedule_phase(services: Services, scale: float) -> None:
    """Schedules through the API: create, change, fire."""
    print("\n== schedules (API -> Kafka -> worker -> Postgres -> outgoing-events) ==", flush=True)
    dep = Deployment(services)
    await dep.create_database()
    dep.start("worker")
    dep.start("api")
    try:
        async with aiohttp.ClientSession() as http:
            await dep.wait_ready(http)
            n = int(20_000 * scale)
            keys = [f"b:{i}" for i in range(n)]
            later = datetime.now(UTC) + timedelta(hours=1)
            rate = await schedules.create(http, dep, keys, [later] * n)
            row(
                f"created through the batch route ({n:,}, 1,000/request, 4 at once)",
                f"{rate:,.0f} /s",
                "(target 20,000/s; BullMQ addBulk here: 14-16k/s)",
            )
            m = int(5_000 * scale)
            changes, lat = await schedules.change(http, dep, keys[:m])
            row(f"rescheduled + cancelled ({m:,}, 64 in flight)", f"{changes:,.0f} /s", "(target 5,000/s)")
            row("  answer latency", summary_ms(lat))
            f = int(100_000 * scale)
            result = await schedules.firing(http, dep, f, rate)
            fire_ms = [v * 1000 for v in result["fire"]]
            pub_ms = [v * 1000 for v in result["publish"]]
            row(
                f"{f:,} schedules due within one minute: fired",
                f"{len(fire_ms):,}",
                f"(all created before the first was due: {result['created_before_due']})",
            )
            row(
                "  firing lateness (fired_at - run_at)",
                f"p50 {pct(fire_ms, 50):.0f} ms, p99 {pct(fire_ms, 99):.0f} ms, max {max(fire_ms):.0f} ms",
                "(target p99 100, max 250; BullMQ p99 107 ms)",
            )
            row(
                "  published on outgoing-events (published_at - run_at)",
                f"p50 {pct(pub_ms, 50):.0f} ms, p99 {pct(pub_ms, 99):.0f} ms, max {max(pub_ms):.0f} ms",
            )
            relay_ms = [1000 * x for x in result["relay"]]
            row(
                "  of which the relay (published_at - fired_at)",
                f"p50 {pct(relay_ms, 50):.0f} ms, p99 {pct(relay_ms, 99):.0f} ms, max {max(relay_ms):.0f} ms",
            )
            row("  early / fired twice", f"{result['early']} / {result['duplicates']}")
    finally:
        dep.stop_all()


async def restart(services: Services, n: int) -> None:
    """A worker's time to hold n pending actions (from Postgres alone, and after a restart) and
    its memory per pending action, for due times spread over days and for all within the horizon."""
    print("\n== scheduled actions: worker recovery and memory ==", flush=True)
    for case in (recovery.SPREAD, recovery.DENSE):
        result = await recovery.recovery(services, n, case)
        print(f"  {n:,} pending, {case.describe()}", flush=True)
        row("  held in memory once loaded", f"{result.held:,}")
        row("  hold them, from Postgres alone", f"{result.first_s:,.1f} s")
        row("  hold them after a restart", f"{result.again_s:,.1f} s", "(target: <= 30 s at 1M)")
        row(
            "  worker RSS, nothing pending -> holding them",
            f"{result.empty_mb:,.0f} -> {result.holding_mb:,.0f} MB",
            f"= {result.bytes_per_action:,.0f} B per pending action (target 150 B at 1M)",
        )


def main() -> None:
    """Entry point."""
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every count (0.1 = quick)")
    parser.add_argument("--skip-timers", action="store_true", help="skip the timer-wheel micro-benchmark")
    parser.add_argument("--projection-only", action="store_true", help="only the Postgres projection phase")
    parser.add_argument("--recovery-only", action="store_true", help="only the worker recovery phase")
    parser.add_argument("--schedules-only", action="store_true", help="only the schedules phase")
    parser.add_argument("--timers-only", action="store_true", help="only the close timers phase")
    parser.add_argument("--webhooks-only", action="store_true", help="only the outgoing-webhooks phase")
    parser.add_argument("--sends-only", action="store_true", help="only the outbound-sends phase")
    parser.add_argument(
        "--scaling-only", action="store_true", help="only the 1, 2 and 4 worker processes phase"
    )
    parser.add_argument("--crash-only", action="store_true", help="only the worker's kill -9 phase")
    parser.add_argument(
        "--inbound-only",
        action="store_true",
        help="baselines, projection, worker, ingress, end to end (no schedules, webhooks, sends, timers)",
    )
    parser.add_argument(
        "--ingress-only",
        action="store_true",
        help="raw Kafka, then signed webhooks flat out and paced with 1 and 2 API processes, CPU per process",
    )
    parser.add_argument(
        "--noop-only", action="store_true", help="only the Faust no-op, per-event vs batch path, 3 rounds"
    )
    parser.add_argument(
        "--whatif-only",
        action="store_true",
        help="only the what-if simulation (pure, no services): events/s on a 1M-event synthetic log",
    )
    parser.add_argument(
        "--peers-only",
        action="store_true",
        help="only the seeds' design (BullMQ + Redis, Node) on its own Redis and Postgres",
    )
    parser.add_argument("--skip-peers", action="store_true", help="leave out the seeds' design (BullMQ)")
    args = parser.parse_args()
    if args.peers_only:
        peers.run(os.environ.get("DATABASE_URL") or None, args.scale)
        return
    if args.whatif_only:
        whatif.run(int(1_000_000 * args.scale))
        return
    only = [
        args.projection_only,
        args.recovery_only,
        args.schedules_only,
        args.webhooks_only,
        args.timers_only,
    ]
    more = [args.sends_only, args.noop_only, args.scaling_only, args.ingress_only, args.crash_only]
    if any(only) or any(more):
        with local_services("parley-bench-") as services:
            if args.projection_only:
                asyncio.run(projection(services))
            if args.recovery_only:
                asyncio.run(restart(services, int(1_000_000 * args.scale)))
            if args.schedules_only:
                asyncio.run(schedule_phase(services, args.scale))
            if args.timers_only:
                asyncio.run(timer_phase(services, args.scale))
            if args.webhooks_only:
                asyncio.run(webhooks.run(services, args.scale))
            if args.sends_only:
                asyncio.run(sends.run(services, args.scale))
            if args.noop_only:
                asyncio.run(noop_paths(services, args.scale))
            if args.scaling_only:
                asyncio.run(worker_processes(services, args.scale))
            if args.ingress_only:
                asyncio.run(ingress.run(services, args.scale))
            if args.crash_only:
                asyncio.run(crash_phase(services, args.scale))
        return
    with local_services("parley-bench-") as services:
        print(
            f"services: Kafka {services.bootstrap}, Postgres {services.postgres_url}; "
            f"logs in {os.environ['PARLEY_TEST_LOGS']}",
            flush=True,
        )
        asyncio.run(run(services, args.scale, args.skip_timers, args.inbound_only))
        if not (args.inbound_only or args.skip_peers):
            peers.run(services.postgres_url, args.scale)
    if not (args.skip_timers or args.inbound_only):
        print("\n== timer wheel (pure, in-process) ==", flush=True)
        from bench import bench_timer_wheel

        bench_timer_wheel.main()
    whatif.run(int(1_000_000 * args.scale))


if __name__ == "__main__":
    main()
