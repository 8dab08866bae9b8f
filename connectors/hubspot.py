"""HubSpot CRM through hubspot-api-client: deals read by search, written by batch update.

Won is resolved from the deal pipelines API (a closed stage with probability 1.0), not from
the literal `closedwon`, so custom pipelines work. Search is re-anchored before HubSpot's
10,000-result ceiling on the last (timestamp, id) pair, so any number of deals sharing one
`hs_lastmodifieddate` are still read, each once.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from connectors.base import CRM, Deal, DealStatus, DealUpdate, WriteOutcome
from connectors.errors import ConnectorError, ErrorKind, kind_for_status
from connectors.http import (
    BudgetFactory,
    RetryPolicy,
    call_with_retry,
    local_budget,
    parse_retry_after,
    server_clock,
)
from connectors.secrets import redact

T = TypeVar("T")

SEARCH_LIMIT = 200  # https://developers.hubspot.com/docs/api/crm/search (max page size)
BATCH_LIMIT = 100  # https://developers.hubspot.com/docs/api/crm/deals (batch inputs)
MODIFIED = "hs_lastmodifieddate"
ALWAYS_READ = ("dealname", "dealstage", "pipeline", MODIFIED)


class HubSpotAuth(BaseModel):
    model_config = ConfigDict(extra="forbid")
    token: str | None = Field(None, description="private app access token")
    client_id: str | None = None
    client_secret: str | None = None
    refresh_token: str | None = None


class HubSpotSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["hubspot"]
    base_url: str = "https://api.hubapi.com"
    portal_url: str = Field(
        "https://app.hubspot.com", description="for links to deals in logs and tables"
    )
    auth: HubSpotAuth
    retry: RetryPolicy = Field(default_factory=RetryPolicy)
    # Private apps: 100 requests / 10 s (190 on Pro/Enterprise); search: 5 / s per token.
    # https://developers.hubspot.com/docs/api/usage-details
    requests_per_10s: int = Field(100, ge=1)
    search_per_second: int = Field(5, ge=1)


def _ms(when: datetime) -> str:
    return str(int(when.timestamp() * 1000))


def _parse_time(value: Any) -> datetime:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    text = str(value)
    if text.isdigit():
        return datetime.fromtimestamp(int(text) / 1000, tz=UTC)
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


class _SearchPage:
    """A search response as HubSpot sends it: `results` (raw objects) and `paging.next`."""

    def __init__(self, body: dict[str, Any]) -> None:
        self.results: list[dict[str, Any]] = body.get("results") or []
        self.has_next = bool((body.get("paging") or {}).get("next"))


class HubSpotCRM(CRM):
    kind = "hubspot"

    def __init__(
        self,
        name: str,
        settings: HubSpotSettings,
        client: Any = None,
        *,
        budgets: BudgetFactory | None = None,
    ) -> None:
        super().__init__()
        from urllib3.util.retry import Retry

        self.name = name
        self.settings = settings
        self.policy = settings.retry
        make_budget = budgets or local_budget
        self.budget = make_budget("requests", [(settings.requests_per_10s, 10.0)])
        self.search_budget = make_budget("search", [(settings.search_per_second, 1.0)])
        self._access_token = settings.auth.token
        self._token_expires = float("inf")
        self._lock = threading.Lock()
        self._stage_status: dict[tuple[str, str], DealStatus] | None = None
        if client is None:
            from hubspot import HubSpot

            if not self._access_token:
                self._refresh()
            # urllib3 must not retry on its own: tenacity owns retries (one policy for all).
            client = HubSpot(
                access_token=self._access_token,
                host=settings.base_url.rstrip("/"),
                retry=Retry(total=0, connect=0, read=0, status=0, redirect=0),
            )
        self.client = client

    # -- plumbing -----------------------------------------------------------------------------
    def _translate(self, exc: Exception) -> ConnectorError | None:
        from hubspot.crm.deals.exceptions import ApiException
        from urllib3.exceptions import HTTPError as Urllib3Error

        status = getattr(exc, "status", None)
        if isinstance(status, int) and hasattr(exc, "body"):
            headers = getattr(exc, "headers", None) or {}
            message = _error_message(getattr(exc, "body", None)) or getattr(exc, "reason", "")
            retry_after = parse_retry_after(headers.get("Retry-After"))
            if status == 429 and retry_after is None:
                # HubSpot does not always send Retry-After on a 429: wait out its
                # interval window instead (X-HubSpot-RateLimit-Interval-Milliseconds).
                interval = headers.get("X-HubSpot-RateLimit-Interval-Milliseconds")
                retry_after = int(interval) / 1000 if interval and interval.isdigit() else 1.0
            if status == 429:
                # Capped as every connector caps a vendor's wait (RetryPolicy.max_retry_after).
                self.budget.pause(min(retry_after or 1.0, self.policy.max_retry_after))
            return ConnectorError(
                self.name,
                kind_for_status(status),
                redact(str(message)),
                status=status,
                retry_after=retry_after,
            )
        if isinstance(exc, Urllib3Error | ConnectionError | TimeoutError | ApiException):
            from urllib3.exceptions import MaxRetryError, NewConnectionError

            err = ConnectorError(self.name, ErrorKind.TRANSIENT, f"{type(exc).__name__}: {exc}")
            reason = exc.reason if isinstance(exc, MaxRetryError) else exc
            err.connect_failed = isinstance(reason, NewConnectionError)  # type: ignore[attr-defined]
            return err
        return None

    def _call(self, what: str, fn: Callable[[], T], search: bool = False) -> T:
        def once() -> T:
            if time.time() > self._token_expires - 60:
                self._refresh()
            (self.search_budget if search else self.budget).acquire()
            self.calls[what] += 1
            return fn()

        can_refresh = bool(self.settings.auth.refresh_token)
        return call_with_retry(
            self.name,
            self.policy,
            once,
            self._translate,
            what=what,
            on_auth_failure=(lambda: self._refresh() or True) if can_refresh else None,
        )

    def _refresh(self) -> None:
        """OAuth refresh: HubSpot access tokens last 30 minutes."""
        auth = self.settings.auth
        if not (auth.refresh_token and auth.client_id and auth.client_secret):
            raise ConnectorError(
                self.name,
                ErrorKind.AUTH,
                "no token: set auth.token, or auth.client_id/client_secret/refresh_token",
            )
        import httpx

        from connectors.secrets import register_secret

        with self._lock:
            self.calls["oauth.token"] += 1
            try:
                resp = httpx.post(
                    self.settings.base_url.rstrip("/") + "/oauth/v1/token",
                    data={
                        "grant_type": "refresh_token",
                        "client_id": auth.client_id,
                        "client_secret": auth.client_secret,
                        "refresh_token": auth.refresh_token,
                    },
                    timeout=self.policy.timeout,
                )
            except httpx.HTTPError as exc:
                raise ConnectorError(self.name, ErrorKind.UNREACHABLE, str(exc)) from None
            if resp.status_code != 200:
                raise ConnectorError(
                    self.name,
                    ErrorKind.AUTH,
                    f"OAuth refresh refused: {redact(resp.text[:200])}",
                    status=resp.status_code,
                )
            body = resp.json()
            self._access_token = body["access_token"]
            register_secret(self._access_token)
            self._token_expires = time.time() + float(body.get("expires_in", 1800))
            if getattr(self, "client", None) is not None:
                self.client.access_token = self._access_token

    # -- won resolution ---------------------------------------------------------------------
    def stage_statuses(self) -> dict[tuple[str, str], DealStatus]:
        """(pipeline id, stage id) -> won/lost/open, from the pipelines API (cached)."""
        if self._stage_status is None:
            # https://developers.hubspot.com/docs/api/crm/pipelines
            resp = self._call(
                "pipelines.get_all",
                lambda: self.client.crm.pipelines.pipelines_api.get_all(
                    object_type="deals", _request_timeout=self.policy.timeout
                ),
            )
            out: dict[tuple[str, str], DealStatus] = {}
            for pipeline in resp.results:
                for stage in pipeline.stages:
                    meta = stage.metadata or {}
                    closed = str(meta.get("isClosed", "false")).lower() == "true"
                    prob = float(meta.get("probability", 0) or 0)
                    if closed and prob >= 1.0:
                        out[(pipeline.id, stage.id)] = DealStatus.WON
                    elif closed:
                        out[(pipeline.id, stage.id)] = DealStatus.LOST
                    else:
                        out[(pipeline.id, stage.id)] = DealStatus.OPEN
            self._stage_status = out
        return self._stage_status

    def _deal(self, obj: dict[str, Any]) -> Deal:
        """A deal from a raw search or batch-read result."""
        oid, props = obj["id"], dict(obj.get("properties") or {})
        status = self.stage_statuses().get(
            (props.get("pipeline") or "default", props.get("dealstage") or ""), DealStatus.OPEN
        )
        if obj.get("archived", False):
            status = DealStatus.DELETED
        modified = props.get(MODIFIED) or obj.get("updatedAt")
        portal = self.settings.portal_url.rstrip("/")
        return Deal(
            id=str(oid),
            modified_at=_parse_time(modified),
            status=status,
            properties=props,
            url=f"{portal}/contacts/deal/{oid}",
        )

    # -- reads ----------------------------------------------------------------------------------
    def _search(self, groups: list[list[dict]], sort: str, props: list[str]) -> Any:
        from hubspot.crm.deals import PublicObjectSearchRequest

        request = PublicObjectSearchRequest(
            filter_groups=[{"filters": g} for g in groups],
            sorts=[{"propertyName": sort, "direction": "ASCENDING"}],
            properties=props,
            limit=SEARCH_LIMIT,
        )
        # https://developers.hubspot.com/docs/api/crm/search
        body = self._raw_json(
            "deals.search",
            lambda: self.client.crm.deals.search_api.do_search(
                public_object_search_request=request,
                _request_timeout=self.policy.timeout,
                _preload_content=False,
            ),
            search=True,
        )
        return _SearchPage(body)

    def _raw_json(self, what: str, fn: Callable[[], Any], search: bool = False) -> dict:
        """`_call` of an SDK method given `_preload_content=False`: the decoded JSON body
        (errors still raise ApiException), and for a search the read clock from its Date.
        Deals are read and written raw: the SDK's models would parse every deal's timestamps
        with dateutil (~0.1 s a page of 200) for values we do not use."""
        raw = self._call(what, fn, search=search)
        try:
            if search:
                self._note_read_clock(server_clock(raw.headers.get("Date")))
            return json.loads(raw.data) if raw.data else {}
        except ValueError as exc:
            raise ConnectorError(
                self.name, ErrorKind.TRANSIENT, f"{what}: response was not JSON"
            ) from exc
        finally:
            raw.release_conn()  # back to the pool (the body is read)

    def read_changed_deals(
        self, since: datetime | None, fields: Sequence[str], until: datetime | None = None
    ) -> Iterator[list[Deal]]:
        """Keyset paging: each search starts at the last page's newest timestamp (`GTE`,
        skipping the deals already read at it), never at an offset. HubSpot's `after` is an
        offset into a result set that moves while we read: a deal edited meanwhile jumps to
        the end and the deal at the page boundary slides under the offset, never to be read
        (it is older than the cursor the read ends with). Keyset paging also never meets
        the 10,000-result ceiling of one query."""
        self.read_clock = None
        props = sorted(set(fields) | set(ALWAYS_READ))
        upper = (
            [{"propertyName": MODIFIED, "operator": "LTE", "value": _ms(until)}] if until else []
        )
        anchor, op = (_ms(since) if since else "0"), "GTE"
        at_anchor: set[str] = set()  # deals already read at the anchor's timestamp
        while True:
            groups = [[{"propertyName": MODIFIED, "operator": op, "value": anchor}, *upper]]
            page = self._search(groups, MODIFIED, props)
            deals = [self._deal(o) for o in page.results]
            fresh = [d for d in deals if d.id not in at_anchor or _ms(d.modified_at) != anchor]
            if fresh:
                yield fresh
            if not page.has_next or not deals:
                return
            newest = _ms(deals[-1].modified_at)
            if newest == anchor:
                # A whole page at one timestamp: the anchor cannot move. Drain that
                # timestamp in id order (HubSpot returns ties in no promised order).
                yield from self._drain_timestamp(
                    anchor, upper, props, at_anchor | {d.id for d in deals}
                )
                op, at_anchor = "GT", set()
                continue
            anchor, op = newest, "GTE"
            at_anchor = {d.id for d in deals if _ms(d.modified_at) == newest}

    def _drain_timestamp(
        self, stamp_ms: str, upper: list[dict], props: list[str], already: set[str]
    ) -> Iterator[list[Deal]]:
        """Every deal modified at exactly `stamp_ms`, by id (keyset again, not offsets)."""
        last_id = "0"
        while True:
            groups = [
                [
                    {"propertyName": MODIFIED, "operator": "EQ", "value": stamp_ms},
                    {"propertyName": "hs_object_id", "operator": "GT", "value": last_id},
                    *upper,
                ]
            ]
            page = self._search(groups, "hs_object_id", props)
            deals = [self._deal(o) for o in page.results]
            fresh = [d for d in deals if d.id not in already]
            if fresh:
                yield fresh
            if not page.has_next or not deals:
                return
            last_id = deals[-1].id

    def get_deals(self, deal_ids: Sequence[str], fields: Sequence[str]) -> list[Deal]:
        from hubspot.crm.deals import BatchReadInputSimplePublicObjectId

        props = sorted(set(fields) | set(ALWAYS_READ))
        out: list[Deal] = []
        for i in range(0, len(deal_ids), BATCH_LIMIT):
            chunk = deal_ids[i : i + BATCH_LIMIT]
            body = BatchReadInputSimplePublicObjectId(
                inputs=[{"id": d} for d in chunk], properties=props, properties_with_history=[]
            )
            resp = self._raw_json(
                "deals.batch.read",
                lambda body=body: self.client.crm.deals.batch_api.read(
                    batch_read_input_simple_public_object_id=body,
                    archived=False,
                    _request_timeout=self.policy.timeout,
                    _preload_content=False,
                ),
            )
            out.extend(self._deal(o) for o in resp.get("results") or [])
        return out

    # -- writes ---------------------------------------------------------------------------------
    def write_deal_fields(self, updates: Sequence[DealUpdate]) -> list[WriteOutcome]:
        from hubspot.crm.deals import BatchInputSimplePublicObjectBatchInput

        outcomes: list[WriteOutcome] = []
        for i in range(0, len(updates), BATCH_LIMIT):
            chunk = updates[i : i + BATCH_LIMIT]
            body = BatchInputSimplePublicObjectBatchInput(
                inputs=[
                    {"id": u.deal_id, "properties": {k: _text(v) for k, v in u.fields.items()}}
                    for u in chunk
                ]
            )
            try:
                errors = self._raw_json(
                    "deals.batch.update",
                    lambda body=body: self.client.crm.deals.batch_api.update(
                        batch_input_simple_public_object_batch_input=body,
                        _request_timeout=self.policy.timeout,
                        _preload_content=False,
                    ),
                ).get("errors")
            except ConnectorError as exc:
                if exc.kind is not ErrorKind.RECORD or len(chunk) == 1:
                    if exc.kind is ErrorKind.RECORD:
                        outcomes += [WriteOutcome(u.deal_id, False, exc.message) for u in chunk]
                        continue
                    raise
                # The whole batch was refused for one bad record: split to find it.
                half = len(chunk) // 2
                outcomes += self.write_deal_fields(chunk[:half])
                outcomes += self.write_deal_fields(chunk[half:])
                continue
            failed: dict[str, str] = {}
            for err in errors or []:
                ids = [str(x) for x in (err.get("context") or {}).get("ids", [])]
                for deal_id in ids:
                    failed[deal_id] = redact(str(err.get("message", "refused")))
            for u in chunk:
                if u.deal_id in failed:
                    outcomes.append(WriteOutcome(u.deal_id, False, failed[u.deal_id]))
                else:
                    outcomes.append(WriteOutcome(u.deal_id, True))
        return outcomes

    def field_names(self) -> set[str]:
        resp = self._call(
            "properties.get_all",
            lambda: self.client.crm.properties.core_api.get_all(
                object_type="deals", _request_timeout=self.policy.timeout
            ),
        )
        return {p.name for p in resp.results}

    def create_properties(self, names: Sequence[str], types: dict[str, str] | None = None) -> None:
        """Create missing custom deal properties (`check --create-missing`); `types` maps a
        name to a mapping type (number, date, ...), text otherwise."""
        from hubspot.crm.properties import PropertyCreate

        # https://developers.hubspot.com/docs/api/crm/properties (type / fieldType pairs)
        kinds = {
            "number": ("number", "number"),
            "integer": ("number", "number"),
            "date": ("date", "date"),
            "datetime": ("datetime", "date"),
            "bool": ("bool", "booleancheckbox"),
        }
        for name in names:
            prop_type, field_type = kinds.get((types or {}).get(name) or "", ("string", "text"))
            body = PropertyCreate(
                name=name,
                label=name.replace("_", " ").capitalize(),
                type=prop_type,
                field_type=field_type,
                group_name="dealinformation",
                description="Written by Handoff from delivery progress",
            )
            # https://developers.hubspot.com/docs/api/crm/properties
            self._call(
                "properties.create",
                lambda body=body: self.client.crm.properties.core_api.create(
                    object_type="deals", property_create=body, _request_timeout=self.policy.timeout
                ),
            )

    def add_timeline_entry(self, deal_id: str, text: str) -> None:
        # https://developers.hubspot.com/docs/api/crm/notes - note associated to the deal
        # with the HubSpot-defined note→deal association type 214.
        from hubspot.crm.objects.notes import SimplePublicObjectInputForCreate

        body = SimplePublicObjectInputForCreate(
            properties={"hs_note_body": text, "hs_timestamp": _ms(datetime.now(UTC))},
            associations=[
                {
                    "to": {"id": deal_id},
                    "types": [{"associationCategory": "HUBSPOT_DEFINED", "associationTypeId": 214}],
                }
            ],
        )
        self._call(
            "notes.create",
            lambda: self.client.crm.objects.notes.basic_api.create(
                simple_public_object_input_for_create=body, _request_timeout=self.policy.timeout
            ),
        )

    def check(self) -> str:
        stages = self.stage_statuses()
        won = sum(1 for s in stages.values() if s is DealStatus.WON)
        return f"HubSpot at {self.settings.base_url}: {won} closed-won stage(s)"


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, datetime):
        return _ms(value)
    return str(value)


def _error_message(body: Any) -> str:
    if not body:
        return ""
    try:
        import json

        data = json.loads(body)
        if isinstance(data, dict):
            return str(data.get("message") or data)
    except (ValueError, TypeError):
        pass
    return str(body)[:300]
