"""The shared HTTP layer on hand-built responses: what is retried, what is not, Retry-After."""

from __future__ import annotations

from collections import Counter

import httpx
import pytest

from connectors.asana import AsanaHttp
from connectors.errors import ConnectorError, ErrorKind
from connectors.http import JsonApi, RateBudget, RetryPolicy, parse_retry_after
from connectors.secrets import register_secret

FAST = RetryPolicy(attempts=4, initial_wait=0.001, max_wait=0.002, max_retry_after=0.01)


def api(handler, policy: RetryPolicy = FAST) -> tuple[JsonApi, Counter]:
    calls: Counter = Counter()
    client = httpx.Client(base_url="http://vendor.test", transport=httpx.MockTransport(handler))
    return JsonApi(AsanaHttp("asana"), client, policy, RateBudget([]), calls), calls


def scripted(*responses):
    queue = list(responses)

    def handler(request: httpx.Request) -> httpx.Response:
        item = queue.pop(0)
        if isinstance(item, Exception):
            raise item
        return item

    return handler


def test_429_is_retried_honouring_retry_after_then_succeeds():
    rl = httpx.Response(429, headers={"Retry-After": "0"}, json={"errors": [{"message": "chill"}]})
    client, calls = api(scripted(rl, rl, httpx.Response(200, json={"data": 1})))
    assert client.request("GET", "/x", route="GET /x") == {"data": 1}
    assert calls["GET /x"] == 3


@pytest.mark.parametrize("status", [500, 502, 503, 504])
def test_5xx_is_retried(status):
    client, calls = api(scripted(httpx.Response(status), httpx.Response(200, json={"ok": True})))
    assert client.request("GET", "/x", route="r") == {"ok": True}
    assert calls["r"] == 2


@pytest.mark.parametrize(
    "status,kind",
    [
        (400, ErrorKind.RECORD),
        (404, ErrorKind.RECORD),
        (422, ErrorKind.RECORD),
        (401, ErrorKind.AUTH),
        (403, ErrorKind.AUTH),
    ],
)
def test_client_errors_are_never_retried(status, kind):
    body = {"errors": [{"message": "bad thing"}]}
    client, calls = api(scripted(httpx.Response(status, json=body)))
    with pytest.raises(ConnectorError) as exc:
        client.request("POST", "/x", route="r")
    assert calls["r"] == 1
    assert exc.value.kind is kind and exc.value.status == status
    assert "bad thing" in str(exc.value)


def test_timeouts_and_dropped_connections_are_retried_until_the_budget_is_spent():
    failures = [httpx.ReadTimeout("slow"), httpx.RemoteProtocolError("dropped")] * 2
    client, calls = api(scripted(*failures))
    with pytest.raises(ConnectorError) as exc:
        client.request("GET", "/x", route="r")
    assert exc.value.kind is ErrorKind.TRANSIENT
    assert calls["r"] == FAST.attempts


def test_a_secret_echoed_by_the_vendor_never_reaches_the_error():
    register_secret("tok-very-secret-value")
    body = {"errors": [{"message": "token tok-very-secret-value is invalid"}]}
    client, _ = api(scripted(httpx.Response(401, json=body)))
    with pytest.raises(ConnectorError) as exc:
        client.request("GET", "/x", route="r")
    assert "tok-very-secret-value" not in str(exc.value)


def test_retry_after_parsing():
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None


def test_server_clock_is_the_date_header_less_its_truncated_second():
    from datetime import UTC, datetime

    from connectors.http import server_clock

    assert server_clock("Mon, 23 Nov 2026 14:00:05 GMT") == datetime(
        2026, 11, 23, 14, 0, 4, tzinfo=UTC
    )
    assert server_clock("Mon, 23 Nov 2026 15:00:05 +0100") == datetime(
        2026, 11, 23, 14, 0, 4, tzinfo=UTC
    )
    assert server_clock(None) is None
    assert server_clock("yesterday-ish") is None


def test_server_now_runs_on_from_the_newest_date_any_answer_carried(monkeypatch):
    from datetime import UTC, datetime, timedelta

    from connectors import http

    mono = [1000.0]
    monkeypatch.setattr(http.time, "monotonic", lambda: mono[0])
    dates = [
        "Mon, 23 Nov 2026 14:00:05 GMT",
        "Mon, 23 Nov 2026 13:59:00 GMT",
        None,
        "Mon, 23 Nov 2026 14:00:05 GMT",
    ]
    client, _ = api(lambda r: httpx.Response(200, json={}, headers={"Date": dates.pop(0) or ""}))
    assert client.server_now() is None  # no answer yet

    client.request("GET", "/a", route="a")
    assert client.server_now() == datetime(2026, 11, 23, 14, 0, 4, tzinfo=UTC)
    mono[0] += 30
    # A slow answer's older Date, and an answer without one, do not move the estimate back.
    client.request("GET", "/b", route="b")
    client.request("GET", "/c", route="c")
    # The same Date again (a cached text) keeps its first arrival: the earlier estimate.
    client.request("GET", "/d", route="d")
    assert client.server_now() == datetime(2026, 11, 23, 14, 0, 4, tzinfo=UTC) + timedelta(
        seconds=30
    )


