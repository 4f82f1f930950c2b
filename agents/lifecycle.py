"""The lifecycle agent: batches of conversation events -> domain -> Postgres, never lost.

Faust acks an event when the agent moves past it, even if the body raised. So nothing may
escape this loop: transient failures (Postgres down, a lost version race) are retried until
they pass, holding the partition; an event that keeps failing for its own reasons (poison)
is parked on the dead-letter topic with its error before the batch is acked.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import asyncpg
import faust
import orjson
from aiokafka import AIOKafkaProducer
from pydantic import ValidationError

from agents import batching, metrics
from agents.runner import apply_isolating, with_retries
from agents.scheduler import Scheduler
from streams.projection import BatchResult, apply_batch
from streams.records import ConversationEvent, DeadLetter, events_of, keyed
from streams.schema import create_pool
from streams.settings import Settings
from streams.topics import Topics

log = logging.getLogger(__name__)


class BatchStats:
    """Logs batch sizes and apply times every interval, so a slow worker explains itself."""

    def __init__(self, interval: float = 10.0) -> None:
        self.interval = interval
        self._reset(time.monotonic())

    def _reset(self, now: float) -> None:
        self.since, self.batches, self.events, self.busy = now, 0, 0, 0.0
        self.delay_sum, self.delay_max, self.arrivals = 0.0, 0.0, 0

    def arrived(self, delay: float) -> None:
        """An event reached the agent `delay` seconds after Kafka stored it."""
        self.arrivals += 1
        self.delay_sum += delay
        self.delay_max = max(self.delay_max, delay)

    def observe(self, size: int, seconds: float) -> None:
        """Count one handled batch; log and reset once per interval."""
        self.batches += 1
        self.events += size
        self.busy += seconds
        now = time.monotonic()
        if now - self.since >= self.interval:
            log.info(
                "lifecycle: %d events in %d batches (avg %.0f/batch, %.1f ms/batch), %.0f%% busy; "
                "Kafka-to-agent delay avg %.0f ms, max %.0f ms",
                self.events,
                self.batches,
                self.events / self.batches,
                1000 * self.busy / self.batches,
                100 * self.busy / (now - self.since),
                1000 * self.delay_sum / max(1, self.arrivals),
                1000 * self.delay_max,
            )
            self._reset(now)


class Part:
    """One event of a bundle record (records.SchedulePuts), standing in for its Message where an
    event is dead-lettered: the letter carries this event alone, under its own key, so a retry of
    the letter applies just it."""

    def __init__(self, message: Any, event: ConversationEvent) -> None:
        self.topic, self.partition, self.offset = message.topic, message.partition, message.offset
        self.timestamp = message.timestamp
        self.event = event

    @property
    def key(self) -> bytes:
        return keyed(self.event)[0]

    @property
    def value(self) -> bytes:
        return keyed(self.event)[1]


class LifecycleAgent:
    """Owns the lifecycle agent's resources: the pool, the topics, the retry policy."""

    def __init__(self, app: faust.App, settings: Settings, topics: Topics) -> None:
        self.app = app
        self.settings = settings
        self.policy = settings.policy()
        self.topics = topics
        self.source = app.topic(topics.conversation_events, key_serializer="raw", value_serializer="raw")
        self.scheduler = Scheduler(
            app,
            self.source,
            settings.topic_partitions,
            horizon=settings.scheduler_horizon,
            bootstrap=settings.kafka_bootstrap_servers,
        )
        self.dead_letters = app.topic(topics.dead_letters, key_serializer="raw", value_serializer="raw")
        self._pool: asyncpg.Pool | None = None
        self._pool_lock = asyncio.Lock()
        self.applied = 0
        self.dead_lettered = 0
        self.parking_failures = 0
        self._parker: AIOKafkaProducer | None = None  # the dead-letter producer, see dead_letter
        self._parker_lock = asyncio.Lock()  # the writers (settings.worker_writers) park concurrently
        self.failure: BaseException | None = None  # set when the writer died; /healthz says so
        self.stats = BatchStats()
        self._batch_seconds = metrics.BATCH_SECONDS.labels("lifecycle")
        self._event_age = metrics.EVENT_AGE_SECONDS.labels("lifecycle")
        # the relay's wake-up (agents/app.py), with the partitions written beyond this worker's own
        self.outbox_written: Callable[[set[int]], None] = lambda _: None
        # the sender in this process (agents/app.py): sends queued, handed over once committed
        self.sends_queued: Callable[[list[Any]], None] = lambda _: None

    def register(self) -> None:
        """Attach the agent to the app."""
        # The agent makes Faust subscribe and own the partitions; its records come as batches of
        # Messages through the intake (agents/batching.py), not as Events through the stream.
        self.intake = batching.register(
            self.app, self.source, self.settings.worker_batch_size, self.settings.worker_writers
        )
        self.app.agent(self.source, name="lifecycle")(self._run)

        async def close_parker(sender: Any, *args: Any, signal: Any, **kwargs: Any) -> None:
            await self._drop_parker()

        self.app.on_before_shutdown.connect(close_parker)  # type: ignore[arg-type]  # mode types it loosely

    async def _drop_parker(self) -> None:
        parker, self._parker = self._parker, None
        if parker is not None:
            await parker.stop()

    async def _produce_letter(self, key: bytes | None, value: bytes) -> None:
        # A dedicated idempotent producer: after a record the broker refuses (say, over the dead-
        # letter topic's max.message.bytes), aiokafka's idempotent producer answers every later
        # record of that partition with OutOfOrderSequenceNumber. Faust's shared producer would
        # then be broken for good; this one is dropped and a fresh one (new producer id) tries.
        async with self._parker_lock:
            if self._parker is None:
                self._parker = AIOKafkaProducer(
                    bootstrap_servers=self.settings.kafka_bootstrap_servers,
                    acks="all",
                    enable_idempotence=True,
                )
                await self._parker.start()
            try:
                await self._parker.send_and_wait(self.topics.dead_letters, value, key=key)
            except BaseException:
                await self._drop_parker()
                raise

    async def pool(self) -> asyncpg.Pool:
        """The Postgres pool, opened on first use inside the worker's loop."""
        async with self._pool_lock:
            if self._pool is None:
                self._pool = await create_pool(self.settings.database_url, self.settings.db_pool_size)
            return self._pool

    async def _run(self, stream: faust.StreamT[bytes]) -> None:
        # Acks are manual and happen only after the batch is safely in Postgres or parked.
        await batching.consume_batches(
            self.intake,
            linger=self.settings.worker_linger.total_seconds(),
            handle=self.handle,
            name="lifecycle writer",
            on_fatal=self.fatal,
            arrived=lambda message: self.stats.arrived(time.time() - message.timestamp),
            handled=self._handled,
        )

    def _handled(self, size: int, seconds: float) -> None:
        self.stats.observe(size, seconds)
        self._batch_seconds.observe(seconds)

    def fatal(self, exc: BaseException) -> None:
        """The writer died: report it on /healthz and stop the worker, so that it leaves the
        group and its partitions move to a live worker (restarted, it resumes from the last
        commit; nothing unacked is lost)."""
        self.failure = exc
        os.kill(os.getpid(), signal.SIGTERM)  # Faust's own graceful stop; cmd_worker exits 1

    async def handle(self, batch: Sequence[Any]) -> None:
        """Decode, apply, dead-letter what cannot be applied; returns only when all is safe.
        `batch` holds Faust Messages (agents/batching.py), in offset order per partition."""
        decoded: list[tuple[Any, ConversationEvent]] = []
        for message in batch:
            try:
                events = events_of(message.value)
            except ValidationError as exc:
                await self.dead_letter(message, f"undecodable event: {exc}", attempts=1)
                continue
            if len(events) == 1:
                decoded.append((message, events[0]))
            else:  # a bundle of schedule puts: each is applied, and if need be parked, alone
                decoded.extend((Part(message, event), event) for event in events)
        # Bundles can make a batch of records far more events than a batch: apply at most
        # worker_batch_size events per transaction, in order.
        size = self.settings.worker_batch_size
        for start in range(0, len(decoded), size):
            await apply_isolating(decoded[start : start + size], self._apply_and_arm, self._park)
        now = time.time()
        for message in batch:  # applied or parked: either way its wait is over
            self._event_age.observe(now - message.timestamp)

    async def _apply_and_arm(self, items: Sequence[tuple[Any, ConversationEvent]]) -> None:
        # A lone event gets worker_retries tries before it is parked; a larger batch that fails
        # for its own reasons is split at once (retrying it whole would fail the same way).
        retries = self.settings.worker_retries if len(items) == 1 else 0
        result = await self._apply([record for _, record in items], retries)
        self.scheduler.apply(result.actions)
        if result.outbox or result.queued:
            self.outbox_written({s.partition for s in result.queued})
        if result.queued:
            self.sends_queued(result.queued)

    async def _park(self, item: tuple[Any, ConversationEvent], exc: BaseException) -> None:
        await self.dead_letter(item[0], f"{type(exc).__name__}: {exc}", self.settings.worker_retries + 1)

    async def _apply(self, records: list[ConversationEvent], retries: int) -> BatchResult:
        """Apply in one transaction, with retries (see with_retries)."""

        async def once() -> BatchResult:
            async with (await self.pool()).acquire() as conn:
                return await apply_batch(conn, records, self.policy, self.settings.topic_partitions)

        what = f"lifecycle: batch of {len(records)} (first {records[0].event_id})"
        result = await with_retries(once, retries=retries, what=what)
        self.applied += result.applied
        return result

    async def dead_letter(self, msg: Any, error: str, attempts: int) -> None:
        """Park one record (a Faust Message) on the dead-letter topic and wait for Kafka's ack."""
        key = msg.key.decode(errors="replace") if msg.key else None
        log.error(
            "lifecycle: dead-lettering %s[%d]@%d key=%s: %s",
            msg.topic,
            msg.partition,
            msg.offset,
            key,
            error,
            extra={"thread_key": key},
        )
        letter = DeadLetter.bounded(
            source_topic=msg.topic,
            partition=msg.partition,
            offset=msg.offset,
            key=key,
            raw=bytes(msg.value or b""),
            error=error,
            attempts=attempts,
            failed_at=datetime.now(UTC),
        )
        await self._park_letter(msg.key, letter, f"{msg.topic}[{msg.partition}]@{msg.offset}")

    async def park_send(self, send: Any, error: str) -> None:
        """A dead letter for an outbound message that failed for good (agents/sender.py): where
        operators look for what did not go out; `POST /v1/messages/{id}/retry` sends it again."""
        raw = orjson.dumps({"message_id": send.id, "conversation_id": send.conversation_id, **send.content})
        letter = DeadLetter.bounded(
            source_topic=self.topics.sends,
            partition=send.partition,
            offset=-1,  # not a record of the topic: the send's state is in outbound_sends
            key=send.channel_id,
            raw=raw,
            error=f"{error} (retry with POST /v1/messages/{send.id}/retry)",
            attempts=send.attempts,
            failed_at=datetime.now(UTC),
        )
        await self._park_letter(send.channel_id.encode(), letter, f"send {send.id}")

    async def _park_letter(self, key: bytes | None, letter: DeadLetter, what: str) -> None:
        value = letter.model_dump_json().encode()
        delay = 0.1
        while True:
            # Parking must not fail: the batch is acked only after the letter is in Kafka.
            # A bounded letter always fits in a record, so what remains is the broker being
            # unavailable: retry, holding the partition, until it takes the letter.
            try:
                await self._produce_letter(key, value)
                break
            except Exception as exc:  # noqa: BLE001 - any producer failure: retry
                self.parking_failures += 1
                log.error(
                    "lifecycle: parking %s failed (%s: %s); retrying in %.1fs",
                    what,
                    type(exc).__name__,
                    exc,
                    delay,
                )
                await asyncio.sleep(delay)  # backoff between retries, not synchronisation
                delay = min(delay * 2, 10.0)
        self.dead_lettered += 1
