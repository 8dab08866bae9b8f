"""A run under heavy injected faults: the invariants hold, the exit codes tell what happened,
and no configured secret appears in any log line, error or state row."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from sandbox.stack import SandboxStack
from tests.e2e.helpers import create_progress_properties, handoff, stamps, won_hubspot_deals

FAST_RETRY = {"attempts": 6, "initial_wait": 0.01, "max_wait": 0.05, "max_retry_after": 0.05}


@pytest.fixture(scope="module")
def stack():
    with SandboxStack(seed_deals=150, rng_seed=31, systems=("hubspot", "asana")) as s:
        create_progress_properties(s)
        yield s


def test_faulty_run_converges_and_leaks_no_secret(stack, tmp_path: Path):
    config = stack.write_config(tmp_path / "sb.yaml", retry=FAST_RETRY)
    faults = dict(
        rate_429=0.15,
        retry_after=0.01,
        rate_5xx=0.15,
        rate_reset=0.05,
        rate_apply_then_fail=0.1,
        seed=7,
    )
    for system in ("hubspot", "asana"):
        stack[system].controls.set_faults(**faults)
    logs = []
    try:
        for _ in range(8):
            proc = handoff("--json-logs", "sync", "-c", str(config), "--json")
            logs.append(proc.stdout + proc.stderr)
            assert proc.returncode in (0, 1, 3), proc.stderr[-2000:]
    finally:
        for system in ("hubspot", "asana"):
            stack[system].controls.set_faults()
    # Faults off: parked records are replayed, the cursor catches up.
    proc = handoff("--json-logs", "dlq", "retry", "--all", "-c", str(config))
    logs.append(proc.stdout + proc.stderr)
    proc = handoff("--json-logs", "sync", "-c", str(config), "--json")
    logs.append(proc.stdout + proc.stderr)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = handoff("dlq", "list", "-c", str(config), "--json")
    assert json.loads(proc.stdout)["dead_letters"] == []

    won = won_hubspot_deals(stack)
    projects = stamps(stack, "asana", "hubspot")
    assert set(projects) == won and set(projects.values()) == {1}

    # Every configured secret, searched for in every log line and the whole state store.
    text = "\n".join(logs)
    assert "http.retry" in text  # the faults really happened and were logged
    db = sqlite3.connect(tmp_path / "handoff-sandbox.db")
    state_dump = "\n".join(db.iterdump())
    for token in stack.env().values():
        assert token not in text
        assert token not in state_dump
    for line in text.splitlines():
        if line.startswith("{"):
            json.loads(line)  # JSON logs are one object per line


def test_unreachable_system_exits_3_and_bad_token_exits_3(stack, tmp_path: Path):
    config = stack.write_config(tmp_path / "down.yaml", retry=FAST_RETRY)
    text = config.read_text().replace(stack["asana"].base_url, "http://127.0.0.1:9/api/1.0")
    config.write_text(text)
    proc = handoff("sync", "-c", str(config))
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr

    bad = stack.write_config(tmp_path / "bad.yaml", retry=FAST_RETRY)
    secrets = tmp_path / "bad.secrets.env"
    secrets.write_text(secrets.read_text().replace("pat-na1-", "pat-na1-WRONG-"))
    proc = handoff("sync", "-c", str(bad))
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "WRONG" not in proc.stdout + proc.stderr  # the wrong token is a secret too


def test_a_parked_record_makes_exit_code_1(stack, tmp_path: Path):
    mapping = tmp_path / "strict.yaml"
    mapping.write_text(
        "version: 1\nproject:\n  name: '{{ deal.dealname }}'\n"
        "  custom_fields:\n    Deal amount: {source: description, type: number, required: true}\n"
    )
    config = stack.write_config(tmp_path / "strict-sb.yaml", retry=FAST_RETRY)
    config.write_text(config.read_text().replace("preset:hubspot-asana", str(mapping)))
    proc = handoff("sync", "-c", str(config), "--json")
    result = json.loads(proc.stdout)["pipelines"][0]
    assert proc.returncode == 1 and result["dead_lettered"] > 0
    listed = json.loads(handoff("dlq", "list", "-c", str(config), "--json").stdout)
    assert all(d["step"] == "map" for d in listed["dead_letters"])
