"""The config file: state store, connections, pipelines. Loaded, interpolated, validated.

`load_config` reads the file and every mapping file it references and reports every problem
at once (FILE:LINE: key.path: what — fix) before anything touches the network. Credentials
are `${VAR}` references resolved from the environment or a secrets file; their values are
registered for redaction and never printed.
"""

from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from connectors.registry import (
    CONNECTION_SETTINGS,
    PROJECT_FIELDS,
    ConnectionSettings,
    role_of,
)
from connectors.secrets import register_secret
from connectors.shared_budget import SharedBudgetSettings
from mappings.field_map import CompiledFieldMap, compile_field_map, resolve_mapping_path
from mappings.problems import Problem, ProblemsFound, problems_from_validation
from mappings.yaml_source import LocatedYaml, load_yaml

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
# Keys whose values are credentials wherever they appear: never literal, always redacted.
SECRET_KEYS = frozenset(
    {
        "token",
        "access_token",
        "refresh_token",
        "client_secret",
        "password",
        "security_token",
        "private_key",
        "api_key",
    }
)


def parse_duration(text: str | int | float) -> timedelta:
    if isinstance(text, int | float):
        return timedelta(seconds=text)
    m = _DURATION.match(str(text))
    if not m:
        raise ValueError(f"'{text}' is not a duration; write e.g. 30s, 5m, 2h or 1d")
    return timedelta(seconds=float(m.group(1)) * _UNITS[m.group(2)])


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StateConfig(Strict):
    url: str = Field("sqlite:///handoff.db", description="SQLAlchemy URL; SQLite by default")


class RateBudgetConfig(Strict):
    shared: Literal["none", "redis", "postgres"] = Field(
        "none",
        description="where replicas share each connection's rate budget: none (each process "
        "alone), redis (url below) or postgres (the state database)",
    )
    url: str | None = Field(None, description="Redis URL, e.g. redis://127.0.0.1:6379/0")
    key_prefix: str = Field(
        "handoff",
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="namespace of the shared budgets: one per deployment sharing a Redis",
    )


class ScheduleConfig(Strict):
    every: str | None = Field(None, description="interval, e.g. 5m")
    cron: str | None = Field(None, description="cron expression, e.g. '*/10 * * * *'")

    @field_validator("every")
    @classmethod
    def _every(cls, v: str | None) -> str | None:
        if v is not None:
            parse_duration(v)
        return v

    @field_validator("cron")
    @classmethod
    def _cron(cls, v: str | None) -> str | None:
        if v is not None:
            from apscheduler.triggers.cron import CronTrigger

            try:
                CronTrigger.from_crontab(v)
            except ValueError as exc:
                raise ValueError(f"invalid cron expression: {exc}") from None
        return v


class PipelineOptions(Strict):
    overlap: str = Field("5m", description="re-read window behind the cursor (index lag)")
    start_from: date | None = Field(None, description="first run reads deals changed since")
    lease_ttl: str = Field("10m", description="how long a run's lease lasts unless renewed")
    page_size: int = Field(100, ge=1, le=200)
    parallel_creates: int = Field(
        8, ge=1, le=15, description="projects created at once (Asana allows 15 writes at once)"
    )
    milestone_type: str = Field("Milestone", description="ClickUp custom task type name")

    @field_validator("overlap", "lease_ttl")
    @classmethod
    def _duration(cls, v: str) -> str:
        parse_duration(v)
        return v


