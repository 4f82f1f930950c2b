"""Table tests for domain.lifecycle.transition: every state x every event, and the seed races."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest

from domain.lifecycle import (
    AgentAccepted,
    CancelTimer,
    CloseConfirmed,
    CloseDenied,
    CloseReason,
    CloseRequested,
    ClosureDetected,
    Conversation,
    Decision,
    Effect,
    Emit,
    Event,
    ProcessingFailed,
    Record,
    SetTimer,
    State,
    StoreMessage,
    SweepFired,
    TimerFired,
    UserMessage,
    transition,
)
from domain.policy import LifecyclePolicy

T0 = datetime(2025, 3, 10, 9, 0, tzinfo=UTC)
POLICY = LifecyclePolicy()
CONV_ID = "conv-1"
NEW_ID = "conv-2"
VERSION = 3


def make(state: State, **changes: object) -> Conversation:
    """A conversation of thread (wa, 5511) in `state`, last changed at T0 at VERSION."""
    timeout = POLICY.timeout_for(state)
    conv = Conversation(
        id=CONV_ID,
        channel_id="wa",
        contact_id="5511",
        state=state,
        version=VERSION,
        opened_at=T0 - timedelta(hours=1),
        updated_at=T0,
        deadline_at=T0 + timeout if timeout is not None else None,
        assigned_agent="agent-1" if state is not State.IDLE else None,
    )
    if state in (State.AWAITING_CONFIRMATION, State.WAITING_CLOSE):
        conv = conv._replace(
            pending_close_reason=CloseReason.USER_CLOSED,
            state_before_close=State.PROCESSING,
        )
    if state is State.CLOSED:
        conv = conv._replace(
            close_reason=CloseReason.AGENT_CLOSED,
            closed_at=T0,
            state_before_close=State.PROCESSING,
        )
    return conv._replace(**changes)  # type: ignore[arg-type]


def run(current: Conversation | None, event: Event, now: datetime) -> Decision:
    return transition(current, event, now, POLICY, channel_id="wa", contact_id="5511")


def msg(text: str | None, n: int = 1) -> UserMessage:
    return UserMessage(f"ev-m{n}", f"wamid-{n}", text, NEW_ID)


def tags(effects: tuple[Effect, ...]) -> list[str]:
    """Effects as comparable tags: Record:kind, Emit:kind, or the class name."""
    out = []
    for effect in effects:
        if isinstance(effect, Record | Emit):
            out.append(f"{type(effect).__name__}:{effect.kind}")
        else:
            out.append(type(effect).__name__)
    return sorted(out)


def records(decision: Decision, kind: str) -> list[Record]:
    return [e for e in decision.effects if isinstance(e, Record) and e.kind == kind]


IDLE, PROC = State.IDLE, State.PROCESSING
AWAIT, WAIT, CLOSED = State.AWAITING_CONFIRMATION, State.WAITING_CLOSE, State.CLOSED

MOVE = ["Record:transition", "Emit:conversation.state_changed", "SetTimer"]
CLOSE = ["Record:closed", "CancelTimer", "Emit:conversation.closed"]
IGNORED = ["Record:ignored"]
OPEN = ["Record:opened", "Emit:conversation.opened", "StoreMessage", "SetTimer"]

Factory = Callable[[Conversation], Event]
EVENTS: dict[str, Factory] = {
    "message": lambda c: msg("Qual o prazo de entrega?"),
    "farewell": lambda c: msg("tchau"),
    "accept": lambda c: AgentAccepted("ev-a", "agent-2"),
    "close": lambda c: CloseRequested("ev-c", CloseReason.AGENT_CLOSED, by="agent-2"),
    "detected": lambda c: ClosureDetected("ev-d", 0.8),
    "confirmed": lambda c: CloseConfirmed("ev-y"),
    "denied": lambda c: CloseDenied("ev-n"),
    "timer": lambda c: TimerFired("ev-t", c.id, c.version, c.deadline_at or T0),
    "sweep": lambda c: SweepFired("ev-s", c.id, c.version),
    "failed": lambda c: ProcessingFailed("ev-f", "llm timeout"),
}
R = CloseReason
# (state, event) -> (resulting state, close reason, effect tags); None effects = unchanged
TABLE: list[tuple[State, str, State, CloseReason | None, list[str]]] = [
    (IDLE, "message", IDLE, None, ["StoreMessage", "Record:deadline_extended", "SetTimer"]),
    (IDLE, "farewell", AWAIT, None, ["StoreMessage", *MOVE]),
    (IDLE, "accept", PROC, None, MOVE),
    (IDLE, "close", CLOSED, R.AGENT_CLOSED, CLOSE),
    (IDLE, "detected", AWAIT, None, MOVE),
    (IDLE, "confirmed", IDLE, None, IGNORED),
    (IDLE, "denied", IDLE, None, IGNORED),
    (IDLE, "timer", CLOSED, R.EXPIRED, CLOSE),
    (IDLE, "sweep", CLOSED, R.EXPIRED, CLOSE),
    (IDLE, "failed", CLOSED, R.FAILED, CLOSE),
    (PROC, "message", PROC, None, ["StoreMessage", "Record:deadline_extended", "SetTimer"]),
    (PROC, "farewell", AWAIT, None, ["StoreMessage", *MOVE]),
    (PROC, "accept", PROC, None, ["Record:reassigned", "SetTimer"]),
    (PROC, "close", CLOSED, R.AGENT_CLOSED, CLOSE),
    (PROC, "detected", AWAIT, None, MOVE),
    (PROC, "confirmed", PROC, None, IGNORED),
    (PROC, "denied", PROC, None, IGNORED),
    (PROC, "timer", CLOSED, R.IDLE_TIMEOUT, CLOSE),
    (PROC, "sweep", CLOSED, R.IDLE_TIMEOUT, CLOSE),
    (PROC, "failed", CLOSED, R.FAILED, CLOSE),
    (AWAIT, "message", PROC, None, ["StoreMessage", *MOVE]),
    (AWAIT, "farewell", WAIT, None, ["StoreMessage", *MOVE]),
    (AWAIT, "accept", PROC, None, MOVE),
    (AWAIT, "close", CLOSED, R.AGENT_CLOSED, CLOSE),
    (AWAIT, "detected", AWAIT, None, IGNORED),
    (AWAIT, "confirmed", WAIT, None, MOVE),
    (AWAIT, "denied", PROC, None, MOVE),
    (AWAIT, "timer", CLOSED, R.USER_CLOSED, CLOSE),
    (AWAIT, "sweep", CLOSED, R.USER_CLOSED, CLOSE),
    (AWAIT, "failed", CLOSED, R.FAILED, CLOSE),
    (WAIT, "message", PROC, None, ["StoreMessage", *MOVE]),
    (WAIT, "farewell", WAIT, None, ["StoreMessage", "Record:deadline_extended", "SetTimer"]),
    (WAIT, "accept", PROC, None, MOVE),
    (WAIT, "close", CLOSED, R.AGENT_CLOSED, CLOSE),
    (WAIT, "detected", WAIT, None, IGNORED),
    (WAIT, "confirmed", WAIT, None, IGNORED),
    (WAIT, "denied", PROC, None, MOVE),
    (WAIT, "timer", CLOSED, R.USER_CLOSED, CLOSE),
    (WAIT, "sweep", CLOSED, R.USER_CLOSED, CLOSE),
    (WAIT, "failed", CLOSED, R.FAILED, CLOSE),
    (CLOSED, "message", IDLE, None, OPEN),
    (CLOSED, "farewell", AWAIT, None, [*OPEN, *MOVE[:2]]),
    (CLOSED, "accept", CLOSED, R.AGENT_CLOSED, IGNORED),
    (CLOSED, "close", CLOSED, R.AGENT_CLOSED, ["Record:close_rejected"]),
    (CLOSED, "detected", CLOSED, R.AGENT_CLOSED, IGNORED),
    (CLOSED, "confirmed", CLOSED, R.AGENT_CLOSED, IGNORED),
    (CLOSED, "denied", CLOSED, R.AGENT_CLOSED, IGNORED),
    (CLOSED, "timer", CLOSED, R.AGENT_CLOSED, ["Record:stale_timer"]),
    (CLOSED, "sweep", CLOSED, R.AGENT_CLOSED, ["Record:stale_timer"]),
    (CLOSED, "failed", CLOSED, R.AGENT_CLOSED, ["Record:close_rejected"]),
]


def test_table_covers_every_state_and_event() -> None:
    assert {(s, e) for s, e, *_ in TABLE} == {(s, e) for s in State for e in EVENTS}
    assert len(TABLE) == len(State) * len(EVENTS)


@pytest.mark.parametrize(
    ("state", "event_name", "expected_state", "expected_reason", "expected_tags"),
    TABLE,
    ids=[f"{s}-{e}" for s, e, *_ in TABLE],
)
def test_transition_table(
    state: State,
    event_name: str,
    expected_state: State,
    expected_reason: CloseReason | None,
    expected_tags: list[str],
) -> None:
    current = make(state)
    event = EVENTS[event_name](current)
    timed = event_name in ("timer", "sweep") and current.deadline_at is not None
    # one minute after the last change: before every deadline, after the close grace
    now = current.deadline_at if timed and current.deadline_at else T0 + timedelta(minutes=1)
    decision = run(current, event, now)
    conv = decision.conversation
    assert conv is not None
    assert conv.state is expected_state
    assert conv.close_reason is expected_reason
    assert tags(decision.effects) == sorted(expected_tags)
    assert decision.changed == (expected_tags != IGNORED and len(expected_tags) > 1)
    if not decision.changed:
        assert conv is current
    elif conv.id == current.id:
        assert conv.version == current.version + 1
        assert conv.updated_at == now
    else:
        assert (conv.id, conv.version, conv.previous_conversation_id) == (NEW_ID, 1, CONV_ID)
    set_timers = [e for e in decision.effects if isinstance(e, SetTimer)]
    if conv.state is State.CLOSED:
        assert conv.deadline_at is None
        assert set_timers == []
    elif decision.changed:
        assert conv.deadline_at == now + (POLICY.timeout_for(conv.state) or timedelta(0))
        assert set_timers == [SetTimer(conv.id, conv.version, conv.deadline_at)]


@pytest.mark.parametrize("state", [s for s in State if s is not State.CLOSED])
def test_every_open_state_has_a_deadline_and_an_automatic_exit(state: State) -> None:
    timeout = POLICY.timeout_for(state)
    assert timeout is not None and timeout > timedelta(0)
    current = make(state)
    assert current.deadline_at == current.updated_at + timeout
    due = current.deadline_at
    decision = run(current, TimerFired("ev-t", current.id, current.version, due), due)
    assert decision.conversation is not None
    assert decision.conversation.state is State.CLOSED
    assert decision.conversation.close_reason is not None
    assert CancelTimer(current.id) in decision.effects


def test_closed_has_no_timeout() -> None:
    assert POLICY.timeout_for(State.CLOSED) is None


def test_close_reason_priority_and_explicitness() -> None:
    ordered = [R.FAILED, R.USER_CLOSED, R.AGENT_CLOSED, R.IDLE_TIMEOUT, R.EXPIRED]
    assert sorted(CloseReason, key=lambda r: r.priority, reverse=True) == ordered
    assert {r for r in CloseReason if r.is_explicit} == {R.FAILED, R.USER_CLOSED, R.AGENT_CLOSED}


def test_seed_scenario_a_timer_after_refresh_is_stale_and_no_message_is_lost() -> None:
    current = make(State.PROCESSING, updated_at=T0 - timedelta(minutes=15))
    old_timer = TimerFired("ev-t", current.id, current.version, T0 + timedelta(seconds=4))
    first = run(current, msg("Obrigado!", 1), T0 + timedelta(seconds=3))
    conv = first.conversation
    assert conv is not None and conv.state is State.PROCESSING
    assert conv.version == current.version + 1
    fired = run(conv, old_timer, T0 + timedelta(seconds=4))
    assert fired.changed is False and fired.conversation is conv
    assert [r.kind for r in fired.effects if isinstance(r, Record)] == ["stale_timer"]
    sweep = run(conv, SweepFired("ev-s", current.id, current.version), T0 + timedelta(seconds=4))
    assert sweep.changed is False and records(sweep, "stale_timer")
    second = run(conv, msg("Posso fazer outra pergunta?", 2), T0 + timedelta(seconds=5))
    assert second.conversation is not None and second.conversation.id == CONV_ID
    stored = [e for d in (first, second) for e in d.effects if isinstance(e, StoreMessage)]
    assert stored == [StoreMessage(CONV_ID, "wamid-1"), StoreMessage(CONV_ID, "wamid-2")]


def test_an_older_versions_timer_re_arms_the_current_deadline_and_never_closes() -> None:
    # After a crash the timer store may hold an earlier deadline of an older version.
    current = make(State.PROCESSING)
    old = TimerFired("ev-old", current.id, current.version, T0 + timedelta(seconds=4))
    newer = run(current, msg("ainda estou aqui", 1), T0 + timedelta(seconds=3)).conversation
    assert newer is not None and newer.deadline_at is not None
    fired = run(newer, old, T0 + timedelta(seconds=4))
    assert fired.changed is False and fired.conversation is newer
    assert SetTimer(newer.id, newer.version, newer.deadline_at) in fired.effects
    other = TimerFired("ev-other", "another-conversation", 1, T0)
    assert not [e for e in run(newer, other, T0 + timedelta(seconds=4)).effects if isinstance(e, SetTimer)]


@pytest.mark.parametrize("text", ["Ok, pode fechar então", "tchau", "obrigado, tchau"])
def test_seed_scenario_b_farewell_then_timer_closes_as_user_closed(text: str) -> None:
    current = make(State.PROCESSING)
    stale = TimerFired("ev-old", current.id, current.version, current.deadline_at or T0)
    said = run(current, msg(text), T0 + timedelta(seconds=1))
    conv = said.conversation
    assert conv is not None and conv.state in (State.AWAITING_CONFIRMATION, State.WAITING_CLOSE)
    assert conv.pending_close_reason is CloseReason.USER_CLOSED
    assert run(conv, stale, T0 + timedelta(seconds=3)).changed is False
    due = conv.deadline_at
    assert due is not None
    closed = run(conv, TimerFired("ev-t", conv.id, conv.version, due), due + timedelta(seconds=1))
    assert closed.conversation is not None
    assert closed.conversation.close_reason is CloseReason.USER_CLOSED


def test_seed_scenario_b_unambiguous_close_goes_straight_to_waiting_close() -> None:
    said = run(make(State.PROCESSING), msg("Ok, pode fechar então"), T0)
    assert said.conversation is not None
    assert said.conversation.state is State.WAITING_CLOSE
    assert said.conversation.deadline_at == T0 + POLICY.waiting_close_timeout


@pytest.mark.parametrize(
    ("state", "automatic"), [(State.IDLE, R.EXPIRED), (State.PROCESSING, R.IDLE_TIMEOUT)]
)
def test_seed_scenario_c_agent_close_within_grace_upgrades(state: State, automatic: R) -> None:
    current = make(state)
    due = current.deadline_at
    assert due is not None
    expired = run(current, TimerFired("ev-t", current.id, current.version, due), due)
    conv = expired.conversation
    assert conv is not None and conv.close_reason is automatic
    agent = CloseRequested("ev-c1", R.AGENT_CLOSED, by="agent-1")
    upgraded = run(conv, agent, due + timedelta(seconds=1))
    new = upgraded.conversation
    assert new is not None and upgraded.changed
    assert (new.close_reason, new.closed_at, new.version) == (R.AGENT_CLOSED, due, conv.version + 1)
    assert tags(upgraded.effects) == ["Emit:conversation.closed", "Record:close_upgraded"]
    late = run(conv, agent, due + POLICY.close_grace + timedelta(seconds=1))
    assert late.changed is False and late.conversation is conv
    assert records(late, "close_rejected")


def test_automatic_close_never_overwrites_explicit_close() -> None:
    current = make(State.PROCESSING)
    closed = run(current, CloseRequested("ev-c", R.AGENT_CLOSED), T0).conversation
    assert closed is not None
    due = current.deadline_at or T0
    for event in (
        TimerFired("ev-t", current.id, current.version, due),
        SweepFired("ev-s", current.id, current.version),
        CloseRequested("ev-c2", R.EXPIRED),
        CloseRequested("ev-c3", R.IDLE_TIMEOUT),
    ):
        decision = run(closed, event, T0 + timedelta(seconds=1))
        assert decision.changed is False
        assert closed.close_reason is R.AGENT_CLOSED


def test_failed_upgrades_an_explicit_close_within_grace_but_user_close_does_not() -> None:
    closed = make(State.CLOSED)
    user = run(closed, CloseRequested("ev-u", R.USER_CLOSED), T0 + timedelta(seconds=5))
    assert user.changed is False and records(user, "close_rejected")
    failed = run(closed, ProcessingFailed("ev-f", "boom"), T0 + timedelta(seconds=5))
    assert failed.conversation is not None
    assert failed.conversation.close_reason is R.FAILED and failed.changed


def test_duplicate_close_is_rejected_and_recorded() -> None:
    closed = make(State.CLOSED)
    again = run(closed, CloseRequested("ev-c", R.AGENT_CLOSED), T0 + timedelta(seconds=1))
    assert again.changed is False
    assert "closed as agent_closed" in records(again, "close_rejected")[0].detail


def test_early_timer_rearms_and_early_sweep_is_silent() -> None:
    current = make(State.IDLE)
    due = current.deadline_at
    assert due is not None
    early = run(current, TimerFired("ev-t", current.id, current.version, due), due - timedelta(1))
    assert early.changed is False
    assert tags(early.effects) == ["Record:stale_timer", "SetTimer"]
    assert SetTimer(current.id, current.version, due) in early.effects
    sweep = run(current, SweepFired("ev-s", current.id, current.version), due - timedelta(1))
    assert sweep == Decision(current, False, ())


def test_timer_of_another_conversation_is_recorded_against_it() -> None:
    current = make(State.IDLE)
    decision = run(current, TimerFired("ev-t", "conv-0", 7, T0), T0 + timedelta(days=3))
    assert decision.changed is False
    assert [r.conversation_id for r in records(decision, "stale_timer")] == ["conv-0"]


def test_first_message_opens_idle_conversation_at_version_one() -> None:
    decision = run(None, msg("Oi"), T0)
    conv = decision.conversation
    assert conv is not None and decision.changed
    assert (conv.id, conv.state, conv.version, conv.opened_at) == (NEW_ID, IDLE, 1, T0)
    assert conv.previous_conversation_id is None
    assert tags(decision.effects) == sorted(OPEN)


def test_first_message_that_says_goodbye_still_opens_at_version_one() -> None:
    conv = run(None, msg("tchau"), T0).conversation
    assert conv is not None
    assert (conv.state, conv.version, conv.state_before_close) == (AWAIT, 1, IDLE)


@pytest.mark.parametrize(
    "event", [e(make(State.IDLE)) for n, e in EVENTS.items() if n not in ("message", "farewell")]
)
def test_non_message_events_without_conversation_do_nothing(event: Event) -> None:
    assert run(None, event, T0) == Decision(None, False, ())


def test_same_agent_accepting_again_changes_nothing() -> None:
    current = make(State.PROCESSING)
    decision = run(current, AgentAccepted("ev-a", "agent-1"), T0)
    assert decision.changed is False and records(decision, "ignored")


def test_accept_in_pending_close_drops_the_pending_close() -> None:
    conv = run(make(State.WAITING_CLOSE), AgentAccepted("ev-a", "agent-2"), T0).conversation
    assert conv is not None
    assert (conv.state, conv.assigned_agent) == (PROC, "agent-2")
    assert conv.pending_close_reason is None and conv.state_before_close is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("sim", WAIT),
        ("pode", WAIT),
        ("obrigado", WAIT),
        ("não", PROC),
        ("espera", PROC),
        ("qual o horário de vocês?", PROC),
    ],
)
def test_replies_in_awaiting_confirmation(text: str, expected: State) -> None:
    conv = run(make(AWAIT), msg(text), T0 + timedelta(seconds=10)).conversation
    assert conv is not None and conv.state is expected


@pytest.mark.parametrize(
    ("text", "expected"), [("ok", WAIT), ("valeu, tchau", WAIT), ("na verdade não", PROC)]
)
def test_messages_in_waiting_close(text: str, expected: State) -> None:
    conv = run(make(WAIT), msg(text), T0 + timedelta(seconds=10)).conversation
    assert conv is not None and conv.state is expected


def reopen_policy() -> LifecyclePolicy:
    return LifecyclePolicy(reopen_window=timedelta(minutes=5))


def test_message_within_reopen_window_reopens_same_conversation() -> None:
    closed = make(State.CLOSED)
    event = msg("Esqueci de perguntar o prazo")
    decision = transition(
        closed,
        event,
        T0 + timedelta(minutes=2),
        reopen_policy(),
        channel_id="wa",
        contact_id="5511",
    )
    conv = decision.conversation
    assert conv is not None and conv.id == CONV_ID
    assert (conv.state, conv.version, conv.close_reason, conv.closed_at) == (PROC, VERSION + 1, None, None)
    assert "Record:reopened" in tags(decision.effects)
    assert StoreMessage(CONV_ID, "wamid-1") in decision.effects


def test_sign_off_within_reopen_window_is_stored_without_reopening() -> None:
    closed = make(State.CLOSED)
    decision = transition(
        closed,
        msg("obrigado!"),
        T0 + timedelta(minutes=2),
        reopen_policy(),
        channel_id="wa",
        contact_id="5511",
    )
    assert decision.changed is False and decision.conversation is closed
    assert tags(decision.effects) == ["Record:message_after_close", "StoreMessage"]


def test_message_after_reopen_window_opens_new_linked_conversation() -> None:
    closed = make(State.CLOSED)
    decision = transition(
        closed,
        msg("Oi de novo"),
        T0 + timedelta(minutes=6),
        reopen_policy(),
        channel_id="wa",
        contact_id="5511",
    )
    conv = decision.conversation
    assert conv is not None
    assert (conv.id, conv.previous_conversation_id, conv.version) == (NEW_ID, CONV_ID, 1)


def test_zero_reopen_window_always_opens_new_conversation() -> None:
    conv = run(make(State.CLOSED), msg("Oi"), T0).conversation
    assert conv is not None and conv.id == NEW_ID


def test_custom_detector_is_used() -> None:
    class Always:
        def confidence(self, text: str) -> float:
            return 1.0

    policy = LifecyclePolicy(detector=Always())
    decision = transition(make(IDLE), msg("qualquer coisa"), T0, policy, channel_id="wa", contact_id="5511")
    assert decision.conversation is not None
    assert decision.conversation.state is WAIT


def test_naive_now_is_rejected() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        run(None, msg("Oi"), datetime(2025, 1, 1))  # noqa: DTZ001


def test_business_message_joins_an_open_conversation_or_opens_one() -> None:
    from domain.lifecycle import BusinessMessage

    policy = LifecyclePolicy()
    t0 = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)
    opened = transition(None, BusinessMessage("b1", "c1"), t0, policy, channel_id="ch", contact_id="u")
    conv = opened.conversation
    assert opened.changed and conv is not None
    assert (conv.id, conv.state, conv.version) == ("c1", State.IDLE, 1)
    assert any(isinstance(e, SetTimer) for e in opened.effects)
    joined = transition(conv, BusinessMessage("b2", "c2"), t0, policy, channel_id="ch", contact_id="u")
    assert not joined.changed and joined.conversation == conv and joined.effects == ()
