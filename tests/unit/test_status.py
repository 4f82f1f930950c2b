"""parley/status.py's pure parts: metrics parsing, lag arithmetic, the screen."""

from __future__ import annotations

from datetime import UTC, datetime

from aiokafka import TopicPartition

from agents.metrics import render as render_metrics
from parley.status import Status, TopicLag, lag_by_topic, parse_metrics, render
from streams.settings import Settings


def test_metrics_round_trip_through_the_workers_own_renderer() -> None:
    values = {
        "parley_partitions_assigned": 8,
        "parley_timers_loaded_until_seconds": 1764650000.123,
        "x": 0.25,
    }
    assert parse_metrics("# HELP ignored\n" + render_metrics(values) + "garbage line\n") == values


def test_lag_is_end_minus_committed_and_counts_from_the_log_start_where_nothing_is_committed() -> None:
    a0, a1, b0 = TopicPartition("a", 0), TopicPartition("a", 1), TopicPartition("b", 0)
    ends = {a0: 10, a1: 7, b0: 5}
    starts = {a0: 0, a1: 2, b0: 0}
    committed = {a0: 4, b0: 5, TopicPartition("other", 0): 3}
    assert lag_by_topic(ends, starts, committed) == {
        "a": TopicLag(lag=6 + 5, partitions=2, uncommitted=1, end=17),
        "b": TopicLag(lag=0, partitions=1, uncommitted=0, end=5),
    }
    # -1 is what Kafka answers for "no committed offset"
    assert lag_by_topic({a0: 3}, {a0: 1}, {a0: -1}) == {"a": TopicLag(2, 1, 1, 3)}


def test_the_screen_shows_readiness_lag_and_counts() -> None:
    status = Status(
        ready=False,
        readiness_source="http://x/readyz",
        checks={"api": "ok", "postgres": "ok", "kafka": "ok", "worker": "not ready"},
        worker=None,
        lag={"p.conversation-events": TopicLag(1234, 8, 0)},
        counts={"conversations": {"closed": 3, "idle": 2}, "dead letters": {"not retried": 1}},
        newest_dead_letter=datetime(2026, 12, 2, 7, 0, tzinfo=UTC),
        errors={"worker metrics": "http://x:9464/metrics: ClientConnectorError"},
    )
    screen = render(status, Settings(), now=datetime(2026, 12, 2, 8, 0, tzinfo=UTC))
    assert "ready:          NO  (api ok, postgres ok, kafka ok, worker not ready" in screen
    assert "p.conversation-events" in screen and "1,234  (8 partitions)" in screen
    assert "conversations:  2 idle, 3 closed" in screen
    assert "dead letters:   1 not retried (newest 2026-12-02 07:00:00 UTC)" in screen
    assert "sends:          none" in screen
    assert "unavailable:    worker metrics: http://x:9464/metrics" in screen
