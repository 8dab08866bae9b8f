"""Scenario 1: the forward flow alone, on in-memory connectors and SQLite state.

Each size runs in a fresh subprocess (`python -m bench.engine N`), so its peak RSS is its own.
The fakes stream: the CRM makes each page of deals when asked and the project tool keeps only
a counter, so what grows with the number of deals is the engine's, not the fakes'.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PRESET = "hubspot-asana"  # templates (name, notes, due date, tier) and typed custom fields
PAGE = 100
T0 = datetime(2024, 1, 1, tzinfo=UTC)


def make_deal(i: int) -> Any:
    from connectors.base import Deal, DealStatus

    amount = 1_000 + (i * 7_919) % 249_000
    return Deal(
        f"d{i:07d}",
        T0 + timedelta(seconds=i),
        DealStatus.WON,
        {
            "dealname": f"Company {i % 997} – Platform rollout {i}",
            "amount": str(amount),
            "deal_currency_code": ("USD", "EUR", "GBP")[i % 3],
            "closedate": (T0 + timedelta(seconds=i - 3600)).isoformat(),
            "dealstage": "closedwon",
        },
        f"https://app.hubspot.example/deal/{i}",
    )


def streaming_classes() -> tuple[type, type]:
    """The fakes, defined lazily so importing this module imports nothing of the engine."""
    from connectors.base import DealStamp, ProjectRef, ProjectSpec
    from connectors.memory import MemoryCRM, MemoryProjects

    class StreamingCRM(MemoryCRM):
        """`n` won deals, one second apart, made page by page (MemoryCRM sorts them all)."""

        def __init__(self, n: int) -> None:
            super().__init__(page_size=PAGE)
            self.n = n

        def read_changed_deals(
            self, since: datetime | None, fields: Sequence[str], until: datetime | None = None
        ) -> Iterator[list[Any]]:
            start = 0 if since is None else max(0, int((since - T0).total_seconds()))
            stop = self.n
            if until is not None:
                stop = min(stop, int((until - T0).total_seconds()) + 1)
            for lo in range(start, max(stop, start + 1), PAGE):
                self._op("read")
                page = [make_deal(i) for i in range(lo, min(lo + PAGE, stop))]
                if page:
                    yield page

    class SinkProjects(MemoryProjects):
        """Accepts every create and keeps nothing: the tool is empty before the run, so
        `find_project` finds nothing (MemoryProjects scans all projects on each find)."""

        def __init__(self) -> None:
            super().__init__()
            self.created = 0

        def create_project(self, spec: ProjectSpec, stamp: DealStamp) -> ProjectRef:
            self._op("create")
            self.created += 1
            pid = f"p{self.created}"
            return ProjectRef(pid, spec.name, f"memory://{pid}")

        def find_project(self, stamp: DealStamp, name: str | None = None) -> ProjectRef | None:
            self._op("find")
            return None

    return StreamingCRM, SinkProjects


def maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def measure(n: int, profile: str | None = None, log_level: str = "info") -> dict[str, Any]:
    """Forward-sync `n` won deals (in this process) and return the figures."""
    from mappings.field_map import load_field_map, preset_path
    from state.store import StateStore
    from sync.forward import ForwardSync
    from sync.logs import configure_logging

    # As `handoff sync` logs when stderr is not a terminal: JSON lines (here to /dev/null).
    devnull = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process
    configure_logging(json_logs=True, level=log_level, stream=devnull)
    crm_cls, tool_cls = streaming_classes()
    fmap = load_field_map(preset_path(PRESET))
    with tempfile.TemporaryDirectory(prefix="handoff-bench-") as tmp:
        store = StateStore(f"sqlite:///{tmp}/state.db")
        crm, tool = crm_cls(n), tool_cls()
        fwd = ForwardSync("bench", crm, tool, fmap, store, overlap=timedelta(minutes=2))
        # Warm up imports/caches on one mapping, outside the measured window.
        from mappings.field_map import map_deal

        map_deal(fmap, make_deal(0))
        from sync.runner import settle_heap

        settle_heap()  # as `handoff sync` does before its first run
        rss_before = maxrss_mib()
        gen_cpu0 = time.process_time()
        for i in range(min(n, 2_000)):
            make_deal(i)
        gen_cpu = (time.process_time() - gen_cpu0) / min(n, 2_000) * n  # the fake's share
        profiler = None
        if profile:
            import cProfile

            profiler = cProfile.Profile()
            profiler.enable()
        wall0, cpu0 = time.perf_counter(), time.process_time()
        counts = fwd.run()
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(profile)
        db_bytes = sum(f.stat().st_size for f in Path(tmp).iterdir())
        store.close()
    assert counts.created == n, counts
    return {
        "deals": n,
        "created": counts.created,
        "wall_s": wall,
        "deals_per_s": n / wall,
        "cpu_us_per_deal": cpu / n * 1e6,
        "fake_cpu_us_per_deal": gen_cpu / n * 1e6,
        "rss_before_mib": rss_before,
        "peak_rss_mib": maxrss_mib(),
        "db_mib": db_bytes / 2**20,
        "calls": dict(crm.calls) | {f"tool.{k}": v for k, v in tool.calls.items()},
        "log_level": log_level,
    }


def run_child(n: int, *, profile: str | None = None, log_level: str = "info") -> dict[str, Any]:
    """`measure(n)` in a fresh interpreter, so each size's peak memory is its own."""
    cmd = [sys.executable, "-m", "bench.engine", str(n), "--log-level", log_level]
    if profile:
        cmd += ["--profile", profile]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"engine bench ({n} deals) failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def top_costs(profile_path: str, limit: int = 20) -> tuple[str, str]:
    """The profile's top functions by own time and by cumulative time, as text."""
    import io
    import pstats

    out = []
    for key in ("tottime", "cumulative"):
        buf = io.StringIO()
        stats = pstats.Stats(profile_path, stream=buf)
        stats.strip_dirs().sort_stats(key).print_stats(limit)
        text = buf.getvalue()
        out.append(text[text.find("   ncalls") :].rstrip())
    return out[0], out[1]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("deals", type=int)
    ap.add_argument("--profile", help="write a cProfile of the run here")
    ap.add_argument("--log-level", default="info")
    args = ap.parse_args(argv)
    print(json.dumps(measure(args.deals, args.profile, args.log_level)))


if __name__ == "__main__":
    main()
