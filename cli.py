"""The `handoff` command: validate, sync, status, sandbox, demo.

Exit codes: 0 all applied; 1 some records parked; 2 configuration error; 3 a system could not
be reached or authenticated. User errors print as sentences, never as stack traces.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from connectors.errors import ConnectorError
from connectors.secrets import redact
from mappings.problems import ProblemsFound
from state.errors import StateSchemaError

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
        # One problem, one line, never wrapped: editors and CI annotate FILE:LINE.
        err.print(str(p), markup=False, highlight=False, soft_wrap=True)
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


@contextmanager
def _connected(loaded: Any) -> Iterator[tuple[Any, Any]]:
    """A command's state store and connections, closed at the end. A system that cannot be
    reached or refuses the credentials ends the command with its sentence and exit 3."""
    from sync.runner import Connections

    store = _store(loaded)
    connections = Connections(loaded)
    try:
        yield store, connections
    except ConnectorError as exc:
        err.print(redact(str(exc)))
        raise typer.Exit(3) from None
    finally:
        connections.close()
        store.close()


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
    from sync.runner import run_pipeline

    results = []
    with _connected(loaded) as (store, connections):
        for p in pipelines:
            with _progress(show_progress and err.is_terminal, p.name) as tick:
                results.append(
                    run_pipeline(loaded, p, store, connections, dry_run=dry_run, on_progress=tick)
                )
    return results


def _RateColumn() -> Any:  # noqa: N802 - built lazily so Rich loads only when shown
    from rich.progress import ProgressColumn
    from rich.text import Text

    class RateColumn(ProgressColumn):
        def render(self, task: Any) -> Text:
            speed = task.finished_speed or task.speed
            return Text("" if speed is None else f"{speed:,.1f}/s", style="progress.data.speed")

    return RateColumn()


class _progress:
    """A Rich progress line (records, rate, elapsed) on a terminal, nothing otherwise."""

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
            _RateColumn(),
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
    """One row per pipeline; fits 80 columns (operators read it in terminals and CI logs)."""
    from rich import box

    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("pipeline", no_wrap=True)
    table.add_column("status", no_wrap=True)
    for col in ("new", "upd", "same", "skip", "parked", "prog", "calls"):
        table.add_column(col, justify="right", no_wrap=True)
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
            str(r.back.updated),
            str(sum(r.api_calls.values())),
        )
    table.caption = (
        "new/upd: projects created/updated · same: nothing to write · skip: not won · "
        "prog: deals given new progress · calls: API calls"
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
    """Per pipeline: cursor, last run, links, parked records, run in progress; and the
    backfills split across replicas that are not finished (or the latest of each pipeline)."""
    from state.backfill_slices import BackfillSlices

    loaded = _load(config)
    store = _store(loaded)
    plans = _shown_plans(BackfillSlices(store.engine), [p.name for p in loaded.config.pipelines])
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
                    "duration_s": None
                    if last.finished_at is None
                    else round((last.finished_at - last.started_at).total_seconds(), 3),
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
        print(
            json.dumps({"pipelines": rows, "backfills": [p.__dict__ for p in plans]}, default=str)
        )
        return
    table = Table(title="Pipelines")
    for col in ("pipeline", "cursor", "last run", "links", "parked", "running"):
        table.add_column(col, no_wrap=col in ("pipeline", "cursor"))
    for r in rows:
        cur = r["cursors"].get("deals", "—").split("|")[0][:16].replace("T", " ")
        lr = r["last_run"]
        last = "never"
        if lr is not None:
            took = "" if lr["duration_s"] is None else f" {lr['duration_s']:.1f}s"
            last = (
                f"{lr['status']} {str(lr['started_at'])[5:16]}{took}\n"
                f"+{lr['created']} ~{lr['updated']} !{lr['dead_lettered']}"
            )
        links = ", ".join(f"{k} {v}" for k, v in r["links"].items()) or "0"
        table.add_row(
            r["name"], cur, last, links, str(r["parked"]), "yes" if r["running"] else "no"
        )
    out.print(table)
    if plans:
        out.print(_plans_table(plans))


def _shown_plans(slices: Any, pipelines: list[str]) -> list[Any]:
    """Unfinished plans, plus the latest plan of each pipeline."""
    shown, latest = [], set()
    for plan in slices.summaries(pipelines):
        if not plan.finished or plan.pipeline not in latest:
            shown.append(plan)
        latest.add(plan.pipeline)
    return shown


def _plans_table(plans: list[Any]) -> Table:
    table = Table(title="Backfills (per slice: handoff backfill --status ID)")
    for col in ("id", "pipeline", "slices", "won", "new", "parked"):
        table.add_column(col, no_wrap=True, justify="left" if col == "pipeline" else "right")
    for p in plans:
        states = ", ".join(f"{n} {state}" for state, n in sorted(p.states.items()))
        c = p.counts
        table.add_row(
            str(p.backfill_id),
            p.pipeline,
            states,
            f"~{p.expected}",
            str(c.get("created", 0) + c.get("adopted", 0)),
            str(c.get("dead_lettered", 0)),
        )
    return table


# -- dead letters, state, check, preview, backfill ---------------------------------------

dlq_app = typer.Typer(help="Records parked as dead letters: list, retry, drop.")
state_app = typer.Typer(help="The state store: cursors and links.")
app.add_typer(dlq_app, name="dlq")
app.add_typer(state_app, name="state")


@dlq_app.command("list")
def dlq_list(
    config: ConfigOpt = DEFAULT_CONFIG,
    pipeline: Annotated[str | None, typer.Option("--pipeline", "-p")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Every parked record: pipeline, record, step, why, attempts, next automatic retry."""
    loaded = _load(config)
    store = _store(loaded)
    items = store.dead_letters(pipeline)
    store.close()
    if as_json:
        print(json.dumps({"dead_letters": [d.__dict__ for d in items]}, default=str))
        return
    table = Table(title=f"Dead letters ({len(items)})")
    for col in ("id", "pipeline", "record", "step", "kind", "attempts", "reason"):
        table.add_column(col, overflow="fold")
    for d in items:
        table.add_row(
            str(d.id), d.pipeline, d.record_id, d.step, d.error_kind, str(d.attempts), d.message
        )
    out.print(table)


