"""The emulators' rate windows have the vendors' documented shapes (rolling vs fixed), and
HubSpot search results follow writes although they are cached per query."""

from __future__ import annotations

import random
from collections.abc import Iterator
from types import SimpleNamespace

import httpx
import pytest

import sandbox.common
from sandbox.common import EmulatorControls, SlidingWindow, Window
from sandbox.hubspot import HubSpotState, create_app
from sandbox.serve import LoopbackServer

TOKEN = "pat-na1-window-test"


def test_sliding_window_frees_one_request_as_the_oldest_ages_out() -> None:
    w = SlidingWindow("x", 3, 10.0)
    assert [w.take(t) for t in (0.0, 1.0, 2.0, 9.9)] == [True, True, True, False]
    assert w.reset_in(9.9) == pytest.approx(0.1)
    assert w.take(10.0)  # the request made at t=0 is 10 s old
    assert not w.take(10.5)  # those at 1 and 2 are not: a fixed window would allow this one


def test_fixed_window_restarts_whole() -> None:
    w = Window("x", 3, 10.0)
    assert [w.take(t) for t in (0.0, 1.0, 2.0, 9.9)] == [True, True, True, False]
    assert w.take(10.0) and w.take(10.5) and w.take(11.0)


@pytest.fixture()
def hubspot() -> Iterator[tuple[HubSpotState, EmulatorControls, str]]:
    state = HubSpotState(tokens={TOKEN})
    state.seed(30, random.Random(3))
    controls = EmulatorControls()
    server = LoopbackServer(create_app(state, controls)).start()
    yield state, controls, server.base_url
    server.stop()


def test_hubspot_ten_secondly_limit_is_rolling(
    hubspot: tuple[HubSpotState, EmulatorControls, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # HubSpot names the policy TEN_SECONDLY_ROLLING: at 3 per 10 s (100 × 0.03), requests at
    # t = 0, 1, 2 free one slot at t = 10 and the next at t = 11, not all three at t = 10.
    _, controls, url = hubspot
    now = [0.0]
    monkeypatch.setattr(sandbox.common, "time", SimpleNamespace(monotonic=lambda: now[0]))
    controls.set_rate_limits(True, multiplier=0.03)
    auth = {"Authorization": f"Bearer {TOKEN}"}

    def status_at(t: float) -> int:
        now[0] = t
        return httpx.get(f"{url}/crm/v3/objects/deals", headers=auth).status_code

    assert [status_at(t) for t in (0.0, 1.0, 2.0, 9.9)] == [200, 200, 200, 429]
    assert status_at(10.0) == 200
    assert status_at(10.5) == 429
    assert status_at(11.0) == 200


def test_hubspot_search_sees_a_write_made_between_two_pages(
    hubspot: tuple[HubSpotState, EmulatorControls, str],
) -> None:
    state, _, url = hubspot
    auth = {"Authorization": f"Bearer {TOKEN}"}
    body = {
        "sorts": [{"propertyName": "amount", "direction": "DESCENDING"}],
        "properties": ["amount"],
        "limit": 5,
    }
    search = f"{url}/crm/v3/objects/deals/search"
    first = httpx.post(search, json=body, headers=auth).json()["results"]
    smallest = httpx.post(
        search,
        json={**body, "sorts": [{"propertyName": "amount", "direction": "ASCENDING"}]},
        headers=auth,
    ).json()["results"][0]["id"]
    r = httpx.patch(
        f"{url}/crm/v3/objects/deals/{smallest}",
        json={"properties": {"amount": "99999999"}},
        headers=auth,
    )
    assert r.status_code == 200
    again = httpx.post(search, json=body, headers=auth).json()["results"]
    assert again[0]["id"] == smallest
    assert [d["id"] for d in again[1:]] == [d["id"] for d in first[:4]]
