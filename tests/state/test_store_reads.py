"""The state store's page-sized statements, run on the driver, read and write what
SQLAlchemy's own statements did: links and seen marks for any number of ids, and JSON columns
written as the same text."""

from __future__ import annotations

import enum
import json
import math
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select

from connectors.base import Cursor
from state.models import LinkRow
from state.store import Link, PageCommit, StateStore, _link, json_text


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path) -> Iterator[StateStore]:
    url = (
        f"sqlite:///{tmp_path / 'state.db'}"
        if request.param == "sqlite"
        else request.getfixturevalue("pg_url")
    )
    s = StateStore(url)
    yield s
    s.close()


T0 = datetime(2025, 1, 1, tzinfo=UTC)


@pytest.mark.parametrize("n", [1, 2, 3, 31, 33, 99, 100, 101, 499, 500, 501, 1201])
def test_links_and_seen_marks_are_read_for_any_number_of_ids(store, n) -> None:
    ids = [f"d{i:05d}" for i in range(n)]
    linked, seen = ids[::3], ids[::2]
    assert store.claim_many("p", linked) == set(linked)
    links = []
    for i, deal_id in enumerate(linked):
        link = Link("p", deal_id, "created", f"p{i}", f"Ünï {i}", None, "won")
        link.forward_prints = {"custom_fields.Deal tier": f"{i:016x}"}
        link.milestones = {"m1": ["Kick-off", True, None, "2025-02-01"]}
        links.append(link)
    marks = [(deal_id, T0 + timedelta(seconds=i)) for i, deal_id in enumerate(seen)]
    store.commit_page(PageCommit("p", "deals", Cursor(T0, ids[-1]), links, marks))
    store.commit_page(PageCommit("other", "deals", seen=[(ids[0], T0)]))

    asked = [*ids, "unknown", ids[0]]  # a repeated id and one never seen change nothing
    assert store.links_for("p", asked) == {link.deal_id: link for link in links}
    assert store.seen_marks("p", "deals", asked) == dict(marks)
    assert store.links_for("p", []) == {} and store.seen_marks("p", "deals", []) == {}
    with store.engine.connect() as conn:  # as the ORM's own rows make them
        rows = conn.execute(select(LinkRow.__table__).where(LinkRow.pipeline == "p"))
        assert {r.deal_id: _link(r) for r in rows} == store.links_for("p", ids)


class Tier(enum.StrEnum):
    GOLD = "Gold"


@pytest.mark.parametrize(
    "value",
    [
        {},
        {"custom_fields.Deal tier": "0123456789abcdef", "fields.notes": "a1"},
        {"ü": 'say "hi"\n', "k": Tier.GOLD},
        {"a": 1, "b": None},
        {1: "x"},
        {True: "x", None: "y"},
        {"a": {"b": [1, 2.5, math.inf]}},
        {"m1": ["Kick-off", True, None, "2025-02-01"]},
        [],
        ["x"],
        None,
        "text",
        3,
    ],
)
def test_json_columns_are_written_as_json_dumps_writes_them(value) -> None:
    assert json_text(value) == json.dumps(value)


def test_json_text_refuses_what_json_dumps_refuses() -> None:
    loop: dict = {}
    loop["self"] = loop
    for bad in ({"a": object()}, {(1, 2): "x"}, loop):
        with pytest.raises((TypeError, ValueError)) as expected:
            json.dumps(bad)
        with pytest.raises(expected.type, match=str(expected.value)):
            json_text(bad)
