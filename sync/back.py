"""The back flow: milestone progress in linked projects is written onto the deals.

Reads cost what changed: the project tool streams milestone changes since the cursor, each
link keeps a snapshot of its project's milestones, and progress is computed from it. Writes
are batched across pages (one vendor batch call per 100/200 deals) and only fields whose
fingerprint changed are written, so a write-back never echoes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

import structlog

from connectors.base import CRM, Cursor, DealUpdate, Milestone, ProjectTool
from connectors.errors import ConnectorError, ErrorKind
from mappings.field_map import CompiledFieldMap, evaluate, render_text
from state.store import BACK_LINK_COLUMNS, Link, PageCommit, Parked, StateStore
from sync.forward import Counts, StopRun, fingerprint, read_start

STREAM = "milestones"
HOLD_BATCHES = 100  # up to 10,000 HubSpot or 20,000 Salesforce deals held in memory


@dataclass
class Progress:
    done: int
    total: int
    percent: float
    status: str  # not_started | in_progress | at_risk | delivered
    last_milestone: str | None
    last_milestone_date: date | None
    next_milestone: str | None
    next_due: date | None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def compute_progress(snapshot: dict[str, list], today: date) -> Progress:
    """Progress from a snapshot {id: [name, completed, completed_at iso|None, due iso|None]}."""
    total = len(snapshot)
    done_items = [v for v in snapshot.values() if v[1]]
    open_items = sorted(
        (v for v in snapshot.values() if not v[1]), key=lambda v: (v[3] is None, v[3] or "")
    )
    last = max(done_items, key=lambda v: v[2] or "", default=None)
    nxt = open_items[0] if open_items else None
    next_due = date.fromisoformat(nxt[3]) if nxt and nxt[3] else None
    if total and len(done_items) == total:
        status = "delivered"
    elif any(v[3] and date.fromisoformat(v[3]) < today for v in open_items):
        status = "at_risk"
    elif done_items:
        status = "in_progress"
    else:
        status = "not_started"
    return Progress(
        done=len(done_items),
        total=total,
        percent=round(100 * len(done_items) / total, 1) if total else 0.0,
        status=status,
        last_milestone=last[0] if last else None,
        last_milestone_date=datetime.fromisoformat(last[2]).date() if last and last[2] else None,
        next_milestone=nxt[0] if nxt else None,
        next_due=next_due,
    )


def _snap(m: Milestone) -> list:
    return [
        m.name,
        m.completed,
        m.completed_at.isoformat() if m.completed_at else None,
        m.due_on.isoformat() if m.due_on else None,
    ]


@dataclass
class _Pending:
    link: Link
    fields: dict[str, Any]
    prints: dict[str, str]
    timeline: list[str]


@dataclass
class BackSync:
    pipeline: str
    crm: CRM
    tool: ProjectTool
    field_map: CompiledFieldMap
    store: StateStore
    overlap: timedelta
    batch_size: int = 100
    dry_run: bool = False
    on_page: Callable[[], None] | None = None
    log: Any = field(default_factory=lambda: structlog.get_logger("handoff.back"))
    counts: Counts = field(default_factory=Counts)

    def __post_init__(self) -> None:
        self.log = self.log.bind(pipeline=self.pipeline, flow="back")
        self._today = datetime.now(UTC).date()
        self._pending: dict[str, _Pending] = {}  # deal id -> what to write
        self._commit = PageCommit(self.pipeline, STREAM, link_columns=BACK_LINK_COLUMNS)

    def run(self, settled_before: datetime | None = None) -> Counts:
        """Read the milestone changes since the cursor and write the progress they make.

        `settled_before` (at least an overlap before now on the tool's clock): a pass beside
        a long forward run (see `sync.runner`), reading only the changes made before then.
        Nothing it reads needs reading again, so passes spread the reading (and the
        write-back) over the run at no extra cost, and the run's last pass reads only the
        overlap and what changed since."""
        if not self.field_map.spec.progress:
            return self.counts
        cursor, read_from = self.store.read_position(self.pipeline, STREAM)
        since = read_start(cursor, read_from) - self.overlap if cursor else None
        high = cursor
        project_ids = [
            lk.project_id for lk in self.store.iter_links(self.pipeline) if lk.project_id
        ]
        try:
            for page in self.tool.read_milestone_changes(since, project_ids, settled_before):
                high = self._apply_page(page, high)
                # Hold many vendor batches: a deal whose milestones arrive far apart
                # in the change stream is then written once, not once per change.
                if len(self._pending) >= self.batch_size * HOLD_BATCHES:
                    self._flush(high)
                if self.on_page:
                    self.on_page()
            if settled_before is None:
                # Projects whose next milestone fell overdue since we last looked: at risk.
                for link in self.store.links_due_before(self.pipeline, self._today.isoformat()):
                    self._recompute(self._current(link), set())
            self._flush(high)
        except ConnectorError as exc:
            raise StopRun(exc) from exc
        # The next read begins an overlap before this: for a settled pass, where it stopped.
        clock = self.tool.read_clock if settled_before is None else settled_before + self.overlap
        if not self.dry_run and clock is not None:
            self.store.advance_read_from(self.pipeline, STREAM, clock)
        return self.counts

    def retry(self, deal_ids: list[str]) -> Counts:
        """Recompute and write progress for parked deals from their snapshots."""
        links = self.store.links_for(self.pipeline, deal_ids)
        self._commit.resolved += deal_ids  # unless parked again below
        try:
            for deal_id in deal_ids:
                link = links.get(deal_id)
                if link is not None and link.state == "created":
                    self._recompute(link, set())
            self._flush(None)
        except ConnectorError as exc:
            raise StopRun(exc) from exc
        return self.counts

    def _current(self, link: Link) -> Link:
        held = self._pending.get(link.deal_id)
        return held.link if held else link

    def _apply_page(self, page: list[Milestone], high: Cursor | None) -> Cursor | None:
        by_project: dict[str, list[Milestone]] = {}
        for m in page:
            by_project.setdefault(m.project_id, []).append(m)
            c = Cursor(m.modified_at, m.id)
            if high is None or c > high:
                high = c
        links = self.store.links_by_project(self.pipeline, by_project)
        for project_id, changes in by_project.items():
            link = links.get(project_id)
            if link is None or link.state != "created":
                continue  # not ours, or the deal is no longer won
            link = self._current(link)
            completed_now = set()
            for m in changes:
                self.counts.read += 1
                before = link.milestones.get(m.id)
                if m.completed and not (before and before[1]):
                    completed_now.add(m.name)
                link.milestones[m.id] = _snap(m)
            self._recompute(link, completed_now)
        return high

    def _recompute(self, link: Link, completed_now: set[str]) -> None:
        progress = compute_progress(link.milestones, self._today)
        open_due = progress.next_due if progress.status != "delivered" else None
        link.next_due_on = open_due.isoformat() if open_due else None
        context = {
            "progress": progress.as_dict(),
            "deal": {"id": link.deal_id},
            "today": self._today,
            "now": datetime.now(UTC),
        }
        fields: dict[str, Any] = {}
        prints: dict[str, str] = {}
        errors = []
        for deal_field, rule in self.field_map.spec.progress.items():
            value, err = evaluate(
                self.field_map, f"progress.{deal_field}", rule, context, context["progress"]
            )
            if err:
                errors.append(str(err))
                continue
            fp = fingerprint(value)
            if link.back_prints.get(deal_field) != fp:
                fields[deal_field] = value
                prints[deal_field] = fp
        if errors:
            self._park(link.deal_id, "map", ErrorKind.RECORD, "; ".join(errors))
            return
        timeline = []
        tl = self.field_map.spec.timeline
        if tl is not None:
            for name in sorted(completed_now):
                ctx = {**context, "progress": {**progress.as_dict(), "last_milestone": name}}
                timeline.append(render_text(self.field_map, tl.text, ctx))
        held = self._pending.get(link.deal_id)
        if held:
            held.fields.update(fields)
            held.prints.update(prints)
            held.timeline += timeline
        elif fields or timeline:
            self._pending[link.deal_id] = _Pending(link, fields, prints, timeline)
        else:
            # Snapshot changed, nothing to write: record the snapshot with the next flush.
            self._commit.link_updates.append(link)
            self.counts.unchanged += 1

    def _flush(self, high: Cursor | None) -> None:
        """Write the held updates in vendor batches, then commit links and cursor together."""
        pending, self._pending = self._pending, {}
        updates = [DealUpdate(d, p.fields) for d, p in pending.items() if p.fields]
        if self.dry_run:
            self.counts.updated += len(updates)
            return
        outcomes = {o.record_id: o for o in self.crm.write_deal_fields(updates)} if updates else {}
        for deal_id, p in pending.items():
            outcome = outcomes.get(deal_id)
            if outcome is not None and not outcome.ok:
                # Keep the snapshot (the cursor moves past these changes) but not the
                # fingerprints: a retry of the parked record recomputes and writes again.
                self._park(deal_id, "write", ErrorKind.RECORD, outcome.error or "refused")
                self._commit.link_updates.append(p.link)
                continue
            try:
                for text in p.timeline:
                    self.crm.add_timeline_entry(deal_id, text)
            except ConnectorError as exc:
                if exc.kind in (ErrorKind.AUTH, ErrorKind.UNREACHABLE):
                    raise
                self._park(deal_id, "timeline", exc.kind, str(exc))
            p.link.back_prints = {**p.link.back_prints, **p.prints}
            self._commit.link_updates.append(p.link)
            self._commit.resolved.append(deal_id)
            if p.fields:
                self.counts.updated += 1
                self.log.info("deal.progress_written", deal_id=deal_id, fields=sorted(p.fields))
        self._commit.cursor = high
        self.store.commit_page(self._commit)
        self._commit = PageCommit(self.pipeline, STREAM, link_columns=BACK_LINK_COLUMNS)

    def _park(self, deal_id: str, step: str, kind: ErrorKind, message: str) -> None:
        self.counts.dead_lettered += 1
        self._commit.parked.append(Parked(STREAM, deal_id, step, str(kind), message))
        self.log.warning("record.parked", deal_id=deal_id, step=step, reason=message)
