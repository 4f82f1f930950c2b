"""The pure what-if simulation: two policies over one log, deadlines simulated, no IO."""

from __future__ import annotations

import itertools
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from domain.lifecycle import (
    AgentAccepted,
    CloseReason,
    CloseRequested,
    State,
    TimerFired,
    UserMessage,
)
from domain.policy import LifecyclePolicy
from domain.whatif import LogEvent, Quantiles, Simulation

T0 = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
H = timedelta(hours=1)
CURRENT = LifecyclePolicy()  # idle 48 h
SHORT = replace(CURRENT, idle_timeout=24 * H)
LONG = replace(CURRENT, idle_timeout=72 * H)
_ids = itertools.count()


def user(text: str, at: datetime, contact: str = "k", event_id: str | None = None) -> LogEvent:
    eid = event_id or f"e{next(_ids)}"
    return LogEvent("ch", contact, at, UserMessage(eid, f"m-{eid}", text, f"conv-{eid}"))


def close(conv: str, at: datetime, contact: str = "k") -> LogEvent:
    eid = f"e{next(_ids)}"
    return LogEvent("ch", contact, at, CloseRequested(eid, CloseReason.AGENT_CLOSED, "agent"), conv)


def accept(conv: str, at: datetime, contact: str = "k") -> LogEvent:
    eid = f"e{next(_ids)}"
    return LogEvent("ch", contact, at, AgentAccepted(eid, "agent-1"), conv)


def run(changed: LifecyclePolicy, events: list[LogEvent], horizon: datetime, **kw: object) -> Simulation:
    sim = Simulation(CURRENT, changed, **kw)  # type: ignore[arg-type]
    for e in events:
        sim.add(e)
    return sim


def test_shorter_idle_timeout_closes_earlier_as_expired() -> None:
    sim = run(SHORT, [user("oi", T0, event_id="a")], T0 + 100 * H)
    report = sim.finish(T0 + 100 * H)
    assert report.current.by_reason == {"expired": 1}
    assert report.changed.by_reason == {"expired": 1}
    c = report.comparison
    assert (c.paired, c.differ, c.earlier, c.later) == (1, 1, 1, 0)
    assert c.earlier_by.quantile(0.5) == pytest.approx(24 * 3600, rel=0.01)
    assert report.current.durations.quantile(0.5) == pytest.approx(48 * 3600, rel=0.01)
    assert report.changed.durations.quantile(0.5) == pytest.approx(24 * 3600, rel=0.01)
    assert report.current.firings == report.changed.firings == 1


def test_longer_idle_timeout_keeps_it_open_to_the_horizon() -> None:
    sim = run(LONG, [user("oi", T0)], T0 + 50 * H)
    report = sim.finish(T0 + 50 * H)
    assert report.current.by_reason == {"expired": 1} and report.current.open_at_end == 0
    assert report.changed.closed == 0 and report.changed.open_at_end == 1
    assert report.comparison.closed_only_in_current == 1
    assert report.changed.firings == 0


def test_user_writing_after_a_simulated_close_counts_as_reopened_after_close() -> None:
    events = [user("oi", T0, event_id="first"), user("ainda preciso de ajuda", T0 + 30 * H, event_id="again")]
    report = run(SHORT, events, T0 + 200 * H).finish(T0 + 200 * H)
    # current (48 h): the second message extends the one conversation; changed (24 h): it had
    # expired at 24 h, so the user came back to a closed conversation
    assert report.current.opened == 1 and report.current.reopened_after_close == 0
    assert report.changed.opened == 2 and report.changed.reopened_after_close == 1
    assert report.comparison.only_changed == 1
    assert report.comparison.earlier == 1  # the first conversation: 24 h after T0 vs 48 h after T0+30h


def test_a_sign_off_after_close_or_a_return_past_the_window_is_not_a_reopen() -> None:
    policy = replace(CURRENT, idle_timeout=H)
    late = [user("oi", T0), user("oi de novo", T0 + 40 * H)]  # 39 h after the 1 h close
    sim = Simulation(CURRENT, policy, reopened_within=24 * H)
    for e in late:
        sim.add(e)
    assert sim.finish(T0 + 100 * H).changed.reopened_after_close == 0


