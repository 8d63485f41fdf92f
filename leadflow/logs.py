"""Structured logging: one configuration for every process role (console or JSON lines)."""

from __future__ import annotations

import logging
import sys

import structlog

from leadflow.privacy import mask_log_event

#: Chatty client libraries: their connection retries are reported by our own checks.
_QUIET = {
    "aiokafka": logging.CRITICAL,
    "kafka": logging.CRITICAL,
    "alembic": logging.WARNING,
    # faust-streaming and its service framework narrate every start, rebalance and stop.
    "faust": logging.WARNING,
    # Its only warning, "producer buffer full", is faust's normal backpressure on a burst of
    # table changes (more than 100 waiting): it flushes and goes on.
    "faust.transport.producer": logging.ERROR,
    "mode": logging.WARNING,
    # APScheduler logs every job's start and end; the pollers log their runs themselves.
    "apscheduler": logging.WARNING,
}


def configure(level: str = "INFO", fmt: str = "console") -> None:
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        # Tracebacks as plain text in the event, before the masking: an exception's message
        # (a unique violation's DETAIL, say) and the source lines shown can hold a phone. In
        # JSON this is also what puts the traceback in the line at all.
        structlog.processors.format_exc_info,
        # Last, so nothing added after it escapes: phones and e-mails never reach a log line.
        mask_log_event,
    ]
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name, quiet in _QUIET.items():
        logging.getLogger(name).setLevel(max(quiet, logging.getLevelName(level)))


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    return structlog.stdlib.get_logger(name)
