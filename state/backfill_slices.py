"""Backfill plans split into slices (record ranges) that any replica claims one at a time.

A slice is claimed with one compare-and-set (pending, or running with an expired lease →
running, ours), renewed between pages, and finished only by the owner that holds it, so two
workers never run one slice and a dead worker's slice is taken over once its lease expires.
On PostgreSQL every lease decision uses the database's clock (as `StateStore` leases do).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Engine, and_, delete, exists, func, or_, select, update
from sqlalchemy.exc import IntegrityError

from state.models import BackfillSliceRow, CursorRow, LeaseRow, RunRow, SeenRow
from state.store import as_utc, utcnow

PENDING, RUNNING, DONE, FAILED = "pending", "running", "done", "failed"
# A slice whose workers keep dying (taken over this many times) is failed rather than handed
# to the next replica forever; `handoff backfill --join ID --retry-failed` tries it again.
MAX_ATTEMPTS = 5

_T = BackfillSliceRow.__table__  # type: ignore[attr-defined]


@dataclass
class BackfillSlice:
    backfill_id: int
    index: int
    pipeline: str
    since: datetime
    until: datetime | None
    expected: int
    state: str
    owner: str | None
    lease_expires_at: datetime | None
    attempts: int
    counts: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None

    @property
    def holder(self) -> str:
        """The pipeline-lease owner every worker of this backfill shares."""
        return backfill_holder(self.backfill_id)


@dataclass
class PlanSummary:
    """One backfill plan at a glance: slices by state and what they did so far."""

    backfill_id: int
    pipeline: str
    since: datetime
    until: datetime | None
    slices: int
    states: dict[str, int]
    expected: int
    counts: dict[str, int]

    @property
    def finished(self) -> bool:
        return not (self.states.get(PENDING) or self.states.get(RUNNING))


def backfill_holder(backfill_id: int) -> str:
    return f"backfill:{backfill_id}"


def slice_stream(backfill_id: int, index: int) -> str:
    """The checkpoint stream of one slice: a taken-over slice resumes at the last page its
    previous owner committed, and the pipeline's incremental cursor is never touched."""
    return f"backfill:{backfill_id}:{index}"


def _slice(row: Any) -> BackfillSlice:
    return BackfillSlice(
        backfill_id=row.backfill_id,
        index=row.slice_index,
        pipeline=row.pipeline,
        since=as_utc(row.since),  # type: ignore[arg-type]
        until=as_utc(row.until),
        expected=row.expected,
        state=row.state,
        owner=row.owner,
        lease_expires_at=as_utc(row.lease_expires_at),
        attempts=row.attempts,
        counts=dict(row.counts or {}),
        error=row.error,
        started_at=as_utc(row.started_at),
        finished_at=as_utc(row.finished_at),
    )


