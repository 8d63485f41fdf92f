"""Programmatic Alembic: upgrade, downgrade and inspect the leadflow schema without alembic.ini.

The migration scripts ship inside this package (`schemas/migrations`), so an installed
leadflow can migrate any database it is pointed at. Nothing here touches logging
configuration; callers own their logging. URLs are SQLAlchemy or libpq-style PostgreSQL URLs
(`postgresql://`, `postgres://`, `postgresql+psycopg://`); all are driven through psycopg 3.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final

from alembic import command
from alembic.config import Config
from alembic.runtime.environment import NameFilterParentNames, NameFilterType
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError
from sqlalchemy import create_engine
from sqlalchemy.engine import URL, make_url
from sqlalchemy.pool import NullPool

from schemas.tables import STAGING_SCHEMA, Base

MIGRATIONS_DIR: Final = Path(__file__).resolve().parent / "migrations"

_POSTGRES_DRIVERS: Final = frozenset(
    {"postgres", "postgresql", "postgresql+psycopg", "postgresql+psycopg2", "postgresql+asyncpg"}
)


def normalise_url(url: str | URL) -> URL:
    """The URL with the psycopg 3 driver; raises ValueError for anything but PostgreSQL."""
    parsed = make_url(url)
    if parsed.drivername not in _POSTGRES_DRIVERS:
        raise ValueError(f"not a PostgreSQL URL: {parsed.drivername}://...")
    return parsed.set(drivername="postgresql+psycopg")


def config(url: str) -> Config:
    """An Alembic config for leadflow's migrations against `url`.

    env.py takes the URL from `config.attributes["url"]` (a URL object, so a password with
    `%` in it survives: the ini-style main options would interpolate it).
    """
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("file_template", "%%(rev)s_%%(slug)s")
    cfg.attributes["url"] = normalise_url(url)
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    command.upgrade(config(url), revision)


def downgrade(url: str, revision: str) -> None:
    command.downgrade(config(url), revision)


def current(url: str) -> str | None:
    """The revision the database is at; None for a database leadflow never migrated."""
    engine = create_engine(normalise_url(url), poolclass=NullPool)
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()


def head() -> str:
    """The newest revision this code ships."""
    revision = ScriptDirectory(str(MIGRATIONS_DIR)).get_current_head()
    if revision is None:
        raise RuntimeError(f"no migrations found in {MIGRATIONS_DIR}")
    return revision


def known(revision: str) -> bool:
    """Whether this code ships `revision` (False for one a newer release added)."""
    try:
        return ScriptDirectory(str(MIGRATIONS_DIR)).get_revision(revision) is not None
    except CommandError:
        return False


def revision(url: str, message: str, *, rev_id: str | None = None) -> Path:
    """Autogenerate a new migration from the models against the database at `url` (which must
    be at head) and return its path; for developers, who then review and edit it."""
    script = command.revision(config(url), message=message, autogenerate=True, rev_id=rev_id)
    if script is None or isinstance(script, list):
        raise RuntimeError("alembic did not produce exactly one revision")
    return Path(script.path)


def include_name(
    name: str | None, type_: NameFilterType, parent_names: NameFilterParentNames
) -> bool:
    """Autogenerate filter: leadflow owns the default schema and only its own tables in
    `staging`, where the data team's tables live too and must never be touched."""
    if type_ == "schema":
        return name in (None, STAGING_SCHEMA)
    if type_ == "table" and parent_names.get("schema_name") == STAGING_SCHEMA:
        return f"{STAGING_SCHEMA}.{name}" in Base.metadata.tables
    return True


#: Options for `MigrationContext.configure(connection, opts=...)` when comparing the models
#: with a live database (env.py uses the same ones).
AUTOGENERATE_OPTS: Final[dict[str, Any]] = {
    "include_schemas": True,
    "include_name": include_name,
    "compare_type": True,
    "compare_server_default": True,
}
