"""The API's Kafka producer: idempotent, acks=all; a request is answered after Kafka's ack.

Batching records across requests (queue per partition for 1 ms, then one closed batch through
create_batch/send_batch) was tried and measured: no less API CPU per webhook (166-186 us vs
148-187 us with one send() per record, same runs), because at a few thousand webhooks a second
over 8 partitions a 1 ms window holds about one record per partition, and aiokafka's accumulator
already puts the records of one partition into one batch while a request is in flight. Not kept.
"""

from __future__ import annotations

import asyncio

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from api.metrics import PRODUCE
from streams.settings import Settings


class KafkaUnavailable(Exception):
    """Kafka did not acknowledge in time; the sender should retry (HTTP 503)."""


class Ingress:
    """Produces records keyed by thread and waits for the broker's acknowledgement."""

    def __init__(self, settings: Settings) -> None:
        self.timeout = timeout = settings.produce_timeout.total_seconds()
        self.producer = AIOKafkaProducer(
            bootstrap_servers=settings.kafka_bootstrap_servers,
            enable_idempotence=True,
            acks="all",
            linger_ms=2,
            request_timeout_ms=int(timeout * 1000),
            max_batch_size=256 * 1024,
        )

    async def start(self) -> None:
        """Connect; retried by the caller's supervisor if Kafka is not up yet."""
        await self.producer.start()

    async def stop(self) -> None:
        """Flush and close."""
        await self.producer.stop()

    async def send(self, topic: str, key: bytes, value: bytes) -> None:
        """Produce one record and wait for acks=all, or raise KafkaUnavailable."""
        try:
            with PRODUCE.time():
                # asyncio.timeout, not wait_for: wait_for wraps each await in a task of its own
                # (two per webhook were ~9% of the API's CPU in a profile).
                async with asyncio.timeout(self.timeout):
                    await (await self.producer.send(topic, value=value, key=key))
        except (KafkaError, TimeoutError) as exc:
            raise KafkaUnavailable(f"{type(exc).__name__}: {exc}") from exc

    async def send_many(self, topic: str, records: list[tuple[bytes, bytes]]) -> None:
        """Produce several records (one webhook may carry many) and wait for all acks."""
        try:
            with PRODUCE.time():
                async with asyncio.timeout(self.timeout):
                    futs = [await self.producer.send(topic, value=v, key=k) for k, v in records]
                    await asyncio.gather(*futs)
        except (KafkaError, TimeoutError) as exc:
            raise KafkaUnavailable(f"{type(exc).__name__}: {exc}") from exc
