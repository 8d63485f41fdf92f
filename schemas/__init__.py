"""Contracts of leadflow: event models (pydantic), the database schema (SQLAlchemy + Alembic)
and the shared vocabularies. This package imports nothing else of leadflow."""
