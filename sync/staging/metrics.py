"""Prometheus metrics of the staging loaders (the intake metrics count them too, as
intake="staging")."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

ROWS = Counter(
    "leadflow_staging_rows_total",
    "Staging rows loaded by this process, by outcome: loaded (a new lead), merged (into an "
    "existing lead, or already loaded), rejected (written to staging.extract_rejects).",
    ["outcome"],
)
EXTRACTS = Gauge(
    "leadflow_staging_extracts",
    "Extracts in the manifest by state, as this loader last read them.",
    ["state"],
    multiprocess_mode="livemostrecent",
)
EXTRACTS_FINISHED = Counter(
    "leadflow_staging_extracts_finished_total",
    "Extracts this process finished, by how: loaded or failed.",
    ["state"],
)
CHUNK_SECONDS = Histogram(
    "leadflow_staging_chunk_seconds",
    "Time to load one chunk: read, chain, store, rejects and checkpoint, committed.",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
