"""Initial schema: cursors, links, seen marks, runs, dead letters, leases.

Matches state/models.py as of the first release (tests/state/test_migrations.py compares).

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _ts(name: str, nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "cursors",
        sa.Column("pipeline", sa.String(), nullable=False),
        sa.Column("stream", sa.String(), nullable=False),
        _ts("modified_at"),
        sa.Column("record_id", sa.String(), nullable=False),
        _ts("updated_at"),
        sa.PrimaryKeyConstraint("pipeline", "stream"),
    )
    op.create_table(
        "links",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("pipeline", sa.String(), nullable=False),
        sa.Column("deal_id", sa.String(), nullable=False),
        sa.Column("state", sa.String(), nullable=False),
        sa.Column("project_id", sa.String(), nullable=True),
        sa.Column("project_name", sa.String(), nullable=True),
        sa.Column("project_url", sa.String(), nullable=True),
        sa.Column("deal_status", sa.String(), nullable=False),
        sa.Column("forward_prints", sa.JSON(), nullable=False),
        sa.Column("back_prints", sa.JSON(), nullable=False),
        sa.Column("milestones", sa.JSON(), nullable=False),
        sa.Column("next_due_on", sa.String(), nullable=True),
        _ts("created_at"),
        _ts("updated_at"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("pipeline", "deal_id", name="uq_links_pipeline_deal"),
    )
    op.create_index("ix_links_pipeline", "links", ["pipeline"])
    op.create_index("ix_links_project_id", "links", ["project_id"])
    op.create_index("ix_links_next_due_on", "links", ["next_due_on"])
    op.create_table(
        "seen",
        sa.Column("pipeline", sa.String(), nullable=False),
        sa.Column("stream", sa.String(), nullable=False),
        sa.Column("record_id", sa.String(), nullable=False),
        _ts("modified_at"),
        sa.PrimaryKeyConstraint("pipeline", "stream", "record_id"),
    )
    op.create_table(
        "runs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("pipeline", sa.String(), nullable=False),
        sa.Column("kind", sa.String(), nullable=False),
        sa.Column("owner", sa.String(), nullable=False),
        sa.Column("status", sa.String(), nullable=False),
        _ts("started_at"),
        _ts("finished_at", nullable=True),
        sa.Column("created", sa.Integer(), nullable=False),
        sa.Column("updated", sa.Integer(), nullable=False),
        sa.Column("unchanged", sa.Integer(), nullable=False),
        sa.Column("skipped", sa.Integer(), nullable=False),
        sa.Column("dead_lettered", sa.Integer(), nullable=False),
        sa.Column("api_calls", sa.JSON(), nullable=False),
        sa.Column("message", sa.String(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_runs_pipeline", "runs", ["pipeline"])
    op.create_table(
        "dead_letters",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("pipeline", sa.String(), nullable=False),
        sa.Column("stream", sa.String(), nullable=False),
        sa.Column("record_id", sa.String(), nullable=False),
        sa.Column("step", sa.String(), nullable=False),
        sa.Column("error_kind", sa.String(), nullable=False),
        sa.Column("message", sa.String(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        _ts("first_failed_at"),
        _ts("last_failed_at"),
        _ts("next_retry_at", nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("pipeline", "stream", "record_id", name="uq_dead_letters_record"),
    )
    op.create_index("ix_dead_letters_pipeline", "dead_letters", ["pipeline"])
    op.create_table(
        "leases",
        sa.Column("pipeline", sa.String(), nullable=False),
        sa.Column("owner", sa.String(), nullable=False),
        _ts("expires_at"),
        sa.PrimaryKeyConstraint("pipeline"),
    )


def downgrade() -> None:
    op.drop_table("leases")
    op.drop_index("ix_dead_letters_pipeline", table_name="dead_letters")
    op.drop_table("dead_letters")
    op.drop_index("ix_runs_pipeline", table_name="runs")
    op.drop_table("runs")
    op.drop_table("seen")
    op.drop_index("ix_links_next_due_on", table_name="links")
    op.drop_index("ix_links_project_id", table_name="links")
    op.drop_index("ix_links_pipeline", table_name="links")
    op.drop_table("links")
    op.drop_table("cursors")
