"""The ClickUp connector against the ClickUp emulator over real sockets."""

from __future__ import annotations

import itertools
import random
import time
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from typing import Any

import httpx
import pytest

import sandbox.clickup as emulator
from connectors.base import DealStamp, MilestoneSpec, ProjectSpec
from connectors.clickup import ClickUpAuth, ClickUpHttp, ClickUpProjects, ClickUpSettings
from connectors.errors import ConnectorError, ErrorKind
from connectors.http import RateBudget, RetryPolicy
from sandbox.clickup import MILESTONE_TYPE_ID, ClickUpState, create_app
from sandbox.common import EmulatorControls
from sandbox.serve import LoopbackServer

TOKEN = "pk_81234567_CONNECTORTEST00000000000000000"
FAST = RetryPolicy(attempts=8, initial_wait=0.01, max_wait=0.05, max_retry_after=0.2)
Env = tuple[ClickUpState, EmulatorControls, LoopbackServer]
_deal_ids = itertools.count(1000)


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    state = ClickUpState(tokens={TOKEN})
    state.seed(random.Random(11))
    controls = EmulatorControls()
    server = LoopbackServer(create_app(state, controls)).start()
    yield state, controls, server
    server.stop()


@pytest.fixture()
def cu(env: Env) -> Iterator[ClickUpState]:
    state, controls, _ = env
    controls.set_faults()
    controls.set_rate_limits(False)
    controls.reset_stats()
    yield state
    controls.set_faults()
    controls.set_rate_limits(False)


def connector(
    env: Env, *, folder: str | None = "Onboarding projects", **kw: Any
) -> ClickUpProjects:
    kw.setdefault("retry", FAST)
    kw.setdefault("auth", ClickUpAuth(token=TOKEN))
    settings = ClickUpSettings(
        kind="clickup",
        base_url=env[2].base_url + "/api/v2",
        team="Acme Delivery",
        space="Client Delivery",
        folder=folder,
        requests_per_minute=100_000,
        **kw,
    )
    return ClickUpProjects("clickup", settings)


def stamp() -> DealStamp:
    return DealStamp("hubspot", str(next(_deal_ids)))


def plain_spec(name: str, **kw: Any) -> ProjectSpec:
    return ProjectSpec(
        name=name,
        milestones=[
            MilestoneSpec("Kickoff", date(2031, 3, 2)),
            MilestoneSpec("Go-live", date(2031, 4, 15), section="Launch"),
            MilestoneSpec("Handover"),
        ],
        **kw,
    )


def values(task: dict[str, Any]) -> dict[str, Any]:
    return {f["name"]: f.get("value") for f in task["custom_fields"]}


def read_all(tool: ClickUpProjects, since: datetime | None, *lists: str) -> list:
    return [m for page in tool.read_milestone_changes(since, lists or ["any"]) for m in page]


# ---- create / find ---------------------------------------------------------------------------


def test_check_names_the_workspace_and_no_secret(env: Env, cu: ClickUpState) -> None:
    text = connector(env).check()
    assert "Acme Delivery" in text and cu.folder_id in text and TOKEN not in text


