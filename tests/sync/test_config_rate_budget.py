"""The `rate_budget:` section: where replicas share rate budgets, and the errors a person
gets (FILE:LINE, key, fix) when it cannot work."""

from __future__ import annotations

from pathlib import Path

import pytest

from mappings.problems import ProblemsFound
from sync.config import load_config

BASE = """\
version: 1
state:
  url: {state_url}
{rate_budget}connections:
  hs:
    kind: hubspot
    auth:
      token: ${{HS_TOKEN}}
  as:
    kind: asana
    auth:
      token: ${{AS_TOKEN}}
    workspace: Acme
    team: Delivery
pipelines:
  - name: main
    source: hs
    target: as
    mapping: preset:hubspot-asana
"""
PG = "postgresql+psycopg://handoff:pg-secret-pass@db.internal:5432/handoff"


@pytest.fixture(autouse=True)
def tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HS_TOKEN", "pat-na1-0000-super-secret")
    monkeypatch.setenv("AS_TOKEN", "2/asana-super-secret")


def write(tmp_path: Path, rate_budget: str, state_url: str = "sqlite:///state.db") -> Path:
    path = tmp_path / "handoff.yaml"
    path.write_text(BASE.format(state_url=state_url, rate_budget=rate_budget))
    return path


def problems_of(path: Path) -> list[str]:
    with pytest.raises(ProblemsFound) as exc:
        load_config(path)
    return [str(p) for p in exc.value.problems]


def test_without_the_section_each_process_paces_itself(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "")).shared_budget.shared == "none"


def test_shared_postgres_on_a_sqlite_state_store_names_the_line_and_the_fix(
    tmp_path: Path,
) -> None:
    path = write(tmp_path, "rate_budget:\n  shared: postgres\n")
    [problem] = problems_of(path)
    assert problem.startswith(f"{path}:5: rate_budget.shared: shared: postgres keeps the rate")
    assert "state.url is a sqlite database" in problem
    assert "point state.url at PostgreSQL" in problem


def test_shared_postgres_uses_the_state_database(tmp_path: Path) -> None:
    loaded = load_config(write(tmp_path, "rate_budget: {shared: postgres}\n", PG))
    budget = loaded.shared_budget
    assert (budget.shared, budget.key_prefix) == ("postgres", "handoff")
    # psycopg is given a libpq URL: no SQLAlchemy driver suffix, the password kept.
    assert budget.url == "postgresql://handoff:pg-secret-pass@db.internal:5432/handoff"


def test_shared_redis_without_a_url_names_the_line_and_the_fix(tmp_path: Path) -> None:
    path = write(tmp_path, "rate_budget:\n  shared: redis\n")
    [problem] = problems_of(path)
    assert problem.startswith(f"{path}:5: rate_budget.shared: shared: redis needs the Redis")
    assert "add url: redis://HOST:6379/0 under rate_budget" in problem


def test_a_url_that_is_not_redis_is_refused_without_printing_its_password(
    tmp_path: Path,
) -> None:
    path = write(
        tmp_path, "rate_budget:\n  shared: redis\n  url: http://:hunter2-pass@cache:6379\n"
    )
    [problem] = problems_of(path)
    assert problem.startswith(f"{path}:6: rate_budget.url: this is not a Redis URL")
    assert "hunter2-pass" not in problem


def test_a_url_without_shared_redis_is_pointed_out(tmp_path: Path) -> None:
    path = write(tmp_path, "rate_budget:\n  url: redis://cache:6379/0\n")
    [problem] = problems_of(path)
    assert problem.startswith(f"{path}:5: rate_budget.url: url is used only with shared: redis")


def test_shared_redis_reads_its_url_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://:redis-env-pass@cache:6379/2")
    path = write(tmp_path, "rate_budget:\n  shared: redis\n  url: ${REDIS_URL}\n  key_prefix: eu\n")
    budget = load_config(path).shared_budget
    assert (budget.shared, budget.url, budget.key_prefix) == (
        "redis",
        "redis://:redis-env-pass@cache:6379/2",
        "eu",
    )


def test_a_misspelt_backend_lists_the_choices(tmp_path: Path) -> None:
    path = write(tmp_path, "rate_budget:\n  shared: memcached\n")
    [problem] = problems_of(path)
    assert problem.startswith(f"{path}:5: rate_budget.shared:")
    assert "'none', 'redis' or 'postgres'" in problem
