"""A local, stateful emulator of the ClickUp API v2: Workspaces, Spaces, Folders, Lists (plain
and from List templates), tasks with custom task types (Milestones), Custom Fields, comments.

Handoff's tests, benchmarks and demo run against it instead of a real Workspace. It follows what
ClickUp documents, and where the docs are silent what ClickUp is seen to do, rather than what our
connector would find convenient:

- Auth is the raw `Authorization: pk_...` header for personal tokens (no "Bearer"), and
  `Authorization: Bearer ...` for OAuth access tokens.
- Errors are `{"err": ..., "ECODE": ...}`. An id the token cannot reach - including one that
  never existed - answers 401 `Team not authorized` / OAUTH_027, not 404 (ClickUp cannot tell
  "no such id" from "not in your Workspaces"); a deleted task answers 404 ITEM_013.
- Get Tasks pages hold 100 tasks (page numbers from 0) and say `last_page`; closed tasks and
  subtasks are left out unless asked for. Get Filtered Team Tasks answers only `tasks`.
- Creating a List from a template returns at once (`return_immediately` defaults to true) and
  the template's tasks appear a moment later (`ClickUpState.template_lag_seconds`).
- Timestamps are Unix epoch milliseconds sent as strings; a 429 says
  `{"err":"Rate limit reached","ECODE":"APP_002"}` with `X-RateLimit-*` headers.

ClickUp documents only its OAUTH_* error codes; other ECODEs here are ones seen on the wire
(cited where found) or, failing that, our own in ClickUp's style (marked "ours").

Main references (cited again above each endpoint):
- API reference / OpenAPI: https://developer.clickup.com/reference
  (raw spec: https://developer.clickup.com/openapi/clickup-api-v2-reference.json)
- Rate limits: https://developer.clickup.com/docs/rate-limits
- Errors: https://developer.clickup.com/docs/common_errors
- Custom Fields: https://developer.clickup.com/docs/customfields
- Filtering by Custom Fields: https://developer.clickup.com/docs/taskfilters
"""

from __future__ import annotations

import bisect
import copy
import json
import math
import random
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from datetime import UTC, datetime
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
    Window,
    route_template,
)

# --------------------------------------------------------------------------------------------
# Documented constants
# --------------------------------------------------------------------------------------------

# https://developer.clickup.com/docs/rate-limits
# Per token, by the plan of the Workspace hosting the token: Free Forever, Unlimited, Business
# 100 requests per minute; Business Plus 1,000; Enterprise 10,000.
PLAN_RATES = {
    "free": 100,
    "unlimited": 100,
    "business": 100,
    "business_plus": 1_000,
    "enterprise": 10_000,
}
RATE_WINDOW_SECONDS = 60.0

# https://developer.clickup.com/reference/gettasks - "Responses are limited to 100 tasks per page."
PAGE_SIZE = 100

# https://developer.clickup.com/reference/gettasks (custom_items) - "Including `0` returns
# tasks. Including `1` returns Milestones."
TASK_TYPE_ID = 0
MILESTONE_TYPE_ID = 1

# https://developer.clickup.com/reference/getaccessiblecustomfields - applied_objects entries
# use object_type 19 for a custom task type.
APPLIED_OBJECT_TASK_TYPE = 19

# https://developer.clickup.com/reference/createtask (priority 1 urgent .. 4 low)
PRIORITIES = {
    1: ("urgent", "#f50000"),
    2: ("high", "#ffcc00"),
    3: ("normal", "#6fddff"),
    4: ("low", "#d8d8d8"),
}

# https://developer.clickup.com/docs/taskfilters (Operators)
CF_OPERATORS = frozenset(
    {
        "=",
        "==",
        "<",
        "<=",
        ">",
        ">=",
        "!=",
        "!==",
        "IS NULL",
        "IS NOT NULL",
        "RANGE",
        "ANY",
        "ALL",
        "NOT ANY",
        "NOT ALL",
    }
)

# https://developer.clickup.com/docs/rate-limits, https://developer.clickup.com/docs/common_errors
RATE_LIMIT_BODY = {"err": "Rate limit reached", "ECODE": "APP_002"}

# Status colors by type (https://developer.clickup.com/reference/getspace example statuses).
_STATUS_COLORS = {"open": "#d3d3d3", "custom": "#4194f6", "done": "#6bc950", "closed": "#6bc950"}


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


class ApiError(Exception):
    """Raised inside a handler; becomes ClickUp's `{err, ECODE}` body."""

    def __init__(self, status: int, err: str, ecode: str) -> None:
        super().__init__(err)
        self.status = status
        self.err = err
        self.ecode = ecode

    def response(self) -> JSONResponse:
        return JSONResponse({"err": self.err, "ECODE": self.ecode}, status_code=self.status)


def _team_not_authorized() -> ApiError:
    # https://developer.clickup.com/docs/common_errors ("Team not authorized", OAUTH_023/026/027
    # and OAUTH_029..045). Seen on the wire for ids that do not exist at all, too.
    return ApiError(401, "Team not authorized", "OAUTH_027")


def _bad_input(err: str, ecode: str) -> ApiError:
    return ApiError(400, err, ecode)


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _ms_str(ms: int | None) -> str | None:
    return None if ms is None else str(int(ms))


def _initials(name: str) -> str:
    parts = [p for p in name.split() if p]
    return "".join(p[0] for p in parts[:2]).upper() or "?"


def _as_int(value: Any) -> int | None:
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value.strip())
    return None


