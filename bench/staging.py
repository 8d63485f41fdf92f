"""`leadflow bench staging`: a staging extract loaded and classified, on a fresh embedded server.

A fresh PostgreSQL (durable: fsync and synchronous commit on, as in production) is started in a
temporary directory and migrated; `bench.staging_data` fills a staging table with N rows of
realistic dirt (default 1,000,000: 3% bad phones, 5% repeated customers, NULLs, over-long names,
extra columns) and the extract is submitted as the data team would. Then the real loader
(`leadflow.stack.staging_loader`, the demo rules, default settings) runs in a child process
until the extract is `loaded`: two loader processes by default (`--loaders`), sharing the
extract by lanes as several `leadflow run staging` would.

The rate is rows per second between the extract's `started_at` and `finished_at` as the manifest
records them (the database's clock: the claim, the count, every chunk, the last commit). Beside
it: the loader's peak RSS (its own high-water mark), the CPU time per row of the loader and of
PostgreSQL with its backends while loading, how many cores that kept busy, and the load average
before and after (other work on the machine skews every figure; run it more than once).

The outcome is checked against the database and the generator: rows_total = N = loaded +
merged + rejected; rejects by code as generated; a lead per loaded row, an event per loaded or
merged row, a customer per distinct valid phone. Any difference fails the run. The server and
the directory are removed at the end, also on Ctrl-C or SIGTERM.
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
from pathlib import Path
from typing import Any

import psycopg
from rich.console import Console
from rich.table import Table

from bench import staging_data
from bench.common import goal, machine, write_report
from bench.intake import BenchFailed, Processes, _Phases
from leadflow.embedded import EmbeddedServers
from schemas import migrate
from sync.staging import Submission, submit

DEFAULT_ROWS = 1_000_000
DEFAULT_LOADERS = 2  # the cores of the machine the goal is set for
GOALS = {"rows_rate": 50_000}


def _progress(url: str) -> tuple[str, int, int, str | None]:
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT state, rows_loaded + rows_merged + rows_rejected, rows_total, error"
            " FROM staging.extracts ORDER BY id DESC LIMIT 1"
        ).fetchone()
    assert row is not None
    return str(row[0]), int(row[1]), int(row[2]), row[3]


def _outcome(url: str) -> dict[str, Any]:
    with psycopg.connect(url) as conn:

        def one(query: str) -> Any:
            row = conn.execute(query).fetchone()
            assert row is not None
            return row[0]

        extract = conn.execute(
            "SELECT rows_total, rows_loaded, rows_merged, rows_rejected, checkpoint,"
            " extract(epoch FROM finished_at - started_at), error"
            " FROM staging.extracts ORDER BY id DESC LIMIT 1"
        ).fetchone()
        assert extract is not None
        return {
            "rows_total": int(extract[0]),
            "loaded": int(extract[1]),
            "merged": int(extract[2]),
            "rejected": int(extract[3]),
            "duplicates": int((extract[4] or {}).get("duplicates", 0)),
            "seconds": float(extract[5]),
            "error": extract[6],
            "rejects_by_code": dict(
                conn.execute(
                    "SELECT code, count(*) FROM staging.extract_rejects GROUP BY 1 ORDER BY 1"
                ).fetchall()
            ),
            "leads": int(one("SELECT count(*) FROM leads")),
            "lead_events": int(one("SELECT count(*) FROM lead_events")),
            "customers": int(one("SELECT count(*) FROM customers")),
            "leads_by_line": dict(
                conn.execute(
                    "SELECT business_line, count(*) FROM leads GROUP BY 1 ORDER BY 2 DESC"
                ).fetchall()
            ),
        }


def verify(rows: int, expected: dict[str, int], outcome: dict[str, Any]) -> None:
    problems = []

    def expect(what: str, got: int, wanted: int) -> None:
        if got != wanted:
            problems.append(f"{what}: {got:,}, expected {wanted:,}")

    expect("rows_total", outcome["rows_total"], rows)
    expect(
        "loaded + merged + rejected",
        outcome["loaded"] + outcome["merged"] + outcome["rejected"],
        rows,
    )
    for code in ("invalid_phone", "schema_violation"):
        expect(f"rejects {code}", outcome["rejects_by_code"].get(code, 0), expected[code])
    expect(
        "rejected", outcome["rejected"], expected["invalid_phone"] + expected["schema_violation"]
    )
    expect("leads vs rows loaded", outcome["leads"], outcome["loaded"])
    expect("events vs rows loaded + merged", outcome["lead_events"], outcome["loaded"] + outcome["merged"])  # fmt: skip
    expect("already-loaded rows in a fresh database", outcome["duplicates"], 0)
    expect("customers vs distinct valid phones", outcome["customers"], expected["customers"])
    if outcome["error"]:
        problems.append(f"the extract failed: {outcome['error']}")
    if problems:
        raise BenchFailed("the staging benchmark does not add up:\n  " + "\n  ".join(problems))


def _measure(
    url: str,
    servers: EmbeddedServers,
    rows: int,
    chunk_rows: int | None,
    loaders: int,
    phases: _Phases,
    work_dir: Path,
) -> dict[str, Any]:
    creating = phases.add("creating the staging table", None)
    started = time.perf_counter()
    with psycopg.connect(url, autocommit=True) as conn:
        expected = staging_data.create(conn, rows)
        submit(conn, "staging", Submission(staging_data.TABLE, source="dwh"))
        conn.execute("CHECKPOINT")  # the load does not pay for the table's writes
    create_seconds = time.perf_counter() - started
    phases.progress.update(creating, total=1, completed=1)
    phases.log(f"{rows:,} rows in staging.{staging_data.TABLE} in {create_seconds:.1f} s")

    load_before = os.getloadavg()
    command = [
        sys.executable, "-m", "bench.staging_worker", "--database-url", url,
        "--lanes", str(loaders),
    ]  # fmt: skip
    if chunk_rows is not None:
        command += ["--chunk-rows", str(chunk_rows)]
    assert servers.postgres is not None
    assert servers.postgres.pid is not None
    children: list[subprocess.Popen[bytes]] = []
    logs = [work_dir / f"staging-worker-{n}.log" for n in range(loaders)]
    said: list[dict[str, Any]] = []
    try:
        for log_path in logs:
            with open(log_path, "wb") as log:
                children.append(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log))
        for child, log_path in zip(children, logs, strict=True):
            assert child.stdout is not None
            said.append(json.loads(child.stdout.readline() or "{}"))
            if "started" not in said[-1]:
                raise BenchFailed(f"a loader did not start; see {log_path}")
        processes = Processes(
            {
                "postgres": (servers.postgres.pid, True),
                **{f"loader {n + 1}": (child.pid, False) for n, child in enumerate(children)},
            }
        )
        cpu_start = processes.cpu_seconds()
        task = phases.add(f"loading the extract ({loaders} loaders)", rows)
        cpu_end: dict[str, float] = {}
        while True:
            state, done, _, error = _progress(url)
            phases.update(task, done)
            if state in ("loaded", "failed"):
                cpu_end = processes.cpu_seconds()
                break
            for child, log_path in zip(children, logs, strict=True):
                if child.poll() is not None:
                    raise BenchFailed(
                        f"a loader exited with code {child.returncode} at {done:,} rows; "
                        f"see {log_path}: {log_path.read_text()[-2000:]}"
                    )
            time.sleep(0.05)
        for n, child in enumerate(children):
            assert child.stdout is not None
            said[n].update(json.loads(child.stdout.readline() or "{}"))
            if child.wait(60) != 0 or "peak_rss_bytes" not in said[n]:
                raise BenchFailed(f"a loader did not finish cleanly; see {logs[n]}")
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
    load_after = os.getloadavg()
    if state == "failed":
        raise BenchFailed(f"the extract failed: {error}")

    phases.log("verifying the outcome against the database and the generator")
    outcome = _outcome(url)
    verify(rows, expected, outcome)
    seconds = outcome["seconds"]
    cpu = {name: cpu_end[name] - cpu_start[name] for name in cpu_end if name in cpu_start}
    return {
        "scenario": "staging",
        "rows": rows,
        "rows_rate": round(rows / seconds),
        "peak_rss_mb": round(max(s["peak_rss_bytes"] for s in said) / 2**20, 1),
        "details": {
            "seconds": round(seconds, 3),
            "timed_from": "the extract's started_at to its finished_at (the manifest)",
            "chunk_rows": chunk_rows or "default (staging.chunk_rows)",
            "postgres": "embedded PostgreSQL, durable (fsync and synchronous_commit on)",
            "rules": "demo rules (deploy/rules.example.yaml)",
            "cpu_us_per_row": {name: round(value / rows * 1e6, 1) for name, value in cpu.items()},
            "cores_busy": round(sum(cpu.values()) / seconds, 2),
            "load_average_before": [round(v, 2) for v in load_before],
            "load_average_after": [round(v, 2) for v in load_after],
            "create_seconds": round(create_seconds, 3),
            "loaders": loaders,
            "lanes": loaders,
            "loader_chunks": sum(r["chunks"] for s in said for r in s.get("results", [])),
            "loader_lanes": [s.get("results", []) for s in said],
            "expected": expected,
            "outcome": outcome,
            "verified": True,
            "goals": GOALS,
            "machine": machine(),
        },
    }


def run(
    rows: int = DEFAULT_ROWS,
    json_path: Path | None = None,
    console: Console | None = None,
    *,
    chunk_rows: int | None = None,
    loaders: int = DEFAULT_LOADERS,
) -> dict[str, Any]:
    """Start the server, measure, verify, clean up; write the JSON report and return it.

    `loaders` loader processes share the extract, one lane each (`staging.lanes`)."""
    console = console or Console()
    work_dir = Path(tempfile.mkdtemp(prefix="leadflow-bench-staging-"))
    phases = _Phases(console)
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        with phases.progress:
            phases.log(f"starting embedded PostgreSQL (durable) in {work_dir}")
            with EmbeddedServers(
                work_dir / "servers", kafka_bootstrap="unused", durable=True
            ) as servers:
                assert servers.database_url is not None
                migrate.upgrade(servers.database_url)
                report = _measure(
                    servers.database_url, servers, rows, chunk_rows, loaders, phases, work_dir
                )
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(work_dir, ignore_errors=True)
        signal.signal(signal.SIGTERM, previous)
    write_report(json_path, report)
    return report


def show(console: Console, report: dict[str, Any]) -> None:
    """The report as a table, for people."""
    details = report["details"]
    outcome = details["outcome"]
    table = Table(title="leadflow bench staging", title_justify="left")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_column("goal")
    table.add_row("rows in the extract", f"{report['rows']:,}", "")
    table.add_row(
        "rows/s",
        f"[bold]{report['rows_rate']:,}[/]",
        f">= {GOALS['rows_rate']:,}: " + goal(report["rows_rate"] >= GOALS["rows_rate"]),
    )
    table.add_row("seconds", f"{details['seconds']:,}", details["timed_from"])
    table.add_row(
        "loader peak RSS", f"{report['peak_rss_mb']:,.0f} MB", "bounded by the chunk size"
    )
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
        "loaded / merged / rejected",
        f"{outcome['loaded']:,} / {outcome['merged']:,} / {outcome['rejected']:,}",
        "checked against the database and the generator",
    )
    table.add_row(
        "rejects by code",
        ", ".join(f"{code} {count:,}" for code, count in outcome["rejects_by_code"].items()),
        "",
    )
    table.add_row("chunks", f"{details['loader_chunks']:,}", f"chunk_rows {details['chunk_rows']}")
    machine_info = details["machine"]
    table.add_row(
        "machine",
        f"{machine_info['cores']} cores",
        f"{machine_info['cpu']}, Python {machine_info['python']}",
    )
    console.print(table)
