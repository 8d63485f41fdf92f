"""The loader of `leadflow bench staging`, in a process of its own so that its peak RSS and CPU
time are the loader's alone.

It is the loader `leadflow run staging` runs (`leadflow.stack.staging_loader` classifying with
the demo rules) on the default settings except for the database and the chunk size. It prints
one JSON line when it is ready ({"started": unix time}), loads lanes of extracts until none is
pending or loading (several workers share an extract by lanes), and then prints one with what
it did and its peak RSS:

    python -m bench.staging_worker --database-url URL [--chunk-rows N] [--lanes N]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

import psycopg

from bench.intake_worker import _die_with_parent, _peak_rss_bytes, bench_settings
from leadflow.logs import configure
from leadflow.rules import RulesHolder
from leadflow.stack import rules_classifier, staging_loader


def _say(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def _unfinished(url: str) -> bool:
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM staging.extracts WHERE state IN ('pending', 'loading')"
        ).fetchone()
    return bool(row and row[0])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.staging_worker")
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--chunk-rows", type=int, default=None)
    parser.add_argument("--lanes", type=int, default=None)
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args(argv)
    _die_with_parent()
    configure(args.log_level)  # to stderr: stdout carries the JSON lines
    settings = bench_settings(args.database_url, "127.0.0.1:9", "unused")  # no Kafka here
    staging: dict[str, int] = {}
    if args.chunk_rows is not None:
        staging["chunk_rows"] = args.chunk_rows
    if args.lanes is not None:
        staging["lanes"] = args.lanes
    settings = settings.model_copy(update={"staging": settings.staging.model_copy(update=staging)})
    loader = staging_loader(settings, rules_classifier(RulesHolder.from_settings(settings)))
    _say({"started": time.time()})
    results = []
    try:
        # Until no extract is left to load: a claim can pass by the extract while another
        # loader claims it, with one of its lanes still free.
        while True:
            result = loader.load_next()
            if result is not None:
                results.append(
                    {"extract": result.extract_id, "state": result.state, "chunks": result.chunks}
                )
            elif not _unfinished(args.database_url):
                break
            else:
                time.sleep(0.05)
    finally:
        loader.close()
    _say({"results": results, "peak_rss_bytes": _peak_rss_bytes(), "finished": time.time()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
