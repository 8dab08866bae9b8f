"""The Asana emulator over real sockets: the official `asana` v5 client, raw HTTP for the
edges the client hides (429s, 5xx, paging errors), and every response checked against
Asana's published OpenAPI spec."""

from __future__ import annotations

import copy
import json
import os
import random
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import asana
import httpx
import pytest
from asana.rest import ApiException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sandbox.asana import (
    BASE_PATH,
    ROUTES,
    AsanaState,
    _AsanaQuota,
    create_app,
)
from sandbox.common import EmulatorControls
from sandbox.serve import LoopbackServer

TOKEN = "2/1208000000000001/1208000000000002:emulatortoken"
OTHER_TOKEN = "2/1208000000000001/1208000000000003:othertoken"


# ---- recording every response for the spec check ---------------------------------------------


@dataclass
class Recorded:
    method: str
    path: str
    query: str
    status: int
    body: bytes


@dataclass
class Recorder:
    """Outermost ASGI wrapper: keeps every API response the emulator sends."""

    app: ASGIApp
    seen: list[Recorded] = field(default_factory=list)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(BASE_PATH):
            await self.app(scope, receive, send)
            return
        status = 0
        chunks: list[bytes] = []

        async def keep(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))
                if not message.get("more_body"):
                    query = scope.get("query_string", b"").decode()
                    body = b"".join(chunks)
                    self.seen.append(Recorded(scope["method"], scope["path"], query, status, body))
            await send(message)

        await self.app(scope, receive, keep)


@dataclass
class Env:
    state: AsanaState
    controls: EmulatorControls
    server: LoopbackServer
    recorder: Recorder
    ids: dict[str, str]

    @property
    def base(self) -> str:
        return self.server.base_url + BASE_PATH


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    state = AsanaState(tokens={TOKEN, OTHER_TOKEN}, premium=True)
    ids = state.seed(random.Random(11))
    controls = EmulatorControls()
    recorder = Recorder(create_app(state, controls))
    server = LoopbackServer(recorder).start()
    yield Env(state, controls, server, recorder, ids)
    server.stop()


@pytest.fixture()
def az(env: Env) -> Iterator[Env]:
    """The env with every knob back to normal before and after the test."""

    def reset() -> None:
        env.controls.set_faults()
        env.controls.set_rate_limits(False)
        env.state.premium = True
        env.state.job_seconds = 0.05
        env.state.clock_offset = timedelta(0)
        env.state.search_lag = timedelta(0)
        env.state.offset_ttl = timedelta(minutes=30)

    reset()
    yield env
    reset()


@pytest.fixture()
def http(az: Env) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=az.base, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10
    ) as client:
        yield client


@pytest.fixture()
def client(az: Env) -> asana.ApiClient:
    configuration = asana.Configuration()
    configuration.host = az.base
    configuration.access_token = TOKEN
    return asana.ApiClient(configuration)


def _wait_for_job(client: asana.ApiClient, job_gid: str) -> dict[str, Any]:
    jobs = asana.JobsApi(client)
    deadline = time.monotonic() + 5
    while True:
        job = jobs.get_job(job_gid, {})
        if job["status"] == "succeeded" or time.monotonic() > deadline:
            return job
        time.sleep(0.02)


def _instantiate(
    client: asana.ApiClient, env: Env, name: str, start: str = "2025-03-03"
) -> dict[str, Any]:
    body = {
        "data": {
            "name": name,
            "team": env.ids["team"],
            "public": False,
            "requested_dates": [{"gid": "1", "value": start}],
        }
    }
    return asana.ProjectTemplatesApi(client).instantiate_project(
        env.ids["template"], {"body": body}
    )


# ---- users, workspaces, teams ----------------------------------------------------------------


def test_me_workspaces_and_teams_through_the_official_client(
    client: asana.ApiClient, az: Env
) -> None:
    me = asana.UsersApi(client).get_user("me", {"opt_fields": "name,email,workspaces.name"})
    assert me["gid"] == az.ids["me"] and me["email"].endswith("@acme-delivery.example")
    assert me["workspaces"] == [{"gid": az.ids["workspace"], "name": "Acme Delivery"}]
    workspaces = list(asana.WorkspacesApi(client).get_workspaces({}))
    assert [w["name"] for w in workspaces] == ["Acme Delivery"]
    assert set(workspaces[0]) == {"gid", "resource_type", "name"}  # compact by default
    teams = list(asana.TeamsApi(client).get_teams_for_workspace(az.ids["workspace"], {}))
    assert [t["name"] for t in teams] == ["Delivery"]
    team = asana.TeamsApi(client).get_team(az.ids["team"], {})
    assert team["organization"]["gid"] == az.ids["workspace"]
    users = list(asana.UsersApi(client).get_users({"workspace": az.ids["workspace"]}))
    assert len(users) == 6


def test_bad_token_is_401(az: Env) -> None:
    response = httpx.get(az.base + "/users/me", headers={"Authorization": "Bearer nope"})
    assert response.status_code == 401
    assert response.json() == {"errors": [{"message": "Not Authorized"}]}
    assert httpx.get(az.base + "/users/me").status_code == 401


