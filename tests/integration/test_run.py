"""`parley run`: the whole local stack from one command, a short start-up with the ready banner
last; Ctrl-C (and a container's SIGTERM) stops it with exit code 0, one summary line and nothing
left behind; `parley status` next to it needs no settings; a second run finds the first run's
data; secrets on disk are 0600 and never printed."""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import signal
import stat
import struct
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil

from parley.localstack import ROOT, free_port


def _start(data: Path, ports: dict[str, int], log: Path) -> tuple[subprocess.Popen[bytes], str]:
    env = {k: v for k, v in os.environ.items() if k not in {"KAFKA_BOOTSTRAP_SERVERS", "DATABASE_URL"}}
    env.update(
        {
            "PARLEY_DATA_DIR": str(data),
            "PARLEY_KAFKA_PORT": str(ports["kafka"]),
            "PARLEY_POSTGRES_PORT": str(ports["pg"]),
            "PARLEY_HTTP_PORT": str(ports["http"]),
            "PARLEY_WORKER_METRICS_PORT": str(ports["metrics"]),
            # INFO: the children's shutdown lines are part of what is checked.
            "PARLEY_LOG_LEVEL": "INFO",
        }
    )
    env.pop("PARLEY_ADMIN_TOKEN", None)
    env.pop("PARLEY_SECRETS_KEY", None)
    with log.open("wb") as out:
        # Its own session and process group, like a shell's foreground job: Ctrl-C reaches the group.
        proc = subprocess.Popen(
            [sys.executable, "-m", "parley.cli", "run"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + 180
    while "Ctrl-C stops everything." not in (out_text := log.read_text(errors="replace")):
        assert proc.poll() is None, f"parley run exited early:\n{out_text[-5000:]}"
        assert time.monotonic() < deadline, f"parley run not ready in time:\n{out_text[-5000:]}"
        time.sleep(0.2)  # polling the child's output file as it grows
    return proc, out_text


def _effective_access(path: Path) -> dict[str, Any]:
    """Who besides the owner may do what in path: POSIX ACL entries if any, else the mode bits."""
    mode = path.stat().st_mode
    users: dict[int, int] = {}
    group = (mode >> 3) & 7
    with contextlib.suppress(OSError):  # no ACL: the mode says it all
        raw = os.getxattr(path, "system.posix_acl_access")
        entries = [struct.unpack_from("<HHI", raw, 4 + 8 * i) for i in range((len(raw) - 4) // 8)]
        users = {e_id: perm for tag, perm, e_id in entries if tag == 0x02}
        group = next(perm for tag, perm, _ in entries if tag == 0x04)
    return {"others": mode & 7, "group": group, "users": users}


def _only_parley(path: Path) -> dict[int, int]:
    # As root, Postgres runs as `parley`, which may traverse (x, nothing else); otherwise nobody.
    return {pwd.getpwnam("parley").pw_uid: 1} if os.geteuid() == 0 else {}


def _descendants_alive(pids: list[int]) -> list[int]:
    return [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]


def _stop(
    proc: subprocess.Popen[bytes], log: Path, sig: signal.Signals, *, group: bool
) -> tuple[list[int], str]:
    """Send sig to the whole foreground process group (a terminal's Ctrl-C) or to `parley run`
    alone (a container runtime's stop); it must exit 0 and leave no descendant behind."""
    children = [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    assert len(children) >= 4, "broker, Postgres, worker and API run as children"
    if group:
        os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)
    assert proc.wait(timeout=90) == 0, log.read_text(errors="replace")[-5000:]
    deadline = time.monotonic() + 30
    while _descendants_alive(children) and time.monotonic() < deadline:
        time.sleep(0.2)  # processes exit asynchronously; poll the process table
    return _descendants_alive(children), log.read_text(errors="replace")


def _ctrl_c(proc: subprocess.Popen[bytes], log: Path) -> tuple[list[int], str]:
    """SIGINT to the whole foreground process group, as a terminal's Ctrl-C does."""
    return _stop(proc, log, signal.SIGINT, group=True)


def _summary(out: str, sig: str) -> None:
    """The stop ends with one line saying how every part exited; nothing follows it."""
    last = out.rstrip().splitlines()[-1]
    assert re.fullmatch(
        rf"Parley stopped on {sig} in \d+\.\d s: worker ok, api ok, Kafka ok, Postgres ok\.", last
    ), out[-5000:]


def _start_up_is_short(out: str) -> None:
    """Faust's banners and tables are DEBUG: the start-up is Parley's own lines, the banner last."""
    for noise in ("Topic Partition Set", "Starting...", "[^Worker]", "Subscription", "Highwater"):
        assert noise not in out, f"{noise!r} in the start-up output:\n{out[-5000:]}"
    banner = out.index("Parley is ready.")
    assert "scheduler: index rebuilt" in out[:banner], out[-5000:]  # the worker's start-up came first
    assert out.rstrip().endswith("Ctrl-C stops everything."), out[-5000:]
    assert len(out.splitlines()) <= 60, out  # short: about 40 lines on a fresh data dir


def _status(data: Path, ports: dict[str, int]) -> tuple[int, str]:
    """`parley status` with only the ports and data dir `parley run` was given."""
    env = {k: v for k, v in os.environ.items() if k not in {"KAFKA_BOOTSTRAP_SERVERS", "DATABASE_URL"}}
    env.pop("PARLEY_ADMIN_TOKEN", None)
    env.update(
        {
            "PARLEY_DATA_DIR": str(data),
            "PARLEY_KAFKA_PORT": str(ports["kafka"]),
            "PARLEY_POSTGRES_PORT": str(ports["pg"]),
            "PARLEY_HTTP_PORT": str(ports["http"]),
            "PARLEY_WORKER_METRICS_PORT": str(ports["metrics"]),
        }
    )
    done = subprocess.run(
        [sys.executable, "-m", "parley.cli", "status"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return done.returncode, done.stdout + done.stderr


def test_run_starts_everything_and_ctrl_c_leaves_nothing_behind(private_dir: Path) -> None:
    data = private_dir / "data"
    ports = {name: free_port() for name in ("kafka", "pg", "http", "metrics")}
    log = data.parent / "run.log"
    proc, out = _start(data, ports, log)
    try:
        _start_up_is_short(out)
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
        code, status = _status(data, ports)
        assert code == 0, status
        assert "ready:          yes  (api ok, postgres ok, kafka ok, worker ok" in status, status
        assert re.search(r"^  parley\.conversation-events +\d+ +\(8 partitions", status, re.M), status
        assert "conversations:  none" in status and "unavailable" not in status, status
    finally:
        left, out = _ctrl_c(proc, log)
    assert left == [], f"processes left behind: {left}"
    # Every Parley child got one signal, cleaned up and exited 0; `parley run` says so in one line.
    _summary(out, "SIGINT")
    assert "api stopped: Kafka producer flushed and closed" in out, out[-5000:]
    assert "worker stopped: Faust app stopped" in out, out[-5000:]
    assert "Traceback" not in out, out[-5000:]

    # Secrets on disk are 0600, and the Postgres password is never printed (masked in the banner).
    password = (data / "postgres" / "password").read_text().strip()
    for secret_file in (data / "admin-token", data / "secrets-key", data / "postgres" / "password"):
        assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600, secret_file
    assert password and password not in out
    assert re.search(r"Postgres:\s+postgresql://postgres:\*\*\*@127\.0\.0\.1:", out), out[-5000:]
    # The data dir's parent (0700 from mkdtemp) was not opened up: at most `parley` may traverse it.
    assert _effective_access(data.parent) == {"others": 0, "group": 0, "users": _only_parley(data.parent)}

    proc, out = _start(data, ports, log)  # a second run finds yesterday's data
    try:
        _start_up_is_short(out)
        # No migration to apply this time: at most a dozen lines before the banner (8 here).
        assert len(out[: out.index("Parley is ready.")].strip().splitlines()) <= 12, out
        req = urllib.request.Request(
            f"http://127.0.0.1:{ports['http']}/v1/channels",
            headers={"Authorization": f"Bearer {token}"},
        )
        with urllib.request.urlopen(req, timeout=10) as r:  # noqa: S310 - loopback
            assert b'"kept"' in r.read()
    finally:
        # A container runtime's stop: SIGTERM to `parley run` alone (PID 1), not to a group.
        left, out = _stop(proc, log, signal.SIGTERM, group=False)
    assert left == []
    _summary(out, "SIGTERM")
    assert "Traceback" not in out, out[-5000:]
    code, status = _status(data, ports)  # nothing runs now: not ready, and it says why
    assert code == 1 and "ready:          NO" in status and "api unreachable" in status, status


def test_run_stops_everything_and_exits_1_when_a_child_dies(private_dir: Path) -> None:
    data = private_dir / "data"
    ports = {name: free_port() for name in ("kafka", "pg", "http", "metrics")}
    log = data.parent / "run.log"
    proc, _ = _start(data, ports, log)
    try:
        children = [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
        [worker] = [c for c in psutil.Process(proc.pid).children() if c.cmdline()[-1:] == ["worker"]]
        worker.kill()  # kill -9: the supervisor notices, stops the rest and says so
        assert proc.wait(timeout=90) == 1
    finally:
        if proc.poll() is None:
            _ctrl_c(proc, log)
    out = log.read_text(errors="replace")
    assert "ERROR parley: worker (exit -9) exited on its own; stopping the stack" in out, out[-5000:]
    last = out.rstrip().splitlines()[-1]
    assert re.fullmatch(
        r"Parley stopped after a failure in \d+\.\d s: "
        r"worker exited with -9, api ok, Kafka ok, Postgres ok\.",
        last,
    ), out[-5000:]
    deadline = time.monotonic() + 30
    while _descendants_alive(children) and time.monotonic() < deadline:
        time.sleep(0.2)  # processes exit asynchronously; poll the process table
    assert _descendants_alive(children) == []
