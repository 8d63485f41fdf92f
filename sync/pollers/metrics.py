"""Prometheus metrics of the stock-data pollers, registered once per process.

The intake's own metrics (`leadflow_intake_*` with `intake="stock"`) count the events the
pollers pass through the chain; these say how each source is doing.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

RUNS = Counter(
    "leadflow_poller_runs_total",
    "Poller runs by source and outcome: succeeded, failed (retried with backoff), stopped "
    "(shut down between pages), busy (another process was running the source), overlapped "
    "(a tick came while the previous run still ran), missed (later than the misfire grace).",
    ["source", "outcome"],
)
ROWS = Counter(
    "leadflow_poller_rows_total",
    "Source rows stored, by source and outcome: new, merged, duplicate (read again), rejected.",
    ["source", "outcome"],
)
REJECTS = Counter(
    "leadflow_poller_rejects_total",
    "Source rows rejected by the intake chain, by source and reason code.",
    ["source", "code"],
)
LAST_SUCCESS = Gauge(
    "leadflow_poller_last_success_timestamp_seconds",
    "Unix time of the source's last successful run (0: none yet).",
    ["source"],
    multiprocess_mode="max",
)
FAILURES = Gauge(
    "leadflow_poller_consecutive_failures",
    "Failed runs of the source in a row (0 after a success).",
    ["source"],
    multiprocess_mode="livemostrecent",
)
WATERMARK = Gauge(
    "leadflow_poller_watermark_timestamp_seconds",
    "The source's watermark as Unix time, when the watermark is a timestamp or a date.",
    ["source"],
    multiprocess_mode="mostrecent",
)
RUN_SECONDS = Histogram(
    "leadflow_poller_run_seconds",
    "Duration of one poller run, by source.",
    ["source"],
    buckets=(0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600),
)
LEADER = Gauge(
    "leadflow_poller_scheduler_leader",
    "1 while this process holds the scheduler lock and runs the sources' jobs.",
    multiprocess_mode="livesum",
)
