"""What-if: the conversation log run through the lifecycle under two policies, in memory, no IO.

`Simulation` takes the log's lifecycle events (`LogEvent`: a domain event, the thread it belongs
to and its own time) in log order per thread, and runs `domain.lifecycle.transition` over them
twice: with the current policy and with a changed one. Deadlines are simulated from each run's
own policy: before a thread's next event at `now`, a run whose open conversation's deadline is
<= now gets a TimerFired at exactly that deadline (production fires at due + latency). The
log's recorded firings are never used by these two runs; with `check=True` a third run applies
them as the worker did (and nothing else), so the shell can tell why the current-policy run and
Postgres disagree, when they do.

Rules where the issue left room:
- A command or recorded firing aimed at a conversation that is not the run's current one of the
  thread is ignored, as the projection does (streams/plan.py).
- A conversation's outcome is final when a newer conversation of the thread opens in the same
  run, or at `finish(horizon)`, which first fires every simulated deadline <= horizon. Still
  open then: counted as open at the end (no duration).
- Conversations of the two runs are paired by id (ids are uuid5 of the opening event, so the
  same opening event gives the same id in both runs); one opened in one run only is counted
  as "only in current" / "only in changed".
- "Reopened after close": a user message that opens or reopens a conversation within
  `reopened_within` (default 24 h) of an automatic close (a deadline, not a command) of the
  thread's previous conversation. A sign-off stored on the closed conversation does not count.
- Durations (closed_at - opened_at) and close shifts are kept in log-scale buckets 1% wide, so
  medians and p90s are within 1% and memory does not grow with the log.
- An event id seen before on the thread is skipped, as the projection's ledger does.
- Memory is per thread with an open conversation: `advance(watermark)` fires deadlines up to
  the watermark and forgets threads whose conversations are all closed for longer than
  anything that could still act on them (close grace, reopen window, `reopened_within`).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from domain.closure_intent import ClosureDetector
from domain.lifecycle import (
    AgentAccepted,
    CloseRequested,
    Conversation,
    Decision,
    Event,
    ProcessingFailed,
    Record,
    State,
    SweepFired,
    TimerFired,
    UserMessage,
    transition,
)
from domain.policy import LifecyclePolicy

CURRENT, CHANGED, RECORDED = 0, 1, 2
RUN_NAMES = ("current", "changed", "recorded")
_TARGETED = (CloseRequested, AgentAccepted, TimerFired, SweepFired)
_FIRINGS = (TimerFired, SweepFired)
_ROWS_PER_THREAD = 200
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class LogEvent:
    """One lifecycle event of the log: what happened, on which thread, at what time."""

    channel_id: str
    contact_id: str
    at: datetime
    event: Event
    target: str | None = None  # the conversation a command or a recorded firing names


@dataclass(frozen=True, slots=True)
class Outcome:
    """Where one conversation ended up in one run."""

    id: str
    channel_id: str
    contact_id: str
    opened_by: str  # the event that opened it
    opened_at: datetime
    state: State
    close_reason: str | None
    closed_at: datetime | None
    automatic: bool  # closed by a deadline (simulated, or recorded in the recorded run)

    def differs(self, other: Outcome) -> bool:
        """Whether the outcome is not the same: state, reason or close time."""
        return (self.state, self.close_reason, self.closed_at) != (
            other.state,
            other.close_reason,
            other.closed_at,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {
            "state": str(self.state),
            "close_reason": self.close_reason,
            "opened_at": self.opened_at.isoformat(),
            "closed_at": self.closed_at.isoformat() if self.closed_at else None,
            "automatic": self.automatic,
        }

    def describe(self) -> str:
        """`closed expired at ...` or `open (idle)`."""
        if self.state is State.CLOSED and self.closed_at is not None:
            return f"closed {self.close_reason} at {self.closed_at.isoformat()}"
        return f"open ({self.state})"


@dataclass(frozen=True, slots=True)
class CheckItem:
    """A conversation of the current-policy run, with the recorded run's outcome of the same id
    (None: the recorded run never opened it), for the shell to compare with Postgres."""

    current: Outcome
    recorded: Outcome | None


class Quantiles:
    """Approximate quantiles of non-negative seconds: log buckets 1% wide, bounded memory."""

    __slots__ = ("_buckets", "count", "zero")
    _STEP = math.log(1.01)

    def __init__(self) -> None:
        self._buckets: Counter[int] = Counter()
        self.count = 0
        self.zero = 0  # values under a millisecond

    def add(self, seconds: float) -> None:
        """Count one value."""
        self.count += 1
        if seconds < 0.001:
            self.zero += 1
        else:
            self._buckets[math.floor(math.log(seconds) / self._STEP)] += 1

    def quantile(self, q: float) -> float | None:
        """The q-quantile (0..1) within 1%, or None when empty."""
        if not self.count:
            return None
        rank = max(1, math.ceil(q * self.count))
        if rank <= self.zero:
            return 0.0
        seen = self.zero
        for bucket in sorted(self._buckets):
            seen += self._buckets[bucket]
            if seen >= rank:
                return math.exp((bucket + 0.5) * self._STEP)
        return None  # unreachable: the counts add up to count

    def summary(self) -> dict[str, float | int | None]:
        """count, median and p90 in seconds."""
        return {"count": self.count, "median_s": self.quantile(0.5), "p90_s": self.quantile(0.9)}


@dataclass
class RunStats:
    """One run's figures."""

    opened: int = 0
    reopened: int = 0  # a closed conversation reopened within PARLEY_REOPEN_WINDOW
    closed: int = 0
    by_reason: Counter[str] = field(default_factory=Counter)
    open_at_end: int = 0
    durations: Quantiles = field(default_factory=Quantiles)
    reopened_after_close: int = 0
    firings_by_hour: Counter[int] = field(default_factory=Counter)  # hour since epoch -> firings
    firings: int = 0

    def peak_hour(self) -> tuple[datetime | None, int]:
        """(start of the hour with the most timer firings, how many), or (None, 0)."""
        if not self.firings_by_hour:
            return None, 0
        hour, count = max(self.firings_by_hour.items(), key=lambda item: (item[1], -item[0]))
        return _EPOCH + timedelta(hours=hour), count

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready figures."""
        peak, count = self.peak_hour()
        return {
            "opened": self.opened,
            "reopened": self.reopened,
            "closed": self.closed,
            "closed_by_reason": dict(sorted(self.by_reason.items())),
            "open_at_end": self.open_at_end,
            "duration": self.durations.summary(),
            "reopened_after_close": self.reopened_after_close,
            "timer_firings": self.firings,
            "peak_firings_per_hour": count,
            "peak_hour": peak.isoformat() if peak else None,
        }


@dataclass
class Comparison:
    """How the changed run's conversations differ from the current run's, paired by id."""

    paired: int = 0
    same: int = 0
    differ: int = 0
    earlier: int = 0  # both closed, the changed run earlier
    earlier_by: Quantiles = field(default_factory=Quantiles)
    later: int = 0  # both closed, the changed run later
    later_by: Quantiles = field(default_factory=Quantiles)
    closed_only_in_current: int = 0  # the changed run keeps it open to the end
    closed_only_in_changed: int = 0  # the changed run closes one the current keeps open
    reason_changed: int = 0  # both closed, with a different reason
    only_current: int = 0  # opened in the current run only
    only_changed: int = 0  # opened in the changed run only

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready figures."""
        return {
            "paired": self.paired,
            "same_outcome": self.same,
            "different_outcome": self.differ,
            "closed_earlier": {"count": self.earlier, **_by(self.earlier_by)},
            "closed_later": {"count": self.later, **_by(self.later_by)},
            "closed_only_in_current": self.closed_only_in_current,
            "closed_only_in_changed": self.closed_only_in_changed,
            "close_reason_changed": self.reason_changed,
            "only_in_current": self.only_current,
            "only_in_changed": self.only_changed,
        }


