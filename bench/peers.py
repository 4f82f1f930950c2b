"""The seeds' design, measured on this machine beside Parley: BullMQ (bench/peers/seeds.js, Node) on
a Redis server of its own, writing to the same kind of Postgres.

Redis is Debian's `redis-server` (the Makefile installs it), started on loopback on a free port, in
its own temp dir, with a random password given on stdin, `save ""` and `appendonly no` (no
persistence: the figures are BullMQ's best case), and stopped at the end. Postgres is the project's
own (`LocalPostgres`), or the one the rest of `make bench` uses. `npm ci` runs once when
bench/peers/node_modules is missing.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.stats import row
from parley.localstack import LocalPostgres, StackError, die_with_parent, free_port, stop, wait_port

PEERS = Path(__file__).resolve().parent / "peers"

# Measured here for BullMQ 6.7 + Redis 7.0 before this phase existed (the figures).
REFERENCE = {
    "adds": "14-16k /s",
    "reschedules": "4.2-6.5k /s",
    "bytes": "423-889 B",
    "firing": "p99 107 ms, max 134-303 ms",
}


@dataclass
class PeerFigures:
    """What the seeds' design did, in the shape of Parley's figures (ms, per second, bytes)."""

    inbound_msg_per_s: float
    add_to_row_p50_ms: float  # at the highest offered rate the phase ran
    add_to_row_p99_ms: float
    adds_per_s: float
    reschedules_per_s: float
    fire_p50_ms: float
    fire_p99_ms: float
    fire_max_ms: float
    bytes_per_delayed_job: float
    lost: int
    doubled: int
    early: int = 0
    fired_twice: int = 0
    closes: int = 0
    close_jobs_missing: int = 0
    recovered_s: float = 0.0  # kill -9 of the receive worker to its queue drained
    closes_lost: int = 0  # kill -9 of the close worker: conversations never closed
    raw: dict[str, Any] = field(default_factory=dict)

    def column(self) -> dict[str, str]:
        """The figures of the side-by-side table, printed, in its order (Parley's go beside)."""
        return {
            "inbound msg/s": f"{self.inbound_msg_per_s:,.0f}",
            "webhook-to-row p99 (queue.add-to-row, 1,000/s offered)": f"{self.add_to_row_p99_ms:,.1f} ms",
            "timer updates/s (reschedules: getJob + remove + add)": f"{self.reschedules_per_s:,.0f}",
            "timers added/s (addBulk)": f"{self.adds_per_s:,.0f}",
            "firing lateness p50 / p99 / max": (
                f"{self.fire_p50_ms:.0f} / {self.fire_p99_ms:.0f} / {self.fire_max_ms:.0f} ms"
            ),
            "memory per pending close (Redis used_memory)": f"{self.bytes_per_delayed_job:,.0f} B",
            "kill -9 of the worker: events lost / doubled": f"{self.lost} / {self.doubled}",
            "kill -9 of the close worker: closes lost": f"{self.closes_lost}",
        }


class LocalRedis:
    """Debian's redis-server on loopback: own dir, own port, a password, no persistence."""

    def __init__(self, data_dir: Path, port: int) -> None:
        self.dir = data_dir
        self.port = port
        self.password = secrets.token_urlsafe(24)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """redis:// URL, password included: pass it on in the environment, never print it."""
        return f"redis://:{self.password}@127.0.0.1:{self.port}"

    def start(self, timeout: float = 20) -> None:
        """Launch it (config on stdin, so the password is on no command line) and wait for it."""
        server = shutil.which("redis-server")
        if server is None:
            raise StackError("redis-server is not installed: `make bench-peers` installs Debian's")
        self.dir.mkdir(parents=True, exist_ok=True)
        config = "\n".join(
            [
                "bind 127.0.0.1",
                f"port {self.port}",
                f"dir {self.dir}",
                f"requirepass {self.password}",
                'save ""',
                "appendonly no",
                "maxmemory-policy noeviction",  # BullMQ requires it (Redis' default)
                "daemonize no",
                f"logfile {self.dir / 'redis.log'}",
            ]
        )
        with (self.dir / "redis.out").open("ab") as out:
            self.proc = subprocess.Popen(
                [server, "-"],
                stdin=subprocess.PIPE,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die_with_parent,
            )
        assert self.proc.stdin is not None
        self.proc.stdin.write(config.encode() + b"\n")
        self.proc.stdin.close()
        wait_port(self.port, self.proc, "Redis", timeout, self.dir / "redis.log")

    def stop(self) -> None:
        """SIGTERM (nothing to save), then gone."""
        stop(self.proc)


def ensure_node_modules() -> None:
    """`npm ci` from the committed lock file, once (node_modules is git-ignored)."""
    if not (PEERS / "node_modules" / "bullmq").is_dir():
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=PEERS, check=True)