# ---- projects and paging ---------------------------------------------------------------------


def test_official_client_pages_through_many_projects(client: asana.ApiClient, az: Env) -> None:
    team = az.state.add_team("Paging", az.ids["workspace"])
    made = [az.state.add_project(f"Paged {i:03d}", team) for i in range(230)]
    az.controls.reset_stats()
    got = list(
        asana.ProjectsApi(client).get_projects({"team": team, "opt_fields": "name,archived"})
    )
    assert [p["gid"] for p in got] == made
    assert all(set(p) == {"gid", "name", "archived"} for p in got)
    # The client asks for 100 at a time and follows next_page.offset: three pages.
    assert az.controls.stats.by_route["GET /projects"] == 3
    in_team = list(asana.ProjectsApi(client).get_projects_for_team(team, {"limit": 50}))
    assert len(in_team) == 230


def test_next_page_shape_and_paging_errors(http: httpx.Client, az: Env) -> None:
    params = {"workspace": az.ids["workspace"], "limit": 2}
    first = http.get("/projects", params=params).json()
    nxt = first["next_page"]
    assert set(nxt) == {"offset", "path", "uri"}
    assert nxt["path"].startswith("/projects?") and nxt["uri"].endswith(nxt["path"])
    assert nxt["uri"].startswith(az.base)
    second = http.get(nxt["uri"]).json()
    assert {p["gid"] for p in second["data"]}.isdisjoint(p["gid"] for p in first["data"])
    # Unpaginated request: everything, and no next_page at all.
    whole = http.get("/projects", params={"workspace": az.ids["workspace"]}).json()
    assert "next_page" not in whole and len(whole["data"]) >= 4
    for bad in (0, 101, "ten"):
        response = http.get("/projects", params={**params, "limit": bad})
        assert response.status_code == 400
        assert response.json()["errors"][0]["message"].startswith("limit:")
    tampered = nxt["offset"][:-1] + ("0" if nxt["offset"][-1] != "0" else "1")
    for offset in (tampered, "garbage"):
        response = http.get("/projects", params={**params, "offset": offset})
        assert response.status_code == 400
        assert "help" in response.json()["errors"][0]
    # An offset only works for the query that produced it.
    other = http.get(
        "/projects", params={"team": az.ids["team"], "limit": 2, "offset": nxt["offset"]}
    )
    assert other.status_code == 400
    az.state.offset_ttl = timedelta(0)
    time.sleep(1.1)
    assert http.get("/projects", params={**params, "offset": nxt["offset"]}).status_code == 400


def test_archived_filter_and_archiving(http: httpx.Client, az: Env) -> None:
    team = az.ids["team"]
    before = http.get(f"/teams/{team}/projects", params={"archived": "false"}).json()["data"]
    gid = before[0]["gid"]
    response = http.put(f"/projects/{gid}", json={"data": {"archived": True}})
    assert response.status_code == 200 and response.json()["data"]["archived"] is True
    after = http.get(f"/teams/{team}/projects", params={"archived": "false"}).json()["data"]
    assert gid not in {p["gid"] for p in after}
    archived = http.get("/projects", params={"team": team, "archived": "true"}).json()["data"]
    assert gid in {p["gid"] for p in archived}
    http.put(f"/projects/{gid}", json={"data": {"archived": False}})


def test_plain_project_with_sections_and_milestones(client: asana.ApiClient, az: Env) -> None:
    projects = asana.ProjectsApi(client)
    body = {
        "data": {
            "name": "Wayne Enterprises onboarding",
            "workspace": az.ids["workspace"],
            "team": az.ids["team"],
            "notes": "Won deal 42",
            "due_on": "2025-06-30",
            "start_on": "2025-04-01",
            "owner": "me",
        }
    }
    project = projects.create_project(body, {})
    assert project["owner"]["gid"] == az.ids["me"]
    assert project["start_on"] == "2025-04-01" and project["created_at"] == project["modified_at"]
    gid = project["gid"]
    sections_api = asana.SectionsApi(client)
    # Asana gives a new project one empty "Untitled section".
    assert [s["name"] for s in sections_api.get_sections_for_project(gid, {})] == [
        "Untitled section"
    ]
    kickoff = sections_api.create_section_for_project(gid, {"body": {"data": {"name": "Kickoff"}}})
    tasks_api = asana.TasksApi(client)
    milestone = tasks_api.create_task(
        {
            "data": {
                "name": "Kickoff call held",
                "resource_subtype": "milestone",
                "due_on": "2025-04-04",
                "memberships": [{"project": gid, "section": kickoff["gid"]}],
            }
        },
        {},
    )
    plain = tasks_api.create_task({"data": {"name": "Prep", "projects": [gid]}}, {})
    assert milestone["resource_subtype"] == "milestone"
    assert milestone["memberships"][0]["section"]["name"] == "Kickoff"
    assert plain["memberships"][0]["section"]["name"] == "Untitled section"
    listed = list(
        tasks_api.get_tasks_for_project(
            gid, {"opt_fields": "name,resource_subtype,due_on,memberships.section.name"}
        )
    )
    by_name = {t["name"]: t for t in listed}
    assert by_name["Kickoff call held"]["resource_subtype"] == "milestone"
    assert by_name["Kickoff call held"]["due_on"] == "2025-04-04"
    assert by_name["Prep"]["resource_subtype"] == "default_task"
    compact = list(tasks_api.get_tasks_for_project(gid, {}))
    assert all(set(t) == {"gid", "resource_type", "name", "resource_subtype"} for t in compact)
    in_section = list(tasks_api.get_tasks_for_section(kickoff["gid"], {}))
    assert [t["name"] for t in in_section] == ["Kickoff call held"]
    assert az.state.project(gid)["name"] == "Wayne Enterprises onboarding"


