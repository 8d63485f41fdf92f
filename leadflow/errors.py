"""Errors the CLI shows as one paragraph instead of a traceback: the message is for a person."""

from __future__ import annotations


class LeadflowError(Exception):
    """An expected failure whose message says what is wrong and what to do."""


class ServiceUnavailable(LeadflowError, RuntimeError):
    """A server leadflow needs does not answer."""


class StartupError(LeadflowError):
    """leadflow cannot start here as configured (e.g. its web port is taken)."""


class RoleFailed(LeadflowError):
    """A role of `leadflow run` stopped by itself; its traceback is in the log, masked."""