def test_create_plain_list_with_milestones_fields_and_stamp(env: Env, cu: ClickUpState) -> None:
    tool = connector(env)
    deal = stamp()
    spec = plain_spec(
        "Initrode onboarding",
        fields={"content": "Won deal", "priority": "high", "due_date": date(2031, 5, 1)},
        custom_fields={"Deal amount": "12500.50", "Deal tier": "Growth", "Milestone weight": 3},
    )
    ref = tool.create_project(spec, deal)

    lst = cu.list(ref.id)
    assert lst["name"] == "Initrode onboarding" and lst["folder"]["id"] == cu.folder_id
    assert lst["content"] == "Won deal" and lst["priority"]["priority"] == "high"
    assert datetime.fromtimestamp(int(lst["due_date"]) / 1000, UTC).date() == date(2031, 5, 1)
    assert ref.url == f"https://app.clickup.com/{cu.team_id}/v/li/{ref.id}"

    tasks = cu.tasks_in_list(ref.id)
    milestones = {t["name"]: t for t in tasks if t["custom_item_id"] == MILESTONE_TYPE_ID}
    assert set(milestones) == {"Kickoff", "Go-live", "Handover"}
    due = {
        n: t["due_date"] and datetime.fromtimestamp(int(t["due_date"]) / 1000, UTC).date()
        for n, t in milestones.items()
    }
    assert due == {"Kickoff": date(2031, 3, 2), "Go-live": date(2031, 4, 15), "Handover": None}
    assert all(values(t)["Milestone weight"] == "3" for t in milestones.values())
    assert all(values(t)["Handoff deal"] == deal.marker for t in milestones.values())

    (record,) = [t for t in tasks if t["custom_item_id"] == 0]
    assert record["status"]["type"] == "closed"  # no open work
    got = values(record)
    assert got["Handoff deal"] == deal.marker and got["Deal amount"] == "12500.5"
    assert got["Deal tier"] == 1  # Growth's orderindex

    found = connector(env).find_project(deal)
    assert found is not None and (found.id, found.name, found.url) == (ref.id, ref.name, ref.url)

    # Warm caches: a create is the List, the deal record and one call a milestone.
    tool.calls.clear()
    tool.create_project(plain_spec("Initrode phase 2"), stamp())
    assert tool.api_calls == 2 + 3 == tool.create_cost(plain_spec("x"))


def test_create_from_template_is_complete_on_return(env: Env, cu: ClickUpState) -> None:
    tool = connector(env)
    deal = stamp()
    spec = ProjectSpec(
        name="Vandelay onboarding",
        template="customer onboarding",
        fields={"content": "From template", "priority": 1},
        custom_fields={"Deal amount": 990},
    )
    ref = tool.create_project(spec, deal)
    tasks = cu.tasks_in_list(ref.id)
    milestones = {t["name"] for t in tasks if t["custom_item_id"] == MILESTONE_TYPE_ID}
    # return_immediately=false: the template's tasks exist when the call returns.
    assert milestones == {
        "Kickoff call held",
        "Training delivered",
        "Go-live",
        "Handover to support",
    }
    assert cu.list(ref.id)["content"] == "From template"
    assert cu.list(ref.id)["priority"]["priority"] == "urgent"
    record = next(t for t in tasks if values(t).get("Handoff deal") == deal.marker)
    assert values(record)["Deal amount"] == "990"
    found = tool.find_project(deal)
    assert found is not None and found.id == ref.id

    tool.calls.clear()
    tool.create_project(ProjectSpec(name="Vandelay 2", template="Customer onboarding"), stamp())
    assert tool.api_calls == 2  # the List from the template + the deal record


def test_folderless_list_in_the_space(env: Env, cu: ClickUpState) -> None:
    tool = connector(env, folder=None)
    ref = tool.create_project(plain_spec("Loose onboarding"), stamp())
    assert cu.list(ref.id)["folder"]["hidden"] is True
    assert cu.list(ref.id)["space"]["id"] == cu.space_id


def test_find_unknown_stamp_is_none(env: Env, cu: ClickUpState) -> None:
    tool = connector(env)
    assert tool.find_project(DealStamp("hubspot", "no-such-deal")) is None
    # A stamp that is a prefix of another is no match ("==", not the fuzzy "=").
    deal = stamp()
    tool.create_project(plain_spec("Prefix onboarding"), DealStamp("hubspot", deal.deal_id + "9"))
    assert tool.find_project(deal) is None