class PipelineConfig(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    source: str = Field(description="name of a CRM connection")
    target: str = Field(description="name of a project-tool connection")
    mapping: str = Field(description="field-map file (relative to this file) or preset:NAME")
    direction: Literal["forward", "back", "both"] = "both"
    enabled: bool = True
    schedule: ScheduleConfig | None = None
    options: PipelineOptions = Field(default_factory=PipelineOptions)


class Config(Strict):
    version: Literal[1] = 1
    state: StateConfig = Field(default_factory=StateConfig)
    rate_budget: RateBudgetConfig = Field(default_factory=RateBudgetConfig)
    secrets_file: str | None = None
    connections: dict[str, ConnectionSettings]
    pipelines: list[PipelineConfig]

    def pipeline(self, name: str) -> PipelineConfig:
        for p in self.pipelines:
            if p.name == name:
                return p
        raise KeyError(name)


@dataclass
class LoadedConfig:
    path: Path
    config: Config
    mappings: dict[str, CompiledFieldMap]

    @property
    def state_url(self) -> str:
        url = self.config.state.url
        if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
            rel = url.removeprefix("sqlite:///")
            if rel and rel != ":memory:" and not os.path.isabs(rel):
                return "sqlite:///" + str((self.path.parent / rel).resolve())
        return url

    @property
    def shared_budget(self) -> SharedBudgetSettings:
        """Where connections keep their rate budgets (checked by `load_config`)."""
        rb = self.config.rate_budget
        if rb.shared == "postgres":
            return SharedBudgetSettings("postgres", libpq_url(self.state_url), rb.key_prefix)
        return SharedBudgetSettings(rb.shared, rb.url, rb.key_prefix)


def libpq_url(sqlalchemy_url: str) -> str:
    """The SQLAlchemy URL of a PostgreSQL database as libpq (psycopg) takes it."""
    from sqlalchemy.engine import make_url

    url = make_url(sqlalchemy_url).set(drivername="postgresql")
    return url.render_as_string(hide_password=False)


def _read_secrets_file(path: Path) -> dict[str, str]:
    values: dict[str, str] = {}
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep:
            key, sep, value = line.partition(":")
        values[key.strip()] = value.strip().strip("'\"")
    return values


def _interpolate(
    doc: LocatedYaml, secrets: dict[str, str], problems: list[Problem]
) -> dict[str, Any]:
    """Replace ${VAR} everywhere; refuse literal credentials; register secret values."""

    def walk(node: Any, loc: tuple[Any, ...]) -> Any:
        if isinstance(node, dict):
            return {k: walk(v, loc + (k,)) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v, loc + (i,)) for i, v in enumerate(node)]
        key = str(loc[-1]) if loc else ""
        is_secret = key in SECRET_KEYS
        if not isinstance(node, str):
            return node
        if is_secret and node and not _VAR.search(node):
            problems.append(
                Problem(
                    doc.path,
                    doc.line_of(loc),
                    ".".join(map(str, loc)),
                    "credentials must not be written in the file",
                    "write ${SOME_VAR} here and set SOME_VAR in the environment or "
                    "the secrets file",
                )
            )
            return node

        def sub(m: re.Match[str]) -> str:
            var = m.group(1)
            value = os.environ.get(var, secrets.get(var))
            if value is None:
                problems.append(
                    Problem(
                        doc.path,
                        doc.line_of(loc),
                        ".".join(map(str, loc)),
                        f"environment variable {var} is not set",
                        f"export {var}=... (or add it to the secrets file)",
                    )
                )
                return ""
            if is_secret or "url" in key:
                register_secret(value)
            return value

        out = _VAR.sub(sub, node)
        if is_secret:
            register_secret(out)
        if "url" in key:
            _register_url_password(out)
        return out

    return walk(doc.data, ())


def _register_url_password(url: str) -> None:
    # The user may be empty (redis://:PASSWORD@host).
    m = re.match(r"^[a-z+]+://[^:/@]*:([^@/]+)@", url)
    if m:
        register_secret(m.group(1))


def load_config(path: str | Path) -> LoadedConfig:
    """Load and check the config and its mapping files; raise ProblemsFound with all problems."""
    cfg_path = Path(path)
    doc = load_yaml(cfg_path)
    problems: list[Problem] = []
    raw = doc.data if isinstance(doc.data, dict) else {}
    secrets: dict[str, str] = {}
    if isinstance(raw.get("secrets_file"), str):
        sf = cfg_path.parent / raw["secrets_file"]
        try:
            secrets = _read_secrets_file(sf)
        except OSError as exc:
            problems.append(
                Problem(
                    doc.path,
                    doc.line_of(("secrets_file",)),
                    "secrets_file",
                    f"cannot read {sf}: {exc.strerror}",
                    "check the path",
                )
            )
    for v in secrets.values():
        register_secret(v)
    data = _interpolate(doc, secrets, problems)
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        problems += problems_from_validation(exc, doc, Config)
        config = None
    mappings: dict[str, CompiledFieldMap] = {}
    if config is not None:
        problems += _cross_check(config, doc, cfg_path, mappings)
    elif isinstance(raw.get("pipelines"), list):
        # Still read the mapping files, so one validate shows every problem.
        for i, p in enumerate(raw["pipelines"]):
            if isinstance(p, dict) and isinstance(p.get("mapping"), str):
                problems += _check_mapping(p["mapping"], cfg_path, doc, i, None, mappings, None)
    if problems:
        raise ProblemsFound(problems)
    assert config is not None
    return LoadedConfig(cfg_path, config, mappings)


def _check_mapping(
    ref: str,
    cfg_path: Path,
    doc: LocatedYaml,
    index: int,
    name: str | None,
    out: dict[str, CompiledFieldMap],
    kinds: tuple[str, str] | None,
) -> list[Problem]:
    mpath = resolve_mapping_path(ref, cfg_path.parent)
    loc = ("pipelines", index, "mapping")
    if not mpath.exists():
        return [
            Problem(
                doc.path,
                doc.line_of(loc),
                f"pipelines[{index}].mapping",
                f"mapping file {mpath} not found",
                "check the path (relative to the config file) or use preset:NAME",
            )
        ]
    try:
        mdoc = load_yaml(mpath)
    except ProblemsFound as exc:
        return exc.problems
    compiled, problems = compile_field_map(mdoc)
    if compiled and kinds:
        src, tgt = kinds
        if compiled.spec.source and compiled.spec.source != src:
            problems.append(
                Problem(
                    mdoc.path,
                    mdoc.line_of(("source",)),
                    "source",
                    f"this map reads {compiled.spec.source}, but the pipeline's "
                    f"source is a {src} connection",
                    "use a map written for " + src,
                )
            )
        if compiled.spec.target and compiled.spec.target != tgt:
            problems.append(
                Problem(
                    mdoc.path,
                    mdoc.line_of(("target",)),
                    "target",
                    f"this map writes {compiled.spec.target}, but the pipeline's "
                    f"target is a {tgt} connection",
                    "use a map written for " + tgt,
                )
            )
    if compiled and kinds and kinds[1] in PROJECT_FIELDS:
        allowed = PROJECT_FIELDS[kinds[1]]
        for key in compiled.spec.project.fields:
            if key not in allowed:
                problems.append(
                    Problem(
                        mdoc.path,
                        mdoc.line_of(("project", "fields", key)),
                        f"project.fields.{key}",
                        f"{kinds[1]} projects have no field '{key}'",
                        f"use one of: {', '.join(sorted(allowed))}; "
                        "custom fields go under project.custom_fields",
                    )
                )
    if compiled and name and not problems:
        out[name] = compiled
    return problems


