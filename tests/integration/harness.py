"""Real services for integration tests: one broker and one Postgres per session, and an
isolated Parley deployment (own topics, consumer group and database) per test module."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import asyncpg

from channels.signatures import sign_standard_webhook
from parley.localstack import ROOT, KafkaBroker, LocalPostgres, die_with_parent, free_port, stop
from streams.channel_secrets import Sealer

T = TypeVar("T")


async def wait_until(
    probe: Callable[[], Awaitable[T | None]], timeout: float = 30, what: str = "condition"
) -> T:
    """Await probe() until it returns something truthy; fail with `what` after timeout."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = await probe()
        if last:
            return last
        await asyncio.sleep(0.05)  # polling an external system's state between probes
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last={last!r}")


@dataclass
class Services:
    """Where the session's Kafka and Postgres live."""

    bootstrap: str
    postgres_url: str  # a DSN to the maintenance database; tests create their own


@contextmanager
def local_services(prefix: str) -> Iterator[Services]:
    """Kafka and Postgres for a test session or a benchmark: the external ones named by
    KAFKA_BOOTSTRAP_SERVERS / DATABASE_URL, else fresh local ones on free ports in a temp dir.
    Their data (about 1 GB a session) is deleted when they stop; the logs stay."""
    started: list[KafkaBroker | LocalPostgres] = []
    root = Path(tempfile.mkdtemp(prefix=prefix))
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
        for data in ("kafka", "postgres"):
            shutil.rmtree(root / data, ignore_errors=True)


def _database_url(base: str, name: str) -> str:
    return base.rsplit("/", 1)[0] + "/" + name


@dataclass
class Deployment:
    """One isolated Parley: topics, consumer group, database, API port; processes on demand."""

    services: Services
    name: str = field(default_factory=lambda: "t" + uuid.uuid4().hex[:10])
    http_port: int = field(default_factory=free_port)
    metrics_port: int = field(default_factory=free_port)
    admin_token: str = field(default_factory=lambda: secrets.token_urlsafe(16))
    secrets_key: str = field(default_factory=Sealer.generate_key)
    extra_env: dict[str, str] = field(default_factory=dict)
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    logs: Path = field(default_factory=lambda: Path(os.environ["PARLEY_TEST_LOGS"]))

    @property
    def database_url(self) -> str:
        """This deployment's own database."""
        return _database_url(self.services.postgres_url, self.name)

    @property
    def base_url(self) -> str:
        """The API's base URL."""
        return f"http://127.0.0.1:{self.http_port}"

    def env(self) -> dict[str, str]:
        """Environment of this deployment's processes."""
        return {
            **os.environ,
            "KAFKA_BOOTSTRAP_SERVERS": self.services.bootstrap,
            "DATABASE_URL": self.database_url,
            "PARLEY_TOPIC_PREFIX": self.name,
            "PARLEY_APP_ID": self.name,
            "PARLEY_HTTP_PORT": str(self.http_port),
            "PARLEY_WORKER_METRICS_PORT": str(self.metrics_port),
            "PARLEY_ADMIN_TOKEN": self.admin_token,
            "PARLEY_SECRETS_KEY": self.secrets_key,
            "PARLEY_DATA_DIR": str(self.logs / self.name),
            "PARLEY_LOG_LEVEL": "WARNING",
            **self.extra_env,
        }

    async def create_database(self) -> None:
        """CREATE DATABASE for this deployment."""
        conn = await asyncpg.connect(self.services.postgres_url)
        try:
            await conn.execute(f'CREATE DATABASE "{self.name}"')
        finally:
            await conn.close()

    def start(
        self,
        part: str,
        *,
        label: str | None = None,
        env: dict[str, str] | None = None,
        clock_offset: float = 0.0,
        module: str | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start `parley <part>` (worker or api) as a child process, known as `label` (default
        `part`), with extra env; clock_offset (seconds) runs it with its clock that far off;
        `module` runs `python -m module` instead (a test's own variant of the process)."""
        label = label or part
        self.logs.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "parley.cli", part]
        if clock_offset:
            command = [sys.executable, "-m", "tests.integration.skewed_clock", str(clock_offset), part]
        if module:
            command = [sys.executable, "-m", module]
        with (self.logs / f"{self.name}-{label}.log").open("ab") as out:
            proc = subprocess.Popen(
                command,
                env={**self.env(), **(env or {})},
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent,  # a killed test run leaves no process behind
            )
        self.processes[label] = proc
        return proc

    def log_of(self, part: str) -> str:
        """What a process printed so far."""
        return (self.logs / f"{self.name}-{part}.log").read_text(errors="replace")

    def kill(self, part: str) -> None:
        """kill -9, as a crash."""
        proc = self.processes.pop(part)
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    def stop(self, part: str) -> None:
        """Stop one process gracefully."""
        stop(self.processes.pop(part))

    def stop_all(self) -> None:
        """Stop every process this deployment started."""
        for part in list(self.processes):
            stop(self.processes.pop(part))

    async def wait_api(self, http: aiohttp.ClientSession) -> None:
        """Until /healthz answers."""

        async def up() -> bool:
            if self.processes["api"].poll() is not None:
                raise AssertionError(f"api exited:\n{self.log_of('api')[-3000:]}")
            try:
                async with http.get(f"{self.base_url}/healthz") as r:
                    return r.status == 200
            except aiohttp.ClientError:
                return False

        await wait_until(up, 60, "the API to listen")

    async def wait_ready(self, http: aiohttp.ClientSession) -> dict[str, Any]:
        """Until /readyz says ready (the worker holds its partitions)."""

        async def ready() -> dict[str, Any] | None:
            for part, proc in self.processes.items():
                if proc.poll() is not None:
                    raise AssertionError(f"{part} exited:\n{self.log_of(part)[-3000:]}")
            try:
                async with http.get(f"{self.base_url}/readyz") as r:
                    body: dict[str, Any] = await r.json()
                    return body if r.status == 200 else None
            except aiohttp.ClientError:
                return None

        return await wait_until(ready, 90, "readyz")

    def admin_headers(self) -> dict[str, str]:
        """Authorization for the admin API."""
        return {"Authorization": f"Bearer {self.admin_token}"}


@dataclass
class GenericChannel:
    """A registered generic channel and a signer for its webhooks."""

    id: str
    key: bytes = field(default_factory=lambda: secrets.token_bytes(32))

    @property
    def secret(self) -> str:
        """The whsec_ secret to register."""
        return "whsec_" + base64.b64encode(self.key).decode()

    def signed(
        self, body: dict[str, Any] | bytes, *, msg_id: str | None = None, timestamp: int | None = None
    ) -> tuple[bytes, dict[str, str]]:
        """Body bytes and Standard Webhooks headers for it."""
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        msg_id = msg_id or "msg_" + uuid.uuid4().hex
        ts = int(time.time()) if timestamp is None else timestamp
        return raw, {
            "webhook-id": msg_id,
            "webhook-timestamp": str(ts),
            "webhook-signature": sign_standard_webhook(self.key, msg_id, ts, raw),
            "Content-Type": "application/json",
        }


def message(message_id: str, contact: str, text: str) -> dict[str, Any]:
    """A generic channel message body."""
    return {"message_id": message_id, "from": contact, "text": text, "timestamp": int(time.time())}
