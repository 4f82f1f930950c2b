"""Versioned SQL migrations, applied at start; schema_migrations records what ran."""

from __future__ import annotations

import logging
from importlib import resources

import asyncpg

log = logging.getLogger(__name__)

# Any constant works: it only has to be the same in every Parley process.
_MIGRATION_LOCK = 7_276_537_339


# For the group commits that update a handful of rows of a table by primary key (the sender's
# marks and outcomes, the webhook dispatcher's results), run first in their transaction. asyncpg
# prepares each statement once per connection; Postgres settles on a generic plan after five
# runs and keeps it until the table is next analyzed, and one made while the table was nearly
# empty scans it: the sender's mark of 8 rows took 0.40 ms at 1,000 rows, 2.68 ms at 41,000
# (measured; in `make bench` tables grow by tens of thousands of rows within a minute, faster
# than autovacuum analyzes them). A plan made for each execution sees the table's current size
# and probes the key index, for tens of microseconds of planning (tests/integration/
# test_send_plans.py). The lifecycle's batch statement is not run this way: planning it costs
# ~0.5 ms, and it is the worker's hottest path.
CUSTOM_PLAN = "SET LOCAL plan_cache_mode = force_custom_plan"


def _migrations() -> list[tuple[int, str, str]]:
    files = resources.files("streams").joinpath("migrations")
    found = []
    for entry in files.iterdir():
        if entry.name.endswith(".sql"):
            version = int(entry.name.split("_", 1)[0])
            found.append((version, entry.name, entry.read_text()))
    return sorted(found)


async def migrate(pool: asyncpg.Pool) -> list[str]:
    """Apply pending migrations in order, each in its own transaction; returns their names."""
    applied: list[str] = []
    async with pool.acquire() as conn:
        # Several processes may start at once; one migrates, the others wait and find it done.
        await conn.execute("SELECT pg_advisory_lock($1)", _MIGRATION_LOCK)
        try:
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version integer PRIMARY KEY, name text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
            for version, name, sql in _migrations():
                if version in done:
                    continue
                async with conn.transaction():
                    await conn.execute(sql)
                    await conn.execute(
                        "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                        version,
                        name,
                    )
                log.info("migration applied: %s", name)
                applied.append(name)
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", _MIGRATION_LOCK)
    return applied


async def create_pool(dsn: str, size: int) -> asyncpg.Pool:
    """A connection pool; jsonb columns come back as Python objects."""

    async def init(conn: asyncpg.Connection) -> None:
        import orjson

        await conn.set_type_codec(
            "jsonb",
            encoder=lambda v: orjson.dumps(v).decode(),
            decoder=orjson.loads,
            schema="pg_catalog",
        )

    async def keep_session(conn: asyncpg.Connection) -> None:
        # asyncpg's default release runs "SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *;
        # RESET ALL" on every release: a round trip per acquire (6% of the sender's CPU in a
        # profile). Pool connections here never keep session state (LISTENs have their own
        # connections, cursors and locks live in transactions, the migration lock is released in
        # `finally`), and an open transaction is still rolled back by the pool itself.
        return None

    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=size, init=init, reset=keep_session)
    assert pool is not None
    return pool
