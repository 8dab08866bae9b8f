"""Applying a field map: the shortcuts taken on the hot path keep Jinja's and the sandbox's
behaviour (per-day values follow the day, record fields read like items, internals stay shut)."""

from __future__ import annotations

from datetime import UTC, date, datetime

from connectors.base import Deal, DealStatus
from mappings.field_map import map_deal

MAP = """
version: 1
project:
  name: "{{ deal.dealname }} ({{ deal.id }})"
  fields:
    due_on:
      template: "{{ today | add_days(90) }}"
      type: date
    notes: "{{ deal.keys }}|{{ deal.amount | money('EUR') }}"
on_unwon:
  action: comment
"""


def deal(**props: str) -> Deal:
    return Deal("42", datetime(2025, 1, 1, tzinfo=UTC), DealStatus.WON, props)


def test_a_per_day_value_follows_the_day(write_map) -> None:
    fmap = write_map(MAP)
    d = deal(dealname="Acme", amount="1200")
    first = map_deal(fmap, d, date(2025, 1, 1)).spec
    again = map_deal(fmap, d, date(2025, 1, 1)).spec
    later = map_deal(fmap, d, date(2025, 3, 1)).spec
    assert first and again and later
    assert first.fields["due_on"] == again.fields["due_on"] == date(2025, 4, 1)
    assert later.fields["due_on"] == date(2025, 5, 30)
    assert first.name == "Acme (42)"


def test_a_field_named_like_a_dict_method_reads_as_jinja_reads_it(write_map) -> None:
    """Jinja looks attributes up before items: `deal.keys` is the dict method, as it was
    before the fast path, not the record's `keys` property."""
    spec = map_deal(write_map(MAP), deal(dealname="A", amount="5", keys="K")).spec
    assert spec is not None
    keys_text, money = spec.fields["notes"].split("|")
    assert keys_text.startswith("<built-in method keys") and money == "5.00 EUR"


def test_the_sandbox_still_refuses_internals(write_map) -> None:
    fmap = write_map(MAP.replace("{{ deal.dealname }}", "{{ deal.__class__.__mro__ }}"))
    result = map_deal(fmap, deal(dealname="A", amount="5"))
    assert result.spec is None
    assert any("project.name" in str(e) for e in result.errors)
