"""Backfill slices: a backfill planned as record ranges that any replica can claim.

Matches BackfillSliceRow in state/models.py (tests/state/test_migrations.py compares).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _ts(name: str, nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "backfill_slices",
        sa.Column("backfill_id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("slice_index", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("pipeline", sa.String(), nullable=False),
        _ts("since"),
        _ts("until", nullable=True),
        sa.Column("expected", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(), nullable=False),
        sa.Column("owner", sa.String(), nullable=True),
        _ts("lease_expires_at", nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("counts", sa.JSON(), nullable=False),
        sa.Column("error", sa.String(), nullable=True),
        _ts("created_at"),
        _ts("started_at", nullable=True),
        _ts("finished_at", nullable=True),
        sa.PrimaryKeyConstraint("backfill_id", "slice_index"),
    )
    op.create_index("ix_backfill_slices_pipeline", "backfill_slices", ["pipeline"])


def downgrade() -> None:
    op.drop_index("ix_backfill_slices_pipeline", table_name="backfill_slices")
    op.drop_table("backfill_slices")
