"""`handoff run`: two pipelines every second, /healthz and /metrics, and SIGTERM leaves no
run marked running."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from sandbox.stack import SandboxStack
from tests.e2e.helpers import REPO, handoff


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_daemon_runs_both_pipelines_and_stops_cleanly_on_sigterm(tmp_path: Path):
    with SandboxStack(seed_deals=50, rng_seed=23, systems=("hubspot", "asana", "clickup")) as s:
        config = s.write_config(tmp_path / "d.yaml")
        config.write_text(config.read_text().replace("every: 5m", "every: 1s"))
        port = _free_port()
        cmd = [sys.executable, "-c", "import cli; cli.main()", "run", "-c", str(config)]
        # Logs go to a file: an unread pipe fills up and blocks the daemon's writes.
        log_file = (tmp_path / "daemon.log").open("w")
        proc = subprocess.Popen(
            [*cmd, "--metrics-port", str(port), "--stop-timeout", "20"],
            cwd=REPO,
            env=dict(os.environ),
            stdout=subprocess.DEVNULL,
            stderr=log_file,
            text=True,
        )
        try:
            deadline = time.monotonic() + 40
            runs: dict[str, int] = {}
            while time.monotonic() < deadline:
                time.sleep(0.5)
                try:
                    metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
                except httpx.HTTPError:
                    continue
                runs = {
                    name: sum(
                        float(ln.rsplit(" ", 1)[1])
                        for ln in metrics.splitlines()
                        if ln.startswith("handoff_runs_total{") and f'pipeline="{name}"' in ln
                    )
                    for name in ("hubspot-asana", "hubspot-clickup")
                }
                if all(n >= 2 for n in runs.values()):
                    break
            assert all(n >= 2 for n in runs.values()), runs  # each ran again on schedule
            assert httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200
            started = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
            assert time.monotonic() - started < 25
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log_file.close()
        stderr = (tmp_path / "daemon.log").read_text()
        assert proc.returncode == 0, stderr[-2000:]
        assert "Traceback" not in stderr
        events = [json.loads(ln)["event"] for ln in stderr.splitlines() if ln.startswith("{")]
        assert "daemon.stopped" in events and events.count("run.started") >= 4
        status = json.loads(handoff("status", "--json", "-c", str(config)).stdout)
        for p in status["pipelines"]:
            assert p["running"] is False, p
            assert p["last_run"]["status"] in ("ok", "partial", "interrupted"), p
