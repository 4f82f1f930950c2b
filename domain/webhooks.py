"""Outgoing webhooks, the pure part: who gets an event, and what an attempt's outcome means.

An endpoint subscribes to event types (or "*"). Each (endpoint, event) pair is one delivery; the
deliveries of one endpoint and one event key (a conversation thread, a schedule) form a lane, sent
strictly one after the other in log order, so an endpoint sees a conversation's events in order.
An attempt's outcome decides the delivery's next step (`after_attempt`): delivered, retried at a
later time (the schedule, with jitter, or a longer Retry-After), parked after the last attempt,
or the endpoint disabled (410 Gone at once; failing every attempt for `disable_after`).
No IO and no clock here: the time and the random draw are parameters.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

ALL = "*"
EVENT_TYPE = re.compile(r"^[A-Za-z0-9._:/-]{1,200}$")  # what schedules allow as their event_type
PING = "ping"
ENDPOINT_DISABLED = "webhook_endpoint.disabled"
JITTER = 0.1  # a retry is delayed by up to 10% more than its schedule says


def subscribed(events: Sequence[str], event_type: str) -> bool:
    """Does an endpoint with these subscriptions receive events of this type?"""
    return ALL in events or event_type in events


@dataclass(frozen=True, slots=True)
class Outcome:
    """One attempt as the sender saw it (agents/webhook_client.Attempt, minus the body)."""

    status: int | None
    error: str | None
    retry_after: float | None  # seconds, already capped

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


Next = Literal["delivered", "retry", "parked", "disabled"]


@dataclass(frozen=True, slots=True)
class Step:
    """What happens after an attempt."""

    next: Next
    at: datetime | None = None  # the next attempt's time (retry only)
    failing_since: datetime | None = None  # the endpoint's first failure since its last success
    reason: str | None = None  # why the endpoint is disabled / the delivery parked


def after_attempt(
    outcome: Outcome,
    *,
    attempt: int,
    schedule: Sequence[float],
    now: datetime,
    failing_since: datetime | None,
    disable_after: timedelta,
    jitter: float,
) -> Step:
    """The delivery's next step after its `attempt`-th attempt (1-based, counted since the last
    manual retry); `jitter` is a draw in [0, 1)."""
    if outcome.ok:
        return Step("delivered")
    since = failing_since or now
    if outcome.status == 410:
        return Step("disabled", failing_since=since, reason="endpoint answered 410 Gone")
    if now - since >= disable_after:
        return Step("disabled", failing_since=since, reason=f"every attempt failed since {since.isoformat()}")
    if attempt >= len(schedule):
        return Step("parked", failing_since=since, reason=f"gave up after {attempt} attempts")
    delay = schedule[attempt] * (1 + JITTER * jitter)
    if outcome.retry_after is not None and outcome.status in (429, 503):
        delay = max(delay, outcome.retry_after)
    return Step("retry", at=now + timedelta(seconds=delay), failing_since=since)