def test_name_taken_by_another_list_adds_the_deal_id(env: Env, cu: ClickUpState) -> None:
    tool = connector(env)
    by_hand = cu.add_list(cu.folder_id, "Dunder onboarding")  # List names are unique
    first = stamp()
    ref = tool.create_project(plain_spec("Dunder onboarding"), first)
    assert ref.id != by_hand and ref.name == f"Dunder onboarding ({first.deal_id})"
    assert cu.tasks_in_list(by_hand) == []  # someone else's List is left alone
    # The same deal again (a claim left pending): its own List, nothing added.
    again = tool.create_project(plain_spec("Dunder onboarding"), first)
    assert again.id == ref.id and len(cu.tasks_in_list(ref.id)) == 4
    third = stamp()
    cu.add_list(cu.folder_id, f"Dunder onboarding ({third.deal_id})")
    with pytest.raises(ConnectorError) as err:
        tool.create_project(plain_spec("Dunder onboarding"), third)
    assert err.value.kind is ErrorKind.RECORD and "taken" in err.value.message


def test_first_run_sends_no_create_it_knows_is_taken(env: Env, cu: ClickUpState) -> None:
    # A first run looks for every deal's project before creating it (the index, read once);
    # a name this run already made is not offered to ClickUp again to be refused.
    _, controls, _ = env
    tool = connector(env)
    first, second = stamp(), stamp()
    assert tool.find_project(first) is None  # builds the index
    controls.reset_stats()
    a = tool.create_project(plain_spec("Kramerica onboarding"), first)
    b = tool.create_project(plain_spec("Kramerica onboarding"), second)
    assert (a.name, b.name) == ("Kramerica onboarding", f"Kramerica onboarding ({second.deal_id})")
    routes = controls.stats.as_dict()["by_route"]
    assert routes["POST /api/v2/folder/{folder_id}/list"] == 2  # none refused
    assert tool.find_project(second) == b


def test_find_by_name_adopts_only_an_unstamped_list(env: Env, cu: ClickUpState) -> None:
    tool = connector(env)
    # A create that died between the List and its deal record.
    orphan = cu.add_list(cu.folder_id, "Wonka onboarding")
    deal = stamp()
    assert tool.find_project(deal) is None
    ref = tool.find_project(deal, "Wonka onboarding")
    assert ref is not None and ref.id == orphan
    (record,) = cu.tasks_in_list(orphan)
    assert values(record)["Handoff deal"] == deal.marker
    assert connector(env).find_project(deal) == ref
    # Another deal's List of that name is never taken over.
    assert tool.find_project(stamp(), "Wonka onboarding") is None


def test_creates_survive_writes_that_apply_then_fail(env: Env, cu: ClickUpState) -> None:
    """The engine's protocol, in small: a failed create leaves the claim pending and the next
    attempt looks by stamp and name first; a failure after the List exists links it."""
    _, controls, _ = env
    controls.set_faults(rate_apply_then_fail=0.25, seed=3)
    tool = connector(env)
    deals = {stamp(): f"Fragile {i} {random.random()}" for i in range(8)}
    refs = {}
    for deal, name in deals.items():
        pending = False
        for _ in range(12):
            ref = tool.find_project(deal, name) if pending else None
            if ref is None:
                try:
                    ref = tool.create_project(plain_spec(name), deal)
                except ConnectorError as exc:
                    assert exc.kind is ErrorKind.TRANSIENT
                    ref, pending = getattr(exc, "project", None), True
            if ref is not None:
                refs[deal] = ref
                break
    controls.set_faults()
    assert set(refs) == set(deals)
    assert httpx.get(env[2].base_url + "/_sandbox/stats").json()["faults"] > 0
    for deal, ref in refs.items():
        named = [x for x in cu.lists() if x["name"].startswith(deals[deal])]
        assert [x["id"] for x in named] == [ref.id]  # one List per deal
        assert connector(env).find_project(deal) == ref
        names = [t["name"] for t in cu.tasks_in_list(ref.id) if t["custom_item_id"] == 1]
        assert len(names) == len(set(names))  # no milestone twice


# ---- update ----------------------------------------------------------------------------------