@dlq_app.command("retry")
def dlq_retry(
    dead_letter: Annotated[int | None, typer.Argument(help="id from `dlq list`")] = None,
    all_: Annotated[bool, typer.Option("--all", help="retry every parked record")] = False,
    config: ConfigOpt = DEFAULT_CONFIG,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Replay parked records now (after fixing the mapping or the data)."""
    from sync.runner import Connections, exit_code, run_pipeline

    if dead_letter is None and not all_:
        err.print("name a dead letter id (see `handoff dlq list`) or pass --all")
        raise typer.Exit(2)
    loaded = _load(config)
    store = _store(loaded)
    chosen = store.dead_letters()
    if dead_letter is not None:
        chosen = [d for d in chosen if d.id == dead_letter]
        if not chosen:
            err.print(f"no dead letter with id {dead_letter} (see `handoff dlq list`)")
            raise typer.Exit(2)
    by_pipeline: dict[str, dict[str, list[str]]] = {}
    for d in chosen:
        by_pipeline.setdefault(d.pipeline, {}).setdefault(d.stream, []).append(d.record_id)
    connections = Connections(loaded)
    results = []
    try:
        for name, retry in by_pipeline.items():
            try:
                p = loaded.config.pipeline(name)
            except KeyError:
                err.print(f"pipeline '{name}' is no longer in {config}; drop its dead letters")
                continue
            results.append(
                run_pipeline(loaded, p, store, connections, kind="dlq-retry", retry=retry)
            )
    finally:
        connections.close()
        store.close()
    left = sum(r.counts.dead_lettered for r in results)
    if as_json:
        print(json.dumps({"pipelines": [r.as_dict() for r in results]}, default=str))
    else:
        out.print(f"retried {len(chosen)} record(s); {left} parked again")
    raise typer.Exit(exit_code(results))


@dlq_app.command("drop")
def dlq_drop(
    dead_letter: Annotated[int, typer.Argument(help="id from `dlq list`")],
    config: ConfigOpt = DEFAULT_CONFIG,
) -> None:
    """Forget a parked record (it will not be retried)."""
    loaded = _load(config)
    store = _store(loaded)
    dropped = store.drop_dead_letter(dead_letter)
    store.close()
    if not dropped:
        err.print(f"no dead letter with id {dead_letter}")
        raise typer.Exit(2)
    out.print(f"dropped dead letter {dead_letter}")


@state_app.command("migrate")
def state_migrate(config: ConfigOpt = DEFAULT_CONFIG) -> None:
    """Bring the state database's schema up to date (run once per upgrade, before starting)."""
    from state.errors import StateSchemaError
    from state.store import StateStore

    loaded = _load(config)
    store = StateStore(loaded.state_url, create=False)
    try:
        before, after = store.migrate()
    except StateSchemaError as exc:
        err.print(str(exc), markup=False, highlight=False)
        raise typer.Exit(2) from None
    finally:
        store.close()
    if before == after:
        out.print(f"state schema already up to date (revision {after})")
    else:
        out.print(f"state schema migrated: {before or 'empty'} -> {after}")


@state_app.command("reset-cursor")
def state_reset_cursor(
    pipeline: Annotated[str, typer.Argument()],
    to: Annotated[
        str | None, typer.Option("--to", help="date (YYYY-MM-DD) to read from next time")
    ] = None,
    stream: Annotated[str, typer.Option("--stream", help="deals or milestones")] = "deals",
    config: ConfigOpt = DEFAULT_CONFIG,
) -> None:
    """Move a pipeline's cursor back (re-read is safe: nothing is created twice)."""
    from datetime import UTC, datetime

    from connectors.base import Cursor

    loaded = _load(config)
    _selected(loaded, pipeline)
    store = _store(loaded)
    if to:
        try:
            when = datetime.fromisoformat(to).replace(tzinfo=UTC)
        except ValueError:
            err.print(f"--to {to!r} is not a date — write YYYY-MM-DD")
            raise typer.Exit(2) from None
        store.set_cursor(pipeline, stream, Cursor(when, ""))
        out.print(f"{pipeline}/{stream}: cursor set to {when.isoformat()}")
    else:
        store.set_cursor(pipeline, stream, None)
        out.print(f"{pipeline}/{stream}: cursor cleared (next run starts from start_from)")
    store.close()


@state_app.command("export")
def state_export(
    config: ConfigOpt = DEFAULT_CONFIG,
    pipeline: Annotated[str | None, typer.Option("--pipeline", "-p")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="a JSON list instead of CSV")] = False,
) -> None:
    """Every deal-project link as CSV on stdout (for audit)."""
    import csv

    columns = [
        "pipeline",
        "deal_id",
        "state",
        "deal_status",
        "project_id",
        "project_name",
        "project_url",
    ]
    loaded = _load(config)
    store = _store(loaded)
    rows = [
        [getattr(link, c) for c in columns]
        for p in _selected(loaded, pipeline)
        for link in store.iter_links(p.name, state=None)
    ]
    store.close()
    if as_json:
        print(json.dumps([dict(zip(columns, r, strict=True)) for r in rows]))
        return
    writer = csv.writer(sys.stdout)
    writer.writerow(columns)
    writer.writerows(rows)


