"""`handoff preview`, `handoff status`, `handoff state reset-cursor|export` through CliRunner."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest

from sandbox.stack import SandboxStack
from tests.cli.helpers import invoke


@pytest.fixture(scope="module")
def synced(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    with SandboxStack(seed_deals=40, rng_seed=17, systems=("hubspot", "asana", "clickup")) as s:
        config = s.write_config(tmp / "h.yaml", extra_options={"start_from": "2000-01-01"})
        made = invoke("check", "--create-missing", "-c", str(config))  # progress properties
        assert made.exit_code == 0, made.output[-2000:]
        result = invoke("sync", "hubspot-clickup", "--json", "-c", str(config))
        assert result.exit_code == 0, result.output[-2000:]
        yield s, config


def test_preview_prints_every_mapping_error_with_field_and_fix(synced, tmp_path: Path):
    _, config = synced
    deal = tmp_path / "deal.json"
    # Two mistakes: no deal name (required) and an amount that is not a number.
    deal.write_text(json.dumps({"id": "42", "properties": {"dealname": "", "amount": "lots"}}))
    result = invoke("preview", "hubspot-clickup", "--file", str(deal), "-c", str(config))
    assert result.exit_code == 1
    lines = [ln for ln in result.stderr.splitlines() if " — " in ln]
    # The bad amount feeds two fields (the description and Deal amount): each is named.
    assert len(lines) >= 2, result.stderr
    assert any(
        "project.name" in ln and "required" in ln and "fill it in the CRM" in ln for ln in lines
    )
    assert any("Deal amount" in ln and "not a number" in ln and "correct" in ln for ln in lines)
    assert f"{len(lines)} mapping error(s) for deal 42" in result.stderr


def test_preview_shows_the_project_spec_and_the_progress_fields(synced, tmp_path: Path):
    _, config = synced
    deal = tmp_path / "deal.json"
    deal.write_text(
        json.dumps(
            {
                "id": "7",
                "properties": {
                    "dealname": "Acme rollout",
                    "amount": "12000",
                    "closedate": "2024-01-01",
                    "deal_currency_code": "USD",
                },
                "milestones": [
                    {"name": "Kickoff", "completed": True, "completed_at": "2024-01-02"},
                    {"name": "Go live", "completed": False, "due_on": "2999-01-01"},
                ],
            }
        )
    )
    result = invoke("preview", "hubspot-clickup", "--file", str(deal), "-c", str(config))
    assert result.exit_code == 0, result.output[-2000:]
    assert "Acme rollout" in result.stdout and "Customer onboarding" in result.stdout
    assert "Growth" in result.stdout  # the Deal tier template
    assert "delivery_progress" in result.stdout and "50" in result.stdout
    assert "Kickoff" in result.stdout  # last milestone reached


def test_preview_by_deal_id_reads_the_crm(synced):
    stack, config = synced
    deal_id = next(p["stamp"] for p in stack.projects("clickup") if p["stamp"]).rsplit(":", 1)[1]
    result = invoke("preview", "hubspot-clickup", "--deal", deal_id, "-c", str(config))
    assert result.exit_code == 0, result.output[-2000:]
    assert f"deal {deal_id}" in result.stdout
    both = invoke("preview", "hubspot-clickup", "-c", str(config))
    assert both.exit_code == 2


def test_status_renders_at_80_columns_and_as_json(synced):
    _, config = synced
    result = invoke("status", "-c", str(config))
    assert result.exit_code == 0, result.output[-2000:]
    text = result.stdout
    assert all(len(line) <= 80 for line in text.splitlines()), text
    for header in ("pipeline", "cursor", "last run", "links", "parked", "running"):
        assert header in text, text
    rows = [ln.split("│") for ln in text.splitlines() if ln.startswith("│")]
    names = "".join(r[1].strip() for r in rows)
    assert "hubspot-clickup" in names and "hubspot-asana" in names, text
    assert "…" not in text, text
    data = json.loads(invoke("status", "--json", "-c", str(config)).stdout)
    by_name = {p["name"]: p for p in data["pipelines"]}
    ran = by_name["hubspot-clickup"]
    assert ran["running"] is False and ran["last_run"]["status"] == "ok"
    assert ran["last_run"]["created"] > 0 and ran["last_run"]["duration_s"] >= 0
    assert ran["links"]["created"] == ran["last_run"]["created"]
    assert by_name["hubspot-asana"]["last_run"] is None


def test_state_reset_cursor_and_export(synced):
    _, config = synced
    data = json.loads(invoke("status", "--json", "-c", str(config)).stdout)
    ran = next(p for p in data["pipelines"] if p["name"] == "hubspot-clickup")
    assert "deals" in ran["cursors"]
    result = invoke(
        "state", "reset-cursor", "hubspot-clickup", "--to", "2024-03-01", "-c", str(config)
    )
    assert result.exit_code == 0, result.output[-2000:]
    data = json.loads(invoke("status", "--json", "-c", str(config)).stdout)
    ran = next(p for p in data["pipelines"] if p["name"] == "hubspot-clickup")
    assert ran["cursors"]["deals"].startswith("2024-03-01")
    assert (
        invoke(
            "state", "reset-cursor", "hubspot-clickup", "--to", "soon", "-c", str(config)
        ).exit_code
        == 2
    )
    assert invoke("state", "reset-cursor", "nope", "-c", str(config)).exit_code == 2

    exported = invoke("state", "export", "-c", str(config))
    assert exported.exit_code == 0, exported.output[-2000:]
    rows = list(csv.DictReader(io.StringIO(exported.stdout)))
    assert rows and {r["pipeline"] for r in rows} == {"hubspot-clickup"}
    assert all(r["project_id"] and r["state"] == "created" for r in rows)
    as_json = json.loads(invoke("state", "export", "--json", "-c", str(config)).stdout)
    assert sorted(r["deal_id"] for r in as_json) == sorted(r["deal_id"] for r in rows)
