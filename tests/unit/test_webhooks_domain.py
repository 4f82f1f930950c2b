"""The outcome of a webhook attempt: delivered, retried on schedule (Retry-After honoured),
parked after the last attempt, or the endpoint disabled (410, or failing for too long)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from domain.webhooks import ALL, Outcome, Step, after_attempt, subscribed

NOW = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)
SCHEDULE = (0.0, 5.0, 300.0, 1800.0)
FIVE_DAYS = timedelta(days=5)


def step(
    status: int | None,
    attempt: int,
    *,
    retry_after: float | None = None,
    since: datetime | None = None,
    jitter: float = 0.0,
) -> Step:
    outcome = Outcome(status, None if status and 200 <= status < 300 else "failed", retry_after)
    return after_attempt(
        outcome,
        attempt=attempt,
        schedule=SCHEDULE,
        now=NOW,
        failing_since=since,
        disable_after=FIVE_DAYS,
        jitter=jitter,
    )


def test_any_2xx_is_delivered() -> None:
    for status in (200, 201, 204, 299):
        assert step(status, 1).next == "delivered"
    assert step(300, 1).next == "retry"


def test_failures_follow_the_schedule_then_park() -> None:
    first = step(500, 1)
    assert (first.next, first.at, first.failing_since) == ("retry", NOW + timedelta(seconds=5), NOW)
    assert step(None, 2).at == NOW + timedelta(seconds=300)
    assert step(503, 3).at == NOW + timedelta(seconds=1800)
    last = step(500, 4)
    assert last.next == "parked" and last.at is None and "4 attempts" in (last.reason or "")


def test_jitter_only_delays_and_by_at_most_a_tenth() -> None:
    assert step(500, 1, jitter=0.999).at == NOW + timedelta(seconds=5 * 1.0999)


def test_retry_after_is_honoured_on_429_and_503_only() -> None:
    assert step(429, 1, retry_after=60).at == NOW + timedelta(seconds=60)
    assert step(503, 1, retry_after=60).at == NOW + timedelta(seconds=60)
    assert step(500, 1, retry_after=60).at == NOW + timedelta(seconds=5)
    assert step(429, 2, retry_after=2).at == NOW + timedelta(seconds=300)  # never shortens it


def test_410_disables_at_once() -> None:
    gone = step(410, 1)
    assert gone.next == "disabled" and "410" in (gone.reason or "")


def test_failing_for_the_whole_window_disables() -> None:
    assert step(500, 2, since=NOW - timedelta(days=4, hours=23)).next == "retry"
    off = step(500, 2, since=NOW - FIVE_DAYS)
    assert off.next == "disabled" and off.failing_since == NOW - FIVE_DAYS
    assert step(200, 2, since=NOW - FIVE_DAYS).next == "delivered"  # a success is never disabled


def test_subscriptions() -> None:
    assert subscribed([ALL], "conversation.closed")
    assert subscribed(["conversation.closed"], "conversation.closed")
    assert not subscribed(["conversation.closed"], "conversation.opened")