def _mapped_fields(fmap: Any) -> set[str]:
    """Every deal field a pipeline reads or writes."""
    return set(fmap.deal_fields) | set(fmap.spec.progress)


def _create_fields(crm: Any, fmap: Any, missing: list[str]) -> bool:
    """Create missing deal fields where the CRM allows it (HubSpot); False otherwise."""
    if not missing or not hasattr(crm, "create_properties"):
        return False
    crm.create_properties(missing, {n: r.type for n, r in fmap.spec.progress.items() if r.type})
    return True


def create_missing_fields(loaded: Any, connections: Any) -> dict[str, list[str]]:
    """Create mapped deal fields the CRM lacks, where the CRM allows it (HubSpot)."""
    created: dict[str, list[str]] = {}
    for p in loaded.config.pipelines:
        crm, fmap = connections.get(p.source), loaded.mappings[p.name]
        missing = sorted(_mapped_fields(fmap) - crm.field_names())
        if _create_fields(crm, fmap, missing):
            created[p.name] = missing
    return created


@app.command()
def check(
    config: ConfigOpt = DEFAULT_CONFIG,
    create_missing: Annotated[
        bool, typer.Option("--create-missing", help="create missing HubSpot deal properties")
    ] = False,
) -> None:
    """Reach every connection, confirm auth, and confirm the mapped deal fields exist."""
    from sync.runner import Connections

    loaded = _load(config)
    connections = Connections(loaded)
    failed = missing_any = False
    try:
        for name in loaded.config.connections:
            try:
                who = connections.get(name).check()
                out.print(f"[green]ok[/green]   {name}: {redact(who)}")
            except ConnectorError as exc:
                failed = True
                out.print(f"[red]fail[/red] {name}: {redact(str(exc))}")
        for p in loaded.config.pipelines:
            crm = connections.get(p.source)
            fmap = loaded.mappings[p.name]
            wanted = _mapped_fields(fmap)
            try:
                have = crm.field_names()  # type: ignore[attr-defined]
            except ConnectorError:
                continue
            missing = sorted(wanted - have)
            if not missing:
                out.print(
                    f"[green]ok[/green]   {p.name}: all {len(wanted)} mapped deal fields exist"
                )
                continue
            if create_missing and _create_fields(crm, fmap, missing):
                out.print(f"[green]created[/green] {p.name}: {', '.join(missing)}")
                continue
            missing_any = True
            out.print(
                f"[red]missing[/red] {p.name}: {', '.join(missing)} — create them in "
                f"{crm.kind} (or `handoff check --create-missing` for HubSpot), "
                "or fix the names in the mapping"
            )
    finally:
        connections.close()
    raise typer.Exit(3 if failed else (1 if missing_any else 0))


