"""The emergency switch on a worker: the parts listed in Postgres' paused_parts stop taking work.

A paused part's agent takes no batch from its intake: what was fetched waits there unacked, and
the intake's backpressure takes its partitions out of the fetch two batches in, so the rest
queues in Kafka (inbound webhooks are still accepted; the lag grows in /metrics). The webhook
dispatcher and the sender also start no request while paused; requests already out finish. Every
worker reads the table at start, on NOTIFY and every second, so a pause survives restarts and a
missed notification costs at most a second.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import asyncpg

from agents.batching import Intake
from agents.lanes import LaneEngine
from streams import pause_db

log = logging.getLogger(__name__)


class PauseSwitch:
    """Applies paused_parts to this worker's intakes and engines."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.parts: dict[str, tuple[Intake, LaneEngine[Any] | None]] = {}
        self.paused: set[str] = set()
        self.known = True  # the table was read since the last add()
        self._changed = asyncio.Event()

    def add(self, part: str, intake: Intake, engine: LaneEngine[Any] | None = None) -> None:
        """A part of this worker: the intake its agent drains, and its sending engine if any.
        Held until the first read of the table says otherwise: a worker started while its part
        is paused must not take a batch before it knows."""
        self.parts[part] = (intake, engine)
        intake.hold(True)
        if engine is not None:
            engine.paused = True
        self.paused.add(part)
        self.known = False

    def apply(self, paused: set[str], wake: Callable[[LaneEngine[Any]], None] | None = None) -> None:
        """Make this worker's parts match `paused`."""
        first, self.known = not self.known, True
        for part, (intake, engine) in self.parts.items():
            now = part in paused
            if now == (part in self.paused):
                if first and now:
                    log.warning("%s paused by an operator (read at start)", part)
                continue
            intake.hold(now)
            if engine is not None:
                engine.paused = now
                if not now and wake is not None:
                    wake(engine)
            if not first:  # at start a part is held until this read: that is not news
                log.warning("%s %s by an operator", part, "paused" if now else "resumed")
        self.paused = set(paused) & set(self.parts)

    async def run(self) -> None:
        """Forever: read the table (now, on NOTIFY, at least every second) and apply it."""
        conn: asyncpg.Connection | None = None
        while True:
            self._changed.clear()
            try:
                if conn is None or conn.is_closed():
                    conn = await asyncpg.connect(self.dsn)
                    await conn.add_listener(pause_db.CHANNEL, lambda *_: self._changed.set())
                self.apply(set(await pause_db.paused(conn)), _wake)
            except Exception as exc:  # noqa: BLE001 - Postgres away: keep the last known state
                log.warning("pause switch: reading paused parts failed (%s: %s)", type(exc).__name__, exc)
                if conn is not None:
                    conn.terminate()
                conn = None
            try:
                await asyncio.wait_for(self._changed.wait(), 1.0)
            except TimeoutError:
                pass


def _wake(engine: LaneEngine[Any]) -> None:
    wake: asyncio.Event | None = getattr(engine, "_wake", None)
    if wake is not None:
        wake.set()
