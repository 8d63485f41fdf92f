"""Staging loaders wake on submission: a NOTIFY from the manifest itself.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-24

Extracts are registered with `leadflow staging submit` or by a plain SQL INSERT into
`staging.extracts`; a statement trigger on the manifest sends `NOTIFY leadflow_staging` either
way, so a loader starts at once instead of at its next poll. The function lives in `public`,
where the data team's role cannot create or replace functions (it may create in `staging`).
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_NOTIFY = """
CREATE FUNCTION public.leadflow_extract_submitted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('leadflow_staging', '');
    RETURN NULL;
END
$$
"""
_TRIGGER = """
CREATE TRIGGER extracts_submitted AFTER INSERT ON staging.extracts
FOR EACH STATEMENT EXECUTE FUNCTION public.leadflow_extract_submitted()
"""


def upgrade() -> None:
    op.execute(_NOTIFY)
    op.execute(_TRIGGER)


def downgrade() -> None:
    op.execute("DROP TRIGGER extracts_submitted ON staging.extracts")
    op.execute("DROP FUNCTION public.leadflow_extract_submitted()")
