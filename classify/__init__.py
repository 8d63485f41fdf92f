"""Business-line and customer-segment classification: pure, batch-oriented stages with no I/O."""
