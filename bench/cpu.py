"""Where the CPU goes during a phase: seconds of CPU per process group, as % of one core."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

import psutil


def _cpu(pid: int) -> float:
    """CPU seconds of a process and all its descendants (Postgres backends, JVM threads)."""
    try:
        proc = psutil.Process(pid)
        total = sum(proc.cpu_times()[:2])
        for child in proc.children(recursive=True):
            try:
                total += sum(child.cpu_times()[:2])
            except psutil.NoSuchProcess:
                continue
        return total
    except psutil.NoSuchProcess:
        return 0.0


def _service_pid(marker: str) -> int | None:
    # The broker and Postgres are started by this benchmark: find them by their command line.
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if marker in cmd:
            return int(proc.info["pid"])
    return None


@contextmanager
def accounting(groups: dict[str, int | None], into: dict[str, float]) -> Iterator[None]:
    """Fill `into` with each group's CPU use during the block, in % of one core."""
    pids = {name: pid for name, pid in groups.items() if pid}
    pids.setdefault("bench client", os.getpid())
    start = {name: _cpu(pid) for name, pid in pids.items()}
    t0 = time.monotonic()
    yield
    wall = time.monotonic() - t0
    for name, pid in pids.items():
        into[name] = 100 * (_cpu(pid) - start[name]) / wall


def service_pids() -> dict[str, int | None]:
    """The broker's and Postgres' pids (postmaster; its backends are counted with it)."""
    return {"kafka": _service_pid("kafka.Kafka"), "postgres": _service_pid("pginstall/bin/postgres")}


def describe(usage: dict[str, float]) -> str:
    """'api 45%, worker 60%, ...' sorted by use, with the total."""
    parts = ", ".join(f"{k} {v:.0f}%" for k, v in sorted(usage.items(), key=lambda kv: -kv[1]))
    return f"{parts} (total {sum(usage.values()):.0f}% of 200%)"
