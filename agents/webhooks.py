"""Outgoing webhooks: <prefix>.outgoing-events -> every subscribed endpoint, signed, retried, in order.

Two parts, so that no endpoint can hold anything else back:

- The fan-out agent consumes outgoing-events (keyed like the conversation topic: one partition
  holds a conversation's events in log order). Per batch it stores one delivery per (subscribed
  endpoint, event) in Postgres, hands the new ones to the dispatcher and acks. It never waits
  for an HTTP request, so a slow endpoint cannot delay it, the lifecycle agent or ingestion.
- The dispatcher sends. Deliveries of one endpoint and one event key (a conversation) form a
  lane, sent one at a time in log order: a later event goes only after the earlier one was
  delivered or given up (parked). Lanes are independent, and each endpoint has its own bound on
  requests in flight, so a dead endpoint only ever waits on itself. A failed attempt puts its
  lane on the timer wheel (domain/timer_wheel.py, the engine's index) until its next attempt;
  the due time is stored with the attempt's outcome, in one group-committed transaction, before
  the lane moves on.

Kill -9: the deliveries and their next-attempt times are in Postgres, so a restarted worker (or
the one that takes the partitions over) reloads its partitions' pending deliveries and carries
on. An attempt whose outcome was not stored yet is made again, with the same `webhook-id`: at
least once, in order, duplicates only with the same id.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import asyncpg
import faust
import orjson

from agents.lanes import GroupCommit, LaneAgent, LaneEngine, LaneKey, retry_forever
from agents.webhook_client import WebhookSender
from domain.webhooks import Outcome, Step, after_attempt
from streams import webhooks_db as db
from streams.channel_secrets import Sealer
from streams.settings import Settings

log = logging.getLogger(__name__)

Pool = Callable[[], Awaitable[asyncpg.Pool]]


def _ms(at: datetime) -> int:
    return int(at.timestamp() * 1000)


class Endpoints:
    """Every endpoint with its signing keys; reloaded when NOTIFY says one changed."""

    def __init__(self, pool: Pool, secrets_key: str) -> None:
        self.pool = pool
        self.secrets_key = secrets_key
        self._sealer: Sealer | None = None
        self.by_id: dict[str, db.Endpoint] = {}
        self.stale = True
        self.loaded_at = 0.0
        self.version: int | None = None  # of the endpoints in by_id (streams/webhooks_db.endpoints_version)
        self.on_change: Callable[[], None] | None = None

    def sealer(self) -> Sealer:
        """Opens the secrets (PARLEY_SECRETS_KEY); needed only once an endpoint exists."""
        if self._sealer is None:
            self._sealer = Sealer(self.secrets_key)
        return self._sealer

    def invalidate(self) -> None:
        """Reload before the next use."""
        self.stale = True

    async def current(self) -> dict[str, db.Endpoint]:
        """The endpoints, fresh: reloaded if one changed, and at least every 30 s (rotated-out
        secrets stop signing on time)."""
        if self.stale or time.monotonic() - self.loaded_at > 30:
            async with (await self.pool()).acquire() as conn:
                await self._load(conn)
        return self.by_id

    async def for_fan_out(self, conn: db.Conn) -> dict[str, db.Endpoint]:
        """The endpoints as of now, on the fan-out's connection. NOTIFY alone is not enough here:
        it comes on another connection at its own pace, and the fan-out decides once. So the
        endpoints' version counter is read first and the endpoints reloaded when it moved."""
        version = await db.endpoints_version(conn)
        if version != self.version or self.stale or time.monotonic() - self.loaded_at > 30:
            await self._load(conn, version)
        return self.by_id

    async def _load(self, conn: db.Conn, version: int | None = None) -> None:
        self.stale = False  # a NOTIFY during the load makes it stale again
        if version is None:
            version = await db.endpoints_version(conn)
        self.by_id = await db.all_endpoints(conn, self.sealer, datetime.now(UTC))  # as new as version
        self.version = version
        self.loaded_at = time.monotonic()
        if self.on_change is not None:
            self.on_change()


