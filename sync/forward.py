"""The forward flow: won deals become projects, exactly once, and kept-in-sync fields follow.

Per deal: map (pure) → claim the deal in the state store → create the stamped project →
record the link. A pending claim (a crash, a concurrent run) is resolved by finding the
stamped project and adopting it before creating anything. The cursor moves once per page,
in the same transaction as that page's links, seen marks and dead letters.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

import structlog

from connectors.base import CRM, Cursor, Deal, DealStamp, DealStatus, ProjectSpec, ProjectTool
from connectors.errors import ConnectorError, ErrorKind
from mappings.field_map import CompiledFieldMap, ForwardResult, deal_context, map_deal, render_text
from state.store import FORWARD_LINK_COLUMNS, Link, PageCommit, Parked, StateStore
from sync.failpoints import failpoint

STREAM = "deals"
PARTIAL = "__partial__"  # fingerprint key marking a project whose create was cut short


# Built once: json.dumps with non-default options builds a new encoder on every call.
_FINGERPRINT_JSON = json.JSONEncoder(sort_keys=True, default=str)


def read_start(cursor: Cursor, read_from: datetime | None) -> datetime:
    """Where an incremental read begins, before the overlap: the cursor's record, or the
    start of the last read that went to its end (`StateStore.read_position`) if that is
    later. Without the second, a pipeline with nothing new re-reads the changes of its last
    overlap on every run (often its own write-back) until something newer moves the cursor."""
    return max(cursor.modified_at, read_from) if read_from else cursor.modified_at


_RECENT_PRINTS: dict[str, str] = {}  # fingerprint text -> digest, bounded
_json_str = json.encoder.encode_basestring_ascii


def fingerprint(value: Any) -> str:
    # Stored fingerprints are compared with new ones: the text hashed must never change.
    text = _fingerprint_text(value)
    digest = _RECENT_PRINTS.get(text)
    if digest is None:
        digest = hashlib.blake2b(text.encode(), digest_size=8).hexdigest()
        if len(text) <= 64:  # short values repeat (a tier, a status); long ones rarely do
            if len(_RECENT_PRINTS) >= 4096:
                _RECENT_PRINTS.clear()
            _RECENT_PRINTS[text] = digest
    return digest


def _fingerprint_text(value: Any) -> str:
    """`_FINGERPRINT_JSON.encode(value)`, the same text, without the encoder's set-up for the
    values a field map yields (exact types only: subclasses, containers and anything else
    go through the encoder)."""
    kind = type(value)
    if kind is str:
        return _json_str(value)  # as JSONEncoder.encode does for a str
    if kind is int:
        return int.__repr__(value)
    if kind is float:
        # As the C encoder writes a float (allow_nan): repr, or JavaScript's names.
        if value != value:
            return "NaN"
        if value == math.inf:
            return "Infinity"
        if value == -math.inf:
            return "-Infinity"
        return float.__repr__(value)
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if kind is date or kind is datetime:
        return _json_str(str(value))  # not JSON: `default=str`, then encoded as a str
    return _FINGERPRINT_JSON.encode(value)


@dataclass
class Counts:
    created: int = 0
    adopted: int = 0
    updated: int = 0
    unchanged: int = 0
    skipped: int = 0
    unwon: int = 0
    dead_lettered: int = 0
    read: int = 0

    def add(self, other: Counts) -> None:
        for k in self.__dataclass_fields__:
            setattr(self, k, getattr(self, k) + getattr(other, k))


@dataclass
class PlannedAction:
    """One line of a dry-run plan."""

    deal_id: str
    action: str  # create | adopt-or-create | update | unchanged | skip | unwon | park
    detail: str = ""
    calls: dict[str, int] = field(default_factory=dict)


def _logs_debug(log: Any) -> bool:
    """Whether `log.debug` writes anything. structlog's filtering loggers tell; below their
    level a debug line is a call that does nothing, but its arguments cost a backfill a
    few percent, so the engine's per-project debug lines are skipped there."""
    is_enabled_for = getattr(log, "is_enabled_for", None)
    return True if is_enabled_for is None else bool(is_enabled_for(logging.DEBUG))