def _by(q: Quantiles) -> dict[str, float | None]:
    return {"median_by_s": q.quantile(0.5), "p90_by_s": q.quantile(0.9)}


@dataclass(frozen=True, slots=True)
class Example:
    """A conversation whose outcome differs, with the thread's timeline in both runs."""

    conversation_id: str
    channel_id: str
    contact_id: str
    current: Outcome | None
    changed: Outcome | None
    rows: tuple[tuple[datetime, str, str, str], ...]  # (time, what happened, current, changed)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {
            "conversation_id": self.conversation_id,
            "channel_id": self.channel_id,
            "contact_id": self.contact_id,
            "current": self.current.to_dict() if self.current else None,
            "changed": self.changed.to_dict() if self.changed else None,
            "timeline": [
                {"at": at.isoformat(), "event": what, "current": cur, "changed": chg}
                for at, what, cur, chg in self.rows
            ],
        }


@dataclass
class Report:
    """Everything a what-if run found."""

    current: RunStats
    changed: RunStats
    comparison: Comparison
    events: int  # lifecycle events simulated
    duplicates: int  # events seen twice on the log, applied once
    recorded_firings: int  # timer/sweep firings in the log (not used by the two runs)
    threads: int  # threads seen (one forgotten while quiet and seen again counts again)
    horizon: datetime | None
    examples: list[Example] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {
            "events": self.events,
            "duplicates": self.duplicates,
            "recorded_firings": self.recorded_firings,
            "threads": self.threads,
            "horizon": self.horizon.isoformat() if self.horizon else None,
            "current": self.current.to_dict(),
            "changed": self.changed.to_dict(),
            "comparison": self.comparison.to_dict(),
            "examples": [e.to_dict() for e in self.examples],
        }


