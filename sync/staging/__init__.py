"""Staging-table loaders (CONTRACT.md §5): the data team's extracts, through the intake chain.

`manifest` submits and claims extracts, `rows` maps a table's rows to events (pure), `loader`
is the role that loads them chunk by chunk.
"""

from sync.staging.loader import LoaderConfig, LoadResult, StagingLoader
from sync.staging.manifest import (
    EXTRACT_LOCK_CLASS,
    SUBMITTED_CHANNEL,
    Extract,
    Submission,
    TableRefused,
    extracts,
    submit,
)

__all__ = [
    "EXTRACT_LOCK_CLASS",
    "SUBMITTED_CHANNEL",
    "Extract",
    "LoadResult",
    "LoaderConfig",
    "StagingLoader",
    "Submission",
    "TableRefused",
    "extracts",
    "submit",
]
