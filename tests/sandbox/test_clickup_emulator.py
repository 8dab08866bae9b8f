"""The ClickUp API v2 emulator, driven over real sockets with httpx."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from sandbox.clickup import MILESTONE_TYPE_ID, ClickUpState, create_app
from sandbox.common import EmulatorControls
from sandbox.serve import LoopbackServer

TOKEN = "pk_81234567_TESTTOKEN0000000000000000000000"
OAUTH_TOKEN = "81234567_oauthaccesstoken"

Env = tuple[ClickUpState, EmulatorControls, LoopbackServer]


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    state = ClickUpState(tokens={TOKEN, OAUTH_TOKEN}, template_lag_seconds=5.0)
    state.seed(random.Random(7))
    controls = EmulatorControls()
    server = LoopbackServer(create_app(state, controls)).start()
    yield state, controls, server
    server.stop()


@pytest.fixture()
def cu(env: Env) -> Iterator[ClickUpState]:
    state, controls, _ = env
    controls.set_faults()
    controls.set_rate_limits(False)
    state.plan_rate_per_minute = 100
    yield state
    controls.set_faults()
    controls.set_rate_limits(False)
    state.plan_rate_per_minute = 100


@pytest.fixture()
def client(env: Env, cu: ClickUpState) -> Iterator[httpx.Client]:
    base = env[2].base_url + "/api/v2"
    with httpx.Client(base_url=base, headers={"Authorization": TOKEN}, timeout=10) as c:
        yield c


def _new_list(client: httpx.Client, cu: ClickUpState, name: str | None = None) -> str:
    name = name or f"Project {random.random():.12f}"
    r = client.post(f"/folder/{cu.folder_id}/list", json={"name": name})
    assert r.status_code == 200, r.text
    return r.json()["id"]


def _all_tasks(client: httpx.Client, path: str, **params: Any) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    page = 0
    while True:
        body = client.get(path, params={**params, "page": page}).json()
        out += body["tasks"]
        if body.get("last_page", len(body["tasks"]) < 100):
            return out
        page += 1


# ---- hierarchy ------------------------------------------------------------------------------


def test_navigation_team_space_folder_list(client: httpx.Client, cu: ClickUpState) -> None:
    teams = client.get("/team").json()["teams"]
    team = next(t for t in teams if t["name"] == "Acme Delivery")
    assert len(team["members"]) >= 3 and "username" in team["members"][0]["user"]

    spaces = client.get(f"/team/{team['id']}/space").json()["spaces"]
    space = next(s for s in spaces if s["name"] == "Client Delivery")
    types = {s["status"]: s["type"] for s in space["statuses"]}
    assert types == {"to do": "open", "in progress": "custom", "done": "done", "complete": "closed"}
    assert client.get(f"/space/{space['id']}").json()["name"] == "Client Delivery"

    folders = client.get(f"/space/{space['id']}/folder").json()["folders"]
    folder = next(f for f in folders if f["name"] == "Onboarding projects")
    # The hidden Folder that holds folderless Lists is not listed.
    assert all(not f["hidden"] for f in folders)
    assert client.get(f"/folder/{folder['id']}").json()["space"]["id"] == space["id"]

    lists = client.get(f"/folder/{folder['id']}/list").json()["lists"]
    assert any(lst["name"] == "Northwind Traders onboarding" for lst in lists)
    one = client.get(f"/list/{lists[0]['id']}").json()
    assert one["folder"]["id"] == folder["id"] and one["space"]["id"] == space["id"]
    assert [s["type"] for s in one["statuses"]] == ["open", "custom", "done", "closed"]

    folderless = client.get(f"/space/{space['id']}/list").json()["lists"]
    assert folderless[0]["folder"]["hidden"] is True

    templates = client.get(f"/team/{team['id']}/list_template").json()["templates"]
    assert {"name": "Customer onboarding", "id": cu.template_id} in templates
    assert cu.template_id.startswith("t-")
    items = client.get(f"/team/{team['id']}/custom_item").json()["custom_items"]
    assert {"id": 1, "name": "Milestone"}.items() <= next(i for i in items if i["id"] == 1).items()


def test_unknown_and_malformed_ids(client: httpx.Client, cu: ClickUpState) -> None:
    # ClickUp answers an id it cannot reach (or that never existed) as an authorization error.
    r = client.get("/list/901100999999")
    assert r.status_code == 401 and r.json() == {"err": "Team not authorized", "ECODE": "OAUTH_027"}
    assert client.get("/task/86zzzzzzz").json()["ECODE"] == "OAUTH_027"
    r = client.get("/list/not-a-number")
    assert r.status_code == 400 and r.json()["ECODE"] == "INPUT_003"
    r = client.get("/no/such/route")
    assert r.status_code == 404 and set(r.json()) == {"err", "ECODE"}


# ---- lists -----------------------------------------------------------------------------------


def test_create_update_delete_plain_lists(client: httpx.Client, cu: ClickUpState) -> None:
    r = client.post(
        f"/folder/{cu.folder_id}/list",
        json={"name": "Initech onboarding", "content": "Deal 42", "priority": 2, "status": "red"},
    )
    assert r.status_code == 200
    created = r.json()
    assert created["folder"]["id"] == cu.folder_id and created["content"] == "Deal 42"
    assert created["priority"]["priority"] == "high" and created["status"]["status"] == "red"
    assert created["task_count"] == 0

    dup = client.post(f"/folder/{cu.folder_id}/list", json={"name": "initech onboarding"})
    assert dup.status_code == 400 and dup.json() == {
        "err": "List name taken",
        "ECODE": "SUBCAT_016",
    }
    assert client.post(f"/folder/{cu.folder_id}/list", json={}).status_code == 400

    folderless = client.post(f"/space/{cu.space_id}/list", json={"name": "Loose list"}).json()
    assert folderless["folder"]["hidden"] is True and folderless["space"]["id"] == cu.space_id

    r = client.put(f"/list/{created['id']}", json={"name": "Initech project", "unset_status": True})
    assert r.json()["name"] == "Initech project" and r.json()["status"] is None
    assert cu.list(created["id"])["name"] == "Initech project"

    assert client.delete(f"/list/{created['id']}").json() == {}
    assert client.get(f"/list/{created['id']}").status_code == 404
    assert created["id"] not in {lst["id"] for lst in cu.lists()}


def test_list_from_template_async_then_sync(client: httpx.Client, cu: ClickUpState) -> None:
    r = client.post(
        f"/folder/{cu.folder_id}/list_template/{cu.template_id}", json={"name": "Umbrella Corp"}
    )
    assert r.status_code == 200
    list_id = r.json()["id"]
    assert r.json()["list"]["id"] == list_id and r.json()["list"]["name"] == "Umbrella Corp"
    # return_immediately defaults to true: the id comes back before the tasks exist.
    assert client.get(f"/list/{list_id}/task").json()["tasks"] == []
    cu.advance(6)  # the background apply finishes
    tasks = client.get(f"/list/{list_id}/task").json()["tasks"]
    milestones = {t["name"] for t in tasks if t["custom_item_id"] == MILESTONE_TYPE_ID}
    assert milestones == {
        "Kickoff call held",
        "Training delivered",
        "Go-live",
        "Handover to support",
    }
    assert all(t["list"]["id"] == list_id and t["due_date"] for t in tasks)

    r = client.post(
        f"/space/{cu.space_id}/list_template/{cu.template_id}",
        json={"name": "Soylent Corp", "options": {"return_immediately": False}},
    )
    tasks = client.get(f"/list/{r.json()['id']}/task", params={"subtasks": "true"}).json()["tasks"]
    assert len(tasks) == 9 and sum(t["parent"] is not None for t in tasks) == 1

    # Without the task types imported, milestones arrive as plain tasks.
    r = client.post(
        f"/folder/{cu.folder_id}/list_template/{cu.template_id}",
        json={"name": "Hooli", "options": {"return_immediately": False, "custom_type": False}},
    )
    assert {t["custom_item_id"] for t in cu.tasks_in_list(r.json()["id"])} == {0}

    missing = client.post(f"/folder/{cu.folder_id}/list_template/t-1", json={"name": "x"})
    assert missing.status_code == 404 and set(missing.json()) == {"err", "ECODE"}
    dup = client.post(
        f"/folder/{cu.folder_id}/list_template/{cu.template_id}", json={"name": "Hooli"}
    )
    assert dup.json()["ECODE"] == "SUBCAT_016"


# ---- tasks and Custom Fields -----------------------------------------------------------------


def test_create_task_with_custom_fields_and_read_back(
    client: httpx.Client, cu: ClickUpState
) -> None:
    list_id = _new_list(client, cu)
    fields = {f["name"]: f for f in client.get(f"/list/{list_id}/field").json()["fields"]}
    assert {"Handoff deal", "Deal amount", "Deal tier", "Milestone weight"} <= set(fields)
    team_fields = client.get(f"/team/{cu.team_id}/field").json()["fields"]
    assert {f["name"] for f in team_fields} == {"Handoff deal", "Deal amount"}
    scoped = client.get(f"/folder/{cu.folder_id}/field", params={"include_applied_objects": True})
    assert scoped.json()["fields"][0]["applied_objects"] == [{"object_type": 19, "object_id": 1}]

    growth = next(o for o in fields["Deal tier"]["type_config"]["options"] if o["name"] == "Growth")
    r = client.post(
        f"/list/{list_id}/task",
        json={
            "name": "Kickoff",
            "custom_item_id": MILESTONE_TYPE_ID,
            "due_date": 1_900_000_000_000,
            "custom_fields": [
                {"id": fields["Handoff deal"]["id"], "value": "deal-981"},
                {"id": fields["Deal amount"]["id"], "value": 12500.5},
            ],
        },
    )
    assert r.status_code == 200, r.text
    task = r.json()
    assert task["custom_item_id"] == 1 and task["status"]["status"] == "to do"
    assert task["due_date"] == "1900000000000" and task["date_closed"] is None
    values = {f["name"]: f.get("value") for f in task["custom_fields"]}
    assert values["Handoff deal"] == "deal-981" and values["Deal amount"] == "12500.5"

    tid = task["id"]
    assert (
        client.post(
            f"/task/{tid}/field/{fields['Deal tier']['id']}", json={"value": growth["id"]}
        ).json()
        == {}
    )
    bad = client.post(f"/task/{tid}/field/{fields['Deal amount']['id']}", json={"value": "lots"})
    assert bad.status_code == 400 and set(bad.json()) == {"err", "ECODE"}
    got = client.get(f"/task/{tid}").json()
    values = {f["name"]: f.get("value") for f in got["custom_fields"]}
    assert values["Deal tier"] == growth["orderindex"]  # drop_down reads back as orderindex
    assert got["url"] == f"https://app.clickup.com/t/{tid}"
    assert got["list"]["id"] == list_id and got["space"]["id"] == cu.space_id

    assert client.delete(f"/task/{tid}/field/{fields['Handoff deal']['id']}").json() == {}
    cf = next(f for f in cu.task(tid)["custom_fields"] if f["name"] == "Handoff deal")
    assert "value" not in cf

    # A field scoped to Milestones does not apply to a plain task.
    plain = client.post(f"/list/{list_id}/task", json={"name": "Prep"}).json()
    assert "Milestone weight" not in {f["name"] for f in plain["custom_fields"]}
    r = client.post(
        f"/task/{plain['id']}/field/{fields['Milestone weight']['id']}", json={"value": 3}
    )
    assert r.status_code == 400

    r = client.post(f"/list/{list_id}/task", json={"name": "x", "status": "nope"})
    assert r.json() == {"err": "Status does not exist", "ECODE": "ITEM_114"}


def test_paging_over_250_tasks(client: httpx.Client, cu: ClickUpState) -> None:
    list_id = _new_list(client, cu)
    base = cu.now_ms() - 10_000_000
    made = {cu.add_task(list_id, f"Task {i}", created_ms=base + i * 1000) for i in range(250)}
    pages = [client.get(f"/list/{list_id}/task", params={"page": p}).json() for p in range(4)]
    assert [len(p["tasks"]) for p in pages] == [100, 100, 50, 0]
    assert [p["last_page"] for p in pages] == [False, False, True, True]
    seen = [t["id"] for p in pages for t in p["tasks"]]
    assert len(seen) == len(set(seen)) == 250 and set(seen) == made
    created = [int(t["date_created"]) for t in pages[0]["tasks"]]
    assert created == sorted(created, reverse=True)
    rev = client.get(f"/list/{list_id}/task", params={"reverse": "true"}).json()["tasks"]
    assert int(rev[0]["date_created"]) == base

    team = _all_tasks(client, f"/team/{cu.team_id}/task", **{"list_ids[]": list_id})
    assert len(team) == 250
    assert "last_page" not in client.get(f"/team/{cu.team_id}/task").json()


def test_date_updated_and_custom_item_filters(client: httpx.Client, cu: ClickUpState) -> None:
    list_id = _new_list(client, cu)
    ids = [
        cu.add_task(list_id, f"T{i}", custom_item_id=MILESTONE_TYPE_ID if i % 3 == 0 else 0)
        for i in range(9)
    ]
    cut = cu.now_ms()
    cu.advance(2)
    client.put(f"/task/{ids[0]}", json={"name": "T0 renamed"})
    client.put(f"/task/{ids[1]}", json={"status": "in progress"})

    def names(path: str, **params: Any) -> set[str]:
        return {t["name"] for t in _all_tasks(client, path, **params)}

    list_path, team_path = f"/list/{list_id}/task", f"/team/{cu.team_id}/task"
    assert names(list_path, date_updated_gt=cut) == {"T0 renamed", "T1"}
    assert names(team_path, date_updated_gt=cut, **{"list_ids[]": list_id}) == {"T0 renamed", "T1"}
    milestones = {"T0 renamed", "T3", "T6"}
    assert names(list_path, **{"custom_items[]": "1"}) == milestones
    assert names(team_path, **{"custom_items[]": "1", "list_ids[]": list_id}) == milestones
    both = names(team_path, date_updated_gt=cut, **{"custom_items[]": ["1"]})
    assert both == {"T0 renamed"}
    plain = names(list_path, **{"custom_items[]": "0"})
    assert plain == {"T1", "T2", "T4", "T5", "T7", "T8"}
    assert names(list_path, date_updated_lt=cut + 1) == {f"T{i}" for i in range(2, 9)}
    assert names(team_path, **{"project_ids[]": cu.folder_id, "list_ids[]": list_id}) >= {"T2"}
    assert names(list_path, **{"statuses[]": "in progress"}) == {"T1"}


def test_custom_field_filter_finds_the_stamped_project(
    client: httpx.Client, cu: ClickUpState
) -> None:
    list_id = _new_list(client, cu)
    deal = cu.field_ids["Handoff deal"]
    amount = cu.field_ids["Deal amount"]
    cu.add_task(list_id, "stamped", custom_fields={deal: "deal-7781", amount: 5000.0})
    cu.add_task(list_id, "other", custom_fields={deal: "deal-77810", amount: 90.0})
    cu.add_task(list_id, "bare")

    def find(filters: list[dict[str, Any]]) -> set[str]:
        params = {"custom_fields": json.dumps(filters), "list_ids[]": list_id}
        return {t["name"] for t in _all_tasks(client, f"/team/{cu.team_id}/task", **params)}

    assert find([{"field_id": deal, "operator": "==", "value": "deal-7781"}]) == {"stamped"}
    assert find([{"field_id": deal, "operator": "=", "value": "deal-7781"}]) == {"stamped", "other"}
    assert find([{"field_id": deal, "operator": "IS NULL", "value": None}]) == {"bare"}
    assert find([{"field_id": amount, "operator": ">", "value": 100}]) == {"stamped"}
    assert find([{"field_id": amount, "operator": "RANGE", "value": [50, 100]}]) == {"other"}
    bad = client.get(f"/list/{list_id}/task", params={"custom_fields": "[{oops"})
    assert bad.status_code == 400 and set(bad.json()) == {"err", "ECODE"}


def test_closed_tasks_hidden_unless_include_closed(client: httpx.Client, cu: ClickUpState) -> None:
    list_id = _new_list(client, cu)
    open_id = cu.add_task(list_id, "open one")
    done_id = cu.add_task(list_id, "done one", status="done")
    closed_id = cu.add_task(list_id, "closed one", status="complete")
    default = {t["id"] for t in client.get(f"/list/{list_id}/task").json()["tasks"]}
    # A "done" status is not a closed one: only the closed type is left out by default.
    assert default == {open_id, done_id}
    every = client.get(f"/list/{list_id}/task", params={"include_closed": "true"}).json()
    assert {t["id"] for t in every["tasks"]} == {open_id, done_id, closed_id}
    team = _all_tasks(client, f"/team/{cu.team_id}/task", **{"list_ids[]": list_id})
    assert {t["id"] for t in team} == {open_id, done_id}
    # Asking for the closed status by name still needs include_closed.
    only = client.get(f"/list/{list_id}/task", params={"statuses[]": "complete"}).json()
    assert only["tasks"] == []


def test_completing_a_milestone_stamps_dates(client: httpx.Client, cu: ClickUpState) -> None:
    list_id = _new_list(client, cu)
    made = client.post(
        f"/list/{list_id}/task", json={"name": "Go-live", "custom_item_id": MILESTONE_TYPE_ID}
    ).json()
    tid, before = made["id"], int(made["date_updated"])
    cu.advance(5)
    r = client.put(f"/task/{tid}", json={"status": "complete"}).json()
    assert r["status"]["type"] == "closed"
    assert r["date_closed"] is not None and r["date_done"] is not None
    assert int(r["date_updated"]) >= before + 5000
    assert r["date_closed"] == r["date_done"]

    reopened = client.put(f"/task/{tid}", json={"status": "to do"}).json()
    assert reopened["date_closed"] is None and reopened["date_done"] is None
    done = client.put(f"/task/{tid}", json={"status": "done"}).json()
    assert done["date_done"] is not None and done["date_closed"] is None

    other = cu.add_task(list_id, "Handover", custom_item_id=MILESTONE_TYPE_ID)
    old = int(cu.task(other)["date_updated"])
    cu.advance(1)
    cu.complete_task(other)
    closed = client.get(f"/task/{other}").json()
    assert closed["status"]["status"] == "complete" and int(closed["date_updated"]) > old
    assert closed["date_closed"] == closed["date_updated"]


def test_comments_and_deleted_task(client: httpx.Client, cu: ClickUpState) -> None:
    list_id = _new_list(client, cu)
    tid = cu.add_task(list_id, "Kickoff")
    r = client.post(f"/task/{tid}/comment", json={"comment_text": "Deal won", "notify_all": False})
    assert r.status_code == 200 and set(r.json()) == {"id", "hist_id", "date"}
    assert isinstance(r.json()["date"], int)
    got = client.get(f"/task/{tid}/comment").json()["comments"]
    assert got[0]["comment_text"] == "Deal won" and isinstance(got[0]["date"], str)
    r = client.post(f"/list/{list_id}/comment", json={"comment_text": "Project created"})
    assert r.status_code == 200
    assert client.post(f"/task/{tid}/comment", json={}).status_code == 400

    assert client.delete(f"/task/{tid}").json() == {}
    gone = client.get(f"/task/{tid}")
    assert gone.status_code == 404
    assert gone.json() == {"err": "Task not found, deleted", "ECODE": "ITEM_013"}


# ---- auth, rate limits, faults, stats ---------------------------------------------------------


def test_auth_header_forms(client: httpx.Client, cu: ClickUpState) -> None:
    r = client.get("/team", headers={"Authorization": "pk_0_WRONG"})
    assert r.status_code == 401 and r.json() == {"err": "Token invalid", "ECODE": "OAUTH_025"}
    r = client.get("/team", headers={"Authorization": ""})
    assert r.status_code == 400 and r.json()["ECODE"] == "OAUTH_017"
    # A personal token goes raw; "Bearer" is for OAuth access tokens.
    r = client.get("/team", headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 401 and r.json()["err"] == "Oauth token not found"
    assert (
        client.get("/team", headers={"Authorization": f"Bearer {OAUTH_TOKEN}"}).status_code == 200
    )


def test_rate_limit_headers_and_429(env: Env, client: httpx.Client, cu: ClickUpState) -> None:
    _, controls, _ = env
    controls.set_rate_limits(True, multiplier=1.0)
    first = client.get("/team")
    assert first.headers["X-RateLimit-Limit"] == "100"
    assert first.headers["X-RateLimit-Remaining"] == "99"
    reset = int(first.headers["X-RateLimit-Reset"])
    assert time.time() < reset <= time.time() + 61  # a Unix timestamp in seconds
    for _ in range(99):
        assert client.get("/team").status_code == 200
    limited = client.get("/team")
    assert limited.status_code == 429
    assert limited.json() == {"err": "Rate limit reached", "ECODE": "APP_002"}
    assert limited.headers["X-RateLimit-Remaining"] == "0"
    assert "Retry-After" not in limited.headers
    # The limit is per token: an OAuth token has its own minute.
    other = client.get("/team", headers={"Authorization": f"Bearer {OAUTH_TOKEN}"})
    assert other.status_code == 200

    cu.plan_rate_per_minute = 1000  # Business Plus
    controls.set_rate_limits(True, multiplier=1.0)
    assert client.get("/team").headers["X-RateLimit-Limit"] == "1000"


def test_injected_faults_use_clickup_bodies(env: Env, client: httpx.Client) -> None:
    _, controls, _ = env
    controls.set_faults(rate_5xx=1.0, seed=3)
    r = client.get("/team")
    assert r.status_code in (500, 502, 503) and set(r.json()) == {"err", "ECODE"}
    controls.set_faults(rate_429=1.0, retry_after=2.0, seed=3)
    r = client.get("/team")
    assert r.status_code == 429 and r.json()["ECODE"] == "APP_002"
    assert int(r.headers["X-RateLimit-Reset"]) >= int(time.time()) + 1


def test_sandbox_stats_count_routes(env: Env, client: httpx.Client, cu: ClickUpState) -> None:
    _, controls, server = env
    controls.reset_stats()
    list_id = _new_list(client, cu)
    client.get(f"/list/{list_id}/task")
    client.get(f"/list/{list_id}/task", params={"page": 1})
    client.get(f"/list/{list_id}")
    stats = httpx.get(server.base_url + "/_sandbox/stats").json()
    assert stats["by_route"]["GET /api/v2/list/{list_id}/task"] == 2
    assert stats["by_route"]["POST /api/v2/folder/{folder_id}/list"] == 1
    assert stats["by_route"]["GET /api/v2/list/{list_id}"] == 1
    assert stats["writes"] == 1 and stats["reads"] == 3 and stats["total"] == 4
