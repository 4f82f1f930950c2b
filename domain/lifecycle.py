"""Conversation lifecycle: `transition(current, event, now, policy)` returns a Decision.

    idle --AgentAccepted--> processing
    idle|processing --closure >= threshold--> awaiting_confirmation --yes/farewell--> waiting_close
    idle|processing --closure >= unambiguous--> waiting_close
    awaiting_confirmation|waiting_close --no/other message/denied/accepted--> state_before_close
    any open --CloseRequested/ProcessingFailed--> closed(reason)
    deadline --> closed: idle=expired, processing=idle_timeout,
                 awaiting_confirmation=user_closed, waiting_close=pending_close_reason

Rules where the contract left room:
- One event is one persisted change: version + 1 per changed Decision, even when a message
  both opens a conversation and moves it (a first message "tchau" opens straight into
  awaiting_confirmation at version 1, so it closes in minutes as user_closed, not 48 h later).
- Every user message on an open conversation is activity: version + 1 and the resulting
  state's deadline restarts, including a repeated farewell in waiting_close.
- In awaiting_confirmation an affirmative reply or another farewell confirms; a negative or
  any other message drops the pending close (the user is still talking). In waiting_close a
  farewell or acknowledgement ("ok", "obrigado") keeps the pending close; anything else drops it.
- A timer firing early for the current version (clock skew between nodes) changes nothing,
  records "stale_timer" and re-arms the timer for the real deadline; an early sweep is silent.
  Timers of older versions or other conversations only record "stale_timer".
- On a closed conversation, `failed` upgrades any lower reason within close_grace (an error
  must not hide behind a simultaneous close); other explicit reasons upgrade only automatic
  ones (the first explicit close is a fact and stands). Upgrades re-emit conversation.closed
  so webhook subscribers see the final reason; closed_at is unchanged.
- A reopen (message within reopen_window) returns to the state before the close, keeping the
  assigned agent. A farewell or acknowledgement within the window is stored on the closed
  conversation without reopening it ("message_after_close"): "obrigado!" after an agent's
  close must not resurrect it.
- AgentAccepted by the already assigned agent, ClosureDetected below the threshold (below
  `closure_unambiguous` in awaiting_confirmation), CloseConfirmed outside awaiting_confirmation
  and CloseDenied outside a pending close change nothing. Events with nothing to do on an
  existing conversation record "ignored"; every Record names the conversation it concerns
  (a stale timer names the timer's conversation).
- Time is monotonic per thread: `now` earlier than the conversation's last change
  (`updated_at`) is taken as that time, so clocks that differ between API processes can
  neither close a conversation before its deadline nor open one "before" the last close.
- On a closed conversation `state_before_close` is the open state it was closed from (a
  pending close counts as the state before it), i.e. where a reopen returns.

Record kinds: opened, reopened, transition, deadline_extended, reassigned, closed,
close_upgraded, close_rejected, stale_timer, message_after_close, ignored.
Emit kinds: conversation.opened, conversation.reopened, conversation.state_changed,
conversation.closed. Effects are listed in the order the shell should apply them, after
persisting `Decision.conversation`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import datetime, timedelta
from enum import StrEnum
from typing import TYPE_CHECKING, Any, TypeAlias

from domain.closure_intent import classify_reply

if TYPE_CHECKING:
    from domain.policy import LifecyclePolicy


class State(StrEnum):
    IDLE = "idle"
    PROCESSING = "processing"
    AWAITING_CONFIRMATION = "awaiting_confirmation"
    WAITING_CLOSE = "waiting_close"
    CLOSED = "closed"


PENDING_STATES = frozenset({State.AWAITING_CONFIRMATION, State.WAITING_CLOSE})


class CloseReason(StrEnum):
    FAILED = "failed"
    USER_CLOSED = "user_closed"
    AGENT_CLOSED = "agent_closed"
    IDLE_TIMEOUT = "idle_timeout"
    EXPIRED = "expired"

    @property
    def priority(self) -> int:
        """Higher wins when two closes race: failed > user > agent > idle_timeout > expired."""
        return _PRIORITY[self]

    @property
    def is_explicit(self) -> bool:
        """Whether someone (user, agent, system error) closed it, rather than a deadline."""
        return self in (CloseReason.FAILED, CloseReason.USER_CLOSED, CloseReason.AGENT_CLOSED)


_PRIORITY = {reason: rank for rank, reason in enumerate(reversed(CloseReason))}


@dataclass(frozen=True, slots=True)
class Conversation:
    """One conversation instance of a thread (channel_id, contact_id), as persisted."""

    id: str
    channel_id: str
    contact_id: str
    state: State
    version: int
    opened_at: datetime
    updated_at: datetime
    deadline_at: datetime | None
    close_reason: CloseReason | None = None
    closed_at: datetime | None = None
    previous_conversation_id: str | None = None
    assigned_agent: str | None = None
    pending_close_reason: CloseReason | None = None
    state_before_close: State | None = None


_CONVERSATION_FIELDS = tuple(f.name for f in fields(Conversation))
_KNOWN = frozenset(_CONVERSATION_FIELDS)
_set = object.__setattr__


def _evolve(conv: Conversation, **changes: Any) -> Conversation:
    """dataclasses.replace for a Conversation at half its cost (it is the lifecycle's most
    frequent step: every transition copies one or two; the what-if replay makes millions). Safe
    as a copy: the class has no __post_init__ and no validation in __init__."""
    if not _KNOWN.issuperset(changes):
        raise TypeError(f"Conversation has no field {sorted(set(changes) - _KNOWN)}")
    new = object.__new__(Conversation)
    for name in _CONVERSATION_FIELDS:
        _set(new, name, changes[name] if name in changes else getattr(conv, name))
    return new


@dataclass(frozen=True, slots=True)
class UserMessage:
    event_id: str
    message_id: str
    text: str | None
    new_conversation_id: str


@dataclass(frozen=True, slots=True)
class BusinessMessage:
    """The business sends first (a template): it joins the thread's open conversation, or opens one."""

    event_id: str
    new_conversation_id: str


