"""Small helpers to report figures."""

from __future__ import annotations

import statistics


def pct(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) of values, nearest rank."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def summary_ms(values_s: list[float]) -> str:
    """p50/p99/max of durations given in seconds, printed in milliseconds."""
    ms = [v * 1000 for v in values_s]
    return f"p50 {pct(ms, 50):.1f} ms, p99 {pct(ms, 99):.1f} ms, max {max(ms):.1f} ms"


def row(name: str, value: str, ratio: str = "") -> None:
    """Print one aligned line of the report."""
    print(f"  {name:<58} {value:>22}  {ratio}", flush=True)


def mean(values: list[float]) -> float:
    """Arithmetic mean."""
    return statistics.fmean(values)
