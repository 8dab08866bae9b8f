"""Asana through httpx: a won deal becomes a project (from a project template or plain, with
sections and milestones), stamped with the deal in a text custom field so it can be found.

Asana has no project search by custom field, so `find_project` scans the team's projects
once per connector instance (paged, 100 at a time) and indexes them by stamp; it runs only
when adopting (a pending claim, or a lost state store), never on the normal create path.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, date, datetime, timedelta
from typing import Any, Literal

import httpx
from pydantic import BaseModel, ConfigDict, Field

from connectors.base import DealStamp, Milestone, ProjectRef, ProjectSpec, ProjectTool
from connectors.errors import ConnectorError, ErrorKind
from connectors.http import (
    BudgetFactory,
    JsonApi,
    RateBudget,
    RetryPolicy,
    local_budget,
    parse_retry_after,
)

PAGE = 100  # Asana's maximum `limit`


class AsanaAuth(BaseModel):
    model_config = ConfigDict(extra="forbid")
    token: str = Field(description="personal access token or OAuth access token")


class AsanaSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["asana"]
    base_url: str = "https://app.asana.com/api/1.0"
    auth: AsanaAuth
    workspace: str = Field(description="workspace name or gid")
    team: str = Field(description="team (name or gid) that owns created projects")
    stamp_field: str = Field("Handoff deal", description="text custom field holding the stamp")
    retry: RetryPolicy = Field(default_factory=RetryPolicy)
    # https://developers.asana.com/docs/rate-limits: 150/min free, 1,500/min paid.
    requests_per_minute: int = Field(1500, ge=1)
    job_poll_seconds: float = Field(0.2, gt=0, description="interval when polling a job")
    job_timeout_seconds: float = Field(120, gt=0)
    milestone_search: bool = Field(
        True, description="read milestone changes with workspace search (paid workspaces)"
    )


class AsanaHttp:
    """Asana's error bodies and rate-limit signals."""

    def __init__(self, system: str) -> None:
        self.system = system

    def error_message(self, response: httpx.Response) -> str:
        try:
            errors = response.json().get("errors") or []
            return "; ".join(str(e.get("message", "")) for e in errors) or response.reason_phrase
        except ValueError:
            return response.reason_phrase

    def retry_after(self, response: httpx.Response) -> float | None:
        return parse_retry_after(response.headers.get("Retry-After"))

    def observe(self, response: httpx.Response, budget: RateBudget) -> None:
        return None  # Asana sends no remaining-quota headers; only Retry-After on 429


# Asana's minute slides over the times requests *arrive*; the budget stamps them when sent.
# A request that travels faster than its twin of a minute before would arrive inside that
# minute and be refused, and a refusal is dear here: "Requests rejected by this limiter still
# count against the quotas" (https://developers.asana.com/docs/rate-limits), and its
# Retry-After (whole seconds) holds every thread. Half a second is 0.8% of the pace.
ARRIVAL_MARGIN_SECONDS = 0.5
# https://developers.asana.com/docs/rate-limits: "the duplication endpoints are limited to 5
# concurrent jobs" per token. A sixth is refused with a 429 whose Retry-After (whole seconds)
# idles that create for a second or more, so creates on several threads queue for a slot.
CONCURRENT_JOBS = 5