@dataclass(frozen=True, slots=True)
class AgentAccepted:
    event_id: str
    agent_id: str


@dataclass(frozen=True, slots=True)
class CloseRequested:
    event_id: str
    reason: CloseReason
    by: str | None = None


@dataclass(frozen=True, slots=True)
class ClosureDetected:
    event_id: str
    confidence: float


@dataclass(frozen=True, slots=True)
class CloseConfirmed:
    event_id: str


@dataclass(frozen=True, slots=True)
class CloseDenied:
    event_id: str


@dataclass(frozen=True, slots=True)
class TimerFired:
    event_id: str
    conversation_id: str
    version: int
    due_at: datetime


@dataclass(frozen=True, slots=True)
class SweepFired:
    event_id: str
    conversation_id: str
    version: int


@dataclass(frozen=True, slots=True)
class ProcessingFailed:
    event_id: str
    error: str


Event: TypeAlias = (
    UserMessage
    | BusinessMessage
    | AgentAccepted
    | CloseRequested
    | ClosureDetected
    | CloseConfirmed
    | CloseDenied
    | TimerFired
    | SweepFired
    | ProcessingFailed
)


@dataclass(frozen=True, slots=True)
class SetTimer:
    conversation_id: str
    version: int
    due_at: datetime


@dataclass(frozen=True, slots=True)
class CancelTimer:
    conversation_id: str


@dataclass(frozen=True, slots=True)
class StoreMessage:
    conversation_id: str
    message_id: str


@dataclass(frozen=True, slots=True)
class Record:
    conversation_id: str
    kind: str
    from_state: State | None
    to_state: State | None
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Emit:
    kind: str
    conversation_id: str


Effect: TypeAlias = SetTimer | CancelTimer | StoreMessage | Record | Emit


@dataclass(frozen=True, slots=True)
class Decision:
    """What the shell persists (`conversation` when `changed`) and then carries out."""

    conversation: Conversation | None
    changed: bool
    effects: tuple[Effect, ...]


_DEADLINE_REASON = {
    State.IDLE: CloseReason.EXPIRED,
    State.PROCESSING: CloseReason.IDLE_TIMEOUT,
    State.AWAITING_CONFIRMATION: CloseReason.USER_CLOSED,
}


