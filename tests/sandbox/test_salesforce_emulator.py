"""The Salesforce emulator, driven over real TLS sockets with `simple-salesforce` and raw OAuth.

Every client session trusts the throwaway CA through `session.verify`. It also sets
`trust_env = False`: requests lets a REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE environment variable
override `session.verify`, which would silently swap our CA for the system bundle.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
import pytest
import requests
import trustme
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from simple_salesforce import Salesforce, SalesforceLogin
from simple_salesforce.exceptions import (
    SalesforceAuthenticationFailed,
    SalesforceExpiredSession,
    SalesforceGeneralError,
    SalesforceMalformedRequest,
    SalesforceRefusedRequest,
    SalesforceResourceNotFound,
)

from sandbox.common import EmulatorControls
from sandbox.salesforce import (
    CUSTOM_WON_STAGE,
    DEFAULT_CLIENT_ID,
    DEFAULT_CLIENT_SECRET,
    DEFAULT_PASSWORD,
    DEFAULT_SECURITY_TOKEN,
    DEFAULT_USERNAME,
    SalesforceState,
    create_app,
)
from sandbox.serve import LoopbackServer, TLSFiles

VERSION = "59.0"
QUERY_ROUTE = "GET /services/data/{version}/query"
QUERY_MORE_ROUTE = "GET /services/data/{version}/query/{locator}"
# Client sessions are closed before the server stops: uvicorn waits for keep-alive connections.
_SESSIONS: list[requests.Session] = []


@dataclass
class Env:
    state: SalesforceState
    controls: EmulatorControls
    server: LoopbackServer
    tls: TLSFiles


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tls = TLSFiles.create(str(tmp_path_factory.mktemp("sf-tls")))
    state = SalesforceState()
    state.add_custom_field("Opportunity", "Delivery_Progress__c", "percent")
    state.add_custom_field("Opportunity", "Handoff_Key__c", "text", external_id=True, unique=True)
    state.add_validation_rule(
        "Opportunity",
        "Progress_Range",
        lambda r: (
            r.get("Delivery_Progress__c") is not None and not 0 <= r["Delivery_Progress__c"] <= 100
        ),
        "Delivery progress must be between 0 and 100.",
        "Delivery_Progress__c",
    )
    state.seed(80, random.Random(7))
    controls = EmulatorControls()
    server = LoopbackServer(create_app(state, controls), tls=tls).start()
    yield Env(state, controls, server, tls)
    for session in _SESSIONS:
        session.close()
    server.stop()


@pytest.fixture()
def org(env: Env) -> Iterator[Env]:
    def reset() -> None:
        env.controls.set_faults()
        env.controls.set_rate_limits(False)
        env.controls.reset_stats()
        env.state.clock_offset = timedelta(0)
        env.state.daily_api_limit = 110_000

    reset()
    yield env
    reset()


def _session(tls: TLSFiles) -> requests.Session:
    s = requests.Session()
    s.verify = tls.ca_pem
    s.trust_env = False
    _SESSIONS.append(s)
    return s


@pytest.fixture()
def sf(org: Env) -> Salesforce:
    return Salesforce(
        instance_url=org.server.base_url,
        session_id=org.state.issue_session(),
        session=_session(org.tls),
        version=VERSION,
    )


def _account(state: SalesforceState, name: str) -> str:
    return state.add_account({"Name": name})


def _opp(state: SalesforceState, account: str, name: str, **fields: Any) -> str:
    modstamp = fields.pop("modstamp", None)
    data = {"Name": name, "AccountId": account, "StageName": "Prospecting"}
    data.update({"CloseDate": "2024-06-30", **fields})
    return state.add_opportunity(data, modstamp=modstamp)


def _error(exc: pytest.ExceptionInfo[Any]) -> dict[str, Any]:
    content = exc.value.content
    assert isinstance(content, list) and len(content) == 1, content
    return content[0]


# --------------------------------------------------------------------------------------------
# Query
# --------------------------------------------------------------------------------------------


def test_query_all_pages_4500_records_in_default_batches(org: Env, sf: Salesforce) -> None:
    account = _account(org.state, "Bulk Paging Ltd")
    for i in range(4500):
        _opp(org.state, account, f"Bulk {i:04d}")
    org.controls.reset_stats()

    first = sf.query(f"SELECT Id, Name FROM Opportunity WHERE AccountId = '{account}'")
    assert first["totalSize"] == 4500 and first["done"] is False
    assert len(first["records"]) == 2000
    next_url = first["nextRecordsUrl"]
    # Relative, with a query locator and the offset of the next batch.
    assert next_url.startswith(f"/services/data/v{VERSION}/query/01g")
    assert next_url.endswith("-2000")

    second = sf.query_more(next_url, identifier_is_url=True)
    assert len(second["records"]) == 2000 and second["done"] is False
    # query_more also takes the bare locator ("01g...-4000") and builds the URL itself.
    third = sf.query_more(second["nextRecordsUrl"].rsplit("/", 1)[1])
    assert len(third["records"]) == 500 and third["done"] is True
    assert "nextRecordsUrl" not in third

    everything = sf.query_all(f"SELECT Id FROM Opportunity WHERE AccountId = '{account}'")
    ids = [r["Id"] for r in everything["records"]]
    assert len(ids) == len(set(ids)) == 4500
    stats = org.controls.stats.by_route
    assert stats[QUERY_ROUTE] == 2
    assert stats[QUERY_MORE_ROUTE] == 4


def test_batch_size_header_is_clamped_to_documented_range(org: Env, sf: Salesforce) -> None:
    account = _account(org.state, "Batchsize Inc.")
    for i in range(450):
        _opp(org.state, account, f"Batch {i}")
    q = f"SELECT Id FROM Opportunity WHERE AccountId = '{account}'"
    page = sf.query(q, headers={"Sforce-Query-Options": "batchSize=300"})
    assert len(page["records"]) == 300 and page["nextRecordsUrl"].endswith("-300")
    # Below the minimum of 200: Salesforce uses 200.
    page = sf.query(q, headers={"Sforce-Query-Options": "batchSize=50"})
    assert len(page["records"]) == 200
    assert len(sf.query_all(q, headers={"Sforce-Query-Options": "batchSize=200"})["records"]) == 450


def test_bogus_query_locator_is_rejected(sf: Salesforce) -> None:
    with pytest.raises(SalesforceMalformedRequest) as exc:
        sf.query_more(f"/services/data/v{VERSION}/query/01gDn0000000000AAA-2000", True)
    assert _error(exc)["errorCode"] == "INVALID_QUERY_LOCATOR"


def test_where_in_like_order_and_datetime_literals(org: Env, sf: Salesforce) -> None:
    state = org.state
    account = _account(state, "Filter Works GmbH")
    base = datetime(2024, 3, 1, 12, 0, 0, tzinfo=UTC)
    a = _opp(state, account, "Alpha rollout", Amount=1000, modstamp=base)
    b = _opp(state, account, "beta Rollout", Amount=5000, modstamp=base + timedelta(hours=1))
    c = _opp(state, account, "Gamma pilot", Amount=None, modstamp=base + timedelta(days=2))
    d = _opp(state, account, "Delta", StageName="Closed Won", modstamp=base + timedelta(days=3))
    scope = f"AccountId = '{account}'"

    def ids(where: str, order: str = "Name") -> list[str]:
        res = sf.query_all(
            f"SELECT Id FROM Opportunity WHERE {scope} AND ({where}) ORDER BY {order}"
        )
        return [r["Id"] for r in res["records"]]

    # LIKE and = are case-insensitive; ORDER BY on text is too.
    assert ids("Name LIKE '%rollout'") == [a, b]
    assert ids("Name = 'ALPHA ROLLOUT'") == [a]
    assert ids("Name IN ('delta', 'Gamma pilot')") == [d, c]
    assert ids("Name NOT IN ('delta', 'Gamma pilot')") == [a, b]
    assert ids("Amount >= 1000 AND Amount < 5000") == [a]
    # Nulls come first ascending and last descending.
    assert ids("Name != null", "Amount, Name")[:2] == [d, c]
    assert ids("Name != null", "Amount DESC")[:2] == [b, a]
    assert ids("Amount = null", "Name") == [d, c]
    assert ids("NOT Name LIKE '%a%'") == []
    assert ids("SystemModstamp > 2024-03-01T12:00:00Z") == [b, d, c]
    assert ids("SystemModstamp >= 2024-03-01T13:00:00+01:00") == [a, b, d, c]
    assert ids("SystemModstamp < 2024-03-03T12:00:00.000+0000", "SystemModstamp") == [a, b]
    assert ids("CloseDate = 2024-06-30 AND IsWon = true") == [d]
    assert ids("IsWon = false AND (Amount > 2000 OR Amount = null)") == [b, c]

    res = sf.query(
        f"SELECT Name, Account.Name, Owner.Username FROM Opportunity WHERE Id = '{a[:15]}'"
    )
    rec = res["records"][0]
    assert rec["attributes"] == {
        "type": "Opportunity",
        "url": f"/services/data/v{VERSION}/sobjects/Opportunity/{a}",
    }
    assert rec["Account"]["Name"] == "Filter Works GmbH"
    assert rec["Account"]["attributes"]["type"] == "Account"
    assert rec["Owner"]["Username"] == DEFAULT_USERNAME
    count = sf.query(f"SELECT COUNT() FROM Opportunity WHERE {scope}")
    assert count == {"totalSize": 4, "done": True, "records": []}


def test_won_means_is_won_not_stage_name(org: Env, sf: Salesforce) -> None:
    account = _account(org.state, "Won Semantics LLC")
    custom = _opp(org.state, account, "Custom won", StageName=CUSTOM_WON_STAGE)
    standard = _opp(org.state, account, "Standard won", StageName="Closed Won")
    _opp(org.state, account, "Lost", StageName="Closed Lost")
    res = sf.query_all(
        f"SELECT Id, StageName, IsClosed FROM Opportunity WHERE AccountId = '{account}' "
        "AND IsWon = true ORDER BY Name"
    )
    assert [r["Id"] for r in res["records"]] == [custom, standard]
    stages = sf.query_all(
        "SELECT MasterLabel, IsWon, IsClosed FROM OpportunityStage WHERE IsWon = true"
    )
    assert {r["MasterLabel"] for r in stages["records"]} == {"Closed Won", CUSTOM_WON_STAGE}


def test_equal_modstamps_page_deterministically_only_with_id_tiebreak(
    org: Env, sf: Salesforce
) -> None:
    account = _account(org.state, "Tie Breakers Co.")
    ids = [_opp(org.state, account, f"Tie {i}") for i in range(40)]
    stamp = datetime(2024, 5, 5, 5, 5, 5, tzinfo=UTC)
    org.state.bulk_touch(ids, stamp)
    scope = f"AccountId = '{account}'"
    by_id = sf.query_all(
        f"SELECT Id, SystemModstamp FROM Opportunity WHERE {scope} ORDER BY SystemModstamp, Id"
    )
    got = [r["Id"] for r in by_id["records"]]
    assert got == sorted(ids)
    assert {r["SystemModstamp"] for r in by_id["records"]} == {"2024-05-05T05:05:05.000+0000"}
    # Without the Id tiebreak the order among equal keys is unrelated to Id.
    loose = sf.query_all(f"SELECT Id FROM Opportunity WHERE {scope} ORDER BY SystemModstamp")
    assert [r["Id"] for r in loose["records"]] != sorted(ids)

    # Keyset paging over the tie with (SystemModstamp, Id) walks every row exactly once.
    seen: list[str] = []
    last_stamp, last_id = "2000-01-01T00:00:00Z", ""
    while True:
        cond = f"SystemModstamp > {last_stamp}"
        if last_id:
            cond += f" OR (SystemModstamp = {last_stamp} AND Id > '{last_id}')"
        page = sf.query(
            f"SELECT Id, SystemModstamp FROM Opportunity WHERE {scope} AND ({cond}) "
            "ORDER BY SystemModstamp, Id LIMIT 15"
        )["records"]
        if not page:
            break
        seen += [r["Id"] for r in page]
        last_stamp = page[-1]["SystemModstamp"].replace(".000+0000", "Z")
        last_id = page[-1]["Id"]
    assert seen == sorted(ids)


@pytest.mark.parametrize(
    ("soql", "code"),
    [
        ("SELEC Id FROM Opportunity", "MALFORMED_QUERY"),
        ("SELECT Id FROM Opportunity WHERE", "MALFORMED_QUERY"),
        (
            "SELECT Id FROM Opportunity WHERE IsWon = true AND Amount > 1 OR Amount < 0",
            "MALFORMED_QUERY",
        ),
        ("SELECT Id, Id FROM Opportunity", "MALFORMED_QUERY"),
        ("SELECT Id, Bogus__c FROM Opportunity", "INVALID_FIELD"),
        ("SELECT Id FROM Opportunity WHERE SystemModstamp > 2024-01-01", "INVALID_FIELD"),
        ("SELECT Id FROM Opportunity WHERE Amount = '5'", "INVALID_FIELD"),
        ("SELECT Id FROM Opportunity WHERE Name = 5", "INVALID_FIELD"),
        ("SELECT Id FROM Opportunity WHERE Id = 'nope'", "INVALID_QUERY_FILTER_OPERATOR"),
        ("SELECT Id FROM Opportunityy", "INVALID_TYPE"),
        ("SELECT Id FROM Opportunity OFFSET 2001", "NUMBER_OUTSIDE_VALID_RANGE"),
    ],
)
def test_bad_soql_is_a_400_with_salesforce_error_code(sf: Salesforce, soql: str, code: str) -> None:
    with pytest.raises(SalesforceMalformedRequest) as exc:
        sf.query(soql)
    assert exc.value.status == 400
    err = _error(exc)
    assert err["errorCode"] == code
    assert "ERROR at Row:1:Column:" in err["message"] or code == "MALFORMED_QUERY"


# --------------------------------------------------------------------------------------------
# sObjects
# --------------------------------------------------------------------------------------------


def test_describe_opportunity(sf: Salesforce) -> None:
    d = sf.Opportunity.describe()
    assert d["name"] == "Opportunity" and d["keyPrefix"] == "006"
    fields = {f["name"]: f for f in d["fields"]}
    stage_values = [p["value"] for p in fields["StageName"]["picklistValues"]]
    assert stage_values[0] == "Prospecting" and CUSTOM_WON_STAGE in stage_values
    assert fields["StageName"]["type"] == "picklist"
    assert fields["IsWon"]["updateable"] is False and fields["IsWon"]["type"] == "boolean"
    assert fields["SystemModstamp"]["type"] == "datetime"
    progress = fields["Delivery_Progress__c"]
    assert progress["custom"] is True and progress["type"] == "percent" and progress["updateable"]
    assert fields["Handoff_Key__c"]["externalId"] is True
    assert fields["AccountId"]["referenceTo"] == ["Account"]
    assert fields["AccountId"]["relationshipName"] == "Account"


def test_create_get_update_delete(org: Env, sf: Salesforce) -> None:
    state = org.state
    account = _account(state, "Crud Partners")
    created = sf.Opportunity.create(
        {
            "Name": "Crud deal",
            "AccountId": account,
            "StageName": "Qualification",
            "CloseDate": "2024-09-30",
        }
    )
    assert created["success"] is True and created["errors"] == []
    oid = created["id"]
    assert oid.startswith("006") and len(oid) == 18
    rec = sf.Opportunity.get(oid)
    assert rec["IsWon"] is False and rec["Probability"] == 10.0
    assert rec["attributes"]["type"] == "Opportunity"
    before = state.opportunity(oid)["SystemModstamp"]

    state.clock_offset = timedelta(minutes=5)
    assert (
        sf.Opportunity.update(oid, {"StageName": CUSTOM_WON_STAGE, "Delivery_Progress__c": 40})
        == 204
    )
    after = state.opportunity(oid)
    assert after["IsWon"] is True and after["IsClosed"] is True
    assert after["Delivery_Progress__c"] == 40.0
    assert after["SystemModstamp"] > before
    assert after["LastModifiedDate"] == after["SystemModstamp"]
    # 15-character ids work too.
    assert sf.Opportunity.get(oid[:15])["Id"] == oid

    with pytest.raises(SalesforceMalformedRequest) as exc:
        sf.Opportunity.update(oid, {"IsWon": False})
    assert _error(exc)["errorCode"] == "INVALID_FIELD_FOR_INSERT_UPDATE"
    with pytest.raises(SalesforceMalformedRequest) as exc:
        sf.Opportunity.update(oid, {"Bogus__c": 1})
    assert _error(exc)["errorCode"] == "INVALID_FIELD"
    with pytest.raises(SalesforceMalformedRequest) as exc:
        sf.Opportunity.update(oid, {"Delivery_Progress__c": 140})
    err = _error(exc)
    assert err["errorCode"] == "FIELD_CUSTOM_VALIDATION_EXCEPTION"
    assert err["fields"] == ["Delivery_Progress__c"]
    with pytest.raises(SalesforceMalformedRequest) as exc:
        sf.Opportunity.update(oid, {"StageName": "Closed Maybe"})
    assert _error(exc)["errorCode"] == "INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST"
    with pytest.raises(SalesforceMalformedRequest) as exc:
        sf.Opportunity.create({"Name": "No stage"})
    err = _error(exc)
    assert err["errorCode"] == "REQUIRED_FIELD_MISSING"
    assert err["fields"] == ["StageName", "CloseDate"]

    assert sf.Opportunity.delete(oid) == 204
    with pytest.raises(SalesforceResourceNotFound) as exc:
        sf.Opportunity.get(oid)
    assert _error(exc)["errorCode"] == "ENTITY_IS_DELETED"
    q = f"SELECT Id, IsDeleted FROM Opportunity WHERE Id = '{oid}'"
    assert sf.query(q)["totalSize"] == 0
    assert sf.query(q, include_deleted=True)["records"][0]["IsDeleted"] is True
    with pytest.raises(SalesforceResourceNotFound) as exc:
        sf.Opportunity.get("006Dn0000000000IAA")
    assert _error(exc)["errorCode"] == "NOT_FOUND"


def test_upsert_by_external_id(org: Env, sf: Salesforce) -> None:
    account = _account(org.state, "Upsert Works")
    data = {
        "Name": "Upserted",
        "AccountId": account,
        "StageName": "Prospecting",
        "CloseDate": "2024-12-01",
    }
    resp = sf.Opportunity.upsert("Handoff_Key__c/HK-1", data, raw_response=True)
    assert resp.status_code == 201
    body = resp.json()
    assert body["created"] is True and body["success"] is True
    resp = sf.Opportunity.upsert("Handoff_Key__c/HK-1", {"Amount": 99}, raw_response=True)
    assert resp.status_code == 200
    assert resp.json() == {"id": body["id"], "success": True, "errors": [], "created": False}
    assert org.state.opportunity(body["id"])["Amount"] == 99.0
    assert sf.Opportunity.get_by_custom_id("Handoff_Key__c", "HK-1")["Id"] == body["id"]
    with pytest.raises(SalesforceResourceNotFound) as exc:
        sf.Opportunity.upsert("Name/Upserted", {"Amount": 1})
    assert _error(exc)["errorCode"] == "NOT_FOUND"


def test_tasks_and_get_updated(org: Env, sf: Salesforce) -> None:
    state = org.state
    account = _account(state, "Tasks Ltd")
    oid = _opp(state, account, "With tasks", StageName="Closed Won")
    start = state.now() - timedelta(minutes=2)
    res = sf.Task.create({"WhatId": oid, "Subject": "Delivery kickoff", "Status": "Completed"})
    tasks = state.tasks_for(oid)
    assert [t["Id"] for t in tasks] == [res["id"]]
    assert tasks[0]["IsClosed"] is True and tasks[0]["OwnerId"] == state.integration_user_id
    state.clock_offset = timedelta(minutes=2)
    updated = sf.Opportunity.updated(start, datetime.now(UTC) + timedelta(minutes=2))
    assert oid in updated["ids"]
    assert updated["latestDateCovered"].endswith(":00.000+0000")


# --------------------------------------------------------------------------------------------
# sObject Collections
# --------------------------------------------------------------------------------------------


def _progress_batch(ids: list[str], values: list[Any]) -> list[dict[str, Any]]:
    return [
        {"attributes": {"type": "Opportunity"}, "id": i, "Delivery_Progress__c": v}
        for i, v in zip(ids, values, strict=True)
    ]


def test_collection_update_partial_failure(org: Env, sf: Salesforce) -> None:
    account = _account(org.state, "Collections Partial")
    ids = [_opp(org.state, account, f"Coll {i}", StageName="Closed Won") for i in range(3)]
    body = {"allOrNone": False, "records": _progress_batch(ids, [25, 250, 75])}
    results = sf.restful("composite/sobjects", method="PATCH", json=body)
    assert results[0] == {"id": ids[0], "success": True, "errors": []}
    assert results[1]["success"] is False and "id" not in results[1]
    assert results[1]["errors"][0]["statusCode"] == "FIELD_CUSTOM_VALIDATION_EXCEPTION"
    assert results[1]["errors"][0]["fields"] == ["Delivery_Progress__c"]
    assert results[2]["success"] is True
    got = [org.state.opportunity(i)["Delivery_Progress__c"] for i in ids]
    assert got == [25.0, None, 75.0]
    # One request, one commit: both writes share their SystemModstamp.
    stamps = {org.state.opportunity(i)["SystemModstamp"] for i in (ids[0], ids[2])}
    assert len(stamps) == 1

    fetched = sf.restful(
        "composite/sobjects/Opportunity",
        params={
            "ids": f"{ids[0]},{ids[2]},006Dn0000000000IAA",
            "fields": "Id,Delivery_Progress__c",
        },
    )
    assert [f and f["Delivery_Progress__c"] for f in fetched] == [25.0, 75.0, None]


def test_collection_update_all_or_none_rolls_back(org: Env, sf: Salesforce) -> None:
    account = _account(org.state, "Collections Atomic")
    ids = [_opp(org.state, account, f"Atomic {i}") for i in range(3)]
    before = [org.state.opportunity(i) for i in ids]
    body = {"allOrNone": True, "records": _progress_batch(ids, [10, 20, -5])}
    results = sf.restful("composite/sobjects", method="PATCH", json=body)
    assert [r["success"] for r in results] == [False, False, False]
    assert results[0]["errors"][0]["statusCode"] == "ALL_OR_NONE_OPERATION_ROLLED_BACK"
    assert results[2]["errors"][0]["statusCode"] == "FIELD_CUSTOM_VALIDATION_EXCEPTION"
    assert [org.state.opportunity(i) for i in ids] == before

    too_many = {"allOrNone": False, "records": _progress_batch(ids * 67, [1] * 201)}
    with pytest.raises(SalesforceMalformedRequest) as exc:
        sf.restful("composite/sobjects", method="PATCH", json=too_many)
    assert _error(exc)["errorCode"] == "EXCEEDED_ID_LIMIT"


def test_collection_create_and_missing_id(org: Env, sf: Salesforce) -> None:
    account = _account(org.state, "Collections Create")
    records = [
        {
            "attributes": {"type": "Opportunity"},
            "Name": "Made in bulk",
            "AccountId": account,
            "StageName": "Prospecting",
            "CloseDate": "2025-01-31",
        },
        {"attributes": {"type": "Opportunity"}, "Name": "Missing required"},
    ]
    results = sf.restful("composite/sobjects", method="POST", json={"records": records})
    assert results[0]["success"] is True and results[0]["id"].startswith("006")
    assert results[1]["errors"][0]["statusCode"] == "REQUIRED_FIELD_MISSING"
    results = sf.restful(
        "composite/sobjects",
        method="PATCH",
        json={"records": [{"attributes": {"type": "Opportunity"}, "Amount": 5}]},
    )
    assert results[0]["errors"][0]["statusCode"] == "MISSING_ARGUMENT"


# --------------------------------------------------------------------------------------------
# Sessions, limits, faults, TLS
# --------------------------------------------------------------------------------------------


def test_invalid_and_expired_sessions_are_401(org: Env) -> None:
    sf = Salesforce(
        instance_url=org.server.base_url,
        session_id="00Dbogus!notasession",
        session=_session(org.tls),
        version=VERSION,
    )
    with pytest.raises(SalesforceExpiredSession) as exc:
        sf.query("SELECT Id FROM Account")
    assert exc.value.status == 401
    assert _error(exc) == {
        "message": "Session expired or invalid",
        "errorCode": "INVALID_SESSION_ID",
    }

    sid = org.state.issue_session()
    sf = Salesforce(instance_url=org.server.base_url, session_id=sid, session=_session(org.tls))
    assert sf.query("SELECT COUNT() FROM Account")["totalSize"] > 0
    org.state.clock_offset = timedelta(hours=2, minutes=1)  # past the 2-hour inactivity timeout
    with pytest.raises(SalesforceExpiredSession):
        sf.query("SELECT COUNT() FROM Account")


def test_limit_info_header_and_daily_allocation_403(org: Env, sf: Salesforce) -> None:
    raw = sf.session.get(
        f"{org.server.base_url}/services/data/v{VERSION}/limits",
        headers={"Authorization": f"Bearer {sf.session_id}"},
    )
    assert raw.status_code == 200
    assert raw.headers["Sforce-Limit-Info"].startswith("api-usage=")
    assert raw.headers["Sforce-Limit-Info"].endswith("/110000")
    assert raw.json()["DailyApiRequests"]["Max"] == 110_000

    org.state.daily_api_limit = 5
    org.controls.set_rate_limits(True)
    for i in range(1, 6):
        sf.query("SELECT COUNT() FROM Account")
        assert sf.api_usage["api-usage"].used == i
        assert sf.api_usage["api-usage"].total == 5
    with pytest.raises(SalesforceRefusedRequest) as exc:
        sf.query("SELECT COUNT() FROM Account")
    assert exc.value.status == 403
    assert _error(exc) == {
        "message": "TotalRequests Limit exceeded.",
        "errorCode": "REQUEST_LIMIT_EXCEEDED",
    }
    assert org.controls.stats.throttled == 1
    # OAuth is not an API call: logging in still works with the allocation exhausted.
    token = _password_grant(org, DEFAULT_PASSWORD + DEFAULT_SECURITY_TOKEN)
    assert token.status_code == 200


def test_injected_5xx_uses_json_array_body(org: Env, sf: Salesforce) -> None:
    org.controls.set_faults(rate_5xx=1.0, seed=1)
    with pytest.raises(SalesforceGeneralError) as exc:
        sf.query("SELECT Id FROM Account LIMIT 1")
    assert exc.value.status in (500, 502, 503)
    assert _error(exc)["errorCode"] in ("UNKNOWN_EXCEPTION", "SERVER_UNAVAILABLE")


def test_tls_refuses_untrusted_ca(org: Env, tmp_path: Any) -> None:
    url = f"{org.server.base_url}/services/data"
    plain = requests.Session()
    _SESSIONS.append(plain)
    plain.trust_env = False  # system CA bundle only
    with pytest.raises(requests.exceptions.SSLError):
        plain.get(url, timeout=5)
    other_ca = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other_ca))
    wrong = requests.Session()
    _SESSIONS.append(wrong)
    wrong.trust_env = False
    wrong.verify = str(other_ca)
    with pytest.raises(requests.exceptions.SSLError):
        wrong.get(url, timeout=5)
    versions = _session(org.tls).get(url, timeout=5).json()
    assert {"label": "Winter '24", "url": "/services/data/v59.0", "version": "59.0"} in versions


# --------------------------------------------------------------------------------------------
# Logins
# --------------------------------------------------------------------------------------------


def _password_grant(
    org: Env, password: str, secret: str = DEFAULT_CLIENT_SECRET
) -> requests.Response:
    return _session(org.tls).post(
        f"{org.server.base_url}/services/oauth2/token",
        data={
            "grant_type": "password",
            "client_id": DEFAULT_CLIENT_ID,
            "client_secret": secret,
            "username": DEFAULT_USERNAME,
            "password": password,
        },
        timeout=5,
    )


def test_oauth_password_grant_then_rest(org: Env) -> None:
    resp = _password_grant(org, DEFAULT_PASSWORD + DEFAULT_SECURITY_TOKEN)
    assert resp.status_code == 200
    token = resp.json()
    assert token["token_type"] == "Bearer" and token["instance_url"] == org.server.base_url
    assert token["id"].endswith(f"/{org.state.integration_user_id}")
    assert {"access_token", "issued_at", "signature"} <= token.keys()
    sf = Salesforce(
        instance_url=token["instance_url"],
        session_id=token["access_token"],
        session=_session(org.tls),
        version=VERSION,
    )
    assert sf.query("SELECT COUNT() FROM User")["totalSize"] > 0

    bad = _password_grant(org, DEFAULT_PASSWORD)  # security token missing
    assert bad.status_code == 400
    assert bad.json() == {"error": "invalid_grant", "error_description": "authentication failure"}
    assert _password_grant(org, "x", secret="wrong").json()["error"] == "invalid_client"


def test_oauth_refresh_token_grant(org: Env) -> None:
    refresh = org.state.issue_refresh_token(DEFAULT_CLIENT_ID)
    url = f"{org.server.base_url}/services/oauth2/token"
    s = _session(org.tls)
    resp = s.post(
        url,
        data={
            "grant_type": "refresh_token",
            "refresh_token": refresh,
            "client_id": DEFAULT_CLIENT_ID,
            "client_secret": DEFAULT_CLIENT_SECRET,
        },
        timeout=5,
    )
    assert resp.status_code == 200 and "refresh_token" not in resp.json()
    org.state.revoke_refresh_token(refresh)
    resp = s.post(
        url,
        data={
            "grant_type": "refresh_token",
            "refresh_token": refresh,
            "client_id": DEFAULT_CLIENT_ID,
        },
        timeout=5,
    )
    assert resp.status_code == 400 and resp.json()["error"] == "invalid_grant"


@pytest.fixture(scope="module")
def rsa_pair() -> tuple[str, str]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    public = (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    return private, public


def test_oauth_jwt_bearer(org: Env, rsa_pair: tuple[str, str]) -> None:
    private, public = rsa_pair
    org.state.add_jwt_client("jwt-consumer-key", public, DEFAULT_USERNAME)
    url = f"{org.server.base_url}/services/oauth2/token"
    s = _session(org.tls)

    def grant(key: str, **claims: Any) -> requests.Response:
        payload = {
            "iss": "jwt-consumer-key",
            "sub": DEFAULT_USERNAME,
            "aud": "https://login.salesforce.com",
            "exp": int(time.time()) + 180,
        }
        payload.update(claims)
        assertion = jwt.encode(payload, key, algorithm="RS256")
        return s.post(
            url,
            data={
                "grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer",
                "assertion": assertion,
            },
            timeout=5,
        )

    ok = grant(private)
    assert ok.status_code == 200 and ok.json()["instance_url"] == org.server.base_url
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    other_pem = other.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    assert grant(other_pem).json()["error"] == "invalid_grant"
    assert grant(private, exp=int(time.time()) - 10).json()["error"] == "invalid_grant"
    assert grant(private, sub="someone@else.example").json()["error"] == "invalid_grant"
    assert grant(private, iss="unknown").json()["error"] == "invalid_client_id"

    # simple-salesforce's own JWT login: it always appends ".salesforce.com" to the host, so a
    # loopback token URL needs the trailing "#" (the suffix becomes a URL fragment).
    sf = Salesforce(
        username=DEFAULT_USERNAME,
        consumer_key="jwt-consumer-key",
        privatekey=private,
        instance_url=f"127.0.0.1:{org.server.port}/services/oauth2/token#",
        session=_session(org.tls),
        version=VERSION,
    )
    assert sf.sf_instance == f"127.0.0.1:{org.server.port}"
    assert sf.query("SELECT COUNT() FROM Opportunity")["totalSize"] > 0


def test_simple_salesforce_soap_login(org: Env) -> None:
    s = _session(org.tls)
    # SalesforceLogin's scratch_url is the supported way to aim the SOAP login elsewhere.
    sid, instance = SalesforceLogin(
        username=DEFAULT_USERNAME,
        password=DEFAULT_PASSWORD,
        security_token=DEFAULT_SECURITY_TOKEN,
        scratch_url=org.server.base_url,
        session=s,
        sf_version=VERSION,
    )
    assert instance == f"127.0.0.1:{org.server.port}"
    sf = Salesforce(instance=instance, session_id=sid, session=s, version=VERSION)
    assert sf.query("SELECT COUNT() FROM Account")["totalSize"] > 0

    with pytest.raises(SalesforceAuthenticationFailed) as exc:
        SalesforceLogin(
            username=DEFAULT_USERNAME,
            password="wrong",
            security_token=DEFAULT_SECURITY_TOKEN,
            scratch_url=org.server.base_url,
            session=s,
        )
    assert exc.value.code == "INVALID_LOGIN"

    # Salesforce(username, password, security_token) builds https://{domain}.salesforce.com;
    # only a domain ending in "#" (turning the suffix into a fragment) reaches loopback. It then
    # re-logs in by itself after a 401 INVALID_SESSION_ID.
    sf = Salesforce(
        username=DEFAULT_USERNAME,
        password=DEFAULT_PASSWORD,
        security_token=DEFAULT_SECURITY_TOKEN,
        domain=f"127.0.0.1:{org.server.port}/services/Soap/u/{VERSION}#",
        session=s,
        version=VERSION,
    )
    first = sf.session_id
    org.state.expire_session(first)
    assert sf.query("SELECT COUNT() FROM Account")["totalSize"] > 0
    assert sf.session_id != first


def test_simple_salesforce_consumer_key_password_login(org: Env) -> None:
    # The connected-app branch sends `password` verbatim: the security token must be appended.
    sf = Salesforce(
        username=DEFAULT_USERNAME,
        password=DEFAULT_PASSWORD + DEFAULT_SECURITY_TOKEN,
        consumer_key=DEFAULT_CLIENT_ID,
        consumer_secret=DEFAULT_CLIENT_SECRET,
        domain=f"127.0.0.1:{org.server.port}/services/oauth2/token#",
        session=_session(org.tls),
        version=VERSION,
    )
    assert sf.sf_instance == f"127.0.0.1:{org.server.port}"
    assert sf.query("SELECT COUNT() FROM Opportunity")["totalSize"] > 0
