"""Backfills split across replicas: plan a window into record ranges, then work the plan.

`plan_backfill` reads the window once, keys only, and cuts it into slices holding about the
same number of won deals (the work: each costs project creates; the read itself is cheap).
`work_backfill` claims one slice at a time and runs the forward flow over its range under
the slice's lease, from `handoff backfill --slices/--join` or any `handoff run` daemon.

Every worker of one backfill holds the pipeline's lease under one shared name, so the
slices run side by side while the pipeline's incremental sync (and any other backfill of it)
waits, as it waits for a single-process backfill: a deal is only ever worked by one flow.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog

from connectors.base import CRM, DealStatus
from connectors.secrets import redact
from state.backfill_slices import (
    FAILED,
    PENDING,
    RUNNING,
    BackfillSlice,
    BackfillSlices,
    slice_stream,
)
from state.store import StateStore
from sync.config import LoadedConfig, PipelineConfig, parse_duration
from sync.runner import (
    EXIT_OK,
    EXIT_PARKED,
    EXIT_UNREACHABLE,
    Connections,
    PipelineResult,
    run_pipeline,
)

log = structlog.get_logger("handoff.backfill")

MAX_SLICES = 256
# The upper bound of a slice is the next slice's start minus this: the vendors compare
# modified times inclusively at both ends (HubSpot in ms, Salesforce in whole seconds), and
# slice starts fall on whole seconds, so consecutive slices neither overlap nor leave a gap.
_TICK = timedelta(microseconds=1)


class _SortedSample:
    """Every `step`-th value of an ascending stream in bounded memory: when the sample is
    full every other value goes and the step doubles, so a quantile is off by < `step`
    values however long the stream (the engine streams; planning must too)."""

    def __init__(self, capacity: int = 4096) -> None:
        self.capacity, self.step, self.count = capacity, 1, 0
        self.values: list[float] = []

    def add(self, value: float) -> None:
        if self.count % self.step == 0:
            self.values.append(value)
            if len(self.values) >= self.capacity:
                self.values = self.values[::2]
                self.step *= 2
        self.count += 1


def balanced_ranges(
    stamps: Sequence[float],
    step: int,
    total: int,
    slices: int,
    since: datetime,
    until: datetime | None,
) -> list[tuple[datetime, datetime | None, int]]:
    """(since, until, expected) ranges of about `total / slices` deals each, cut at whole
    seconds between the sampled modified times `stamps` (one per `step` deals). Deals that
    share one second cannot be split by time: fewer slices come back when many do."""
    values = sorted(stamps)
    cuts: list[float] = []
    lower = since.timestamp()
    for k in range(1, slices):
        if not values:
            break
        at = values[min(len(values) - 1, round(k * len(values) / slices))]
        cut = float(int(at))  # floor to the second (modified times are positive)
        within = until is None or cut <= until.timestamp()
        if within and cut > lower and (not cuts or cut > cuts[-1]):
            cuts.append(cut)
    starts = [since] + [datetime.fromtimestamp(c, UTC) for c in cuts]
    ends: list[datetime | None] = [s - _TICK for s in starts[1:]] + [until]
    edges = [0] + [bisect.bisect_left(values, c) for c in cuts] + [len(values)]
    expected = [(hi - lo) * step for lo, hi in zip(edges, edges[1:], strict=False)]
    # The sample's rounding lands on the last slice.
    expected[-1] = max(0, total - sum(expected[:-1]))
    ranges = list(zip(starts, ends, expected, strict=True))
    return ranges


@dataclass
class PlannedBackfill:
    backfill_id: int
    slices: list[BackfillSlice]
    won: int  # won deals the scan counted in the window
    read: int  # deals the scan read
    api_calls: dict[str, int]


def plan_backfill(
    loaded: LoadedConfig,
    pipeline: PipelineConfig,
    store: StateStore,
    connections: Connections,
    *,
    since: datetime,
    until: datetime | None,
    slices: int,
) -> PlannedBackfill:
    """Scan the window (keys only), cut it into `slices` ranges of about equal won deals,
    and store the plan; returns it, with what the scan cost.

    Why a scan: the CRM interface has no count, and equal time slices are lopsided in real
    data (recent months hold most changes; a `--since` years back leaves all deals in the
    last slice). The scan costs one read page per 100 (HubSpot) or 2,000 (Salesforce) deals,
    a small share of a backfill that creates a project per won deal.
    """
    if not 1 <= slices <= MAX_SLICES:
        raise ValueError(f"--slices must be between 1 and {MAX_SLICES}")
    crm = connections.get(pipeline.source)
    assert isinstance(crm, CRM)
    before = crm.api_calls
    sample = _SortedSample()
    read = 0
    for page in crm.read_changed_deals(since, [], until):
        read += len(page)
        for deal in page:
            if deal.status is DealStatus.WON:
                sample.add(deal.modified_at.timestamp())
    ranges = balanced_ranges(sample.values, sample.step, sample.count, slices, since, until)
    backfill_id = BackfillSlices(store.engine).create_plan(pipeline.name, ranges)
    planned = BackfillSlices(store.engine).slices(backfill_id)
    log.info(
        "backfill.planned",
        pipeline=pipeline.name,
        backfill_id=backfill_id,
        slices=len(planned),
        won=sample.count,
        read=read,
    )
    return PlannedBackfill(
        backfill_id, planned, sample.count, read, {pipeline.source: crm.api_calls - before}
    )


@dataclass
class SliceRun:
    """One slice this worker ran, and how it ended (done, failed, released, lost)."""

    slice: BackfillSlice
    result: PipelineResult
    outcome: str


class _SliceKeeper:
    """Renews the slice's lease and the backfill's shared pipeline lease every ttl/3 in the
    background (a rate-limited page can be slow); at a page boundary `alive()` says whether
    both are still ours, so a worker that lost either stops before its next page."""

    def __init__(
        self, slices: BackfillSlices, store: StateStore, s: BackfillSlice, owner: str, ttl: Any
    ) -> None:
        self.slices, self.store, self.s, self.owner, self.ttl = slices, store, s, owner, ttl
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"slice:{s.index}", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        if not self.slices.renew(self.s, self.owner, self.ttl):
            self.lost = self.lost or "slice"
        # acquire, not renew: a peer that finished last may have just dropped the shared
        # lease; taking it again is right while this slice still runs.
        elif not self.store.acquire_lease(self.s.pipeline, self.s.holder, self.ttl):
            self.lost = self.lost or "pipeline"

    def _run(self) -> None:
        while not self._stop.wait(max(self.ttl.total_seconds() / 3, 0.2)) and not self.lost:
            try:
                self._renew()
            except Exception as exc:  # the database is unreachable: expiry decides
                log.warning("slice.renew_failed", error=redact(str(exc)))

    def alive(self) -> bool:
        if not self.lost:
            self._renew()
        return not self.lost

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def _slice_counts(result: PipelineResult) -> dict[str, Any]:
    d = result.as_dict()
    keys = ("created", "adopted", "updated", "unchanged", "skipped", "unwon", "dead_lettered")
    return {
        **{k: d[k] for k in keys},
        "read": d["read"],
        "api_calls": d["api_calls"],
        "duration_s": d["duration_s"],
    }


BUSY = "busy"  # the pipeline's lease is held by something else (a sync, another backfill)


def work_one_slice(
    loaded: LoadedConfig,
    pipeline: PipelineConfig,
    store: StateStore,
    connections: Connections,
    *,
    owner: str,
    backfill_id: int | None = None,
    should_stop: Callable[[], bool] | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> SliceRun | str | None:
    """Claim and run one slice of the pipeline's backfills. None: nothing to claim; BUSY:
    the pipeline is held by another kind of run, so the slice went back to pending."""
    slices = BackfillSlices(store.engine)
    ttl = parse_duration(pipeline.options.lease_ttl)
    s = slices.claim(owner, ttl, pipeline=pipeline.name, backfill_id=backfill_id)
    if s is None:
        return None
    slog = log.bind(pipeline=pipeline.name, backfill_id=s.backfill_id, slice=s.index)
    if not store.acquire_lease(pipeline.name, s.holder, ttl):
        slices.release(s, owner, count_attempt=False)
        holder = store.lease(pipeline.name)
        slog.info("slice.waiting", reason="pipeline busy", holder=holder.owner if holder else None)
        return BUSY
    slog.info("slice.started", since=str(s.since), until=str(s.until), attempt=s.attempts)
    keeper = _SliceKeeper(slices, store, s, owner, ttl)
    try:
        result = run_pipeline(
            loaded,
            pipeline,
            store,
            connections,
            owner=owner,
            kind="backfill",
            since=s.since,
            until=s.until,
            checkpoint=slice_stream(s.backfill_id, s.index),
            keep_alive=keeper.alive,
            should_stop=should_stop,
            on_progress=on_progress,
        )
    except Exception as exc:  # a bug or the state store gone: the slice says so, then raise
        keeper.stop()
        slog.exception("slice.crashed")
        slices.fail(s, owner, redact(str(exc)) or type(exc).__name__, {})
        slices.release_pipeline_lease_if_idle(pipeline.name, s.backfill_id)
        raise
    keeper.stop()
    counts = _slice_counts(result)
    if result.status in ("ok", "partial"):
        outcome = "done" if slices.finish(s, owner, counts) else "lost"
    elif result.status == "interrupted" or keeper.lost:
        # Stopping (SIGTERM) or a lease lost: the slice goes back for another worker, which
        # resumes at its checkpoint. A slice taken over is not ours to hand back. A clean
        # stop (a rolling restart) does not count against the slice's attempts.
        clean = result.status == "interrupted"
        outcome = "released" if slices.release(s, owner, count_attempt=not clean) else "lost"
    else:
        failed = slices.fail(s, owner, result.error or "failed", counts)
        outcome = "failed" if failed else "lost"
    slices.release_pipeline_lease_if_idle(pipeline.name, s.backfill_id)
    slog.info("slice.finished", outcome=outcome, **counts)
    return SliceRun(s, result, outcome)


def work_backfill(
    loaded: LoadedConfig,
    store: StateStore,
    connections: Connections,
    *,
    owner: str,
    backfill_id: int | None = None,
    pipelines: Sequence[PipelineConfig] | None = None,
    wait: bool = False,
    should_stop: Callable[[], bool] | None = None,
    on_progress: Callable[[int], None] | None = None,
    on_wait: Callable[[str], None] | None = None,
    poll_s: float = 1.0,
) -> list[SliceRun]:
    """Work slices one at a time until none can be claimed: of one plan (`backfill_id`) or
    of any plan of `pipelines`. With `wait`, stay while slices run elsewhere, to take over
    any whose worker dies, and return once none is pending or running."""
    slices = BackfillSlices(store.engine)
    if backfill_id is not None:
        plan = slices.slices(backfill_id)
        if not plan:
            raise LookupError(f"no backfill with id {backfill_id}")
        pipelines = [loaded.config.pipeline(plan[0].pipeline)]
    chosen = list(pipelines or [p for p in loaded.config.pipelines if p.enabled])
    runs: list[SliceRun] = []
    stop = should_stop or (lambda: False)
    pause = threading.Event()
    while not stop():
        worked, busy = False, False
        for p in chosen:
            got = work_one_slice(
                loaded,
                p,
                store,
                connections,
                owner=owner,
                backfill_id=backfill_id,
                should_stop=should_stop,
                on_progress=on_progress,
            )
            if isinstance(got, SliceRun):
                runs.append(got)
                worked = True
                break
            busy = busy or got == BUSY
        if worked:
            continue
        if not wait:
            break
        if backfill_id is not None:
            states = {s.state for s in slices.slices(backfill_id)}
            active = bool(states & {PENDING, RUNNING})
        else:
            active = any(slices.unfinished(p.name) for p in chosen)
        if not active:
            break
        if on_wait:
            on_wait("pipeline busy" if busy else "slices running elsewhere")
        pause.wait(poll_s)
    return runs


def plan_exit_code(plan: Sequence[BackfillSlice], runs: Sequence[SliceRun] = ()) -> int:
    """0 all done; 1 records parked; 3 a slice failed (its error says why)."""
    if any(s.state == FAILED for s in plan) or any(r.outcome == "failed" for r in runs):
        return EXIT_UNREACHABLE
    if any(s.counts.get("dead_lettered") for s in plan):
        return EXIT_PARKED
    return EXIT_OK
