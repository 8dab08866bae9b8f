"""The HubSpot connector against the HubSpot emulator over real sockets."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from connectors.base import DealStatus, DealUpdate
from connectors.errors import ConnectorError
from connectors.http import RetryPolicy
from connectors.hubspot import HubSpotAuth, HubSpotCRM, HubSpotSettings
from sandbox.hubspot import ENTERPRISE_PIPELINE_ID, HubSpotState, create_app
from sandbox.serve import LoopbackServer

TOKEN = "pat-na1-connector-test"
FAST = RetryPolicy(attempts=8, initial_wait=0.01, max_wait=0.05, max_retry_after=0.05)


@pytest.fixture
def hubspot() -> Iterator[tuple[HubSpotState, LoopbackServer]]:
    state = HubSpotState(tokens={TOKEN})
    server = LoopbackServer(create_app(state)).start()
    yield state, server
    server.stop()


def connector(server: LoopbackServer, **kw) -> HubSpotCRM:
    settings = HubSpotSettings(
        kind="hubspot",
        base_url=server.base_url,
        auth=HubSpotAuth(token=TOKEN),
        retry=FAST,
        search_per_second=1000,
        requests_per_10s=10000,
        **kw,
    )
    return HubSpotCRM("hubspot", settings)


def read_all(crm: HubSpotCRM, since=None) -> list:
    return [d for page in crm.read_changed_deals(since, ["dealname"]) for d in page]


def test_reads_every_deal_once_across_pages(hubspot):
    state, server = hubspot
    ids = state.seed(450, random.Random(3))
    deals = read_all(connector(server))
    assert Counter(d.id for d in deals) == Counter(ids)


def test_a_deal_edited_while_the_read_pages_through_costs_no_other_deal(hubspot):
    """Edited mid-read, a deal already read moves to the end of the result order. Paging by
    offset (`after`) would then skip the deal that slid into the page boundary, and it is
    older than the cursor the read ends with: lost for good. Every deal must still come."""
    state, server = hubspot
    t0 = datetime(2025, 2, 1, tzinfo=UTC)
    ids = [
        state.add_deal({"dealname": f"d{i}"}, modified_at=t0 + timedelta(minutes=i))
        for i in range(450)
    ]
    crm = connector(server)
    pages = crm.read_changed_deals(None, ["dealname"])
    seen = [d.id for d in next(pages)]
    state.update_deal(ids[0], {"dealname": "edited while the read runs"})
    seen += [d.id for page in pages for d in page]
    assert set(seen) == set(ids)
    assert Counter(seen)[ids[0]] == 2  # its new version comes too, at the end


def test_more_than_ten_thousand_deals_sharing_one_timestamp_are_each_read_once(hubspot):
    state, server = hubspot
    stamp = datetime(2025, 1, 31, 23, 59, tzinfo=UTC)
    for i in range(10_250):
        state.add_deal({"dealname": f"bulk {i}", "dealstage": "closedwon"}, modified_at=stamp)
    later = state.add_deal({"dealname": "after"}, modified_at=stamp + timedelta(seconds=1))
    crm = connector(server)
    deals = read_all(crm)
    counts = Counter(d.id for d in deals)
    assert len(counts) == 10_251 and max(counts.values()) == 1
    assert deals[-1].id == later
    assert crm.calls["deals.search"] < 10_251 / 200 * 2 + 5  # no endless loop, bounded reads


def test_won_is_resolved_from_the_pipelines_api_including_a_custom_pipeline(hubspot):
    state, server = hubspot
    state.seed(10, random.Random(1))
    pipeline = state.pipelines[ENTERPRISE_PIPELINE_ID]
    won_stage = next(
        s
        for s in pipeline["stages"]
        if s["metadata"]["isClosed"] == "true" and float(s["metadata"]["probability"]) == 1.0
    )
    assert won_stage["id"] != "closedwon"
    deal_id = state.add_deal(
        {"dealname": "Custom won", "pipeline": ENTERPRISE_PIPELINE_ID, "dealstage": won_stage["id"]}
    )
    lost_id = state.add_deal({"dealname": "Lost", "pipeline": "default", "dealstage": "closedlost"})
    by_id = {d.id: d for d in read_all(connector(server))}
    assert by_id[deal_id].status is DealStatus.WON
    assert by_id[lost_id].status is DealStatus.LOST


def test_since_is_inclusive(hubspot):
    state, server = hubspot
    t = datetime(2025, 5, 1, tzinfo=UTC)
    a = state.add_deal({"dealname": "a"}, modified_at=t - timedelta(seconds=1))
    b = state.add_deal({"dealname": "b"}, modified_at=t)
    ids = [d.id for d in read_all(connector(server), since=t)]
    assert ids == [b] and a not in ids


def test_batch_update_writes_100_per_call_and_parks_only_the_bad_record(hubspot):
    state, server = hubspot
    ids = [state.add_deal({"dealname": f"d{i}"}) for i in range(150)]
    crm = connector(server)
    updates = [DealUpdate(i, {"description": f"p {i}"}) for i in ids]
    updates.append(DealUpdate("999999999", {"description": "nobody"}))
    outcomes = crm.write_deal_fields(updates)
    assert crm.calls["deals.batch.update"] == 2
    failed = [o.record_id for o in outcomes if not o.ok]
    assert failed == ["999999999"]
    assert state.deal(ids[0])["properties"]["description"] == f"p {ids[0]}"


def test_faults_are_retried_to_completion(hubspot):
    state, server = hubspot
    ids = state.seed(300, random.Random(5))
    state.controls.set_faults(rate_429=0.2, rate_5xx=0.2, rate_reset=0.1, retry_after=0.01, seed=3)
    try:
        deals = read_all(connector(server))
    finally:
        state.controls.set_faults()
    assert sorted(d.id for d in deals) == sorted(ids)


def test_a_wrong_token_is_an_auth_error_not_retried(hubspot):
    from connectors.errors import ConnectorError, ErrorKind

    _, server = hubspot
    crm = connector(server)
    crm.client.access_token = "wrong"
    crm.client.config["access_token"] = "wrong"
    with pytest.raises(ConnectorError) as exc:
        crm.check()
    assert exc.value.kind is ErrorKind.AUTH
    assert crm.calls["pipelines.get_all"] == 1


def test_a_429_without_retry_after_holds_the_budget_no_longer_than_the_policys_cap(hubspot):
    """HubSpot's 429 may carry no Retry-After: its ten-second interval is waited out instead,
    but never longer than the connection's `max_retry_after`, as every wait of a vendor's."""
    import time

    state, server = hubspot
    state.seed(5, random.Random(2))
    state.controls.set_faults(rate_429=1.0, retry_after=None)
    crm = connector(server)
    started = time.monotonic()
    with pytest.raises(ConnectorError):
        read_all(crm)
    assert crm.budget._paused_until <= time.monotonic() + FAST.max_retry_after
    assert time.monotonic() - started < 5


def test_get_deals_reads_them_in_batches_with_status_and_skips_the_missing(hubspot):
    state, server = hubspot
    ids = state.seed(150, random.Random(9))
    state.archive_deal(ids[7])
    crm = connector(server)
    wanted = [*ids[:120], "999999999"]  # more than one batch of 100, one unknown id
    got = {d.id: d for d in crm.get_deals(wanted, ["dealname", "amount"])}
    assert set(got) == set(ids[:120]) - {ids[7]}  # archived: not read (archived=false)
    assert crm.calls["deals.batch.read"] == 2
    for deal_id, deal in got.items():
        view = state.deal(deal_id)
        assert deal.properties["dealname"] == view["properties"]["dealname"]
        assert deal.modified_at.tzinfo is not None
        assert deal.status in (DealStatus.WON, DealStatus.LOST, DealStatus.OPEN)
    assert any(d.status is DealStatus.WON for d in got.values())
