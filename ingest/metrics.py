"""Prometheus metrics of the intake (every channel), registered once per process."""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client import Counter, Gauge, Histogram

EVENTS = Counter(
    "leadflow_intake_events_total",
    "Events through the intake chain, by channel and outcome (new, merged, duplicate, rejected).",
    ["intake", "outcome"],
)
REJECTS = Counter(
    "leadflow_intake_rejects_total",
    "Rejected events by channel and reason code.",
    ["intake", "code"],
)
BATCH_SIZE = Histogram(
    "leadflow_intake_batch_size",
    "Records per intake batch.",
    ["intake"],
    buckets=(1, 10, 50, 100, 250, 500, 1000, 2000, 5000, 10000),
)
BATCH_SECONDS = Histogram(
    "leadflow_intake_batch_seconds",
    "Time to take one batch from records to committed leads.",
    ["intake"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
LEADS_CREATED = Counter(
    "leadflow_leads_created_total",
    "New leads by channel, business line and segment: the classification mix.",
    ["intake", "business_line", "segment"],
)
CONSUMER_LAG = Gauge(
    "leadflow_intake_consumer_lag",
    "Records in the topic not yet taken by this worker, per partition.",
    ["topic", "partition"],
    multiprocess_mode="livemostrecent",
)
RETRIES = Counter(
    "leadflow_intake_retries_total",
    "Transient failures retried with backoff, by what failed (database, kafka).",
    ["intake", "failed"],
)


def count_stored(
    intake: str, outcomes: Mapping[str, int], new_leads: Mapping[tuple[str, str], int]
) -> None:
    """Count a committed batch: events by outcome, new leads by business line and segment."""
    for outcome, count in outcomes.items():
        if count:
            EVENTS.labels(intake, outcome).inc(count)
    for (line, segment), count in new_leads.items():
        LEADS_CREATED.labels(intake, line, segment).inc(count)
