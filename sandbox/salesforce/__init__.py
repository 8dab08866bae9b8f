"""A local, stateful emulator of the Salesforce REST API (Opportunity, OpportunityStage, Account,
User, Task), its OAuth 2.0 token endpoint and the SOAP `login()` call.

Handoff's tests, benchmarks and demo run against it instead of a real org. It follows what
Salesforce documents (and what `simple-salesforce` expects) rather than what our connector would
find convenient:

- errors are JSON arrays ``[{"message", "errorCode", "fields"}]``; a bad or expired session is a
  401 ``INVALID_SESSION_ID``; the exhausted daily API allocation is a **403**
  ``REQUEST_LIMIT_EXCEEDED`` (not a 429) and carries no Retry-After;
- every REST response carries ``Sforce-Limit-Info: api-usage=N/LIMIT``;
- query results come in batches of 2,000 (``Sforce-Query-Options: batchSize`` 200..2,000) with a
  *relative* ``nextRecordsUrl``; cursors snapshot the result, expire after 15 idle minutes and a
  user keeps at most 10 open;
- datetimes have second precision (``2024-01-15T10:23:45.000+0000``), so records written in the
  same second share a SystemModstamp, and equal ORDER BY keys come back in an order unrelated to
  Id: only ``ORDER BY SystemModstamp, Id`` pages deterministically;
- IsWon / IsClosed are read-only and derive from the stage's OpportunityStage row, never from
  the stage's name (the seeded org has a custom won stage "Signed - Delivery").

Main references (cited again above each endpoint):
- REST API guide: https://developer.salesforce.com/docs/atlas.en-us.api_rest.meta/api_rest/
- Status codes and errors: https://developer.salesforce.com/docs/atlas.en-us.api_rest.meta/api_rest/errorcodes.htm
- API limits: https://developer.salesforce.com/docs/atlas.en-us.salesforce_app_limits_cheatsheet.meta/salesforce_app_limits_cheatsheet/salesforce_app_limits_platform_api.htm
- OAuth flows: https://help.salesforce.com/s/articleView?id=sf.remoteaccess_oauth_flows.htm
- SOAP login(): https://developer.salesforce.com/docs/atlas.en-us.api.meta/api/sforce_api_calls_login.htm
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import random
import re
import secrets
import string
import threading
import time
import urllib.parse
import xml.etree.ElementTree as ET
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any
from xml.sax.saxutils import escape as xml_escape

import jwt
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp

from sandbox.common import EmulatorControls, EmulatorMiddleware, RateLimitConfig, Window
from sandbox.salesforce import soql

__all__ = [
    "DEFAULT_CLIENT_ID",
    "DEFAULT_CLIENT_SECRET",
    "DEFAULT_PASSWORD",
    "DEFAULT_SECURITY_TOKEN",
    "DEFAULT_USERNAME",
    "CUSTOM_WON_STAGE",
    "RecordError",
    "SalesforceFlavor",
    "SalesforceState",
    "create_app",
]

# --------------------------------------------------------------------------------------------
# Documented limits and constants
# --------------------------------------------------------------------------------------------

# https://developer.salesforce.com/docs/atlas.en-us.salesforce_app_limits_cheatsheet.meta/salesforce_app_limits_cheatsheet/salesforce_app_limits_platform_api.htm
# Enterprise Edition: 100,000 requests per rolling 24 hours + 1,000 per Salesforce licence.
# Over the allocation the API answers 403 REQUEST_LIMIT_EXCEEDED. (The concurrent limit of 25
# requests running >= 20 s is not modelled: emulator requests never run that long.)
EDITION_BASE_DAILY_REQUESTS = 100_000
PER_LICENSE_DAILY_REQUESTS = 1_000
DAILY_SECONDS = 86_400.0
# https://developer.salesforce.com/docs/atlas.en-us.api_rest.meta/api_rest/headers_queryoptions.htm
# "The default is 2,000; the minimum is 200, and the maximum is 2,000."
QUERY_BATCH_DEFAULT = 2000
QUERY_BATCH_MIN = 200
QUERY_BATCH_MAX = 2000
# https://developer.salesforce.com/docs/atlas.en-us.soql_sosl.meta/soql_sosl/sforce_api_calls_soql_select_limits.htm
# Query cursors: 10 open per user (the oldest is released), 15 minutes of inactivity expire one.
CURSORS_PER_USER = 10
CURSOR_IDLE = timedelta(minutes=15)
# https://developer.salesforce.com/docs/atlas.en-us.api_rest.meta/api_rest/resources_composite_sobjects_collections.htm
# "The list can contain up to 200 objects." (GET/retrieve: up to 2,000 ids.)
COLLECTION_MAX = 200
COLLECTION_RETRIEVE_MAX = 2000
# Session Settings default "Timeout value": 2 hours of inactivity.
SESSION_TTL = timedelta(hours=2)
# https://developer.salesforce.com/docs/atlas.en-us.api_rest.meta/api_rest/resources_getupdated.htm
# getUpdated/getDeleted look back at most 30 days.
REPLICATION_WINDOW = timedelta(days=30)

LATEST_VERSION = 62.0
OLDEST_VERSION = 31.0
ORG_PREFIX = "00D"
PREFIXES = {
    "Opportunity": "006",
    "Account": "001",
    "User": "005",
    "Task": "00T",
    "OpportunityStage": "01J",
}
QUERY_LOCATOR_PREFIX = "01g"

DEFAULT_USERNAME = "integration@handoff-sandbox.example"
DEFAULT_PASSWORD = "sandbox-password"
DEFAULT_SECURITY_TOKEN = "SANDBOXTOKEN1234567890"
DEFAULT_CLIENT_ID = "3MVG9sandbox.handoff.consumer.key"
DEFAULT_CLIENT_SECRET = "sandbox-consumer-secret"
CUSTOM_WON_STAGE = "Signed - Delivery"

# https://developer.salesforce.com/docs/atlas.en-us.object_reference.meta/object_reference/sforce_api_objects_opportunitystage.htm
# (label, sort order, IsClosed, IsWon, DefaultProbability, ForecastCategoryName)
STANDARD_STAGES: tuple[tuple[str, int, bool, bool, float, str], ...] = (
    ("Prospecting", 1, False, False, 10.0, "Pipeline"),
    ("Qualification", 2, False, False, 10.0, "Pipeline"),
    ("Needs Analysis", 3, False, False, 20.0, "Pipeline"),
    ("Value Proposition", 4, False, False, 50.0, "Pipeline"),
    ("Id. Decision Makers", 5, False, False, 60.0, "Pipeline"),
    ("Perception Analysis", 6, False, False, 70.0, "Pipeline"),
    ("Proposal/Price Quote", 7, False, False, 75.0, "Pipeline"),
    ("Negotiation/Review", 8, False, False, 90.0, "Pipeline"),
    ("Closed Won", 9, True, True, 100.0, "Closed"),
    ("Closed Lost", 10, True, False, 0.0, "Omitted"),
)

_B62 = string.digits + string.ascii_uppercase + string.ascii_lowercase
_CHECKSUM_CHARS = string.ascii_uppercase + "012345"
_VERSION_RE = r"v(?P<version>\d{2}\.\d)"


# --------------------------------------------------------------------------------------------
# Ids, clocks and formats
# --------------------------------------------------------------------------------------------


def _checksum(id15: str) -> str:
    """The 3-character suffix that makes a 15-character id case-insensitively unique."""
    out = ""
    for chunk in (id15[0:5], id15[5:10], id15[10:15]):
        bits = sum(1 << i for i, ch in enumerate(chunk) if "A" <= ch <= "Z")
        out += _CHECKSUM_CHARS[bits]
    return out


def _canonical_id(value: Any) -> str | None:
    """The 18-character form of a 15- or 18-character id, or None if malformed."""
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9]{15}(?:[A-Za-z0-9]{3})?", value):
        return None
    suffix = _checksum(value[:15])
    if len(value) == 18 and value[15:].upper() != suffix:
        return None
    return value[:15] + suffix


def _iso(dt: datetime) -> str:
    """Salesforce's REST dateTime format: UTC, ".000" millis, "+0000" offset without colon."""
    dt = dt.astimezone(UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}+0000"


def _trunc(dt: datetime) -> datetime:
    # Salesforce keeps dateTime values to the second: records saved within one second share
    # their SystemModstamp.
    return dt.astimezone(UTC).replace(microsecond=0)


def _out(value: Any) -> Any:
    if isinstance(value, datetime):
        return _iso(value)
    if isinstance(value, date):
        return value.isoformat()
    return value


def _versions() -> list[dict[str, str]]:
    # https://developer.salesforce.com/docs/atlas.en-us.api_rest.meta/api_rest/resources_versions.htm
    out = []
    v = int(OLDEST_VERSION)
    while v <= int(LATEST_VERSION):
        season = ("Spring", "Summer", "Winter")[(v - 60) % 3]
        year = 2024 + (v - 60) // 3 + (1 if season == "Winter" else 0)
        out.append(
            {
                "label": f"{season} '{year % 100:02d}",
                "url": f"/services/data/v{v}.0",
                "version": f"{v}.0",
            }
        )
        v += 1
    return out


# --------------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------------

_SOAP_TYPES = {
    "id": "tns:ID",
    "reference": "tns:ID",
    "currency": "xsd:double",
    "double": "xsd:double",
    "percent": "xsd:double",
    "int": "xsd:int",
    "boolean": "xsd:boolean",
    "date": "xsd:date",
    "datetime": "xsd:dateTime",
}
_CUSTOM_TYPES = {
    "percent": "percent",
    "currency": "currency",
    "number": "double",
    "double": "double",
    "int": "int",
    "text": "string",
    "string": "string",
    "textarea": "textarea",
    "longtextarea": "textarea",
    "checkbox": "boolean",
    "boolean": "boolean",
    "date": "date",
    "datetime": "datetime",
    "picklist": "picklist",
    "url": "url",
    "email": "email",
    "phone": "phone",
}


@dataclass
class FieldDef:
    name: str
    type: str
    label: str
    createable: bool = True
    updateable: bool = True
    nillable: bool = True
    custom: bool = False
    length: int = 0
    reference_to: tuple[str, ...] = ()
    relationship_name: str | None = None
    external_id: bool = False
    unique: bool = False
    picklist: tuple[str, ...] = ()
    restricted: bool = False
    required: bool = False  # required on create (nillable False and not defaulted)

    def describe(self, state: SalesforceState) -> dict[str, Any]:
        values = state._picklist_values(self)
        numeric = self.type in soql.NUMBER_TYPES
        return {
            "name": self.name,
            "label": self.label,
            "type": self.type,
            "soapType": _SOAP_TYPES.get(self.type, "xsd:string"),
            "custom": self.custom,
            "createable": self.createable,
            "updateable": self.updateable,
            "nillable": self.nillable,
            "defaultedOnCreate": self.name in ("Id", "OwnerId", "IsDeleted", "CreatedDate")
            or (not self.createable and not self.nillable),
            "calculated": False,
            "externalId": self.external_id,
            "idLookup": self.name == "Id" or self.external_id,
            "unique": self.unique,
            "length": self.length if self.type in soql.TEXT_TYPES else 0,
            "precision": 18 if numeric else 0,
            "scale": 2 if numeric and self.type != "int" else 0,
            "digits": 9 if self.type == "int" else 0,
            "filterable": True,
            "sortable": self.type != "textarea",
            "groupable": self.type not in ("textarea", "currency", "double", "percent"),
            "referenceTo": list(self.reference_to),
            "relationshipName": self.relationship_name,
            "restrictedPicklist": self.restricted,
            "picklistValues": [
                {
                    "active": True,
                    "defaultValue": False,
                    "label": v,
                    "validFor": None,
                    "value": v,
                }
                for v in values
            ],
        }


@dataclass
class SObjectDef:
    name: str
    label: str
    plural: str
    prefix: str
    fields: dict[str, FieldDef] = field(default_factory=dict)  # lower name -> def
    createable: bool = True
    updateable: bool = True
    deletable: bool = True

    def add(self, f: FieldDef) -> None:
        self.fields[f.name.lower()] = f

    def get(self, name: str) -> FieldDef | None:
        return self.fields.get(name.lower())


def _f(name: str, ftype: str, label: str | None = None, **kw: Any) -> FieldDef:
    length = kw.pop("length", 255 if ftype in soql.TEXT_TYPES else 0)
    if ftype in ("id", "reference"):
        length = 18
    return FieldDef(name=name, type=ftype, label=label or name, length=length, **kw)