def test_project_validation_errors(http: httpx.Client, az: Env) -> None:
    ws, team = az.ids["workspace"], az.ids["team"]
    cases = [
        ({"name": "x", "team": team, "start_on": "2025-01-02"}, "start_on"),
        ({"team": team}, "name: Missing input"),
        ({"name": "x", "workspace": ws}, "team: Missing input"),  # organizations need a team
        ({"name": "x", "team": "99999"}, "team: Unknown object"),
        ({"name": "x", "team": team, "color": "plaid"}, "color"),
    ]
    for data, message in cases:
        response = http.post("/projects", json={"data": data})
        assert response.status_code in (400, 404), data
        assert message in response.json()["errors"][0]["message"]
    assert http.get("/projects/abc").status_code == 400
    assert http.get("/projects/12345").status_code == 404
    assert http.post("/projects", content=b"{nope").status_code == 400


# ---- templates and jobs ----------------------------------------------------------------------


def test_instantiate_template_and_poll_the_job(client: asana.ApiClient, az: Env) -> None:
    templates = list(
        asana.ProjectTemplatesApi(client).get_project_templates({"team": az.ids["team"]})
    )
    assert [t["name"] for t in templates] == ["Customer onboarding"]
    template = asana.ProjectTemplatesApi(client).get_project_template(az.ids["template"], {})
    assert template["requested_dates"][0]["gid"] == "1"
    az.state.job_seconds = 0.2
    job = _instantiate(client, az, "Stark Industries onboarding")
    assert job["resource_type"] == "job" and job["resource_subtype"] == "instantiate_project"
    assert job["status"] == "in_progress"
    assert job["new_project"]["name"] == "Stark Industries onboarding"
    assert job["new_project_template"] is None and job["new_task"] is None
    gid = job["new_project"]["gid"]
    assert az.state.tasks_in_project(gid) == []  # still being built
    done = _wait_for_job(client, job["gid"])
    assert done["status"] == "succeeded" and done["new_project"]["gid"] == gid
    sections = [s["name"] for s in az.state.sections_in_project(gid)]
    assert sections == ["Kickoff", "Implementation", "Go-live"]
    tasks = list(
        asana.TasksApi(client).get_tasks_for_project(
            gid, {"opt_fields": "name,resource_subtype,due_on"}
        )
    )
    milestones = {t["name"]: t["due_on"] for t in tasks if t["resource_subtype"] == "milestone"}
    assert milestones == {
        "Kickoff call held": "2025-03-06",
        "Environment provisioned": "2025-03-17",
        "Data migrated": "2025-03-31",
        "Go-live": "2025-04-17",
    }
    project = asana.ProjectsApi(client).get_project(gid, {})
    assert project["created_from_template"]["gid"] == az.ids["template"]
    assert project["start_on"] == "2025-03-03"


def test_requested_roles_and_strict_dates(http: httpx.Client, az: Env) -> None:
    template = http.get(f"/project_templates/{az.ids['template']}").json()["data"]
    role = template["requested_roles"][0]["gid"]
    url = f"/project_templates/{az.ids['template']}/instantiateProject"
    strict = http.post(url, json={"data": {"name": "Strict", "is_strict": True}})
    assert strict.status_code == 422
    job = http.post(
        url,
        json={
            "data": {
                "name": "Roles",
                "requested_roles": [{"gid": role, "value": "ravi@acme-delivery.example"}],
            }
        },
    )
    assert job.status_code == 201
    assert job.headers["Location"].endswith("/jobs/" + job.json()["data"]["gid"])
    time.sleep(0.06)
    gid = job.json()["data"]["new_project"]["gid"]
    tasks = az.state.tasks_in_project(gid)
    lead = {t["name"]: (t["assignee"] or {}).get("name") for t in tasks}
    assert lead["Kickoff call held"] == "Ravi Menon" and lead["Hypercare review"] is None


def test_sixth_concurrent_instantiation_is_429(http: httpx.Client, az: Env) -> None:
    az.state.job_seconds = 1.0
    url = f"/project_templates/{az.ids['template']}/instantiateProject"
    accepted = [http.post(url, json={"data": {"name": f"Batch {i}"}}) for i in range(5)]
    assert [r.status_code for r in accepted] == [201] * 5
    sixth = http.post(url, json={"data": {"name": "Batch 6"}})
    assert sixth.status_code == 429
    assert 1 <= int(sixth.headers["Retry-After"]) <= 2
    assert sixth.json()["errors"][0]["message"].startswith("You've made too many requests")
    # Limits are per token: another token may still start a job.
    other = http.post(
        url, json={"data": {"name": "Other"}}, headers={"Authorization": f"Bearer {OTHER_TOKEN}"}
    )
    assert other.status_code == 201
    time.sleep(1.05)
    assert http.post(url, json={"data": {"name": "Batch 7"}}).status_code == 201
    assert az.state.running_jobs(TOKEN) == 1


