"""A local, stateful emulator of the HubSpot CRM v3 API (deals, pipelines, properties, owners,
notes and their associations) plus the OAuth token endpoint.

Handoff's tests, benchmarks and demo run against it instead of a real portal. It follows what
HubSpot documents (and what the official `hubspot-api-client` expects) rather than what our own
connector would find convenient: search paging stops with a 400 past 10,000 results, equal sort
keys come back in an order unrelated to ids, fresh writes are invisible to search for
`index_lag`, the search endpoints have their own per-second limit and send no rate-limit
headers, and a ten-secondly 429 carries no Retry-After.

Main references (cited again above each endpoint):
- Search: https://developers.hubspot.com/docs/api-reference/search/guide
- Limits: https://developers.hubspot.com/docs/developer-tooling/platform/usage-guidelines
- Errors: https://developers.hubspot.com/docs/api-reference/error-handling
- OpenAPI specs: https://github.com/HubSpot/HubSpot-public-api-spec-collection
"""

from __future__ import annotations

import bisect
import copy
import fnmatch
import hashlib
import json
import math
import random
import re
import secrets
import threading
import urllib.parse
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp

from sandbox.common import (
    EmulatorControls,
    EmulatorMiddleware,
    RateLimitConfig,
    SlidingWindow,
    Window,
    bearer_token,
    route_template,
)

# --------------------------------------------------------------------------------------------
# Documented limits
# --------------------------------------------------------------------------------------------

# https://developers.hubspot.com/docs/developer-tooling/platform/usage-guidelines
# Privately distributed / private apps on Free and Starter: 100 requests per 10 seconds and
# 250,000 per day. Professional and Enterprise accounts get 190 per 10 seconds (and 650,000 /
# 1,000,000 per day); the API limit increase pack raises the burst to 250 per 10 seconds.
# We emulate the Free/Starter floor: a connector that is fine there is fine everywhere.
INTERVAL_LIMIT = 100
INTERVAL_SECONDS = 10.0
DAILY_LIMIT = 250_000
DAILY_SECONDS = 86_400.0  # HubSpot resets at midnight in the account's time zone
# https://developers.hubspot.com/docs/api-reference/search/guide#limits
# "The search endpoints are rate limited to five requests per second per account." The OpenAPI
# spec marks search `x-hubspot-rate-limit-exemptions: ["ten-secondly"]`: it does not draw on
# the burst window, only on its own secondly one (and the daily total).
SEARCH_LIMIT = 5
SEARCH_SECONDS = 1.0

SEARCH_DEFAULT_LIMIT = 10
SEARCH_MAX_LIMIT = 200
SEARCH_RESULT_CEILING = 10_000
SEARCH_MAX_GROUPS = 5
SEARCH_MAX_FILTERS_PER_GROUP = 6
SEARCH_MAX_FILTERS = 18
SEARCH_MAX_QUERY_CHARS = 3_000
LIST_DEFAULT_LIMIT = 10
LIST_MAX_LIMIT = 100
BATCH_MAX_INPUTS = 100
OWNERS_MAX_LIMIT = 500
ASSOC_MAX_LIMIT = 500
# https://developers.hubspot.com/docs/apps/developer-platform/build-apps/authentication/oauth/oauth-quickstart-guide
# OAuth access tokens live 30 minutes.
ACCESS_TOKEN_TTL = timedelta(seconds=1800)

# https://developers.hubspot.com/docs/api-reference/crm-associations-v4/guide (default types)
NOTE_TO_DEAL = 214
DEAL_TO_NOTE = 213

# Properties every v3 object read returns whatever `properties` asks for (docs' search example
# returns createdate, hs_lastmodifieddate and hs_object_id next to the requested ones).
ALWAYS_RETURNED = ("createdate", "hs_lastmodifieddate", "hs_object_id")
# https://developers.hubspot.com/docs/api-reference/search/guide#objects (default properties)
DEAL_DEFAULT_PROPERTIES = (
    "dealname",
    "amount",
    "closedate",
    "pipeline",
    "dealstage",
    "createdate",
    "hs_lastmodifieddate",
    "hs_object_id",
)
# https://developers.hubspot.com/docs/api-reference/search/guide (default searchable properties)
DEAL_QUERY_PROPERTIES = ("dealname", "pipeline", "dealstage", "description", "dealtype")
NOTE_DEFAULT_PROPERTIES = ("hs_createdate", "hs_lastmodifieddate", "hs_object_id")

OPERATORS = frozenset(
    {
        "EQ",
        "NEQ",
        "LT",
        "LTE",
        "GT",
        "GTE",
        "BETWEEN",
        "IN",
        "NOT_IN",
        "HAS_PROPERTY",
        "NOT_HAS_PROPERTY",
        "CONTAINS_TOKEN",
        "NOT_CONTAINS_TOKEN",
    }
)
PROPERTY_TYPES = frozenset({"string", "number", "date", "datetime", "enumeration", "bool"})
FIELD_TYPES = frozenset(
    {
        "textarea",
        "text",
        "date",
        "file",
        "number",
        "select",
        "radio",
        "checkbox",
        "booleancheckbox",
        "calculation_equation",
    }
)
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")
_TOKEN_SPLIT = re.compile(r"[^0-9a-z@._*?-]+")


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _iso(dt: datetime) -> str:
    """HubSpot's timestamp format: UTC, millisecond precision, trailing Z."""
    dt = dt.astimezone(UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


def _ms(dt: datetime) -> int:
    return int(dt.timestamp() * 1000)


def _parse_instant(value: Any) -> datetime | None:
    """Epoch milliseconds (number or numeric string) or ISO-8601 date/datetime, else None."""
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, date):
        return datetime(value.year, value.month, value.day, tzinfo=UTC)
    if isinstance(value, int | float) and not isinstance(value, bool):
        return datetime.fromtimestamp(value / 1000.0, tz=UTC)
    if not isinstance(value, str) or not value.strip():
        return None
    text = value.strip()
    if re.fullmatch(r"-?\d+", text):
        return datetime.fromtimestamp(int(text) / 1000.0, tz=UTC)
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _correlation_id() -> str:
    return str(uuid.uuid4())