def transition(
    current: Conversation | None,
    event: Event,
    now: datetime,
    policy: LifecyclePolicy,
    *,
    channel_id: str,
    contact_id: str,
) -> Decision:
    """Decide what `event` does at `now` to the thread's latest conversation."""
    if now.utcoffset() is None:
        raise ValueError("now must be timezone-aware")
    if current is not None and now < current.updated_at:
        # Time never goes backwards on a thread: events carry the clock of whichever process
        # took them, and the log's order is the truth. An event stamped earlier than the
        # thread's last change happens at that change's time.
        now = current.updated_at
    if isinstance(event, UserMessage):
        return _user_message(current, event, now, policy, channel_id, contact_id)
    if isinstance(event, BusinessMessage):
        if current is not None and current.state is not State.CLOSED:
            return Decision(current, False, ())  # joins the open conversation, changes nothing
        opened: list[Effect] = []
        conv = _open(current, event, now, policy, opened, channel_id, contact_id)
        return _commit(current, conv, now, opened)
    if current is None:
        return Decision(None, False, ())
    if isinstance(event, TimerFired | SweepFired):
        return _deadline(current, event, now)
    if isinstance(event, CloseRequested | ProcessingFailed):
        if isinstance(event, CloseRequested):
            reason, detail = event.reason, f"by {event.by or 'unknown'}"
        else:
            reason, detail = CloseReason.FAILED, event.error
        if current.state is State.CLOSED:
            return _close_again(current, reason, now, policy, detail)
        fx: list[Effect] = []
        return _commit(current, _close(current, reason, now, fx, detail), now, fx)
    return _pending_event(current, event, now, policy)


def _pending_event(
    conv: Conversation,
    event: AgentAccepted | ClosureDetected | CloseConfirmed | CloseDenied,
    now: datetime,
    policy: LifecyclePolicy,
) -> Decision:
    """Agent acceptance and the closure handshake; all no-ops on a closed conversation."""
    fx: list[Effect] = []
    state, pending = conv.state, conv.state in PENDING_STATES
    new: Conversation | None = None
    if state is State.CLOSED:
        pass
    elif isinstance(event, AgentAccepted):
        if state is not State.PROCESSING:
            detail = "pending close dropped: agent accepted" if pending else event.agent_id
            new = _move(_drop_pending(conv), State.PROCESSING, now, policy, fx, detail=detail)
        elif event.agent_id != conv.assigned_agent:
            detail = f"{conv.assigned_agent} -> {event.agent_id}"
            new = _move(conv, state, now, policy, fx, kind="reassigned", detail=detail)
        if new is not None:
            new = _evolve(new, assigned_agent=event.agent_id)
    elif isinstance(event, ClosureDetected):
        if state is State.AWAITING_CONFIRMATION and event.confidence >= policy.closure_unambiguous:
            new = _move(conv, State.WAITING_CLOSE, now, policy, fx, detail="closure confirmed")
        elif not pending and event.confidence >= policy.closure_threshold:
            new = _detect(conv, event.confidence, now, policy, fx)
    elif isinstance(event, CloseConfirmed):
        if state is State.AWAITING_CONFIRMATION:
            new = _move(conv, State.WAITING_CLOSE, now, policy, fx, detail="close confirmed")
    elif pending:
        new = _back(conv, now, policy, fx, "close denied")
    if new is None:
        note = Record(conv.id, "ignored", state, state, f"{type(event).__name__} in {state}")
        return Decision(conv, False, (note,))
    return _commit(conv, new, now, fx)


