"""`parley whatif`: the retained conversation log under the current and a changed lifecycle policy.

Reads `<prefix>.conversation-events` with a plain consumer (no group, nothing committed; see
streams/replay.py) over [since, until) by record timestamp, turns each lifecycle record into the
domain event the worker would apply (streams.plan.to_domain) and runs domain.whatif.Simulation
over them. It writes nothing: not to Kafka, not to Postgres. With the check on (the default) it
reads Postgres, in read-only transactions, to count how many conversations of the current-policy
run have the same state and close reason there, and says why the others differ.

The changed policy is the current settings with `--set NAME=VALUE` overrides, each parsed by the
same pydantic field as the environment variable (so `PT24H`, `86400` and `P1D` all work and a bad
value is refused with the setting's own error).
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

import asyncpg
from pydantic import TypeAdapter, ValidationError

from domain.policy import LifecyclePolicy, parse_duration
from domain.whatif import CheckItem, LogEvent, Report, Simulation
from streams.plan import to_domain
from streams.records import (
    AcceptCommand,
    CloseCommand,
    ConversationEvent,
    InboundMessage,
    SendRequested,
    TimerFiredRecord,
    events_of,
    occurred_at,
)
from streams.replay import assign_range, fetch_range, plain_consumer, topic_partitions
from streams.settings import Settings
from streams.topics import Topics

# The settings --set may change: the ones Settings.policy() reads.
POLICY_SETTINGS = (
    "timeout_idle",
    "timeout_processing",
    "timeout_awaiting_confirmation",
    "timeout_waiting_close",
    "close_grace",
    "reopen_window",
)
# A record in one partition may carry a time slightly before an earlier one's (clocks of API
# processes differ): deadlines are fired by watermark only this far behind the slowest partition.
WATERMARK_MARGIN = timedelta(minutes=5)
ADVANCE_EVERY = 50_000  # records between two `advance` calls (a pass over the open threads)
CHECK_CHUNK = 1_000

Progress = Callable[[int, int], None]


class WhatIfError(ValueError):
    """A what-if request that cannot run (bad --set, bad time, ...)."""


def policy_overrides(settings: Settings, assignments: Sequence[str]) -> tuple[Settings, dict[str, str]]:
    """The settings with `NAME=VALUE` applied (NAME as the env var, `PARLEY_` optional), each
    value validated by its Settings field; returns them and the overrides as given."""
    update: dict[str, Any] = {}
    given: dict[str, str] = {}
    for assignment in assignments:
        name, sep, value = assignment.partition("=")
        if not sep or not name.strip():
            raise WhatIfError(f"--set {assignment!r}: expected NAME=VALUE, e.g. PARLEY_TIMEOUT_IDLE=PT24H")
        env = name.strip().upper()
        attr = env.removeprefix("PARLEY_").lower()
        if attr not in POLICY_SETTINGS:
            allowed = ", ".join(f"PARLEY_{a.upper()}" for a in POLICY_SETTINGS)
            raise WhatIfError(f"--set {env}: not a lifecycle policy setting (one of {allowed})")
        info = Settings.model_fields[attr]
        adapter: TypeAdapter[Any] = TypeAdapter(Annotated[(info.annotation, *info.metadata)])  # type: ignore[arg-type]
        try:
            update[attr] = adapter.validate_python(value.strip())
        except ValidationError as exc:
            reason = "; ".join(e["msg"] for e in exc.errors(include_url=False))
            raise WhatIfError(f"--set PARLEY_{attr.upper()}={value.strip()!r}: {reason}") from None
        given[f"PARLEY_{attr.upper()}"] = value.strip()
    changed = settings.model_copy(update=update)
    try:
        changed.policy()
    except ValueError as exc:
        raise WhatIfError(f"--set {', '.join(given)}: {exc}") from None
    return changed, given


def parse_time(value: str, now: datetime) -> datetime:
    """An ISO-8601 time with a timezone, or a duration before `now` (`P2D`, `PT6H`, `3600`)."""
    text = value.strip()
    try:
        at = datetime.fromisoformat(text)
    except ValueError:
        try:
            return now - parse_duration(text)
        except ValueError:
            raise WhatIfError(
                f"{value!r}: expected an ISO-8601 time with a timezone (2026-11-22T10:00:00+00:00)"
                " or a duration before now (P2D, PT6H)"
            ) from None
    if at.tzinfo is None:
        raise WhatIfError(f"{value!r} needs a timezone, e.g. 2026-11-22T10:00:00+00:00")
    return at


def log_event(record: ConversationEvent) -> LogEvent | None:
    """The lifecycle event a record stands for, as the projection applies it; None for records
    that change no conversation (outbound messages, receipts, schedules, sends into a known
    conversation)."""
    if isinstance(record, InboundMessage):
        return LogEvent(record.channel_id, record.contact_id, record.received_at, to_domain(record))
    if isinstance(record, CloseCommand | AcceptCommand | TimerFiredRecord):
        return LogEvent(
            record.channel_id,
            record.contact_id,
            occurred_at(record),
            to_domain(record),
            record.conversation_id,
        )
    if isinstance(record, SendRequested) and record.conversation_id is None:
        return LogEvent(record.channel_id, record.contact_id, record.requested_at, to_domain(record))
    return None


MISMATCH_REASONS = {
    "production_timing": "production fired a deadline at another time than the simulated one (late, by"
    " the sweep, or not yet when the log was read) with another event of the thread in between;"
    " replaying the recorded firings gives Postgres' outcome",
    "before_since": "not in Postgres: its opening event joined a conversation opened before --since"
    " (widen the range)",
    "not_projected": "not in Postgres: the worker has not applied its opening event (lagging or stopped)",
    "after_until": "changed in Postgres after the end of the range (--until)",
    "unexplained": "not explained by the log",
}


@dataclass
class CheckResult:
    """How the current-policy run compares with Postgres, conversation by conversation."""

    checked: int = 0
    matched: int = 0
    mismatched: Counter[str] = field(default_factory=Counter)
    samples: dict[str, list[str]] = field(default_factory=dict)

    @property
    def all_match(self) -> bool:
        """Every conversation matched."""
        return self.checked == self.matched

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {
            "checked": self.checked,
            "matched": self.matched,
            "mismatched": {
                reason: {"count": n, "why": MISMATCH_REASONS[reason], "examples": self.samples[reason]}
                for reason, n in sorted(self.mismatched.items())
            },
        }


class PostgresCheck:
    """Compares check items with the conversations table, in chunks, read-only."""

    def __init__(self, conn: asyncpg.Connection, horizon: datetime | None, samples: int = 5) -> None:
        self.conn = conn
        self.horizon = horizon
        self.samples = samples
        self.result = CheckResult()

    async def compare(self, items: list[CheckItem]) -> None:
        """Count matches and classify mismatches of these items."""
        if not items:
            return
        async with self.conn.transaction(readonly=True):
            rows = {
                str(r["id"]): r
                for r in await self.conn.fetch(
                    "SELECT id, state, close_reason, updated_at FROM conversations"
                    " WHERE id = ANY($1::uuid[])",
                    [i.current.id for i in items],
                )
            }
            missing = [i.current.opened_by for i in items if i.current.id not in rows]
            processed: set[str] = set()
            if missing:
                processed = {
                    r["event_id"]
                    for r in await self.conn.fetch(
                        "SELECT event_id FROM processed_events WHERE event_id = ANY($1::text[])", missing
                    )
                }
        res = self.result
        for item in items:
            res.checked += 1
            cur, rec = item.current, item.recorded
            row = rows.get(cur.id)
            if row is None:
                if rec is None:
                    reason = "production_timing"
                elif cur.opened_by in processed:
                    reason = "before_since"
                else:
                    reason = "not_projected"
                seen = "not in Postgres"
            else:
                actual = (row["state"], row["close_reason"])
                if actual == (str(cur.state), cur.close_reason):
                    res.matched += 1
                    continue
                if self.horizon is not None and row["updated_at"] > self.horizon:
                    reason = "after_until"
                elif rec is not None and actual == (str(rec.state), rec.close_reason):
                    reason = "production_timing"
                else:
                    reason = "unexplained"
                seen = f"Postgres: {row['state']} {row['close_reason'] or ''}".rstrip()
            res.mismatched[reason] += 1
            examples = res.samples.setdefault(reason, [])
            if len(examples) < self.samples:
                examples.append(
                    f"{cur.id} ({cur.channel_id}/{cur.contact_id}): simulated {cur.describe()}; {seen}"
                )


@dataclass
class WhatIfResult:
    """A what-if run: the report, the Postgres check, and what was read."""

    since: datetime
    until: datetime | None
    horizon: datetime
    overrides: dict[str, str]
    current_policy: LifecyclePolicy
    changed_policy: LifecyclePolicy
    report: Report
    check: CheckResult | None
    read: int = 0
    undecodable: int = 0
    other_channels: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {
            "since": self.since.isoformat(),
            "until": self.until.isoformat() if self.until else None,
            "horizon": self.horizon.isoformat(),
            "overrides": self.overrides,
            "policy": {
                "current": _policy_dict(self.current_policy),
                "changed": _policy_dict(self.changed_policy),
            },
            "records_read": self.read,
            "undecodable": self.undecodable,
            "other_channels": self.other_channels,
            "seconds": round(self.seconds, 3),
            **self.report.to_dict(),
            "check": self.check.to_dict() if self.check else None,
        }


def _policy_dict(policy: LifecyclePolicy) -> dict[str, float]:
    return {
        "idle_timeout_s": policy.idle_timeout.total_seconds(),
        "processing_timeout_s": policy.processing_timeout.total_seconds(),
        "awaiting_confirmation_timeout_s": policy.awaiting_confirmation_timeout.total_seconds(),
        "waiting_close_timeout_s": policy.waiting_close_timeout.total_seconds(),
        "close_grace_s": policy.close_grace.total_seconds(),
        "reopen_window_s": policy.reopen_window.total_seconds(),
    }


def print_progress(done: int, total: int) -> None:
    """A one-line progress bar on stderr."""
    width = 30
    filled = width * done // total if total else width
    end = "\r" if sys.stderr.isatty() and done < total else "\n"
    sys.stderr.write(f"whatif [{'#' * filled}{'.' * (width - filled)}] {done:,}/{total:,} records{end}")


async def whatif(
    settings: Settings,
    *,
    since: datetime,
    until: datetime | None = None,
    overrides: Sequence[str] = (),
    channels: Sequence[str] = (),
    examples: int = 0,
    check: bool = True,
    reopened_within: timedelta = timedelta(hours=24),
    progress: Progress = print_progress,
    batch: int = 1000,
) -> WhatIfResult:
    """Run the comparison over the retained log; see the module docstring."""
    started = time.monotonic()
    now = datetime.now(UTC)
    changed_settings, given = policy_overrides(settings, overrides)
    current, changed = settings.policy(), changed_settings.policy()
    if until is not None and until <= since:
        raise WhatIfError("--until must be after --since")
    horizon = min(until, now) if until is not None else now
    if not settings.kafka_bootstrap_servers:
        raise WhatIfError("KAFKA_BOOTSTRAP_SERVERS is not set: which broker holds the log?")
    if check and not settings.database_url:
        raise WhatIfError("DATABASE_URL is not set: needed for the Postgres check (or pass --no-check)")
    sim = Simulation(current, changed, check=check, examples=examples, reopened_within=reopened_within)
    prefixes = tuple(f"{c}/".encode() for c in channels)
    topic = Topics(settings.topic_prefix).conversation_events
    consumer = plain_consumer(settings, batch)
    conn: asyncpg.Connection | None = None
    pg: PostgresCheck | None = None
    undecodable = other = read = 0
    try:
        if check:
            conn = await asyncpg.connect(settings.database_url)
            pg = PostgresCheck(conn, until)
        await consumer.start()
        ranges = await assign_range(consumer, topic, await topic_partitions(consumer, topic), since, until)
        total = sum(end - start for start, end in ranges.values())
        # The watermark: the slowest unfinished partition's last record time. A partition with
        # nothing in the range, or read to its end, holds nothing back (no event of it is to come).
        reading = {tp for tp, (start, end) in ranges.items() if start < end}
        last_ms: dict[Any, int] = {}
        next_advance, last_report = ADVANCE_EVERY, 0.0
        async for fetched in fetch_range(consumer, ranges, batch):
            for tp, records in fetched.items():
                for record in records:
                    read += 1
                    if prefixes and not (record.key or b"").startswith(prefixes):
                        other += 1
                        continue
                    try:
                        events = events_of(record.value)
                    except ValidationError:
                        undecodable += 1  # dead-lettered when first consumed: the worker skipped it too
                        continue
                    for event in events:
                        item = log_event(event)
                        if item is not None:
                            sim.add(item)
                if records:
                    last_ms[tp] = records[-1].timestamp
                    if records[-1].offset >= ranges[tp][1] - 1:
                        reading.discard(tp)
            if read >= next_advance and reading and reading <= last_ms.keys():
                next_advance = read + ADVANCE_EVERY
                slowest = min(last_ms[tp] for tp in reading)
                sim.advance(datetime.fromtimestamp(slowest / 1000, UTC) - WATERMARK_MARGIN)
            if pg is not None and len(sim.checks) >= CHECK_CHUNK:
                await pg.compare(sim.drain_checks())
            if time.monotonic() - last_report > 0.5:
                progress(read, total)
                last_report = time.monotonic()
        report = sim.finish(horizon)
        if pg is not None:
            await pg.compare(sim.drain_checks())
        progress(read, total)
    finally:
        await consumer.stop()
        if conn is not None:
            await conn.close()
    return WhatIfResult(
        since=since,
        until=until,
        horizon=horizon,
        overrides=given,
        current_policy=current,
        changed_policy=changed,
        report=report,
        check=pg.result if pg is not None else None,
        read=read,
        undecodable=undecodable,
        other_channels=other,
        seconds=time.monotonic() - started,
    )


# -- text output --------------------------------------------------------------------------------


def duration_text(seconds: float | None) -> str:
    """`2d 3h`, `48h 0m` style, `-` for none."""
    if seconds is None:
        return "-"
    s = round(seconds)
    if s < 60:
        return f"{seconds:.0f}s" if seconds >= 1 or seconds == 0 else f"{seconds:.3f}s"
    days, rest = divmod(s, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    return f"{minutes}m {secs}s"


def render(result: WhatIfResult) -> str:
    """The comparison as text."""
    r = result.report
    cur, chg = r.current, r.changed
    lines = [
        f"whatif: {result.since.isoformat()} .. {(result.until or result.horizon).isoformat()}:"
        f" {result.read:,} records read, {r.events:,} lifecycle events on {r.threads:,} threads"
        f" ({r.recorded_firings:,} recorded timer firings not used: deadlines are simulated"
        f"; {r.duplicates:,} duplicates, {result.undecodable:,} undecodable skipped)"
        f" in {result.seconds:.1f}s",
    ]
    if result.overrides:
        before, after = _policy_dict(result.current_policy), _policy_dict(result.changed_policy)
        changes = [
            f"{name.removesuffix('_s')} {duration_text(before[name])} -> {duration_text(after[name])}"
            for name in before
            if before[name] != after[name]
        ]
        lines.append(
            "changed: "
            + " ".join(f"{k}={v}" for k, v in result.overrides.items())
            + f" ({', '.join(changes) or 'no change'})"
        )
    else:
        lines.append("changed: nothing (--set NAME=VALUE): both runs use the current policy")
    table: list[tuple[str, str, str]] = [
        ("conversations opened", f"{cur.opened:,}", f"{chg.opened:,}"),
        ("reopened within the reopen window", f"{cur.reopened:,}", f"{chg.reopened:,}"),
        ("closed", f"{cur.closed:,}", f"{chg.closed:,}"),
    ]
    for reason in sorted(set(cur.by_reason) | set(chg.by_reason)):
        table.append((f"  {reason}", f"{cur.by_reason[reason]:,}", f"{chg.by_reason[reason]:,}"))
    table += [
        ("open at the end", f"{cur.open_at_end:,}", f"{chg.open_at_end:,}"),
        (
            "duration median",
            duration_text(cur.durations.quantile(0.5)),
            duration_text(chg.durations.quantile(0.5)),
        ),
        (
            "duration p90",
            duration_text(cur.durations.quantile(0.9)),
            duration_text(chg.durations.quantile(0.9)),
        ),
        (
            "user wrote again after an automatic close",
            f"{cur.reopened_after_close:,}",
            f"{chg.reopened_after_close:,}",
        ),
        ("timer firings", f"{cur.firings:,}", f"{chg.firings:,}"),
    ]
    peaks = []
    for stats in (cur, chg):
        peak, count = stats.peak_hour()
        peaks.append(f"{count:,} at {peak:%m-%d %H}h" if peak else "-")
    table.append(("peak timer firings in one hour (UTC)", peaks[0], peaks[1]))
    width = max(len(row[0]) for row in table)
    lines.append("")
    lines.append(f"{'':{width}}  {'current':>20}  {'changed':>20}")
    lines += [f"{a:{width}}  {b:>20}  {c:>20}" for a, b, c in table]
    c = r.comparison
    lines += [
        "",
        f"conversations in both runs: {c.paired:,}; same outcome {c.same:,}, different {c.differ:,}",
        f"  would close earlier: {c.earlier:,} (median {duration_text(c.earlier_by.quantile(0.5))},"
        f" p90 {duration_text(c.earlier_by.quantile(0.9))} earlier)",
        f"  would close later: {c.later:,} (median {duration_text(c.later_by.quantile(0.5))},"
        f" p90 {duration_text(c.later_by.quantile(0.9))} later)",
        f"  closed now, still open at the end with the change: {c.closed_only_in_current:,}",
        f"  open now at the end, closed with the change: {c.closed_only_in_changed:,}",
        f"  close reason changes: {c.reason_changed:,}",
        f"conversations opened only under the current policy: {c.only_current:,};"
        f" only under the changed one: {c.only_changed:,}",
    ]
    check = result.check
    if check is None:
        lines.append("\nPostgres check: skipped (--no-check)")
    else:
        verdict = "all match" if check.all_match else f"{check.checked - check.matched:,} differ"
        lines.append(
            f"\nPostgres check (current policy vs actual rows, state and close reason):"
            f" {check.matched:,} of {check.checked:,} conversations match ({verdict})"
        )
        for reason, n in sorted(check.mismatched.items()):
            lines.append(f"  {n:,} {reason}: {MISMATCH_REASONS[reason]}")
            lines += [f"    {s}" for s in check.samples.get(reason, [])]
    for ex in r.examples:
        lines += ["", f"example {ex.conversation_id} ({ex.channel_id}/{ex.contact_id}):"]
        lines.append(f"  current: {ex.current.describe() if ex.current else 'never opened'}")
        lines.append(f"  changed: {ex.changed.describe() if ex.changed else 'never opened'}")
        rows = [("time", "event", "current", "changed")] + [
            (at.strftime("%Y-%m-%d %H:%M:%S"), what, cur_cell or "", chg_cell or "")
            for at, what, cur_cell, chg_cell in ex.rows
        ]
        widths = [max(len(row[i]) for row in rows) for i in range(3)]
        lines += [f"  {a:{widths[0]}}  {b:{widths[1]}}  {c1:{widths[2]}}  {d}" for a, b, c1, d in rows]
    return "\n".join(lines)