class ApiError(Exception):
    """Raised inside a handler; becomes HubSpot's error body."""

    def __init__(
        self,
        status: int,
        category: str,
        message: str,
        *,
        context: dict[str, list[str]] | None = None,
        errors: list[dict[str, Any]] | None = None,
        sub_category: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.category = category
        self.message = message
        self.context = context
        self.errors = errors
        self.sub_category = sub_category

    def body(self) -> dict[str, Any]:
        # https://developers.hubspot.com/docs/api-reference/error-handling
        # {"status":"error","message":...,"correlationId":...,"category":...} plus optional
        # context / errors / subCategory (the `Error` schema of the OpenAPI specs).
        out: dict[str, Any] = {
            "status": "error",
            "message": self.message,
            "correlationId": _correlation_id(),
            "category": self.category,
        }
        if self.sub_category:
            out["subCategory"] = self.sub_category
        if self.context is not None:
            out["context"] = self.context
        if self.errors is not None:
            out["errors"] = self.errors
        return out

    def standard_error(self) -> dict[str, Any]:
        """The per-item `StandardError` of a batch 207 (context/errors/links are required)."""
        out = self.body()
        out.pop("correlationId", None)
        out.setdefault("context", {})
        out.setdefault("errors", [])
        out["links"] = {}
        return out

    def response(self) -> JSONResponse:
        body = self.body()
        return JSONResponse(
            body,
            status_code=self.status,
            headers={"X-HubSpot-Correlation-Id": body["correlationId"]},
        )


def _property_error(problems: list[tuple[str, str, str]]) -> ApiError:
    """HubSpot's 400 for invalid property values: the message embeds a JSON list of problems.

    problems: (property name, error code e.g. PROPERTY_DOESNT_EXIST, human message).
    """
    details = [
        {
            "isValid": False,
            "message": msg,
            "error": code,
            "name": name,
            "localizedErrorMessage": msg,
        }
        for name, code, msg in problems
    ]
    return ApiError(
        400,
        "VALIDATION_ERROR",
        "Property values were not valid: " + json.dumps(details, separators=(",", ":")),
        context={"propertyName": [name for name, _, _ in problems]},
        errors=[
            {"message": msg, "code": code, "context": {"propertyName": [name]}}
            for name, code, msg in problems
        ],
    )


# --------------------------------------------------------------------------------------------
# State
# --------------------------------------------------------------------------------------------


@dataclass
class _Record:
    """One CRM object (deal or note)."""

    id: str
    properties: dict[str, str | None]
    created_at: datetime
    updated_at: datetime
    archived: bool = False
    archived_at: datetime | None = None
    # When the last write happened on the state clock (drives search index lag), and the view
    # search saw before that write (None: the object was not in the index yet).
    written_at: datetime | None = None
    indexed: dict[str, Any] | None = None

    def view(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "properties": dict(self.properties),
            "createdAt": self.created_at,
            "updatedAt": self.updated_at,
            "archived": self.archived,
            "archivedAt": self.archived_at,
        }


@dataclass
class _Association:
    from_type: str
    from_id: str
    to_type: str
    to_id: str
    type_id: int
    category: str = "HUBSPOT_DEFINED"
    label: str | None = None


@dataclass
class OAuthClient:
    client_id: str
    client_secret: str


@dataclass
class _IssuedToken:
    client_id: str
    expires_at: datetime


def _standard_property(
    name: str,
    label: str,
    type_: str,
    field_type: str,
    *,
    description: str = "",
    display_order: int = -1,
    read_only_value: bool = False,
    calculated: bool = False,
    options: list[dict[str, Any]] | None = None,
    external_options: bool = False,
    has_unique_value: bool = False,
    group_name: str = "dealinformation",
) -> dict[str, Any]:
    """A property definition shaped like GET /crm/v3/properties/deals returns it."""
    return {
        "name": name,
        "label": label,
        "type": type_,
        "fieldType": field_type,
        "description": description,
        "groupName": group_name,
        "options": options or [],
        "displayOrder": display_order,
        "calculated": calculated,
        "externalOptions": external_options,
        "hasUniqueValue": has_unique_value,
        "hidden": False,
        "hubspotDefined": True,
        "modificationMetadata": {
            "archivable": False,
            "readOnlyDefinition": True,
            "readOnlyValue": read_only_value,
        },
        "formField": not read_only_value,
        "archived": False,
    }


def _stage(
    stage_id: str, label: str, order: int, probability: float, closed: bool
) -> dict[str, Any]:
    return {
        "id": stage_id,
        "label": label,
        "displayOrder": order,
        # HubSpot returns the deal-stage metadata as strings.
        "metadata": {"isClosed": "true" if closed else "false", "probability": str(probability)},
        "archived": False,
        "writePermissions": "CRM_PERMISSIONS_ENFORCEMENT",
    }


DEFAULT_STAGES = (
    ("appointmentscheduled", "Appointment Scheduled", 0.2, False),
    ("qualifiedtobuy", "Qualified To Buy", 0.4, False),
    ("presentationscheduled", "Presentation Scheduled", 0.6, False),
    ("decisionmakerboughtin", "Decision Maker Bought-In", 0.8, False),
    ("contractsent", "Contract Sent", 0.9, False),
    ("closedwon", "Closed Won", 1.0, True),
    ("closedlost", "Closed Lost", 0.0, True),
)
ENTERPRISE_PIPELINE_ID = "75493162"
ENTERPRISE_STAGES = (
    ("148230101", "Discovery", 0.1, False),
    ("148230102", "Technical validation", 0.3, False),
    ("148230103", "Security review", 0.5, False),
    ("148230104", "Procurement", 0.8, False),
    ("148230105", "Signed", 1.0, True),  # closed-won, deliberately not called "closedwon"
    ("148230106", "Lost", 0.0, True),
)

_COMPANIES = (
    "Acme Logistics", "Northwind Traders", "Globex", "Initech", "Umbrella Health", "Stark Freight",
    "Wayne Biotech", "Hooli", "Vandelay Industries", "Soylent Foods", "Tyrell Robotics",
    "Cyberdyne Systems", "Wonka Confectionery", "Pied Piper", "Massive Dynamic", "Aperture Labs",
    "Blue Sun Mining", "Gringotts Finance", "Oscorp Materials", "Monarch Solutions", "Dunder Paper",
    "Prestige Worldwide", "Bluth Homes", "Kramerica", "Sterling Cooper", "Nakatomi Trading",
    "Yoyodyne Aerospace", "Rekall Travel", "Virtucon", "Wernham Hogg", "Gekko Capital",
    "Zorg Industries", "Ollivanders", "Paper Street Soap", "Los Pollos Hermanos", "Krusty Foods",
    "Duff Brewing", "Spacely Sprockets", "Cogswell Cogs", "Planet Express",
)  # fmt: skip
_DEAL_KINDS = (
    "Annual renewal", "Platform rollout", "Pilot", "Expansion – EMEA", "Onboarding package",
    "Enterprise licence", "Data migration", "Support upgrade", "Q3 add-on seats", "Implementation",
)  # fmt: skip
_OWNERS = (
    ("Maya", "Okafor"), ("Lucas", "Meyer"), ("Priya", "Raman"), ("Tom", "Lindqvist"),
    ("Sofia", "Alvarez"), ("Kenji", "Watanabe"),
)  # fmt: skip


class HubSpotState:
    """In-memory portal: deals, pipelines, property definitions, owners, notes, associations,
    tokens. Thread-safe: the app runs in a uvicorn thread while tests mutate from another."""

    def __init__(self, tokens: Iterable[str] = (), portal_id: int = 24681357) -> None:
        self.lock = threading.RLock()
        self.portal_id = portal_id
        self.tokens: set[str] = set(tokens)
        self.oauth_clients: dict[str, OAuthClient] = {}
        self.refresh_tokens: dict[str, str] = {}  # refresh token -> client_id
        self.access_tokens: dict[str, _IssuedToken] = {}
        self.clock_offset = timedelta(0)
        # https://developers.hubspot.com/docs/api-reference/search/guide#limits
        # "It may take a few moments for newly created or updated CRM objects to appear in
        # search results." Objects written less than `index_lag` ago show their previous
        # version (or nothing) to search.
        self.index_lag = timedelta(0)
        # Salt of the tie-break hash: equal sort keys come back in a stable, id-unrelated order.
        self.tie_salt = secrets.token_hex(8)
        self.deals: dict[str, _Record] = {}
        # Bumped on every deal write (`_before_write`) and property change: search results
        # are cached per query until then, so paging a query sorts the portal once, not once
        # per page (a 100,000-deal history is 500 pages).
        self.search_version = 0
        self._search_cache: dict[str, tuple[int, list[dict[str, Any]]]] = {}
        # Per deal version: every searchable deal sorted by one datetime property (a keyset
        # read's bound cuts its page from it by bisection; `_indexed_search`), and the deals'
        # store order.
        self._search_index: dict[str, _SearchIndex] = {}
        self._store_order: tuple[int, dict[str, int]] | None = None
        self.notes: dict[str, _Record] = {}
        self.associations: list[_Association] = []
        self.pipelines: dict[str, dict[str, Any]] = {}
        self.owners: dict[str, dict[str, Any]] = {}
        self.deal_properties: dict[str, dict[str, Any]] = {}
        self.controls: EmulatorControls | None = None
        self._next_id = 18_000_000_001
        self._next_owner = 51_000_001
        created = self.now() - timedelta(days=400)
        self._install_standard_properties(created)
        self.add_pipeline(
            "Sales Pipeline", DEFAULT_STAGES, pipeline_id="default", created_at=created
        )

    # ---- clock & ids ----------------------------------------------------------------------

    def now(self) -> datetime:
        """Real UTC time plus `clock_offset` (tests move the clock by changing the offset)."""
        return datetime.now(UTC) + self.clock_offset

    def _new_id(self) -> str:
        self._next_id += 1 + (self._next_id % 7)  # gaps, like real portals
        return str(self._next_id)

    # ---- property definitions ---------------------------------------------------------------

    def _install_standard_properties(self, created: datetime) -> None:
        p = _standard_property
        defs = [
            p(
                "dealname",
                "Deal Name",
                "string",
                "text",
                description="The name given to this deal.",
            ),
            p("amount", "Amount", "number", "number", description="The total amount of the deal"),
            p("closedate", "Close Date", "datetime", "date", description="Date the deal closed"),
            p(
                "dealstage",
                "Deal Stage",
                "enumeration",
                "radio",
                description="The stage of the deal.",
            ),
            p(
                "pipeline",
                "Pipeline",
                "enumeration",
                "select",
                description="The pipeline the deal is in.",
            ),
            p(
                "hubspot_owner_id",
                "Deal owner",
                "enumeration",
                "select",
                external_options=True,
                description="User the deal is assigned to.",
            ),
            p(
                "description",
                "Deal Description",
                "string",
                "textarea",
                description="Description of the deal",
            ),
            p(
                "deal_currency_code",
                "Currency",
                "enumeration",
                "select",
                description="Currency code for the deal.",
                options=[_option(c, c, i) for i, c in enumerate(("USD", "EUR", "GBP", "CAD"))],
            ),
            p(
                "dealtype",
                "Deal Type",
                "enumeration",
                "radio",
                description="The type of deal.",
                options=[
                    _option("New Business", "newbusiness", 0),
                    _option("Existing Business", "existingbusiness", 1),
                ],
            ),
            p("closed_lost_reason", "Closed Lost Reason", "string", "textarea"),
            p("closed_won_reason", "Closed Won Reason", "string", "textarea"),
            p(
                "createdate",
                "Create Date",
                "datetime",
                "date",
                description="Date the deal was created.",
            ),
            p(
                "hs_lastmodifieddate",
                "Last Modified Date",
                "datetime",
                "date",
                read_only_value=True,
                calculated=False,
                description="Most recent timestamp of any property update.",
            ),
            p(
                "hs_object_id",
                "Record ID",
                "number",
                "number",
                read_only_value=True,
                has_unique_value=True,
                description="The unique ID for this record.",
            ),
            p(
                "hs_is_closed",
                "Is Deal Closed?",
                "bool",
                "booleancheckbox",
                read_only_value=True,
                calculated=True,
                options=_bool_options(),
            ),
            p(
                "hs_is_closed_won",
                "Is Closed Won",
                "bool",
                "booleancheckbox",
                read_only_value=True,
                calculated=True,
                options=_bool_options(),
            ),
            p(
                "hs_deal_stage_probability",
                "Deal probability",
                "number",
                "number",
                read_only_value=True,
                calculated=True,
            ),
        ]
        for order, d in enumerate(defs):
            d["displayOrder"] = order
            d["createdAt"] = _iso(created)
            d["updatedAt"] = _iso(created)
            self.deal_properties[d["name"]] = d
            self.search_version += 1

    def _property_def(self, name: str) -> dict[str, Any] | None:
        d = self.deal_properties.get(name)
        if d is None:
            return None
        d = copy.deepcopy(d)
        # Enumeration options that mirror other settings are computed, as HubSpot does.
        if name == "pipeline":
            d["options"] = [
                _option(pl["label"], pid, pl["displayOrder"]) for pid, pl in self.pipelines.items()
            ]
        elif name == "dealstage":
            d["options"] = [
                _option(st["label"], st["id"], i)
                for i, st in enumerate(st for pl in self.pipelines.values() for st in pl["stages"])
            ]
        elif name == "hubspot_owner_id":
            d["options"] = [
                _option(f"{o['firstName']} {o['lastName']}", oid, i)
                for i, (oid, o) in enumerate(self.owners.items())
            ]
        return d

    # ---- pipelines & owners -------------------------------------------------------------

    def add_pipeline(
        self,
        label: str,
        stages: Sequence[tuple[str, str, float, bool] | dict[str, Any]],
        pipeline_id: str | None = None,
        display_order: int | None = None,
        created_at: datetime | None = None,
    ) -> str:
        """Add a deal pipeline. `stages`: (stage id, label, probability, is_closed) tuples or
        dicts with `label`, `probability`, `isClosed` and optionally `id` (numeric if absent)."""
        with self.lock:
            pid = pipeline_id or self._new_id()[-8:]
            ts = _iso(created_at or self.now())
            built = []
            for order, s in enumerate(stages):
                if isinstance(s, dict):
                    sid = str(s.get("id") or self._new_id()[-9:])
                    st = _stage(
                        sid,
                        s["label"],
                        order,
                        float(s.get("probability", 0.0)),
                        bool(s.get("isClosed", False)),
                    )
                else:
                    st = _stage(str(s[0]), s[1], order, float(s[2]), bool(s[3]))
                st["createdAt"] = st["updatedAt"] = ts
                built.append(st)
            self.pipelines[pid] = {
                "id": pid,
                "label": label,
                "displayOrder": len(self.pipelines) if display_order is None else display_order,
                "stages": built,
                "createdAt": ts,
                "updatedAt": ts,
                "archived": False,
            }
            return pid

    def add_owner(self, email: str, first_name: str, last_name: str) -> str:
        """Add a CRM owner (a HubSpot user); returns its id."""
        with self.lock:
            oid = str(self._next_owner)
            self._next_owner += 1
            ts = _iso(self.now() - timedelta(days=300))
            self.owners[oid] = {
                "id": oid,
                "email": email,
                "firstName": first_name,
                "lastName": last_name,
                "userId": int(oid) % 10_000_000 + 7_000_000,
                "userIdIncludingInactive": int(oid) % 10_000_000 + 7_000_000,
                "type": "PERSON",
                "createdAt": ts,
                "updatedAt": ts,
                "archived": False,
                "teams": [],
            }
            return oid

    def _stage_meta(self, pipeline: str | None, stage: str | None) -> dict[str, str] | None:
        pl = self.pipelines.get(pipeline or "default")
        if pl is None:
            return None
        for st in pl["stages"]:
            if st["id"] == stage:
                return st["metadata"]
        return None

    # ---- OAuth -----------------------------------------------------------------------------

    def add_oauth_client(
        self, client_id: str, client_secret: str, refresh_token: str | None = None
    ) -> str:
        """Register an OAuth app and one installation; returns its refresh token."""
        with self.lock:
            self.oauth_clients[client_id] = OAuthClient(client_id, client_secret)
            token = refresh_token or str(uuid.uuid4())
            self.refresh_tokens[token] = client_id
            return token

    def issue_access_token(self, client_id: str) -> str:
        with self.lock:
            token = "CO" + secrets.token_urlsafe(40)
            self.access_tokens[token] = _IssuedToken(client_id, self.now() + ACCESS_TOKEN_TTL)
            return token

    # ---- deals --------------------------------------------------------------------------

    def _normalize(self, properties: dict[str, Any]) -> dict[str, str | None]:
        out: dict[str, str | None] = {}
        for name, value in properties.items():
            d = self.deal_properties.get(name)
            kind = d["type"] if d else "string"
            if value is None or value == "":
                out[name] = None if value is None else ""
            elif kind in ("datetime", "date"):
                instant = _parse_instant(value)
                out[name] = _iso(instant) if instant else str(value)
            elif isinstance(value, bool):
                out[name] = "true" if value else "false"
            else:
                out[name] = str(value)
        return out

    def _recalculate(self, rec: _Record) -> None:
        props = rec.properties
        props["hs_object_id"] = rec.id
        props["createdate"] = props.get("createdate") or _iso(rec.created_at)
        props["hs_lastmodifieddate"] = _iso(rec.updated_at)
        meta = self._stage_meta(props.get("pipeline"), props.get("dealstage"))
        if meta is not None:
            closed = meta["isClosed"] == "true"
            props["hs_is_closed"] = "true" if closed else "false"
            won = closed and float(meta["probability"]) >= 1.0
            props["hs_is_closed_won"] = "true" if won else "false"
            props["hs_deal_stage_probability"] = meta["probability"]

    @staticmethod
    def _written_at(now: datetime, modified_at: datetime | None) -> datetime:
        """A write the test dates in the past has been indexed since then; only writes dated
        "now" (or later) wait out `index_lag`."""
        return min(now, modified_at) if modified_at else now

    def _before_write(self, rec: _Record | None, now: datetime) -> dict[str, Any] | None:
        """The view search keeps seeing while the index lags behind this write."""
        self.search_version += 1
        if rec is None:
            return None
        if rec.written_at is None or now - rec.written_at >= self.index_lag:
            return rec.view()
        return rec.indexed

    def add_deal(
        self,
        properties: dict[str, Any],
        deal_id: str | None = None,
        modified_at: datetime | None = None,
    ) -> str:
        """Create a deal directly (no HTTP, no validation beyond normalisation)."""
        with self.lock:
            now = self.now()
            did = deal_id or self._new_id()
            props = self._normalize(properties)
            props.setdefault("pipeline", "default")
            created = _parse_instant(props.get("createdate")) or modified_at or now
            rec = _Record(did, props, created, modified_at or now)
            rec.indexed = self._before_write(self.deals.get(did), now)
            rec.written_at = self._written_at(now, modified_at)
            self._recalculate(rec)
            self.deals[did] = rec
            return did

    def update_deal(
        self, deal_id: str, properties: dict[str, Any], modified_at: datetime | None = None
    ) -> None:
        """Change a deal's properties directly; bumps hs_lastmodifieddate."""
        with self.lock:
            rec = self.deals[deal_id]
            now = self.now()
            rec.indexed = self._before_write(rec, now)
            rec.written_at = self._written_at(now, modified_at)
            rec.properties.update(self._normalize(properties))
            rec.updated_at = modified_at or now
            self._recalculate(rec)

    def archive_deal(self, deal_id: str) -> None:
        with self.lock:
            rec = self.deals[deal_id]
            now = self.now()
            rec.indexed = self._before_write(rec, now)
            rec.written_at = now
            rec.archived, rec.archived_at, rec.updated_at = True, now, now
            self._recalculate(rec)

    def bulk_touch(self, deal_ids: Iterable[str], modified_at: datetime | None = None) -> None:
        """Stamp many deals with one identical hs_lastmodifieddate (a month-end bulk edit)."""
        with self.lock:
            now = self.now()
            stamp = modified_at or now
            for did in deal_ids:
                rec = self.deals[did]
                rec.indexed = self._before_write(rec, now)
                rec.written_at = self._written_at(now, modified_at)
                rec.updated_at = stamp
                self._recalculate(rec)

    def deal(self, deal_id: str) -> dict[str, Any]:
        """A copy of one deal as the API would show it (all properties)."""
        with self.lock:
            v = self.deals[deal_id].view()
            return {
                **v,
                "createdAt": _iso(v["createdAt"]),
                "updatedAt": _iso(v["updatedAt"]),
                "archivedAt": _iso(v["archivedAt"]) if v["archivedAt"] else None,
            }

    def deal_ids(self, include_archived: bool = False) -> list[str]:
        with self.lock:
            return [d for d, r in self.deals.items() if include_archived or not r.archived]

    def add_note(
        self, body: str, timestamp: datetime | None = None, deal_ids: Iterable[str] = ()
    ) -> str:
        """Create a note (optionally associated with deals) directly."""
        with self.lock:
            now = self.now()
            nid = self._new_id()
            ts = timestamp or now
            rec = _Record(nid, {"hs_note_body": body, "hs_timestamp": _iso(ts)}, now, now)
            self._recalculate_note(rec)
            self.notes[nid] = rec
            for did in deal_ids:
                self._associate("notes", nid, "deals", did)
            return nid

    def _recalculate_note(self, rec: _Record) -> None:
        rec.properties["hs_object_id"] = rec.id
        rec.properties["hs_createdate"] = _iso(rec.created_at)
        rec.properties["hs_lastmodifieddate"] = _iso(rec.updated_at)

    def _associate(self, from_type: str, from_id: str, to_type: str, to_id: str) -> None:
        """The default note<->deal association, stored in both directions as HubSpot shows it."""
        pair = {("notes", "deals"): NOTE_TO_DEAL, ("deals", "notes"): DEAL_TO_NOTE}
        directions = ((from_type, from_id, to_type, to_id), (to_type, to_id, from_type, from_id))
        for a, ai, b, bi in directions:
            if not any(
                x.from_type == a and x.from_id == ai and x.to_type == b and x.to_id == bi
                for x in self.associations
            ):
                self.associations.append(_Association(a, ai, b, bi, pair[(a, b)]))

    def notes_for_deal(self, deal_id: str) -> list[dict[str, Any]]:
        """Copies of the notes associated with a deal."""
        with self.lock:
            ids = [
                a.to_id
                for a in self.associations
                if a.from_type == "deals" and a.from_id == deal_id and a.to_type == "notes"
            ]
            return [copy.deepcopy(self.notes[i].properties) | {"id": i} for i in ids]

    # ---- seeding ---------------------------------------------------------------------------

    def seed(self, n_deals: int, rng: random.Random, won_share: float = 0.4) -> list[str]:
        """Realistic portal data: owners, both pipelines, `n_deals` deals (≈40% won - or
        `won_share` - 20% lost, the rest open) with modification times spread over past months,
        a few sharing one stamp."""
        with self.lock:
            if not self.owners:
                for first, last in _OWNERS:
                    self.add_owner(f"{first.lower()}.{last.lower()}@example.com", first, last)
            if ENTERPRISE_PIPELINE_ID not in self.pipelines:
                self.add_pipeline(
                    "Enterprise",
                    ENTERPRISE_STAGES,
                    pipeline_id=ENTERPRISE_PIPELINE_ID,
                    created_at=self.now() - timedelta(days=380),
                )
            owner_ids = list(self.owners)
            now = self.now()
            # A couple of month-end bulk edits: several deals share one identical timestamp.
            bulk_stamps = [
                (now - timedelta(days=d)).replace(hour=23, minute=59, second=0, microsecond=0)
                for d in (31, 62)
            ]
            ids = []
            for _ in range(n_deals):
                enterprise = rng.random() < 0.3
                stages = ENTERPRISE_STAGES if enterprise else DEFAULT_STAGES
                roll = rng.random()
                if roll < won_share:
                    stage = next(s for s in stages if s[3] and s[2] >= 1.0)
                elif roll < won_share + 0.2:
                    stage = next(s for s in stages if s[3] and s[2] < 1.0)
                else:
                    stage = rng.choice([s for s in stages if not s[3]])
                created = now - timedelta(days=rng.uniform(20, 240), seconds=rng.randint(0, 86_399))
                modified = created + (now - created) * rng.uniform(0.05, 0.98)
                if rng.random() < 0.08:
                    modified = max(created + timedelta(hours=1), rng.choice(bulk_stamps))
                if stage[3]:
                    closedate = modified - timedelta(hours=rng.randint(0, 72))
                else:
                    closedate = now + timedelta(days=rng.randint(5, 120))
                company = rng.choice(_COMPANIES)
                currency = rng.choices(("USD", "EUR", "GBP"), weights=(7, 2, 1))[0]
                amount = rng.randrange(1_000, 250_000, 50)
                props = {
                    "dealname": f"{company} – {rng.choice(_DEAL_KINDS)}",
                    "amount": str(amount),
                    "closedate": closedate.replace(microsecond=0),
                    "createdate": created,
                    "dealstage": stage[0],
                    "pipeline": ENTERPRISE_PIPELINE_ID if enterprise else "default",
                    "hubspot_owner_id": rng.choice(owner_ids),
                    "deal_currency_code": currency,
                    "dealtype": rng.choice(("newbusiness", "existingbusiness")),
                    "description": (
                        f"{company}: {rng.choice(_DEAL_KINDS).lower()} for "
                        f"{rng.randint(5, 500)} seats, {currency} {amount:,}."
                    ),
                }
                ids.append(self.add_deal(props, modified_at=modified))
            return ids

    # ---- search view -----------------------------------------------------------------------

    def _search_view(self, rec: _Record, now: datetime) -> dict[str, Any] | None:
        if rec.written_at is None or now - rec.written_at >= self.index_lag:
            return rec.view()
        return rec.indexed

    def _tie_key(self, object_id: str) -> str:
        return hashlib.blake2b(f"{self.tie_salt}:{object_id}".encode(), digest_size=8).hexdigest()


def _option(label: str, value: str, order: int) -> dict[str, Any]:
    return {"label": label, "value": value, "displayOrder": order, "hidden": False}


def _bool_options() -> list[dict[str, Any]]:
    return [_option("True", "true", 0), _option("False", "false", 1)]


# --------------------------------------------------------------------------------------------
# Flavor (rate limits, 429/5xx bodies, headers, route names)
# --------------------------------------------------------------------------------------------


_bearer = bearer_token


def _is_search(request: Request) -> bool:
    return request.method == "POST" and request.url.path.rstrip("/").endswith("/search")


# POSTs that only read: they are counted as reads in the sandbox's stats.
_READ_POSTS = ("/search", "/batch/read", "/oauth/v1/token")


class HubSpotFlavor:
    """HubSpot's HTTP edge: per-token windows, its 429 body, its rate-limit headers.

    It needs the controls to hand out their shared windows (`controls.window(...)`);
    `create_app` passes them in.
    """

    def __init__(self, controls: EmulatorControls | None = None) -> None:
        self.controls = controls

    def is_write(self, request: Request) -> bool:
        if request.method == "POST":
            return not request.url.path.endswith(_READ_POSTS)
        return request.method in ("PUT", "PATCH", "DELETE")

    def windows_for(self, request: Request, rates: RateLimitConfig) -> list[Window]:
        if request.url.path.startswith("/oauth/"):
            return []
        # Limits are per app token; anonymous calls share one bucket (they 401 anyway).
        token = _bearer(request) or "anonymous"
        controls = self.controls
        if controls is None:
            return []
        daily = controls.window(f"hubspot:daily:{token}", DAILY_LIMIT, DAILY_SECONDS)
        if _is_search(request):
            search = controls.window(f"hubspot:search:{token}", SEARCH_LIMIT, SEARCH_SECONDS)
            return [search, daily]
        # The burst policy is named TEN_SECONDLY_ROLLING in HubSpot's 429 bodies: a rolling
        # window, not one that resets on the tenth second.
        interval = controls.window(
            f"hubspot:interval:{token}", INTERVAL_LIMIT, INTERVAL_SECONDS, kind=SlidingWindow
        )
        return [interval, daily]

    def too_many_requests(self, window: Window, retry_after: float | None) -> Response:
        # https://developers.hubspot.com/docs/developer-tooling/platform/usage-guidelines
        # The body names the exhausted policy. The official Node client tells the search limit
        # apart by the message "You have reached your secondly limit.".
        if window.name.startswith("hubspot:search:"):
            policy, message = "SECONDLY", "You have reached your secondly limit."
            group = "search-api:crm-search"
        elif window.name.startswith("hubspot:daily:"):
            policy, message = "DAILY", "You have reached your daily limit."
            group = "publicapi:private-app:daily"
        else:
            policy = "TEN_SECONDLY_ROLLING"
            message = "You have reached your ten_secondly_rolling limit."
            group = "publicapi:private-app:burst"
        body = {
            "status": "error",
            "message": message,
            "errorType": "RATE_LIMIT",
            "correlationId": _correlation_id(),
            "policyName": policy,
            "groupName": group,
        }
        headers = {"X-HubSpot-Correlation-Id": body["correlationId"]}
        # Quirk: HubSpot sends no Retry-After on the ten-secondly 429 (clients must back off on
        # their own). Injected faults ("injected" window) follow FaultConfig.retry_after.
        if window.name == "injected":
            if retry_after is not None:
                headers["Retry-After"] = str(max(1, math.ceil(retry_after)))
        elif policy != "TEN_SECONDLY_ROLLING" and retry_after is not None:
            headers["Retry-After"] = str(max(1, math.ceil(retry_after)))
        return JSONResponse(body, status_code=429, headers=headers)

    def server_error(self, status: int) -> Response:
        # https://developers.hubspot.com/docs/api-reference/error-handling
        # 5xx come with the standard error body; clients should pause and retry.
        messages = {
            500: "internal error",
            502: "Bad Gateway",
            503: "Service Unavailable",
            504: "Gateway Timeout",
        }
        body = {
            "status": "error",
            "message": messages.get(status, "internal error"),
            "correlationId": _correlation_id(),
            "category": "INTERNAL_ERROR",
        }
        return JSONResponse(
            body, status_code=status, headers={"X-HubSpot-Correlation-Id": body["correlationId"]}
        )

    def rate_headers(self, request: Request, windows: list[Window], now: float) -> dict[str, str]:
        # https://developers.hubspot.com/docs/developer-tooling/platform/usage-guidelines
        # Search responses carry no X-HubSpot-RateLimit-* headers; the token endpoint neither.
        if _is_search(request) or request.url.path.startswith("/oauth/"):
            return {}
        interval = next((w for w in windows if w.name.startswith("hubspot:interval:")), None)
        daily = next((w for w in windows if w.name.startswith("hubspot:daily:")), None)
        i_max = interval.limit if interval else INTERVAL_LIMIT
        i_left = interval.remaining(now) if interval else INTERVAL_LIMIT
        d_max = daily.limit if daily else DAILY_LIMIT
        d_left = daily.remaining(now) if daily else DAILY_LIMIT
        secondly = max(1, i_max // 10)
        return {
            "X-HubSpot-RateLimit-Daily": str(d_max),
            "X-HubSpot-RateLimit-Daily-Remaining": str(d_left),
            "X-HubSpot-RateLimit-Interval-Milliseconds": str(int(INTERVAL_SECONDS * 1000)),
            "X-HubSpot-RateLimit-Max": str(i_max),
            "X-HubSpot-RateLimit-Remaining": str(i_left),
            "X-HubSpot-RateLimit-Secondly": str(secondly),
            "X-HubSpot-RateLimit-Secondly-Remaining": str(min(secondly, i_left)),
        }

    def route_name(self, request: Request) -> str:
        return route_template(ROUTES, request)


# --------------------------------------------------------------------------------------------
# Request plumbing
# --------------------------------------------------------------------------------------------

Handler = Callable[[Request, HubSpotState], Awaitable[Response]]


async def _json_body(request: Request) -> Any:
    raw = await request.body()
    if not raw.strip():
        return {}
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(
            400,
            "VALIDATION_ERROR",
            f"Invalid input JSON on line {getattr(exc, 'lineno', 1)}, "
            f"column {getattr(exc, 'colno', 1)}: {exc}",
        ) from None


def _json_object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise ApiError(400, "VALIDATION_ERROR", "Invalid input JSON: expected an object")
    return body


def _check_auth(request: Request, state: HubSpotState) -> None:
    token = _bearer(request)
    with state.lock:
        if token and token in state.tokens:
            return
        issued = state.access_tokens.get(token or "")
        if issued is not None:
            if state.now() < issued.expires_at:
                return
            ago = state.now() - issued.expires_at
            raise ApiError(
                401,
                "EXPIRED_AUTHENTICATION",
                f"The OAuth token used to make this call expired "
                f"{max(1, int(ago.total_seconds() // 60))} minute(s) ago.",
                context={"expiredAt": [_iso(issued.expires_at)]},
            )
    # https://developers.hubspot.com/docs/api-reference/error-handling (401)
    raise ApiError(
        401,
        "INVALID_AUTHENTICATION",
        "Authentication credentials not found. This API supports OAuth 2.0 authentication and "
        "you can find more details at https://developers.hubspot.com/docs/methods/auth/oauth-overview",
    )


def _endpoint(state: HubSpotState, handler: Handler, auth: bool = True) -> Callable:
    async def run(request: Request) -> Response:
        try:
            if auth:
                _check_auth(request, state)
            return await handler(request, state)
        except ApiError as err:
            return err.response()

    return run


def _int_param(value: str | None, name: str, default: int) -> int:
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ApiError(400, "VALIDATION_ERROR", f"Invalid value for {name}: {value!r}") from None


def _bool_param(value: str | None) -> bool:
    return (value or "").lower() == "true"


def _requested_properties(request: Request) -> list[str] | None:
    """`properties` as the client sends it (repeated, "multi") or comma-separated."""
    values = request.query_params.getlist("properties")
    if not values:
        return None
    names = [n.strip() for v in values for n in v.split(",") if n.strip()]
    return names or None


def _render(
    view: dict[str, Any],
    wanted: Sequence[str] | None,
    defaults: Sequence[str],
    always: Sequence[str] = ALWAYS_RETURNED,
) -> dict[str, Any]:
    """Shape a record as SimplePublicObject with the property subset HubSpot returns:
    the requested properties (or the object's defaults) plus `always`; unset ones are null."""
    props = view["properties"]
    names = list(dict.fromkeys([*(wanted or defaults), *always]))
    out: dict[str, Any] = {
        "id": view["id"],
        "properties": {n: props.get(n) for n in names},
        "createdAt": _iso(view["createdAt"]),
        "updatedAt": _iso(view["updatedAt"]),
        "archived": view["archived"],
    }
    if view.get("archivedAt"):
        out["archivedAt"] = _iso(view["archivedAt"])
    return out


def _render_all(view: dict[str, Any]) -> dict[str, Any]:
    """Create/update responses return every property that has a value."""
    set_names = [n for n, v in view["properties"].items() if v is not None]
    return _render(view, set_names, DEAL_DEFAULT_PROPERTIES)


def _validate_properties(
    state: HubSpotState,
    props: Any,
    current: dict[str, str | None] | None,
) -> tuple[dict[str, Any], list[tuple[str, str, str]]]:
    """Check property writes against the definitions; returns (clean values, problems)."""
    if not isinstance(props, dict):
        raise ApiError(400, "VALIDATION_ERROR", "Invalid input JSON: properties must be an object")
    problems: list[tuple[str, str, str]] = []
    clean: dict[str, Any] = {}
    merged = dict(current or {})
    merged.update({k: v for k, v in props.items() if isinstance(v, str | int | float)})
    for name, value in props.items():
        d = state.deal_properties.get(name)
        if d is None:
            problems.append((name, "PROPERTY_DOESNT_EXIST", f'Property "{name}" does not exist'))
            continue
        if d["modificationMetadata"]["readOnlyValue"]:
            problems.append(
                (
                    name,
                    "READ_ONLY_VALUE",
                    f'"{name}" is a read only property; its value cannot be set.',
                )
            )
            continue
        if value is None or value == "":
            clean[name] = ""
            continue
        text = str(value).lower() if isinstance(value, bool) else str(value)
        kind = d["type"]
        if kind == "number":
            try:
                float(text)
            except ValueError:
                problems.append((name, "INVALID_FLOAT", f"{text} was not a valid number."))
                continue
        elif kind in ("datetime", "date"):
            if _parse_instant(value) is None:
                problems.append((name, "INVALID_DATE", f"{text} was not a valid date."))
                continue
        elif kind == "bool" and text not in ("true", "false"):
            problems.append((name, "INVALID_BOOLEAN", f"{text} was not a valid boolean."))
            continue
        elif kind == "enumeration":
            if name == "pipeline":
                valid = text in state.pipelines
            elif name == "dealstage":
                valid = (
                    state._stage_meta(str(merged.get("pipeline") or "default"), text) is not None
                )
            elif name == "hubspot_owner_id":
                valid = text in state.owners
            else:
                opts = d.get("options") or []
                valid = not opts or any(o["value"] == text for o in opts)
            if not valid:
                problems.append(
                    (
                        name,
                        "INVALID_OPTION",
                        f"{text} was not one of the allowed options for {name}",
                    )
                )
                continue
        clean[name] = text
    return clean, problems


def _stamp_update(state: HubSpotState, rec: _Record, clean: dict[str, Any]) -> None:
    now = state.now()
    rec.indexed = state._before_write(rec, now)
    rec.written_at = now
    rec.properties.update(state._normalize(clean))
    rec.updated_at = now
    state._recalculate(rec)


def _get_deal(state: HubSpotState, deal_id: str, archived: bool = False) -> _Record:
    rec = state.deals.get(deal_id)
    if rec is None or rec.archived != archived:
        # https://developers.hubspot.com/docs/api-reference/error-handling (404)
        raise ApiError(404, "OBJECT_NOT_FOUND", "Object not found.  objectId are usually numeric.")
    return rec


# --------------------------------------------------------------------------------------------
# Deals: basic
# --------------------------------------------------------------------------------------------


# https://developers.hubspot.com/docs/api-reference/crm-deals-v3/basic/get-crm-v3-objects-0-3
async def list_deals(request: Request, state: HubSpotState) -> Response:
    q = request.query_params
    limit = _int_param(q.get("limit"), "limit", LIST_DEFAULT_LIMIT)
    if limit < 1 or limit > LIST_MAX_LIMIT:
        raise ApiError(400, "VALIDATION_ERROR", f"limit must be between 1 and {LIST_MAX_LIMIT}")
    after = q.get("after")
    start = _int_param(after, "after", 0) if after else 0
    archived = _bool_param(q.get("archived"))
    wanted = _requested_properties(request)
    with state.lock:
        # The list endpoint pages in id order; `after` is the id to continue from.
        recs = sorted(
            (r for r in state.deals.values() if r.archived == archived and int(r.id) >= start),
            key=lambda r: int(r.id),
        )
        page = recs[: limit + 1]
        results = [_render(r.view(), wanted, DEAL_DEFAULT_PROPERTIES) for r in page[:limit]]
    body: dict[str, Any] = {"results": results}
    if len(page) > limit:
        nxt = page[limit].id
        body["paging"] = {
            "next": {
                "after": nxt,
                "link": f"{request.base_url}crm/v3/objects/deals?after={nxt}",
            }
        }
    return JSONResponse(body)


# https://developers.hubspot.com/docs/api-reference/crm-deals-v3/basic/get-crm-v3-objects-0-3-dealId
async def get_deal(request: Request, state: HubSpotState) -> Response:
    q = request.query_params
    wanted = _requested_properties(request)
    with state.lock:
        deal_id = request.path_params["dealId"]
        id_property = q.get("idProperty")
        if id_property and id_property != "hs_object_id":
            deal_id = _lookup_by_unique(state, id_property, deal_id) or "-"
        rec = _get_deal(state, deal_id, _bool_param(q.get("archived")))
        return JSONResponse(_render(rec.view(), wanted, DEAL_DEFAULT_PROPERTIES))


# https://developers.hubspot.com/docs/api-reference/crm-deals-v3/basic/post-crm-v3-objects-0-3
async def create_deal(request: Request, state: HubSpotState) -> Response:
    body = _json_object(await _json_body(request))
    with state.lock:
        clean, problems = _validate_properties(state, body.get("properties", {}), None)
        if problems:
            raise _property_error(problems)
        did = state.add_deal(clean)
        return JSONResponse(_render_all(state.deals[did].view()), status_code=201)


# https://developers.hubspot.com/docs/api-reference/crm-deals-v3/basic/patch-crm-v3-objects-0-3-dealId
async def update_deal(request: Request, state: HubSpotState) -> Response:
    body = _json_object(await _json_body(request))
    with state.lock:
        rec = _get_deal(state, request.path_params["dealId"])
        clean, problems = _validate_properties(state, body.get("properties", {}), rec.properties)
        if problems:
            raise _property_error(problems)
        _stamp_update(state, rec, clean)
        return JSONResponse(_render_all(rec.view()))


def _lookup_by_unique(state: HubSpotState, id_property: str, value: str) -> str | None:
    d = state.deal_properties.get(id_property)
    if d is None or not d.get("hasUniqueValue"):
        raise ApiError(
            400,
            "VALIDATION_ERROR",
            f"{id_property} is not a unique identifier property for object type DEAL",
        )
    for rec in state.deals.values():
        if rec.properties.get(id_property) == value:
            return rec.id
    return None


# --------------------------------------------------------------------------------------------
# Deals: batch
# --------------------------------------------------------------------------------------------


def _batch_inputs(body: dict[str, Any]) -> list[dict[str, Any]]:
    inputs = body.get("inputs")
    if not isinstance(inputs, list):
        raise ApiError(400, "VALIDATION_ERROR", "Invalid input JSON: inputs is required")
    if len(inputs) > BATCH_MAX_INPUTS:
        # https://developers.hubspot.com/docs/api-reference/crm-deals-v3/guide (batch ≤ 100)
        raise ApiError(
            400,
            "VALIDATION_ERROR",
            f"Batch input size {len(inputs)} exceeds the maximum of {BATCH_MAX_INPUTS}.",
            context={"size": [str(len(inputs))]},
        )
    if not all(isinstance(i, dict) for i in inputs):
        raise ApiError(400, "VALIDATION_ERROR", "Invalid input JSON: inputs must be objects")
    return inputs


def _batch_response(
    results: list[dict[str, Any]], errors: list[dict[str, Any]], started: datetime, now: datetime
) -> JSONResponse:
    # https://developers.hubspot.com/docs/api-reference/crm-deals-v3/batch/post-crm-v3-objects-0-3-batch-update
    # 200 BatchResponseSimplePublicObject, or 207 ...WithErrors when some inputs failed.
    body: dict[str, Any] = {
        "status": "COMPLETE",
        "results": results,
        "startedAt": _iso(started),
        "completedAt": _iso(now),
    }
    if errors:
        body["numErrors"] = len(errors)
        body["errors"] = errors
        return JSONResponse(body, status_code=207)
    return JSONResponse(body)


def _not_found_error(ids: list[str]) -> dict[str, Any]:
    return ApiError(
        404,
        "OBJECT_NOT_FOUND",
        "Could not get some DEAL objects, they may be deleted or not exist. "
        "Check that ids are valid.",
        context={"ids": ids},
    ).standard_error()


# https://developers.hubspot.com/docs/api-reference/crm-deals-v3/batch/post-crm-v3-objects-0-3-batch-read
async def batch_read(request: Request, state: HubSpotState) -> Response:
    body = _json_object(await _json_body(request))
    inputs = _batch_inputs(body)
    wanted = body.get("properties") or None
    id_property = body.get("idProperty")
    archived = bool(body.get("archived", False))
    with state.lock:
        started = state.now()
        results, missing = [], []
        for item in inputs:
            key = str(item.get("id", ""))
            did = key
            if id_property and id_property != "hs_object_id":
                did = _lookup_by_unique(state, id_property, key) or ""
            rec = state.deals.get(did)
            if rec is None or rec.archived != archived:
                missing.append(key)
                continue
            results.append(_render(rec.view(), wanted, DEAL_DEFAULT_PROPERTIES))
        errors = [_not_found_error(missing)] if missing else []
        return _batch_response(results, errors, started, state.now())


# https://developers.hubspot.com/docs/api-reference/crm-deals-v3/batch/post-crm-v3-objects-0-3-batch-update
async def batch_update(request: Request, state: HubSpotState) -> Response:
    body = _json_object(await _json_body(request))
    inputs = _batch_inputs(body)
    ids = [str(i.get("id", "")) for i in inputs]
    if len(set(ids)) != len(ids):
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        raise ApiError(
            400,
            "VALIDATION_ERROR",
            f"Duplicate IDs found in batch input: {dupes}. IDs must be unique",
            context={"ids": dupes},
        )
    with state.lock:
        started = state.now()
        results: list[dict[str, Any]] = []
        errors: list[dict[str, Any]] = []
        missing: list[str] = []
        all_problems: list[tuple[str, str, str]] = []
        for item in inputs:
            key = str(item.get("id", ""))
            did = key
            id_property = item.get("idProperty")
            if id_property and id_property != "hs_object_id":
                did = _lookup_by_unique(state, id_property, key) or ""
            rec = state.deals.get(did)
            if rec is None or rec.archived:
                missing.append(key)
                continue
            clean, problems = _validate_properties(
                state, item.get("properties", {}), rec.properties
            )
            if problems:
                all_problems.extend(problems)
                err = _property_error(problems).standard_error()
                err["context"]["ids"] = [key]
                errors.append(err)
                continue
            _stamp_update(state, rec, clean)
            results.append(_render_all(rec.view()))
        if missing:
            errors.insert(0, _not_found_error(missing))
        if not results and all_problems and not missing:
            # Nothing could be applied and the cause is the payload: a plain validation 400.
            raise _property_error(all_problems)
        return _batch_response(results, errors, started, state.now())


# --------------------------------------------------------------------------------------------
# Deals: search
# --------------------------------------------------------------------------------------------


def _typed(state: HubSpotState, name: str, value: Any) -> Any:
    """A comparable form of a filter/sort value for property `name`."""
    d = state.deal_properties.get(name)
    kind = d["type"] if d else "string"
    if value is None:
        return None
    if kind in ("datetime", "date"):
        instant = _parse_instant(value)
        if instant is None:
            raise ApiError(400, "VALIDATION_ERROR", f"{value} is not a valid date for {name}")
        return _ms(instant)
    if kind == "number":
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ApiError(400, "VALIDATION_ERROR", f"{value} is not a number for {name}") from None
    if kind == "enumeration":
        # Enumeration filters are case-sensitive (search guide, "Filter search results").
        return str(value)
    return str(value).lower()


def _stored(state: HubSpotState, name: str, props: dict[str, Any]) -> Any:
    value = props.get(name)
    if value is None or value == "":
        return None
    try:
        return _typed(state, name, value)
    except ApiError:
        return None


def _tokens(text: str) -> list[str]:
    return [t for t in _TOKEN_SPLIT.split(text.lower()) if t]


def _filter_matches(state: HubSpotState, f: dict[str, Any], props: dict[str, Any]) -> bool:
    name, op = f["propertyName"], f["operator"]
    stored = _stored(state, name, props)
    if op == "HAS_PROPERTY":
        return stored is not None
    if op == "NOT_HAS_PROPERTY":
        return stored is None
    if op in ("IN", "NOT_IN"):
        kind = (state.deal_properties.get(name) or {}).get("type", "string")
        values = f.get("values") or []
        # "When searching a string property with this operator, values must be lowercase":
        # stored strings compare lowercased, the given values are not folded.
        wanted = [str(v) if kind == "string" else _typed(state, name, v) for v in values]
        hit = stored is not None and stored in wanted
        return hit if op == "IN" else not hit
    if op in ("CONTAINS_TOKEN", "NOT_CONTAINS_TOKEN"):
        pattern = str(f.get("value", "")).lower()
        raw = str(props.get(name) or "").lower()
        hit = bool(raw) and (
            fnmatch.fnmatchcase(raw, pattern)
            or any(fnmatch.fnmatchcase(t, pattern) for t in _tokens(raw))
        )
        return hit if op == "CONTAINS_TOKEN" else not hit
    value = _typed(state, name, f.get("value"))
    if op == "NEQ":
        return stored != value
    if stored is None:
        return False
    try:
        if op == "EQ":
            return stored == value
        if op == "LT":
            return stored < value
        if op == "LTE":
            return stored <= value
        if op == "GT":
            return stored > value
        if op == "GTE":
            return stored >= value
        if op == "BETWEEN":
            high = _typed(state, name, f.get("highValue"))
            return value <= stored <= high
    except TypeError:
        return False
    return False


def _validate_search(state: HubSpotState, body: dict[str, Any]) -> tuple[list, list, int, int]:
    # https://developers.hubspot.com/docs/api-reference/search/guide#limits
    groups = body.get("filterGroups") or []
    if not isinstance(groups, list):
        raise ApiError(400, "VALIDATION_ERROR", "Invalid input JSON: filterGroups must be a list")
    total_filters = 0
    for g in groups:
        filters = (g or {}).get("filters") or []
        if len(filters) > SEARCH_MAX_FILTERS_PER_GROUP:
            raise ApiError(
                400,
                "VALIDATION_ERROR",
                f"Too many filters in a filter group: {len(filters)}. "
                f"A filter group may contain at most {SEARCH_MAX_FILTERS_PER_GROUP} filters.",
            )
        total_filters += len(filters)
        for f in filters:
            name = f.get("propertyName")
            op = f.get("operator")
            if not name or op not in OPERATORS:
                raise ApiError(
                    400, "VALIDATION_ERROR", f"Invalid filter: {json.dumps(f, sort_keys=True)}"
                )
            if name not in state.deal_properties:
                raise ApiError(
                    400,
                    "VALIDATION_ERROR",
                    f'There was a problem with the request: Property "{name}" does not exist.',
                    context={"propertyName": [name]},
                )
            if op in ("IN", "NOT_IN") and not isinstance(f.get("values"), list):
                raise ApiError(400, "VALIDATION_ERROR", f"Operator {op} requires `values`.")
            if op == "BETWEEN" and f.get("highValue") is None:
                raise ApiError(400, "VALIDATION_ERROR", "Operator BETWEEN requires `highValue`.")
            if (
                op not in ("IN", "NOT_IN", "HAS_PROPERTY", "NOT_HAS_PROPERTY")
                and f.get("value") is None
            ):
                raise ApiError(400, "VALIDATION_ERROR", f"Operator {op} requires `value`.")
    if len(groups) > SEARCH_MAX_GROUPS:
        raise ApiError(
            400,
            "VALIDATION_ERROR",
            f"Too many filter groups: {len(groups)}. "
            f"A search may contain at most {SEARCH_MAX_GROUPS} filter groups.",
        )
    if total_filters > SEARCH_MAX_FILTERS:
        raise ApiError(
            400,
            "VALIDATION_ERROR",
            f"Too many filters: {total_filters}. "
            f"A search may contain at most {SEARCH_MAX_FILTERS} filters in total.",
        )

    # "Only one sorting rule can be applied to any search." The spec types sorts as strings
    # (the official clients declare list[str]); the docs send {propertyName, direction}. Accept
    # both: a bare string names a property sorted ascending.
    sorts = body.get("sorts") or []
    if not isinstance(sorts, list):
        raise ApiError(400, "VALIDATION_ERROR", "Invalid input JSON: sorts must be a list")
    if len(sorts) > 1:
        raise ApiError(
            400, "VALIDATION_ERROR", "Only one sorting rule can be applied to any search."
        )
    parsed_sorts = []
    for s in sorts:
        if isinstance(s, str):
            s = {"propertyName": s, "direction": "ASCENDING"}
        if not isinstance(s, dict) or not s.get("propertyName"):
            raise ApiError(400, "VALIDATION_ERROR", f"Invalid sort: {s!r}")
        direction = s.get("direction", "ASCENDING")
        if direction not in ("ASCENDING", "DESCENDING"):
            raise ApiError(400, "VALIDATION_ERROR", f"Invalid sort direction: {direction!r}")
        parsed_sorts.append((s["propertyName"], direction == "DESCENDING"))

    limit = body.get("limit", SEARCH_DEFAULT_LIMIT)
    if limit is None:
        limit = SEARCH_DEFAULT_LIMIT
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
        raise ApiError(400, "VALIDATION_ERROR", f"Invalid limit: {limit!r}")
    if limit > SEARCH_MAX_LIMIT:
        raise ApiError(
            400,
            "VALIDATION_ERROR",
            f"limit must be less than or equal to {SEARCH_MAX_LIMIT}, got {limit}",
        )
    after_raw = body.get("after")
    # "You must format the value in the after parameter as an integer."
    after = 0
    if after_raw not in (None, ""):
        try:
            after = int(str(after_raw))
        except ValueError:
            raise ApiError(
                400, "VALIDATION_ERROR", f"after must be an integer, got {after_raw!r}"
            ) from None
        if after < 0:
            raise ApiError(400, "VALIDATION_ERROR", f"after must be >= 0, got {after}")
    query = body.get("query")
    if query is not None and len(str(query)) > SEARCH_MAX_QUERY_CHARS:
        raise ApiError(
            400,
            "VALIDATION_ERROR",
            f"query must be at most {SEARCH_MAX_QUERY_CHARS} characters",
        )
    return groups, parsed_sorts, limit, after


# https://developers.hubspot.com/docs/api-reference/search/guide
async def search_deals(request: Request, state: HubSpotState) -> Response:
    body = _json_object(await _json_body(request))
    with state.lock:
        groups, sorts, limit, after = _validate_search(state, body)
        # "The search endpoints are limited to 10,000 total results for any given query.
        # Attempting to page beyond 10,000 will result in a 400 error."
        if after + limit > SEARCH_RESULT_CEILING:
            raise ApiError(
                400,
                "VALIDATION_ERROR",
                f"The search endpoints are limited to {SEARCH_RESULT_CEILING} total results for "
                f"any given query. Requested results {after} to {after + limit}.",
                context={"after": [str(after)], "limit": [str(limit)]},
            )
        query = str(body.get("query") or "").strip().lower()
        wanted = body.get("properties") or None
        views = _cached_search(state, groups, sorts, query)
        total = len(views)
        page = views[after : after + limit]
        results = [_render(v, wanted, DEAL_DEFAULT_PROPERTIES) for v in page]
    out: dict[str, Any] = {"total": total, "results": results}
    if limit and after + limit < total:
        # HubSpot hands out the next cursor even when following it will hit the 10,000 ceiling.
        out["paging"] = {"next": {"after": str(after + limit)}}
    return JSONResponse(out)


def _cached_search(
    state: HubSpotState, groups: list[Any], sorts: list[Any], query: str
) -> list[dict[str, Any]]:
    """Every deal the search matches, in result order; cached per query and deal version
    (not while `index_lag` makes what search sees depend on the clock)."""
    key = json.dumps([groups, sorts, query], sort_keys=True, default=str)
    hit = state._search_cache.get(key)
    if hit is not None and hit[0] == state.search_version and not state.index_lag:
        return hit[1]
    views = _indexed_search(state, groups, sorts, query)
    if views is None:
        views = _search(state, groups, sorts, query, state.now())
    if len(state._search_cache) > 8:
        state._search_cache.clear()
    state._search_cache[key] = (state.search_version, views)
    return views


def _search(
    state: HubSpotState, groups: list[Any], sorts: list[Any], query: str, now: datetime
) -> list[dict[str, Any]]:
    views = []
    for rec in state.deals.values():
        view = state._search_view(rec, now)
        # "Archived CRM objects won't appear in any search results."
        if view is None or view["archived"]:
            continue
        props = view["properties"]
        if groups and not any(
            all(_filter_matches(state, f, props) for f in (g or {}).get("filters") or [])
            for g in groups
        ):
            continue
        if query and not any(
            any(t.startswith(query) or query in t for t in _tokens(str(props.get(p) or "")))
            or query in str(props.get(p) or "").lower()
            for p in DEAL_QUERY_PROPERTIES
        ):
            continue
        views.append(view)
    return _result_order(state, views, sorts)


def _result_order(
    state: HubSpotState, views: list[dict[str, Any]], sorts: list[Any]
) -> list[dict[str, Any]]:
    """Matched views (in store order) in result order."""
    # Default order: by creation date, oldest first. Ties (equal keys) are broken by a salted
    # hash of the id: stable from page to page, but unrelated to id order.
    if sorts:
        name, descending = sorts[0]
        present = [v for v in views if _stored(state, name, v["properties"]) is not None]
        absent = [v for v in views if _stored(state, name, v["properties"]) is None]
        present.sort(key=lambda v: state._tie_key(v["id"]))
        present.sort(key=lambda v: _stored(state, name, v["properties"]), reverse=descending)
        absent.sort(key=lambda v: state._tie_key(v["id"]))
        views = present + absent  # missing values last in either direction
    else:
        views.sort(key=lambda v: (_ms(v["createdAt"]), state._tie_key(v["id"])))
    return views


# Operators whose filter value `_filter_matches` never converts (`IN`/`NOT_IN` convert theirs
# unless the property is a string).
_UNTYPED_OPERATORS = frozenset(
    {"HAS_PROPERTY", "NOT_HAS_PROPERTY", "CONTAINS_TOKEN", "NOT_CONTAINS_TOKEN"}
)
# Operators that hold for a contiguous run of a property's sorted values (and never for a
# deal without the property).
_RANGE_OPERATORS = frozenset({"EQ", "LT", "LTE", "GT", "GTE", "BETWEEN"})


@dataclass
class _SearchIndex:
    """Every searchable deal (matching `query`) sorted ascending by one datetime property,
    as `_search` orders them, at one deal version."""

    version: int
    # Every deal's view stayed what search shows as the clock moves on (none written later
    # than `visible_from`, so none shows an older `indexed` version).
    visible_from: datetime
    views: list[dict[str, Any]]
    keys: list[int]  # the property's value of views[:len(keys)]; the rest lack it


def _index_for(state: HubSpotState, name: str, query: str) -> _SearchIndex | None:
    key = json.dumps([name, query])
    index = state._search_index.get(key)
    now = state.now()
    if index is not None and index.version == state.search_version and now >= index.visible_from:
        return index
    newest = max((r.written_at for r in state.deals.values() if r.written_at), default=None)
    if newest is not None and newest > now:
        return None  # a write dated ahead of the clock: what search sees still changes
    views = _search(state, [], [(name, False)], query, now)
    keys: list[int] = []
    for v in views:
        stored = _stored(state, name, v["properties"])
        if stored is None:
            break
        keys.append(stored)
    if len(state._search_index) > 4:
        state._search_index.clear()
    index = _SearchIndex(state.search_version, newest or now, views, keys)
    state._search_index[key] = index
    return index


def _store_positions(state: HubSpotState) -> dict[str, int]:
    """Each deal's place in the store (`_search` matches in that order)."""
    if state._store_order is None or state._store_order[0] != state.search_version:
        state._store_order = (state.search_version, {d: i for i, d in enumerate(state.deals)})
    return state._store_order[1]


def _indexed_search(
    state: HubSpotState, groups: list[Any], sorts: list[Any], query: str
) -> list[dict[str, Any]] | None:
    """`_search`'s answer for one filter group that bounds a datetime property (a keyset
    read: `hs_lastmodifieddate GTE t`, or `EQ t` and an id bound), without matching and
    sorting the whole portal for every page (a 25,000-deal read is ~50 pages of 200).

    The deals the bound admits are a contiguous run of that property's sorted index (built
    once per deal version); the group's filters then apply to that run only, and the run
    keeps result order when the sort is that property ascending, else the matches are put
    back in store order and sorted as `_search` sorts. None when this does not apply: the
    full path runs."""
    if state.index_lag or len(groups) != 1:
        return None
    filters = (groups[0] or {}).get("filters") or []
    bounded = [f for f in filters if f["operator"] in _RANGE_OPERATORS]
    names = [f["propertyName"] for f in bounded]
    # The sort property first: its index is already in result order.
    candidates = ([sorts[0][0]] if sorts else []) + names
    name = next(
        (
            n
            for n in candidates
            if n in names
            and (state.deal_properties.get(n) or {}).get("type") in ("datetime", "date")
        ),
        None,
    )
    if name is None:
        return None
    if not _values_parse(state, filters):
        return None  # the full path raises (if any deal gets that far)
    index = _index_for(state, name, query)
    if index is None:
        return None
    keys = index.keys
    lo, hi = 0, len(keys)
    for f in bounded:
        if f["propertyName"] != name:
            continue
        op = f["operator"]
        value = _typed(state, name, f.get("value"))
        high = _typed(state, name, f.get("highValue")) if op == "BETWEEN" else 0
        if type(value) is not int or type(high) is not int:
            return None
        if op in ("EQ", "GTE", "BETWEEN"):
            lo = max(lo, bisect.bisect_left(keys, value))
        elif op == "GT":
            lo = max(lo, bisect.bisect_right(keys, value))
        if op in ("EQ", "LTE"):
            hi = min(hi, bisect.bisect_right(keys, value))
        elif op == "LT":
            hi = min(hi, bisect.bisect_left(keys, value))
        elif op == "BETWEEN":
            hi = min(hi, bisect.bisect_right(keys, high))
    run = index.views[lo:hi] if lo < hi else []
    in_order = bool(sorts) and sorts[0] == (name, False)
    if in_order and all(f in bounded and f["propertyName"] == name for f in filters):
        return run  # every filter is one of the bounds: the run is the answer
    matched = [v for v in run if all(_filter_matches(state, f, v["properties"]) for f in filters)]
    if in_order:
        return matched
    positions = _store_positions(state)
    matched.sort(key=lambda v: positions[v["id"]])
    return _result_order(state, matched, sorts)


def _values_parse(state: HubSpotState, filters: list[dict[str, Any]]) -> bool:
    """Whether every value `_filter_matches` may convert for these filters converts: then
    matching cannot raise, whichever deals it is asked about."""
    try:
        for f in filters:
            name, op = f["propertyName"], f["operator"]
            if op in ("IN", "NOT_IN"):
                if (state.deal_properties.get(name) or {}).get("type", "string") != "string":
                    for v in f.get("values") or []:
                        _typed(state, name, v)
            elif op not in _UNTYPED_OPERATORS:
                _typed(state, name, f.get("value"))
                if op == "BETWEEN":
                    _typed(state, name, f.get("highValue"))
    except ApiError:
        return False
    return True


# --------------------------------------------------------------------------------------------
# Pipelines, properties, owners
# --------------------------------------------------------------------------------------------


def _object_type(request: Request) -> str:
    object_type = request.path_params["objectType"]
    if object_type not in ("deals", "deal", "0-3"):
        raise ApiError(
            400,
            "VALIDATION_ERROR",
            f"Unable to infer object type from: {object_type}",
        )
    return "deals"


# https://developers.hubspot.com/docs/api-reference/crm-pipelines-v3/guide
async def list_pipelines(request: Request, state: HubSpotState) -> Response:
    _object_type(request)
    with state.lock:
        results = sorted(state.pipelines.values(), key=lambda p: p["displayOrder"])
        return JSONResponse({"results": copy.deepcopy(results)})


# https://developers.hubspot.com/docs/api-reference/crm-pipelines-v3/guide
async def get_pipeline(request: Request, state: HubSpotState) -> Response:
    _object_type(request)
    with state.lock:
        pl = state.pipelines.get(request.path_params["pipelineId"])
        if pl is None:
            raise ApiError(
                404,
                "OBJECT_NOT_FOUND",
                f"Unable to find pipeline {request.path_params['pipelineId']} for deals",
            )
        return JSONResponse(copy.deepcopy(pl))


# https://developers.hubspot.com/docs/api-reference/crm-properties-v3/guide
async def list_properties(request: Request, state: HubSpotState) -> Response:
    _object_type(request)
    archived = _bool_param(request.query_params.get("archived"))
    with state.lock:
        results = [
            state._property_def(n)
            for n, d in state.deal_properties.items()
            if d.get("archived", False) == archived
        ]
        return JSONResponse({"results": results})


# https://developers.hubspot.com/docs/api-reference/crm-properties-v3/guide
async def get_property(request: Request, state: HubSpotState) -> Response:
    _object_type(request)
    name = request.path_params["propertyName"]
    with state.lock:
        d = state._property_def(name)
        if d is None:
            raise ApiError(
                404, "OBJECT_NOT_FOUND", f"Unable to find property {name} for object type deals"
            )
        return JSONResponse(d)


# https://developers.hubspot.com/docs/api-reference/crm-properties-v3/guide#create-a-property
async def create_property(request: Request, state: HubSpotState) -> Response:
    _object_type(request)
    body = _json_object(await _json_body(request))
    missing = [k for k in ("name", "label", "type", "fieldType", "groupName") if not body.get(k)]
    if missing:
        raise ApiError(
            400,
            "VALIDATION_ERROR",
            f"Missing required fields: {', '.join(missing)}",
            context={"missing": missing},
        )
    name = str(body["name"])
    if not _NAME_RE.match(name):
        raise ApiError(
            400, "VALIDATION_ERROR", f"Property name {name!r} must be lowercase letters, digits, _"
        )
    if body["type"] not in PROPERTY_TYPES or body["fieldType"] not in FIELD_TYPES:
        raise ApiError(
            400, "VALIDATION_ERROR", f"Invalid type/fieldType: {body['type']}/{body['fieldType']}"
        )
    with state.lock:
        if name in state.deal_properties:
            raise ApiError(
                409,
                "OBJECT_ALREADY_EXISTS",
                f"A property named '{name}' already exists.",
                context={"name": [name]},
            )
        ts = _iso(state.now())
        d = _standard_property(
            name,
            str(body["label"]),
            body["type"],
            body["fieldType"],
            description=str(body.get("description") or ""),
            display_order=int(body.get("displayOrder", -1)),
            options=[
                _option(o.get("label", ""), str(o.get("value", "")), int(o.get("displayOrder", i)))
                for i, o in enumerate(body.get("options") or [])
            ],
            external_options=bool(body.get("externalOptions", False)),
            has_unique_value=bool(body.get("hasUniqueValue", False)),
            group_name=str(body["groupName"]),
        )
        d["hubspotDefined"] = False
        d["modificationMetadata"] = {
            "archivable": True,
            "readOnlyDefinition": False,
            "readOnlyValue": False,
        }
        d["formField"] = bool(body.get("formField", True))
        d["hidden"] = bool(body.get("hidden", False))
        d["createdAt"] = d["updatedAt"] = ts
        state.deal_properties[name] = d
        state.search_version += 1
        return JSONResponse(copy.deepcopy(d), status_code=201)


# https://developers.hubspot.com/docs/api-reference/crm-owners-v3/guide
async def list_owners(request: Request, state: HubSpotState) -> Response:
    q = request.query_params
    limit = _int_param(q.get("limit"), "limit", 100)
    if limit < 1 or limit > OWNERS_MAX_LIMIT:
        raise ApiError(400, "VALIDATION_ERROR", f"limit must be between 1 and {OWNERS_MAX_LIMIT}")
    start = _int_param(q.get("after"), "after", 0)
    email = q.get("email")
    archived = _bool_param(q.get("archived"))
    with state.lock:
        owners = [
            o
            for o in sorted(state.owners.values(), key=lambda o: int(o["id"]))
            if o["archived"] == archived
            and (not email or o["email"].lower() == email.lower())
            and int(o["id"]) >= start
        ]
        body: dict[str, Any] = {"results": copy.deepcopy(owners[:limit])}
        if len(owners) > limit:
            body["paging"] = {"next": {"after": owners[limit]["id"]}}
        return JSONResponse(body)


# --------------------------------------------------------------------------------------------
# Notes and associations
# --------------------------------------------------------------------------------------------


# https://developers.hubspot.com/docs/api-reference/crm-notes-v3/guide#create-a-note
async def create_note(request: Request, state: HubSpotState) -> Response:
    body = _json_object(await _json_body(request))
    props = body.get("properties")
    if not isinstance(props, dict):
        raise ApiError(400, "VALIDATION_ERROR", "Invalid input JSON: properties is required")
    known = {"hs_note_body", "hs_timestamp", "hubspot_owner_id", "hs_attachment_ids"}
    unknown = [n for n in props if n not in known]
    if unknown:
        raise _property_error(
            [(n, "PROPERTY_DOESNT_EXIST", f'Property "{n}" does not exist') for n in unknown]
        )
    # "hs_timestamp ... Required": the note's place on the record timeline.
    stamp = _parse_instant(props.get("hs_timestamp"))
    if stamp is None:
        raise _property_error(
            [("hs_timestamp", "REQUIRED_PROPERTY", "hs_timestamp is required and must be a date")]
        )
    body_text = str(props.get("hs_note_body") or "")
    if len(body_text) > 65_536:
        raise _property_error([("hs_note_body", "INVALID_STRING", "Note body exceeds 65536 chars")])
    targets: list[str] = []
    with state.lock:
        for assoc in body.get("associations") or []:
            to_id = str((assoc.get("to") or {}).get("id", ""))
            for t in assoc.get("types") or []:
                category = t.get("associationCategory")
                type_id = t.get("associationTypeId")
                if category != "HUBSPOT_DEFINED" or type_id != NOTE_TO_DEAL:
                    raise ApiError(
                        400,
                        "VALIDATION_ERROR",
                        f"Invalid association type {category}/{type_id}: this portal only knows "
                        f"HUBSPOT_DEFINED {NOTE_TO_DEAL} (note to deal).",
                    )
            rec = state.deals.get(to_id)
            if rec is None or rec.archived:
                raise ApiError(
                    400,
                    "VALIDATION_ERROR",
                    f"One or more association targets do not exist: DEAL {to_id}",
                    context={"toObjectId": [to_id]},
                )
            targets.append(to_id)
        now = state.now()
        nid = state._new_id()
        rec = _Record(nid, {"hs_note_body": body_text, "hs_timestamp": _iso(stamp)}, now, now)
        if props.get("hubspot_owner_id"):
            rec.properties["hubspot_owner_id"] = str(props["hubspot_owner_id"])
        state._recalculate_note(rec)
        state.notes[nid] = rec
        for did in targets:
            state._associate("notes", nid, "deals", did)
        return JSONResponse(
            _render(rec.view(), list(rec.properties), (), NOTE_DEFAULT_PROPERTIES),
            status_code=201,
        )


def _object_exists(state: HubSpotState, object_type: str, object_id: str) -> bool:
    store = {"deals": state.deals, "notes": state.notes}.get(object_type)
    if store is None:
        raise ApiError(400, "VALIDATION_ERROR", f"Unknown object type {object_type}")
    rec = store.get(object_id)
    return rec is not None and not rec.archived


def _plural(object_type: str) -> str:
    return {"deal": "deals", "note": "notes", "0-3": "deals", "0-46": "notes"}.get(
        object_type, object_type
    )


# https://developers.hubspot.com/docs/api-reference/crm-associations-v4/guide#retrieve-associated-records
async def list_associations(request: Request, state: HubSpotState) -> Response:
    from_type = _plural(request.path_params["objectType"])
    to_type = _plural(request.path_params["toObjectType"])
    object_id = request.path_params["objectId"]
    q = request.query_params
    limit = _int_param(q.get("limit"), "limit", ASSOC_MAX_LIMIT)
    if limit < 1 or limit > ASSOC_MAX_LIMIT:
        raise ApiError(400, "VALIDATION_ERROR", f"limit must be between 1 and {ASSOC_MAX_LIMIT}")
    start = _int_param(q.get("after"), "after", 0)
    with state.lock:
        if not _object_exists(state, from_type, object_id):
            raise ApiError(404, "OBJECT_NOT_FOUND", f"No {from_type} with id {object_id}")
        by_target: dict[str, list[_Association]] = {}
        for a in state.associations:
            if a.from_type == from_type and a.from_id == object_id and a.to_type == to_type:
                by_target.setdefault(a.to_id, []).append(a)
        ordered = sorted((t for t in by_target if int(t) >= start), key=int)
        results = [
            {
                # The API sends the id as a number (the Python client turns it into a str).
                "toObjectId": int(t),
                "associationTypes": [
                    {"category": a.category, "typeId": a.type_id, "label": a.label}
                    for a in by_target[t]
                ],
            }
            for t in ordered[:limit]
        ]
        body: dict[str, Any] = {"results": results}
        if len(ordered) > limit:
            body["paging"] = {"next": {"after": ordered[limit]}}
        return JSONResponse(body)


# https://developers.hubspot.com/docs/api-reference/crm-associations-v4/guide#associate-records-without-a-label
async def create_default_association(request: Request, state: HubSpotState) -> Response:
    p = request.path_params
    from_type, to_type = _plural(p["fromObjectType"]), _plural(p["toObjectType"])
    from_id, to_id = p["fromObjectId"], p["toObjectId"]
    if {from_type, to_type} != {"notes", "deals"}:
        raise ApiError(
            400,
            "VALIDATION_ERROR",
            f"No default association type between {from_type} and {to_type} in this emulator",
        )
    with state.lock:
        started = state.now()
        for t, i in ((from_type, from_id), (to_type, to_id)):
            if not _object_exists(state, t, i):
                raise ApiError(404, "OBJECT_NOT_FOUND", f"No {t} with id {i}")
        state._associate(from_type, from_id, to_type, to_id)
        type_ids = {("notes", "deals"): NOTE_TO_DEAL, ("deals", "notes"): DEAL_TO_NOTE}
        results = [
            {
                "from": {"id": a},
                "to": {"id": b},
                "associationSpec": {
                    "associationCategory": "HUBSPOT_DEFINED",
                    "associationTypeId": type_ids[(ta, tb)],
                },
            }
            for a, ta, b, tb in (
                (from_id, from_type, to_id, to_type),
                (to_id, to_type, from_id, from_type),
            )
        ]
        return JSONResponse(
            {
                "status": "COMPLETE",
                "results": results,
                "startedAt": _iso(started),
                "completedAt": _iso(state.now()),
            }
        )


# --------------------------------------------------------------------------------------------
# OAuth
# --------------------------------------------------------------------------------------------


def _oauth_error(status: str, message: str) -> JSONResponse:
    # The OAuth endpoint has its own error shape: `status` carries the error code.
    return JSONResponse(
        {"status": status, "message": message, "correlationId": _correlation_id()},
        status_code=400,
    )


# https://developers.hubspot.com/docs/api-reference/auth-oauth-v1/tokens/post-oauth-v1-token
# https://developers.hubspot.com/docs/apps/developer-platform/build-apps/authentication/oauth/oauth-quickstart-guide
async def oauth_token(request: Request, state: HubSpotState) -> Response:
    raw = (await request.body()).decode("utf-8", "replace")
    form = dict(urllib.parse.parse_qsl(raw, keep_blank_values=True))
    form.update({k: v for k, v in request.query_params.items() if k not in form})
    grant = form.get("grant_type")
    if grant not in ("refresh_token", "authorization_code"):
        return _oauth_error("BAD_GRANT_TYPE", "missing or invalid grant_type")
    with state.lock:
        client = state.oauth_clients.get(str(form.get("client_id", "")))
        if client is None:
            return _oauth_error("BAD_CLIENT_ID", "missing or unknown client_id")
        if form.get("client_secret") != client.client_secret:
            return _oauth_error("BAD_CLIENT_SECRET", "missing or invalid client_secret")
        if grant == "authorization_code":
            return _oauth_error("BAD_AUTH_CODE", "missing or unknown auth code")
        refresh = str(form.get("refresh_token", ""))
        if state.refresh_tokens.get(refresh) != client.client_id:
            return _oauth_error("BAD_REFRESH_TOKEN", "missing or unknown refresh token")
        access = state.issue_access_token(client.client_id)
    # HubSpot returns the same refresh token; the access token lasts 30 minutes.
    return JSONResponse(
        {
            "token_type": "bearer",
            "refresh_token": refresh,
            "access_token": access,
            "expires_in": int(ACCESS_TOKEN_TTL.total_seconds()),
        }
    )


# --------------------------------------------------------------------------------------------
# App
# --------------------------------------------------------------------------------------------

_ROUTE_TABLE: list[tuple[str, list[str], Handler, bool]] = [
    ("/oauth/v1/token", ["POST"], oauth_token, False),
    ("/crm/v3/objects/deals/search", ["POST"], search_deals, True),
    ("/crm/v3/objects/deals/batch/read", ["POST"], batch_read, True),
    ("/crm/v3/objects/deals/batch/update", ["POST"], batch_update, True),
    ("/crm/v3/objects/deals", ["GET"], list_deals, True),
    ("/crm/v3/objects/deals", ["POST"], create_deal, True),
    ("/crm/v3/objects/deals/{dealId}", ["GET"], get_deal, True),
    ("/crm/v3/objects/deals/{dealId}", ["PATCH"], update_deal, True),
    ("/crm/v3/pipelines/{objectType}", ["GET"], list_pipelines, True),
    ("/crm/v3/pipelines/{objectType}/{pipelineId}", ["GET"], get_pipeline, True),
    ("/crm/v3/properties/{objectType}", ["GET"], list_properties, True),
    ("/crm/v3/properties/{objectType}", ["POST"], create_property, True),
    ("/crm/v3/properties/{objectType}/{propertyName}", ["GET"], get_property, True),
    ("/crm/v3/owners", ["GET"], list_owners, True),
    ("/crm/v3/owners/", ["GET"], list_owners, True),  # the Python client adds the slash
    ("/crm/v3/objects/notes", ["POST"], create_note, True),
    (
        "/crm/v4/objects/{objectType}/{objectId}/associations/{toObjectType}",
        ["GET"],
        list_associations,
        True,
    ),
    (
        "/crm/v4/objects/{fromObjectType}/{fromObjectId}/associations/default/"
        "{toObjectType}/{toObjectId}",
        ["PUT"],
        create_default_association,
        True,
    ),
]


async def _unused(request: Request) -> Response:  # pragma: no cover - routing table only
    return Response(status_code=500)


# Route templates, used by HubSpotFlavor.route_name (one stable name per endpoint).
ROUTES: list[Route] = [Route(p, _unused, methods=m) for p, m, _, _ in _ROUTE_TABLE]


def create_app(state: HubSpotState, controls: EmulatorControls | None = None) -> ASGIApp:
    """The emulator as an ASGI app, wrapped in the shared middleware (`state.controls`)."""
    controls = controls or EmulatorControls()
    state.controls = controls
    controls.clock = state.now
    routes = [Route(p, _endpoint(state, h, auth), methods=m) for p, m, h, auth in _ROUTE_TABLE]

    async def not_found(request: Request, exc: Exception) -> Response:
        return ApiError(404, "OBJECT_NOT_FOUND", f"No route for {request.url.path}").response()

    async def method_not_allowed(request: Request, exc: Exception) -> Response:
        return JSONResponse(
            {
                "status": "error",
                "message": f"HTTP {request.method} is not supported by this URL",
                "correlationId": _correlation_id(),
                "category": "INVALID_METHOD",
            },
            status_code=405,
        )

    starlette_app = Starlette(
        routes=routes, exception_handlers={404: not_found, 405: method_not_allowed}
    )
    # The middleware keeps the controls as `.controls`; the state keeps them too.
    return EmulatorMiddleware(starlette_app, controls, HubSpotFlavor(controls))