@app.command()
def preview(
    pipeline: Annotated[str, typer.Argument()],
    deal: Annotated[
        str | None, typer.Option("--deal", help="deal id, fetched from the CRM")
    ] = None,
    file: Annotated[Path | None, typer.Option("--file", help="a deal as JSON")] = None,
    config: ConfigOpt = DEFAULT_CONFIG,
) -> None:
    """Show what the field map makes of one deal, and every mapping error for it."""
    from datetime import UTC, datetime

    from connectors.base import Deal, DealStatus
    from mappings.field_map import map_deal
    from sync.runner import Connections

    loaded = _load(config)
    p = _selected(loaded, pipeline)[0]
    fmap = loaded.mappings[p.name]
    if (deal is None) == (file is None):
        err.print("give exactly one of --deal ID or --file deal.json")
        raise typer.Exit(2)
    if file is not None:
        try:
            raw = json.loads(file.read_text())
        except (OSError, ValueError) as exc:
            err.print(f"{file}: cannot read a deal from it: {exc}")
            raise typer.Exit(2) from None
        props = raw.get("properties", raw)
        record = Deal(
            str(raw.get("id", "preview")),
            datetime.now(UTC),
            DealStatus(raw.get("status", "won")),
            props,
        )
    else:
        connections = Connections(loaded)
        try:
            found = connections.get(p.source).get_deals([deal], fmap.deal_fields)  # type: ignore[attr-defined]
        finally:
            connections.close()
        if not found:
            err.print(f"{p.source}: no deal with id {deal}")
            raise typer.Exit(1)
        record = found[0]
    result = map_deal(fmap, record)
    milestones = raw.get("milestones") if file is not None else _linked_milestones(loaded, p, deal)
    progress_rows, progress_errors = _preview_progress(fmap, milestones, record.id)
    errors = [*result.errors, *progress_errors]
    if errors:
        for e in errors:
            fix = e.fix or "correct the value in the CRM, or change the field's rule in the map"
            err.print(f"{fmap.path}: {e.field}: {e.message} — {fix}", markup=False, soft_wrap=True)
        err.print(f"{len(errors)} mapping error(s) for deal {record.id}")
        raise typer.Exit(1)
    spec = result.spec
    table = Table(title=f"{p.name}: deal {record.id} ({record.status}) → project")
    table.add_column("field")
    table.add_column("value", overflow="fold")
    table.add_row("name", spec.name)
    table.add_row("template", spec.template or "(none: created plainly)")
    for k, v in spec.fields.items():
        table.add_row(k, str(v))
    for k, v in spec.custom_fields.items():
        table.add_row(
            f"custom: {k}",
            str(v) + ("  (kept in sync)" if f"custom_fields.{k}" in result.synced else ""),
        )
    for m in spec.milestones:
        table.add_row("milestone", f"{m.name} (due {m.due_on or '—'})")
    out.print(table)
    if progress_rows is not None:
        back = Table(title=f"{p.name}: milestone progress → deal {record.id} fields")
        back.add_column("deal field")
        back.add_column("value", overflow="fold")
        for k, v in progress_rows.items():
            back.add_row(k, "" if v is None else str(v))
        out.print(back)


def _linked_milestones(loaded: Any, p: Any, deal_id: str | None) -> Any:
    """The milestone snapshot of the deal's linked project, if it has one."""
    if deal_id is None:
        return None
    store = _store(loaded)
    try:
        link = store.links_for(p.name, [deal_id]).get(deal_id)
    finally:
        store.close()
    return None if link is None or not link.milestones else link.milestones


