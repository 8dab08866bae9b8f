"""The Asana connector against the Asana emulator over real sockets: what a templated
create costs, and that the stamp is on the project whatever else Asana refuses."""

from __future__ import annotations

import random
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

import pytest

from connectors.asana import AsanaAuth, AsanaProjects, AsanaSettings
from connectors.base import DealStamp, ProjectSpec
from connectors.errors import ConnectorError, ErrorKind
from connectors.http import RetryPolicy
from sandbox.asana import TEMPLATE_NAME, AsanaState, create_app
from sandbox.common import EmulatorControls
from sandbox.serve import LoopbackServer

TOKEN = "2/connector-test/0001"
INSTANTIATE = "POST /project_templates/{project_template_gid}/instantiateProject"
FAST = RetryPolicy(attempts=3, initial_wait=0.01, max_wait=0.05, max_retry_after=0.2)


@pytest.fixture()
def env() -> Iterator[tuple[AsanaState, EmulatorControls, LoopbackServer]]:
    state = AsanaState(tokens={TOKEN}, premium=True, job_seconds=0.01)
    state.seed(random.Random(5))
    controls = EmulatorControls()
    server = LoopbackServer(create_app(state, controls)).start()
    yield state, controls, server
    server.stop()


def connector(server: LoopbackServer) -> AsanaProjects:
    return AsanaProjects(
        "asana",
        AsanaSettings(
            kind="asana",
            base_url=server.base_url + "/api/1.0",
            auth=AsanaAuth(token=TOKEN),
            workspace="Acme Delivery",
            team="Delivery",
            retry=FAST,
            job_poll_seconds=0.01,
        ),
    )


def spec(name: str, **custom: Any) -> ProjectSpec:
    return ProjectSpec(
        name=name,
        template=TEMPLATE_NAME,
        fields={"notes": "from the deal"},
        custom_fields={"Deal amount": 1200.5, "Deal tier": "Gold", **custom},
    )


def values(state: AsanaState, gid: str) -> dict[str, Any]:
    project = state.project(gid)
    return {cf["name"]: cf.get("display_value") for cf in project["custom_fields"]}


def test_templated_projects_are_stamped_and_filled_in_one_write(env: Any) -> None:
    state, controls, server = env
    asana = connector(server)
    asana.custom_fields()  # the per-connection look-ups, made once
    asana._template_gid(TEMPLATE_NAME)
    controls.reset_stats()

    first = asana.create_project(spec("Globex rollout"), DealStamp("hubspot", "101"))
    second = asana.create_project(spec("Initech rollout"), DealStamp("hubspot", "102"))

    routes = controls.stats.by_route
    assert routes["POST /project_templates/{project_template_gid}/instantiateProject"] == 2
    assert routes["PUT /projects/{project_gid}"] == 2  # one write per project
    # The template's fields are read from the first project only.
    assert routes["GET /projects/{project_gid}/custom_field_settings"] == 1
    for ref, deal in ((first, "101"), (second, "102")):
        got = values(state, ref.id)
        assert got["Handoff deal"] == f"handoff:hubspot:{deal}"
        assert got["Deal tier"] == "Gold"
        assert state.project(ref.id)["notes"] == "from the deal"
    assert asana.find_project(DealStamp("hubspot", "102")).id == second.id


def test_a_refused_value_still_leaves_the_project_stamped(env: Any) -> None:
    state, controls, server = env
    asana = connector(server)
    stamp = DealStamp("hubspot", "103")

    with pytest.raises(ConnectorError) as caught:
        # Not a number: Asana refuses the write (the connector passes numbers through).
        asana.create_project(spec("Umbrella rollout", **{"Deal amount": "lots"}), stamp)

    assert caught.value.kind is ErrorKind.RECORD
    made = caught.value.project  # type: ignore[attr-defined]
    assert values(state, made.id)["Handoff deal"] == stamp.marker
    assert connector(server).find_project(stamp).id == made.id


def test_a_bad_enum_option_is_refused_before_anything_exists(env: Any) -> None:
    state, controls, server = env
    asana = connector(server)
    before = len(state.projects())
    with pytest.raises(ConnectorError, match="not an option"):
        asana.create_project(spec("Hooli rollout", **{"Deal tier": "Tin"}), DealStamp("x", "1"))
    assert len(state.projects()) == before


