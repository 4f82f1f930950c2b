"""A batch-level consumption path inside the Faust app (performance issue 11).

Faust dispatches every fetched record on its own: `Consumer._drain_messages` runs
`wait_first(callback(message), suspend_flow.wait())` (two new tasks per record), the conductor
awaits flow control and the producer buffer, decodes an Event and queues it, and the stream
iterates it. On this box that caps a no-op agent at ~11k events/s. For the topics registered
here (`register`), the records of each getmany() go instead, as one list of Faust Messages, to a
`BatchIntake` that the topic's agent drains (`consume_batches`): no Event, no task per record.

Faust still owns everything else, unchanged: group membership and assignment (so its tables stay
co-partitioned with the source topic), table recovery, seeking, and offsets. A message is
tracked (`consumer.track_message`) when it reaches the intake, and acked (`consumer.ack`, the
same bookkeeping a Faust stream's ack ends in) only after `handle` returned for its batch; the
commit timer commits only runs of acked offsets (`Consumer._new_offset`). Topics not registered
(table changelogs, the dead letters) keep Faust's per-record path, in the same loop.

Rebalances and stops: delivery happens only while flow is active and in the generation the
records were fetched in (the rest is dropped, unacked, as Faust drops what is in its conductor
then); `flow_control.clear()` -- at a revocation, and again when flow resumes after Faust has
sought every partition back to its committed offset -- empties the intakes, like the agents'
queues. A batch already in `handle` finishes and is acked (it was handled; Faust's commit skips
partitions no longer assigned). A stop cancels the agent: the batch in hand is not acked.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, cast

import faust
from faust.transport.consumer import CONSUMER_FETCHING, Consumer
from faust.types import TP, Message
from mode import Service, ServiceT

from agents.runner import supervise

log = logging.getLogger(__name__)

_INTAKES = "_parley_batch_intakes"  # attribute of the app: topic name -> BatchIntake


class BatchIntake:
    """One topic's messages, fetched and not yet taken by its agent, in fetch order (so in offset
    order within a partition). Backpressure: two batches behind, the partitions it is fed from
    are taken out of the fetch (`Consumer.on_buffer_full`, what Faust's own stream buffers use)
    until it is down to less than one batch (`on_buffer_drop`)."""

    def __init__(self, app: faust.App, topic: str, limit: int) -> None:
        self.app = app
        self.topic = topic
        self.limit = limit
        self.pending: list[Message] = []
        self.ready = asyncio.Event()
        self.paused: set[TP] = set()
        self.dropped = 0  # messages cleared by a rebalance (fetched again from the committed offset)
        # Cleared while an operator pauses this part (POST /v1/admin/pause): the agent takes no
        # batch; what was fetched waits unacked, and backpressure stops the fetch two batches in.
        self.running = asyncio.Event()
        self.running.set()

    def hold(self, paused: bool) -> None:
        """Pause (True) or resume (False) the agent that drains this intake."""
        if paused:
            self.running.clear()
        else:
            self.running.set()

    def put(self, messages: list[Message]) -> None:
        self.pending.extend(messages)
        self.ready.set()
        if len(self.pending) >= 2 * self.limit:
            consumer = self.app.consumer
            # ConsumerMessage.tp is aiokafka's TopicPartition; Faust's sets want its own TP.
            for tp in {TP(t, p) for t, p in {m.tp for m in messages}} - self.paused:
                consumer.on_buffer_full(tp)
                self.paused.add(tp)

    def take(self) -> list[Message]:
        """The next batch (at most `limit`), in order."""
        batch = self.pending[: self.limit]
        del self.pending[: self.limit]
        if not self.pending:
            self.ready.clear()
        if self.paused and len(self.pending) < self.limit:
            consumer = self.app.consumer
            for tp in self.paused:
                consumer.on_buffer_drop(tp)
            self.paused.clear()
        return batch

    def clear(self) -> None:
        """Called by `app.flow_control.clear()` (a rebalance): forget what is not taken yet."""
        self.dropped += len(self.pending)
        self.pending.clear()
        self.ready.clear()
        if self.paused:
            # Not back into the active set: Faust sets it from the new assignment.
            consumer = cast(Consumer, self.app.consumer)
            consumer._buffered_partitions.difference_update(self.paused)
            self.paused.clear()


class SplitIntake:
    """A topic's intake split by partition (partition % n) into n BatchIntakes, each drained by
    its own writer (`consume_batches`): n batches of disjoint partitions are handled at once, so
    one batch's Postgres round trips overlap another's decoding and planning. Order and acks stay
    per partition, as with one intake: a partition is always in the same part."""

    def __init__(self, app: faust.App, topic: str, limit: int, n: int) -> None:
        self.topic = topic
        self.parts = [BatchIntake(app, topic, limit) for _ in range(n)]
        self.running = asyncio.Event()  # shared: a pause holds every part
        self.running.set()
        for part in self.parts:
            part.running = self.running

    @property
    def pending(self) -> list[Message]:
        return [m for part in self.parts for m in part.pending]

    def hold(self, paused: bool) -> None:
        self.parts[0].hold(paused)

    def put(self, messages: list[Message]) -> None:
        n = len(self.parts)
        routed: list[list[Message]] = [[] for _ in range(n)]
        for message in messages:
            routed[message.partition % n].append(message)
        for part, mine in zip(self.parts, routed, strict=True):
            if mine:
                part.put(mine)

    def clear(self) -> None:
        for part in self.parts:
            part.clear()


Intake = BatchIntake | SplitIntake


def intakes(app: Any) -> dict[str, Intake]:
    found: dict[str, Intake] | None = getattr(app, _INTAKES, None)
    if found is None:
        found = {}
        setattr(app, _INTAKES, found)
    return found


def register(app: faust.App, topic: faust.TopicT, limit: int, writers: int = 1) -> Intake:
    """Route `topic`'s records to a BatchIntake (the topic must also have a Faust agent, so that
    Faust subscribes to it and owns its partitions); with writers > 1, to a SplitIntake."""
    name = topic.get_topic_name()
    intake: Intake = BatchIntake(app, name, limit) if writers == 1 else SplitIntake(app, name, limit, writers)
    intakes(app)[name] = intake
    # Cleared with the agents' queues; mode keeps these in a WeakSet (the app's dict holds it).
    app.flow_control.manage_queue(intake)  # type: ignore[arg-type]
    return intake


async def _deliver(consumer: Consumer, intake: Intake, messages: list[Message]) -> None:
    app = consumer.app
    await app.flow_control.acquire()  # suspended while a rebalance runs
    await app.producer.buffer.wait_until_ebb()  # table writes queued past max_messages
    generation = app.consumer_generation_id
    if messages[0].generation_id != generation or messages[-1].generation_id != generation:
        # Fetched before a rebalance: Faust has sought back to the committed offsets since.
        messages = [m for m in messages if m.generation_id == generation]
        if not messages:
            return
    track = consumer.track_message
    for message in messages:
        track(message)
    inbound = app.monitor.stream_inbound_time  # Faust's livelock detector reads this per tp
    now = time.monotonic()
    for t, p in {m.tp for m in messages}:
        inbound[TP(t, p)] = now
    intake.put(messages)


# Faust's own loop (faust/transport/consumer.py), kept for apps with nothing registered.
_faust_drain_messages = Consumer._drain_messages


async def _drain_messages(self: Consumer, fetcher: ServiceT) -> None:
    """Faust's `Consumer._drain_messages`, with records of registered topics collected per
    getmany() and delivered as one list per topic after it (everything else: as in Faust)."""
    registered = intakes(self.app)
    if not registered:
        return await _faust_drain_messages(self, fetcher)
    callback = self.callback
    getmany = self.getmany
    consumer_should_stop = cast(Service, self)._stopped.is_set
    fetcher_should_stop = cast(Service, fetcher)._stopped.is_set
    get_read_offset = self._read_offset.__getitem__
    set_read_offset = self._read_offset.__setitem__
    commit_every = self._commit_every
    acks_enabled_for = self.app.topics.acks_enabled_for
    sleep = asyncio.sleep
    yield_every = 100
    num_since_yield = 0
    try:
        while not (consumer_should_stop() or fetcher_should_stop()):
            self.diag.set_flag(CONSUMER_FETCHING)
            ait = getmany(timeout=1.0)
            await self.sleep(0)
            if self.should_stop:
                continue
            collected: dict[str, list[Message]] = {}
            async for tp, message in ait:
                offset = message.offset
                r_offset = get_read_offset(tp)
                if r_offset is None or offset >= r_offset:
                    gap = offset - (r_offset or 0)
                    if gap > 1 and r_offset and acks_enabled_for(message.topic):
                        await self._add_gap(tp, r_offset + 1, offset)
                    batch = collected.get(tp.topic)
                    if batch is not None:
                        batch.append(message)
                    elif tp.topic in registered:
                        collected[tp.topic] = [message]
                    else:
                        num_since_yield += 1
                        if num_since_yield > yield_every:
                            await sleep(0)
                            num_since_yield = 0
                        if commit_every is not None and self._n_acked >= commit_every:
                            self._n_acked = 0
                            await self.commit()
                        await self.wait_first(callback(message), self.suspend_flow.wait())
                    set_read_offset(tp, offset)
            for topic, messages in collected.items():
                # Dropped (unacked) if a rebalance stops the flow meanwhile, as in Faust.
                await self.wait_first(_deliver(self, registered[topic], messages), self.suspend_flow.wait())
            self.diag.unset_flag(CONSUMER_FETCHING)
    except self.consumer_stopped_errors:
        if self.transport.app.should_stop:
            log.debug("Broker stopped consumer, shutting down...")  # Faust's own line, at DEBUG like theirs
            return
        raise
    except asyncio.CancelledError:
        if self.transport.app.should_stop:
            log.debug("Consumer shutting down for user cancel.")
            return
        raise
    except Exception as exc:
        log.exception("Drain messages raised: %r", exc)
        raise
    finally:
        self.diag.unset_flag(CONSUMER_FETCHING)


def install() -> None:
    """Patch Faust's consumer loop (idempotent); apps without registered topics are unaffected."""
    Consumer._drain_messages = _drain_messages  # type: ignore[method-assign]


