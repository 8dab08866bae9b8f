"""Four `handoff run` daemons on one PostgreSQL database and one faulty sandbox, for over a
minute while new won deals keep arriving: every won deal gets exactly one project, no pipeline
ever runs on two replicas at once, and a killed replica's pipeline passes to another within the
lease time."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from sqlalchemy import create_engine, text

from sandbox.stack import SandboxStack
from tests.e2e.helpers import REPO, create_progress_properties, handoff, stamps, won_hubspot_deals

TTL_S = 4
FAULTY_S = 65  # the issue asks for at least a minute with faults on
FAST_RETRY = {"attempts": 6, "initial_wait": 0.01, "max_wait": 0.05, "max_retry_after": 0.05}
FAULTS = dict(rate_429=0.1, retry_after=0.01, rate_5xx=0.1, rate_reset=0.03, seed=11)


def _every_second(config: Path) -> None:
    from ruamel.yaml import YAML

    yaml = YAML()
    doc = yaml.load(config.read_text())
    for p in doc["pipelines"]:
        p["schedule"] = {"every": "1s"}
    with config.open("w") as f:
        yaml.dump(doc, f)


def _daemon(config: Path, log: Path) -> subprocess.Popen:
    out = log.open("w")
    return subprocess.Popen(
        [sys.executable, "-c", "import cli; cli.main()", "run", "-c", str(config)],
        cwd=REPO,
        stdout=out,
        stderr=subprocess.STDOUT,
        env=dict(os.environ),
    )


def _add_won_deals(stack: SandboxStack, n: int, tag: str) -> None:
    """New deals won while the replicas run (straight into the emulator: the test's own
    writes should not draw the injected faults)."""
    state = stack["hubspot"].state
    for i in range(n):
        state.add_deal(
            {
                "dealname": f"Arrived {tag}-{i}",
                "amount": str(1000 + i),
                "dealstage": "closedwon",
                "pipeline": "default",
            }
        )


def test_four_replicas_share_work_safely(pg_url: str, tmp_path: Path) -> None:
    with SandboxStack(seed_deals=80, rng_seed=5, systems=("hubspot", "asana")) as stack:
        create_progress_properties(stack)
        config = stack.write_config(
            tmp_path / "replicas.yaml",
            state_url=pg_url,
            retry=FAST_RETRY,
            extra_options={"lease_ttl": f"{TTL_S}s"},
        )
        _every_second(config)
        proc = handoff("state", "migrate", "-c", str(config))
        assert proc.returncode == 0, proc.stderr[-2000:]
        for system in ("hubspot", "asana"):
            stack[system].controls.set_faults(**FAULTS)
        procs = [_daemon(config, tmp_path / f"replica-{i}.log") for i in range(4)]
        engine = create_engine(pg_url)
        try:
            started = time.time()
            for wave in range(3):
                time.sleep(5)
                _add_won_deals(stack, 5, f"early{wave}")
            # Kill -9 whichever replica holds the lease now (or last started a run).
            with engine.connect() as conn:
                owner = conn.execute(
                    text("SELECT owner FROM runs ORDER BY started_at DESC LIMIT 1")
                ).scalar_one()
            pid = int(owner.split(":")[1])
            victim = next(p for p in procs if p.pid == pid)
            victim.send_signal(signal.SIGKILL)
            victim.wait()
            killed_at = time.time()
            taken = None
            while time.time() - killed_at < TTL_S + 10:
                with engine.connect() as conn:
                    n = conn.execute(
                        text(
                            "SELECT count(*) FROM runs WHERE owner NOT LIKE :dead "
                            "AND started_at > to_timestamp(:t)"
                        ),
                        {"dead": f"%:{pid}:%", "t": killed_at},
                    ).scalar_one()
                if n:
                    taken = time.time() - killed_at
                    break
                time.sleep(0.2)
            assert taken is not None and taken <= TTL_S + 3, taken
            wave = 0
            while time.time() - started < FAULTY_S:
                time.sleep(5)
                _add_won_deals(stack, 5, f"late{wave}")
                wave += 1
            for system in ("hubspot", "asana"):
                stack[system].controls.set_faults()
            time.sleep(10)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
            for p in procs:
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()
        # A record that drew faults on every retry attempt is parked for the automatic retry a
        # minute later; the operator's replay settles it now (and must not duplicate anything).
        proc = handoff("dlq", "retry", "--all", "-c", str(config))
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        with engine.connect() as conn:
            runs = conn.execute(
                text(
                    "SELECT pipeline, owner, started_at, finished_at FROM runs "
                    "ORDER BY pipeline, started_at"
                )
            ).all()
        engine.dispose()

        owners = {r.owner for r in runs}
        assert len(owners) >= 2, "the work should have been shared"
        for prev, nxt in zip(runs, runs[1:], strict=False):
            if prev.pipeline == nxt.pipeline:
                assert prev.finished_at is not None, prev
                assert prev.finished_at <= nxt.started_at, (prev, nxt)
        projects = stamps(stack, "asana", "hubspot")
        assert projects and set(projects.values()) == {1}, "one project per deal"
        won = won_hubspot_deals(stack)
        assert len(won) >= 80 * 0.3 + 15, "the arriving deals are won too"
        assert set(projects) == won, f"won deals without a project: {sorted(won - set(projects))}"
