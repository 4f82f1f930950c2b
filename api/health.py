"""Readiness of an API process: Postgres, Kafka and the worker group, checked at most once a second.

Probes answer with coarse names only (`ok`, `failing`, `not ready`, `unknown`): the reasons (hosts,
driver messages) go to the log, not to whoever can reach /readyz. One admin client lives as long
as the process, and concurrent probes share one check.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import asyncpg
from aiokafka.admin import AIOKafkaAdminClient

log = logging.getLogger(__name__)

OK, FAILING, NOT_READY, UNKNOWN = "ok", "failing", "not ready", "unknown"


class Readiness:
    """Checks shared by every /readyz request of one process."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        bootstrap: str,
        group: str,
        *,
        ttl: float = 1.0,
        timeout: float = 3.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.pool = pool
        self.bootstrap = bootstrap
        self.group = group
        self.ttl = ttl
        self.timeout = timeout
        self.clock = clock
        self.checks_run = 0
        self.clients_started = 0
        self._client: AIOKafkaAdminClient | None = None
        self._result: dict[str, str] | None = None
        self._at = 0.0
        self._running: asyncio.Future[dict[str, str]] | None = None
        self._logged: dict[str, str] = {}

    async def check(self) -> dict[str, str]:
        """{"postgres", "kafka", "worker"} -> coarse status, at most `ttl` seconds old."""
        if self._result is not None and self.clock() - self._at < self.ttl:
            return self._result
        if self._running is None:
            self._running = asyncio.ensure_future(self._run())
        # shield: a probe that gives up does not cancel the check the others are waiting for.
        return await asyncio.shield(self._running)

    async def close(self) -> None:
        """Close the admin client."""
        if self._running is not None:
            await asyncio.gather(self._running, return_exceptions=True)
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def _run(self) -> dict[str, str]:
        try:
            self.checks_run += 1
            pg, (kafka, worker) = await asyncio.gather(self._postgres(), self._kafka())
            result = {"postgres": pg, "kafka": kafka, "worker": worker}
            self._result, self._at = result, self.clock()
            return result
        finally:
            self._running = None

    def _report(self, name: str, detail: str) -> None:
        # Log each change of a check's state (with its reason), not every probe.
        if self._logged.get(name) != detail:
            self._logged[name] = detail
            (log.info if detail == OK else log.warning)("readyz: %s %s", name, detail)

    async def _postgres(self) -> str:
        try:
            await asyncio.wait_for(self.pool.fetchval("SELECT 1"), self.timeout)
        except Exception as exc:  # noqa: BLE001 - any failure means not ready; the log says which
            self._report("postgres", f"failing: {type(exc).__name__}: {exc}")
            return FAILING
        self._report("postgres", OK)
        return OK

    async def _admin(self) -> AIOKafkaAdminClient:
        if self._client is None:
            client = AIOKafkaAdminClient(
                bootstrap_servers=self.bootstrap, request_timeout_ms=int(self.timeout * 1000)
            )
            try:
                await asyncio.wait_for(client.start(), self.timeout)
            except BaseException:
                await client.close()
                raise
            self.clients_started += 1
            self._client = client
        return self._client

    async def _kafka(self) -> tuple[str, str]:
        try:
            admin = await self._admin()
            await asyncio.wait_for(admin.list_topics(), self.timeout)
        except Exception as exc:  # noqa: BLE001 - any failure means not ready; the log says which
            self._report("kafka", f"failing: {type(exc).__name__}: {exc}")
            return FAILING, UNKNOWN
        self._report("kafka", OK)
        try:
            # The worker is ready when its consumer group is Stable with members holding partitions.
            [response] = await asyncio.wait_for(admin.describe_consumer_groups([self.group]), self.timeout)
            _err, _gid, state, _ptype, _proto, members, *_ = response.groups[0]
        except Exception as exc:  # noqa: BLE001 - any failure means not ready; the log says which
            self._report("worker", f"unknown: {type(exc).__name__}: {exc}")
            return OK, UNKNOWN
        ready = state == "Stable" and len(members) > 0
        self._report("worker", OK if ready else f"not ready: group {state}, {len(members)} member(s)")
        return OK, OK if ready else NOT_READY
