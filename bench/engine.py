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


def measure(
    n: int,
    profile: str | None = None,
    log_level: str = "info",
    *,
    lo: int = 0,
    hi: int | None = None,
    db: str | None = None,
    wait_for_go: bool = False,
) -> dict[str, Any]:
    """Forward-sync won deals `lo`..`hi` of `n` (in this process) and return the figures.

    With `db` the state lives there (shared with other workers) and the run is one slice of
    a split backfill: its own checkpoint stream over its own record range, as
    `handoff backfill --slices` runs each slice. With `wait_for_go` the process prints
    "ready" once set up and starts when a line arrives on stdin, so workers start together.
    """
    from mappings.field_map import load_field_map, map_deal, preset_path
    from state.store import StateStore
    from sync.forward import ForwardSync
    from sync.logs import configure_logging
    from sync.runner import settle_heap

    hi = n if hi is None else hi
    count = hi - lo
    # As `handoff sync` logs when stderr is not a terminal: JSON lines (here to /dev/null).
    devnull = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process
    configure_logging(json_logs=True, level=log_level, stream=devnull)
    crm_cls, tool_cls = streaming_classes()
    fmap = load_field_map(preset_path(PRESET))
    with tempfile.TemporaryDirectory(prefix="handoff-bench-") as tmp:
        store = StateStore(f"sqlite:///{db or tmp + '/state.db'}")
        crm, tool = crm_cls(hi), tool_cls()
        stream = f"bench-slice-{lo}" if db else "deals"
        fwd = ForwardSync(
            "bench", crm, tool, fmap, store, overlap=timedelta(minutes=2), stream=stream
        )
        fwd.adopt_first = True  # a backfill looks for stamped projects before creating
        map_deal(fmap, make_deal(0))  # warm caches outside the measured window
        gen_cpu0 = time.process_time()
        for i in range(min(count, 2_000)):
            make_deal(i)
        gen_cpu = (time.process_time() - gen_cpu0) / min(count, 2_000) * count  # the fake's
        settle_heap()  # as `handoff sync` does before its first run
        rss_before = maxrss_mib()
        if wait_for_go:
            print("ready", flush=True)
            sys.stdin.readline()
        profiler = None
        if profile:
            import cProfile

            profiler = cProfile.Profile()
            profiler.enable()
        wall0, cpu0 = time.perf_counter(), time.process_time()
        since = T0 + timedelta(seconds=lo)
        counts = fwd.run(since=since, until=T0 + timedelta(seconds=hi - 1))
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(profile)
        state_dir = Path(db).parent if db else Path(tmp)
        db_bytes = sum(f.stat().st_size for f in state_dir.iterdir())
        store.close()
    assert counts.created == count, counts
    return {
        "deals": count,
        "created": counts.created,
        "wall_s": wall,
        "deals_per_s": count / wall,
        "cpu_s": cpu,
        "cpu_us_per_deal": cpu / count * 1e6,
        "fake_cpu_us_per_deal": gen_cpu / count * 1e6,
        "rss_before_mib": rss_before,
        "peak_rss_mib": maxrss_mib(),
        "db_mib": db_bytes / 2**20,
        "calls": dict(crm.calls) | {f"tool.{k}": v for k, v in tool.calls.items()},
        "log_level": log_level,
    }


def _command(n: int, log_level: str, profile: str | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "bench.engine", str(n), "--log-level", log_level]
    return cmd + (["--profile", profile] if profile else [])


def run_child(n: int, *, profile: str | None = None, log_level: str = "info") -> dict[str, Any]:
    """`measure(n)` in a fresh interpreter, so each size's peak memory is its own."""
    proc = subprocess.run(
        _command(n, log_level, profile), cwd=REPO, capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"engine bench ({n} deals) failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_workers(n: int, workers: int, *, log_level: str = "info") -> dict[str, Any]:
    """The backfill split into `workers` record ranges, one process each, on one SQLite
    state database: how a backfill uses more than one core (Python runs one thread of
    Python at a time). Timed from the moment every worker is ready to the last one done."""
    with tempfile.TemporaryDirectory(prefix="handoff-bench-") as tmp:
        db = f"{tmp}/state.db"
        from state.store import StateStore

        StateStore(f"sqlite:///{db}").close()  # schema first, so workers only open it
        procs = []
        for i in range(workers):
            lo, hi = n * i // workers, n * (i + 1) // workers
            cmd = _command(n, log_level) + ["--range", f"{lo}:{hi}", "--db", db, "--wait"]
            procs.append(
                subprocess.Popen(
                    cmd, cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
                )
            )
        for p in procs:
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        wall0 = time.perf_counter()
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        outs = [p.communicate()[0] for p in procs]
        wall = time.perf_counter() - wall0
        if any(p.returncode for p in procs):
            raise RuntimeError(f"engine bench workers failed: {[p.returncode for p in procs]}")
        parts = [json.loads(o.strip().splitlines()[-1]) for o in outs]
    cpu = sum(r["cpu_s"] for r in parts)
    return {
        "deals": n,
        "workers": workers,
        "created": sum(r["created"] for r in parts),
        "wall_s": wall,
        "deals_per_s": n / wall,
        "cpu_us_per_deal": cpu / n * 1e6,
        "fake_cpu_us_per_deal": sum(r["fake_cpu_us_per_deal"] * r["deals"] for r in parts) / n,
        "rss_before_mib": max(r["rss_before_mib"] for r in parts),
        "peak_rss_mib": max(r["peak_rss_mib"] for r in parts),
        "db_mib": max(r["db_mib"] for r in parts),
        "log_level": log_level,
    }


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
    ap.add_argument("--workers", type=int, default=1, help="split into this many processes")
    ap.add_argument("--range", help="LO:HI, this worker's deals (internal)")
    ap.add_argument("--db", help="shared state database path (internal)")
    ap.add_argument("--wait", action="store_true", help="wait for a line on stdin (internal)")
    args = ap.parse_args(argv)
    if args.workers > 1:
        print(json.dumps(run_workers(args.deals, args.workers, log_level=args.log_level)))
        return
    lo, hi = (int(x) for x in args.range.split(":")) if args.range else (0, args.deals)
    result = measure(
        args.deals, args.profile, args.log_level, lo=lo, hi=hi, db=args.db, wait_for_go=args.wait
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
