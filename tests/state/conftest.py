"""PostgreSQL fixtures: each test gets its own schema (dropped afterwards) on the database
named by HANDOFF_TEST_DATABASE_URL; without it the PostgreSQL tests are skipped."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import create_engine, text

ENV = "HANDOFF_TEST_DATABASE_URL"


def pg_base_url() -> str:
    url = os.environ.get(ENV)
    if not url:
        pytest.skip(f"{ENV} not set: PostgreSQL tests skipped")
    return url


def with_search_path(url: str, schema: str) -> str:
    sep = "&" if "?" in url else "?"
    return f"{url}{sep}options=-csearch_path%3D{schema}"


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A URL whose connections use a fresh, empty schema of their own."""
    base = pg_base_url()
    schema = f"handoff_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(base, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield with_search_path(base, schema)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        admin.dispose()
