"""Applying a field map: the shortcuts taken on the hot path keep Jinja's and the sandbox's
behaviour (per-day values follow the day, record fields read like items, internals stay shut)."""

from __future__ import annotations

import random
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta

import pytest

from connectors.base import Deal, DealStatus
from mappings.field_map import load_field_map, map_deal, preset_path

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


WHOLE_DEAL_MAP = """
version: 1
project:
  name: "{{ deal.dealname }}"
  fields:
    keys: "{% for k in deal %}{{ k }} {% endfor %}"
on_unwon:
  action: comment
"""


def test_a_map_that_reads_the_whole_deal_still_sees_every_field(write_map) -> None:
    """`map_deal` leaves `modified_at` and `now` out of the context only for a map that
    cannot read them."""
    spec = map_deal(write_map(WHOLE_DEAL_MAP), deal(dealname="A")).spec
    assert spec is not None
    assert spec.fields["keys"].split() == ["dealname", "id", "status", "url", "modified_at"]
    spec = map_deal(
        write_map(MAP.replace("{{ deal.keys }}", "{{ deal.modified_at }} {{ now.year }}")),
        deal(dealname="A", amount="5"),
    ).spec
    assert spec is not None
    when, year = spec.fields["notes"].split("|")[0].split()
    assert when == "2025-01-01T00:00:00+00:00" and int(year) >= 2025
    sourced = MAP.replace('notes: "', 'at: modified_at\n    notes: "')
    spec = map_deal(write_map(sourced), deal(dealname="A", amount="5")).spec
    assert spec is not None and spec.fields["at"] == "2025-01-01T00:00:00+00:00"


def _random_deals(n: int) -> list[Deal]:
    rnd = random.Random(5)
    values = [None, "", "0", "12", "40595", "250000", "12.5", "1,000", "x", "Ünï – Co",
              "2024-03-01", "2024-03-01T10:00:00Z", "1709251200000", "USD", "EUR"]  # fmt: skip
    names = ["dealname", "Name", "amount", "Amount", "deal_currency_code", "closedate"]
    names += ["CloseDate"]
    out = []
    for i in range(n):
        props = {k: rnd.choice(values) for k in names if rnd.random() < 0.9}
        when = datetime(2025, 1, 1, tzinfo=UTC) + timedelta(seconds=i)
        out.append(Deal(f"d{i}", when, DealStatus.WON, props, rnd.choice([None, "https://x"])))
    return out


@pytest.mark.parametrize("preset", ["hubspot-asana", "hubspot-clickup", "salesforce-asana"])
def test_map_deal_gives_what_jinja_with_the_full_context_gives(preset) -> None:
    fmap = load_field_map(preset_path(preset))
    assert fmap.fast and not fmap.reads_modified_at and not fmap.uses_now  # the shortcuts
    plain = replace(fmap, fast={}, reads_modified_at=True, uses_now=True, _daily_cache={})
    for d in _random_deals(300):
        assert map_deal(fmap, d, date(2025, 1, 1)) == map_deal(plain, d, date(2025, 1, 1))
