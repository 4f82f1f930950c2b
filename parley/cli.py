"""`parley`: run the whole local stack, or each part as its own process."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request

from streams.settings import Settings

log = logging.getLogger("parley")


def _logging(settings: Settings) -> None:
    logging.basicConfig(
        level=settings.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


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
    log.info("schema ready (%d migration(s) applied), topics ready", len(applied))


def cmd_migrate(settings: Settings) -> int:
    """Apply migrations and create topics, then exit."""
    asyncio.run(_prepare(settings))
    return 0


def cmd_api(settings: Settings) -> int:
    """Serve webhooks, the admin API and the dashboard."""
    import uvloop
    from aiohttp import web

    from api.app import create_app

    if not settings.admin_token:
        log.error("PARLEY_ADMIN_TOKEN is not set; the admin API would be unusable")
        return 2
    uvloop.install()
    web.run_app(
        create_app(settings), host=settings.http_host, port=settings.http_port, print=None, access_log=None
    )
    return 0


def cmd_worker(settings: Settings) -> int:
    """Run the Faust worker (lifecycle agent)."""
    import faust
    import uvloop

    from agents.app import create_app

    asyncio.run(_prepare(settings))
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    uvloop.install()  # the worker is event-loop bound: uvloop's cheaper tasks and I/O pay off
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    app, _ = create_app(settings)
    worker = faust.Worker(app, loop=loop, loglevel=settings.log_level, quiet=True)
    worker.execute_from_commandline()
    return 0


def _admin_token(settings: Settings) -> str:
    path = settings.data_dir / "admin-token"
    if not path.exists():
        path.write_text(secrets.token_urlsafe(24))
        path.chmod(0o600)
    return path.read_text().strip()


def _wait_ready(url: str, procs: list[subprocess.Popen[bytes]], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"{p.args!r} exited with {p.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:  # noqa: S310 - our own loopback URL
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)  # polling an HTTP endpoint: there is nothing to await across processes
    raise RuntimeError(f"{url} not ready within {timeout}s")


def cmd_run(settings: Settings) -> int:
    """Start broker, Postgres, worker and API on embedded defaults; Ctrl-C stops them all."""
    from parley.localstack import KafkaBroker, LocalPostgres, die_with_parent, stop

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    services: list[KafkaBroker | LocalPostgres] = []
    children: list[subprocess.Popen[bytes]] = []
    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        if not settings.database_url:
            pg = LocalPostgres(settings.data_dir.resolve() / "postgres", settings.postgres_port)
            print(f"starting PostgreSQL on 127.0.0.1:{pg.port} ...", flush=True)
            pg.start()
            services.append(pg)
            env["DATABASE_URL"] = pg.url
        if not settings.kafka_bootstrap_servers:
            kafka = KafkaBroker(settings.data_dir.resolve() / "kafka", settings.kafka_port)
            print(f"starting Kafka on {kafka.bootstrap} ...", flush=True)
            kafka.start()
            services.append(kafka)
            env["KAFKA_BOOTSTRAP_SERVERS"] = kafka.bootstrap
        env.setdefault("PARLEY_ADMIN_TOKEN", settings.admin_token or _admin_token(settings))
        child_settings = Settings(
            DATABASE_URL=env["DATABASE_URL"], KAFKA_BOOTSTRAP_SERVERS=env["KAFKA_BOOTSTRAP_SERVERS"]
        )
        asyncio.run(_prepare(child_settings))
        exe = [sys.executable, "-m", "parley.cli"]
        for part in ("worker", "api"):
            # die_with_parent: even if `parley run` is killed -9, its children follow it.
            children.append(subprocess.Popen([*exe, part], env=env, preexec_fn=die_with_parent))
        base = f"http://{settings.http_host}:{settings.http_port}"
        _wait_ready(f"{base}/readyz", children, timeout=120)
        print(
            f"\nParley is ready.\n  dashboard:  {base}/#token={env['PARLEY_ADMIN_TOKEN']}\n"
            f"  admin API:  {base}/v1/conversations"
            f"  (Authorization: Bearer {env['PARLEY_ADMIN_TOKEN']})\n"
            f"  webhooks:   {base}/webhooks/generic/<channel_id>\n"
            f"  health:     {base}/healthz  {base}/readyz\n"
            f"  Kafka:      {env['KAFKA_BOOTSTRAP_SERVERS']}\n  Postgres:   {env['DATABASE_URL']}\n"
            "Ctrl-C stops everything.",
            flush=True,
        )
        while all(c.poll() is None for c in children):
            time.sleep(0.5)  # supervising children: wake up to notice one died
        log.error("a child exited; stopping the stack")
        return 1
    except KeyboardInterrupt:
        print("\nstopping ...", flush=True)
        return 0
    finally:
        for child in reversed(children):
            stop(child, signal.SIGTERM)
        for service in reversed(services):
            service.stop()
        if stopping:
            print("stopped.", flush=True)


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


COMMANDS = {"run": cmd_run, "worker": cmd_worker, "api": cmd_api, "migrate": cmd_migrate}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `parley` console script."""
    parser = argparse.ArgumentParser(prog="parley", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="start Kafka, Postgres, worker and API locally")
    sub.add_parser("worker", help="run the Faust worker")
    sub.add_parser("api", help="serve webhooks, admin API and dashboard")
    sub.add_parser("migrate", help="apply SQL migrations and create topics")
    rp = sub.add_parser("replay", help="re-project Postgres from the retained topic")
    rp.add_argument("--since", help="ISO-8601 time with timezone; default: from the beginning")
    rp.add_argument("--conversation", help="rebuild only this conversation's thread")
    rp.add_argument("--dry-run", action="store_true", help="print what would be deleted and re-applied")
    args = parser.parse_args(argv)
    settings = Settings()
    _logging(settings)
    if args.command == "replay":
        return cmd_replay(settings, args.since, args.conversation, args.dry_run)
    return COMMANDS[args.command](settings)


if __name__ == "__main__":
    sys.exit(main())