def test_update_kept_in_sync_fields(env: Env, cu: ClickUpState) -> None:
    deal = stamp()
    ref = connector(env).create_project(
        plain_spec("Hooli onboarding", custom_fields={"Deal amount": 100, "Deal tier": "Starter"}),
        deal,
    )
    with httpx.Client(
        base_url=env[2].base_url + "/api/v2", headers={"Authorization": TOKEN}
    ) as client:
        client.put(f"/list/{ref.id}", json={"name": "Hooli (renamed by PM)"})

    tool = connector(env)  # fresh: finds the deal record by itself
    spec = ProjectSpec(
        name="Hooli onboarding",
        fields={"content": "Now enterprise"},
        custom_fields={"Deal amount": 25000.75, "Deal tier": "Enterprise", "Milestone weight": 5},
    )
    tool.update_project(ref.id, spec)
    lst = cu.list(ref.id)
    assert lst["name"] == "Hooli (renamed by PM)" and lst["content"] == "Now enterprise"
    record = next(t for t in cu.tasks_in_list(ref.id) if t["custom_item_id"] == 0)
    assert values(record)["Deal amount"] == "25000.75" and values(record)["Deal tier"] == 2
    ms = [t for t in cu.tasks_in_list(ref.id) if t["custom_item_id"] == 1]
    assert {values(t)["Milestone weight"] for t in ms} == {"5"}

    tool.calls.clear()
    tool.update_project(ref.id, ProjectSpec(name="x", custom_fields={"Deal amount": None}))
    assert "value" not in next(
        f for f in cu.task(record["id"])["custom_fields"] if f["name"] == "Deal amount"
    )
    assert tool.api_calls == 1  # record task cached: one call a field

    with pytest.raises(ConnectorError) as err:
        tool.update_project(ref.id, ProjectSpec(name="x", custom_fields={"Deal tier": "Gold"}))
    assert err.value.kind is ErrorKind.RECORD and "Gold" in err.value.message


def test_unknown_list_is_a_record_error_not_auth(env: Env, cu: ClickUpState) -> None:
    tool = connector(env)
    with pytest.raises(ConnectorError) as err:
        tool.update_project("901100999999", ProjectSpec(name="x", fields={"content": "y"}))
    assert err.value.kind is ErrorKind.RECORD and err.value.status == 401


def test_comment_and_archive(env: Env, cu: ClickUpState) -> None:
    tool = connector(env)
    deal = stamp()
    ref = tool.create_project(plain_spec("Pied Piper onboarding"), deal)
    tool.comment_on_project(ref.id, "Deal lost")
    assert any(c["parent_id"] == ref.id and c["text"] == "Deal lost" for c in cu.comments.values())
    tool.archive_project(ref.id)
    tasks = cu.tasks_in_list(ref.id)
    assert {t["name"]: t["archived"] for t in tasks} == {
        "Deal record (Handoff)": False,
        "Kickoff": True,
        "Go-live": True,
        "Handover": True,
    }
    found = connector(env).find_project(deal)
    assert found is not None and found.id == ref.id


# ---- milestone changes -----------------------------------------------------------------------


def test_read_milestone_changes_since_across_pages(env: Env, cu: ClickUpState) -> None:
    list_id = cu.add_list(cu.folder_id, f"Paging {random.random()}")
    old = cu.now_ms() - 3_600_000
    ids = [
        cu.add_task(list_id, f"M{i}", custom_item_id=MILESTONE_TYPE_ID, created_ms=old)
        for i in range(160)
    ]
    plain = cu.add_task(list_id, "not a milestone", created_ms=old)
    cu.complete_task(ids[0])  # before `since`: not read
    cu.advance(1)
    since = datetime.fromtimestamp(cu.now_ms() / 1000, UTC)
    for tid in ids[1:131]:
        cu.complete_task(tid)
    cu.set_status(ids[131], "done")
    cu.set_status(plain, "complete")

    tool = connector(env)
    got = read_all(tool, since)
    assert [m.id for m in got if m.project_id == list_id] == [m.id for m in got]
    assert sorted(m.id for m in got) == sorted(ids[1:132])
    stamps = [m.modified_at for m in got]
    assert stamps == sorted(stamps)  # oldest first
    assert all(m.completed and m.completed_at for m in got)
    assert tool.calls["GET /team/{id}/task"] >= 2

    every = read_all(tool, None)
    assert {m.id for m in every} >= set(ids)
    assert len(every) == len({m.id for m in every})


