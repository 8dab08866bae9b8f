"""The Salesforce connector against the Salesforce emulator over real TLS sockets.

Every connector trusts the emulator's throwaway CA through `ca_bundle` (which also turns off
requests' environment CA overrides). Each test works in its own SystemModstamp window, a year
in the past, so the module-wide org can be shared.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import requests
import trustme
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from pydantic import ValidationError

from connectors.base import DealStatus, DealUpdate
from connectors.errors import ConnectorError, ErrorKind
from connectors.http import RetryPolicy
from connectors.salesforce import SalesforceAuth, SalesforceCRM, SalesforceSettings
from connectors.secrets import redact
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

FAST = RetryPolicy(attempts=6, initial_wait=0.01, max_wait=0.05, max_retry_after=0.05)
TOKEN_ROUTE = "POST /services/oauth2/token"
QUERY_ALL = "GET /services/data/{version}/queryAll"
QUERY_ALL_MORE = "GET /services/data/{version}/queryAll/{locator}"
COLLECTION_PATCH = "PATCH /services/data/{version}/composite/sobjects"
PASSWORD_GRANT = {
    "username": DEFAULT_USERNAME,
    "password": DEFAULT_PASSWORD,
    "security_token": DEFAULT_SECURITY_TOKEN,
    "client_id": DEFAULT_CLIENT_ID,
    "client_secret": DEFAULT_CLIENT_SECRET,
}


@dataclass
class Env:
    state: SalesforceState
    controls: EmulatorControls
    server: LoopbackServer
    tls: TLSFiles
    opened: list[SalesforceCRM] = field(default_factory=list)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tls = TLSFiles.create(str(tmp_path_factory.mktemp("sf-tls")))
    state = SalesforceState()
    state.add_custom_field("Opportunity", "Delivery_Progress__c", "percent")
    state.add_custom_field("Opportunity", "Go_Live__c", "date")
    state.add_custom_field("Opportunity", "Last_Sync__c", "datetime")
    state.add_custom_field("Opportunity", "On_Track__c", "checkbox")
    state.add_custom_field("Opportunity", "Delivery_Note__c", "text")
    state.add_validation_rule(
        "Opportunity",
        "Progress_Range",
        lambda r: (
            r.get("Delivery_Progress__c") is not None and not 0 <= r["Delivery_Progress__c"] <= 100
        ),
        "Delivery progress must be between 0 and 100.",
        "Delivery_Progress__c",
    )
    state.seed(40, random.Random(3))
    controls = EmulatorControls()
    server = LoopbackServer(create_app(state, controls), tls=tls).start()
    e = Env(state, controls, server, tls)
    yield e
    for c in e.opened:  # uvicorn waits for keep-alive connections before stopping
        c.close()
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


def connect(env: Env, auth: dict[str, Any] | None = None, **kw: Any) -> SalesforceCRM:
    kw.setdefault("retry", FAST)
    kw.setdefault("ca_bundle", env.tls.ca_pem)
    kw.setdefault("requests_per_second", 10_000)
    settings = SalesforceSettings(
        kind="salesforce",
        login_url=env.server.base_url,
        auth=SalesforceAuth(**(auth or PASSWORD_GRANT)),
        **kw,
    )
    crm = SalesforceCRM("salesforce", settings)
    env.opened.append(crm)
    return crm


def year(y: int) -> tuple[datetime, datetime]:
    return datetime(y, 1, 1, tzinfo=UTC), datetime(y, 12, 31, 23, 59, 59, tzinfo=UTC)


def opp(state: SalesforceState, name: str, modstamp: datetime, **fields: Any) -> str:
    data = {"Name": name, "StageName": "Prospecting", "CloseDate": "2024-06-30", **fields}
    return state.add_opportunity(data, modstamp=modstamp)


def read_all(crm: SalesforceCRM, y: int, fields: list[str] | None = None) -> list[list[Any]]:
    since, until = year(y)
    return list(crm.read_changed_deals(since, fields or [], until))


# --------------------------------------------------------------------------------------------
# Logins
# --------------------------------------------------------------------------------------------


def test_oauth_password_grant_reads(org: Env) -> None:
    oid = opp(org.state, "Password grant", datetime(2001, 3, 1, tzinfo=UTC))
    crm = connect(org)
    who = crm.check()
    assert org.server.base_url in who and "Opportunity has" in who
    assert DEFAULT_PASSWORD not in who and DEFAULT_CLIENT_SECRET not in who
    assert [d.id for page in read_all(crm, 2001) for d in page] == [oid]
    assert crm.calls["oauth.token"] == 1
    # The session id is registered as a secret: it never reaches logs unmasked.
    assert redact(crm.sf.session_id) == "***"


def test_soap_login_without_connected_app(org: Env) -> None:
    oid = opp(org.state, "SOAP login", datetime(2002, 3, 1, tzinfo=UTC))
    crm = connect(
        org,
        {
            "username": DEFAULT_USERNAME,
            "password": DEFAULT_PASSWORD,
            "security_token": DEFAULT_SECURITY_TOKEN,
        },
    )
    assert [d.id for page in read_all(crm, 2002) for d in page] == [oid]
    assert crm.calls["soap.login"] == 1 and crm.calls["oauth.token"] == 0


def test_refresh_token_grant_reads(org: Env) -> None:
    oid = opp(org.state, "Refresh grant", datetime(2003, 3, 1, tzinfo=UTC))
    refresh = org.state.issue_refresh_token(DEFAULT_CLIENT_ID)
    crm = connect(
        org,
        {
            "client_id": DEFAULT_CLIENT_ID,
            "client_secret": DEFAULT_CLIENT_SECRET,
            "refresh_token": refresh,
        },
    )
    assert [d.id for page in read_all(crm, 2003) for d in page] == [oid]
    assert crm.calls["oauth.token"] == 1


@pytest.fixture(scope="module")
def rsa_pair() -> tuple[str, str]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    public = (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    return private, public


@pytest.mark.parametrize("inline", [True, False])
def test_jwt_bearer_grant_reads(
    org: Env, rsa_pair: tuple[str, str], tmp_path: Path, inline: bool
) -> None:
    private, public = rsa_pair
    org.state.add_jwt_client("handoff-jwt-app", public, DEFAULT_USERNAME)
    oid = opp(org.state, f"JWT grant {inline}", datetime(2004, 3, 1 + inline, tzinfo=UTC))
    auth: dict[str, Any] = {"client_id": "handoff-jwt-app", "username": DEFAULT_USERNAME}
    if inline:
        auth["private_key"] = private
    else:
        key_file = tmp_path / "handoff.key"
        key_file.write_text(private)
        auth["private_key_file"] = str(key_file)
    crm = connect(org, auth)
    assert oid in [d.id for page in read_all(crm, 2004) for d in page]
    assert crm.calls["oauth.token"] == 1


def test_jwt_with_a_key_the_app_does_not_know_is_auth(org: Env, rsa_pair: tuple[str, str]) -> None:
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = other.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    org.state.add_jwt_client("handoff-jwt-other", rsa_pair[1], DEFAULT_USERNAME)
    crm = connect(
        org, {"client_id": "handoff-jwt-other", "username": DEFAULT_USERNAME, "private_key": pem}
    )
    with pytest.raises(ConnectorError) as exc:
        crm.field_names()
    assert exc.value.kind is ErrorKind.AUTH and "invalid_grant" in exc.value.message


@pytest.mark.parametrize(
    ("auth", "message"),
    [
        ({}, "none of password"),
        ({**PASSWORD_GRANT, "refresh_token": "r"}, "password and refresh_token"),
        ({"password": "p"}, "needs username"),
        ({"username": "u", "password": "p", "client_id": "c"}, "both client_id and client_secret"),
        ({"refresh_token": "r"}, "needs client_id"),
        ({"client_id": "c", "private_key": "k"}, "needs client_id and username"),
        (
            {"client_id": "c", "username": "u", "private_key": "k", "private_key_file": "f"},
            "not both",
        ),
        ({"client_id": "c", "refresh_token": "r", "security_token": "t"}, "security_token"),
        ({**PASSWORD_GRANT, "token": "x"}, "Extra inputs"),
    ],
)
def test_auth_settings_need_exactly_one_login(auth: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError) as exc:
        SalesforceAuth(**auth)
    assert message in str(exc.value)


def test_wrong_password_is_auth_and_not_retried(org: Env) -> None:
    crm = connect(org, {**PASSWORD_GRANT, "password": "wrong"})
    with pytest.raises(ConnectorError) as exc:
        crm.check()
    assert exc.value.kind is ErrorKind.AUTH
    assert "invalid_grant" in exc.value.message and "wrong" not in str(exc.value)
    assert crm.calls["oauth.token"] == 1
    assert org.controls.stats.by_route[TOKEN_ROUTE] == 1


def test_expired_session_logs_in_once_and_retries(org: Env) -> None:
    oid = opp(org.state, "Expiry", datetime(2005, 3, 1, tzinfo=UTC))
    refresh = org.state.issue_refresh_token(DEFAULT_CLIENT_ID)
    crm = connect(
        org,
        {
            "client_id": DEFAULT_CLIENT_ID,
            "client_secret": DEFAULT_CLIENT_SECRET,
            "refresh_token": refresh,
        },
    )
    assert read_all(crm, 2005)[0][0].id == oid
    first = crm.sf.session_id
    org.state.expire_session(first)
    assert read_all(crm, 2005)[0][0].id == oid
    assert crm.calls["oauth.token"] == 2 and crm.sf.session_id != first
    assert crm.calls["queryAll"] == 3  # the refused query, then its repeat

    # Session expired and the refresh token revoked: AUTH, after exactly one login attempt.
    org.state.revoke_refresh_token(refresh)
    org.state.expire_session(crm.sf.session_id)
    with pytest.raises(ConnectorError) as exc:
        read_all(crm, 2005)
    assert exc.value.kind is ErrorKind.AUTH
    assert crm.calls["oauth.token"] == 3


def test_untrusted_ca_is_refused(org: Env, tmp_path: Path) -> None:
    # Without ca_bundle the machine's CA bundle applies, which does not hold the sandbox CA.
    crm = connect(org, ca_bundle=None)
    with pytest.raises(ConnectorError) as exc:
        crm.check()
    assert exc.value.kind is ErrorKind.UNREACHABLE and "TLS verification failed" in str(exc.value)
    assert crm.calls["oauth.token"] == 1  # a certificate problem is not retried
    other_ca = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other_ca))
    crm = connect(org, ca_bundle=str(other_ca))
    with pytest.raises(ConnectorError) as exc:
        crm.check()
    assert exc.value.kind is ErrorKind.UNREACHABLE


# --------------------------------------------------------------------------------------------
# Reads
# --------------------------------------------------------------------------------------------


def test_reads_4500_deals_across_query_more_batches_each_once(org: Env) -> None:
    base = datetime(2010, 2, 1, tzinfo=UTC)
    tie = base + timedelta(seconds=1850)
    ids = []
    for i in range(4500):
        # 300 deals (positions 1850..2149) share one SystemModstamp across the 2,000 boundary.
        stamp = tie if 1850 <= i < 2150 else base + timedelta(seconds=i)
        ids.append(opp(org.state, f"Bulk {i:04d}", stamp))
    crm = connect(org)
    crm.check()
    org.controls.reset_stats()

    pages = read_all(crm, 2010)
    assert [len(p) for p in pages] == [2000, 2000, 500]
    deals = [d for p in pages for d in p]
    got = [d.id for d in deals]
    assert len(got) == len(set(got)) == 4500 and set(got) == set(ids)
    assert [d.cursor for d in deals] == sorted(d.cursor for d in deals)
    assert sum(1 for d in deals if d.modified_at == tie) == 300
    assert crm.calls["queryAll"] == 1 and crm.calls["queryAll.more"] == 2
    assert org.controls.stats.by_route[QUERY_ALL] == 1
    assert org.controls.stats.by_route[QUERY_ALL_MORE] == 2


def test_expired_query_cursor_re_anchors_inside_a_tie(org: Env) -> None:
    base = datetime(2011, 2, 1, tzinfo=UTC)
    tie = base + timedelta(seconds=150)
    ids = [
        opp(org.state, f"Anchor {i}", tie if 150 <= i < 290 else base + timedelta(seconds=i))
        for i in range(500)
    ]
    crm = connect(org, query_batch_size=200)
    seen = []
    since, until = year(2011)
    for page in crm.read_changed_deals(since, [], until):
        seen += page
        # The engine took 16 minutes over this page: the query cursor expired meanwhile.
        org.state.clock_offset += timedelta(minutes=16)
    got = [d.id for d in seen]
    assert len(got) == len(set(got)) == 500 and set(got) == set(ids)
    assert [d.cursor for d in seen] == sorted(d.cursor for d in seen)
    # One re-anchored query per expired cursor instead of a queryMore.
    assert crm.calls["queryAll"] == 3 and crm.calls["queryAll.more"] == 2


def test_since_is_inclusive_and_until_bounds(org: Env) -> None:
    t = datetime(2012, 5, 5, 12, 0, 0, tzinfo=UTC)
    before = opp(org.state, "Before", t - timedelta(seconds=1))
    at = opp(org.state, "At", t)
    after = opp(org.state, "After", t + timedelta(seconds=1))
    crm = connect(org)

    def ids(since: datetime, until: datetime | None) -> list[str]:
        return [d.id for p in crm.read_changed_deals(since, [], until) for d in p]

    end = datetime(2012, 12, 31, tzinfo=UTC)
    assert ids(t, end) == [at, after]
    assert ids(t + timedelta(milliseconds=1), end) == [at, after]  # second precision
    assert ids(t + timedelta(seconds=1), end) == [after]
    assert ids(datetime(2012, 1, 1, tzinfo=UTC), t) == [before, at]


def test_won_is_is_won_including_a_custom_stage(org: Env) -> None:
    s = org.state
    account = s.add_account({"Name": "Status Works Ltd"})
    t = datetime(2013, 4, 1, tzinfo=UTC)
    won = opp(s, "Won", t, StageName="Closed Won", AccountId=account, Amount=1200)
    custom = opp(s, "Custom", t + timedelta(seconds=1), StageName=CUSTOM_WON_STAGE)
    lost = opp(s, "Lost", t + timedelta(seconds=2), StageName="Closed Lost")
    open_ = opp(s, "Open", t + timedelta(seconds=3), StageName="Negotiation/Review")
    gone = opp(s, "Gone", t + timedelta(seconds=4), StageName="Closed Won")
    s.delete_opportunity(gone)  # deleting bumps SystemModstamp to now
    crm = connect(org)
    deals = {
        d.id: d
        for p in crm.read_changed_deals(t, ["amount", "closedate", "Account.Name"])
        for d in p
    }
    assert deals[won].status is DealStatus.WON
    assert deals[custom].status is DealStatus.WON
    assert deals[custom].properties["StageName"] == CUSTOM_WON_STAGE
    assert deals[lost].status is DealStatus.LOST
    assert deals[open_].status is DealStatus.OPEN
    assert deals[gone].status is DealStatus.DELETED  # from queryAll's Recycle Bin rows
    props = deals[won].properties
    assert props["amount"] == props["Amount"] == 1200.0
    assert props["closedate"] == "2024-06-30"
    assert props["Account.Name"] == "Status Works Ltd"
    assert deals[custom].properties["Account.Name"] is None
    assert deals[won].url == f"{org.server.base_url}/lightning/r/Opportunity/{won}/view"
    assert deals[won].modified_at == t


def test_unknown_field_is_a_clear_error(org: Env) -> None:
    crm = connect(org)
    with pytest.raises(ConnectorError) as exc:
        read_all(crm, 2014, ["Amount", "Bogus__c"])
    assert exc.value.kind is ErrorKind.RECORD
    assert "Bogus__c" in exc.value.message and "INVALID_FIELD" in exc.value.message
    assert crm.calls["queryAll"] == 1
    with pytest.raises(ConnectorError, match="not a Salesforce field name"):
        read_all(crm, 2014, ["Amount FROM Account --"])


def test_get_deals_in_batches(org: Env) -> None:
    s = org.state
    account = s.add_account({"Name": "Get Deals GmbH"})
    t = datetime(2015, 1, 1, tzinfo=UTC)
    ids = [opp(s, f"Get {i}", t, AccountId=account, Amount=i) for i in range(5)]
    s.delete_opportunity(ids[4])
    crm = connect(org)
    missing = "006Dn0000000000IAA"
    deals = crm.get_deals([*ids, missing], ["Amount"])
    assert [d.id for d in deals] == ids[:4]
    assert [d.properties["Amount"] for d in deals] == [0.0, 1.0, 2.0, 3.0]
    assert crm.calls["composite.sobjects.retrieve"] == 1
    # A relationship path needs SOQL.
    deals = crm.get_deals(ids, ["Account.Name"])
    assert {d.properties["Account.Name"] for d in deals} == {"Get Deals GmbH"}
    assert {d.status for d in deals} == {DealStatus.OPEN, DealStatus.DELETED}
    assert crm.calls["queryAll"] == 1
    with pytest.raises(ConnectorError, match="not a record id"):
        crm.get_deals(["x' OR Name != '"], ["Amount"])


def test_field_names_from_describe(org: Env) -> None:
    names = connect(org).field_names()
    assert {"Name", "StageName", "IsWon", "Delivery_Progress__c", "Go_Live__c"} <= names


# --------------------------------------------------------------------------------------------
# Writes
# --------------------------------------------------------------------------------------------


def test_write_450_updates_in_three_collection_calls_one_parked(org: Env) -> None:
    t = datetime(2016, 1, 1, tzinfo=UTC)
    ids = [opp(org.state, f"Write {i}", t, StageName="Closed Won") for i in range(450)]
    crm = connect(org)
    crm.field_names()
    org.controls.reset_stats()
    updates = [DealUpdate(d, {"Delivery_Progress__c": 40}) for d in ids]
    updates[123] = DealUpdate(ids[123], {"Delivery_Progress__c": 150})  # validation rule
    outcomes = crm.write_deal_fields(updates)
    assert [o.record_id for o in outcomes] == ids
    failed = [o for o in outcomes if not o.ok]
    assert [o.record_id for o in failed] == [ids[123]]
    assert failed[0].error is not None
    assert "FIELD_CUSTOM_VALIDATION_EXCEPTION" in failed[0].error
    assert "between 0 and 100" in failed[0].error and "Delivery_Progress__c" in failed[0].error
    assert crm.calls["composite.sobjects.update"] == 3
    assert org.controls.stats.by_route[COLLECTION_PATCH] == 3
    assert org.state.opportunity(ids[0])["Delivery_Progress__c"] == 40.0
    assert org.state.opportunity(ids[123])["Delivery_Progress__c"] is None


def test_values_are_coerced_to_what_salesforce_accepts(org: Env) -> None:
    oid = opp(org.state, "Coerce", datetime(2017, 1, 1, tzinfo=UTC))
    crm = connect(org)
    when = datetime(2024, 7, 1, 9, 30, 15, 250_000, tzinfo=UTC)
    [outcome] = crm.write_deal_fields(
        [
            DealUpdate(
                oid,
                {
                    "delivery_progress__c": Decimal("62.5"),
                    "Go_Live__c": when,  # a datetime into a date field: its date
                    "Last_Sync__c": date(2024, 7, 2),  # a date into a datetime: midnight UTC
                    "On_Track__c": "yes",
                    "Delivery_Note__c": 3,
                },
            )
        ]
    )
    assert outcome.ok, outcome.error
    rec = org.state.opportunity(oid)
    assert rec["Delivery_Progress__c"] == 62.5
    assert rec["Go_Live__c"] == date(2024, 7, 1)
    assert rec["Last_Sync__c"] == datetime(2024, 7, 2, tzinfo=UTC)
    assert rec["On_Track__c"] is True and rec["Delivery_Note__c"] == "3"
    [bad] = crm.write_deal_fields([DealUpdate(oid, {"No_Such_Field__c": 1})])
    assert not bad.ok and bad.error and "INVALID_FIELD" in bad.error


def test_timeline_entry_is_a_completed_task(org: Env) -> None:
    oid = opp(org.state, "Timeline", datetime(2018, 1, 1, tzinfo=UTC), StageName="Closed Won")
    crm = connect(org)
    crm.add_timeline_entry(oid, "Milestone done: Kickoff\nCompleted in Asana by Priya.")
    [task] = org.state.tasks_for(oid)
    assert task["Subject"] == "Milestone done: Kickoff"
    assert task["Status"] == "Completed" and task["IsClosed"] is True
    assert task["Description"] == "Milestone done: Kickoff\nCompleted in Asana by Priya."
    assert task["ActivityDate"] == datetime.now(UTC).date()
    back = crm.sf.query(f"SELECT Id, Subject, Status FROM Task WHERE WhatId = '{oid}'")
    assert [r["Subject"] for r in back["records"]] == ["Milestone done: Kickoff"]
    assert crm.calls["Task.create"] == 1


# --------------------------------------------------------------------------------------------
# Faults and limits
# --------------------------------------------------------------------------------------------


def test_5xx_faults_are_retried(org: Env) -> None:
    t = datetime(2019, 1, 1, tzinfo=UTC)
    ids = [opp(org.state, f"Flaky {i}", t + timedelta(seconds=i % 7)) for i in range(450)]
    org.controls.set_faults(rate_5xx=0.3, seed=1)
    crm = connect(org, query_batch_size=200)
    deals = [d for p in read_all(crm, 2019, ["Amount"]) for d in p]
    assert sorted(d.id for d in deals) == sorted(ids)
    outcomes = crm.write_deal_fields([DealUpdate(d, {"Delivery_Progress__c": 10}) for d in ids])
    assert all(o.ok for o in outcomes)
    assert org.controls.stats.faults > 0
    assert crm.api_calls > 1 + 3 + 1 + 3  # token, 3 query batches, describe, 3 writes
    assert all(org.state.opportunity(i)["Delivery_Progress__c"] == 10.0 for i in ids)


def test_timeline_create_is_not_blindly_retried(org: Env) -> None:
    oid = opp(org.state, "Once", datetime(2018, 6, 1, tzinfo=UTC))
    crm = connect(org)
    crm.check()
    org.controls.set_faults(rate_5xx=1.0, seed=2)
    with pytest.raises(ConnectorError) as exc:
        crm.add_timeline_entry(oid, "may or may not have been saved")
    # A 5xx may come after the insert committed: a create is left to the engine to park.
    assert exc.value.kind is ErrorKind.TRANSIENT and crm.calls["Task.create"] == 1


def test_request_limit_exceeded_is_transient_with_a_wait(org: Env) -> None:
    crm = connect(org, near_limit_requests_per_second=1000)
    crm.check()  # login + describe
    org.state.daily_api_limit = 3
    org.controls.set_rate_limits(True)
    crm.field_names()  # 1 of 3
    # Another integration spends the rest of the org's allocation.
    other = requests.Session()
    other.trust_env = False
    other.verify = org.tls.ca_pem
    headers = {"Authorization": f"Bearer {org.state.issue_session()}"}
    for _ in range(2):
        other.get(f"{org.server.base_url}/services/data/v59.0/limits", headers=headers, timeout=5)
    other.close()

    with pytest.raises(ConnectorError) as exc:
        crm.field_names()
    assert exc.value.kind is ErrorKind.TRANSIENT and exc.value.status == 403
    assert "REQUEST_LIMIT_EXCEEDED" in exc.value.message
    assert crm.calls["describe.Opportunity"] == 2 + FAST.attempts  # retried, not AUTH
    assert org.controls.stats.throttled == FAST.attempts
    assert crm.api_usage == (3, 3)

    # Until the reading is old, further calls stop before reaching Salesforce.
    with pytest.raises(ConnectorError) as exc:
        crm.field_names()
    assert exc.value.kind is ErrorKind.TRANSIENT and "nearly spent" in exc.value.message
    assert org.controls.stats.throttled == FAST.attempts

    # The rolling window frees requests: a later run (a fresh reading) goes on.
    org.state.daily_api_limit = 1000
    crm._usage_read_at -= crm.settings.api_usage_recheck_seconds
    assert "Name" in crm.field_names()


def test_stops_short_of_the_allocation(org: Env) -> None:
    org.state.daily_api_limit = 10
    org.controls.set_rate_limits(True)
    crm = connect(
        org, api_usage_stop_at=0.5, api_usage_slow_at=0.3, near_limit_requests_per_second=1000
    )
    for _ in range(5):
        crm.field_names()
    assert crm.api_usage == (5, 10)
    with pytest.raises(ConnectorError) as exc:
        crm.field_names()
    assert exc.value.kind is ErrorKind.TRANSIENT and "stops at 50%" in exc.value.message
    assert crm.calls["describe.Opportunity"] == 5 and org.controls.stats.throttled == 0
