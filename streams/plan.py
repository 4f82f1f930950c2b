"""The pure half of applying a batch: events + the threads' current conversations -> a Plan.

No IO and no clock: the projection reads what the plan needs, feeds it the events in log order,
and writes the plan's rows in one transaction. What the plan decides is exactly what the domain
decides (`domain.lifecycle.transition`), with the event's own time as `now`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import orjson

from domain.actions import CLOSE, Action, Arm, Disarm, close_token
from domain.lifecycle import (
    AgentAccepted,
    BusinessMessage,
    CancelTimer,
    CloseRequested,
    Conversation,
    Emit,
    Event,
    Record,
    SetTimer,
    StoreMessage,
    SweepFired,
    TimerFired,
    UserMessage,
    transition,
)
from domain.policy import LifecyclePolicy
from domain.schedules import Schedule
from streams.outgoing import (
    MESSAGE_RECEIVED,
    Ids,
    Outgoing,
    conversation_data,
    message_data,
)
from streams.records import (
    SCHEDULE_RECORDS,
    AcceptCommand,
    CloseCommand,
    ConversationEvent,
    InboundMessage,
    LifecycleEvent,
    OutboundMessage,
    SendRequested,
    StatusReceipt,
    TimerFiredRecord,
    conversation_id_for,
    occurred_at,
)
from streams.schedules_plan import SchedulePlan, SchedulesPlanner
from streams.topics import thread_key

Thread = tuple[str, str]
# WhatsApp lets a business answer freely for 24 h after the user's last message.
SERVICE_WINDOW = timedelta(hours=24)


def to_domain(event: LifecycleEvent) -> Event:
    """The domain event a wire record stands for."""
    if isinstance(event, InboundMessage):
        return UserMessage(
            event.event_id,
            message_id=event.provider_message_id,
            text=event.text,
            new_conversation_id=conversation_id_for(event.event_id),
        )
    if isinstance(event, CloseCommand):
        return CloseRequested(event.event_id, reason=event.reason, by=event.by)
    if isinstance(event, AcceptCommand):
        return AgentAccepted(event.event_id, agent_id=event.agent_id)
    if isinstance(event, SendRequested):  # business-initiated: joins or opens the conversation
        return BusinessMessage(event.event_id, new_conversation_id=conversation_id_for(event.event_id))
    if event.source == "sweep":
        return SweepFired(event.event_id, conversation_id=event.conversation_id, version=event.version)
    return TimerFired(
        event.event_id,
        conversation_id=event.conversation_id,
        version=event.version,
        due_at=event.due_at,
    )


def cause_of(event: LifecycleEvent) -> str:
    """The audit log's cause column: what made the transition happen."""
    if isinstance(event, InboundMessage):
        return f"message:{event.provider_message_id}"
    if isinstance(event, CloseCommand):
        return f"command:close:{event.by or 'api'}"
    if isinstance(event, AcceptCommand):
        return f"command:accept:{event.agent_id}"
    if isinstance(event, SendRequested):
        return f"send:{event.message_id}"
    return f"{event.source}:{event.due_at.isoformat()}"


@dataclass
class Current:
    """A thread's current conversation as read, and its position in the thread (thread_seq)."""

    conversation: Conversation
    seq: int


@dataclass
class Plan:
    """Everything one batch writes, and what the shell does after the commit."""

    inserts: list[Conversation] = field(default_factory=list)
    # (new row, version it was read at): the UPDATE is conditional on that version
    updates: list[tuple[Conversation, int]] = field(default_factory=list)
    seq: dict[str, int] = field(default_factory=dict)  # conversation id -> thread_seq
    windows: dict[str, datetime] = field(default_factory=dict)  # conversation id -> window end
    messages: list[tuple[Any, ...]] = field(default_factory=list)
    audit: list[tuple[Any, ...]] = field(default_factory=list)
    outbound: list[OutboundMessage] = field(default_factory=list)
    receipts: list[StatusReceipt] = field(default_factory=list)
    sends: list[tuple[SendRequested, str]] = field(default_factory=list)  # (request, conversation id)
    queued: list[Any] = field(default_factory=list)  # those queued (streams.sends_db.Send; written)
    actions: list[Action] = field(default_factory=list)  # in order; the last per (owner, name) counts
    emits: list[Emit] = field(default_factory=list)
    # the outgoing events of the conversation changes, in log order (streams/outgoing.py)
    outbox: list[Outgoing] = field(default_factory=list)
    schedules: SchedulePlan = field(default_factory=SchedulePlan)
    applied: int = 0


