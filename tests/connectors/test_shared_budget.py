"""Rate budgets shared between replicas: separate processes built from one config, each
spending one HubSpot connection's search budget flat out, together stay within it; the
vendor's pause reaches every replica; a dead budget store stops calls instead of unpacing them.

Redis tests run when Redis answers on REDIS_URL (default redis://127.0.0.1:6379/0); PostgreSQL
tests when HANDOFF_TEST_DATABASE_URL is set. Each test has its own key prefix / schema.
"""

from __future__ import annotations

import multiprocessing
import os
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pyrate_limiter import Rate, RateItem

from connectors.errors import ConnectorError, ErrorKind
from connectors.http import RetryPolicy
from connectors.shared_budget import (
    PostgresBudgetBackend,
    RedisBudgetBackend,
    SharedBudgetBackend,
    SharedBudgets,
    bucket_key,
    postgres_table,
)
from sync.config import libpq_url, load_config
from sync.runner import Connections
from tests.state.conftest import pg_url  # noqa: F401 - the per-test PostgreSQL schema fixture

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
LIMIT, WINDOW = 5, 1.0  # the budget under test: HubSpot search, 5 requests a second
# The store stamps a request a moment before `acquire` returns and the test notes the time (a
# round trip, longer on a busy host): windows are checked this much short of WINDOW.
STAMP_SLACK = 0.1
RUN_SECONDS = 2.6  # a little over two windows, flat out

CONFIG = """\
version: 1
state:
  url: {state_url}
rate_budget:
  shared: {shared}
{extra}connections:
  hs:
    kind: hubspot
    base_url: http://127.0.0.1:9
    auth:
      token: ${{HS_TOKEN}}
    search_per_second: {limit}
  as:
    kind: asana
    base_url: http://127.0.0.1:9
    auth:
      token: ${{AS_TOKEN}}
    workspace: Acme
    team: Delivery
pipelines:
  - name: main
    source: hs
    target: as
    mapping: preset:hubspot-asana
"""


@pytest.fixture(autouse=True)
def tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HS_TOKEN", "pat-na1-shared-budget-test")
    monkeypatch.setenv("AS_TOKEN", "2/asana-shared-budget-test")


def redis_url() -> str:
    import redis

    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1).ping()
    except redis.RedisError as exc:
        pytest.skip(f"Redis not reachable at {REDIS_URL} ({exc}): Redis budget tests skipped")
    return REDIS_URL


def write_config(tmp_path: Path, shared: str, state_url: str, extra: str = "") -> Path:
    path = tmp_path / f"handoff-{shared}.yaml"
    path.write_text(
        CONFIG.format(
            state_url=state_url,
            shared=shared,
            extra=textwrap.indent(extra, "  "),
            limit=LIMIT,
        )
    )
    return path


