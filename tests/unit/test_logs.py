"""What the log configuration lets through from client libraries."""

from __future__ import annotations

import logging

from leadflow import logs


def test_faust_backpressure_is_not_a_warning_but_its_errors_are_logged() -> None:
    logs.configure("INFO", "console")
    producer = logging.getLogger("faust.transport.producer")
    assert not producer.isEnabledFor(logging.WARNING)  # "producer buffer full": backpressure
    assert producer.isEnabledFor(logging.ERROR)
    assert logging.getLogger("faust.app.base").isEnabledFor(logging.WARNING)
    assert not logging.getLogger("faust.app.base").isEnabledFor(logging.INFO)
