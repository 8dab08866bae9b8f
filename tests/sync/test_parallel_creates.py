"""Creates run several at a time within a page, and the page's outcome is what one-at-a-time
would give: one project per won deal, failures parked, a fatal error leaving nothing lost."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta

import pytest

from connectors.base import DealStamp, ProjectRef, ProjectSpec
from connectors.errors import ConnectorError, ErrorKind
from connectors.memory import MemoryCRM, MemoryProjects, won
from sync.forward import ForwardSync, StopRun

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


class SlowProjects(MemoryProjects):
    """Each create takes a while and may fail; records how many ran at the same time."""

    def __init__(self, fail: dict[str, ErrorKind] | None = None) -> None:
        super().__init__()
        self.fail = fail or {}
        self.in_flight = self.most_in_flight = 0
        self._gauge = threading.Lock()

    def create_project(self, spec: ProjectSpec, stamp: DealStamp) -> ProjectRef:
        with self._gauge:
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            time.sleep(0.01)
            kind = self.fail.get(stamp.deal_id)
            if kind is not None:
                raise ConnectorError(self.name, kind, f"refused {stamp.deal_id}")
            return super().create_project(spec, stamp)
        finally:
            with self._gauge:
                self.in_flight -= 1


def crm_with(n: int) -> MemoryCRM:
    crm = MemoryCRM(page_size=25)
    for i in range(n):
        crm.put(won(f"d{i:03d}", T0 + timedelta(seconds=i), amount="100"))
    return crm


def sync(crm, tool, fmap, store, parallel: int = 6) -> ForwardSync:
    return ForwardSync(
        "p1", crm, tool, fmap, store, overlap=timedelta(minutes=5), parallel_creates=parallel
    )


def test_creates_overlap_and_each_won_deal_gets_one_project(write_map, store) -> None:
    crm, tool = crm_with(60), SlowProjects()
    counts = sync(crm, tool, write_map(), store).run()
    assert tool.most_in_flight > 1, "creates should run side by side"
    assert counts.created == 60
    assert all(len(tool.projects_for(f"d{i:03d}")) == 1 for i in range(60))
    links = store.links_for("p1", [f"d{i:03d}" for i in range(60)])
    assert {li.state for li in links.values()} == {"created"}
    assert {li.project_id for li in links.values()} == set(tool.projects)


def test_a_refused_create_is_parked_and_the_rest_of_the_page_linked(write_map, store) -> None:
    crm = crm_with(30)
    tool = SlowProjects({"d007": ErrorKind.RECORD, "d021": ErrorKind.TRANSIENT})
    counts = sync(crm, tool, write_map(), store).run()
    assert (counts.created, counts.dead_lettered) == (28, 2)
    assert {d.record_id for d in store.dead_letters("p1")} == {"d007", "d021"}
    assert store.link("p1", "d007") is None  # refused outright: the claim is released
    assert store.link("p1", "d021").state == "pending"  # maybe made: adopt before retrying


def test_a_fatal_error_stops_without_losing_or_duplicating(write_map, store) -> None:
    crm, fmap = crm_with(30), write_map()
    tool = SlowProjects({"d010": ErrorKind.AUTH})
    with pytest.raises(StopRun):
        sync(crm, tool, fmap, store).run()
    made_before = len(tool.projects)
    assert made_before == 24  # the first page but d010; its commit did not happen
    assert store.get_cursor("p1", "deals") is None
    tool.fail = {}
    counts = sync(crm, tool, fmap, store).run()
    assert (counts.adopted, counts.created) == (24, 6)
    assert all(len(tool.projects_for(f"d{i:03d}")) == 1 for i in range(30))
    assert len(tool.projects) == 30
