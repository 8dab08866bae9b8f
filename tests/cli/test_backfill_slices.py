"""`handoff backfill --slices/--join/--status`: a sliced backfill against the emulators gives
every won deal one project and leaves the cursor alone; the plan reads well at 80 columns;
flags that do not go together are refused before anything runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sandbox.stack import SandboxStack
from tests.cli.helpers import invoke
from tests.e2e.helpers import stamps, won_hubspot_deals

SINCE = "2000-01-01"


def test_a_sliced_backfill_gives_each_won_deal_one_project(tmp_path: Path) -> None:
    with SandboxStack(seed_deals=60, rng_seed=9, systems=("hubspot", "clickup")) as stack:
        config = str(stack.write_config(tmp_path / "s.yaml"))
        args = ("backfill", "hubspot-clickup", "--since", SINCE, "--slices", "4")
        result = invoke(*args, "--json", "-c", config)
        assert result.exit_code == 0, result.output
        plan = json.loads(result.stdout)
        assert plan["states"] == {"done": 4}
        assert sorted(w["slice"] for w in plan["worked"]) == [0, 1, 2, 3]
        expected = [s["expected_won"] for s in plan["slices"]]
        assert max(expected) - min(expected) <= 2, expected  # balanced by won deals
        projects = stamps(stack, "clickup", "hubspot")
        assert set(projects) == won_hubspot_deals(stack) and set(projects.values()) == {1}

        # A second sliced backfill of the same window creates nothing.
        again = json.loads(invoke(*args, "--json", "-c", config).stdout)
        assert sum(w["created"] + w["adopted"] for w in again["worked"]) == 0
        assert stamps(stack, "clickup", "hubspot") == projects

        status = json.loads(invoke("status", "--json", "-c", config).stdout)
        assert "deals" not in status["pipelines"][0]["cursors"], "the cursor is untouched"
        assert [b["backfill_id"] for b in status["backfills"]] == [again["backfill_id"]]

        shown = invoke("backfill", "--status", str(plan["backfill_id"]), "-c", config)
    assert shown.exit_code == 0, shown.output
    lines = shown.stdout.splitlines()
    assert all(len(line) <= 80 for line in lines), shown.stdout
    assert "4/4 slices done" in shown.stdout
    rows = [line for line in lines if line.strip()[:1].isdigit()]
    assert len(rows) == 4 and all(" done " in row for row in rows), shown.stdout


def test_a_detached_plan_waits_for_workers(tmp_path: Path) -> None:
    with SandboxStack(seed_deals=30, rng_seed=4, systems=("hubspot", "clickup")) as stack:
        config = str(stack.write_config(tmp_path / "d.yaml"))
        args = ("backfill", "hubspot-clickup", "--since", SINCE, "--slices", "2", "--detach")
        planned = json.loads(invoke(*args, "--json", "-c", config).stdout)
        assert {s["state"] for s in planned["slices"]} == {"pending"}
        assert not stamps(stack, "clickup", "hubspot"), "planning created nothing"
        joined = invoke("backfill", "--join", str(planned["backfill_id"]), "-c", config)
        assert joined.exit_code == 0, joined.output
        assert "2/2 slices done" in joined.stdout
        assert set(stamps(stack, "clickup", "hubspot")) == won_hubspot_deals(stack)


@pytest.mark.parametrize(
    "args, says",
    [
        (("p", "--since", SINCE, "--slices", "4", "--dry-run"), "without --slices"),
        (("p", "--since", SINCE, "--slices", "4", "--limit", "5"), "without --slices"),
        (("p", "--since", SINCE, "--detach"), "--detach goes with --slices"),
        (("p", "--since", SINCE, "--slices", "2", "--retry-failed"), "--retry-failed with --join"),
        (("p", "--join", "3"), "plan id only"),
        (("--status", "3", "--since", SINCE), "plan id only"),
        (("--slices", "2"), "name the pipeline and --since"),
        (("p", "--since", SINCE, "--slices", "0"), "--slices"),
    ],
)
def test_flags_that_do_not_go_together_are_refused(args: tuple[str, ...], says: str) -> None:
    result = invoke("backfill", *args, "-c", "missing.yaml")
    assert result.exit_code == 2
    assert says in result.output


def test_an_unknown_plan_id_is_a_clear_error(tmp_path: Path) -> None:
    with SandboxStack(seed_deals=5, rng_seed=1, systems=("hubspot", "clickup")) as stack:
        config = str(stack.write_config(tmp_path / "u.yaml"))
        for flag in ("--status", "--join"):
            result = invoke("backfill", flag, "42", "-c", config)
            assert result.exit_code == 2
            assert "no backfill with id 42" in result.output
