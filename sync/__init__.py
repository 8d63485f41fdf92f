"""Scheduled stock-data pollers (APScheduler) and staging-table loaders; both feed the shared
intake chain in `ingest`."""
