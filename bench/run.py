"""Run every scenario and write bench/results.md.

python -m bench.run            # engine 1k/10k/100k; emulators 1k and 10k won deals per pairing,
                               # limits off and on; no-change run on a 100k-deal history
python -m bench.run --quick    # engine 1k/10k, emulators 300 won deals, 2k history (minutes)
python -m bench.run --full     # as default plus 100k-deal backfills (hours; see README)
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PAIRINGS = [
    ("hubspot", "asana"),
    ("hubspot", "clickup"),
    ("salesforce", "asana"),
    ("salesforce", "clickup"),
]

MODES: dict[str, dict[str, Any]] = {
    # engine sizes, won deals per backfill, incremental history (deals seeded) and its won
    # share, and the pairings the incremental scenario runs for
    "quick": {
        "engine": [1_000, 10_000],
        "won": [300],
        "history": 2_000,
        "history_won": 0.4,
        "incremental": [PAIRINGS[0], PAIRINGS[3]],
    },
    "default": {
        "engine": [1_000, 10_000, 100_000],
        "won": [1_000, 10_000],
        "history": 100_000,
        "history_won": 0.05,
        "incremental": [PAIRINGS[0], PAIRINGS[3]],
    },
    "full": {
        "engine": [1_000, 10_000, 100_000],
        "won": [1_000, 10_000, 100_000],
        "history": 100_000,
        "history_won": 0.4,
        "incremental": PAIRINGS,
    },
}


def machine() -> dict[str, str]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    nproc = subprocess.run(["nproc"], capture_output=True, text=True, check=False).stdout.strip()
    return {
        "nproc": nproc,
        "cpu": cpu,
        "python": platform.python_version(),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def _fmt(v: Any, digits: int = 1) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, dict):
        return ", ".join(
            f"{k} {_fmt(x, 2 if isinstance(x, float) else digits)}" for k, x in v.items()
        )
    return str(v)


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def engine_section(sizes: list[int], profile_size: int) -> str:
    from bench.engine import run_child, run_workers, top_costs

    results = []
    for n in sizes:
        print(f"engine: {n:,} deals", file=sys.stderr, flush=True)
        results.append(run_child(n) | {"workers": 1})
        print(f"engine: {n:,} deals, 2 worker processes", file=sys.stderr, flush=True)
        results.append(run_workers(n, 2))
    base = results[0]["peak_rss_mib"]
    rows = [
        [
            r["deals"],
            r["workers"],
            r["wall_s"],
            round(r["deals_per_s"]),
            round(r["cpu_us_per_deal"]),
            round(r["fake_cpu_us_per_deal"], 1),
            r["peak_rss_mib"],
            f"{r['peak_rss_mib'] / base:.2f}×",
            r["db_mib"],
        ]
        for r in results
    ]
    out = [
        "## 1. Engine alone (in-memory CRM and project tool, SQLite state)",
        "",
        "Forward flow, first run (so every create looks for a stamped project first), preset "
        "`hubspot-asana` (4 Jinja templates, typed custom fields), JSON logs at info level to "
        "/dev/null as `handoff sync` logs. One fresh subprocess per size (`python -m "
        "bench.engine N`). *Fake CPU* is the share of the CPU the streaming fake CRM spends "
        "making deals; it is included in *engine CPU*. *Processes 2*: the same deals split "
        "into two record ranges, one process each on one SQLite state database (`python -m "
        "bench.engine N --workers 2`), as `handoff backfill --slices 2` with two workers "
        "splits a backfill: Python runs one thread of Python at a time, so this is how a "
        "backfill uses the second core. Peak RSS is per process.",
        "",
        _table(
            [
                "deals",
                "processes",
                "wall s",
                "deals/s",
                "engine CPU µs/deal",
                "fake CPU µs/deal",
                "peak RSS MiB",
                "peak vs 1k",
                "state DB MiB",
            ],
            rows,
        ),
        "",
    ]
    # A rate over a run long enough to have one: at 1,000 deals a run lasts about 0.1 s, of
    # which the process's fixed costs (statements compiled on first use) are a third.
    steady = [r for r in results if r["deals"] >= 10_000] or results
    slowest = min(r["deals_per_s"] for r in steady if r["workers"] == 2)
    single = min(r["deals_per_s"] for r in steady if r["workers"] == 1)
    flat = max(r["peak_rss_mib"] for r in results if r["workers"] == 1) / base
    out.append(
        f"Goal ≥10,000 deals/s (runs of 10,000 deals and more): "
        f"**{'met' if slowest >= 10_000 else 'missed'}** "
        f"(slowest {slowest:,.0f}/s with both cores, {single:,.0f}/s in one process). "
        f"Goal peak within 1.5× of the 1k peak: "
        f"**{'met' if flat <= 1.5 else 'missed'}** ({flat:.2f}×)."
    )
    if slowest < 10_000:
        with tempfile.TemporaryDirectory() as tmp:
            prof = f"{tmp}/engine.prof"
            print(f"engine: profiling {profile_size:,} deals", file=sys.stderr, flush=True)
            run_child(profile_size, profile=prof)
            own, cumulative = top_costs(prof, 25)
        out += [
            "",
            f"### Profile ({profile_size:,} deals, cProfile; times inflated by the profiler)",
            "",
            "Top by cumulative time:",
            "",
            "```",
            cumulative,
            "```",
            "",
            "Top by own time:",
            "",
            "```",
            own,
            "```",
        ]
    return "\n".join(out)


def _keep(result: dict[str, Any]) -> None:
    """Append one run's figures to bench/results.partial.jsonl as soon as it ends, so that an
    interrupted benchmark still leaves what it measured."""
    result["load_at_end"] = load()
    with (HERE / "results.partial.jsonl").open("a") as f:
        f.write(json.dumps(result, default=str) + "\n")


def run_backfills(
    sizes: list[int],
    pairings: list[tuple[str, str]],
    limits_modes: tuple[bool, ...] = (True, False),
) -> list[dict[str, Any]]:
    from bench.emulators import backfill

    raw = []
    for won in sizes:
        for crm, tool in pairings:
            for limits in limits_modes:
                print(
                    f"emulators: {crm}-{tool} {won:,} won, limits {'on' if limits else 'off'}",
                    file=sys.stderr,
                    flush=True,
                )
                r = backfill(crm, tool, won, limits)
                raw.append(r)
                _keep(r)
    return raw


def backfill_text(raw: list[dict[str, Any]]) -> str:
    from bench.emulators import MULTIPLIERS

    rows_off, rows_on = [], []
    order = {f"{c}-{t}": i for i, (c, t) in enumerate(PAIRINGS)}
    for r in sorted(raw, key=lambda r: (r["seeded"], order.get(r["pairing"], 9))):
        made = max(r["won_synced"], 1)
        if not r["limits"]:
            rows_off.append(
                [
                    r["pairing"],
                    r["won_synced"],
                    r["status"],
                    r["wall_s"],
                    r["won_synced"] / r["wall_s"],
                    r["api_calls"],
                    r["calls_per_deal"],
                    r["child_cpu_s"] * 1e3 / made,
                    r["peak_rss_mib"],
                ]
            )
            continue
        binding = max(r["floors_s"], key=lambda s: r["floors_s"][s])
        per_limit = r["floor_by_limit"][binding]
        limit_name = max(per_limit, key=lambda k: per_limit[k]["floor_s"])
        lim = per_limit[limit_name]
        rows_on.append(
            [
                r["pairing"],
                r["won_synced"],
                r["status"],
                r["wall_s"],
                f"{binding} {limit_name}: {lim['calls']:,} calls, "
                f"{lim['per_window']:,}/{lim['window_s']:g} s",
                r["floors_s"],
                r["floor_s"],
                f"{r['wall_over_floor']:.3f}" if r["wall_over_floor"] else "—",
                r["throttled"],
                r["child_cpu_s"] * 1e3 / made,
                r["peak_rss_mib"],
            ]
        )
    factors = ", ".join(f"{s} ×{m:g}" for s, m in MULTIPLIERS.items())
    text = "\n".join(
        [
            "## 2. Backfill against the emulators",
            "",
            "`handoff sync -c CONFIG --json` in a subprocess (after `handoff check "
            "--create-missing`), emulators in the benchmark process on loopback, SQLite state. "
            "The CRM is seeded with won ÷ 0.4 deals (~40% won) and the tool is empty: every "
            "won deal becomes a project and its progress is written back. *Client CPU "
            "ms/deal* is the subprocess's user+system time per synced deal; *peak RSS* its "
            "ru_maxrss.",
            "",
            "### Rate limits off",
            "",
            _table(
                [
                    "pairing",
                    "deals synced",
                    "status",
                    "wall s",
                    "deals/s",
                    "API calls",
                    "calls per deal",
                    "client CPU ms/deal",
                    "peak RSS MiB",
                ],
                rows_off,
            ),
            "",
            f"### Rate limits on: documented limits, request counts × factor ({factors})",
            "",
            "Each emulator enforces its vendor's documented limits in their documented shape "
            "(HubSpot: 100 per rolling 10 s plus search 5 per second and 250,000 a day; "
            "Asana: 1,500 per sliding minute, rejected requests counted, search 60 per "
            "minute; ClickUp: 100 per minute per token, fixed window with X-RateLimit-Reset; "
            "Salesforce: the org's rolling 24-hour allocation), each count multiplied by the "
            "vendor's factor, windows unchanged; the client is configured with the same "
            "scaled counts. *Floor* per limit: a run that made c calls governed by a limit of "
            "n per W cannot finish before (⌈c ÷ n⌉ − 1) × W (the first window's calls go at "
            "t = 0), counting the calls each limit governs from the emulators' per-route "
            "stats; per system the max over its limits, for the run the max over systems. "
            "*Binding limit* is the one that sets the floor. 429s are the emulators' "
            "`throttled` counts.",
            "",
            _table(
                [
                    "pairing",
                    "deals synced",
                    "status",
                    "wall s",
                    "binding limit",
                    "floor s per system",
                    "floor s",
                    "wall / floor",
                    "429s",
                    "client CPU ms/deal",
                    "peak RSS MiB",
                ],
                rows_on,
            ),
        ]
    )
    return text


def backfill_section(
    sizes: list[int], pairings: list[tuple[str, str]], limits_modes: tuple[bool, ...]
) -> tuple[str, list[dict[str, Any]]]:
    raw = run_backfills(sizes, pairings, limits_modes)
    return backfill_text(raw), raw


def incremental_section(
    history: int, won_share: float, pairings: list[tuple[str, str]]
) -> tuple[str, list[dict[str, Any]]]:
    from bench.emulators import incremental

    raw = []
    for crm, tool in pairings:
        print(
            f"emulators: {crm}-{tool} incremental over {history:,} deals",
            file=sys.stderr,
            flush=True,
        )
        r = incremental(crm, tool, history, won_share)
        r["won_share"] = won_share
        raw.append(r)
        _keep(r)
    return incremental_text(history, won_share, raw), raw


def incremental_text(history: int, won_share: float, raw: list[dict[str, Any]]) -> str:
    rows = []
    for r in raw:
        runs = r["runs"]
        rows.append(
            [
                r["pairing"],
                r["seeded"],
                r["linked"],
                runs[0]["wall_s"],
                runs[1]["changes"]["read"],
                runs[2]["api_calls"],
                runs[2]["changes"],
                runs[3]["wall_s"],
                runs[3]["api_calls"],
                runs[3]["changes"],
                runs[5]["api_calls"],
                runs[6]["api_calls"],
                runs[6]["changes"],
            ]
        )
    text = "\n".join(
        [
            f"## 3. Incremental sync with nothing changed ({history:,} deals in the CRM)",
            "",
            f"The CRM is seeded with {history:,} deals (~{won_share:.0%} won) whose "
            "modification times are spread over the past months (the newest hours old; the "
            "Salesforce seed's can be minutes old). Rate limits off. Run 1 links every won "
            "deal and writes progress back; run 2 follows at once and reads the echo of those "
            "writes (writing nothing: fingerprints match). Before each of runs 3, 4, 6 and 7 "
            "every emulator's clock moves ten minutes on, past the pipelines' two-minute "
            "overlap (left as configured), and nothing changes. Run 3, the first read after "
            "the echo, re-reads what changed inside the overlap before run 2's read began (the "
            "tail of run 1's write-back): the overlap exists for changes a search shows late. "
            "**Run 4** and every quiet run after it start an overlap before where the last "
            "complete read began (each system's `Date` header) and find nothing. A user then "
            "edits one deal and completes one milestone; run 5 applies that; run 6 re-reads "
            "that change's overlap and **run 7** finds nothing. Goal: ≤2 API calls per system "
            "with nothing changed.",
            "",
            _table(
                [
                    "pairing",
                    "deals in CRM",
                    "projects linked",
                    "run 1 wall s",
                    "run 2 deals read",
                    "run 3 API calls",
                    "run 3 reads",
                    "run 4 wall s",
                    "run 4 API calls",
                    "run 4 reads",
                    "run 6 API calls",
                    "run 7 API calls",
                    "run 7 reads",
                ],
                rows,
            ),
        ]
    )
    return text


def load() -> str:
    """The machine's load averages (other work competes with the benchmark for the cores)."""
    try:
        one, five, fifteen = Path("/proc/loadavg").read_text().split()[:3]
    except (OSError, ValueError):
        return "unknown"
    return f"{one} / {five} / {fifteen} (1 / 5 / 15 min)"


