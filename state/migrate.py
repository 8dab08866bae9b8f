"""Schema migrations for the state store (Alembic, configured in code: no alembic.ini).

Start-up policy (`ensure_schema`):
- SQLite: an empty, pre-Alembic or behind database is migrated on first use — nothing to
  install, nothing to run first. A file lock keeps concurrent first starts from racing.
- PostgreSQL (or any other server): an empty database is installed on first start (no data,
  nothing to lose; concurrent first starts are serialised by an advisory lock in env.py). A
  database that holds a schema that is behind stops with `StateSchemaError` naming
  `handoff state migrate`: replicas never migrate a shared database by themselves.
- A database newer than this Handoff (an unknown revision) always stops: upgrade Handoff.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, inspect
from sqlmodel import SQLModel

import state.models  # noqa: F401  (registers the tables)
from state.errors import StateSchemaError

MIGRATIONS = Path(__file__).parent / "migrations"
# The first release's schema: a database made by `create_all` before Alembic is stamped here.
BASELINE = "0001"
# Its tables: what such a database holds (tables added by later revisions are not there).
BASELINE_TABLES = frozenset({"cursors", "links", "seen", "runs", "dead_letters", "leases"})


def _config(connection: Connection | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def script() -> ScriptDirectory:
    return ScriptDirectory.from_config(_config())


def head() -> str:
    rev = script().get_current_head()
    assert rev is not None
    return rev


@dataclass
class SchemaStatus:
    state: str  # empty | legacy | partial | behind | current | ahead
    current: str | None
    head: str

    @property
    def ok(self) -> bool:
        return self.state == "current"


def status(engine: Engine) -> SchemaStatus:
    target = head()
    with engine.connect() as conn:
        current = MigrationContext.configure(conn).get_current_revision()
        tables = set(inspect(conn).get_table_names())
    if current is None:
        ours = set(SQLModel.metadata.tables)
        found = ours & tables
        state = "empty" if not found else ("legacy" if found == BASELINE_TABLES else "partial")
        return SchemaStatus(state, None, target)
    if current == target:
        return SchemaStatus("current", current, target)
    try:
        known = script().get_revision(current) is not None
    except Exception:  # alembic raises for an unknown revision id
        known = False
    return SchemaStatus("behind" if known else "ahead", current, target)


def _where(engine: Engine) -> str:
    return engine.url.render_as_string(hide_password=True)


@contextlib.contextmanager
def _sqlite_lock(engine: Engine) -> Iterator[None]:
    """Serialise first-use migrations of one SQLite file across processes."""
    path = engine.url.database
    if engine.dialect.name != "sqlite" or not path or path == ":memory:":
        yield
        return
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: SQLite's own locking has to do
        yield
        return
    fd = os.open(os.path.abspath(path) + ".migrate.lock", os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def upgrade(engine: Engine, revision: str = "head") -> tuple[str | None, str]:
    """Apply migrations up to `revision`; returns (revision before, revision after)."""
    with _sqlite_lock(engine):
        st = status(engine)
        if st.state == "ahead":
            raise StateSchemaError(_ahead_message(engine, st))
        if st.state == "partial":
            raise StateSchemaError(
                f"The state database {_where(engine)} has some of Handoff's tables but no "
                "schema revision; it was not made by Handoff, or is damaged. Point state.url "
                "at an empty database (or restore a backup)."
            )
        with engine.begin() as conn:
            cfg = _config(conn)
            if st.state == "legacy":
                command.stamp(cfg, BASELINE)  # made by create_all before migrations existed
            command.upgrade(cfg, revision)
        after = status(engine)
        return st.current, after.current or ""


def _ahead_message(engine: Engine, st: SchemaStatus) -> str:
    return (
        f"The state database {_where(engine)} is at schema revision {st.current}, which this "
        f"version of Handoff does not know (its newest is {st.head}): it was migrated by a "
        "newer Handoff. Upgrade Handoff on this machine."
    )


def ensure_schema(engine: Engine, *, auto: bool) -> SchemaStatus:
    """Check the schema at start-up; migrate when `auto`, else stop with the fix."""
    st = status(engine)
    if st.ok:
        return st
    if st.state == "ahead":
        raise StateSchemaError(_ahead_message(engine, st))
    if auto or st.state == "empty":
        upgrade(engine)
        return status(engine)
    where = _where(engine)
    have = st.current or ("no tables" if st.state == "empty" else "no revision")
    raise StateSchemaError(
        f"The state database {where} is behind: schema revision {have}, this version of "
        f"Handoff needs {st.head}. Run `handoff state migrate` (same config) once, then "
        "start Handoff again."
    )
