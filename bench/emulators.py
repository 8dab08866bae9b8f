"""Scenarios 2 and 3: `handoff sync` (a subprocess, as an operator runs it) against the vendor
emulators (in this process), with rate limits off and on.

Rate limits on means each emulator enforces its vendor's documented limits scaled by a
multiplier (so a run stays short), and the client is configured to pace itself at the same
scaled rates. The floor is the time those limits alone impose on the calls the run made.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
WON_SHARE = 0.4  # the emulators seed ~40% won deals

# Documented limits as (per-call-class) requests per second at multiplier 1. HubSpot's search
# endpoints have their own 5/s limit and do not draw on the 100/10 s one.
DOCUMENTED = {
    "hubspot": {"all but search": 100 / 10, "search": 5 / 1},
    "asana": {"all": 1_500 / 60, "search": 60 / 60},
    "clickup": {"all": 100 / 60},  # Free/Unlimited/Business plan, per token
    "salesforce": {"all": None},  # a rolling 24-hour allocation, read from the org
}


def client_pacing(system: str, multiplier: float) -> dict[str, Any]:
    """The connection settings that make the client pace at the scaled documented rates."""
    m = multiplier
    return {
        "hubspot": {"requests_per_10s": int(100 * m), "search_per_second": int(5 * m)},
        "asana": {"requests_per_minute": int(1_500 * m)},
        "clickup": {"requests_per_minute": int(100 * m)},
        "salesforce": {"requests_per_second": 25 * m},  # the client's own default pace × m
    }[system]


def floor_seconds(system: str, stats: dict[str, Any], multiplier: float, stack: Any) -> float:
    """Seconds the scaled documented limits alone impose on the calls counted in `stats`."""
    routes = {k: v for k, v in stats["by_route"].items() if not k.startswith("429 ")}
    total = sum(routes.values())
    search = sum(v for k, v in routes.items() if "search" in k.lower())
    m = multiplier
    if system == "hubspot":
        return max((total - search) / (10 * m), search / (5 * m))
    if system == "asana":
        return max(total / (25 * m), search / (1 * m))
    if system == "clickup":
        return total / (100 / 60 * m)
    daily = stack["salesforce"].state.daily_api_limit
    return total / (daily / 86_400 * m)


def _write_config(stack: Any, path: Path, crm: str, tool: str, paced: float | None) -> Path:
    from ruamel.yaml import YAML

    stack.write_config(path, pairings=[(crm, tool)], state_url=f"sqlite:///{path.parent}/s.db")
    if paced is None:
        return path
    yaml = YAML(typ="safe", pure=True)
    text = path.read_text()
    header = "".join(line + "\n" for line in text.splitlines() if line.startswith("#"))
    config = yaml.load(text)
    for system, conn in config["connections"].items():
        conn.update(client_pacing(system, paced))
    import io

    buf = io.StringIO()
    yaml.dump(config, buf)
    path.write_text(header + buf.getvalue())
    return path


def prepare(config: Path) -> None:
    """`handoff check --create-missing`, as an operator does once: the HubSpot portal lacks
    the progress properties the presets write back (without them every deal parks)."""
    cmd = [sys.executable, "-c", "import cli; cli.main()", "check", "-c", str(config)]
    subprocess.run([*cmd, "--create-missing"], cwd=REPO, capture_output=True, check=False)


def handoff_sync(config: Path, timeout: float = 3_600) -> dict[str, Any]:
    """`handoff sync -c CONFIG --json` in a subprocess: its JSON, wall time, peak RSS."""
    cmd = [sys.executable, "-c", "import cli; cli.main()", "sync", "-c", str(config), "--json"]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode(errors="replace")
    if proc.returncode not in (0, 1):
        raise RuntimeError(f"handoff sync exited {proc.returncode}:\n{stderr[-3000:]}")
    payload = json.loads(stdout)["pipelines"][0]
    return {
        "result": payload,
        "wall_s": wall,
        "child_cpu_s": usage.ru_utime + usage.ru_stime,
        "peak_rss_mib": usage.ru_maxrss / 1024,
        "stderr_tail": stderr[-400:],
    }


def _stats(stack: Any) -> dict[str, dict[str, Any]]:
    out = {}
    for system, emu in stack.emulators.items():
        with emu.controls.lock:
            out[system] = emu.controls.stats.as_dict()
        emu.controls.reset_stats()
    return out


def backfill(crm: str, tool: str, won: int, multiplier: float | None) -> dict[str, Any]:
    """A first sync of ~`won` won deals into an empty tool; `multiplier` None = no limits."""
    from sandbox.stack import SandboxStack

    seed = math.ceil(won / WON_SHARE)
    with tempfile.TemporaryDirectory(prefix="handoff-bench-") as tmp:
        stack = SandboxStack(seed_deals=seed, systems=(crm, tool), workdir=tmp)
        t0 = time.perf_counter()
        stack.start()
        seed_s = time.perf_counter() - t0
        try:
            if multiplier is not None:
                stack.rate_limits = True  # so write_config leaves pacing to us
                for system in (crm, tool):
                    stack[system].controls.set_rate_limits(True, multiplier=multiplier)
            config = _write_config(stack, Path(tmp) / "handoff.yaml", crm, tool, multiplier)
            prepare(config)
            _stats(stack)  # reset: count only the run
            run = handoff_sync(config)
            stats = _stats(stack)
            floors = (
                {s: floor_seconds(s, stats[s], multiplier, stack) for s in (crm, tool)}
                if multiplier is not None
                else {}
            )
        finally:
            stack.stop()
    res = run["result"]
    made = res["created"] + res["adopted"]
    floor = max(floors.values()) if floors else None
    return {
        "pairing": f"{crm}-{tool}",
        "seeded": seed,
        "seed_s": seed_s,
        "won_synced": made,
        "status": res["status"],
        "dead_lettered": res["dead_lettered"],
        "api_calls": res["api_calls"],
        "calls_per_deal": {k: v / max(made, 1) for k, v in res["api_calls"].items()},
        "emulator_requests": {s: stats[s]["total"] for s in (crm, tool)},
        "throttled": {s: stats[s]["throttled"] for s in (crm, tool)},
        "wall_s": run["wall_s"],
        "child_cpu_s": run["child_cpu_s"],
        "peak_rss_mib": run["peak_rss_mib"],
        "multiplier": multiplier,
        "floors_s": floors,
        "floor_s": floor,
        "wall_over_floor": (run["wall_s"] / floor) if floor else None,
    }


def incremental(crm: str, tool: str, seeded: int) -> dict[str, Any]:
    """A first sync over `seeded` deals, then a second with nothing changed (no limits)."""
    from sandbox.stack import SandboxStack

    with tempfile.TemporaryDirectory(prefix="handoff-bench-") as tmp:
        stack = SandboxStack(seed_deals=seeded, systems=(crm, tool), workdir=tmp)
        stack.start()
        try:
            config = _write_config(stack, Path(tmp) / "handoff.yaml", crm, tool, None)
            prepare(config)
            first = handoff_sync(config)
            _stats(stack)
            second = handoff_sync(config)
            stats = _stats(stack)
        finally:
            stack.stop()
    r1, r2 = first["result"], second["result"]
    return {
        "pairing": f"{crm}-{tool}",
        "seeded": seeded,
        "linked": r1["created"] + r1["adopted"],
        "first_wall_s": first["wall_s"],
        "first_calls": r1["api_calls"],
        "second_wall_s": second["wall_s"],
        "second_engine_s": r2["duration_s"],
        "second_calls": r2["api_calls"],
        "second_emulator_requests": {s: stats[s]["total"] for s in (crm, tool)},
        "second_routes": {s: stats[s]["by_route"] for s in (crm, tool)},
        "second_changes": {k: r2[k] for k in ("created", "adopted", "updated", "read")},
        "second_peak_rss_mib": second["peak_rss_mib"],
    }
