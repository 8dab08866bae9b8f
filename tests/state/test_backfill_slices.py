"""Backfill slices in the state store: claimed by one worker at a time (SQLite and
PostgreSQL), taken over once a lease expires, never re-run once done, retried on demand."""

from __future__ import annotations

import threading
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from connectors.base import Cursor
from state.backfill_slices import (
    DONE,
    FAILED,
    MAX_ATTEMPTS,
    PENDING,
    RUNNING,
    BackfillSlices,
    backfill_holder,
    slice_stream,
)
from state.models import CursorRow
from state.store import StateStore

T0 = datetime(2025, 1, 1, tzinfo=UTC)
TTL = timedelta(minutes=5)


def _ranges(n: int) -> list[tuple[datetime, datetime | None, int]]:
    starts = [T0 + timedelta(days=i) for i in range(n)]
    return [
        (s, (starts[i + 1] - timedelta(microseconds=1)) if i + 1 < n else None, 10)
        for i, s in enumerate(starts)
    ]


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'state.db'}"
    return request.getfixturevalue("pg_url")


@pytest.fixture
def slices(store: StateStore) -> BackfillSlices:
    return BackfillSlices(store.engine)


def test_a_plan_is_stored_as_pending_slices_in_order(slices: BackfillSlices) -> None:
    first = slices.create_plan("p1", _ranges(3))
    second = slices.create_plan("p1", _ranges(2))
    assert second == first + 1
    plan = slices.slices(first)
    assert [s.index for s in plan] == [0, 1, 2]
    assert {s.state for s in plan} == {PENDING}
    assert plan[0].since == T0 and plan[-1].until is None
    assert plan[0].until == plan[1].since - timedelta(microseconds=1)


def test_workers_never_get_the_same_slice(url: str) -> None:
    store = StateStore(url)
    try:
        plans = BackfillSlices(store.engine)
        backfill_id = plans.create_plan("p1", _ranges(24))
        got: Counter[int] = Counter()
        start = threading.Barrier(6)

        def worker(n: int) -> None:
            start.wait()
            while (s := plans.claim(f"w{n}", TTL, pipeline="p1")) is not None:
                got[s.index] += 1
                assert plans.finish(s, f"w{n}", {"created": 1})

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert got == Counter(range(24)), "every slice claimed exactly once"
        assert {s.state for s in plans.slices(backfill_id)} == {DONE}
    finally:
        store.close()


def test_an_expired_lease_is_taken_over_and_the_old_owner_is_shut_out(
    slices: BackfillSlices, store: StateStore
) -> None:
    backfill_id = slices.create_plan("p1", _ranges(1))
    short = timedelta(milliseconds=200)
    dead = slices.claim("dead", short, pipeline="p1")
    assert dead is not None and dead.state == RUNNING
    run_id = store.start_run("p1", "backfill", "dead")
    assert slices.claim("alive", TTL, pipeline="p1") is None  # the lease still holds
    time.sleep(0.3)
    taken = slices.claim("alive", TTL, pipeline="p1")
    assert taken is not None and taken.index == dead.index and taken.owner == "alive"
    assert taken.attempts == 2
    # The dead worker's run will never finish: it is recorded as interrupted.
    assert store.last_run("p1").id == run_id and store.last_run("p1").status == "interrupted"
    # Woken up, the old owner can neither renew nor finish the slice.
    assert not slices.renew(dead, "dead", TTL)
    assert not slices.finish(dead, "dead", {"created": 99})
    assert not slices.fail(dead, "dead", "late", {})
    assert slices.finish(taken, "alive", {"created": 1})
    assert slices.slices(backfill_id)[0].counts == {"created": 1}


def test_a_renewed_lease_is_not_taken_over(slices: BackfillSlices) -> None:
    slices.create_plan("p1", _ranges(1))
    short = timedelta(milliseconds=300)
    s = slices.claim("a", short, pipeline="p1")
    assert s is not None
    for _ in range(4):
        time.sleep(0.1)
        assert slices.renew(s, "a", short)
        assert slices.claim("b", TTL, pipeline="p1") is None


def test_a_done_slice_is_never_run_again(slices: BackfillSlices) -> None:
    backfill_id = slices.create_plan("p1", _ranges(1))
    s = slices.claim("a", timedelta(milliseconds=50), pipeline="p1")
    assert s is not None and slices.finish(s, "a", {"created": 3})
    time.sleep(0.1)  # past its old lease
    assert slices.claim("b", TTL, pipeline="p1") is None
    assert slices.retry_failed(backfill_id) == 0
    assert slices.claim("b", TTL, pipeline="p1", backfill_id=backfill_id) is None
    assert slices.slices(backfill_id)[0].state == DONE


