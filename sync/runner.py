"""Run pipelines: build connectors, hold the pipeline's lease, record the run, map outcomes to
exit codes (0 applied, 1 parked, 2 config, 3 unreachable/auth)."""

from __future__ import annotations

import gc
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import partial
from typing import Any

import structlog

from connectors.base import CRM, Connector, DealStamp, ProjectTool
from connectors.errors import ConnectorError, ErrorKind
from connectors.registry import build_connector
from connectors.secrets import redact
from connectors.shared_budget import shared_budgets
from state.store import StateStore
from sync.back import STREAM as BACK_STREAM
from sync.back import BackSync
from sync.config import LoadedConfig, PipelineConfig, parse_duration
from sync.forward import STREAM as FORWARD_STREAM
from sync.forward import Counts, ForwardSync, PlannedAction, StopRun

log = structlog.get_logger("handoff.runner")

EXIT_OK, EXIT_PARKED, EXIT_CONFIG, EXIT_UNREACHABLE = 0, 1, 2, 3
# During a forward run, the back flow makes a settled pass this often (`_BackPasses`).
BACK_PASS_SECONDS = 60.0


class Interrupted(Exception):
    """The daemon is stopping: the page in hand is committed, the run ends here."""


def new_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


@dataclass
class PipelineResult:
    name: str
    status: str  # ok | partial | failed | skipped
    counts: Counts = field(default_factory=Counts)
    api_calls: dict[str, int] = field(default_factory=dict)
    error: str | None = None
    error_kind: str | None = None
    duration_s: float = 0.0
    plan: list[PlannedAction] = field(default_factory=list)
    dry_run: bool = False
    back: Counts = field(default_factory=Counts)

    def as_dict(self) -> dict[str, Any]:
        c = self.counts
        return {
            "name": self.name,
            "status": self.status,
            "dry_run": self.dry_run,
            "created": c.created,
            "adopted": c.adopted,
            "updated": c.updated,
            "unchanged": c.unchanged,
            "skipped": c.skipped,
            "unwon": c.unwon,
            "dead_lettered": c.dead_lettered,
            "read": c.read,
            "progress_written": self.back.updated,
            "milestones_read": self.back.read,
            "api_calls": self.api_calls,
            "api_calls_total": sum(self.api_calls.values()),
            "duration_s": round(self.duration_s, 3),
            "error": self.error,
        }


class Connections:
    """One connector per configured connection, shared by every pipeline in this process
    (so each connection has one rate budget; `rate_budget.shared` shares it between
    processes too)."""

    def __init__(
        self, loaded: LoadedConfig, factory: Callable[[str, Any], Connector] | None = None
    ) -> None:
        self.loaded = loaded
        self.factory = factory or partial(
            build_connector, budgets=shared_budgets(loaded.shared_budget)
        )
        self._built: dict[str, Connector] = {}

    def get(self, name: str) -> Connector:
        if name not in self._built:
            self._built[name] = self.factory(name, self.loaded.config.connections[name])
        return self._built[name]

    def calls(self) -> dict[str, int]:
        return {name: c.api_calls for name, c in self._built.items()}

    def close(self) -> None:
        for c in self._built.values():
            c.close()


def _holder_is_dead(owner: str) -> bool:
    """True when the lease holder was a process on this host that no longer exists."""
    host, _, rest = owner.partition(":")
    pid_text = rest.partition(":")[0]
    if host != socket.gethostname() or not pid_text.isdigit():
        return False  # another machine: only the lease expiry can tell
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _take_over_dead(store: StateStore, pipeline: str, owner: str, ttl: Any) -> bool:
    holder = store.lease(pipeline)
    if holder is None or not _holder_is_dead(holder.owner):
        return False
    log.warning("lease.taken_over", pipeline=pipeline, dead_holder=holder.owner)
    return store.take_over_lease(pipeline, holder.owner, owner, ttl)