async def consume_batches(
    intake: Intake,
    *,
    linger: float,
    handle: Callable[[list[Any]], Awaitable[None]],
    name: str,
    on_fatal: Callable[[BaseException], None],
    arrived: Callable[[Message], None] | None = None,
    handled: Callable[[int, float], None] | None = None,
) -> None:
    """Handle an intake's messages in batches of at most `intake.limit`, acking each message
    only after `handle` returned for its batch (the contract of runner.consume_in_batches).

    Batches grow with load: while one is handled the next accumulates; an idle worker handles a
    lone message after `linger`. `handle` must never raise for a message's own reasons (park it);
    if it does, `on_fatal` runs and nothing past the last handled batch (of that writer) is acked.
    A SplitIntake gets one writer per part: `handle` then runs for disjoint partitions at once.
    """
    queues = intake.parts if isinstance(intake, SplitIntake) else [intake]

    async def writer(intake: BatchIntake) -> None:
        ack = intake.app.consumer.ack
        while True:
            await intake.ready.wait()
            await intake.running.wait()
            if len(intake.pending) < intake.limit and linger > 0:
                await asyncio.sleep(linger)  # batching window, not synchronisation
            batch = intake.take()
            if not batch:
                continue  # cleared by a rebalance meanwhile
            if arrived is not None:
                for message in batch:
                    arrived(message)
            started = time.perf_counter()
            await handle(batch)
            for message in batch:
                ack(message)
            if handled is not None:
                handled(len(batch), time.perf_counter() - started)

    tasks = set()
    for i, queue in enumerate(queues):
        task = asyncio.create_task(writer(queue))
        supervise(task, name if len(queues) == 1 else f"{name} {i}", on_fatal)
        tasks.add(task)
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
