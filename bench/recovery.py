"""How long a worker takes to hold its pending actions again, and the memory they cost it, for two
distributions of due times (each in its own fresh deployment and database):

- spread: n actions due uniformly over [now + 5 min, now + 7 days + 5 min), the default horizon
  (10 min): most are beyond it and stay in Postgres; the worker holds the ~n/2000 due within it;
- dense: n actions due uniformly over [now + 1 h, now + 2 h) with a 3 h horizon: every one is
  within it and in memory (what every pending action cost before the horizon).

Nothing comes due during the bench. "Hold" is the worker's first load done (every owned action
due before its horizon in memory, parley_timers_loaded_until_seconds > 0), timed from the process
start, first with the actions in Postgres alone, then after a graceful restart. Memory per pending
action is (worker RSS holding them - RSS of the same worker with nothing pending) / n: RSS, all
in (allocator slack and the load's transient buffers included), not a heap count."""

from __future__ import annotations

import random
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import aiohttp
import asyncpg
import psutil

from bench.progress import waiting
from domain.actions import CLOSE, close_token
from streams.topics import partition_of
from tests.integration.harness import Deployment, Services
from tests.integration.worker_helpers import metrics


@dataclass(frozen=True)
class Case:
    """A distribution of due times and the horizon the worker runs with."""

    name: str
    first_due: timedelta  # from now
    spread: timedelta  # dues uniform over [now + first_due, now + first_due + spread)
    horizon: timedelta

    def describe(self) -> str:
        """One line for the bench output."""
        first, spread, horizon = _span(self.first_due), _span(self.spread), _span(self.horizon)
        return f"{self.name}: due uniformly over {spread} from now + {first}, horizon {horizon}"


def _span(d: timedelta) -> str:
    s = d.total_seconds()
    return f"{s / 86400:g} d" if s >= 86400 else f"{s / 3600:g} h" if s >= 3600 else f"{s / 60:g} min"


SPREAD = Case("spread", timedelta(minutes=5), timedelta(days=7), timedelta(minutes=10))
DENSE = Case("dense", timedelta(hours=1), timedelta(hours=1), timedelta(hours=3))


@dataclass(frozen=True)
class Result:
    """What one case measured."""

    case: Case
    n: int
    held: int  # actions in the worker's memory once it holds them
    first_s: float  # seconds to hold them, from Postgres alone
    again_s: float  # seconds after a restart
    empty_mb: float  # RSS with nothing pending
    holding_mb: float  # RSS holding them (after the restart)

    @property
    def bytes_per_action(self) -> float:
        """Worker RSS growth per pending action (all n, held or not)."""
        return (self.holding_mb - self.empty_mb) * 1e6 / self.n


async def _insert_actions(dsn: str, n: int, case: Case, partitions: int = 8) -> None:
    """n pending close actions, due per `case`."""
    start = datetime.now(UTC) + case.first_due
    spread_us = int(case.spread / timedelta(microseconds=1))
    rng = random.Random(7)
    conn = await asyncpg.connect(dsn)
    try:
        rows = []
        for i in range(n):
            owner = f"recovery/c{i}"
            due = start + timedelta(microseconds=rng.randrange(spread_us))
            token = close_token(str(uuid.uuid4()), 1)
            rows.append((owner, CLOSE, token, due, partition_of(owner.encode(), partitions)))
        await conn.copy_records_to_table(
            "scheduled_actions", records=rows, columns=["owner", "name", "token", "due_at", "partition"]
        )
    finally:
        await conn.close()


async def _time_to_hold(http: aiohttp.ClientSession, dep: Deployment) -> tuple[float, int]:
    """(seconds from the worker's start until its first load is done, actions then in memory)."""
    started = time.perf_counter()
    dep.start("worker")

    async def loaded() -> dict[str, float] | None:
        got = await metrics(http, dep)
        return got if got.get("parley_timers_loaded_until_seconds", 0) > 0 else None

    got = await waiting(loaded, 900, "the worker's first load")
    return time.perf_counter() - started, int(got["parley_timers_active"])


def _rss_mb(dep: Deployment) -> float:
    return float(psutil.Process(dep.processes["worker"].pid).memory_info().rss / 1e6)


async def recovery(services: Services, n: int, case: Case) -> Result:
    """One case in a fresh deployment: the empty worker's RSS, then n actions, two starts."""
    dep = Deployment(
        services,
        extra_env={"PARLEY_LOG_LEVEL": "INFO", "PARLEY_SCHEDULER_HORIZON": str(case.horizon.total_seconds())},
    )
    await dep.create_database()
    dep.start("api")  # migrates the database and creates the topics
    try:
        async with aiohttp.ClientSession() as http:
            await dep.wait_api(http)
            await _time_to_hold(http, dep)
            empty = _rss_mb(dep)
            dep.stop("worker")
            await _insert_actions(dep.database_url, n, case)
            first, _ = await _time_to_hold(http, dep)
            dep.stop("worker")
            again, held = await _time_to_hold(http, dep)
            holding = _rss_mb(dep)
    finally:
        dep.stop_all()
    return Result(case, n, held, first, again, empty, holding)