class _LeaseKeeper:
    """Renews the pipeline's lease every ttl/3 in the background, so a slow page (rate
    limits, long backoff) cannot outlive the lease; the next page boundary stops the run if a
    renewal found the lease lost (taken over after expiry)."""

    def __init__(self, store: StateStore, pipeline: str, owner: str, ttl: Any) -> None:
        self.store, self.pipeline, self.owner, self.ttl = store, pipeline, owner, ttl
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease:{pipeline}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(max(self.ttl.total_seconds() / 3, 0.2)):
            try:
                if not self.store.renew_lease(self.pipeline, self.owner, self.ttl):
                    self.lost = True
                    return
            except Exception as exc:  # the database is unreachable: expiry decides
                log.warning("lease.renew_failed", pipeline=self.pipeline, error=redact(str(exc)))

    def renew(self) -> bool:
        """At a page boundary: still ours?"""
        if self.lost:
            return False
        self.lost = not self.store.renew_lease(self.pipeline, self.owner, self.ttl)
        return not self.lost

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def backfill_stream(since: datetime | None, until: datetime | None) -> str:
    def day(d: datetime | None) -> str:
        return d.isoformat() if d else "-"

    return f"backfill:{day(since)}:{day(until)}"


class _Limited:
    """The CRM, reading at most `limit` deals (in cursor order) per run."""

    def __init__(self, crm: CRM, limit: int) -> None:
        self._crm, self._left = crm, max(0, limit)
        self._cut = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._crm, name)

    @property
    def read_clock(self) -> datetime | None:
        # A read cut short by the limit has not seen everything changed since it began.
        return None if self._cut else self._crm.read_clock

    def read_changed_deals(self, *args: Any, **kwargs: Any) -> Any:
        self._cut = True
        if self._left <= 0:
            return
        for page in self._crm.read_changed_deals(*args, **kwargs):
            page = page[: self._left]
            self._left -= len(page)
            if page:
                yield page
            if self._left <= 0:
                return
        self._cut = False


class _BackPasses:
    """Settled back-flow passes on a thread of their own while the forward flow runs.

    A long forward run (a first sync, a catch-up) then brings progress back as it goes, and
    the tool's change feed is read a minute at a time beside the creates instead of all at
    the end, where it would wait on the tool's search limit with nothing else to do. A pass
    reads only changes older than the overlap, and older than the page the forward flow has
    in hand: a milestone of a project whose link is not yet committed would look foreign."""

    def __init__(self, back: BackSync, forward: ForwardSync, every: float) -> None:
        self.back, self.forward, self.every = back, forward, every
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="back-passes", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            # The clock first: a page begun after it makes only changes after it.
            now = self.back.tool.server_now()
            started = self.forward.page_started
            if now is None:
                continue  # no answer from the tool yet
            in_hand = timedelta(seconds=0 if started is None else time.monotonic() - started)
            counts, began = self.back.counts, time.monotonic()
            read, written = counts.read, counts.updated
            try:
                self.back.run(settled_before=now - max(self.back.overlap, in_hand))
            except BaseException as exc:  # the forward flow stops on it at its next page
                self.error = exc
                return
            log.info(
                "back.settled_pass",
                pipeline=self.back.pipeline,
                milestones_read=counts.read - read,
                progress_written=counts.updated - written,
                seconds=round(time.monotonic() - began, 2),
            )

    def check(self) -> None:
        """Raise what ended the passes (a lost lease, an unreachable system, a stop)."""
        if self.error is not None:
            raise self.error

    def finish(self) -> None:
        self._stop.set()
        self._thread.join()


def _plan_lookups(forward: ForwardSync, crm: CRM, tool: ProjectTool) -> None:
    """A real run that may find projects already made (a backfill, a first run) looks for
    each deal's stamped project before creating it. The plan makes the same read-only lookups
    (never the adopt-by-name fallback, which writes a stamp), so they are counted among the
    plan's reads and a project that already exists is planned as adopted, not created."""
    for action in forward.plan:
        if action.action != "create":
            continue
        try:
            ref = tool.find_project(DealStamp(crm.kind, action.deal_id), None)
        except ConnectorError as exc:
            raise StopRun(exc) from exc
        if ref is not None:
            action.action, action.calls = "adopt", {}
            action.detail = f"{action.detail} (stamped project {ref.id} exists)"
            forward.counts.created -= 1
            forward.counts.adopted += 1