def _preview_progress(
    fmap: Any, milestones: Any, deal_id: str
) -> tuple[dict[str, Any] | None, list[Any]]:
    """The back flow for one deal: the progress fields the map writes, from milestones
    given as a snapshot {id: [name, done, done_at, due]} or a list of
    {name, completed, completed_at, due_on}."""
    from datetime import UTC, datetime

    from mappings.field_map import evaluate
    from sync.back import compute_progress

    if not fmap.spec.progress or milestones is None:
        return None, []
    if isinstance(milestones, list):
        milestones = {
            str(i): [
                m.get("name", f"milestone {i}"),
                bool(m.get("completed")),
                m.get("completed_at"),
                m.get("due_on"),
            ]
            for i, m in enumerate(milestones)
        }
    today = datetime.now(UTC).date()
    progress = compute_progress(milestones, today)
    context = {
        "progress": progress.as_dict(),
        "deal": {"id": deal_id},
        "today": today,
        "now": datetime.now(UTC),
    }
    rows: dict[str, Any] = {}
    errors = []
    for field_name, rule in fmap.spec.progress.items():
        value, problem = evaluate(
            fmap, f"progress.{field_name}", rule, context, context["progress"]
        )
        if problem is not None:
            errors.append(problem)
        else:
            rows[field_name] = value
    return rows, errors


@app.command()
def backfill(
    pipeline: Annotated[str | None, typer.Argument(help="the pipeline to backfill")] = None,
    since: Annotated[str | None, typer.Option("--since", help="YYYY-MM-DD")] = None,
    until: Annotated[str | None, typer.Option("--until", help="YYYY-MM-DD")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="plan only; write nothing")] = False,
    limit: Annotated[
        int | None,
        typer.Option("--limit", min=1, help="read at most N deals now; run again to go on"),
    ] = None,
    slices: Annotated[
        int | None,
        typer.Option(
            "--slices",
            min=1,
            max=256,
            help="split into N record ranges that replicas work together",
        ),
    ] = None,
    detach: Annotated[
        bool,
        typer.Option("--detach", help="with --slices: store the plan, leave it to the others"),
    ] = False,
    join: Annotated[
        int | None,
        typer.Option("--join", metavar="ID", help="work on backfill plan ID with the others"),
    ] = None,
    retry_failed: Annotated[
        bool, typer.Option("--retry-failed", help="with --join: run failed slices again")
    ] = False,
    status_of: Annotated[
        int | None,
        typer.Option("--status", metavar="ID", help="show plan ID's progress per slice"),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
    config: ConfigOpt = DEFAULT_CONFIG,
) -> None:
    """Run a pipeline over a window without touching its cursor; resumable.

    Interrupted (or stopped by --limit), the same command continues from its own
    checkpoint and never creates a project twice. --dry-run writes nothing and prints
    what would be created, updated and skipped, and the API calls the real run costs.

    --slices N splits the window into up to N record ranges (modified-time slices with
    about equal won deals, planned from one keys-only read of the window) and stores the
    plan in the state store. This command then works its slices one at a time, and so do
    `handoff backfill --join ID` elsewhere and every `handoff run` daemon on the same
    database. A killed worker's slice is taken over when its lease (lease_ttl) expires and
    resumes at its last page. The pipeline's sync waits until the backfill is done.
    --status ID shows the plan per slice."""
    from datetime import UTC, datetime

    from sync.runner import exit_code, run_pipeline

    def parse(text: str, flag: str) -> datetime:
        try:
            return datetime.fromisoformat(text).replace(tzinfo=UTC)
        except ValueError:
            err.print(f"{flag} {text!r} is not a date — write YYYY-MM-DD")
            raise typer.Exit(2) from None

    if status_of is not None or join is not None:
        if pipeline or since or until or slices or dry_run or limit or detach:
            err.print("--join and --status take a plan id only (the plan knows the rest)")
            raise typer.Exit(2)
        loaded = _load(config)
        if status_of is not None:
            _backfill_status(loaded, status_of, as_json)
            return
        assert join is not None
        _work_plan(loaded, join, as_json, retry_failed=retry_failed)
    if pipeline is None or since is None:
        err.print("name the pipeline and --since (or --join ID, --status ID)")
        raise typer.Exit(2)
    if slices is not None and (dry_run or limit is not None):
        err.print(
            "--slices plans and runs the backfill across replicas; for --dry-run or --limit "
            "run it without --slices"
        )
        raise typer.Exit(2)
    if (detach and slices is None) or retry_failed:
        err.print("--detach goes with --slices, --retry-failed with --join")
        raise typer.Exit(2)
    loaded = _load(config)
    p = _selected(loaded, pipeline)[0]
    start, end = parse(since, "--since"), (parse(until, "--until") if until else None)
    if slices is not None:
        backfill_id = _plan_slices(loaded, p, start, end, slices, as_json=as_json and detach)
        if detach:
            raise typer.Exit(0)
        _work_plan(loaded, backfill_id, as_json)
    with (
        _connected(loaded) as (store, connections),
        _progress(err.is_terminal, f"backfill {p.name}") as tick,
    ):
        result = run_pipeline(
            loaded,
            p,
            store,
            connections,
            dry_run=dry_run,
            kind="backfill",
            since=start,
            until=end,
            on_progress=tick,
            limit=limit,
        )
    if as_json:
        payload = result.as_dict()
        if dry_run:
            payload["plan"] = [a.__dict__ for a in result.plan]
            payload["predicted_api_calls"] = _predicted_calls(result)
            payload["predicted_api_calls_total"] = sum(payload["predicted_api_calls"].values())
        print(json.dumps(payload, default=str))
    else:
        if dry_run:
            out.print(_plan_table(result))
            out.print(_cost_table(result))
        else:
            out.print(_results_table([result], "Backfill"))
        if limit is not None and result.counts.read >= limit:
            out.print(f"stopped after --limit {limit} deals; run the same command to continue")
        if result.error:
            err.print(f"{result.name}: {result.error}")
    raise typer.Exit(exit_code([result]))


