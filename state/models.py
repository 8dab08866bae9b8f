"""The state store's tables: cursors, links, seen marks, runs, dead letters, leases."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Column, DateTime, UniqueConstraint
from sqlmodel import Field, SQLModel


def _ts(**kw: Any) -> Any:
    return Field(sa_column=Column(DateTime(timezone=True), **kw))


class CursorRow(SQLModel, table=True):
    """Where a pipeline's stream has read up to: the pair (modified time, record id)."""

    __tablename__ = "cursors"
    pipeline: str = Field(primary_key=True)
    stream: str = Field(primary_key=True)
    modified_at: datetime = _ts(nullable=False)
    record_id: str
    updated_at: datetime = _ts(nullable=False)
    # The system's clock when the last read that went to its end began: everything changed
    # before it (less the overlap) has been read, even if the cursor's record is older.
    read_from: datetime | None = _ts(nullable=True)


class LinkRow(SQLModel, table=True):
    """Deal ↔ project. The unique row is also the claim taken before creating a project."""

    __tablename__ = "links"
    __table_args__ = (UniqueConstraint("pipeline", "deal_id", name="uq_links_pipeline_deal"),)
    id: int | None = Field(default=None, primary_key=True)
    pipeline: str = Field(index=True)
    deal_id: str
    state: str = "pending"  # pending | created | unwon
    project_id: str | None = Field(default=None, index=True)
    project_name: str | None = None
    project_url: str | None = None
    deal_status: str = "won"
    # Fingerprints of what we last wrote, per field: write only on difference (no echo).
    forward_prints: dict = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    back_prints: dict = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    # The project's milestones as last read: id -> [name, completed, completed_at, due_on].
    milestones: dict = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    next_due_on: str | None = Field(default=None, index=True)  # earliest open milestone due
    created_at: datetime = _ts(nullable=False)
    updated_at: datetime = _ts(nullable=False)


class SeenRow(SQLModel, table=True):
    """Records read inside the overlap window, so a re-read of the window skips them."""

    __tablename__ = "seen"
    pipeline: str = Field(primary_key=True)
    stream: str = Field(primary_key=True)
    record_id: str = Field(primary_key=True)
    modified_at: datetime = _ts(nullable=False)


class RunRow(SQLModel, table=True):
    __tablename__ = "runs"
    id: int | None = Field(default=None, primary_key=True)
    pipeline: str = Field(index=True)
    kind: str = "sync"  # sync | backfill | dlq-retry
    owner: str = ""
    status: str = "running"  # running | ok | partial | failed | interrupted
    started_at: datetime = _ts(nullable=False)
    finished_at: datetime | None = _ts(nullable=True)
    created: int = 0
    updated: int = 0
    unchanged: int = 0
    skipped: int = 0
    dead_lettered: int = 0
    api_calls: dict = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    message: str | None = None


class DeadLetterRow(SQLModel, table=True):
    """A record that could not be applied: parked with why, retried later or by hand."""

    __tablename__ = "dead_letters"
    __table_args__ = (
        UniqueConstraint("pipeline", "stream", "record_id", name="uq_dead_letters_record"),
    )
    id: int | None = Field(default=None, primary_key=True)
    pipeline: str = Field(index=True)
    stream: str
    record_id: str
    step: str  # map | create | update | write | adopt
    error_kind: str
    message: str
    attempts: int = 1
    first_failed_at: datetime = _ts(nullable=False)
    last_failed_at: datetime = _ts(nullable=False)
    next_retry_at: datetime | None = _ts(nullable=True)


class LeaseRow(SQLModel, table=True):
    """Who runs a pipeline now; expires unless renewed, so a dead holder is replaced."""

    __tablename__ = "leases"
    pipeline: str = Field(primary_key=True)
    owner: str
    expires_at: datetime = _ts(nullable=False)


class BackfillSliceRow(SQLModel, table=True):
    """One record range (modified-time slice) of a backfill split across replicas. A worker
    claims it under a lease; a dead worker's slice is taken over once the lease expires."""

    __tablename__ = "backfill_slices"
    backfill_id: int = Field(primary_key=True, sa_column_kwargs={"autoincrement": False})
    slice_index: int = Field(primary_key=True, sa_column_kwargs={"autoincrement": False})
    pipeline: str = Field(index=True)
    since: datetime = _ts(nullable=False)
    until: datetime | None = _ts(nullable=True)  # None: open-ended, up to the time it runs
    expected: int = 0  # won deals the planning scan counted in the range
    state: str = "pending"  # pending | running | done | failed
    owner: str | None = None
    lease_expires_at: datetime | None = _ts(nullable=True)
    attempts: int = 0
    counts: dict = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    error: str | None = None
    created_at: datetime = _ts(nullable=False)
    started_at: datetime | None = _ts(nullable=True)
    finished_at: datetime | None = _ts(nullable=True)
