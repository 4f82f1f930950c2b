"""Topic names, partitioning, and the thread key every conversation topic is keyed by."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError
from aiokafka.partitioner import murmur2

from streams.settings import Settings

CHANNEL_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def thread_key(channel_id: str, contact_id: str) -> bytes:
    """The partition key of a conversation thread: all its events land on one partition."""
    # Channel ids cannot hold '/', so the first '/' always separates the two parts.
    return f"{channel_id}/{contact_id}".encode()


def partition_of(key: bytes, partitions: int) -> int:
    """The partition the producer's default partitioner (aiokafka, Java client) picks for a key."""
    return int(murmur2(key) & 0x7FFFFFFF) % partitions


_MEMO_LIMIT = 100_000  # keys remembered per partition count (~10 MB at most)
_memos: dict[int, dict[str, int]] = {}


def partitioner(partitions: int) -> Callable[[str], int]:
    """A key's partition, memoised for the process (murmur2 in Python costs ~5 us a key, and a
    busy thread's key comes back in every batch); the memo starts over past _MEMO_LIMIT keys."""
    seen = _memos.setdefault(partitions, {})

    def partition(key: str) -> int:
        p = seen.get(key)
        if p is None:
            if len(seen) >= _MEMO_LIMIT:
                seen.clear()
            p = seen[key] = partition_of(key.encode(), partitions)
        return p

    return partition


def split_thread_key(key: bytes) -> tuple[str, str]:
    """Inverse of thread_key."""
    channel_id, _, contact_id = key.decode().partition("/")
    return channel_id, contact_id


@dataclass(frozen=True)
class Topics:
    """Names of every topic, derived from one prefix so tests can isolate themselves."""

    prefix: str

    @property
    def conversation_events(self) -> str:
        """Everything that changes a conversation: user messages, commands, timer firings."""
        return f"{self.prefix}.conversation-events"

    @property
    def dead_letters(self) -> str:
        """Events the pipeline could not process, with their error."""
        return f"{self.prefix}.dead-letters"

    @property
    def outgoing_events(self) -> str:
        """Events Parley emits (a schedule fired, ...), published from the outbox table."""
        return f"{self.prefix}.outgoing-events"

    @property
    def sends(self) -> str:
        """Accepted outbound messages, keyed by channel: one worker paces each business number."""
        return f"{self.prefix}.sends"

    def sources(self) -> list[str]:
        """Topics that are the source of truth for replay (long retention)."""
        return [self.conversation_events]

    def all(self) -> list[str]:
        """Every topic the project creates."""
        return [*self.sources(), self.dead_letters, self.outgoing_events, self.sends]


async def ensure_topics(settings: Settings) -> Topics:
    """Create the project's topics with explicit partition counts; existing ones are kept."""
    topics = Topics(settings.topic_prefix)
    seconds = settings.topic_retention.total_seconds()
    retention_ms = "-1" if seconds < 0 else str(int(seconds * 1000))  # -1: keep forever
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap_servers)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        wanted = [
            NewTopic(
                name,
                num_partitions=settings.topic_partitions,
                replication_factor=settings.topic_replication,
                topic_configs={"retention.ms": "-1" if name == topics.dead_letters else retention_ms},
            )
            for name in topics.all()
            if name not in existing
        ]
        if wanted:
            try:
                await admin.create_topics(wanted)
            except TopicAlreadyExistsError:
                pass  # a concurrent process created it first; same config
    finally:
        await admin.close()
    return topics