def exit_code(results: list[PipelineResult]) -> int:
    if any(r.error_kind in (ErrorKind.AUTH, ErrorKind.UNREACHABLE) for r in results):
        return EXIT_UNREACHABLE
    if any(r.status == "failed" for r in results):
        return EXIT_UNREACHABLE
    if any(r.counts.dead_lettered for r in results):
        return EXIT_PARKED
    return EXIT_OK


_heap_settled = False


def settle_heap() -> None:
    """Once per process, before the first run: move everything alive now (modules, config,
    clients) out of the collector's sight. Otherwise every full collection during a backfill
    walks those objects again (measured: ~12% of the engine's CPU per deal)."""
    global _heap_settled
    if not _heap_settled:
        _heap_settled = True
        gc.collect()
        gc.freeze()


def run_pipeline(
    loaded: LoadedConfig,
    pipeline: PipelineConfig,
    store: StateStore,
    connections: Connections,
    *,
    dry_run: bool = False,
    owner: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    kind: str = "sync",
    on_progress: Callable[[int], None] | None = None,
    retry: dict[str, list[str]] | None = None,
    should_stop: Callable[[], bool] | None = None,
    limit: int | None = None,
    checkpoint: str | None = None,
    keep_alive: Callable[[], bool] | None = None,
) -> PipelineResult:
    """One run of one pipeline. `kind` is sync, backfill or dlq-retry (`retry` names the
    parked records per stream to replay). `limit` reads at most that many deals; the cursor
    (or backfill checkpoint) stops after the last one, so the next run continues there.

    A backfill slice (see `sync.backfill_plan`) names its own `checkpoint` stream and holds
    its leases itself: with `keep_alive` no pipeline lease is taken here, and at each page
    boundary `keep_alive()` says whether the caller's leases are still held."""
    settle_heap()
    owner = owner or new_owner()
    plog = log.bind(pipeline=pipeline.name)
    started = time.monotonic()
    ttl = parse_duration(pipeline.options.lease_ttl)
    before = connections.calls()
    result = PipelineResult(pipeline.name, "ok", dry_run=dry_run)

    if not dry_run and keep_alive is None:
        if not store.acquire_lease(pipeline.name, owner, ttl) and not _take_over_dead(
            store, pipeline.name, owner, ttl
        ):
            holder = store.lease(pipeline.name)
            plog.info(
                "run.skipped",
                reason="another run holds the lease",
                holder=holder.owner if holder else None,
            )
            result.status = "skipped"
            result.error = "another run of this pipeline is in progress"
            return result
        store.mark_abandoned_runs(pipeline.name)
    keeper: _LeaseKeeper | None = None
    if not dry_run and keep_alive is None:
        keeper = _LeaseKeeper(store, pipeline.name, owner, ttl)
    run_id = None if dry_run else store.start_run(pipeline.name, kind, owner)
    plog.info("run.started", kind=kind, dry_run=dry_run)
    try:
        crm = connections.get(pipeline.source)
        tool = connections.get(pipeline.target)
        assert isinstance(crm, CRM) and isinstance(tool, ProjectTool)

        def heartbeat() -> None:
            # Called after each committed page: the place to stop cleanly on SIGTERM.
            if should_stop and should_stop():
                raise Interrupted()
            if (keeper is not None and not keeper.renew()) or (
                keep_alive is not None and not keep_alive()
            ):
                raise StopRun(
                    ConnectorError("state", ErrorKind.UNREACHABLE, "lost the pipeline lease")
                )

        fmap = loaded.mappings[pipeline.name]
        overlap = parse_duration(pipeline.options.overlap)
        do_forward = pipeline.direction in ("forward", "both")
        do_back = pipeline.direction in ("back", "both") and kind != "backfill"
        passes: _BackPasses | None = None

        def between_pages() -> None:
            heartbeat()
            if passes is not None:
                passes.check()

        forward = ForwardSync(
            pipeline=pipeline.name,
            crm=_Limited(crm, limit) if limit is not None else crm,
            tool=tool,
            field_map=fmap,
            store=store,
            overlap=overlap,
            start_from=pipeline.options.start_from,
            dry_run=dry_run,
            on_progress=on_progress,
            on_page=between_pages,
            parallel_creates=pipeline.options.parallel_creates,
        )
        back = BackSync(
            pipeline=pipeline.name,
            crm=crm,
            tool=tool,
            field_map=fmap,
            store=store,
            overlap=overlap,
            batch_size=crm.write_batch_size,
            dry_run=dry_run,
            on_page=heartbeat,
        )
        if kind == "backfill":
            # Its own checkpoint, so the incremental cursor is untouched and an interrupted
            # backfill resumes where it stopped.
            forward.adopt_first = True
            forward.stream = checkpoint or backfill_stream(since, until)
            checkpoint = store.get_cursor(pipeline.name, forward.stream)
            if checkpoint is not None:
                since = checkpoint.modified_at
        try:
            if retry is None and not dry_run and kind == "sync":
                # Transient failures parked earlier are retried once their backoff is due.
                retry = {}
                for dl in store.dead_letters(pipeline.name, due_only=True):
                    retry.setdefault(dl.stream, []).append(dl.record_id)
            if retry:
                plog.info("dlq.retrying", records=sum(len(v) for v in retry.values()))
                if retry.get(FORWARD_STREAM):
                    forward.retry(retry[FORWARD_STREAM])
                if retry.get(BACK_STREAM):
                    back.retry(retry[BACK_STREAM])
            if kind != "dlq-retry":
                if do_forward:
                    if do_back and not dry_run:
                        passes = _BackPasses(back, forward, BACK_PASS_SECONDS)
                    try:
                        forward.run(since=since, until=until)
                    finally:
                        if passes is not None:
                            passes.finish()
                    if passes is not None:
                        passes.check()
                    if dry_run and forward.adopt_first:
                        _plan_lookups(forward, crm, tool)
                if do_back:
                    back.run()
        finally:
            result.counts.add(forward.counts)
            result.plan += forward.plan
            result.back = back.counts
            result.counts.dead_lettered += back.counts.dead_lettered
        result.status = "partial" if result.counts.dead_lettered else "ok"
    except Interrupted:
        result.status = "interrupted"
        result.error = "stopped at a page boundary on request; the next run resumes"
        plog.warning("run.interrupted")
    except StopRun as exc:
        result.status = "failed"
        result.error = redact(str(exc.error))
        result.error_kind = exc.error.kind
        if exc.error.kind is ErrorKind.TRANSIENT:
            result.error_kind = ErrorKind.UNREACHABLE
        plog.error("run.failed", error=result.error, error_kind=str(result.error_kind))
    finally:
        after = connections.calls()
        result.api_calls = {
            name: after.get(name, 0) - before.get(name, 0)
            for name in (pipeline.source, pipeline.target)
        }
        result.duration_s = time.monotonic() - started
        if run_id is not None:
            c = result.counts
            store.finish_run(
                run_id,
                result.status if result.status != "ok" else "ok",
                {
                    "created": c.created + c.adopted,
                    "updated": c.updated,
                    "unchanged": c.unchanged,
                    "skipped": c.skipped,
                    "dead_lettered": c.dead_lettered,
                    "api_calls": result.api_calls,
                    "message": result.error,
                },
            )
        if keeper is not None:
            keeper.stop()
            if not keeper.lost:
                store.release_lease(pipeline.name, owner)
    plog.info("run.finished", **{k: v for k, v in result.as_dict().items() if k != "name"})
    return result