# -- backfills split across replicas -------------------------------------------------------


def _plan_slices(loaded: Any, p: Any, start: Any, end: Any, n: int, *, as_json: bool) -> int:
    """Plan the backfill into slices, store the plan, say how others join; returns its id."""
    from sync.backfill_plan import plan_backfill

    with (
        _connected(loaded) as (store, connections),
        _progress(err.is_terminal, f"planning {p.name} (keys-only read)"),
    ):
        planned = plan_backfill(loaded, p, store, connections, since=start, until=end, slices=n)
    if as_json:
        print(
            json.dumps(
                {
                    "backfill_id": planned.backfill_id,
                    "pipeline": p.name,
                    "won": planned.won,
                    "read": planned.read,
                    "api_calls": planned.api_calls,
                    "slices": [_slice_dict(s) for s in planned.slices],
                },
                default=str,
            )
        )
    else:
        calls = sum(planned.api_calls.values())
        err.print(
            f"backfill {planned.backfill_id}: {p.name} planned as {len(planned.slices)} "
            f"slice(s) over {planned.won} won deal(s) ({planned.read} read, {calls} API "
            f"call(s)). Other replicas join with `handoff backfill --join "
            f"{planned.backfill_id}`; `handoff run` daemons on this database join by "
            "themselves.",
            soft_wrap=True,
        )
    return planned.backfill_id


def _work_plan(loaded: Any, backfill_id: int, as_json: bool, *, retry_failed: bool = False) -> None:
    """Work the plan's slices beside the other replicas until none is pending or running;
    SIGTERM/SIGINT hand the slice in hand back at a page boundary."""
    import signal
    import threading

    from state.backfill_slices import BackfillSlices
    from sync.backfill_plan import plan_exit_code, work_backfill
    from sync.runner import Connections, new_owner

    store = _store(loaded)
    plans = BackfillSlices(store.engine)
    plan = plans.slices(backfill_id)
    if not plan:
        store.close()
        err.print(f"no backfill with id {backfill_id} (see `handoff status`)")
        raise typer.Exit(2)
    try:
        loaded.config.pipeline(plan[0].pipeline)
    except KeyError:
        store.close()
        err.print(
            f"backfill {backfill_id} is of pipeline '{plan[0].pipeline}', which is no longer "
            f"in {loaded.path}; put it back to run the plan"
        )
        raise typer.Exit(2) from None
    if retry_failed:
        n = plans.retry_failed(backfill_id)
        err.print(f"backfill {backfill_id}: {n} failed slice(s) will run again")
    stopping = threading.Event()
    stop_signals = (signal.SIGTERM, signal.SIGINT)
    before = {sig: signal.signal(sig, lambda *_: stopping.set()) for sig in stop_signals}
    said: set[str] = set()

    def waiting(why: str) -> None:
        if why not in said:
            said.add(why)
            err.print(f"backfill {backfill_id}: waiting ({why})")

    connections = Connections(loaded)
    try:
        with _progress(err.is_terminal, f"backfill {backfill_id}") as tick:
            runs = work_backfill(
                loaded,
                store,
                connections,
                owner=new_owner(),
                backfill_id=backfill_id,
                wait=True,
                should_stop=stopping.is_set,
                on_progress=tick,
                on_wait=waiting,
            )
        plan = plans.slices(backfill_id)
    except ConnectorError as exc:
        err.print(redact(str(exc)))
        raise typer.Exit(3) from None
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
        connections.close()
        store.close()
    if as_json:
        payload = _plan_dict(backfill_id, plan)
        payload["worked"] = [
            {"slice": r.slice.index, "outcome": r.outcome, **r.result.as_dict()} for r in runs
        ]
        print(json.dumps(payload, default=str))
    else:
        out.print(_slices_table(backfill_id, plan))
        mine = ", ".join(f"{r.slice.index} ({r.outcome})" for r in runs) or "none"
        out.print(f"slices this worker ran: {mine}")
        left = sum(s.state in ("pending", "running") for s in plan)
        if left:
            out.print(
                f"{left} slice(s) not done yet: `handoff backfill --join {backfill_id}` "
                "(or any `handoff run` daemon) goes on"
            )
        for s in plan:
            if s.error:
                err.print(f"slice {s.index}: {s.error}", markup=False, soft_wrap=True)
    raise typer.Exit(plan_exit_code(plan, runs))