def _earlier_section(path: Path, heading: str) -> str | None:
    """A section of an earlier results file, kept when this run skips it."""
    if not path.exists():
        return None
    text = path.read_text()
    start = text.find(heading)
    if start < 0:
        return None
    end = text.find("\n## ", start + len(heading))
    return text[start : end if end >= 0 else len(text)].rstrip()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="small sizes: a few minutes")
    g.add_argument("--full", action="store_true", help="adds 100,000-deal backfills (long)")
    ap.add_argument(
        "--skip", action="append", default=[], choices=["engine", "emulators", "incremental"]
    )
    ap.add_argument("--won", action="append", type=int, help="won deals per backfill (repeatable)")
    ap.add_argument(
        "--pairing",
        action="append",
        choices=[f"{c}-{t}" for c, t in PAIRINGS],
        help="only these pairings (repeatable)",
    )
    ap.add_argument(
        "--limits", choices=["both", "on", "off"], default="both", help="backfills to run"
    )
    ap.add_argument(
        "--from-partial",
        action="store_true",
        help="run nothing: write the results from bench/results.partial.jsonl (the runs an "
        "interrupted benchmark finished)",
    )
    ap.add_argument("--out", default=str(HERE / "results.md"))
    args = ap.parse_args(argv)
    mode = "quick" if args.quick else "full" if args.full else "default"
    cfg = MODES[mode]
    chosen = [p for p in PAIRINGS if not args.pairing or f"{p[0]}-{p[1]}" in args.pairing]
    out = Path(args.out)
    started = time.perf_counter()
    m = machine()
    cmd = " ".join(["python -m bench.run", *(argv if argv is not None else sys.argv[1:])])
    parts = [
        "# Handoff benchmark results",
        "",
        f"Mode `{mode}` (`{cmd}`). Machine: {m['nproc']} cores, {m['cpu']}, Python "
        f"{m['python']}. Date: {m['date']}. Load average at the start: {load()}.",
        "",
    ]
    raw: dict[str, Any] = {"mode": mode, "command": cmd, "machine": m, "load_start": load()}
    if args.from_partial:
        partial = HERE / "results.partial.jsonl"
        kept = [json.loads(line) for line in partial.read_text().splitlines() if line.strip()]
        parts[2] += (
            f" Rendered from `{partial.name}`: the runs a benchmark finished, each measured "
            "when it ran (load averages per run are in results.json)."
        )
        args.skip = ["engine", "emulators", "incremental"]
        # The newest run of each pairing, size and limits setting replaces earlier ones (a
        # run repeated on newer code), in the place the first one had.
        latest: dict[tuple[Any, ...], dict[str, Any]] = {}
        for r in kept:
            latest[(r["pairing"], r["seeded"], r.get("limits"), "runs" in r)] = r
        kept = list(latest.values())
        backs = [r for r in kept if "runs" not in r]
        incs = [r for r in kept if "runs" in r]
    if "engine" not in args.skip:
        parts += [engine_section(cfg["engine"], profile_size=2_000), ""]
    else:
        kept = _earlier_section(out, "## 1. Engine alone")
        if kept:
            parts += [kept + "\n\n*(Section 1 kept from the previous results file.)*", ""]
    if args.from_partial:
        if backs:
            raw["backfill"] = backs
            parts += [backfill_text(backs), ""]
        if incs:
            raw["incremental"] = incs
            won_share = incs[0].get("won_share", cfg["history_won"])
            parts += [incremental_text(incs[0]["seeded"], won_share, incs), ""]
    if "emulators" not in args.skip:
        modes = {"both": (True, False), "on": (True,), "off": (False,)}[args.limits]
        text, raw["backfill"] = backfill_section(args.won or cfg["won"], chosen, modes)
        parts += [text, ""]
    if "incremental" not in args.skip:
        pairings = [p for p in cfg["incremental"] if p in chosen]
        text, raw["incremental"] = incremental_section(cfg["history"], cfg["history_won"], pairings)
        parts += [text, ""]
    raw["load_end"] = load()
    parts.append(
        f"Total benchmark time: {time.perf_counter() - started:,.0f} s. Load average at the "
        f"end: {load()}."
    )
    out.write_text("\n".join(parts) + "\n")
    out.with_suffix(".json").write_text(json.dumps(raw, indent=1, default=str))
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
