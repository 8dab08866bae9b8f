"""Cursors remember where the last complete read began (the system's clock), so a quiet
pipeline's next read starts an overlap before that instead of re-reading its own last writes.

Matches CursorRow in state/models.py (tests/state/test_migrations.py compares).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Nullable, no default: an existing cursor reads as it always did until its next run.
    with op.batch_alter_table("cursors") as batch:
        batch.add_column(sa.Column("read_from", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("cursors") as batch:
        batch.drop_column("read_from")
