"""Benchmark domain.timer_wheel against a heapq index measured in the same run; prints a table.

Run: python bench/bench_timer_wheel.py   (about 30-40 s on 2 cores, ~1.5 GB peak RSS)
"""

from __future__ import annotations

import gc
import heapq
import random
import sys
import time
import tracemalloc
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from domain.timer_wheel import TimerWheel

T0 = 1_700_000_000_000  # a fixed epoch ms, so runs are comparable
H48 = 48 * 3600 * 1000  # the default idle deadline


class HeapIndex:
    """Baseline: heap of (due, key) plus key -> due, lazy deletion (the usual heapq recipe)."""

    __slots__ = ("_dues", "_heap")

    def __init__(self) -> None:
        self._heap: list[tuple[int, str]] = []
        self._dues: dict[str, int] = {}

    @classmethod
    def build(cls, items: Iterable[tuple[str, int]]) -> HeapIndex:
        index = cls()
        index._dues = dict(items)
        index._heap = [(d, k) for k, d in index._dues.items()]
        heapq.heapify(index._heap)
        return index

    def __len__(self) -> int:
        return len(self._dues)

    def schedule(self, key: str, due_ms: int) -> None:
        self._dues[key] = due_ms
        heapq.heappush(self._heap, (due_ms, key))

    def pop_due(self, now_ms: int) -> list[tuple[str, int]]:
        heap, dues, out = self._heap, self._dues, []
        while heap and heap[0][0] <= now_ms:
            due, key = heapq.heappop(heap)
            if dues.get(key) == due:
                del dues[key]
                out.append((key, due))
        return out


def make_keys(n: int, start: int = 0) -> list[str]:
    # Thread keys as the agents build them: channel id, unit separator, contact phone.
    return [f"chan-{i % 50}\x1f55119{i:08d}" for i in range(start, start + n)]


def traced_bytes(fn: Callable[[], Any]) -> tuple[float, Any]:
    """Bytes still allocated by fn() (its result kept alive), via tracemalloc."""
    gc.collect()
    tracemalloc.start()
    obj = fn()
    current, _peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return current, obj


def key_bytes(n: int = 100_000) -> float:
    """tracemalloc bytes of one thread-key string (the list holding them is subtracted)."""
    total, keys = traced_bytes(lambda: make_keys(n))
    return (total - sys.getsizeof(keys)) / n


def mem_row(n: int, rnd: random.Random, schedule_path: bool) -> dict[str, float]:
    """Bytes per timer, keys excluded: wheel via build() (and schedule()), heapq baseline."""
    keys = make_keys(n)
    offs = [rnd.randrange(H48) for _ in range(n)]  # due ints are created inside the trace

    def wheel_build() -> TimerWheel[str]:
        return TimerWheel.build(zip(keys, [T0 + o for o in offs], strict=True), T0)

    def wheel_sched() -> TimerWheel[str]:
        w: TimerWheel[str] = TimerWheel(T0)
        for k, o in zip(keys, offs, strict=True):
            w.schedule(k, T0 + o)
        return w

    def heap_build() -> HeapIndex:
        return HeapIndex.build(zip(keys, [T0 + o for o in offs], strict=True))

    runs: list[tuple[str, Callable[[], Any]]] = [("wheel", wheel_build), ("heap", heap_build)]
    if schedule_path:
        runs.append(("wheel_sched", wheel_sched))
    out: dict[str, float] = {}
    for name, fn in runs:
        b, obj = traced_bytes(fn)
        assert len(obj) == n
        out[name] = b / n
        del obj
    return out


def pop_row(n: int, rnd: random.Random) -> dict[str, float]:
    """Mean and worst pop_due per 1 ms tick: first with nothing due, then ~5 due per tick."""
    idle, window, per_ms = 1_000, 2_000, 5
    near = window * per_ms  # these fire during the measured window
    keys = make_keys(n)
    dues = [T0 + idle + 1 + rnd.randrange(window) for _ in range(near)]
    dues += [T0 + idle + window + 1 + rnd.randrange(H48) for _ in range(n - near)]
    items = list(zip(keys, dues, strict=True))
    out: dict[str, float] = {}
    clock = time.perf_counter
    for name, index in (
        ("wheel", TimerWheel.build(items, T0)),
        ("heap", HeapIndex.build(items)),
    ):
        for phase, first, ticks in (("idle", T0 + 1, idle), ("busy", T0 + idle + 1, window)):
            fired = 0
            worst = 0.0
            began = clock()
            for now in range(first, first + ticks):
                t = clock()
                fired += len(index.pop_due(now))
                worst = max(worst, clock() - t)
            total = clock() - began
            assert fired == (near if phase == "busy" else 0), (name, phase, fired)
            out[f"{name}_{phase}"] = total / ticks * 1e6
            out[f"{name}_{phase}_max"] = worst * 1e6
        del index
        gc.collect()
    return out


def rate(ops: int, fn: Callable[[], None]) -> float:
    t = time.perf_counter()
    fn()
    return ops / (time.perf_counter() - t)