@pytest.fixture(params=["redis", "postgres"])
def shared_config(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    """A config whose budgets are shared through Redis or through the state database (its
    own key prefix, its own schema; both removed afterwards)."""
    prefix = f"test-{uuid.uuid4().hex[:10]}"
    if request.param == "postgres":
        state_url = request.getfixturevalue("pg_url")
        yield write_config(tmp_path, "postgres", state_url, f"key_prefix: {prefix}\n")
        return
    import redis

    url = redis_url()
    extra = f"url: {url}\nkey_prefix: {prefix}\n"
    yield write_config(tmp_path, "redis", f"sqlite:///{tmp_path}/state.db", extra)
    with redis.Redis.from_url(url) as client:
        keys = list(client.scan_iter(f"{prefix}:*"))
        if keys:
            client.delete(*keys)


# -- replicas: separate processes ------------------------------------------------------------
def replica(config: str, ready: object, go: object, results: object, seconds: float) -> None:
    """One `handoff run`-like process: the connectors its config builds, spending the HubSpot
    search budget as fast as it admits, noting when each request would have gone out."""
    os.environ.setdefault("HS_TOKEN", "pat-na1-shared-budget-test")
    os.environ.setdefault("AS_TOKEN", "2/asana-shared-budget-test")
    connections = Connections(load_config(config))
    budget = connections.get("hs").search_budget  # type: ignore[attr-defined]
    ready.put(os.getpid())  # type: ignore[attr-defined]
    go.wait()  # type: ignore[attr-defined]
    sent: list[float] = []
    end = time.time() + seconds
    while time.time() < end:
        budget.acquire()
        sent.append(time.time())
    results.put(sent)  # type: ignore[attr-defined]


def run_replicas(config: Path, count: int) -> list[list[float]]:
    # Forked, so that the replicas start in a moment (each builds its own connections and
    # store client after the fork); spawning fresh interpreters costs seconds of imports.
    ctx = multiprocessing.get_context("fork")
    ready, go, results = ctx.Queue(), ctx.Event(), ctx.Queue()
    procs = [
        ctx.Process(target=replica, args=(str(config), ready, go, results, RUN_SECONDS))
        for _ in range(count)
    ]
    for p in procs:
        p.start()
    try:
        for _ in procs:  # imports and config load, so that all start spending together
            ready.get(timeout=60)
        go.set()
        sent = [results.get(timeout=30) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return sent


def busiest_window(stamps: list[float], window: float) -> int:
    """The most requests in any sliding window of `window` seconds."""
    ordered, first, most = sorted(stamps), 0, 0
    for last, at in enumerate(ordered):
        while at - ordered[first] >= window:
            first += 1
        most = max(most, last - first + 1)
    return most


def test_replicas_sharing_a_budget_stay_within_it_together(shared_config: Path) -> None:
    sent = run_replicas(shared_config, 4)
    stamps = [t for one in sent for t in one]
    assert busiest_window(stamps, WINDOW - STAMP_SLACK) <= LIMIT, sorted(stamps)
    # The budget is spent, not starved: about LIMIT per window over the run.
    assert len(stamps) >= LIMIT * 2, [len(one) for one in sent]


def test_control_replicas_pacing_alone_exceed_the_budget(tmp_path: Path) -> None:
    """Why the budget must be shared: the same replicas with `shared: none` together send
    the budget once per replica (so the test above can fail)."""
    config = write_config(tmp_path, "none", f"sqlite:///{tmp_path}/state.db")
    sent = run_replicas(config, 4)
    assert all(busiest_window(one, WINDOW - STAMP_SLACK) <= LIMIT for one in sent)
    assert busiest_window([t for one in sent for t in one], WINDOW - STAMP_SLACK) > LIMIT


# -- one store, seen from two replicas -------------------------------------------------------
@pytest.fixture
def two_replicas(shared_config: Path) -> Iterator[tuple[SharedBudgets, SharedBudgets]]:
    """Two sets of budgets on separate clients/pools to the same store (as two processes)."""
    shared = load_config(shared_config).shared_budget
    backend: type[SharedBudgetBackend] = (
        RedisBudgetBackend if shared.shared == "redis" else PostgresBudgetBackend
    )
    assert shared.url
    one = SharedBudgets(backend(shared.url), shared.key_prefix)
    two = SharedBudgets(backend(shared.url), shared.key_prefix)
    yield one, two
    one.backend.close()
    two.backend.close()


def test_a_vendor_pause_holds_every_replica_back(
    two_replicas: tuple[SharedBudgets, SharedBudgets],
) -> None:
    one, two = two_replicas
    paused = one.for_connection("clickup", "cu")("requests", [(100, 60.0)])
    other = two.for_connection("clickup", "cu")("requests", [(100, 60.0)])
    elsewhere = two.for_connection("clickup", "cu-other-token")("requests", [(100, 60.0)])
    for budget in (paused, other, elsewhere):
        budget.acquire()  # builds the store's tables before the clock starts
    paused.pause(1.0)
    paused.pause(0.1)  # a shorter pause never shortens a longer one
    started = time.monotonic()
    elsewhere.acquire()
    assert time.monotonic() - started < 0.5  # another connection is not paused
    other.acquire()
    assert time.monotonic() - started >= 0.9


def test_budgets_are_per_connection_and_shared_by_name(
    two_replicas: tuple[SharedBudgets, SharedBudgets],
) -> None:
    one, two = two_replicas
    rates = [(3, 2.0)]
    mine = one.for_connection("hubspot", "hs")("requests", rates)
    same = two.for_connection("hubspot", "hs")("requests", rates)
    other = two.for_connection("hubspot", "hs2")("requests", rates)
    started = time.monotonic()
    for _ in range(3):
        mine.acquire()
    for _ in range(3):
        other.acquire()
    other_done = time.monotonic() - started
    same.acquire()
    same_done = time.monotonic() - started
    assert other_done < 1.5  # a second connection has its own budget
    assert same_done >= 1.9  # the same connection in another replica waits out the window


def test_requests_stamped_a_moment_later_by_another_replica_still_count(
    two_replicas: tuple[SharedBudgets, SharedBudgets],
) -> None:
    """Replicas stamp requests just before the store checks them: one that read its clock a
    moment before another's requests landed must still see them (or both find room)."""
    one, two = two_replicas
    rates = [Rate(LIMIT, int(WINDOW * 1000))]
    key = bucket_key(one.key_prefix, "hubspot", "hs", "search")
    racing, late = one.backend.bucket(key, rates), two.backend.bucket(key, rates)
    stale = racing.now()
    for _ in range(LIMIT):
        assert late.put(RateItem("late", stale + 20))
    assert not racing.put(RateItem("stale", stale))


def test_keys_name_the_connection_and_fit_postgres_identifiers() -> None:
    assert bucket_key("handoff", "clickup", "cu", "requests") == "handoff:clickup:cu:requests"
    long_a = bucket_key("handoff", "salesforce", "x" * 80 + "a", "near_limit")
    long_b = bucket_key("handoff", "salesforce", "x" * 80 + "b", "near_limit")
    assert postgres_table(long_a) != postgres_table(long_b)
    # pyrate-limiter prefixes "timestampindex_" (15) to the name; PostgreSQL keeps 63 bytes.
    assert len(postgres_table(long_a)) + 15 <= 63


# -- a dead store --------------------------------------------------------------------------
def test_an_unreachable_store_stops_the_run_without_calling_the_vendor(tmp_path: Path) -> None:
    config = write_config(
        tmp_path,
        "redis",
        f"sqlite:///{tmp_path}/state.db",
        "url: redis://:budget-store-pass@127.0.0.1:1/0\n",
    )
    loaded = load_config(config)
    settings = loaded.config.connections["as"].model_copy(
        update={"retry": RetryPolicy(attempts=2, initial_wait=0.001, max_wait=0.002)}
    )
    sent: list[httpx.Request] = []

    def vendor(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(200, json={"data": []})

    from connectors.asana import AsanaProjects
    from connectors.shared_budget import shared_budgets

    budgets = shared_budgets(loaded.shared_budget)
    assert budgets is not None
    asana = AsanaProjects(
        "as",
        settings,
        httpx.MockTransport(vendor),
        budgets=budgets.for_connection("asana", "as"),
    )
    with pytest.raises(ConnectorError) as caught:
        asana.api.request("GET", "/workspaces", route="GET /workspaces")
    assert caught.value.kind is ErrorKind.UNREACHABLE  # exit 3, like a vendor that is down
    assert "shared rate budget (Redis at redis://127.0.0.1:1/0)" in str(caught.value)
    assert "budget-store-pass" not in str(caught.value)
    assert sent == []


def test_postgres_budgets_live_in_the_state_schema(pg_url: str) -> None:  # noqa: F811
    import psycopg

    pg_conninfo = libpq_url(pg_url)
    budgets = SharedBudgets(PostgresBudgetBackend(pg_conninfo), "t")
    budget = budgets.for_connection("clickup", "cu")("requests", [(10, 60.0)])
    budget.acquire()
    budget.pause(0.01)
    with psycopg.connect(pg_conninfo) as conn:
        schema = conn.execute("SELECT current_schema()").fetchone()
        tables = {
            row[0]
            for row in conn.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = %s",
                schema,
            )
        }
    assert tables == {
        "ratelimit___" + postgres_table("t:clickup:cu:requests"),
        "handoff_rate_pause",
    }