class _MemoDetector:
    """The policy's detector, remembering its answers: both runs score every message, and short
    replies ("ok", "sim", "obrigado") come back again and again. Bounded: cleared when full."""

    __slots__ = ("_inner", "_scores")
    LIMIT = 8192

    def __init__(self, inner: ClosureDetector) -> None:
        self._inner = inner
        self._scores: dict[str, float] = {}

    def confidence(self, text: str) -> float:
        score = self._scores.get(text)
        if score is None:
            if len(self._scores) >= self.LIMIT:
                self._scores.clear()
            score = self._scores[text] = self._inner.confidence(text)
        return score


def extend_deadline(
    conv: Conversation | None, event: Event, now: datetime, policy: LifecyclePolicy
) -> Conversation | None:
    """The lifecycle's most common step, without building its effects: a user message on an idle
    or processing conversation that does not reach the closure threshold only pushes the deadline
    (`transition` -> `_user_message` -> `_detect` -> `_move(kind="deadline_extended")` ->
    `_commit`). Returns the conversation `transition` would persist, or None when the step is
    anything else (then `transition` decides). tests/unit/test_whatif.py checks the two agree."""
    if conv is None or type(event) is not UserMessage:
        return None
    state = conv.state
    if state is not State.IDLE and state is not State.PROCESSING:
        return None
    text = event.text
    if text and policy.detector.confidence(text) >= policy.closure_threshold:
        return None
    if now < conv.updated_at:
        now = conv.updated_at
    timeout = policy.idle_timeout if state is State.IDLE else policy.processing_timeout
    # the constructor with every field: a third of dataclasses.replace's cost
    return Conversation(
        conv.id,
        conv.channel_id,
        conv.contact_id,
        state,
        conv.version + 1,
        conv.opened_at,
        now,
        now + timeout,
        conv.close_reason,
        conv.closed_at,
        conv.previous_conversation_id,
        conv.assigned_agent,
        conv.pending_close_reason,
        conv.state_before_close,
    )