# ---- custom fields ---------------------------------------------------------------------------


def test_custom_fields_settings_and_values(http: httpx.Client, az: Env) -> None:
    ws = az.ids["workspace"]
    fields = http.get(
        f"/workspaces/{ws}/custom_fields",
        params={"opt_fields": "name,resource_subtype,enum_options.name,enum_options.gid"},
    ).json()["data"]
    by_name = {f["name"]: f for f in fields}
    assert by_name["Handoff deal"]["resource_subtype"] == "text"
    tier = by_name["Deal tier"]
    gold = next(o["gid"] for o in tier["enum_options"] if o["name"] == "Gold")
    gid = az.state.add_project("Custom field target")
    stamp, amount = az.ids["deal_field"], az.ids["amount_field"]
    # A value for a field that is not on the project is refused.
    refused = http.put(f"/projects/{gid}", json={"data": {"custom_fields": {stamp: "deal-9"}}})
    assert refused.status_code == 400 and "not on given object" in refused.text
    for cf in (stamp, amount, tier["gid"]):
        added = http.post(
            f"/projects/{gid}/addCustomFieldSetting", json={"data": {"custom_field": cf}}
        )
        assert added.status_code == 200
        assert added.json()["data"]["custom_field"]["gid"] == cf
    again = http.post(
        f"/projects/{gid}/addCustomFieldSetting", json={"data": {"custom_field": stamp}}
    )
    assert again.status_code == 400
    settings = http.get(
        f"/projects/{gid}/custom_field_settings", params={"opt_fields": "custom_field.gid"}
    ).json()["data"]
    assert [s["custom_field"]["gid"] for s in settings] == [stamp, amount, tier["gid"]]
    before = az.state.project(gid)["modified_at"]
    time.sleep(0.01)
    response = http.put(
        f"/projects/{gid}",
        params={
            "opt_fields": "name,permalink_url,custom_fields.text_value,custom_fields.display_value"
        },
        json={"data": {"custom_fields": {stamp: "deal-9", amount: 1234.5, tier["gid"]: gold}}},
    )
    assert response.status_code == 200
    values = [cf.get("display_value") for cf in response.json()["data"]["custom_fields"]]
    assert values == ["deal-9", "1234.50", "Gold"]
    assert az.state.project(gid)["modified_at"] > before
    bad = http.put(f"/projects/{gid}", json={"data": {"custom_fields": {tier["gid"]: "123"}}})
    assert bad.status_code == 400
    created = http.post(
        "/custom_fields",
        json={
            "data": {
                "workspace": ws,
                "name": "Region",
                "resource_subtype": "enum",
                "enum_options": [{"name": "EMEA"}, {"name": "AMER"}],
            }
        },
    )
    assert created.status_code == 201
    cf = http.get(f"/custom_fields/{created.json()['data']['gid']}").json()["data"]
    assert [o["name"] for o in cf["enum_options"]] == ["EMEA", "AMER"]


# ---- tasks: completion, modified_at, filters -------------------------------------------------


def test_completing_a_task_sets_completed_at_and_modified_at(
    client: asana.ApiClient, az: Env
) -> None:
    gid = az.state.add_project("Completion")
    tasks_api = asana.TasksApi(client)
    task = tasks_api.create_task(
        {"data": {"name": "Go-live", "resource_subtype": "milestone", "projects": [gid]}}, {}
    )
    assert task["completed"] is False and task["completed_at"] is None
    time.sleep(0.01)
    done = tasks_api.update_task({"data": {"completed": True}}, task["gid"], {})
    assert done["completed"] is True and done["completed_at"] is not None
    assert done["modified_at"] > task["modified_at"]
    assert done["completed_by"]["gid"] == az.ids["me"]
    # Moving the task to another section does not change modified_at (TaskBase docs).
    section = az.state.sections_in_project(gid)[0]["gid"]
    other = asana.SectionsApi(client).create_section_for_project(
        gid, {"body": {"data": {"name": "Later"}}}
    )
    asana.SectionsApi(client).add_task_for_section(
        other["gid"], {"body": {"data": {"task": task["gid"]}}}
    )
    moved = tasks_api.get_task(task["gid"], {"opt_fields": "modified_at,memberships.section.name"})
    assert moved["modified_at"] == done["modified_at"]
    assert moved["memberships"][0]["section"]["name"] == "Later"
    assert section != other["gid"]
    # A comment creates a story, and that does change modified_at.
    time.sleep(0.01)
    story = asana.StoriesApi(client).create_story_for_task(
        {"data": {"text": "Customer signed off"}}, task["gid"], {}
    )
    assert story["type"] == "comment" and story["text"] == "Customer signed off"
    after = tasks_api.get_task(task["gid"], {"opt_fields": "modified_at"})
    assert after["modified_at"] > done["modified_at"]
    reopened = tasks_api.update_task({"data": {"completed": False}}, task["gid"], {})
    assert reopened["completed_at"] is None
    az.state.complete_task(task["gid"])
    assert az.state.task(task["gid"])["completed"] is True


