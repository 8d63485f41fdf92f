"""`leadflow bench allocate` and `leadflow bench latency` as a user runs them, on tiny inputs: the
harnesses work, their checks against the database pass, the reports have their keys, and they
leave nothing behind. Behaviour only, never speed."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.e2e.test_bench_intake import LEADFLOW, clean_env, processes_using


def bench(tmp_path: Path, *args: str) -> tuple[dict[str, Any], str]:
    result = subprocess.run(
        [*LEADFLOW, "bench", *args, "--json", "out.json"],
        cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    return json.loads((tmp_path / "out.json").read_text()), result.stdout


def assert_cleaned_up(stdout: str, scenario: str) -> None:
    work_dir = re.search(rf"/\S*leadflow-bench-{scenario}-\w+", stdout)
    assert work_dir is not None, stdout
    assert not Path(work_dir[0]).exists()
    assert processes_using(work_dir[0]) == []


def test_bench_allocate_drains_the_queues_verifies_and_reports(tmp_path: Path) -> None:
    report, stdout = bench(
        tmp_path, "allocate", "--leads", "2000", "--agents", "50", "--queues", "5",
        "--batch-size", "500",
    )  # fmt: skip
    assert report["scenario"] == "allocate"
    assert (report["leads"], report["agents"], report["queues"]) == (2000, 50, 5)
    for key in ("assign_rate", "seconds", "peak_rss_mb"):
        assert report[key] > 0, key
    details = report["details"]
    assert details["verified"] is True
    assert details["batch_size"] == 500
    assert details["goals"] == {"assign_rate": 10_000}
    assert details["machine"]["cores"] >= 1
    workload = details["workload"]
    for run in ("single", "two_allocators"):
        figures = details[run]
        assert figures["allocators"] == (1 if run == "single" else 2)
        # Every queued lead was assigned once or blocked as do-not-call, nothing deferred.
        assert figures["assigned"] + figures["blocked"] == 2000
        assert figures["blocked"] == workload["dnc_leads"]
        assert figures["deferred"] == 0
        assert sum(figures["by_strategy"].values()) == figures["assigned"]
        assert figures["passes"] >= 1
        assert figures["batches"] >= 4  # 2000 leads in batches of at most 500
        assert figures["assign_rate"] > 0
        assert figures["peak_rss_mb"] > 0
        if sys.platform.startswith("linux"):
            assert set(figures["cpu_seconds"]) >= {"postgres"}
        database = details["database"][run]
        assert database["assignments_made"] == figures["assigned"]
        assert database["distinct_leads_assigned"] == figures["assigned"]
        assert database["leads_do_not_call"] == figures["blocked"]
        assert database["outbox_rows"] == figures["assigned"]
        assert database["assignments_open_before"] == workload["open_assignments_before"]
    assert set(details["single"]["by_strategy"]) == {
        "round_robin",
        "least_loaded",
        "weighted",
        "sticky",
    }
    assert "assignments/s, one allocator" in stdout
    assert_cleaned_up(stdout, "allocate")


def test_bench_latency_streams_every_event_to_an_assignment_and_reports(tmp_path: Path) -> None:
    report, stdout = bench(tmp_path, "latency", "--rate", "200", "--seconds", "5")
    assert report["scenario"] == "latency"
    assert (report["rate"], report["seconds"]) == (200, 5)
    assert report["produced"] == report["assigned"] == 1000
    assert report["produce_rate"] > 0
    assert 0 < report["p50_ms"] <= report["p95_ms"] <= report["p99_ms"] <= report["max_ms"]
    details = report["details"]
    assert details["verified"] is True
    assert details["goals"] == {"p99_ms": 250}
    assert details["warmup"]["events"] >= 1
    database = details["database"]
    assert database["leads"] == database["lead_events"] == 1000 + details["warmup"]["events"]
    assert database["assignments"] == database["leads"]
    assert database["leads_assigned_twice"] == database["leads_not_assigned"] == 0
    assert database["without_commit_timestamp"] == 0
    for part in (
        "produce_to_intake_transaction",
        "intake_transaction_to_lead_committed",
        "lead_committed_to_assignment_committed",
    ):
        assert set(details[part]) == {"p50_ms", "p95_ms", "p99_ms", "max_ms"}
    assert sum(window["events"] for window in details["p99_ms_by_window"]) == 1000
    if sys.platform.startswith("linux"):
        assert {"intake", "allocator", "postgres", "broker"} <= set(details["cpu_seconds"])
    assert "latency p99" in stdout
    assert_cleaned_up(stdout, "latency")
