"""Stream analytics' per-minute windows, as the analytics role flushes them.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-24

`leadflow run analytics` (faust-streaming) keeps tumbling one-minute windows over `leads.raw`,
`leads.dlq` and `leads.assigned` in faust tables, one key per source partition (so a key's counts
live in exactly one changelog partition), and upserts them here every few seconds; the ops views
read them beside the database's own figures. `value` is a count, or for speed to lead a histogram
of bucket -> count. Rows older than the analytics retention are deleted by the role.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "stream_minutes",
        sa.Column("minute", sa.DateTime(timezone=True), nullable=False),
        sa.Column("metric", sa.Text(), nullable=False),
        sa.Column("key", sa.Text(), nullable=False),
        sa.Column("partition", sa.Integer(), nullable=False),
        sa.Column("value", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint(
            "minute", "metric", "key", "partition", name=op.f("pk_stream_minutes")
        ),
    )


def downgrade() -> None:
    op.drop_table("stream_minutes")
