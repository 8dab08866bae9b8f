"""Issue #2's promise, end to end through the CLI: one project per won deal, a second run
creates nothing, and a lost state store still creates nothing (projects are adopted)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sandbox.stack import SandboxStack
from tests.e2e.helpers import (
    create_progress_properties,
    handoff,
    stamps,
    sync_json,
    won_hubspot_deals,
    writes,
)


@pytest.fixture(scope="module")
def stack():
    with SandboxStack(seed_deals=200, rng_seed=11, systems=("hubspot", "asana")) as s:
        create_progress_properties(s)
        yield s


def test_won_deals_become_one_project_each_and_reruns_create_nothing(stack, tmp_path: Path):
    config = stack.write_config(tmp_path / "sb.yaml")
    first = sync_json(config)["pipelines"][0]
    won = won_hubspot_deals(stack)
    assert len(won) > 40
    projects = stamps(stack, "asana", "hubspot")
    assert set(projects) == won  # every won deal, and nothing else
    assert set(projects.values()) == {1}  # exactly one each
    assert first["created"] == len(won) and first["dead_lettered"] == 0
    assert first["api_calls"]["hubspot"] <= 3  # pipelines + search pages

    asana_writes = writes(stack, "asana")
    second = sync_json(config)["pipelines"][0]
    assert second["created"] == 0
    assert second["api_calls"]["hubspot"] <= 2  # one search page (the overlap window)
    assert writes(stack, "asana") == asana_writes  # reads only: milestone changes

    # The state store is lost: the stamp on every project lets the engine adopt it.
    for f in tmp_path.glob("handoff-sandbox.db*"):
        f.unlink()
    third = sync_json(config)["pipelines"][0]
    assert third["created"] == 0 and third["adopted"] == len(won)
    assert stamps(stack, "asana", "hubspot") == projects


def test_dry_run_plans_without_writing(stack, tmp_path: Path):
    config = stack.write_config(tmp_path / "plan.yaml", extra_options={"start_from": "2000-01-01"})
    before = {s: writes(stack, s) for s in ("hubspot", "asana")}
    plan = sync_json(config, "--dry-run")["pipelines"][0]
    assert plan["dry_run"] is True
    # Every won deal is planned (created, or adopted where a stamped project already exists).
    assert plan["created"] + plan["adopted"] == len(won_hubspot_deals(stack))
    assert {s: writes(stack, s) for s in ("hubspot", "asana")} == before
    exported = handoff("state", "export", "-c", str(config), "--json")
    assert json.loads(exported.stdout) == []  # nothing recorded in the state store either


def test_validate_reports_three_mistakes_before_any_network_call(stack, tmp_path: Path):
    config = stack.write_config(tmp_path / "bad.yaml")
    text = config.read_text().replace("version: 1", "version: 1\npipelnes: []", 1)
    text = text.replace("overlap: 2m", "overlap: 2m, page_size: lots")
    config.write_text(text)
    mapping = tmp_path / "broken-map.yaml"
    mapping.write_text('version: 1\nproject:\n  name: "{{ deal.dealname "\n')
    config.write_text(config.read_text().replace("preset:hubspot-asana", str(mapping)))
    hits_before = {s: writes(stack, s) for s in ("hubspot", "asana")}
    for command in ("validate", "sync"):
        proc = handoff(command, "-c", str(config))
        assert proc.returncode == 2, proc.stdout + proc.stderr
        lines = [ln for ln in proc.stderr.splitlines() if " — " in ln]
        assert len(lines) == 3, proc.stderr
        assert any(f"{config}:" in ln and "pipelnes" in ln and "unknown key" in ln for ln in lines)
        assert any("page_size" in ln and "whole number" in ln for ln in lines)
        assert any(f"{mapping}:3:" in ln and "template syntax error" in ln for ln in lines)
        assert "Traceback" not in proc.stderr
    assert {s: writes(stack, s) for s in ("hubspot", "asana")} == hits_before
