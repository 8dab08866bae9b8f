"""Issue #5's promise for every pairing: forward and back pipelines under a high rate of
injected faults (429s, 5xx, resets, writes applied then failed), repeated until caught up:
exactly one project per won deal, every won deal present, every progress value written, no
dead letter left once the faults stop."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sandbox.stack import SandboxStack
from tests.e2e.helpers import handoff, stamps, sync_json, won_deals

PAIRINGS = [
    ("hubspot", "asana"),
    ("hubspot", "clickup"),
    ("salesforce", "asana"),
    ("salesforce", "clickup"),
]
FAST_RETRY = {"attempts": 6, "initial_wait": 0.01, "max_wait": 0.05, "max_retry_after": 0.05}
FAULTS = dict(
    rate_429=0.1, retry_after=0.01, rate_5xx=0.1, rate_reset=0.05, rate_apply_then_fail=0.08
)


@pytest.mark.parametrize("crm,tool", PAIRINGS, ids=[f"{c}-{t}" for c, t in PAIRINGS])
def test_forward_and_back_converge_under_faults(crm: str, tool: str, tmp_path: Path):
    with SandboxStack(seed_deals=40, rng_seed=17, systems=(crm, tool)) as stack:
        config = stack.write_config(tmp_path / "sb.yaml", retry=FAST_RETRY)
        assert handoff("check", "--create-missing", "-c", str(config)).returncode == 0
        for i, system in enumerate((crm, tool)):
            stack[system].controls.set_faults(**FAULTS, seed=i + 1)
        try:
            for _ in range(4):
                handoff("sync", "-c", str(config))
            links = json.loads(handoff("state", "export", "-c", str(config), "--json").stdout)
            done = {}
            for link in links[:3]:
                if link["project_id"]:
                    stack[tool].controls.set_faults()
                    done[link["deal_id"]] = stack.complete_milestones(tool, link["project_id"], 1)
                    stack[tool].controls.set_faults(**FAULTS, seed=9)
            for _ in range(4):
                handoff("sync", "-c", str(config))
        finally:
            for system in (crm, tool):
                stack[system].controls.set_faults()
        handoff("dlq", "retry", "--all", "-c", str(config))
        final = sync_json(config)["pipelines"][0]
        assert final["status"] == "ok", final
        assert (
            json.loads(handoff("dlq", "list", "-c", str(config), "--json").stdout)["dead_letters"]
            == []
        )

        won = won_deals(stack, crm)
        projects = stamps(stack, tool, crm)
        assert set(projects) == won and set(projects.values()) == {1}
        for deal_id in won:  # every won deal carries progress, the touched ones their milestone
            pct, status, last = stack.deal_progress(crm, deal_id)
            assert pct is not None and status, deal_id
            if deal_id in done:
                assert pct > 0 and last == done[deal_id][0]
