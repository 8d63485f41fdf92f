"""Stock-data pollers (CONTRACT.md §6): sources in other databases, read on a schedule.

`schedule` reads a source's schedule, `watermark` pages through a source with ties at page
boundaries neither lost nor stored twice, `rows` maps rows to events, `failures` decides
backoff and error texts (all pure); `poller` is one run of one source, `scheduler` the role that
runs every source's job on one replica at a time.
"""

from sync.pollers.poller import (
    LOCK_CLASS,
    DriverMissing,
    Poller,
    PollerConfig,
    RunResult,
    SourceSpec,
    WatermarkMoved,
    load_watermark,
    lock_source,
    reset_watermark,
)
from sync.pollers.schedule import Schedule, ScheduleError, parse_schedule
from sync.pollers.scheduler import SCHEDULER_LOCK_KEY, SchedulerConfig, SchedulerService
from sync.pollers.watermark import PagingError, Watermark

__all__ = [
    "LOCK_CLASS",
    "SCHEDULER_LOCK_KEY",
    "DriverMissing",
    "PagingError",
    "Poller",
    "PollerConfig",
    "RunResult",
    "Schedule",
    "ScheduleError",
    "SchedulerConfig",
    "SchedulerService",
    "SourceSpec",
    "Watermark",
    "WatermarkMoved",
    "load_watermark",
    "lock_source",
    "parse_schedule",
    "reset_watermark",
]
