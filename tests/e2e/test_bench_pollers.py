"""`leadflow bench pollers` as a user runs it, on a small source: the harness works, its checks
against the database pass, the report has its keys, and it leaves nothing behind (the MariaDB
table included). Behaviour only, never speed."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

from tests.e2e.test_bench_intake import LEADFLOW, clean_env, processes_using
from tests.sources import connect_mariadb


def test_bench_pollers_reads_a_source_verifies_and_reports(tmp_path: Path) -> None:
    mariadb = connect_mariadb()  # skips where no MariaDB answers
    before = {row[0] for row in mariadb.execute("SHOW TABLES LIKE 'lf_bench_%'")}
    result = subprocess.run(
        [*LEADFLOW, "bench", "pollers", "--rows", "3000", "--batch-size", "400", "--json", "out.json"],
        cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    report = json.loads((tmp_path / "out.json").read_text())
    assert report["scenario"] == "pollers"
    assert report["rows"] == 3000
    assert report["rows_rate"] > 0
    assert report["peak_rss_mb"] > 0
    details = report["details"]
    assert details["verified"] is True
    assert details["batch_size"] == 400
    assert details["pages"] >= 8  # 3,000 rows, 400 a page
    outcome = details["outcome"]
    assert (outcome["rows_read"], outcome["new"], outcome["rejected"]) == (3000, 2970, 30)
    assert outcome["rejects_by_code"] == {"invalid_phone": 30}
    assert details["cpu_us_per_row"]["poller"] > 0
    assert "rows/s" in result.stdout
    work_dir = re.search(r"/\S*leadflow-bench-pollers-\w+", result.stdout)
    assert work_dir is not None, result.stdout
    assert not Path(work_dir[0]).exists()
    assert processes_using(work_dir[0]) == []
    after = {row[0] for row in mariadb.execute("SHOW TABLES LIKE 'lf_bench_%'")}
    mariadb.close()
    assert after == before  # the source table was dropped
