"""`leadflow bench pollers`: one run of a stock-data source over a large MariaDB table, into a
fresh embedded PostgreSQL.

A fresh PostgreSQL (durable: fsync and synchronous commit on, as in production) is started in a
temporary directory and migrated. A MariaDB table (the machine's server, 127.0.0.1:3306 database
`test`, or LEADFLOW_BENCH_MARIADB_URL) is filled with N profiles (default 1,000,000; MariaDB's
sequence engine writes them in seconds): five rows share each `updated_at` (ties at every page
boundary), 1% have an invalid phone, the rest are mainland mobiles, with a name, a decimal, a
flag and a city as attributes. Then the source is run once, to the end, in a child process
(`bench.pollers_worker`: what `leadflow sources run` does) with the contract's plain query
(`updated_at > :watermark ORDER BY updated_at LIMIT :limit`) and `batch_size` rows per page.

The rate is source rows per second between the run's `started_at` and `finished_at` as
`poller_runs` records them (the database's clock). Beside it: the poller's peak RSS (its own
high-water mark; two pages are what it holds, whatever N), the CPU time per row of the poller, of
PostgreSQL and of MariaDB while it ran, and the load average before and after.

The outcome is checked against the database and the generator: the run succeeded, read N rows
in one pass, rejected exactly the invalid ones (`invalid_phone`), stored one event and one lead
per valid row with no event twice, and its watermark is the last `updated_at`. Any difference
fails the run. The server, the directory and the MariaDB table are removed at the end, also on
Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import psutil
import psycopg
from rich.console import Console
from rich.table import Table
from sqlalchemy.engine import make_url

from bench.common import machine, write_report
from bench.intake import BenchFailed, Processes, _Phases
from leadflow.embedded import EmbeddedServers
from schemas import migrate

DEFAULT_ROWS = 1_000_000
DEFAULT_BATCH_SIZE = 5000
TIES = 5  # rows per updated_at value
INVALID_EVERY = 100  # every 100th row has an invalid phone
FIRST = datetime(2026, 1, 1)  # noqa: DTZ001 - MySQL DATETIME
SOURCE = "bench_profiles"
MARIADB_URL = os.environ.get("LEADFLOW_BENCH_MARIADB_URL", "mysql://root@127.0.0.1:3306/test")

_FILL = f"""
INSERT INTO {{table}}
SELECT seq,
       IF(seq % {INVALID_EVERY} = 0, CONCAT('12', seq),
          CONCAT('1', ELT(1 + seq % 5, '38', '39', '50', '86', '37'), LPAD(seq, 8, '0'))),
       CONCAT('user', seq),
       TIMESTAMP'{FIRST:%Y-%m-%d %H:%M:%S}' + INTERVAL (seq DIV {TIES}) SECOND,
       (seq % 100000) / 4,
       seq % 2,
       ELT(1 + seq % 3, 'Shanghai', 'Beijing', 'Shenzhen')
