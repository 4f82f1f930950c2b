"""Hypothesis state machine: random events for one thread, stamped by clocks that disagree.

Messages and commands carry the clock of whichever API process took them (`skew` behind or
ahead of the thread's true time); timers carry the worker's. The invariants must hold anyway.
"""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

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

TEXTS = [
    None,
    "",
    "oi",
    "Qual o prazo?",
    "tchau",
    "obrigado",
    "Ok, pode fechar então",
    "sim",
    "não",
    "espera",
    "thanks, bye",
    "ya puede cerrar",
    "posso fazer outra pergunta?",
]
# short timeouts so deadlines are actually reached within a run
POLICIES = [
    LifecyclePolicy(
        idle_timeout=timedelta(minutes=10),
        processing_timeout=timedelta(minutes=5),
        awaiting_confirmation_timeout=timedelta(minutes=2),
        waiting_close_timeout=timedelta(minutes=1),
        close_grace=timedelta(seconds=30),
        reopen_window=window,
    )
    for window in (timedelta(0), timedelta(minutes=1))
]


class ThreadMachine(RuleBasedStateMachine):
    """Drives transition() for the thread (wa, 5511) and checks its invariants each step."""

    def __init__(self) -> None:
        super().__init__()
        self.policy = POLICIES[0]
        self.now = datetime(2025, 3, 10, 9, 0, tzinfo=UTC)
        self.skew = timedelta(0)  # how far the next message's/command's stamp is behind now
        self.latest = self.now  # the latest time the thread has seen
        self.conv: Conversation | None = None
        self.timers: list[SetTimer] = []
        self.counter = 0
        self.closes: Counter[str] = Counter()  # observed open -> closed per instance
        self.closed_records: Counter[str] = Counter()
        self.explicitly_closed: set[str] = set()

    @initialize(policy=st.sampled_from(POLICIES), accept=st.booleans())
    def open_thread(self, policy: LifecyclePolicy, accept: bool) -> None:
        # events on an empty thread are covered by unit tests; start every run with a conversation
        self.policy = policy
        self.user_message("oi")
        if accept:
            self.agent_accepted("agent-1")

    def next_id(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}-{self.counter}"

    def apply(self, event: Event, *, skewed: bool = True) -> Decision:
        before = self.conv
        stamp = self.now - self.skew if skewed else self.now
        # the time the thread sees: never before its last change (the domain's rule)
        now = max(stamp, before.updated_at) if before is not None else stamp
        decision = transition(before, event, stamp, self.policy, channel_id="wa", contact_id="5511")
        after = decision.conversation
        self.check_step(before, event, decision, now)
        self.latest = max(self.latest, now)
        self.timers += [e for e in decision.effects if isinstance(e, SetTimer)]
        for effect in decision.effects:
            if isinstance(effect, Record) and effect.kind == "closed":
                self.closed_records[effect.conversation_id] += 1
        if after is not None and after.state is State.CLOSED:
            if before is None or before.id != after.id or before.state is not State.CLOSED:
                self.closes[after.id] += 1
            if after.close_reason is not None and after.close_reason.is_explicit:
                self.explicitly_closed.add(after.id)
        elif after is not None:
            self.explicitly_closed.discard(after.id)  # reopened: a new close may be automatic
        self.conv = after
        return decision

    def check_step(
        self, before: Conversation | None, event: Event, decision: Decision, now: datetime
    ) -> None:
        after = decision.conversation
        stored = [e for e in decision.effects if isinstance(e, StoreMessage)]
        kinds = [e.kind for e in decision.effects if isinstance(e, Record)]
        # no user message is ever dropped, and nothing else stores one
        assert len(stored) == (1 if isinstance(event, UserMessage) else 0)
        if not decision.changed:
            assert after is before
            assert not [e for e in decision.effects if isinstance(e, CancelTimer)]
            return
        assert after is not None and after.updated_at == now
        if before is not None and after.id == before.id:
            assert after.version == before.version + 1
        else:
            assert after.version == 1
            assert after.previous_conversation_id == (before.id if before else None)
            assert isinstance(event, UserMessage) and after.id == event.new_conversation_id
            # time never goes backwards on the thread, whatever the clocks said
            assert before is None or after.opened_at >= before.updated_at
        if after.state is State.CLOSED:
            assert after.deadline_at is None and after.close_reason is not None
            assert after.closed_at is not None and after.closed_at <= now
        else:
            timeout = self.policy.timeout_for(after.state)
            assert after.deadline_at is not None and timeout is not None
            assert after.deadline_at == now + timeout > after.updated_at
            assert SetTimer(after.id, after.version, after.deadline_at) in decision.effects
            assert after.close_reason is None and after.closed_at is None
        if before is None or before.id != after.id:
            return
        if isinstance(event, TimerFired | SweepFired):
            # only the current version's timer closes, and never before the deadline
            assert (event.conversation_id, event.version) == (before.id, before.version)
            assert before.deadline_at is not None and before.deadline_at <= now
        if before.state is State.CLOSED and after.state is not State.CLOSED:
            # the only way out of closed for the same instance: a reopen within the window
            assert isinstance(event, UserMessage) and "reopened" in kinds
            assert before.closed_at is not None
            assert timedelta(0) < self.policy.reopen_window
            assert now - before.closed_at <= self.policy.reopen_window
        if before.state is State.CLOSED and after.state is State.CLOSED:
            old, new = before.close_reason, after.close_reason
            assert old is not None and new is not None
            assert kinds == ["close_upgraded"] and new.priority > old.priority
            assert new.is_explicit and after.closed_at == before.closed_at
        entered_closed = before.state is not State.CLOSED and after.state is State.CLOSED
        assert kinds.count("closed") == (1 if entered_closed else 0)
        assert (CancelTimer(after.id) in decision.effects) == entered_closed

    @rule(seconds=st.integers(min_value=0, max_value=900))
    def advance(self, seconds: int) -> None:
        self.now += timedelta(seconds=seconds)

    @rule(seconds=st.integers(min_value=-120, max_value=120))
    def clock_skew(self, seconds: int) -> None:
        # the next messages and commands come from an API process whose clock is this far behind
        self.skew = timedelta(seconds=seconds)

    @rule(text=st.sampled_from(TEXTS))
    def user_message(self, text: str | None) -> None:
        event_id = self.next_id("ev")
        self.apply(UserMessage(event_id, f"wamid-{event_id}", text, self.next_id("conv")))

    @rule(agent=st.sampled_from(["agent-1", "agent-2"]))
    def agent_accepted(self, agent: str) -> None:
        self.apply(AgentAccepted(self.next_id("ev"), agent))

    @rule(reason=st.sampled_from(CloseReason))
    def close_requested(self, reason: CloseReason) -> None:
        self.apply(CloseRequested(self.next_id("ev"), reason, by="admin"))

    @rule(confidence=st.floats(min_value=0.0, max_value=1.0))
    def closure_detected(self, confidence: float) -> None:
        self.apply(ClosureDetected(self.next_id("ev"), confidence))

    @rule(confirm=st.booleans())
    def confirmation(self, confirm: bool) -> None:
        event_id = self.next_id("ev")
        self.apply(CloseConfirmed(event_id) if confirm else CloseDenied(event_id))

    @rule()
    def processing_failed(self) -> None:
        self.apply(ProcessingFailed(self.next_id("ev"), "boom"))

    @precondition(lambda self: bool(self.timers))
    @rule(data=st.data(), sweep=st.booleans())
    def any_old_timer_fires_now(self, data: st.DataObject, sweep: bool) -> None:
        timer = data.draw(st.sampled_from(self.timers))
        ev = self.next_id("ev")
        event: Event = (
            SweepFired(ev, timer.conversation_id, timer.version)
            if sweep
            else TimerFired(ev, timer.conversation_id, timer.version, timer.due_at)
        )
        self.apply(event, skewed=False)

    def superseded_timers(self) -> list[SetTimer]:
        conv = self.conv
        if conv is None or conv.state is State.CLOSED:
            return []
        return [t for t in self.timers if t.conversation_id == conv.id and t.version < conv.version]

    @precondition(lambda self: bool(self.superseded_timers()))
    @rule(data=st.data())
    def superseded_timer_fires_after_current_deadline(self, data: st.DataObject) -> None:
        # seed scenario A: the worker acts on a version the user message already replaced
        timer = data.draw(st.sampled_from(self.superseded_timers()))
        conv = self.conv
        assert conv is not None and conv.deadline_at is not None
        self.now = max(self.now, conv.deadline_at)
        event = TimerFired(self.next_id("ev"), timer.conversation_id, timer.version, timer.due_at)
        decision = self.apply(event, skewed=False)
        assert decision.changed is False and decision.conversation is conv

    @precondition(lambda self: self.conv is not None and self.conv.state is not State.CLOSED)
    @rule(late=st.integers(min_value=0, max_value=120), sweep=st.booleans())
    def current_timer_fires_at_deadline(self, late: int, sweep: bool) -> None:
        conv = self.conv
        assert conv is not None and conv.deadline_at is not None
        self.now = max(self.now, conv.deadline_at + timedelta(seconds=late))
        ev = self.next_id("ev")
        event: Event = (
            SweepFired(ev, conv.id, conv.version)
            if sweep
            else TimerFired(ev, conv.id, conv.version, conv.deadline_at)
        )
        decision = self.apply(event, skewed=False)
        closed = decision.conversation
        assert closed is not None and closed.state is State.CLOSED
        assert (
            closed.close_reason
            is {
                State.IDLE: CloseReason.EXPIRED,
                State.PROCESSING: CloseReason.IDLE_TIMEOUT,
                State.AWAITING_CONFIRMATION: CloseReason.USER_CLOSED,
                State.WAITING_CLOSE: conv.pending_close_reason,
            }[conv.state]
        )

    @invariant()
    def one_closed_record_per_close(self) -> None:
        assert self.closed_records == self.closes

    @invariant()
    def automatic_reason_never_replaces_explicit(self) -> None:
        conv = self.conv
        if conv is not None and conv.id in self.explicitly_closed and conv.close_reason:
            assert conv.close_reason.is_explicit

    @invariant()
    def open_conversation_has_future_deadline(self) -> None:
        conv = self.conv
        if conv is not None and conv.state is not State.CLOSED:
            assert conv.deadline_at is not None and conv.deadline_at > conv.updated_at
            assert conv.updated_at <= self.latest


ThreadMachine.TestCase.settings = settings(
    max_examples=200,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestThreadLifecycle = ThreadMachine.TestCase