def _system_fields(include_deleted: bool = True) -> list[FieldDef]:
    ro = {"createable": False, "updateable": False}
    out = [_f("Id", "id", "Record ID", nillable=False, **ro)]
    if include_deleted:
        out.append(_f("IsDeleted", "boolean", "Deleted", nillable=False, **ro))
    return out


def _audit_fields() -> list[FieldDef]:
    ro = {"createable": False, "updateable": False, "nillable": False}
    user = {"reference_to": ("User",)}
    return [
        _f("CreatedDate", "datetime", "Created Date", **ro),
        _f(
            "CreatedById", "reference", "Created By ID", relationship_name="CreatedBy", **user, **ro
        ),
        _f("LastModifiedDate", "datetime", "Last Modified Date", **ro),
        _f(
            "LastModifiedById",
            "reference",
            "Last Modified By ID",
            relationship_name="LastModifiedBy",
            **user,
            **ro,
        ),
        _f("SystemModstamp", "datetime", "System Modstamp", **ro),
    ]


def _owner() -> FieldDef:
    return _f(
        "OwnerId",
        "reference",
        "Owner ID",
        reference_to=("User",),
        relationship_name="Owner",
        nillable=False,
    )


def _build_schema() -> dict[str, SObjectDef]:
    """Standard fields per the Object Reference (the subset Handoff and its tests touch).

    https://developer.salesforce.com/docs/atlas.en-us.object_reference.meta/object_reference/sforce_api_objects_opportunity.htm
    """
    ro = {"createable": False, "updateable": False}
    opp = SObjectDef("Opportunity", "Opportunity", "Opportunities", PREFIXES["Opportunity"])
    for f in [
        *_system_fields(),
        _f(
            "AccountId",
            "reference",
            "Account ID",
            reference_to=("Account",),
            relationship_name="Account",
        ),
        _f("Name", "string", "Name", length=120, nillable=False, required=True),
        _f("Description", "textarea", "Description", length=32000),
        _f("StageName", "picklist", "Stage", length=255, nillable=False, required=True),
        _f("Amount", "currency", "Amount"),
        _f("Probability", "percent", "Probability (%)"),
        _f("CloseDate", "date", "Close Date", nillable=False, required=True),
        _f(
            "Type",
            "picklist",
            "Opportunity Type",
            picklist=("Existing Customer - Upgrade", "Existing Customer - Replacement")
            + ("Existing Customer - Downgrade", "New Customer"),
        ),
        _f("NextStep", "string", "Next Step"),
        _f(
            "LeadSource",
            "picklist",
            "Lead Source",
            picklist=("Web", "Phone Inquiry", "Partner Referral", "Purchased List", "Other"),
        ),
        _f("IsClosed", "boolean", "Closed", nillable=False, **ro),
        _f("IsWon", "boolean", "Won", nillable=False, **ro),
        _f(
            "ForecastCategoryName",
            "picklist",
            "Forecast Category",
            picklist=("Omitted", "Pipeline", "Best Case", "Commit", "Closed"),
        ),
        _owner(),
        *_audit_fields(),
    ]:
        opp.add(f)

    acct = SObjectDef("Account", "Account", "Accounts", PREFIXES["Account"])
    for f in [
        *_system_fields(),
        _f("Name", "string", "Account Name", nillable=False, required=True),
        _f(
            "Type",
            "picklist",
            "Account Type",
            picklist=("Prospect", "Customer - Direct", "Customer - Channel", "Partner", "Other"),
        ),
        _f(
            "Industry",
            "picklist",
            "Industry",
            picklist=("Technology", "Manufacturing", "Healthcare", "Finance", "Retail")
            + ("Education", "Energy", "Media", "Consulting", "Other"),
        ),
        _f("Website", "url", "Website"),
        _f("Phone", "phone", "Account Phone", length=40),
        _f("BillingCity", "string", "Billing City", length=40),
        _owner(),
        *_audit_fields(),
    ]:
        acct.add(f)

    user = SObjectDef("User", "User", "Users", PREFIXES["User"], createable=False, deletable=False)
    for f in [
        *_system_fields(include_deleted=False),
        _f("Username", "string", "Username", length=80, nillable=False, **ro),
        _f("FirstName", "string", "First Name", length=40),
        _f("LastName", "string", "Last Name", length=80, nillable=False),
        _f("Name", "string", "Full Name", length=121, nillable=False, **ro),
        _f("Email", "email", "Email", length=128, nillable=False),
        _f("IsActive", "boolean", "Active", nillable=False),
        *_audit_fields(),
    ]:
        user.add(f)

    task = SObjectDef("Task", "Task", "Tasks", PREFIXES["Task"])
    for f in [
        *_system_fields(),
        _f(
            "WhatId",
            "reference",
            "Related To ID",
            reference_to=("Opportunity", "Account"),
            relationship_name="What",
        ),
        _f("Subject", "combobox", "Subject"),
        _f("ActivityDate", "date", "Due Date Only"),
        _f(
            "Status",
            "picklist",
            "Status",
            nillable=False,
            restricted=True,
            picklist=("Not Started", "In Progress", "Completed", "Waiting on someone else")
            + ("Deferred",),
        ),
        _f(
            "Priority",
            "picklist",
            "Priority",
            nillable=False,
            restricted=True,
            picklist=("High", "Normal", "Low"),
        ),
        _f("IsClosed", "boolean", "Closed", nillable=False, **ro),
        _f("Description", "textarea", "Description", length=32000),
        _owner(),
        *_audit_fields(),
    ]:
        task.add(f)

    stage = SObjectDef(
        "OpportunityStage",
        "Opportunity Stage",
        "Opportunity Stages",
        PREFIXES["OpportunityStage"],
        createable=False,
        updateable=False,
        deletable=False,
    )
    for f in [
        *_system_fields(include_deleted=False),
        _f("MasterLabel", "string", "Master Label", **ro),
        _f("ApiName", "string", "Api Name", **ro),
        _f("IsActive", "boolean", "Active", nillable=False, **ro),
        _f("SortOrder", "int", "Sort Order", **ro),
        _f("IsClosed", "boolean", "Closed", nillable=False, **ro),
        _f("IsWon", "boolean", "Won", nillable=False, **ro),
        _f("DefaultProbability", "percent", "Probability (%)", **ro),
        _f(
            "ForecastCategoryName",
            "picklist",
            "Forecast Category",
            picklist=("Omitted", "Pipeline", "Best Case", "Commit", "Closed"),
            **ro,
        ),
        _f("Description", "string", "Description", **ro),
        *_audit_fields(),
    ]:
        stage.add(f)
    return {o.name: o for o in (opp, acct, user, task, stage)}


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


