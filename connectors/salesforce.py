"""Salesforce CRM through simple-salesforce: Opportunities read by SOQL, written by sObject
Collections, progress notes logged as completed Tasks.

- Won is `IsWon` (derived by Salesforce from the stage's OpportunityStage row), never the stage
  name, so custom won stages work; lost is `IsClosed and not IsWon`.
- Changes are read with one `queryAll` ordered by `(SystemModstamp, Id)`: a query cursor is a
  snapshot, so paging it with `nextRecordsUrl` reads each row once however many rows share a
  SystemModstamp. If the cursor dies between pages (15 idle minutes, or an eleventh cursor
  opened by the same user) the read re-anchors on the last (SystemModstamp, Id) it yielded.
  `queryAll` also returns Recycle Bin rows, which become `DealStatus.DELETED` at no extra cost.
- A session comes from the OAuth token endpoint (password, refresh-token or JWT-bearer grant;
  SOAP `login()` when a password is given without a connected app) and is renewed once on a
  401 INVALID_SESSION_ID.
- Salesforce has no per-second limit but a rolling 24-hour org allocation shared with every
  other integration: calls are paced client-side, `Sforce-Limit-Info` is read after every
  response, Handoff slows down near the allocation and stops short of it, and a 403
  REQUEST_LIMIT_EXCEEDED is a transient failure with a long wait (never an auth failure).
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal, TypeVar

import requests
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from connectors.base import CRM, Deal, DealStatus, DealUpdate, WriteOutcome
from connectors.errors import AUTH_HINT, ConnectorError, ErrorKind, kind_for_status
from connectors.http import (
    BudgetFactory,
    RetryPolicy,
    call_with_retry,
    local_budget,
    server_clock,
)
from connectors.secrets import redact, register_secret

T = TypeVar("T")

# https://developer.salesforce.com/docs/atlas.en-us.api_rest.meta/api_rest/resources_composite_sobjects_collections.htm
# "The list can contain up to 200 objects"; retrieve takes up to 2,000 ids.
COLLECTION_MAX = 200
RETRIEVE_MAX = 2000
# SOQL by `Id IN (...)` travels in the URI: Salesforce allows 16,384 bytes of URI + headers
# (https://help.salesforce.com/s/articleView?id=000386264), ~26 bytes per encoded id.
SOQL_ID_CHUNK = 100
# https://developer.salesforce.com/docs/atlas.en-us.object_reference.meta/object_reference/sforce_api_objects_task.htm
TASK_SUBJECT_MAX = 255
TASK_DESCRIPTION_MAX = 32_000
JWT_LIFETIME = timedelta(minutes=3)  # "exp ... within 3 minutes" (JWT bearer flow docs)

ALWAYS_READ = ("Id", "Name", "StageName", "IsWon", "IsClosed", "IsDeleted", "SystemModstamp")
_FIELD_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*(\.[A-Za-z][A-Za-z0-9_]*)*$")
_API_USAGE = re.compile(r"api-usage=(\d+)/(\d+)")
_NUMBER_TYPES = {"double", "currency", "percent", "int", "long"}
_TEXT_TYPES = {
    "string",
    "textarea",
    "picklist",
    "multipicklist",
    "combobox",
    "url",
    "email",
    "phone",
    "encryptedstring",
}


class SalesforceAuth(BaseModel):
    """One of three logins; secret fields carry the names the config loader redacts.

    - password: `username` + `password` (+ `security_token` unless the IP range is trusted);
      with `client_id` + `client_secret` the OAuth username-password grant, without them SOAP
      `login()`. Both are being retired (the OAuth flow is blocked by default in orgs created
      since Summer '23; SOAP `login()` retires in Summer '27): prefer the other two.
    - refresh token: `client_id` (+ `client_secret` when the app requires it) + `refresh_token`.
    - JWT bearer: `client_id` + `username` + `private_key_file` or `private_key` (PEM).
    """

    model_config = ConfigDict(extra="forbid")
    username: str | None = None
    password: str | None = None
    security_token: str | None = None
    client_id: str | None = Field(None, description="connected app consumer key")
    client_secret: str | None = Field(None, description="connected app consumer secret")
    refresh_token: str | None = None
    private_key_file: str | None = Field(None, description="PEM file for the JWT bearer flow")
    private_key: str | None = Field(None, description="PEM text for the JWT bearer flow")
    audience: str | None = Field(
        None, description="JWT `aud`; defaults to login_url (e.g. https://test.salesforce.com)"
    )

    @property
    def method(self) -> Literal["password", "refresh_token", "jwt"]:
        if self.password:
            return "password"
        if self.refresh_token:
            return "refresh_token"
        return "jwt"

    @model_validator(mode="after")
    def _exactly_one_method(self) -> SalesforceAuth:
        usage = (
            "give exactly one login: (a) username + password [+ security_token] "
            "[+ client_id + client_secret], (b) client_id [+ client_secret] + refresh_token, "
            "or (c) client_id + username + private_key_file or private_key (JWT bearer)"
        )
        chosen = [
            name
            for name, given in (
                ("password", self.password),
                ("refresh_token", self.refresh_token),
                ("private_key/private_key_file", self.private_key or self.private_key_file),
            )
            if given
        ]
        if len(chosen) != 1:
            found = " and ".join(chosen) if chosen else "none of password/refresh_token/private_key"
            raise ValueError(f"{usage}; got {found}")

        def forbid(*names: str) -> None:
            extra = [n for n in names if getattr(self, n)]
            if extra:
                raise ValueError(f"{', '.join(extra)} not used by the {self.method} login; {usage}")

        if self.method == "password":
            if not self.username:
                raise ValueError(f"password login needs username; {usage}")
            if bool(self.client_id) != bool(self.client_secret):
                raise ValueError("the OAuth password grant needs both client_id and client_secret")
            forbid("audience")
        elif self.method == "refresh_token":
            if not self.client_id:
                raise ValueError(f"refresh_token login needs client_id; {usage}")
            forbid("username", "security_token", "audience")
        else:
            if not (self.client_id and self.username):
                raise ValueError(f"JWT bearer login needs client_id and username; {usage}")
            if self.private_key and self.private_key_file:
                raise ValueError("give private_key_file or private_key, not both")
            forbid("client_secret", "security_token")
        return self


class SalesforceSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["salesforce"]
    instance_url: str | None = Field(
        None,
        description="pin the org's URL (My Domain); by default the one the login returns",
    )
    login_url: str = Field(
        "https://login.salesforce.com",
        description="https://test.salesforce.com for sandboxes, or the org's My Domain",
    )
    api_version: str = Field("59.0", pattern=r"^\d{2,3}\.0$")
    ca_bundle: str | None = Field(
        None, description="CA file to trust (a private CA, the sandbox); verification stays on"
    )
    auth: SalesforceAuth
    retry: RetryPolicy = Field(default_factory=RetryPolicy)
    # The allocation is per rolling 24 hours, not per second: pacing is courtesy to the org.
    # https://developer.salesforce.com/docs/atlas.en-us.salesforce_app_limits_cheatsheet.meta/salesforce_app_limits_cheatsheet/salesforce_app_limits_platform_api.htm
    requests_per_second: float = Field(25.0, gt=0)
    api_usage_slow_at: float = Field(
        0.8, gt=0, le=1, description="share of the daily allocation used above which to slow down"
    )
    near_limit_requests_per_second: float = Field(1.0, gt=0)
    api_usage_stop_at: float = Field(
        0.95, gt=0, le=1, description="stop the run above this share (leave the rest to others)"
    )
    api_usage_recheck_seconds: float = Field(
        300.0, gt=0, description="after this long a reading over the reserve no longer stops calls"
    )
    limit_exceeded_wait: float = Field(
        300.0, ge=0, description="seconds to wait after REQUEST_LIMIT_EXCEEDED (capped by retry)"
    )
    # https://developer.salesforce.com/docs/atlas.en-us.api_rest.meta/api_rest/headers_queryoptions.htm
    query_batch_size: int = Field(2000, ge=200, le=2000)

    @field_validator("login_url", "instance_url")
    @classmethod
    def _no_trailing_slash(cls, value: str | None) -> str | None:
        return value.rstrip("/") if value else value

    @model_validator(mode="after")
    def _slow_before_stop(self) -> SalesforceSettings:
        if self.api_usage_slow_at > self.api_usage_stop_at:
            raise ValueError("api_usage_slow_at must not exceed api_usage_stop_at")
        return self


class SalesforceApiError(ConnectorError):
    """A classified failure that also keeps Salesforce's `errorCode`."""

    def __init__(self, *args: Any, code: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.code = code


class _TimeoutSession(requests.Session):
    """simple-salesforce passes no timeout on most calls; every request gets one here."""

    def __init__(self, timeout: float) -> None:
        super().__init__()
        self.timeout = timeout

    def request(self, method: str | bytes, url: str | bytes, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("timeout", self.timeout)
        return super().request(method, url, *args, **kwargs)


def _rate(per_second: float) -> list[tuple[int, float]]:
    if per_second >= 1:
        return [(int(round(per_second)), 1.0)]
    return [(1, 1.0 / per_second)]


class SalesforceCRM(CRM):
    kind = "salesforce"
    write_batch_size = COLLECTION_MAX

    def __init__(
        self,
        name: str,
        settings: SalesforceSettings,
        client: Any = None,
        *,
        budgets: BudgetFactory | None = None,
    ) -> None:
        super().__init__()
        self.name = name
        self.settings = settings
        self.policy = settings.retry
        make_budget = budgets or local_budget
        self.budget = make_budget("requests", _rate(settings.requests_per_second))
        self.slow_budget = make_budget("near_limit", _rate(settings.near_limit_requests_per_second))
        auth = settings.auth
        for secret in (
            auth.password,
            auth.security_token,
            auth.client_secret,
            auth.refresh_token,
            auth.private_key,
        ):
            register_secret(secret)
        self.api_usage: tuple[int, int] | None = None  # (used, allocation) from the last reply
        self._usage_read_at = 0.0
        self._dates = threading.local()  # each thread's last `Date` header (see read_clock)
        self._lock = threading.Lock()
        self._field_types: dict[str, tuple[str, str]] | None = None  # lower -> (name, type)
        self.user_id: str | None = None
        # No network here (connectors are built before `check`): log in on the first call.
        if client is not None:
            self.session = client.session
            self._sf: Any = client
            self.instance_url = settings.instance_url or f"https://{client.sf_instance}"
        else:
            self.session = self._new_session()
            self._sf = None
            self.instance_url = settings.instance_url or ""
        self.session.hooks["response"].append(self._observe)

    def _new_session(self) -> requests.Session:
        session = _TimeoutSession(self.policy.timeout)
        if self.settings.ca_bundle:
            # requests lets REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE override `session.verify`
            # whenever trust_env is on, silently swapping the configured CA for another.
            session.trust_env = False
            session.verify = self.settings.ca_bundle
        return session

    def close(self) -> None:
        self.session.close()

    # -- plumbing -----------------------------------------------------------------------------
    @property
    def sf(self) -> Any:
        """The simple-salesforce client, logged in on first use."""
        with self._lock:
            if self._sf is None:
                self._login()
            return self._sf

    def _observe(self, response: requests.Response, *args: Any, **kwargs: Any) -> None:
        # https://developer.salesforce.com/docs/atlas.en-us.api_rest.meta/api_rest/headers_api_usage.htm
        # "Sforce-Limit-Info: api-usage=18/5000" on every REST response (errors included).
        self._dates.value = response.headers.get("Date")
        m = _API_USAGE.search(response.headers.get("Sforce-Limit-Info", ""))
        if m:
            self.api_usage = (int(m.group(1)), int(m.group(2)))
            self._usage_read_at = time.monotonic()

    def _usage(self) -> tuple[int, int] | None:
        """The last `api-usage` reading, if recent enough to act on (the allocation is a
        rolling 24 hours, so an old reading says little)."""
        usage = self.api_usage
        age = time.monotonic() - self._usage_read_at
        if usage and usage[1] and age < self.settings.api_usage_recheck_seconds:
            return usage
        return None

    def _check_reserve(self) -> None:
        """Refuse to start a call once the org's allocation is used past `api_usage_stop_at`:
        the rest is left to the org's other integrations and people."""
        usage = self._usage()
        if usage and usage[0] >= usage[1] * self.settings.api_usage_stop_at:
            used, total = usage
            err = SalesforceApiError(
                self.name,
                ErrorKind.TRANSIENT,
                f"the org's daily API allocation is nearly spent ({used:,} of {total:,} "
                f"requests in the last 24 hours); Handoff stops at "
                f"{self.settings.api_usage_stop_at:.0%} to leave the rest to other "
                "integrations, and the next run resumes where this one stopped",
                code="API_USAGE_RESERVE",
            )
            err.retryable = False  # type: ignore[attr-defined]
            raise err

    def _pace(self) -> None:
        usage = self._usage()
        if usage and usage[0] >= usage[1] * self.settings.api_usage_slow_at:
            self.slow_budget.acquire()
        self.budget.acquire()

    def _call(self, what: str, fn: Callable[[Any], T], *, idempotent: bool = True) -> T:
        """One API call: log in if needed, pace, count, translate failures, retry transients.

        A call that is not idempotent (a create) is retried only when Salesforce cannot have
        applied it: the allocation refused it, the session was refused, or no connection
        opened. Otherwise the transient failure is returned to the engine, which parks it.
        """

        def once() -> T:
            sf = self.sf
            self._pace()
            self.calls[what] += 1
            try:
                return fn(sf)
            except Exception as exc:
                if idempotent or _never_applied(exc):
                    raise
                err = self._translate(exc)
                if err is None or err.status == 401:
                    raise
                err.retryable = False  # type: ignore[attr-defined]
                raise err from None

        # The reserve is checked once per call, not per attempt: a call refused with 403
        # REQUEST_LIMIT_EXCEEDED is retried after the long wait even though the 403's own
        # reading says the allocation is spent (the rolling window frees requests over time).
        self._check_reserve()

        def reauth() -> bool:
            # 401 INVALID_SESSION_ID: the session expired or was revoked. Log in again once;
            # the next attempt does it (so a transient login failure is retried too).
            with self._lock:
                self._sf = None
            return True

        return call_with_retry(
            self.name, self.policy, once, self._translate, what=what, on_auth_failure=reauth
        )

    def _translate(self, exc: Exception) -> ConnectorError | None:
        from simple_salesforce.exceptions import SalesforceAuthenticationFailed, SalesforceError

        if isinstance(exc, SalesforceAuthenticationFailed):
            code = exc.code
            if isinstance(code, int) and code >= 500:
                return SalesforceApiError(
                    self.name, ErrorKind.TRANSIENT, f"login failed: HTTP {code}", status=code
                )
            return SalesforceApiError(
                self.name,
                ErrorKind.AUTH,
                redact(f"login refused: {code}: {exc.auth_message}; {AUTH_HINT}"),
                code=str(code),
            )
        if isinstance(exc, SalesforceError):
            status = int(exc.status)
            code, message = _error_detail(exc.content)
            text = redact(f"{code}: {message}" if code else message)
            if status == 403 and code == "REQUEST_LIMIT_EXCEEDED":
                # https://developer.salesforce.com/docs/atlas.en-us.api_rest.meta/api_rest/errorcodes.htm
                # 403 REQUEST_LIMIT_EXCEEDED: the org's 24-hour allocation is spent. No
                # Retry-After: wait long, hold every caller of this connection back too.
                wait = min(self.settings.limit_exceeded_wait, self.policy.max_retry_after)
                self.budget.pause(wait)
                return SalesforceApiError(
                    self.name,
                    ErrorKind.TRANSIENT,
                    f"{text} (the org's daily API allocation is spent; other integrations "
                    "share it)",
                    status=403,
                    retry_after=self.settings.limit_exceeded_wait,
                    code=code,
                )
            if status == 401:
                return SalesforceApiError(
                    self.name, ErrorKind.AUTH, f"{text}; {AUTH_HINT}", status=401, code=code
                )
            if status == 403:
                return SalesforceApiError(
                    self.name,
                    ErrorKind.AUTH,
                    f"{text}; the integration user lacks a permission ({AUTH_HINT})",
                    status=403,
                    code=code,
                )
            if status == 400 and code == "INVALID_FIELD":
                column = re.search(r"No such column '([^']+)'", message)
                if column:
                    text = (
                        f"Opportunity has no field '{column.group(1)}' (INVALID_FIELD): check "
                        "the mapping's deal fields (handoff check lists them)"
                    )
            return SalesforceApiError(
                self.name, kind_for_status(status), text, status=status, code=code
            )
        if isinstance(exc, requests.exceptions.SSLError):
            # A certificate the session does not trust: configuration, not a blip.
            return SalesforceApiError(
                self.name,
                ErrorKind.UNREACHABLE,
                f"TLS verification failed ({_root_cause(exc)}); set ca_bundle for a private CA",
            )
        if isinstance(exc, requests.exceptions.Timeout):
            return SalesforceApiError(
                self.name, ErrorKind.TRANSIENT, f"timed out ({type(exc).__name__})"
            )
        if isinstance(
            exc, requests.exceptions.ConnectionError | requests.exceptions.ChunkedEncodingError
        ):
            err = SalesforceApiError(
                self.name, ErrorKind.TRANSIENT, f"connection failed: {_root_cause(exc)}"
            )
            err.connect_failed = _never_applied(exc)  # type: ignore[attr-defined]
            return err
        if isinstance(exc, ValueError) and "JSON" in type(exc).__name__ + str(exc):
            return SalesforceApiError(self.name, ErrorKind.TRANSIENT, "response was not JSON")
        return None

    # -- login --------------------------------------------------------------------------------
    def _login(self) -> None:
        """Get a session (caller holds the lock) and build the simple-salesforce client."""
        from simple_salesforce import Salesforce

        auth = self.settings.auth
        if auth.method == "password" and not auth.client_id:
            session_id, instance_url = self._soap_login()
        else:
            session_id, instance_url = self._oauth_login()
        register_secret(session_id)
        self.instance_url = self.settings.instance_url or instance_url.rstrip("/")
        self._sf = Salesforce(
            instance_url=self.instance_url,
            session_id=session_id,
            session=self.session,
            version=self.settings.api_version,
            object_pairs_hook=dict,
        )

    def _oauth_login(self) -> tuple[str, str]:
        # https://help.salesforce.com/s/articleView?id=sf.remoteaccess_oauth_endpoints.htm
        auth = self.settings.auth
        if auth.method == "password":
            # https://help.salesforce.com/s/articleView?id=sf.remoteaccess_oauth_username_password_flow.htm
            # The security token is appended to the password.
            form = {
                "grant_type": "password",
                "client_id": auth.client_id,
                "client_secret": auth.client_secret,
                "username": auth.username,
                "password": (auth.password or "") + (auth.security_token or ""),
            }
        elif auth.method == "refresh_token":
            # https://help.salesforce.com/s/articleView?id=sf.remoteaccess_oauth_refresh_token_flow.htm
            form = {
                "grant_type": "refresh_token",
                "client_id": auth.client_id,
                "refresh_token": auth.refresh_token,
            }
            if auth.client_secret:
                form["client_secret"] = auth.client_secret
        else:
            form = {
                "grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer",
                "assertion": self._jwt_assertion(),
            }
        url = f"{self.settings.login_url}/services/oauth2/token"
        self.calls["oauth.token"] += 1
        try:
            resp = self.session.post(url, data=form, headers={"Accept": "application/json"})
        except requests.RequestException as exc:
            err = self._translate(exc)
            raise err if err else exc from None
        try:
            body = resp.json()
        except ValueError:
            body = None
        if resp.status_code >= 500 or (resp.status_code == 200 and not isinstance(body, dict)):
            raise SalesforceApiError(
                self.name,
                ErrorKind.TRANSIENT,
                f"OAuth token endpoint failed (HTTP {resp.status_code})",
                status=resp.status_code,
            )
        if resp.status_code != 200 or "access_token" not in body:
            # {"error": "invalid_grant", "error_description": "authentication failure"}
            error = body.get("error") if isinstance(body, dict) else None
            detail = body.get("error_description") if isinstance(body, dict) else resp.text[:200]
            raise SalesforceApiError(
                self.name,
                ErrorKind.AUTH,
                redact(f"OAuth {auth.method} login refused: {error}: {detail}; {AUTH_HINT}"),
                code=error,
            )
        register_secret(body["access_token"])
        identity = str(body.get("id") or "")
        self.user_id = identity.rsplit("/", 1)[-1] or None
        return body["access_token"], str(body.get("instance_url") or self.settings.instance_url)

    def _jwt_assertion(self) -> str:
        # https://help.salesforce.com/s/articleView?id=sf.remoteaccess_oauth_jwt_flow.htm
        # RS256; iss = consumer key, sub = username, aud = the login server, exp <= 3 minutes.
        import jwt

        auth = self.settings.auth
        if auth.private_key_file:
            try:
                key = Path(auth.private_key_file).read_text()
            except OSError as exc:
                raise SalesforceApiError(
                    self.name, ErrorKind.AUTH, f"cannot read private_key_file: {exc.strerror}"
                ) from None
        else:
            key = auth.private_key or ""
        claims = {
            "iss": auth.client_id,
            "sub": auth.username,
            "aud": auth.audience or self.settings.login_url,
            "exp": int((datetime.now(UTC) + JWT_LIFETIME).timestamp()),
        }
        try:
            return jwt.encode(claims, key, algorithm="RS256")
        except (ValueError, TypeError, jwt.PyJWTError) as exc:
            raise SalesforceApiError(
                self.name, ErrorKind.AUTH, f"private key unusable for RS256: {type(exc).__name__}"
            ) from None

    def _soap_login(self) -> tuple[str, str]:
        # https://developer.salesforce.com/docs/atlas.en-us.api.meta/api/sforce_api_calls_login.htm
        # (available up to API 64.0; retiring in Summer '27.) simple-salesforce builds the URL
        # from a "domain"; `scratch_url` is its way to aim at an explicit login server.
        from simple_salesforce import SalesforceLogin

        auth = self.settings.auth
        self.calls["soap.login"] += 1
        try:
            session_id, instance = SalesforceLogin(
                username=auth.username,
                password=auth.password,
                security_token=auth.security_token,
                sf_version=self.settings.api_version,
                session=self.session,
                scratch_url=self.settings.login_url,
            )
        except Exception as exc:
            err = self._translate(exc)
            if err is None:
                raise
            raise err from None
        return session_id, f"https://{instance}"

    # -- reads ----------------------------------------------------------------------------------
    def _query_headers(self) -> dict[str, str]:
        return {"Sforce-Query-Options": f"batchSize={self.settings.query_batch_size}"}

    def _query(self, soql: str) -> dict[str, Any]:
        # https://developer.salesforce.com/docs/atlas.en-us.api_rest.meta/api_rest/resources_queryall.htm
        return self._call(
            "queryAll",
            lambda sf: sf.query(soql, include_deleted=True, headers=self._query_headers()),
        )

    def _query_more(self, next_url: str) -> dict[str, Any]:
        # https://developer.salesforce.com/docs/atlas.en-us.api_rest.meta/api_rest/dome_query.htm
        # `nextRecordsUrl` is relative ("/services/data/v59.0/queryAll/01g...-2000").
        return self._call(
            "queryAll.more",
            lambda sf: sf.query_more(
                next_url, identifier_is_url=True, headers=self._query_headers()
            ),
        )

    def _select(self, fields: Sequence[str]) -> str:
        names = list(ALWAYS_READ)
        seen = {n.lower() for n in names}
        for f in fields:
            if not _FIELD_NAME.match(f):
                raise SalesforceApiError(
                    self.name, ErrorKind.RECORD, f"{f!r} is not a Salesforce field name"
                )
            if f.lower() not in seen:  # SOQL refuses a field selected twice
                seen.add(f.lower())
                names.append(f)
        return ", ".join(names)

    def read_changed_deals(
        self, since: datetime | None, fields: Sequence[str], until: datetime | None = None
    ) -> Iterator[list[Deal]]:
        # SystemModstamp has second precision, so flooring both bounds is exact: a record's
        # t >= floor(since) includes `since` itself; t <= until iff t <= floor(until).
        where = []
        if since is not None:
            where.append(f"SystemModstamp >= {_soql_datetime(since)}")
        if until is not None:
            where.append(f"SystemModstamp <= {_soql_datetime(until)}")
        select = self._select(fields)

        def soql(extra: list[str]) -> str:
            conds = where + extra
            clause = f" WHERE {' AND '.join(conds)}" if conds else ""
            # Equal ORDER BY keys come back in no promised order: Id makes paging exact.
            return f"SELECT {select} FROM Opportunity{clause} ORDER BY SystemModstamp ASC, Id ASC"

        last: Deal | None = None
        self.read_clock = None
        page = self._query(soql([]))
        self._note_read_clock(server_clock(getattr(self._dates, "value", None)))
        while True:
            deals = [self._deal(r, fields) for r in page.get("records") or []]
            if deals:
                last = deals[-1]
                yield deals
            next_url = page.get("nextRecordsUrl")
            if page.get("done", True) or not next_url:
                return
            try:
                page = self._query_more(next_url)
            except SalesforceApiError as err:
                if err.code != "INVALID_QUERY_LOCATOR" or last is None:
                    raise
                # The cursor expired (15 idle minutes) or was released (a user keeps 10):
                # https://developer.salesforce.com/docs/atlas.en-us.soql_sosl.meta/soql_sosl/sforce_api_calls_soql_select_limits.htm
                # Re-anchor after the last (SystemModstamp, Id) yielded.
                ts = _soql_datetime(last.modified_at)
                after = f"(SystemModstamp > {ts} OR (SystemModstamp = {ts} AND Id > '{last.id}'))"
                page = self._query(soql([after]))

    def get_deals(self, deal_ids: Sequence[str], fields: Sequence[str]) -> list[Deal]:
        ids = list(dict.fromkeys(deal_ids))
        select = self._select(fields)
        out: list[Deal] = []
        if any("." in f for f in fields):
            # Relationship paths (Account.Name) need SOQL; ids travel in the URI, in chunks.
            for i in range(0, len(ids), SOQL_ID_CHUNK):
                chunk = ", ".join(f"'{_safe_id(self.name, d)}'" for d in ids[i : i + SOQL_ID_CHUNK])
                page = self._query(f"SELECT {select} FROM Opportunity WHERE Id IN ({chunk})")
                while True:
                    out += [self._deal(r, fields) for r in page.get("records") or []]
                    if page.get("done", True) or not page.get("nextRecordsUrl"):
                        break
                    page = self._query_more(page["nextRecordsUrl"])
            return out
        # https://developer.salesforce.com/docs/atlas.en-us.api_rest.meta/api_rest/resources_composite_sobjects_collections_retrieve.htm
        # POST (ids in the body, up to 2,000): records in the order asked, null when missing
        # or deleted.
        names = select.split(", ")
        for i in range(0, len(ids), RETRIEVE_MAX):
            body = {
                "ids": [_safe_id(self.name, d) for d in ids[i : i + RETRIEVE_MAX]],
                "fields": names,
            }
            records = self._call(
                "composite.sobjects.retrieve",
                lambda sf, body=body: sf.restful(
                    "composite/sobjects/Opportunity", method="POST", json=body
                ),
            )
            out += [self._deal(r, fields) for r in records or [] if r]
        return out

    def _deal(self, record: Mapping[str, Any], fields: Sequence[str]) -> Deal:
        props: dict[str, Any] = {k: v for k, v in record.items() if k != "attributes"}
        for f in fields:
            # Salesforce answers in the API name's own case ("Amount" for "amount") and nests
            # relationship paths; give each requested name its value under that name.
            props[f] = _path_value(record, f)
        if record.get("IsDeleted"):
            status = DealStatus.DELETED
        elif record.get("IsWon"):
            status = DealStatus.WON
        elif record.get("IsClosed"):
            status = DealStatus.LOST
        else:
            status = DealStatus.OPEN
        rid = str(record["Id"])
        return Deal(
            id=rid,
            modified_at=_parse_datetime(str(record["SystemModstamp"])),
            status=status,
            properties=props,
            url=f"{self.instance_url}/lightning/r/Opportunity/{rid}/view",
        )

    # -- writes ---------------------------------------------------------------------------------
    def write_deal_fields(self, updates: Sequence[DealUpdate]) -> list[WriteOutcome]:
        # One record per deal (a collection refuses a duplicate id): later fields win.
        merged: dict[str, dict[str, Any]] = {}
        for u in updates:
            merged.setdefault(u.deal_id, {}).update(u.fields)
        outcomes: list[WriteOutcome] = []
        todo = [(d, f) for d, f in merged.items() if f]
        outcomes += [WriteOutcome(d, True) for d, f in merged.items() if not f]
        if not todo:
            return outcomes
        types = self._types()
        records = [
            (
                deal_id,
                {"attributes": {"type": "Opportunity"}, "id": deal_id, **self._coerce(f, types)},
            )
            for deal_id, f in todo
        ]
        for i in range(0, len(records), COLLECTION_MAX):
            outcomes += self._write_chunk(records[i : i + COLLECTION_MAX])
        return outcomes

    def _write_chunk(self, chunk: list[tuple[str, dict[str, Any]]]) -> list[WriteOutcome]:
        # https://developer.salesforce.com/docs/atlas.en-us.api_rest.meta/api_rest/resources_composite_sobjects_collections_update.htm
        # allOrNone false: each record saves or fails alone; results come in request order.
        body = {"allOrNone": False, "records": [rec for _, rec in chunk]}
        try:
            results = self._call(
                "composite.sobjects.update",
                lambda sf: sf.restful("composite/sobjects", method="PATCH", json=body),
            )
        except ConnectorError as exc:
            if exc.kind is not ErrorKind.RECORD:
                raise
            if len(chunk) == 1:
                return [WriteOutcome(chunk[0][0], False, exc.message)]
            # The whole request was refused (a value Salesforce cannot deserialize fails the
            # request, not the record): split to find the bad record.
            half = len(chunk) // 2
            return self._write_chunk(chunk[:half]) + self._write_chunk(chunk[half:])
        results = results if isinstance(results, list) else []
        out = []
        for n, (deal_id, _) in enumerate(chunk):
            result = results[n] if n < len(results) else None
            if isinstance(result, dict) and result.get("success"):
                out.append(WriteOutcome(deal_id, True))
            else:
                out.append(WriteOutcome(deal_id, False, _save_errors(result)))
        return out

    def _types(self) -> dict[str, tuple[str, str]]:
        if self._field_types is None:
            self._describe()
        assert self._field_types is not None
        return self._field_types

    def _describe(self) -> dict[str, Any]:
        # https://developer.salesforce.com/docs/atlas.en-us.api_rest.meta/api_rest/resources_sobject_describe.htm
        desc = self._call("describe.Opportunity", lambda sf: sf.Opportunity.describe())
        self._field_types = {f["name"].lower(): (f["name"], f["type"]) for f in desc["fields"]}
        return desc

    def _coerce(
        self, fields: Mapping[str, Any], types: Mapping[str, tuple[str, str]]
    ) -> dict[str, Any]:
        out = {}
        for key, value in fields.items():
            name, ftype = types.get(key.lower(), (key, ""))
            out[name] = _coerce_value(value, ftype)
        return out

    def field_names(self) -> set[str]:
        return {f["name"] for f in self._describe()["fields"]}

    def add_timeline_entry(self, deal_id: str, text: str) -> None:
        # A completed Task related to the Opportunity shows in its activity timeline.
        # https://developer.salesforce.com/docs/atlas.en-us.object_reference.meta/object_reference/sforce_api_objects_task.htm
        lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
        subject = (lines[0] if lines else "Handoff update")[:TASK_SUBJECT_MAX]
        task = {
            "Subject": subject,
            "WhatId": deal_id,
            "Status": "Completed",
            "ActivityDate": datetime.now(UTC).date().isoformat(),
            "Description": text[:TASK_DESCRIPTION_MAX],
        }
        result = self._call("Task.create", lambda sf: sf.Task.create(task), idempotent=False)
        if isinstance(result, dict) and result.get("success") is False:
            raise SalesforceApiError(self.name, ErrorKind.RECORD, _save_errors(result))

    def check(self) -> str:
        desc = self._describe()
        usage = ""
        if self.api_usage:
            used, total = self.api_usage
            usage = f"; API usage {used:,}/{total:,} in the last 24 h"
        who = f" as user {self.user_id}" if self.user_id else ""
        return (
            f"Salesforce {self.instance_url} (API v{self.settings.api_version}){who}: "
            f"Opportunity has {len(desc['fields'])} fields{usage}"
        )


# -- helpers ------------------------------------------------------------------------------------
def _soql_datetime(when: datetime) -> str:
    # https://developer.salesforce.com/docs/atlas.en-us.soql_sosl.meta/soql_sosl/sforce_api_calls_soql_select_dateformats.htm
    # "YYYY-MM-DDThh:mm:ssZ", unquoted; second precision like SystemModstamp itself.
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_datetime(text: str) -> datetime:
    # REST dateTime values look like "2024-01-15T10:23:45.000+0000".
    dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


def _safe_id(system: str, value: str) -> str:
    # Ids are spliced into SOQL: only the documented 15/18 alphanumeric form gets through.
    if not re.fullmatch(r"[A-Za-z0-9]{15}(?:[A-Za-z0-9]{3})?", value):
        raise SalesforceApiError(system, ErrorKind.RECORD, f"{value!r} is not a record id")
    return value


def _path_value(record: Mapping[str, Any], path: str) -> Any:
    current: Any = record
    for part in path.split("."):
        if not isinstance(current, Mapping):
            return None
        if part in current:
            current = current[part]
            continue
        lowered = part.lower()
        current = next((v for k, v in current.items() if k.lower() == lowered), None)
    return current


def _coerce_value(value: Any, ftype: str) -> Any:
    """A Python value as JSON Salesforce accepts for a field of this describe type."""
    if value is None:
        return None  # clears the field
    if isinstance(value, Decimal):
        value = float(value)
    if ftype == "boolean":
        if isinstance(value, str):
            text = value.strip().lower()
            if text in ("true", "yes", "1"):
                return True
            if text in ("false", "no", "0", ""):
                return False
            return value
        return bool(value)
    if ftype in _NUMBER_TYPES:
        if isinstance(value, bool):
            return int(value)
        if isinstance(value, str):
            try:
                value = float(value.strip().rstrip("%"))
            except ValueError:
                return value  # let Salesforce say what is wrong with it
        if isinstance(value, float) and ftype in ("int", "long") and value.is_integer():
            return int(value)
        return value
    if ftype == "date":
        if isinstance(value, datetime):
            return value.date().isoformat()
        if isinstance(value, date):
            return value.isoformat()
        return value
    if ftype == "datetime":
        if isinstance(value, datetime):
            return _iso_datetime(value)
        if isinstance(value, date):
            return _iso_datetime(datetime(value.year, value.month, value.day, tzinfo=UTC))
        return value
    if ftype in _TEXT_TYPES:
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, datetime):
            return _iso_datetime(value)
        if isinstance(value, date):
            return value.isoformat()
        return value if isinstance(value, str) else str(value)
    # Unknown field (Salesforce will say so per record) or type: by Python type.
    if isinstance(value, datetime):
        return _iso_datetime(value)
    if isinstance(value, date):
        return value.isoformat()
    return value


def _iso_datetime(value: datetime) -> str:
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return (
        value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"
    )


def _error_detail(content: Any) -> tuple[str | None, str]:
    # https://developer.salesforce.com/docs/atlas.en-us.api_rest.meta/api_rest/errorcodes.htm
    # [{"message": "...", "errorCode": "...", "fields": [...]}]
    if isinstance(content, list) and content and isinstance(content[0], dict):
        first = content[0]
        return first.get("errorCode"), str(first.get("message", ""))[:500]
    if isinstance(content, dict):
        return content.get("errorCode") or content.get("error"), str(
            content.get("message") or content.get("error_description") or content
        )[:500]
    if isinstance(content, bytes):
        content = content.decode(errors="replace")
    return None, str(content)[:300]


def _save_errors(result: Any) -> str:
    errors = result.get("errors") if isinstance(result, dict) else None
    if not errors:
        return "Salesforce returned no result for this record"
    parts = []
    for e in errors:
        fields = ", ".join(e.get("fields") or [])
        parts.append(
            f"{e.get('statusCode')}: {e.get('message')}" + (f" [{fields}]" if fields else "")
        )
    return redact("; ".join(parts))


def _root_cause(exc: BaseException) -> str:
    while exc.__context__ is not None and exc.__context__ is not exc:
        exc = exc.__context__
    reason = getattr(exc, "reason", None)
    text = str(reason or exc)
    return text[:200]


def _never_applied(exc: BaseException) -> bool:
    """True when the request cannot have reached Salesforce's application (safe to resend)."""
    from simple_salesforce.exceptions import SalesforceError
    from urllib3.exceptions import NewConnectionError

    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return True
    if isinstance(exc, requests.exceptions.ConnectionError):
        inner = exc.args[0] if exc.args else None
        return isinstance(getattr(inner, "reason", None), NewConnectionError)
    if isinstance(exc, SalesforceError):
        code, _ = _error_detail(exc.content)
        return exc.status == 401 or (exc.status == 403 and code == "REQUEST_LIMIT_EXCEEDED")
    return False