def _as_number(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return None
    return None


def _number_text(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


# --------------------------------------------------------------------------------------------
# State
# --------------------------------------------------------------------------------------------


class ClickUpState:
    """In-memory Workspaces, Spaces, Folders, Lists, templates, custom task types, Custom Fields,
    tasks and comments, plus the accepted tokens and a movable clock.

    Thread-safe: the app runs in a uvicorn thread while tests arrange data from another. Objects
    are kept as plain dicts; `_render_*` turn them into ClickUp's response shapes.
    """

    def __init__(
        self,
        tokens: Iterable[str] = (),
        *,
        plan_rate_per_minute: int = PLAN_RATES["free"],
        template_lag_seconds: float = 0.25,
    ) -> None:
        self.lock = threading.RLock()
        # Personal tokens (`pk_...`) are sent raw; anything else is an OAuth access token and
        # must come as `Bearer <token>` (https://developer.clickup.com/docs/authentication).
        self.tokens: set[str] = set(tokens)
        self.plan_rate_per_minute = plan_rate_per_minute
        # https://developer.clickup.com/reference/createfolderlistfromtemplate
        # "This request runs synchronously by default with return_immediately=true. The request
        # returns the future List ID immediately, but the List may not be created when the
        # response is sent." Template tasks appear this long after an async create.
        self.template_lag_seconds = template_lag_seconds
        self.clock_offset_ms = 0
        self.controls: EmulatorControls | None = None
        self._rng = random.Random(0)
        self._next_numeric = 901_100_000_000
        self.users: dict[int, dict[str, Any]] = {}
        self.teams: dict[str, dict[str, Any]] = {}
        self.spaces: dict[str, dict[str, Any]] = {}
        self.folders: dict[str, dict[str, Any]] = {}
        self.lists_by_id: dict[str, dict[str, Any]] = {}
        self.lists_by_name: dict[tuple[Any, str], dict[str, dict[str, Any]]] = {}
        # Live (not deleted) Lists per Folder: a new List's orderindex without counting every
        # List of the Workspace (a backfill creates one per won deal, 10,000s).
        self._live_lists: dict[str, int] = {}
        # (date_updated or 0, id) of every task, ascending, kept in step by each write
        # (`_new_task`, `_set_updated`, `_forget_task`: a bisect and a list move), so a
        # change-feed read does not re-sort the Workspace after every write. None: re-sorted
        # on next use.
        self._updated_order: list[tuple[int, str]] | None = []
        self.fields: dict[str, dict[str, Any]] = {}
        self.templates: dict[str, dict[str, Any]] = {}
        self.tasks: dict[str, dict[str, Any]] = {}
        # Tasks by home List (a task never changes List here): List reads and task creation
        # cost what the List holds, not what the Workspace holds (benchmarks hold 10,000s).
        self.tasks_by_list: dict[str, dict[str, dict[str, Any]]] = {}
        self.comments: dict[str, dict[str, Any]] = {}
        self.deleted_tasks: set[str] = set()
        self.deleted_lists: set[str] = set()
        self._pending_templates: list[dict[str, Any]] = []
        # Handy ids once `seed` ran.
        self.team_id = ""
        self.space_id = ""
        self.folder_id = ""
        self.template_id = ""
        self.user_id = 0
        self.field_ids: dict[str, str] = {}

    # ---- clock & ids ----------------------------------------------------------------------

    def now_ms(self) -> int:
        """Real time in epoch milliseconds plus the offset tests move with `advance`."""
        return int(time.time() * 1000) + self.clock_offset_ms

    def advance(self, seconds: float) -> None:
        """Move the clock forward (template lag, date filters)."""
        with self.lock:
            self.clock_offset_ms += int(seconds * 1000)

    def _numeric_id(self) -> str:
        self._next_numeric += self._rng.randint(1, 97)
        return str(self._next_numeric)

    def _task_id(self) -> str:
        # ClickUp task ids are short lowercase alphanumerics (e.g. "86b2x7qkf").
        alphabet = "0123456789abcdefghijklmnopqrstuvwxyz"
        while True:
            tid = "86" + "".join(self._rng.choice(alphabet) for _ in range(7))
            if tid not in self.tasks and tid not in self.deleted_tasks:
                return tid

    def _uuid(self) -> str:
        return str(uuid.UUID(int=self._rng.getrandbits(128), version=4))

    # ---- arrangement: workspace structure ------------------------------------------------

    def add_user(self, username: str, email: str) -> int:
        with self.lock:
            uid = 80_000_000 + len(self.users) * 1013 + self._rng.randint(1, 999)
            color = f"#{self._rng.randint(0, 0xFFFFFF):06x}"
            self.users[uid] = {
                "id": uid,
                "username": username,
                "email": email,
                "color": color,
                "initials": _initials(username),
                "profilePicture": None,
            }
            return uid

    def add_team(self, name: str, member_ids: Iterable[int] = ()) -> str:
        with self.lock:
            tid = str(9_012_000_000 + self._rng.randint(1, 999_999))
            self.teams[tid] = {
                "id": tid,
                "name": name,
                "color": "#7b68ee",
                "avatar": None,
                "members": list(member_ids),
                "custom_items": [],
            }
            return tid

    def add_custom_item(
        self, team_id: str, name: str, name_plural: str, description: str, item_id: int
    ) -> int:
        with self.lock:
            self.teams[team_id]["custom_items"].append(
                {
                    "id": item_id,
                    "name": name,
                    "name_plural": name_plural,
                    "description": description,
                }
            )
            return item_id

    def add_space(
        self, team_id: str, name: str, statuses: list[tuple[str, str]] | None = None
    ) -> str:
        """A Space; `statuses` are (name, type) with type open/custom/done/closed."""
        with self.lock:
            sid = self._numeric_id()
            statuses = statuses or [("to do", "open"), ("complete", "closed")]
            self.spaces[sid] = {
                "id": sid,
                "team_id": team_id,
                "name": name,
                "private": False,
                "archived": False,
                "statuses": [
                    {
                        "id": f"p{sid}_{self._rng.getrandbits(40):010x}",
                        "status": s,
                        "type": t,
                        "orderindex": i,
                        "color": _STATUS_COLORS.get(t, "#d3d3d3"),
                    }
                    for i, (s, t) in enumerate(statuses)
                ],
            }
            # https://developer.clickup.com/reference/createfolderlesslist - folderless Lists
            # answer with a hidden Folder ("name": "hidden", "hidden": true).
            hidden = self._new_folder(sid, "hidden", hidden=True)
            self.spaces[sid]["hidden_folder_id"] = hidden
            return sid

    def _new_folder(self, space_id: str, name: str, hidden: bool = False) -> str:
        fid = self._numeric_id()
        order = sum(1 for f in self.folders.values() if f["space_id"] == space_id)
        self.folders[fid] = {
            "id": fid,
            "space_id": space_id,
            "name": name,
            "orderindex": order,
            "override_statuses": False,
            "hidden": hidden,
            "archived": False,
        }
        return fid

    def add_folder(self, space_id: str, name: str) -> str:
        with self.lock:
            return self._new_folder(space_id, name)

    def add_field(
        self,
        name: str,
        field_type: str,
        *,
        scope: tuple[str, str],
        type_config: dict[str, Any] | None = None,
        task_types: Iterable[int] | None = None,
    ) -> str:
        """A Custom Field created at `scope` = ("team"|"space"|"folder"|"list", id); with
        `task_types` it applies only to those custom task types (`applied_objects`)."""
        with self.lock:
            fid = self._uuid()
            self.fields[fid] = {
                "id": fid,
                "name": name,
                "type": field_type,
                "type_config": copy.deepcopy(type_config or {}),
                "date_created": _ms_str(self.now_ms() - 200 * 86_400_000),
                "hide_from_guests": False,
                "required": False,
                "scope": scope,
                "task_types": None if task_types is None else list(task_types),
            }
            return fid

    def add_list_template(self, team_id: str, name: str, tasks: list[dict[str, Any]]) -> str:
        """A List template; each task spec: name, custom_item_id, status, description,
        due_in_days, priority, subtasks (list of names)."""
        with self.lock:
            tid = f"t-{self._rng.randint(10_000_000, 99_999_999)}"
            self.templates[tid] = {
                "id": tid,
                "team_id": team_id,
                "name": name,
                "tasks": copy.deepcopy(tasks),
            }
            return tid

    def _new_list(
        self,
        folder_id: str,
        name: str,
        *,
        content: str = "",
        due_date: int | None = None,
        due_date_time: bool = False,
        priority: int | None = None,
        assignee: int | None = None,
        color: str | None = None,
    ) -> dict[str, Any]:
        folder = self.folders[folder_id]
        space = self.spaces[folder["space_id"]]
        lid = self._numeric_id()
        # The Folder's live Lists before this one (`delete_list` gives a place back).
        order = self._live_lists.get(folder_id, 0)
        self._live_lists[folder_id] = order + 1
        lst = {
            "id": lid,
            "name": name,
            "orderindex": order,
            "content": content,
            "color": color,
            "priority": priority,
            "assignee": assignee,
            "due_date": due_date,
            "due_date_time": due_date_time,
            "start_date": None,
            "folder_id": folder_id,
            "space_id": space["id"],
            "team_id": space["team_id"],
            "archived": False,
            "deleted": False,
            "override_statuses": False,
            "statuses": copy.deepcopy(space["statuses"]),
            "date_created": self.now_ms(),
        }
        self.lists_by_id[lid] = lst
        self._name_index(lst, add=True)
        return lst

    def _name_index(self, lst: dict[str, Any], *, add: bool) -> None:
        """Lists by (Folder, name as compared): the name check of a create costs what the
        name has, not what the Workspace holds."""
        key = (lst["folder_id"], lst["name"].strip().lower())
        if add:
            self.lists_by_name.setdefault(key, {})[lst["id"]] = lst
        else:
            self.lists_by_name.get(key, {}).pop(lst["id"], None)

    def add_list(self, folder_id: str, name: str, content: str = "") -> str:
        with self.lock:
            return self._new_list(folder_id, name, content=content)["id"]

    # ---- arrangement: tasks ---------------------------------------------------------------

    def add_task(
        self,
        list_id: str,
        name: str,
        *,
        status: str | None = None,
        custom_item_id: int = TASK_TYPE_ID,
        description: str = "",
        due_date: int | None = None,
        start_date: int | None = None,
        assignees: Iterable[int] = (),
        parent: str | None = None,
        priority: int | None = None,
        custom_fields: dict[str, Any] | None = None,
        created_ms: int | None = None,
    ) -> str:
        """Create a task directly (no HTTP) for test arrangement; only `status` is checked."""
        with self.lock:
            lst = self.lists_by_id[list_id]
            st = self._status(lst, status) if status else lst["statuses"][0]
            now = self.now_ms() if created_ms is None else created_ms
            task = self._new_task(lst, name, st, now)
            task.update(
                custom_item_id=custom_item_id,
                description=description,
                due_date=due_date,
                start_date=start_date,
                assignees=list(assignees),
                parent=parent,
                priority=priority,
            )
            self._stamp_status_dates(task, st, now)
            for fid, value in (custom_fields or {}).items():
                task["fields"][fid] = value
            return task["id"]

    def _new_task(self, lst: dict[str, Any], name: str, st: dict[str, Any], now: int) -> dict:
        tid = self._task_id()
        order = len(self.tasks_by_list.get(lst["id"], ())) + 1
        task = {
            "id": tid,
            "name": name,
            "description": "",
            "custom_item_id": TASK_TYPE_ID,
            "status": dict(st),
            "orderindex": order,
            "date_created": now,
            "date_updated": now,
            "date_closed": None,
            "date_done": None,
            "archived": False,
            "creator": self.user_id or next(iter(self.users), 0),
            "assignees": [],
            "tags": [],
            "parent": None,
            "priority": None,
            "due_date": None,
            "due_date_time": False,
            "start_date": None,
            "start_date_time": False,
            "points": None,
            "time_estimate": None,
            "list_id": lst["id"],
            "folder_id": lst["folder_id"],
            "space_id": lst["space_id"],
            "team_id": lst["team_id"],
            "fields": {},
        }
        self.tasks[tid] = task
        self.tasks_by_list.setdefault(lst["id"], {})[tid] = task
        if self._updated_order is not None:
            # New tasks are stamped "now": usually an append at the end.
            bisect.insort(self._updated_order, (now or 0, tid))
        return task

    def updated_order(self) -> list[tuple[int, str]]:
        """(date_updated or 0, id) of every task, ascending."""
        if self._updated_order is None:
            self._updated_order = sorted(
                (t["date_updated"] or 0, t["id"]) for t in self.tasks.values()
            )
        return self._updated_order

    def _drop_from_order(self, task: dict[str, Any]) -> None:
        """Take the task's entry out of `_updated_order` (its key as it is now)."""
        order = self._updated_order
        if order is None:
            return
        key = (task["date_updated"] or 0, task["id"])
        i = bisect.bisect_left(order, key)
        if i < len(order) and order[i] == key:
            del order[i]
        else:
            # Not where its date_updated puts it (changed without `_set_updated`): re-sort
            # on next use rather than serve a stale order.
            self._updated_order = None

    def _set_updated(self, task: dict[str, Any], ms: int) -> None:
        """Stamp the task's date_updated, moving its entry in `_updated_order`."""
        self._drop_from_order(task)
        task["date_updated"] = ms
        if self._updated_order is not None:
            bisect.insort(self._updated_order, (ms or 0, task["id"]))

    def _forget_task(self, task_id: str) -> None:
        task = self.tasks.pop(task_id, None)
        if task is not None:
            self.tasks_by_list.get(task["list_id"], {}).pop(task_id, None)
            self._drop_from_order(task)

    def _status(self, lst: dict[str, Any], name: str) -> dict[str, Any]:
        wanted = name.strip().lower()
        for st in lst["statuses"]:
            if st["status"].lower() == wanted:
                return st
        # Seen on the wire: 400 {"err":"Status does not exist","ECODE":"ITEM_114"}.
        raise _bad_input("Status does not exist", "ITEM_114")

    @staticmethod
    def _stamp_status_dates(task: dict[str, Any], st: dict[str, Any], now: int) -> None:
        # https://developer.clickup.com/reference/gettask - date_closed / date_done. A "done"
        # status stamps date_done; a "closed" one both; moving back to open clears them.
        if st["type"] == "closed":
            task["date_closed"] = task["date_closed"] or now
            task["date_done"] = task["date_done"] or now
        elif st["type"] == "done":
            task["date_closed"] = None
            task["date_done"] = task["date_done"] or now
        else:
            task["date_closed"] = None
            task["date_done"] = None

    def set_status(self, task_id: str, status: str) -> None:
        """Move a task to `status` (as a user in ClickUp would), bumping date_updated."""
        with self.lock:
            self._materialize()
            task = self.tasks[task_id]
            st = self._status(self.lists_by_id[task["list_id"]], status)
            now = self.now_ms()
            task["status"] = dict(st)
            self._stamp_status_dates(task, st, now)
            self._set_updated(task, now)

    def complete_task(self, task_id: str) -> None:
        """Close a task: its List's first status of type "closed" (stamps date_closed/done)."""
        with self.lock:
            self._materialize()
            task = self.tasks[task_id]
            lst = self.lists_by_id[task["list_id"]]
            closed = next(s for s in lst["statuses"] if s["type"] == "closed")
            self.set_status(task_id, closed["status"])

    def set_field_value(self, task_id: str, field_id: str, value: Any) -> None:
        """Store a Custom Field value as the API would (validated), bumping date_updated."""
        with self.lock:
            task = self.tasks[task_id]
            field = self.fields[field_id]
            task["fields"][field_id] = _coerce_field_value(field, value)
            self._set_updated(task, self.now_ms())

    # ---- inspection (rendered as the API would) --------------------------------------------

    def lists(self) -> list[dict[str, Any]]:
        """Every live List, as Get List renders it."""
        with self.lock:
            self._materialize()
            return [
                self._render_list(lst) for lst in self.lists_by_id.values() if not lst["deleted"]
            ]

    def list(self, list_id: str) -> dict[str, Any]:
        """One List as Get List renders it (KeyError when unknown or deleted)."""
        with self.lock:
            self._materialize()
            lst = self.lists_by_id[list_id]
            if lst["deleted"]:
                raise KeyError(list_id)
            return self._render_list(lst)

    def tasks_in_list(self, list_id: str) -> list[dict[str, Any]]:
        """Every task (closed, archived and subtasks too) whose home is `list_id`."""
        with self.lock:
            self._materialize()
            return [self._render_task(t) for t in self.tasks_by_list.get(list_id, {}).values()]

    def task(self, task_id: str) -> dict[str, Any]:
        with self.lock:
            self._materialize()
            return self._render_task(self.tasks[task_id])

    def field_id(self, name: str) -> str:
        with self.lock:
            return next(f["id"] for f in self.fields.values() if f["name"] == name)

    # ---- seed -------------------------------------------------------------------------------

    def seed(self, rng: random.Random) -> dict[str, str]:
        """A realistic Workspace "Acme Delivery": members, Space "Client Delivery" (to do / in
        progress / done / complete), Folder "Onboarding projects", custom task types incl.
        Milestone (id 1), Custom Fields and the List template "Customer onboarding".

        Returns the main ids (also kept as attributes)."""
        with self.lock:
            self._rng = random.Random(rng.getrandbits(64))
            people = [
                ("Dana Whitfield", "dana@acme-delivery.example"),
                ("Marco Ruiz", "marco@acme-delivery.example"),
                ("Priya Natarajan", "priya@acme-delivery.example"),
                ("Tom Becker", "tom@acme-delivery.example"),
                ("Aiko Tanaka", "aiko@acme-delivery.example"),
            ]
            uids = [self.add_user(n, e) for n, e in people]
            self.user_id = uids[0]
            team = self.add_team("Acme Delivery", uids)
            # https://developer.clickup.com/reference/getcustomitems - Milestone is type 1
            # (https://developer.clickup.com/reference/gettasks, custom_items); Workspaces
            # define their own types with larger ids (the docs' example: 1300 "Bug").
            self.add_custom_item(
                team, "Milestone", "Milestones", "Key moments of a project.", MILESTONE_TYPE_ID
            )
            self.add_custom_item(team, "Deliverable", "Deliverables", "Client deliverable.", 1301)
            self.add_custom_item(team, "Risk", "Risks", "A tracked project risk.", 1302)
            space = self.add_space(
                team,
                "Client Delivery",
                [
                    ("to do", "open"),
                    ("in progress", "custom"),
                    ("done", "done"),
                    ("complete", "closed"),
                ],
            )
            folder = self.add_folder(space, "Onboarding projects")
            self.add_folder(space, "Internal")
            created = self.now_ms() - 90 * 86_400_000
            self.field_ids = {
                "Handoff deal": self.add_field(
                    "Handoff deal", "short_text", scope=("team", team), type_config={}
                ),
                "Deal amount": self.add_field(
                    "Deal amount",
                    "currency",
                    scope=("team", team),
                    type_config={"precision": 2, "currency_type": "USD", "default": None},
                ),
                "Deal tier": self.add_field(
                    "Deal tier",
                    "drop_down",
                    scope=("space", space),
                    type_config={
                        "default": 0,
                        "placeholder": None,
                        "new_drop_down": True,
                        "sorting": "manual",
                        "options": [
                            {"id": self._uuid(), "name": n, "color": c, "orderindex": i}
                            for i, (n, c) in enumerate(
                                [
                                    ("Starter", "#02BCD4"),
                                    ("Growth", "#2ecd6f"),
                                    ("Enterprise", "#7b68ee"),
                                ]
                            )
                        ],
                    },
                ),
                "Milestone weight": self.add_field(
                    "Milestone weight",
                    "number",
                    scope=("folder", folder),
                    type_config={},
                    task_types=[MILESTONE_TYPE_ID],
                ),
            }
            self.template_id = self.add_list_template(
                team,
                "Customer onboarding",
                [
                    {"name": "Kickoff call held", "custom_item_id": 1, "due_in_days": 7},
                    {"name": "Schedule kickoff call", "due_in_days": 3, "priority": 2},
                    {"name": "Provision workspace", "due_in_days": 10},
                    {"name": "Data migration", "due_in_days": 21, "subtasks": ["Export data"]},
                    {"name": "Training delivered", "custom_item_id": 1, "due_in_days": 30},
                    {"name": "Run training session", "due_in_days": 28},
                    {"name": "Go-live", "custom_item_id": 1, "due_in_days": 45},
                    {"name": "Handover to support", "custom_item_id": 1, "due_in_days": 60},
                ],
            )
            self.add_list_template(team, "Renewal checklist", [{"name": "Review usage"}])
            # A couple of existing projects so the Folder is not empty.
            for client in ("Northwind Traders", "Globex"):
                lst = self._new_list(folder, f"{client} onboarding")
                lst["date_created"] = created
                for spec in self.templates[self.template_id]["tasks"]:
                    tid = self.add_task(
                        lst["id"],
                        spec["name"],
                        custom_item_id=spec.get("custom_item_id", 0),
                        created_ms=created,
                    )
                    if rng.random() < 0.5:
                        self.complete_task(tid)
            self._new_list(self.spaces[space]["hidden_folder_id"], "Inbox")
            self.team_id, self.space_id, self.folder_id = team, space, folder
            return {
                "team_id": team,
                "space_id": space,
                "folder_id": folder,
                "template_id": self.template_id,
            }

    # ---- templates -------------------------------------------------------------------------

    def _apply_template(
        self, list_id: str, template_id: str, options: dict[str, Any], at_ms: int
    ) -> None:
        """Create the template's tasks in the List (what ClickUp does in the background)."""
        lst = self.lists_by_id.get(list_id)
        if lst is None or lst["deleted"]:
            return
        template = self.templates[template_id]

        # https://developer.clickup.com/reference/createfolderlistfromtemplate (options): each
        # `old_*`/`custom_type`/... flag imports that part of the template's tasks. We import a
        # part unless its flag is explicitly false (the app's "apply template" default).
        def keep(flag: str) -> bool:
            return options.get(flag, True) is not False

        for spec in template["tasks"]:
            st = lst["statuses"][0]
            if keep("old_status") and spec.get("status"):
                st = self._status(lst, spec["status"])
            task = self._new_task(lst, spec["name"], st, at_ms)
            task["description"] = spec.get("description", "")
            if keep("custom_type"):
                task["custom_item_id"] = spec.get("custom_item_id", TASK_TYPE_ID)
            if keep("old_due_date") and spec.get("due_in_days") is not None:
                task["due_date"] = at_ms + int(spec["due_in_days"]) * 86_400_000
            if keep("priority"):
                task["priority"] = spec.get("priority")
            self._stamp_status_dates(task, st, at_ms)
            if keep("subtasks"):
                for sub in spec.get("subtasks", []):
                    child = self._new_task(lst, sub, lst["statuses"][0], at_ms)
                    child["parent"] = task["id"]

    def _materialize(self) -> None:
        """Finish background template applications whose time has come."""
        if not self._pending_templates:
            return
        now = self.now_ms()
        due = [p for p in self._pending_templates if p["ready_ms"] <= now]
        if not due:
            return
        self._pending_templates = [p for p in self._pending_templates if p["ready_ms"] > now]
        for p in due:
            self._apply_template(p["list_id"], p["template_id"], p["options"], p["ready_ms"])

    # ---- rendering ---------------------------------------------------------------------------

    def _user(self, uid: int | None) -> dict[str, Any] | None:
        if uid is None:
            return None
        u = self.users.get(uid)
        if u is None:
            return None
        return dict(u)

    def _render_team(self, team: dict[str, Any]) -> dict[str, Any]:
        # https://developer.clickup.com/reference/getauthorizedteams
        members = []
        for uid in team["members"]:
            u = self.users[uid]
            members.append(
                {
                    "user": {
                        "id": uid,
                        "username": u["username"],
                        "email": u["email"],
                        "color": u["color"],
                        "profilePicture": None,
                        "initials": u["initials"],
                        "role": 1 if uid == team["members"][0] else 3,
                    }
                }
            )
        return {
            "id": team["id"],
            "name": team["name"],
            "color": team["color"],
            "avatar": team["avatar"],
            "members": members,
        }

    def _render_space(self, space: dict[str, Any]) -> dict[str, Any]:
        # https://developer.clickup.com/reference/getspace
        return {
            "id": space["id"],
            "name": space["name"],
            "private": space["private"],
            "color": None,
            "avatar": None,
            "admin_can_manage": True,
            "archived": space["archived"],
            "members": [],
            "statuses": copy.deepcopy(space["statuses"]),
            "multiple_assignees": True,
            "features": {
                "due_dates": {
                    "enabled": True,
                    "start_date": True,
                    "remap_due_dates": True,
                    "remap_closed_due_date": False,
                },
                "time_tracking": {"enabled": False},
                "tags": {"enabled": True},
                "time_estimates": {"enabled": True},
                "checklists": {"enabled": True},
                "custom_fields": {"enabled": True},
                "remap_dependencies": {"enabled": True},
                "dependency_warning": {"enabled": True},
                "portfolios": {"enabled": False},
            },
        }

    def _folder_ref(self, folder: dict[str, Any]) -> dict[str, Any]:
        return {
            "id": folder["id"],
            "name": folder["name"],
            "hidden": folder["hidden"],
            "access": True,
        }

    def _space_ref(self, space_id: str) -> dict[str, Any]:
        space = self.spaces[space_id]
        return {"id": space["id"], "name": space["name"], "access": True}

    def _live_tasks(self, list_id: str) -> list[dict[str, Any]]:
        return [t for t in self.tasks_by_list.get(list_id, {}).values() if not t["archived"]]

    def _render_list(self, lst: dict[str, Any]) -> dict[str, Any]:
        # https://developer.clickup.com/reference/getlist
        priority = None
        if lst["priority"] in PRIORITIES:
            name, color = PRIORITIES[lst["priority"]]
            priority = {"priority": name, "color": color}
        status = None
        if lst["color"]:
            status = {
                "status": lst["color"],
                "color": _list_color(lst["color"]),
                "hide_label": True,
            }
        return {
            "id": lst["id"],
            "name": lst["name"],
            "orderindex": lst["orderindex"],
            "content": lst["content"],
            "status": status,
            "priority": priority,
            "assignee": self._user(lst["assignee"]),
            "task_count": len(self._live_tasks(lst["id"])),
            "due_date": _ms_str(lst["due_date"]),
            "due_date_time": lst["due_date_time"],
            "start_date": _ms_str(lst["start_date"]),
            "start_date_time": None,
            "folder": self._folder_ref(self.folders[lst["folder_id"]]),
            "space": self._space_ref(lst["space_id"]),
            "inbound_address": f"a.t.{lst['id']}.u-{self.user_id}.x@tasks.clickup.com",
            "archived": lst["archived"],
            "override_statuses": lst["override_statuses"],
            "statuses": [
                {k: s[k] for k in ("id", "status", "orderindex", "color", "type")}
                for s in lst["statuses"]
            ],
            "permission_level": "create",
        }

    def _render_folder(self, folder: dict[str, Any]) -> dict[str, Any]:
        # https://developer.clickup.com/reference/getfolder
        lists = [
            self._render_list(lst)
            for lst in self.lists_by_id.values()
            if lst["folder_id"] == folder["id"] and not lst["deleted"] and not lst["archived"]
        ]
        task_count = sum(lst["task_count"] for lst in lists)
        return {
            "id": folder["id"],
            "name": folder["name"],
            "orderindex": folder["orderindex"],
            "override_statuses": folder["override_statuses"],
            "hidden": folder["hidden"],
            "space": self._space_ref(folder["space_id"]),
            "task_count": str(task_count),
            "archived": folder["archived"],
            "statuses": copy.deepcopy(self.spaces[folder["space_id"]]["statuses"]),
            "lists": lists,
            "permission_level": "create",
        }

    def _fields_for_list(self, lst: dict[str, Any]) -> list[dict[str, Any]]:
        """Custom Fields accessible in a List: its own and those of its Folder, Space and
        Workspace (https://developer.clickup.com/reference/getaccessiblecustomfields)."""
        scopes = {
            ("list", lst["id"]),
            ("folder", lst["folder_id"]),
            ("space", lst["space_id"]),
            ("team", lst["team_id"]),
        }
        return [f for f in self.fields.values() if f["scope"] in scopes]

    def _render_field(self, field: dict[str, Any], applied: bool) -> dict[str, Any]:
        out = {
            "id": field["id"],
            "name": field["name"],
            "type": field["type"],
            "type_config": _json_copy(field["type_config"]),
            "date_created": field["date_created"],
            "hide_from_guests": field["hide_from_guests"],
            "required": field["required"],
        }
        # `applied_objects` only with include_applied_objects=true and only on fields scoped
        # to task types (https://developer.clickup.com/reference/getaccessiblecustomfields).
        if applied and field["task_types"] is not None:
            out["applied_objects"] = [
                {"object_type": APPLIED_OBJECT_TASK_TYPE, "object_id": t}
                for t in field["task_types"]
            ]
        return out

    @staticmethod
    def _field_applies(field: dict[str, Any], custom_item_id: int) -> bool:
        types = field["task_types"]
        return types is None or custom_item_id in types

    def _render_field_value(self, field: dict[str, Any], value: Any) -> Any:
        # https://developer.clickup.com/docs/customfields - drop_down values read back as the
        # option's orderindex; number and currency values come back as strings.
        if field["type"] == "drop_down":
            for opt in field["type_config"].get("options", []):
                if opt["id"] == value:
                    return opt["orderindex"]
            return None
        if field["type"] in ("number", "currency"):
            return _number_text(value)
        return value

    def _render_task(self, task: dict[str, Any]) -> dict[str, Any]:
        # https://developer.clickup.com/reference/gettask
        lst = self.lists_by_id[task["list_id"]]
        folder = self.folders[task["folder_id"]]
        fields = []
        for field in self._fields_for_list(lst):
            if not self._field_applies(field, task["custom_item_id"]):
                continue
            rendered = self._render_field(field, applied=False)
            if field["id"] in task["fields"]:
                rendered["value"] = self._render_field_value(field, task["fields"][field["id"]])
                rendered["value_richtext"] = None
            fields.append(rendered)
        priority = None
        if task["priority"] in PRIORITIES:
            name, color = PRIORITIES[task["priority"]]
            p = str(task["priority"])
            priority = {"color": color, "id": p, "orderindex": p, "priority": name}
        top = task["parent"]
        while top and self.tasks.get(top, {}).get("parent"):
            top = self.tasks[top]["parent"]
        return {
            "id": task["id"],
            "custom_id": None,
            "custom_item_id": task["custom_item_id"],
            "name": task["name"],
            "text_content": task["description"],
            "description": task["description"],
            "status": {
                k: task["status"][k] for k in ("id", "status", "color", "orderindex", "type")
            },
            "orderindex": f"{task['orderindex']}.00000000000000000000000000000000",
            "date_created": _ms_str(task["date_created"]),
            "date_updated": _ms_str(task["date_updated"]),
            "date_closed": _ms_str(task["date_closed"]),
            "date_done": _ms_str(task["date_done"]),
            "archived": task["archived"],
            "creator": self._user(task["creator"]),
            "assignees": [self._user(u) for u in task["assignees"] if u in self.users],
            "group_assignees": [],
            "watchers": [],
            "checklists": [],
            "tags": [],
            "parent": task["parent"],
            "top_level_parent": top,
            "priority": priority,
            "due_date": _ms_str(task["due_date"]),
            "start_date": _ms_str(task["start_date"]),
            "points": task["points"],
            "time_estimate": task["time_estimate"],
            "custom_fields": fields,
            "dependencies": [],
            "linked_tasks": [],
            "locations": [],
            "team_id": task["team_id"],
            "url": f"https://app.clickup.com/t/{task['id']}",
            "sharing": {
                "public": False,
                "public_share_expires_on": None,
                "public_fields": [],
                "token": None,
                "seo_optimized": False,
            },
            "permission_level": "create",
            "list": {"id": lst["id"], "name": lst["name"], "access": True},
            "project": self._folder_ref(folder),
            "folder": self._folder_ref(folder),
            "space": {"id": task["space_id"]},
        }


def _json_copy(value: Any) -> Any:
    """A deep copy of JSON-shaped data (dicts, lists, scalars), as `copy.deepcopy` makes it
    at a fraction of the cost: every task renders each of its Custom Fields' type_config
    (a page of 100 tasks spent most of its time in deepcopy)."""
    if isinstance(value, dict):
        return {k: _json_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_copy(v) for v in value]
    return value


def _list_color(name: str) -> str:
    return {"red": "#e50000", "yellow": "#f9d900", "green": "#2ecd6f", "blue": "#0231e8"}.get(
        name.lower(), "#d3d3d3"
    )


def _coerce_field_value(field: dict[str, Any], value: Any) -> Any:
    """Validate a Custom Field value as Set Custom Field Value does; returns what to store.

    https://developer.clickup.com/reference/setcustomfieldvalue (value shapes per type).
    """
    ftype = field["type"]
    if ftype in ("short_text", "text", "url", "email", "phone"):
        if not isinstance(value, str):
            raise _bad_input("Value must be a string", "FIELD_011")  # ours
        return value
    if ftype in ("number", "currency"):
        num = _as_number(value)
        if num is None or isinstance(value, str):
            # Money and Number fields take a JSON number (docs: "value": 8000).
            raise _bad_input("Value is not a valid number", "FIELD_014")  # ours
        return num
    if ftype == "drop_down":
        options = field["type_config"].get("options", [])
        if isinstance(value, str) and any(o["id"] == value for o in options):
            return value
        # The docs ask for the option's UUID; new options cannot be created this way.
        raise _bad_input("Value is not a valid option", "FIELD_015")  # ours
    if ftype == "checkbox":
        if not isinstance(value, bool):
            raise _bad_input("Value must be a boolean", "FIELD_016")  # ours
        return value
    if ftype == "date":
        ms = _as_int(value)
        if ms is None:
            raise _bad_input("Value must be a Unix time in milliseconds", "FIELD_017")  # ours
        return ms
    return value


# --------------------------------------------------------------------------------------------
# HTTP edge: rate limits and vendor bodies
# --------------------------------------------------------------------------------------------


def _token_of(request: Request) -> str:
    return request.headers.get("authorization", "").strip()


class ClickUpFlavor:
    """ClickUp's HTTP edge: one per-token window per minute, its 429 body and headers."""

    def __init__(
        self, controls: EmulatorControls | None = None, state: ClickUpState | None = None
    ) -> None:
        self.controls = controls
        self.state = state

    def _limit(self) -> int:
        return self.state.plan_rate_per_minute if self.state else PLAN_RATES["free"]

    def windows_for(self, request: Request, rates: RateLimitConfig) -> list[Window]:
        # https://developer.clickup.com/docs/rate-limits - "The ClickUp API applies rate limits
        # per token" (personal and OAuth alike), sized by the Workspace's plan.
        if self.controls is None:
            return []
        token = _token_of(request) or "anonymous"
        return [self.controls.window(f"clickup:{token}", self._limit(), RATE_WINDOW_SECONDS)]

    def too_many_requests(self, window: Window, retry_after: float | None) -> Response:
        # https://developer.clickup.com/docs/rate-limits - a 429 whose headers say the limit,
        # the remaining count (0) and the reset as a Unix timestamp. ClickUp sends no
        # Retry-After: clients wait for X-RateLimit-Reset.
        wait = retry_after if retry_after is not None else window.seconds
        headers = {
            "X-RateLimit-Limit": str(window.limit if window.name != "injected" else self._limit()),
            "X-RateLimit-Remaining": "0",
            "X-RateLimit-Reset": str(math.ceil(time.time() + max(wait, 0.0))),
        }
        return JSONResponse(RATE_LIMIT_BODY, status_code=429, headers=headers)

    def server_error(self, status: int) -> Response:
        # https://developer.clickup.com/docs/common_errors - every unsuccessful request carries
        # a JSON error message and code. The 5xx codes are not documented (ours).
        messages = {
            500: "Internal server error",
            502: "Bad gateway",
            503: "Service unavailable",
            504: "Gateway timeout",
        }
        body = {"err": messages.get(status, "Internal server error"), "ECODE": f"APP_{status}"}
        return JSONResponse(body, status_code=status)

    def rate_headers(self, request: Request, windows: list[Window], now: float) -> dict[str, str]:
        # https://developer.clickup.com/docs/rate-limits - X-RateLimit-Limit, -Remaining and
        # -Reset ("Time when the rate limit will reset, in Unix timestamp format", seconds).
        w = windows[0] if windows else None
        if w is None:
            limit = self._limit()
            return {
                "X-RateLimit-Limit": str(limit),
                "X-RateLimit-Remaining": str(limit),
                "X-RateLimit-Reset": str(math.ceil(time.time() + RATE_WINDOW_SECONDS)),
            }
        reset_in = w.reset_in(now) if w.remaining(now) < w.limit else w.seconds
        return {
            "X-RateLimit-Limit": str(w.limit),
            "X-RateLimit-Remaining": str(w.remaining(now)),
            "X-RateLimit-Reset": str(math.ceil(time.time() + reset_in)),
        }

    def route_name(self, request: Request) -> str:
        return route_template(ROUTES, request)


# --------------------------------------------------------------------------------------------
# Request plumbing
# --------------------------------------------------------------------------------------------

Handler = Callable[[Request, ClickUpState], Awaitable[Response]]


def _check_auth(request: Request, state: ClickUpState) -> None:
    header = _token_of(request)
    if not header:
        # https://developer.clickup.com/docs/common_errors - "Authorization Header Required",
        # OAUTH_017.
        raise ApiError(400, "Authorization header required", "OAUTH_017")
    if header.lower().startswith("bearer "):
        token = header[7:].strip()
        if token in state.tokens and not token.startswith("pk_"):
            return
        # Measured against api.clickup.com (quoted by other clients): a personal token behind
        # "Bearer " answers "Oauth token not found" - the prefix belongs to OAuth tokens.
        # OAUTH_019 is one of the documented "Token not found" codes.
        raise ApiError(401, "Oauth token not found", "OAUTH_019")
    if header.startswith("pk_") and header in state.tokens:
        return
    # https://developer.clickup.com/docs/common_errors - "Token not found" (OAUTH_019,
    # OAUTH_021, OAUTH_025, OAUTH_077); the body seen on the wire is "Token invalid".
    raise ApiError(401, "Token invalid", "OAUTH_025")


async def _json_body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise _bad_input("Invalid JSON body", "INPUT_001") from None  # ours
    if not isinstance(body, dict):
        raise _bad_input("Invalid JSON body", "INPUT_001")
    return body


def _endpoint(state: ClickUpState, handler: Handler) -> Callable:
    async def run(request: Request) -> Response:
        try:
            _check_auth(request, state)
            return await handler(request, state)
        except ApiError as err:
            return err.response()

    return run


def _bool_param(request: Request, name: str) -> bool | None:
    value = request.query_params.get(name)
    if value is None:
        return None
    return value.strip().lower() == "true"


def _multi(request: Request, name: str) -> list[str]:
    """An array query parameter, as `name[]=a&name[]=b` or `name=a&name=b` (both parse)."""
    return request.query_params.getlist(f"{name}[]") + request.query_params.getlist(name)


def _int_query(request: Request, name: str) -> int | None:
    value = request.query_params.get(name)
    if value is None or value == "":
        return None
    parsed = _as_int(value)
    if parsed is None:
        raise _bad_input(f"{name} invalid", "INPUT_002")  # ours
    return parsed


def _list_id(raw: str) -> str:
    # Seen on the wire: a non-numeric List id is refused before any lookup with
    # 400 {"err":"validateListIDEx List ID invalid","ECODE":"INPUT_003"}.
    if not raw.isdigit():
        raise _bad_input("validateListIDEx List ID invalid", "INPUT_003")
    return raw


def _team(state: ClickUpState, team_id: str) -> dict[str, Any]:
    team = state.teams.get(team_id)
    if team is None:
        raise _team_not_authorized()
    return team


def _space(state: ClickUpState, space_id: str) -> dict[str, Any]:
    space = state.spaces.get(space_id)
    if space is None:
        raise _team_not_authorized()
    return space


def _folder(state: ClickUpState, folder_id: str) -> dict[str, Any]:
    folder = state.folders.get(folder_id)
    if folder is None or folder["hidden"]:
        raise _team_not_authorized()
    return folder


def _get_list(state: ClickUpState, list_id: str) -> dict[str, Any]:
    lst = state.lists_by_id.get(_list_id(list_id))
    if lst is None:
        raise _team_not_authorized()
    if lst["deleted"]:
        # Deleted Lists sit in the Trash; ClickUp answers a 404 (code ours).
        raise ApiError(404, "List not found, deleted", "ITEM_015")
    return lst


def _get_task(state: ClickUpState, task_id: str) -> dict[str, Any]:
    task = state.tasks.get(task_id)
    if task is None:
        if task_id in state.deleted_tasks:
            # Seen on the wire: 404 {"err":"Task not found, deleted","ECODE":"ITEM_013"}.
            raise ApiError(404, "Task not found, deleted", "ITEM_013")
        raise _team_not_authorized()
    return task


# --------------------------------------------------------------------------------------------
# Endpoints: hierarchy
# --------------------------------------------------------------------------------------------


# https://developer.clickup.com/reference/getauthorizedteams
async def get_teams(request: Request, state: ClickUpState) -> Response:
    with state.lock:
        return JSONResponse({"teams": [state._render_team(t) for t in state.teams.values()]})


# https://developer.clickup.com/reference/getspaces
async def get_spaces(request: Request, state: ClickUpState) -> Response:
    archived = bool(_bool_param(request, "archived"))
    with state.lock:
        team = _team(state, request.path_params["team_id"])
        spaces = [
            state._render_space(s)
            for s in state.spaces.values()
            if s["team_id"] == team["id"] and s["archived"] == archived
        ]
        return JSONResponse({"spaces": spaces})


# https://developer.clickup.com/reference/getspace
async def get_space(request: Request, state: ClickUpState) -> Response:
    with state.lock:
        return JSONResponse(state._render_space(_space(state, request.path_params["space_id"])))


# https://developer.clickup.com/reference/getfolders
async def get_folders(request: Request, state: ClickUpState) -> Response:
    archived = bool(_bool_param(request, "archived"))
    with state.lock:
        state._materialize()
        space = _space(state, request.path_params["space_id"])
        folders = [
            state._render_folder(f)
            for f in state.folders.values()
            if f["space_id"] == space["id"] and not f["hidden"] and f["archived"] == archived
        ]
        return JSONResponse({"folders": folders})


# https://developer.clickup.com/reference/getfolder
async def get_folder(request: Request, state: ClickUpState) -> Response:
    with state.lock:
        state._materialize()
        return JSONResponse(state._render_folder(_folder(state, request.path_params["folder_id"])))


def _lists_in(state: ClickUpState, folder_id: str, archived: bool) -> list[dict[str, Any]]:
    return [
        state._render_list(lst)
        for lst in state.lists_by_id.values()
        if lst["folder_id"] == folder_id and not lst["deleted"] and lst["archived"] == archived
    ]


# https://developer.clickup.com/reference/getlists
async def get_folder_lists(request: Request, state: ClickUpState) -> Response:
    archived = bool(_bool_param(request, "archived"))
    with state.lock:
        state._materialize()
        folder = _folder(state, request.path_params["folder_id"])
        return JSONResponse({"lists": _lists_in(state, folder["id"], archived)})


# https://developer.clickup.com/reference/getfolderlesslists
async def get_folderless_lists(request: Request, state: ClickUpState) -> Response:
    archived = bool(_bool_param(request, "archived"))
    with state.lock:
        state._materialize()
        space = _space(state, request.path_params["space_id"])
        return JSONResponse({"lists": _lists_in(state, space["hidden_folder_id"], archived)})


# https://developer.clickup.com/reference/getlist
async def get_list(request: Request, state: ClickUpState) -> Response:
    with state.lock:
        state._materialize()
        return JSONResponse(state._render_list(_get_list(state, request.path_params["list_id"])))


def _list_fields(state: ClickUpState, body: dict[str, Any]) -> dict[str, Any]:
    """Validate the Create/Update List body fields other than `name`."""
    out: dict[str, Any] = {}
    if "markdown_content" in body or "content" in body:
        content = body.get("markdown_content", body.get("content"))
        if content is not None and not isinstance(content, str):
            raise _bad_input("Content invalid", "INPUT_010")  # ours
        out["content"] = content or ""
    if "due_date" in body:
        due = body["due_date"]
        if due is not None and _as_int(due) is None:
            raise _bad_input("Due date invalid", "INPUT_011")  # ours
        out["due_date"] = None if due is None else _as_int(due)
    if "due_date_time" in body:
        out["due_date_time"] = bool(body["due_date_time"])
    if "priority" in body:
        prio = body["priority"]
        if prio is not None and _as_int(prio) not in PRIORITIES:
            raise _bad_input("Priority invalid", "INPUT_012")  # ours
        out["priority"] = None if prio is None else _as_int(prio)
    if "assignee" in body:
        raw = body["assignee"]
        # Update List documents `"assignee": "none"` to remove the owner.
        if raw in (None, "none"):
            out["assignee"] = None
        else:
            uid = _as_int(raw)
            if uid is None or uid not in state.users:
                raise _bad_input("Assignee invalid", "INPUT_013")  # ours
            out["assignee"] = uid
    if "status" in body:
        # "Status refers to the List color rather than the task Statuses available in the List."
        out["color"] = body["status"] or None
    if body.get("unset_status"):
        out["color"] = None
    return out


def _list_name(state: ClickUpState, body: dict[str, Any], folder_id: str, skip: str = "") -> str:
    name = body.get("name")
    if not isinstance(name, str) or not name.strip():
        # https://developer.clickup.com/reference/createfolderlistfromtemplate - 400 "Name is
        # required" (the docs' example code OAUTH_117 is odd but theirs).
        raise _bad_input("Name is required", "OAUTH_117")
    for lst in state.lists_by_name.get((folder_id, name.strip().lower()), {}).values():
        if (
            lst["folder_id"] == folder_id
            and not lst["deleted"]
            and lst["id"] != skip
            and lst["name"].strip().lower() == name.strip().lower()
        ):
            # Seen on the wire: 400 {"err":"List name taken","ECODE":"SUBCAT_016"}; the
            # template endpoints document 400 "Name is required, or is already taken".
            raise _bad_input("List name taken", "SUBCAT_016")
    return name.strip()


async def _create_list(request: Request, state: ClickUpState, folder_id: str) -> Response:
    body = await _json_body(request)
    with state.lock:
        name = _list_name(state, body, folder_id)
        fields = _list_fields(state, body)
        lst = state._new_list(folder_id, name)
        lst.update(fields)
        return JSONResponse(state._render_list(lst))


# https://developer.clickup.com/reference/createlist
async def create_folder_list(request: Request, state: ClickUpState) -> Response:
    with state.lock:
        folder = _folder(state, request.path_params["folder_id"])
    return await _create_list(request, state, folder["id"])


# https://developer.clickup.com/reference/createfolderlesslist
async def create_folderless_list(request: Request, state: ClickUpState) -> Response:
    with state.lock:
        space = _space(state, request.path_params["space_id"])
    return await _create_list(request, state, space["hidden_folder_id"])


# https://developer.clickup.com/reference/updatelist
async def update_list(request: Request, state: ClickUpState) -> Response:
    body = await _json_body(request)
    with state.lock:
        state._materialize()
        lst = _get_list(state, request.path_params["list_id"])
        name = _list_name(state, body, lst["folder_id"], skip=lst["id"])
        fields = _list_fields(state, body)
        state._name_index(lst, add=False)
        lst["name"] = name
        state._name_index(lst, add=True)
        lst.update(fields)
        return JSONResponse(state._render_list(lst))


# https://developer.clickup.com/reference/deletelist - answers `{}`.
async def delete_list(request: Request, state: ClickUpState) -> Response:
    with state.lock:
        lst = _get_list(state, request.path_params["list_id"])
        lst["deleted"] = True
        state._live_lists[lst["folder_id"]] -= 1
        state.deleted_lists.add(lst["id"])
        for tid in list(state.tasks_by_list.get(lst["id"], {})):
            state._forget_task(tid)
            state.deleted_tasks.add(tid)
        return JSONResponse({})


# --------------------------------------------------------------------------------------------
# Endpoints: templates and custom task types
# --------------------------------------------------------------------------------------------


# https://developer.clickup.com/reference/getlisttemplates - ids carry a "t-" prefix.
async def get_list_templates(request: Request, state: ClickUpState) -> Response:
    with state.lock:
        team = _team(state, request.path_params["team_id"])
        templates = [
            {"name": t["name"], "id": t["id"]}
            for t in state.templates.values()
            if t["team_id"] == team["id"]
        ]
        return JSONResponse({"templates": templates})


async def _list_from_template(
    request: Request, state: ClickUpState, folder_id: str | None
) -> Response:
    body = await _json_body(request)
    options = body.get("options") or {}
    if not isinstance(options, dict):
        raise _bad_input("Options invalid", "INPUT_014")  # ours
    with state.lock:
        if folder_id is None:
            # Documented: 404 "Template, folder, or space not found" (code ours).
            raise ApiError(404, "Folder or Space not found", "TMPL_004")
        template = state.templates.get(request.path_params["template_id"])
        team_id = state.spaces[state.folders[folder_id]["space_id"]]["team_id"]
        if template is None or template["team_id"] != team_id:
            raise ApiError(404, "Template not found", "TMPL_003")  # ours
        name = _list_name(state, body, folder_id)
        lst = state._new_list(folder_id, name, content=str(options.get("content") or ""))
        now = state.now_ms()
        if options.get("return_immediately", True) is False:
            # Synchronous: "guarantees that all sub objects are created".
            state._apply_template(lst["id"], template["id"], options, now)
        else:
            ready = now + int(state.template_lag_seconds * 1000)
            state._pending_templates.append(
                {
                    "ready_ms": ready,
                    "list_id": lst["id"],
                    "template_id": template["id"],
                    "options": dict(options),
                }
            )
            state._materialize()
        rendered = state._render_list(lst)
        rendered["deleted"] = False
        return JSONResponse({"id": lst["id"], "list": rendered})


# https://developer.clickup.com/reference/createfolderlistfromtemplate
async def folder_list_from_template(request: Request, state: ClickUpState) -> Response:
    with state.lock:
        folder = state.folders.get(request.path_params["folder_id"])
        folder_id = folder["id"] if folder and not folder["hidden"] else None
    return await _list_from_template(request, state, folder_id)


# https://developer.clickup.com/reference/createspacelistfromtemplate
async def space_list_from_template(request: Request, state: ClickUpState) -> Response:
    with state.lock:
        space = state.spaces.get(request.path_params["space_id"])
        folder_id = space["hidden_folder_id"] if space else None
    return await _list_from_template(request, state, folder_id)


# https://developer.clickup.com/reference/getcustomitems
async def get_custom_items(request: Request, state: ClickUpState) -> Response:
    with state.lock:
        team = _team(state, request.path_params["team_id"])
        return JSONResponse({"custom_items": copy.deepcopy(team["custom_items"])})


# --------------------------------------------------------------------------------------------
# Endpoints: Custom Fields
# --------------------------------------------------------------------------------------------


def _fields_response(
    state: ClickUpState, request: Request, fields: list[dict[str, Any]]
) -> Response:
    applied = bool(_bool_param(request, "include_applied_objects"))
    return JSONResponse({"fields": [state._render_field(f, applied) for f in fields]})


# https://developer.clickup.com/reference/getaccessiblecustomfields - the List's own fields
# plus those of its Folder, Space and Workspace.
async def get_list_fields(request: Request, state: ClickUpState) -> Response:
    with state.lock:
        lst = _get_list(state, request.path_params["list_id"])
        return _fields_response(state, request, state._fields_for_list(lst))


# https://developer.clickup.com/reference/getfolderavailablefields - only Folder-level fields.
async def get_folder_fields(request: Request, state: ClickUpState) -> Response:
    with state.lock:
        folder = _folder(state, request.path_params["folder_id"])
        fields = [f for f in state.fields.values() if f["scope"] == ("folder", folder["id"])]
        return _fields_response(state, request, fields)


# https://developer.clickup.com/reference/getspaceavailablefields - only Space-level fields.
async def get_space_fields(request: Request, state: ClickUpState) -> Response:
    with state.lock:
        space = _space(state, request.path_params["space_id"])
        fields = [f for f in state.fields.values() if f["scope"] == ("space", space["id"])]
        return _fields_response(state, request, fields)


# https://developer.clickup.com/reference/getteamavailablefields - "only returns Custom Fields
# created at the Workspace level".
async def get_team_fields(request: Request, state: ClickUpState) -> Response:
    with state.lock:
        team = _team(state, request.path_params["team_id"])
        fields = [f for f in state.fields.values() if f["scope"] == ("team", team["id"])]
        return _fields_response(state, request, fields)


def _task_field(state: ClickUpState, task: dict[str, Any], field_id: str) -> dict[str, Any]:
    lst = state.lists_by_id[task["list_id"]]
    field = next((f for f in state._fields_for_list(lst) if f["id"] == field_id), None)
    if field is None:
        raise _bad_input("Custom field id not found", "FIELD_033")  # ours
    if not state._field_applies(field, task["custom_item_id"]):
        # https://developer.clickup.com/reference/setcustomfieldvalue - "Returns 400 if the
        # field is not enabled for the task's custom task type."
        raise _bad_input("Custom field is not applicable to this task type", "FIELD_034")
    return field


# https://developer.clickup.com/reference/setcustomfieldvalue - body {"value": ...}; answers {}.
async def set_field_value(request: Request, state: ClickUpState) -> Response:
    body = await _json_body(request)
    with state.lock:
        state._materialize()
        task = _get_task(state, request.path_params["task_id"])
        field = _task_field(state, task, request.path_params["field_id"])
        if "value" not in body:
            raise _bad_input("Value is required", "FIELD_010")  # ours
        task["fields"][field["id"]] = _coerce_field_value(field, body["value"])
        state._set_updated(task, state.now_ms())
        return JSONResponse({})


# https://developer.clickup.com/reference/removecustomfieldvalue - answers {}.
async def remove_field_value(request: Request, state: ClickUpState) -> Response:
    with state.lock:
        state._materialize()
        task = _get_task(state, request.path_params["task_id"])
        field = _task_field(state, task, request.path_params["field_id"])
        if task["fields"].pop(field["id"], None) is not None:
            state._set_updated(task, state.now_ms())
        return JSONResponse({})


# --------------------------------------------------------------------------------------------
# Endpoints: tasks
# --------------------------------------------------------------------------------------------


def _custom_item(state: ClickUpState, team_id: str, raw: Any) -> int:
    item = _as_int(raw)
    known = {TASK_TYPE_ID} | {c["id"] for c in state.teams[team_id]["custom_items"]}
    if item is None or item not in known:
        raise _bad_input("Custom item id invalid", "CRTSK_009")  # ours
    return item


def _date_value(body: dict[str, Any], key: str) -> int | None:
    raw = body.get(key)
    if raw is None:
        return None
    value = _as_int(raw)
    if value is None:
        raise _bad_input(f"{key} invalid", "INPUT_015")  # ours
    return value


def _assignee_ids(state: ClickUpState, raw: Any) -> list[int]:
    if not isinstance(raw, list):
        raise _bad_input("Assignees invalid", "INPUT_016")  # ours
    out = []
    for value in raw:
        uid = _as_int(value)
        if uid is None or uid not in state.users:
            raise _bad_input("Assignees invalid", "INPUT_016")  # ours
        out.append(uid)
    return out


# https://developer.clickup.com/reference/createtask
async def create_task(request: Request, state: ClickUpState) -> Response:
    body = await _json_body(request)
    with state.lock:
        state._materialize()
        lst = _get_list(state, request.path_params["list_id"])
        name = body.get("name")
        if not isinstance(name, str) or not name.strip():
            raise _bad_input("Task name invalid", "INPUT_005")  # ours
        st = state._status(lst, body["status"]) if body.get("status") else lst["statuses"][0]
        item = _custom_item(state, lst["team_id"], body.get("custom_item_id", TASK_TYPE_ID))
        assignees = _assignee_ids(state, body.get("assignees") or [])
        due = _date_value(body, "due_date")
        start = _date_value(body, "start_date")
        prio = body.get("priority")
        if prio is not None and _as_int(prio) not in PRIORITIES:
            raise _bad_input("Priority invalid", "INPUT_012")  # ours
        parent = body.get("parent")
        if parent is not None:
            ptask = state.tasks.get(parent)
            # "The parent task ... must be in the same List specified in the path parameter."
            if ptask is None or ptask["list_id"] != lst["id"]:
                raise _bad_input("Parent task invalid", "INPUT_017")  # ours
        # Custom Fields: "Only Custom Fields applicable to the task's custom_item_id are saved.
        # Values for fields scoped to other custom task types are ignored."
        values: dict[str, Any] = {}
        accessible = {f["id"]: f for f in state._fields_for_list(lst)}
        raw_fields = body.get("custom_fields") or []
        if not isinstance(raw_fields, list):
            raise _bad_input("Custom fields invalid", "INPUT_018")  # ours
        for entry in raw_fields:
            if not isinstance(entry, dict) or "id" not in entry:
                raise _bad_input("Custom fields invalid", "INPUT_018")  # ours
            field = accessible.get(entry["id"])
            if field is None:
                raise _bad_input("Custom field id not found", "FIELD_033")  # ours
            if not state._field_applies(field, item) or entry.get("value") is None:
                continue
            values[field["id"]] = _coerce_field_value(field, entry["value"])
        now = state.now_ms()
        task = state._new_task(lst, name.strip(), st, now)
        description = body.get("markdown_content", body.get("description")) or ""
        task.update(
            description=str(description),
            custom_item_id=item,
            assignees=assignees,
            due_date=due,
            due_date_time=bool(body.get("due_date_time", False)),
            start_date=start,
            start_date_time=bool(body.get("start_date_time", False)),
            priority=None if prio is None else _as_int(prio),
            parent=parent,
            points=body.get("points"),
            archived=bool(body.get("archived", False)),
            fields=values,
        )
        state._stamp_status_dates(task, st, now)
        return JSONResponse(state._render_task(task))


# https://developer.clickup.com/reference/gettask
async def get_task(request: Request, state: ClickUpState) -> Response:
    with state.lock:
        state._materialize()
        task = _get_task(state, request.path_params["task_id"])
        out = state._render_task(task)
        if _bool_param(request, "include_subtasks"):
            out["subtasks"] = [
                state._render_task(t) for t in state.tasks.values() if t["parent"] == task["id"]
            ]
        return JSONResponse(out)


# https://developer.clickup.com/reference/updatetask - Custom Fields are not updated here
# ("you must use the Set Custom Field endpoint").
async def update_task(request: Request, state: ClickUpState) -> Response:
    body = await _json_body(request)
    with state.lock:
        state._materialize()
        task = _get_task(state, request.path_params["task_id"])
        lst = state.lists_by_id[task["list_id"]]
        changes: dict[str, Any] = {}
        if "name" in body:
            if not isinstance(body["name"], str) or not body["name"].strip():
                raise _bad_input("Task name invalid", "INPUT_005")  # ours
            changes["name"] = body["name"].strip()
        if "markdown_content" in body or "description" in body:
            text = body.get("markdown_content", body.get("description"))
            # 'To clear the task description, include Description with " "'.
            changes["description"] = "" if text in (None, " ") else str(text)
        status = None
        if body.get("status"):
            status = state._status(lst, str(body["status"]))
        if "custom_item_id" in body:
            raw = body["custom_item_id"]
            changes["custom_item_id"] = (
                TASK_TYPE_ID if raw is None else _custom_item(state, task["team_id"], raw)
            )
        if "priority" in body:
            prio = body["priority"]
            if prio is not None and _as_int(prio) not in PRIORITIES:
                raise _bad_input("Priority invalid", "INPUT_012")  # ours
            changes["priority"] = None if prio is None else _as_int(prio)
        for key in ("due_date", "start_date"):
            if key in body:
                changes[key] = _date_value(body, key)
        for key in ("due_date_time", "start_date_time", "archived"):
            if key in body:
                changes[key] = bool(body[key])
        if "points" in body:
            changes["points"] = body["points"]
        if "assignees" in body:
            raw = body["assignees"]
            if not isinstance(raw, dict):
                raise _bad_input("Assignees invalid", "INPUT_016")  # ours
            add = _assignee_ids(state, raw.get("add") or [])
            rem = set(_assignee_ids(state, raw.get("rem") or []))
            current = [u for u in task["assignees"] if u not in rem]
            changes["assignees"] = current + [u for u in add if u not in current]
        if "parent" in body and body["parent"] is not None:
            ptask = state.tasks.get(body["parent"])
            if ptask is None or ptask["id"] == task["id"]:
                raise _bad_input("Parent task invalid", "INPUT_017")  # ours
            changes["parent"] = ptask["id"]
        now = state.now_ms()
        task.update(changes)
        if status is not None and status["id"] != task["status"]["id"]:
            task["status"] = dict(status)
            state._stamp_status_dates(task, status, now)
        state._set_updated(task, now)
        return JSONResponse(state._render_task(task))


# https://developer.clickup.com/reference/deletetask - answers {}.
async def delete_task(request: Request, state: ClickUpState) -> Response:
    with state.lock:
        task = _get_task(state, request.path_params["task_id"])
        doomed = [task["id"]] + [t["id"] for t in state.tasks.values() if t["parent"] == task["id"]]
        for tid in doomed:
            state._forget_task(tid)
            state.deleted_tasks.add(tid)
        return JSONResponse({})


# ---- task filtering (Get Tasks / Get Filtered Team Tasks) -----------------------------------


def _cf_filters(request: Request) -> list[dict[str, Any]]:
    """`custom_fields` (JSON array) and `custom_field` (one object) filters.

    https://developer.clickup.com/docs/taskfilters
    """
    out: list[dict[str, Any]] = []
    for name in ("custom_fields", "custom_field"):
        for raw in request.query_params.getlist(name) + request.query_params.getlist(f"{name}[]"):
            try:
                parsed = json.loads(raw)
            except json.JSONDecodeError:
                raise _bad_input("Custom field filter invalid", "FILTER_001") from None  # ours
            items = parsed if isinstance(parsed, list) else [parsed]
            for item in items:
                if (
                    not isinstance(item, dict)
                    or "field_id" not in item
                    or str(item.get("operator", "=")).upper() not in CF_OPERATORS
                ):
                    raise _bad_input("Custom field filter invalid", "FILTER_001")  # ours
                out.append(item)
    return out


def _cf_compare(field: dict[str, Any] | None, stored: Any, op: str, value: Any) -> bool:
    if op == "IS NULL":
        return stored is None
    if op == "IS NOT NULL":
        return stored is not None
    if stored is None:
        return op in ("!=", "!==", "NOT ANY", "NOT ALL")
    ftype = field["type"] if field else "short_text"
    if ftype == "drop_down":
        # Filters name a drop_down option by its UUID (or its orderindex).
        opts = field["type_config"].get("options", []) if field else []
        order = next((o["orderindex"] for o in opts if o["id"] == stored), None)
        wanted = value if isinstance(value, list) else [value]
        hit = any(w == stored or _as_int(w) == order for w in wanted)
        if op in ("=", "==", "ANY", "ALL"):
            return hit
        return not hit
    if ftype in ("number", "currency", "date"):
        num = float(stored)
        if op == "RANGE":
            if isinstance(value, dict):
                low, high = value.get("low_value"), value.get("high_value")
            elif isinstance(value, list) and len(value) == 2:
                low, high = value
            else:
                return False
            lo, hi = _as_number(low), _as_number(high)
            return lo is not None and hi is not None and lo <= num <= hi
        target = _as_number(value)
        if target is None:
            return False
        return {
            "=": num == target,
            "==": num == target,
            "<": num < target,
            "<=": num <= target,
            ">": num > target,
            ">=": num >= target,
            "!=": num != target,
            "!==": num != target,
        }.get(op, False)
    text, wanted_text = str(stored), str(value)
    # "=" is a fuzzy contains, "==" an exact match (https://developer.clickup.com/docs/taskfilters).
    if op == "=":
        return wanted_text.lower() in text.lower()
    if op == "==":
        return text == wanted_text
    if op == "!=":
        return wanted_text.lower() not in text.lower()
    if op == "!==":
        return text != wanted_text
    return False


def _task_filter(request: Request, state: ClickUpState) -> Callable[[dict[str, Any]], bool]:
    include_closed = bool(_bool_param(request, "include_closed"))
    archived = bool(_bool_param(request, "archived"))
    subtasks = bool(_bool_param(request, "subtasks"))
    parent = request.query_params.get("parent")
    statuses = {s.strip().lower() for s in _multi(request, "statuses")}
    assignees = {_as_int(a) for a in _multi(request, "assignees")}
    items: set[int] = set()
    for raw in _multi(request, "custom_items"):
        item = _as_int(raw)
        if item is None:
            raise _bad_input("custom_items invalid", "INPUT_002")  # ours
        items.add(item)
    bounds = []
    for key, attr in (
        ("due_date", "due_date"),
        ("date_created", "date_created"),
        ("date_updated", "date_updated"),
        ("date_done", "date_done"),
    ):
        gt, lt = _int_query(request, f"{key}_gt"), _int_query(request, f"{key}_lt")
        if gt is not None or lt is not None:
            bounds.append((attr, gt, lt))
    cf = _cf_filters(request)

    def keep(t: dict[str, Any]) -> bool:
        if t["archived"] != archived:
            return False
        # https://developer.clickup.com/reference/gettasks - "Include or exclude closed tasks.
        # By default, they are excluded." (a "done" status is not closed).
        if not include_closed and t["status"]["type"] == "closed":
            return False
        if parent is not None:
            if t["parent"] != parent:
                return False
        elif t["parent"] is not None and not subtasks:
            return False
        if statuses and t["status"]["status"].lower() not in statuses:
            return False
        if assignees and not assignees & set(t["assignees"]):
            return False
        if items and t["custom_item_id"] not in items:
            return False
        for attr, gt, lt in bounds:
            v = t[attr]
            if v is None or (gt is not None and not v > gt) or (lt is not None and not v < lt):
                return False
        for f in cf:
            field = state.fields.get(str(f["field_id"]))
            op = str(f.get("operator", "=")).upper()
            if not _cf_compare(field, t["fields"].get(str(f["field_id"])), op, f.get("value")):
                return False
        return True

    return keep


def _ordered_page(
    request: Request, state: ClickUpState, tasks: list[dict[str, Any]]
) -> tuple[list[dict[str, Any]], bool]:
    order_by = request.query_params.get("order_by") or "created"
    keys = {
        "id": "id",
        "created": "date_created",
        "updated": "date_updated",
        "due_date": "due_date",
    }
    if order_by not in keys:
        raise _bad_input("order_by invalid", "INPUT_006")  # ours
    attr = keys[order_by]
    # Newest (or latest due) first; `reverse=true` flips it. Tasks without the value go last.
    with_value = [t for t in tasks if t[attr] is not None]
    without = [t for t in tasks if t[attr] is None]
    with_value.sort(key=lambda t: (t[attr], t["id"]), reverse=True)
    without.sort(key=lambda t: t["id"], reverse=True)
    ordered = with_value + without
    if _bool_param(request, "reverse"):
        ordered = with_value[::-1] + without
    page = _int_query(request, "page") or 0
    if page < 0:
        raise _bad_input("page invalid", "INPUT_007")  # ours
    chunk = ordered[page * PAGE_SIZE : (page + 1) * PAGE_SIZE]
    last = (page + 1) * PAGE_SIZE >= len(ordered)
    return chunk, last


# https://developer.clickup.com/reference/gettasks - 100 tasks a page, `page` from 0, and
# {"tasks": [...], "last_page": bool}. Only tasks whose home List is `list_id`.
async def get_tasks(request: Request, state: ClickUpState) -> Response:
    with state.lock:
        state._materialize()
        lst = _get_list(state, request.path_params["list_id"])
        keep = _task_filter(request, state)
        matched = [t for t in state.tasks_by_list.get(lst["id"], {}).values() if keep(t)]
        chunk, last = _ordered_page(request, state, matched)
        return JSONResponse({"tasks": [state._render_task(t) for t in chunk], "last_page": last})


# https://developer.clickup.com/reference/getfilteredteamtasks - same filters plus
# `list_ids[]`, `space_ids[]` and `project_ids[]` (Folders). The documented response holds only
# `tasks` (no `last_page`): page until a page comes back short.
async def get_team_tasks(request: Request, state: ClickUpState) -> Response:
    with state.lock:
        state._materialize()
        team = _team(state, request.path_params["team_id"])
        keep = _task_filter(request, state)
        list_ids = set(_multi(request, "list_ids"))
        space_ids = set(_multi(request, "space_ids"))
        folder_ids = set(_multi(request, "project_ids"))
        # The cheap bound first: a change feed read (`date_updated_gt`) then costs a comparison
        # per task, not every filter (the filter below still applies it).
        updated_gt = _int_query(request, "date_updated_gt")

        def wanted(t: dict[str, Any]) -> bool:
            return (
                (updated_gt is None or (t["date_updated"] or 0) > updated_gt)
                and t["team_id"] == team["id"]
                and (not list_ids or t["list_id"] in list_ids)
                and (not space_ids or t["space_id"] in space_ids)
                and (not folder_ids or t["folder_id"] in folder_ids)
                and keep(t)
            )

        chunk = _oldest_updated_page(request, state, wanted, updated_gt)
        if chunk is None:
            candidates: Iterable[dict[str, Any]] = state.tasks.values()
            if updated_gt is not None:
                order = state.updated_order()
                start = bisect.bisect_right(order, (updated_gt, "\uffff"))
                candidates = (state.tasks[tid] for _, tid in order[start:] if tid in state.tasks)
            matched = [t for t in candidates if wanted(t)]
            chunk, _ = _ordered_page(request, state, matched)
        return JSONResponse({"tasks": [state._render_task(t) for t in chunk]})


def _oldest_updated_page(
    request: Request,
    state: ClickUpState,
    wanted: Callable[[dict[str, Any]], bool],
    updated_gt: int | None,
) -> list[dict[str, Any]] | None:
    """The page `_ordered_page` cuts for `order_by=updated&reverse=true` (oldest first, the
    change feed's order), found by walking `updated_order()` from the `date_updated_gt` bound
    and stopping once the page is complete - instead of matching every task after the bound
    and sorting them all for 100 (a 10,000-deal back flow reads ~400 such pages over
    ~100,000 tasks).

    None whenever the walk cannot be sure to give the full path's answer; the full path then
    runs (and answers any error it raises)."""
    q = request.query_params
    if q.get("order_by") != "updated" or not _bool_param(request, "reverse"):
        return None
    if _cf_filters(request):
        # A Custom Field comparison may fail on a task the walk never reaches.
        return None
    raw = q.get("page")
    page = 0 if raw is None or raw == "" else _as_int(raw)
    if page is None or page < 0:
        return None  # the full path's 400
    order = state.updated_order()
    if len(order) != len(state.tasks):
        return None  # not one entry per task: not an order to trust
    need = (page + 1) * PAGE_SIZE
    start = 0 if updated_gt is None else bisect.bisect_right(order, (updated_gt, "\uffff"))
    hits: list[dict[str, Any]] = []
    for i in range(start, len(order)):
        key, tid = order[i]
        t = state.tasks.get(tid)
        if t is None or (t["date_updated"] or 0) != key:
            # The order does not match the tasks (changed without `_set_updated`): re-sort.
            state._updated_order = None
            return None
        if t["date_updated"] is None:
            # The full path puts tasks without the value after all others (a None is keyed
            # 0 here): skipped, and accounted for below.
            continue
        if wanted(t):
            hits.append(t)
            if len(hits) == need:
                return hits[page * PAGE_SIZE :]
    # Every match with a date_updated is in `hits`, oldest first, and the page reaches past
    # them. With `date_updated_gt` no task without a date_updated matches (`_task_filter`
    # drops it), so the page is what is left; without, the full path appends those.
    if updated_gt is not None:
        return hits[page * PAGE_SIZE :]
    return None


# --------------------------------------------------------------------------------------------
# Endpoints: comments
# --------------------------------------------------------------------------------------------


def _new_comment(
    state: ClickUpState, body: dict[str, Any], parent_type: str, parent_id: str
) -> Response:
    text = body.get("comment_text")
    if not isinstance(text, str) or not text.strip():
        raise _bad_input("Comment text invalid", "INPUT_019")  # ours
    assignee = body.get("assignee")
    if assignee is not None and _as_int(assignee) not in state.users:
        raise _bad_input("Assignee invalid", "INPUT_013")  # ours
    cid = str(90_000_000_000 + len(state.comments) * 7 + state._rng.randint(1, 6))
    now = state.now_ms()
    hist = state._uuid()
    state.comments[cid] = {
        "id": cid,
        "parent_type": parent_type,
        "parent_id": parent_id,
        "text": text,
        "user": state.user_id,
        "assignee": _as_int(assignee),
        "date": now,
    }
    # https://developer.clickup.com/reference/createtaskcomment - {"id", "hist_id", "date"}
    # with `date` as a number (unlike task timestamps).
    return JSONResponse({"id": cid, "hist_id": hist, "date": now})


# https://developer.clickup.com/reference/createtaskcomment
async def create_task_comment(request: Request, state: ClickUpState) -> Response:
    body = await _json_body(request)
    with state.lock:
        task = _get_task(state, request.path_params["task_id"])
        return _new_comment(state, body, "task", task["id"])


# https://developer.clickup.com/reference/createlistcomment
async def create_list_comment(request: Request, state: ClickUpState) -> Response:
    body = await _json_body(request)
    with state.lock:
        lst = _get_list(state, request.path_params["list_id"])
        return _new_comment(state, body, "list", lst["id"])


def _render_comments(state: ClickUpState, parent_type: str, parent_id: str) -> Response:
    # https://developer.clickup.com/reference/gettaskcomments - newest first; `date` a string.
    rows = [
        c
        for c in state.comments.values()
        if c["parent_type"] == parent_type and c["parent_id"] == parent_id
    ]
    rows.sort(key=lambda c: (c["date"], c["id"]), reverse=True)
    return JSONResponse(
        {
            "comments": [
                {
                    "id": c["id"],
                    "comment": [{"text": c["text"]}],
                    "comment_text": c["text"],
                    "user": state._user(c["user"]),
                    "resolved": False,
                    "assignee": state._user(c["assignee"]),
                    "assigned_by": state._user(c["user"]) if c["assignee"] else None,
                    "reactions": [],
                    "date": _ms_str(c["date"]),
                    "reply_count": "0",
                }
                for c in rows
            ]
        }
    )


# https://developer.clickup.com/reference/gettaskcomments
async def get_task_comments(request: Request, state: ClickUpState) -> Response:
    with state.lock:
        task = _get_task(state, request.path_params["task_id"])
        return _render_comments(state, "task", task["id"])


# https://developer.clickup.com/reference/getlistcomments
async def get_list_comments(request: Request, state: ClickUpState) -> Response:
    with state.lock:
        lst = _get_list(state, request.path_params["list_id"])
        return _render_comments(state, "list", lst["id"])


# --------------------------------------------------------------------------------------------
# App
# --------------------------------------------------------------------------------------------

P = "/api/v2"
_ROUTE_TABLE: list[tuple[str, list[str], Handler]] = [
    (f"{P}/team", ["GET"], get_teams),
    (f"{P}/team/{{team_id}}/space", ["GET"], get_spaces),
    (f"{P}/team/{{team_id}}/list_template", ["GET"], get_list_templates),
    (f"{P}/team/{{team_id}}/custom_item", ["GET"], get_custom_items),
    (f"{P}/team/{{team_id}}/field", ["GET"], get_team_fields),
    (f"{P}/team/{{team_id}}/task", ["GET"], get_team_tasks),
    (f"{P}/space/{{space_id}}", ["GET"], get_space),
    (f"{P}/space/{{space_id}}/folder", ["GET"], get_folders),
    (f"{P}/space/{{space_id}}/list", ["GET"], get_folderless_lists),
    (f"{P}/space/{{space_id}}/list", ["POST"], create_folderless_list),
    (f"{P}/space/{{space_id}}/field", ["GET"], get_space_fields),
    (
        f"{P}/space/{{space_id}}/list_template/{{template_id}}",
        ["POST"],
        space_list_from_template,
    ),
    (f"{P}/folder/{{folder_id}}", ["GET"], get_folder),
    (f"{P}/folder/{{folder_id}}/list", ["GET"], get_folder_lists),
    (f"{P}/folder/{{folder_id}}/list", ["POST"], create_folder_list),
    (f"{P}/folder/{{folder_id}}/field", ["GET"], get_folder_fields),
    (
        f"{P}/folder/{{folder_id}}/list_template/{{template_id}}",
        ["POST"],
        folder_list_from_template,
    ),
    (f"{P}/list/{{list_id}}", ["GET"], get_list),
    (f"{P}/list/{{list_id}}", ["PUT"], update_list),
    (f"{P}/list/{{list_id}}", ["DELETE"], delete_list),
    (f"{P}/list/{{list_id}}/field", ["GET"], get_list_fields),
    (f"{P}/list/{{list_id}}/task", ["GET"], get_tasks),
    (f"{P}/list/{{list_id}}/task", ["POST"], create_task),
    (f"{P}/list/{{list_id}}/comment", ["GET"], get_list_comments),
    (f"{P}/list/{{list_id}}/comment", ["POST"], create_list_comment),
    (f"{P}/task/{{task_id}}", ["GET"], get_task),
    (f"{P}/task/{{task_id}}", ["PUT"], update_task),
    (f"{P}/task/{{task_id}}", ["DELETE"], delete_task),
    (f"{P}/task/{{task_id}}/comment", ["GET"], get_task_comments),
    (f"{P}/task/{{task_id}}/comment", ["POST"], create_task_comment),
    (f"{P}/task/{{task_id}}/field/{{field_id}}", ["POST"], set_field_value),
    (f"{P}/task/{{task_id}}/field/{{field_id}}", ["DELETE"], remove_field_value),
]


async def _unused(request: Request) -> Response:  # pragma: no cover - routing table only
    return Response(status_code=500)


# Route templates, used by ClickUpFlavor.route_name (one stable name per endpoint).
ROUTES: list[Route] = [Route(p, _unused, methods=m) for p, m, _ in _ROUTE_TABLE]


def create_app(state: ClickUpState, controls: EmulatorControls | None = None) -> ASGIApp:
    """The emulator as an ASGI app under /api/v2, wrapped in the shared middleware."""
    controls = controls or EmulatorControls()
    state.controls = controls
    controls.clock = lambda: datetime.fromtimestamp(state.now_ms() / 1000, UTC)
    routes = [Route(p, _endpoint(state, h), methods=m) for p, m, h in _ROUTE_TABLE]

    async def not_found(request: Request, exc: Exception) -> Response:
        # ClickUp's unknown-route answer (seen on the wire): 404 "Route not found", APP_001.
        return ApiError(404, "Route not found", "APP_001").response()

    async def method_not_allowed(request: Request, exc: Exception) -> Response:
        return ApiError(404, "Route not found", "APP_001").response()

    starlette_app = Starlette(
        routes=routes, exception_handlers={404: not_found, 405: method_not_allowed}
    )
    return EmulatorMiddleware(starlette_app, controls, ClickUpFlavor(controls, state))
