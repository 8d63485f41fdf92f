"""Alembic environment for leadflow, driven by `schemas.migrate` (there is no alembic.ini).

It never configures logging: leadflow's processes own that. The whole upgrade runs in one
transaction (PostgreSQL DDL is transactional) under an advisory lock, so several replicas
starting at once migrate the database exactly once and the others find it at head.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from schemas.migrate import AUTOGENERATE_OPTS, normalise_url
from schemas.tables import Base

# An arbitrary constant that identifies "leadflow schema migration" among advisory locks.
_MIGRATION_LOCK_KEY = 7_260_411_352_109_001

config = context.config
url = normalise_url(config.attributes.get("url") or config.get_main_option("sqlalchemy.url", ""))


def run_migrations_offline() -> None:
    context.configure(
        url=url,
        target_metadata=Base.metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        **AUTOGENERATE_OPTS,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as connection:
            context.configure(
                connection=connection, target_metadata=Base.metadata, **AUTOGENERATE_OPTS
            )
            with context.begin_transaction():
                connection.execute(
                    text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK_KEY}
                )
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
