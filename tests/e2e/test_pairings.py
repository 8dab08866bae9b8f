"""Every CRM with every project tool, over real sockets (TLS for Salesforce), through the
`handoff` command: one project per won deal, none for open or lost deals, progress written
back, and repeated runs that write nothing."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest

from sandbox.stack import SandboxStack
from tests.e2e.helpers import (
    complete_milestones,
    deal_progress,
    handoff,
    stamps,
    sync_json,
    won_deals,
    writes,
)

PAIRINGS = [
    ("hubspot", "asana"),
    ("hubspot", "clickup"),
    ("salesforce", "asana"),
    ("salesforce", "clickup"),
]


@pytest.mark.parametrize("crm,tool", PAIRINGS, ids=[f"{c}-{t}" for c, t in PAIRINGS])
def test_pairing_end_to_end(crm: str, tool: str, tmp_path: Path):
    with SandboxStack(seed_deals=60, rng_seed=5, systems=(crm, tool)) as stack:
        config = stack.write_config(tmp_path / "sb.yaml")
        if crm == "hubspot":
            # The progress properties do not exist in a fresh portal: create them.
            proc = handoff("check", "--create-missing", "-c", str(config))
            assert proc.returncode == 0, proc.stdout + proc.stderr
        proc = handoff("check", "-c", str(config))
        assert proc.returncode == 0, proc.stdout + proc.stderr

        first = sync_json(config)["pipelines"][0]
        won = won_deals(stack, crm)
        projects = stamps(stack, tool, crm)
        assert 10 < len(won) < 60  # some deals are open or lost
        assert set(projects) == won and set(projects.values()) == {1}
        assert first["created"] == len(won) and first["dead_lettered"] == 0

        # Second run: nothing to create, nothing to write anywhere.
        before = {s: writes(stack, s) for s in (crm, tool)}
        second = sync_json(config)["pipelines"][0]
        assert second["created"] == 0
        assert {s: writes(stack, s) for s in (crm, tool)} == before

        # The delivery team completes milestones in the project tool.
        links = {
            row["deal_id"]: row["project_id"]
            for row in json.loads(handoff("state", "export", "-c", str(config), "--json").stdout)
        }
        deal_a, deal_b = sorted(won)[:2]
        done_a = complete_milestones(stack, tool, links[deal_a], 1)
        complete_milestones(stack, tool, links[deal_b], 99)
        third = sync_json(config)["pipelines"][0]
        assert third["progress_written"] == 2 and third["dead_lettered"] == 0
        pct_a, status_a, last_a = deal_progress(stack, crm, deal_a)
        assert 0 < pct_a < 100 and status_a == "In progress" and last_a == done_a[0]
        pct_b, status_b, _ = deal_progress(stack, crm, deal_b)
        assert pct_b == 100 and status_b == "Delivered"

        # Back, forward, back with no milestone change: zero CRM and tool writes.
        before = {s: writes(stack, s) for s in (crm, tool)}
        for _ in range(2):
            again = sync_json(config)["pipelines"][0]
            assert again["progress_written"] == 0 and again["updated"] == 0
        assert {s: writes(stack, s) for s in (crm, tool)} == before

        # Nothing changes for a while. The first quiet run may re-read what changed in the
        # overlap before the last read began; every quiet run after it reads nothing: each
        # system's clock (its `Date` header) marks where the last complete read began. Its
        # calls are the change reads plus what each process does once: a Salesforce login,
        # look-ups of names in the config (a ClickUp Workspace and milestone type given by
        # name: one call each).
        for _ in range(2):
            stack.advance_clocks(timedelta(minutes=10))
            quiet = sync_json(config)["pipelines"][0]
        assert quiet["read"] == 0 and quiet["milestones_read"] == 0, quiet
        most = {"hubspot": 1, "salesforce": 2, "asana": 2, "clickup": 3}
        assert all(n <= most[s] for s, n in quiet["api_calls"].items()), quiet["api_calls"]
