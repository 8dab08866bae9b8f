"""Kill `handoff sync` with SIGKILL at random moments and at the exact step between
"project created" and "link saved"; then run to completion: one project per won deal."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sandbox.stack import SandboxStack
from tests.e2e.helpers import REPO, create_progress_properties, handoff, stamps, won_hubspot_deals


@pytest.fixture(scope="module")
def stack():
    with SandboxStack(seed_deals=120, rng_seed=23, systems=("hubspot", "asana")) as s:
        create_progress_properties(s)
        # Slow the project tool a little so kills land mid-run, often mid-create.
        s["asana"].controls.set_faults(latency_ms=15)
        yield s


def test_sigkill_at_random_points_and_between_create_and_link(stack, tmp_path: Path):
    config = stack.write_config(tmp_path / "sb.yaml")
    rng = random.Random(1234)
    kills = 0
    # Exact kills: the process dies right after a project was created, before its link.
    for nth in (1, 2, 5):
        proc = handoff("sync", "-c", str(config), env={"HANDOFF_FAILPOINT": f"after-create:{nth}"})
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
        kills += 1
    # Random kills: anywhere (reading, mapping, creating, committing).
    while kills < 24:
        p = subprocess.Popen(
            [sys.executable, "-c", "import cli; cli.main()", "sync", "-c", str(config)],
            cwd=REPO,
            env=os.environ.copy(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(rng.uniform(0.3, 2.5))
        p.send_signal(signal.SIGKILL)
        p.wait()
        kills += 1
    # A lease held by a killed run must expire or be released before the next can start:
    # runs are killed, so shorten the wait by running until the pipeline is caught up.
    for _ in range(10):
        out = handoff("sync", "-c", str(config), "--json")
        result = json.loads(out.stdout)["pipelines"][0]
        if result["status"] == "ok" and result["created"] == 0 and result["adopted"] == 0:
            break
    won = won_hubspot_deals(stack)
    projects = stamps(stack, "asana", "hubspot")
    assert set(projects) == won
    assert set(projects.values()) == {1}, {k: v for k, v in projects.items() if v > 1}
