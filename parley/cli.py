"""`parley`: run the whole local stack, or each part as its own process."""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from streams.channel_secrets import Sealer, SecretsKeyError
from streams.settings import Settings

if TYPE_CHECKING:
    from parley.localstack import KafkaBroker, LocalPostgres

log = logging.getLogger("parley")


def _logging(settings: Settings) -> None:
    from parley.logs import configure

    configure(settings.log_level, settings.log_format)


async def _prepare(settings: Settings) -> None:
    """Apply migrations and create topics (idempotent; every entry point does it)."""
    from streams.schema import create_pool, migrate
    from streams.topics import ensure_topics

    pool = await create_pool(settings.database_url, 1)
    try:
        applied = await migrate(pool)
    finally:
        await pool.close()
    await ensure_topics(settings)
    # Every process does this at start: only a migration applied is news at INFO.
    log.log(
        logging.INFO if applied else logging.DEBUG,
        "schema ready (%d migration(s) applied), topics ready",
        len(applied),
    )


def cmd_migrate(settings: Settings) -> int:
    """Apply migrations and create topics, then exit."""
    asyncio.run(_prepare(settings))
    return 0


# The cyclic garbage collector's thresholds for the worker and API processes. CPython's default
# (700, 10, 10) runs a young collection per 700 net new container objects: at a few thousand
# events a second the worker ran 4,170 young, 379 middle and 33 full collections in one schedules
# bench phase (2.7 s of CPU), the full ones 50-63 ms each, and a timer due during one fires that
# much late. At 20,000 the same phase ran 26 young, 1 middle and no full collection (0.19 s):
# almost everything dies by reference counting before a collection sees it, so far less is
# promoted to the old generations that a full collection has to walk.
GC_THRESHOLD = (20_000, 20, 10)


def tune_gc() -> None:
    """Set GC_THRESHOLD for this process (a long-running worker or API process)."""
    gc.set_threshold(*GC_THRESHOLD)


def cmd_api(settings: Settings, processes: int | None = None, child: int | None = None) -> int:
    """Serve webhooks, the admin API and the operator console: in this process, or (N > 1) in N
    child processes on one port (SO_REUSEPORT) under this one, which supervises them."""
    import uvloop
    from aiohttp import web

    from api.app import create_app

    if not settings.admin_token:
        log.error("PARLEY_ADMIN_TOKEN is not set; the admin API would be unusable")
        return 2
    if not _sealer(settings):
        return 2
    n = processes if processes is not None else settings.api_processes
    if child is None and n > 1:
        return _api_parent(settings, n)
    uvloop.install()
    tune_gc()
    web.run_app(
        create_app(settings),
        host=settings.http_host,
        port=settings.http_port,
        print=None,
        access_log=None,
        # A child of `parley api --processes N`: the kernel spreads connections over the N
        # listening sockets (by hash of the connection's addresses; a connection stays with one).
        reuse_port=child is not None,
    )
    return 0


