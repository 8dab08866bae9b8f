"""Fast renders give exactly what Jinja gives: for every template and record, the same text,
or they step aside and Jinja renders (or raises) as before; templates they do not cover are
left to Jinja entirely."""

from __future__ import annotations

import random
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import pytest
from jinja2 import Template

from mappings.fast_render import compile_fast
from mappings.field_map import _ENV, load_field_map, preset_path
from mappings.transforms import TEMPLATE_NAMES, RecordView

PRESETS = sorted(p.stem for p in Path(preset_path("hubspot-asana")).parent.glob("*.yaml"))

TEMPLATES = [
    "{{ deal.dealname }}",
    "{{ deal.dealname }} ({{ deal.id }})",
    "  padded {{ deal.dealname }}  \n",
    "plain text, no tags",
    "",
    "{{ deal.amount | money(deal.deal_currency_code | default('USD', true)) }}",
    "{{ deal.amount | money('EUR') }}|{{ deal.amount | money }}",
    "{{ deal.closedate | date }}",
    "{{ deal.closedate | date('%d/%m/%Y') }}",
    "{{ today | add_days(90) }}",
    "{{ today | add_days(deal.days) }}",
    "{{ deal.amount | float | round(1) }}",
    "{% set amount = (deal.amount or 0) | float %}"
    " {{ 'Platinum' if amount >= 100000 else 'Gold' if amount >= 50000"
    " else 'Silver' if amount >= 10000 else 'Bronze' }}",
    "{% set a = deal.amount %}{{ a }}{% set a = deal.dealname %}-{{ a }}",
    "{{ deal.dealname }}{% set b = deal.amount | float %}{{ b > 5 and b < 1000 }}",
    "{{ 1 < deal.n < 10 }} {{ deal.n == 3 }} {{ deal.n != 3 }} {{ deal.n <= 3 }}",
    "{{ deal.n >= 3 }} {{ deal.n > 3 }} {{ deal.n < 3 }}",
    "{{ 'Co' in deal.dealname }}/{{ 'Co' not in deal.dealname }}",
    "{{ not deal.dealname }}{{ deal.dealname and deal.amount }}{{ deal.none or 'x' }}",
    "{{ deal.none }}|{{ deal.empty }}|{{ deal.zero }}",
    "{{ deal.missing }}",
    "{{ deal.missing | default('n/a') }}",
    "{{ deal.keys }}",
    "{{ deal['dealname'] }}",
    "{{ deal.dealname | upper }}",
    "{% for k in deal %}{{ k }}{% endfor %}",
    "{{ progress.last_milestone or '' }}",
    "{{ progress.done }} of {{ progress.total }}",
    "{{ now.year > 2000 }}",
    "{{ deal.dealname ~ '!' }}",
    "{{ deal.amount + 1 }}",
]

VALUES: list[Any] = [
    None,
    "",
    "0",
    "5",
    "40595",
    "10000",
    "50000",
    "100000",
    "007",
    "12.5",
    "1,200",
    " 9 ",
    "-3",
    "abc",
    "Ünïcødé – Co",
    "2024-03-01",
    "2024-03-01T10:00:00Z",
    "2024-03-01T23:30:00-05:00",
    "1709251200000",
    0,
    3,
    -1,
    2.5,
    1e16,
    True,
    date(2024, 3, 1),
    datetime(2024, 3, 1, 12, tzinfo=UTC),
    ["a"],
]


# HubSpot's and Salesforce's names, as the presets read them.
FIELDS = ("dealname", "Name", "amount", "Amount", "deal_currency_code", "closedate", "CloseDate")
FIELDS += ("days", "n")


def _contexts(n: int) -> list[dict[str, Any]]:
    rnd = random.Random(7)
    out = []
    for i in range(n):
        props = {key: rnd.choice(VALUES) for key in FIELDS if rnd.random() < 0.9}
        props |= {"none": None, "empty": "", "zero": 0, "keys": "K"}
        deal: Any = RecordView(props)
        deal.update(id=f"d{i}", status="won", url="https://x", modified_at="2024-01-01")
        if i % 17 == 0:
            deal = dict(deal)  # not a record view (as the back flow passes): Jinja's to do
        progress: Any = {"last_milestone": rnd.choice(["Kick-off", None, ""]), "done": 1}
        if i % 5 == 0:
            progress = RecordView(progress, total=3)
        ctx = {"deal": deal, "today": date(2025, 1, 1), "now": datetime(2025, 1, 1, tzinfo=UTC)}
        if i % 11 != 0:
            ctx["progress"] = progress
        out.append(ctx)
    return out


def _jinja(template: Template, ctx: dict[str, Any]) -> tuple[Any, ...]:
    try:
        return ("text", template.render(ctx).strip())
    except Exception as exc:
        return ("error", type(exc), str(exc))


def _preset_texts() -> list[str]:
    texts: set[str] = set()
    for name in PRESETS:
        texts |= set(load_field_map(preset_path(name)).templates)
    return sorted(texts)


@pytest.mark.parametrize("text", TEMPLATES + _preset_texts())
def test_a_fast_render_gives_jinjas_text_or_steps_aside(text) -> None:
    fast = compile_fast(_ENV.parse(text), _ENV, TEMPLATE_NAMES)
    if fast is None:
        return  # Jinja's alone
    rendered = 0
    template = _ENV.from_string(text)
    for ctx in _contexts(400):
        expected = _jinja(template, ctx)
        try:
            got = fast(ctx)
        except Exception:
            continue  # the caller renders with Jinja
        rendered += 1
        assert ("text", got) == expected, ctx
    if "missing" not in text and "now." not in text:  # those are always Jinja's
        assert rendered > 20, "the fast render should take many records"


def test_every_preset_template_has_a_fast_render() -> None:
    for text in _preset_texts():
        assert compile_fast(_ENV.parse(text), _ENV, TEMPLATE_NAMES) is not None, text


@pytest.mark.parametrize(
    "text",
    [
        "{% for k in deal %}{{ k }}{% endfor %}",
        "{{ deal.keys }}",
        "{{ deal.dealname ~ '!' }}",
        "{{ deal.dealname | default(x='y') }}",
        "{% if deal.x %}y{% endif %}",
        "{{ deal.x if deal.y }}",
        "{% set deal = 1 %}{{ deal }}",
    ],
)
def test_what_it_does_not_cover_is_left_to_jinja(text) -> None:
    assert compile_fast(_ENV.parse(text), _ENV, TEMPLATE_NAMES) is None


def test_a_field_map_renders_through_the_fast_render_and_falls_back_to_jinja() -> None:
    fmap = load_field_map(preset_path("hubspot-asana"))
    text = fmap.spec.project.name.template
    assert text in fmap.fast
    record = RecordView(dealname="Acme")
    assert fmap.render(text, {"deal": record}) == "Acme"
    # Not a record view: Jinja renders it, as before.
    assert fmap.render(text, {"deal": {"dealname": "Acme"}}) == "Acme"
