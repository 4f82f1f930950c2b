"""Session-wide real services. Integration tests need Kafka and Postgres: started here once
(or taken from KAFKA_BOOTSTRAP_SERVERS / DATABASE_URL). If they cannot start, tests fail."""

from __future__ import annotations

import os
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from parley.localstack import KafkaBroker, LocalPostgres, free_port
from tests.integration.harness import Deployment, GenericChannel, Services


@pytest.fixture(scope="session")
def services() -> Iterator[Services]:
    """One Kafka broker and one Postgres for the whole session."""
    started: list[KafkaBroker | LocalPostgres] = []
    root = Path(tempfile.mkdtemp(prefix="parley-test-"))
    os.environ.setdefault("PARLEY_TEST_LOGS", str(root / "logs"))
    try:
        bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "")
        pg_url = os.environ.get("DATABASE_URL", "")
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
        yield Services(bootstrap=bootstrap, postgres_url=pg_url)
    finally:
        for svc in reversed(started):
            svc.stop()


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