def test_modified_since_and_completed_since(http: httpx.Client, az: Env) -> None:
    gid = az.state.add_project("Filters")
    az.state.clock_offset = -timedelta(days=10)
    old = az.state.add_task(gid, "Old", completed=True)
    old_open = az.state.add_task(gid, "Old open")
    az.state.clock_offset = timedelta(0)
    fresh = az.state.add_task(gid, "Fresh", resource_subtype="milestone")
    since = (az.state.now() - timedelta(days=1)).isoformat()
    modified = http.get("/tasks", params={"project": gid, "modified_since": since}).json()
    assert [t["gid"] for t in modified["data"]] == [fresh]
    az.state.complete_task(old_open)
    modified = http.get("/tasks", params={"project": gid, "modified_since": since}).json()
    assert {t["gid"] for t in modified["data"]} == {fresh, old_open}
    open_now = http.get(f"/projects/{gid}/tasks", params={"completed_since": "now"}).json()
    assert [t["gid"] for t in open_now["data"]] == [fresh]
    recent = http.get("/tasks", params={"project": gid, "completed_since": since}).json()
    assert {t["gid"] for t in recent["data"]} == {fresh, old_open}
    assert old not in {t["gid"] for t in recent["data"]}
    assert http.get("/tasks").status_code == 400
    assert http.get("/tasks", params={"workspace": az.ids["workspace"]}).status_code == 400


# ---- search ----------------------------------------------------------------------------------


def test_search_needs_a_premium_workspace(http: httpx.Client, az: Env) -> None:
    az.state.premium = False
    response = http.get(f"/workspaces/{az.ids['workspace']}/tasks/search")
    assert response.status_code == 402
    assert response.json()["errors"][0]["message"]


def test_search_filters_no_pagination_and_100_cap(client: asana.ApiClient, az: Env) -> None:
    gid = az.state.add_project("Search bulk")
    az.state.clock_offset = -timedelta(hours=2)
    for i in range(130):
        az.state.add_task(
            gid, f"Bulk {i}", resource_subtype="milestone" if i % 2 else "default_task"
        )
    az.state.clock_offset = timedelta(0)
    ws = az.ids["workspace"]
    http = httpx.Client(base_url=az.base, headers={"Authorization": f"Bearer {TOKEN}"})
    body = http.get(f"/workspaces/{ws}/tasks/search", params={"projects.any": gid}).json()
    assert len(body["data"]) == 100 and "next_page" not in body
    assert (
        http.get(
            f"/workspaces/{ws}/tasks/search", params={"projects.any": gid, "limit": 101}
        ).status_code
        == 400
    )
    milestones = http.get(
        f"/workspaces/{ws}/tasks/search",
        params={"projects.any": gid, "resource_subtype": "milestone", "limit": 100},
    ).json()["data"]
    assert len(milestones) == 65 and all(t["resource_subtype"] == "milestone" for t in milestones)
    # The official client's generator stops after one call: there is no next_page.
    results = list(
        asana.TasksApi(client).search_tasks_for_workspace(
            ws, {"projects.any": gid, "opt_fields": "name,modified_at"}
        )
    )
    assert len(results) == 100
    first = results[0]["gid"]
    time.sleep(0.01)
    az.state.complete_task(first)
    after = (az.state.now() - timedelta(minutes=5)).isoformat()
    ordered = http.get(
        f"/workspaces/{ws}/tasks/search",
        params={
            "projects.any": gid,
            "modified_at.after": after,
            "completed": "true",
            "sort_by": "modified_at",
            "sort_ascending": "true",
            "opt_fields": "name,modified_at,completed",
        },
    ).json()["data"]
    assert [t["gid"] for t in ordered] == [first]
    # The index lags writes: a fresh change is invisible until search_lag has passed.
    az.state.search_lag = timedelta(seconds=30)
    second = results[1]["gid"]
    az.state.complete_task(second)
    params = {"projects.any": gid, "completed": "true"}
    lagging = http.get(f"/workspaces/{ws}/tasks/search", params=params).json()["data"]
    assert lagging == []  # neither completion is indexed yet
    az.state.clock_offset = timedelta(seconds=31)
    indexed = http.get(f"/workspaces/{ws}/tasks/search", params=params).json()["data"]
    assert {t["gid"] for t in indexed} == {first, second}
    http.close()


# ---- comments, status updates, events --------------------------------------------------------


def test_status_update_on_a_project(client: asana.ApiClient, az: Env) -> None:
    gid = az.state.add_project("Status target")
    before = az.state.project(gid)["modified_at"]
    update = asana.StatusUpdatesApi(client).create_status_for_object(
        {
            "data": {
                "parent": gid,
                "status_type": "off_track",
                "title": "Deal no longer won",
                "text": "The CRM deal moved back to negotiation.",
            }
        },
        {},
    )
    assert update["resource_subtype"] == "project_status_update"
    assert update["parent"]["gid"] == gid and update["status_type"] == "off_track"
    project = az.state.project(gid)
    assert project["current_status_update"]["gid"] == update["gid"]
    assert project["modified_at"] == before  # associations do not touch modified_at
    with pytest.raises(ApiException) as err:
        asana.StatusUpdatesApi(client).create_status_for_object(
            {"data": {"parent": gid, "status_type": "meh", "text": "x"}}, {}
        )
    assert err.value.status == 400