class _Pair:
    """One conversation id across the runs: its outcome in each (None: not final yet)."""

    __slots__ = ("opened_at", "opened_by", "opened_in", "outcomes")

    def __init__(self, opened_by: str, opened_at: datetime, opened_in: tuple[bool, ...]) -> None:
        self.opened_by = opened_by
        self.opened_at = opened_at
        self.opened_in = opened_in
        self.outcomes: list[Outcome | None] = [None] * len(opened_in)

    def resolved(self) -> bool:
        return all(
            o is not None or not opened for o, opened in zip(self.outcomes, self.opened_in, strict=True)
        )


class _Thread:
    """One (channel, contact): each run's current conversation and what is pending about it."""

    __slots__ = ("automatic", "channel_id", "contact_id", "convs", "pairs", "rows", "seen")

    def __init__(self, channel_id: str, contact_id: str, runs: int, rows: bool) -> None:
        self.channel_id = channel_id
        self.contact_id = contact_id
        self.convs: list[Conversation | None] = [None] * runs
        self.automatic = [False] * runs  # the current conversation was closed by a deadline
        self.pairs: dict[str, _Pair] = {}
        self.rows: list[tuple[datetime, str, str, str]] | None = [] if rows else None
        self.seen: set[str] = set()  # event ids applied: a redelivered event applies once


