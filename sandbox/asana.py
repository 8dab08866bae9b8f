"""A local, stateful emulator of the Asana REST API 1.0 (workspaces, teams, users, projects,
project templates and their instantiation jobs, sections, tasks, stories, status updates,
custom fields, task search and events).

Handoff's tests, benchmarks and demo run against it instead of a real Asana domain. It follows
what Asana documents (and what the official `asana` v5 client expects), not what our connector
would find convenient:

- every body is a `{"data": ...}` envelope; errors are `{"errors": [{"message", "help"}]}`
  (`phrase` on 500s only);
- list endpoints return compact records unless `opt_fields` asks for more; single reads return
  the full record; `opt_fields` replaces the default field set (only `gid` is always kept);
- lists are unpaginated unless `limit` (1..100) is given; then `next_page` is
  `{offset, path, uri}` or `null`; offsets are opaque, bound to their query, and expire;
- the standard rate limit is 150 (free) or 1,500 (paid) requests per minute per token,
  evaluated as a sliding window in which rejected requests count too; search has its own
  60/minute; at most 5 duplication/instantiation jobs run at once;
- task search is premium-only (402), has no pagination, returns at most 100 results in an
  unstable order, and lags writes (`search_lag`);
- `modified_at` changes only for the changes Asana lists (not for moving a task between
  containers; a project's not for tasks or comments added to it).

Main references (cited again above each endpoint):
- Rate limits: https://developers.asana.com/docs/rate-limits
- Errors: https://developers.asana.com/docs/errors
- Pagination: https://developers.asana.com/docs/pagination
- Input/output options: https://developers.asana.com/docs/inputoutput-options
- Search: https://developers.asana.com/reference/searchtasksforworkspace
- OpenAPI spec: https://raw.githubusercontent.com/Asana/openapi/master/defs/asana_oas.yaml
"""

from __future__ import annotations

import base64
import bisect
import copy
import hashlib
import hmac
import json
import math
import random
import secrets
import threading
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Iterable
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

BASE_PATH = "/api/1.0"

# https://developers.asana.com/docs/rate-limits ("Standard rate limits"): minute-long windows,
# 150 requests per minute on free domains and 1,500 on paid ones, per authorization token.
FREE_PER_MINUTE = 150
PAID_PER_MINUTE = 1_500
# Same page: "calls to the search API are limited to 60 requests per minute" and "the
# duplication endpoints are limited to 5 concurrent jobs".
SEARCH_PER_MINUTE = 60
MAX_CONCURRENT_DUPLICATIONS = 5
RATE_LIMIT_MESSAGE = (
    "You've made too many requests and hit a rate limit. "
    "Please retry after the given amount of time."
)
# https://developers.asana.com/docs/errors - 4xx bodies carry this pointer in `help`.
ERROR_HELP = (
    "For more information on API status codes and how to handle them, "
    "read the docs on errors: https://developers.asana.com/docs/errors"
)
# https://developers.asana.com/docs/pagination: page sizes 1..100; unpaginated ("grandfathered")
# requests are truncated or refused at about 1,000 objects.
MAX_LIMIT = 100
UNPAGINATED_CEILING = 1_000
# https://developers.asana.com/reference/searchtasksforworkspace: at most 100 per request.
SEARCH_MAX_RESULTS = 100
# https://developers.asana.com/reference/getevents: at most 100 events per call (has_more).
EVENTS_PAGE = 100

TEMPLATE_NAME = "Customer onboarding"
DEFAULT_SECTION = "Untitled section"

_PHRASE_WORDS = (
    ("sad", "happy", "quiet", "brave", "sleepy", "fuzzy", "lucky", "witty"),
    ("squid", "otters", "llamas", "pandas", "geese", "ferrets", "moles", "crabs"),
    ("snuggle", "dance", "whisper", "wander", "giggle", "tumble", "sing", "nap"),
    ("softly", "gently", "loudly", "slowly", "boldly", "warmly", "oddly", "calmly"),
)