class BackfillSlices:
    """The `backfill_slices` table: plan, claim, renew, finish, report."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._pg = engine.dialect.name == "postgresql"

    def _now(self, conn: Connection) -> datetime:
        if self._pg:
            return as_utc(conn.execute(select(func.now())).scalar_one())  # type: ignore[return-value]
        return utcnow()

    # -- planning ----------------------------------------------------------------------------
    def create_plan(
        self, pipeline: str, ranges: list[tuple[datetime, datetime | None, int]]
    ) -> int:
        """Store a plan of (since, until, expected won deals) ranges; returns its id."""
        if not ranges:
            raise ValueError("a backfill plan needs at least one range")
        for _ in range(20):
            with self.engine.begin() as conn:
                now = self._now(conn)
                next_id = conn.execute(
                    select(func.coalesce(func.max(_T.c.backfill_id), 0) + 1)
                ).scalar_one()
                rows = [
                    {
                        "backfill_id": next_id,
                        "slice_index": i,
                        "pipeline": pipeline,
                        "since": since,
                        "until": until,
                        "expected": expected,
                        "state": PENDING,
                        "attempts": 0,
                        "counts": {},
                        "created_at": now,
                    }
                    for i, (since, until, expected) in enumerate(ranges)
                ]
                try:
                    conn.execute(_T.insert(), rows)
                except IntegrityError:
                    # Two plans made at once took the same id: the loser takes the next one.
                    conn.rollback()
                    continue
                return int(next_id)
        raise RuntimeError("could not allocate a backfill id")  # pragma: no cover

    # -- claiming ----------------------------------------------------------------------------
    def claim(
        self,
        owner: str,
        ttl: timedelta,
        *,
        pipeline: str,
        backfill_id: int | None = None,
    ) -> BackfillSlice | None:
        """Take one pending (or lease-expired) slice of `pipeline`, oldest plan and lowest
        index first; None when there is none. Never the same slice for two owners."""
        for _ in range(50):
            with self.engine.begin() as conn:
                now = self._now(conn)
                claimable = or_(
                    _T.c.state == PENDING,
                    and_(_T.c.state == RUNNING, _T.c.lease_expires_at < now),
                )
                q = select(_T.c.backfill_id, _T.c.slice_index, _T.c.owner, _T.c.attempts).where(
                    _T.c.pipeline == pipeline, claimable
                )
                if backfill_id is not None:
                    q = q.where(_T.c.backfill_id == backfill_id)
                # SKIP LOCKED: concurrent claimers on PostgreSQL pass over each other's rows
                # instead of queueing on them. SQLite ignores it and serialises writers.
                q = q.order_by(_T.c.backfill_id, _T.c.slice_index).limit(1)
                candidate = conn.execute(q.with_for_update(skip_locked=True)).first()
                if candidate is None:
                    return None
                key = and_(
                    _T.c.backfill_id == candidate.backfill_id,
                    _T.c.slice_index == candidate.slice_index,
                )
                if candidate.owner and candidate.attempts >= MAX_ATTEMPTS:
                    conn.execute(
                        update(_T)
                        .where(key, claimable)
                        .values(
                            state=FAILED,
                            owner=None,
                            lease_expires_at=None,
                            finished_at=now,
                            error=f"abandoned by {candidate.attempts} workers in a row "
                            "(each died or lost its lease); see their logs",
                        )
                    )
                    continue
                # The compare-and-set: only if the row is still claimable right now.
                row = conn.execute(
                    update(_T)
                    .where(key, claimable)
                    .values(
                        state=RUNNING,
                        owner=owner,
                        lease_expires_at=now + ttl,
                        attempts=_T.c.attempts + 1,
                        started_at=now,
                        error=None,
                    )
                    .returning(*_T.c)
                ).first()
                if row is None:
                    continue  # taken between our read and our write: look again
                if candidate.owner:
                    # Taken over from a dead (or stalled) worker: its run will never finish.
                    conn.execute(
                        update(RunRow.__table__)  # type: ignore[attr-defined]
                        .where(
                            RunRow.__table__.c.owner == candidate.owner,  # type: ignore[attr-defined]
                            RunRow.__table__.c.pipeline == pipeline,  # type: ignore[attr-defined]
                            RunRow.__table__.c.kind == "backfill",  # type: ignore[attr-defined]
                            RunRow.__table__.c.status == "running",  # type: ignore[attr-defined]
                        )
                        .values(status="interrupted", finished_at=now)
                    )
                return _slice(row)
        return None  # pragma: no cover - only under pathological contention

    def _owned(self, s: BackfillSlice, owner: str) -> Any:
        return and_(
            _T.c.backfill_id == s.backfill_id,
            _T.c.slice_index == s.index,
            _T.c.owner == owner,
            _T.c.state == RUNNING,
        )

    def renew(self, s: BackfillSlice, owner: str, ttl: timedelta) -> bool:
        """Extend our lease on the slice; False when it was taken over (we lost it)."""
        with self.engine.begin() as conn:
            now = self._now(conn)
            res = conn.execute(
                update(_T).where(self._owned(s, owner)).values(lease_expires_at=now + ttl)
            )
            return bool(res.rowcount)

    def finish(self, s: BackfillSlice, owner: str, counts: dict[str, Any]) -> bool:
        """Mark the slice done with its counts, if it is still ours; and forget its
        checkpoint (the done state is the record now)."""
        stream = slice_stream(s.backfill_id, s.index)
        with self.engine.begin() as conn:
            now = self._now(conn)
            res = conn.execute(
                update(_T)
                .where(self._owned(s, owner))
                .values(
                    state=DONE, counts=counts, lease_expires_at=None, finished_at=now, error=None
                )
            )
            if not res.rowcount:
                return False
            conn.execute(
                delete(CursorRow.__table__).where(  # type: ignore[attr-defined]
                    CursorRow.__table__.c.pipeline == s.pipeline,  # type: ignore[attr-defined]
                    CursorRow.__table__.c.stream == stream,  # type: ignore[attr-defined]
                )
            )
            conn.execute(
                delete(SeenRow.__table__).where(  # type: ignore[attr-defined]
                    SeenRow.__table__.c.pipeline == s.pipeline,  # type: ignore[attr-defined]
                    SeenRow.__table__.c.stream == stream,  # type: ignore[attr-defined]
                )
            )
            return True

    def fail(self, s: BackfillSlice, owner: str, error: str, counts: dict[str, Any]) -> bool:
        """Mark the slice failed (its checkpoint stays, so a retry resumes), if still ours."""
        with self.engine.begin() as conn:
            now = self._now(conn)
            res = conn.execute(
                update(_T)
                .where(self._owned(s, owner))
                .values(
                    state=FAILED,
                    error=error,
                    counts=counts,
                    lease_expires_at=None,
                    finished_at=now,
                )
            )
            return bool(res.rowcount)

    def release(self, s: BackfillSlice, owner: str, *, count_attempt: bool = True) -> bool:
        """Hand the slice back (stopping, or the pipeline is busy): pending again at once."""
        values: dict[str, Any] = {"state": PENDING, "owner": None, "lease_expires_at": None}
        if not count_attempt:
            values["attempts"] = _T.c.attempts - 1
        with self.engine.begin() as conn:
            res = conn.execute(update(_T).where(self._owned(s, owner)).values(**values))
            return bool(res.rowcount)

    def retry_failed(self, backfill_id: int) -> int:
        """Failed slices become pending again (after the cause was fixed); returns how many."""
        with self.engine.begin() as conn:
            res = conn.execute(
                update(_T)
                .where(_T.c.backfill_id == backfill_id, _T.c.state == FAILED)
                .values(state=PENDING, owner=None, lease_expires_at=None, attempts=0)
            )
            return int(res.rowcount)

    # -- the pipeline lease the whole backfill shares ----------------------------------------
    def release_pipeline_lease_if_idle(self, pipeline: str, backfill_id: int) -> bool:
        """Drop the backfill's shared pipeline lease once no slice is pending or running.

        One statement, so a worker that claims a slice concurrently either is seen here (the
        lease stays) or acquires the lease again after this delete, before it does any work.
        """
        leases = LeaseRow.__table__  # type: ignore[attr-defined]
        active = exists().where(_T.c.backfill_id == backfill_id, _T.c.state.in_([PENDING, RUNNING]))
        with self.engine.begin() as conn:
            res = conn.execute(
                delete(leases).where(
                    leases.c.pipeline == pipeline,
                    leases.c.owner == backfill_holder(backfill_id),
                    ~active,
                )
            )
            return bool(res.rowcount)

    # -- reading -----------------------------------------------------------------------------
    def slices(self, backfill_id: int) -> list[BackfillSlice]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(_T).where(_T.c.backfill_id == backfill_id).order_by(_T.c.slice_index)
            ).all()
        return [_slice(r) for r in rows]

    def unfinished(self, pipeline: str) -> bool:
        """Whether a backfill of the pipeline has slices pending or running."""
        with self.engine.connect() as conn:
            q = select(_T.c.backfill_id).where(
                _T.c.pipeline == pipeline, _T.c.state.in_([PENDING, RUNNING])
            )
            return conn.execute(q.limit(1)).first() is not None

    def summaries(self, pipelines: list[str] | None = None) -> list[PlanSummary]:
        """Every plan (of these pipelines), newest first."""
        q = select(_T)
        if pipelines is not None:
            q = q.where(_T.c.pipeline.in_(pipelines))
        with self.engine.connect() as conn:
            rows = conn.execute(q.order_by(_T.c.backfill_id.desc(), _T.c.slice_index)).all()
        plans: dict[int, PlanSummary] = {}
        for r in rows:
            s = _slice(r)
            p = plans.get(s.backfill_id)
            if p is None:
                p = plans[s.backfill_id] = PlanSummary(
                    s.backfill_id, s.pipeline, s.since, s.until, 0, {}, 0, {}
                )
            p.slices += 1
            p.since = min(p.since, s.since)
            if s.until is None or (p.until is not None and s.until > p.until):
                p.until = s.until
            p.states[s.state] = p.states.get(s.state, 0) + 1
            p.expected += s.expected
            for k, v in s.counts.items():
                if isinstance(v, int):
                    p.counts[k] = p.counts.get(k, 0) + v
        return list(plans.values())
