"""Settled back-flow passes beside a long forward run (`sync.runner._BackPasses`): progress
of projects made early in the run is written while the run goes on, each milestone change is
read once, none is lost whatever the overlap, and a milestone of a project whose page is not
yet committed is left to a later read."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from connectors.base import WriteOutcome
from connectors.errors import ConnectorError, ErrorKind
from connectors.memory import MemoryCRM, MemoryProjects, won
from sync import runner
from sync.config import Config, LoadedConfig, PipelineConfig, PipelineOptions
from sync.runner import Connections, run_pipeline
from tests.sync.test_back import PROGRESS_MAP

DEALS = 60
PAGE = 10
CREATE_S = 0.01  # a page of creates takes 0.1 s: many passes run while one is in hand


class _WatchedCRM(MemoryCRM):
    """Records how many projects existed when each progress write arrived."""

    def __init__(self, tool: MemoryProjects) -> None:
        super().__init__(page_size=PAGE)
        self.tool = tool
        self.projects_at_write: list[int] = []
        self.written: list[str] = []
        self.between_pages: list[Any] = []

    def write_deal_fields(self, updates: Any) -> list[WriteOutcome]:
        self.projects_at_write.append(len(self.tool.projects))
        self.written += [u.deal_id for u in updates]
        return super().write_deal_fields(updates)

    def read_changed_deals(self, *args: Any, **kwargs: Any) -> Any:
        for page in super().read_changed_deals(*args, **kwargs):
            yield page
            for hook in self.between_pages:
                hook()


def _slow_creates(op: str) -> None:
    if op == "create":
        time.sleep(CREATE_S)


def _run(write_map: Any, store: Any, overlap: str, fault: Any = _slow_creates) -> tuple:
    tool = MemoryProjects(fault=fault)
    crm = _WatchedCRM(tool)
    start = datetime.now(UTC) - timedelta(hours=1)
    for i in range(DEALS):
        crm.put(won(f"{i:03}", start + timedelta(seconds=i), amount="10"))
    pipeline = PipelineConfig(
        name="p",
        source="crm",
        target="tool",
        mapping="map.yaml",
        direction="both",
        options=PipelineOptions(overlap=overlap, parallel_creates=1),
    )
    config = Config.model_construct(connections={"crm": None, "tool": None}, pipelines=[pipeline])
    loaded = LoadedConfig(Path("handoff.yaml"), config, {"p": write_map(PROGRESS_MAP)})
    connections = Connections(loaded, factory=lambda name, _s: {"crm": crm, "tool": tool}[name])
    return crm, tool, lambda: run_pipeline(loaded, pipeline, store, connections)


@pytest.fixture
def often(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runner, "BACK_PASS_SECONDS", 0.005)


def test_progress_is_written_while_the_forward_run_goes_on(write_map, store, often) -> None:
    crm, tool, run = _run(write_map, store, overlap="0s")
    result = run()

    assert result.status == "ok" and result.counts.created == DEALS
    # Written in several passes, the first long before the last project was made ...
    assert len(crm.projects_at_write) > 3
    assert crm.projects_at_write[0] < DEALS / 2
    # ... each deal once, with its progress, and each milestone read once (none of a
    # project whose link was not yet committed, which would be passed over as foreign).
    assert sorted(crm.written) == sorted(crm.deals)
    assert all(d.properties["delivery_status"] == "not_started" for d in crm.deals.values())
    assert result.back.read == len(tool.milestones) == 2 * DEALS


def test_a_milestone_completed_during_the_run_is_written(write_map, store, often) -> None:
    crm, tool, run = _run(write_map, store, overlap="0s")
    done: list[str] = []

    def complete_the_first_projects_kickoff() -> None:
        if tool.projects and not done:
            first = tool.projects_for("000")[0].ref.id
            kickoff = next(m for m in tool.milestones.values() if m.project_id == first)
            tool.complete_milestone(kickoff.id, datetime.now(UTC))
            done.append(kickoff.id)

    crm.between_pages.append(complete_the_first_projects_kickoff)
    result = run()

    assert done and result.status == "ok"
    assert crm.deals["000"].properties["delivery_status"] == "in_progress"
    assert crm.deals["000"].properties["delivery_percent"] == 50.0
    assert ("000", "Milestone reached: Kickoff") in crm.timeline
    others = [d for k, d in crm.deals.items() if k != "000"]
    assert all(d.properties["delivery_status"] == "not_started" for d in others)


def test_with_a_long_overlap_the_passes_leave_everything_to_the_last(
    write_map, store, often
) -> None:
    """Changes younger than the overlap are never read by a settled pass (the search index
    may not show them yet): the run's last pass reads them, and nothing is lost."""
    crm, tool, run = _run(write_map, store, overlap="1h")
    result = run()

    assert crm.projects_at_write == [DEALS]  # one write, after the forward flow
    assert sorted(crm.written) == sorted(crm.deals)
    assert result.back.read == 2 * DEALS


def test_a_pass_that_cannot_reach_the_tool_stops_the_run(write_map, store, often) -> None:
    def tool_refuses_reads(op: str) -> None:
        _slow_creates(op)
        if op == "milestones":
            raise ConnectorError("tool", ErrorKind.AUTH, "token revoked")

    crm, tool, run = _run(write_map, store, overlap="0s", fault=tool_refuses_reads)
    result = run()

    assert result.status == "failed" and result.error_kind == ErrorKind.AUTH
    assert "token revoked" in (result.error or "")
    assert len(tool.projects) < DEALS  # stopped at the next page, not at the end


def test_a_short_run_makes_no_pass(write_map, store) -> None:
    crm, tool, run = _run(write_map, store, overlap="0s")
    run()
    assert crm.projects_at_write == [DEALS]
    assert tool.calls["milestones"] == 2  # one read of the 120 milestones: two pages
