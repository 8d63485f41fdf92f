"""What every benchmark scenario shares: a description of the machine and the JSON report."""

from __future__ import annotations

import json
import os
import platform
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def machine() -> dict[str, Any]:
    """Enough about this machine to compare figures between runs."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
    }


def write_report(path: Path | None, report: dict[str, Any]) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


def pick(rng: random.Random, weighted: Sequence[tuple[Any, float]]) -> Any:
    """One value of (value, weight) pairs, drawn by weight."""
    return rng.choices([value for value, _ in weighted], [weight for _, weight in weighted])[0]


def goal(ok: bool) -> str:
    """A report table's verdict on one goal."""
    return "[green]meets the goal[/]" if ok else "[red]below the goal[/]"