def _port_free(host: str, port: int) -> bool:
    """Nobody listens on host:port (bound without SO_REUSEPORT, so any listener is found: the
    children's SO_REUSEPORT would otherwise share the port with a stray `parley api` of the same
    user instead of failing)."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            log.error("cannot listen on %s:%d: %s", host, port, exc)
            return False
    return True


def _api_parent(settings: Settings, n: int) -> int:
    """`parley api --processes N`: start N API children on one port, forward SIGTERM/SIGINT/SIGHUP
    (one SIGTERM each), and if a child exits on its own stop the others and exit 1, like `parley
    run`: the orchestrator restarts the whole, rather than the port serving on fewer processes
    than asked for without anyone noticing. Each child has its own Kafka producer, Postgres pool,
    channel cache (NOTIFY) and /metrics."""
    from parley.localstack import die_with_parent

    if not _port_free(settings.http_host, settings.http_port):
        return 2
    children: list[tuple[str, subprocess.Popen[bytes]]] = []
    outcome: dict[str, str] = {}

    _trap_stop_signals()
    code = 1
    try:
        for i in range(n):
            # Own session: a terminal's Ctrl-C reaches this parent alone, which passes it on once.
            proc = subprocess.Popen(
                [sys.executable, "-m", "parley.cli", "api", "--child", str(i)],
                start_new_session=True,
                preexec_fn=die_with_parent,
            )
            children.append((f"api-{i}", proc))
        log.info(
            "api: %d processes on %s:%d (pids %s)",
            n,
            settings.http_host,
            settings.http_port,
            ", ".join(str(p.pid) for _, p in children),
        )
        outcome["failure"] = _supervise(children, "the other API processes")
    except _Stop as stop:
        outcome["stopped_by"] = stop.name
        code = 0
    finally:
        # A child our SIGTERM reached before it set its handlers (still importing) died of it, 0
        # otherwise: it had served nothing yet, so that is a clean stop too.
        stopped = {name: {0, -signal.SIGTERM} for name, _ in children}
        clean = _stop_stack([], children, outcome, title="parley api", announce=False, clean_exit=stopped)
    return code if clean else 1


def cmd_worker(settings: Settings) -> int:
    """Run the Faust worker (lifecycle agent)."""
    import faust
    import uvloop

    from agents.app import create_app

    asyncio.run(_prepare(settings))
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    uvloop.install()  # the worker is event-loop bound: uvloop's cheaper tasks and I/O pay off
    tune_gc()
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    app, lifecycle = create_app(settings)
    # override_logging=False: the worker keeps Parley's handler (parley/logs.py: text or JSON, and
    # Faust's start-up tables at DEBUG) instead of Faust's own.
    worker = faust.Worker(app, loop=loop, loglevel=settings.log_level, quiet=True, override_logging=False)
    # Faust's terminal spinner sets the root logger to DEBUG (to spin on every record) whenever the
    # level is WARNING or above: every debug call in Faust and aiokafka then builds a LogRecord,
    # 13% of the worker's CPU in a profile. A service has no terminal to spin on.
    worker.spinner = None
    try:
        worker.execute_from_commandline()
    except SystemExit as exit_:
        if exit_.code not in (0, None):
            raise
    if app._stopped.is_set():
        log.info("worker stopped: Faust app stopped (offsets committed, producer flushed)")
    # A worker stopped because its writer died must not look like a clean stop to its supervisor.
    return 1 if lifecycle.failure is not None else 0


def _sealer(settings: Settings) -> Sealer | None:
    try:
        return Sealer(settings.secrets_key)
    except SecretsKeyError as exc:
        log.error("%s", exc)
        return None


def cmd_rotate_secrets(settings: Settings) -> int:
    """Seal channel secrets still in clear and re-encrypt all under the first PARLEY_SECRETS_KEY."""
    sealer = _sealer(settings)
    if sealer is None:
        return 2
    from_clear, resealed, endpoints = asyncio.run(_reseal(settings.database_url, sealer))
    print(
        f"rotate-secrets: {from_clear} channel(s) sealed from clear, {resealed} re-encrypted;"
        f" {endpoints} webhook endpoint(s) re-encrypted",
        flush=True,
    )
    return 0


async def _reseal(database_url: str, sealer: Sealer) -> tuple[int, int, int]:
    from streams.schema import create_pool, migrate
    from streams.store import Store
    from streams.webhooks_db import reseal_endpoints

    pool = await create_pool(database_url, 1)
    try:
        await migrate(pool)
        from_clear, resealed = await Store(pool, sealer).reseal_channels()
        async with pool.acquire() as conn:
            return from_clear, resealed, await reseal_endpoints(conn, sealer)
    finally:
        await pool.close()


def cmd_gen_secrets_key(settings: Settings) -> int:
    """Print a new key for PARLEY_SECRETS_KEY."""
    print(Sealer.generate_key())
    return 0


def _wait_ready(
    url: str,
    procs: list[subprocess.Popen[bytes]],
    timeout: float,
    ok: Callable[[bytes], bool] = lambda _body: True,
) -> None:
    """Until url answers 200 with a body ok() accepts; fail if a child exits meanwhile."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"{p.args!r} exited with {p.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:  # noqa: S310 - our own loopback URL
                if resp.status == 200 and ok(resp.read()):
                    return
        except OSError:
            pass
        time.sleep(0.5)  # polling an HTTP endpoint: there is nothing to await across processes
    raise RuntimeError(f"{url} not ready within {timeout}s")


def _worker_loaded(metrics: bytes) -> bool:
    """The worker's /metrics say it holds partitions and its scheduler has loaded their timers:
    its start-up lines are written, so the ready banner comes after them."""
    from parley.status import parse_metrics

    values = parse_metrics(metrics.decode(errors="replace"))
    return (
        values.get("parley_partitions_assigned", 0) > 0
        and values.get("parley_timers_loaded_until_seconds", 0) > 0
    )


SANDBOX_CHANNEL = "sandbox"


def _sandbox_number(data: Path) -> dict[str, str]:
    """The sandbox's fake WhatsApp number (made once, kept in .parley/sandbox.json, 0600)."""
    from parley.localstack import secret_file

    def make() -> str:
        phone = str(secrets.randbelow(9 * 10**14) + 10**14)
        return json.dumps(
            {"phone_number_id": phone, "token": secrets.token_hex(16), "app_secret": secrets.token_hex(16)}
        )

    return dict(json.loads(secret_file(data / "sandbox.json", make)))


def _register_sandbox(base: str, token: str, number: dict[str, str], simulator: str) -> None:
    """Register (or point again) the sandbox channel at the simulator."""
    body = {
        "id": SANDBOX_CHANNEL,
        "provider": "whatsapp",
        "phone_number_id": number["phone_number_id"],
        "app_secret": number["app_secret"],
        "verify_token": "sandbox-verify-token",
        "access_token": number["token"],
        "graph_base": simulator,
    }
    request = urllib.request.Request(  # noqa: S310 - our own loopback URL
        f"{base}/v1/channels",
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=10):  # noqa: S310 - our own loopback URL
            pass
    except urllib.error.HTTPError as exc:
        if exc.code != 409:  # registered by an earlier sandbox run: same number, same simulator port
            raise


def cmd_sandbox(settings: Settings) -> int:
    """`parley run` plus the provider simulator and a `sandbox` WhatsApp channel sending to it."""
    return cmd_run(settings, sandbox=True)


# How each part of `parley run` exits when it stopped cleanly after our signal: Kafka's JVM runs
# its shutdown hooks on SIGTERM (a controlled shutdown) and then exits 128+15.
CLEAN_EXIT = {"Kafka": {0, 143}}
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class _Stop(BaseException):
    """A stop signal reached `parley run` (BaseException: no `except Exception` swallows it)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.name = signal.Signals(signum).name


def _trap_stop_signals() -> None:
    """SIGINT, SIGTERM and SIGHUP raise _Stop in the main thread, wherever it waits."""

    def on_signal(signum: int, _frame: object) -> None:
        raise _Stop(signum)

    for sig in STOP_SIGNALS:
        signal.signal(sig, on_signal)


def cmd_run(settings: Settings, sandbox: bool = False) -> int:
    """Start broker, Postgres, worker and API on embedded defaults; Ctrl-C stops them all.

    The worker and the API run in their own sessions, so a terminal's Ctrl-C (SIGINT to the
    foreground process group) reaches `parley run` alone, which then sends each child exactly one
    SIGTERM and reports how they exited in one line. SIGINT, SIGTERM (a container's stop) and SIGHUP
    (the terminal closed) all stop the same way: exit code 0 when every part stopped cleanly.
    """
    services: list[tuple[str, KafkaBroker | LocalPostgres]] = []
    children: list[tuple[str, subprocess.Popen[bytes]]] = []
    outcome: dict[str, str] = {}

    _trap_stop_signals()
    code = 1
    try:
        code = _run_stack(settings, sandbox, services, children, outcome)
    finally:
        clean = _stop_stack(services, children, outcome)
    return code if clean else 1


def _run_stack(
    settings: Settings,
    sandbox: bool,
    services: list[tuple[str, KafkaBroker | LocalPostgres]],
    children: list[tuple[str, subprocess.Popen[bytes]]],
    outcome: dict[str, str],
) -> int:
    """Start everything, print the banner, supervise until a stop signal (0) or a child's exit (1)."""
    from parley.localstack import KafkaBroker, LocalPostgres, die_with_parent, redact_dsn, secret_file

    data = settings.data_dir.resolve()
    data.mkdir(mode=0o700, parents=True, exist_ok=True)
    env = dict(os.environ)
    try:
        if not settings.database_url:
            pg = LocalPostgres(data / "postgres", settings.postgres_port)
            print(f"starting PostgreSQL on 127.0.0.1:{pg.port} ...", flush=True)
            services.append(("Postgres", pg))  # before start(): a signal meanwhile still stops it
            pg.start()
            env["DATABASE_URL"] = pg.url
        if not settings.kafka_bootstrap_servers:
            kafka = KafkaBroker(data / "kafka", settings.kafka_port)
            print(f"starting Kafka on {kafka.bootstrap} ...", flush=True)
            services.append(("Kafka", kafka))
            kafka.start()
            env["KAFKA_BOOTSTRAP_SERVERS"] = kafka.bootstrap
        if not settings.admin_token:
            env["PARLEY_ADMIN_TOKEN"] = secret_file(data / "admin-token", lambda: secrets.token_urlsafe(24))
        if not settings.secrets_key:
            env["PARLEY_SECRETS_KEY"] = secret_file(data / "secrets-key", Sealer.generate_key)
        child_settings = Settings(
            DATABASE_URL=env["DATABASE_URL"],
            KAFKA_BOOTSTRAP_SERVERS=env["KAFKA_BOOTSTRAP_SERVERS"],
            secrets_key=env["PARLEY_SECRETS_KEY"],
        )
        asyncio.run(_prepare(child_settings))
        sealer = _sealer(child_settings)
        if sealer is None:
            return 2
        from_clear, _, _ = asyncio.run(_reseal(child_settings.database_url, sealer))
        if from_clear:
            print(f"sealed the secrets of {from_clear} channel(s) stored in clear", flush=True)
        exe = [sys.executable, "-m", "parley.cli"]
        base = f"http://{settings.http_host}:{settings.http_port}"
        simulator = f"http://127.0.0.1:{settings.sandbox_port}"
        if sandbox:  # the simulator is on loopback, over http: let the sender reach it
            env["PARLEY_OUTBOUND_ALLOW_HTTP"] = env["PARLEY_OUTBOUND_ALLOW_PRIVATE"] = "true"
            number = _sandbox_number(data)
            wa = f"{number['phone_number_id']}:{number['token']}:{number['app_secret']}"
            sim = [sys.executable, "-m", "sandbox.simulator", "--port", str(settings.sandbox_port)]
            proc = subprocess.Popen(
                [*sim, "--parley", base, "--whatsapp", wa],
                env=env,
                start_new_session=True,
                preexec_fn=die_with_parent,
            )
            children.append(("simulator", proc))
        for part in ("worker", "api"):
            # start_new_session: the terminal's Ctrl-C is for us alone (we pass it on, once);
            # die_with_parent: even if `parley run` is killed -9, its children follow it.
            proc = subprocess.Popen([*exe, part], env=env, start_new_session=True, preexec_fn=die_with_parent)
            children.append((part, proc))
        procs = [p for _, p in children]
        # The worker first: once it holds its partitions, the API's first readiness check finds
        # it ready (no "worker not ready" warning for a start-up that is going fine).
        metrics = f"http://{settings.http_host}:{settings.worker_metrics_port}/metrics"
        _wait_ready(metrics, procs, timeout=120, ok=_worker_loaded)
        _wait_ready(f"{base}/readyz", procs, timeout=120)
        if sandbox:
            _register_sandbox(base, env["PARLEY_ADMIN_TOKEN"], number, simulator)
            print(
                f"\nSandbox: channel '{SANDBOX_CHANNEL}' sends to the provider simulator at {simulator}"
                f" (stats: {simulator}/_sim/stats), which sends signed receipts back. Try:\n"
                f"  curl -s -X POST {base}/v1/channels/{SANDBOX_CHANNEL}/messages"
                f" -H 'Authorization: Bearer {env['PARLEY_ADMIN_TOKEN']}'"
                """ -d '{"to": "5511999990000", "type": "template","""
                """ "name": "hello_world", "language": "en_US"}'"""
                f"\n  curl -s {base}/v1/messages/<id> -H 'Authorization: Bearer {env['PARLEY_ADMIN_TOKEN']}'",
                flush=True,
            )
        print(
            f"\nParley is ready.\n  console:    {base}/#token={env['PARLEY_ADMIN_TOKEN']}\n"
            f"  admin API:  {base}/v1/conversations"
            f"  (Authorization: Bearer {env['PARLEY_ADMIN_TOKEN']})\n"
            f"  webhooks:   {base}/webhooks/generic/<channel_id>\n"
            f"  health:     {base}/healthz  {base}/readyz\n"
            f"  status:     parley status\n"
            f"  Kafka:      {env['KAFKA_BOOTSTRAP_SERVERS']}\n"
            f"  Postgres:   {redact_dsn(env['DATABASE_URL'])}\n"
            "Ctrl-C stops everything.",
            flush=True,
        )
        outcome["failure"] = _supervise(children, "the stack")
        return 1
    except _Stop as stop:
        outcome["stopped_by"] = stop.name
        return 0


def _supervise(children: list[tuple[str, subprocess.Popen[bytes]]], rest: str) -> str:
    """Until a child exits on its own (a stop signal raises _Stop meanwhile); log and name it."""
    while all(c.poll() is None for _, c in children):
        time.sleep(0.5)  # supervising children: wake up to notice one died
    dead = ", ".join(f"{name} (exit {c.returncode})" for name, c in children if c.poll() is not None)
    log.error("%s exited on its own; stopping %s", dead, rest)
    return dead


def _stop_stack(
    services: list[tuple[str, KafkaBroker | LocalPostgres]],
    children: list[tuple[str, subprocess.Popen[bytes]]],
    outcome: dict[str, str],
    title: str = "Parley",
    announce: bool = True,
    clean_exit: dict[str, set[int]] | None = None,
) -> bool:
    """Stop the children, then Kafka and Postgres; print one summary line; True if all stopped cleanly."""
    started = time.monotonic()
    if announce and "stopped_by" in outcome:
        print(f"\n{outcome['stopped_by']}: stopping ...", flush=True)
    # A second Ctrl-C while stopping must not cut the children's clean-up short.
    for sig in STOP_SIGNALS:
        signal.signal(sig, lambda *_: print("still stopping ...", flush=True))
    codes = _stop_children(children)
    for name, service in reversed(services):
        service.stop()
        if service.proc is not None:
            codes.append((name, service.proc.returncode))
    clean = {**CLEAN_EXIT, **(clean_exit or {})}
    ok = {name: code in clean.get(name, {0}) for name, code in codes}
    parts = ", ".join(f"{name} ok" if ok[name] else f"{name} exited with {code}" for name, code in codes)
    how = f"on {outcome['stopped_by']}" if "stopped_by" in outcome else "after a failure"
    elapsed = time.monotonic() - started
    print(f"{title} stopped {how} in {elapsed:.1f} s: {parts or 'nothing was running'}.", flush=True)
    return all(ok.values())


def _stop_children(
    children: list[tuple[str, subprocess.Popen[bytes]]], timeout: float = 30
) -> list[tuple[str, int | None]]:
    """One SIGTERM to each child still running, all at once, then wait; kill what does not stop.
    Returns each child's exit code (a negative one: killed by that signal)."""
    for _, child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    codes: list[tuple[str, int | None]] = []
    for name, child in children:
        try:
            code = child.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            code = child.wait()
            print(f"{name} (pid {child.pid}) did not stop within {timeout:.0f}s: killed", flush=True)
        codes.append((name, code))
    return codes


def cmd_replay(settings: Settings, since: str | None, conversation: str | None, dry_run: bool = False) -> int:
    """Re-project Postgres from the retained topic (see streams/replay.py)."""
    from datetime import datetime

    from streams.replay import ReplayRefused, replay

    start = datetime.fromisoformat(since) if since else None
    if start is not None and start.tzinfo is None:
        log.error("--since needs a timezone, e.g. 2026-11-22T10:00:00+00:00")
        return 2
    try:
        result = asyncio.run(replay(settings, since=start, conversation_id=conversation, dry_run=dry_run))
    except (ReplayRefused, LookupError) as exc:
        print(f"replay refused: {exc}", file=sys.stderr, flush=True)
        return 2
    if conversation is not None:
        verb = "would delete and rebuild" if dry_run else "deleted and rebuilt"
        print(f"replay: {verb} {len(result.deleted)} conversations: {', '.join(result.deleted)}", flush=True)
        print(
            f"replay: kept {len(result.kept)} older conversations (opened before the retained log):"
            f" {', '.join(result.kept) or '-'}",
            flush=True,
        )
    if dry_run:
        print(
            f"replay: dry run, nothing changed; {result.reapplied:,} events would be re-applied", flush=True
        )
        return 0
    print(
        f"replay: {result.read:,} events read, {result.applied:,} applied, "
        f"{result.duplicates:,} already applied, {result.undecodable:,} undecodable (dead-lettered)",
        flush=True,
    )
    return 0


def cmd_whatif(settings: Settings, args: argparse.Namespace) -> int:
    """Replay the retained log under the current and a changed policy (see streams/whatif.py)."""
    from datetime import UTC, datetime

    from domain.policy import parse_duration
    from streams.whatif import WhatIfError, parse_time, print_progress, render, whatif

    def json_progress(done: int, total: int) -> None:
        sys.stderr.write(json.dumps({"progress": {"done": done, "total": total}}) + "\n")
        sys.stderr.flush()

    try:
        now = datetime.now(UTC)
        since = parse_time(args.since, now)
        until = parse_time(args.until, now) if args.until else None
        within = parse_duration(args.reopened_within)
    except (WhatIfError, ValueError) as exc:
        print(f"whatif: {exc}", file=sys.stderr, flush=True)
        return 2
    progress = {"bar": print_progress, "json": json_progress, "none": lambda done, total: None}[args.progress]
    try:
        result = asyncio.run(
            whatif(
                settings,
                since=since,
                until=until,
                overrides=args.set,
                channels=args.channel,
                examples=args.examples,
                check=not args.no_check,
                reopened_within=within,
                progress=progress,
            )
        )
    except WhatIfError as exc:
        print(f"whatif: {exc}", file=sys.stderr, flush=True)
        return 2
    if args.json:
        print(json.dumps(result.to_dict(), indent=2), flush=True)
    else:
        print(render(result), flush=True)
    return 0


COMMANDS = {
    "run": cmd_run,
    "worker": cmd_worker,
    "api": cmd_api,
    "migrate": cmd_migrate,
    "rotate-secrets": cmd_rotate_secrets,
    "gen-secrets-key": cmd_gen_secrets_key,
    "sandbox": cmd_sandbox,
}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `parley` console script."""
    parser = argparse.ArgumentParser(prog="parley", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="start Kafka, Postgres, worker and API locally")
    sub.add_parser("sandbox", help="`run` plus a provider simulator and a sandbox channel to send through")
    sub.add_parser("worker", help="run the Faust worker")
    api = sub.add_parser("api", help="serve webhooks, admin API and operator console")
    api.add_argument(
        "--processes",
        type=int,
        default=None,
        metavar="N",
        help="N processes on one port (SO_REUSEPORT) under a supervising parent;"
        " default: PARLEY_API_PROCESSES (1)",
    )
    api.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)  # set by that parent
    sub.add_parser("migrate", help="apply SQL migrations and create topics")
    sub.add_parser(
        "rotate-secrets",
        help="seal channel secrets stored in clear and re-encrypt all under the first PARLEY_SECRETS_KEY",
    )
    sub.add_parser("gen-secrets-key", help="print a new key for PARLEY_SECRETS_KEY")
    st = sub.add_parser("status", help="readiness, consumer lag and counts of a running deployment")
    st.add_argument("--json", action="store_true", help="print the same as one JSON document")
    rp = sub.add_parser("replay", help="re-project Postgres from the retained topic")
    rp.add_argument("--since", help="ISO-8601 time with timezone; default: from the beginning")
    rp.add_argument("--conversation", help="rebuild only this conversation's thread")
    rp.add_argument("--dry-run", action="store_true", help="print what would be deleted and re-applied")
    wi = sub.add_parser(
        "whatif",
        help="replay the retained log under the current and a changed lifecycle policy; writes nothing",
    )
    wi.add_argument(
        "--since", required=True, help="ISO-8601 time with timezone, or a duration before now (P2D, PT6H)"
    )
    wi.add_argument("--until", help="end of the range (same forms); default: now")
    wi.add_argument("--channel", action="append", default=[], help="only this channel (repeatable)")
    wi.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a lifecycle setting of the changed policy, e.g. PARLEY_TIMEOUT_IDLE=PT24H (repeatable)",
    )
    wi.add_argument("--json", action="store_true", help="print the comparison as JSON")
    wi.add_argument("--examples", type=int, default=0, help="list N conversations whose outcome differs")
    wi.add_argument("--no-check", action="store_true", help="do not compare the current run with Postgres")
    wi.add_argument(
        "--reopened-within",
        default="PT24H",
        help="a user message this soon after an automatic close counts as reopened-after-close",
    )
    wi.add_argument("--progress", choices=("bar", "json", "none"), default="bar", help="progress on stderr")
    args = parser.parse_args(argv)
    settings = Settings()
    _logging(settings)
    if args.command == "status":
        from parley.status import cmd_status

        return cmd_status(settings, args.json)
    if args.command == "replay":
        return cmd_replay(settings, args.since, args.conversation, args.dry_run)
    if args.command == "whatif":
        return cmd_whatif(settings, args)
    if args.command == "api":
        if args.processes is not None and args.processes < 1:
            parser.error("--processes must be at least 1")
        return cmd_api(settings, args.processes, args.child)
    return COMMANDS[args.command](settings)


if __name__ == "__main__":
    sys.exit(main())