class _DealLog:
    """`log.bind(deal_id=...)` for the few deals that log anything, paid only by those."""

    __slots__ = ("_log", "_deal_id")

    def __init__(self, log: Any, deal_id: str) -> None:
        self._log, self._deal_id = log, deal_id

    def debug(self, event: str, **kw: Any) -> None:
        self._log.debug(event, deal_id=self._deal_id, **kw)

    def info(self, event: str, **kw: Any) -> None:
        self._log.info(event, deal_id=self._deal_id, **kw)

    def warning(self, event: str, **kw: Any) -> None:
        self._log.warning(event, deal_id=self._deal_id, **kw)


@dataclass
class _Create:
    """A create deferred to the page's parallel phase, and its outcome."""

    deal: Deal
    link: Link
    result: ForwardResult
    stamp: DealStamp
    log: Any
    ref: Any = None
    error: ConnectorError | None = None


class StopRun(Exception):
    """A failure that ends the pipeline run (auth, unreachable): nothing more can succeed."""

    def __init__(self, error: ConnectorError) -> None:
        super().__init__(str(error))
        self.error = error


@dataclass
class ForwardSync:
    pipeline: str
    crm: CRM
    tool: ProjectTool
    field_map: CompiledFieldMap
    store: StateStore
    overlap: timedelta
    start_from: date | None = None
    dry_run: bool = False
    on_progress: Callable[[int], None] | None = None
    on_page: Callable[[], None] | None = None  # lease renewal hook
    log: Any = field(default_factory=lambda: structlog.get_logger("handoff.forward"))
    counts: Counts = field(default_factory=Counts)
    plan: list[PlannedAction] = field(default_factory=list)
    stream: str = STREAM
    adopt_first: bool = False  # look for stamped projects before every create
    # Projects created at once within a page: a vendor call takes far longer than the rate
    # budget's spacing (Asana ~25 calls/s, 100-300 ms a call), so one at a time cannot use
    # the budget. The budget still paces every call; bookkeeping stays in page order.
    parallel_creates: int = 1
    # When the page in hand began (time.monotonic()), None between pages: its projects may
    # exist before their links are committed (read by the back flow's passes).
    page_started: float | None = None
    _creates: list[_Create] | None = None  # the page's deferred creates (None: create now)
    _pool: ThreadPoolExecutor | None = None
    _claimed_now: set[str] = field(default_factory=set)  # claims this page took
    _debug_logs: bool = True  # whether `log.debug` writes anything (see _logs_debug)
    # deal id -> project id, logged once per page: a line per project costs a backfill as
    # much CPU as the state writes (each is still a debug line, and in the links table).
    # record id -> version applied and committed this run, inside the overlap of the cursor
    _window: dict[str, datetime] = field(default_factory=dict)
    _page_log: dict[str, dict[str, str]] = field(
        default_factory=lambda: {"created": {}, "adopted": {}}
    )

    def __post_init__(self) -> None:
        self.log = self.log.bind(pipeline=self.pipeline)
        self._today = datetime.now(UTC).date()

    # -- the read loop ------------------------------------------------------------------------
    def run(self, since: datetime | None = None, until: datetime | None = None) -> Counts:
        """Read and apply every change since the cursor (or `since` for a backfill)."""
        cursor, read_from = self.store.read_position(self.pipeline, self.stream)
        incremental = since is None and until is None
        if since is None:
            if cursor is not None:
                since = read_start(cursor, read_from) - self.overlap
            elif self.start_from is not None:
                since = datetime(
                    self.start_from.year, self.start_from.month, self.start_from.day, tzinfo=UTC
                )
        if cursor is None:
            self.adopt_first = True
        high = cursor
        fields = self.field_map.deal_fields
        self._window = {}
        finished = False
        try:
            for page in self.crm.read_changed_deals(since, fields, until):
                high = self._apply_page(page, high)
                if self.on_page:
                    self.on_page()
            finished = True
        except ConnectorError as exc:
            raise StopRun(exc) from exc
        finally:
            self.close()
            if high is not None and not self.dry_run:
                if finished:
                    self._save_window(high)
                else:
                    with contextlib.suppress(Exception):  # the first failure is the one to tell
                        self._save_window(high)
        if incremental and not self.dry_run and self.crm.read_clock is not None:
            self.store.advance_read_from(self.pipeline, self.stream, self.crm.read_clock)
        return self.counts

    def _save_window(self, high: Any) -> None:
        """Seen marks for the committed versions the next run may read again (those inside
        the overlap of the cursor), written once at the end: marks are a saving, not a
        guarantee (a re-applied version changes nothing), so a crash that loses them only
        costs the next run a few re-applied records, and a backfill writes almost none."""
        oldest = high.modified_at - self.overlap
        keep = [(i, ts) for i, ts in self._window.items() if ts >= oldest]
        if keep:
            self.store.commit_page(PageCommit(self.pipeline, self.stream, seen=keep))
        self.store.prune_seen(self.pipeline, self.stream, oldest)

    def retry(self, deal_ids: list[str]) -> Counts:
        """Re-apply parked deals as they are now in the CRM; the cursor does not move."""
        try:
            deals = self.crm.get_deals(deal_ids, self.field_map.deal_fields)
        except ConnectorError as exc:
            raise StopRun(exc) from exc
        self.adopt_first = True  # a parked create may have reached the vendor
        links = self.store.links_for(self.pipeline, deal_ids)
        commit = self._page_commit()
        found = set()
        for deal in deals:
            found.add(deal.id)
            self.counts.read += 1
            self._apply(deal, links.get(deal.id), commit)
            commit.resolved.append(deal.id)
        for missing in set(deal_ids) - found:
            self.log.warning("record.vanished", deal_id=missing, reason="deal no longer exists")
            commit.resolved.append(missing)
        if not self.dry_run:
            self.store.commit_page(commit)
            self._log_linked()
        return self.counts

    def _apply_page(self, page: list[Deal], high: Any) -> Any:
        self.page_started = time.monotonic()
        try:
            return self._apply_page_in_hand(page, high)
        finally:
            self.page_started = None

    def _apply_page_in_hand(self, page: list[Deal], high: Any) -> Any:
        ids = [d.id for d in page]
        marks = self.store.seen_marks(self.pipeline, self.stream, ids)
        links = self.store.links_for(self.pipeline, ids)
        commit = self._page_commit()
        self._claimed_now = set()
        if not self.dry_run:
            # Claim every new won deal of the page in one statement, before any create: the
            # durable half of claim-and-stamp. Their links land with the page commit.
            wanted = [
                d.id
                for d in page
                if d.status is DealStatus.WON
                and d.id not in links
                and marks.get(d.id) != d.modified_at
            ]
            self._claimed_now = self.store.claim_many(self.pipeline, wanted)
            taken_elsewhere = [i for i in wanted if i not in self._claimed_now]
            links.update(self.store.links_for(self.pipeline, taken_elsewhere))
            for deal_id in self._claimed_now:
                links[deal_id] = Link(self.pipeline, deal_id, "pending", None)
        applied: list[tuple[str, datetime]] = []
        if self.parallel_creates > 1 and not self.dry_run:
            self._creates = []
        self._debug_logs = _logs_debug(self.log)
        # The newest (time, id) applied, compared as Cursor compares them, without making a
        # Cursor for every deal of a backfill.
        newest = None if high is None else (high.modified_at, high.record_id)
        newest_deal = None
        for deal in page:
            self.counts.read += 1
            if marks.get(deal.id) == deal.modified_at:
                continue  # this exact version was applied by an earlier read of the window
            self._apply(deal, links.get(deal.id), commit)
            applied.append((deal.id, deal.modified_at))
            if newest is None or (deal.modified_at, deal.id) > newest:
                newest, newest_deal = (deal.modified_at, deal.id), deal
        if newest_deal is not None:
            high = newest_deal.cursor
        if self._creates:
            self._run_creates(self._creates, commit)
        self._creates = None
        if self.on_progress:
            self.on_progress(len(page))
        if not self.dry_run:
            commit.cursor = high
            self.store.commit_page(commit)
            self._log_linked()
            if high is not None:
                # Only a version inside the overlap window can be read again (the next run
                # starts at cursor - overlap and the cursor never goes back).
                oldest = high.modified_at - self.overlap
                window = {i: ts for i, ts in self._window.items() if ts >= oldest}
                window.update((i, ts) for i, ts in applied if ts >= oldest)
                self._window = window
        return high

    # -- one deal -----------------------------------------------------------------------------
    def _apply(self, deal: Deal, link: Link | None, commit: PageCommit) -> None:
        log = _DealLog(self.log, deal.id)
        try:
            if deal.status is DealStatus.WON:
                self._apply_won(deal, link, commit, log)
            elif link is not None and link.state == "created":
                self._apply_unwon(deal, link, commit, log)
            else:
                self.counts.skipped += 1
                self._planned(deal.id, "skip", f"deal is {deal.status}")
        except ConnectorError as exc:
            self._failed(exc, deal.id, commit, log)

    def _failed(self, exc: ConnectorError, deal_id: str, commit: PageCommit, log: Any) -> None:
        made = getattr(exc, "project", None)
        if made is not None:
            # Created, then a later step failed: linked as partial by `_create`, counted here.
            self.counts.created += 1
            log.info("project.created", project_id=made.id, project=made.name, partial=True)
        if exc.kind in (ErrorKind.AUTH, ErrorKind.UNREACHABLE):
            raise StopRun(exc) from exc
        self._park(commit, deal_id, getattr(exc, "step", "apply"), exc.kind, str(exc), log)

    def _apply_won(self, deal: Deal, link: Link | None, commit: PageCommit, log: Any) -> None:
        result = map_deal(self.field_map, deal, self._today)
        if result.errors:
            if deal.id in self._claimed_now:
                commit.dropped_claims.append(deal.id)  # nothing will be created for it
            message = "; ".join(str(e) for e in result.errors)
            self._park(commit, deal.id, "map", ErrorKind.RECORD, message, log)
            return
        assert result.spec is not None
        stamp = DealStamp(self.crm.kind, deal.id)
        if link is None or link.state == "pending":
            self._create_or_adopt(deal, link, result, stamp, commit, log)
            return
        if link.state == "unwon":
            log.info("deal.won_again", project_id=link.project_id)
            link.state, link.deal_status = "created", str(deal.status)
            commit.link_updates.append(link)
        self._keep_in_sync(deal, link, result, commit, log)

    def _create_or_adopt(
        self,
        deal: Deal,
        link: Link | None,
        result: ForwardResult,
        stamp: DealStamp,
        commit: PageCommit,
        log: Any,
    ) -> None:
        spec = result.spec
        assert spec is not None
        if self.dry_run:
            if link is None:
                self.counts.created += 1
                self._planned(
                    deal.id, "create", spec.name, {self.tool.name: self.tool.create_cost(spec)}
                )
            else:
                self.counts.adopted += 1
                self._planned(deal.id, "adopt-or-create", spec.name, {self.tool.name: 1})
            return
        just_claimed = deal.id in self._claimed_now
        if link is None:  # a retry: nothing was claimed for the page
            just_claimed, link = self.store.claim(self.pipeline, deal.id)
            if not just_claimed and link.state != "pending":
                # Another run linked it between our read and our claim: nothing to create.
                self.counts.unchanged += 1
                return
        # Look for a stamped project before creating whenever one may exist: a pending claim
        # (a crash or a concurrent run) or a pipeline with no cursor (first run, lost state).
        ref = None
        if self.adopt_first or not just_claimed:
            name = spec.name if not just_claimed else None
            ref = self._with_step("adopt", lambda: self.tool.find_project(stamp, name))
        if ref is not None:
            self.counts.adopted += 1
            self._page_log["adopted"][deal.id] = ref.id
            if self._debug_logs:
                log.debug("project.adopted", project_id=ref.id)
        elif self._creates is not None:
            self._creates.append(_Create(deal, link, result, stamp, log))
            return
        else:
            ref = self._create(spec, stamp, deal)
            self._created(deal, ref, log)
        self._link(deal, link, result, ref, commit)

    def _created(self, deal: Deal, ref: Any, log: Any) -> None:
        self.counts.created += 1
        self._page_log["created"][deal.id] = ref.id
        if self._debug_logs:
            log.debug("project.created", project_id=ref.id, project=ref.name)

    def _run_creates(self, creates: list[_Create], commit: PageCommit) -> None:
        """The page's creates, `parallel_creates` at a time; then, in page order, each is
        linked or parked as it would have been one at a time. Only vendor calls run in the
        threads: counts, logs and the page commit stay on this one."""

        def create(c: _Create) -> None:
            try:
                assert c.result.spec is not None
                c.ref = self._create(c.result.spec, c.stamp, c.deal)
            except ConnectorError as exc:
                c.error = exc

        rest = creates
        if self._pool is None:
            # The run's first create alone: it fills the connector's lazy look-ups (templates,
            # custom fields), which concurrent first creates would each fetch again.
            create(creates[0])
            rest = creates[1:]
            self._pool = ThreadPoolExecutor(self.parallel_creates, "handoff-create")
        list(self._pool.map(create, rest))
        fatal: StopRun | None = None
        for c in creates:
            if c.error is None:
                self._created(c.deal, c.ref, c.log)
                self._link(c.deal, c.link, c.result, c.ref, commit)
                continue
            try:
                self._failed(c.error, c.deal.id, commit, c.log)
            except StopRun as stop:
                fatal = fatal or stop
        if fatal is not None:
            # The page is not committed: its created projects stay claimed and stamped, and
            # the next run adopts them.
            raise fatal

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def _link(
        self, deal: Deal, link: Link, result: ForwardResult, ref: Any, commit: PageCommit
    ) -> None:
        link.state, link.project_id = "created", ref.id
        link.project_name, link.project_url = ref.name, ref.url
        link.deal_status = str(deal.status)
        link.forward_prints = {k: fingerprint(v) for k, v in result.synced.items()}
        # With the page commit: a crash before it leaves a pending claim and a stamped
        # project, which the next run adopts.
        commit.link_updates.append(link)
        commit.resolved.append(deal.id)

    def _create(self, spec: ProjectSpec, stamp: DealStamp, deal: Deal) -> Any:
        """The vendor calls of one create (may run on a worker thread: no counts, no logs;
        the exception carries `project` when a project was made before a later step failed)."""
        try:
            ref = self.tool.create_project(spec, stamp)
            failpoint("after-create")  # the crash window the claim-and-stamp protocol closes
            return ref
        except ConnectorError as exc:
            exc.step = "create"  # type: ignore[attr-defined]
            made = getattr(exc, "project", None)
            if made is not None:
                # The project exists (maybe without its stamp); a later step failed. Link it,
                # marked partial so the retry stamps it and applies the whole spec, and park.
                self.store.save_link(
                    Link(
                        self.pipeline,
                        deal.id,
                        "created",
                        made.id,
                        made.name,
                        made.url,
                        str(deal.status),
                        forward_prints={PARTIAL: "1"},
                    )
                )
            elif exc.kind is ErrorKind.RECORD:
                # Refused outright: no project exists, so the claim may go.
                self.store.drop_claim(self.pipeline, deal.id)
            # Transient: the project may exist (committed, response lost). The claim stays
            # pending; the next attempt adopts by stamp before creating.
            raise

    def _with_step(self, step: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except ConnectorError as exc:
            exc.step = step  # type: ignore[attr-defined]
            raise

    def _keep_in_sync(
        self, deal: Deal, link: Link, result: ForwardResult, commit: PageCommit, log: Any
    ) -> None:
        if PARTIAL in link.forward_prints:
            self._complete_partial(deal, link, result, commit, log)
            return
        prints = {k: fingerprint(v) for k, v in result.synced.items()}
        changed = {
            k: v for k, v in result.synced.items() if link.forward_prints.get(k) != prints[k]
        }
        if not changed:
            self.counts.unchanged += 1
            self._planned(deal.id, "unchanged")
            return
        assert result.spec is not None
        partial = ProjectSpec(
            name=result.spec.name,
            fields={k.split(".", 1)[1]: v for k, v in changed.items() if k.startswith("fields.")},
            custom_fields={
                k.split(".", 1)[1]: v for k, v in changed.items() if k.startswith("custom_fields.")
            },
        )
        if self.dry_run:
            self.counts.updated += 1
            self._planned(
                deal.id,
                "update",
                ", ".join(sorted(changed)),
                {self.tool.name: self.tool.update_cost(partial)},
            )
            return
        assert link.project_id is not None
        self._with_step("update", lambda: self.tool.update_project(link.project_id, partial))
        link.forward_prints = {**link.forward_prints, **{k: prints[k] for k in changed}}
        commit.link_updates.append(link)
        commit.resolved.append(deal.id)
        self.counts.updated += 1
        log.info("project.updated", project_id=link.project_id, fields=sorted(changed))

    def _complete_partial(
        self, deal: Deal, link: Link, result: ForwardResult, commit: PageCommit, log: Any
    ) -> None:
        """A create that was cut short after the project existed: apply the whole spec."""
        assert result.spec is not None and link.project_id is not None
        if self.dry_run:
            self.counts.updated += 1
            self._planned(deal.id, "update", "finish an interrupted create")
            return
        stamp = DealStamp(self.crm.kind, deal.id)
        self._with_step("update", lambda: self.tool.ensure_stamp(link.project_id, stamp))
        self._with_step("update", lambda: self.tool.update_project(link.project_id, result.spec))
        link.forward_prints = {k: fingerprint(v) for k, v in result.synced.items()}
        commit.link_updates.append(link)
        self.counts.updated += 1
        log.info("project.completed", project_id=link.project_id)

    def _apply_unwon(self, deal: Deal, link: Link, commit: PageCommit, log: Any) -> None:
        """Never delete: mark the link, log it, run the mapping's optional action."""
        rule = self.field_map.spec.on_unwon
        self.counts.unwon += 1
        if self.dry_run:
            self._planned(deal.id, "unwon", f"{rule.action} project {link.project_id}")
            return
        assert link.project_id is not None
        if rule.action == "comment":
            text = render_text(self.field_map, rule.text, deal_context(deal))
            self._with_step("unwon", lambda: self.tool.comment_on_project(link.project_id, text))
        elif rule.action == "archive":
            self._with_step("unwon", lambda: self.tool.archive_project(link.project_id))
        link.state, link.deal_status = "unwon", str(deal.status)
        commit.link_updates.append(link)
        log.warning(
            "deal.unwon", project_id=link.project_id, status=str(deal.status), action=rule.action
        )

    # -- bookkeeping --------------------------------------------------------------------------
    def _log_linked(self) -> None:
        """One line per committed page: deal id -> project id, created and adopted."""
        made = {k: v for k, v in self._page_log.items() if v}
        if made:
            self.log.info("projects.linked", **made)
        self._page_log = {"created": {}, "adopted": {}}

    def _page_commit(self) -> PageCommit:
        return PageCommit(
            self.pipeline, self.stream, dlq_stream=STREAM, link_columns=FORWARD_LINK_COLUMNS
        )

    def _park(
        self, commit: PageCommit, record_id: str, step: str, kind: ErrorKind, message: str, log: Any
    ) -> None:
        self.counts.dead_lettered += 1
        self._planned(record_id, "park", message)
        if not self.dry_run:
            commit.parked.append(Parked(STREAM, record_id, step, str(kind), message))
        log.warning("record.parked", step=step, error_kind=str(kind), reason=message)

    def _planned(
        self, deal_id: str, action: str, detail: str = "", calls: dict[str, int] | None = None
    ) -> None:
        if self.dry_run:
            self.plan.append(PlannedAction(deal_id, action, detail, calls or {}))
