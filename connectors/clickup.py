"""ClickUp (API v2) through httpx: a won deal becomes a List - from a List template or plain, with
its milestones as tasks of the Milestone custom task type - stamped so it can be found again.

The stamp. ClickUp Custom Fields live on tasks, never on Lists, and there is no List search by
anything but name. So every List we create gets one *deal record* task: a plain task (custom
item 0) in the List's closed status, holding the stamp (`handoff:<crm>:<deal id>`) in the
short_text field `stamp_field` plus the deal's own Custom Fields (amount, tier...). Milestones
of plain Lists carry the stamp too (inline in their create call, so for free), as a spare.
`find_project` is then one call: Get Filtered Team Tasks with a `custom_fields` filter
`stamp == marker` (https://developer.clickup.com/docs/taskfilters), which answers the task and
its home List. That costs one task create per project, survives renames and moves, and needs
no scan of the Space; the List's `content` would need one (no filter on it) and belongs to the
people using the List.

Creates are crash-safe in the engine's claim-and-stamp way: the stamp is the second call (after
the List), a failure once the List exists carries it (`exc.project`), and a create that may have
been applied (5xx, timeout) is sent again only after a read shows it was not (`_post_verified`;
List names are unique in a Folder, which makes the List itself easy to look for).

Milestone changes are read workspace-wide, oldest first, with keyset paging on `date_updated`
(see `read_milestone_changes`), so reads are proportional to what changed.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any, Literal
from zoneinfo import ZoneInfo

import httpx
from pydantic import BaseModel, ConfigDict, Field, field_validator

from connectors.base import DealStamp, Milestone, ProjectRef, ProjectSpec, ProjectTool
from connectors.errors import ConnectorError, ErrorKind
from connectors.http import BudgetFactory, JsonApi, RateBudget, RetryPolicy, local_budget
from connectors.secrets import register_secret

# https://developer.clickup.com/reference/gettasks - "Responses are limited to 100 tasks per page."
PAGE = 100
PLAIN_TASK = (
    0  # custom_item_id of an ordinary task (https://developer.clickup.com/reference/gettasks)
)
# https://developer.clickup.com/reference/getaccessiblecustomfields - applied_objects entries with
# object_type 19 name the custom task types a field is limited to.
APPLIED_TASK_TYPE = 19
# https://developer.clickup.com/docs/rate-limits - limits are counted per minute.
RATE_WINDOW_SECONDS = 60.0
# https://developer.clickup.com/reference/createtask - priority 1 urgent .. 4 low.
PRIORITIES = {"urgent": 1, "high": 2, "normal": 3, "low": 4}
APP_URL = "https://app.clickup.com"


class ClickUpAuth(BaseModel):
    model_config = ConfigDict(extra="forbid")
    token: str = Field(
        description="personal token (pk_..., sent as is) or OAuth access token (sent as Bearer)"
    )


class ClickUpSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["clickup"]
    base_url: str = "https://api.clickup.com/api/v2"
    auth: ClickUpAuth
    team: str = Field(description="Workspace (API: team) name or id")
    space: str = Field(description="Space (name or id) that holds created Lists")
    folder: str | None = Field(
        None, description="Folder (name or id) for created Lists; folderless in the Space if unset"
    )
    stamp_field: str = Field("Handoff deal", description="short_text Custom Field for the stamp")
    milestone_type: str = Field(
        "Milestone", description="custom task type (name or id) of milestone tasks"
    )
    record_task_name: str = Field(
        "Deal record (Handoff)", description="name of the task that carries the deal stamp"
    )
    timezone: str = Field(
        "UTC", description="Workspace time zone: date-only values are written at noon there"
    )
    retry: RetryPolicy = Field(default_factory=RetryPolicy)
    # https://developer.clickup.com/docs/rate-limits: per token, 100/min on Free Forever,
    # Unlimited and Business; 1,000 on Business Plus; 10,000 on Enterprise.
    requests_per_minute: int = Field(100, ge=1)

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        ZoneInfo(value)  # raises for an unknown zone
        return value


class ClickUpHttp:
    """ClickUp's error bodies (`{err, ECODE}`) and rate-limit headers.

    https://developer.clickup.com/docs/rate-limits: every response says X-RateLimit-Limit,
    -Remaining and -Reset (a Unix time in seconds); a 429 sends no Retry-After.
    """

    def __init__(self, system: str, max_wait: float = RATE_WINDOW_SECONDS) -> None:
        self.system = system
        # Never wait longer than one window (a later reset means clock skew) nor the policy's cap.
        self.max_wait = min(max_wait, RATE_WINDOW_SECONDS + 1)

    def error_message(self, response: httpx.Response) -> str:
        # https://developer.clickup.com/docs/common_errors - {"err": "...", "ECODE": "..."}
        try:
            body = response.json()
        except ValueError:
            return response.reason_phrase
        if not isinstance(body, dict) or not body.get("err"):
            return response.reason_phrase
        code = body.get("ECODE")
        return f"{body['err']} ({code})" if code else str(body["err"])

    @staticmethod
    def _header_number(response: httpx.Response, name: str) -> float | None:
        try:
            return float(response.headers[name])
        except (KeyError, ValueError):
            return None

    def _until_reset(self, response: httpx.Response) -> float | None:
        reset = self._header_number(response, "X-RateLimit-Reset")
        if reset is None:
            return None
        return min(max(0.0, reset - time.time()), self.max_wait)

    def retry_after(self, response: httpx.Response) -> float | None:
        if response.status_code != 429:
            return None
        return self._until_reset(response)

    def observe(self, response: httpx.Response, budget: RateBudget) -> None:
        # Every answer (a 429's too) reports the token's fixed window: the budget spends what
        # it says is left and waits for the reset, instead of pacing by its own sliding log
        # (which would carry every stall of one minute into the next) or collecting 429s.
        left = self._header_number(response, "X-RateLimit-Remaining")
        reset_at = self._header_number(response, "X-RateLimit-Reset")
        if left is None or reset_at is None:
            return
        limit = self._header_number(response, "X-RateLimit-Limit")
        if limit is not None and left >= limit:
            return  # this request was not counted (no limit applied): nothing to pace by
        # A reset further off than one window is clock skew: let the documented rate pace.
        if reset_at - time.time() <= self.max_wait:
            budget.server_window(int(left), reset_at)


class ClickUpProjects(ProjectTool):
    kind = "clickup"

    def __init__(
        self,
        name: str,
        settings: ClickUpSettings,
        transport: httpx.BaseTransport | None = None,
        *,
        budgets: BudgetFactory | None = None,
    ) -> None:
        super().__init__()
        self.name = name
        self.settings = settings
        self.calls = Counter()
        token = settings.auth.token.strip()
        register_secret(token)
        # https://developer.clickup.com/docs/authentication - a personal token goes in the
        # Authorization header as is; "Bearer" is for OAuth access tokens only.
        auth = token if token.startswith("pk_") else f"Bearer {token}"
        client = httpx.Client(
            base_url=settings.base_url.rstrip("/"),
            headers={"Authorization": auth, "Accept": "application/json"},
            timeout=settings.retry.timeout,
            transport=transport,
        )
        self.api = JsonApi(
            ClickUpHttp(name, settings.retry.max_retry_after),
            client,
            settings.retry,
            (budgets or local_budget)(
                "requests", [(settings.requests_per_minute, RATE_WINDOW_SECONDS)]
            ),
            self.calls,
        )
        self.zone = ZoneInfo(settings.timezone)
        self._team: dict[str, Any] | None = None
        self._space: str | None = None
        self._folder: str | None = None
        self._folder_resolved = False
        self._milestone_type: int | None = None
        self._templates: dict[str, str] | None = None
        self._fields: dict[str, dict[str, Any]] | None = None
        self._records: dict[str, list[str]] = {}  # list id -> deal record task ids
        # stamp -> List, read once (all stamped tasks of the Workspace) when a first run
        # looks for a project before every create; our own creates are added as they happen.
        self._stamp_index: dict[str, ProjectRef] | None = None
        # List names (casefolded) this instance made or saw refused as taken in the Folder.
        self._taken_names: set[str] = set()

    def close(self) -> None:
        self.api.client.close()

    # -- requests ------------------------------------------------------------------------------
    def _call(
        self,
        method: str,
        path: str,
        route: str,
        *,
        params: Mapping[str, Any] | list[tuple[str, Any]] | None = None,
        body: Any = None,
        idempotent: bool | None = None,
    ) -> Any:
        try:
            return self.api.request(
                method, path, route=route, params=params, json=body, idempotent=idempotent
            )
        except ConnectorError as exc:
            # ClickUp answers an id it cannot reach - including one that no longer exists - with
            # 401 "Team not authorized" (OAUTH_027, https://developer.clickup.com/docs/common_errors).
            # On a List or a task that is this record's problem, not bad credentials.
            if (
                exc.status == 401
                and "OAUTH_027" in exc.message
                and path.startswith(("/list/", "/task/"))
            ):
                raise ConnectorError(
                    self.name,
                    ErrorKind.RECORD,
                    f"{route}: not found or not reachable with this token ({exc.message})",
                    status=exc.status,
                ) from None
            raise

    def _list_tasks(self, list_id: str, params: list[tuple[str, Any]]) -> Iterator[dict[str, Any]]:
        # https://developer.clickup.com/reference/gettasks - pages from 0, `last_page` says when.
        page = 0
        while True:
            body = self._call(
                "GET",
                f"/list/{list_id}/task",
                "GET /list/{id}/task",
                params=[*params, ("page", page)],
            )
            yield from body.get("tasks") or []
            if body.get("last_page", len(body.get("tasks") or []) < PAGE):
                return
            page += 1

    # -- lookups (cached per instance) ------------------------------------------------------------
    def _not_found(self, what: str, wanted: str) -> ConnectorError:
        return ConnectorError(
            self.name, ErrorKind.AUTH, f"{what} '{wanted}' not found or not visible to this token"
        )

    @staticmethod
    def _pick(items: list[dict[str, Any]], wanted: str) -> dict[str, Any] | None:
        for item in items:
            if wanted == str(item.get("id")):
                return item
        folded = wanted.casefold()
        return next((i for i in items if str(i.get("name", "")).casefold() == folded), None)

    @property
    def team(self) -> dict[str, Any]:
        if self._team is None:
            # https://developer.clickup.com/reference/getauthorizedteams
            teams = self._call("GET", "/team", "GET /team")["teams"]
            team = self._pick(teams, self.settings.team)
            if team is None:
                raise self._not_found("Workspace", self.settings.team)
            self._team = team
        return self._team

    @property
    def team_id(self) -> str:
        return str(self.team["id"])

    @property
    def space_id(self) -> str:
        if self._space is None:
            # https://developer.clickup.com/reference/getspaces
            spaces = self._call("GET", f"/team/{self.team_id}/space", "GET /team/{id}/space")[
                "spaces"
            ]
            space = self._pick(spaces, self.settings.space)
            if space is None:
                raise self._not_found("Space", self.settings.space)
            self._space = str(space["id"])
        return self._space

    @property
    def folder_id(self) -> str | None:
        if not self._folder_resolved and self.settings.folder:
            # https://developer.clickup.com/reference/getfolders
            folders = self._call("GET", f"/space/{self.space_id}/folder", "GET /space/{id}/folder")[
                "folders"
            ]
            folder = self._pick(folders, self.settings.folder)
            if folder is None:
                raise self._not_found("Folder", self.settings.folder)
            self._folder = str(folder["id"])
        self._folder_resolved = True
        return self._folder

    @property
    def milestone_type(self) -> int:
        if self._milestone_type is None and self.settings.milestone_type.strip().isdigit():
            # Given by id: no look-up (`check` still confirms the type exists).
            self._milestone_type = int(self.settings.milestone_type.strip())
        if self._milestone_type is None:
            # https://developer.clickup.com/reference/getcustomitems
            items = self._call(
                "GET", f"/team/{self.team_id}/custom_item", "GET /team/{id}/custom_item"
            )["custom_items"]
            item = self._pick(items, self.settings.milestone_type)
            if item is None:
                names = ", ".join(str(i.get("name")) for i in items) or "none"
                raise ConnectorError(
                    self.name,
                    ErrorKind.RECORD,
                    f"custom task type '{self.settings.milestone_type}' not found in the "
                    f"Workspace (types: {names})",
                )
            self._milestone_type = int(item["id"])
        return self._milestone_type

    def _template_id(self, wanted: str) -> str:
        if self._templates is None:
            # https://developer.clickup.com/reference/getlisttemplates (ids carry a "t-" prefix)
            found: dict[str, str] = {}
            page = 0
            while True:
                got = (
                    self._call(
                        "GET",
                        f"/team/{self.team_id}/list_template",
                        "GET /team/{id}/list_template",
                        params={"page": page},
                    ).get("templates")
                    or []
                )
                fresh = {t["name"]: str(t["id"]) for t in got if str(t["id"]) not in found.values()}
                found.update(fresh)
                if len(got) < PAGE or not fresh:
                    break
                page += 1
            self._templates = found
        if wanted in self._templates.values():
            return wanted
        folded = {k.casefold(): v for k, v in self._templates.items()}
        if wanted.casefold() not in folded:
            known = ", ".join(sorted(self._templates)) or "none"
            raise ConnectorError(
                self.name,
                ErrorKind.RECORD,
                f"List template '{wanted}' not found in the Workspace (templates: {known})",
            )
        return folded[wanted.casefold()]

    def custom_fields(self) -> dict[str, dict[str, Any]]:
        """Custom Fields usable in created Lists, by name: Workspace, Space and Folder level
        (a more specific level wins a name clash)."""
        if self._fields is None:
            # Each endpoint answers only its own level's fields:
            # https://developer.clickup.com/reference/getteamavailablefields,
            # https://developer.clickup.com/reference/getspaceavailablefields,
            # https://developer.clickup.com/reference/getfolderavailablefields
            scopes = [
                (f"/team/{self.team_id}/field", "GET /team/{id}/field"),
                (f"/space/{self.space_id}/field", "GET /space/{id}/field"),
            ]
            if self.folder_id:
                scopes.append((f"/folder/{self.folder_id}/field", "GET /folder/{id}/field"))
            fields: dict[str, dict[str, Any]] = {}
            for path, route in scopes:
                got = self._call("GET", path, route, params={"include_applied_objects": "true"})[
                    "fields"
                ]
                fields.update({f["name"]: f for f in got})
            self._fields = fields
        return self._fields

    def _field(self, name: str, list_id: str | None = None) -> dict[str, Any]:
        fields = self.custom_fields()
        if name in fields:
            return fields[name]
        if list_id:
            # A List-level field (e.g. one a List template brought along):
            # https://developer.clickup.com/reference/getaccessiblecustomfields
            got = self._call(
                "GET",
                f"/list/{list_id}/field",
                "GET /list/{id}/field",
                params={"include_applied_objects": "true"},
            )["fields"]
            for f in got:
                if f["name"] == name:
                    return f
        raise ConnectorError(
            self.name,
            ErrorKind.RECORD,
            f"Custom Field '{name}' does not exist in the Workspace, Space or Folder; create it "
            f"in ClickUp (or fix its name in the mapping)",
        )

    @staticmethod
    def _task_types(field: dict[str, Any]) -> set[int] | None:
        """The custom task types a field is limited to (None: every type)."""
        types = {
            int(o["object_id"])
            for o in field.get("applied_objects") or []
            if o.get("object_type") == APPLIED_TASK_TYPE
        }
        return types or None

    def _on_record(self, field: dict[str, Any]) -> bool:
        types = self._task_types(field)
        return types is None or PLAIN_TASK in types

    def _on_milestones(self, field: dict[str, Any]) -> bool:
        types = self._task_types(field)
        return types is None or self.milestone_type in types

    def _split_fields(
        self, values: dict[str, Any], list_id: str | None = None
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Custom field values as {field id: API value}, split into those the deal record task
        takes and those only milestone tasks take (fields limited to the Milestone type)."""
        record: dict[str, Any] = {}
        milestones: dict[str, Any] = {}
        for name, value in values.items():
            f = self._field(name, list_id)
            converted = self._field_value(f, value)
            if self._on_record(f):
                record[f["id"]] = converted
            elif self._on_milestones(f):
                milestones[f["id"]] = converted
            else:
                raise ConnectorError(
                    self.name,
                    ErrorKind.RECORD,
                    f"Custom Field '{name}' applies neither to plain tasks nor to the "
                    f"'{self.settings.milestone_type}' task type, so Handoff has no task to set "
                    "it on",
                )
        return record, milestones

    def _field_value(self, field: dict[str, Any], value: Any) -> Any:
        """A mapping value in the shape Set Custom Field Value wants for the field's type.

        https://developer.clickup.com/docs/customfields (value shapes per type)."""
        if value is None or value == "":
            return None
        kind = field.get("type")
        name = field.get("name")
        if kind in ("number", "currency", "emoji"):
            number = _number(value)
            if number is None:
                raise ConnectorError(
                    self.name, ErrorKind.RECORD, f"'{value}' is not a number (field '{name}')"
                )
            return number
        if kind == "drop_down":
            options = field.get("type_config", {}).get("options") or []
            option = self._pick(options, str(value))
            if option is None:
                names = ", ".join(str(o.get("name")) for o in options)
                raise ConnectorError(
                    self.name,
                    ErrorKind.RECORD,
                    f"'{value}' is not an option of Custom Field '{name}' (options: {names})",
                )
            return option["id"]
        if kind == "labels":
            options = field.get("type_config", {}).get("options") or []
            wanted = value if isinstance(value, list | tuple | set) else str(value).split(";")
            ids = []
            for label in wanted:
                label = str(label).strip()
                hit = next(
                    (o for o in options if label in (o.get("id"), o.get("label"), o.get("name"))),
                    None,
                )
                if hit is None:
                    raise ConnectorError(
                        self.name,
                        ErrorKind.RECORD,
                        f"'{label}' is not a label of Custom Field '{name}'",
                    )
                ids.append(hit["id"])
            return ids
        if kind == "checkbox":
            if isinstance(value, str):
                return value.strip().lower() in ("true", "yes", "1", "on")
            return bool(value)
        if kind == "date":
            return self._ms(value)
        if kind in ("short_text", "text", "url", "email", "phone"):
            return str(value)
        return value

    # -- dates ------------------------------------------------------------------------------------
    def _ms(self, value: Any) -> int:
        """Unix ms for a date (noon in the Workspace zone, so every viewer sees that day), a
        datetime, an ISO text or a number already in ms."""
        if isinstance(value, int | float) and not isinstance(value, bool):
            return int(value)
        if isinstance(value, str):
            text = value.strip()
            if text.isdigit():
                return int(text)
            value = (
                date.fromisoformat(text)
                if len(text) == 10
                else datetime.fromisoformat(text.replace("Z", "+00:00"))
            )
        if isinstance(value, datetime):
            if value.tzinfo is None:
                value = value.replace(tzinfo=self.zone)
            return int(value.timestamp() * 1000)
        if isinstance(value, date):
            noon = datetime(value.year, value.month, value.day, 12, tzinfo=self.zone)
            return int(noon.timestamp() * 1000)
        raise ConnectorError(self.name, ErrorKind.RECORD, f"'{value}' is not a date")

    def _date(self, ms: Any) -> date | None:
        return (
            None if ms in (None, "") else datetime.fromtimestamp(int(ms) / 1000, self.zone).date()
        )

    # -- list fields ------------------------------------------------------------------------------
    def _list_fields(self, fields: dict[str, Any]) -> dict[str, Any]:
        """Project-level fields in the Create/Update List body shape.

        https://developer.clickup.com/reference/createlist (content, markdown_content, due_date,
        due_date_time, priority 1..4, assignee, status = the List's color)."""
        out: dict[str, Any] = {}
        for key, value in fields.items():
            if key not in PROJECT_FIELDS:
                continue
            if key == "due_date":
                if value in (None, ""):
                    out["due_date"] = None
                    continue
                out["due_date"] = self._ms(value)
                if "due_date_time" not in fields:
                    out["due_date_time"] = isinstance(value, datetime) or (
                        isinstance(value, str) and len(value.strip()) > 10
                    )
            elif key == "priority":
                out["priority"] = self._priority(value)
            elif key == "assignee":
                out["assignee"] = self._user_id(value)
            elif key == "due_date_time":
                out[key] = bool(value)
            elif key == "status" and value in (None, ""):
                out["unset_status"] = True  # the List's color, cleared
            else:
                out[key] = "" if value is None else str(value)
        return out

    def _priority(self, value: Any) -> int | None:
        if value in (None, ""):
            return None
        text = str(value).strip().lower()
        if text in PRIORITIES:
            return PRIORITIES[text]
        if text.isdigit() and 1 <= int(text) <= 4:
            return int(text)
        raise ConnectorError(
            self.name,
            ErrorKind.RECORD,
            f"priority '{value}' is none of 1-4 or {', '.join(PRIORITIES)}",
        )

    def _user_id(self, value: Any) -> int | str | None:
        if value in (None, ""):
            return "none"  # Update List: "assignee": "none" removes the List owner
        text = str(value).strip()
        if text.isdigit():
            return int(text)
        for member in self.team.get("members") or []:
            user = member.get("user") or {}
            if text.casefold() in (
                str(user.get("email", "")).casefold(),
                str(user.get("username", "")).casefold(),
            ):
                return int(user["id"])
        raise ConnectorError(
            self.name, ErrorKind.RECORD, f"assignee '{value}' is not a member of the Workspace"
        )

    # -- create -----------------------------------------------------------------------------------
    def _container(self) -> tuple[str, str]:
        """Path prefix and route prefix where Lists are created."""
        if self.folder_id:
            return f"/folder/{self.folder_id}", "/folder/{id}"
        return f"/space/{self.space_id}", "/space/{id}"

    def list_url(self, list_id: str) -> str:
        return f"{APP_URL}/{self.team_id}/v/li/{list_id}"

    def _stamp_field(self) -> dict[str, Any]:
        field = self._field(self.settings.stamp_field)
        if field.get("type") not in ("short_text", "text") or not self._on_record(field):
            raise ConnectorError(
                self.name,
                ErrorKind.RECORD,
                f"Custom Field '{self.settings.stamp_field}' must be a short_text field that "
                "applies to plain tasks to hold the deal stamp",
            )
        return field

    def create_project(self, spec: ProjectSpec, stamp: DealStamp) -> ProjectRef:
        stamp_field = self._stamp_field()
        list_fields = self._list_fields(spec.fields)
        # Refuse a bad value before anything exists; a field unknown here may be a List-level
        # one the template brings along, looked up once the List exists.
        deferred = False
        try:
            record_values, milestone_values = self._split_fields(spec.custom_fields)
        except ConnectorError:
            if not spec.template:
                raise
            deferred, record_values, milestone_values = True, {}, {}
        lst, ours = self._new_list(spec, stamp, list_fields)
        list_id = str(lst["id"])
        ref = ProjectRef(list_id, lst["name"], self.list_url(list_id))
        index = self._stamp_index  # read once: creates run on several threads
        if index is not None:
            index[stamp.marker] = ref
        if ours:
            return ref  # already this deal's (name taken by our own List)
        # From here the List exists: any failure carries it, so the engine links it rather
        # than releasing the claim (which would let a retry create a second one).
        try:
            if deferred:
                record_values, milestone_values = self._split_fields(spec.custom_fields, list_id)
            # The stamp first: from here on the List can be found by stamp.
            self._create_record(lst, stamp, record_values)
            if spec.template:
                rest = {k: v for k, v in list_fields.items() if k != "content"}
                if rest:
                    # https://developer.clickup.com/reference/updatelist (`name` is required)
                    self._call(
                        "PUT", f"/list/{list_id}", "PUT /list/{id}", body={"name": ref.name, **rest}
                    )
                if milestone_values:
                    self._set_on_milestones(list_id, milestone_values)
            else:
                self._add_milestones(list_id, spec, stamp, stamp_field, milestone_values)
        except ConnectorError as exc:
            exc.project = ref  # type: ignore[attr-defined]
            raise
        return ref

    def _new_list(
        self, spec: ProjectSpec, stamp: DealStamp, list_fields: dict[str, Any]
    ) -> tuple[dict[str, Any], bool]:
        """Create the List, as `spec.name` or, when another deal's List has that name (List
        names are unique in a Folder), as `spec.name (deal id)`. Returns (List, already ours).

        After a 5xx or a timeout the create may have been applied: it is retried only once no
        List of that name exists (the same name rule `find_project(stamp, name)` adopts by)."""
        path, route = self._container()
        template = self._template_id(spec.template) if spec.template else None
        names = [spec.name, f"{spec.name} ({stamp.deal_id})"]
        for name in names:
            key = name.strip().casefold()
            if key in self._taken_names and self._stamp_index is not None and name != names[-1]:
                # Seen taken already in this run (a refused create counts against the rate
                # limit): ours if the first run's index says so, else go to the next name.
                ours = self._stamp_index.get(stamp.marker)
                if ours is not None and ours.name.strip().casefold() == key:
                    return {"id": ours.id, "name": ours.name}, True
                continue

            def already(name: str = name) -> dict[str, Any] | None:
                # After a 5xx or a timeout: an unstamped List of this name is the lost attempt.
                lst = self._list_named(name)
                return lst if lst and not self._list_stamps(str(lst["id"])) else None

            try:
                if template:
                    # https://developer.clickup.com/reference/createfolderlistfromtemplate -
                    # "runs synchronously by default with return_immediately=true ... the List
                    # may not be created when the response is sent": ask for the synchronous
                    # kind, which "guarantees that all sub objects are created".
                    options: dict[str, Any] = {"return_immediately": False}
                    if list_fields.get("content"):
                        options["content"] = list_fields["content"]
                    got = self._post_verified(
                        f"{path}/list_template/{template}",
                        f"POST {route}/list_template/{{id}}",
                        {"name": name, "options": options},
                        already,
                    )
                    lst = got.get("list") or got  # the answer is {"id", "list"}
                    lst.setdefault("id", got.get("id"))
                    lst.setdefault("name", name)
                    self._taken_names.add(key)
                    return lst, False
                # https://developer.clickup.com/reference/createlist,
                # https://developer.clickup.com/reference/createfolderlesslist
                body = {"name": name, **list_fields}
                made = self._post_verified(f"{path}/list", f"POST {route}/list", body, already)
                self._taken_names.add(key)
                return made, False
            except ConnectorError as exc:
                if exc.status != 400 or "SUBCAT_016" not in exc.message:
                    raise
            self._taken_names.add(key)
            # "List name taken" (SUBCAT_016). Ours already (the List of that name carries our
            # stamp): done. Anyone else's - another deal's project, or a List someone made by
            # hand - is left alone. Asked by stamp, not by listing the Folder's Lists: one
            # query (none on a first run's index) whatever the Folder holds.
            ours = self._stamped_list(stamp)
            if ours is not None and ours.name.strip().casefold() == name.strip().casefold():
                return {"id": ours.id, "name": ours.name}, True
        raise ConnectorError(
            self.name,
            ErrorKind.RECORD,
            f"List names {' and '.join(repr(n) for n in names)} are both taken in the "
            "Folder/Space; rename one or map a more specific project name",
        )

    def _stamped_list(self, stamp: DealStamp) -> ProjectRef | None:
        """The List carrying this stamp, from the first run's index or one query."""
        if self._stamp_index is not None:
            return self._stamp_index.get(stamp.marker)
        tasks = self._stamped_tasks(stamp, archived=False)
        tasks.sort(key=lambda t: t.get("custom_item_id") != PLAIN_TASK)
        home = tasks[0]["list"] if tasks else None
        if not home:
            return None
        return ProjectRef(str(home["id"]), home.get("name", ""), self.list_url(str(home["id"])))

    def _list_named(self, name: str) -> dict[str, Any] | None:
        path, route = self._container()
        for archived in ("false", "true"):
            # https://developer.clickup.com/reference/getlists,
            # https://developer.clickup.com/reference/getfolderlesslists
            lists = self._call(
                "GET", f"{path}/list", f"GET {route}/list", params={"archived": archived}
            )["lists"]
            wanted = name.strip().casefold()
            hit = next((x for x in lists if str(x["name"]).strip().casefold() == wanted), None)
            if hit is not None:
                return hit
        return None

    def _stamp_filter(self, operator: str, value: str | None = None) -> str:
        # https://developer.clickup.com/docs/taskfilters - "==" is the exact match ("=" is a
        # fuzzy contains: deal 12 would match deal 123).
        stamp_id = self._stamp_field()["id"]
        return json.dumps([{"field_id": stamp_id, "operator": operator, "value": value}])

    def _stamp_of(self, task: dict[str, Any]) -> str | None:
        stamp_id = self._stamp_field()["id"]
        return next(
            (
                cf.get("value")
                for cf in task.get("custom_fields") or []
                if cf.get("id") == stamp_id and cf.get("value")
            ),
            None,
        )

    def _list_stamps(self, list_id: str) -> set[str]:
        """Every stamp on the List's tasks (the deal record's, and milestones' spares)."""
        tasks = self._list_tasks(
            list_id,
            [
                ("custom_fields", self._stamp_filter("IS NOT NULL")),
                ("include_closed", "true"),
                ("subtasks", "true"),
            ],
        )
        return {s for s in (self._stamp_of(t) for t in tasks) if s}

    def _post_task(
        self, list_id: str, body: dict[str, Any], already: Callable[[], dict[str, Any] | None]
    ) -> dict[str, Any]:
        """Create Task (https://developer.clickup.com/reference/createtask), retried after a
        5xx or a timeout only once `already()` says the lost attempt made nothing."""
        return self._post_verified(f"/list/{list_id}/task", "POST /list/{id}/task", body, already)

    def _post_verified(
        self,
        path: str,
        route: str,
        body: dict[str, Any],
        already: Callable[[], dict[str, Any] | None],
    ) -> dict[str, Any]:
        """A create the shared layer will not repeat blindly (it may have been applied): after
        a 5xx or a timeout, `already()` looks for what the lost attempt made; only when it
        finds nothing is the request sent again."""
        policy = self.settings.retry
        for attempt in range(1, policy.attempts + 1):
            try:
                return self._call("POST", path, route, body=body)
            except ConnectorError as exc:
                if exc.kind is not ErrorKind.TRANSIENT or attempt == policy.attempts:
                    raise
                time.sleep(
                    random.uniform(0, min(policy.max_wait, policy.initial_wait * 2**attempt))
                )
                made = already()
                if made is not None:
                    return made
        raise AssertionError("unreachable")

    def _create_record(self, lst: dict[str, Any], stamp: DealStamp, values: dict[str, Any]) -> None:
        """The deal record task: the stamp, and the deal's fields that apply to plain tasks."""
        list_id = str(lst["id"])
        body: dict[str, Any] = {
            "name": self.settings.record_task_name,
            "description": (
                f"Created by Handoff for CRM deal {stamp.deal_id} ({stamp.marker}). It holds the "
                "deal's fields and links this List to the deal: keep it."
            ),
            "custom_fields": [
                {"id": self._stamp_field()["id"], "value": stamp.marker},
                *({"id": k, "value": v} for k, v in values.items() if v is not None),
            ],
        }
        # In the List's closed status, so it is no open work (our task reads include it).
        closed = next(
            (s["status"] for s in lst.get("statuses") or [] if s.get("type") == "closed"), None
        )
        if closed:
            body["status"] = closed

        def already() -> dict[str, Any] | None:
            return next(
                (t for t in self._stamped_in_list(list_id, stamp) if t.get("custom_item_id") == 0),
                None,
            )

        task = self._post_task(list_id, body, already)
        self._records[list_id] = [str(task["id"])]

    def _stamped_in_list(self, list_id: str, stamp: DealStamp) -> list[dict[str, Any]]:
        return list(
            self._list_tasks(
                list_id,
                [
                    ("custom_fields", self._stamp_filter("==", stamp.marker)),
                    ("include_closed", "true"),
                    ("subtasks", "true"),
                ],
            )
        )

    def _add_milestones(
        self,
        list_id: str,
        spec: ProjectSpec,
        stamp: DealStamp,
        stamp_field: dict[str, Any],
        values: dict[str, Any],
    ) -> None:
        # ClickUp Lists have no sections: `spec.sections` / `MilestoneSpec.section` are ignored.
        inline = [{"id": k, "value": v} for k, v in values.items() if v is not None]
        if self._on_milestones(stamp_field):
            inline.append({"id": stamp_field["id"], "value": stamp.marker})
        made: set[str] = set()
        for m in spec.milestones:
            task: dict[str, Any] = {"name": m.name, "custom_item_id": self.milestone_type}
            if m.due_on:
                task["due_date"] = self._ms(m.due_on)
                task["due_date_time"] = False
            if inline:
                task["custom_fields"] = inline

            def already(name: str = m.name) -> dict[str, Any] | None:
                return next(
                    (
                        t
                        for t in self._list_tasks(list_id, self._milestone_params())
                        if t.get("name") == name and str(t["id"]) not in made
                    ),
                    None,
                )

            made.add(str(self._post_task(list_id, task, already)["id"]))

    def _milestone_params(self) -> list[tuple[str, Any]]:
        return [
            ("custom_items[]", self.milestone_type),
            ("include_closed", "true"),
            ("subtasks", "true"),
        ]

    def _set_on_milestones(self, list_id: str, values: dict[str, Any]) -> None:
        for task in list(self._list_tasks(list_id, self._milestone_params())):
            self._set_fields(str(task["id"]), values)

    def _set_fields(self, task_id: str, values: dict[str, Any]) -> None:
        for field_id, value in values.items():
            if value is None:
                # https://developer.clickup.com/reference/removecustomfieldvalue
                self._call(
                    "DELETE", f"/task/{task_id}/field/{field_id}", "DELETE /task/{id}/field/{id}"
                )
            else:
                # https://developer.clickup.com/reference/setcustomfieldvalue - one field a call
                # (Update Task does not take Custom Fields); setting a value twice is harmless.
                self._call(
                    "POST",
                    f"/task/{task_id}/field/{field_id}",
                    "POST /task/{id}/field/{id}",
                    body={"value": value},
                    idempotent=True,
                )

    # -- find / update ----------------------------------------------------------------------------
    def _stamped_tasks(self, stamp: DealStamp, *, archived: bool) -> list[dict[str, Any]]:
        # https://developer.clickup.com/reference/getfilteredteamtasks, filtered by Custom Field
        # (https://developer.clickup.com/docs/taskfilters).
        return (
            self._call(
                "GET",
                f"/team/{self.team_id}/task",
                "GET /team/{id}/task",
                params={
                    "custom_fields": self._stamp_filter("==", stamp.marker),
                    "include_closed": "true",
                    "subtasks": "true",
                    "archived": "true" if archived else "false",
                },
            ).get("tasks")
            or []
        )

    def _indexed(self, stamp: DealStamp) -> ProjectRef | None:
        """The stamp's List from a one-time read of every stamped task in the Workspace."""
        if self._stamp_index is None:
            index: dict[str, ProjectRef] = {}
            for archived in ("false", "true"):
                page = 0
                while True:
                    # https://developer.clickup.com/reference/getfilteredteamtasks - no
                    # `last_page` here: a short page is the last.
                    tasks = (
                        self._call(
                            "GET",
                            f"/team/{self.team_id}/task",
                            "GET /team/{id}/task",
                            params={
                                "custom_fields": self._stamp_filter("IS NOT NULL"),
                                "include_closed": "true",
                                "subtasks": "true",
                                "archived": archived,
                                "page": page,
                            },
                        ).get("tasks")
                        or []
                    )
                    # The deal record first: it names the List the stamp belongs to.
                    for t in sorted(tasks, key=lambda t: t.get("custom_item_id") != PLAIN_TASK):
                        marker, home = self._stamp_of(t), t.get("list") or {}
                        if marker and home.get("id") and marker not in index:
                            list_id = str(home["id"])
                            index[marker] = ProjectRef(
                                list_id, home.get("name", ""), self.list_url(list_id)
                            )
                    if len(tasks) < PAGE:
                        break
                    page += 1
            self._stamp_index = index
        return self._stamp_index.get(stamp.marker)

    def find_project(self, stamp: DealStamp, name: str | None = None) -> ProjectRef | None:
        """The List whose tasks carry this stamp.

        Without `name` (a first run looking before each create of a deal it just claimed),
        from an index of every stamped task read once: a project made since could only be
        this deal's if another run held its claim, and then `name` is given. With `name` (a
        pending claim: a create that may have died before its stamp), one direct query (two
        when there is none), and a List of that name in the Folder/Space with no stamp at all
        is adopted: it gets its deal record."""
        if name is None:
            return self._indexed(stamp)
        tasks = self._stamped_tasks(stamp, archived=False)
        if not tasks:
            # Archived tasks are only listed when asked for; look there before saying "none".
            tasks = self._stamped_tasks(stamp, archived=True)
        if tasks:
            # The deal record if present (it is what `update_project` writes to).
            tasks.sort(key=lambda t: t.get("custom_item_id") != PLAIN_TASK)
            home = tasks[0]["list"]
            list_id = str(home["id"])
            records = [str(t["id"]) for t in tasks if t.get("custom_item_id") == PLAIN_TASK]
            if records:
                self._records[list_id] = records
            return ProjectRef(list_id, home.get("name", ""), self.list_url(list_id))
        if name is None:
            return None
        # The name `create_project` falls back to first: a List of that name is surely ours.
        for candidate in (f"{name} ({stamp.deal_id})", name):
            lst = self._list_named(candidate)
            if lst is not None and not self._list_stamps(str(lst["id"])):
                self._create_record(lst, stamp, {})
                return ProjectRef(str(lst["id"]), lst["name"], self.list_url(str(lst["id"])))
        return None

    def _record_tasks(self, list_id: str) -> list[str]:
        if list_id not in self._records:
            found = [
                str(t["id"])
                for t in self._list_tasks(
                    list_id,
                    [
                        ("custom_fields", self._stamp_filter("IS NOT NULL")),
                        ("custom_items[]", PLAIN_TASK),
                        ("include_closed", "true"),
                        ("subtasks", "true"),
                    ],
                )
            ]
            if not found:
                raise ConnectorError(
                    self.name,
                    ErrorKind.RECORD,
                    f"List {list_id} has no '{self.settings.record_task_name}' task carrying "
                    f"'{self.settings.stamp_field}' (deleted?), so its Custom Fields have no home",
                )
            self._records[list_id] = found
        return self._records[list_id]

    def ensure_stamp(self, project_id: str, stamp: DealStamp) -> None:
        """Give a List whose create was cut short its deal record task (the stamp)."""
        if self._stamped_in_list(project_id, stamp):
            return
        lst = self._call("GET", f"/list/{project_id}", "GET /list/{id}")
        self._create_record(lst, stamp, {})

    def update_project(self, project_id: str, spec: ProjectSpec) -> None:
        list_fields = self._list_fields(spec.fields)
        if list_fields:
            # Update List requires `name`: send the List's current one, so a rename made in
            # ClickUp is kept (https://developer.clickup.com/reference/updatelist).
            current = self._call("GET", f"/list/{project_id}", "GET /list/{id}")
            self._call(
                "PUT",
                f"/list/{project_id}",
                "PUT /list/{id}",
                body={"name": current["name"], **list_fields},
            )
        if spec.custom_fields:
            record_values, milestone_values = self._split_fields(spec.custom_fields, project_id)
            if record_values:
                for task_id in self._record_tasks(project_id):
                    self._set_fields(task_id, record_values)
            if milestone_values:
                self._set_on_milestones(project_id, milestone_values)

    # -- milestones -------------------------------------------------------------------------------
    def read_milestone_changes(
        self,
        since: datetime | None,
        project_ids: Sequence[str],
        settled_before: datetime | None = None,
    ) -> Iterator[list[Milestone]]:
        """Milestones changed at or after `since`, workspace-wide, oldest first.

        Get Filtered Team Tasks (https://developer.clickup.com/reference/getfilteredteamtasks)
        with `order_by=updated&reverse=true` (oldest first; the default is newest first). Page
        numbers over a moving result set skip a task whenever an earlier one is edited meanwhile
        (it jumps to the end, the rest slide back), so we page by key instead: each request asks
        for `date_updated_gt` = the last page's newest time - 1 from page 0, skipping the ids
        already seen at that time. Only when a whole page shares one time do we go on by page
        number. The endpoint does not say `last_page`: a short page is the last.
        """
        self.read_clock = None
        if not project_ids:
            return  # nothing linked: nothing to read
        base: list[tuple[str, Any]] = [
            ("custom_items[]", self.milestone_type),
            ("include_closed", "true"),
            ("subtasks", "true"),
            ("order_by", "updated"),
            ("reverse", "true"),
        ]
        if settled_before is not None:
            # Whole milliseconds below ceil(bound) are all before the bound.
            base.append(("date_updated_lt", math.ceil(settled_before.timestamp() * 1000)))
        gt: int | None = None if since is None else math.floor(since.timestamp() * 1000) - 1
        page = 0
        seen: set[str] = set()
        while True:
            params = list(base)
            if gt is not None:
                params.append(("date_updated_gt", gt))
            params.append(("page", page))
            tasks = (
                self._call(
                    "GET", f"/team/{self.team_id}/task", "GET /team/{id}/task", params=params
                ).get("tasks")
                or []
            )
            self._note_read_clock(self.api.server_clock())
            fresh = [self._milestone(t) for t in tasks if str(t["id"]) not in seen]
            if fresh:
                yield fresh
            if len(tasks) < PAGE:
                return
            last = int(tasks[-1]["date_updated"])
            at_last = {str(t["id"]) for t in tasks if int(t["date_updated"]) == last}
            if gt is None or last - 1 > gt:
                gt, page, seen = last - 1, 0, at_last
            else:  # a full page at one instant: step through that instant by page number
                page += 1
                seen |= at_last

    def _milestone(self, task: dict[str, Any]) -> Milestone:
        status_type = (task.get("status") or {}).get("type")
        completed = status_type in ("closed", "done")
        done_ms = task.get("date_done") or task.get("date_closed")
        return Milestone(
            id=str(task["id"]),
            project_id=str((task.get("list") or {}).get("id", "")),
            name=task.get("name", ""),
            completed=completed,
            completed_at=_utc(done_ms) if completed and done_ms else None,
            due_on=self._date(task.get("due_date")),
            modified_at=_utc(task["date_updated"]) or datetime.now(UTC),
        )

    # -- unwon ------------------------------------------------------------------------------------
    def server_now(self) -> datetime | None:
        return self.api.server_now()

    def comment_on_project(self, project_id: str, text: str) -> None:
        def already() -> dict[str, Any] | None:
            # https://developer.clickup.com/reference/getlistcomments (newest first)
            got = (
                self._call("GET", f"/list/{project_id}/comment", "GET /list/{id}/comment").get(
                    "comments"
                )
                or []
            )
            return next((c for c in got[:25] if c.get("comment_text") == text), None)

        # https://developer.clickup.com/reference/createlistcomment
        self._post_verified(
            f"/list/{project_id}/comment",
            "POST /list/{id}/comment",
            {"comment_text": text, "notify_all": False},
            already,
        )

    def archive_project(self, project_id: str) -> None:
        """ClickUp's API cannot archive a List (Update List has no `archived`:
        https://developer.clickup.com/reference/updatelist; archiving Lists is app-only). The
        closest documented thing: archive the List's tasks (Update Task `archived: true`,
        https://developer.clickup.com/reference/updatetask), which takes them out of views and
        task reads, keeping the deal record so the List still says whose it was."""
        try:
            records = set(self._record_tasks(project_id))
        except ConnectorError as exc:
            if exc.status is not None:
                raise
            records = set()  # the deal record is gone: archive everything
        ids = [
            str(t["id"])
            for t in self._list_tasks(
                project_id, [("include_closed", "true"), ("subtasks", "true")]
            )
            if str(t["id"]) not in records
        ]
        for task_id in ids:
            self._call("PUT", f"/task/{task_id}", "PUT /task/{id}", body={"archived": True})

    # -- plans & check ----------------------------------------------------------------------------
    def _fields_split_offline(self, names: Sequence[str]) -> tuple[int, int]:
        """(record fields, milestone-only fields) from the cache; unknown ones count as record."""
        cache = self._fields or {}
        record = milestone = 0
        for name in names:
            f = cache.get(name)
            if f is not None and not self._on_record(f):
                milestone += 1
            else:
                record += 1
        return record, milestone

    def create_cost(self, spec: ProjectSpec) -> int:
        # List + deal record task (its fields and the stamp inline), then:
        _, milestone_fields = self._fields_split_offline(list(spec.custom_fields))
        if spec.template:
            rest = set(spec.fields) & (PROJECT_FIELDS - {"content"})
            # + Update List for fields a template create cannot take; + read the template's
            # milestones and set each milestone-only field on them (4 milestones assumed).
            extra = 1 if rest else 0
            if milestone_fields:
                extra += 1 + 4 * milestone_fields
            return 2 + extra
        return 2 + len(spec.milestones)

    def update_cost(self, spec: ProjectSpec) -> int:
        cost = 2 if set(spec.fields) & PROJECT_FIELDS else 0  # Get List + Update List
        record_fields, milestone_fields = self._fields_split_offline(list(spec.custom_fields))
        if record_fields:
            cost += 1 + record_fields  # find the record task (unless cached) + one call a field
        if milestone_fields:
            cost += 1 + 4 * milestone_fields
        return cost

    def check(self) -> str:
        team = self.team
        where = f"space {self.space_id}" + (f", folder {self.folder_id}" if self.folder_id else "")
        self._stamp_field()
        milestone = self.milestone_type
        if self.settings.milestone_type.strip().isdigit():
            # Given by id, so not looked up yet: confirm the Workspace has it.
            # https://developer.clickup.com/reference/getcustomitems
            items = self._call(
                "GET", f"/team/{self.team_id}/custom_item", "GET /team/{id}/custom_item"
            )["custom_items"]
            if not any(str(i.get("id")) == str(milestone) for i in items):
                raise self._not_found("custom task type (milestone_type)", str(milestone))
        return (
            f"ClickUp Workspace '{team.get('name')}' ({team['id']}): {where}; stamp field "
            f"'{self.settings.stamp_field}', milestone type {milestone}"
        )


# List fields a mapping may set (`project.fields.<name>`): Create/Update List's body
# (https://developer.clickup.com/reference/createlist). `status` is the List's color.
PROJECT_FIELDS = frozenset(
    {"content", "markdown_content", "due_date", "due_date_time", "priority", "assignee", "status"}
)


def _number(value: Any) -> int | float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float | Decimal):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip().replace(",", ""))
        except ValueError:
            return None
    else:
        return None
    if not math.isfinite(number):
        return None
    return int(number) if number.is_integer() else number


def _utc(ms: Any) -> datetime | None:
    if ms in (None, ""):
        return None
    return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=int(ms))
