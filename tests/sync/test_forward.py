"""The forward flow on in-memory connectors: exactly-once creation, cursor, overlap, parking."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from connectors.base import Cursor, Deal, DealStatus
from connectors.memory import MemoryCRM, MemoryProjects, won
from sync.forward import ForwardSync

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


def engine(crm, tool, fmap, store, **kw) -> ForwardSync:
    return ForwardSync("p1", crm, tool, fmap, store, overlap=timedelta(minutes=5), **kw)


def seeded(n_won: int = 5, n_open: int = 3, n_lost: int = 2, page_size: int = 100) -> MemoryCRM:
    crm = MemoryCRM(page_size=page_size)
    i = 0
    for status, n in (
        (DealStatus.WON, n_won),
        (DealStatus.OPEN, n_open),
        (DealStatus.LOST, n_lost),
    ):
        for _ in range(n):
            i += 1
            crm.put(
                Deal(
                    str(i),
                    T0 + timedelta(seconds=i),
                    status,
                    {"dealname": f"D{i}", "amount": "100"},
                )
            )
    return crm


def test_each_won_deal_gets_exactly_one_project_and_others_none(write_map, store):
    crm, tool = seeded(), MemoryProjects()
    counts = engine(crm, tool, write_map(), store).run()
    assert counts.created == 5 and counts.skipped == 5
    for deal in crm.deals.values():
        expected = 1 if deal.status is DealStatus.WON else 0
        assert len(tool.projects_for(deal.id)) == expected


def test_second_run_creates_nothing_and_reads_only_the_overlap(write_map, store):
    crm, tool = seeded(), MemoryProjects()
    fmap = write_map()
    engine(crm, tool, fmap, store).run()
    crm.put(won("late", T0 - timedelta(days=30)))  # older than the cursor: not re-read
    counts = engine(crm, tool, fmap, store).run()
    assert counts.created == 0
    assert len(tool.projects) == 5
    assert counts.unchanged + counts.skipped == 0  # everything in the window was seen already


def test_seen_marks_are_kept_only_inside_the_overlap_window(write_map, store):
    """A backfill of old history writes no mark a later read could not use, and the window
    the next run re-reads is still skipped record by record."""
    crm, tool = MemoryCRM(page_size=10), MemoryProjects()
    for i in range(50):  # one an hour: only the last is within 5 minutes of the newest
        crm.put(won(f"d{i:02d}", T0 + timedelta(hours=i)))
    fmap = write_map()
    engine(crm, tool, fmap, store).run()
    marks = store.seen_marks("p1", "deals", [f"d{i:02d}" for i in range(50)])
    assert set(marks) == {"d49"}
    crm.put(won("d50", T0 + timedelta(hours=49, minutes=1)))  # new, inside the window
    counts = engine(crm, tool, fmap, store).run()
    assert (counts.read, counts.created, counts.unchanged) == (2, 1, 0)
    assert len(tool.projects) == 51


def test_deals_sharing_a_timestamp_across_a_page_boundary_arrive_once(write_map, store):
    crm, tool = MemoryCRM(page_size=2), MemoryProjects()
    for i in range(5):
        crm.put(won(f"t{i}", T0))  # five ties, pages of two
    fmap = write_map()
    first = engine(crm, tool, fmap, store).run()
    assert first.created == 5
    crm.put(won("t9", T0))  # a late arrival in the search index with the same timestamp
    second = engine(crm, tool, fmap, store).run()
    assert second.created == 1
    assert all(len(tool.projects_for(f"t{i}")) == 1 for i in (0, 1, 2, 3, 4, 9))


def test_cursor_is_the_pair_time_and_id_of_the_last_applied_record(write_map, store):
    crm, tool = seeded(n_won=2, n_open=0, n_lost=0), MemoryProjects()
    engine(crm, tool, write_map(), store).run()
    cursor = store.get_cursor("p1", "deals")
    assert cursor is not None
    assert (cursor.modified_at, cursor.record_id) == (T0 + timedelta(seconds=2), "2")


def test_mapping_error_parks_the_record_and_the_run_goes_on(write_map, store):
    fmap = write_map(
        """
        version: 1
        project:
          name: "{{ deal.dealname }}"
          custom_fields:
            Deal amount: {source: amount, type: number, required: true}
        """
    )
    crm, tool = MemoryCRM(), MemoryProjects()
    crm.put(won("good", T0, amount="10"))
    crm.put(won("bad", T0 + timedelta(seconds=1), amount="ten"))
    crm.put(won("empty", T0 + timedelta(seconds=2)))
    counts = engine(crm, tool, fmap, store).run()
    assert counts.created == 1 and counts.dead_lettered == 2
    parked = {d.record_id: d for d in store.dead_letters("p1")}
    assert set(parked) == {"bad", "empty"}
    assert "cannot convert to number" in parked["bad"].message
    assert "required" in parked["empty"].message and parked["empty"].step == "map"
    # The cursor moved past the parked records: they do not block the stream.
    assert store.get_cursor("p1", "deals").record_id == "empty"


def test_a_fixed_record_clears_its_dead_letter(write_map, store):
    fmap = write_map()
    crm, tool = MemoryCRM(), MemoryProjects()
    crm.put(won("x", T0, amount="lots"))
    engine(crm, tool, fmap, store).run()
    assert len(store.dead_letters("p1")) == 1
    crm.put(won("x", T0 + timedelta(minutes=1), amount="12"))
    engine(crm, tool, fmap, store).run()
    assert store.dead_letters("p1") == []
    assert len(tool.projects_for("x")) == 1


def test_crash_between_create_and_link_is_adopted_not_duplicated(write_map, store):
    fmap = write_map()
    crm = MemoryCRM()
    crm.put(won("1", T0))
    faults = iter(["after"])
    tool = MemoryProjects(fault=lambda op: next(faults, None) if op == "create" else None)
    first = engine(crm, tool, fmap, store).run()
    assert first.dead_lettered == 1  # the response was lost; the claim stays pending
    assert store.link("p1", "1").state == "pending"
    assert len(tool.projects) == 1
    crm.put(won("1", T0 + timedelta(seconds=30)))  # touched again (or a dlq retry)
    second = engine(crm, tool, fmap, store).run()
    assert second.adopted == 1 and second.created == 0
    assert len(tool.projects_for("1")) == 1
    assert store.link("p1", "1").state == "created"


def test_lost_state_store_adopts_every_project_by_its_stamp(write_map, tmp_path):
    from state.store import StateStore

    fmap = write_map()
    crm, tool = seeded(), MemoryProjects()
    s1 = StateStore(f"sqlite:///{tmp_path / 'a.db'}")
    engine(crm, tool, fmap, s1).run()
    s2 = StateStore(f"sqlite:///{tmp_path / 'b.db'}")  # the state file is gone
    counts = engine(crm, tool, fmap, s2).run()
    assert counts.created == 0 and counts.adopted == 5
    assert len(tool.projects) == 5


def test_kept_in_sync_field_is_written_only_when_it_changes(write_map, store):
    fmap = write_map()
    crm, tool = MemoryCRM(), MemoryProjects()
    crm.put(won("1", T0, amount="100"))
    engine(crm, tool, fmap, store).run()
    crm.put(won("1", T0 + timedelta(minutes=10), amount="100", other="noise"))
    c2 = engine(crm, tool, fmap, store).run()
    assert c2.unchanged == 1 and tool.calls["update"] == 0
    crm.put(won("1", T0 + timedelta(minutes=20), amount="250"))
    c3 = engine(crm, tool, fmap, store).run()
    assert c3.updated == 1 and tool.calls["update"] == 1
    project = tool.projects_for("1")[0]
    assert project.spec.custom_fields["Deal amount"] == 250
    assert project.spec.fields["notes"] == "Amount 100"  # not kept in sync: untouched


def test_a_deal_that_stops_being_won_keeps_its_project_and_gets_a_comment(write_map, store):
    fmap = write_map()
    crm, tool = MemoryCRM(), MemoryProjects()
    crm.put(won("1", T0))
    engine(crm, tool, fmap, store).run()
    crm.put(Deal("1", T0 + timedelta(minutes=10), DealStatus.LOST, {"dealname": "D"}))
    counts = engine(crm, tool, fmap, store).run()
    assert counts.unwon == 1
    project = tool.projects_for("1")[0]
    assert not project.archived and len(project.comments) == 1
    assert store.link("p1", "1").state == "unwon"


def test_dry_run_writes_nothing_anywhere(write_map, store):
    crm, tool = seeded(), MemoryProjects()
    sync = engine(crm, tool, write_map(), store, dry_run=True)
    counts = sync.run()
    assert counts.created == 5
    assert tool.projects == {} and store.get_cursor("p1", "deals") is None
    assert store.links_for("p1", list(crm.deals)) == {}
    assert [a.action for a in sync.plan].count("create") == 5


def test_a_create_cut_short_after_the_project_exists_is_completed_and_stamped(write_map, store):
    from connectors.base import DealStamp
    from connectors.errors import ConnectorError, ErrorKind

    class CutShort(MemoryProjects):
        """Creates the project, then fails before stamping it (as a 502 mid-create would)."""

        def create_project(self, spec, stamp):
            ref = super().create_project(spec, stamp)
            self.projects[ref.id].stamp = ""
            err = ConnectorError("tool", ErrorKind.TRANSIENT, "502 after create", status=502)
            err.project = ref
            raise err

    fmap = write_map()
    crm, tool = MemoryCRM(), CutShort()
    crm.put(won("1", T0, amount="5"))
    first = engine(crm, tool, fmap, store).run()
    assert first.dead_lettered == 1 and len(tool.projects) == 1
    assert store.link("p1", "1").state == "created"  # linked: a retry will not create again
    ForwardSync("p1", crm, tool, fmap, store, overlap=timedelta(minutes=5)).retry(["1"])
    (project,) = tool.projects.values()
    assert project.stamp == DealStamp(crm.kind, "1").marker
    assert project.spec.custom_fields["Deal amount"] == 5
    assert store.dead_letters("p1") == []
    assert len(tool.projects) == 1


def test_a_quiet_pipeline_stops_re_reading_its_overlap(write_map, store):
    """The CRM's clock says where each complete read began: the next read starts an overlap
    before that, not before the newest record (which may be long ago), so a pipeline with
    nothing new reads nothing; a record that surfaces late inside that overlap still comes."""
    clock = [T0 + timedelta(hours=1)]
    crm, tool, fmap = seeded(), MemoryProjects(), write_map()
    crm.clock = lambda: clock[0]
    assert engine(crm, tool, fmap, store).run().read == 10
    assert store.read_position("p1", "deals")[1] == T0 + timedelta(hours=1)

    clock[0] += timedelta(minutes=30)
    assert engine(crm, tool, fmap, store).run().read == 0  # the cursor's overlap: 10
    crm.put(won("late", T0 + timedelta(hours=1, minutes=28)))  # indexed late, in the overlap
    clock[0] += timedelta(minutes=30)
    counts = engine(crm, tool, fmap, store).run()
    assert (counts.read, counts.created) == (1, 1)


def test_only_a_complete_incremental_read_moves_where_reads_begin(write_map, store):
    from sync.runner import _Limited

    clock = [T0 + timedelta(hours=1)]
    crm, tool, fmap = seeded(), MemoryProjects(), write_map()
    crm.clock = lambda: clock[0]
    engine(_Limited(crm, 3), tool, fmap, store).run()  # `--limit 3`: the rest is unread
    assert store.get_cursor("p1", "deals") is not None
    assert store.read_position("p1", "deals")[1] is None
    assert engine(crm, tool, fmap, store).run(since=T0).created == 2  # a backfill
    assert store.read_position("p1", "deals")[1] is None
    assert engine(crm, tool, fmap, store).run().created == 0
    assert store.read_position("p1", "deals")[1] == clock[0]

    store.set_cursor("p1", "deals", Cursor(T0, "0"))  # an operator rewinds the cursor
    assert store.read_position("p1", "deals")[1] is None
    assert engine(crm, tool, fmap, store).run().read == 10
