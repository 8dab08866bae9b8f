"""Backfills split across workers, on in-memory connectors: the plan partitions the window
into slices of about equal won deals; workers side by side give every won deal one project;
a dead worker's slice is taken over and resumes; a failed slice is retried on demand; the
pipeline's sync and a sliced backfill never run at once."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from connectors.base import Deal, DealStatus
from connectors.errors import ConnectorError, ErrorKind
from connectors.memory import MemoryCRM, MemoryProjects
from state.backfill_slices import DONE, FAILED, PENDING, BackfillSlices, slice_stream
from state.store import StateStore
from sync.backfill_plan import (
    BUSY,
    _SortedSample,
    balanced_ranges,
    plan_backfill,
    plan_exit_code,
    work_backfill,
    work_one_slice,
)
from sync.config import Config, LoadedConfig, PipelineConfig, PipelineOptions
from sync.runner import Connections, run_pipeline
from sync.scheduler import Daemon

T0 = datetime(2025, 3, 1, tzinfo=UTC)
SINCE = datetime(2000, 1, 1, tzinfo=UTC)


def _crm(n: int = 120, page_size: int = 7) -> MemoryCRM:
    """Deals crowded into recent days (as real change histories are), every third won."""
    crm = MemoryCRM(page_size=page_size)
    for i in range(n):
        when = T0 + timedelta(hours=i * i / 10, microseconds=i)  # ever sparser; sub-second
        status = DealStatus.WON if i % 3 == 0 else DealStatus.OPEN
        crm.put(Deal(str(i), when, status, {"dealname": f"D{i}", "amount": "100"}))
    return crm


def _loaded(fmap: Any, ttl: str = "5m") -> LoadedConfig:
    pipeline = PipelineConfig(
        name="p1",
        source="crm",
        target="tool",
        mapping="map.yaml",
        direction="forward",
        options=PipelineOptions(lease_ttl=ttl),
    )
    config = Config.model_construct(connections={"crm": None, "tool": None}, pipelines=[pipeline])
    return LoadedConfig(Path("handoff.yaml"), config, {"p1": fmap})


def _connections(loaded: LoadedConfig, crm: Any, tool: Any) -> Connections:
    return Connections(loaded, factory=lambda name, _settings: {"crm": crm, "tool": tool}[name])


def _one_project_per_won_deal(crm: MemoryCRM, tool: MemoryProjects) -> None:
    for deal in crm.deals.values():
        expected = 1 if deal.status is DealStatus.WON else 0
        assert len(tool.projects_for(deal.id)) == expected, deal.id


# -- planning ---------------------------------------------------------------------------------


def test_the_sample_stays_bounded_and_keeps_every_step_th_value() -> None:
    sample = _SortedSample(capacity=64)
    for v in range(10_000):
        sample.add(float(v))
    assert len(sample.values) < 64 and sample.count == 10_000
    assert sample.values == [float(i * sample.step) for i in range(len(sample.values))]


def test_ranges_are_contiguous_whole_second_cuts_of_equal_weight() -> None:
    stamps = [T0.timestamp() + i * 10.5 for i in range(1000)]
    ranges = balanced_ranges(stamps, 1, 1000, 4, SINCE, None)
    assert len(ranges) == 4
    assert ranges[0][0] == SINCE and ranges[-1][1] is None
    for (_, end, _), (start, _, _) in zip(ranges, ranges[1:], strict=False):
        assert start.microsecond == 0 and end == start - timedelta(microseconds=1)
    assert [r[2] for r in ranges] == [250, 250, 250, 250]


def test_deals_sharing_one_second_are_not_split_so_fewer_slices_come_back() -> None:
    bulk = [T0.timestamp()] * 900 + [T0.timestamp() + 60 + i for i in range(100)]
    ranges = balanced_ranges(bulk, 1, 1000, 8, SINCE, T0 + timedelta(days=1))
    assert 1 < len(ranges) < 8
    assert sum(r[2] for r in ranges) == 1000
    assert max(r[2] for r in ranges) >= 900  # the bulk update stays together


def test_no_won_deals_make_one_slice_over_the_whole_window() -> None:
    assert balanced_ranges([], 1, 0, 5, SINCE, None) == [(SINCE, None, 0)]


def test_the_plan_partitions_the_window_with_balanced_won_deals(write_map, store) -> None:
    crm, tool = _crm(), MemoryProjects()
    loaded = _loaded(write_map())
    planned = plan_backfill(
        loaded, loaded.config.pipelines[0], store, _connections(loaded, crm, tool),
        since=SINCE, until=None, slices=4,
    )  # fmt: skip
    assert planned.won == 40 and planned.read == 120
    assert planned.api_calls == {"crm": 120 // 7 + 1}  # one keys-only read of the window
    assert [s.expected for s in planned.slices] == [10, 10, 10, 10]
    assert not tool.projects, "planning writes nothing to the tool"
    # Every deal falls in exactly one slice's [since, until].
    for deal in crm.deals.values():
        inside = [
            s
            for s in planned.slices
            if s.since <= deal.modified_at and (s.until is None or deal.modified_at <= s.until)
        ]
        assert len(inside) == 1, deal.id
    # Equal time slices would have put nearly every deal in the last one; these balance.
    won_per_slice = [
        sum(
            1
            for d in crm.deals.values()
            if d.status is DealStatus.WON
            and s.since <= d.modified_at
            and (s.until is None or d.modified_at <= s.until)
        )
        for s in planned.slices
    ]
    assert won_per_slice == [10, 10, 10, 10]


# -- working ----------------------------------------------------------------------------------


def test_two_workers_share_the_plan_and_each_won_deal_gets_one_project(
    write_map, tmp_path: Path
) -> None:
    crm, tool = _crm(), MemoryProjects()
    loaded = _loaded(write_map())
    url = f"sqlite:///{tmp_path / 'state.db'}"
    store = StateStore(url)
    p = loaded.config.pipelines[0]
    planned = plan_backfill(
        loaded, p, store, _connections(loaded, crm, tool), since=SINCE, until=None, slices=8
    )
    # The tool is slow enough that both workers are busy at once.
    slow = MemoryProjects(fault=lambda op: time.sleep(0.005) if op == "create" else None)
    runs: dict[str, list[Any]] = {}

    def worker(name: str) -> None:
        own = StateStore(url)
        try:
            runs[name] = work_backfill(
                loaded, own, _connections(loaded, crm, slow), owner=name,
                backfill_id=planned.backfill_id, wait=True, poll_s=0.05,
            )  # fmt: skip
        finally:
            own.close()

    threads = [threading.Thread(target=worker, args=(n,)) for n in ("w1", "w2")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    plan = BackfillSlices(store.engine).slices(planned.backfill_id)
    assert {s.state for s in plan} == {DONE}
    assert {s.owner for s in plan} == {"w1", "w2"}, "both workers did slices"
    assert sorted(r.slice.index for rs in runs.values() for r in rs) == list(range(len(plan)))
    _one_project_per_won_deal(crm, slow)
    assert sum(s.counts["read"] for s in plan) == len(crm.deals)  # no deal read twice
    assert plan_exit_code(plan) == 0
    # Each slice recorded a backfill run; the pipeline's own cursor was never touched.
    assert store.last_run("p1").kind == "backfill"
    assert store.cursors("p1") == {}
    store.close()


def test_a_dead_workers_slice_is_taken_over_and_resumes_at_its_checkpoint(write_map, store) -> None:
    crm, tool = _crm(), MemoryProjects()
    loaded = _loaded(write_map(), ttl="1s")
    p = loaded.config.pipelines[0]
    planned = plan_backfill(
        loaded, p, store, _connections(loaded, crm, tool), since=SINCE, until=None, slices=2
    )
    slices = BackfillSlices(store.engine)
    # A worker that dies after its first page: its slice stays running, lease and all.
    pages = 0

    def die_after_first_page() -> None:
        nonlocal pages
        pages += 1
        if pages == 2:
            raise SystemExit("killed")

    with pytest.raises(SystemExit):
        run_dying_worker(loaded, p, store, crm, tool, die_after_first_page)
    first = slices.slices(planned.backfill_id)[0]
    assert first.state == "running" and first.owner == "dead"
    checkpoint = store.get_cursor("p1", slice_stream(planned.backfill_id, 0))
    assert checkpoint is not None, "the first page was committed"
    made = len(tool.projects)
    assert made > 0

    started = time.monotonic()
    runs = work_backfill(
        loaded, store, _connections(loaded, crm, tool), owner="alive",
        backfill_id=planned.backfill_id, wait=True, poll_s=0.1,
    )  # fmt: skip
    assert time.monotonic() - started >= 0.5, "waited for the dead worker's lease to expire"
    plan = slices.slices(planned.backfill_id)
    assert [s.state for s in plan] == [DONE, DONE] and plan[0].owner == "alive"
    assert plan[0].attempts == 2
    assert {r.slice.index for r in runs} == {0, 1}
    _one_project_per_won_deal(crm, tool)
    # Resumed at the checkpoint: the two pages the dead worker committed are not read again
    # (only the deal at the checkpoint itself, which its seen mark skips).
    inside = sum(1 for d in crm.deals.values() if first.until and d.modified_at <= first.until)
    assert plan[0].counts["read"] == inside - 2 * 7 + 1


def run_dying_worker(loaded, p, store, crm, tool, on_page) -> None:
    """Claim slice 0 as "dead" and run it until `on_page` kills it (no clean-up runs)."""
    slices = BackfillSlices(store.engine)
    s = slices.claim("dead", timedelta(seconds=1), pipeline="p1")
    assert s is not None and store.acquire_lease("p1", s.holder, timedelta(seconds=1))

    def keep_alive() -> bool:
        on_page()
        return True

    run_pipeline(
        loaded, p, store, _connections(loaded, crm, tool), owner="dead", kind="backfill",
        since=s.since, until=s.until, checkpoint=slice_stream(s.backfill_id, s.index),
        keep_alive=keep_alive,
    )  # fmt: skip


def test_a_failed_slice_is_reported_and_retried_after_the_fix(write_map, store) -> None:
    crm, tool = _crm(), MemoryProjects()
    loaded = _loaded(write_map())
    p = loaded.config.pipelines[0]
    planned = plan_backfill(
        loaded, p, store, _connections(loaded, crm, tool), since=SINCE, until=None, slices=3
    )
    broken = {"on": True}

    def refuse_auth(op: str) -> None:
        if op == "create" and broken["on"] and len(tool.projects) >= 15:
            raise ConnectorError("tool", ErrorKind.AUTH, "401: token revoked", status=401)

    tool.fault = refuse_auth
    runs = work_backfill(
        loaded, store, _connections(loaded, crm, tool), owner="w",
        backfill_id=planned.backfill_id, wait=True,
    )  # fmt: skip
    slices = BackfillSlices(store.engine)
    plan = slices.slices(planned.backfill_id)
    failed = [s for s in plan if s.state == FAILED]
    assert failed and "401: token revoked" in (failed[0].error or "")
    assert plan_exit_code(plan, runs) == 3
    broken["on"] = False  # the token is fixed
    assert slices.retry_failed(planned.backfill_id) == len(failed)
    work_backfill(
        loaded, store, _connections(loaded, crm, tool), owner="w2",
        backfill_id=planned.backfill_id, wait=True,
    )  # fmt: skip
    plan = slices.slices(planned.backfill_id)
    assert {s.state for s in plan} == {DONE}
    _one_project_per_won_deal(crm, tool)


def test_a_slice_waits_while_the_pipelines_sync_holds_the_lease(write_map, store) -> None:
    crm, tool = _crm(), MemoryProjects()
    loaded = _loaded(write_map())
    p = loaded.config.pipelines[0]
    planned = plan_backfill(
        loaded, p, store, _connections(loaded, crm, tool), since=SINCE, until=None, slices=2
    )
    assert store.acquire_lease("p1", "a-sync-run", timedelta(minutes=5))
    got = work_one_slice(loaded, p, store, _connections(loaded, crm, tool), owner="w")
    assert got == BUSY and not tool.projects
    plan = BackfillSlices(store.engine).slices(planned.backfill_id)
    assert {s.state for s in plan} == {PENDING} and plan[0].attempts == 0
    store.release_lease("p1", "a-sync-run")
    assert work_one_slice(loaded, p, store, _connections(loaded, crm, tool), owner="w") not in (
        None,
        BUSY,
    )


def test_the_daemon_defers_the_sync_and_works_the_slices(write_map, tmp_path: Path) -> None:
    crm, tool = _crm(), MemoryProjects()
    loaded = _loaded(write_map())
    loaded.config.state.url = f"sqlite:///{tmp_path / 'state.db'}"  # type: ignore[union-attr]
    daemon = Daemon(loaded, owner="replica-1")
    daemon.connections = _connections(loaded, crm, tool)
    try:
        plan_backfill(
            loaded, loaded.config.pipelines[0], daemon.store, daemon.connections,
            since=SINCE, until=None, slices=3,
        )  # fmt: skip
        assert daemon.run_once("p1") is None, "no sync while a backfill of p1 is unfinished"
        assert not tool.projects
        assert daemon.work_backfills() == 3
        _one_project_per_won_deal(crm, tool)
        assert daemon.run_once("p1").status == "ok"  # the backfill is done: syncs resume
    finally:
        daemon.store.close()


def test_a_stopping_worker_hands_its_slice_back_at_a_page_boundary(write_map, store) -> None:
    crm, tool = _crm(), MemoryProjects()
    loaded = _loaded(write_map())
    p = loaded.config.pipelines[0]
    planned = plan_backfill(
        loaded, p, store, _connections(loaded, crm, tool), since=SINCE, until=None, slices=1
    )
    pages = []
    got = work_one_slice(
        loaded, p, store, _connections(loaded, crm, tool), owner="stopping",
        on_progress=pages.append, should_stop=lambda: len(pages) >= 2,
    )  # fmt: skip
    assert got is not None and got != BUSY
    assert got.outcome == "released" and got.result.counts.read == 2 * 7
    s = BackfillSlices(store.engine).slices(planned.backfill_id)[0]
    assert s.state == PENDING and s.owner is None and s.attempts == 0  # at once, no penalty
    assert store.lease("p1") is not None, "the backfill still holds the pipeline"
    rest = work_one_slice(loaded, p, store, _connections(loaded, crm, tool), owner="next")
    assert rest is not None and rest != BUSY and rest.outcome == "done"
    assert rest.result.counts.read == len(crm.deals) - 2 * 7 + 1  # resumed at the checkpoint
    _one_project_per_won_deal(crm, tool)
    assert store.lease("p1") is None, "the last slice done frees the pipeline for its sync"
