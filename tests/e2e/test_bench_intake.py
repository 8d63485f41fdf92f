"""`leadflow bench intake` as a user runs it, on a tiny input: the harness works, its figures add
up, and it leaves nothing behind, also when interrupted. Behaviour only, never speed."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

LEADFLOW = [sys.executable, "-m", "leadflow.cli"]
WORK_DIR = re.compile(r"/\S*leadflow-bench-intake-\w+")


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEADFLOW_")}
    env.update(PYTHONWARNINGS="ignore", COLUMNS="200")
    return env


def processes_using(directory: str) -> list[str]:
    found = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or ())
        if directory in cmdline:
            found.append(f"{process.info['pid']}: {cmdline}")
    return found


def test_bench_intake_measures_verifies_reports_and_cleans_up(tmp_path: Path) -> None:
    result = subprocess.run(
        [*LEADFLOW, "bench", "intake", "--events", "2000", "--json", "out.json"],
        cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    report = json.loads((tmp_path / "out.json").read_text())
    assert report["scenario"] == "intake"
    assert report["events"] == 2000
    for key in ("raw_rate", "pipeline_rate", "ratio", "peak_rss_mb"):
        assert report[key] > 0, key
    details = report["details"]
    assert details["verified"] is True
    assert details["machine"]["cores"] >= 1
    assert details["machine"]["python"]
    assert details["batch_size"] > 0
    outcomes = details["outcomes"]
    assert sum(outcomes[k] for k in ("new", "merged", "duplicate", "rejected")) == 2000
    mix = details["mix"]
    assert details["database"]["lead_events"] == mix["valid_distinct"]
    assert outcomes["duplicate"] == mix["redelivered"] > 0
    assert outcomes["rejected"] == sum(mix["invalid"].values()) > 0
    assert details["rejects_by_code"] == mix["invalid"]
    for phase, consumer in (("raw", "consumer"), ("pipeline", "worker")):
        assert details[phase]["seconds"] > 0
        assert details[phase]["rate_including_group_join"] > 0
        if sys.platform.startswith("linux"):  # clock ticks: a tiny run may take none
            cpu = details[phase]["cpu_us_per_event"]
            assert set(cpu) == {consumer, "postgres", "broker"}
            assert min(cpu.values()) >= 0
    assert "pipeline, events/s" in result.stdout
    work_dir = WORK_DIR.search(result.stdout)
    assert work_dir is not None, result.stdout
    assert not Path(work_dir[0]).exists()
    assert processes_using(work_dir[0]) == []


def test_an_interrupted_bench_stops_its_servers_and_removes_its_directory(tmp_path: Path) -> None:
    with subprocess.Popen(
        [*LEADFLOW, "bench", "intake", "--events", "200000"],
        cwd=tmp_path, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    ) as bench:  # fmt: skip
        assert bench.stdout is not None
        output, work_dir = "", None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = bench.stdout.readline()
            output += line
            if work_dir is None and (found := WORK_DIR.search(output)):
                work_dir = found[0]
            if "created" in line or not line:
                break
        assert work_dir is not None, output
        assert processes_using(work_dir), "the servers should be running by now"
        time.sleep(1)  # producing
        bench.send_signal(signal.SIGINT)
        rest, _ = bench.communicate(timeout=120)
    assert bench.returncode != 0
    assert "Traceback" not in output + rest
    assert processes_using(work_dir) == []
    assert not Path(work_dir).exists()
