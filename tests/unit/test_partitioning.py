"""The timer rebuild and the sweep pick partitions exactly as the producers do."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from aiokafka.partitioner import DefaultPartitioner

from agents.ledger import prune_cut
from streams.topics import partition_of, thread_key


def test_partition_of_matches_the_producers_default_partitioner() -> None:
    partitioner = DefaultPartitioner()
    for n in (1, 3, 8, 12):
        partitions = list(range(n))
        for i in range(500):
            key = thread_key("ch-1", f"55119{i:07d}")
            assert partition_of(key, n) == partitioner(key, partitions, partitions)


def test_ledger_cut_is_retention_plus_margin_and_never_for_infinite_retention() -> None:
    now = datetime(2026, 12, 1, tzinfo=UTC)
    assert prune_cut(now, timedelta(days=7), timedelta(days=1)) == now - timedelta(days=8)
    assert prune_cut(now, timedelta(seconds=-1), timedelta(days=1)) is None
