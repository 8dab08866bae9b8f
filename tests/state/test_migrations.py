"""Alembic migrations: up from empty on SQLite and PostgreSQL, and the result matches
state/models.py exactly (autogenerate finds nothing to do); the start-up policy."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect
from sqlmodel import SQLModel

from state import migrate
from state.errors import StateSchemaError
from state.store import StateStore, make_engine

TABLES = {"cursors", "links", "seen", "runs", "dead_letters", "leases", "backfill_slices"}


def _create_baseline_tables(engine) -> None:
    """How releases before Alembic made the schema: create_all of the first release's tables."""
    baseline = [SQLModel.metadata.tables[name] for name in sorted(migrate.BASELINE_TABLES)]
    SQLModel.metadata.create_all(engine, tables=baseline)
    with engine.begin() as conn:  # added to the table by migration 0003
        conn.exec_driver_sql("ALTER TABLE cursors DROP COLUMN read_from")


def _diff(url: str) -> list:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": True})
            return compare_metadata(ctx, SQLModel.metadata)
    finally:
        engine.dispose()


def _check_up_from_empty(url: str) -> None:
    engine = make_engine(url)
    try:
        assert migrate.status(engine).state == "empty"
        before, after = migrate.upgrade(engine)
        assert (before, after) == (None, migrate.head())
        assert migrate.status(engine).ok
        with engine.connect() as conn:
            names = set(inspect(conn).get_table_names())
        assert TABLES | {"alembic_version"} == names
        # Idempotent: a second migrate is a no-op.
        assert migrate.upgrade(engine) == (migrate.head(), migrate.head())
    finally:
        engine.dispose()
    assert _diff(url) == [], "migrations differ from state/models.py"


def test_sqlite_up_from_empty_matches_models(tmp_path: Path) -> None:
    _check_up_from_empty(f"sqlite:///{tmp_path / 'state.db'}")


def test_postgres_up_from_empty_matches_models(pg_url: str) -> None:
    _check_up_from_empty(pg_url)


def test_downgrade_to_base_and_up_again(tmp_path: Path) -> None:
    from alembic import command

    engine = make_engine(f"sqlite:///{tmp_path / 'state.db'}")
    migrate.upgrade(engine)
    with engine.begin() as conn:
        command.downgrade(migrate._config(conn), "base")
    with engine.connect() as conn:
        assert set(inspect(conn).get_table_names()) == {"alembic_version"}
    migrate.upgrade(engine)
    assert migrate.status(engine).ok
    engine.dispose()


def test_sqlite_store_auto_migrates_on_first_use(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'sub' / 'state.db'}"
    store = StateStore(url)
    assert migrate.status(store.engine).ok
    store.close()
    StateStore(url).close()  # and opens again without work


def test_sqlite_database_from_before_migrations_is_adopted(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'state.db'}"
    engine = make_engine(url)
    _create_baseline_tables(engine)
    assert migrate.status(engine).state == "legacy"
    engine.dispose()
    store = StateStore(url)
    assert migrate.status(store.engine).ok
    store.close()


def test_sqlite_without_auto_migrate_names_the_command(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'state.db'}"
    engine = make_engine(url)
    _create_baseline_tables(engine)
    engine.dispose()
    with pytest.raises(StateSchemaError, match="handoff state migrate"):
        StateStore(url, auto_migrate=False)


def test_postgres_empty_database_is_installed_on_first_start(pg_url: str) -> None:
    store = StateStore(pg_url)
    assert migrate.status(store.engine).ok
    store.close()


def test_postgres_behind_stops_with_the_fix(pg_url: str) -> None:
    engine = make_engine(pg_url)
    migrate.upgrade(engine, "0001")  # a database the previous release left
    engine.dispose()
    with pytest.raises(StateSchemaError) as info:
        StateStore(pg_url)
    msg = str(info.value)
    assert "handoff state migrate" in msg and "0001" in msg and migrate.head() in msg


def test_postgres_from_before_migrations_needs_migrate(pg_url: str) -> None:
    engine = make_engine(pg_url)
    _create_baseline_tables(engine)
    engine.dispose()
    with pytest.raises(StateSchemaError, match="handoff state migrate"):
        StateStore(pg_url)
    store = StateStore(pg_url, create=False)
    assert store.migrate() == (None, migrate.head())
    store.close()
    StateStore(pg_url).close()  # now it starts


def test_newer_database_stops(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'state.db'}"
    StateStore(url).close()
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE alembic_version SET version_num = '9999'")
    engine.dispose()
    with pytest.raises(StateSchemaError, match="newer Handoff"):
        StateStore(url)


def test_password_never_in_the_message() -> None:
    engine = create_engine("postgresql+psycopg://u:s3cret@127.0.0.1:1/x")
    st = migrate.SchemaStatus("behind", None, migrate.head())
    assert "s3cret" not in migrate._ahead_message(engine, st)
    assert "s3cret" not in migrate._where(engine)
