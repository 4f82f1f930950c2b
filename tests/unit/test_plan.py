"""The pure planner: what a batch writes, decided without IO."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from domain.actions import CLOSE, Arm, close_token
from domain.lifecycle import Conversation, State
from domain.policy import LifecyclePolicy
from streams.plan import SERVICE_WINDOW, Current, Planner
from streams.records import CloseCommand, InboundMessage, StatusReceipt, conversation_id_for

T0 = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
POLICY = LifecyclePolicy()


def msg(n: int, at: datetime, contact: str = "k", sent_at: datetime | None = None) -> InboundMessage:
    return InboundMessage(
        event_id=f"e{n}",
        channel_id="ch",
        contact_id=contact,
        provider="generic",
        provider_message_id=f"m{n}",
        text="oi",
        sent_at=sent_at or at,
        received_at=at,
    )


def closed_conversation(seq: int) -> Current:
    conv = Conversation(
        id="00000000-0000-0000-0000-000000000001",
        channel_id="ch",
        contact_id="k",
        state=State.CLOSED,
        version=3,
        opened_at=T0 - timedelta(hours=1),
        updated_at=T0,
        deadline_at=None,
        closed_at=T0,
    )
    return Current(conv, seq)


def test_a_first_message_opens_the_thread_at_seq_1_with_its_timer() -> None:
    planner = Planner({}, POLICY)
    planner.add(msg(1, T0))
    plan = planner.finish()
    [conv] = plan.inserts
    assert conv.id == conversation_id_for("e1") and plan.seq[conv.id] == 1
    assert plan.updates == [] and len(plan.messages) == 1 and plan.applied == 1
    token = close_token(conv.id, 1)
    assert plan.actions == [Arm("ch/k", CLOSE, T0 + POLICY.idle_timeout, token)]
    assert plan.windows[conv.id] == T0 + SERVICE_WINDOW


def test_after_a_close_the_next_conversation_follows_in_thread_order_even_with_an_early_clock() -> None:
    planner = Planner({("ch", "k"): closed_conversation(seq=4)}, POLICY)
    planner.add(msg(2, T0 - timedelta(seconds=30)))  # an API process 30 s behind
    plan = planner.finish()
    [conv] = plan.inserts
    assert plan.seq[conv.id] == 5
    assert conv.opened_at == T0  # never before the close it follows
    assert conv.previous_conversation_id == "00000000-0000-0000-0000-000000000001"


def test_updates_carry_the_version_they_were_read_at() -> None:
    current = closed_conversation(seq=1)
    open_conv = current.conversation._replace(
        state=State.IDLE, closed_at=None, deadline_at=T0 + timedelta(hours=1)
    )
    planner = Planner({("ch", "k"): Current(open_conv, 1)}, POLICY)
    for n in range(3):
        planner.add(msg(n, T0 + timedelta(seconds=n)))
    plan = planner.finish()
    [(conv, read)] = plan.updates
    assert (read, conv.version) == (3, 6) and plan.inserts == []
    assert [m[3] for m in plan.messages] == ["m0", "m1", "m2"]


def test_a_command_for_a_conversation_that_is_not_current_is_only_recorded() -> None:
    planner = Planner({("ch", "k"): closed_conversation(seq=1)}, POLICY)
    planner.add(
        CloseCommand(event_id="c1", channel_id="ch", contact_id="k", conversation_id="other", issued_at=T0)
    )
    plan = planner.finish()
    assert plan.inserts == [] and plan.updates == [] and plan.applied == 0
    assert [(a[0], a[2]) for a in plan.audit] == [("other", "command_ignored")]


def test_the_window_never_moves_backwards_and_ignores_a_provider_clock_ahead() -> None:
    planner = Planner({}, POLICY)
    planner.add(msg(1, T0 + timedelta(minutes=5)))
    planner.add(msg(2, T0 + timedelta(minutes=6), sent_at=T0))  # a late retry of an old message
    planner.add(msg(3, T0 + timedelta(minutes=7), sent_at=T0 + timedelta(days=3650)))
    plan = planner.finish()
    [conv] = plan.inserts
    assert plan.windows[conv.id] == T0 + timedelta(minutes=7) + SERVICE_WINDOW


def test_receipts_pass_through_without_touching_the_lifecycle() -> None:
    planner = Planner({}, POLICY)
    receipt = StatusReceipt(
        event_id="s1",
        channel_id="ch",
        contact_id="k",
        provider="whatsapp",
        provider_message_id="wamid.1",
        provider_status="delivered",
        provider_at=T0,
        received_at=T0,
    )
    planner.add(receipt)
    plan = planner.finish()
    assert plan.receipts == [receipt] and plan.inserts == [] and plan.applied == 1
