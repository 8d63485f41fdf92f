"""The poller of `leadflow bench pollers`, in a process of its own so that its peak RSS and CPU
time are the poller's alone.

It is one run of the source as `leadflow sources run NAME` does it (`leadflow.stack.
source_pollers` classifying with the demo rules) on the settings of the given configuration
file. It prints one JSON line when it is ready ({"started": unix time}) and one when the run has
ended, with what the run did and the process's peak RSS:

    python -m bench.pollers_worker --config leadflow.yaml --source NAME
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.intake_worker import _die_with_parent, _peak_rss_bytes
from leadflow.logs import configure
from leadflow.rules import RulesHolder
from leadflow.settings import load_settings
from leadflow.stack import rules_classifier, source_pollers


def _say(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.pollers_worker")
    parser.add_argument("--config", required=True, type=Path)
    parser.add_argument("--source", required=True)
    args = parser.parse_args(argv)
    _die_with_parent()
    settings = load_settings(args.config)
    configure(settings.log.level)  # to stderr: stdout carries the JSON lines
    classifier = rules_classifier(RulesHolder.from_settings(settings))
    (poller,) = [p for p in source_pollers(settings, classifier) if p.spec.name == args.source]
    _say({"started": time.time(), "rss_at_start_bytes": _peak_rss_bytes()})
    cpu_before = _cpu_seconds()
    try:
        result = poller.run(trigger="cli")
    finally:
        poller.dispose()
    _say(
        {
            "outcome": result.outcome,
            "error": result.error,
            "rows": result.rows,
            "pages": result.pages,
            "seconds": result.seconds,
            "peak_rss_bytes": _peak_rss_bytes(),
            "cpu_seconds": _cpu_seconds() - cpu_before,
            "finished": time.time(),
        }
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
