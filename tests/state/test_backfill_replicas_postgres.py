"""A backfill split into 8 slices, worked by three processes on one PostgreSQL database
(two `handoff backfill --join` and a `handoff run` daemon) against the emulators; one joiner
is killed -9 mid-slice. Every won deal gets exactly one project, every slice ends done, and
the killed worker's slice is finished by another after its lease expires."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from sqlalchemy import create_engine, text

from sandbox.stack import SandboxStack
from tests.e2e.helpers import REPO, create_progress_properties, handoff, stamps, won_hubspot_deals

TTL_S = 3
FAST_RETRY = {"attempts": 6, "initial_wait": 0.01, "max_wait": 0.05, "max_retry_after": 0.05}


def _start(log: Path, *args: str) -> subprocess.Popen:
    out = log.open("w")  # a file: an unread pipe fills up and blocks the process
    return subprocess.Popen(
        [sys.executable, "-c", "import cli; cli.main()", *args],
        cwd=REPO,
        stdout=out,
        stderr=subprocess.STDOUT,
        env=dict(os.environ),
    )


def test_three_replicas_work_one_backfill_plan(pg_url: str, tmp_path: Path) -> None:
    with SandboxStack(seed_deals=160, rng_seed=5, systems=("hubspot", "asana")) as stack:
        create_progress_properties(stack)  # the daemon's syncs write progress back after
        config = str(
            stack.write_config(
                tmp_path / "slices.yaml",
                state_url=pg_url,
                retry=FAST_RETRY,
                extra_options={"lease_ttl": f"{TTL_S}s"},
            )
        )
        assert handoff("state", "migrate", "-c", config).returncode == 0
        proc = handoff(
            "backfill", "hubspot-asana", "--since", "2000-01-01", "--slices", "8",
            "--detach", "--json", "-c", config,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-2000:]
        planned = json.loads(proc.stdout)
        backfill_id = planned["backfill_id"]
        assert len(planned["slices"]) == 8
        # Slow project creation a little, so that every worker has slices to do.
        stack["asana"].controls.set_faults(latency_ms=10)

        join = ("backfill", "--join", str(backfill_id), "-c", config)
        victim = _start(tmp_path / "join-a.log", *join)
        joiner = _start(tmp_path / "join-b.log", *join)
        daemon = _start(tmp_path / "daemon.log", "run", "--backfill-every", "0.5", "-c", config)
        engine = create_engine(pg_url)
        try:
            # Kill -9 the first joiner while it holds a slice.
            killed_slice = None
            deadline = time.monotonic() + 20
            while killed_slice is None and time.monotonic() < deadline:
                with engine.connect() as conn:
                    killed_slice = conn.execute(
                        text(
                            "SELECT slice_index FROM backfill_slices WHERE backfill_id = :b "
                            "AND state = 'running' AND owner LIKE :owner"
                        ),
                        {"b": backfill_id, "owner": f"%:{victim.pid}:%"},
                    ).scalar()
                time.sleep(0.05)
            assert killed_slice is not None, (tmp_path / "join-a.log").read_text()[-3000:]
            victim.send_signal(signal.SIGKILL)
            victim.wait()

            # The other joiner stays until no slice is pending or running, then exits.
            assert joiner.wait(timeout=60) == 0, (tmp_path / "join-b.log").read_text()[-3000:]
        finally:
            for p in (victim, joiner, daemon):
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
            for p in (victim, joiner, daemon):
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()
        with engine.connect() as conn:
            slices = conn.execute(
                text(
                    "SELECT slice_index, state, owner, attempts FROM backfill_slices "
                    "WHERE backfill_id = :b ORDER BY slice_index"
                ),
                {"b": backfill_id},
            ).all()
            victim_runs = conn.execute(
                text("SELECT status FROM runs WHERE kind = 'backfill' AND owner LIKE :owner"),
                {"owner": f"%:{victim.pid}:%"},
            ).all()
        engine.dispose()

        assert [s.state for s in slices] == ["done"] * 8
        owners = {s.owner.split(":")[1] for s in slices}
        assert len(owners) >= 2, "more than one replica did slices"
        assert str(daemon.pid) in owners, "the `handoff run` daemon joined the plan by itself"
        taken_over = slices[killed_slice]
        assert taken_over.attempts >= 2 and f":{victim.pid}:" not in taken_over.owner
        assert "running" not in {r.status for r in victim_runs}, "its run was closed"

        projects = stamps(stack, "asana", "hubspot")
        assert set(projects) == won_hubspot_deals(stack), "every won deal has a project"
        assert set(projects.values()) == {1}, "exactly one project per deal"