def test_a_vendors_retry_after_holds_the_budget_no_longer_than_the_policys_cap():
    import time

    rl = httpx.Response(429, headers={"Retry-After": "30"}, json={"errors": [{"message": "x"}]})
    client, _ = api(scripted(rl, httpx.Response(200, json={"data": 1})))
    started = time.monotonic()
    assert client.request("GET", "/x", route="GET /x") == {"data": 1}
    assert client.budget._paused_until <= started + FAST.max_retry_after + 0.5


class FakeClock:
    """time.time/monotonic/sleep for connectors.http: sleeping moves the clock."""

    def __init__(self) -> None:
        self.now = 1_000_000.0
        self.slept: list[float] = []

    def time(self) -> float:
        return self.now

    monotonic = time

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += max(0.0, seconds)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    import connectors.http as http

    fake = FakeClock()
    monkeypatch.setattr(http, "time", fake)
    return fake


def sent(budget: RateBudget, n: int) -> None:
    for _ in range(n):
        budget.acquire()
        budget.answered()


def test_a_reported_fixed_window_is_spent_then_waited_out_to_its_reset(clock: FakeClock):
    budget = RateBudget([(100, 60.0)])
    budget.acquire()
    budget.server_window(remaining=3, reset_at=clock.now + 40)
    budget.answered()
    sent(budget, 3)
    assert clock.slept == []  # what the vendor said was left went at once
    sent(budget, 1)
    assert clock.slept == [pytest.approx(40.0)]  # the fourth waited for the reset


def test_a_stall_in_one_window_costs_nothing_in_the_next(clock: FakeClock):
    # Sliding-log pacing would release the second minute's requests at the pace the first
    # minute sent them (stall included); the vendor's fixed window gives them all at once.
    budget = RateBudget([(10, 60.0)])
    for i in range(10):
        budget.acquire()
        budget.server_window(remaining=9 - i, reset_at=1_000_060.0)
        budget.answered()
        if i == 4:
            clock.sleep(30)  # a stall half way through the first minute
    before = list(clock.slept)
    budget.acquire()  # the eleventh: waits for the reset at t=60, no longer
    assert clock.slept[len(before) :] == [pytest.approx(30.0)] and clock.now == 1_000_060.0
    budget.server_window(remaining=9, reset_at=1_000_120.0)
    budget.answered()
    sent(budget, 9)
    assert clock.now == 1_000_060.0  # the whole new window at once: nothing carried over


def test_requests_in_flight_count_against_what_the_window_says_is_left(clock: FakeClock):
    budget = RateBudget([])
    for _ in range(3):
        budget.acquire()  # three sent, none answered yet
    budget.server_window(remaining=5, reset_at=clock.now + 30)  # the first answer
    budget.answered()
    # The two still in flight may be counted after that answer: 3 more may go, not 5.
    sent(budget, 3)
    assert clock.slept == []
    sent(budget, 1)
    assert clock.slept == [pytest.approx(30.0)]


def test_a_late_answer_from_a_past_window_does_not_reopen_the_budget(clock: FakeClock):
    budget = RateBudget([])
    budget.acquire()
    budget.server_window(remaining=0, reset_at=clock.now + 20)
    budget.answered()
    budget.acquire()
    budget.server_window(remaining=4999, reset_at=clock.now - 40)  # an old window's answer
    budget.answered()
    assert clock.slept == [pytest.approx(20.0)]
    budget.acquire()  # the first of the next window: allowed, no count yet
    assert clock.slept == [pytest.approx(20.0)]


def test_without_a_current_report_the_documented_rate_paces(clock: FakeClock):
    budget = RateBudget([(2, 60.0)])
    budget.acquire()
    budget.server_window(remaining=100, reset_at=clock.now + 10)
    budget.answered()
    clock.now += 11  # that window is over and nothing reported the next
    calls = []
    budget._limiter = type("L", (), {"try_acquire": lambda self, k: calls.append(k)})()
    sent(budget, 2)
    assert calls == ["default", "default"]
