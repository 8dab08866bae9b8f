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


def test_a_vendors_retry_after_holds_the_budget_no_longer_than_the_policys_cap():
    import time

    rl = httpx.Response(429, headers={"Retry-After": "30"}, json={"errors": [{"message": "x"}]})
    client, _ = api(scripted(rl, httpx.Response(200, json={"data": 1})))
    started = time.monotonic()
    assert client.request("GET", "/x", route="GET /x") == {"data": 1}
    assert client.budget._paused_until <= started + FAST.max_retry_after + 0.5