class Planner:
    """Feed events in log order with `add`; `finish` returns the Plan."""

    def __init__(
        self,
        current: dict[Thread, Current],
        policy: LifecyclePolicy,
        schedules: dict[str, Schedule] | None = None,
    ) -> None:
        self.policy = policy
        self.current = {thread: c.conversation for thread, c in current.items()}
        self.read_version = {c.conversation.id: c.conversation.version for c in current.values()}
        self.seqs = {thread: c.seq for thread, c in current.items()}
        self.plan = Plan(seq={c.conversation.id: c.seq for c in current.values()})
        self.changed: dict[str, Conversation] = {}
        self.schedules = SchedulesPlanner(schedules or {}, self.plan.actions)
        self.position = -1  # the current event's place in the batch

    def add(self, event: ConversationEvent) -> None:
        """Decide one event against the thread's conversation as the batch left it so far."""
        plan = self.plan
        self.position += 1
        if isinstance(event, SCHEDULE_RECORDS):
            self.schedules.add(event)  # user schedules: streams/schedules_plan.py
            plan.applied += 1
            return
        if isinstance(event, OutboundMessage):
            plan.outbound.append(event)  # no lifecycle change; stored by streams.receipts
            plan.applied += 1
            return
        if isinstance(event, StatusReceipt):
            plan.receipts.append(event)
            plan.applied += 1
            return
        if isinstance(event, SendRequested) and event.conversation_id is not None:
            plan.sends.append((event, event.conversation_id))  # queued in the conversation's order
            plan.applied += 1
            return
        thread = (event.channel_id, event.contact_id)
        now = occurred_at(event)
        before = self.current.get(thread)
        if isinstance(event, CloseCommand | AcceptCommand | TimerFiredRecord) and (
            before is None or before.id != event.conversation_id
        ):
            # Aimed at a conversation that is no longer the thread's current one: never let it
            # act on the newer one; keep the attempt in the log of the one it aimed at.
            plan.audit.append(
                (
                    event.conversation_id,
                    event.event_id,
                    "command_ignored",
                    None,
                    None,
                    cause_of(event),
                    "conversation is not the thread's current one",
                    0,
                    now,
                )
            )
            return
        decision = transition(
            before,
            to_domain(event),
            now,
            self.policy,
            channel_id=event.channel_id,
            contact_id=event.contact_id,
        )
        conv = decision.conversation
        key = thread_key(*thread).decode()
        ids = Ids(event.event_id)
        # outgoing events carry the transition's time: never before the thread's last change
        at = before.updated_at if before is not None and now < before.updated_at else now
        step: Record | None = None  # the last Record: the step an Emit after it announces
        if conv is not None and decision.changed:
            if conv.id not in plan.seq:  # a new conversation: next in the thread's log order
                self.seqs[thread] = plan.seq[conv.id] = self.seqs.get(thread, 0) + 1
            self.current[thread] = conv
            self.changed[conv.id] = conv
        for effect in decision.effects:
            if isinstance(effect, StoreMessage) and isinstance(event, InboundMessage):
                self._message(effect.conversation_id, event)
                data = message_data(
                    effect.conversation_id,
                    event.channel_id,
                    event.contact_id,
                    event.provider_message_id,
                    event.type,
                    event.text,
                    event.sent_at,
                    at,
                )
                plan.outbox.append(
                    Outgoing(ids.next(MESSAGE_RECEIVED), MESSAGE_RECEIVED, key, data, at, self.position)
                )
            elif isinstance(effect, Record):
                step = effect
                version = (
                    self.changed[effect.conversation_id].version
                    if effect.conversation_id in self.changed
                    else (conv.version if conv else 0)
                )
                plan.audit.append(
                    (
                        effect.conversation_id,
                        event.event_id,
                        effect.kind,
                        effect.from_state.value if effect.from_state else None,
                        effect.to_state.value if effect.to_state else None,
                        cause_of(event),
                        effect.detail,
                        version,
                        now,
                    )
                )
            elif isinstance(effect, SetTimer):
                token = close_token(effect.conversation_id, effect.version)
                plan.actions.append(Arm(key, CLOSE, effect.due_at, token))
            elif isinstance(effect, CancelTimer):
                plan.actions.append(Disarm(key, CLOSE))
            elif isinstance(effect, Emit) and conv is not None:
                plan.emits.append(effect)
                # An Emit always follows the Record of the step it announces (domain/lifecycle.py
                # lists effects in order), which carries that step's states.
                before_reason = before.close_reason if before is not None and before.id == conv.id else None
                data = conversation_data(
                    conv,
                    step.to_state if step is not None else None,
                    step.from_state if step is not None else None,
                    before_reason,
                    at,
                )
                plan.outbox.append(Outgoing(ids.next(effect.kind), effect.kind, key, data, at, self.position))
        if isinstance(event, SendRequested) and conv is not None:
            plan.sends.append((event, conv.id))  # the conversation it joined or opened
        plan.applied += 1

    def _message(self, conversation_id: str, event: InboundMessage) -> None:
        self.plan.messages.append(
            (
                conversation_id,
                event.channel_id,
                event.contact_id,
                event.provider_message_id,
                event.type,
                event.text,
                orjson.dumps(event.payload).decode(),
                event.sent_at,
            )
        )
        # The window runs from the user's message; a provider clock ahead of ours cannot stretch
        # it (and a far-future sent_at cannot overflow). It never moves backwards.
        ends = min(event.sent_at, event.received_at) + SERVICE_WINDOW
        windows = self.plan.windows
        windows[conversation_id] = max(windows.get(conversation_id, ends), ends)

    def finish(self) -> Plan:
        """The plan: new conversations, and updates sorted by id (rows locked in one order)."""
        plan = self.plan
        plan.schedules = self.schedules.finish()
        plan.inserts = [c for cid, c in self.changed.items() if cid not in self.read_version]
        plan.updates = sorted(
            ((c, self.read_version[cid]) for cid, c in self.changed.items() if cid in self.read_version),
            key=lambda pair: pair[0].id,
        )
        return plan