# Keys of the compact form of each resource type (the `*Compact` schemas of the spec). A nested
# object that `opt_fields` names without sub-fields comes back in this form.
COMPACT: dict[str, tuple[str, ...]] = {
    "workspace": ("gid", "resource_type", "name"),
    "team": ("gid", "resource_type", "name"),
    "user": ("gid", "resource_type", "name"),
    "project": ("gid", "resource_type", "name"),
    "project_template": ("gid", "resource_type", "name"),
    "section": ("gid", "resource_type", "name"),
    "task": ("gid", "resource_type", "name", "resource_subtype"),
    "enum_option": ("gid", "resource_type", "name", "enabled", "color"),
    "custom_field": (  # CustomFieldCompact has `type` but not `resource_subtype`
        "gid",
        "resource_type",
        "name",
        "type",
        "enum_options",
        "enabled",
        "representation_type",
        "id_prefix",
        "is_formula_field",
        "date_value",
        "enum_value",
        "multi_enum_values",
        "number_value",
        "text_value",
        "display_value",
    ),
    "custom_field_setting": ("gid", "resource_type", "custom_field", "is_important"),
    "story": ("gid", "resource_type", "created_at", "created_by", "resource_subtype", "text"),
    "status_update": ("gid", "resource_type", "title", "resource_subtype"),
    "job": (
        "gid",
        "resource_type",
        "resource_subtype",
        "status",
        "new_project",
        "new_project_template",
        "new_task",
    ),
}
# Fields a single-record read leaves out unless `opt_fields` names them.
OPT_IN: dict[str, frozenset[str]] = {
    "task": frozenset({"html_notes", "dependencies", "dependents", "external"}),
    "project": frozenset({"html_notes", "project_brief"}),
    "story": frozenset({"html_text"}),
    "status_update": frozenset({"html_text"}),
    "team": frozenset({"html_description"}),
    "project_template": frozenset({"html_description"}),
}
CUSTOM_FIELD_TYPES = frozenset({"text", "number", "enum", "multi_enum", "date", "people"})
STATUS_TYPES = frozenset(
    {
        "on_track",
        "at_risk",
        "off_track",
        "on_hold",
        "complete",
        "achieved",
        "partial",
        "missed",
        "dropped",
    }
)
TASK_SUBTYPES = frozenset({"default_task", "milestone", "approval"})
PROJECT_COLORS = frozenset(
    f"{shade}-{hue}"
    for shade in ("dark", "light")
    for hue in (
        "pink",
        "green",
        "blue",
        "red",
        "teal",
        "brown",
        "orange",
        "purple",
        "warm-gray",
    )
) | {"none"}


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _iso(dt: datetime) -> str:
    """Asana's timestamp format: UTC, millisecond precision, trailing Z."""
    dt = dt.astimezone(UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


def _parse_instant(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value.strip():
        return None
    text = value.strip()
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _parse_date(value: Any) -> date | None:
    if not isinstance(value, str):
        return None
    try:
        return date.fromisoformat(value.strip()[:10])
    except ValueError:
        return None


def _html(text: str) -> str:
    escaped = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return f"<body>{escaped}</body>"


class ApiError(Exception):
    """Raised inside a handler; becomes Asana's `{"errors": [...]}` body."""

    def __init__(
        self, status: int, message: str, headers: dict[str, str] | None = None, **extra: Any
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}
        self.extra = extra

    def response(self) -> JSONResponse:
        # https://developers.asana.com/docs/errors: 4xx carry `message` and `help`; the 401
        # example carries only "Not Authorized"; 5xx carry a `phrase` instead of `help`.
        error: dict[str, Any] = {"message": self.message}
        if self.status >= 500:
            error["phrase"] = _phrase()
        elif self.status not in (401, 412):  # the spec's 412 error has only a message
            error["help"] = ERROR_HELP
        body: dict[str, Any] = {"errors": [error], **self.extra}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def _phrase() -> str:
    rng = random.Random()
    words = [rng.choice(group) for group in _PHRASE_WORDS]
    return f"{rng.randint(2, 30)} {' '.join(words)}"


def _missing(name: str) -> ApiError:
    return ApiError(400, f"{name}: Missing input")


def _not_gid(name: str, value: Any) -> ApiError:
    return ApiError(400, f"{name}: Not a recognized ID: {value}")


def _unknown(kind: str, gid: str) -> ApiError:
    return ApiError(404, f"{kind}: Unknown object: {gid}")


# --------------------------------------------------------------------------------------------
# State
# --------------------------------------------------------------------------------------------


@dataclass
class _Job:
    gid: str
    token: str
    subtype: str
    started: float  # time.monotonic()
    seconds: float
    new_project: str | None
    finish: Callable[[], None] | None
    status: str = "in_progress"

    def due(self, now: float) -> bool:
        return now - self.started >= self.seconds


@dataclass
class _SyncToken:
    resource: str
    position: int  # index into the event log
    issued: datetime


@dataclass
class _Event:
    resource: str  # gid of the changed object
    scopes: frozenset[str]  # gids whose event streams include this event
    body: dict[str, Any]


class AsanaState:
    """One Asana domain in memory, thread-safe; tests arrange it through these methods."""

    def __init__(
        self,
        tokens: Iterable[str] = (),
        *,
        premium: bool = False,
        job_seconds: float = 0.05,
        seed: int = 0,
    ) -> None:
        self.lock = threading.RLock()
        self.tokens: set[str] = set(tokens)
        self.token_users: dict[str, str] = {}  # token -> user gid (default: `me_gid`)
        self.premium = premium
        self.job_seconds = job_seconds
        self.clock_offset = timedelta(0)
        # Search indexing lag: "This process can take between 10 and 60 seconds".
        self.search_lag = timedelta(0)
        # "an offset token will expire after some time": ours after this long.
        self.offset_ttl = timedelta(minutes=30)
        # Event sync tokens stop working after this long (the client must resync).
        self.sync_ttl = timedelta(hours=24)
        self.controls: EmulatorControls | None = None
        self.objects: dict[str, dict[str, Any]] = {}
        # Indexes over `objects` (a record counts only while `objects` still holds it): reads
        # cost what they return, not what the domain holds (benchmarks hold 100,000s).
        self._by_kind: dict[str, dict[str, dict[str, Any]]] = {}
        self._children: dict[str, list[dict[str, Any]]] = {}
        # Tasks by the `modified_at` of their latest version, sorted; rebuilt after any change.
        self._modified_order: list[tuple[datetime, str]] | None = None
        self.jobs: dict[str, _Job] = {}
        self._running: dict[str, _Job] = {}  # the in-progress subset of `jobs`
        self.events: list[_Event] = []
        self.sync_tokens: dict[str, _SyncToken] = {}
        self.me_gid: str | None = None
        self.workspace_gid: str | None = None
        self.team_gid: str | None = None
        self.template_gid: str | None = None
        self._rng = random.Random(seed)
        self._next_gid = 1_208_000_000_000_000 + self._rng.randrange(1_000_000)
        self._secret = secrets.token_bytes(16)

    # -- basics ---------------------------------------------------------------------------
    def now(self) -> datetime:
        return datetime.now(UTC) + self.clock_offset

    def _gid(self) -> str:
        self._next_gid += self._rng.randint(1, 97)
        return str(self._next_gid)

    def _put(self, kind: str, record: dict[str, Any]) -> dict[str, Any]:
        gid = record.get("gid") or self._gid()
        record = {"gid": gid, "resource_type": kind, **record}
        self.objects[gid] = record
        self._by_kind.setdefault(kind, {})[gid] = record
        return record

    def _live(self, rec: dict[str, Any]) -> bool:
        return self.objects.get(rec["gid"]) is rec and not rec.get("_deleted")

    def _get(self, kind: str, gid: str, param: str | None = None) -> dict[str, Any]:
        rec = self.objects.get(gid)
        if rec is None or rec["resource_type"] != kind or rec.get("_deleted"):
            if not gid.isdigit() and gid != "me":
                raise _not_gid(param or kind, gid)
            raise _unknown(param or kind, gid)
        return rec

    def _all(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self._by_kind.get(kind, {}).values() if self._live(o)]

    def user_for(self, token: str) -> str:
        return self.token_users.get(token) or self.me_gid or ""

    # -- arrangement API -------------------------------------------------------------------
    def add_workspace(self, name: str, email_domains: Iterable[str] = ()) -> str:
        with self.lock:
            domains = list(email_domains)
            return self._put(
                "workspace",
                {"name": name, "email_domains": domains, "is_organization": bool(domains)},
            )["gid"]

    def add_team(self, name: str, workspace: str, description: str = "") -> str:
        with self.lock:
            return self._put(
                "team",
                {
                    "name": name,
                    "organization": workspace,
                    "description": description,
                    "visibility": "request_to_join",
                },
            )["gid"]

    def add_user(self, name: str, email: str, workspaces: Iterable[str] = ()) -> str:
        with self.lock:
            ws = list(workspaces) or ([self.workspace_gid] if self.workspace_gid else [])
            return self._put("user", {"name": name, "email": email, "workspaces": ws})["gid"]

    def add_custom_field(
        self,
        name: str,
        resource_subtype: str,
        workspace: str | None = None,
        *,
        enum_options: Iterable[str] = (),
        precision: int = 0,
        description: str = "",
        fmt: str = "none",
        currency_code: str | None = None,
    ) -> str:
        with self.lock:
            ws = workspace or self.workspace_gid
            if resource_subtype not in CUSTOM_FIELD_TYPES:
                raise ApiError(400, f"resource_subtype: Invalid value: {resource_subtype}")
            colors = ("green", "yellow", "red", "blue", "purple", "orange")
            options = [
                self._put(
                    "enum_option",
                    {"name": label, "enabled": True, "color": colors[i % len(colors)]},
                )["gid"]
                for i, label in enumerate(enum_options)
            ]
            return self._put(
                "custom_field",
                {
                    "name": name,
                    "resource_subtype": resource_subtype,
                    "workspace": ws,
                    "enum_options": options,
                    "precision": precision,
                    "description": description,
                    "format": fmt,
                    "currency_code": currency_code,
                    "created_by": self.me_gid,
                    "enabled": True,
                },
            )["gid"]

    def add_project(
        self,
        name: str,
        team: str | None = None,
        *,
        owner: str | None = None,
        notes: str = "",
        archived: bool = False,
        created_at: datetime | None = None,
    ) -> str:
        """A plain project (with Asana's default "Untitled section")."""
        with self.lock:
            team = team or self.team_gid
            ws = self.objects[team]["organization"] if team else self.workspace_gid
            return self._new_project(
                {"name": name, "notes": notes, "archived": archived},
                ws or "",
                team,
                owner or self.me_gid,
                created_at=created_at,
            )["gid"]

    def add_task(
        self,
        project: str,
        name: str,
        *,
        section: str | None = None,
        resource_subtype: str = "default_task",
        due_on: str | None = None,
        completed: bool = False,
        notes: str = "",
    ) -> str:
        with self.lock:
            proj = self._get("project", project)
            task = self._new_task(
                {
                    "name": name,
                    "resource_subtype": resource_subtype,
                    "due_on": due_on,
                    "notes": notes,
                },
                proj["workspace"],
                self.me_gid,
            )
            self._add_to_project(task, proj, section)
            if completed:
                self._set_completed(task, True, self.me_gid)
            return task["gid"]

    def complete_task(self, gid: str, completed: bool = True) -> None:
        """What a user ticking the task off in the Asana UI does."""
        with self.lock:
            task = self._get("task", gid)
            self._set_completed(task, completed, self.me_gid)

    def touch_task(self, gid: str, modified_at: datetime) -> None:
        """Backdate (or postdate) a task's `modified_at`, as if last edited then."""
        with self.lock:
            task = self._get("task", gid)
            task["modified_at"] = modified_at
            self._index(task)

    def projects(self) -> list[dict[str, Any]]:
        with self.lock:
            self._advance_jobs()
            return [self.view(p) for p in self._all("project")]

    def project(self, gid: str) -> dict[str, Any]:
        with self.lock:
            self._advance_jobs()
            return self.view(self._get("project", gid))

    def sections_in_project(self, gid: str) -> list[dict[str, Any]]:
        with self.lock:
            self._advance_jobs()
            proj = self._get("project", gid)
            return [self.view(self.objects[s]) for s in proj["sections"]]

    def tasks_in_project(self, gid: str) -> list[dict[str, Any]]:
        with self.lock:
            self._advance_jobs()
            return [self.view(t) for t in self._project_tasks(self._get("project", gid))]

    def task(self, gid: str) -> dict[str, Any]:
        with self.lock:
            return self.view(self._get("task", gid))

    def stories(self, task_gid: str) -> list[dict[str, Any]]:
        with self.lock:
            return [self.view(s) for s in self._all("story") if s["target"] == task_gid]

    def status_updates(self, project_gid: str) -> list[dict[str, Any]]:
        with self.lock:
            return [self.view(s) for s in self._all("status_update") if s["parent"] == project_gid]

    def running_jobs(self, token: str | None = None) -> int:
        with self.lock:
            self._advance_jobs()
            return sum(
                1
                for j in self._running.values()
                if j.status == "in_progress" and (token is None or j.token == token)
            )

    def custom_field_gid(self, name: str) -> str:
        with self.lock:
            for cf in self._all("custom_field"):
                if cf["name"] == name:
                    return cf["gid"]
        raise KeyError(name)

    def seed(self, rng: random.Random) -> dict[str, str]:
        """A realistic domain: workspace "Acme Delivery", team "Delivery", users, custom
        fields and the "Customer onboarding" template. Returns the gids by role."""
        with self.lock:
            created = self.now() - timedelta(days=rng.randint(400, 900))
            ws = self.add_workspace("Acme Delivery", ["acme-delivery.example"])
            self.workspace_gid = ws
            people = [
                ("Dana Whitfield", "dana"),
                ("Ravi Menon", "ravi"),
                ("Sofia Alvarez", "sofia"),
                ("Tomasz Nowak", "tomasz"),
                ("Grace Okafor", "grace"),
                ("Liam Chen", "liam"),
            ]
            users = [self.add_user(n, f"{u}@acme-delivery.example", [ws]) for n, u in people]
            self.me_gid = users[0]
            team = self.add_team("Delivery", ws, "Customer delivery and onboarding")
            self.team_gid = team
            self.objects[team]["members"] = list(users)
            deal = self.add_custom_field(
                "Handoff deal", "text", ws, description="CRM deal this project was made for"
            )
            amount = self.add_custom_field(
                "Deal amount", "number", ws, precision=2, fmt="currency", currency_code="USD"
            )
            tier = self.add_custom_field(
                "Deal tier", "enum", ws, enum_options=("Bronze", "Silver", "Gold", "Platinum")
            )
            role = self._put("template_role", {"name": "Project lead"})["gid"]
            template = self._put(
                "project_template",
                {
                    "name": TEMPLATE_NAME,
                    "description": "Kickoff to go-live for a newly won customer.",
                    "owner": users[0],
                    "public": True,
                    "team": team,
                    "color": "light-green",
                    "requested_dates": [
                        {
                            "gid": "1",
                            "name": "Start Date",
                            "description": "Choose a start date for your project.",
                        }
                    ],
                    "requested_roles": [role],
                    # What the template instantiates: sections in order, then tasks with their
                    # due date relative to the start date and an optional role assignee.
                    "_sections": ["Kickoff", "Implementation", "Go-live"],
                    "_tasks": [
                        ("Kickoff", "Kickoff call held", "milestone", 3, role),
                        ("Kickoff", "Collect customer requirements", "default_task", 7, None),
                        ("Implementation", "Environment provisioned", "milestone", 14, None),
                        ("Implementation", "Data migrated", "milestone", 28, None),
                        ("Implementation", "Train customer admins", "default_task", 35, None),
                        ("Go-live", "Go-live", "milestone", 45, role),
                        ("Go-live", "Hypercare review", "default_task", 60, None),
                    ],
                },
            )["gid"]
            self.template_gid = template
            # A few live and archived projects, as any real team has.
            for i, customer in enumerate(("Globex", "Initech", "Umbrella", "Hooli")):
                when = created + timedelta(days=30 * (i + 1) + rng.randint(0, 20))
                gid = self.add_project(
                    f"{customer} onboarding",
                    team,
                    owner=rng.choice(users),
                    archived=i == 0,
                    created_at=when,
                )
                for section in ("Kickoff", "Go-live"):
                    self._new_section(self.objects[gid], section, when)
                for j, (title, subtype) in enumerate(
                    (("Kickoff call held", "milestone"), ("Go-live", "milestone"))
                ):
                    self.add_task(
                        gid,
                        title,
                        section=self.objects[gid]["sections"][j + 1],
                        resource_subtype=subtype,
                        due_on=(when + timedelta(days=10 + 30 * j)).date().isoformat(),
                        completed=i == 0 or (j == 0 and rng.random() < 0.5),
                    )
            return {
                "workspace": ws,
                "team": team,
                "me": users[0],
                "template": template,
                "deal_field": deal,
                "amount_field": amount,
                "tier_field": tier,
            }

    # -- internals: creation and updates ------------------------------------------------------
    def _new_project(
        self,
        fields: dict[str, Any],
        workspace: str,
        team: str | None,
        owner: str | None,
        *,
        created_at: datetime | None = None,
        template: str | None = None,
        default_section: bool = True,
    ) -> dict[str, Any]:
        now = created_at or self.now()
        proj = self._put(
            "project",
            {
                "name": fields.get("name", ""),
                "notes": fields.get("notes", ""),
                "archived": bool(fields.get("archived", False)),
                "color": fields.get("color"),
                "default_view": fields.get("default_view", "list"),
                "due_on": fields.get("due_on"),
                "start_on": fields.get("start_on"),
                "public": bool(fields.get("public", False)),
                "privacy_setting": fields.get("privacy_setting")
                or ("public_to_workspace" if fields.get("public") else "private"),
                "workspace": workspace,
                "team": team,
                "owner": owner,
                "members": [owner] if owner else [],
                "followers": [owner] if owner else [],
                "created_at": now,
                "modified_at": now,
                "completed": False,
                "completed_at": None,
                "completed_by": None,
                "current_status_update": None,
                "created_from_template": template,
                "settings": [],  # custom_field_setting gids in order
                "values": {},  # custom field gid -> stored value
                "sections": [],
            },
        )
        if default_section:
            # A project made in Asana starts with one empty "Untitled section"; tasks added
            # without a section land in it.
            self._new_section(proj, DEFAULT_SECTION, now)
        self._event(proj, "added", scopes=(proj["gid"], workspace))
        return proj

    def _new_section(self, proj: dict[str, Any], name: str, when: datetime | None = None) -> str:
        section = self._put(
            "section",
            {"name": name, "project": proj["gid"], "created_at": when or self.now(), "tasks": []},
        )
        proj["sections"].append(section["gid"])
        self._event(section, "added", parent=proj["gid"], scopes=(proj["gid"],))
        return section["gid"]

    def _new_task(self, fields: dict[str, Any], workspace: str, creator: str | None) -> dict:
        now = self.now()
        task = self._put(
            "task",
            {
                "name": fields.get("name", ""),
                "resource_subtype": fields.get("resource_subtype") or "default_task",
                "notes": fields.get("notes", ""),
                "due_on": fields.get("due_on"),
                "due_at": fields.get("due_at"),
                "start_on": fields.get("start_on"),
                "assignee": fields.get("assignee"),
                "workspace": workspace,
                "created_at": now,
                "modified_at": now,
                "created_by": creator,
                "completed": False,
                "completed_at": None,
                "completed_by": None,
                "followers": [creator] if creator else [],
                "parent": fields.get("parent"),
                "memberships": [],  # [(project gid, section gid)]
                "values": {},
                "_history": [],
            },
        )
        if task["resource_subtype"] == "approval":
            task["approval_status"] = "pending"
        if task["parent"]:
            self._children.setdefault(task["parent"], []).append(task)
        self._index(task)
        return task

    def _add_to_project(
        self, task: dict[str, Any], proj: dict[str, Any], section: str | None, top: bool = False
    ) -> None:
        """Put the task into a section of the project (moving it within the project)."""
        if not proj["sections"]:
            self._new_section(proj, DEFAULT_SECTION)
        target = section or proj["sections"][0]
        for i, (p, s) in enumerate(task["memberships"]):
            if p == proj["gid"]:
                if task["gid"] in self.objects[s]["tasks"]:
                    self.objects[s]["tasks"].remove(task["gid"])
                task["memberships"][i] = (p, target)
                break
        else:
            task["memberships"].append((proj["gid"], target))
            self._event(task, "added", parent=proj["gid"], scopes=(proj["gid"], task["gid"]))
        tasks = self.objects[target]["tasks"]
        if top:
            tasks.insert(0, task["gid"])
        else:
            tasks.append(task["gid"])
        self._index(task)  # the search index learns the new container (modified_at stays)

    def _project_tasks(self, proj: dict[str, Any]) -> list[dict[str, Any]]:
        return [
            self.objects[t]
            for s in proj["sections"]
            for t in self.objects[s]["tasks"]
            if not self.objects[t].get("_deleted")
        ]

    def _touch(self, rec: dict[str, Any], changed: Iterable[str] = ()) -> None:
        rec["modified_at"] = self.now()
        scopes = [rec["gid"]]
        if rec["resource_type"] == "task":
            scopes += [p for p, _ in rec["memberships"]]
            self._index(rec)
        for name in changed or ("",):
            change = {"field": name, "action": "changed"} if name else None
            self._event(rec, "changed", scopes=scopes, change=change)

    def _set_completed(self, task: dict[str, Any], completed: bool, user: str | None) -> None:
        if task["completed"] == completed:
            return
        task["completed"] = completed
        task["completed_at"] = self.now() if completed else None
        task["completed_by"] = user if completed else None
        self._touch(task, ["completed"])

    def _index(self, task: dict[str, Any]) -> None:
        """Record what the search index will see once `search_lag` has passed."""
        snap = {k: v for k, v in task.items() if not k.startswith("_")}
        snap["memberships"] = list(task["memberships"])
        snap["values"] = dict(task["values"])
        task["_history"].append((self.now(), snap))
        del task["_history"][:-20]
        # Lets search skip, without matching each snapshot, a task no version of which was
        # modified after a `modified_at.after` bound.
        task["_newest_modified"] = max(s["modified_at"] for _, s in task["_history"])
        # Kept in order as tasks change, not re-sorted: a search between two writes would
        # otherwise sort every task in the domain while holding the lock every request needs.
        key = (snap["modified_at"], task["gid"])
        order, old = self._modified_order, task.get("_order_key")
        if order is not None and key != old:
            if old is not None:
                i = bisect.bisect_left(order, old)
                if i < len(order) and order[i] == old:
                    del order[i]
            bisect.insort(order, key)
        task["_order_key"] = key

    def modified_order(self) -> list[tuple[datetime, str]]:
        """(modified_at of the latest version, gid) of every task, ascending."""
        if self._modified_order is None:
            self._modified_order = sorted(
                (t["_history"][-1][1]["modified_at"], t["gid"]) for t in self._all("task")
            )
        return self._modified_order

    def _event(
        self,
        rec: dict[str, Any],
        action: str,
        *,
        parent: str | None = None,
        scopes: Iterable[str] = (),
        change: dict[str, Any] | None = None,
    ) -> None:
        # https://developers.asana.com/reference/getevents - what changed, by whom, when.
        body: dict[str, Any] = {
            "user": self._compact_ref("user", self.me_gid),
            "resource": {
                "gid": rec["gid"],
                "resource_type": rec["resource_type"],
                **({"name": rec["name"]} if "name" in rec else {}),
            },
            "type": rec["resource_type"],
            "action": action,
            "created_at": _iso(self.now()),
        }
        if parent:
            # EventResponse.parent is not nullable: events without a parent leave it out.
            body["parent"] = {
                "gid": parent,
                "resource_type": self.objects[parent]["resource_type"],
                "name": self.objects[parent].get("name", ""),
            }
        if change:
            body["change"] = change
        self.events.append(_Event(rec["gid"], frozenset(scopes) | {rec["gid"]}, body))

    def _compact_ref(self, kind: str, gid: str | None) -> dict[str, Any] | None:
        if not gid or gid not in self.objects:
            return None
        rec = self.objects[gid]
        return {k: rec[k] for k in COMPACT.get(kind, ("gid", "resource_type", "name")) if k in rec}

    # -- jobs ------------------------------------------------------------------------------
    def _advance_jobs(self) -> None:
        """Finish the jobs whose time has come (called on every request and read)."""
        now = time.monotonic()
        for job in list(self._running.values()):
            if job.status != "in_progress":
                del self._running[job.gid]
            elif job.due(now):
                if job.finish is not None:
                    job.finish()
                    job.finish = None
                job.status = "succeeded"
                del self._running[job.gid]

    # -- custom field values ---------------------------------------------------------------
    def _coerce_value(self, cf: dict[str, Any], value: Any) -> Any:
        kind = cf["resource_subtype"]
        name = f"custom_fields.{cf['gid']}"
        if value is None:
            return None
        if kind == "text":
            if not isinstance(value, str):
                raise ApiError(400, f"{name}: Expected a string for a text custom field")
            return value
        if kind == "number":
            if isinstance(value, bool):
                raise ApiError(400, f"{name}: Expected a number for a number custom field")
            try:
                return float(value) if "." in str(value) else int(value)
            except (TypeError, ValueError):
                raise ApiError(
                    400, f"{name}: Expected a number for a number custom field"
                ) from None
        if kind == "enum":
            if str(value) not in cf["enum_options"]:
                raise ApiError(400, f"{name}: enum option {value} is not an option of the field")
            return str(value)
        if kind == "multi_enum":
            items = value if isinstance(value, list) else [value]
            for v in items:
                if str(v) not in cf["enum_options"]:
                    raise ApiError(400, f"{name}: enum option {v} is not an option of the field")
            return [str(v) for v in items]
        if kind == "date":
            raw = value.get("date") if isinstance(value, dict) else value
            if _parse_date(raw) is None:
                raise ApiError(400, f"{name}: Expected a date in YYYY-MM-DD format")
            return str(raw)[:10]
        if kind == "people":
            items = value if isinstance(value, list) else [value]
            return [self._user_ref(str(v), name) for v in items]
        return value

    def _user_ref(self, value: str, param: str, me: str | None = None) -> str:
        if value == "me":
            return me or self.me_gid or ""
        for user in self._all("user"):
            if value in (user["gid"], user["email"]):
                return user["gid"]
        if not value.isdigit():
            raise _not_gid(param, value)
        raise _unknown(param, value)

    def _set_values(
        self, rec: dict[str, Any], values: Any, allowed: set[str], param: str = "custom_fields"
    ) -> bool:
        if not isinstance(values, dict):
            raise ApiError(400, f"{param}: Expected an object mapping custom field ids to values")
        changed = False
        for cf_gid, value in values.items():
            cf = self.objects.get(str(cf_gid))
            if cf is None or cf["resource_type"] != "custom_field":
                raise _not_gid(param, cf_gid)
            if cf["gid"] not in allowed:
                # Values can only be set for fields that are on the object (via its project's
                # custom field settings).
                raise ApiError(
                    400, f"{param}: Custom field with ID {cf_gid} is not on given object"
                )
            stored = self._coerce_value(cf, value)
            if rec["values"].get(cf["gid"]) != stored:
                rec["values"][cf["gid"]] = stored
                changed = True
        return changed

    def _project_fields(self, proj: dict[str, Any]) -> list[str]:
        return [self.objects[s]["custom_field"] for s in proj["settings"]]

    def _task_fields(self, task: dict[str, Any]) -> list[str]:
        out: list[str] = []
        for p, _ in task["memberships"]:
            for cf in self._project_fields(self.objects[p]):
                if cf not in out:
                    out.append(cf)
        return out

    # -- views -----------------------------------------------------------------------------
    def _cf_view(self, cf: dict[str, Any], with_value: bool = False, value: Any = None) -> dict:
        kind = cf["resource_subtype"]
        options = [self.view(self.objects[o]) for o in cf["enum_options"]]
        out: dict[str, Any] = {
            "gid": cf["gid"],
            "resource_type": "custom_field",
            "name": cf["name"],
            "resource_subtype": kind,
            "type": kind,
            "representation_type": kind,
            "description": cf.get("description", ""),
            "enabled": cf.get("enabled", True),
            "is_formula_field": False,
            "id_prefix": None,
            "is_global_to_workspace": True,
            "has_notifications_enabled": True,
            "asana_created_field": None,
            "is_value_read_only": False,
            "privacy_setting": "public_with_guests",
            "default_access_level": "editor",
            "created_by": self._compact_ref("user", cf.get("created_by")),
        }
        if kind in ("enum", "multi_enum"):
            out["enum_options"] = options
        if kind == "number":
            out["precision"] = cf.get("precision", 0)
            out["format"] = cf.get("format", "none")
            out["currency_code"] = cf.get("currency_code")
            out["custom_label"] = None
            out["custom_label_position"] = None
        if not with_value:
            return out
        # The value keys present depend on the field's type (custom fields guide).
        display: str | None = None
        if kind == "text":
            out["text_value"] = value
            display = value
        elif kind == "number":
            out["number_value"] = value
            if value is not None:
                display = f"{float(value):.{cf.get('precision', 0)}f}"
        elif kind == "enum":
            opt = self.objects.get(value) if value else None
            out["enum_value"] = self.view(opt) if opt else None
            display = opt["name"] if opt else None
        elif kind == "multi_enum":
            opts = [self.objects[v] for v in value or []]
            out["multi_enum_values"] = [self.view(o) for o in opts]
            display = ", ".join(o["name"] for o in opts) or None
        elif kind == "date":
            out["date_value"] = {"date": value, "date_time": None} if value else None
            display = value
        elif kind == "people":
            out["people_value"] = [self._compact_ref("user", u) for u in value or []]
            display = ", ".join(self.objects[u]["name"] for u in value or []) or None
        out["display_value"] = display
        return out

    def _permalink(self, rec: dict[str, Any]) -> str:
        kind, gid = rec["resource_type"], rec["gid"]
        if kind == "project":
            return f"https://app.asana.com/0/{gid}/{gid}"
        if kind == "task":
            home = rec["memberships"][0][0] if rec["memberships"] else "0"
            return f"https://app.asana.com/0/{home}/{gid}"
        return f"https://app.asana.com/0/{kind}/{gid}"

    def view(self, rec: dict[str, Any]) -> dict[str, Any]:
        """The full record, as `GET /{resource}/{gid}` with every optional field shows it."""
        kind = rec["resource_type"]
        ref = self._compact_ref
        base = {"gid": rec["gid"], "resource_type": kind}
        if kind == "workspace":
            return {
                **base,
                "name": rec["name"],
                "email_domains": list(rec["email_domains"]),
                "is_organization": rec["is_organization"],
            }
        if kind == "user":
            return {
                **base,
                "name": rec["name"],
                "email": rec["email"],
                "photo": None,
                "workspaces": [ref("workspace", w) for w in rec["workspaces"]],
            }
        if kind == "team":
            return {
                **base,
                "name": rec["name"],
                "description": rec["description"],
                "html_description": _html(rec["description"]),
                "organization": ref("workspace", rec["organization"]),
                "permalink_url": self._permalink(rec),
                "visibility": rec["visibility"],
            }
        if kind == "enum_option":
            return {**base, "name": rec["name"], "enabled": rec["enabled"], "color": rec["color"]}
        if kind == "custom_field":
            return self._cf_view(rec)
        if kind == "template_role":
            return {**base, "name": rec["name"]}
        if kind == "custom_field_setting":
            return {
                **base,
                "custom_field": self._cf_view(self.objects[rec["custom_field"]]),
                "is_important": rec["is_important"],
                "parent": ref("project", rec["parent"]),
                "project": ref("project", rec["parent"]),
            }
        if kind == "project":
            settings = [self.view(self.objects[s]) for s in rec["settings"]]
            return {
                **base,
                "name": rec["name"],
                "archived": rec["archived"],
                "color": rec["color"],
                "created_at": _iso(rec["created_at"]),
                "current_status_update": ref("status_update", rec["current_status_update"]),
                "custom_field_settings": settings,
                # ProjectResponse lists its values as CustomFieldCompact (TaskResponse uses
                # the full CustomFieldResponse).
                "custom_fields": [
                    _compact(self._cf_view(self.objects[cf], True, rec["values"].get(cf)))
                    for cf in self._project_fields(rec)
                ],
                "default_view": rec["default_view"],
                "due_on": rec["due_on"],
                "due_date": rec["due_on"],
                "start_on": rec["start_on"],
                "notes": rec["notes"],
                "html_notes": _html(rec["notes"]),
                "members": [ref("user", u) for u in rec["members"]],
                "followers": [ref("user", u) for u in rec["followers"]],
                "modified_at": _iso(rec["modified_at"]),
                "public": rec["public"],
                "privacy_setting": rec["privacy_setting"],
                "completed": rec["completed"],
                "completed_at": _iso(rec["completed_at"]) if rec["completed_at"] else None,
                "completed_by": ref("user", rec["completed_by"]),
                "owner": ref("user", rec["owner"]),
                "team": ref("team", rec["team"]),
                "workspace": ref("workspace", rec["workspace"]),
                "permalink_url": self._permalink(rec),
                "created_from_template": ref("project_template", rec["created_from_template"]),
                "project_brief": None,
            }
        if kind == "section":
            return {
                **base,
                "name": rec["name"],
                "created_at": _iso(rec["created_at"]),
                "project": ref("project", rec["project"]),
                "projects": [ref("project", rec["project"])],
            }
        if kind == "task":
            out = {
                **base,
                "name": rec["name"],
                "resource_subtype": rec["resource_subtype"],
                "assignee": ref("user", rec["assignee"]),
                "assignee_status": "inbox" if rec["assignee"] else "upcoming",
                "completed": rec["completed"],
                "completed_at": _iso(rec["completed_at"]) if rec["completed_at"] else None,
                "completed_by": ref("user", rec["completed_by"]),
                "created_at": _iso(rec["created_at"]),
                "created_by": {"gid": rec["created_by"], "resource_type": "user"}
                if rec["created_by"]
                else None,
                "dependencies": [],
                "dependents": [],
                "due_at": rec["due_at"],
                "due_on": rec["due_on"],
                "start_at": None,
                "start_on": rec["start_on"],
                "external": None,
                "followers": [ref("user", u) for u in rec["followers"]],
                "hearted": False,
                "hearts": [],
                "liked": False,
                "likes": [],
                "num_hearts": 0,
                "num_likes": 0,
                "num_subtasks": sum(1 for t in self._children.get(rec["gid"], ()) if self._live(t)),
                "is_rendered_as_separator": False,
                "memberships": [
                    {"project": ref("project", p), "section": ref("section", s)}
                    for p, s in rec["memberships"]
                ],
                "modified_at": _iso(rec["modified_at"]),
                "notes": rec["notes"],
                "html_notes": _html(rec["notes"]),
                "parent": ref("task", rec["parent"]),
                "projects": [ref("project", p) for p, _ in rec["memberships"]],
                "tags": [],
                "workspace": ref("workspace", rec["workspace"]),
                "custom_fields": [
                    self._cf_view(self.objects[cf], True, rec["values"].get(cf))
                    for cf in self._task_fields(rec)
                ],
                "actual_time_minutes": None,
                "permalink_url": self._permalink(rec),
            }
            if "approval_status" in rec:
                out["approval_status"] = rec["approval_status"]
            return out
        if kind == "project_template":
            return {
                **base,
                "name": rec["name"],
                "description": rec["description"],
                "html_description": _html(rec["description"]),
                "owner": ref("user", rec["owner"]),
                "public": rec["public"],
                "team": ref("team", rec["team"]),
                "color": rec["color"],
                "requested_dates": copy.deepcopy(rec["requested_dates"]),
                "requested_roles": [{**self.view(self.objects[r])} for r in rec["requested_roles"]],
            }
        if kind == "story":
            return {
                **base,
                "created_at": _iso(rec["created_at"]),
                "created_by": ref("user", rec["created_by"]),
                "resource_subtype": "comment_added",
                "type": "comment",
                "text": rec["text"],
                "html_text": rec["html_text"],
                "is_pinned": rec["is_pinned"],
                "is_editable": True,
                "is_edited": False,
                "hearted": False,
                "hearts": [],
                "num_hearts": 0,
                "liked": False,
                "likes": [],
                "num_likes": 0,
                "source": "api",
                "target": ref("task", rec["target"]),
            }
        if kind == "status_update":
            return {
                **base,
                "title": rec["title"],
                "resource_subtype": "project_status_update",
                "text": rec["text"],
                "html_text": rec["html_text"],
                "status_type": rec["status_type"],
                "author": ref("user", rec["author"]),
                "created_by": ref("user", rec["author"]),
                "created_at": _iso(rec["created_at"]),
                "modified_at": _iso(rec["modified_at"]),
                "hearted": False,
                "hearts": [],
                "liked": False,
                "likes": [],
                "num_hearts": 0,
                "num_likes": 0,
                "parent": ref("project", rec["parent"]),
            }
        if kind == "job":
            job = self.jobs[rec["gid"]]
            return {
                **base,
                "resource_subtype": job.subtype,
                "status": job.status,
                "new_project": ref("project", job.new_project),
                "new_project_template": None,
                "new_task": None,
            }
        return dict(base)


# --------------------------------------------------------------------------------------------
# opt_fields
# --------------------------------------------------------------------------------------------


def _field_tree(request: Request) -> dict[str, Any] | None:
    """`opt_fields` (comma-separated and/or repeated) as a nested tree, or None."""
    raw = request.query_params.getlist("opt_fields")
    names = [n.strip() for v in raw for n in v.split(",") if n.strip()]
    if not names:
        return None
    tree: dict[str, Any] = {}
    for name in names:
        node = tree
        for part in name.split("."):
            node = node.setdefault(part, {})
    return tree


def _compact(value: Any) -> Any:
    """A nested value reduced to the compact form of whatever resources it holds."""
    if isinstance(value, list):
        return [_compact(v) for v in value]
    if isinstance(value, dict):
        kind = value.get("resource_type")
        if kind in COMPACT:
            return {k: value[k] for k in COMPACT[kind] if k in value}
        if "gid" in value:
            return {k: value[k] for k in ("gid", "resource_type", "name") if k in value}
        return {k: _compact(v) for k, v in value.items()}
    return value


def _select(state: AsanaState, value: Any, tree: dict[str, Any]) -> Any:
    """Keep what `tree` names (plus `gid`); descend into nested resources.

    https://developers.asana.com/docs/inputoutput-options: with `opt_fields` the response holds
    exactly the named fields (and the gid); dotted paths select fields of nested objects.
    """
    if isinstance(value, list):
        return [_select(state, v, tree) for v in value]
    if not isinstance(value, dict):
        return value
    full = value
    gid = value.get("gid")
    if gid and gid in state.objects and value.get("resource_type") not in (None, "custom_field"):
        # A nested reference holds only the compact keys; the sub-fields come from the record.
        full = {**state.view(state.objects[gid]), **value}
    out: dict[str, Any] = {"gid": full["gid"]} if "gid" in full else {}
    for key, sub in tree.items():
        if key not in full:
            continue
        out[key] = _select(state, full[key], sub) if sub else _compact(full[key])
    return out


def _render(
    state: AsanaState, rec: dict[str, Any], tree: dict[str, Any] | None, compact: bool
) -> dict[str, Any]:
    full = state.view(rec)
    if tree is not None:
        return _select(state, full, tree)
    kind = rec["resource_type"]
    if compact:
        return {k: full[k] for k in COMPACT.get(kind, ("gid", "resource_type")) if k in full}
    hidden = OPT_IN.get(kind, frozenset())
    return {k: v for k, v in full.items() if k not in hidden}


# --------------------------------------------------------------------------------------------
# Paging
# --------------------------------------------------------------------------------------------


def _query_fingerprint(request: Request) -> str:
    pairs = sorted(
        (k, v) for k, v in request.query_params.multi_items() if k not in ("offset", "limit")
    )
    return hashlib.sha256(json.dumps([request.url.path, pairs]).encode()).hexdigest()[:16]


def _sign(state: AsanaState, payload: bytes) -> str:
    return hmac.new(state._secret, payload, hashlib.sha256).hexdigest()[:16]


def _make_offset(state: AsanaState, request: Request, position: int, last_gid: str) -> str:
    payload = json.dumps(
        {"p": position, "g": last_gid, "q": _query_fingerprint(request), "t": int(time.time())},
        separators=(",", ":"),
    ).encode()
    body = base64.urlsafe_b64encode(payload).decode().rstrip("=")
    return f"{body}.{_sign(state, payload)}"


def _read_offset(state: AsanaState, request: Request, token: str) -> tuple[int, str]:
    # https://developers.asana.com/docs/pagination: "You can only pass in an offset that was
    # returned to you via a previously paginated request" and offsets "expire after some time".
    invalid = ApiError(400, "offset: Your pagination token is invalid or has expired.")
    try:
        body, sig = token.rsplit(".", 1)
        payload = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        data = json.loads(payload)
    except (ValueError, json.JSONDecodeError, UnicodeDecodeError):
        raise invalid from None
    if not hmac.compare_digest(sig, _sign(state, payload)):
        raise invalid
    if data.get("q") != _query_fingerprint(request):
        raise invalid
    if time.time() - data.get("t", 0) > state.offset_ttl.total_seconds():
        raise invalid
    return int(data["p"]), str(data["g"])


def _limit(request: Request, *, default: int | None = None) -> int | None:
    raw = request.query_params.get("limit")
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if not 1 <= value <= MAX_LIMIT:
        raise ApiError(400, f"limit: The value must be between 1 and {MAX_LIMIT}, got {raw}")
    return value


def _page(
    state: AsanaState,
    request: Request,
    items: list[dict[str, Any]],
    *,
    compact: bool = True,
) -> JSONResponse:
    """One page of `items` (already filtered and ordered) with Asana's `next_page`."""
    tree = _field_tree(request)
    limit = _limit(request)
    if limit is None:
        # Unpaginated ("grandfathered") request: everything, no next_page key at all.
        if len(items) > UNPAGINATED_CEILING:
            raise ApiError(
                400,
                "The result is too large. You should use pagination "
                "(may require specifying a workspace)!",
            )
        return JSONResponse({"data": [_render(state, r, tree, compact) for r in items]})
    start = 0
    token = request.query_params.get("offset")
    if token:
        position, last_gid = _read_offset(state, request, token)
        gids = [r["gid"] for r in items]
        # Resume after the last item seen, even if items were inserted or removed before it.
        start = gids.index(last_gid) + 1 if last_gid in gids else min(position, len(items))
    chunk = items[start : start + limit]
    next_page = None
    if start + limit < len(items):
        offset = _make_offset(state, request, start + limit, chunk[-1]["gid"])
        params = [
            (k, v) for k, v in request.query_params.multi_items() if k not in ("offset", "limit")
        ]
        params += [("limit", str(limit)), ("offset", offset)]
        path = request.url.path.removeprefix(BASE_PATH) + "?" + urllib.parse.urlencode(params)
        base = f"{request.url.scheme}://{request.url.netloc}{BASE_PATH}"
        next_page = {"offset": offset, "path": path, "uri": base + path}
    return JSONResponse(
        {"data": [_render(state, r, tree, compact) for r in chunk], "next_page": next_page}
    )


def _one(
    state: AsanaState,
    request: Request,
    rec: dict[str, Any],
    status: int = 200,
) -> JSONResponse:
    headers = {}
    if status == 201:
        # https://developers.asana.com/docs/errors (201): "The API URL where the object can be
        # retrieved is also returned in the Location header of the response."
        plural = {"status_update": "status_updates", "custom_field": "custom_fields"}
        path = plural.get(rec["resource_type"], rec["resource_type"] + "s")
        headers["Location"] = (
            f"{request.url.scheme}://{request.url.netloc}{BASE_PATH}/{path}/{rec['gid']}"
        )
    body = {"data": _render(state, rec, _field_tree(request), compact=False)}
    return JSONResponse(body, status_code=status, headers=headers)


# --------------------------------------------------------------------------------------------
# Edge: rate limits, errors, route names
# --------------------------------------------------------------------------------------------


_bearer = bearer_token


def _is_search(request: Request) -> bool:
    return request.url.path.endswith("/tasks/search")


def _too_many(retry_after: float | None) -> JSONResponse:
    headers = {}
    if retry_after is not None:
        headers["Retry-After"] = str(max(1, math.ceil(retry_after)))
    return JSONResponse(
        {"errors": [{"message": RATE_LIMIT_MESSAGE}]}, status_code=429, headers=headers
    )


@dataclass
class _AsanaQuota(SlidingWindow):
    """Asana's quota: "defined per minute, it is evaluated more frequently than once per
    minute" and "Requests rejected by this limiter still count against the quotas"
    (https://developers.asana.com/docs/rate-limits). So: a sliding log of every request."""

    rejected_count: bool = True


class AsanaFlavor:
    """Asana's HTTP edge: per-token minute windows by plan, its 429 and 5xx bodies."""

    def __init__(self, state: AsanaState, controls: EmulatorControls) -> None:
        self.state = state
        self.controls = controls

    def _window(self, key: str, limit: int, seconds: float) -> Window:
        return self.controls.window(key, limit, seconds, kind=_AsanaQuota)

    def windows_for(self, request: Request, rates: RateLimitConfig) -> list[Window]:
        # https://developers.asana.com/docs/rate-limits: "Limits are allocated per
        # authorization token"; 150/min on free domains, 1,500/min on paid ones.
        token = _bearer(request) or "anonymous"
        plan, limit = ("paid", PAID_PER_MINUTE) if self.state.premium else ("free", FREE_PER_MINUTE)
        windows: list[Window] = [self._window(f"asana:{plan}:{token}", limit, 60.0)]
        if _is_search(request):
            windows.append(self._window(f"asana:search:{token}", SEARCH_PER_MINUTE, 60.0))
        return windows

    def too_many_requests(self, window: Window, retry_after: float | None) -> Response:
        # https://developers.asana.com/docs/rate-limits (example 429 response).
        return _too_many(retry_after)

    def server_error(self, status: int) -> Response:
        # https://developers.asana.com/docs/errors: "In the event of a server error the response
        # body will contain an error phrase"; the spec adds that some (load) errors have none.
        messages = {
            500: "Server Error",
            502: "Bad Gateway",
            503: "Service Unavailable",
            504: "Gateway Timeout",
        }
        error: dict[str, str] = {"message": messages.get(status, "Server Error")}
        if status == 500:
            error["phrase"] = _phrase()
        return JSONResponse({"errors": [error]}, status_code=status)

    def rate_headers(self, request: Request, windows: list[Window], now: float) -> dict[str, str]:
        # Asana sends no quota headers; only Retry-After on a 429.
        return {}

    def route_name(self, request: Request) -> str:
        return route_template(ROUTES, request, BASE_PATH)


# --------------------------------------------------------------------------------------------
# Request plumbing
# --------------------------------------------------------------------------------------------

Handler = Callable[[Request, AsanaState, str], Awaitable[Response]]


async def _data(request: Request) -> dict[str, Any]:
    """The `data` object of a write body (Asana wraps every write in `{"data": {...}}`)."""
    raw = await request.body()
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ApiError(400, "Could not parse request data, invalid JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, "Request data must be a JSON object")
    data = body.get("data", {})
    if not isinstance(data, dict):
        raise ApiError(400, "data: Request data must be a JSON object")
    return data


def _endpoint(state: AsanaState, handler: Handler) -> Callable[[Request], Awaitable[Response]]:
    async def run(request: Request) -> Response:
        try:
            token = _bearer(request)
            with state.lock:
                if not token or token not in state.tokens:
                    # https://developers.asana.com/docs/errors (401 example).
                    raise ApiError(401, "Not Authorized")
                state._advance_jobs()
            return await handler(request, state, token)
        except ApiError as err:
            return err.response()

    return run


def _bool(request: Request, name: str) -> bool | None:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return None
    if raw.lower() in ("true", "1"):
        return True
    if raw.lower() in ("false", "0"):
        return False
    raise ApiError(400, f"{name}: Not a boolean: {raw}")


def _instant(request: Request, name: str) -> datetime | None:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return None
    if name == "completed_since" and raw == "now":
        return None
    value = _parse_instant(raw)
    if value is None:
        raise ApiError(400, f"{name}: Not a valid date-time: {raw}")
    return value


def _ref_param(data: dict[str, Any], name: str) -> str | None:
    value = data.get(name)
    if value is None:
        return None
    if isinstance(value, dict):
        value = value.get("gid")
    return str(value)


def _date_field(data: dict[str, Any], name: str) -> str | None:
    value = data.get(name)
    if value is None:
        return None
    if _parse_date(value) is None:
        raise ApiError(400, f"{name}: Not a valid date (YYYY-MM-DD): {value}")
    return str(value)[:10]


# --------------------------------------------------------------------------------------------
# Users, workspaces, teams
# --------------------------------------------------------------------------------------------


# https://developers.asana.com/reference/getuser ("me" names the token's user)
async def get_user(request: Request, state: AsanaState, token: str) -> Response:
    gid = request.path_params.get("user_gid", "me")
    with state.lock:
        if gid == "me":
            gid = state.user_for(token)
        return _one(state, request, state._get("user", gid, "user"))


# https://developers.asana.com/reference/getusers
async def list_users(request: Request, state: AsanaState, token: str) -> Response:
    with state.lock:
        users = state._all("user")
        ws = request.query_params.get("workspace")
        team = request.query_params.get("team")
        if ws:
            state._get("workspace", ws, "workspace")
            users = [u for u in users if ws in u["workspaces"]]
        if team:
            members = state._get("team", team, "team").get("members", [])
            users = [u for u in users if u["gid"] in members]
        return _page(state, request, users)


# https://developers.asana.com/reference/getworkspaces
async def list_workspaces(request: Request, state: AsanaState, token: str) -> Response:
    with state.lock:
        me = state.objects.get(state.user_for(token), {})
        ws = [w for w in state._all("workspace") if w["gid"] in me.get("workspaces", [])]
        return _page(state, request, ws)


# https://developers.asana.com/reference/getworkspace
async def get_workspace(request: Request, state: AsanaState, token: str) -> Response:
    with state.lock:
        gid = request.path_params["workspace_gid"]
        return _one(state, request, state._get("workspace", gid, "workspace"))


# https://developers.asana.com/reference/getteamsforworkspace
async def list_teams(request: Request, state: AsanaState, token: str) -> Response:
    with state.lock:
        gid = request.path_params["workspace_gid"]
        state._get("workspace", gid, "workspace")
        teams = [t for t in state._all("team") if t["organization"] == gid]
        return _page(state, request, teams)


# https://developers.asana.com/reference/getteam
async def get_team(request: Request, state: AsanaState, token: str) -> Response:
    with state.lock:
        return _one(state, request, state._get("team", request.path_params["team_gid"], "team"))


# --------------------------------------------------------------------------------------------
# Custom fields
# --------------------------------------------------------------------------------------------


# https://developers.asana.com/reference/getcustomfieldsforworkspace
async def list_custom_fields(request: Request, state: AsanaState, token: str) -> Response:
    with state.lock:
        gid = request.path_params["workspace_gid"]
        state._get("workspace", gid, "workspace")
        fields = [f for f in state._all("custom_field") if f["workspace"] == gid]
        return _page(state, request, fields)


# https://developers.asana.com/reference/getcustomfield
async def get_custom_field(request: Request, state: AsanaState, token: str) -> Response:
    with state.lock:
        gid = request.path_params["custom_field_gid"]
        return _one(state, request, state._get("custom_field", gid, "custom_field"))


# https://developers.asana.com/reference/createcustomfield
async def create_custom_field(request: Request, state: AsanaState, token: str) -> Response:
    data = await _data(request)
    with state.lock:
        ws = _ref_param(data, "workspace")
        if not ws:
            raise _missing("workspace")
        state._get("workspace", ws, "workspace")
        name = data.get("name")
        if not name:
            raise _missing("name")
        kind = data.get("resource_subtype") or data.get("type")
        if not kind:
            raise _missing("resource_subtype")
        if kind not in CUSTOM_FIELD_TYPES:
            raise ApiError(400, f"resource_subtype: Invalid value: {kind}")
        if any(f["name"] == name for f in state._all("custom_field") if f["workspace"] == ws):
            # Workspace custom field names are unique.
            raise ApiError(400, f"name: A custom field named {name} already exists")
        options = [
            o["name"] if isinstance(o, dict) else str(o) for o in data.get("enum_options") or []
        ]
        if kind in ("enum", "multi_enum") and not options:
            raise _missing("enum_options")
        gid = state.add_custom_field(
            name,
            kind,
            ws,
            enum_options=options,
            precision=int(data.get("precision", 0) or 0),
            description=str(data.get("description", "")),
            fmt=str(data.get("format", "none")),
            currency_code=data.get("currency_code"),
        )
        state.objects[gid]["created_by"] = state.user_for(token)
        return _one(state, request, state.objects[gid], 201)


# --------------------------------------------------------------------------------------------
# Projects
# --------------------------------------------------------------------------------------------


def _filter_archived(request: Request, projects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    archived = _bool(request, "archived")
    if archived is None:
        return projects
    return [p for p in projects if p["archived"] == archived]


# https://developers.asana.com/reference/getprojects
async def list_projects(request: Request, state: AsanaState, token: str) -> Response:
    with state.lock:
        projects = state._all("project")
        ws = request.query_params.get("workspace")
        team = request.query_params.get("team")
        if ws:
            state._get("workspace", ws, "workspace")
            projects = [p for p in projects if p["workspace"] == ws]
        if team:
            state._get("team", team, "team")
            projects = [p for p in projects if p["team"] == team]
        return _page(state, request, _filter_archived(request, projects))


# https://developers.asana.com/reference/getprojectsforteam
async def list_team_projects(request: Request, state: AsanaState, token: str) -> Response:
    with state.lock:
        team = state._get("team", request.path_params["team_gid"], "team")
        projects = [p for p in state._all("project") if p["team"] == team["gid"]]
        return _page(state, request, _filter_archived(request, projects))


# https://developers.asana.com/reference/getproject
async def get_project(request: Request, state: AsanaState, token: str) -> Response:
    with state.lock:
        gid = request.path_params["project_gid"]
        return _one(state, request, state._get("project", gid, "project"))


_PROJECT_WRITABLE = (
    "name",
    "notes",
    "html_notes",
    "archived",
    "color",
    "default_view",
    "due_on",
    "due_date",
    "start_on",
    "public",
    "privacy_setting",
    "owner",
    "custom_fields",
    "team",
    "workspace",
    "followers",
)


def _apply_project_fields(
    state: AsanaState, proj: dict[str, Any], data: dict[str, Any], user: str
) -> list[str]:
    changed: list[str] = []
    unknown = [k for k in data if k not in _PROJECT_WRITABLE]
    if unknown:
        raise ApiError(400, f"{unknown[0]}: Cannot write this property")
    if "name" in data:
        if not isinstance(data["name"], str) or not data["name"].strip():
            raise ApiError(400, "name: Cannot be empty")
        proj["name"] = data["name"]
        changed.append("name")
    if "notes" in data or "html_notes" in data:
        text = data.get("notes")
        if text is None:
            text = str(data.get("html_notes", "")).replace("<body>", "").replace("</body>", "")
        proj["notes"] = str(text)
        changed.append("notes")
    if "archived" in data:
        if not isinstance(data["archived"], bool):
            raise ApiError(400, "archived: Not a boolean")
        proj["archived"] = data["archived"]
        changed.append("archived")
    if "color" in data:
        if data["color"] is not None and data["color"] not in PROJECT_COLORS:
            raise ApiError(400, f"color: Invalid value: {data['color']}")
        proj["color"] = data["color"]
        changed.append("color")
    if "default_view" in data:
        if data["default_view"] not in ("list", "board", "calendar", "timeline"):
            raise ApiError(400, f"default_view: Invalid value: {data['default_view']}")
        proj["default_view"] = data["default_view"]
    for name in ("due_on", "due_date"):
        if name in data:
            proj["due_on"] = _date_field(data, name)
            changed.append("due_on")
    if "start_on" in data:
        proj["start_on"] = _date_field(data, "start_on")
        changed.append("start_on")
    if proj["start_on"] and not proj["due_on"]:
        # Documented on start_on: "due_on or due_at must be present in the request when
        # setting or unsetting the start_on parameter".
        raise ApiError(400, "start_on: due_on must be set when setting start_on")
    if proj["start_on"] and proj["due_on"] and proj["start_on"] > proj["due_on"]:
        raise ApiError(400, "start_on: Start date must be before the due date")
    if "public" in data:
        proj["public"] = bool(data["public"])
        proj["privacy_setting"] = "public_to_workspace" if data["public"] else "private"
    if "privacy_setting" in data:
        if data["privacy_setting"] not in ("public_to_workspace", "private_to_team", "private"):
            raise ApiError(400, f"privacy_setting: Invalid value: {data['privacy_setting']}")
        proj["privacy_setting"] = data["privacy_setting"]
        proj["public"] = data["privacy_setting"] == "public_to_workspace"
    if "owner" in data:
        owner = data["owner"]
        proj["owner"] = state._user_ref(str(owner), "owner", user) if owner else None
        changed.append("owner")
    if "team" in data and data["team"] is not None:
        team = state._get("team", str(_ref_param(data, "team")), "team")
        proj["team"] = team["gid"]
    if "custom_fields" in data and state._set_values(
        proj, data["custom_fields"], set(state._project_fields(proj))
    ):
        changed.append("custom_fields")
    return changed


# https://developers.asana.com/reference/createproject
async def create_project(request: Request, state: AsanaState, token: str) -> Response:
    data = await _data(request)
    with state.lock:
        user = state.user_for(token)
        team = _ref_param(data, "team")
        ws = _ref_param(data, "workspace")
        if team:
            ws_of_team = state._get("team", team, "team")["organization"]
            if ws and ws != ws_of_team:
                raise ApiError(400, "team: The team must belong to the given workspace")
            ws = ws_of_team
        if not ws:
            raise _missing("workspace")
        workspace = state._get("workspace", ws, "workspace")
        if workspace["is_organization"] and not team:
            # "If the workspace for your project is an organization, you must also supply a
            # team to share the project with." (createproject)
            raise _missing("team")
        if not data.get("name"):
            raise _missing("name")
        values = data.pop("custom_fields", None)
        proj = state._new_project({}, ws, team, user)
        try:
            _apply_project_fields(
                state, proj, {k: v for k, v in data.items() if k != "workspace"}, user
            )
            if values:
                # Fields given at creation become the project's custom field settings.
                for cf_gid in values:
                    cf = state.objects.get(str(cf_gid))
                    if cf is None or cf["resource_type"] != "custom_field":
                        raise _not_gid("custom_fields", cf_gid)
                    _add_setting(state, proj, cf, False)
                state._set_values(proj, values, set(state._project_fields(proj)))
        except ApiError:
            _discard_project(state, proj)
            raise
        if proj["owner"] and proj["owner"] not in proj["members"]:
            proj["members"].append(proj["owner"])
        return _one(state, request, proj, 201)


def _discard_project(state: AsanaState, proj: dict[str, Any]) -> None:
    for s in proj["sections"]:
        state.objects.pop(s, None)
    for s in proj["settings"]:
        state.objects.pop(s, None)
    state.objects.pop(proj["gid"], None)


# https://developers.asana.com/reference/updateproject
async def update_project(request: Request, state: AsanaState, token: str) -> Response:
    data = await _data(request)
    with state.lock:
        proj = state._get("project", request.path_params["project_gid"], "project")
        before = copy.deepcopy({k: v for k, v in proj.items() if k != "sections"})
        try:
            changed = _apply_project_fields(
                state,
                proj,
                {k: v for k, v in data.items() if k != "workspace"},
                state.user_for(token),
            )
        except ApiError:
            proj.update(before)
            raise
        if changed:
            state._touch(proj, changed)
        return _one(state, request, proj)


def _add_setting(
    state: AsanaState, proj: dict[str, Any], cf: dict[str, Any], important: bool
) -> dict[str, Any]:
    setting = state._put(
        "custom_field_setting",
        {"custom_field": cf["gid"], "parent": proj["gid"], "is_important": important},
    )
    proj["settings"].append(setting["gid"])
    return setting


# https://developers.asana.com/reference/addcustomfieldsettingforproject
async def add_custom_field_setting(request: Request, state: AsanaState, token: str) -> Response:
    data = await _data(request)
    with state.lock:
        proj = state._get("project", request.path_params["project_gid"], "project")
        cf_gid = _ref_param(data, "custom_field")
        if not cf_gid:
            raise _missing("custom_field")
        cf = state._get("custom_field", cf_gid, "custom_field")
        if cf["workspace"] != proj["workspace"]:
            raise ApiError(400, "custom_field: The custom field is not in the project's workspace")
        if cf["gid"] in state._project_fields(proj):
            raise ApiError(400, f"custom_field: Custom field {cf_gid} is already on this project")
        setting = _add_setting(state, proj, cf, bool(data.get("is_important", False)))
        # Placement follows insert_before / insert_after when given.
        anchor = _ref_param(data, "insert_before") or _ref_param(data, "insert_after")
        if anchor:
            if anchor not in proj["settings"][:-1]:
                proj["settings"].pop()
                state.objects.pop(setting["gid"], None)
                raise _not_gid("insert_before", anchor)
            proj["settings"].pop()
            at = proj["settings"].index(anchor) + (0 if data.get("insert_before") else 1)
            proj["settings"].insert(at, setting["gid"])
        return _one(state, request, setting)


# https://developers.asana.com/reference/getcustomfieldsettingsforproject
async def list_custom_field_settings(request: Request, state: AsanaState, token: str) -> Response:
    with state.lock:
        proj = state._get("project", request.path_params["project_gid"], "project")
        settings = [state.objects[s] for s in proj["settings"]]
        return _page(state, request, settings, compact=False)


# --------------------------------------------------------------------------------------------
# Project templates and jobs
# --------------------------------------------------------------------------------------------


# https://developers.asana.com/reference/getprojecttemplates
async def list_project_templates(request: Request, state: AsanaState, token: str) -> Response:
    with state.lock:
        ws = request.query_params.get("workspace")
        team = request.query_params.get("team")
        templates = state._all("project_template")
        if team:
            state._get("team", team, "team")
            templates = [t for t in templates if t["team"] == team]
        elif ws:
            state._get("workspace", ws, "workspace")
            templates = [t for t in templates if state.objects[t["team"]]["organization"] == ws]
        else:
            raise ApiError(400, "workspace: Must specify either workspace or team")
        return _page(state, request, templates)


# https://developers.asana.com/reference/getprojecttemplate
async def get_project_template(request: Request, state: AsanaState, token: str) -> Response:
    with state.lock:
        gid = request.path_params["project_template_gid"]
        return _one(state, request, state._get("project_template", gid, "project_template"))


# https://developers.asana.com/reference/instantiateproject - creates and returns a job that
# handles the instantiation asynchronously; https://developers.asana.com/docs/rate-limits caps
# duplication jobs at 5 running at once per token.
async def instantiate_project(request: Request, state: AsanaState, token: str) -> Response:
    data = await _data(request)
    with state.lock:
        gid = request.path_params["project_template_gid"]
        template = state._get("project_template", gid, "project_template")
        now_mono = time.monotonic()
        running = [
            j for j in state._running.values() if j.token == token and j.status == "in_progress"
        ]
        if len(running) >= MAX_CONCURRENT_DUPLICATIONS:
            soonest = min(j.started + j.seconds for j in running) - now_mono
            return _too_many(max(soonest, 0.0))
        name = data.get("name")
        if not name:
            raise _missing("name")
        team = _ref_param(data, "team") or template["team"]
        team_rec = state._get("team", team, "team")
        user = state.user_for(token)
        # requested_dates: gid "1" is the project start date (ProjectTemplateBase).
        dates: dict[str, date] = {}
        for item in data.get("requested_dates") or []:
            if not isinstance(item, dict) or "gid" not in item:
                raise ApiError(400, "requested_dates: Each item needs a gid and a value")
            known = {d["gid"] for d in template["requested_dates"]}
            if str(item["gid"]) not in known:
                raise ApiError(400, f"requested_dates: Unknown date variable {item['gid']}")
            if item.get("value") is None:
                continue
            parsed = _parse_date(item.get("value"))
            if parsed is None:
                raise ApiError(400, f"requested_dates: Not a valid date: {item.get('value')}")
            dates[str(item["gid"])] = parsed
        missing = [d["gid"] for d in template["requested_dates"] if d["gid"] not in dates]
        if missing and data.get("is_strict"):
            # is_strict: "returns an Unprocessable Entity error if you fail to provide a
            # calendar date value for any date variable".
            raise ApiError(422, f"requested_dates: Missing value for date variable {missing[0]}")
        # "a default date is used for each unfulfilled date variable (e.g., the current date is
        # used as the Start Date of a project)".
        start = dates.get("1") or state.now().date()
        roles: dict[str, str] = {}
        for item in data.get("requested_roles") or []:
            if not isinstance(item, dict) or "gid" not in item:
                raise ApiError(400, "requested_roles: Each item needs a gid and a value")
            if str(item["gid"]) not in template["requested_roles"]:
                raise ApiError(400, f"requested_roles: Unknown template role {item['gid']}")
            if item.get("value"):
                roles[str(item["gid"])] = state._user_ref(
                    str(item["value"]), "requested_roles", user
                )
        privacy = data.get("privacy_setting")
        public = data.get("public", template["public"]) if privacy is None else None
        proj = state._new_project(
            {
                "name": name,
                "notes": template["description"],
                "color": template["color"],
                "start_on": None,
                "public": bool(public) if public is not None else False,
                "privacy_setting": privacy,
            },
            team_rec["organization"],
            team,
            user,
            template=template["gid"],
            default_section=False,
        )

        def finish() -> None:
            sections = {s: state._new_section(proj, s) for s in template["_sections"]}
            for section, title, subtype, offset, role in template["_tasks"]:
                task = state._new_task(
                    {
                        "name": title,
                        "resource_subtype": subtype,
                        "due_on": (start + timedelta(days=offset)).isoformat(),
                        "assignee": roles.get(role) if role else None,
                    },
                    proj["workspace"],
                    user,
                )
                state._add_to_project(task, proj, sections[section])
            last = max(offset for *_, offset, _ in template["_tasks"])
            proj["start_on"] = start.isoformat()
            proj["due_on"] = (start + timedelta(days=last)).isoformat()

        job = _Job(
            gid=state._gid(),
            token=token,
            subtype="instantiate_project",
            started=now_mono,
            seconds=state.job_seconds,
            new_project=proj["gid"],
            finish=finish,
        )
        state.jobs[job.gid] = job
        state._running[job.gid] = job
        rec = state._put("job", {"gid": job.gid})
        return _one(state, request, rec, 201)


# https://developers.asana.com/reference/getjob
async def get_job(request: Request, state: AsanaState, token: str) -> Response:
    with state.lock:
        return _one(state, request, state._get("job", request.path_params["job_gid"], "job"))


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


# https://developers.asana.com/reference/getsectionsforproject
async def list_sections(request: Request, state: AsanaState, token: str) -> Response:
    with state.lock:
        proj = state._get("project", request.path_params["project_gid"], "project")
        return _page(state, request, [state.objects[s] for s in proj["sections"]])


# https://developers.asana.com/reference/getsection
async def get_section(request: Request, state: AsanaState, token: str) -> Response:
    with state.lock:
        gid = request.path_params["section_gid"]
        return _one(state, request, state._get("section", gid, "section"))


# https://developers.asana.com/reference/createsectionforproject
async def create_section(request: Request, state: AsanaState, token: str) -> Response:
    data = await _data(request)
    with state.lock:
        proj = state._get("project", request.path_params["project_gid"], "project")
        name = data.get("name")
        if not name:
            raise _missing("name")
        gid = state._new_section(proj, str(name))
        anchor = _ref_param(data, "insert_before") or _ref_param(data, "insert_after")
        if anchor:
            proj["sections"].pop()
            if anchor not in proj["sections"]:
                proj["sections"].append(gid)
                raise _not_gid(
                    "insert_before" if data.get("insert_before") else "insert_after", anchor
                )
            at = proj["sections"].index(anchor) + (0 if data.get("insert_before") else 1)
            proj["sections"].insert(at, gid)
        return _one(state, request, state.objects[gid], 201)


# https://developers.asana.com/reference/addtaskforsection - "This will remove the task from
# other sections of the project. The task will be inserted at the top of a section unless an
# insert_before or insert_after parameter is declared."
async def add_task_to_section(request: Request, state: AsanaState, token: str) -> Response:
    data = await _data(request)
    with state.lock:
        section = state._get("section", request.path_params["section_gid"], "section")
        task_gid = _ref_param(data, "task")
        if not task_gid:
            raise _missing("task")
        task = state._get("task", task_gid, "task")
        proj = state.objects[section["project"]]
        before, after = _ref_param(data, "insert_before"), _ref_param(data, "insert_after")
        anchor = before or after
        if anchor and anchor not in section["tasks"]:
            raise _not_gid("insert_before" if before else "insert_after", anchor)
        state._add_to_project(task, proj, section["gid"], top=True)
        if anchor:
            section["tasks"].remove(task["gid"])
            at = section["tasks"].index(anchor) + (0 if before else 1)
            section["tasks"].insert(at, task["gid"])
        # Moving between containers does not change the task's modified_at (TaskBase).
        return JSONResponse({"data": {}})


# --------------------------------------------------------------------------------------------
# Tasks
# --------------------------------------------------------------------------------------------


def _incomplete_or_since(request: Request, tasks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    raw = request.query_params.get("completed_since")
    if raw is None:
        return tasks
    since = _instant(request, "completed_since")
    if since is None:  # "now": only incomplete tasks
        return [t for t in tasks if not t["completed"]]
    return [t for t in tasks if not t["completed"] or t["completed_at"] >= since]


def _modified_since(request: Request, tasks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    since = _instant(request, "modified_since")
    if since is None:
        return tasks
    return [t for t in tasks if t["modified_at"] >= since]


# https://developers.asana.com/reference/gettasksforproject
async def list_project_tasks(request: Request, state: AsanaState, token: str) -> Response:
    with state.lock:
        proj = state._get("project", request.path_params["project_gid"], "project")
        tasks = _incomplete_or_since(request, state._project_tasks(proj))
        return _page(state, request, tasks)


# https://developers.asana.com/reference/gettasksforsection
async def list_section_tasks(request: Request, state: AsanaState, token: str) -> Response:
    with state.lock:
        section = state._get("section", request.path_params["section_gid"], "section")
        tasks = [state.objects[t] for t in section["tasks"] if not state.objects[t].get("_deleted")]
        return _page(state, request, _incomplete_or_since(request, tasks))


# https://developers.asana.com/reference/gettasks - "You must specify a project or tag if you do
# not specify assignee and workspace."
async def list_tasks(request: Request, state: AsanaState, token: str) -> Response:
    q = request.query_params
    with state.lock:
        if q.get("project"):
            tasks = state._project_tasks(state._get("project", q["project"], "project"))
        elif q.get("section"):
            section = state._get("section", q["section"], "section")
            tasks = [state.objects[t] for t in section["tasks"]]
        elif q.get("assignee") and q.get("workspace"):
            state._get("workspace", q["workspace"], "workspace")
            user = state._user_ref(q["assignee"], "assignee", state.user_for(token))
            tasks = [
                t
                for t in state._all("task")
                if t["assignee"] == user and t["workspace"] == q["workspace"]
            ]
        elif q.get("assignee") or q.get("workspace"):
            raise ApiError(400, "assignee and workspace must be specified together")
        else:
            raise ApiError(
                400, "Must specify exactly one of project, tag, section, or assignee + workspace"
            )
        tasks = [t for t in tasks if not t.get("_deleted")]
        tasks = _modified_since(request, _incomplete_or_since(request, tasks))
        return _page(state, request, tasks)


# https://developers.asana.com/reference/gettask
async def get_task(request: Request, state: AsanaState, token: str) -> Response:
    with state.lock:
        return _one(state, request, state._get("task", request.path_params["task_gid"], "task"))


_TASK_WRITABLE = frozenset(
    {
        "name",
        "notes",
        "html_notes",
        "resource_subtype",
        "completed",
        "due_on",
        "due_at",
        "start_on",
        "assignee",
        "custom_fields",
        "approval_status",
        "followers",
        "projects",
        "memberships",
        "workspace",
        "parent",
        "tags",
        "assignee_section",
        "external",
    }
)


def _apply_task_fields(
    state: AsanaState, task: dict[str, Any], data: dict[str, Any], user: str, creating: bool
) -> list[str]:
    changed: list[str] = []
    unknown = [k for k in data if k not in _TASK_WRITABLE]
    if unknown:
        raise ApiError(400, f"{unknown[0]}: Cannot write this property")
    if not creating:
        for key in ("projects", "memberships", "workspace", "parent"):
            if key in data:
                # memberships is *Create-only*; use addProject/removeProject/setParent later.
                raise ApiError(400, f"{key}: Cannot write this property after creation")
    if "name" in data:
        task["name"] = str(data["name"] or "")
        changed.append("name")
    if "notes" in data or "html_notes" in data:
        text = data.get("notes")
        if text is None:
            text = str(data.get("html_notes", "")).replace("<body>", "").replace("</body>", "")
        task["notes"] = str(text)
        changed.append("notes")
    if "resource_subtype" in data:
        if data["resource_subtype"] not in TASK_SUBTYPES:
            raise ApiError(400, f"resource_subtype: Invalid value: {data['resource_subtype']}")
        task["resource_subtype"] = data["resource_subtype"]
        if task["resource_subtype"] == "approval":
            task.setdefault("approval_status", "pending")
        else:
            task.pop("approval_status", None)
        changed.append("resource_subtype")
    if "due_on" in data:
        task["due_on"] = _date_field(data, "due_on")
        task["due_at"] = None
        changed.append("due_on")
    if "due_at" in data:
        if data["due_at"] is not None and _parse_instant(data["due_at"]) is None:
            raise ApiError(400, f"due_at: Not a valid date-time: {data['due_at']}")
        at = _parse_instant(data["due_at"])
        task["due_at"] = _iso(at) if at else None
        task["due_on"] = at.date().isoformat() if at else task["due_on"]
        changed.append("due_on")
    if "start_on" in data:
        task["start_on"] = _date_field(data, "start_on")
        if task["start_on"] and not task["due_on"]:
            raise ApiError(400, "start_on: due_on or due_at must be set when setting start_on")
        changed.append("start_on")
    if "assignee" in data:
        value = data["assignee"]
        task["assignee"] = state._user_ref(str(value), "assignee", user) if value else None
        changed.append("assignee")
    if "approval_status" in data:
        if task["resource_subtype"] != "approval":
            raise ApiError(400, "approval_status: Only approval tasks have an approval status")
        task["approval_status"] = data["approval_status"]
        changed.append("approval_status")
    if "followers" in data:
        for f in data["followers"] or []:
            uid = state._user_ref(str(f), "followers", user)
            if uid not in task["followers"]:
                task["followers"].append(uid)
    if "completed" in data:
        if not isinstance(data["completed"], bool):
            raise ApiError(400, "completed: Not a boolean")
        if task["completed"] != data["completed"]:
            task["completed"] = data["completed"]
            task["completed_at"] = state.now() if data["completed"] else None
            task["completed_by"] = user if data["completed"] else None
            changed.append("completed")
    return changed


# https://developers.asana.com/reference/createtask
async def create_task(request: Request, state: AsanaState, token: str) -> Response:
    data = await _data(request)
    with state.lock:
        user = state.user_for(token)
        placements: list[tuple[dict[str, Any], str | None]] = []
        for m in data.get("memberships") or []:
            if not isinstance(m, dict) or not m.get("project"):
                raise ApiError(400, "memberships: Each membership needs a project")
            proj = state._get("project", str(_ref_param(m, "project")), "memberships.project")
            section = _ref_param(m, "section")
            if section:
                sec = state._get("section", section, "memberships.section")
                if sec["project"] != proj["gid"]:
                    raise ApiError(400, "memberships.section: Section is not in the project")
            placements.append((proj, section))
        for p in data.get("projects") or []:
            proj = state._get("project", str(p), "projects")
            if all(proj is not q for q, _ in placements):
                placements.append((proj, None))
        parent = None
        if data.get("parent"):
            parent = state._get("task", str(_ref_param(data, "parent")), "parent")
        ws = _ref_param(data, "workspace")
        if ws:
            state._get("workspace", ws, "workspace")
        inferred = {p["workspace"] for p, _ in placements} | (
            {parent["workspace"]} if parent else set()
        )
        if len(inferred) > 1 or (ws and inferred and ws not in inferred):
            raise ApiError(400, "workspace: Projects and parent must be in the same workspace")
        ws = ws or next(iter(inferred), None)
        if not ws:
            # https://developers.asana.com/docs/errors (400 example).
            raise _missing("workspace")
        task = state._new_task({"parent": parent["gid"] if parent else None}, ws, user)
        try:
            for proj, section in placements:
                state._add_to_project(task, proj, section)
            values = data.get("custom_fields")
            rest = {k: v for k, v in data.items() if k != "custom_fields"}
            _apply_task_fields(state, task, rest, user, creating=True)
            if values:
                state._set_values(task, values, set(state._task_fields(task)))
        except ApiError:
            for _p, s in task["memberships"]:
                if task["gid"] in state.objects[s]["tasks"]:
                    state.objects[s]["tasks"].remove(task["gid"])
            state.objects.pop(task["gid"], None)
            raise
        task["modified_at"] = task["created_at"]
        task["_history"].clear()
        state._index(task)
        return _one(state, request, task, 201)


# https://developers.asana.com/reference/updatetask - only the changes TaskBase.modified_at lists
# move modified_at; completing sets completed_at (and un-completing clears it).
async def update_task(request: Request, state: AsanaState, token: str) -> Response:
    data = await _data(request)
    with state.lock:
        task = state._get("task", request.path_params["task_gid"], "task")
        before = copy.deepcopy({k: v for k, v in task.items() if k != "_history"})
        try:
            changed = _apply_task_fields(
                state,
                task,
                {k: v for k, v in data.items() if k != "custom_fields"},
                state.user_for(token),
                creating=False,
            )
            if "custom_fields" in data and state._set_values(
                task, data["custom_fields"], set(state._task_fields(task))
            ):
                changed.append("custom_fields")
        except ApiError:
            task.update(before)
            raise
        if changed:
            state._touch(task, changed)
        return _one(state, request, task)


# https://developers.asana.com/reference/searchtasksforworkspace - premium only (402); no
# pagination ("the traditional pagination ... is not available here"), at most 100 per request,
# unstable order, and an index that lags writes by 10-60 s.
async def search_tasks(request: Request, state: AsanaState, token: str) -> Response:
    q = request.query_params
    with state.lock:
        ws = state._get("workspace", request.path_params["workspace_gid"], "workspace")
        if not state.premium:
            raise ApiError(
                402,
                "Search is only available to premium users.",
            )
        limit = _limit(request, default=SEARCH_MAX_RESULTS) or SEARCH_MAX_RESULTS
        cutoff = state.now() - state.search_lag
        found: list[tuple[dict[str, Any], dict[str, Any]]] = []
        after = _instant(request, "modified_at.after")
        sort_by = q.get("sort_by", "modified_at")
        ascending = bool(_bool(request, "sort_ascending"))
        # Oldest first from an index: stop once `limit` matches and their ties are in hand,
        # instead of matching every task in the domain (same results, far fewer checks).
        ordered = (
            after is not None and sort_by == "modified_at" and ascending and not state.search_lag
        )
        candidates = _oldest_changes_after(state, after) if ordered else state._all("task")
        for task in candidates:
            if (
                ordered
                and len(found) >= limit
                and task["_history"][-1][1]["modified_at"] > found[-1][1]["modified_at"]
            ):
                break
            if task["workspace"] != ws["gid"]:
                continue
            if after is not None and task["_newest_modified"] <= after:
                continue
            snap = next((s for t, s in reversed(task["_history"]) if t <= cutoff), None)
            if snap is not None and _search_match(state, request, snap, token):
                found.append((task, snap))
        keys = {
            "modified_at": lambda s: s["modified_at"],
            "created_at": lambda s: s["created_at"],
            "completed_at": lambda s: s["completed_at"] or datetime.min.replace(tzinfo=UTC),
            "due_date": lambda s: s["due_on"] or "",
            "likes": lambda s: 0,
            "relevance": lambda s: s["modified_at"],
        }
        if sort_by not in keys:
            raise ApiError(400, f"sort_by: Invalid value: {sort_by}")
        # "Search results are not stable": equal keys come back in no particular order.
        random.shuffle(found)
        found.sort(key=lambda pair: keys[sort_by](pair[1]), reverse=not ascending)
        tree = _field_tree(request)
        data = [_render(state, t, tree, compact=True) for t, _ in found[:limit]]
        return JSONResponse({"data": data})


def _oldest_changes_after(state: AsanaState, after: datetime) -> Iterable[dict[str, Any]]:
    """Live tasks whose latest version was modified after `after`, oldest first (when search
    sees each task's latest version, i.e. no `search_lag`, that is result order)."""
    order = state.modified_order()
    for _, gid in order[bisect.bisect_right(order, (after, "\uffff")) :]:
        task = state.objects.get(gid)
        if task is not None and state._live(task):
            yield task


def _csv(value: str | None) -> list[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


def _search_match(state: AsanaState, request: Request, snap: dict[str, Any], token: str) -> bool:
    q = request.query_params
    subtype = q.get("resource_subtype")
    if subtype and snap["resource_subtype"] != subtype:
        return False
    completed = _bool(request, "completed")
    if completed is not None and snap["completed"] != completed:
        return False
    projects = {p for p, _ in snap["memberships"]}
    sections = {s for _, s in snap["memberships"]}
    if q.get("projects.any") and not projects & set(_csv(q["projects.any"])):
        return False
    if q.get("projects.not") and projects & set(_csv(q["projects.not"])):
        return False
    if q.get("projects.all") and not set(_csv(q["projects.all"])) <= projects:
        return False
    if q.get("sections.any") and not sections & set(_csv(q["sections.any"])):
        return False
    me = state.user_for(token)
    if q.get("assignee.any"):
        wanted = {state._user_ref(u, "assignee.any", me) for u in _csv(q["assignee.any"])}
        if snap["assignee"] not in wanted:
            return False
    if q.get("assignee.not"):
        unwanted = {state._user_ref(u, "assignee.not", me) for u in _csv(q["assignee.not"])}
        if snap["assignee"] in unwanted:
            return False
    for name, key in (
        ("modified_at", "modified_at"),
        ("created_at", "created_at"),
        ("completed_at", "completed_at"),
    ):
        after, before = _instant(request, f"{name}.after"), _instant(request, f"{name}.before")
        value = snap[key]
        if after and (value is None or value <= after):
            return False
        if before and (value is None or value >= before):
            return False
    for name in ("due_on", "start_on"):
        after, before = q.get(f"{name}.after"), q.get(f"{name}.before")
        value = snap[name]
        if after and (value is None or value <= after):
            return False
        if before and (value is None or value >= before):
            return False
    if _bool(request, "is_subtask") is not None and bool(snap["parent"]) != _bool(
        request, "is_subtask"
    ):
        return False
    text = (q.get("text") or "").lower()
    return not text or text in snap["name"].lower() or text in snap["notes"].lower()


# --------------------------------------------------------------------------------------------
# Stories and status updates
# --------------------------------------------------------------------------------------------


# https://developers.asana.com/reference/createstoryfortask - a comment; the story it creates
# changes the task's modified_at (TaskBase.modified_at).
async def create_story(request: Request, state: AsanaState, token: str) -> Response:
    data = await _data(request)
    with state.lock:
        task = state._get("task", request.path_params["task_gid"], "task")
        text = data.get("text")
        html_text = data.get("html_text")
        if not text and not html_text:
            raise _missing("text")
        if text is None:
            text = str(html_text).replace("<body>", "").replace("</body>", "")
        story = state._put(
            "story",
            {
                "target": task["gid"],
                "text": str(text),
                "html_text": html_text or _html(str(text)),
                "is_pinned": bool(data.get("is_pinned", False)),
                "created_by": state.user_for(token),
                "created_at": state.now(),
            },
        )
        state._event(story, "added", parent=task["gid"], scopes=(task["gid"],))
        state._touch(task)
        return _one(state, request, story, 201)


# https://developers.asana.com/reference/getstoriesfortask
async def list_stories(request: Request, state: AsanaState, token: str) -> Response:
    with state.lock:
        task = state._get("task", request.path_params["task_gid"], "task")
        stories = [s for s in state._all("story") if s["target"] == task["gid"]]
        return _page(state, request, stories)


# https://developers.asana.com/reference/createstatusforobject
async def create_status_update(request: Request, state: AsanaState, token: str) -> Response:
    data = await _data(request)
    with state.lock:
        parent = _ref_param(data, "parent")
        if not parent:
            raise _missing("parent")
        proj = state._get("project", parent, "parent")
        status_type = data.get("status_type")
        if not status_type:
            raise _missing("status_type")
        if status_type not in STATUS_TYPES:
            raise ApiError(400, f"status_type: Invalid value: {status_type}")
        text, html_text = data.get("text"), data.get("html_text")
        if not text and not html_text:
            raise _missing("text")
        if text is None:
            text = str(html_text).replace("<body>", "").replace("</body>", "")
        now = state.now()
        update = state._put(
            "status_update",
            {
                "parent": proj["gid"],
                "title": str(data.get("title") or ""),
                "text": str(text),
                "html_text": html_text or _html(str(text)),
                "status_type": status_type,
                "author": state.user_for(token),
                "created_at": now,
                "modified_at": now,
            },
        )
        proj["current_status_update"] = update["gid"]
        state._event(update, "added", parent=proj["gid"], scopes=(proj["gid"],))
        return _one(state, request, update, 201)


# https://developers.asana.com/reference/getstatusesforobject
async def list_status_updates(request: Request, state: AsanaState, token: str) -> Response:
    with state.lock:
        parent = request.query_params.get("parent")
        if not parent:
            raise _missing("parent")
        state._get("project", parent, "parent")
        updates = [u for u in state._all("status_update") if u["parent"] == parent]
        updates.sort(key=lambda u: u["created_at"], reverse=True)
        return _page(state, request, updates)


# --------------------------------------------------------------------------------------------
# Events
# --------------------------------------------------------------------------------------------


# https://developers.asana.com/reference/getevents - without a (valid) sync token the call fails
# with 412 and hands out a fresh token; with one, it returns what happened since, 100 at a time.
async def get_events(request: Request, state: AsanaState, token: str) -> Response:
    with state.lock:
        resource = request.query_params.get("resource")
        if not resource:
            raise _missing("resource")
        rec = state.objects.get(resource)
        if rec is None or rec["resource_type"] not in ("project", "task", "workspace"):
            raise _unknown("resource", resource)
        sync = request.query_params.get("sync")
        known = state.sync_tokens.get(sync or "")
        if (
            known is None
            or known.resource != resource
            or state.now() - known.issued > state.sync_ttl
        ):
            fresh = secrets.token_hex(16)
            state.sync_tokens[fresh] = _SyncToken(resource, len(state.events), state.now())
            message = (
                "Sync token invalid or too old. If you are attempting to keep resources in "
                "sync, you must fetch the full dataset for this query now and use the new "
                "sync token for the next sync."
            )
            raise ApiError(412, message, sync=fresh)
        mine = [
            (i, e)
            for i, e in enumerate(state.events[known.position :], known.position)
            if resource in e.scopes
        ]
        batch = mine[:EVENTS_PAGE]
        position = batch[-1][0] + 1 if len(mine) > EVENTS_PAGE else len(state.events)
        fresh = secrets.token_hex(16)
        state.sync_tokens[fresh] = _SyncToken(resource, position, state.now())
        return JSONResponse(
            {
                "data": [copy.deepcopy(e.body) for _, e in batch],
                "sync": fresh,
                "has_more": len(mine) > EVENTS_PAGE,
            }
        )


# --------------------------------------------------------------------------------------------
# App
# --------------------------------------------------------------------------------------------

_ROUTE_TABLE: list[tuple[str, list[str], Handler]] = [
    ("/users", ["GET"], list_users),
    ("/users/me", ["GET"], get_user),  # the spec's /users/{user_gid} with "me"
    ("/users/{user_gid}", ["GET"], get_user),
    ("/workspaces", ["GET"], list_workspaces),
    ("/workspaces/{workspace_gid}", ["GET"], get_workspace),
    ("/workspaces/{workspace_gid}/teams", ["GET"], list_teams),
    ("/workspaces/{workspace_gid}/custom_fields", ["GET"], list_custom_fields),
    ("/workspaces/{workspace_gid}/tasks/search", ["GET"], search_tasks),
    ("/teams/{team_gid}", ["GET"], get_team),
    ("/teams/{team_gid}/projects", ["GET"], list_team_projects),
    ("/custom_fields", ["POST"], create_custom_field),
    ("/custom_fields/{custom_field_gid}", ["GET"], get_custom_field),
    ("/projects", ["GET"], list_projects),
    ("/projects", ["POST"], create_project),
    ("/projects/{project_gid}", ["GET"], get_project),
    ("/projects/{project_gid}", ["PUT"], update_project),
    ("/projects/{project_gid}/addCustomFieldSetting", ["POST"], add_custom_field_setting),
    ("/projects/{project_gid}/custom_field_settings", ["GET"], list_custom_field_settings),
    ("/projects/{project_gid}/sections", ["GET"], list_sections),
    ("/projects/{project_gid}/sections", ["POST"], create_section),
    ("/projects/{project_gid}/tasks", ["GET"], list_project_tasks),
    ("/project_templates", ["GET"], list_project_templates),
    ("/project_templates/{project_template_gid}", ["GET"], get_project_template),
    (
        "/project_templates/{project_template_gid}/instantiateProject",
        ["POST"],
        instantiate_project,
    ),
    ("/jobs/{job_gid}", ["GET"], get_job),
    ("/sections/{section_gid}", ["GET"], get_section),
    ("/sections/{section_gid}/addTask", ["POST"], add_task_to_section),
    ("/sections/{section_gid}/tasks", ["GET"], list_section_tasks),
    ("/tasks", ["GET"], list_tasks),
    ("/tasks", ["POST"], create_task),
    ("/tasks/{task_gid}", ["GET"], get_task),
    ("/tasks/{task_gid}", ["PUT"], update_task),
    ("/tasks/{task_gid}/stories", ["GET"], list_stories),
    ("/tasks/{task_gid}/stories", ["POST"], create_story),
    ("/status_updates", ["GET"], list_status_updates),
    ("/status_updates", ["POST"], create_status_update),
    ("/events", ["GET"], get_events),
]


async def _unused(request: Request) -> Response:  # pragma: no cover - routing table only
    return Response(status_code=500)


# Route templates, used by AsanaFlavor.route_name (one stable name per endpoint).
ROUTES: list[Route] = [Route(BASE_PATH + p, _unused, methods=m) for p, m, _ in _ROUTE_TABLE]


def create_app(state: AsanaState, controls: EmulatorControls | None = None) -> ASGIApp:
    """The emulator as an ASGI app under `/api/1.0`, wrapped in the shared middleware."""
    controls = controls or EmulatorControls()
    state.controls = controls
    controls.clock = state.now
    routes = [Route(BASE_PATH + p, _endpoint(state, h), methods=m) for p, m, h in _ROUTE_TABLE]

    async def not_found(request: Request, exc: Exception) -> Response:
        # https://developers.asana.com/docs/errors (404): "the request method and path supplied
        # do not specify a known action in the API".
        return ApiError(404, f"No matching route for request: {request.url.path}").response()

    async def method_not_allowed(request: Request, exc: Exception) -> Response:
        return ApiError(
            404, f"No matching route for request: {request.method} {request.url.path}"
        ).response()

    starlette_app = Starlette(
        routes=routes, exception_handlers={404: not_found, 405: method_not_allowed}
    )
    return EmulatorMiddleware(starlette_app, controls, AsanaFlavor(state, controls))