class Dispatcher(LaneEngine[db.Delivery]):
    """Sends the pending deliveries of this worker's partitions, lane by lane (agents/lanes.py:
    a lane is one endpoint's deliveries of one event key; its group is the endpoint)."""

    def __init__(self, pool: Pool, endpoints: Endpoints, sender: WebhookSender, settings: Settings) -> None:
        super().__init__()
        self.pool = pool
        self.endpoints = endpoints
        self.sender = sender
        self.schedule = settings.retry_schedule()
        self.disable_after = settings.webhook_disable_after
        self.concurrency = settings.webhook_concurrency
        self.partitions = settings.topic_partitions
        self.inflight: dict[str, int] = {}
        self.failing: dict[str, datetime | None] = {}  # endpoint -> failing since (what Postgres has)
        self.results: GroupCommit[db.Result] = GroupCommit(self._write, "webhooks")
        self._wake = asyncio.Event()
        self.delivered = 0
        self.failed_attempts = 0
        self.parked = 0
        endpoints.on_change = self._endpoints_changed

    def add(self, deliveries: Iterable[db.Delivery]) -> None:
        """Take pending deliveries (new from the fan-out, or reloaded from Postgres)."""
        for d in deliveries:
            due = _ms(d.next_attempt_at) if d.next_attempt_at else None
            self.lanes.add((d.endpoint_id, d.lane), d.partition, d.seq, d.id, d, due)
        self._wake.set()

    def _endpoints_changed(self) -> None:
        # Re-enabled endpoints: their dormant lanes go again. Deleted ones: their lanes go away.
        self.failing = {ep.id: ep.failing_since for ep in self.endpoints.by_id.values()}
        for key, lane in self.lanes.states():
            ep = self.endpoints.by_id.get(key[0])
            if ep is None and lane.state != "busy":
                self.lanes.drop(key)
        for ep in self.endpoints.by_id.values():
            if ep.enabled:
                self.lanes.wake_group(ep.id)
        self._wake.set()

    async def open_work(self, partitions: set[int]) -> list[db.Delivery]:
        """The pending deliveries of these partitions (after an assignment, a manual retry, a
        replay), with the endpoints fresh."""
        async with (await self.pool()).acquire() as conn:
            rows = await db.pending(conn, partitions)
        await self.endpoints.current()
        return rows

    async def run(self) -> None:
        """Forever: move due retries to ready, start what each endpoint has room for, wait."""
        writer = asyncio.ensure_future(self.results.run())
        try:
            while True:
                now = int(time.time() * 1000)
                self.lanes.due(now)
                await self._start_ready()
                nxt = self.lanes.next_due_ms()
                timeout = 1.0 if nxt is None else max(0.0, min(1.0, (nxt - now) / 1000))
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout)
                except TimeoutError:
                    pass
        finally:
            writer.cancel()

    async def _start_ready(self) -> None:
        if self.paused:
            return
        endpoints = self.endpoints.by_id
        if self.endpoints.stale:
            try:
                endpoints = await self.endpoints.current()
            except Exception as exc:  # noqa: BLE001 - Postgres away: the next round retries
                self.endpoints.stale = True
                log.warning("webhooks: reading endpoints failed (%s: %s)", type(exc).__name__, exc)
        for endpoint_id in self.lanes.groups():
            ep = endpoints.get(endpoint_id)
            for key, delivery in self.lanes.take(endpoint_id):
                if ep is None or not ep.enabled:
                    self.lanes.sleep(key)  # until the endpoint is enabled again (or deleted)
                    continue
                self.inflight[endpoint_id] = self.inflight.get(endpoint_id, 0) + 1
                self.busy[key] = asyncio.ensure_future(self._attempt(key, delivery, ep))
                if self.inflight[endpoint_id] >= self.concurrency:
                    break

    async def _attempt(self, key: LaneKey, d: db.Delivery, ep: db.Endpoint) -> None:
        requesting = True
        try:
            attempt = d.attempts + 1
            sent = await self.sender.send(ep.url, d.event_id, int(time.time()), d.body, ep.keys)
            # The request is over: free the endpoint's slot now, not after the outcome is stored.
            # The lane itself stays busy until then, so its order is unchanged; holding the slot
            # through the group commit capped one endpoint near 16 / (request + commit wait),
            # below 1,000/s under load (bench/webhooks.py).
            requesting = False
            self.inflight[ep.id] -= 1
            self._wake.set()
            now = datetime.now(UTC)
            step = after_attempt(
                Outcome(sent.status, sent.error, sent.retry_after),
                attempt=attempt - d.retry_base,
                schedule=self.schedule,
                now=now,
                failing_since=self.failing.get(ep.id, ep.failing_since),
                disable_after=self.disable_after,
                jitter=random.random(),
            )
            status = {"delivered": "succeeded", "parked": "failed"}.get(step.next, "pending")
            await self.results.store(
                db.Result(
                    d.id, attempt, now, sent.status, sent.latency_ms, sent.error, sent.body, status, step.at
                )
            )
            await self._endpoint_state(ep, step)
            if step.next == "delivered":
                self.delivered += 1
            else:
                self.failed_attempts += 1
                log.info(
                    "webhooks: %s to %s attempt %d failed: %s",
                    d.event_id,
                    ep.id,
                    attempt,
                    sent.error,
                    extra={"event_id": d.event_id},
                )
            self._advance(key, replace(d, attempts=attempt, next_attempt_at=step.at), step)
        finally:
            self.busy.pop(key, None)
            if requesting:
                self.inflight[ep.id] -= 1
            self._wake.set()

    def _advance(self, key: LaneKey, d: db.Delivery, step: Step) -> None:
        if step.next in ("delivered", "parked"):
            if step.next == "parked":
                self.parked += 1
                log.warning(
                    "webhooks: delivery %d (%s to %s) parked: %s",
                    d.id,
                    d.event_id,
                    d.endpoint_id,
                    step.reason,
                )
            self.lanes.finish_head(key)
            return
        self.lanes.replace_head(key, d)
        if step.next == "retry":
            assert step.at is not None
            self.lanes.wait(key, _ms(step.at))
        else:  # disabled: the delivery stays pending until the endpoint is enabled again
            self.lanes.sleep(key)

    async def _endpoint_state(self, ep: db.Endpoint, step: Step) -> None:
        failing_since = None if step.next == "delivered" else step.failing_since
        if self.failing.get(ep.id, ep.failing_since) != failing_since:
            self.failing[ep.id] = failing_since

            async def mark() -> None:
                async with (await self.pool()).acquire() as conn:
                    await db.endpoint_failing(conn, ep.id, failing_since)

            await retry_forever(mark, f"webhooks: recording endpoint {ep.id} failing since {failing_since}")
        if step.next == "disabled":
            reason = step.reason or "disabled"

            async def disable() -> bool:
                async with (await self.pool()).acquire() as conn:
                    return await db.disable_endpoint(conn, ep.id, reason, datetime.now(UTC), self.partitions)

            if await retry_forever(disable, f"webhooks: disabling endpoint {ep.id}"):
                log.error("webhooks: endpoint %s (%s) disabled: %s", ep.id, ep.url, reason)
            self.endpoints.invalidate()

    async def _write(self, results: list[db.Result]) -> None:
        async with (await self.pool()).acquire() as conn:
            await db.record_results(conn, results)


