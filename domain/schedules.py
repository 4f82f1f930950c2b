"""User schedules: the pure decisions behind /v1/schedules (no IO, no clock).

A schedule is a key -> (run_at, event_type, payload, max_attempts) that, when due, emits its
event. Every command (put, cancel, retry, result) and every firing (due) is an event on the
schedule's own partition (owner key `schedule:<key>`), applied in one order by one agent, so
`decide` sees them one at a time against the state the previous one left: a cancel or a
reschedule decided before the firing wins, one decided after it answers 409.

Versions: every PUT that changes the schedule, and every manual retry, starts a new version.
Each arming of the action "schedule" carries the token `<epoch>.<version>` (epoch: the creation
time in ms, so a key cleaned up and created again never reuses a token, nor a firing id); a
firing whose token is not the current one is stale and does nothing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from domain.actions import Action, Arm, Disarm, due_ms

SCHEDULE = "schedule"  # the action name
OWNER_PREFIX = "schedule:"
KEY_PATTERN = re.compile(r"[A-Za-z0-9._:-]{1,200}")
MAX_BACKOFF = timedelta(hours=24)
FIRED_TYPE = "schedule.fired"


def owner_of(key: str) -> str:
    """The Kafka key (action owner) of a schedule; thread keys always hold '/', these never do."""
    return OWNER_PREFIX + key


def key_of(owner: str) -> str:
    """Inverse of owner_of."""
    return owner.removeprefix(OWNER_PREFIX)


class Status(StrEnum):
    """Where a schedule is."""

    SCHEDULED = "scheduled"  # a firing is pending (the first one, or a retry after a failure)
    FIRED = "fired"  # fired; waiting for its result
    SUCCEEDED = "succeeded"
    FAILED = "failed"  # every attempt failed
    CANCELLED = "cancelled"


FINAL = frozenset({Status.SUCCEEDED, Status.FAILED, Status.CANCELLED})


@dataclass(frozen=True, slots=True)
class Spec:
    """What a PUT asks for. `delay_ms` is set when the client gave a delay (run_at is then the
    command's time + delay): the same delay again is the same body, and changes nothing."""

    run_at: datetime
    event_type: str
    payload: dict[str, Any]
    max_attempts: int = 1
    backoff_ms: int = 2000
    delay_ms: int | None = None

    def same_as(self, s: Schedule) -> bool:
        """Whether this body is the one the schedule's current version was made from."""
        when = (
            self.delay_ms == s.delay_ms
            if self.delay_ms is not None
            else (s.delay_ms is None and self.run_at == s.run_at)
        )
        return (
            when
            and self.event_type == s.event_type
            and self.payload == s.payload
            and self.max_attempts == s.max_attempts
            and self.backoff_ms == s.backoff_ms
        )


@dataclass(frozen=True, slots=True)
class Schedule:
    """A schedule's state (one row of `schedules`)."""

    key: str
    status: Status
    version: int
    epoch: int  # creation time in ms: part of the token
    run_at: datetime
    event_type: str
    payload: dict[str, Any]
    max_attempts: int
    backoff_ms: int
    delay_ms: int | None
    attempts: int
    last_error: str | None
    created_at: datetime
    updated_at: datetime
    fired_at: datetime | None = None
    due_at: datetime | None = None  # the pending firing: run_at, or a retry's time
    revision: int = 0  # write counter: the row is updated only at the revision it was read at

    @property
    def token(self) -> str:
        """The token of the current version's arming."""
        return token_of(self.epoch, self.version)


def token_of(epoch: int, version: int) -> str:
    """The token of one version of one incarnation of a schedule."""
    return f"{epoch}.{version}"


@dataclass(frozen=True, slots=True)
class Put:
    """Create or reschedule."""

    spec: Spec


@dataclass(frozen=True, slots=True)
class Cancel:
    """Cancel a pending schedule."""


@dataclass(frozen=True, slots=True)
class Retry:
    """Run a failed schedule again now (a new version, attempts from 0)."""


@dataclass(frozen=True, slots=True)
class Result:
    """The consumer of a fired event reports how it went (`version`: optional, checked if given)."""

    ok: bool
    error: str | None = None
    version: int | None = None


@dataclass(frozen=True, slots=True)
class Due:
    """The action came due (timer or sweep); `due` in ms as armed."""

    token: str
    due: int


Command = Put | Cancel | Retry | Result | Due


@dataclass(frozen=True, slots=True)
class Emitted:
    """An event for the outbox; `suffix` makes its id from the source event's id."""

    suffix: str
    type: str
    data: dict[str, Any]


@dataclass(frozen=True, slots=True)
class History:
    """One line of a schedule's history."""

    version: int
    kind: str
    detail: str | None


@dataclass(frozen=True, slots=True)
class Decision:
    """What one command does: the new state (None: unchanged), the answer, the effects."""

    schedule: Schedule | None
    status: int
    body: dict[str, Any]
    actions: list[Action] = field(default_factory=list)
    emits: list[Emitted] = field(default_factory=list)
    history: list[History] = field(default_factory=list)


def _iso(at: datetime | None) -> str | None:
    return at.isoformat() if at else None


def view(s: Schedule) -> dict[str, Any]:
    """A schedule as the API shows it (JSON-ready)."""
    return {
        "key": s.key,
        "status": s.status.value,
        "version": s.version,
        "run_at": _iso(s.run_at),
        "event_type": s.event_type,
        "payload": s.payload,
        "max_attempts": s.max_attempts,
        "attempts": s.attempts,
        "last_error": s.last_error,
        "next_attempt_at": _iso(s.due_at),
        "created_at": _iso(s.created_at),
        "updated_at": _iso(s.updated_at),
        "fired_at": _iso(s.fired_at),
    }


def backoff(s: Schedule) -> timedelta:
    """The wait before the next attempt after `s.attempts` failed ones: backoff * 2^(n-1)."""
    ms = s.backoff_ms * 2 ** max(0, s.attempts - 1)
    return min(timedelta(milliseconds=ms), MAX_BACKOFF)


def _answer(s: Schedule, status: int, result: str, **extra: Any) -> dict[str, Any]:
    return {**view(s), "result": result, **extra}


def _conflict(s: Schedule, why: str) -> Decision:
    return Decision(None, 409, {"error": why, "schedule": view(s)})


def _not_found(key: str) -> Decision:
    return Decision(None, 404, {"error": "no such schedule", "key": key})


def _arm(s: Schedule) -> Arm:
    assert s.due_at is not None
    return Arm(owner_of(s.key), SCHEDULE, s.due_at, s.token)


def _armed_as(spec: Spec) -> dict[str, Any]:
    """The fields a PUT sets: what, when, the retry policy; armed for run_at, attempts from 0."""
    return {
        "run_at": spec.run_at,
        "event_type": spec.event_type,
        "payload": spec.payload,
        "max_attempts": spec.max_attempts,
        "backoff_ms": spec.backoff_ms,
        "delay_ms": spec.delay_ms,
        "attempts": 0,
        "last_error": None,
        "due_at": spec.run_at,
    }


def _put(current: Schedule | None, key: str, spec: Spec, now: datetime) -> Decision:
    late = spec.run_at < now
    if current is None:
        s = Schedule(
            key=key,
            status=Status.SCHEDULED,
            version=1,
            epoch=due_ms(now),
            created_at=now,
            updated_at=now,
            **_armed_as(spec),
        )
        return Decision(
            s, 201, _answer(s, 201, "created", late=late), [_arm(s)], [], [History(1, "created", _run(s))]
        )
    if current.status in (Status.FIRED, Status.SUCCEEDED, Status.FAILED):
        return _conflict(current, f"schedule already fired (version {current.version})")
    if current.status is Status.SCHEDULED and spec.same_as(current):
        return Decision(None, 200, _answer(current, 200, "unchanged", late=False))
    restarted = current.status is Status.CANCELLED
    s = replace(
        current,
        status=Status.SCHEDULED,
        version=current.version + 1,
        updated_at=now,
        fired_at=None,
        **_armed_as(spec),
    )
    kind = "restarted" if restarted else "rescheduled"
    return Decision(
        s, 200, _answer(s, 200, kind, late=late), [_arm(s)], [], [History(s.version, kind, _run(s))]
    )


def _run(s: Schedule) -> str:
    return f"run_at {s.run_at.isoformat()}"


def _fire(s: Schedule, now: datetime) -> Decision:
    fired = replace(
        s, status=Status.FIRED, attempts=s.attempts + 1, fired_at=now, updated_at=now, due_at=None
    )
    data = {
        "key": s.key,
        "version": s.version,
        "attempt": fired.attempts,
        "event_type": s.event_type,
        "payload": s.payload,
        "run_at": s.run_at.isoformat(),
        "fired_at": now.isoformat(),
    }
    return Decision(
        fired,
        200,
        view(fired),
        [Disarm(owner_of(s.key), SCHEDULE)],
        [Emitted("fired", FIRED_TYPE, data), Emitted("event", s.event_type, s.payload)],
        [History(s.version, "fired", f"attempt {fired.attempts}")],
    )


def decide(current: Schedule | None, key: str, command: Command, now: datetime) -> Decision:
    """Decide one command (or firing) against the schedule's current state.

    `now` is the command's own time (or the firing's), never earlier than the last change.
    """
    if current is not None:
        now = max(now, current.updated_at)
    if isinstance(command, Put):
        return _put(current, key, command.spec, now)
    if current is None:
        return _not_found(key)
    if isinstance(command, Due):
        if command.token != current.token or current.status is not Status.SCHEDULED:
            return Decision(None, 200, {"ignored": "stale"})
        assert current.due_at is not None
        if command.due < due_ms(current.due_at):
            # early for the current arming (cannot happen with one arming per token and due):
            # put the real one back rather than lose it
            return Decision(None, 200, {"ignored": "early"}, [_arm(current)])
        return _fire(current, max(now, current.due_at))  # stamped never before it was due
    if isinstance(command, Cancel):
        if current.status is Status.CANCELLED:
            return Decision(None, 200, _answer(current, 200, "unchanged"))
        if current.status is not Status.SCHEDULED:
            return _conflict(current, f"schedule already fired (version {current.version})")
        s = replace(current, status=Status.CANCELLED, updated_at=now, due_at=None)
        return Decision(
            s,
            200,
            _answer(s, 200, "cancelled"),
            [Disarm(owner_of(key), SCHEDULE)],
            [],
            [History(s.version, "cancelled", None)],
        )
    if isinstance(command, Retry):
        if current.status is not Status.FAILED:
            return _conflict(current, f"only a failed schedule can be retried; this one is {current.status}")
        s = replace(
            current,
            status=Status.SCHEDULED,
            version=current.version + 1,
            attempts=0,
            updated_at=now,
            fired_at=None,
            due_at=now,
        )
        return Decision(
            s, 200, _answer(s, 200, "retrying"), [_arm(s)], [], [History(s.version, "retried", None)]
        )
    # Result
    if command.version is not None and command.version != current.version:
        return _conflict(
            current, f"result for version {command.version}; the schedule is at {current.version}"
        )
    if current.status is not Status.FIRED:
        return _conflict(current, f"no result expected: the schedule is {current.status}")
    if command.ok:
        s = replace(current, status=Status.SUCCEEDED, updated_at=now)
        return Decision(s, 200, _answer(s, 200, "succeeded"), [], [], [History(s.version, "succeeded", None)])
    error = (command.error or "failed")[:2000]
    if current.attempts < current.max_attempts:
        s = replace(current, status=Status.SCHEDULED, last_error=error, updated_at=now)
        s = replace(s, due_at=now + backoff(s))
        detail = f"attempt {current.attempts}: {error}; next at {_iso(s.due_at)}"
        return Decision(
            s,
            200,
            _answer(s, 200, "retry_scheduled"),
            [_arm(s)],
            [],
            [History(s.version, "failed_attempt", detail)],
        )
    s = replace(current, status=Status.FAILED, last_error=error, updated_at=now)
    detail = f"attempt {current.attempts}: {error}"
    return Decision(s, 200, _answer(s, 200, "failed"), [], [], [History(s.version, "failed", detail)])
