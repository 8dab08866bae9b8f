"""Shared fixtures: field maps from text, state stores, engine wiring."""

from __future__ import annotations

import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from mappings.field_map import CompiledFieldMap, load_field_map
from state.store import StateStore

SIMPLE_MAP = """
version: 1
project:
  name: "{{ deal.dealname }}"
  fields:
    notes: "Amount {{ deal.amount | default('n/a', true) }}"
  custom_fields:
    Deal amount:
      source: amount
      type: number
      sync: true
on_unwon:
  action: comment
"""


@pytest.fixture
def write_map(tmp_path: Path):
    def _write(text: str = SIMPLE_MAP, name: str = "map.yaml") -> CompiledFieldMap:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text))
        return load_field_map(path)

    return _write


@pytest.fixture
def store(tmp_path: Path) -> Iterator[StateStore]:
    s = StateStore(f"sqlite:///{tmp_path / 'state.db'}")
    yield s
    s.close()