def test_milestones_sharing_one_instant_are_each_read_once(env: Env, cu: ClickUpState) -> None:
    list_id = cu.add_list(cu.folder_id, f"Ties {random.random()}")
    cu.advance(5)
    ids = [cu.add_task(list_id, f"T{i}", custom_item_id=MILESTONE_TYPE_ID) for i in range(230)]
    cu.advance(1)
    instant = cu.now_ms()
    real = cu.now_ms
    cu.now_ms = lambda: instant  # type: ignore[method-assign]
    try:
        for tid in ids:
            cu.complete_task(tid)
    finally:
        del cu.now_ms
    cu.advance(1)
    later = cu.add_task(list_id, "later", custom_item_id=MILESTONE_TYPE_ID)
    got = read_all(connector(env), datetime.fromtimestamp(instant / 1000, UTC))
    assert sorted(m.id for m in got) == sorted([*ids, later]) and got[-1].id == later
    assert real() >= instant


def test_milestone_fields_are_mapped(env: Env, cu: ClickUpState) -> None:
    tool = connector(env)
    ref = tool.create_project(plain_spec("Mapped onboarding"), stamp())
    kickoff = next(t for t in cu.tasks_in_list(ref.id) if t["name"] == "Kickoff")
    cu.advance(1)
    since = datetime.fromtimestamp(cu.now_ms() / 1000, UTC)
    cu.set_status(kickoff["id"], "done")
    (m,) = [m for m in read_all(tool, since) if m.project_id == ref.id]
    assert (m.id, m.name, m.completed, m.due_on) == (
        kickoff["id"],
        "Kickoff",
        True,
        date(2031, 3, 2),
    )
    assert m.completed_at is not None and m.modified_at >= since - timedelta(milliseconds=1)


# ---- rate limits, faults, auth ---------------------------------------------------------------