def test_creates_on_many_threads_keep_within_asanas_five_running_jobs(env: Any) -> None:
    """Asana runs at most five instantiation jobs per token and refuses a sixth with a 429
    (Retry-After in whole seconds): creates on more threads than that wait for a slot."""
    state, controls, server = env
    state.job_seconds = 0.15  # long enough for twelve threads to overlap
    asana = connector(server)
    asana.custom_fields()
    asana._template_gid(TEMPLATE_NAME)
    controls.reset_stats()

    with ThreadPoolExecutor(12) as pool:
        refs = list(
            pool.map(
                lambda i: asana.create_project(spec(f"Rollout {i}"), DealStamp("hubspot", str(i))),
                range(24),
            )
        )

    assert len({r.id for r in refs}) == 24
    assert controls.stats.throttled == 0, controls.stats.by_route
    assert controls.stats.by_route[INSTANTIATE] == 24
    assert state.running_jobs(TOKEN) == 0


def test_the_emulator_counts_a_refused_sixth_job_as_throttled(env: Any) -> None:
    state, controls, server = env
    state.job_seconds = 5.0
    asana = connector(server)
    template = asana._template_gid(TEMPLATE_NAME)
    team = asana.team_gid
    controls.reset_stats()
    body = {"data": {"name": "x", "team": team}}
    for _ in range(5):
        asana.api.client.post(f"/project_templates/{template}/instantiateProject", json=body)
    refused = asana.api.client.post(f"/project_templates/{template}/instantiateProject", json=body)

    assert refused.status_code == 429
    assert int(refused.headers["Retry-After"]) >= 1
    assert controls.stats.throttled == 1
    assert controls.stats.by_route[INSTANTIATE] == 5
    assert controls.stats.by_route[f"429 {INSTANTIATE}"] == 1
    assert controls.stats.writes == 5  # the refusal is a 429, not a write


def _read(asana: AsanaProjects, since: Any, projects: list[str], **kw: Any) -> list:
    return [m for page in asana.read_milestone_changes(since, projects, **kw) for m in page]


def test_a_settled_read_stops_where_the_next_read_begins(env: Any) -> None:
    """A settled read (a back-flow pass during a long forward run) reads only changes made
    before its bound on Asana's clock, through a lagging search index; the next read, from
    that bound, reads the rest: each change once, none skipped."""
    state, controls, server = env
    state.search_lag = timedelta(seconds=30)
    asana = connector(server)
    start = state.now()
    assert asana.server_now() is None  # no answer from Asana yet

    old = asana.create_project(spec("Old rollout"), DealStamp("hubspot", "201"))
    state.clock_offset += timedelta(minutes=10)
    old_ms = sorted(m.id for m in _read(asana, start, [old.id]) if m.project_id == old.id)
    assert len(old_ms) == 4
    young = asana.create_project(spec("Young rollout"), DealStamp("hubspot", "202"))
    state.complete_task(old_ms[0])  # an old milestone changed now: its new version is young

    now, clock = asana.server_now(), state.now()
    assert clock - timedelta(seconds=2) <= now <= clock  # Asana's clock, not ours
    bound = now - timedelta(minutes=5)
    settled = _read(asana, start, [old.id, young.id], settled_before=bound)
    # old_ms[0] still matches in the lagging index but comes back as it is now, changed
    # too recently: left to the next read.
    assert sorted(m.id for m in settled) == old_ms[1:]

    state.clock_offset += timedelta(minutes=1)  # the index catches up
    rest = _read(asana, bound, [old.id, young.id])
    mine = [m for m in rest if m.project_id in (old.id, young.id)]
    assert sorted(m.project_id for m in mine) == sorted([old.id] + [young.id] * 4)
    assert next(m for m in mine if m.project_id == old.id).completed


def test_without_search_a_settled_read_reads_nothing(env: Any) -> None:
    """Without search (a free workspace) the change read is one read per linked project:
    a settled pass would cost that every minute, so it reads nothing."""
    state, controls, server = env
    state.premium = False
    asana = connector(server)
    made = asana.create_project(spec("Free rollout"), DealStamp("hubspot", "301"))
    controls.reset_stats()
    assert _read(asana, None, [made.id], settled_before=asana.server_now()) == []
    assert sum(controls.stats.by_route.values()) == 1  # the search, refused with a 402
    assert len(_read(asana, None, [made.id])) == 4  # an ordinary read falls back