def _slice_dict(s: Any) -> dict[str, Any]:
    return {
        "index": s.index,
        "since": s.since,
        "until": s.until,
        "expected_won": s.expected,
        "state": s.state,
        "owner": s.owner,
        "lease_expires_at": s.lease_expires_at,
        "attempts": s.attempts,
        "counts": s.counts,
        "error": s.error,
        "started_at": s.started_at,
        "finished_at": s.finished_at,
    }


def _plan_dict(backfill_id: int, plan: list[Any]) -> dict[str, Any]:
    from collections import Counter

    return {
        "backfill_id": backfill_id,
        "pipeline": plan[0].pipeline if plan else None,
        "states": dict(Counter(s.state for s in plan)),
        "slices": [_slice_dict(s) for s in plan],
    }


def _slices_table(backfill_id: int, plan: list[Any]) -> Table:
    """One row per slice; fits 80 columns."""
    from rich import box

    done = sum(s.state == "done" for s in plan)
    pipeline = plan[0].pipeline if plan else "?"
    table = Table(
        title=f"Backfill {backfill_id} of {pipeline}: {done}/{len(plan)} slices done",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
    )
    table.add_column("#", justify="right", no_wrap=True)
    table.add_column("from (UTC)", no_wrap=True)
    table.add_column("state", no_wrap=True)
    table.add_column("owner", overflow="fold")
    for col in ("won", "read", "new", "parked"):
        table.add_column(col, justify="right", no_wrap=True)
    for s in plan:
        c = s.counts
        table.add_row(
            str(s.index),
            s.since.strftime("%Y-%m-%d %H:%M:%S"),
            s.state,
            ":".join((s.owner or "").split(":")[:2]),
            f"~{s.expected}",
            str(c.get("read", "")),
            str(c.get("created", 0) + c.get("adopted", 0)) if c else "",
            str(c.get("dead_lettered", "")),
        )
    last = plan[-1].until if plan else None
    table.caption = (
        "each slice runs up to the next one's start; the last to "
        + (last.strftime("%Y-%m-%d %H:%M:%S") if last else "the time it runs")
        + " · won: counted when planned · new: projects created or adopted"
    )
    return table


def _backfill_status(loaded: Any, backfill_id: int, as_json: bool) -> None:
    from state.backfill_slices import BackfillSlices

    store = _store(loaded)
    try:
        plan = BackfillSlices(store.engine).slices(backfill_id)
    finally:
        store.close()
    if not plan:
        err.print(f"no backfill with id {backfill_id} (see `handoff status`)")
        raise typer.Exit(2)
    if as_json:
        print(json.dumps(_plan_dict(backfill_id, plan), default=str))
        return
    out.print(_slices_table(backfill_id, plan))
    for s in plan:
        if s.error:
            err.print(f"slice {s.index}: {s.error}", markup=False, soft_wrap=True)


_WHY = {
    "create": "won, no project yet",
    "adopt": "won; its stamped project exists: link it",
    "adopt-or-create": "claimed earlier: adopt its project, or create",
    "update": "kept-in-sync fields changed",
    "unchanged": "linked, nothing to write",
    "unwon": "no longer won: mark the link",
    "park": "mapping or data error: parked",
}