def test_rate_limit_window_is_waited_out_not_hammered(
    env: Env, cu: ClickUpState, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, controls, _ = env
    monkeypatch.setattr(emulator, "RATE_WINDOW_SECONDS", 2.0)  # a 2 s "minute"
    controls.set_rate_limits(True, multiplier=0.2)  # 20 requests a window
    tool = connector(env, retry=FAST.model_copy(update={"max_retry_after": 3.0}))
    start = time.monotonic()
    for _ in range(3):
        ref = tool.create_project(plain_spec(f"Throttled {random.random()}"), stamp())
        assert tool.find_project(DealStamp("hubspot", "none")) is None
    assert ref.id and tool.api_calls > 20
    stats = httpx.get(env[2].base_url + "/_sandbox/stats").json()
    assert stats["throttled"] <= 1  # X-RateLimit-Remaining: 0 pauses us before a 429
    assert time.monotonic() - start < 15


def test_with_limits_off_the_headers_hold_nothing_back(env: Env, cu: ClickUpState) -> None:
    # The emulator still sends the plan's headers, but the request was not counted:
    # following them would pace a limits-off run at the plan's rate.
    tool = connector(env, retry=FAST.model_copy(update={"max_retry_after": 120.0}))
    tool.create_project(plain_spec(f"Unlimited {random.random()}"), stamp())
    assert tool.api_calls > 1 and tool.api.budget._server is None


def test_429s_are_retried_until_the_reset(env: Env, cu: ClickUpState) -> None:
    _, controls, _ = env
    controls.set_faults(rate_429=0.3, retry_after=0.1, seed=5)
    tool = connector(env)
    deal = stamp()
    ref = tool.create_project(plain_spec(f"Bursty {random.random()}"), deal)
    found = tool.find_project(deal)
    assert found is not None and found.id == ref.id
    assert httpx.get(env[2].base_url + "/_sandbox/stats").json()["faults"] > 0


def test_5xx_faults_are_retried(env: Env, cu: ClickUpState) -> None:
    _, controls, _ = env
    controls.set_faults(rate_5xx=0.3, seed=1)
    tool = connector(env)
    deal = stamp()
    ref = tool.create_project(plain_spec(f"Flaky {random.random()}"), deal)
    found = tool.find_project(deal)
    assert found is not None and found.id == ref.id
    assert len([t for t in cu.tasks_in_list(ref.id) if t["custom_item_id"] == 1]) == 3
    assert httpx.get(env[2].base_url + "/_sandbox/stats").json()["faults"] > 0


def test_bad_token_is_auth_and_not_retried(env: Env, cu: ClickUpState) -> None:
    tool = connector(env, auth=ClickUpAuth(token="pk_0_WRONGTOKEN"))
    with pytest.raises(ConnectorError) as err:
        tool.check()
    assert err.value.kind is ErrorKind.AUTH and err.value.status == 401
    assert "OAUTH_025" in str(err.value) and "WRONGTOKEN" not in str(err.value)
    assert tool.calls["GET /team"] == 1


def test_rate_headers_hold_the_budget_until_the_reset() -> None:
    vendor = ClickUpHttp("clickup", max_wait=5.0)
    budget = RateBudget([])
    reset = str(int(time.time()) + 2)
    budget.acquire()
    ok = httpx.Response(200, headers={"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": reset})
    vendor.observe(ok, budget)
    budget.answered()
    assert budget._server is not None and budget._server.left == 0
    assert budget._server.reset_at == float(reset)
    # A window that did not count the request (limits not applied) says nothing to pace by.
    free = RateBudget([])
    uncounted = {"X-RateLimit-Limit": "100", "X-RateLimit-Remaining": "100"}
    vendor.observe(httpx.Response(200, headers={**uncounted, "X-RateLimit-Reset": reset}), free)
    assert free._server is None
    limited = httpx.Response(
        429,
        headers={"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": reset},
        json={"err": "Rate limit reached", "ECODE": "APP_002"},
    )
    assert 0 < (vendor.retry_after(limited) or 0) <= 2.0
    assert vendor.error_message(limited) == "Rate limit reached (APP_002)"
    skewed = httpx.Response(429, headers={"X-RateLimit-Reset": str(int(time.time()) + 3600)})
    assert vendor.retry_after(skewed) == 5.0


def test_a_settled_read_stops_where_the_next_read_begins(env: Env, cu: ClickUpState) -> None:
    """A settled read (a back-flow pass during a long forward run) reads only changes made
    before its bound on ClickUp's clock; the next read, from that bound, reads the rest:
    each change once, none skipped."""
    list_id = cu.add_list(cu.folder_id, f"Settled {random.random()}")
    cu.advance(3600)
    start = datetime.fromtimestamp(cu.now_ms() / 1000, UTC)
    old = [cu.add_task(list_id, f"O{i}", custom_item_id=MILESTONE_TYPE_ID) for i in range(130)]
    cu.advance(600)  # ten minutes on: the tasks below are younger than the five settled
    young = [cu.add_task(list_id, f"Y{i}", custom_item_id=MILESTONE_TYPE_ID) for i in range(3)]
    cu.complete_task(old[0])  # an old task changed just now: its new version is young too
    tool = connector(env)
    assert tool.server_now() is None
    tool.check()
    now, clock = tool.server_now(), datetime.fromtimestamp(cu.now_ms() / 1000, UTC)
    assert now is not None and clock - timedelta(seconds=2) <= now <= clock

    bound = now - timedelta(minutes=5)
    settled = [m for p in tool.read_milestone_changes(start, [list_id], bound) for m in p]
    assert sorted(m.id for m in settled) == sorted(old[1:])

    rest = read_all(tool, bound)
    assert sorted(m.id for m in rest if m.project_id == list_id) == sorted([old[0], *young])
    assert next(m for m in rest if m.id == old[0]).completed
