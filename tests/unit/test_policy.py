"""Tests for domain.policy: duration parsing and the lifecycle policy."""

from __future__ import annotations

from datetime import timedelta

import pytest

from domain.closure_intent import PhraseClosureDetector
from domain.lifecycle import State
from domain.policy import LifecyclePolicy, parse_duration


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("90", timedelta(seconds=90)),
        (90, timedelta(seconds=90)),
        ("1.5", timedelta(seconds=1.5)),
        (1.5, timedelta(seconds=1.5)),
        (" 60 ", timedelta(minutes=1)),
        ("1", timedelta(seconds=1)),
        (1, timedelta(seconds=1)),
        ("PT3M", timedelta(minutes=3)),
        ("pt3m", timedelta(minutes=3)),
        ("P2D", timedelta(days=2)),
        ("PT1H30M", timedelta(hours=1, minutes=30)),
        ("P1DT2H", timedelta(days=1, hours=2)),
        ("P1W", timedelta(weeks=1)),
        ("PT48H", timedelta(hours=48)),
        ("PT1.5S", timedelta(seconds=1.5)),
        ("PT1S", timedelta(seconds=1)),
    ],
)
def test_parse_duration_accepts(value: str | int | float, expected: timedelta) -> None:
    assert parse_duration(value) == expected


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("0", "minimum of 1 second"),
        (0, "minimum of 1 second"),
        (0.5, "minimum of 1 second"),
        ("0.999", "minimum of 1 second"),
        (-5, "minimum of 1 second"),
        ("PT0S", "minimum of 1 second"),
        ("PT0.5S", "minimum of 1 second"),
        ("", "invalid duration"),
        ("abc", "invalid duration"),
        ("-5", "invalid duration"),
        ("1e3", "invalid duration"),
        ("nan", "invalid duration"),
        (float("nan"), "invalid duration"),
        (float("inf"), "invalid duration"),
        ("P", "invalid duration"),
        ("PT", "invalid duration"),
        ("P1DT", "invalid duration"),
        ("3M", "invalid duration"),
        ("PT1.5H", "invalid duration"),
        ("10 minutes", "invalid duration"),
        ("P1M", "no fixed length"),
        ("P1Y", "no fixed length"),
        ("P1Y2DT3H", "no fixed length"),
        (True, "invalid duration"),
        ("9" * 30, "too large"),
    ],
)
def test_parse_duration_rejects(value: str | int | float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_duration(value)


def test_defaults_match_the_design() -> None:
    policy = LifecyclePolicy()
    assert policy.timeout_for(State.IDLE) == timedelta(hours=48)
    assert policy.timeout_for(State.PROCESSING) == timedelta(hours=24)
    assert policy.timeout_for(State.AWAITING_CONFIRMATION) == timedelta(minutes=10)
    assert policy.timeout_for(State.WAITING_CLOSE) == timedelta(minutes=3)
    assert policy.timeout_for(State.CLOSED) is None
    assert (policy.close_grace, policy.reopen_window) == (timedelta(seconds=30), timedelta(0))
    assert (policy.closure_threshold, policy.closure_unambiguous) == (0.7, 0.95)
    assert isinstance(policy.detector, PhraseClosureDetector)


def test_policy_is_frozen_and_hashable() -> None:
    assert hash(LifecyclePolicy()) == hash(LifecyclePolicy())
    assert LifecyclePolicy() == LifecyclePolicy()
    assert LifecyclePolicy() != LifecyclePolicy(close_grace=timedelta(seconds=5))
    with pytest.raises(AttributeError):
        LifecyclePolicy().idle_timeout = timedelta(1)  # type: ignore[misc]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"waiting_close_timeout": timedelta(0)},
        {"idle_timeout": timedelta(milliseconds=500)},
        {"close_grace": timedelta(seconds=-1)},
        {"reopen_window": timedelta(seconds=-1)},
        {"closure_threshold": 0.0},
        {"closure_threshold": 0.96},
        {"closure_unambiguous": 1.5},
    ],
)
def test_policy_rejects_unusable_settings(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        LifecyclePolicy(**kwargs)  # type: ignore[arg-type]
