"""Builds the Faust app: idempotent producer, manual-ack batching, agents registered."""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta
from typing import Any

import faust
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.transport.producer import ProducerBuffer

from agents import batching, deadletters
from agents.ledger import LedgerPruner
from agents.lifecycle import LifecycleAgent
from agents.metrics import serve
from agents.outbox import OutboxRelay
from agents.pause import PauseSwitch
from agents.sender import SendAgent
from agents.sweep import Sweep
from agents.webhooks import WebhookAgent
from streams.settings import Settings
from streams.topics import Topics


class _IdempotentProducer(faust_aiokafka.Producer):
    """Faust only asks aiokafka for idempotence inside transactions; we want it always."""

    def _settings_extra(self) -> dict[str, Any]:
        return {"acks": "all", "enable_idempotence": True}


# The transport builds its producer from this class attribute.
faust_aiokafka.Transport.Producer = _IdempotentProducer


log = logging.getLogger(__name__)


class _SeekingConsumer(faust_aiokafka.Consumer):
    """Seeks to the committed offsets with the flow stopped.

    Every rebalance ends with Faust resuming the stream partitions and then seeking them to
    their committed offsets (tables/recovery.py, on_recovery_completed). The loop delivering
    records may meanwhile be half-way through a batch fetched after the resume; the seek resets
    the read offsets under it. The rest of that batch then marks the offsets in between as a
    "gap" (committed as if acked) and moves the read offsets past them, so the same records
    fetched again from the committed offset are dropped as already read ("DROPPED MESSAGE
    ROFF"), while their first copies, still in the agent's queue, were cleared when the flow
    resumed: events lost (tests/integration/test_rebalance_stream.py). With the flow stopped,
    that loop abandons its batch at the next record (getmany checks the flow per record); the
    seek then rewinds what it skipped."""

    SEEK_ATTEMPTS = 5

    async def perform_seek(self) -> None:
        flowing = self.flow_active
        self.stop_flow()
        try:
            await self._seek_until_done()
        finally:
            if flowing:
                self.resume_flow()

    async def _seek_until_done(self) -> None:
        """Faust's seek, again while it fails. It fails when the assignment changes under it
        (IllegalStateError: "No current assignment for partition"): some partitions are then
        rewound and others not, and Faust's read offsets are not reset, so the records between
        the committed offsets and where the fetch had got to were neither delivered again nor
        acked: lost until some later rebalance (56 of 8,440 in one full-suite run of
        test_rebalance_stream, after this warning). Retried on the assignment as it is now; if
        it still fails, the read offsets are forgotten, so what is fetched next is delivered (a
        record seen twice is a ledger duplicate; one skipped would be lost)."""
        for attempt in range(1, self.SEEK_ATTEMPTS + 1):
            try:
                await super().perform_seek()
                return
            except Exception as exc:
                if attempt == self.SEEK_ATTEMPTS:
                    self._read_offset.clear()
                    raise
                log.warning(
                    "seek to committed offsets failed (%s: %s); seeking again", type(exc).__name__, exc
                )
                await asyncio.sleep(0.1 * attempt)  # let the assignment settle


faust_aiokafka.Transport.Consumer = _SeekingConsumer

# Faust hard-codes fetch_max_wait_ms=1500 for the worker's consumer. aiokafka keeps one fetch in
# flight per broker, and leaves out of it the partitions whose records are not consumed yet; so
# when the in-flight fetch covers only quiet partitions (the other topics), the busy ones wait
# for it to expire: up to 1.5 s per hop, ~1.2 s median at 1,000 events/s (bench/webhooks.py).
FETCH_MAX_WAIT_MS = 20
_create_worker_consumer = faust_aiokafka.AIOKafkaConsumerThread._create_worker_consumer


def _quick_fetches(self: Any, transport: Any) -> Any:
    consumer = _create_worker_consumer(self, transport)
    consumer._fetch_max_wait_ms = FETCH_MAX_WAIT_MS  # read by the fetcher at start()
    return consumer


