"""The benchmark's floor: the least time a vendor's documented limits allow for the calls a
run made (bench/emulators.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from bench.emulators import Limit, floors


@pytest.mark.parametrize(
    ("calls", "per_window", "expected"),
    [(0, 100, 0.0), (1, 100, 0.0), (100, 100, 0.0), (101, 100, 60.0), (1_000, 100, 540.0)],
)
def test_the_first_window_is_free_and_each_further_one_costs_a_window(
    calls: int, per_window: int, expected: float
) -> None:
    assert Limit("x", per_window, 60.0, lambda r: True).floor(calls, 1.0) == expected


def test_the_factor_scales_the_count_not_the_window() -> None:
    limit = Limit("x", 100, 60.0, lambda r: True)
    assert limit.scaled(2.5) == 250
    assert limit.floor(1_000, 2.5) == 3 * 60.0


def test_each_limit_counts_only_the_calls_it_governs() -> None:
    routes = {
        "POST /crm/v3/objects/deals/search": 30,
        "POST /crm/v3/objects/deals/batch/update": 250,
        "POST /oauth/v1/token": 5,
        "429 POST /crm/v3/objects/deals/search": 7,  # refused: not a call made
    }
    got = floors("hubspot", routes, 1.0, stack=None)
    assert got["search (per second)"]["calls"] == 30
    assert got["search (per second)"]["floor_s"] == 5.0  # 30 at 5/s: windows 2..6
    assert got["ten-secondly (rolling)"]["calls"] == 250
    assert got["ten-secondly (rolling)"]["floor_s"] == 20.0  # 250 at 100/10 s
    assert got["daily"]["calls"] == 280


def test_clickup_floor_follows_the_workspace_plan() -> None:
    stack = {"clickup": SimpleNamespace(state=SimpleNamespace(plan_rate_per_minute=1_000))}
    got = floors("clickup", {"GET /api/v2/team/{team_id}/task": 2_500}, 1.0, stack)
    assert got["per token (minute)"]["floor_s"] == 120.0
