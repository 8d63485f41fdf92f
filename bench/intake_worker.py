"""The intake worker of `leadflow bench intake`, in a process of its own so that its peak RSS is
the worker's alone.

It is the worker `leadflow run intake` runs: `leadflow.stack.intake_worker` classifying with the
demo rules through a `RulesHolder` (and the rules watcher beside it), on the default intake
settings except for the servers, the consumer group and the batch size given here. It prints
one JSON line when it starts ({"started": unix time}), one when the consumer group has given it
its partitions ({"assigned": unix time}; the broker holds a group's first join for a few
seconds) and, once SIGTERM or SIGINT has stopped it after its batch in hand, one with its
counts and its peak RSS:

    python -m bench.intake_worker --database-url URL --bootstrap HOST:PORT --group G
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import os
import resource
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prometheus_client import REGISTRY

from ingest.consumer import KafkaIntake
from leadflow.logs import configure
from leadflow.rules import RulesHolder, watch_rules
from leadflow.settings import Settings, load_settings
from leadflow.stack import intake_worker, rules_classifier

OUTCOMES = ("new", "merged", "duplicate", "rejected")
PR_SET_PDEATHSIG = 1


def bench_settings(
    database_url: str, bootstrap: str, group: str, batch_size: int | None = None
) -> Settings:
    """The built-in defaults (no leadflow.yaml, no LEADFLOW_* variables) but for these."""
    intake: dict[str, Any] = {"consumer_group": group}
    if batch_size is not None:
        intake["batch_size"] = batch_size
    with tempfile.TemporaryDirectory() as empty:
        config = Path(empty) / "leadflow.yaml"
        config.write_text("{}\n")
        return load_settings(
            config,
            environ={},
            database={"url": database_url},
            kafka={"bootstrap": bootstrap},
            intake=intake,
        )


def _peak_rss_bytes() -> int:
    """This process's peak RSS. On Linux the high-water mark of its own memory (VmHWM), not
    ru_maxrss: that one also keeps the RSS of the process that forked it, before the exec."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # kilobytes on Linux


def _say(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


async def _announce_assignment(worker: KafkaIntake, stop: asyncio.Event) -> None:
    while not stop.is_set():
        if worker.consumer is not None and worker.consumer.assignment():
            _say({"assigned": time.time()})
            return
        await asyncio.sleep(0.005)


async def _serve(settings: Settings) -> dict[str, Any]:
    holder = RulesHolder.from_settings(settings)
    worker = intake_worker(settings, rules_classifier(holder))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    assert settings.database.url is not None
    rules = asyncio.create_task(
        watch_rules(holder, settings, settings.database.url.get_secret_value(), stop)
    )
    _say({"started": time.time(), "rules_version": holder.rules.version})
    assigned = asyncio.create_task(_announce_assignment(worker, stop))
    try:
        await worker.run(stop)
    finally:
        stop.set()
        assigned.cancel()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(rules, 10)
    counts = {
        outcome: int(
            REGISTRY.get_sample_value(
                "leadflow_intake_events_total", {"intake": "realtime", "outcome": outcome}
            )
            or 0
        )
        for outcome in OUTCOMES
    }
    return {"batches": worker.batches, "records": worker.records, "outcomes": counts}


def _die_with_parent() -> None:
    """SIGTERM when the benchmark that started this process dies, however it dies (Linux)."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    if os.getppid() != parent:
        sys.exit(1)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.intake_worker")
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--group", required=True)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    _die_with_parent()
    configure(args.log_level)  # to stderr: stdout carries the JSON lines
    settings = bench_settings(args.database_url, args.bootstrap, args.group, args.batch_size)
    finished = asyncio.run(_serve(settings))
    _say({**finished, "peak_rss_bytes": _peak_rss_bytes()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