def test_events_need_a_sync_token(http: httpx.Client, az: Env) -> None:
    gid = az.state.add_project("Events")
    first = http.get("/events", params={"resource": gid})
    assert first.status_code == 412 and first.json()["sync"]
    sync = first.json()["sync"]
    task = az.state.add_task(gid, "Watched")
    az.state.complete_task(task)
    events = http.get("/events", params={"resource": gid, "sync": sync}).json()
    actions = [(e["resource"]["gid"], e["action"]) for e in events["data"]]
    assert (task, "added") in actions and (task, "changed") in actions
    assert events["has_more"] is False
    quiet = http.get("/events", params={"resource": gid, "sync": events["sync"]}).json()
    assert quiet["data"] == []
    assert http.get("/events", params={"resource": gid, "sync": "stale"}).status_code == 412


# ---- edge: rate limits, faults, stats --------------------------------------------------------


def test_sliding_window_counts_rejected_requests() -> None:
    window = _AsanaQuota("w", 3, 60.0)
    assert [window.take(t) for t in (0.0, 1.0, 2.0)] == [True, True, True]
    assert window.take(3.0) is False
    # At 60.5 the first hit has left the window, but the rejected one at 3.0 still counts.
    assert window.take(60.5) is False
    assert window.reset_in(60.5) == pytest.approx(2.0 + 60.0 - 60.5)


def test_standard_rate_limit_429_with_retry_after(http: httpx.Client, az: Env) -> None:
    az.state.premium = False
    az.controls.set_rate_limits(True, multiplier=4 / 150)  # the free 150/min, scaled to 4
    statuses = [http.get("/users/me").status_code for _ in range(6)]
    assert statuses == [200] * 4 + [429] * 2
    response = http.get("/users/me")
    assert response.status_code == 429
    assert 1 <= int(response.headers["Retry-After"]) <= 60
    assert response.json() == {
        "errors": [
            {
                "message": "You've made too many requests and hit a rate limit. "
                "Please retry after the given amount of time."
            }
        ]
    }
    assert not any(h.lower().startswith("x-ratelimit") for h in response.headers)
    # Tokens have independent limits; the paid plan allows ten times more.
    other = http.get("/users/me", headers={"Authorization": f"Bearer {OTHER_TOKEN}"})
    assert other.status_code == 200
    az.state.premium = True
    assert http.get("/users/me").status_code == 200


def test_search_has_its_own_limit(http: httpx.Client, az: Env) -> None:
    az.controls.set_rate_limits(True, multiplier=3 / 60)  # search 60/min -> 3, paid 1500 -> 75
    url = f"/workspaces/{az.ids['workspace']}/tasks/search"
    statuses = [http.get(url, params={"limit": 1}).status_code for _ in range(4)]
    assert statuses == [200, 200, 200, 429]
    assert http.get("/users/me").status_code == 200


def test_injected_5xx_has_the_asana_error_body(http: httpx.Client, az: Env) -> None:
    az.controls.set_faults(rate_5xx=1.0, seed=3)
    for _ in range(6):
        response = http.get("/users/me")
        assert response.status_code in (500, 502, 503)
        error = response.json()["errors"][0]
        assert error["message"]
        if response.status_code == 500:
            assert len(error["phrase"].split()) == 5


def test_sandbox_stats_count_by_route(http: httpx.Client, az: Env) -> None:
    az.controls.reset_stats()
    http.get("/users/me")
    http.get(f"/projects/{az.ids['template']}")  # wrong type: 404, still counted
    http.put(f"/tasks/{az.state.add_task(az.state.add_project('S'), 'x')}", json={"data": {}})
    stats = http.get(az.server.base_url + "/_sandbox/stats").json()
    assert stats["by_route"] == {
        "GET /users/me": 1,
        "GET /projects/{project_gid}": 1,
        "PUT /tasks/{task_gid}": 1,
    }
    assert stats["reads"] == 2 and stats["writes"] == 1


# ---- OpenAPI validation (keep last: it also checks what the tests above recorded) ---------------


def _spec_path() -> Path:
    configured = os.environ.get("HANDOFF_ASANA_SPEC")
    if configured:
        return Path(configured)
    repo_root = Path(__file__).resolve().parents[2]
    return repo_root.parent / "shared" / "vendor" / "asana" / "asana_oas.yaml"