class RecordError(Exception):
    """One record's save failure (REST: `errorCode`; collections: `statusCode`)."""

    def __init__(
        self, code: str, message: str, fields: Iterable[str] = (), status: int = 400
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.fields = list(fields)
        self.status = status

    def rest(self) -> dict[str, Any]:
        return {"message": self.message, "errorCode": self.code, "fields": self.fields}

    def collection(self) -> dict[str, Any]:
        return {"statusCode": self.code, "message": self.message, "fields": self.fields}


class ApiError(Exception):
    """Raised inside a handler; becomes Salesforce's JSON-array error body."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        fields: Iterable[str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.fields = list(fields) if fields is not None else None

    def response(self) -> Response:
        # https://developer.salesforce.com/docs/atlas.en-us.api_rest.meta/api_rest/errorcodes.htm
        body: dict[str, Any] = {"message": self.message, "errorCode": self.code}
        if self.fields is not None:
            body["fields"] = self.fields
        return _json([body], self.status)


def _json(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return JSONResponse(
        payload, status_code=status, headers=headers, media_type="application/json;charset=UTF-8"
    )


def _not_found() -> ApiError:
    return ApiError(404, "NOT_FOUND", "The requested resource does not exist")


def _invalid_session() -> ApiError:
    return ApiError(401, "INVALID_SESSION_ID", "Session expired or invalid")


# --------------------------------------------------------------------------------------------
# State
# --------------------------------------------------------------------------------------------


@dataclass
class _User:
    id: str
    username: str
    password: str
    security_token: str


@dataclass
class _Session:
    user_id: str
    client_id: str | None
    last_used: datetime


@dataclass
class _Cursor:
    locator: str
    user_id: str
    rows: list[dict[str, Any]]
    batch_size: int
    last_used: datetime
    kind: str  # "query" or "queryAll"


@dataclass
class _ValidationRule:
    sobject: str
    name: str
    error_condition: Callable[[dict[str, Any]], bool]
    message: str
    error_field: str | None


_FIRST_NAMES = (
    "Avery",
    "Jordan",
    "Priya",
    "Mateo",
    "Hannah",
    "Kenji",
    "Olivia",
    "Samir",
    "Lucia",
    "Noah",
    "Ingrid",
    "Tariq",
)
_LAST_NAMES = (
    "Nakamura",
    "Okafor",
    "Lindqvist",
    "Castillo",
    "Brennan",
    "Iyer",
    "Novak",
    "Haddad",
    "Moreau",
    "Whitfield",
    "Reyes",
    "Kowalski",
)
_COMPANY_A = (
    "Northwind",
    "Bluefin",
    "Granite",
    "Cobalt",
    "Evergreen",
    "Summit",
    "Harbor",
    "Lumen",
    "Ironwood",
    "Meridian",
    "Pioneer",
    "Quarry",
    "Redwood",
    "Silverline",
    "Tidewater",
    "Vantage",
)
_COMPANY_B = (
    "Logistics",
    "Health",
    "Analytics",
    "Foods",
    "Robotics",
    "Energy",
    "Capital",
    "Media",
    "Systems",
    "Labs",
    "Outfitters",
    "Manufacturing",
)
_COMPANY_C = ("Inc.", "LLC", "Group", "GmbH", "Ltd", "Corp.", "& Co.", "Partners")
_PRODUCTS = (
    "Platform Rollout",
    "Data Migration",
    "Onboarding Package",
    "Annual Renewal",
    "Expansion Seats",
    "Implementation Services",
    "Pilot",
    "Enterprise Upgrade",
    "Integration Project",
    "Support Plan",
)
_CITIES = ("Austin", "Berlin", "Toronto", "Lisbon", "Denver", "Singapore", "Leeds", "Lyon")


class SalesforceState:
    """An in-memory Salesforce org: records, stages, users, OAuth apps, sessions and cursors.

    All public methods are thread-safe. Record dicts use canonical field names and Python
    values (str, float, bool, `date`, aware `datetime`, None).
    """

    def __init__(
        self,
        *,
        licenses: int = 10,
        daily_api_limit: int | None = None,
        rng_seed: int = 0,
        default_credentials: bool = True,
    ) -> None:
        self.lock = threading.RLock()
        self.controls: EmulatorControls | None = None
        self.clock_offset = timedelta(0)
        self.session_ttl = SESSION_TTL
        # https://developer.salesforce.com/docs/atlas.en-us.salesforce_app_limits_cheatsheet.meta/salesforce_app_limits_cheatsheet/salesforce_app_limits_platform_api.htm
        self.daily_api_limit = (
            daily_api_limit
            if daily_api_limit is not None
            else EDITION_BASE_DAILY_REQUESTS + PER_LICENSE_DAILY_REQUESTS * licenses
        )
        self._rng = random.Random(rng_seed)
        self._counter = self._rng.randrange(10_000_000, 20_000_000)
        self._order_salt = self._rng.getrandbits(64).to_bytes(8, "big")
        self.org_id = self._new_id(ORG_PREFIX)
        self.schema = _build_schema()
        self.records: dict[str, dict[str, dict[str, Any]]] = {n: {} for n in self.schema}
        self._order_keys: dict[str, bytes] = {}
        self._users: dict[str, _User] = {}  # lower username -> user
        self._apps: dict[str, str] = {}  # client_id -> client_secret
        self._jwt_clients: dict[str, tuple[str, str]] = {}  # client_id -> (pem, username)
        self._refresh_tokens: dict[str, tuple[str, str]] = {}  # token -> (client_id, user_id)
        self._sessions: dict[str, _Session] = {}
        self._cursors: dict[str, _Cursor] = {}
        self._rules: list[_ValidationRule] = []
        self._stage_by_label: dict[str, str] = {}  # lower label -> stage id
        self._api_calls = 0
        self._api_lock = threading.Lock()
        self.system_user_id = self.add_user(
            "autoproc@" + self.org_id.lower() + ".example",
            secrets.token_urlsafe(12),
            first_name="Automated",
            last_name="Process",
        )
        for label, order, closed, won, prob, forecast in STANDARD_STAGES:
            self.add_stage(
                label,
                closed=closed,
                won=won,
                probability=prob,
                sort_order=order,
                forecast_category=forecast,
            )
        # A custom won stage whose name says nothing about winning: won = IsWon, never a name.
        self.add_stage(
            CUSTOM_WON_STAGE,
            closed=True,
            won=True,
            probability=100.0,
            sort_order=11,
            forecast_category="Closed",
        )
        self.integration_user_id: str | None = None
        if default_credentials:
            self.integration_user_id = self.add_user(
                DEFAULT_USERNAME,
                DEFAULT_PASSWORD,
                DEFAULT_SECURITY_TOKEN,
                first_name="Handoff",
                last_name="Integration",
            )
            self.add_connected_app(DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET)

    # -- clock and ids ----------------------------------------------------------------------
    def now(self) -> datetime:
        """The org's current time (wall clock + `clock_offset`), to the second."""
        return _trunc(datetime.now(UTC) + self.clock_offset)

    def _new_id(self, prefix: str) -> str:
        self._counter += 1
        n, body = self._counter, ""
        while n:
            n, r = divmod(n, 62)
            body = _B62[r] + body
        id15 = prefix + "Dn" + body.rjust(10, "0")
        return id15 + _checksum(id15)

    def _order_key(self, record_id: str) -> bytes:
        # The store's physical order: stable, unrelated to Id or time. Unordered queries and
        # ties under ORDER BY come back in this order, as no order is guaranteed.
        key = self._order_keys.get(record_id)
        if key is None:
            key = hashlib.blake2b(record_id.encode(), key=self._order_salt, digest_size=8).digest()
            self._order_keys[record_id] = key
        return key

    # -- schema -----------------------------------------------------------------------------
    def add_custom_field(
        self,
        sobject: str,
        name: str,
        field_type: str,
        *,
        label: str | None = None,
        external_id: bool = False,
        unique: bool = False,
        length: int = 255,
        picklist: Iterable[str] = (),
    ) -> None:
        """Add a custom field (`name` must end in `__c`); existing records get null/false."""
        if not name.endswith("__c"):
            raise ValueError("custom field names end in __c")
        ftype = _CUSTOM_TYPES.get(field_type.lower())
        if ftype is None:
            raise ValueError(f"unsupported custom field type {field_type!r}")
        with self.lock:
            sdef = self.schema[self._sobject(sobject)]
            sdef.add(
                FieldDef(
                    name=name,
                    type=ftype,
                    label=label or name[:-3].replace("_", " "),
                    custom=True,
                    nillable=ftype != "boolean",
                    length=length if ftype in soql.TEXT_TYPES else 0,
                    external_id=external_id,
                    unique=unique or False,
                    picklist=tuple(picklist),
                )
            )
            default = False if ftype == "boolean" else None
            for rec in self.records[sdef.name].values():
                rec.setdefault(name, default)

    def add_validation_rule(
        self,
        sobject: str,
        name: str,
        error_condition: Callable[[dict[str, Any]], bool],
        message: str,
        error_field: str | None = None,
    ) -> None:
        """A validation rule: when `error_condition(record)` is true the save fails with
        FIELD_CUSTOM_VALIDATION_EXCEPTION and `message`."""
        with self.lock:
            self._rules.append(
                _ValidationRule(self._sobject(sobject), name, error_condition, message, error_field)
            )

    def _sobject(self, name: str) -> str:
        for n in self.schema:
            if n.lower() == name.lower():
                return n
        raise KeyError(f"unknown sObject {name!r}")

    def _picklist_values(self, f: FieldDef) -> tuple[str, ...]:
        if f.name == "StageName":
            stages = sorted(self.records["OpportunityStage"].values(), key=lambda s: s["SortOrder"])
            return tuple(s["MasterLabel"] for s in stages if s["IsActive"])
        return f.picklist

    # soql.Schema
    def sobject_name(self, name: str) -> str | None:
        try:
            return self._sobject(name)
        except KeyError:
            return None

    def field(self, sobject: str, name: str) -> tuple[str, str] | None:
        f = self.schema[sobject].get(name)
        return (f.name, f.type) if f else None

    def relationship(self, sobject: str, name: str) -> tuple[str, str] | None:
        for f in self.schema[sobject].fields.values():
            if (
                f.relationship_name
                and f.relationship_name.lower() == name.lower()
                and len(f.reference_to) == 1  # polymorphic What isn't traversable here
            ):
                return f.name, f.reference_to[0]
        return None

    # -- users, apps, sessions --------------------------------------------------------------
    def add_user(
        self,
        username: str,
        password: str,
        security_token: str = "",
        *,
        first_name: str = "",
        last_name: str = "User",
        email: str | None = None,
        is_active: bool = True,
    ) -> str:
        """Add a user who can log in with `password + security_token` (token "" = trusted IP)."""
        with self.lock:
            now = self.now()
            uid = self._new_id(PREFIXES["User"])
            self.records["User"][uid] = {
                "Id": uid,
                "Username": username,
                "FirstName": first_name or None,
                "LastName": last_name,
                "Name": f"{first_name} {last_name}".strip(),
                "Email": email or username,
                "IsActive": is_active,
                "CreatedDate": now,
                "CreatedById": getattr(self, "system_user_id", uid),
                "LastModifiedDate": now,
                "LastModifiedById": getattr(self, "system_user_id", uid),
                "SystemModstamp": now,
            }
            self._users[username.lower()] = _User(uid, username, password, security_token)
            return uid

    def add_connected_app(self, client_id: str, client_secret: str) -> None:
        """Register a connected app's consumer key and secret."""
        with self.lock:
            self._apps[client_id] = client_secret

    def add_jwt_client(self, client_id: str, public_key_pem: str | bytes, username: str) -> None:
        """Register the certificate (public key) of a connected app that `username` is
        pre-authorized for, for the OAuth 2.0 JWT bearer flow."""
        pem = public_key_pem.decode() if isinstance(public_key_pem, bytes) else public_key_pem
        with self.lock:
            self._apps.setdefault(client_id, secrets.token_hex(16))
            self._jwt_clients[client_id] = (pem, username)

    def issue_session(self, username: str | None = None, client_id: str | None = None) -> str:
        """A fresh session id (access token) for `username` (default: the integration user)."""
        with self.lock:
            uid = self._user_id(username)
            sid = f"{self.org_id[:15]}!{secrets.token_urlsafe(72)}"
            self._sessions[sid] = _Session(uid, client_id, self.now())
            return sid

    def expire_session(self, session_id: str) -> None:
        """Invalidate a session (as a logout or admin revocation would)."""
        with self.lock:
            self._sessions.pop(session_id, None)

    def issue_refresh_token(self, client_id: str, username: str | None = None) -> str:
        """A refresh token, as the web-server flow would hand the app after user consent."""
        with self.lock:
            if client_id not in self._apps:
                raise KeyError(f"unknown connected app {client_id!r}")
            token = f"5Aep861{secrets.token_urlsafe(60)}"
            self._refresh_tokens[token] = (client_id, self._user_id(username))
            return token

    def revoke_refresh_token(self, token: str) -> None:
        with self.lock:
            self._refresh_tokens.pop(token, None)

    def _user_id(self, username: str | None) -> str:
        if username is None:
            if self.integration_user_id is None:
                raise KeyError("no default user; pass a username")
            return self.integration_user_id
        user = self._users.get(username.lower())
        if user is None:
            raise KeyError(f"unknown user {username!r}")
        return user.id

    def session_user(self, session_id: str) -> str | None:
        """The user id a valid session belongs to (and touch it), else None."""
        with self.lock:
            s = self._sessions.get(session_id)
            if s is None:
                return None
            now = self.now()
            if now - s.last_used > self.session_ttl:
                del self._sessions[session_id]
                return None
            s.last_used = now
            return s.user_id

    def _session_valid(self, session_id: str) -> bool:
        with self.lock:
            s = self._sessions.get(session_id)
            return s is not None and self.now() - s.last_used <= self.session_ttl

    def _check_login(self, username: str, password: str) -> _User | None:
        user = self._users.get(username.lower())
        if user is None or user.id == self.system_user_id:
            return None
        if not self.records["User"][user.id]["IsActive"]:
            return None
        ok = hmac.compare_digest(password, user.password + user.security_token)
        return user if ok else None

    # -- API usage --------------------------------------------------------------------------
    def _count_api_call(self) -> int:
        with self._api_lock:
            self._api_calls += 1
            return self._api_calls

    def api_usage(self) -> tuple[int, int]:
        """(requests used, allocation) of the daily API request allocation."""
        c = self.controls
        if c is not None and c.rates.enabled:
            with c.lock:
                w = c.window(_daily_key(self), self.daily_api_limit, DAILY_SECONDS)
                now = time.monotonic()
                return w.limit - w.remaining(now), w.limit
        with self._api_lock:
            return self._api_calls, self.daily_api_limit

    # -- stages -----------------------------------------------------------------------------
    def add_stage(
        self,
        label: str,
        *,
        closed: bool,
        won: bool,
        probability: float | None = None,
        sort_order: int | None = None,
        forecast_category: str | None = None,
        active: bool = True,
        api_name: str | None = None,
    ) -> str:
        """Add an OpportunityStage (a StageName picklist value with its closed/won flags)."""
        with self.lock:
            now = self.now()
            sid = self._new_id(PREFIXES["OpportunityStage"])
            stages = self.records["OpportunityStage"]
            self.records["OpportunityStage"][sid] = {
                "Id": sid,
                "MasterLabel": label,
                "ApiName": api_name or label,
                "IsActive": active,
                "SortOrder": sort_order if sort_order is not None else len(stages) + 1,
                "IsClosed": closed,
                "IsWon": won,
                "DefaultProbability": probability
                if probability is not None
                else (100.0 if won else 0.0 if closed else 50.0),
                "ForecastCategoryName": forecast_category
                or ("Closed" if won else "Omitted" if closed else "Pipeline"),
                "Description": None,
                "CreatedDate": now,
                "CreatedById": self.system_user_id if hasattr(self, "system_user_id") else None,
                "LastModifiedDate": now,
                "LastModifiedById": self.system_user_id
                if hasattr(self, "system_user_id")
                else None,
                "SystemModstamp": now,
            }
            self._stage_by_label[label.lower()] = sid
            return sid

    def stage(self, label: str) -> dict[str, Any] | None:
        with self.lock:
            sid = self._stage_by_label.get(label.lower())
            return dict(self.records["OpportunityStage"][sid]) if sid else None

    # -- record writes (the one path both the API and test helpers take) --------------------
    def _lookup(self, sobject: str, record_id: Any) -> dict[str, Any] | None:
        rid = _canonical_id(record_id)
        rec = self.records.get(sobject, {}).get(rid) if rid else None
        return None if rec is None or rec.get("IsDeleted") else rec

    def _find_any(self, record_id: str) -> tuple[str, dict[str, Any]] | None:
        rid = _canonical_id(record_id)
        if rid is None:
            return None
        for name, prefix in PREFIXES.items():
            if rid.startswith(prefix):
                rec = self.records[name].get(rid)
                return (name, rec) if rec else None
        return None

    def _coerce(
        self, sdef: SObjectDef, data: dict[str, Any], *, creating: bool, system: bool
    ) -> dict[str, Any]:
        """JSON (or Python) field values to stored values; raises RecordError like the API."""
        out: dict[str, Any] = {}
        bad_access: list[str] = []
        for key, raw in data.items():
            if key == "attributes":
                continue
            f = sdef.get(key)
            if f is None:
                raise RecordError(
                    "INVALID_FIELD", f"No such column '{key}' on sobject of type {sdef.name}"
                )
            if f.name == "Id":
                continue  # the caller dealt with ids
            allowed = f.createable if creating else f.updateable
            if not allowed and not system:
                bad_access.append(f.name)
                continue
            out[f.name] = self._coerce_value(sdef, f, raw)
        if bad_access:
            raise RecordError(
                "INVALID_FIELD_FOR_INSERT_UPDATE",
                f"Unable to create/update fields: {', '.join(bad_access)}. Please check the "
                "security settings of this field and verify that it is read/write for your "
                "profile or permission set.",
                bad_access,
            )
        return out

    def _coerce_value(self, sdef: SObjectDef, f: FieldDef, raw: Any) -> Any:
        t = f.type

        def parse_error() -> RecordError:
            kind = type(raw).__name__.upper()
            return RecordError(
                "JSON_PARSER_ERROR",
                f"Cannot deserialize instance of {t} from VALUE_{kind} value {raw} or request "
                "may be missing a required field",
            )

        if raw is None or raw == "":
            # Empty strings are stored as null; a checkbox can't be null.
            if t == "boolean":
                raise parse_error()
            return None
        if t in soql.NUMBER_TYPES:
            if isinstance(raw, bool):
                raise parse_error()
            try:
                num = float(raw)
            except (TypeError, ValueError):
                raise parse_error() from None
            return int(num) if t == "int" else num
        if t == "boolean":
            if isinstance(raw, bool):
                return raw
            if isinstance(raw, str) and raw.lower() in ("true", "false"):
                return raw.lower() == "true"
            raise parse_error()
        if t == "date":
            if isinstance(raw, datetime):
                return raw.date()
            if isinstance(raw, date):
                return raw
            try:
                return date.fromisoformat(str(raw))
            except ValueError:
                raise parse_error() from None
        if t == "datetime":
            if isinstance(raw, datetime):
                return _trunc(raw if raw.tzinfo else raw.replace(tzinfo=UTC))
            try:
                return _trunc(soql.parse_datetime(str(raw)))
            except ValueError:
                raise parse_error() from None
        if not isinstance(raw, str | int | float) or isinstance(raw, bool):
            raise parse_error()
        text = str(raw)
        if t in ("reference", "id"):
            rid = _canonical_id(text)
            label = f.label
            if rid is None or not any(rid.startswith(PREFIXES[r]) for r in f.reference_to):
                raise RecordError(
                    "MALFORMED_ID" if rid is None else "FIELD_INTEGRITY_EXCEPTION",
                    f"{label}: id value of incorrect type: {text}",
                    [f.name],
                )
            target = next(r for r in f.reference_to if rid.startswith(PREFIXES[r]))
            if self._lookup(target, rid) is None:
                raise RecordError(
                    "INVALID_CROSS_REFERENCE_KEY", "invalid cross reference id", [f.name]
                )
            return rid
        if f.length and len(text) > f.length:
            raise RecordError(
                "STRING_TOO_LONG",
                f"{f.label}: data value too large: {text[:40]} (max length={f.length})",
                [f.name],
            )
        if f.name == "StageName" and sdef.name == "Opportunity":
            if text.lower() not in self._stage_by_label:
                raise RecordError(
                    "INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST",
                    f"Stage: bad value for restricted picklist field: {text}",
                    [f.name],
                )
            stage = self.records["OpportunityStage"][self._stage_by_label[text.lower()]]
            return stage["MasterLabel"]
        if t == "picklist" and f.restricted and text not in f.picklist:
            raise RecordError(
                "INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST",
                f"{f.label}: bad value for restricted picklist field: {text}",
                [f.name],
            )
        return text

    def _prepare(
        self,
        sobject: str,
        data: dict[str, Any],
        *,
        record_id: str | None,
        actor: str,
        system: bool = False,
    ) -> dict[str, Any]:
        """The record as it would be after this create (record_id None) or update; raises."""
        sdef = self.schema[sobject]
        creating = record_id is None
        if creating and not sdef.createable and not system:
            raise RecordError(
                "INVALID_TYPE_FOR_OPERATION", f"entity type cannot be inserted: {sdef.label}"
            )
        if not creating and not sdef.updateable and not system:
            raise RecordError(
                "INVALID_TYPE_FOR_OPERATION", f"entity type cannot be updated: {sdef.label}"
            )
        values = self._coerce(sdef, data, creating=creating, system=system)
        if creating:
            rec: dict[str, Any] = {
                f.name: (False if f.type == "boolean" else None) for f in sdef.fields.values()
            }
            if "OwnerId" in rec:
                rec["OwnerId"] = actor
            if sobject == "Task":
                rec.update(Status="Not Started", Priority="Normal")
        else:
            assert record_id is not None
            current = self.records[sobject].get(record_id)
            if current is None:
                raise RecordError("INVALID_CROSS_REFERENCE_KEY", "invalid cross reference id")
            if current.get("IsDeleted"):
                raise RecordError("ENTITY_IS_DELETED", "entity is deleted", status=404)
            rec = dict(current)
        old_stage = rec.get("StageName")
        rec.update(values)
        if creating:
            missing = [
                f.name for f in sdef.fields.values() if f.required and rec.get(f.name) in (None, "")
            ]
            if missing:
                raise RecordError(
                    "REQUIRED_FIELD_MISSING",
                    f"Required fields are missing: [{', '.join(missing)}]",
                    missing,
                )
        else:
            blanked = [
                f.name
                for f in sdef.fields.values()
                if f.name in values and not f.nillable and values[f.name] in (None, "")
            ]
            if blanked:
                raise RecordError(
                    "REQUIRED_FIELD_MISSING",
                    f"Required fields are missing: [{', '.join(blanked)}]",
                    blanked,
                )
        self._derive(sobject, rec, stage_changed=rec.get("StageName") != old_stage, given=values)
        for rule in self._rules:
            if rule.sobject == sobject and rule.error_condition(dict(rec)):
                raise RecordError(
                    "FIELD_CUSTOM_VALIDATION_EXCEPTION",
                    rule.message,
                    [rule.error_field] if rule.error_field else [],
                )
        return rec

    def _derive(
        self, sobject: str, rec: dict[str, Any], *, stage_changed: bool, given: dict[str, Any]
    ) -> None:
        if sobject == "Opportunity" and rec.get("StageName"):
            # IsWon/IsClosed/ForecastCategory follow the OpportunityStage row; Probability
            # takes the stage default when the stage changes and no probability was sent.
            stage = self.records["OpportunityStage"][self._stage_by_label[rec["StageName"].lower()]]
            rec["IsClosed"] = stage["IsClosed"]
            rec["IsWon"] = stage["IsWon"]
            if stage_changed:
                if "ForecastCategoryName" not in given:
                    rec["ForecastCategoryName"] = stage["ForecastCategoryName"]
                if "Probability" not in given:
                    rec["Probability"] = stage["DefaultProbability"]
        if sobject == "Task":
            rec["IsClosed"] = rec.get("Status") == "Completed"
        if sobject == "User":
            rec["Name"] = f"{rec.get('FirstName') or ''} {rec.get('LastName') or ''}".strip()

    def _commit(
        self,
        sobject: str,
        rec: dict[str, Any],
        *,
        actor: str,
        now: datetime,
        modstamp: datetime | None = None,
    ) -> str:
        stamp = _trunc(modstamp) if modstamp is not None else now
        if rec.get("Id") is None:
            rec["Id"] = self._new_id(self.schema[sobject].prefix)
            rec["CreatedDate"] = stamp if modstamp is not None else now
            rec["CreatedById"] = actor
            if "IsDeleted" in rec:
                rec["IsDeleted"] = False
        rec["LastModifiedDate"] = stamp
        rec["LastModifiedById"] = actor
        rec["SystemModstamp"] = stamp
        self.records[sobject][rec["Id"]] = rec
        self._order_key(rec["Id"])
        return rec["Id"]

    def _delete(self, sobject: str, record_id: str, actor: str, now: datetime) -> None:
        rec = self.records[sobject].get(record_id)
        if rec is None:
            raise RecordError("INVALID_CROSS_REFERENCE_KEY", "invalid cross reference id")
        if rec.get("IsDeleted"):
            raise RecordError("ENTITY_IS_DELETED", "entity is deleted", status=404)
        if not self.schema[sobject].deletable:
            raise RecordError(
                "INVALID_TYPE_FOR_OPERATION",
                f"entity type cannot be deleted: {self.schema[sobject].label}",
            )
        # Deleted records go to the Recycle Bin: IsDeleted = true, visible to queryAll.
        rec.update(IsDeleted=True, LastModifiedById=actor, SystemModstamp=now)
        rec["_deleted_at"] = now
        if sobject in ("Opportunity", "Account"):
            # Activities are deleted with the record they relate to.
            for task in self.records["Task"].values():
                if task.get("WhatId") == record_id and not task.get("IsDeleted"):
                    task.update(IsDeleted=True, SystemModstamp=now, _deleted_at=now)

    # -- test arrangement helpers -----------------------------------------------------------
    def add_account(self, fields: dict[str, Any], modstamp: datetime | None = None) -> str:
        """Create an Account as the integration user; returns its id."""
        return self._system_write("Account", None, fields, modstamp)

    def add_opportunity(self, fields: dict[str, Any], modstamp: datetime | None = None) -> str:
        """Create an Opportunity (Name, StageName, CloseDate required); returns its id."""
        return self._system_write("Opportunity", None, fields, modstamp)

    def update_opportunity(
        self, opportunity_id: str, fields: dict[str, Any], modstamp: datetime | None = None
    ) -> None:
        """Update an Opportunity as a user in the UI would (bumps SystemModstamp)."""
        self._system_write("Opportunity", opportunity_id, fields, modstamp)

    def delete_opportunity(self, opportunity_id: str) -> None:
        """Move an Opportunity (and its tasks) to the Recycle Bin."""
        with self.lock:
            rid = _canonical_id(opportunity_id)
            if rid is None:
                raise KeyError(opportunity_id)
            self._delete("Opportunity", rid, self._actor(), self.now())

    def add_task(self, fields: dict[str, Any], modstamp: datetime | None = None) -> str:
        """Create a Task (e.g. {"WhatId": opp_id, "Subject": ..., "Status": "Completed"})."""
        return self._system_write("Task", None, fields, modstamp)

    def bulk_touch(self, ids: Iterable[str], modstamp: datetime) -> None:
        """Give many records one identical SystemModstamp/LastModifiedDate (as a mass update
        or a data load committed in one second would)."""
        stamp = _trunc(modstamp)
        with self.lock:
            for raw in ids:
                found = self._find_any(raw)
                if found is None:
                    raise KeyError(raw)
                found[1]["SystemModstamp"] = stamp
                found[1]["LastModifiedDate"] = stamp

    def opportunity(self, opportunity_id: str) -> dict[str, Any]:
        """A copy of the Opportunity (deleted ones too, with IsDeleted true)."""
        with self.lock:
            rid = _canonical_id(opportunity_id)
            rec = self.records["Opportunity"].get(rid) if rid else None
            if rec is None:
                raise KeyError(opportunity_id)
            return {k: v for k, v in rec.items() if not k.startswith("_")}

    def opportunities(self, include_deleted: bool = False) -> list[dict[str, Any]]:
        with self.lock:
            return [
                {k: v for k, v in r.items() if not k.startswith("_")}
                for r in self.records["Opportunity"].values()
                if include_deleted or not r.get("IsDeleted")
            ]

    def tasks_for(self, what_id: str) -> list[dict[str, Any]]:
        """Live Tasks whose WhatId is `what_id`, oldest first."""
        with self.lock:
            rid = _canonical_id(what_id)
            tasks = [
                {k: v for k, v in t.items() if not k.startswith("_")}
                for t in self.records["Task"].values()
                if t.get("WhatId") == rid and not t.get("IsDeleted")
            ]
            return sorted(tasks, key=lambda t: (t["CreatedDate"], t["Id"]))

    def _actor(self) -> str:
        return self.integration_user_id or self.system_user_id

    def _system_write(
        self,
        sobject: str,
        record_id: str | None,
        fields: dict[str, Any],
        modstamp: datetime | None,
    ) -> str:
        with self.lock:
            rid = None
            if record_id is not None:
                rid = _canonical_id(record_id)
                if rid is None or rid not in self.records[sobject]:
                    raise KeyError(record_id)
            actor = self._actor()
            rec = self._prepare(sobject, fields, record_id=rid, actor=actor, system=True)
            created = fields.get("CreatedDate")
            new_id = self._commit(sobject, rec, actor=actor, now=self.now(), modstamp=modstamp)
            if created is not None and record_id is None:
                rec["CreatedDate"] = self._coerce_value(
                    self.schema[sobject], self.schema[sobject].fields["createddate"], created
                )
            return new_id

    def seed(self, n_deals: int, rng: random.Random, won_share: float = 0.4) -> list[str]:
        """A realistic org: owners, accounts and `n_deals` opportunities (~40% won - or
        `won_share` - 20% lost, the rest open) modified over the past months, a few sharing
        one SystemModstamp, and tasks on some won deals. Returns the opportunity ids."""
        with self.lock:
            now = self.now()
            owners = []
            for i in range(max(3, min(12, n_deals // 15 + 3))):
                first = _FIRST_NAMES[i % len(_FIRST_NAMES)]
                last = _LAST_NAMES[(i * 5 + 3) % len(_LAST_NAMES)]
                uname = f"{first}.{last}{i}@acme-sales.example".lower()
                if uname in self._users:
                    owners.append(self._users[uname].id)
                    continue
                owners.append(
                    self.add_user(
                        uname,
                        secrets.token_urlsafe(10),
                        first_name=first,
                        last_name=last,
                        email=uname,
                    )
                )
            accounts = []
            for _ in range(max(3, n_deals // 4)):
                name = f"{rng.choice(_COMPANY_A)} {rng.choice(_COMPANY_B)} {rng.choice(_COMPANY_C)}"
                created = now - timedelta(days=rng.randint(200, 900), seconds=rng.randint(0, 86399))
                accounts.append(
                    self._system_write(
                        "Account",
                        None,
                        {
                            "Name": name,
                            "Industry": rng.choice(
                                self.schema["Account"].fields["industry"].picklist
                            ),
                            "Type": "Customer - Direct",
                            "BillingCity": rng.choice(_CITIES),
                            "OwnerId": rng.choice(owners),
                            "CreatedDate": created,
                        },
                        created,
                    )
                )
            open_stages = [s[0] for s in STANDARD_STAGES if not s[2]]
            ids: list[str] = []
            for _i in range(n_deals):
                roll = rng.random()
                created = now - timedelta(days=rng.randint(20, 420), seconds=rng.randint(0, 86399))
                modified = created + (now - created) * rng.random()
                if roll < won_share:
                    stage = CUSTOM_WON_STAGE if rng.random() < 0.25 else "Closed Won"
                    close = (modified - timedelta(days=rng.randint(0, 10))).date()
                elif roll < won_share + 0.2:
                    stage = "Closed Lost"
                    close = (modified - timedelta(days=rng.randint(0, 10))).date()
                else:
                    stage = rng.choice(open_stages)
                    close = (now + timedelta(days=rng.randint(5, 180))).date()
                account = rng.choice(accounts)
                acct_name = self.records["Account"][account]["Name"]
                fields: dict[str, Any] = {
                    "Name": f"{acct_name.split(' ')[0]} - {rng.choice(_PRODUCTS)}",
                    "AccountId": account,
                    "StageName": stage,
                    "CloseDate": close,
                    "Amount": float(rng.randrange(5_000, 250_000, 500)),
                    "OwnerId": rng.choice(owners),
                    "Type": rng.choice(("New Customer", "Existing Customer - Upgrade")),
                    "LeadSource": rng.choice(("Web", "Partner Referral", "Phone Inquiry")),
                    "CreatedDate": created,
                }
                if rng.random() < 0.5:
                    fields["Description"] = (
                        f"{rng.choice(_PRODUCTS)} for {acct_name}; kickoff requested by "
                        f"{rng.choice(_FIRST_NAMES)}."
                    )
                ids.append(self._system_write("Opportunity", None, fields, modified))
            # A mass update committed within one second: several rows share a SystemModstamp.
            if len(ids) >= 8:
                shared = _trunc(
                    now - timedelta(days=rng.randint(1, 30), seconds=rng.randint(0, 999))
                )
                older = [i for i in ids if self.records["Opportunity"][i]["CreatedDate"] <= shared]
                for rid in rng.sample(older, k=min(len(older), max(4, len(ids) // 25))):
                    rec = self.records["Opportunity"][rid]
                    rec["SystemModstamp"] = rec["LastModifiedDate"] = shared
            for rid in ids:
                rec = self.records["Opportunity"][rid]
                if rec["IsWon"] and rng.random() < 0.3:
                    self._system_write(
                        "Task",
                        None,
                        {
                            "WhatId": rid,
                            "Subject": "Kickoff call",
                            "Status": "Completed",
                            "ActivityDate": rec["CloseDate"],
                            "OwnerId": rec["OwnerId"],
                        },
                        rec["SystemModstamp"],
                    )
            return ids

    # -- queries ----------------------------------------------------------------------------
    def _query(
        self, text: str, *, include_deleted: bool
    ) -> tuple[soql.Query, list[dict[str, Any]]]:
        q = soql.parse(text, self, self.now().date())
        rows = [
            r for r in self.records[q.sobject].values() if include_deleted or not r.get("IsDeleted")
        ]
        rows.sort(key=lambda r: self._order_key(r["Id"]))
        return q, soql.run(q, rows, self._lookup)

    def _project(self, q: soql.Query, rec: dict[str, Any], version: str) -> dict[str, Any]:
        out: dict[str, Any] = {"attributes": _attributes(q.sobject, rec["Id"], version)}
        for path in q.fields:
            target = out
            current: dict[str, Any] | None = rec
            for ref_field, sobject, rel in path.hops:
                if rel in target and target[rel] is None:
                    current = None
                    break
                ref = current.get(ref_field) if current else None
                current = self._lookup(sobject, ref) if ref else None
                if current is None:
                    target[rel] = None
                    break
                if rel not in target:
                    target[rel] = {"attributes": _attributes(sobject, current["Id"], version)}
                target = target[rel]
            else:
                target[path.name] = _out(current.get(path.name) if current else None)
        return out


def _attributes(sobject: str, record_id: str, version: str) -> dict[str, str]:
    return {"type": sobject, "url": f"/services/data/v{version}/sobjects/{sobject}/{record_id}"}


def _daily_key(state: SalesforceState) -> str:
    return f"daily-api-requests:{state.daily_api_limit}"


# --------------------------------------------------------------------------------------------
# HTTP edge: flavor for the shared middleware
# --------------------------------------------------------------------------------------------

Handler = Callable[[Request, dict[str, str], "Ctx"], Awaitable[Response]]


@dataclass
class _RouteDef:
    method: str
    pattern: re.Pattern[str]
    template: str
    handler: Handler
    auth: bool


_ROUTES: list[_RouteDef] = []


def _route(method: str, path: str, *, auth: bool = True) -> Callable[[Handler], Handler]:
    """Register a handler for `path` ({version}, {name} placeholders; no trailing slash)."""
    regex = re.escape(path)
    regex = regex.replace(re.escape("{version}"), _VERSION_RE)
    regex = re.sub(r"\\\{(\w+)\\\}", lambda m: f"(?P<{m.group(1)}>[^/]+)", regex)
    compiled = re.compile(f"^{regex}$")

    def register(fn: Handler) -> Handler:
        _ROUTES.append(_RouteDef(method, compiled, f"{method} {path}", fn, auth))
        return fn

    return register


def _match(method: str, path: str) -> tuple[_RouteDef | None, dict[str, str], list[str]]:
    norm = path.rstrip("/") or "/"
    allowed: list[str] = []
    for r in _ROUTES:
        m = r.pattern.match(norm)
        if m:
            if r.method == method:
                return r, m.groupdict(), allowed
            allowed.append(r.method)
    return None, {}, allowed


def _is_rest(path: str) -> bool:
    return re.match(r"^/services/data/v\d", path) is not None


class SalesforceFlavor:
    """Salesforce at the HTTP edge: a daily org-wide allocation answered with 403."""

    def __init__(self, state: SalesforceState) -> None:
        self.state = state

    def _counted(self, request: Request) -> bool:
        # Only authenticated REST calls count against the org's allocation (OAuth and SOAP
        # login don't; an unknown session can't be attributed to the org).
        if not _is_rest(request.url.path):
            return False
        token = _bearer(request)
        return token is not None and self.state._session_valid(token)

    def is_write(self, request: Request) -> bool:
        """Logins and collection retrieves are POSTs that change nothing."""
        path = request.url.path
        if request.method == "POST":
            return not (
                path.startswith(("/services/oauth2/", "/services/Soap/"))
                or (path.rstrip("/").count("/") >= 5 and "/composite/sobjects/" in path)
            )
        return request.method in ("PUT", "PATCH", "DELETE")

    def windows_for(self, request: Request, rates: RateLimitConfig) -> list[Window]:
        if not self._counted(request) or self.state.controls is None:
            return []
        limit = self.state.daily_api_limit
        return [self.state.controls.window(_daily_key(self.state), limit, DAILY_SECONDS)]

    def too_many_requests(self, window: Window, retry_after: float | None) -> Response:
        # https://developer.salesforce.com/docs/atlas.en-us.api_rest.meta/api_rest/errorcodes.htm
        # "403 ... If the error code is REQUEST_LIMIT_EXCEEDED, you've exceeded API request
        # limits in your org." No Retry-After: the allocation is a rolling 24 hours.
        return _json(
            [{"message": "TotalRequests Limit exceeded.", "errorCode": "REQUEST_LIMIT_EXCEEDED"}],
            403,
        )

    def server_error(self, status: int) -> Response:
        if status == 503:
            body = {"message": "Server is unavailable", "errorCode": "SERVER_UNAVAILABLE"}
        else:
            code = random.randint(1_000_000_000, 2_147_483_647)
            body = {
                "message": "An unexpected error occurred. Please include this ErrorId if you "
                f"contact support: {code}-{random.randint(10_000, 99_999)} ({-code})",
                "errorCode": "UNKNOWN_EXCEPTION",
            }
        return _json([body], status)

    def rate_headers(self, request: Request, windows: list[Window], now: float) -> dict[str, str]:
        # https://developer.salesforce.com/docs/atlas.en-us.api_rest.meta/api_rest/headers_api_usage.htm
        # "Sforce-Limit-Info: api-usage=18/5000", returned on each REST API response.
        if not _is_rest(request.url.path):
            return {}
        if windows:
            w = windows[0]
            used, limit = w.limit - w.remaining(now), w.limit
            self.state._count_api_call()
        else:
            limit = self.state.daily_api_limit
            used = self.state._count_api_call() if self._counted(request) else self.state._api_calls
        return {"Sforce-Limit-Info": f"api-usage={used}/{limit}"}

    def route_name(self, request: Request) -> str:
        route, _, _ = _match(request.method, request.url.path)
        if route is not None:
            return route.template
        return f"{request.method} {request.url.path}"


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() in ("bearer", "oauth") and token.strip():
        return token.strip()
    return None


# --------------------------------------------------------------------------------------------
# Handlers
# --------------------------------------------------------------------------------------------


@dataclass
class Ctx:
    state: SalesforceState
    user_id: str | None


def _version(params: dict[str, str]) -> str:
    v = params.get("version", "")
    try:
        num = float(v)
    except ValueError:
        raise _not_found() from None
    if not OLDEST_VERSION <= num <= LATEST_VERSION:
        raise _not_found()
    return v


def _sdef(state: SalesforceState, name: str) -> SObjectDef:
    canonical = state.sobject_name(name)
    if canonical is None:
        raise _not_found()
    return state.schema[canonical]


async def _body(request: Request) -> Any:
    raw = await request.body()
    if not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise ApiError(
            400, "JSON_PARSER_ERROR", f"Unexpected character: {exc.msg} at [line:1, column:1]"
        ) from None


def _base(request: Request) -> str:
    return f"{request.url.scheme}://{request.url.netloc}"


# https://developer.salesforce.com/docs/atlas.en-us.api_rest.meta/api_rest/resources_versions.htm
@_route("GET", "/services/data", auth=False)
async def versions(request: Request, p: dict[str, str], ctx: Ctx) -> Response:
    return _json(_versions())


# https://developer.salesforce.com/docs/atlas.en-us.api_rest.meta/api_rest/resources_discoveryresource.htm
@_route("GET", "/services/data/{version}")
async def resources(request: Request, p: dict[str, str], ctx: Ctx) -> Response:
    v = _version(p)
    names = ("sobjects", "query", "queryAll", "limits", "composite", "search", "recent")
    return _json({n: f"/services/data/v{v}/{n}" for n in names})


# https://developer.salesforce.com/docs/atlas.en-us.api_rest.meta/api_rest/resources_limits.htm
@_route("GET", "/services/data/{version}/limits")
async def limits(request: Request, p: dict[str, str], ctx: Ctx) -> Response:
    _version(p)
    used, limit = ctx.state.api_usage()
    return _json(
        {
            "ConcurrentAsyncGetReportInstances": {"Max": 200, "Remaining": 200},
            "DailyApiRequests": {"Max": limit, "Remaining": max(0, limit - used)},
            "DailyAsyncApexExecutions": {"Max": 250000, "Remaining": 250000},
            "DailyBulkApiBatches": {"Max": 15000, "Remaining": 15000},
            "DailyBulkV2QueryJobs": {"Max": 10000, "Remaining": 10000},
            "DataStorageMB": {"Max": 5, "Remaining": 5},
            "FileStorageMB": {"Max": 20, "Remaining": 20},
            "SingleEmail": {"Max": 5000, "Remaining": 5000},
        }
    )


def _batch_size(request: Request) -> int | None:
    header = request.headers.get("sforce-query-options", "")
    m = re.search(r"batchSize\s*=\s*(\d+)", header, re.IGNORECASE)
    if not m:
        return None
    return max(QUERY_BATCH_MIN, min(QUERY_BATCH_MAX, int(m.group(1))))


def _page(
    state: SalesforceState, cursor: _Cursor, offset: int, version: str, batch: int
) -> dict[str, Any]:
    rows = cursor.rows[offset : offset + batch]
    end = offset + len(rows)
    body: dict[str, Any] = {"totalSize": len(cursor.rows), "done": end >= len(cursor.rows)}
    if end < len(cursor.rows):
        body["nextRecordsUrl"] = f"/services/data/v{version}/{cursor.kind}/{cursor.locator}-{end}"
    body["records"] = rows
    return body


# https://developer.salesforce.com/docs/atlas.en-us.api_rest.meta/api_rest/resources_query.htm
# https://developer.salesforce.com/docs/atlas.en-us.api_rest.meta/api_rest/resources_queryall.htm
# Results come back in batches; "nextRecordsUrl" is relative and GETting it continues. queryAll
# also returns deleted (Recycle Bin) rows.
@_route("GET", "/services/data/{version}/query")
async def query(request: Request, p: dict[str, str], ctx: Ctx) -> Response:
    return _run_query(request, p, ctx, include_deleted=False)


@_route("GET", "/services/data/{version}/queryAll")
async def query_all(request: Request, p: dict[str, str], ctx: Ctx) -> Response:
    return _run_query(request, p, ctx, include_deleted=True)


def _run_query(request: Request, p: dict[str, str], ctx: Ctx, *, include_deleted: bool) -> Response:
    version = _version(p)
    text = request.query_params.get("q")
    if text is None:
        raise ApiError(400, "MALFORMED_QUERY", "A query string has to be specified")
    state = ctx.state
    assert ctx.user_id is not None
    with state.lock:
        try:
            q, rows = state._query(text, include_deleted=include_deleted)
        except soql.SoqlError as exc:
            raise ApiError(400, exc.code, exc.message) from None
        if q.count_only:
            return _json({"totalSize": len(rows), "done": True, "records": []})
        projected = [state._project(q, r, version) for r in rows]
        now = state.now()
        locator = state._new_id(QUERY_LOCATOR_PREFIX)
        cursor = _Cursor(
            locator=locator,
            user_id=ctx.user_id,
            rows=projected,
            batch_size=_batch_size(request) or QUERY_BATCH_DEFAULT,
            last_used=now,
            kind="queryAll" if include_deleted else "query",
        )
        if len(projected) > cursor.batch_size:
            _keep_cursor(state, cursor, now)
        return _json(_page(state, cursor, 0, version, cursor.batch_size))


def _keep_cursor(state: SalesforceState, cursor: _Cursor, now: datetime) -> None:
    for loc, c in list(state._cursors.items()):
        if now - c.last_used > CURSOR_IDLE:
            del state._cursors[loc]
    mine = sorted(
        (c for c in state._cursors.values() if c.user_id == cursor.user_id),
        key=lambda c: c.last_used,
    )
    while len(mine) >= CURSORS_PER_USER:
        # "If 10 QueryLocator cursors are open ... the oldest of the 10 cursors is released."
        del state._cursors[mine.pop(0).locator]
    state._cursors[cursor.locator] = cursor


# https://developer.salesforce.com/docs/atlas.en-us.api_rest.meta/api_rest/dome_query.htm
# "GET /services/data/v59.0/query/01gD0000002HU6KIAW-2000" retrieves the next batch.
@_route("GET", "/services/data/{version}/query/{locator}")
async def query_more(request: Request, p: dict[str, str], ctx: Ctx) -> Response:
    return _more(request, p, ctx)


@_route("GET", "/services/data/{version}/queryAll/{locator}")
async def query_all_more(request: Request, p: dict[str, str], ctx: Ctx) -> Response:
    return _more(request, p, ctx)


def _more(request: Request, p: dict[str, str], ctx: Ctx) -> Response:
    version = _version(p)
    locator, _, off_text = p["locator"].partition("-")
    state = ctx.state
    with state.lock:
        now = state.now()
        cursor = state._cursors.get(locator)
        if cursor is not None and now - cursor.last_used > CURSOR_IDLE:
            del state._cursors[locator]
            cursor = None
        if cursor is None or cursor.user_id != ctx.user_id or not off_text.isdigit():
            raise ApiError(400, "INVALID_QUERY_LOCATOR", "invalid query locator")
        offset = int(off_text)
        if offset > len(cursor.rows):
            raise ApiError(400, "INVALID_QUERY_LOCATOR", "invalid query locator")
        cursor.last_used = now
        batch = _batch_size(request) or cursor.batch_size
        return _json(_page(state, cursor, offset, version, batch))


# https://developer.salesforce.com/docs/atlas.en-us.api_rest.meta/api_rest/resources_describeGlobal.htm
@_route("GET", "/services/data/{version}/sobjects")
async def describe_global(request: Request, p: dict[str, str], ctx: Ctx) -> Response:
    v = _version(p)
    with ctx.state.lock:
        objs = [_sobject_summary(s, v) for s in ctx.state.schema.values()]
    return _json({"encoding": "UTF-8", "maxBatchSize": COLLECTION_MAX, "sobjects": objs})


def _sobject_summary(s: SObjectDef, v: str) -> dict[str, Any]:
    base = f"/services/data/v{v}/sobjects/{s.name}"
    return {
        "name": s.name,
        "label": s.label,
        "labelPlural": s.plural,
        "keyPrefix": s.prefix,
        "custom": False,
        "createable": s.createable,
        "updateable": s.updateable,
        "deletable": s.deletable,
        "queryable": True,
        "retrieveable": True,
        "searchable": s.name != "OpportunityStage",
        "replicateable": True,
        "urls": {
            "sobject": base,
            "describe": f"{base}/describe",
            "rowTemplate": f"{base}/{{ID}}",
        },
    }


# https://developer.salesforce.com/docs/atlas.en-us.api_rest.meta/api_rest/resources_sobject_basic_info.htm
@_route("GET", "/services/data/{version}/sobjects/{sobject}")
async def sobject_info(request: Request, p: dict[str, str], ctx: Ctx) -> Response:
    v = _version(p)
    with ctx.state.lock:
        s = _sdef(ctx.state, p["sobject"])
        recent = sorted(
            (r for r in ctx.state.records[s.name].values() if not r.get("IsDeleted")),
            key=lambda r: r["LastModifiedDate"],
            reverse=True,
        )[:5]
        return _json(
            {
                "objectDescribe": _sobject_summary(s, v),
                "recentItems": [
                    {"attributes": _attributes(s.name, r["Id"], v), "Id": r["Id"]} for r in recent
                ],
            }
        )


# https://developer.salesforce.com/docs/atlas.en-us.api_rest.meta/api_rest/resources_sobject_describe.htm
@_route("GET", "/services/data/{version}/sobjects/{sobject}/describe")
async def describe(request: Request, p: dict[str, str], ctx: Ctx) -> Response:
    v = _version(p)
    with ctx.state.lock:
        s = _sdef(ctx.state, p["sobject"])
        body = _sobject_summary(s, v)
        body.update(
            {
                "fields": [f.describe(ctx.state) for f in s.fields.values()],
                "childRelationships": [],
                "recordTypeInfos": [],
            }
        )
        return _json(body)


def _record_out(
    state: SalesforceState, sobject: str, rec: dict[str, Any], v: str, fields: list[str] | None
) -> dict[str, Any]:
    s = state.schema[sobject]
    out: dict[str, Any] = {"attributes": _attributes(sobject, rec["Id"], v)}
    names = [f.name for f in s.fields.values()] if fields is None else fields
    for name in names:
        out[name] = _out(rec.get(name))
    return out


def _field_list(state: SalesforceState, s: SObjectDef, raw: str | None) -> list[str] | None:
    if raw is None:
        return None
    out = []
    for name in (n.strip() for n in raw.split(",") if n.strip()):
        f = s.get(name)
        if f is None:
            raise ApiError(
                400,
                "INVALID_FIELD",
                f"No such column '{name}' on entity '{s.name}'. If you "
                "are attempting to use a custom field, be sure to append the '__c' after the "
                "custom field name. Please reference your WSDL or the describe call for the "
                "appropriate names.",
            )
        out.append(f.name)
    return out


# https://developer.salesforce.com/docs/atlas.en-us.api_rest.meta/api_rest/resources_sobject_retrieve.htm
@_route("GET", "/services/data/{version}/sobjects/{sobject}/{record_id}")
async def get_record(request: Request, p: dict[str, str], ctx: Ctx) -> Response:
    v = _version(p)
    state = ctx.state
    with state.lock:
        s = _sdef(state, p["sobject"])
        if p["record_id"] in ("updated", "deleted"):
            return _replication(request, s, v, ctx, p["record_id"])
        rid = _canonical_id(p["record_id"])
        rec = state.records[s.name].get(rid) if rid else None
        if rec is None:
            raise _not_found()
        if rec.get("IsDeleted"):
            raise ApiError(404, "ENTITY_IS_DELETED", "entity is deleted", [])
        fields = _field_list(state, s, request.query_params.get("fields"))
        return _json(_record_out(state, s.name, rec, v, fields))


def _replication(request: Request, s: SObjectDef, v: str, ctx: Ctx, kind: str) -> Response:
    # https://developer.salesforce.com/docs/atlas.en-us.api_rest.meta/api_rest/resources_getupdated.htm
    # https://developer.salesforce.com/docs/atlas.en-us.api_rest.meta/api_rest/resources_getdeleted.htm
    state = ctx.state
    try:
        start = soql.parse_datetime(request.query_params["start"])
        end = soql.parse_datetime(request.query_params["end"])
    except (KeyError, ValueError):
        raise ApiError(
            400, "MISSING_ARGUMENT", "start and end must be specified as dateTime values"
        ) from None
    now = state.now()
    if start < now - REPLICATION_WINDOW:
        raise ApiError(400, "INVALID_REPLICATION_DATE", "startDate cannot be more than 30 days ago")
    if end <= start:
        raise ApiError(400, "INVALID_REPLICATION_DATE", "endDate must be after startDate")
    # latestDateCovered is rounded down to the minute and never in the future.
    latest = min(end, now).replace(second=0, microsecond=0)
    recs = state.records[s.name].values()
    if kind == "updated":
        ids = [
            r["Id"]
            for r in recs
            if not r.get("IsDeleted") and start <= r["SystemModstamp"] < latest
        ]
        return _json({"ids": ids, "latestDateCovered": _iso(latest)})
    deleted = [
        {"id": r["Id"], "deletedDate": _iso(r["_deleted_at"])}
        for r in recs
        if r.get("IsDeleted") and start <= r["_deleted_at"] < latest
    ]
    return _json(
        {
            "deletedRecords": deleted,
            "earliestDateAvailable": _iso(now - REPLICATION_WINDOW),
            "latestDateCovered": _iso(latest),
        }
    )


# https://developer.salesforce.com/docs/atlas.en-us.api_rest.meta/api_rest/dome_sobject_create.htm
# 201 {"id": ..., "success": true, "errors": []}
@_route("POST", "/services/data/{version}/sobjects/{sobject}")
async def create_record(request: Request, p: dict[str, str], ctx: Ctx) -> Response:
    _version(p)
    body = await _body(request)
    state = ctx.state
    with state.lock:
        s = _sdef(state, p["sobject"])
        if not isinstance(body, dict):
            raise ApiError(400, "JSON_PARSER_ERROR", "The request body must be a JSON object")
        new_id = _create_one(state, s, body, ctx)
        return _json({"id": new_id, "success": True, "errors": []}, 201)


def _create_one(state: SalesforceState, s: SObjectDef, body: dict[str, Any], ctx: Ctx) -> str:
    if any(k.lower() == "id" for k in body):
        raise ApiError(
            400, "INVALID_FIELD_FOR_INSERT_UPDATE", "cannot specify Id in an insert call", ["Id"]
        )
    assert ctx.user_id is not None
    try:
        rec = state._prepare(s.name, body, record_id=None, actor=ctx.user_id)
    except RecordError as exc:
        raise ApiError(exc.status, exc.code, exc.message, exc.fields) from None
    return state._commit(s.name, rec, actor=ctx.user_id, now=state.now())


# https://developer.salesforce.com/docs/atlas.en-us.api_rest.meta/api_rest/dome_update_fields.htm
# PATCH answers 204 No Content.
@_route("PATCH", "/services/data/{version}/sobjects/{sobject}/{record_id}")
async def update_record(request: Request, p: dict[str, str], ctx: Ctx) -> Response:
    _version(p)
    body = await _body(request)
    state = ctx.state
    with state.lock:
        s = _sdef(state, p["sobject"])
        rid = _canonical_id(p["record_id"])
        if rid is None or rid not in state.records[s.name]:
            raise _not_found()
        if not isinstance(body, dict):
            raise ApiError(400, "JSON_PARSER_ERROR", "The request body must be a JSON object")
        _update_one(state, s, rid, body, ctx)
        return Response(status_code=204)


def _update_one(
    state: SalesforceState, s: SObjectDef, rid: str, body: dict[str, Any], ctx: Ctx
) -> None:
    assert ctx.user_id is not None
    try:
        rec = state._prepare(s.name, body, record_id=rid, actor=ctx.user_id)
    except RecordError as exc:
        raise ApiError(exc.status, exc.code, exc.message, exc.fields) from None
    state._commit(s.name, rec, actor=ctx.user_id, now=state.now())


# https://developer.salesforce.com/docs/atlas.en-us.api_rest.meta/api_rest/dome_delete_record.htm
@_route("DELETE", "/services/data/{version}/sobjects/{sobject}/{record_id}")
async def delete_record(request: Request, p: dict[str, str], ctx: Ctx) -> Response:
    _version(p)
    state = ctx.state
    with state.lock:
        s = _sdef(state, p["sobject"])
        rid = _canonical_id(p["record_id"])
        if rid is None or rid not in state.records[s.name]:
            raise _not_found()
        assert ctx.user_id is not None
        try:
            state._delete(s.name, rid, ctx.user_id, state.now())
        except RecordError as exc:
            raise ApiError(exc.status, exc.code, exc.message, exc.fields) from None
        return Response(status_code=204)


def _external_field(s: SObjectDef, name: str) -> FieldDef:
    f = s.get(name)
    if f is None or not (f.external_id or f.name == "Id"):
        raise ApiError(
            404,
            "NOT_FOUND",
            f"Provided external ID field does not exist or is not accessible: {name}",
        )
    return f


def _matches_external(
    state: SalesforceState, s: SObjectDef, f: FieldDef, value: str
) -> list[dict[str, Any]]:
    if f.name == "Id":
        rid = _canonical_id(value)
        rec = state._lookup(s.name, rid) if rid else None
        return [rec] if rec else []
    if f.type in soql.NUMBER_TYPES:
        try:
            target: Any = float(value)
        except ValueError:
            return []
        return [
            r
            for r in state.records[s.name].values()
            if not r.get("IsDeleted") and r.get(f.name) == target
        ]
    # External ids on text fields match case-insensitively unless marked case-sensitive unique.
    return [
        r
        for r in state.records[s.name].values()
        if not r.get("IsDeleted") and str(r.get(f.name) or "").lower() == value.lower()
    ]


# https://developer.salesforce.com/docs/atlas.en-us.api_rest.meta/api_rest/resources_sobject_upsert.htm
@_route("GET", "/services/data/{version}/sobjects/{sobject}/{ext_field}/{ext_value}")
async def get_by_external_id(request: Request, p: dict[str, str], ctx: Ctx) -> Response:
    v = _version(p)
    state = ctx.state
    with state.lock:
        s = _sdef(state, p["sobject"])
        f = _external_field(s, p["ext_field"])
        found = _matches_external(state, s, f, p["ext_value"])
        if not found:
            raise _not_found()
        if len(found) > 1:
            return _json([_attributes(s.name, r["Id"], v)["url"] for r in found], 300)
        fields = _field_list(state, s, request.query_params.get("fields"))
        return _json(_record_out(state, s.name, found[0], v, fields))


# https://developer.salesforce.com/docs/atlas.en-us.api_rest.meta/api_rest/dome_upsert.htm
# Created: 201 {"id", "success": true, "errors": [], "created": true}; updated: 200 with
# "created": false; several matches: 300 with the matching record URLs.
@_route("PATCH", "/services/data/{version}/sobjects/{sobject}/{ext_field}/{ext_value}")
async def upsert(request: Request, p: dict[str, str], ctx: Ctx) -> Response:
    v = _version(p)
    body = await _body(request)
    state = ctx.state
    with state.lock:
        s = _sdef(state, p["sobject"])
        f = _external_field(s, p["ext_field"])
        if not isinstance(body, dict):
            raise ApiError(400, "JSON_PARSER_ERROR", "The request body must be a JSON object")
        found = _matches_external(state, s, f, p["ext_value"])
        if len(found) > 1:
            return _json([_attributes(s.name, r["Id"], v)["url"] for r in found], 300)
        if found:
            rid = found[0]["Id"]
            _update_one(state, s, rid, body, ctx)
            return _json({"id": rid, "success": True, "errors": [], "created": False}, 200)
        if f.name == "Id":
            raise _not_found()
        data = {k: val for k, val in body.items() if k.lower() != f.name.lower()}
        data[f.name] = p["ext_value"]
        new_id = _create_one(state, s, data, ctx)
        return _json({"id": new_id, "success": True, "errors": [], "created": True}, 201)


# ---- sObject Collections -------------------------------------------------------------------

_ROLLED_BACK = {
    "statusCode": "ALL_OR_NONE_OPERATION_ROLLED_BACK",
    "message": "Record rolled back because not all records were valid and the request was "
    "using AllOrNone header",
    "fields": [],
}


def _collection_body(body: Any) -> tuple[bool, list[Any]]:
    if not isinstance(body, dict) or not isinstance(body.get("records"), list):
        raise ApiError(
            400, "JSON_PARSER_ERROR", "The request body must be an object with a records array"
        )
    records = body["records"]
    if len(records) > COLLECTION_MAX:
        # https://developer.salesforce.com/docs/atlas.en-us.api_rest.meta/api_rest/resources_composite_sobjects_collections.htm
        raise ApiError(
            400,
            "EXCEEDED_ID_LIMIT",
            f"record limit reached. cannot submit more than {COLLECTION_MAX} records into "
            "this call",
            [],
        )
    return bool(body.get("allOrNone", False)), records


def _record_type(state: SalesforceState, rec: Any) -> SObjectDef:
    attrs = rec.get("attributes") if isinstance(rec, dict) else None
    type_name = attrs.get("type") if isinstance(attrs, dict) else None
    if not type_name:
        raise RecordError("INVALID_TYPE", "No SObject Type defined in the attributes map", [])
    canonical = state.sobject_name(type_name)
    if canonical is None:
        raise RecordError("INVALID_TYPE", f"sObject type '{type_name}' is not supported.", [])
    return state.schema[canonical]


def _apply_collection(
    state: SalesforceState,
    all_or_none: bool,
    planned: list[tuple[str, dict[str, Any]] | RecordError],
    actor: str,
) -> list[dict[str, Any]]:
    """Commit the planned writes (or none of them) and build the SaveResult list."""
    failed = any(isinstance(x, RecordError) for x in planned)
    results: list[dict[str, Any]] = []
    now = state.now()
    for item in planned:
        if isinstance(item, RecordError):
            results.append({"success": False, "errors": [item.collection()]})
        elif all_or_none and failed:
            sobject, rec = item
            entry: dict[str, Any] = {"success": False, "errors": [dict(_ROLLED_BACK)]}
            if rec.get("Id"):
                entry = {"id": rec["Id"], **entry}
            results.append(entry)
        else:
            sobject, rec = item
            rid = state._commit(sobject, rec, actor=actor, now=now)
            results.append({"id": rid, "success": True, "errors": []})
    return results


# https://developer.salesforce.com/docs/atlas.en-us.api_rest.meta/api_rest/resources_composite_sobjects_collections_create.htm
@_route("POST", "/services/data/{version}/composite/sobjects")
async def collection_create(request: Request, p: dict[str, str], ctx: Ctx) -> Response:
    _version(p)
    all_or_none, records = _collection_body(await _body(request))
    state = ctx.state
    assert ctx.user_id is not None
    with state.lock:
        planned: list[tuple[str, dict[str, Any]] | RecordError] = []
        for raw in records:
            try:
                s = _record_type(state, raw)
                if any(k.lower() == "id" for k in raw):
                    raise RecordError(
                        "INVALID_FIELD_FOR_INSERT_UPDATE",
                        "cannot specify Id in an insert call",
                        ["Id"],
                    )
                rec = state._prepare(s.name, raw, record_id=None, actor=ctx.user_id)
                planned.append((s.name, rec))
            except RecordError as exc:
                planned.append(exc)
        return _json(_apply_collection(state, all_or_none, planned, ctx.user_id))


# https://developer.salesforce.com/docs/atlas.en-us.api_rest.meta/api_rest/resources_composite_sobjects_collections_update.htm
# Each record needs attributes.type and an id; results come back in request order. With
# allOrNone=false a bad record fails alone; with true every record is rolled back.
@_route("PATCH", "/services/data/{version}/composite/sobjects")
async def collection_update(request: Request, p: dict[str, str], ctx: Ctx) -> Response:
    _version(p)
    all_or_none, records = _collection_body(await _body(request))
    state = ctx.state
    assert ctx.user_id is not None
    with state.lock:
        planned: list[tuple[str, dict[str, Any]] | RecordError] = []
        seen: set[str] = set()
        for raw in records:
            try:
                s = _record_type(state, raw)
                raw_id = next((raw[k] for k in raw if k.lower() == "id"), None)
                if not raw_id:
                    raise RecordError("MISSING_ARGUMENT", "Id not specified in an update call")
                rid = _canonical_id(raw_id)
                if rid is None or not rid.startswith(s.prefix):
                    raise RecordError("MALFORMED_ID", f"malformed id {raw_id}", ["Id"])
                if rid in seen:
                    raise RecordError("DUPLICATE_VALUE", f"Duplicate id in list: {rid}")
                seen.add(rid)
                if rid not in state.records[s.name]:
                    raise RecordError("INVALID_CROSS_REFERENCE_KEY", "invalid cross reference id")
                rec = state._prepare(s.name, raw, record_id=rid, actor=ctx.user_id)
                planned.append((s.name, rec))
            except RecordError as exc:
                planned.append(exc)
        return _json(_apply_collection(state, all_or_none, planned, ctx.user_id))


# https://developer.salesforce.com/docs/atlas.en-us.api_rest.meta/api_rest/resources_composite_sobjects_collections_delete.htm
@_route("DELETE", "/services/data/{version}/composite/sobjects")
async def collection_delete(request: Request, p: dict[str, str], ctx: Ctx) -> Response:
    _version(p)
    ids = [i for i in request.query_params.get("ids", "").split(",") if i]
    all_or_none = request.query_params.get("allOrNone", "false").lower() == "true"
    if len(ids) > COLLECTION_MAX:
        raise ApiError(
            400,
            "EXCEEDED_ID_LIMIT",
            f"record limit reached. cannot submit more than {COLLECTION_MAX} records into "
            "this call",
            [],
        )
    state = ctx.state
    assert ctx.user_id is not None
    with state.lock:
        plan: list[tuple[str, str] | RecordError] = []
        for raw in ids:
            found = state._find_any(raw)
            if found is None:
                plan.append(RecordError("MALFORMED_ID", f"malformed id {raw}", ["Id"]))
            elif found[1].get("IsDeleted"):
                plan.append(RecordError("ENTITY_IS_DELETED", "entity is deleted"))
            else:
                plan.append((found[0], found[1]["Id"]))
        failed = any(isinstance(x, RecordError) for x in plan)
        results: list[dict[str, Any]] = []
        now = state.now()
        for item in plan:
            if isinstance(item, RecordError):
                results.append({"success": False, "errors": [item.collection()]})
            elif all_or_none and failed:
                results.append({"id": item[1], "success": False, "errors": [dict(_ROLLED_BACK)]})
            else:
                try:
                    state._delete(item[0], item[1], ctx.user_id, now)
                    results.append({"id": item[1], "success": True, "errors": []})
                except RecordError as exc:
                    results.append({"success": False, "errors": [exc.collection()]})
        return _json(results)


# https://developer.salesforce.com/docs/atlas.en-us.api_rest.meta/api_rest/resources_composite_sobjects_collections_retrieve.htm
# Records come back in the order of `ids`, with null for ids that match nothing.
@_route("GET", "/services/data/{version}/composite/sobjects/{sobject}")
async def collection_retrieve(request: Request, p: dict[str, str], ctx: Ctx) -> Response:
    ids = [i for i in request.query_params.get("ids", "").split(",") if i]
    fields = request.query_params.get("fields")
    return _retrieve(p, ctx, ids, fields)


@_route("POST", "/services/data/{version}/composite/sobjects/{sobject}")
async def collection_retrieve_post(request: Request, p: dict[str, str], ctx: Ctx) -> Response:
    body = await _body(request)
    if not isinstance(body, dict):
        raise ApiError(400, "JSON_PARSER_ERROR", "The request body must be a JSON object")
    fields = body.get("fields")
    return _retrieve(
        p, ctx, list(body.get("ids") or []), ",".join(fields) if isinstance(fields, list) else None
    )


def _retrieve(p: dict[str, str], ctx: Ctx, ids: list[str], fields: str | None) -> Response:
    v = _version(p)
    state = ctx.state
    with state.lock:
        s = _sdef(state, p["sobject"])
        if not fields:
            raise ApiError(400, "MISSING_ARGUMENT", "fields parameter is required", [])
        if len(ids) > COLLECTION_RETRIEVE_MAX:
            raise ApiError(
                400,
                "EXCEEDED_ID_LIMIT",
                f"record limit reached. cannot submit more than {COLLECTION_RETRIEVE_MAX} "
                "records into this call",
                [],
            )
        names = _field_list(state, s, fields)
        out: list[Any] = []
        for raw in ids:
            rid = _canonical_id(raw)
            if rid is None:
                raise ApiError(400, "MALFORMED_ID", f"malformed id {raw}", [])
            rec = state._lookup(s.name, rid)
            out.append(_record_out(state, s.name, rec, v, names) if rec else None)
        return _json(out)


# ---- OAuth 2.0 ----------------------------------------------------------------------------


def _oauth_error(error: str, description: str, status: int = 400) -> Response:
    return JSONResponse({"error": error, "error_description": description}, status_code=status)


def _token_response(
    state: SalesforceState, request: Request, user_id: str, client_id: str
) -> Response:
    # https://help.salesforce.com/s/articleView?id=sf.remoteaccess_oauth_username_password_flow.htm
    # {"access_token", "instance_url", "id", "token_type": "Bearer", "issued_at", "signature"};
    # signature = base64(HMAC-SHA256(consumer secret, id + issued_at)).
    base = _base(request)
    sid = f"{state.org_id[:15]}!{secrets.token_urlsafe(72)}"
    with state.lock:
        state._sessions[sid] = _Session(user_id, client_id, state.now())
        secret = state._apps.get(client_id, "")
    identity = f"{base}/id/{state.org_id}/{user_id}"
    issued_at = str(int(time.time() * 1000))
    signature = base64.b64encode(
        hmac.new(secret.encode(), (identity + issued_at).encode(), hashlib.sha256).digest()
    ).decode()
    return JSONResponse(
        {
            "access_token": sid,
            "instance_url": base,
            "id": identity,
            "token_type": "Bearer",
            "issued_at": issued_at,
            "signature": signature,
        }
    )


def _check_client(state: SalesforceState, client_id: str, secret: str | None) -> Response | None:
    if client_id not in state._apps:
        return _oauth_error("invalid_client_id", "client identifier invalid")
    if secret is not None and not hmac.compare_digest(secret, state._apps[client_id]):
        return _oauth_error("invalid_client", "invalid client credentials")
    return None


# https://help.salesforce.com/s/articleView?id=sf.remoteaccess_oauth_endpoints.htm
@_route("POST", "/services/oauth2/token", auth=False)
async def oauth_token(request: Request, p: dict[str, str], ctx: Ctx) -> Response:
    form = {k: v[0] for k, v in urllib.parse.parse_qs((await request.body()).decode()).items()}
    grant = form.get("grant_type", "")
    state = ctx.state
    if grant == "password":
        # https://help.salesforce.com/s/articleView?id=sf.remoteaccess_oauth_username_password_flow.htm
        # password = the user's password with the security token appended.
        client_id = form.get("client_id", "")
        with state.lock:
            err = _check_client(state, client_id, form.get("client_secret", ""))
            if err is not None:
                return err
            user = state._check_login(form.get("username", ""), form.get("password", ""))
        if user is None:
            return _oauth_error("invalid_grant", "authentication failure")
        return _token_response(state, request, user.id, client_id)
    if grant == "refresh_token":
        # https://help.salesforce.com/s/articleView?id=sf.remoteaccess_oauth_refresh_token_flow.htm
        client_id = form.get("client_id", "")
        with state.lock:
            err = _check_client(state, client_id, form.get("client_secret"))
            if err is not None:
                return err
            entry = state._refresh_tokens.get(form.get("refresh_token", ""))
        if entry is None or entry[0] != client_id:
            return _oauth_error("invalid_grant", "expired access/refresh token")
        return _token_response(state, request, entry[1], client_id)
    if grant == "urn:ietf:params:oauth:grant-type:jwt-bearer":
        return _jwt_grant(state, request, form.get("assertion", ""))
    return _oauth_error("unsupported_grant_type", "grant type not supported")


def _jwt_grant(state: SalesforceState, request: Request, assertion: str) -> Response:
    # https://help.salesforce.com/s/articleView?id=sf.remoteaccess_oauth_jwt_flow.htm
    # RS256-signed; iss = consumer key, sub = username, aud = https://login.salesforce.com
    # (or test./ My Domain), exp = "within 3 minutes". simple-salesforce sends exp as a string
    # of digits, which Salesforce accepts, so the numeric check here is done by hand.
    try:
        unverified = jwt.decode(assertion, options={"verify_signature": False})
        header = jwt.get_unverified_header(assertion)
    except jwt.PyJWTError:
        return _oauth_error("invalid_grant", "invalid assertion")
    client_id = str(unverified.get("iss", ""))
    with state.lock:
        client = state._jwt_clients.get(client_id)
    if client is None:
        return _oauth_error("invalid_client_id", "client identifier invalid")
    pem, allowed_user = client
    if header.get("alg") != "RS256":
        return _oauth_error("invalid_grant", "invalid assertion")
    try:
        claims = jwt.decode(
            assertion,
            pem,
            algorithms=["RS256"],
            options={"verify_exp": False, "verify_aud": False, "verify_iat": False},
        )
    except jwt.PyJWTError:
        return _oauth_error("invalid_grant", "invalid assertion")
    base = _base(request)
    audiences = {"https://login.salesforce.com", "https://test.salesforce.com", base}
    aud = claims.get("aud")
    aud_list = aud if isinstance(aud, list) else [aud]
    if not any(isinstance(a, str) and a.rstrip("/") in audiences for a in aud_list):
        return _oauth_error("invalid_grant", "audience is invalid")
    try:
        exp = float(claims["exp"])
    except (KeyError, TypeError, ValueError):
        return _oauth_error("invalid_grant", "invalid assertion")
    if exp < time.time():
        return _oauth_error("invalid_grant", "expired authorization code")
    sub = str(claims.get("sub", ""))
    with state.lock:
        user = state._users.get(sub.lower())
        active = user is not None and state.records["User"][user.id]["IsActive"]
    if user is None or not active:
        return _oauth_error("invalid_grant", "user hasn't approved this consumer")
    if sub.lower() != allowed_user.lower():
        return _oauth_error("invalid_grant", "user hasn't approved this consumer")
    return _token_response(state, request, user.id, client_id)


# ---- SOAP login() (what simple-salesforce's username/password/token login calls) -----------

_SOAP_FAULT = """<?xml version="1.0" encoding="UTF-8"?><soapenv:Envelope \
xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" \
xmlns:sf="urn:fault.partner.soap.sforce.com" \
xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><soapenv:Body><soapenv:Fault>\
<faultcode>sf:{code}</faultcode><faultstring>{code}: {message}</faultstring><detail>\
<sf:LoginFault xsi:type="sf:LoginFault"><sf:exceptionCode>{code}</sf:exceptionCode>\
<sf:exceptionMessage>{message}</sf:exceptionMessage></sf:LoginFault></detail>\
</soapenv:Fault></soapenv:Body></soapenv:Envelope>"""


# https://developer.salesforce.com/docs/atlas.en-us.api.meta/api/sforce_api_calls_login.htm
# Success: loginResponse/result with serverUrl (".../services/Soap/u/59.0/<orgId>"), sessionId,
# userId, userInfo. Failure: a SOAP fault, HTTP 500, sf:exceptionCode INVALID_LOGIN.
@_route("POST", "/services/Soap/u/{soap_version}", auth=False)
async def soap_login(request: Request, p: dict[str, str], ctx: Ctx) -> Response:
    state = ctx.state
    raw = await request.body()
    try:
        root = ET.fromstring(raw)
    except ET.ParseError:
        return _soap_fault(
            "INVALID_LOGIN", "Invalid username, password, security token; or user locked out."
        )
    values = {el.tag.rsplit("}", 1)[-1]: (el.text or "") for el in root.iter()}
    if "login" not in values:
        return _soap_fault("UNKNOWN_EXCEPTION", "Unsupported SOAP call")
    with state.lock:
        user = state._check_login(values.get("username", ""), values.get("password", ""))
        if user is None:
            return _soap_fault(
                "INVALID_LOGIN", "Invalid username, password, security token; or user locked out."
            )
        org = state.org_id
        urec = state.records["User"][user.id]
    sid = state.issue_session(user.username)
    base = _base(request)
    version = xml_escape(p["soap_version"])
    body = (
        '<?xml version="1.0" encoding="UTF-8"?><soapenv:Envelope '
        'xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" '
        'xmlns="urn:partner.soap.sforce.com" '
        'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><soapenv:Body><loginResponse>'
        f"<result><metadataServerUrl>{base}/services/Soap/m/{version}/{org[:15]}"
        "</metadataServerUrl><passwordExpired>false</passwordExpired><sandbox>false</sandbox>"
        f"<serverUrl>{base}/services/Soap/u/{version}/{org[:15]}</serverUrl>"
        f"<sessionId>{xml_escape(sid)}</sessionId><userId>{user.id}</userId><userInfo>"
        f"<organizationId>{org}</organizationId><userEmail>{xml_escape(urec['Email'])}"
        f"</userEmail><userFullName>{xml_escape(urec['Name'])}</userFullName>"
        f"<userId>{user.id}</userId><userName>{xml_escape(user.username)}</userName>"
        "</userInfo></result></loginResponse></soapenv:Body></soapenv:Envelope>"
    )
    return Response(body, media_type="text/xml; charset=utf-8")


def _soap_fault(code: str, message: str) -> Response:
    return Response(
        _SOAP_FAULT.format(code=code, message=xml_escape(message)),
        status_code=500,
        media_type="text/xml; charset=utf-8",
    )


# --------------------------------------------------------------------------------------------
# App
# --------------------------------------------------------------------------------------------


def create_app(state: SalesforceState, controls: EmulatorControls | None = None) -> ASGIApp:
    """The emulator as an ASGI app, wrapped in the shared fault/rate/stats middleware."""
    controls = controls or EmulatorControls()
    state.controls = controls
    controls.clock = state.now

    async def dispatch(request: Request) -> Response:
        route, params, allowed = _match(request.method, request.url.path)
        try:
            if route is None:
                if _is_rest(request.url.path) and _auth(state, request) is None:
                    raise _invalid_session()
                if allowed:
                    raise ApiError(
                        405,
                        "METHOD_NOT_ALLOWED",
                        f"HTTP Method '{request.method}' not allowed. Allowed are "
                        f"{','.join(sorted(set(allowed)))}",
                    )
                raise _not_found()
            user_id = None
            if route.auth:
                user_id = _auth(state, request)
                if user_id is None:
                    raise _invalid_session()
            return await route.handler(request, params, Ctx(state, user_id))
        except ApiError as exc:
            return exc.response()

    methods = ["GET", "POST", "PATCH", "PUT", "DELETE", "HEAD"]
    app = Starlette(routes=[Route("/{path:path}", dispatch, methods=methods)])
    return EmulatorMiddleware(app, controls, SalesforceFlavor(state))


def _auth(state: SalesforceState, request: Request) -> str | None:
    # https://developer.salesforce.com/docs/atlas.en-us.api_rest.meta/api_rest/errorcodes.htm
    # "401: The session ID or OAuth token used has expired or is invalid."
    token = _bearer(request)
    return state.session_user(token) if token else None
