"""The emulators' indexed shortcuts answer exactly what their full paths answer.

Each shortcut (a walk of a kept-sorted index that stops once a page is complete) is compared,
byte for byte, with the full path it stands in for (match everything, sort, cut a page) on
random data and random queries. These fail only if a shortcut changes a response.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
from collections.abc import Callable
from datetime import timedelta
from typing import Any
from urllib.parse import urlencode

import pytest
from starlette.requests import Request
from starlette.responses import Response

from sandbox import clickup as cu_mod
from sandbox import hubspot as hs_mod
from sandbox.clickup import MILESTONE_TYPE_ID, ClickUpState
from sandbox.hubspot import HubSpotState

CU_TOKEN = "pk_1_SHORTCUTS"
HS_TOKEN = "pat-na1-shortcuts"


def _request(
    method: str,
    path: str,
    params: list[tuple[str, Any]],
    *,
    auth: str = CU_TOKEN,
    body: bytes = b"",
    **path_params: str,
) -> Request:
    scope = {
        "type": "http",
        "method": method,
        "path": path,
        "query_string": urlencode(params).encode(),
        "headers": [(b"authorization", auth.encode())],
        "path_params": path_params,
    }
    request = Request(scope)
    request._body = body
    return request


def _call(handler: Callable[..., Any], state: Any, request: Request) -> Response:
    module = hs_mod if isinstance(state, HubSpotState) else cu_mod
    return asyncio.run(module._endpoint(state, handler)(request))


# ---- ClickUp: Get Filtered Team Tasks ------------------------------------------------------


def _clickup_world(rng: random.Random) -> tuple[ClickUpState, list[str]]:
    """Lists in two Folders, tasks of every kind with many equal date_updated stamps, then
    writes through the state and the API (which move tasks in the kept order) and deletes."""
    state = ClickUpState(tokens={CU_TOKEN})
    state.seed(rng)
    other = state.add_folder(state.space_id, "Other")
    lists = [state.add_list(rng.choice([state.folder_id, other]), f"L{i}") for i in range(6)]
    base = state.now_ms() - 50_000
    ids: list[str] = []
    for i in range(160):
        lid = rng.choice(lists)
        parent = rng.choice([t for t in ids if state.tasks[t]["list_id"] == lid] or [None])
        tid = state.add_task(
            lid,
            f"T{i}",
            status=rng.choice(["to do", "in progress", "done", "complete"]),
            custom_item_id=rng.choice([0, MILESTONE_TYPE_ID, MILESTONE_TYPE_ID, 1301]),
            parent=parent if rng.random() < 0.2 else None,
            assignees=[state.user_id] if rng.random() < 0.3 else [],
            created_ms=base + rng.randrange(0, 20) * 1000,  # ties on purpose
        )
        if rng.random() < 0.05:
            state.tasks[tid]["archived"] = True
        ids.append(tid)
    for tid in rng.sample(ids, 40):
        kind = rng.random()
        if kind < 0.3:
            state.set_status(tid, rng.choice(["to do", "done", "complete"]))
        elif kind < 0.5:
            state.set_field_value(tid, state.field_ids["Handoff deal"], f"s{rng.random()}")
        elif kind < 0.8:
            body = f'{{"name": "renamed {rng.random()}"}}'.encode()
            req = _request("PUT", f"/api/v2/task/{tid}", [], body=body, task_id=tid)
            assert _call(cu_mod.update_task, state, req).status_code == 200
        else:
            state.advance(rng.choice([0, 1, 3]))
    for tid in rng.sample(ids, 8):
        if tid in state.tasks:
            req = _request("DELETE", f"/api/v2/task/{tid}", [], task_id=tid)
            assert _call(cu_mod.delete_task, state, req).status_code == 200
    return state, lists


def _stamps(state: ClickUpState) -> list[int]:
    return sorted({t["date_updated"] for t in state.tasks.values() if t["date_updated"]})


def _clickup_query(rng: random.Random, state: ClickUpState, lists: list[str]) -> list[tuple]:
    stamps = _stamps(state)
    q: list[tuple[str, Any]] = []
    q.append(("order_by", rng.choice(["updated", "updated", "updated", "created", "id"])))
    q.append(("reverse", rng.choice(["true", "true", "true", "false"])))
    if rng.random() < 0.8:
        q.append(("custom_items[]", rng.choice(["1", "0", "1301"])))
    for name in ("include_closed", "subtasks"):
        if rng.random() < 0.8:
            q.append((name, rng.choice(["true", "true", "false"])))
    if rng.random() < 0.15:
        q.append(("archived", "true"))
    if rng.random() < 0.2:
        q.append(("list_ids[]", rng.choice(lists)))
    if rng.random() < 0.15:
        q.append(("statuses[]", rng.choice(["to do", "complete"])))
    if rng.random() < 0.1:
        q.append(("assignees[]", str(state.user_id)))
    if rng.random() < 0.75:
        gt = rng.choice([*stamps, stamps[0] - 1, stamps[-1], -5])
        q.append(("date_updated_gt", gt + rng.choice([0, 0, -1, 1])))
    q.append(("page", rng.choice([0, 0, 0, 1, 2, 5, "", -1, "x"])))
    rng.shuffle(q)
    return q


@pytest.mark.parametrize("page_size", [100, 7])
@pytest.mark.parametrize("seed", range(4))
def test_clickup_team_tasks_walk_matches_full_path(
    seed: int, page_size: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Small pages too: the walk then stops early, on later pages, between equal stamps.
    monkeypatch.setattr(cu_mod, "PAGE_SIZE", page_size)
    rng = random.Random(seed)
    state, lists = _clickup_world(rng)
    # The kept order is what a fresh sort gives.
    assert state.updated_order() == sorted(
        (t["date_updated"] or 0, t["id"]) for t in state.tasks.values()
    )
    if seed % 2:
        # Tasks without date_updated (they go last): set behind the order's back, so the
        # order must be re-sorted first.
        for tid in rng.sample(sorted(state.tasks), 5):
            state.tasks[tid]["date_updated"] = None
        state._updated_order = None
    path = f"/api/v2/team/{state.team_id}/task"
    queries = [_clickup_query(rng, state, lists) for _ in range(150)]
    # The change feed's own reads, from the start and from each stamp.
    feed = [("custom_items[]", "1"), ("include_closed", "true"), ("subtasks", "true")]
    feed += [("order_by", "updated"), ("reverse", "true")]
    queries.append([*feed, ("page", 0)])
    queries += [[*feed, ("date_updated_gt", s - 1), ("page", 0)] for s in _stamps(state)]
    got = [
        _call(cu_mod.get_team_tasks, state, _request("GET", path, q, team_id=state.team_id))
        for q in queries
    ]
    monkeypatch.setattr(cu_mod, "_oldest_updated_page", lambda *a, **k: None)
    for q, answer in zip(queries, got, strict=True):
        req = _request("GET", path, q, team_id=state.team_id)
        full = _call(cu_mod.get_team_tasks, state, req)
        assert (answer.status_code, answer.body) == (full.status_code, full.body), q


def test_clickup_list_orderindex_counts_live_lists() -> None:
    state = ClickUpState(tokens={CU_TOKEN})
    state.seed(random.Random(3))
    rng = random.Random(4)
    for i in range(40):
        live = [
            lst
            for lst in state.lists_by_id.values()
            if lst["folder_id"] == state.folder_id and not lst["deleted"]
        ]
        if live and rng.random() < 0.3:
            lid = rng.choice(live)["id"]
            req = _request("DELETE", f"/api/v2/list/{lid}", [], list_id=lid)
            assert _call(cu_mod.delete_list, state, req).status_code == 200
            continue
        lid = state.add_list(state.folder_id, f"N{i}")
        assert state.lists_by_id[lid]["orderindex"] == len(live)


# ---- HubSpot: search ------------------------------------------------------------------------


def _hubspot_world(rng: random.Random) -> HubSpotState:
    """Seeded deals (some sharing one month-end stamp), then edits, shared stamps, archives."""
    state = HubSpotState(tokens={HS_TOKEN})
    ids = state.seed(300, rng)
    for did in rng.sample(ids, 40):
        when = state.now() - timedelta(minutes=rng.choice([1, 5, 5, 60]))
        state.update_deal(did, {"amount": str(rng.randrange(1, 9) * 1000)}, modified_at=when)
    state.bulk_touch(rng.sample(ids, 30), state.now() - timedelta(hours=2))
    for did in rng.sample(ids, 6):
        state.archive_deal(did)
    for did in rng.sample(ids, 10):
        state.update_deal(did, {"dealname": f"Renamed {rng.random()}"})
    return state


def _ms_values(state: HubSpotState, name: str) -> list[int]:
    return sorted(
        {
            hs_mod._ms(hs_mod._parse_instant(r.properties[name]))
            for r in state.deals.values()
            if r.properties.get(name)
        }
    )


def _hubspot_search(rng: random.Random, state: HubSpotState) -> dict[str, Any]:
    name = rng.choice(["hs_lastmodifieddate", "hs_lastmodifieddate", "createdate", "closedate"])
    stamps = _ms_values(state, name)
    filters: list[dict[str, Any]] = []
    for _ in range(rng.choice([1, 1, 2, 3])):
        op = rng.choice(["GTE", "GTE", "GT", "EQ", "LT", "LTE", "BETWEEN", "NEQ"])
        value = rng.choice(stamps) + rng.choice([0, 0, -1, 1])
        f: dict[str, Any] = {"propertyName": name, "operator": op, "value": str(value)}
        if op == "BETWEEN":
            f["highValue"] = str(value + rng.choice([0, 3_600_000, 86_400_000 * 30]))
        filters.append(f)
    extra = rng.random()
    ids = sorted(state.deals, key=int)
    if extra < 0.3:
        filters.append({"propertyName": "hs_object_id", "operator": "GT", "value": rng.choice(ids)})
    elif extra < 0.4:
        filters.append({"propertyName": "dealstage", "operator": "IN", "values": ["closedwon"]})
    elif extra < 0.5:
        filters.append({"propertyName": "amount", "operator": "GTE", "value": "50000"})
    elif extra < 0.55:
        filters.append({"propertyName": "amount", "operator": "GTE", "value": "lots"})
    elif extra < 0.6:
        filters.insert(0, {"propertyName": name, "operator": "GT", "value": "not a date"})
    rng.shuffle(filters)
    body: dict[str, Any] = {
        "filterGroups": [{"filters": filters}],
        "properties": ["dealname", "amount", name],
        "limit": rng.choice([200, 200, 10, 3, 0]),
    }
    sort = rng.choice([name, name, "hs_lastmodifieddate", "hs_object_id", "amount", None])
    if sort:
        direction = rng.choice(["ASCENDING", "ASCENDING", "DESCENDING"])
        body["sorts"] = [{"propertyName": sort, "direction": direction}]
    if rng.random() < 0.2:
        body["after"] = str(rng.choice([0, 3, 10, 150]))
    if rng.random() < 0.1:
        body["query"] = rng.choice(["globex", "pilot", "zz"])
    if rng.random() < 0.05:
        body["filterGroups"].append({"filters": [filters[0]]})  # two groups: not indexed
    return body


def _search(state: HubSpotState, body: dict[str, Any]) -> tuple[int, bytes]:
    state._search_cache.clear()  # each query answered anew (the index stays)
    req = _request(
        "POST",
        "/crm/v3/objects/deals/search",
        [],
        auth=f"Bearer {HS_TOKEN}",
        body=json.dumps(body).encode(),
    )
    answer = _call(hs_mod.search_deals, state, req)
    # Error bodies carry a fresh random correlationId.
    return answer.status_code, re.sub(rb'"correlationId":"[^"]*"', b"", answer.body)


@pytest.mark.parametrize("seed", range(5))
def test_hubspot_indexed_search_matches_full_path(
    seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = random.Random(seed)
    state = _hubspot_world(rng)
    bodies = [_hubspot_search(rng, state) for _ in range(120)]
    # The connector's keyset read: from 0, then from each page's newest stamp.
    keyset: list[dict[str, Any]] = []
    for stamp in [0, 0, *_ms_values(state, "hs_lastmodifieddate")[::7]]:
        keyset.append(
            {
                "filterGroups": [
                    {
                        "filters": [
                            {
                                "propertyName": "hs_lastmodifieddate",
                                "operator": "GTE",
                                "value": str(stamp),
                            }
                        ]
                    }
                ],
                "sorts": [{"propertyName": "hs_lastmodifieddate", "direction": "ASCENDING"}],
                "properties": ["dealname", "hs_lastmodifieddate"],
                "limit": 200,
            }
        )
    if seed == 2:
        # Equal sort keys and equal tie-break hashes: store order decides.
        monkeypatch.setattr(state, "_tie_key", lambda object_id: object_id[-1])
    if seed == 3:
        # A write dated ahead of the clock (the clock moved back): no index may be built
        # then; once the clock passes it, search shows the write.
        state.update_deal(next(iter(state.deals)), {"amount": "1"})
        state.clock_offset -= timedelta(minutes=5)
    if seed == 4:
        state.index_lag = timedelta(seconds=30)
    advance_at = len(bodies) + 1  # between the first two keyset reads
    bodies += keyset
    for n, body in enumerate(bodies):
        if seed == 3 and n == advance_at:
            state.clock_offset += timedelta(minutes=10)
        got = _search(state, body)
        with monkeypatch.context() as m:
            m.setattr(hs_mod, "_indexed_search", lambda *a, **k: None)
            assert _search(state, body) == got, body


# ---- Asana: the search's modified-time order -------------------------------------------------


def test_asana_modified_order_kept_through_writes_matches_a_fresh_sort() -> None:
    """Asana's search walks `modified_order()`, kept in order as tasks change (between
    searches, not re-sorted): after random creates, completions, re-openings and clock moves,
    interleaved with reads of the order, it is exactly the sort of every task's newest
    version."""
    from sandbox.asana import AsanaState

    rng = random.Random(23)
    state = AsanaState(tokens={"t"}, premium=True)
    state.seed(rng)
    project = state.add_project("Order check", state.team_gid)
    gids: list[str] = []
    for step in range(600):
        roll = rng.random()
        if roll < 0.4 or not gids:
            gids.append(state.add_task(project, f"T{step}", resource_subtype="milestone"))
        elif roll < 0.8:
            state.complete_task(rng.choice(gids), completed=rng.random() < 0.7)
        else:
            state.clock_offset += timedelta(milliseconds=rng.choice([0, 1, 250, 60_000]))
        if rng.random() < 0.2:
            state.modified_order()  # a search between writes: the order is kept from here
    with state.lock:
        fresh = sorted((t["_history"][-1][1]["modified_at"], t["gid"]) for t in state._all("task"))
    assert state.modified_order() == fresh