def test_an_agent_close_is_not_automatic() -> None:
    events = [user("oi", T0, event_id="x"), close("conv-x", T0 + H), user("voltei", T0 + 2 * H)]
    report = run(SHORT, events, T0 + 100 * H).finish(T0 + 100 * H)
    assert report.current.reopened_after_close == report.changed.reopened_after_close == 0
    assert report.current.by_reason["agent_closed"] == 1


def test_same_policy_gives_the_same_outcomes() -> None:
    events = [
        user("oi", T0, event_id="s"),
        accept("conv-s", T0 + H),
        user("obrigado, pode fechar", T0 + 2 * H),
    ]
    report = run(CURRENT, events, T0 + 10 * H).finish(T0 + 10 * H)
    assert report.comparison.differ == 0 and report.comparison.same == 1
    assert report.current.to_dict() == report.changed.to_dict()
    assert report.current.by_reason == {"user_closed": 1}


def test_recorded_firings_are_not_used_by_the_simulated_runs() -> None:
    # production recorded a firing of the 48 h deadline; a 72 h policy must not close at it
    fired = LogEvent("ch", "k", T0 + 48 * H, TimerFired("t1", "conv-r", 1, T0 + 48 * H), "conv-r")
    sim = run(LONG, [user("oi", T0, event_id="r"), fired], T0 + 60 * H, check=True)
    report = sim.finish(T0 + 60 * H)
    assert report.recorded_firings == 1 and report.events == 1
    assert report.changed.open_at_end == 1
    [item] = sim.drain_checks()
    assert item.current.state is State.CLOSED and item.current.close_reason == "expired"
    assert item.recorded is not None and item.recorded.close_reason == "expired"
    assert item.recorded.closed_at == T0 + 48 * H


def test_recorded_run_follows_a_late_production_firing() -> None:
    # production's timer fired 10 s late and a message came in between: in production the
    # message extended the conversation; the simulated run closed at the deadline first
    due = T0 + 48 * H
    events = [
        user("oi", T0, event_id="late"),
        user("ainda aí?", due + timedelta(seconds=5)),
        LogEvent("ch", "k", due + timedelta(seconds=10), TimerFired("t", "conv-late", 1, due), "conv-late"),
    ]
    sim = run(SHORT, events, due + H, check=True)
    sim.finish(due + H)
    by_id = {i.current.id: i for i in sim.drain_checks()}
    item = by_id["conv-late"]
    assert item.current.state is State.CLOSED
    assert item.recorded is not None and item.recorded.state is not State.CLOSED  # the stale firing


def test_a_duplicated_event_applies_once() -> None:
    events = [user("oi", T0, event_id="d"), user("oi", T0, event_id="d")]
    sim = run(CURRENT, events, T0)
    report = sim.finish(T0 + H)
    assert report.duplicates == 1 and report.events == 1 and report.current.opened == 1


def test_commands_for_another_conversation_are_ignored() -> None:
    events = [user("oi", T0, event_id="one"), close("conv-nope", T0 + H)]
    report = run(CURRENT, events, T0 + 2 * H).finish(T0 + 2 * H)
    assert report.current.closed == 0 and report.current.open_at_end == 1


def test_peak_firings_per_hour() -> None:
    events = [user("oi", T0 + timedelta(minutes=i), contact=f"c{i}") for i in range(5)]
    events += [user("oi", T0 + 5 * H, contact="late")]
    report = run(SHORT, events, T0 + 100 * H).finish(T0 + 100 * H)
    peak, count = report.changed.peak_hour()
    assert count == 5 and peak == T0 + 24 * H
    assert report.current.peak_hour() == (T0 + 48 * H, 5)


def test_advance_fires_and_forgets_quiet_threads() -> None:
    sim = Simulation(CURRENT, SHORT)
    sim.add(user("oi", T0, contact="a"))
    sim.add(user("oi", T0 + 100 * H, contact="b"))
    sim.advance(T0 + 49 * H)
    assert ("ch", "a") in sim.threads  # closed at 48 h: within the 24 h keep time
    sim.advance(T0 + 80 * H)
    assert ("ch", "a") not in sim.threads and ("ch", "b") in sim.threads
    report = sim.finish(T0 + 200 * H)
    assert report.current.closed == 2 and report.comparison.earlier == 2


