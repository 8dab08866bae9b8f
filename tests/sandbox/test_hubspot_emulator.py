"""The HubSpot emulator, driven over real sockets with the official `hubspot-api-client`."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from datetime import timedelta

import httpx
import pytest
from hubspot import HubSpot
from hubspot.crm.deals import (
    BatchInputSimplePublicObjectBatchInput,
    BatchReadInputSimplePublicObjectId,
    PublicObjectSearchRequest,
    SimplePublicObjectInput,
)
from hubspot.crm.deals.exceptions import ApiException
from hubspot.crm.objects.notes import SimplePublicObjectInputForCreate
from hubspot.crm.properties import PropertyCreate

from sandbox.common import EmulatorControls
from sandbox.hubspot import ENTERPRISE_PIPELINE_ID, HubSpotState, create_app
from sandbox.serve import LoopbackServer

TOKEN = "pat-na1-test-token"
SEARCH_ROUTE = "POST /crm/v3/objects/deals/search"


@pytest.fixture(scope="module")
def env() -> Iterator[tuple[HubSpotState, EmulatorControls, LoopbackServer]]:
    state = HubSpotState(tokens={TOKEN})
    state.seed(60, random.Random(7))
    controls = EmulatorControls()
    server = LoopbackServer(create_app(state, controls)).start()
    yield state, controls, server
    server.stop()


@pytest.fixture()
def hs(env: tuple[HubSpotState, EmulatorControls, LoopbackServer]) -> Iterator[HubSpotState]:
    state, controls, _ = env
    controls.set_faults()
    controls.set_rate_limits(False)
    state.index_lag = timedelta(0)
    state.clock_offset = timedelta(0)
    yield state
    controls.set_faults()
    controls.set_rate_limits(False)
    state.index_lag = timedelta(0)
    state.clock_offset = timedelta(0)


@pytest.fixture()
def client(env: tuple[HubSpotState, EmulatorControls, LoopbackServer], hs: HubSpotState) -> HubSpot:
    return HubSpot(access_token=TOKEN, host=env[2].base_url, retry=None)


def _search(client: HubSpot, **kwargs: object):
    request = PublicObjectSearchRequest(**kwargs)
    return client.crm.deals.search_api.do_search(public_object_search_request=request)


def _error_body(exc: ApiException) -> dict:
    return json.loads(exc.body)


# ---- list & search paging ----------------------------------------------------------------


def test_list_pages_through_every_live_deal(client: HubSpot, hs: HubSpotState) -> None:
    seen: list[str] = []
    after = None
    while True:
        page = client.crm.deals.basic_api.get_page(
            limit=7, after=after, properties=["dealname", "amount"]
        )
        seen += [d.id for d in page.results]
        assert all("dealname" in d.properties for d in page.results)
        if not page.paging:
            break
        after = page.paging.next.after
    assert sorted(seen) == sorted(hs.deal_ids())
    assert len(seen) == len(set(seen))


def test_get_by_id_and_404(client: HubSpot, hs: HubSpotState) -> None:
    deal_id = hs.deal_ids()[0]
    deal = client.crm.deals.basic_api.get_by_id(deal_id, properties=["dealstage"])
    assert deal.properties["hs_object_id"] == deal_id
    assert set(deal.properties) == {
        "dealstage",
        "createdate",
        "hs_lastmodifieddate",
        "hs_object_id",
    }
    with pytest.raises(ApiException) as err:
        client.crm.deals.basic_api.get_by_id("999")
    assert err.value.status == 404
    assert _error_body(err.value)["category"] == "OBJECT_NOT_FOUND"


def test_search_sorting_paging_and_stable_ties(client: HubSpot, hs: HubSpotState) -> None:
    # A month-end bulk edit: twenty deals share one hs_lastmodifieddate.
    tied = [hs.add_deal({"dealname": f"Tie {i}", "dealstage": "qualifiedtobuy"}) for i in range(20)]
    stamp = hs.now() - timedelta(days=400)
    hs.bulk_touch(tied, stamp)
    sorts = [{"propertyName": "hs_lastmodifieddate", "direction": "ASCENDING"}]

    def walk() -> list[tuple[str, str]]:
        out, after = [], None
        while True:
            page = _search(client, limit=6, after=after, sorts=sorts)
            out += [(d.id, d.properties["hs_lastmodifieddate"]) for d in page.results]
            if not page.paging:
                return out
            after = page.paging.next.after

    first, second = walk(), walk()
    assert first == second  # stable across runs and page boundaries
    assert len(first) == len(hs.deal_ids()) == len({i for i, _ in first})
    stamps = [s for _, s in first]
    assert stamps == sorted(stamps)
    tie_order = [i for i, _ in first if i in tied]
    assert tie_order[:20] == [i for i, _ in first][:20]  # oldest stamp first
    assert tie_order != sorted(tied, key=int)  # not id order: a connector must not rely on it
    for deal_id in tied:
        hs.archive_deal(deal_id)


def test_search_filter_groups_or_and(client: HubSpot, hs: HubSpotState) -> None:
    groups = [
        {
            "filters": [
                {"propertyName": "pipeline", "operator": "EQ", "value": ENTERPRISE_PIPELINE_ID},
                {"propertyName": "hs_is_closed_won", "operator": "EQ", "value": "true"},
            ]
        },
        {
            "filters": [
                {"propertyName": "dealstage", "operator": "IN", "values": ["closedlost"]},
                {"propertyName": "amount", "operator": "GTE", "value": "50000"},
            ]
        },
    ]
    result = _search(client, filter_groups=groups, limit=200, properties=["amount"])
    expected = {
        d
        for d in hs.deal_ids()
        if (
            hs.deal(d)["properties"]["pipeline"] == ENTERPRISE_PIPELINE_ID
            and hs.deal(d)["properties"]["hs_is_closed_won"] == "true"
        )
        or (
            hs.deal(d)["properties"]["dealstage"] == "closedlost"
            and float(hs.deal(d)["properties"]["amount"]) >= 50000
        )
    }
    assert result.total == len(expected) > 0
    assert {d.id for d in result.results} == expected
    # Enterprise wins are closed-won although their stage is not called "closedwon".
    won = [d for d in expected if hs.deal(d)["properties"]["pipeline"] == ENTERPRISE_PIPELINE_ID]
    assert won and all(hs.deal(d)["properties"]["dealstage"] != "closedwon" for d in won)


def test_search_datetime_filter_accepts_epoch_ms_and_iso(client: HubSpot, hs: HubSpotState) -> None:
    cutoff = hs.now() - timedelta(days=60)
    ms = str(int(cutoff.timestamp() * 1000))
    by_ms = _search(
        client,
        limit=200,
        filter_groups=[
            {"filters": [{"propertyName": "hs_lastmodifieddate", "operator": "GTE", "value": ms}]}
        ],
    )
    by_iso = _search(
        client,
        limit=200,
        filter_groups=[
            {
                "filters": [
                    {
                        "propertyName": "hs_lastmodifieddate",
                        "operator": "GTE",
                        "value": cutoff.isoformat(),
                    }
                ]
            }
        ],
    )
    assert by_ms.total == by_iso.total > 0
    assert {d.id for d in by_ms.results} == {d.id for d in by_iso.results}


def test_search_documented_limits_are_enforced(client: HubSpot) -> None:
    flt = {"propertyName": "amount", "operator": "GT", "value": "1"}
    bad_requests = [
        {"limit": 201},
        {"filter_groups": [{"filters": [flt]}] * 6},
        {"filter_groups": [{"filters": [flt] * 7}]},
        {"filter_groups": [{"filters": [flt] * 6}] * 3 + [{"filters": [flt]}]},  # 19 filters
        {
            "sorts": [
                {"propertyName": "amount", "direction": "ASCENDING"},
                {"propertyName": "createdate", "direction": "ASCENDING"},
            ]
        },
    ]
    for kwargs in bad_requests:
        with pytest.raises(ApiException) as err:
            _search(client, **kwargs)
        assert err.value.status == 400, kwargs
        assert _error_body(err.value)["category"] == "VALIDATION_ERROR"


def test_search_10000_result_ceiling() -> None:
    state = HubSpotState(tokens={TOKEN})
    for i in range(10_050):
        state.add_deal({"dealname": f"Bulk {i}", "dealstage": "appointmentscheduled"})
    server = LoopbackServer(create_app(state)).start()
    try:
        client = HubSpot(access_token=TOKEN, host=server.base_url, retry=None)
        page = _search(client, limit=100, after="9900")
        assert page.total == 10_050
        assert len(page.results) == 100
        assert page.paging.next.after == "10000"  # handed out, but it cannot be followed
        with pytest.raises(ApiException) as err:
            _search(client, limit=100, after=page.paging.next.after)
        assert err.value.status == 400
        body = _error_body(err.value)
        assert body["status"] == "error" and body["category"] == "VALIDATION_ERROR"
        assert body["correlationId"]
    finally:
        server.stop()


def test_index_lag_hides_fresh_writes(client: HubSpot, hs: HubSpotState) -> None:
    hs.index_lag = timedelta(seconds=30)
    old_id = hs.deal_ids()[3]
    before = hs.deal(old_id)["properties"]["dealname"]
    hs.update_deal(old_id, {"dealname": "Renamed just now"})
    new_id = hs.add_deal({"dealname": "Brand new", "dealstage": "qualifiedtobuy"})
    ids_filter = [
        {
            "filters": [
                {"propertyName": "hs_object_id", "operator": "IN", "values": [old_id, new_id]}
            ]
        }
    ]

    lagging = _search(client, filter_groups=ids_filter, properties=["dealname"])
    assert [(d.id, d.properties["dealname"]) for d in lagging.results] == [(old_id, before)]
    # The record itself is current: only search lags.
    fresh = client.crm.deals.basic_api.get_by_id(old_id, properties=["dealname"])
    assert fresh.properties["dealname"] == "Renamed just now"

    hs.clock_offset = timedelta(seconds=31)
    caught_up = _search(client, filter_groups=ids_filter, properties=["dealname"])
    assert {(d.id, d.properties["dealname"]) for d in caught_up.results} == {
        (old_id, "Renamed just now"),
        (new_id, "Brand new"),
    }
    hs.archive_deal(new_id)


# ---- writes ------------------------------------------------------------------------------


def test_batch_update_partial_failure_is_207(client: HubSpot, hs: HubSpotState) -> None:
    good = hs.deal_ids()[5]
    stamp_before = hs.deal(good)["properties"]["hs_lastmodifieddate"]
    hs.clock_offset = timedelta(seconds=2)
    batch = BatchInputSimplePublicObjectBatchInput(
        inputs=[
            {"id": good, "properties": {"description": "synced to Asana"}},
            {"id": "424242", "properties": {"description": "nope"}},
        ]
    )
    result = client.crm.deals.batch_api.update(batch_input_simple_public_object_batch_input=batch)
    assert type(result).__name__ == "BatchResponseSimplePublicObjectWithErrors"
    assert [r.id for r in result.results] == [good]
    assert result.num_errors == 1
    assert result.errors[0].category == "OBJECT_NOT_FOUND"
    assert result.errors[0].context["ids"] == ["424242"]
    after = hs.deal(good)["properties"]
    assert after["description"] == "synced to Asana"
    assert after["hs_lastmodifieddate"] > stamp_before

    mixed = BatchInputSimplePublicObjectBatchInput(
        inputs=[
            {"id": good, "properties": {"description": "again"}},
            {"id": hs.deal_ids()[6], "properties": {"no_such_field": "x"}},
        ]
    )
    result = client.crm.deals.batch_api.update(batch_input_simple_public_object_batch_input=mixed)
    assert result.errors[0].category == "VALIDATION_ERROR"
    assert "PROPERTY_DOESNT_EXIST" in result.errors[0].message


def test_unknown_property_is_a_validation_error(client: HubSpot, hs: HubSpotState) -> None:
    with pytest.raises(ApiException) as err:
        client.crm.deals.basic_api.update(
            hs.deal_ids()[0],
            simple_public_object_input=SimplePublicObjectInput(properties={"no_such_field": "1"}),
        )
    assert err.value.status == 400
    body = _error_body(err.value)
    assert body["category"] == "VALIDATION_ERROR"
    assert body["context"] == {"propertyName": ["no_such_field"]}
    assert body["errors"][0]["code"] == "PROPERTY_DOESNT_EXIST"


def test_batch_read_and_create(client: HubSpot, hs: HubSpotState) -> None:
    ids = hs.deal_ids()[:3]
    read = client.crm.deals.batch_api.read(
        batch_read_input_simple_public_object_id=BatchReadInputSimplePublicObjectId(
            inputs=[{"id": i} for i in ids], properties=["dealname"], properties_with_history=[]
        )
    )
    assert sorted(r.id for r in read.results) == sorted(ids)
    created = client.crm.deals.basic_api.create(
        simple_public_object_input_for_create={
            "properties": {"dealname": "Via API", "dealstage": "contractsent", "amount": "1200"}
        }
    )
    assert created.properties["hs_is_closed_won"] == "false"
    assert hs.deal(created.id)["properties"]["dealname"] == "Via API"
    hs.archive_deal(created.id)


def test_pipelines_properties_owners(client: HubSpot, hs: HubSpotState) -> None:
    pipelines = client.crm.pipelines.pipelines_api.get_all("deals").results
    by_id = {p.id: p for p in pipelines}
    default_stages = [s.id for s in by_id["default"].stages]
    assert default_stages[-2:] == ["closedwon", "closedlost"]
    signed = [s for s in by_id[ENTERPRISE_PIPELINE_ID].stages if s.metadata["probability"] == "1.0"]
    assert signed[0].metadata["isClosed"] == "true" and signed[0].id.isdigit()
    one = client.crm.pipelines.pipelines_api.get_by_id("deals", ENTERPRISE_PIPELINE_ID)
    assert one.label == "Enterprise"

    props = {p.name: p for p in client.crm.properties.core_api.get_all("deals").results}
    assert props["closedate"].type == "datetime" and props["amount"].type == "number"
    assert props["hs_lastmodifieddate"].modification_metadata.read_only_value is True
    create = PropertyCreate(
        name="handoff_project_url",
        label="Handoff project URL",
        type="string",
        field_type="text",
        group_name="dealinformation",
    )
    made = client.crm.properties.core_api.create("deals", property_create=create)
    assert made.name == "handoff_project_url"
    with pytest.raises(Exception) as err:
        client.crm.properties.core_api.create("deals", property_create=create)
    assert err.value.status == 409

    owners = client.crm.owners.owners_api.get_page().results
    assert len(owners) == len(hs.owners) and owners[0].type == "PERSON"


def test_notes_and_associations(client: HubSpot, hs: HubSpotState) -> None:
    deal_id = hs.deal_ids()[2]
    note = client.crm.objects.notes.basic_api.create(
        simple_public_object_input_for_create=SimplePublicObjectInputForCreate(
            properties={
                "hs_note_body": "Project created in Asana",
                "hs_timestamp": "1735689600000",
            },
            associations=[
                {
                    "to": {"id": deal_id},
                    "types": [{"associationCategory": "HUBSPOT_DEFINED", "associationTypeId": 214}],
                }
            ],
        )
    )
    linked = client.crm.associations.v4.basic_api.get_page("deals", deal_id, "notes")
    assert [r.to_object_id for r in linked.results] == [note.id]
    assert linked.results[0].association_types[0].type_id == 213

    other = client.crm.objects.notes.basic_api.create(
        simple_public_object_input_for_create=SimplePublicObjectInputForCreate(
            properties={"hs_note_body": "Second", "hs_timestamp": "2025-01-02T00:00:00Z"}
        )
    )
    client.crm.associations.v4.basic_api.create_default("notes", other.id, "deals", deal_id)
    linked = client.crm.associations.v4.basic_api.get_page("deals", deal_id, "notes")
    assert {r.to_object_id for r in linked.results} == {note.id, other.id}


def test_malformed_json_is_400(env: tuple, hs: HubSpotState) -> None:
    response = httpx.post(
        f"{env[2].base_url}/crm/v3/objects/deals/search",
        content=b'{"limit": ',
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
    )
    assert response.status_code == 400
    assert response.json()["category"] == "VALIDATION_ERROR"


# ---- auth --------------------------------------------------------------------------------


def test_bad_token_is_401(env: tuple, hs: HubSpotState) -> None:
    bad = HubSpot(access_token="wrong", host=env[2].base_url, retry=None)
    with pytest.raises(ApiException) as err:
        bad.crm.deals.basic_api.get_page()
    assert err.value.status == 401
    body = _error_body(err.value)
    assert body["status"] == "error" and body["category"] == "INVALID_AUTHENTICATION"


def test_oauth_refresh_issues_a_working_token(env: tuple, hs: HubSpotState) -> None:
    refresh = hs.add_oauth_client("client-1", "secret-1")
    anon = HubSpot(host=env[2].base_url, retry=None)
    tokens = anon.oauth.tokens_api.create(
        grant_type="refresh_token",
        client_id="client-1",
        client_secret="secret-1",
        refresh_token=refresh,
    )
    assert tokens.expires_in == 1800 and tokens.refresh_token == refresh
    authed = HubSpot(access_token=tokens.access_token, host=env[2].base_url, retry=None)
    assert authed.crm.deals.basic_api.get_page(limit=1).results

    hs.clock_offset = timedelta(minutes=31)
    with pytest.raises(ApiException) as err:
        authed.crm.deals.basic_api.get_page(limit=1)
    assert err.value.status == 401
    assert _error_body(err.value)["category"] == "EXPIRED_AUTHENTICATION"

    with pytest.raises(Exception) as bad:
        anon.oauth.tokens_api.create(
            grant_type="refresh_token",
            client_id="client-1",
            client_secret="secret-1",
            refresh_token="not-a-refresh-token",
        )
    assert bad.value.status == 400
    assert json.loads(bad.value.body)["status"] == "BAD_REFRESH_TOKEN"


# ---- rate limits, faults, stats ----------------------------------------------------------


def test_rate_limit_headers_and_ten_secondly_429(client: HubSpot, env: tuple) -> None:
    _, controls, _ = env
    controls.set_rate_limits(True, multiplier=0.05)  # 100/10 s -> 5/10 s
    remaining = []
    for _ in range(5):
        _, status, headers = client.crm.deals.basic_api.get_page_with_http_info(limit=1)
        assert status == 200
        assert headers["X-HubSpot-RateLimit-Max"] == "5"
        assert headers["X-HubSpot-RateLimit-Interval-Milliseconds"] == "10000"
        assert "X-HubSpot-RateLimit-Daily-Remaining" in headers
        remaining.append(int(headers["X-HubSpot-RateLimit-Remaining"]))
    assert remaining == [4, 3, 2, 1, 0]
    with pytest.raises(ApiException) as err:
        client.crm.deals.basic_api.get_page(limit=1)
    assert err.value.status == 429
    body = _error_body(err.value)
    assert body["policyName"] == "TEN_SECONDLY_ROLLING"
    assert body["errorType"] == "RATE_LIMIT" and body["status"] == "error"
    assert body["correlationId"] and body["groupName"]
    assert "Retry-After" not in err.value.headers  # documented quirk

    # Search has its own per-second window: the exhausted burst window does not block it.
    _, status, headers = client.crm.deals.search_api.do_search_with_http_info(
        public_object_search_request=PublicObjectSearchRequest(limit=1)
    )
    assert status == 200
    assert not any(h.lower().startswith("x-hubspot-ratelimit") for h in headers)


def test_search_secondly_limit_is_separate(client: HubSpot, env: tuple) -> None:
    _, controls, _ = env
    controls.set_rate_limits(True, multiplier=0.2)  # search 5/s -> 1/s, burst 20/10 s
    _search(client, limit=1)
    with pytest.raises(ApiException) as err:
        _search(client, limit=1)
    assert err.value.status == 429
    body = _error_body(err.value)
    assert body["policyName"] == "SECONDLY"
    assert body["message"] == "You have reached your secondly limit."
    assert client.crm.deals.basic_api.get_page(limit=1).results  # other endpoints still fine


def test_injected_5xx_has_hubspot_body(client: HubSpot, env: tuple) -> None:
    _, controls, _ = env
    controls.set_faults(rate_5xx=1.0, seed=3)
    with pytest.raises(ApiException) as err:
        client.crm.deals.basic_api.get_page(limit=1)
    assert err.value.status in (500, 502, 503)
    body = _error_body(err.value)
    assert body["status"] == "error" and body["correlationId"] and body["message"]


def test_sandbox_stats_count_by_route(client: HubSpot, env: tuple, hs: HubSpotState) -> None:
    _, controls, server = env
    httpx.post(f"{server.base_url}/_sandbox/reset-stats")
    _search(client, limit=1)
    _search(client, limit=1)
    client.crm.deals.basic_api.get_by_id(hs.deal_ids()[0])
    stats = httpx.get(f"{server.base_url}/_sandbox/stats").json()
    assert stats["by_route"][SEARCH_ROUTE] == 2
    assert stats["by_route"]["GET /crm/v3/objects/deals/{dealId}"] == 1
    # Search is sent as a POST but changes nothing: the stats count it as a read.
    assert stats["reads"] == 3 and stats["writes"] == 0
