"""Property-based: for any schedule of faults, the invariants hold once the faults stop.

Faults are drawn per operation: a transient failure before the call, a transient failure
after the call was applied (the response lost: the "crash between create and link"), or
nothing. The engine is run repeatedly, as a scheduler would, then dead letters are replayed.
"""

from __future__ import annotations

import contextlib
import tempfile
from datetime import UTC, datetime, timedelta

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from connectors.base import Deal, DealStatus
from connectors.memory import MemoryCRM, MemoryProjects, transient
from mappings.field_map import load_field_map
from state.store import StateStore
from sync.back import BackSync
from sync.forward import ForwardSync, StopRun

MAP = """
version: 1
project:
  name: "{{ deal.dealname }}"
  milestones: [{name: Kickoff, due_in_days: 3}, {name: Done, due_in_days: 30}]
  custom_fields:
    Deal amount: {source: amount, type: number, sync: true}
progress:
  pct: {source: percent, type: number}
"""
T0 = datetime(2025, 1, 1, tzinfo=UTC)


class Schedule:
    """Replays a drawn list of fault decisions, one per operation, then stays healthy."""

    def __init__(self, decisions: list[str], system: str) -> None:
        self.decisions = list(decisions)
        self.system = system
        self.on = True

    def __call__(self, op: str) -> str | None:
        if not self.on or not self.decisions:
            return None
        d = self.decisions.pop(0)
        if d == "before":
            raise transient(self.system)
        return "after" if d == "after" else None


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n_deals=st.integers(1, 25),
    statuses=st.lists(st.sampled_from(["won", "won", "open", "lost"]), min_size=25, max_size=25),
    ties=st.integers(1, 5),
    crm_faults=st.lists(st.sampled_from(["ok", "ok", "before", "after"]), max_size=40),
    tool_faults=st.lists(st.sampled_from(["ok", "before", "after"]), max_size=60),
    page_size=st.integers(1, 7),
)
def test_invariants_hold_under_any_fault_schedule(
    n_deals, statuses, ties, crm_faults, tool_faults, page_size
):
    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/map.yaml"
        with open(path, "w") as f:
            f.write(MAP)
        fmap = load_field_map(path)
        store = StateStore(f"sqlite:///{tmp}/s.db")
        crm_sched, tool_sched = Schedule(crm_faults, "crm"), Schedule(tool_faults, "tool")
        crm = MemoryCRM(page_size=page_size, fault=crm_sched)
        tool = MemoryProjects(fault=tool_sched)
        for i in range(n_deals):
            status = DealStatus(statuses[i])
            # Several deals share each timestamp: ties straddle page boundaries.
            when = T0 + timedelta(seconds=i // ties)
            crm.put(Deal(f"d{i}", when, status, {"dealname": f"D{i}", "amount": str(i)}))

        def one_run() -> None:
            fwd = ForwardSync("p", crm, tool, fmap, store, overlap=timedelta(minutes=1))
            back = BackSync("p", crm, tool, fmap, store, overlap=timedelta(minutes=1))
            for flow in (fwd.run, back.run):
                # A read that failed after retries ends the run; the scheduler runs again.
                with contextlib.suppress(StopRun):
                    flow()

        for _ in range(6):
            one_run()
        crm_sched.on = tool_sched.on = False
        one_run()
        # Replay what was parked, as `handoff dlq retry --all` does.
        parked = store.dead_letters("p")
        fwd = ForwardSync("p", crm, tool, fmap, store, overlap=timedelta(minutes=1))
        fwd.retry([d.record_id for d in parked if d.stream == "deals"])
        back = BackSync("p", crm, tool, fmap, store, overlap=timedelta(minutes=1))
        back.retry([d.record_id for d in parked if d.stream == "milestones"])
        one_run()

        won = [d for d in crm.deals.values() if d.status is DealStatus.WON]
        for deal in won:
            assert len(tool.projects_for(deal.id)) == 1, f"{deal.id} has wrong project count"
            assert store.link("p", deal.id).state == "created"
            assert "pct" in crm.deals[deal.id].properties  # progress written back
        assert len(tool.projects) == len(won)  # no project for open or lost deals
        assert store.dead_letters("p") == []
        store.close()
