"""The local stack's Postgres wants its password and widens no directory; /readyz says little,
checks at most once a second and keeps one Kafka admin client; the channel cache caches misses
and is dropped by Postgres notifications (and bypassed while it cannot hear them)."""

from __future__ import annotations

import asyncio
import os
import pwd
import stat
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from api.context import ChannelCache
from api.health import Readiness
from parley.localstack import LocalPostgres, free_port
from streams.channel_secrets import Sealer
from streams.store import Store
from tests.integration.harness import Deployment, Services, wait_until


def _others_cannot_enter(path: Path) -> bool:
    return stat.S_IMODE(path.stat().st_mode) & 0o007 == 0


async def test_local_postgres_requires_its_password_and_widens_no_directory(private_dir: Path) -> None:
    private = private_dir  # 0700, like /root
    pg = LocalPostgres(private / "data" / "postgres", free_port())
    pg.start()
    try:
        assert stat.S_IMODE(pg.password_file.stat().st_mode) == 0o600
        assert _others_cannot_enter(private) and _others_cannot_enter(pg.dir)
        if os.geteuid() == 0:  # the server's user may traverse (ACL), nobody else gained anything
            assert pwd.getpwuid(pg.dir.stat().st_uid).pw_name == "parley"
        no_password = pg.url.replace(f":{pg.password}@", "@")
        with pytest.raises(asyncpg.InvalidPasswordError):
            await asyncpg.connect(no_password)
        with pytest.raises(asyncpg.InvalidPasswordError):
            await asyncpg.connect(pg.url.replace(pg.password, "wrong"))
        conn = await asyncpg.connect(pg.url)
        assert await conn.fetchval("SELECT current_database()") == "parley"
        await conn.close()

        # A cluster made by an earlier version (trust, no password file) is moved to passwords.
        pg.stop()
        (pg.dir / "pgdata" / "pg_hba.conf").write_text(
            "local all all trust\nhost all all 127.0.0.1/32 trust\n"
        )
        pg.password_file.unlink()
        pg.start()
        with pytest.raises(asyncpg.InvalidPasswordError):
            await asyncpg.connect(no_password)
        conn = await asyncpg.connect(pg.url)
        await conn.close()
    finally:
        pg.stop()


async def test_readyz_answers_coarse_names_and_worker_false_leaves_the_worker_out(
    services: Services, http: aiohttp.ClientSession
) -> None:
    dep = Deployment(services)  # an API and no worker: the worker group is empty
    await dep.create_database()
    dep.start("api")
    try:
        await dep.wait_api(http)

        async def probe() -> tuple[int, object] | None:
            async with http.get(f"{dep.base_url}/readyz") as r:
                body = (r.status, await r.json())
            # "unknown" while the broker has no group coordinator yet (a fresh broker).
            return None if "unknown" in str(body) else body

        assert await wait_until(probe, 30, "a settled readyz") == (
            503,
            {"ready": False, "checks": {"postgres": "ok", "kafka": "ok", "worker": "not ready"}},
        )
        async with http.get(f"{dep.base_url}/readyz", params={"worker": "false"}) as r:
            assert r.status == 200
            assert await r.json() == {"ready": True, "checks": {"postgres": "ok", "kafka": "ok"}}
    finally:
        dep.stop_all()
    assert "readyz: worker not ready: group" in dep.log_of("api")  # the detail is in the log


async def test_readiness_shares_one_check_per_second_and_one_admin_client(
    services: Services, pool: asyncpg.Pool
) -> None:
    warm = Readiness(pool, services.bootstrap, "no-such-group", ttl=0)
    await wait_until(lambda: _settled(warm), 30, "a group coordinator on the broker")
    await warm.close()
    now = [0.0]
    ready = Readiness(pool, services.bootstrap, "no-such-group", clock=lambda: now[0])
    try:
        results = await asyncio.gather(*(ready.check() for _ in range(20)))
        assert ready.checks_run == 1 and all(r == results[0] for r in results)
        assert results[0] == {"postgres": "ok", "kafka": "ok", "worker": "not ready"}
        now[0] = 0.5
        await ready.check()
        assert ready.checks_run == 1  # cached for a second
        for second in range(1, 6):
            now[0] = float(second)
            await ready.check()
        assert ready.checks_run == 6 and ready.clients_started == 1
    finally:
        await ready.close()

    down = Readiness(pool, f"127.0.0.1:{free_port()}", "g", timeout=1)
    try:
        assert await down.check() == {"postgres": "ok", "kafka": "failing", "worker": "unknown"}
    finally:
        await down.close()


async def test_channel_cache_caches_misses_and_drops_entries_on_notify(
    services: Services, pool: asyncpg.Pool
) -> None:
    dsn = services.postgres_url.rsplit("/", 1)[0] + "/" + await pool.fetchval("SELECT current_database()")
    store = Store(pool, Sealer(Sealer.generate_key()))
    cache = ChannelCache(store)
    await cache.start(dsn)
    try:
        assert cache.listening
        for _ in range(100):
            assert await cache.get("unknown") is None
        assert cache.lookups == 1  # one query for a hundred requests for an unknown id

        await store.create_channel("unknown", "generic", {"secret": "whsec_MDEyMzQ1Njc4OWFiY2RlZg=="})
        found = await wait_until(lambda: cache.get("unknown"), 10, "the created channel")
        assert found[0] == "generic" and found[1]["secrets"] == ["whsec_MDEyMzQ1Njc4OWFiY2RlZg=="]

        # A change made with plain SQL is heard too (the trigger notifies).
        await pool.execute("DELETE FROM channels WHERE id = 'unknown'")
        await wait_until(lambda: _is_none(cache, "unknown"), 10, "the deleted channel to be forgotten")

        # The listening connection dies: nothing is cached until it is back.
        await pool.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE query LIKE 'LISTEN%' AND datname = current_database()"
        )
        await wait_until(lambda: _not_listening(cache), 10, "the cache to notice")
        before = cache.lookups
        await cache.get("unknown")
        await cache.get("unknown")
        assert cache.lookups == before + 2
        await wait_until(lambda: _listening(cache), 10, "the cache to listen again")
    finally:
        await cache.stop()


async def _is_none(cache: ChannelCache, channel_id: str) -> bool:
    return await cache.get(channel_id) is None


async def _not_listening(cache: ChannelCache) -> bool:
    return not cache.listening


async def _listening(cache: ChannelCache) -> bool:
    return cache.listening


async def _settled(ready: Readiness) -> bool:
    return (await ready.check())["worker"] != "unknown"