class AsanaProjects(ProjectTool):
    kind = "asana"

    def __init__(
        self,
        name: str,
        settings: AsanaSettings,
        transport: httpx.BaseTransport | None = None,
        *,
        budgets: BudgetFactory | None = None,
    ) -> None:
        super().__init__()
        self.name = name
        self.settings = settings
        self.calls = Counter()
        client = httpx.Client(
            base_url=settings.base_url.rstrip("/"),
            headers={
                "Authorization": f"Bearer {settings.auth.token}",
                "Accept": "application/json",
            },
            timeout=settings.retry.timeout,
            transport=transport,
        )
        self.api = JsonApi(
            AsanaHttp(name),
            client,
            settings.retry,
            (budgets or local_budget)(
                "requests", [(settings.requests_per_minute, 60.0 + ARRIVAL_MARGIN_SECONDS)]
            ),
            self.calls,
        )
        self._workspace: str | None = None
        self._team: str | None = None
        self._templates: dict[str, str] | None = None
        self._fields: dict[str, dict[str, Any]] | None = None
        self._stamp_index: dict[str, ProjectRef] | None = None
        # Custom fields a fresh project from each template comes with (template gid -> field
        # gids), learnt from the first project: later ones skip the settings read.
        self._template_fields: dict[str, set[str]] = {}
        self._search_works: bool | None = None
        self._unstamped: dict[str, ProjectRef] = {}
        self._job_slots = threading.BoundedSemaphore(CONCURRENT_JOBS)

    def close(self) -> None:
        self.api.client.close()

    # -- lookups (cached per instance) -------------------------------------------------------
    def _get(self, path: str, route: str, **params: Any) -> Any:
        return self.api.request("GET", path, route=route, params=params)["data"]

    def _pages(self, path: str, route: str, **params: Any) -> Iterator[dict[str, Any]]:
        params = {"limit": PAGE, **params}
        while True:
            body = self.api.request("GET", path, route=route, params=params)
            yield from body["data"]
            nxt = body.get("next_page")
            if not nxt or not nxt.get("offset"):
                return
            params = {**params, "offset": nxt["offset"]}

    def _resolve(self, items: Iterator[dict[str, Any]], wanted: str, what: str) -> str:
        for item in items:
            if wanted in (item["gid"], item.get("name")):
                return item["gid"]
        raise ConnectorError(
            self.name, ErrorKind.AUTH, f"{what} '{wanted}' not found or not visible to this token"
        )

    @property
    def workspace_gid(self) -> str:
        if self._workspace is None:
            self._workspace = self._resolve(
                self._pages("/workspaces", "GET /workspaces"), self.settings.workspace, "workspace"
            )
        return self._workspace

    @property
    def team_gid(self) -> str:
        if self._team is None:
            self._team = self._resolve(
                self._pages(
                    f"/workspaces/{self.workspace_gid}/teams", "GET /workspaces/{gid}/teams"
                ),
                self.settings.team,
                "team",
            )
        return self._team

    def _template_gid(self, wanted: str) -> str:
        if self._templates is None:
            # https://developers.asana.com/reference/getprojecttemplates
            self._templates = {
                t["name"]: t["gid"]
                for t in self._pages(
                    "/project_templates", "GET /project_templates", team=self.team_gid
                )
            }
        if wanted in self._templates.values():
            return wanted
        if wanted not in self._templates:
            known = ", ".join(sorted(self._templates)) or "none"
            raise ConnectorError(
                self.name,
                ErrorKind.RECORD,
                f"project template '{wanted}' not found in the team (templates: {known})",
            )
        return self._templates[wanted]

    def custom_fields(self) -> dict[str, dict[str, Any]]:
        """Workspace custom fields by name (gid, type, enum options)."""
        if self._fields is None:
            # https://developers.asana.com/reference/getcustomfieldsforworkspace
            self._fields = {
                f["name"]: f
                for f in self._pages(
                    f"/workspaces/{self.workspace_gid}/custom_fields",
                    "GET /workspaces/{gid}/custom_fields",
                    opt_fields="name,resource_subtype,enum_options.name,enum_options.gid",
                )
            }
        return self._fields

    def _field(self, name: str) -> dict[str, Any]:
        fields = self.custom_fields()
        if name not in fields:
            raise ConnectorError(
                self.name,
                ErrorKind.RECORD,
                f"custom field '{name}' does not exist in the workspace; create it in Asana "
                f"(or fix its name in the mapping)",
            )
        return fields[name]

    def _custom_values(self, values: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, value in values.items():
            f = self._field(name)
            kind = f.get("resource_subtype")
            if kind == "enum":
                options = {o["name"]: o["gid"] for o in f.get("enum_options") or []}
                if str(value) not in options:
                    raise ConnectorError(
                        self.name,
                        ErrorKind.RECORD,
                        f"'{value}' is not an option of custom field '{name}' "
                        f"(options: {', '.join(options)})",
                    )
                out[f["gid"]] = options[str(value)]
            elif kind == "date":
                out[f["gid"]] = {"date": _iso_date(value)}
            else:
                out[f["gid"]] = value
        return out

    # -- create ---------------------------------------------------------------------------------
    def create_project(self, spec: ProjectSpec, stamp: DealStamp) -> ProjectRef:
        # Everything that can be refused offline is checked before anything exists: the stamp
        # field, the other fields and their values.
        stamp_gid = self._field(self.settings.stamp_field)["gid"]
        values = self._custom_values(spec.custom_fields)
        wanted = {stamp_gid, *values}
        template = None
        if spec.template:
            template = self._template_gid(spec.template)
            gid = self._instantiate(template, spec)
            body = {**_project_fields(spec.fields)}
        else:
            # https://developers.asana.com/reference/createproject
            body = {
                "name": spec.name,
                "team": self.team_gid,
                "workspace": self.workspace_gid,
                **_project_fields(spec.fields),
            }
            gid = self.api.request(
                "POST", "/projects", route="POST /projects", json={"data": body}
            )["data"]["gid"]
            body = {}
        # From here the project exists: any failure carries it, so the engine links it
        # rather than releasing the claim (which would let a retry create a second one).
        ref = ProjectRef(gid, spec.name)
        try:
            data = self._stamp_and_fill(gid, template, wanted, stamp_gid, stamp, values, body)
            ref = ProjectRef(gid, data.get("name", spec.name), data.get("permalink_url"))
            index = self._stamp_index  # read once: creates run on several threads
            if index is not None:
                index[stamp.marker] = ref
            if not spec.template:
                self._add_structure(gid, spec)
        except ConnectorError as exc:
            exc.project = ref  # type: ignore[attr-defined]
            raise
        return ref

    def _stamp_and_fill(
        self,
        gid: str,
        template: str | None,
        wanted: set[str],
        stamp_gid: str,
        stamp: DealStamp,
        values: dict[str, Any],
        body: dict[str, Any],
    ) -> dict[str, Any]:
        """Put the fields on a new project, then the stamp with every value in one write:
        the first write that can fail for this record also makes the project findable."""
        cached = self._template_fields.get(template) if template else None
        present = cached if cached is not None else self._field_settings(gid)
        if template and cached is None:
            self._template_fields[template] = set(present)
        self._add_field_settings(gid, wanted, present)
        everything = {**body, "custom_fields": {**values, stamp_gid: stamp.marker}}
        try:
            return self._put_project(gid, everything)
        except ConnectorError as exc:
            if exc.kind is not ErrorKind.RECORD:
                raise  # transient, retried out: the engine links the project and re-stamps it
            if cached is not None and template:
                # The template changed since we learnt its fields: learn them again.
                self._template_fields.pop(template, None)
                return self._stamp_and_fill(gid, template, wanted, stamp_gid, stamp, values, body)
            # Asana refused a value: stamp alone so the project can be found, and let the
            # refusal stand (the record parks with its project linked).
            self._put_project(gid, {"custom_fields": {stamp_gid: stamp.marker}})
            raise

    def _put_project(self, gid: str, body: dict[str, Any]) -> dict[str, Any]:
        # https://developers.asana.com/reference/updateproject
        return self.api.request(
            "PUT",
            f"/projects/{gid}",
            route="PUT /projects/{gid}",
            json={"data": body},
            params={"opt_fields": "name,permalink_url"},
        )["data"]

    def _instantiate(self, template: str, spec: ProjectSpec) -> str:
        with self._job_slots:  # held until the job is seen to end: it runs until then
            return self._run_job(template, spec)

    def _run_job(self, template: str, spec: ProjectSpec) -> str:
        # https://developers.asana.com/reference/instantiateproject - returns a job.
        job = self.api.request(
            "POST",
            f"/project_templates/{template}/instantiateProject",
            route="POST /project_templates/{gid}/instantiateProject",
            json={"data": {"name": spec.name, "team": self.team_gid, "public": False}},
        )["data"]
        deadline = time.monotonic() + self.settings.job_timeout_seconds
        while True:
            if job.get("status") == "succeeded" and job.get("new_project"):
                return job["new_project"]["gid"]
            if job.get("status") == "failed":
                raise ConnectorError(self.name, ErrorKind.RECORD, "template instantiation failed")
            if time.monotonic() > deadline:
                raise ConnectorError(
                    self.name, ErrorKind.TRANSIENT, "template instantiation did not finish in time"
                )
            time.sleep(self.settings.job_poll_seconds)
            job = self._get(f"/jobs/{job['gid']}", "GET /jobs/{gid}")

    def _field_settings(self, project_gid: str) -> set[str]:
        """Gids of the custom fields on the project."""
        # https://developers.asana.com/reference/getcustomfieldsettingsforproject
        return {
            s["custom_field"]["gid"]
            for s in self._pages(
                f"/projects/{project_gid}/custom_field_settings",
                "GET /projects/{gid}/custom_field_settings",
                opt_fields="custom_field.gid",
            )
        }

    def _add_field_settings(
        self, project_gid: str, wanted: set[str], present: set[str] | None = None
    ) -> None:
        """Add the `wanted` fields the project lacks (`present`: what it has, when known)."""
        if present is None:
            present = self._field_settings(project_gid)
        for field_gid in sorted(wanted - present):
            # https://developers.asana.com/reference/addcustomfieldsettingforproject
            self.api.request(
                "POST",
                f"/projects/{project_gid}/addCustomFieldSetting",
                route="POST /projects/{gid}/addCustomFieldSetting",
                json={"data": {"custom_field": field_gid}},
            )

    def _add_structure(self, project_gid: str, spec: ProjectSpec) -> None:
        sections: dict[str, str] = {}
        wanted = list(
            dict.fromkeys([*spec.sections, *(m.section for m in spec.milestones if m.section)])
        )
        for title in wanted:
            # https://developers.asana.com/reference/createsectionforproject
            sections[title] = self.api.request(
                "POST",
                f"/projects/{project_gid}/sections",
                route="POST /projects/{gid}/sections",
                json={"data": {"name": title}},
            )["data"]["gid"]
        for m in spec.milestones:
            task: dict[str, Any] = {
                "name": m.name,
                "resource_subtype": "milestone",
                "projects": [project_gid],
            }
            if m.due_on:
                task["due_on"] = m.due_on.isoformat()
            if m.section:
                task["memberships"] = [{"project": project_gid, "section": sections[m.section]}]
                del task["projects"]
            # https://developers.asana.com/reference/createtask
            self.api.request("POST", "/tasks", route="POST /tasks", json={"data": task})

    # -- find / update ------------------------------------------------------------------------
    def find_project(self, stamp: DealStamp, name: str | None = None) -> ProjectRef | None:
        if name is not None and self._stamp_index is not None:
            # A pending claim: another run may have made the project since the index was
            # built, so this look-up reads the team again rather than trust the cache.
            self._stamp_index = None
        if self._stamp_index is None:
            stamp_gid = self._field(self.settings.stamp_field)["gid"]
            index: dict[str, ProjectRef] = {}
            unstamped: dict[str, ProjectRef] = {}
            # https://developers.asana.com/reference/getprojectsforteam (archived included)
            for p in self._pages(
                f"/teams/{self.team_gid}/projects",
                "GET /teams/{gid}/projects",
                opt_fields="name,permalink_url,custom_fields.gid,custom_fields.text_value",
            ):
                ref = ProjectRef(p["gid"], p.get("name", ""), p.get("permalink_url"))
                marker = next(
                    (
                        cf.get("text_value")
                        for cf in p.get("custom_fields") or []
                        if cf.get("gid") == stamp_gid and cf.get("text_value")
                    ),
                    None,
                )
                if marker:
                    index[marker] = ref
                else:
                    unstamped.setdefault(ref.name, ref)
            self._stamp_index, self._unstamped = index, unstamped
        found = self._stamp_index.get(stamp.marker)
        if found is None and name is not None and name in self._unstamped:
            found = self._unstamped.pop(name)
            self._stamp(found.id, stamp)
            self._stamp_index[stamp.marker] = found
        return found

    def ensure_stamp(self, project_id: str, stamp: DealStamp) -> None:
        self._stamp(project_id, stamp)

    def _stamp(
        self, project_gid: str, stamp: DealStamp, fields: Iterable[str] = ()
    ) -> dict[str, Any]:
        """Put the stamp (alone) on the project, after adding the stamp field and `fields`
        (custom field names) to it; returns the project's name and permalink."""
        stamp_gid = self._field(self.settings.stamp_field)["gid"]
        self._add_field_settings(project_gid, {stamp_gid} | {self._field(n)["gid"] for n in fields})
        return self.api.request(
            "PUT",
            f"/projects/{project_gid}",
            route="PUT /projects/{gid}",
            json={"data": {"custom_fields": {stamp_gid: stamp.marker}}},
            params={"opt_fields": "name,permalink_url"},
        )["data"]

    def update_project(self, project_id: str, spec: ProjectSpec) -> None:
        body: dict[str, Any] = _project_fields(spec.fields)
        if spec.custom_fields:
            # A field can only be set once it is on the project (a create cut short, or a
            # field added to the mapping later): add what is missing first.
            self._add_field_settings(
                project_id, {self._field(n)["gid"] for n in spec.custom_fields}
            )
            body["custom_fields"] = self._custom_values(spec.custom_fields)
        if not body:
            return
        # https://developers.asana.com/reference/updateproject
        self.api.request(
            "PUT", f"/projects/{project_id}", route="PUT /projects/{gid}", json={"data": body}
        )

    # -- milestones ---------------------------------------------------------------------------
    _MILESTONE_FIELDS = (
        "name,resource_subtype,completed,completed_at,due_on,modified_at,projects.gid"
    )

    def read_milestone_changes(
        self,
        since: datetime | None,
        project_ids: Sequence[str],
        settled_before: datetime | None = None,
    ) -> Iterator[list[Milestone]]:
        self.read_clock = None
        wanted = set(project_ids)
        if not wanted:
            return
        if self.settings.milestone_search and self._search_works is not False:
            try:
                yield from self._search_milestones(since, wanted, settled_before)
                self._search_works = True
                return
            except ConnectorError as exc:
                if exc.status != 402:
                    raise
                # Search needs a paid workspace: read each linked project instead.
                self._search_works = False
        if settled_before is None:
            yield from self._project_milestones(since, sorted(wanted))

    def _search_milestones(
        self, since: datetime | None, wanted: set[str], until: datetime | None = None
    ) -> Iterator[list[Milestone]]:
        """Workspace-wide task search: reads cost what changed, not what exists.

        The search API has no pagination and returns at most 100 results
        (https://developers.asana.com/reference/searchtasksforworkspace), so it is walked by
        re-anchoring `modified_at.after` on the last result, de-duplicating the boundary.
        """
        anchor = since or datetime(2000, 1, 1, tzinfo=UTC)
        # `modified_at.after` is exclusive: step back a millisecond to keep ties at `since`.
        after = anchor - timedelta(milliseconds=1)
        seen_at_anchor: set[str] = set()
        bounds = {} if until is None else {"modified_at.before": _instant(until)}
        while True:
            tasks = self._get(
                f"/workspaces/{self.workspace_gid}/tasks/search",
                "GET /workspaces/{gid}/tasks/search",
                resource_subtype="milestone",
                **{"modified_at.after": _instant(after)},
                **bounds,
                sort_by="modified_at",
                sort_ascending="true",
                opt_fields=self._MILESTONE_FIELDS,
                limit=PAGE,
            )
            self._note_read_clock(self.api.server_clock())
            page = []
            for t in tasks:
                modified = _parse_dt(t["modified_at"])
                key = f"{t['gid']}@{t['modified_at']}"
                if key in seen_at_anchor:
                    continue
                seen_at_anchor.add(key)
                if until is not None and modified >= until:
                    # Matched on the index's older version, returned as it is now: the
                    # next read (which starts at `until`) has it.
                    continue
                homes = [p["gid"] for p in t.get("projects") or []]
                linked = [gid for gid in homes if gid in wanted]
                # A milestone of an unlinked project is passed on too (the engine ignores it):
                # the back cursor then moves past it instead of re-reading it every run.
                for gid in linked or homes[:1] or [""]:
                    page.append(_milestone(t, gid, modified))
            if page:
                yield page
            if len(tasks) < PAGE:
                return
            last = _parse_dt(tasks[-1]["modified_at"])
            if last - timedelta(milliseconds=1) <= after:
                # A full page sharing one timestamp: the anchor cannot move. Read the
                # linked projects directly rather than loop.
                for page in self._project_milestones(last, sorted(wanted)):
                    kept = [m for m in page if until is None or m.modified_at < until]
                    if kept:
                        yield kept
                after = last
                continue
            after = last - timedelta(milliseconds=1)
            seen_at_anchor = {k for k in seen_at_anchor if k.endswith(tasks[-1]["modified_at"])}

    def _project_milestones(
        self, since: datetime | None, project_ids: Sequence[str]
    ) -> Iterator[list[Milestone]]:
        """One paged read per linked project (the fallback without search)."""
        params: dict[str, Any] = {"opt_fields": self._MILESTONE_FIELDS}
        if since is not None:
            params["modified_since"] = _instant(since)
        for gid in project_ids:
            page = [
                _milestone(t, gid, _parse_dt(t["modified_at"]))
                for t in self._pages(
                    f"/projects/{gid}/tasks", "GET /projects/{gid}/tasks", **params
                )
                if t.get("resource_subtype") == "milestone"
            ]
            self._note_read_clock(self.api.server_clock())
            if page:
                yield sorted(page, key=lambda m: (m.modified_at, m.id))

    def server_now(self) -> datetime | None:
        return self.api.server_now()

    def comment_on_project(self, project_id: str, text: str) -> None:
        # https://developers.asana.com/reference/createstatusforobject
        self.api.request(
            "POST",
            "/status_updates",
            route="POST /status_updates",
            json={
                "data": {
                    "parent": project_id,
                    "status_type": "off_track",
                    "title": "Deal no longer won",
                    "text": text,
                }
            },
        )

    def archive_project(self, project_id: str) -> None:
        self.api.request(
            "PUT",
            f"/projects/{project_id}",
            route="PUT /projects/{gid}",
            json={"data": {"archived": True}},
        )

    def update_cost(self, spec: ProjectSpec) -> int:
        return 2 if spec.custom_fields else 1

    def create_cost(self, spec: ProjectSpec) -> int:
        # one addCustomFieldSetting per field the project lacks (at most the stamp's and each
        # mapped one) + one PUT of the stamp with every value. A template's field settings are
        # read once per connection; a plain project's each time.
        base = (1 + len(spec.custom_fields)) + 1
        if spec.template:
            return base + 2  # instantiate + one job poll
        sections = len(set(spec.sections) | {m.section for m in spec.milestones if m.section})
        return base + 2 + sections + len(spec.milestones)

    def check(self) -> str:
        me = self._get("/users/me", "GET /users/me", opt_fields="name")
        self._field(self.settings.stamp_field)
        return f"Asana as {me.get('name', me['gid'])}: team {self.team_gid}"


def _instant(when: datetime) -> str:
    return when.isoformat().replace("+00:00", "Z")


def _parse_dt(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def _milestone(task: dict[str, Any], project_gid: str, modified: datetime) -> Milestone:
    done_at = task.get("completed_at")
    due = task.get("due_on")
    return Milestone(
        id=task["gid"],
        project_id=project_gid,
        name=task.get("name", ""),
        completed=bool(task.get("completed")),
        completed_at=_parse_dt(done_at) if done_at else None,
        due_on=date.fromisoformat(due) if due else None,
        modified_at=modified,
    )


def _iso_date(value: Any) -> str:
    if isinstance(value, datetime):
        return value.astimezone(UTC).date().isoformat()
    if isinstance(value, date):
        return value.isoformat()
    return str(value)


PROJECT_FIELDS = frozenset(
    {"notes", "html_notes", "due_on", "start_on", "color", "owner", "public"}
)


def _project_fields(fields: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in fields.items():
        if key not in PROJECT_FIELDS:
            continue
        out[key] = _iso_date(value) if key in ("due_on", "start_on") else value
    return out
