"""Lifecycle policy: per-state deadlines, close grace, reopen window, closure thresholds.

Durations come from settings as plain seconds ("90", 90, "1.5") or ISO-8601 durations limited
to weeks, days, hours, minutes and seconds ("PT3M", "P2D", "PT1H30M", "P1DT2H"). Years and
months are rejected because they have no fixed length. Every timeout is at least one second:
a zero deadline would close a conversation in the same instant it was opened.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from datetime import timedelta

from domain.closure_intent import ClosureDetector, PhraseClosureDetector
from domain.lifecycle import State

MIN_DURATION = timedelta(seconds=1)

_SECONDS = re.compile(r"\d+(?:\.\d+)?")
_ISO = re.compile(
    r"P(?:(?P<weeks>\d+)W)?(?:(?P<days>\d+)D)?"
    r"(?:T(?=\d)(?:(?P<hours>\d+)H)?(?:(?P<minutes>\d+)M)?(?:(?P<seconds>\d+(?:\.\d+)?)S)?)?",
    re.IGNORECASE,
)
_CALENDAR = re.compile(r"P[^T]*\d[YM]", re.IGNORECASE)
_HINT = "expected seconds (e.g. '90') or an ISO-8601 duration (e.g. 'PT3M', 'P2D')"


def parse_duration(value: str | int | float) -> timedelta:
    """Parse seconds or an ISO-8601 duration into a timedelta of at least one second."""
    try:
        duration = _to_timedelta(value)
    except OverflowError:
        raise ValueError(f"duration {value!r} is too large") from None
    if duration < MIN_DURATION:
        raise ValueError(f"duration {value!r} is below the minimum of 1 second")
    return duration


def _to_timedelta(value: str | int | float) -> timedelta:
    # bool is an int subclass; "True" seconds is a settings typo, not a duration.
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError(f"invalid duration {value!r}: {_HINT}")
    if not isinstance(value, str):
        if not math.isfinite(value):
            raise ValueError(f"invalid duration {value!r}: {_HINT}")
        return timedelta(seconds=value)
    text = value.strip()
    if _SECONDS.fullmatch(text):
        return timedelta(seconds=float(text) if "." in text else int(text))
    if _CALENDAR.match(text):
        raise ValueError(f"invalid duration {value!r}: years and months have no fixed length")
    match = _ISO.fullmatch(text)
    if match is None or not any(match.groups()):
        raise ValueError(f"invalid duration {value!r}: {_HINT}")
    parts = {name: float(number) for name, number in match.groupdict().items() if number}
    return timedelta(**parts)


@dataclass(frozen=True)
class LifecyclePolicy:
    """Timing and thresholds of the conversation lifecycle; frozen and hashable."""

    idle_timeout: timedelta = timedelta(hours=48)
    processing_timeout: timedelta = timedelta(hours=24)
    awaiting_confirmation_timeout: timedelta = timedelta(minutes=10)
    waiting_close_timeout: timedelta = timedelta(minutes=3)
    # An explicit close this soon after an automatic one upgrades the reason (seed scenario C).
    close_grace: timedelta = timedelta(seconds=30)
    # A user message this soon after a close reopens it; 0 means always open a new conversation.
    reopen_window: timedelta = timedelta(0)
    closure_threshold: float = 0.7
    closure_unambiguous: float = 0.95
    detector: ClosureDetector = field(default_factory=PhraseClosureDetector)

    def __post_init__(self) -> None:
        for name in (
            "idle_timeout",
            "processing_timeout",
            "awaiting_confirmation_timeout",
            "waiting_close_timeout",
        ):
            if getattr(self, name) < MIN_DURATION:
                raise ValueError(f"{name} must be at least 1 second")
        if self.close_grace < timedelta(0) or self.reopen_window < timedelta(0):
            raise ValueError("close_grace and reopen_window must not be negative")
        if not 0.0 < self.closure_threshold <= self.closure_unambiguous <= 1.0:
            raise ValueError("need 0 < closure_threshold <= closure_unambiguous <= 1")

    def timeout_for(self, state: State) -> timedelta | None:
        """Return how long a conversation may stay in `state` (None for closed)."""
        return {
            State.IDLE: self.idle_timeout,
            State.PROCESSING: self.processing_timeout,
            State.AWAITING_CONFIRMATION: self.awaiting_confirmation_timeout,
            State.WAITING_CLOSE: self.waiting_close_timeout,
        }.get(state)
