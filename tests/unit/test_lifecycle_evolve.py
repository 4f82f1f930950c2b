"""domain.lifecycle._evolve is Conversation._replace, only faster (and a field
it does not take is a type error, which mypy catches)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from domain.lifecycle import CloseReason, Conversation, State, _evolve

T = datetime(2026, 12, 2, tzinfo=UTC)
BASE = Conversation("c-1", "ch", "5511", State.IDLE, 3, T, T, T, assigned_agent="a-1")
VALUES: dict[str, Any] = {
    "state": State.CLOSED,
    "version": 4,
    "deadline_at": None,
    "close_reason": CloseReason.AGENT_CLOSED,
    "closed_at": T,
    "updated_at": datetime(2026, 12, 3, tzinfo=UTC),
    "assigned_agent": None,
    "pending_close_reason": CloseReason.USER_CLOSED,
    "state_before_close": State.PROCESSING,
}


@given(st.sets(st.sampled_from(sorted(VALUES))))
def test_evolve_equals_replace(names: set[str]) -> None:
    changes = {name: VALUES[name] for name in names}
    assert _evolve(BASE, **changes) == BASE._replace(**changes)
    assert _evolve(BASE, **changes) is not BASE


def test_every_field_is_either_changeable_or_kept_on_purpose() -> None:
    fixed = {"id", "channel_id", "contact_id", "opened_at", "previous_conversation_id"}
    assert set(Conversation._fields) == set(VALUES) | fixed