def test_examples_show_both_timelines() -> None:
    events = [user("oi", T0, event_id="ex"), user("alô", T0 + 30 * H)]
    sim = run(SHORT, events, T0 + 200 * H, examples=3)
    report = sim.finish(T0 + 200 * H)
    assert report.examples
    example = report.examples[0]
    assert example.conversation_id == "conv-ex"
    cells = [(what, cur, chg) for _, what, cur, chg in example.rows]
    assert any(what == "deadline (simulated)" and "closed: expired" in chg for what, _, chg in cells)
    assert any("deadline extended" in cur for _, cur, _ in cells)
    assert example.to_dict()["timeline"]


def test_pending_close_timeout_is_simulated_too() -> None:
    quick = replace(CURRENT, awaiting_confirmation_timeout=timedelta(minutes=1))
    events = [user("oi", T0, event_id="p"), user("obrigado, tchau", T0 + H)]
    report = run(quick, events, T0 + 10 * H).finish(T0 + 10 * H)
    assert report.current.by_reason == report.changed.by_reason == {"user_closed": 1}
    assert report.comparison.earlier == 1
    assert report.comparison.earlier_by.quantile(0.5) == pytest.approx(9 * 60, rel=0.01)


def test_quantiles_are_within_one_percent() -> None:
    q = Quantiles()
    for v in range(1, 1001):
        q.add(float(v))
    assert q.quantile(0.5) == pytest.approx(500, rel=0.01)
    assert q.quantile(0.9) == pytest.approx(900, rel=0.01)
    assert Quantiles().quantile(0.5) is None
    z = Quantiles()
    z.add(0.0)
    assert z.quantile(0.5) == 0.0


def test_the_fast_step_gives_what_transition_gives() -> None:
    """extend_deadline is only a shortcut: a random log through both paths, identical reports."""
    from bench.whatif import synthetic_log

    log = synthetic_log(20_000, seed=7)
    changed = replace(CURRENT, idle_timeout=24 * H, processing_timeout=6 * H)
    reports = []
    for fast in (True, False):
        sim = Simulation(CURRENT, changed, fast=fast, check=True)
        for i, item in enumerate(log):
            sim.add(item)
            if i % 5_000 == 4_999:
                sim.advance(item.at - timedelta(minutes=5))
        reports.append((sim.finish(log[-1].at).to_dict(), sorted(map(repr, sim.drain_checks()))))
    assert reports[0] == reports[1]
    assert reports[0][0]["comparison"]["different_outcome"] > 100  # the log does exercise a change


def test_extend_deadline_agrees_with_transition_step_by_step() -> None:
    from domain.lifecycle import transition
    from domain.whatif import extend_deadline

    texts = [
        None,
        "",
        "oi",
        "ok",
        "obrigado",
        "tchau",
        "pode fechar",
        "sim",
        "qual o prazo?",
        "obrigado, tchau",
    ]
    hits = 0
    for policy in (CURRENT, replace(CURRENT, idle_timeout=H, closure_threshold=0.5)):
        conv = None
        at = T0
        for i in range(200):
            at += timedelta(minutes=(i * 7) % 50) - timedelta(seconds=30 if i % 9 == 0 else 0)  # skewed now
            event = UserMessage(f"x{i}", f"m{i}", texts[i % len(texts)], f"conv-x{i}")
            if i % 11 == 5 and conv is not None:
                event = AgentAccepted(f"a{i}", f"agent-{i % 2}")  # type: ignore[assignment]
            fast = extend_deadline(conv, event, at, policy)
            decision = transition(conv, event, at, policy, channel_id="ch", contact_id="k")
            if fast is not None:
                hits += 1
                assert fast == decision.conversation and decision.changed
            conv = decision.conversation
            if conv is not None and conv.deadline_at is not None and i % 13 == 0:
                conv = transition(
                    conv,
                    TimerFired("t", conv.id, conv.version, conv.deadline_at),
                    conv.deadline_at,
                    policy,
                    channel_id="ch",
                    contact_id="k",
                ).conversation
    assert hits > 100


