"""The pure half of applying a batch's schedule events (streams/plan.py dispatches them here).

Events in log order against the schedules as the batch read them -> the rows to write: the
schedules' final states (inserted, or updated at the revision read), history lines, the answer
to each command (schedule_results, what the API waits for) and the outbox's emitted events. The
Arm/Disarm decisions go into the batch's common action list (stored, then armed, by the engine);
the outbox rows are written with the batch's others (streams/outgoing.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Literal

import orjson

from domain.actions import Action, due_ms
from domain.schedules import (
    Cancel,
    Command,
    Due,
    Put,
    Result,
    Retry,
    Schedule,
    Spec,
    decide,
    key_of,
    owner_of,
)
from streams.outgoing import Outgoing
from streams.records import ScheduleDue, SchedulePut, ScheduleRecord, occurred_at


@dataclass
class SchedulePlan:
    """The schedule rows one batch writes."""

    inserts: list[Schedule] = field(default_factory=list)
    updates: list[tuple[Schedule, int]] = field(default_factory=list)  # (new row, revision read)
    history: list[tuple[str, int, str, datetime, str | None, str]] = field(default_factory=list)
    results: list[tuple[str, int, dict[str, Any]]] = field(default_factory=list)  # (event id, status, body)
    outbox: list[Outgoing] = field(default_factory=list)  # keyed by the owner `schedule:<key>`

    def __bool__(self) -> bool:
        return bool(self.inserts or self.updates or self.history or self.results or self.outbox)


def command_of(event: ScheduleRecord) -> Command:
    """The domain command a wire record stands for."""
    if isinstance(event, SchedulePut):
        return Put(
            Spec(
                run_at=event.run_at,
                event_type=event.event_type,
                payload=event.payload,
                max_attempts=event.max_attempts,
                backoff_ms=event.backoff_ms,
                delay_ms=event.delay_ms,
            )
        )
    if isinstance(event, ScheduleDue):
        return Due(event.token, due_ms(event.due_at))
    if event.kind == "schedule.cancel":
        return Cancel()
    if event.kind == "schedule.retry":
        return Retry()
    return Result(ok=bool(event.ok), error=event.error, version=event.version)


def _time(event: ScheduleRecord) -> datetime:
    return occurred_at(event)


class SchedulesPlanner:
    """Feed schedule events in log order with `add`; `finish` fills the SchedulePlan."""

    def __init__(self, current: dict[str, Schedule], actions: list[Action]) -> None:
        self.current: dict[str, Schedule] = dict(current)
        self.read_revision = {key: s.revision for key, s in current.items()}
        self.actions = actions  # the batch's common list
        self.changed: dict[str, Schedule] = {}
        self.plan = SchedulePlan()

    def add(self, event: ScheduleRecord) -> None:
        """Decide one event against the schedule as the batch left it so far."""
        now = _time(event)
        decision = decide(self.current.get(event.key), event.key, command_of(event), now)
        s = decision.schedule
        if s is not None:
            self.current[event.key] = self.changed[event.key] = s
        self.actions.extend(decision.actions)
        at = s.updated_at if s is not None else now
        for h in decision.history:
            self.plan.history.append((event.key, h.version, h.kind, at, h.detail, event.event_id))
        for e in decision.emits:
            data = _dumps(e.data)
            # keyed like the schedule's own events (its owner): the outbox partition is the one
            # whose worker wrote the row, and whose relay publishes it at once
            owner = owner_of(event.key)
            self.plan.outbox.append(Outgoing(f"{event.event_id}:{e.suffix}", e.type, owner, data, at))
        if not isinstance(event, ScheduleDue):
            self.plan.results.append((event.event_id, decision.status, decision.body))

    def finish(self) -> SchedulePlan:
        """The rows: new schedules, and updates sorted by key (rows locked in one order)."""
        plan = self.plan
        for key in sorted(self.changed):
            s = self.changed[key]
            if key in self.read_revision:
                read = self.read_revision[key]
                plan.updates.append((replace(s, revision=read + 1), read))
            else:
                plan.inserts.append(replace(s, revision=1))
        return plan


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def schedule_event_id(key: str, token: str, due: int) -> str:
    """The identity of one firing of one arming (timer and sweep alike, so repeats dedupe)."""
    return f"schedule:{key}:{token}:{due}"


def schedule_firing(
    owner: str, token: str, due: int, fired_at: datetime, source: Literal["timer", "sweep"]
) -> ScheduleDue:
    """The firing builder of the action "schedule" (registered in streams/firings.py FIRINGS)."""
    key = key_of(owner)
    due_at = datetime.fromtimestamp(due / 1000, UTC)
    return ScheduleDue(
        event_id=schedule_event_id(key, token, due),
        key=key,
        token=token,
        due_at=due_at,
        fired_at=max(fired_at, due_at),  # never before it is due, whoever fires it
        source=source,
    )