class SpecChecker:
    """Response schemas of Asana's spec, made strict: every object schema that lists its
    properties rejects properties it does not list (after merging `allOf`), so the emulator
    cannot invent fields. Validation uses OpenAPI 3.0 semantics (`nullable`, formats)."""

    def __init__(self, spec: dict[str, Any]) -> None:
        from openapi_schema_validator import OAS30Validator, oas30_format_checker
        from referencing import Registry, Resource
        from referencing.jsonschema import DRAFT4

        self.spec = spec
        self.raw = dict(spec["components"]["schemas"])
        # Known spec gap: JobCompact.new_project_template is not marked nullable, yet a job
        # that makes a project has no new template; Asana answers null there (as it does
        # for new_task, which the spec does mark nullable), and so do we.
        job = copy.deepcopy(self.raw["JobCompact"])
        job["properties"]["new_project_template"] = {
            "allOf": [
                {"$ref": "#/components/schemas/ProjectTemplateCompact"},
                {"type": "object", "nullable": True},
            ]
        }
        self.raw["JobCompact"] = job
        self._flat: dict[str, Any] = {}
        for name in self.raw:
            self._flat_component(name)
        self.root = {"components": {"schemas": self._flat}}
        resource = Resource(contents=self.root, specification=DRAFT4)
        self.registry = Registry().with_resource("urn:asana-spec", resource)
        self.validator_cls = OAS30Validator
        self.format_checker = oas30_format_checker

    def _flat_component(self, name: str) -> dict[str, Any]:
        if name not in self._flat:
            self._flat[name] = {}  # placeholder against cycles
            raw = self.raw[name]
            while "$ref" in raw:  # `JobBase: {$ref: JobCompact}` is an alias
                raw = self.raw[raw["$ref"].split("/")[-1]]
            self._flat[name].update(self._flatten(raw))
        return self._flat[name]

    def _flatten(self, node: Any) -> Any:
        if not isinstance(node, dict):
            return node
        if "$ref" in node:
            return {"$ref": "urn:asana-spec#" + node["$ref"].removeprefix("#")}
        out = {k: v for k, v in node.items() if k not in ("allOf", "properties", "items")}
        properties: dict[str, Any] = {}
        if "allOf" in node:
            for part in node["allOf"]:
                if "$ref" in part:
                    merged = self._flat_component(part["$ref"].split("/")[-1])
                else:
                    merged = self._flatten(part)
                properties.update(merged.get("properties", {}))
                for key in ("nullable", "type", "description"):
                    if key in merged and key not in out:
                        out[key] = merged[key]
                if merged.get("nullable"):
                    out["nullable"] = True
        for key, value in node.get("properties", {}).items():
            properties[key] = self._flatten(value)
        if properties:
            out["properties"] = properties
            out.setdefault("type", "object")
            out.setdefault("additionalProperties", False)
        if "items" in node:
            out["items"] = self._flatten(node["items"])
        return out

    def schema_for(
        self, template: str, method: str, status: int, opt_fields: bool = False
    ) -> dict[str, Any]:
        operation = self.spec["paths"].get(template, {}).get(method.lower())
        if operation is None:
            raise AssertionError(f"{method} {template} is not in Asana's spec")
        response = operation["responses"].get(status) or operation["responses"].get(str(status))
        if response is None and status >= 400:
            # Some documented statuses (402 from search, 429 from every endpoint, 422 from
            # strict instantiation) are missing per operation; they share ErrorResponse.
            return {"$ref": "urn:asana-spec#/components/schemas/ErrorResponse"}
        if response is None:
            raise AssertionError(f"{method} {template} documents no {status} response")
        if "$ref" in response:
            response = self.spec["components"]["responses"][response["$ref"].split("/")[-1]]
        schema = self._flatten(response["content"]["application/json"]["schema"])
        data = schema.get("properties", {}).get("data", {})
        target = data.get("items", data)
        ref = target.get("$ref", "")
        if opt_fields and ref.endswith("Compact"):
            # opt_fields may ask a list for any field of the full record: check list items
            # against the resource's full (`*Response`) schema instead.
            full = ref.removesuffix("Compact") + "Response"
            if full.split("/")[-1] in self.raw:
                target["$ref"] = full
        return schema

    def errors(self, rec: Recorded, template: str) -> list[str]:
        opt_fields = "opt_fields" in urllib.parse.parse_qs(rec.query)
        schema = self.schema_for(template, rec.method, rec.status, opt_fields)
        body = json.loads(rec.body)
        validator = self.validator_cls(
            schema, registry=self.registry, format_checker=self.format_checker
        )
        return [
            f"{'/'.join(map(str, e.absolute_path))}: {e.message[:200]}"
            for e in validator.iter_errors(body)
        ]


@pytest.fixture(scope="session")
def spec_checker() -> SpecChecker:
    path = _spec_path()
    if not path.is_file():
        pytest.skip(f"Asana OpenAPI spec not found at {path}; set HANDOFF_ASANA_SPEC")
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    with path.open("rb") as fh:
        spec = yaml.load(fh, Loader=loader)
    return SpecChecker(spec)


def _template(method: str, path: str) -> str:
    from starlette.routing import Match

    scope = {"type": "http", "method": method, "path": path, "root_path": ""}
    for route in ROUTES:
        if route.matches(scope)[0] == Match.FULL:
            template = route.path.removeprefix(BASE_PATH)
            return "/users/{user_gid}" if template == "/users/me" else template
    raise AssertionError(f"no route for {method} {path}")