class Simulation:
    """Feed `add` the log's lifecycle events in log order per thread, call `advance` now and
    then with a time no later event can precede, and `finish` at the end of the range."""

    def __init__(
        self,
        current: LifecyclePolicy,
        changed: LifecyclePolicy,
        *,
        check: bool = False,
        examples: int = 0,
        reopened_within: timedelta = timedelta(hours=24),
        fast: bool = True,
    ) -> None:
        self.fast = fast  # extend_deadline for the common step (False: `transition` for every step)
        if current.detector == changed.detector:
            memo = _MemoDetector(current.detector)
            current, changed = replace(current, detector=memo), replace(changed, detector=memo)
        self.policies = [current, changed] + ([current] if check else [])
        self.simulated = (True, True, False)[: len(self.policies)]
        self.stats = [RunStats() for _ in self.policies]
        self.comparison = Comparison()
        self.check = check
        self.checks: list[CheckItem] = []
        self.examples_wanted = examples
        self.examples: list[Example] = []
        self.reopened_within = reopened_within
        self.keep = max(
            reopened_within,
            *(p.close_grace for p in self.policies),
            *(p.reopen_window for p in self.policies),
        )
        self.threads: dict[tuple[str, str], _Thread] = {}
        self.events = 0
        self.recorded_firings = 0
        self.duplicates = 0
        self.threads_seen = 0

    # -- feeding ------------------------------------------------------------------------------

    def add(self, item: LogEvent) -> None:
        """Apply one log event to every run."""
        key = (item.channel_id, item.contact_id)
        thread = self.threads.get(key)
        if thread is None:
            thread = self.threads[key] = _Thread(
                item.channel_id, item.contact_id, len(self.policies), self.examples_wanted > 0
            )
            self.threads_seen += 1
        event, now = item.event, item.at
        seen = thread.seen
        if event.event_id in seen:
            self.duplicates += 1  # the projection's ledger skips it too
            return
        seen.add(event.event_id)
        recorded_firing = isinstance(event, _FIRINGS)
        if recorded_firing:
            self.recorded_firings += 1
        else:
            self.events += 1
        if thread.rows is not None:
            self._add_with_rows(thread, item, recorded_firing)
            return
        # Each run on its own: its deadline due by now fires first, then the event applies.
        convs, policies, fast = thread.convs, self.policies, self.fast
        targeted = isinstance(event, _TARGETED)
        opened: list[str | None] | None = None
        for run, simulated in enumerate(self.simulated):
            conv = convs[run]
            if simulated:
                if conv is not None and conv.deadline_at is not None and conv.deadline_at <= now:
                    self._fire(thread, run, conv, conv.deadline_at)
                    conv = convs[run]
                if recorded_firing:
                    continue
            policy = policies[run]
            if fast:
                extended = extend_deadline(conv, event, now, policy)
                if extended is not None:
                    convs[run] = extended
                    continue
            if targeted and (conv is None or conv.id != item.target):
                continue  # aimed at a conversation that is not the thread's current one
            decision = transition(
                conv, event, now, policy, channel_id=item.channel_id, contact_id=item.contact_id
            )
            new_id = self._apply(thread, run, conv, decision, now, event, recorded_firing)
            if new_id is not None:
                if opened is None:
                    opened = [None] * len(policies)
                opened[run] = new_id
        if opened is not None:
            self._pair(thread, opened, event.event_id, now)

    def _add_with_rows(self, thread: _Thread, item: LogEvent, recorded_firing: bool) -> None:
        """`add` keeping the thread's timeline (for examples): every step through `transition`."""
        event, now = item.event, item.at
        self._fire_due_with_rows(thread, now)
        opened: list[str | None] = []
        cells: list[str] = []
        for run, simulated in enumerate(self.simulated):
            if recorded_firing and simulated:
                opened.append(None)
                cells.append("")
                continue
            before = thread.convs[run]
            if isinstance(event, _TARGETED) and (before is None or before.id != item.target):
                opened.append(None)  # aimed at a conversation that is not the thread's current one
                cells.append("ignored (not the current conversation)")
                continue
            decision = transition(
                before, event, now, self.policies[run], channel_id=item.channel_id, contact_id=item.contact_id
            )
            opened.append(self._apply(thread, run, before, decision, now, event, recorded_firing))
            cells.append(_cell(decision))
        self._row(thread, now, _what(event), cells)
        if any(opened):
            self._pair(thread, opened, event.event_id, now)

    def advance(self, watermark: datetime) -> None:
        """Fire the simulated deadlines due by `watermark` and forget the threads that nothing
        can change any more: all their conversations closed longer than the keep time ago."""
        forget = watermark - self.keep
        for key, thread in list(self.threads.items()):
            quiet = True
            for run, conv in enumerate(thread.convs):
                if conv is None:
                    continue
                if self.simulated[run] and conv.deadline_at is not None and conv.deadline_at <= watermark:
                    self._fire_logged(thread, run, conv)
                    conv = thread.convs[run]
                    assert conv is not None
                if conv.state is not State.CLOSED or conv.closed_at is None or conv.closed_at > forget:
                    quiet = False
            if quiet:
                self._final_all(thread)
                del self.threads[key]

    def drain_checks(self) -> list[CheckItem]:
        """The check items resolved so far (the shell compares them with Postgres)."""
        items, self.checks = self.checks, []
        return items

    def finish(self, horizon: datetime | None) -> Report:
        """Fire every simulated deadline due by `horizon` (None: the latest seen), finalize all."""
        for thread in self.threads.values():
            for run, conv in enumerate(thread.convs):
                if (
                    self.simulated[run]
                    and conv is not None
                    and conv.deadline_at is not None
                    and (horizon is None or conv.deadline_at <= horizon)
                ):
                    self._fire_logged(thread, run, conv)
            self._final_all(thread, at_end=True)
        self.threads.clear()
        return Report(
            current=self.stats[CURRENT],
            changed=self.stats[CHANGED],
            comparison=self.comparison,
            events=self.events,
            duplicates=self.duplicates,
            recorded_firings=self.recorded_firings,
            threads=self.threads_seen,
            horizon=horizon,
            examples=self.examples,
        )

    # -- internals ----------------------------------------------------------------------------

    def _fire_due_with_rows(self, thread: _Thread, now: datetime) -> None:
        due = sorted(
            (conv.deadline_at, run)
            for run, conv in enumerate(thread.convs)
            if self.simulated[run] and conv is not None and conv.deadline_at is not None
            if conv.deadline_at <= now
        )
        for _, run in due:
            conv = thread.convs[run]
            assert conv is not None
            self._fire_logged(thread, run, conv)

    def _fire_logged(self, thread: _Thread, run: int, conv: Conversation) -> None:
        assert conv.deadline_at is not None
        decision = self._fire(thread, run, conv, conv.deadline_at)
        if thread.rows is not None:
            cells = ["", ""]
            cells[run] = _cell(decision)
            self._row(thread, conv.deadline_at, "deadline (simulated)", cells)

    def _fire(self, thread: _Thread, run: int, conv: Conversation, due: datetime) -> Decision:
        """A simulated TimerFired at exactly the deadline."""
        timer = TimerFired(f"whatif:{conv.id}:{conv.version}", conv.id, conv.version, due)
        decision = transition(
            conv, timer, due, self.policies[run], channel_id=thread.channel_id, contact_id=thread.contact_id
        )
        stats = self.stats[run]
        stats.firings += 1
        stats.firings_by_hour[int((due - _EPOCH).total_seconds() // 3600)] += 1
        self._apply(thread, run, conv, decision, due, timer, True)
        return decision

    def _apply(
        self,
        thread: _Thread,
        run: int,
        before: Conversation | None,
        decision: Decision,
        now: datetime,
        event: Event,
        firing: bool,
    ) -> str | None:
        """Keep the run's new conversation; returns the id of a conversation it opened."""
        conv = decision.conversation
        if not decision.changed or conv is None:
            return None
        thread.convs[run] = conv
        stats = self.stats[run]
        if before is None or before.id != conv.id:
            if before is not None:
                self._final(thread, run, before, thread.automatic[run])
            if (
                isinstance(event, UserMessage)
                and before is not None
                and thread.automatic[run]
                and before.closed_at is not None
                and now - before.closed_at <= self.reopened_within
            ):
                stats.reopened_after_close += 1
            thread.automatic[run] = False
            stats.opened += 1
            return conv.id
        if before.state is State.CLOSED:
            if conv.state is not State.CLOSED:  # reopened within the reopen window
                stats.reopened += 1
                if (
                    isinstance(event, UserMessage)
                    and thread.automatic[run]
                    and before.closed_at is not None
                    and now - before.closed_at <= self.reopened_within
                ):
                    stats.reopened_after_close += 1
                thread.automatic[run] = False
            elif isinstance(event, CloseRequested | ProcessingFailed):
                thread.automatic[run] = False  # an explicit close upgraded the reason
        elif conv.state is State.CLOSED:
            thread.automatic[run] = firing
        return None

    def _pair(self, thread: _Thread, opened: list[str | None], event_id: str, now: datetime) -> None:
        for cid in {c for c in opened if c is not None}:
            thread.pairs[cid] = _Pair(event_id, now, tuple(c == cid for c in opened))

    def _final_all(self, thread: _Thread, at_end: bool = False) -> None:
        for run, conv in enumerate(thread.convs):
            if conv is not None:
                self._final(thread, run, conv, thread.automatic[run], at_end)
                thread.convs[run] = None

    def _final(
        self, thread: _Thread, run: int, conv: Conversation, automatic: bool, at_end: bool = False
    ) -> None:
        stats = self.stats[run]
        closed = conv.state is State.CLOSED
        if closed and conv.closed_at is not None:
            stats.closed += 1
            stats.by_reason[str(conv.close_reason)] += 1
            stats.durations.add((conv.closed_at - conv.opened_at).total_seconds())
        elif at_end:
            stats.open_at_end += 1
        pair = thread.pairs.get(conv.id)
        if pair is None:  # every conversation of a run is opened in it: cannot happen
            return
        outcome = Outcome(
            id=conv.id,
            channel_id=thread.channel_id,
            contact_id=thread.contact_id,
            opened_by=pair.opened_by,
            opened_at=conv.opened_at,
            state=conv.state,
            close_reason=str(conv.close_reason) if closed else None,
            closed_at=conv.closed_at if closed else None,
            automatic=automatic and closed,
        )
        pair.outcomes[run] = outcome
        if pair.resolved():
            del thread.pairs[conv.id]
            self._compare(thread, pair)
            if not thread.pairs and thread.rows is not None:
                thread.rows.clear()

    def _compare(self, thread: _Thread, pair: _Pair) -> None:
        cur, chg = pair.outcomes[CURRENT], pair.outcomes[CHANGED]
        if self.check and cur is not None:
            self.checks.append(CheckItem(cur, pair.outcomes[RECORDED]))
        c = self.comparison
        if cur is None or chg is None:
            if cur is not None:
                c.only_current += 1
            elif chg is not None:
                c.only_changed += 1
            self._example(thread, pair, cur, chg)
            return
        c.paired += 1
        if not cur.differs(chg):
            c.same += 1
            return
        c.differ += 1
        if cur.closed_at is not None and chg.closed_at is not None:
            shift = (chg.closed_at - cur.closed_at).total_seconds()
            if shift < 0:
                c.earlier += 1
                c.earlier_by.add(-shift)
            elif shift > 0:
                c.later += 1
                c.later_by.add(shift)
            if cur.close_reason != chg.close_reason:
                c.reason_changed += 1
        elif cur.closed_at is not None:
            c.closed_only_in_current += 1
        elif chg.closed_at is not None:
            c.closed_only_in_changed += 1
        self._example(thread, pair, cur, chg)

    def _example(self, thread: _Thread, pair: _Pair, cur: Outcome | None, chg: Outcome | None) -> None:
        if len(self.examples) >= self.examples_wanted or thread.rows is None:
            return
        some = cur or chg
        assert some is not None
        rows = tuple(sorted((r for r in thread.rows if r[0] >= pair.opened_at), key=lambda r: r[0]))
        self.examples.append(Example(some.id, thread.channel_id, thread.contact_id, cur, chg, rows))

    def _row(self, thread: _Thread, at: datetime, what: str, cells: list[str]) -> None:
        rows = thread.rows
        assert rows is not None
        rows.append((at, what, cells[CURRENT] if cells else "", cells[CHANGED] if len(cells) > 1 else ""))
        if len(rows) > _ROWS_PER_THREAD:
            del rows[0]


def _what(event: Event) -> str:
    if isinstance(event, UserMessage):
        text = (event.text or "").replace("\n", " ")
        return f"user: {text[:40]}{'...' if len(text) > 40 else ''}"
    if isinstance(event, CloseRequested):
        return f"close requested ({event.reason}, by {event.by or 'unknown'})"
    if isinstance(event, AgentAccepted):
        return f"agent {event.agent_id} accepted"
    if isinstance(event, _FIRINGS):
        return "deadline (recorded firing)"
    return type(event).__name__


def _cell(decision: Decision) -> str:
    """What one decision did, in a few words."""
    parts: list[str] = []
    for fx in decision.effects:
        if not isinstance(fx, Record):
            continue
        if fx.kind == "closed":
            parts.append(f"closed: {fx.detail.split(':', 1)[0]}")
        elif fx.kind == "transition":
            parts.append(f"{fx.from_state} -> {fx.to_state}")
        elif fx.kind in ("opened", "reopened"):
            parts.append(f"{fx.kind} ({fx.to_state})")
        elif fx.kind == "close_upgraded":
            parts.append(f"reason {fx.detail}")
        elif fx.kind == "deadline_extended":
            parts.append("deadline extended")
        else:
            parts.append(fx.kind)
    if decision.changed and decision.conversation is not None and decision.conversation.deadline_at:
        parts.append(f"due {decision.conversation.deadline_at.strftime('%m-%d %H:%M:%S')}")
    return "; ".join(parts) or "no change"
