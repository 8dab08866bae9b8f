"""The `handoff` command: validate, sync, status, sandbox, demo.

Exit codes: 0 all applied; 1 some records parked; 2 configuration error; 3 a system could not
be reached or authenticated. User errors print as sentences, never as stack traces.
"""

from __future__ import annotations

import json
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from connectors.errors import ConnectorError
from connectors.secrets import redact
from mappings.problems import ProblemsFound

app = typer.Typer(
    name="handoff",
    help="Won CRM deals become delivery projects; milestone progress flows back to the deal.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
sandbox_app = typer.Typer(help="Local emulators of HubSpot, Salesforce, Asana and ClickUp.")
app.add_typer(sandbox_app, name="sandbox")

out = Console()
err = Console(stderr=True)

ConfigOpt = Annotated[
    Path,
    typer.Option("--config", "-c", envvar="HANDOFF_CONFIG", help="config file", show_default=True),
]
DEFAULT_CONFIG = Path("handoff.yaml")


def _version() -> str:
    try:
        return version("handoff")
    except PackageNotFoundError:
        return "0+unknown"


def _version_callback(value: bool) -> None:
    if value:
        out.print(f"handoff {_version()}")
        raise typer.Exit()


@app.callback()
def main_options(
    json_logs: Annotated[
        bool, typer.Option("--json-logs", help="JSON log lines even on a terminal")
    ] = False,
    log_level: Annotated[str, typer.Option("--log-level", help="debug, info, warning")] = "info",
    _version_flag: Annotated[
        bool,
        typer.Option("--version", callback=_version_callback, is_eager=True, help="print version"),
    ] = False,
) -> None:
    from sync.logs import configure_logging

    configure_logging(json_logs=True if json_logs else None, level=log_level)


def _fail_config(problems: ProblemsFound) -> typer.Exit:
    for p in problems.problems:
        err.print(str(p), markup=False, highlight=False)
    n = len(problems.problems)
    err.print(f"{n} problem{'s' if n != 1 else ''} found; nothing was sent to any system.")
    return typer.Exit(2)


def _load(config: Path) -> Any:
    from sync.config import load_config

    try:
        return load_config(config)
    except ProblemsFound as exc:
        raise _fail_config(exc) from None


@app.command()
def validate(config: ConfigOpt = DEFAULT_CONFIG) -> None:
    """Check the config and every mapping file it uses; no network calls."""
    loaded = _load(config)
    names = ", ".join(p.name for p in loaded.config.pipelines)
    out.print(f"{config}: OK ({len(loaded.config.pipelines)} pipeline(s): {names})")


def _store(loaded: Any) -> Any:
    from state.store import StateStore

    return StateStore(loaded.state_url)


def _selected(loaded: Any, pipeline: str | None) -> list[Any]:
    pipelines = [p for p in loaded.config.pipelines if p.enabled]
    if pipeline is None:
        return pipelines
    try:
        return [loaded.config.pipeline(pipeline)]
    except KeyError:
        known = ", ".join(p.name for p in loaded.config.pipelines)
        err.print(f"{loaded.path}: no pipeline named '{pipeline}' — use one of: {known}")
        raise typer.Exit(2) from None


def run_sync(
    loaded: Any, pipelines: list[Any], *, dry_run: bool, show_progress: bool = True
) -> list[Any]:
    from sync.runner import Connections, run_pipeline

    store = _store(loaded)
    connections = Connections(loaded)
    results = []
    try:
        for p in pipelines:
            with _progress(show_progress and err.is_terminal, p.name) as tick:
                results.append(
                    run_pipeline(loaded, p, store, connections, dry_run=dry_run, on_progress=tick)
                )
    except ConnectorError as exc:
        err.print(redact(str(exc)))
        raise typer.Exit(3) from None
    finally:
        connections.close()
        store.close()
    return results


class _progress:
    """A Rich progress line on a terminal, nothing otherwise."""

    def __init__(self, enabled: bool, label: str) -> None:
        self.enabled, self.label = enabled, label
        self._p: Any = None

    def __enter__(self) -> Any:
        if not self.enabled:
            return None
        from rich.progress import (
            MofNCompleteColumn,
            Progress,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
        )

        self._p = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            MofNCompleteColumn(),
            TextColumn("deals"),
            TimeElapsedColumn(),
            console=err,
            transient=True,
        )
        self._p.start()
        task = self._p.add_task(self.label, total=None)
        return lambda n: self._p.advance(task, n)

    def __exit__(self, *exc: Any) -> None:
        if self._p is not None:
            self._p.stop()


def _results_table(results: list[Any], title: str) -> Table:
    table = Table(title=title)
    for col in (
        "pipeline",
        "status",
        "created",
        "updated",
        "unchanged",
        "skipped",
        "parked",
        "API calls",
    ):
        table.add_column(col, justify="right" if col not in ("pipeline", "status") else "left")
    for r in results:
        c = r.counts
        table.add_row(
            r.name,
            r.status,
            str(c.created + c.adopted),
            str(c.updated),
            str(c.unchanged),
            str(c.skipped),
            str(c.dead_lettered),
            str(sum(r.api_calls.values())),
        )
    return table