FROM seq_1_to_{{rows}}
"""


def _mariadb() -> Any:
    import pymysql  # type: ignore[import-untyped]

    url = make_url(MARIADB_URL)
    try:
        return pymysql.connect(
            host=url.host or "127.0.0.1",
            port=url.port or 3306,
            user=url.username or "root",
            password=url.password or "",
            database=url.database or "test",
            autocommit=True,
        )
    except pymysql.MySQLError as exc:
        raise BenchFailed(
            f"bench pollers needs a MariaDB or MySQL server as the source: {exc} "
            "(set LEADFLOW_BENCH_MARIADB_URL)"
        ) from None


def _mariadb_pid() -> int | None:
    for process in psutil.process_iter(["name"]):
        if process.info["name"] in ("mariadbd", "mysqld"):
            return int(process.pid)
    return None


def _outcome(url: str) -> dict[str, Any]:
    with psycopg.connect(url) as conn:
        run = conn.execute(
            "SELECT outcome, rows_read, rows_new, rows_merged, rows_duplicate, rows_rejected,"
            " rejects, pages, extract(epoch FROM finished_at - started_at)::float8, error"
            " FROM poller_runs WHERE source = %s",
            (SOURCE,),
        ).fetchall()
        events = conn.execute(
            "SELECT count(*), count(DISTINCT event_id) FROM lead_events WHERE source = %s",
            (SOURCE,),
        ).fetchone()
        leads = conn.execute("SELECT count(*) FROM leads").fetchone()
        watermark = conn.execute(
            "SELECT watermark FROM poller_state WHERE source = %s", (SOURCE,)
        ).fetchone()
    assert events is not None
    assert leads is not None
    assert watermark is not None
    if len(run) != 1:
        raise BenchFailed(f"expected one run of the source, found {len(run)}")
    outcome, read, new, merged, duplicate, rejected, rejects, pages, seconds, error = run[0]
    return {
        "outcome": outcome,
        "rows_read": read,
        "new": new,
        "merged": merged,
        "duplicate": duplicate,
        "rejected": rejected,
        "rejects_by_code": rejects,
        "pages": pages,
        "seconds": seconds,
        "error": error,
        "events": events[0],
        "distinct_events": events[1],
        "leads": leads[0],
        "watermark": watermark[0],
    }


def verify(rows: int, outcome: dict[str, Any]) -> None:
    invalid = rows // INVALID_EVERY
    valid = rows - invalid
    last = FIRST + timedelta(seconds=rows // TIES)
    problems = []

    def expect(what: str, got: Any, wanted: Any) -> None:
        if got != wanted:
            problems.append(f"{what}: {got!r}, expected {wanted!r}")

    expect("outcome", outcome["outcome"], "succeeded")
    expect("rows read", outcome["rows_read"], rows)
    expect("rejected", outcome["rejected"], invalid)
    expect(
        "rejects by code", outcome["rejects_by_code"], {"invalid_phone": invalid} if invalid else {}
    )
    expect("new", outcome["new"], valid)
    expect("events stored", outcome["events"], valid)
    expect("distinct events", outcome["distinct_events"], valid)
    expect("leads", outcome["leads"], valid)
    expect("watermark", outcome["watermark"], {"type": "datetime", "value": last.isoformat()})
    if problems:
        raise BenchFailed("the pollers benchmark does not add up:\n  " + "\n  ".join(problems))


def _measure(
    url: str, servers: EmbeddedServers, rows: int, batch_size: int, phases: _Phases, work: Path
) -> dict[str, Any]:
    maria = _mariadb()
    table = f"lf_bench_{uuid.uuid4().hex[:10]}"
    try:
        creating = phases.add("filling the MariaDB source table", None)
        started = time.perf_counter()
        with maria.cursor() as cursor:
            cursor.execute(
                f"CREATE TABLE {table} (user_id INT PRIMARY KEY, mobile VARCHAR(32),"
                " nick VARCHAR(64), updated_at DATETIME(6), ltv DECIMAL(12,2), vip TINYINT,"
                " city VARCHAR(32), KEY (updated_at))"
            )
            cursor.execute(_FILL.format(table=table, rows=rows))
        fill_seconds = time.perf_counter() - started
        phases.progress.update(creating, total=1, completed=1)
        phases.log(f"{rows:,} rows in MariaDB test.{table} in {fill_seconds:.1f} s")
        config = work / "leadflow.yaml"
        config.write_text(
            json.dumps(
                {
                    "database": {"url": url},
                    "log": {"level": "WARNING"},
                    "sources": [
                        {
                            "name": SOURCE,
                            "url": make_url(MARIADB_URL)
                            .set(drivername="mysql+pymysql")
                            .render_as_string(hide_password=False),
                            "query": "SELECT user_id AS external_id, mobile AS phone, nick AS"
                            f" name, updated_at, ltv, vip, city FROM {table}"
                            " WHERE updated_at > :watermark ORDER BY updated_at LIMIT :limit",
                            "watermark": "updated_at",
                            "schedule": "1h",
                            "event_type": "stock_profile",
                            "batch_size": batch_size,
                        }
                    ],
                }
            )
        )
        return _run(url, servers, rows, batch_size, phases, work, config, fill_seconds)
    finally:
        with contextlib.suppress(Exception), maria.cursor() as cursor:
            cursor.execute(f"DROP TABLE IF EXISTS {table}")
        maria.close()


def _run(
    url: str,
    servers: EmbeddedServers,
    rows: int,
    batch_size: int,
    phases: _Phases,
    work: Path,
    config: Path,
    fill_seconds: float,
) -> dict[str, Any]:
    load_before = os.getloadavg()
    log_path = work / "pollers-worker.log"
    command = [sys.executable, "-m", "bench.pollers_worker", "--config", str(config)]
    with open(log_path, "wb") as log:
        child = subprocess.Popen([*command, "--source", SOURCE], stdout=subprocess.PIPE, stderr=log)
    said: dict[str, Any] = {}
    assert servers.postgres is not None
    assert servers.postgres.pid is not None
    try:
        assert child.stdout is not None
        said.update(json.loads(child.stdout.readline() or "{}"))
        if "started" not in said:
            raise BenchFailed(f"the poller did not start; see {log_path}")
        pids = {"postgres": (servers.postgres.pid, True)}
        if (maria := _mariadb_pid()) is not None:
            pids["mariadb"] = (maria, False)
        processes = Processes(pids)
        cpu_start = processes.cpu_seconds()
        task = phases.add("reading the source", rows)
        with psycopg.connect(url, autocommit=True) as conn:
            while child.poll() is None:
                found = conn.execute(
                    "SELECT rows_total FROM poller_state WHERE source = %s", (SOURCE,)
                ).fetchone()
                phases.update(task, int(found[0]) if found else 0)
                time.sleep(0.1)
        cpu_end = processes.cpu_seconds()
        said.update(json.loads(child.stdout.readline() or "{}"))
        if child.wait(60) != 0 or "peak_rss_bytes" not in said:
            raise BenchFailed(f"the poller did not finish cleanly; see {log_path}")
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    load_after = os.getloadavg()
    if said.get("outcome") != "succeeded":
        raise BenchFailed(f"the run ended {said.get('outcome')}: {said.get('error')}")
    phases.update(task, rows)

    phases.log("verifying the outcome against the database and the generator")
    outcome = _outcome(url)
    verify(rows, outcome)
    seconds = outcome["seconds"]
    cpu = {name: cpu_end[name] - cpu_start[name] for name in cpu_end if name in cpu_start}
    cpu["poller"] = said["cpu_seconds"]  # its own count: it has exited by now
    return {
        "scenario": "pollers",
        "rows": rows,
        "rows_rate": round(rows / seconds),
        "peak_rss_mb": round(said["peak_rss_bytes"] / 2**20, 1),
        "details": {
            "seconds": round(seconds, 3),
            "timed_from": "the run's started_at to its finished_at (poller_runs)",
            "batch_size": batch_size,
            "pages": outcome["pages"],
            "rss_at_start_mb": round(said["rss_at_start_bytes"] / 2**20, 1),
            "source": "MariaDB (PyMySQL), plain `> :watermark` query, 5 rows per updated_at",
            "postgres": "embedded PostgreSQL, durable (fsync and synchronous_commit on)",
            "rules": "demo rules (deploy/rules.example.yaml)",
            "cpu_us_per_row": {name: round(value / rows * 1e6, 1) for name, value in cpu.items()},
            "cores_busy": round(sum(cpu.values()) / seconds, 2),
            "load_average_before": [round(v, 2) for v in load_before],
            "load_average_after": [round(v, 2) for v in load_after],
            "fill_seconds": round(fill_seconds, 3),
            "outcome": outcome,
            "verified": True,
            "machine": machine(),
        },
    }


def run(
    rows: int = DEFAULT_ROWS,
    json_path: Path | None = None,
    console: Console | None = None,
    *,
    batch_size: int | None = None,
) -> dict[str, Any]:
    """Start the server, measure, verify, clean up; write the JSON report and return it."""
    console = console or Console()
    work = Path(tempfile.mkdtemp(prefix="leadflow-bench-pollers-"))
    phases = _Phases(console)
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        with phases.progress:
            phases.log(f"starting embedded PostgreSQL (durable) in {work}")
            with EmbeddedServers(
                work / "servers", kafka_bootstrap="unused", durable=True
            ) as servers:
                assert servers.database_url is not None
                migrate.upgrade(servers.database_url)
                report = _measure(
                    servers.database_url,
                    servers,
                    rows,
                    batch_size or DEFAULT_BATCH_SIZE,
                    phases,
                    work,
                )
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(work, ignore_errors=True)
        signal.signal(signal.SIGTERM, previous)
    write_report(json_path, report)
    return report


def show(console: Console, report: dict[str, Any]) -> None:
    """The report as a table, for people."""
    details = report["details"]
    outcome = details["outcome"]
    table = Table(title="leadflow bench pollers", title_justify="left")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_column("")
    table.add_row("rows in the source", f"{report['rows']:,}", details["source"])
    table.add_row("rows/s", f"[bold]{report['rows_rate']:,}[/]", "one run, to the end")
    table.add_row("seconds", f"{details['seconds']:,}", details["timed_from"])
    table.add_row(
        "poller peak RSS",
        f"{report['peak_rss_mb']:,.0f} MB",
        f"{details['rss_at_start_mb']:,.0f} MB before the run; bounded by the pages in hand",
    )
    table.add_row("pages", f"{details['pages']:,}", f"batch_size {details['batch_size']:,}")
    table.add_row(
        "CPU µs per row",
        ", ".join(f"{k} {v}" for k, v in details["cpu_us_per_row"].items()),
        f"{details['cores_busy']} of {details['machine']['cores']} cores busy",
    )
    table.add_row(
        "load average before / after",
        f"{details['load_average_before'][0]} / {details['load_average_after'][0]}",
        "other work on the machine skews the figures",
    )
    table.add_row(
        "new / rejected",
        f"{outcome['new']:,} / {outcome['rejected']:,}",
        "checked against the database and the generator",
    )
    machine_info = details["machine"]
    table.add_row(
        "machine",
        f"{machine_info['cores']} cores",
        f"{machine_info['cpu']}, Python {machine_info['python']}",
    )
    console.print(table)
