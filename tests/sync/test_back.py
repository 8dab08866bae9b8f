"""The back flow on in-memory connectors: progress written, batched, never echoed."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

from connectors.base import MilestoneSpec
from connectors.memory import MemoryCRM, MemoryProjects, won
from sync.back import BackSync, compute_progress
from sync.forward import ForwardSync

PROGRESS_MAP = """
version: 1
project:
  name: "{{ deal.dealname }}"
  milestones:
    - {name: Kickoff, due_in_days: 7}
    - {name: Go-live, due_in_days: 60}
  custom_fields:
    Deal amount: {source: amount, type: number, sync: true}
progress:
  delivery_percent: {source: percent, type: number}
  delivery_status: {source: status}
  last_milestone: {template: "{{ progress.last_milestone or '' }}"}
timeline:
  text: "Milestone reached: {{ progress.last_milestone }}"
"""

NOW = datetime.now(UTC)


def run_forward(crm, tool, fmap, store):
    return ForwardSync("p", crm, tool, fmap, store, overlap=timedelta(minutes=5)).run()


def run_back(crm, tool, fmap, store, batch=100):
    return BackSync("p", crm, tool, fmap, store, timedelta(minutes=5), batch_size=batch).run()


def setup(write_map, store, n=3):
    fmap = write_map(PROGRESS_MAP)
    crm, tool = MemoryCRM(), MemoryProjects()
    for i in range(n):
        crm.put(won(str(i), NOW - timedelta(hours=2, seconds=-i), amount="10"))
    run_forward(crm, tool, fmap, store)
    return fmap, crm, tool


def first_milestone(tool, deal_id):
    project = tool.projects_for(deal_id)[0]
    return next(m for m in tool.milestones.values() if m.project_id == project.ref.id)


def test_completed_milestone_is_written_onto_the_deal_with_a_timeline_entry(write_map, store):
    fmap, crm, tool = setup(write_map, store)
    run_back(crm, tool, fmap, store)  # initial progress: 0 %, not started
    assert crm.deals["0"].properties["delivery_status"] == "not_started"
    tool.complete_milestone(first_milestone(tool, "0").id, datetime.now(UTC))
    crm.writes.clear()
    counts = run_back(crm, tool, fmap, store)
    assert counts.updated == 1
    props = crm.deals["0"].properties
    assert props["delivery_percent"] == 50.0
    assert props["delivery_status"] == "in_progress"
    assert props["last_milestone"] == "Kickoff"
    assert crm.timeline == [("0", "Milestone reached: Kickoff")]


def test_back_forward_back_with_no_milestone_change_writes_nothing(write_map, store):
    fmap, crm, tool = setup(write_map, store)
    tool.complete_milestone(first_milestone(tool, "1").id, datetime.now(UTC))
    run_back(crm, tool, fmap, store)
    writes_before, updates_before = len(crm.writes), tool.calls["update"]
    # The write-back changed the deals' modified time: the forward read sees them again.
    forward = run_forward(crm, tool, fmap, store)
    assert forward.read > 0 and forward.updated == 0
    assert tool.calls["update"] == updates_before
    back = run_back(crm, tool, fmap, store)
    assert back.updated == 0
    assert len(crm.writes) == writes_before


def test_a_thousand_projects_are_written_in_ten_batches(write_map, store):
    fmap, crm, tool = setup(write_map, store, n=1000)
    run_back(crm, tool, fmap, store)
    assert crm.calls["write"] == 10  # 1,000 deals, 100 per batch call
    tool_reads = tool.calls["milestones"]
    assert tool_reads <= 2000 // tool.page_size + 1


def test_a_refused_record_is_parked_and_the_others_are_written(write_map, store):
    fmap, crm, tool = setup(write_map, store)
    crm.refuse.add("2")
    counts = run_back(crm, tool, fmap, store)
    assert counts.dead_lettered == 1
    assert [d.record_id for d in store.dead_letters("p")] == ["2"]
    assert "delivery_status" in crm.deals["0"].properties
    assert "delivery_status" not in crm.deals["2"].properties


def test_progress_status_rules():
    today = date(2025, 6, 1)
    snap = {
        "a": ["Kickoff", True, "2025-05-01T00:00:00+00:00", "2025-05-01"],
        "b": ["Build", False, None, "2025-07-01"],
    }
    p = compute_progress(snap, today)
    assert (p.done, p.total, p.percent, p.status) == (1, 2, 50.0, "in_progress")
    assert p.next_milestone == "Build" and p.next_due == date(2025, 7, 1)
    snap["b"][3] = "2025-05-15"
    assert compute_progress(snap, today).status == "at_risk"
    snap["b"][1] = True
    assert compute_progress(snap, today).status == "delivered"
    assert compute_progress({}, today).status == "not_started"


def test_milestone_spec_due_dates_follow_the_map(write_map):
    from mappings.field_map import map_deal

    fmap = write_map(PROGRESS_MAP)
    result = map_deal(fmap, won("x", NOW), today=date(2025, 1, 1))
    assert result.spec.milestones == [
        MilestoneSpec("Kickoff", date(2025, 1, 8)),
        MilestoneSpec("Go-live", date(2025, 3, 2)),
    ]