def test_the_text_report() -> None:
    from streams.whatif import CheckResult, WhatIfResult, render

    events = [user("oi", T0, event_id="txt"), user("alô", T0 + 30 * H)]
    sim = run(SHORT, events, T0 + 200 * H, examples=1)
    result = WhatIfResult(
        since=T0,
        until=None,
        horizon=T0 + 200 * H,
        overrides={"PARLEY_TIMEOUT_IDLE": "PT24H"},
        current_policy=CURRENT,
        changed_policy=SHORT,
        report=sim.finish(T0 + 200 * H),
        check=CheckResult(checked=1, matched=1),
        read=2,
    )
    text = render(result)
    assert "changed: PARLEY_TIMEOUT_IDLE=PT24H (idle_timeout 2d 0h -> 1d 0h)" in text
    assert "user wrote again after an automatic close" in text
    assert "would close earlier: 1" in text
    assert "1 of 1 conversations match (all match)" in text
    assert "example conv-txt" in text and "deadline (simulated)" in text


class _FakeConn:
    """What PostgresCheck reads: conversations by id, processed_events by id."""

    def __init__(self, rows: list[dict[str, object]], processed: set[str]) -> None:
        self.rows, self.processed = rows, processed

    def transaction(self, readonly: bool = False) -> object:
        assert readonly
        import contextlib

        @contextlib.asynccontextmanager
        async def tx():  # type: ignore[no-untyped-def]
            yield

        return tx()

    async def fetch(self, sql: str, ids: list[str]) -> list[dict[str, object]]:
        if "processed_events" in sql:
            return [{"event_id": i} for i in ids if i in self.processed]
        return [r for r in self.rows if r["id"] in ids]


async def test_the_postgres_check_explains_each_mismatch() -> None:
    from domain.whatif import CheckItem, Outcome
    from streams.whatif import PostgresCheck

    def outcome(cid: str, state: State, reason: str | None = None) -> Outcome:
        closed = T0 + H if state is State.CLOSED else None
        return Outcome(cid, "ch", "k", f"open-{cid}", T0, state, reason, closed, reason == "expired")

    closed, idle = State.CLOSED, State.IDLE
    items = [
        CheckItem(outcome("same", closed, "expired"), outcome("same", closed, "expired")),
        # production's firing came late, after a message: the recorded run agrees with Postgres
        CheckItem(outcome("late", closed, "expired"), outcome("late", idle)),
        # the recorded run never opened it: production's timing avoided this conversation
        CheckItem(outcome("extra", idle), None),
        # not in Postgres, its opening event applied: it joined a conversation older than the range
        CheckItem(outcome("older", idle), outcome("older", idle)),
        # not in Postgres, its opening event not applied yet
        CheckItem(outcome("behind", idle), outcome("behind", idle)),
        # changed in Postgres after --until
        CheckItem(outcome("after", idle), outcome("after", idle)),
        CheckItem(outcome("odd", closed, "expired"), outcome("odd", closed, "expired")),
    ]
    rows = [
        {"id": "same", "state": "closed", "close_reason": "expired", "updated_at": T0 + H},
        {"id": "late", "state": "idle", "close_reason": None, "updated_at": T0 + H},
        {"id": "after", "state": "closed", "close_reason": "agent_closed", "updated_at": T0 + 9 * H},
        {"id": "odd", "state": "closed", "close_reason": "failed", "updated_at": T0 + H},
    ]
    check = PostgresCheck(_FakeConn(rows, {"open-older"}), horizon=T0 + 5 * H)  # type: ignore[arg-type]
    await check.compare(items)
    result = check.result
    assert (result.checked, result.matched, result.all_match) == (7, 1, False)
    assert result.mismatched == {
        "production_timing": 2,
        "before_since": 1,
        "not_projected": 1,
        "after_until": 1,
        "unexplained": 1,
    }
    assert (
        "late" in result.samples["production_timing"][0]
        and "Postgres: idle" in result.samples["production_timing"][0]
    )
    assert set(result.to_dict()["mismatched"]) == set(result.mismatched)