def _cross_check(
    config: Config, doc: LocatedYaml, cfg_path: Path, mappings: dict[str, CompiledFieldMap]
) -> list[Problem]:
    problems: list[Problem] = []
    seen: set[str] = set()
    for i, p in enumerate(config.pipelines):
        if p.name in seen:
            problems.append(
                Problem(
                    doc.path,
                    doc.line_of(("pipelines", i, "name")),
                    f"pipelines[{i}].name",
                    f"duplicate pipeline name '{p.name}'",
                    "give each pipeline its own name",
                )
            )
        seen.add(p.name)
        kinds = []
        for attr, role in (("source", "crm"), ("target", "project_tool")):
            conn_name = getattr(p, attr)
            conn = config.connections.get(conn_name)
            loc = ("pipelines", i, attr)
            if conn is None:
                known = ", ".join(config.connections) or "none defined"
                problems.append(
                    Problem(
                        doc.path,
                        doc.line_of(loc),
                        f"pipelines[{i}].{attr}",
                        f"no connection named '{conn_name}'",
                        f"use one of: {known}",
                    )
                )
                continue
            if role_of(conn.kind) != role:
                what = "a CRM" if role == "crm" else "a project tool"
                problems.append(
                    Problem(
                        doc.path,
                        doc.line_of(loc),
                        f"pipelines[{i}].{attr}",
                        f"'{conn_name}' is a {conn.kind} connection, not {what}",
                        f"point {attr} at {what} connection",
                    )
                )
                continue
            kinds.append(conn.kind)
        problems += _check_mapping(
            p.mapping,
            cfg_path,
            doc,
            i,
            p.name,
            mappings,
            (kinds[0], kinds[1]) if len(kinds) == 2 else None,
        )
        if p.schedule and p.schedule.every and p.schedule.cron:
            problems.append(
                Problem(
                    doc.path,
                    doc.line_of(("pipelines", i, "schedule")),
                    f"pipelines[{i}].schedule",
                    "both every and cron are set",
                    "keep one of them",
                )
            )
    problems += _check_rate_budget(config, doc)
    return problems


def _check_rate_budget(config: Config, doc: LocatedYaml) -> list[Problem]:
    rb = config.rate_budget
    shared_at = ("rate_budget", "shared")

    def problem(loc: tuple[str, ...], message: str, fix: str) -> Problem:
        return Problem(doc.path, doc.line_of(loc), ".".join(loc), message, fix)

    if rb.shared == "postgres":
        found = []
        backend = config.state.url.partition(":")[0].partition("+")[0]
        if backend != "postgresql":
            found.append(
                problem(
                    shared_at,
                    "shared: postgres keeps the rate budget in the state database, "
                    f"but state.url is a {backend or 'non-PostgreSQL'} database",
                    "point state.url at PostgreSQL (postgresql+psycopg://...), or use "
                    "shared: redis with a url, or shared: none for a single replica",
                )
            )
        if importlib.util.find_spec("psycopg_pool") is None:
            found.append(
                problem(
                    shared_at,
                    "shared: postgres needs the psycopg-pool package, which is not installed",
                    "pip install 'handoff[postgres]'",
                )
            )
        if rb.url:
            found.append(
                problem(
                    ("rate_budget", "url"),
                    "url is not used with shared: postgres (the budget lives in state.url)",
                    "remove url, or set shared: redis",
                )
            )
        return found
    if rb.shared == "redis":
        if not rb.url:
            return [
                problem(
                    shared_at,
                    "shared: redis needs the Redis server's address",
                    "add url: redis://HOST:6379/0 under rate_budget (or url: ${REDIS_URL})",
                )
            ]
        if rb.url.partition("://")[0] not in ("redis", "rediss", "unix"):
            return [
                problem(
                    ("rate_budget", "url"),
                    "this is not a Redis URL",
                    "write redis://HOST:6379/0 (rediss:// for TLS, unix:///path.sock?db=0)",
                )
            ]
        return []
    if rb.url:
        return [
            problem(
                ("rate_budget", "url"),
                "url is used only with shared: redis",
                "remove url, or add shared: redis",
            )
        ]
    return []


__all__ = [
    "CONNECTION_SETTINGS",
    "Config",
    "LoadedConfig",
    "PipelineConfig",
    "load_config",
    "parse_duration",
]