@contextmanager
def peer_services(postgres_url: str | None) -> Iterator[tuple[str, str, Path]]:
    """Redis (always its own) and Postgres (the given maintenance DSN, else a fresh local one):
    (redis url, postgres url, log dir). Data deleted at the end, logs kept."""
    root = Path(tempfile.mkdtemp(prefix="parley-peers-"))
    redis = LocalRedis(root / "redis", free_port())
    pg: LocalPostgres | None = None
    try:
        redis.start()
        if postgres_url is None:
            pg = LocalPostgres(root / "postgres", free_port())
            pg.start()
            postgres_url = pg.url
        yield redis.url, postgres_url, root
    finally:
        redis.stop()
        if pg is not None:
            pg.stop()
        shutil.rmtree(root / "postgres", ignore_errors=True)
        for dump in (root / "redis").glob("*.rdb"):
            dump.unlink()


def node(phase: str, env: dict[str, str], log: Path, **options: object) -> dict[str, Any]:
    """One phase of seeds.js; its JSON result (the last line it prints)."""
    argv = ["node", str(PEERS / "seeds.js"), phase]
    for key, value in options.items():
        argv += [f"--{key}", str(value)]
    with log.open("ab") as err:
        done = subprocess.run(argv, cwd=PEERS, env=env, stdout=subprocess.PIPE, stderr=err, check=False)
    lines = done.stdout.decode().strip().splitlines()
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"seeds.js {phase} failed ({done.returncode}); see {log}")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def run(postgres_url: str | None, scale: float) -> PeerFigures:
    """Every phase of the seeds' design, printed as measured, with the reference figures beside."""
    ensure_node_modules()
    n_events = max(1000, int(100_000 * scale))
    n_timers = max(1000, int(100_000 * scale))
    n_crash = max(1000, int(20_000 * scale))
    print(
        "\n== the seeds' design: BullMQ 6.7 (Node) + Redis 7 (no persistence) + the same Postgres ==",
        flush=True,
    )
    with peer_services(postgres_url) as (redis_url, pg_url, root):
        env = {**os.environ, "PEERS_REDIS_URL": redis_url, "PEERS_PG_URL": pg_url}
        log = root / "seeds.log"
        load = os.getloadavg()
        print(f"  (logs: {log}; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f})", flush=True)
        node("setup", env, log)
        try:
            inbound = node("inbound", env, log, events=n_events, threads=2000, rates="200,1000", scale=scale)
            row(
                f"inbound backlog into Postgres ({n_events:,} events, 2,000 threads)",
                f"{inbound['msg_per_s']:,.0f} msg/s",
                f"(receive worker concurrency {inbound['concurrency']}; "
                f"{inbound['failed_attempts']:,} failed attempts, {inbound['failed_jobs']} jobs failed)",
            )
            for rate, lat in inbound["latency"].items():
                row(
                    f"  queue.add-to-row at {int(rate):,}/s offered ({lat['events']:,})",
                    f"p50 {lat['p50']:.1f} ms, p99 {lat['p99']:.1f} ms",
                    f"max {lat['max']:.1f} ms",
                )
            sched = node("schedule", env, log, jobs=n_timers, reschedules=max(1000, int(20_000 * scale)))
            row(
                f"delayed jobs added flat out ({n_timers:,}, addBulk by 1,000)",
                f"{sched['adds_per_s']:,.0f} /s",
                f"(reference {REFERENCE['adds']})",
            )
            row(
                f"  rescheduled: getJob+remove+add ({sched['reschedules']:,}, 64 at once)",
                f"{sched['reschedules_per_s']:,.0f} /s",
                f"(reference {REFERENCE['reschedules']})",
            )
            row(
                "  Redis used_memory per pending delayed job",
                f"{sched['bytes_per_job']:,.0f} B",
                f"(reference {REFERENCE['bytes']})",
            )
            fire = node("firing", env, log, timers=n_timers)
            late = fire["lateness_ms"]
            row(
                f"{n_timers:,} close jobs due within a minute: fired / closed",
                f"{fire['fired']:,} / {fire['closed_rows']:,}",
                f"(all added before the first was due: {fire['created_before_due']})",
            )
            row(
                "  firing lateness (processedOn - due), concurrency 50",
                f"p50 {late['p50']:.0f} ms, p99 {late['p99']:.0f} ms, max {late['max']:.0f} ms",
                f"(reference {REFERENCE['firing']})",
            )
            f2r = fire["fire_to_row_ms"]
            row(
                "  due-to-closed-row",
                f"p50 {f2r['p50']:.0f} ms, p99 {f2r['p99']:.0f} ms, max {f2r['max']:.0f} ms",
            )
            row(
                "  early / fired twice / fired but not closed",
                f"{fire['early']} / {fire['doubles']} / {fire['refused']}",
                f"(close jobs of conversations left open: {fire.get('open_jobs', {})})",
            )
            crash = node("crash", env, log, events=n_crash, threads=2000, kill_at=0.4)
            row(
                f"kill -9 of the receive worker at 40% ({n_crash:,} events)",
                f"lost {crash['lost']}, doubled {crash['doubled']}",
                f"({crash['rows_at_kill']:,} rows at the kill; drained {crash['recovered_s']:.1f} s after)",
            )
            row(
                "  conversations left without a pending close job",
                f"{crash['close_jobs_missing']} of {crash['conversations']:,}",
                f"({crash['failed_jobs']} receive jobs failed for good)",
            )
            kill = node("firing", env, log, timers=n_crash, spread_ms=20_000, kill_at=0.4)
            kl = kill["close_lateness_ms"]
            lost_where = kill.get("lost_jobs", {})
            row(
                f"kill -9 of the close worker at 40% ({n_crash:,} due within 20 s)",
                f"closes lost {kill['lost']}, run twice {kill['refired']}",
                f"({kill['closed_at_kill']:,} closed at the kill; all {kill['recovered_s']:.1f} s after)",
            )
            if kill["lost"]:
                row("  where the lost closes' jobs are", f"{lost_where}")
            row(
                "  due-to-closed-row, kill included",
                f"p50 {kl['p50']:.0f} ms, p99 {kl['p99']:,.0f} ms, max {kl['max']:,.0f} ms",
            )
        finally:
            node("drop", env, log)
        load_end = os.getloadavg()
        print(
            f"  (load average at the end {load_end[0]:.2f} {load_end[1]:.2f} {load_end[2]:.2f})", flush=True
        )
    top = max(inbound["latency"], key=int)
    figures = PeerFigures(
        inbound_msg_per_s=inbound["msg_per_s"],
        add_to_row_p50_ms=inbound["latency"][top]["p50"],
        add_to_row_p99_ms=inbound["latency"][top]["p99"],
        adds_per_s=sched["adds_per_s"],
        reschedules_per_s=sched["reschedules_per_s"],
        fire_p50_ms=late["p50"],
        fire_p99_ms=late["p99"],
        fire_max_ms=late["max"],
        bytes_per_delayed_job=sched["bytes_per_job"],
        lost=crash["lost"],
        doubled=crash["doubled"],
        early=fire["early"],
        fired_twice=fire["doubles"],
        closes=fire["closed_rows"],
        close_jobs_missing=crash["close_jobs_missing"],
        recovered_s=crash["recovered_s"],
        closes_lost=kill["lost"],
        raw={
            "inbound": inbound,
            "schedule": sched,
            "firing": fire,
            "crash": crash,
            "close_crash": kill,
            "load": [load, load_end],
        },
    )
    print("\n  the seeds' design, for the side-by-side table:", flush=True)
    for name, value in figures.column().items():
        row(f"  {name}", value)
    return figures
