"""A 1,000-project write-back, counted at the CRM emulators: HubSpot batch updates of 100
(at most 10 calls), Salesforce sObject Collections of 200 (at most 5 calls)."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from connectors.base import DealStamp, MilestoneSpec, ProjectSpec
from connectors.http import RetryPolicy
from connectors.memory import MemoryProjects
from sandbox.serve import LoopbackServer, TLSFiles
from state.store import StateStore
from sync.back import BackSync

MAP = """
version: 1
project:
  name: "{{ deal.id }}"
progress:
  {pct}: {{source: percent, type: number}}
  {status}: {{source: status}}
"""
FAST = RetryPolicy(attempts=4, initial_wait=0.01, max_wait=0.05, max_retry_after=0.05)
N = 1000


def link_projects(store: StateStore, tool: MemoryProjects, crm_kind: str, deal_ids: list[str]):
    """1,000 linked projects with two milestones each, one of them completed."""
    now = datetime.now(UTC)
    for deal_id in deal_ids:
        spec = ProjectSpec(name=deal_id, milestones=[MilestoneSpec("Kickoff"), MilestoneSpec("Go")])
        ref = tool.create_project(spec, DealStamp(crm_kind, deal_id))
        store.claim("p", deal_id)
        link = store.link("p", deal_id)
        link.state, link.project_id = "created", ref.id
        store.save_link(link)
    for m in list(tool.milestones.values())[::2]:
        tool.complete_milestone(m.id, now + timedelta(seconds=1))


def stats(server: LoopbackServer, verify: object = True) -> dict:
    return httpx.get(server.base_url + "/_sandbox/stats", verify=verify).json()["by_route"]


def test_hubspot_thousand_project_write_back_takes_ten_batch_calls(write_map, store):
    from connectors.hubspot import HubSpotAuth, HubSpotCRM, HubSpotSettings
    from sandbox.hubspot import HubSpotState, create_app

    state = HubSpotState(tokens={"pat-na1-batch"})
    for name, kind in (("delivery_progress", "number"), ("delivery_status", "string")):
        state.deal_properties[name] = {
            **state.deal_properties["description"],
            "name": name,
            "type": kind,
        }
    ids = [state.add_deal({"dealname": f"D{i}"}) for i in range(N)]
    server = LoopbackServer(create_app(state)).start()
    try:
        crm = HubSpotCRM(
            "hs",
            HubSpotSettings(
                kind="hubspot",
                base_url=server.base_url,
                auth=HubSpotAuth(token="pat-na1-batch"),
                retry=FAST,
                requests_per_10s=100_000,
            ),
        )
        tool = MemoryProjects()
        link_projects(store, tool, crm.kind, ids)
        fmap = write_map(MAP.format(pct="delivery_progress", status="delivery_status"))
        counts = BackSync(
            "p", crm, tool, fmap, store, timedelta(minutes=5), batch_size=crm.write_batch_size
        ).run()
        assert counts.updated == N and counts.dead_lettered == 0
        calls = stats(server)
        assert calls["POST /crm/v3/objects/deals/batch/update"] <= 10
        assert state.deal(ids[0])["properties"]["delivery_progress"] == "50.0"
        print(f"milestone reads (project tool): {tool.calls['milestones']}")
    finally:
        server.stop()


def test_salesforce_thousand_project_write_back_takes_five_collection_calls(
    write_map, store, tmp_path
):
    from connectors.salesforce import SalesforceAuth, SalesforceCRM, SalesforceSettings
    from sandbox.salesforce import (
        DEFAULT_CLIENT_ID,
        DEFAULT_CLIENT_SECRET,
        DEFAULT_USERNAME,
        SalesforceState,
        create_app,
    )

    state = SalesforceState()
    state.add_custom_field("Opportunity", "Delivery_Progress__c", "percent")
    state.add_custom_field("Opportunity", "Delivery_Status__c", "text")
    ids = state.seed(N, random.Random(3))
    tls = TLSFiles.create(str(tmp_path))
    server = LoopbackServer(create_app(state), tls=tls).start()
    try:
        refresh = state.issue_refresh_token(DEFAULT_CLIENT_ID, DEFAULT_USERNAME)
        crm = SalesforceCRM(
            "sf",
            SalesforceSettings(
                kind="salesforce",
                login_url=server.base_url,
                ca_bundle=tls.ca_pem,
                retry=FAST,
                auth=SalesforceAuth(
                    client_id=DEFAULT_CLIENT_ID,
                    client_secret=DEFAULT_CLIENT_SECRET,
                    refresh_token=refresh,
                ),
            ),
        )
        tool = MemoryProjects()
        link_projects(store, tool, crm.kind, ids)
        fmap = write_map(MAP.format(pct="Delivery_Progress__c", status="Delivery_Status__c"))
        counts = BackSync(
            "p", crm, tool, fmap, store, timedelta(minutes=5), batch_size=crm.write_batch_size
        ).run()
        assert counts.updated == N and counts.dead_lettered == 0
        calls = stats(server, tls.ca_pem)
        patches = sum(
            n
            for route, n in calls.items()
            if route.startswith("PATCH") and "composite/sobjects" in route
        )
        assert patches <= 5, calls
        assert state.opportunity(ids[0])["Delivery_Status__c"] == "in_progress"
    finally:
        server.stop()


@pytest.fixture
def store(tmp_path):
    s = StateStore(f"sqlite:///{tmp_path / 'b.db'}")
    yield s
    s.close()
