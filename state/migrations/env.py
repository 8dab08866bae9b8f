"""Alembic environment for the state store, configured in code (see `state.migrate`).

The caller passes an open connection in `config.attributes["connection"]`; no alembic.ini and
no URL on the command line. On PostgreSQL the migration takes a transaction-scoped advisory
lock first, so two `handoff state migrate` started at once apply each step exactly once.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import text
from sqlmodel import SQLModel

import state.models  # noqa: F401  (registers the tables on SQLModel.metadata)

MIGRATION_LOCK_KEY = 0x48414E44  # "HAND"

config = context.config
target_metadata = SQLModel.metadata


def _ours(obj: object, name: str | None, type_: str, reflected: bool, compare_to: object) -> bool:
    """Autogenerate compares only our tables: the shared rate budget keeps its own tables
    (pyrate-limiter's `ratelimit___*`, `handoff_rate_pause`) in the same database."""
    return not (type_ == "table" and reflected and compare_to is None)


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is None:
        raise RuntimeError("state migrations run through state.migrate, with a connection")
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
        include_object=_ours,
    )
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            connection.execute(text(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK_KEY})"))
        context.run_migrations()


if context.is_offline_mode():
    raise RuntimeError("offline (SQL script) migrations are not supported")
run_migrations_online()