def _plan_table(result: Any) -> Table:
    """One row per action and reason: what the real run would do, and why."""
    from collections import Counter

    rows: Counter[tuple[str, str]] = Counter()
    for a in result.plan:
        why = a.detail if a.action in ("skip", "park") else _WHY.get(a.action, "")
        rows[(a.action, why)] += 1
    order = ["create", "adopt", "adopt-or-create", "update", "unchanged", "unwon", "skip", "park"]
    table = Table(title=f"Plan for {result.name} (dry run: nothing written)")
    table.add_column("action", no_wrap=True)
    table.add_column("deals", justify="right", no_wrap=True)
    table.add_column("why", overflow="fold")
    ranked = sorted(rows.items(), key=lambda kv: (order.index(kv[0][0]), -kv[1], kv[0][1]))
    for (action, why), n in ranked:
        table.add_row(action, str(n), why)
    if not rows:
        table.add_row("—", "0", "no deals in the window")
    return table


def _predicted_calls(result: Any) -> dict[str, int]:
    """The real run's API calls per connection: the reads this plan made (the real run
    repeats them) plus each planned write's cost."""
    from collections import Counter

    calls: Counter[str] = Counter(result.api_calls)
    for a in result.plan:
        calls.update(a.calls)
    return dict(calls)


def _cost_table(result: Any) -> Table:
    predicted = _predicted_calls(result)
    table = Table(title="API calls the real run will make")
    for col in ("system", "reads", "per deal", "total"):
        table.add_column(col, justify="left" if col == "system" else "right", no_wrap=True)
    for system in sorted(predicted):
        reads = result.api_calls.get(system, 0)
        total = predicted[system]
        table.add_row(system, str(reads), str(total - reads), str(total))
    table.add_row("all", "", "", str(sum(predicted.values())), style="bold")
    return table


@app.command()
def run(
    config: ConfigOpt = DEFAULT_CONFIG,
    metrics_port: Annotated[
        int | None, typer.Option("--metrics-port", help="serve /healthz and /metrics here")
    ] = None,
    stop_timeout: Annotated[float, typer.Option(help="seconds to finish the page in hand")] = 60,
    backfill_every: Annotated[
        float,
        typer.Option(help="seconds between looks for backfill slices to work (--slices)"),
    ] = 5.0,
) -> None:
    """The daemon: run every pipeline on its schedule until SIGTERM/SIGINT, and work the
    slices of backfills planned with `handoff backfill --slices` beside other replicas."""
    import signal
    import threading

    from sync.scheduler import Daemon

    loaded = _load(config)
    daemon = Daemon(loaded, metrics_port=metrics_port, backfill_every=backfill_every)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    daemon.start()
    if daemon.metrics_port is not None:
        out.print(f"metrics on http://127.0.0.1:{daemon.metrics_port}/metrics")
    done.wait()
    daemon.stop(timeout=stop_timeout)


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
    """Run every CRM x project-tool pairing against local emulators, in seconds.

    Emulators start in-process, a SQLite store goes in a temp folder; won deals become
    projects, some milestones are completed, and the progress is written back to the deals.
    """
    import tempfile

    from sandbox.stack import SandboxStack
    from state.store import StateStore
    from sync.config import load_config
    from sync.logs import configure_logging
    from sync.runner import Connections

    configure_logging(level="warning")  # the demo speaks through its tables
    workdir = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="handoff-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    stack = SandboxStack(seed_deals=deals, rng_seed=7)
    with _progress(err.is_terminal, "starting emulators and seeding deals"):
        stack.start()
    try:
        loaded = load_config(stack.write_config(workdir / "handoff.yaml"))
        connections = Connections(loaded)
        try:
            create_missing_fields(loaded, connections)  # as `handoff check --create-missing`
        finally:
            connections.close()
        results = run_sync(loaded, loaded.config.pipelines, dry_run=False)
        out.print(_results_table(results, "1. Won deals become projects"))

        # The delivery teams get to work: a few milestones completed in a few projects.
        store = StateStore(loaded.state_url)
        touched: list[tuple[Any, Any, str]] = []
        for p in loaded.config.pipelines:
            for i, link in enumerate(list(store.iter_links(p.name))[:3]):
                done = stack.complete_milestones(p.target, link.project_id, i + 1)
                touched.append((p, link, done[-1] if done else ""))
        store.close()
        results = run_sync(loaded, loaded.config.pipelines, dry_run=False)
        table = Table(title="2. Milestones completed -> progress written back onto the deals")
        for col in ("pipeline", "project", "progress on the deal"):
            table.add_column(col, overflow="fold")
        for p, link, _ in touched:
            pct, status, last = stack.deal_progress(p.source, link.deal_id)
            table.add_row(p.name, link.project_name or "", f"{pct:g}% {status} (last: {last})")
        out.print(table)
        out.print(_results_table(results, "3. Second sync: only what changed"))
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
    except StateSchemaError as exc:  # the database is behind: `handoff state migrate`
        err.print(str(exc), markup=False, highlight=False)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
