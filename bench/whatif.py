"""What-if simulation speed: a synthetic conversation log, pure domain, no IO (`--whatif-only`).

The log imitates production: threads have conversations one after another; a conversation opens
with a user message, an agent accepts it, the user and the business go on, and it ends with a
goodbye, an agent's close or the idle deadline (whose recorded firing is on the log, as the worker
writes it). Gaps between a thread's conversations vary (1 h to 4 days), so a 24 h idle timeout
changes outcomes. The log is built before the clock starts; the figure is log events per second
through `domain.whatif.Simulation` (both runs, simulated deadlines, `advance` every 50,000 events).
"""

from __future__ import annotations

import random
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta

from bench.stats import row
from domain.lifecycle import (
    AgentAccepted,
    BusinessMessage,
    CloseReason,
    CloseRequested,
    TimerFired,
    UserMessage,
)
from domain.policy import LifecyclePolicy
from domain.whatif import LogEvent, Simulation

T0 = datetime(2026, 11, 1, tzinfo=UTC)
PHRASES = (
    "oi",
    "olá, boa tarde",
    "preciso de ajuda com meu pedido",
    "meu pedido não chegou",
    "qual o prazo de entrega?",
    "ok",
    "sim",
    "pode ser",
    "não recebi o código",
    "quero trocar o produto",
    "hello, I need help with my order",
    "where is my package?",
    "hola, necesito ayuda",
)
GOODBYES = ("obrigado, tchau", "obrigado, pode fechar", "valeu, até mais", "thanks, bye")


def synthetic_log(n: int, seed: int = 13) -> list[LogEvent]:
    """About n lifecycle log events in time order (plus the recorded deadline firings)."""
    rnd = random.Random(seed)
    events: list[tuple[datetime, int, LogEvent]] = []
    threads = max(1, n // 45)  # ~5 conversations of ~9 events each per thread
    seq = 0

    def add(at: datetime, item: LogEvent) -> None:
        nonlocal seq
        seq += 1
        events.append((at, seq, item))

    for t in range(threads):
        contact = f"55119{t:08d}"
        at = T0 + timedelta(seconds=rnd.uniform(0, 14 * 86400))
        while len(events) < n and at < T0 + timedelta(days=30):
            eid = f"{contact}:{seq}"
            conv = f"conv-{eid}"
            if rnd.random() < 0.1:
                add(at, LogEvent("wa", contact, at, BusinessMessage(eid, conv)))
            else:
                add(at, LogEvent("wa", contact, at, UserMessage(eid, eid, rnd.choice(PHRASES), conv)))
            at += timedelta(seconds=rnd.uniform(5, 600))
            add(at, LogEvent("wa", contact, at, AgentAccepted(f"acc:{eid}", "agent-1"), conv))
            for _ in range(rnd.randint(2, 7)):
                at += timedelta(seconds=rnd.expovariate(1 / 900))
                text = rnd.choice(PHRASES)
                if rnd.random() < 0.5:
                    text = f"{text} #{rnd.randint(1, 10**6)}"  # half the texts are unique
                add(at, LogEvent("wa", contact, at, UserMessage(f"{contact}:{seq}", f"m{seq}", text, "-")))
            end = rnd.random()
            if end < 0.4:
                at += timedelta(seconds=rnd.uniform(5, 120))
                text = rnd.choice(GOODBYES)
                add(at, LogEvent("wa", contact, at, UserMessage(f"{contact}:{seq}", f"m{seq}", text, "-")))
                at += timedelta(minutes=10)
            elif end < 0.7:
                at += timedelta(seconds=rnd.uniform(60, 3600))
                close = CloseRequested(f"cls:{eid}", CloseReason.AGENT_CLOSED, "agent-1")
                add(at, LogEvent("wa", contact, at, close, conv))
            else:
                at += timedelta(hours=24)  # processing deadline: production's recorded firing
                add(at, LogEvent("wa", contact, at, TimerFired(f"tmr:{eid}", conv, 9, at), conv))
            at += timedelta(hours=rnd.choice((1, 5, 20, 30, 40, 60, 96)))
        if len(events) >= n:
            break
    events.sort(key=lambda e: (e[0], e[1]))
    return [e[2] for e in events[:n]]


def simulate(
    log: list[LogEvent], current: LifecyclePolicy, changed: LifecyclePolicy, fast: bool = True
) -> tuple[float, float, int]:
    """(events/s by the wall clock, events/s by this process's CPU time, conversations the
    changed run closed). The box is shared: CPU time is what the simulation itself cost."""
    sim = Simulation(current, changed, fast=fast)
    start, cpu = time.perf_counter(), time.process_time()
    for i, item in enumerate(log, 1):
        sim.add(item)
        if i % 50_000 == 0:
            sim.advance(item.at - timedelta(minutes=5))
    report = sim.finish(log[-1].at + timedelta(days=5))
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    return len(log) / wall, len(log) / cpu, report.changed.closed


def run(n: int = 1_000_000, rounds: int = 2) -> None:
    """Print events/s for `rounds` runs over one n-event log."""
    print(f"\n== what-if simulation (pure domain, no IO), {n:,}-event synthetic log ==", flush=True)
    started = time.perf_counter()
    log = synthetic_log(n)
    firings = sum(isinstance(e.event, TimerFired) for e in log)
    threads = len({e.contact_id for e in log})
    row(
        "log built (not timed)",
        f"{len(log):,} events, {threads:,} threads",
        f"({firings:,} recorded firings; {time.perf_counter() - started:.0f} s)",
    )
    current = LifecyclePolicy()
    changed = replace(current, idle_timeout=timedelta(hours=24), close_grace=timedelta(seconds=60))
    for i in range(rounds):
        rate, cpu_rate, closed = simulate(log, current, changed)
        row(
            f"round {i + 1}: current vs idle 24 h + close grace 60 s",
            f"{rate:,.0f} events/s",
            f"({cpu_rate:,.0f}/s of CPU time; target >= 50,000; {closed:,} closed in the changed run)",
        )
    rate, cpu_rate, _ = simulate(log, current, changed, fast=False)
    row(
        "  the same, `transition` for every step (no fast step)",
        f"{rate:,.0f} events/s",
        f"({cpu_rate:,.0f}/s of CPU time)",
    )


if __name__ == "__main__":
    run()