@app.command()
def sync(
    pipeline: Annotated[str | None, typer.Argument(help="one pipeline (default: all)")] = None,
    config: ConfigOpt = DEFAULT_CONFIG,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="plan only; write nothing")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
) -> None:
    """Run pipelines once: read what changed since the cursor and apply it."""
    from sync.runner import exit_code

    loaded = _load(config)
    results = run_sync(loaded, _selected(loaded, pipeline), dry_run=dry_run)
    if as_json:
        payload = {"dry_run": dry_run, "pipelines": [r.as_dict() for r in results]}
        if dry_run:
            for r, d in zip(results, payload["pipelines"], strict=True):
                d["plan"] = [a.__dict__ for a in r.plan]
        print(json.dumps(payload, default=str))
    else:
        out.print(_results_table(results, "Plan (dry run)" if dry_run else "Sync"))
        for r in results:
            if r.error:
                err.print(f"{r.name}: {r.error}")
    raise typer.Exit(exit_code(results))


@app.command()
def status(
    config: ConfigOpt = DEFAULT_CONFIG,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Per pipeline: cursor, last run, links, parked records, run in progress."""
    loaded = _load(config)
    store = _store(loaded)
    rows = []
    for p in loaded.config.pipelines:
        last = store.last_run(p.name)
        running = store.running(p.name)
        cursors = store.cursors(p.name)
        rows.append(
            {
                "name": p.name,
                "cursors": {k: v.to_text() for k, v in cursors.items()},
                "links": store.link_counts(p.name),
                "parked": store.dead_letter_count(p.name),
                "running": bool(running),
                "last_run": None
                if last is None
                else {
                    "status": last.status,
                    "started_at": str(last.started_at),
                    "finished_at": str(last.finished_at),
                    "created": last.created,
                    "updated": last.updated,
                    "unchanged": last.unchanged,
                    "dead_lettered": last.dead_lettered,
                    "api_calls": last.api_calls,
                },
            }
        )
    store.close()
    if as_json:
        print(json.dumps({"pipelines": rows}, default=str))
        return
    table = Table(title="Pipelines")
    for col in ("pipeline", "cursor", "last run", "links", "parked", "running"):
        table.add_column(col)
    for r in rows:
        cur = r["cursors"].get("deals", "—").split("|")[0][:19]
        lr = r["last_run"]
        last = "never" if lr is None else f"{lr['status']} {str(lr['finished_at'])[:19]}"
        links = ", ".join(f"{k} {v}" for k, v in r["links"].items()) or "0"
        table.add_row(
            r["name"], cur, last, links, str(r["parked"]), "yes" if r["running"] else "no"
        )
    out.print(table)


# -- sandbox and demo ------------------------------------------------------------------------


@sandbox_app.command("serve")
def sandbox_serve(
    seed: Annotated[int, typer.Option("--seed", help="deals to seed in each CRM")] = 200,
    write_config: Annotated[
        Path | None, typer.Option("--write-config", help="write a config pointing at them")
    ] = None,
    rng_seed: Annotated[int, typer.Option("--rng-seed", help="random seed for the data")] = 7,
    rate_limits: Annotated[
        bool, typer.Option("--rate-limits", help="enforce the vendors' documented limits")
    ] = False,
) -> None:
    """Serve the emulators on loopback ports until interrupted."""
    import signal
    import threading

    from sandbox.stack import SandboxStack

    stack = SandboxStack(seed_deals=seed, rng_seed=rng_seed, rate_limits=rate_limits)
    stack.start()
    for system, url in stack.urls.items():
        out.print(f"{system:<11} {url}")
    if write_config:
        stack.write_config(write_config)
        out.print(
            f"config written to {write_config} (tokens in {stack.secrets_path(write_config)})"
        )
    out.print("Serving; Ctrl-C to stop.")
    sys.stdout.flush()
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    try:
        done.wait()
    except KeyboardInterrupt:
        pass
    finally:
        stack.stop()


@app.command()
def demo(
    deals: Annotated[int, typer.Option("--deals", help="deals to seed per CRM")] = 60,
    keep: Annotated[
        Path | None, typer.Option("--keep", help="keep config and state in this folder")
    ] = None,
) -> None:
    """Start the emulators in-process, sync into a temp SQLite store, show the projects."""
    import tempfile

    from sandbox.stack import SandboxStack

    from sync.config import load_config

    workdir = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="handoff-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    stack = SandboxStack(seed_deals=deals, rng_seed=7)
    with _progress(err.is_terminal, "starting emulators and seeding"):
        stack.start()
    try:
        cfg_path = stack.write_config(workdir / "handoff.yaml")
        loaded = load_config(cfg_path)
        results = run_sync(loaded, loaded.config.pipelines, dry_run=False)
        out.print(_results_table(results, "Demo sync"))
        out.print(stack.projects_table())
        out.print(f"config and state in {workdir}")
    finally:
        stack.stop()


def main() -> None:
    try:
        app()
    except ProblemsFound as exc:
        raise SystemExit(_fail_config(exc).exit_code) from None
    except ConnectorError as exc:
        err.print(redact(str(exc)))
        raise SystemExit(3) from None


if __name__ == "__main__":
    main()