def _user_message(
    current: Conversation | None,
    event: UserMessage,
    now: datetime,
    policy: LifecyclePolicy,
    channel_id: str,
    contact_id: str,
) -> Decision:
    fx: list[Effect] = []
    text = event.text or ""
    confidence = policy.detector.confidence(text) if text else 0.0

    def signs_off() -> bool:
        # a farewell, or an answer like "sim"/"ok"/"obrigado" that only acknowledges a close
        return confidence >= policy.closure_threshold or classify_reply(text) == "affirmative"

    if current is None or current.state is State.CLOSED:
        window = policy.reopen_window  # zero means "always a new conversation"
        if current is not None and window and _within(current.closed_at, now, window):
            if signs_off():
                store = StoreMessage(current.id, event.message_id)
                note = Record(current.id, "message_after_close", State.CLOSED, State.CLOSED, "sign-off")
                return Decision(current, False, (store, note))
            conv = _reopen(current, now, policy, fx)
        else:
            conv = _open(current, event, now, policy, fx, channel_id, contact_id)
        fx.append(StoreMessage(conv.id, event.message_id))
        return _commit(current, _detect(conv, confidence, now, policy, fx, fresh=True), now, fx)
    fx.append(StoreMessage(current.id, event.message_id))
    if current.state not in PENDING_STATES:
        new = _detect(current, confidence, now, policy, fx)
    elif signs_off():
        # confirms a pending close; in waiting_close it just keeps it
        kind = "deadline_extended" if current.state is State.WAITING_CLOSE else "transition"
        new = _move(current, State.WAITING_CLOSE, now, policy, fx, kind=kind, detail="sign-off")
    else:
        new = _back(current, now, policy, fx, "pending close dropped: user message")
    return _commit(current, new, now, fx)


def _deadline(conv: Conversation, event: TimerFired | SweepFired, now: datetime) -> Decision:
    source = type(event).__name__
    current_timer = (event.conversation_id, event.version) == (conv.id, conv.version)
    if not current_timer or conv.deadline_at is None:
        detail = f"{source} v{event.version}; current {conv.id} v{conv.version} is {conv.state}"
        note = Record(event.conversation_id, "stale_timer", None, None, detail)
        if event.conversation_id == conv.id and conv.deadline_at is not None:
            # An older version's timer of this very conversation: the timer store may lag the
            # conversation (a crash lost a later deadline). Re-arm the real one, so it still
            # fires on time; never close on the old one.
            return Decision(conv, False, (note, SetTimer(conv.id, conv.version, conv.deadline_at)))
        return Decision(conv, False, (note,))
    if now < conv.deadline_at:
        if isinstance(event, SweepFired):
            return Decision(conv, False, ())
        detail = f"fired early at {now.isoformat()}; re-armed for {conv.deadline_at.isoformat()}"
        note = Record(conv.id, "stale_timer", conv.state, conv.state, detail)
        return Decision(conv, False, (note, SetTimer(conv.id, conv.version, conv.deadline_at)))
    reason = _DEADLINE_REASON.get(conv.state) or conv.pending_close_reason
    reason = reason or CloseReason.USER_CLOSED
    fx: list[Effect] = []
    detail = f"{source}: deadline {conv.deadline_at.isoformat()}"
    return _commit(conv, _close(conv, reason, now, fx, detail), now, fx)


def _close_again(
    conv: Conversation, reason: CloseReason, now: datetime, policy: LifecyclePolicy, detail: str
) -> Decision:
    old = conv.close_reason or CloseReason.EXPIRED
    in_grace = _within(conv.closed_at, now, policy.close_grace)
    replaceable = reason.is_explicit and (reason is CloseReason.FAILED or not old.is_explicit)
    if in_grace and replaceable and reason.priority > old.priority:
        fx: list[Effect] = [
            Record(conv.id, "close_upgraded", State.CLOSED, State.CLOSED, f"{old} -> {reason}"),
            Emit("conversation.closed", conv.id),
        ]
        return _commit(conv, _evolve(conv, close_reason=reason), now, fx)
    why = "after close grace" if not in_grace else "existing reason kept"
    note = f"{reason} ({detail}) rejected: closed as {old}, {why}"
    rejected = Record(conv.id, "close_rejected", State.CLOSED, State.CLOSED, note)
    return Decision(conv, False, (rejected,))


def _open(
    previous: Conversation | None,
    event: UserMessage | BusinessMessage,
    now: datetime,
    policy: LifecyclePolicy,
    fx: list[Effect],
    channel_id: str,
    contact_id: str,
) -> Conversation:
    previous_id = previous.id if previous is not None else None
    conv = Conversation(
        id=event.new_conversation_id,
        channel_id=channel_id,
        contact_id=contact_id,
        state=State.IDLE,
        version=1,
        opened_at=now,
        updated_at=now,
        deadline_at=now + policy.idle_timeout,
        previous_conversation_id=previous_id,
    )
    detail = f"after {previous_id}" if previous_id else ""
    fx += [
        Record(conv.id, "opened", None, State.IDLE, detail),
        Emit("conversation.opened", conv.id),
    ]
    return conv