class WebhookAgent(LaneAgent):
    """The fan-out agent on outgoing-events, around the dispatcher (agents/lanes.LaneAgent)."""

    name = "webhooks"

    def __init__(
        self,
        app: faust.App,
        settings: Settings,
        topic: faust.TopicT,
        pool: Pool,
        dead_letter: Callable[[Any, str, int], Awaitable[None]],
        on_fatal: Callable[[BaseException], None],
    ) -> None:
        self.pool = pool
        self.dead_letter = dead_letter
        self.endpoints = Endpoints(pool, settings.secrets_key)
        self.sender = WebhookSender(
            allow_http=settings.outbound_allow_http,
            allow_private=settings.outbound_allow_private,
            timeout=settings.webhook_timeout.total_seconds(),
            retry_after_cap=settings.webhook_retry_after_cap.total_seconds(),
        )
        self.dispatcher = Dispatcher(pool, self.endpoints, self.sender, settings)
        self.fanned_out = 0
        # No linger: the batch path hands over each fetch's records at once, and batches grow by
        # themselves while a fan-out transaction runs. Lingering 10 ms (PARLEY_WORKER_LINGER)
        # only added latency: at 1,000 events/s p99 58.7-88.9 ms with it, 40.2-46.5 ms without,
        # and 3,322-3,760 vs 4,402-4,474 deliveries/s flat out (bench/webhooks.py, 2 runs each).
        super().__init__(app, settings, topic, self.dispatcher, self.sender, on_fatal, linger=0)

    def listeners(self) -> dict[str, Callable[[str], None]]:
        return {
            db.ENDPOINTS_CHANNEL: lambda _: self.endpoints.invalidate(),
            db.DELIVERIES_CHANNEL: lambda payload: self.reload_later(int(payload)),
        }

    async def connected(self) -> None:
        self.endpoints.invalidate()
        await super().connected()

    async def handle(self, batch: list[Any]) -> None:
        """Store the batch's deliveries, then give the new ones to the dispatcher."""
        records: list[db.Outgoing] = []
        for msg in batch:  # Faust Messages (agents/batching.py)
            try:
                value = bytes(msg.value)
                parsed = orjson.loads(value)
                records.append(
                    db.Outgoing(
                        str(parsed["id"]),
                        str(parsed["type"]),
                        msg.key.decode(),
                        value,
                        msg.partition,
                        msg.offset,
                    )
                )
            except Exception as exc:  # noqa: BLE001 - a record we cannot read: park it, go on
                await self.dead_letter(msg, f"undecodable outgoing event: {type(exc).__name__}: {exc}", 1)
        if not records:
            return

        async def store() -> list[db.Delivery]:
            async with (await self.pool()).acquire() as conn:
                endpoints = await self.endpoints.for_fan_out(conn)
                return await db.fan_out(conn, records, endpoints.values(), datetime.now(UTC))

        created = await retry_forever(store, f"storing deliveries of {len(records)} events")
        self.fanned_out += len(created)
        self.dispatcher.add(created)