faust_aiokafka.AIOKafkaConsumerThread._create_worker_consumer = _quick_fetches  # type: ignore[method-assign]
# Table writes queue in Faust's producer buffer, which Faust flushes before it commits source
# offsets (so a timer is in the changelog before its event counts as consumed). Past
# max_messages (100) Faust pauses the stream until that many drained; our writes come in bursts
# after each batch. 1,000 measured best here: 10,000 made each pause seconds long, writing the
# changelog ourselves and awaiting it per batch was slower (bench, Nov 2026).
ProducerBuffer.max_messages = 1_000
# The lifecycle, webhook fan-out and send agents take each fetch's records as one list of
# Messages, not one Event per record (agents/batching.py: Consumer._drain_messages, for the
# topics registered there only; everything else keeps Faust's per-record path).
batching.install()


def broker_urls(bootstrap: str) -> list[str]:
    """Faust wants kafka:// URLs; the setting is the usual host:port,host:port list."""
    return [f"kafka://{host.strip()}" for host in bootstrap.split(",") if host.strip()]


def create_app(settings: Settings) -> tuple[faust.App, LifecycleAgent]:
    """The worker's Faust app with every agent attached."""
    app = faust.App(
        settings.app_id,
        broker=broker_urls(settings.kafka_bootstrap_servers),
        store="memory://",
        datadir=str(settings.data_dir / "faust"),
        topic_partitions=settings.topic_partitions,
        topic_replication_factor=settings.topic_replication,
        # Our topics exist already (created with explicit configs by ensure_topics); this lets
        # Faust create only its own internal ones (assignor leader, table changelogs).
        topic_allow_declare=True,
        web_enabled=False,
        producer_acks=-1,
        consumer_auto_offset_reset="earliest",
        broker_commit_interval=0.5,
        broker_session_timeout=settings.kafka_session_timeout.total_seconds(),
        broker_heartbeat_interval=settings.kafka_session_timeout.total_seconds() / 5,
        # Commits run on the interval timer only. With commit_every, the fetcher commits inline,
        # and a commit first flushes the producer (our timer-table writes): the stream stalls
        # for as long as that takes (seconds, measured). Redelivery after a crash is a no-op.
        broker_commit_every=10_000_000,
        stream_buffer_maxsize=settings.worker_batch_size * 4,
        stream_wait_empty=False,
        logging_config=None,
    )
    topics = Topics(settings.topic_prefix)
    lifecycle = LifecycleAgent(app, settings, topics)
    lifecycle.register()
    deadletters.register(app, lifecycle.dead_letters, lifecycle.pool, settings.worker_retries)
    lifecycle.scheduler.attach_postgres(lifecycle.pool)
    sweep = Sweep(
        lifecycle.pool,
        lifecycle.source,
        settings.sweep_interval,
        app=app,
        partitions=settings.topic_partitions,
        max_refires=settings.sweep_max_refires,
    )
    pruner = LedgerPruner(
        lifecycle.pool,
        settings.topic_retention,
        settings.ledger_prune_margin,
        settings.ledger_prune_interval,
        None if settings.retention_days is None else timedelta(days=settings.retention_days),
    )
    app.task(lifecycle.scheduler.run)
    app.task(lifecycle.scheduler.load_ahead)
    app.task(sweep.run)
    app.task(pruner.run)
    outbox = OutboxRelay(
        lifecycle.pool,
        settings.kafka_bootstrap_servers,
        topics.outgoing_events,
        settings.topic_partitions,
        lifecycle.scheduler.owned,
    )
    lifecycle.outbox_written = outbox.wake
    app.task(outbox.run)
    outgoing = app.topic(topics.outgoing_events, key_serializer="raw", value_serializer="raw")
    webhooks = WebhookAgent(app, settings, outgoing, lifecycle.pool, lifecycle.dead_letter, lifecycle.fatal)
    webhooks.register()
    dispatcher = webhooks.dispatcher
    sends = app.topic(topics.sends, key_serializer="raw", value_serializer="raw")
    outbox.topics["sends"] = topics.sends
    sending = SendAgent(app, settings, sends, lifecycle.pool, lifecycle.fatal)
    sending.sender.park = lifecycle.park_send
    sending.register()
    sender = sending.sender
    lifecycle.sends_queued = sender.take_local
    switch = PauseSwitch(settings.database_url)
    switch.add("lifecycle", lifecycle.intake)
    switch.add("webhooks", webhooks.intake, dispatcher)
    switch.add("sender", sending.intake, sender)
    app.task(switch.run)

    async def stop_relay(sender: Any, *args: Any, signal: Any, **kwargs: Any) -> None:
        await outbox.stop()

    app.on_before_shutdown.connect(stop_relay)  # type: ignore[arg-type]  # mode types it loosely

    async def metrics() -> None:
        def gauges() -> dict[str, float]:
            lateness = sorted(lifecycle.scheduler.lateness_ms) or [0.0]
            return {
                "parley_lifecycle_events_applied_total": lifecycle.applied,
                "parley_lifecycle_dead_lettered_total": lifecycle.dead_lettered,
                "parley_partitions_assigned": len(lifecycle.scheduler.owned()),
                "parley_timers_active": len(lifecycle.scheduler.wheel),
                "parley_timers_fired_total": lifecycle.scheduler.fired,
                "parley_timers_repaired_total": lifecycle.scheduler.repaired,
                "parley_timers_dropped_total": lifecycle.scheduler.dropped,
                "parley_timers_loaded_total": lifecycle.scheduler.loaded,
                # every owned action due before this (s since epoch) is in memory; 0: not loaded yet
                "parley_timers_loaded_until_seconds": lifecycle.scheduler.horizon.loaded_until / 1000,
                "parley_timer_lateness_p99_seconds": lateness[int(0.99 * (len(lateness) - 1))] / 1000,
                "parley_sweep_runs_total": sweep.runs,
                "parley_sweep_refired_total": sweep.refired_total,
                "parley_lifecycle_parking_failures_total": lifecycle.parking_failures,
                "parley_lifecycle_writer_up": 0 if lifecycle.failure else 1,
                "parley_sweep_skipped_total": sweep.skipped_total,
                "parley_ledger_pruned_total": pruner.pruned_total,
                "parley_outbox_pruned_total": pruner.outbox_pruned_total,
                "parley_retention_conversations_deleted_total": pruner.expired_total,
                "parley_outbox_published_total": outbox.published,
                "parley_webhook_deliveries_created_total": webhooks.fanned_out,
                "parley_webhook_delivered_total": dispatcher.delivered,
                "parley_webhook_failed_attempts_total": dispatcher.failed_attempts,
                "parley_webhook_parked_total": dispatcher.parked,
                "parley_webhook_pending": dispatcher.pending,
                "parley_webhook_in_flight": sum(dispatcher.inflight.values()),
                "parley_sends_sent_total": sender.sent,
                "parley_sends_failed_total": sender.failed,
                "parley_sends_retried_total": sender.retried,
                "parley_sends_in_doubt_total": sender.in_doubt,
                "parley_sends_resent_after_doubt_total": sender.resends_in_doubt,
                "parley_sends_pending": sender.pending,
                "parley_sends_taken_in_process_total": sender.taken_local,
                "parley_lifecycle_intake_pending": len(lifecycle.intake.pending),
                **{f'parley_paused{{part="{part}"}}': int(part in switch.paused) for part in switch.parts},
            }

        def health() -> str | None:
            failure = lifecycle.failure
            return None if failure is None else f"lifecycle writer died: {type(failure).__name__}"

        def lag() -> dict[tuple[str, int], int]:
            consumer = app.consumer
            committed: Any = getattr(consumer, "_committed_offset", {})
            found: dict[tuple[str, int], int] = {}
            try:
                assigned = consumer.assignment()
            except Exception:  # noqa: BLE001 - consumer not started yet: nothing assigned
                return found
            for tp in assigned:
                try:
                    end = consumer.highwater(tp)
                except Exception:  # noqa: BLE001 - no fetch of it yet: end offset unknown
                    end = None
                if end is not None:  # none committed yet: everything in it is to be read
                    found[(tp.topic, tp.partition)] = max(0, end - (committed.get(tp) or 0))
            return found

        await serve(settings.http_host, settings.worker_metrics_port, gauges, health, lag)

    app.task(metrics)
    return app, lifecycle