def _reopen(conv: Conversation, now: datetime, policy: LifecyclePolicy, fx: list[Effect]) -> Conversation:
    state = conv.state_before_close or State.IDLE
    fx += [
        Record(conv.id, "reopened", State.CLOSED, state, f"was {conv.close_reason}"),
        Emit("conversation.reopened", conv.id),
    ]
    return _evolve(
        conv,
        state=state,
        deadline_at=now + _timeout(policy, state),
        close_reason=None,
        closed_at=None,
        pending_close_reason=None,
        state_before_close=None,
    )


def _detect(
    conv: Conversation,
    confidence: float,
    now: datetime,
    policy: LifecyclePolicy,
    fx: list[Effect],
    *,
    fresh: bool = False,
) -> Conversation:
    """Apply a closure confidence to idle/processing; otherwise refresh (or keep if fresh)."""
    target = (
        State.WAITING_CLOSE
        if confidence >= policy.closure_unambiguous
        else State.AWAITING_CONFIRMATION
        if confidence >= policy.closure_threshold
        else None
    )
    if target is not None:
        pending = _evolve(conv, pending_close_reason=CloseReason.USER_CLOSED, state_before_close=conv.state)
        return _move(pending, target, now, policy, fx, detail=f"closure intent {confidence:.2f}")
    if fresh:
        return conv
    return _move(conv, conv.state, now, policy, fx, kind="deadline_extended")


def _back(
    conv: Conversation, now: datetime, policy: LifecyclePolicy, fx: list[Effect], detail: str
) -> Conversation:
    target = conv.state_before_close or State.IDLE
    return _move(_drop_pending(conv), target, now, policy, fx, detail=detail)


def _drop_pending(conv: Conversation) -> Conversation:
    return _evolve(conv, pending_close_reason=None, state_before_close=None)


def _move(
    conv: Conversation,
    state: State,
    now: datetime,
    policy: LifecyclePolicy,
    fx: list[Effect],
    *,
    kind: str = "transition",
    detail: str = "",
) -> Conversation:
    """Enter (or stay in) an open state with a fresh deadline."""
    fx.append(Record(conv.id, kind, conv.state, state, detail))
    if state is not conv.state:
        fx.append(Emit("conversation.state_changed", conv.id))
    return _evolve(conv, state=state, deadline_at=now + _timeout(policy, state))


def _close(
    conv: Conversation, reason: CloseReason, now: datetime, fx: list[Effect], detail: str
) -> Conversation:
    fx += [
        Record(conv.id, "closed", conv.state, State.CLOSED, f"{reason}: {detail}"),
        CancelTimer(conv.id),
        Emit("conversation.closed", conv.id),
    ]
    before = conv.state_before_close if conv.state in PENDING_STATES else conv.state
    return _evolve(
        conv,
        state=State.CLOSED,
        deadline_at=None,
        close_reason=reason,
        closed_at=now,
        pending_close_reason=None,
        state_before_close=before,
    )


def _commit(old: Conversation | None, conv: Conversation, now: datetime, fx: list[Effect]) -> Decision:
    """Persist one change: version + 1 (1 for a new conversation) and arm its deadline."""
    version = old.version + 1 if old is not None and old.id == conv.id else 1
    conv = _evolve(conv, version=version, updated_at=now)
    if conv.deadline_at is not None:
        fx.append(SetTimer(conv.id, version, conv.deadline_at))
    return Decision(conv, True, tuple(fx))


def _within(since: datetime | None, now: datetime, window: timedelta) -> bool:
    return since is not None and now - since <= window


def _timeout(policy: LifecyclePolicy, state: State) -> timedelta:
    timeout = policy.timeout_for(state)
    if timeout is None:
        raise ValueError(f"{state} has no deadline")
    return timeout
