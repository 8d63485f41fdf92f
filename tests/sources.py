"""Stock-data sources for the poller tests: real MariaDB tables (the CI machine's server at
127.0.0.1:3306, database `test`, or LEADFLOW_TEST_MARIADB_URL), real PostgreSQL tables, and a
TCP proxy that takes a source down and brings it back on the same address."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
from sqlalchemy.engine import make_url

MARIADB_URL = os.environ.get("LEADFLOW_TEST_MARIADB_URL", "mysql://root@127.0.0.1:3306/test")


class MariaDB:
    """A connection to the test MariaDB; tables made here get unique names and are dropped."""

    def __init__(self, url: str = MARIADB_URL) -> None:
        import pymysql  # type: ignore[import-untyped]

        parsed = make_url(url)
        self.url = url
        self.host, self.port = parsed.host or "127.0.0.1", parsed.port or 3306
        self.conn = pymysql.connect(
            host=self.host,
            port=self.port,
            user=parsed.username or "root",
            password=parsed.password or "",
            database=parsed.database or "test",
            autocommit=True,
            connect_timeout=5,
        )
        self.tables: list[str] = []

    def url_via(self, host: str, port: int) -> str:
        return make_url(self.url).set(host=host, port=port).render_as_string(hide_password=False)

    def table(self, columns: str) -> str:
        name = f"lf_{uuid.uuid4().hex[:12]}"
        self.execute(f"CREATE TABLE {name} ({columns})")
        self.tables.append(name)
        return name

    def execute(self, statement: str, args: Sequence[Any] | None = None) -> Any:
        with self.conn.cursor() as cursor:
            cursor.execute(statement, args)
            return cursor.fetchall()

    def insert(self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        marks = ", ".join(["%s"] * len(columns))
        with self.conn.cursor() as cursor:
            cursor.executemany(
                f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})", list(rows)
            )

    def close(self) -> None:
        for name in self.tables:
            with contextlib.suppress(Exception):
                self.execute(f"DROP TABLE IF EXISTS {name}")
        self.conn.close()


def connect_mariadb() -> MariaDB:
    """The test MariaDB; skips the test when none answers (CI requires one)."""
    try:
        return MariaDB()
    except Exception as exc:
        if os.environ.get("CI") == "true":
            raise
        pytest.skip(f"no MariaDB at {MARIADB_URL} ({exc}); the CI machine has one")


def mariadb_server() -> Iterator[MariaDB]:
    """For a fixture: `yield from mariadb_server()`; the tables made are dropped after."""
    server = connect_mariadb()
    try:
        yield server
    finally:
        server.close()


class TcpProxy:
    """Forwards 127.0.0.1:port to a server while open; a closed proxy refuses connections and
    cuts the open ones, as a database that went down."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = int(probe.getsockname()[1])
        self._listener: socket.socket | None = None
        self._connections: list[socket.socket] = []
        self._lock = threading.Lock()

    def open(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(16)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def close(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        with self._lock:
            connections, self._connections = self._connections, []
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            with self._lock:
                self._connections += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=_pump, args=(a, b), daemon=True).start()


def _pump(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        for conn in (source, sink):
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