def test_a_failed_slice_waits_for_retry_failed(slices: BackfillSlices) -> None:
    backfill_id = slices.create_plan("p1", _ranges(2))
    s = slices.claim("a", TTL, pipeline="p1")
    assert s is not None and slices.fail(s, "a", "hubspot: 401 unauthorized", {"read": 5})
    other = slices.claim("a", TTL, pipeline="p1")
    assert other is not None and other.index == 1  # the failed one is not handed out
    assert slices.claim("b", TTL, pipeline="p1") is None
    failed = slices.slices(backfill_id)[0]
    assert failed.state == FAILED and failed.error == "hubspot: 401 unauthorized"
    assert slices.retry_failed(backfill_id) == 1
    again = slices.claim("b", TTL, pipeline="p1")
    assert again is not None and again.index == 0 and again.error is None


def test_a_released_slice_is_pending_at_once(slices: BackfillSlices) -> None:
    slices.create_plan("p1", _ranges(1))
    s = slices.claim("a", TTL, pipeline="p1")
    assert s is not None and slices.release(s, "a", count_attempt=False)
    again = slices.claim("b", TTL, pipeline="p1")
    assert again is not None and again.attempts == 1


def test_a_slice_whose_workers_keep_dying_is_failed(slices: BackfillSlices) -> None:
    backfill_id = slices.create_plan("p1", _ranges(1))
    for n in range(MAX_ATTEMPTS):
        assert slices.claim(f"w{n}", timedelta(milliseconds=1), pipeline="p1") is not None
        time.sleep(0.01)
    assert slices.claim("next", TTL, pipeline="p1") is None
    s = slices.slices(backfill_id)[0]
    assert s.state == FAILED and "abandoned" in (s.error or "")


def test_claims_stay_within_the_pipeline_and_plan_asked_for(slices: BackfillSlices) -> None:
    a = slices.create_plan("p1", _ranges(1))
    b = slices.create_plan("p2", _ranges(1))
    assert slices.claim("w", TTL, pipeline="p2", backfill_id=a) is None
    got = slices.claim("w", TTL, pipeline="p2")
    assert got is not None and got.backfill_id == b


def test_finishing_forgets_the_slice_checkpoint_but_not_the_pipeline_cursor(
    slices: BackfillSlices, store: StateStore
) -> None:
    slices.create_plan("p1", _ranges(1))
    s = slices.claim("a", TTL, pipeline="p1")
    assert s is not None
    here = Cursor(T0, "7")
    store.set_cursor("p1", slice_stream(s.backfill_id, s.index), here)
    store.set_cursor("p1", "deals", here)
    assert slices.finish(s, "a", {})
    assert store.cursors("p1") == {"deals": here}


def test_the_shared_pipeline_lease_goes_only_when_no_slice_is_left(
    slices: BackfillSlices, store: StateStore
) -> None:
    backfill_id = slices.create_plan("p1", _ranges(2))
    holder = backfill_holder(backfill_id)
    assert store.acquire_lease("p1", holder, TTL)
    first = slices.claim("a", TTL, pipeline="p1")
    assert first is not None and slices.finish(first, "a", {})
    assert not slices.release_pipeline_lease_if_idle("p1", backfill_id)  # one still pending
    assert store.lease("p1").owner == holder
    second = slices.claim("b", TTL, pipeline="p1")
    assert second is not None and slices.finish(second, "b", {})
    assert slices.release_pipeline_lease_if_idle("p1", backfill_id)
    assert store.lease("p1") is None


def test_migrating_from_0001_adds_the_table_and_keeps_the_data(url: str) -> None:
    from sqlalchemy import inspect

    from state import migrate
    from state.store import make_engine

    engine = make_engine(url)
    try:
        migrate.upgrade(engine, "0001")  # a database left by the previous release
        with engine.begin() as conn:  # as the previous release wrote its cursors
            conn.execute(
                CursorRow.__table__.insert().values(
                    pipeline="p1", stream="deals", modified_at=T0, record_id="7", updated_at=T0
                )
            )
        assert migrate.status(engine).state == "behind"
        assert migrate.upgrade(engine) == ("0001", migrate.head())
        old = StateStore(url, create=False)
        with engine.connect() as conn:
            assert "backfill_slices" in inspect(conn).get_table_names()
        assert old.get_cursor("p1", "deals") == Cursor(T0, "7")
        assert BackfillSlices(engine).create_plan("p1", _ranges(2)) == 1
        old.close()
    finally:
        engine.dispose()
