"""The batch route's bundles: one record per partition, read back as the puts in order."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import orjson
import pytest
from pydantic import ValidationError

from agents.lifecycle import LifecycleAgent
from streams.records import SchedulePut, bundle_puts, events_of, keyed
from streams.topics import partition_of, partitioner

NOW = datetime(2030, 1, 1, tzinfo=UTC)


def _put(key: str, n: int = 0, payload_bytes: int = 0) -> SchedulePut:
    return SchedulePut(
        event_id=f"sched:test.{key}.{n}",
        key=key,
        run_at=NOW + timedelta(hours=1),
        event_type="t",
        payload={"n": n, "pad": "x" * payload_bytes},
        issued_at=NOW,
    )


def test_one_record_per_partition_keyed_into_it_with_the_puts_in_order() -> None:
    puts = [_put(f"k{i % 37}", i) for i in range(500)]  # repeated keys: their order must hold
    records = bundle_puts(puts, partitioner(8), limit=900_000)
    assert len(records) == len({partition_of(f"schedule:{p.key}".encode(), 8) for p in puts}) <= 8
    read: list[SchedulePut] = []
    for key, value in records:
        events = [e for e in events_of(value) if isinstance(e, SchedulePut)]
        assert len(events) == len(events_of(value))
        assert {partition_of(f"schedule:{e.key}".encode(), 8) for e in events} == {partition_of(key, 8)}
        read += events
    assert sorted(read, key=puts.index) == puts  # nothing lost or added
    for name in {p.key for p in puts}:  # per schedule key, the request's order
        assert [e for e in read if e.key == name] == [p for p in puts if p.key == name]


def test_a_bundle_is_split_under_the_size_limit_in_order() -> None:
    puts = [_put("same", i, payload_bytes=1000) for i in range(50)]  # one partition, ~1.2 kB each
    records = bundle_puts(puts, partitioner(8), limit=10_000)
    assert len(records) > 5
    assert all(len(k) + len(v) <= 10_000 for k, v in records)
    assert [e for _, v in records for e in events_of(v)] == puts


def test_a_single_event_reads_as_itself_and_garbage_raises() -> None:
    put = _put("one")
    key, value = keyed(put)
    assert key == b"schedule:one" and events_of(value) == [put]
    with pytest.raises(ValidationError):
        events_of(b'{"kind":"schedule.puts","puts":[]}')  # an empty bundle is not a record
    with pytest.raises(ValidationError):
        events_of(orjson.dumps({"kind": "schedule.puts", "puts": [{"kind": "schedule.cancel"}]}))


async def test_the_worker_applies_a_big_bundle_in_batches_of_at_most_its_batch_size() -> None:
    puts = [_put(f"k{i}", i) for i in range(25)]
    [(_, value)] = bundle_puts(puts, lambda _owner: 0, limit=900_000)
    message = SimpleNamespace(topic="t", partition=0, offset=7, timestamp=0.0, key=b"k", value=value)
    applied: list[list[Any]] = []

    async def apply(items: Sequence[tuple[Any, Any]]) -> None:
        applied.append([event for _, event in items])

    agent = SimpleNamespace(
        settings=SimpleNamespace(worker_batch_size=10),
        _apply_and_arm=apply,
        _park=None,  # nothing fails here
        _event_age=SimpleNamespace(observe=lambda _seconds: None),
    )
    await LifecycleAgent.handle(agent, [message])  # type: ignore[arg-type]
    assert [len(a) for a in applied] == [10, 10, 5]
    assert [e for a in applied for e in a] == puts
