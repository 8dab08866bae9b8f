"""The Asana connector against the Asana emulator over real sockets: what a templated
create costs, and that the stamp is on the project whatever else Asana refuses."""

from __future__ import annotations

import random
from collections.abc import Iterator
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