def ops_rows(n: int, rnd: random.Random) -> dict[str, float]:
    """schedule / reschedule ops/s and build() seconds at n timers."""
    keys = make_keys(n)
    dues = [T0 + rnd.randrange(H48) for _ in range(n)]
    later = [d + rnd.randrange(600_000) for d in dues]  # a new message: deadline moves minutes
    anywhere = [T0 + rnd.randrange(H48) for _ in range(n)]  # deadline moves arbitrarily
    items = list(zip(keys, dues, strict=True))
    out: dict[str, float] = {}

    def filing(index: TimerWheel[str] | HeapIndex, new: list[int]) -> Callable[[], None]:
        def run() -> None:
            for k, d in zip(keys, new, strict=True):
                index.schedule(k, d)

        return run

    wheel: TimerWheel[str] = TimerWheel(T0)
    heap = HeapIndex()
    gc.collect()
    out["sched_wheel"] = rate(n, filing(wheel, dues))
    out["sched_heap"] = rate(n, filing(heap, dues))
    out["resched_near_wheel"] = rate(n, filing(wheel, later))
    out["resched_near_heap"] = rate(n, filing(heap, later))
    out["resched_any_wheel"] = rate(n, filing(wheel, anywhere))  # includes compactions
    out["resched_any_heap"] = rate(n, filing(heap, anywhere))
    del wheel, heap
    gc.collect()

    t = time.perf_counter()
    built = TimerWheel.build(items, T0)
    out["build_wheel"] = time.perf_counter() - t
    del built
    gc.collect()
    t = time.perf_counter()
    hb = HeapIndex.build(items)
    out["build_heap"] = time.perf_counter() - t
    del hb
    gc.collect()

    # Worst single pops: the cursor entering a new level-4 bucket (every 2**26 ms = 18.6 h)
    # re-files that whole bucket one level down, with 48 h deadlines ~40% of all timers; a
    # new level-5 bucket (every 2**32 ms = 49.7 days) re-files all of them.
    for level, bits in ((4, 26), (5, 32)):
        boundary = ((T0 >> bits) + 1) << bits
        cross = TimerWheel.build(((k, boundary + 1 + (d - T0)) for k, d in items), boundary - 10)
        gc.collect()
        t = time.perf_counter()
        cross.pop_due(boundary)
        out[f"cascade{level}_ms"] = (time.perf_counter() - t) * 1e3
        t = time.perf_counter()
        cross.next_due_ms()
        out[f"next_due{level}_us"] = (time.perf_counter() - t) * 1e6
        if level == 5:
            t = time.perf_counter()
            cross._compact()  # what a burst of cancels triggers: dict copy + re-file all
            out["compact_ms"] = (time.perf_counter() - t) * 1e3
        del cross
        gc.collect()
    return out


def main() -> None:
    began = time.perf_counter()
    rnd = random.Random(20240601)
    per_key = key_bytes()
    mem = {n: mem_row(n, rnd, n <= 100_000) for n in (100_000, 1_000_000)}
    pops = {n: pop_row(n, rnd) for n in (10_000, 1_000_000)}
    ops = ops_rows(1_000_000, rnd)

    rows: list[tuple[str, str, str, str]] = []

    def row(label: str, ours: float, base: float | None, fmt: str) -> None:
        ratio = f"{ours / base:.2f}x" if base else "-"
        rows.append((label, format(ours, fmt), format(base, fmt) if base else "-", ratio))

    for n, m in mem.items():
        row(f"B/timer @{n:>9,}, keys excluded", m["wheel"], m["heap"], ".1f")
        if "wheel_sched" in m:
            row(f"B/timer @{n:>9,}, keys excluded, via schedule()", m["wheel_sched"], None, ".1f")
        row(f"B/timer @{n:>9,}, keys included", m["wheel"] + per_key, m["heap"] + per_key, ".1f")
    for n, p in pops.items():
        for phase, what in (("idle", "nothing due"), ("busy", "5 due/tick")):
            row(f"pop_due us/tick @{n:>9,}, {what}, mean", p[f"wheel_{phase}"], p[f"heap_{phase}"], ".2f")
            row(
                f"pop_due us/tick @{n:>9,}, {what}, worst",
                p[f"wheel_{phase}_max"],
                p[f"heap_{phase}_max"],
                ".1f",
            )
    row("schedule new keys, ops/s @1M", ops["sched_wheel"], ops["sched_heap"], ",.0f")
    row("reschedule +0-10 min later, ops/s @1M", ops["resched_near_wheel"], ops["resched_near_heap"], ",.0f")
    row("reschedule anywhere in 48 h, ops/s @1M", ops["resched_any_wheel"], ops["resched_any_heap"], ",.0f")
    row("build() from 1M (key, due) pairs, s", ops["build_wheel"], ops["build_heap"], ".3f")
    row("pop into new level-4 bucket (/18.6 h), 1M x 48 h, ms", ops["cascade4_ms"], None, ".1f")
    row("next_due_ms() right after it, us", ops["next_due4_us"], None, ".1f")
    row("pop into new level-5 bucket (/49.7 d), 1M x 48 h, ms", ops["cascade5_ms"], None, ".1f")
    row("next_due_ms() right after it, us", ops["next_due5_us"], None, ".1f")
    row("compaction of 1M (after stale > pending + 64k), ms", ops["compact_ms"], None, ".1f")

    header = ("metric", "wheel", "heapq", "wheel/heapq")
    widths = [max(len(r[i]) for r in [*rows, header]) for i in range(4)]
    line = "  ".join("-" * w for w in widths)

    def fmt(cells: tuple[str, str, str, str]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    print(f"TimerWheel vs heapq index, Python {sys.version.split()[0]}, tracemalloc bytes.")
    print("'keys excluded' still counts the dict, buckets/heap, tuples and the due ints;")
    print(f"'keys included' adds {per_key:.1f} B, one thread-key string as measured here.")
    print(line)
    print(fmt(header))
    print(line)
    for r in rows:
        print(fmt(r))
    print(line)
    print(f"total bench time {time.perf_counter() - began:.1f} s")


if __name__ == "__main__":
    main()
