"""The schedules' pure decisions (domain/schedules.py) and their planner (streams/schedules_plan.py)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from domain.actions import Arm, Disarm, due_ms
from domain.schedules import (
    FIRED_TYPE,
    SCHEDULE,
    Cancel,
    Command,
    Decision,
    Due,
    Put,
    Result,
    Retry,
    Schedule,
    Spec,
    Status,
    decide,
)
from streams.records import ScheduleCommand, ScheduleDue, SchedulePut
from streams.schedules_db import notify_chunks
from streams.schedules_plan import SchedulesPlanner, schedule_event_id, schedule_firing

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
KEY = "close:res-1"


def spec(at: datetime = T0 + timedelta(hours=1), **kw: Any) -> Spec:
    return Spec(run_at=at, event_type="reservation.pin.generate", payload={"r": 1}, **kw)


def created(**kw: Any) -> Schedule:
    d = decide(None, KEY, Put(spec(**kw)), T0)
    assert d.schedule is not None
    return d.schedule


def due_of(s: Schedule) -> Due:
    assert s.due_at is not None
    return Due(s.token, due_ms(s.due_at))


def fired(**kw: Any) -> Schedule:
    s = created(**kw)
    d = decide(s, KEY, due_of(s), s.run_at)
    assert d.schedule is not None
    return d.schedule


def test_create_answers_201_and_arms_the_schedule_action() -> None:
    d = decide(None, KEY, Put(spec()), T0)
    assert d.status == 201 and d.body["result"] == "created" and d.body["late"] is False
    assert d.schedule is not None and d.schedule.status is Status.SCHEDULED and d.schedule.version == 1
    assert d.actions == [Arm("schedule:close:res-1", SCHEDULE, T0 + timedelta(hours=1), d.schedule.token)]


def test_a_run_at_in_the_past_is_late_and_armed_at_once() -> None:
    d = decide(None, KEY, Put(spec(T0 - timedelta(minutes=5))), T0)
    assert d.status == 201 and d.body["late"] is True
    assert isinstance(d.actions[0], Arm) and d.actions[0].due_at <= T0


def test_the_same_body_again_changes_nothing() -> None:
    s = created()
    d = decide(s, KEY, Put(spec()), T0 + timedelta(seconds=5))
    assert (d.status, d.body["result"], d.schedule, d.actions) == (200, "unchanged", None, [])


def test_the_same_delay_again_is_the_same_body_and_does_not_push_it() -> None:
    s = created(delay_ms=60_000)
    later = spec(T0 + timedelta(minutes=2), delay_ms=60_000)  # resolved at a later command time
    d = decide(s, KEY, Put(later), T0 + timedelta(minutes=1))
    assert d.body["result"] == "unchanged" and d.schedule is None


def test_reschedule_is_a_new_version_and_the_old_firing_is_stale() -> None:
    s = created()
    old = due_of(s)
    d = decide(s, KEY, Put(spec(T0 + timedelta(hours=2))), T0 + timedelta(seconds=1))
    assert d.status == 200 and d.body["result"] == "rescheduled"
    new = d.schedule
    assert new is not None and new.version == 2 and new.token != s.token
    assert d.actions == [Arm("schedule:close:res-1", SCHEDULE, T0 + timedelta(hours=2), new.token)]
    stale = decide(new, KEY, old, T0 + timedelta(hours=1))
    assert stale.schedule is None and stale.emits == [] and stale.actions == []


def test_fire_only_for_the_current_token_emits_both_events_and_disarms() -> None:
    s = created()
    d = decide(s, KEY, due_of(s), s.run_at + timedelta(milliseconds=3))
    assert d.schedule is not None and d.schedule.status is Status.FIRED and d.schedule.attempts == 1
    assert d.actions == [Disarm("schedule:close:res-1", SCHEDULE)]
    assert [e.type for e in d.emits] == [FIRED_TYPE, "reservation.pin.generate"]
    assert d.emits[0].data["key"] == KEY and d.emits[0].data["version"] == 1
    assert d.emits[0].data["payload"] == {"r": 1} and d.emits[1].data == {"r": 1}
    again = decide(d.schedule, KEY, due_of(s), s.run_at + timedelta(seconds=1))
    assert again.schedule is None and again.emits == []  # fired already: a repeat does nothing


def test_an_early_firing_never_acts_and_re_arms_the_real_one() -> None:
    s = created()
    assert s.due_at is not None
    d = decide(s, KEY, Due(s.token, due_ms(s.due_at) - 1), s.run_at)
    assert (
        d.schedule is None
        and d.emits == []
        and d.actions == [Arm(f"schedule:{KEY}", SCHEDULE, s.due_at, s.token)]
    )


def test_cancel_before_firing_wins_after_firing_is_409_unknown_404() -> None:
    s = created()
    d = decide(s, KEY, Cancel(), T0)
    assert d.status == 200 and d.schedule is not None and d.schedule.status is Status.CANCELLED
    assert d.actions == [Disarm("schedule:close:res-1", SCHEDULE)]
    assert decide(d.schedule, KEY, due_of(s), s.run_at).emits == []
    assert decide(d.schedule, KEY, Cancel(), T0).body["result"] == "unchanged"
    late = decide(fired(), KEY, Cancel(), T0 + timedelta(hours=2))
    assert late.status == 409 and late.body["schedule"]["status"] == "fired"
    assert decide(None, KEY, Cancel(), T0).status == 404


def test_put_after_firing_is_409_and_put_after_cancel_starts_a_new_version() -> None:
    f = fired()
    assert decide(f, KEY, Put(spec(T0 + timedelta(hours=3))), T0 + timedelta(hours=2)).status == 409
    assert decide(f, KEY, Put(spec()), T0 + timedelta(hours=2)).status == 409
    c = decide(created(), KEY, Cancel(), T0).schedule
    assert c is not None
    d = decide(c, KEY, Put(spec()), T0 + timedelta(seconds=1))
    assert d.status == 200 and d.body["result"] == "restarted" and d.schedule is not None
    assert d.schedule.version == 2 and d.schedule.status is Status.SCHEDULED and len(d.actions) == 1


def test_failures_retry_with_exponential_backoff_then_fail_then_retry_endpoint() -> None:
    s = fired(max_attempts=3, backoff_ms=1000)
    waits = []
    for attempt in (1, 2):
        now = s.fired_at
        assert now is not None
        d = decide(s, KEY, Result(ok=False, error=f"boom {attempt}"), now)
        assert d.status == 200 and d.body["result"] == "retry_scheduled" and d.schedule is not None
        assert d.schedule.status is Status.SCHEDULED and d.schedule.last_error == f"boom {attempt}"
        assert d.schedule.due_at is not None
        waits.append(d.schedule.due_at - now)
        assert d.actions == [Arm(f"schedule:{KEY}", SCHEDULE, d.schedule.due_at, d.schedule.token)]
        f = decide(d.schedule, KEY, due_of(d.schedule), d.schedule.due_at)
        assert f.schedule is not None and f.schedule.attempts == attempt + 1
        s = f.schedule
    assert waits == [timedelta(seconds=1), timedelta(seconds=2)]
    d = decide(s, KEY, Result(ok=False, error="boom 3"), T0 + timedelta(hours=2))
    assert d.body["result"] == "failed" and d.schedule is not None and d.schedule.status is Status.FAILED
    assert d.actions == [] and d.schedule.attempts == 3
    r = decide(d.schedule, KEY, Retry(), T0 + timedelta(hours=3))
    assert r.status == 200 and r.schedule is not None and r.schedule.status is Status.SCHEDULED
    assert (
        r.schedule.version == 2 and r.schedule.attempts == 0 and r.schedule.due_at == T0 + timedelta(hours=3)
    )
    assert decide(r.schedule, KEY, Retry(), T0 + timedelta(hours=3)).status == 409


def test_results() -> None:
    f = fired()
    ok = decide(f, KEY, Result(ok=True), T0 + timedelta(hours=2))
    assert ok.schedule is not None and ok.schedule.status is Status.SUCCEEDED
    assert decide(ok.schedule, KEY, Result(ok=True), T0 + timedelta(hours=2)).status == 409
    assert decide(f, KEY, Result(ok=True, version=7), T0 + timedelta(hours=2)).status == 409
    assert decide(created(), KEY, Result(ok=True), T0).status == 409  # not fired yet
    assert decide(None, KEY, Result(ok=True), T0).status == 404
    once = decide(fired(max_attempts=1), KEY, Result(ok=False, error="x"), T0 + timedelta(hours=2))
    assert once.schedule is not None and once.schedule.status is Status.FAILED


def _command(draw: st.DrawFn, s: Schedule | None, now: datetime) -> Command:
    kind = draw(st.sampled_from(["put", "cancel", "retry", "ok", "fail", "due", "stale"]))
    if kind == "put":
        return Put(spec(now + timedelta(seconds=draw(st.integers(-5, 30)))))
    if kind == "cancel":
        return Cancel()
    if kind == "retry":
        return Retry()
    if kind in ("ok", "fail"):
        return Result(ok=kind == "ok", error=None if kind == "ok" else "e")
    if s is not None and s.due_at is not None and kind == "due":
        return Due(s.token, due_ms(s.due_at))
    return Due("0.0", due_ms(now))


@st.composite
def runs(draw: st.DrawFn) -> list[tuple[Command, Decision, Schedule | None, datetime]]:
    s: Schedule | None = None
    now = T0
    out = []
    for _ in range(draw(st.integers(1, 25))):
        now += timedelta(seconds=draw(st.integers(0, 20)))
        cmd = _command(draw, s, now)
        d = decide(s, KEY, cmd, now)
        out.append((cmd, d, s, now))
        if d.schedule is not None:
            s = d.schedule
    return out


@settings(max_examples=300, deadline=None)
@given(runs())
def test_invariants_over_random_command_sequences(
    run: list[tuple[Command, Decision, Schedule | None, datetime]],
) -> None:
    fires: dict[tuple[int, int], int] = {}
    for cmd, d, before, _now in run:
        after = d.schedule or before
        if d.emits:
            # fires only for the current token, never before its due time, once per arming
            assert isinstance(cmd, Due) and before is not None and before.status is Status.SCHEDULED
            assert cmd.token == before.token and before.due_at is not None
            assert cmd.due >= due_ms(before.due_at) >= due_ms(before.run_at) - 0
            assert d.schedule is not None and d.schedule.fired_at is not None
            assert (
                d.schedule.fired_at >= before.run_at
                and d.emits[0].data["fired_at"] >= before.run_at.isoformat()
            )
            fires[(before.version, cmd.due)] = fires.get((before.version, cmd.due), 0) + 1
        if after is not None:
            # a pending firing exactly when scheduled; attempts never exceed max_attempts
            assert (after.due_at is not None) == (after.status is Status.SCHEDULED)
            assert after.attempts <= after.max_attempts
        if before is not None and before.status is Status.CANCELLED and isinstance(cmd, Due):
            assert not d.emits  # a cancelled schedule never fires
        if d.status == 409:
            assert d.schedule is None and not d.actions
    assert all(n == 1 for n in fires.values())


def test_planner_applies_in_order_and_answers_each_command() -> None:
    t = T0
    put = SchedulePut(
        event_id="sched:1", key=KEY, run_at=t + timedelta(seconds=1), event_type="x", issued_at=t
    )
    cancel = ScheduleCommand(kind="schedule.cancel", event_id="sched:2", key=KEY, issued_at=t)
    actions: list[object] = []
    p = SchedulesPlanner({}, actions)  # type: ignore[arg-type]
    p.add(put)
    s = p.current[KEY]
    firing = schedule_firing(f"schedule:{KEY}", s.token, due_ms(t + timedelta(seconds=1)), t, "timer")
    assert firing.event_id == schedule_event_id(KEY, s.token, due_ms(t + timedelta(seconds=1)))
    assert firing.fired_at == t + timedelta(seconds=1)  # never stamped before it is due
    p.add(cancel)
    p.add(firing)
    plan = p.finish()
    assert [r[:2] for r in plan.results] == [("sched:1", 201), ("sched:2", 200)]
    assert [s.status for s in plan.inserts] == [Status.CANCELLED] and plan.updates == []
    assert plan.outbox == [] and [h[2] for h in plan.history] == ["created", "cancelled"]
    assert isinstance(actions[-1], Disarm)


def test_planner_fires_into_the_outbox_with_ids_from_the_firing() -> None:
    s = created()
    p = SchedulesPlanner({KEY: s}, [])
    assert s.due_at is not None
    firing = schedule_firing(f"schedule:{KEY}", s.token, due_ms(s.due_at), s.run_at, "sweep")
    assert isinstance(firing, ScheduleDue)
    p.add(firing)
    plan = p.finish()
    assert [(o[0], o[1]) for o in plan.outbox] == [
        (f"{firing.event_id}:fired", FIRED_TYPE),
        (f"{firing.event_id}:event", "reservation.pin.generate"),
    ]
    assert plan.results == []  # nobody waits for a firing
    assert [(u.status, read) for u, read in plan.updates] == [(Status.FIRED, 0)]
    assert plan.updates[0][0].revision == 1


def test_notify_chunks_stay_under_the_limit() -> None:
    ids = [f"sched:{i:036d}" for i in range(1000)]
    chunks = list(notify_chunks(ids))
    assert all(len(c.encode()) < 8000 for c in chunks) and len(chunks) > 1
    assert ",".join(chunks).split(",") == ids
