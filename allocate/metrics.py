"""Prometheus metrics of allocation, registered once per process."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

ASSIGNMENTS = Counter(
    "leadflow_assignments_total",
    "Assignments made, by queue and the strategy that chose the agent.",
    ["queue", "strategy"],
)
DEFERRED = Counter(
    "leadflow_allocation_deferred_total",
    "Leads put back until their call window opens.",
)
BLOCKED = Counter(
    "leadflow_allocation_blocked_total",
    "Queued leads closed at assignment time (do-not-call list, attempts exhausted).",
)
SLA_EXPIRED = Counter(
    "leadflow_sla_expired_total",
    "Assignments taken back because the first contact did not happen before the SLA deadline.",
)
SPEED_TO_LEAD = Histogram(
    "leadflow_speed_to_lead_seconds",
    "From a lead entering its queue to its first assignment (committed), by queue.",
    ["queue"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 14400, 86400),
)
PASS_SECONDS = Histogram(
    "leadflow_allocation_pass_seconds",
    "Time of one allocation pass (SLA sweep, routing, every queue).",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
RETRIES = Counter(
    "leadflow_allocation_retries_total",
    "Allocation passes that failed on a transient database error and were retried.",
)
QUEUE_DEPTH = Gauge(
    "leadflow_queue_depth",
    "Queued leads per queue (including those waiting for their call window or a retry time).",
    ["queue"],
    multiprocess_mode="livemostrecent",
)
QUEUE_OLDEST_SECONDS = Gauge(
    "leadflow_queue_oldest_seconds",
    "Age of the oldest lead ready to be assigned, per queue.",
    ["queue"],
    multiprocess_mode="livemostrecent",
)
UNROUTED = Gauge(
    "leadflow_leads_unrouted",
    "Queued leads no queue serves (only with allocation.implicit_queues false).",
    multiprocess_mode="livemostrecent",
)
