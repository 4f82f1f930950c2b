"""`parley run`: the whole local stack from one command; Ctrl-C leaves nothing behind; a second
run finds the first run's data."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil

from parley.localstack import ROOT, free_port


def _start(data: Path, ports: dict[str, int]) -> tuple[subprocess.Popen[str], str]:
    env = {k: v for k, v in os.environ.items() if k not in {"KAFKA_BOOTSTRAP_SERVERS", "DATABASE_URL"}}
    env.update(
        {
            "PARLEY_DATA_DIR": str(data),
            "PARLEY_KAFKA_PORT": str(ports["kafka"]),
            "PARLEY_POSTGRES_PORT": str(ports["pg"]),
            "PARLEY_HTTP_PORT": str(ports["http"]),
            "PARLEY_WORKER_METRICS_PORT": str(ports["metrics"]),
            "PARLEY_LOG_LEVEL": "WARNING",
        }
    )
    env.pop("PARLEY_ADMIN_TOKEN", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "parley.cli", "run"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    out = ""
    deadline = time.monotonic() + 180
    assert proc.stdout is not None
    while "Ctrl-C stops everything." not in out:  # reading the child's output as it comes
        line = proc.stdout.readline()
        assert line or proc.poll() is None, f"parley run exited early:\n{out}"
        assert time.monotonic() < deadline, f"parley run not ready in time:\n{out}"
        out += line
    return proc, out


def _descendants_alive(pids: list[int]) -> list[int]:
    return [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]


def _stop(proc: subprocess.Popen[str]) -> list[int]:
    children = [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    assert len(children) >= 4, "broker, Postgres, worker and API run as children"
    proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
    assert proc.wait(timeout=90) == 0
    if proc.stdout:
        proc.stdout.close()
    deadline = time.monotonic() + 30
    while _descendants_alive(children) and time.monotonic() < deadline:
        time.sleep(0.2)  # processes exit asynchronously; poll the process table
    return _descendants_alive(children)


def test_run_starts_everything_and_ctrl_c_leaves_nothing_behind() -> None:
    data = Path(tempfile.mkdtemp(prefix="parley-run-"))
    ports = {name: free_port() for name in ("kafka", "pg", "http", "metrics")}
    proc, out = _start(data, ports)
    try:
        base = f"http://127.0.0.1:{ports['http']}"
        assert f"{base}/" in out and "Bearer " in out
        token = (data / "admin-token").read_text().strip()
        with urllib.request.urlopen(f"{base}/readyz", timeout=10) as r:  # noqa: S310 - loopback
            assert r.status == 200
        req = urllib.request.Request(  # noqa: S310 - loopback
            f"{base}/v1/channels",
            method="POST",
            headers={"Authorization": f"Bearer {token}"},
            data=b'{"id": "kept", "provider": "generic", "secret": "whsec_MDEyMzQ1Njc4OWFiY2RlZg=="}',
        )
        with urllib.request.urlopen(req, timeout=10) as r:  # noqa: S310 - loopback
            assert r.status == 201
    finally:
        left = _stop(proc)
    assert left == [], f"processes left behind: {left}"

    proc, _ = _start(data, ports)  # a second run finds yesterday's data
    try:
        req = urllib.request.Request(
            f"http://127.0.0.1:{ports['http']}/v1/channels",
            headers={"Authorization": f"Bearer {token}"},
        )
        with urllib.request.urlopen(req, timeout=10) as r:  # noqa: S310 - loopback
            assert b'"kept"' in r.read()
    finally:
        assert _stop(proc) == []
