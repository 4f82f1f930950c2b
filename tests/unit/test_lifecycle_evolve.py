"""domain.lifecycle._evolve is dataclasses.replace for a Conversation, only faster."""

from __future__ import annotations

from dataclasses import fields, replace
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from domain.lifecycle import CloseReason, Conversation, State, _evolve

T = datetime(2026, 12, 2, tzinfo=UTC)
BASE = Conversation("c-1", "ch", "5511", State.IDLE, 3, T, T, T, assigned_agent="a-1")
VALUES: dict[str, Any] = {
    "id": "c-2",
    "state": State.CLOSED,
    "version": 4,
    "deadline_at": None,
    "close_reason": CloseReason.AGENT_CLOSED,
    "closed_at": T,
    "previous_conversation_id": "c-0",
    "assigned_agent": None,
    "pending_close_reason": CloseReason.USER_CLOSED,
    "state_before_close": State.PROCESSING,
}


@given(st.sets(st.sampled_from(sorted(VALUES))))
def test_evolve_equals_replace(names: set[str]) -> None:
    changes = {name: VALUES[name] for name in names}
    assert _evolve(BASE, **changes) == replace(BASE, **changes)
    assert _evolve(BASE, **changes) is not BASE


def test_evolve_refuses_a_field_the_conversation_does_not_have() -> None:
    with pytest.raises(TypeError, match="statee"):
        _evolve(BASE, statee=State.CLOSED)
    assert {f.name for f in fields(Conversation)} >= set(VALUES)
