"""The state store on SQLite and on PostgreSQL (same code, a URL apart): claims and leases are
exclusive under concurrency, a page commits atomically, dead letters count their attempts."""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from connectors.base import Cursor
from state.store import Link, PageCommit, Parked, StateStore

PG_URL = os.environ.get("HANDOFF_TEST_DATABASE_URL")


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path) -> Iterator[StateStore]:
    if request.param == "sqlite":
        s = StateStore(f"sqlite:///{tmp_path / 'state.db'}")
        yield s
        s.close()
        return
    if not PG_URL:
        pytest.skip("HANDOFF_TEST_DATABASE_URL not set: PostgreSQL tests skipped")
    import sqlalchemy as sa

    schema = f"handoff_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(PG_URL)
    with admin.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    sep = "&" if "?" in PG_URL else "?"
    s = StateStore(f"{PG_URL}{sep}options=-csearch_path%3D{schema}")
    try:
        yield s
    finally:
        s.close()
        with admin.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def _race(n: int, fn) -> list:
    barrier = threading.Barrier(n)
    results: list = [None] * n

    def worker(i: int) -> None:
        barrier.wait()
        results[i] = fn(i)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_exactly_one_of_many_concurrent_claims_wins(store):
    for deal in range(5):
        wins = _race(8, lambda i, d=deal: store.claim("p", f"deal-{d}")[0])
        assert wins.count(True) == 1


def test_a_lease_has_one_holder_under_contention_and_expires(store):
    holders = _race(8, lambda i: store.acquire_lease("p", f"owner-{i}", timedelta(minutes=5)))
    assert holders.count(True) == 1
    winner = f"owner-{holders.index(True)}"
    assert store.lease("p").owner == winner
    assert store.acquire_lease("p", winner, timedelta(seconds=-1))  # renew (here: expire)
    assert store.acquire_lease("p", "next", timedelta(minutes=5))  # expired: taken over
    assert not store.acquire_lease("p", winner, timedelta(minutes=5))


def test_a_page_commits_links_cursor_seen_and_dead_letters_together(store):
    store.claim("p", "a")
    now = datetime(2025, 1, 1, tzinfo=UTC)
    page = PageCommit("p", "deals", cursor=Cursor(now, "b"))
    page.link_updates.append(Link("p", "a", "created", "proj-1", forward_prints={"x": "1"}))
    page.seen.append(("a", now))
    page.parked.append(Parked("deals", "b", "map", "record", "bad amount"))
    store.commit_page(page)
    assert store.get_cursor("p", "deals") == Cursor(now, "b")
    assert store.link("p", "a").project_id == "proj-1"
    assert store.seen_marks("p", "deals", ["a"]) == {"a": now}
    (dl,) = store.dead_letters("p")
    assert (dl.record_id, dl.step, dl.attempts) == ("b", "map", 1)

    again = PageCommit("p", "deals")
    again.parked.append(Parked("deals", "b", "map", "record", "still bad"))
    again.link_updates.append(Link("p", "missing", "created", None))
    store.commit_page(again)
    assert store.dead_letters("p")[0].attempts == 2

    broken = PageCommit("p", "deals", cursor=Cursor(now + timedelta(days=1), "z"))
    broken.seen.append(("c", "not a datetime"))  # the page fails as a whole
    with pytest.raises(Exception):  # noqa: B017 - any database error
        store.commit_page(broken)
    assert store.get_cursor("p", "deals") == Cursor(now, "b")  # nothing of it landed


def test_claim_many_splits_a_page_between_concurrent_claimers(store: StateStore) -> None:
    """Two runs claim overlapping pages of 450 deals (three statements each) at once: every
    deal goes to exactly one of them, and a later claim of the same deals gets none."""
    ids = [f"d{i:04d}" for i in range(450)]
    results: list[set[str]] = []
    barrier = threading.Barrier(2)

    def claim(order: list[str]) -> None:
        barrier.wait()
        results.append(store.claim_many("p", order))

    threads = [
        threading.Thread(target=claim, args=(ids,)),
        threading.Thread(target=claim, args=(ids[::-1] + ids[:5],)),  # repeats are ignored
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    first, second = results
    assert not first & second
    assert first | second == set(ids)
    assert store.claim_many("p", ids) == set()
    links = store.links_for("p", ids)
    assert len(links) == 450 and {li.state for li in links.values()} == {"pending"}
    assert links["d0001"].forward_prints == {} and links["d0001"].milestones == {}