def _tour(az: Env) -> None:
    """One call to every endpoint (plus the documented error statuses)."""
    h = {"Authorization": f"Bearer {TOKEN}"}
    ws, team, template = az.ids["workspace"], az.ids["team"], az.ids["template"]
    with httpx.Client(base_url=az.base, headers=h) as http:
        me = http.get("/users/me").json()["data"]["gid"]
        http.get(f"/users/{me}")
        http.get("/users", params={"workspace": ws, "limit": 2})
        http.get("/workspaces")
        http.get(f"/workspaces/{ws}")
        http.get(f"/workspaces/{ws}/teams")
        http.get(f"/teams/{team}")
        http.get(f"/teams/{team}/projects", params={"limit": 3})
        http.get("/projects", params={"workspace": ws, "limit": 3, "opt_fields": "name,owner"})
        project = http.post(
            "/projects",
            json={"data": {"name": "Tour", "team": team, "due_on": "2025-09-01"}},
        ).json()["data"]["gid"]
        http.get(f"/projects/{project}")
        http.put(f"/projects/{project}", json={"data": {"notes": "n"}})
        http.post(
            f"/projects/{project}/addCustomFieldSetting",
            json={"data": {"custom_field": az.ids["tier_field"]}},
        )
        http.get(f"/projects/{project}/custom_field_settings")
        section = http.post(f"/projects/{project}/sections", json={"data": {"name": "S"}})
        section_gid = section.json()["data"]["gid"]
        http.get(f"/projects/{project}/sections")
        http.get(f"/sections/{section_gid}")
        task = http.post(
            "/tasks",
            json={
                "data": {
                    "name": "T",
                    "resource_subtype": "milestone",
                    "projects": [project],
                    "due_on": "2025-08-01",
                    "assignee": "me",
                }
            },
        ).json()["data"]["gid"]
        http.post(f"/sections/{section_gid}/addTask", json={"data": {"task": task}})
        http.get(f"/sections/{section_gid}/tasks")
        http.get(f"/tasks/{task}", params={"opt_fields": "html_notes,custom_fields,dependencies"})
        tier = az.ids["tier_field"]
        option = http.get(f"/custom_fields/{tier}").json()["data"]["enum_options"][0]["gid"]
        http.put(
            f"/tasks/{task}", json={"data": {"completed": True, "custom_fields": {tier: option}}}
        )
        http.get("/tasks", params={"project": project})
        http.get("/tasks", params={"assignee": "me", "workspace": ws})
        http.get(f"/projects/{project}/tasks", params={"opt_fields": "memberships.section.name"})
        http.get(f"/workspaces/{ws}/tasks/search", params={"resource_subtype": "milestone"})
        http.post(f"/tasks/{task}/stories", json={"data": {"text": "hi"}})
        http.get(f"/tasks/{task}/stories")
        http.post(
            "/status_updates",
            json={"data": {"parent": project, "status_type": "on_track", "text": "ok"}},
        )
        http.get("/status_updates", params={"parent": project})
        http.get(f"/workspaces/{ws}/custom_fields")
        http.post(
            "/custom_fields",
            json={"data": {"workspace": ws, "name": "Tour field", "resource_subtype": "number"}},
        )
        http.get("/project_templates", params={"workspace": ws})
        http.get(f"/project_templates/{template}")
        job = http.post(
            f"/project_templates/{template}/instantiateProject", json={"data": {"name": "J"}}
        ).json()["data"]["gid"]
        http.get(f"/jobs/{job}")
        sync = http.get("/events", params={"resource": project}).json()["sync"]
        http.put(f"/projects/{project}", json={"data": {"name": "Tour 2"}})
        http.get("/events", params={"resource": project, "sync": sync})
        # Errors.
        http.get("/projects/12345")
        http.get("/projects", params={"limit": 1000})
        http.get("/users/me", headers={"Authorization": "Bearer bad"})
        az.state.premium = False
        http.get(f"/workspaces/{ws}/tasks/search")
        az.state.premium = True


def test_every_response_matches_asanas_openapi_spec(spec_checker: SpecChecker, az: Env) -> None:
    started = time.monotonic()
    _tour(az)
    az.controls.set_faults(rate_5xx=1.0)
    httpx.get(az.base + "/users/me", headers={"Authorization": f"Bearer {TOKEN}"})
    az.controls.set_faults()
    problems: list[str] = []
    covered: set[tuple[str, str]] = set()
    for rec in az.recorder.seen:
        template = _template(rec.method, rec.path)
        if rec.status < 300:
            covered.add((rec.method, template))
        for problem in spec_checker.errors(rec, template):
            problems.append(f"{rec.method} {rec.path} -> {rec.status}: {problem}")
    assert not problems, "\n".join(problems[:30])
    every = {
        (m, _template(m, r.path.replace("{", "1").replace("}", "")))
        for r in ROUTES
        for m in r.methods or ()
        if m != "HEAD"
    }
    assert every <= covered, f"never exercised: {sorted(every - covered)}"
    statuses = {r.status for r in az.recorder.seen}
    assert {200, 201, 400, 401, 402, 404, 412} <= statuses
    assert time.monotonic() - started < 30
