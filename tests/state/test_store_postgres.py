"""The state store on PostgreSQL (and the same checks on SQLite): claims and leases under
concurrent threads, the page transaction's atomicity, dead letters."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from connectors.base import Cursor
from state.store import Link, PageCommit, Parked, StateStore

THREADS = 12


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StateStore]:
    if request.param == "postgres":
        url = request.getfixturevalue("pg_url")
        StateStore(url, create=False).migrate()
    else:
        url = f"sqlite:///{tmp_path / 'state.db'}"
    s = StateStore(url)
    yield s
    s.close()


def _race(n: int, fn: Callable[[int], object]) -> list:
    """Run fn(i) on n threads released at once."""
    gate = threading.Barrier(n)

    def go(i: int) -> object:
        gate.wait()
        return fn(i)

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(go, range(n)))


def test_claim_has_exactly_one_winner(store: StateStore) -> None:
    for deal in ("d1", "d2", "d3"):
        results = _race(THREADS, lambda _i, deal=deal: store.claim("p", deal))
        winners = [r for r in results if r[0]]
        assert len(winners) == 1
        assert all(link.state == "pending" and link.deal_id == deal for _, link in results)
    assert store.link_counts("p") == {"pending": 3}


def test_claim_from_separate_engines(store: StateStore) -> None:
    """As from separate replicas: one engine (connection pool) each."""
    others = [StateStore(store.url) for _ in range(4)]
    try:
        results = _race(4, lambda i: others[i].claim("p", "deal-x")[0])
        assert sum(results) == 1
    finally:
        for o in others:
            o.close()


def test_lease_exclusive_under_concurrent_acquirers(store: StateStore) -> None:
    ttl = timedelta(seconds=30)
    for round_ in range(5):
        results = _race(THREADS, lambda i, r=round_: store.acquire_lease("p", f"o{r}-{i}", ttl))
        assert sum(results) == 1, results
        holder = store.lease("p")
        assert holder is not None
        winner = f"o{round_}-{results.index(True)}"
        assert holder.owner == winner
        # While held, nobody else gets it; the holder renews.
        assert not store.acquire_lease("p", "intruder", ttl)
        assert store.renew_lease("p", winner, ttl)
        assert store.acquire_lease("p", winner, ttl)
        store.release_lease("p", winner)
        assert store.lease("p") is None


def test_expired_lease_is_taken_over_by_exactly_one(store: StateStore) -> None:
    assert store.acquire_lease("p", "dead", timedelta(seconds=-1))  # already expired
    assert store.lease("p") is None
    results = _race(THREADS, lambda i: store.acquire_lease("p", f"o{i}", timedelta(seconds=30)))
    assert sum(results) == 1
    # The old holder cannot renew, nor silently re-take a lease that is held.
    assert not store.renew_lease("p", "dead", timedelta(seconds=30))
    assert not store.acquire_lease("p", "dead", timedelta(seconds=30))


def test_lease_expires_and_passes_on(store: StateStore) -> None:
    assert store.acquire_lease("p", "a", timedelta(seconds=1))
    assert not store.acquire_lease("p", "b", timedelta(seconds=1))
    time.sleep(1.2)
    assert store.acquire_lease("p", "b", timedelta(seconds=5))
    assert not store.renew_lease("p", "a", timedelta(seconds=5))
    assert store.lease("p").owner == "b"  # type: ignore[union-attr]


def test_take_over_is_compare_and_set(store: StateStore) -> None:
    assert store.acquire_lease("p", "dead", timedelta(minutes=5))
    results = _race(
        THREADS, lambda i: store.take_over_lease("p", "dead", f"o{i}", timedelta(minutes=5))
    )
    assert sum(results) == 1


def _ts(minute: int) -> datetime:
    return datetime(2024, 5, 1, 12, minute, tzinfo=UTC)


def test_commit_page_is_atomic(store: StateStore) -> None:
    store.claim("p", "d1")
    store.set_cursor("p", "deals", Cursor(_ts(0), "a"))
    linked = Link("p", "d1", "created", "proj-1", forward_prints={"name": "x"})
    bad = PageCommit(
        pipeline="p",
        stream="deals",
        cursor=Cursor(_ts(9), "z"),
        link_updates=[linked],
        seen=[("d1", _ts(9))],
        parked=[Parked("deals", "d2", "map", "permanent", None)],  # type: ignore[arg-type]
    )
    with pytest.raises(Exception):  # noqa: B017 - the NOT NULL violation, per driver
        store.commit_page(bad)
    # Nothing of the page is visible: cursor, link, seen marks, dead letters.
    assert store.get_cursor("p", "deals") == Cursor(_ts(0), "a")
    assert store.link("p", "d1").state == "pending"  # type: ignore[union-attr]
    assert store.seen_marks("p", "deals", ["d1"]) == {}
    assert store.dead_letters("p") == []

    good = PageCommit(
        pipeline="p",
        stream="deals",
        cursor=Cursor(_ts(9), "z"),
        link_updates=[linked],
        seen=[("d1", _ts(9))],
        parked=[Parked("deals", "d2", "map", "permanent", "bad amount")],
    )
    store.commit_page(good)
    assert store.get_cursor("p", "deals") == Cursor(_ts(9), "z")
    got = store.link("p", "d1")
    assert got is not None and got.project_id == "proj-1" and got.forward_prints == {"name": "x"}
    assert store.seen_marks("p", "deals", ["d1"]) == {"d1": _ts(9)}
    assert [d.record_id for d in store.dead_letters("p")] == ["d2"]


def test_dead_letters_count_attempts_back_off_and_clear(store: StateStore) -> None:
    page = PageCommit("p", "deals", parked=[Parked("deals", "d1", "create", "transient", "503")])
    store.commit_page(page)
    store.commit_page(page)
    [dl] = store.dead_letters("p")
    assert dl.attempts == 2 and dl.next_retry_at is not None
    assert dl.next_retry_at - dl.last_failed_at == timedelta(minutes=5)
    assert store.dead_letters("p", due_only=True) == []
    assert store.dead_letter_count("p") == 1
    store.commit_page(PageCommit("p", "deals", resolved=["d1"]))
    assert store.dead_letters("p") == []
    store.commit_page(
        PageCommit("p", "deals", parked=[Parked("deals", "d9", "map", "permanent", "no")])
    )
    [dl] = store.dead_letters("p")
    assert dl.next_retry_at is None
    assert store.drop_dead_letter(dl.id) and store.dead_letter(dl.id) is None


def test_runs_are_recorded(store: StateStore) -> None:
    rid = store.start_run("p", "sync", "me")
    assert store.running("p") is not None
    store.finish_run(rid, "ok", {"created": 3, "api_calls": {"crm": 2}})
    last = store.last_run("p")
    assert last is not None and last.created == 3 and last.api_calls == {"crm": 2}
    assert last.finished_at is not None
