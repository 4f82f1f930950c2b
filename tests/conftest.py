"""Session-wide real services. Integration tests need Kafka and Postgres: started here once
(or taken from KAFKA_BOOTSTRAP_SERVERS / DATABASE_URL). If they cannot start, tests fail."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from streams.schema import create_pool, migrate
from tests.integration.harness import Deployment, GenericChannel, Services, local_services


@pytest.fixture(scope="session")
def services() -> Iterator[Services]:
    """One Kafka broker and one Postgres for the whole session."""
    with local_services("parley-test-") as found:
        yield found


@pytest.fixture
def private_dir() -> Iterator[Path]:
    """A fresh 0700 directory outside pytest's tmp tree (whose parents a test may check the
    access of), removed with everything in it when the test ends."""
    path = Path(tempfile.mkdtemp(prefix="parley-test-own-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def pool(services: Services) -> AsyncIterator[asyncpg.Pool]:
    """A migrated database of its own, and a pool of 4 connections to it."""
    dep = Deployment(services)
    await dep.create_database()
    created = await create_pool(dep.database_url, 4)
    await migrate(created)
    yield created
    await created.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """An HTTP client."""
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture(scope="module")
async def deployment(services: Services, request: pytest.FixtureRequest) -> AsyncIterator[Deployment]:
    """A running worker + API with their own topics, group and database; a test module may set
    DEPLOYMENT_ENV (e.g. short timeouts)."""
    dep = Deployment(services, extra_env=dict(getattr(request.module, "DEPLOYMENT_ENV", {})))
    await dep.create_database()
    dep.start("worker")
    dep.start("api")
    async with aiohttp.ClientSession() as http:
        await dep.wait_ready(http)
    try:
        yield dep
    finally:
        dep.stop_all()


@pytest.fixture(scope="module")
async def channel(deployment: Deployment) -> GenericChannel:
    """A registered generic channel on the module's deployment."""
    ch = GenericChannel(id="ch-" + deployment.name)
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{deployment.base_url}/v1/channels",
            json={"id": ch.id, "provider": "generic", "secret": ch.secret},
            headers=deployment.admin_headers(),
        ) as r,
    ):
        assert r.status == 201, await r.text()
    return ch


@pytest.fixture
async def db(deployment: Deployment) -> AsyncIterator[asyncpg.Connection]:
    """A connection to the module deployment's database."""
    conn = await asyncpg.connect(deployment.database_url)
    yield conn
    await conn.close()
