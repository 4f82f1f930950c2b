"""The planner's outgoing events: what each conversation change writes to the outbox."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from domain.lifecycle import CloseReason
from domain.policy import LifecyclePolicy
from streams.outgoing import Ids
from streams.plan import Planner
from streams.records import (
    AcceptCommand,
    CloseCommand,
    ConversationEvent,
    InboundMessage,
    conversation_id_for,
)

T0 = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
REOPENING = LifecyclePolicy(reopen_window=timedelta(minutes=10))
CONV = conversation_id_for("e1")


def msg(n: int, at: datetime, text: str = "oi") -> InboundMessage:
    return InboundMessage(
        event_id=f"e{n}",
        channel_id="ch",
        contact_id="k",
        provider="generic",
        provider_message_id=f"m{n}",
        text=text,
        sent_at=at,
        received_at=at,
    )


def close(at: datetime, reason: CloseReason = CloseReason.AGENT_CLOSED) -> CloseCommand:
    return CloseCommand(
        event_id=f"close-{reason}", channel_id="ch", contact_id="k", conversation_id=CONV, reason=reason,
        by="ana", issued_at=at,
    )  # fmt: skip


def accept(at: datetime) -> AcceptCommand:
    return AcceptCommand(
        event_id="acc", channel_id="ch", contact_id="k", conversation_id=CONV, agent_id="ana", issued_at=at
    )


def outbox(events: list[ConversationEvent], policy: LifecyclePolicy = REOPENING) -> list[tuple[Any, ...]]:
    """(id, type, key, data, timestamp) of every outgoing event one batch writes, in order."""
    planner = Planner({}, policy)
    for event in events:
        planner.add(event)
    return [(o.event_id, o.type, o.key, orjson.loads(o.data), o.created_at) for o in planner.finish().outbox]


def story() -> list[ConversationEvent]:
    return [
        msg(1, T0),
        close(T0 + timedelta(minutes=1)),
        msg(2, T0 + timedelta(minutes=2), "ainda preciso de ajuda"),
    ]


def test_open_message_close_reopen_in_log_order_with_ids_from_the_source_events() -> None:
    rows = outbox(story())
    assert [(r[0], r[1]) for r in rows] == [
        ("e1:conversation.opened", "conversation.opened"),
        ("e1:message.received", "message.received"),
        ("close-agent_closed:conversation.closed", "conversation.closed"),
        ("e2:conversation.reopened", "conversation.reopened"),
        ("e2:message.received", "message.received"),
    ]
    assert {r[2] for r in rows} == {"ch/k"}  # keyed by the thread: one partition, one order
    opened, received, closed, reopened, again = (r[3] for r in rows)
    assert opened == {
        "conversation_id": CONV,
        "channel_id": "ch",
        "contact_id": "k",
        "state": "idle",
        "previous_state": None,
        "version": 1,
        "close_reason": None,
        "previous_close_reason": None,
        "closed_at": None,
        "assigned_agent": None,
        "previous_conversation_id": None,
        "occurred_at": T0.isoformat(),
    }
    assert received == {
        "conversation_id": CONV,
        "channel_id": "ch",
        "contact_id": "k",
        "provider_message_id": "m1",
        "type": "text",
        "text": "oi",
        "sent_at": T0.isoformat(),
        "occurred_at": T0.isoformat(),
    }
    closed_at = (T0 + timedelta(minutes=1)).isoformat()
    assert (closed["state"], closed["previous_state"], closed["version"]) == ("closed", "idle", 2)
    assert (closed["close_reason"], closed["closed_at"], closed["occurred_at"]) == (
        "agent_closed",
        closed_at,
        closed_at,
    )
    assert (reopened["state"], reopened["previous_state"], reopened["version"]) == ("idle", "closed", 3)
    assert reopened["close_reason"] is None and reopened["previous_close_reason"] == "agent_closed"
    assert reopened["conversation_id"] == CONV and again["text"] == "ainda preciso de ajuda"
    assert [r[4] for r in rows] == [T0, T0, T0 + timedelta(minutes=1), *[T0 + timedelta(minutes=2)] * 2]


def test_the_same_events_give_the_same_ids_and_rows() -> None:
    assert outbox(story()) == outbox(story())


def test_accept_is_a_state_change_with_the_agent() -> None:
    rows = outbox([msg(1, T0), accept(T0 + timedelta(seconds=5))])
    [changed] = [r for r in rows if r[1] == "conversation.state_changed"]
    assert changed[0] == "acc:conversation.state_changed"
    data = changed[3]
    assert (data["previous_state"], data["state"], data["assigned_agent"], data["version"]) == (
        "idle",
        "processing",
        "ana",
        2,
    )


def test_a_first_message_that_says_goodbye_opens_then_changes_state() -> None:
    rows = outbox([msg(1, T0, "tchau, obrigado")])
    assert [r[1] for r in rows] == ["conversation.opened", "message.received", "conversation.state_changed"]
    opened, changed = rows[0][3], rows[2][3]
    assert opened["state"] == "idle" and opened["version"] == changed["version"] == 1
    assert (changed["previous_state"], changed["state"]) == ("idle", "awaiting_confirmation")


def test_an_upgraded_close_is_announced_again_with_the_old_reason() -> None:
    rows = outbox(
        [
            msg(1, T0),
            close(T0, CloseReason.AGENT_CLOSED),
            close(T0 + timedelta(seconds=1), CloseReason.FAILED),
        ]
    )
    first, upgrade = [r[3] for r in rows if r[1] == "conversation.closed"]
    assert first["close_reason"] == "agent_closed" and first["previous_close_reason"] is None
    assert (upgrade["close_reason"], upgrade["previous_close_reason"]) == ("failed", "agent_closed")
    assert (upgrade["previous_state"], upgrade["state"]) == ("closed", "closed")


def test_no_change_no_event() -> None:
    rows = outbox([msg(1, T0), accept(T0), accept(T0 + timedelta(seconds=1))])  # accepted twice
    assert [r[1] for r in rows].count("conversation.state_changed") == 1


def test_ids_of_one_source_event_stay_unique_and_deterministic() -> None:
    ids = Ids("e9")
    assert [ids.next("a"), ids.next("b"), ids.next("a"), ids.next("a")] == [
        "e9:a",
        "e9:b",
        "e9:a:2",
        "e9:a:3",
    ]
