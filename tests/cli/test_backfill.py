"""`handoff backfill`: the dry-run plan predicts the real run's API calls, an interrupted
backfill resumes without a second project, --limit stops and continues, and the plan
reads well at 80 columns."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sandbox.stack import SandboxStack
from tests.cli.helpers import calls, invoke, writes
from tests.e2e.helpers import handoff, stamps, won_hubspot_deals

SINCE = "2000-01-01"


@pytest.mark.parametrize("tool", ["clickup", "asana"])
def test_dry_run_predicts_the_real_runs_api_calls(tool: str, tmp_path: Path):
    with SandboxStack(seed_deals=60, rng_seed=5, systems=("hubspot", tool)) as stack:
        # One create at a time: with several, Asana's instantiation jobs may need a second
        # poll when the emulator is busy, a timing-dependent call no plan can predict.
        config = stack.write_config(tmp_path / "h.yaml", extra_options={"parallel_creates": 1})
        name = f"hubspot-{tool}"
        before = calls(stack)
        proc = handoff("backfill", name, "--since", SINCE, "--dry-run", "--json", "-c", str(config))
        assert proc.returncode == 0, proc.stderr[-2000:]
        plan = json.loads(proc.stdout)
        assert writes(stack) == 0  # the plan wrote nothing
        assert plan["created"] > 10 and plan["dry_run"] is True
        assert {a["action"] for a in plan["plan"]} >= {"create", "skip"}
        predicted = plan["predicted_api_calls"]

        mid = calls(stack)
        proc = handoff("backfill", name, "--since", SINCE, "--json", "-c", str(config))
        assert proc.returncode == 0, proc.stderr[-2000:]
        real = json.loads(proc.stdout)
        after = calls(stack)
        counted = {s: after[s] - mid[s] for s in after}  # at the emulators
        assert real["created"] == plan["created"]
        assert sum(counted.values()) == real["api_calls_total"]
        total = sum(predicted.values())
        assert abs(total - sum(counted.values())) <= 0.05 * sum(counted.values()), (
            predicted,
            counted,
        )
        for system in counted:
            assert abs(predicted[system] - counted[system]) <= 0.05 * counted[system] + 2
        assert sum(mid.values()) - sum(before.values()) == plan["api_calls_total"]


@pytest.fixture(scope="module")
def stack():
    with SandboxStack(seed_deals=70, rng_seed=13, systems=("hubspot", "clickup")) as s:
        yield s


def test_killed_backfill_resumes_without_a_second_project(stack, tmp_path: Path):
    config = stack.write_config(tmp_path / "k.yaml")
    args = ("backfill", "hubspot-clickup", "--since", SINCE, "--json", "-c", str(config))
    # Die right after the 5th project is created, before its link is saved.
    proc = handoff(*args, env={"HANDOFF_FAILPOINT": "after-create:5"})
    assert proc.returncode == -9, proc.stderr[-2000:]
    made = sum(stamps(stack, "clickup", "hubspot").values())
    # Creates run 8 at a time, so up to 7 others may have finished beside the 5th.
    assert 5 <= made <= 12

    proc = handoff(*args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    resumed = json.loads(proc.stdout)
    # Links land with the page commit: all created before the crash are adopted, by stamp
    # (and by name, a List whose stamp task the kill cut off).
    assert made <= resumed["adopted"] <= 12
    projects = stamps(stack, "clickup", "hubspot")
    assert set(projects) == won_hubspot_deals(stack)
    assert set(projects.values()) == {1}

    again = json.loads(handoff(*args).stdout)  # a replay creates nothing
    assert again["created"] == again["adopted"] == 0
    assert stamps(stack, "clickup", "hubspot") == projects

    # The incremental cursor was never touched: the pipeline has none.
    status = json.loads(handoff("status", "--json", "-c", str(config)).stdout)
    assert "deals" not in status["pipelines"][0]["cursors"]


def test_limit_stops_and_the_next_run_continues(stack, tmp_path: Path):
    config = stack.write_config(tmp_path / "l.yaml")
    base = ("backfill", "hubspot-clickup", "--since", SINCE, "--until", "2100-01-01")
    args = (*base, "--dry-run", "--json", "-c", str(config))
    whole = json.loads(invoke(*args).stdout)
    first = invoke(*base, "--limit", "25", "--json", "-c", str(config))
    assert first.exit_code == 0, first.output
    one = json.loads(first.stdout)
    assert one["read"] == 25
    two = json.loads(invoke(*base, "--json", "-c", str(config)).stdout)
    assert one["read"] + two["read"] >= whole["read"]
    assert one["created"] + one["adopted"] + two["created"] + two["adopted"] == (
        whole["created"] + whole["adopted"]
    )
    assert invoke(*base, "--limit", "0", "-c", str(config)).exit_code == 2


def test_dry_run_plan_reads_well_at_80_columns(tmp_path: Path):
    with SandboxStack(seed_deals=40, rng_seed=3, systems=("hubspot", "clickup")) as stack:
        config = stack.write_config(tmp_path / "p.yaml")
        before = writes(stack)
        args = ("backfill", "hubspot-clickup", "--since", SINCE, "--dry-run", "-c", str(config))
        result = invoke(*args)
        assert writes(stack) == before
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert all(len(line) <= 80 for line in text.splitlines()), text
    for header in ("action", "deals", "why", "system", "reads", "per deal", "total"):
        assert header in text, text
    assert "…" not in text, text
    rows = [ln for ln in text.splitlines() if "│" in ln]
    assert any("create" in r and "won, no project yet" in r for r in rows), text
    assert any("skip" in r and "deal is" in r for r in rows), text
    assert any(r.split("│")[1].strip() == "clickup" for r in rows), text
