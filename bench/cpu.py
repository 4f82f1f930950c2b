"""Where the CPU goes during a phase, per component, in % of one core (this box has 200%)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

import psutil

# Every component runs as a child process of the benchmark; its command line tells which.
_MARKERS = {
    "kafka": "kafka.Kafka",
    "postgres": "pginstall/bin/postgres",
    "worker": "parley.cli worker",
    "api": "parley.cli api",
    "receiver": "bench.webhook_receiver serve",
    "raw http client": "bench.webhook_receiver post",
    "simulator": "sandbox.simulator",
    "raw graph client": "bench.sends post",
    "wrk": "wrk -t",
}


def _snapshot() -> dict[int, tuple[str, float]]:
    """pid -> (component, CPU seconds used so far); Postgres backends count with Postgres."""
    me = psutil.Process(os.getpid())
    found = {me.pid: ("bench client", sum(me.cpu_times()[:2]))}
    for child in me.children(recursive=True):
        try:
            cmd = " ".join(child.cmdline())
            used = sum(child.cpu_times()[:2])
        except psutil.Error:
            continue
        for name, marker in _MARKERS.items():
            if marker in cmd or (name == "postgres" and child.name() == "postgres"):
                if name == "api" and "--child" in cmd:  # one of `parley api --processes N`'s
                    name = "api-" + cmd.split("--child", 1)[1].split()[0]
                found[child.pid] = (name, used)
                break
    return found


@contextmanager
def accounting(into: dict[str, float]) -> Iterator[None]:
    """Fill `into` with each component's CPU use during the block, in % of one core.

    Short-lived processes that exit during the block (a Postgres backend of a closed connection)
    lose their share; the components themselves keep running through every phase.
    """
    start = _snapshot()
    t0 = time.monotonic()
    yield
    wall = time.monotonic() - t0
    for pid, (name, used) in _snapshot().items():
        # A process born during the block counts from zero; one that died is not counted.
        into[name] = into.get(name, 0.0) + 100 * (used - start.get(pid, (name, 0.0))[1]) / wall


def describe(usage: dict[str, float]) -> str:
    """'worker 60%, api 45%, ...' sorted by use, with the total."""
    parts = ", ".join(f"{k} {v:.0f}%" for k, v in sorted(usage.items(), key=lambda kv: -kv[1]))
    return f"{parts} (total {sum(usage.values()):.0f}% of 200%)"
