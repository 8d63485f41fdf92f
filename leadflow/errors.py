"""Errors the CLI shows as one paragraph instead of a traceback."""

from __future__ import annotations


class ServiceUnavailable(RuntimeError):
    """A server leadflow needs does not answer; the message is meant for a person."""
