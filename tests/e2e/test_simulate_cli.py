"""`leadflow simulate` as a user runs it: the sample day against the demo roster, and its errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from schemas.vocab import REJECT_CODES

LEADFLOW = [sys.executable, "-m", "leadflow.cli"]
ROOT = Path(__file__).parents[2]
LEADS = ROOT / "deploy" / "simulate" / "leads.sample.jsonl"
QUEUES = ROOT / "deploy" / "simulate" / "queues.sample.yaml"
AGENTS = ROOT / "deploy" / "agents.example.csv"
DAY = ("--from", "2026-11-24T00:00:00+08:00", "--to", "2026-11-25T00:00:00+08:00")


def leadflow(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEADFLOW_")}
    env.update(PYTHONWARNINGS="ignore", COLUMNS="200")
    return subprocess.run(
        [*LEADFLOW, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
        check=False,
    )  # fmt: skip


def explained(result: subprocess.CompletedProcess[str]) -> str:
    return f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"


def simulate(tmp_path: Path, *args: str, name: str = "report.json") -> dict[str, Any]:
    out = tmp_path / name
    result = leadflow(
        "simulate", "--leads", str(LEADS), "--agents", str(AGENTS), *DAY, "--json", str(out),
        *args, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, explained(result)
    assert result.stderr == ""
    for title in ("speed", "agents", "queues", "fairness: Gini", "leads still open at the end"):
        assert title in result.stdout
    report: dict[str, Any] = json.loads(out.read_text(encoding="utf-8"))
    return report


def test_the_sample_day_against_the_demo_roster(tmp_path: Path) -> None:
    report = simulate(tmp_path, "--seed", "1")
    assert set(report) == {
        "input", "period", "seed", "behaviour", "intake", "speed_to_lead", "time_to_assignment",
        "sla", "lead_states", "dispositions", "agents", "fairness", "queues", "waiting",
    }  # fmt: skip
    assert report["period"] == {
        "from": "2026-11-24T00:00:00+08:00",
        "to": "2026-11-25T00:00:00+08:00",
        "hours": 24.0,
    }
    assert report["input"]["rules"].endswith("leadflow/demo/rules.yaml")  # the demo rules
    assert report["input"]["queues"] == "configuration"

    intake = report["intake"]
    assert report["input"]["lines"] == (
        intake["events"] + intake["rejected_total"] + intake["outside_period"]
    )
    assert 2000 < intake["events"] < 4000
    assert set(intake["rejected"]) <= set(REJECT_CODES)
    assert {"invalid_phone", "schema_violation", "invalid_json"} <= set(intake["rejected"])
    assert min(intake["outside_period"], intake["duplicates"], intake["merged"]) > 0
    assert intake["leads"] == intake["events"] - intake["duplicates"] - intake["merged"]
    assert sum(report["lead_states"].values()) == intake["leads"]

    speed, assigned = report["speed_to_lead"], report["time_to_assignment"]
    assert 0 < speed["leads"] <= assigned["leads"] <= intake["leads"]
    for figures in (speed, assigned):
        assert 0 <= figures["p50_seconds"] <= figures["p90_seconds"] <= figures["p99_seconds"]
        assert figures["p99_seconds"] <= 24 * 3600

    sla = report["sla"]
    assert sla["met"] + sla["expired"] <= sla["assignments"]
    assert 0 < sla["attainment"] < 1
    assert sum(report["dispositions"].values()) == sla["met"]

    agents = report["agents"]
    assert len(agents) == 30
    assert sum(a["assignments"] for a in agents) == sla["assignments"]
    assert sum(a["contacts"] for a in agents) == sla["met"]
    assert sum(a["conversions"] for a in agents) == report["dispositions"]["converted"]
    for agent in agents:
        assert agent["assignments"] == 0 or agent["status"] == "available"
        assert 0 <= agent["available_hours"] <= 24
        if agent["available_hours"]:
            assert 0 <= agent["busy_share"] <= 1
    fairness = report["fairness"]
    assert fairness["agents"] == sum(1 for a in agents if a["available_hours"] > 0)
    assert 0 <= fairness["gini"] < 1

    queues = report["queues"]
    # No queues configured: one implicit queue per business line of the demo rules.
    assert {q["name"] for q in queues} == {
        "personal_credit_loan", "car_loan", "wealth_management", "enterprise_loan",
        "financial_leasing",
    }  # fmt: skip
    assert sum(q["leads"] for q in queues) == intake["leads"] - intake["not_callable"]
    assert sum(q["assignments"] for q in queues) == sla["assignments"]
    open_leads = sum(report["lead_states"].get(s, 0) for s in ("queued", "assigned", "in_progress"))
    assert report["waiting"]["leads"] == open_leads == sum(report["waiting"]["by_reason"].values())


def test_the_same_seed_gives_the_same_report(tmp_path: Path) -> None:
    first = simulate(tmp_path, "--seed", "5", name="a.json")
    again = simulate(tmp_path, "--seed", "5", name="b.json")
    other = simulate(tmp_path, "--seed", "6", name="c.json")
    assert first == again
    assert first["dispositions"] != other["dispositions"]


def test_queues_from_a_file(tmp_path: Path) -> None:
    report = simulate(tmp_path, "--queues", str(QUEUES))
    assert report["input"]["queues"] == str(QUEUES)
    strategies = {q["name"]: q["strategy"] for q in report["queues"]}
    assert strategies == {
        "personal_credit_hot": "least_loaded",
        "personal_credit": "least_loaded",
        "car_loan": "sticky",
        "wealth_management": "weighted",
        "enterprise_loan": "weighted",
        "financial_leasing": "round_robin",  # implicit: no queue in the file serves it
    }


ERRORS = [
    (
        ["--from", "2026-11-24T00:00:00", "--to", "2026-11-25T00:00:00+08:00"],
        2,
        "has no timezone",
    ),
    (["--from", "yesterday", "--to", "2026-11-25T00:00:00+08:00"], 2, "is not an ISO 8601 time"),
    (
        ["--from", "2026-11-25T00:00:00+08:00", "--to", "2026-11-24T00:00:00+08:00"],
        2,
        "is not after --from",
    ),
    (
        ["--from", "2027-01-01T00:00:00+08:00", "--to", "2027-01-02T00:00:00+08:00"],
        1,
        "Nothing to simulate: none of the",
    ),
]


@pytest.mark.parametrize(("period", "code", "message"), ERRORS)
def test_bad_periods_are_explained(
    tmp_path: Path, period: list[str], code: int, message: str
) -> None:
    result = leadflow(
        "simulate", "--leads", str(LEADS), "--agents", str(AGENTS), *period, cwd=tmp_path
    )
    assert result.returncode == code, explained(result)
    assert message in " ".join(result.stderr.split())
    assert "Traceback" not in result.stderr


def test_bad_files_are_explained(tmp_path: Path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return leadflow("simulate", *args, *DAY, cwd=tmp_path)

    missing = run("--leads", "nope.jsonl", "--agents", str(AGENTS))
    assert missing.returncode == 1, explained(missing)
    assert "Cannot read the leads file nope.jsonl" in missing.stderr

    (tmp_path / "junk.jsonl").write_text('{"not": "an event"}\nnot json\n\n')
    junk = run("--leads", "junk.jsonl", "--agents", str(AGENTS))
    assert junk.returncode == 1, explained(junk)
    assert "has no valid LeadEvent v1 line" in junk.stderr
    assert "invalid_json 1, schema_violation 1" in junk.stderr

    (tmp_path / "agents.csv").write_text(
        "id,name,business_lines,capacity\na-1,王芳,car_loan,lots\n"
    )
    roster = run("--leads", str(LEADS), "--agents", "agents.csv")
    assert roster.returncode == 1, explained(roster)
    assert "agents.csv:2: capacity: 'lots' is not a whole number" in roster.stderr

    (tmp_path / "queues.yaml").write_text(
        "queues:\n  - {name: hot, business_line: car_loan, strategy: fastest}\n"
    )
    queues = run("--leads", str(LEADS), "--agents", str(AGENTS), "--queues", "queues.yaml")
    assert queues.returncode == 1, explained(queues)
    assert "queues.yaml: invalid queues: queues[0].strategy:" in queues.stderr

    (tmp_path / "not-queues.yaml").write_text("sla: 5m\n")
    shape = run("--leads", str(LEADS), "--agents", str(AGENTS), "--queues", "not-queues.yaml")
    assert shape.returncode == 1, explained(shape)
    assert "expected a mapping with a `queues:` list" in shape.stderr
    for result in (missing, junk, roster, queues, shape):
        assert "Traceback" not in result.stderr


def test_an_empty_roster_leaves_every_lead_waiting(tmp_path: Path) -> None:
    (tmp_path / "away.csv").write_text(
        "id,name,business_lines,status\na-1,王芳,*,away\n", encoding="utf-8"
    )
    out = tmp_path / "away.json"
    result = leadflow(
        "simulate", "--leads", str(LEADS), "--agents", "away.csv", *DAY, "--json", str(out),
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, explained(result)
    report = json.loads(out.read_text(encoding="utf-8"))
    assert report["sla"]["assignments"] == 0
    assert report["fairness"]["gini"] is None
    assert report["speed_to_lead"]["p50_seconds"] is None
    # Nobody works: every lead is still queued, but for those whose customer withdrew consent.
    assert set(report["lead_states"]) == {"queued", "do_not_call"}
    assert report["waiting"]["leads"] == report["lead_states"]["queued"]
    assert report["agents"][0]["available_hours"] == 0
