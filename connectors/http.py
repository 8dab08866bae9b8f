"""The shared HTTP layer: one retry policy (tenacity), one client-side rate budget
(pyrate-limiter), and an httpx wrapper that classifies every failure.

Connectors built on vendor SDKs (hubspot-api-client, simple-salesforce) use `call_with_retry`
with their own exception translator; httpx connectors use `JsonApi`.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any, Protocol, TypeVar

import httpx
import structlog
import tenacity
from pydantic import BaseModel, ConfigDict, Field
from pyrate_limiter import Duration, InMemoryBucket, Limiter, Rate

from connectors.errors import ConnectorError, ErrorKind, kind_for_status
from connectors.secrets import redact

log = structlog.get_logger("handoff.http")
T = TypeVar("T")


class RetryPolicy(BaseModel):
    """How hard to retry a transient failure; configurable per connection."""

    model_config = ConfigDict(extra="forbid")

    attempts: int = Field(6, ge=1, le=50, description="tries in all, the first included")
    initial_wait: float = Field(0.5, ge=0, description="seconds before the first retry")
    max_wait: float = Field(30.0, ge=0, description="cap on one wait (full jitter below it)")
    max_retry_after: float = Field(120.0, ge=0, description="cap on a vendor's Retry-After")
    timeout: float = Field(30.0, gt=0, description="seconds for one HTTP request")


class _WaitRetryAfter(tenacity.wait.wait_base):
    """Full-jitter exponential backoff, unless the vendor said how long to wait."""

    def __init__(self, policy: RetryPolicy) -> None:
        self.policy = policy

    def __call__(self, retry_state: tenacity.RetryCallState) -> float:
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        if isinstance(exc, ConnectorError) and exc.retry_after is not None:
            # A little jitter on top so replicas told the same Retry-After do not stampede.
            told = min(exc.retry_after, self.policy.max_retry_after)
            return told + random.uniform(0, min(1.0, told * 0.1 + 0.05))
        ceiling = min(
            self.policy.max_wait, self.policy.initial_wait * 2 ** (retry_state.attempt_number - 1)
        )
        return random.uniform(0, ceiling)


def _is_transient(exc: BaseException) -> bool:
    return (
        isinstance(exc, ConnectorError)
        and exc.kind is ErrorKind.TRANSIENT
        and getattr(exc, "retryable", True)
    )


def call_with_retry(
    system: str,
    policy: RetryPolicy,
    fn: Callable[[], T],
    translate: Callable[[Exception], ConnectorError | None],
    *,
    what: str = "",
    on_auth_failure: Callable[[], bool] | None = None,
) -> T:
    """Run `fn`, translating its failures and retrying the transient ones.

    `on_auth_failure` is tried once on a 401 (a token refresh); when it returns True the
    call is repeated, otherwise the auth error stands. Only idempotent calls, or creates
    guarded by the claim-and-stamp protocol, may come through here.
    """
    refreshed = False

    def attempt() -> T:
        nonlocal refreshed
        try:
            return fn()
        except ConnectorError:
            raise
        except Exception as exc:  # translated below; anything untranslatable propagates
            err = translate(exc)
            if err is None:
                raise
            if (
                err.kind is ErrorKind.AUTH
                and err.status == 401
                and on_auth_failure
                and not refreshed
            ):
                refreshed = True
                if on_auth_failure():
                    return attempt()
            raise err from None

    def before_sleep(state: tenacity.RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        log.warning(
            "http.retry",
            system=system,
            call=what,
            attempt=state.attempt_number,
            wait_s=round(state.upcoming_sleep, 3),
            error=redact(str(exc)),
        )

    retrying = tenacity.Retrying(
        stop=tenacity.stop_after_attempt(policy.attempts),
        wait=_WaitRetryAfter(policy),
        retry=tenacity.retry_if_exception(_is_transient),
        before_sleep=before_sleep,
        reraise=True,
    )
    try:
        return retrying(attempt)
    except ConnectorError as err:
        if getattr(err, "connect_failed", False):
            # Never got a connection, every try: the system is down or misaddressed. That
            # stops the run (exit 3) instead of parking every record behind it.
            err.kind = ErrorKind.UNREACHABLE
        raise


class Limits(Protocol):
    """What `RateBudget` needs of a limiter: pyrate-limiter's `Limiter`, or a wrapper of one
    (the shared budgets in `connectors.shared_budget`)."""

    def try_acquire(self, name: str) -> Any: ...


class SharedPause(Protocol):
    """A pause seen by every replica that shares a budget (the vendor said "wait")."""

    def extend(self, seconds: float) -> None: ...

    def remaining(self) -> float: ...


class _ServerWindow:
    """A vendor's fixed window as its headers report it: `left` more requests may go before
    `reset_at` (a Unix time), counting requests still in flight as spent.

    Why not the client's own log: a fixed window restarts whole at its reset, so a run that
    stalls anywhere in one minute loses nothing in the next; a sliding log instead releases
    each minute's requests at the pace the previous minute sent them, so every stall (a page
    end, a slow call) is carried into every later minute.
    """

    def __init__(self) -> None:
        self.reset_at = 0.0
        self.left = 0

    def live(self, now: float) -> bool:
        return now < self.reset_at

    def says(self, remaining: int, reset_at: float, others: int) -> None:
        """A response said `remaining` at `reset_at` while `others` requests of ours were
        in flight (each may yet be counted after it)."""
        if reset_at > self.reset_at + 1:  # a later window (resets are whole seconds, rounded)
            self.reset_at, self.left = reset_at, max(0, remaining - others)
        elif reset_at >= self.reset_at - 1:  # the same window: trust the lowest count
            self.left = min(self.left, max(0, remaining - others))
        # else: an answer from a window already gone


# pyrate-limiter sleeps until a slot frees plus this margin. Its default (50 ms) caps a
# connection whose threads all wait on a full window: every thread but the one that wins the
# freed slot sleeps the margin again, so eight threads make at most ~8 calls per 50 ms and a
# sliding window whose previous minute ran faster than that falls further behind each minute.
_WAKE_MARGIN_MS = 2


class RateBudget:
    """Client-side rate limiting for one connection: the vendor's documented windows,
    paused further whenever the vendor's headers say the budget is spent.

    In-process by default; `limiter` and `shared_pause` put the windows and the pause in a
    store that several replicas share (see `connectors.shared_budget`). A vendor whose headers
    report a fixed window (`server_window`) is paced by those instead while they are current.
    """

    def __init__(
        self,
        rates: list[tuple[int, float]],
        limiter: Limits | None = None,
        shared_pause: SharedPause | None = None,
    ) -> None:
        self.rates = rates
        self._limiter: Limits | None = limiter or (
            Limiter(
                InMemoryBucket([Rate(n, int(s * Duration.SECOND)) for n, s in rates]),
                buffer_ms=_WAKE_MARGIN_MS,
            )
            if rates
            else None
        )
        self._shared_pause = shared_pause
        self._paused_until = 0.0
        self._lock = threading.Lock()
        self._server: _ServerWindow | None = None
        self._in_flight = 0

    def acquire(self, key: str = "default") -> None:
        wait = self._paused_until - time.monotonic()
        if self._shared_pause is not None:
            wait = max(wait, self._shared_pause.remaining())
        if wait > 0:
            time.sleep(wait)
        server = self._server
        while server is not None:
            with self._lock:
                now = time.time()
                if not server.live(now):
                    break  # no current count (a new window opens): the documented rate paces
                if server.left > 0:
                    server.left -= 1
                    self._in_flight += 1
                    return
                wait = server.reset_at - now
            time.sleep(wait)
        if self._limiter is not None:
            self._limiter.try_acquire(key)
        with self._lock:
            self._in_flight += 1

    def answered(self) -> None:
        """A request this budget let through got its answer (or failed to)."""
        with self._lock:
            self._in_flight -= 1

    def server_window(self, remaining: int, reset_at: float) -> None:
        """The vendor reported its fixed window: `remaining` requests until `reset_at` (a Unix
        time). Called before `answered` for the request that brought the report."""
        with self._lock:
            if self._server is None:
                self._server = _ServerWindow()
            self._server.says(remaining, reset_at, others=max(0, self._in_flight - 1))

    def pause(self, seconds: float) -> None:
        """Hold every caller of this budget back for `seconds` (the vendor said so)."""
        with self._lock:
            self._paused_until = max(self._paused_until, time.monotonic() + seconds)
        if self._shared_pause is not None:
            self._shared_pause.extend(seconds)


# Builds a connection's budget from a purpose ("requests", "search") and its windows
# [(requests, seconds)]; whoever builds connectors passes one to share budgets between replicas.
BudgetFactory = Callable[[str, list[tuple[int, float]]], RateBudget]


def local_budget(purpose: str, rates: list[tuple[int, float]]) -> RateBudget:
    """The in-process budget: what a connector uses when no `BudgetFactory` is given."""
    return RateBudget(rates)


class VendorHttp(Protocol):
    """What an httpx connector tells `JsonApi` about its vendor."""

    system: str

    def error_message(self, response: httpx.Response) -> str: ...

    def retry_after(self, response: httpx.Response) -> float | None: ...

    def observe(self, response: httpx.Response, budget: RateBudget) -> None: ...


def translate_httpx(system: str, exc: Exception) -> ConnectorError | None:
    if isinstance(exc, httpx.TimeoutException):
        return ConnectorError(system, ErrorKind.TRANSIENT, f"timed out ({type(exc).__name__})")
    if isinstance(exc, httpx.TransportError):
        err = ConnectorError(
            system, ErrorKind.TRANSIENT, f"connection failed: {type(exc).__name__}: {exc}"
        )
        err.connect_failed = isinstance(exc, httpx.ConnectError)  # type: ignore[attr-defined]
        return err
    return None


_COUNT_LOCK = threading.Lock()


@dataclass
class JsonApi:
    """An httpx client for one connection: retries, rate budget, call counting."""

    vendor: VendorHttp
    client: httpx.Client
    policy: RetryPolicy
    budget: RateBudget
    calls: Counter
    # Per thread: a change read on one thread must not see the clock of a create on another.
    _dates: threading.local = field(default_factory=threading.local, repr=False)
    # The newest `Date` any thread received (its text, its clock, the monotonic time it
    # arrived): parsed once per new text, i.e. at most once a second, not per response.
    _newest_date: tuple[str, datetime, float] | None = field(default=None, repr=False)

    def server_clock(self) -> datetime | None:
        """`server_clock` of the last response this thread received."""
        return server_clock(getattr(self._dates, "value", None))

    def server_now(self) -> datetime | None:
        """The system's clock now, without a request: the newest `server_clock` any thread
        saw, plus the time since it arrived (never later than the system's real clock). None
        before the first response with a `Date`."""
        newest = self._newest_date
        if newest is None:
            return None
        return newest[1] + timedelta(seconds=time.monotonic() - newest[2])

    def _saw_date(self, header: str | None) -> None:
        self._dates.value = header
        newest = self._newest_date
        if not header or (newest is not None and header == newest[0]):
            return  # the first arrival of this Date already gives the (earlier) estimate
        clock = server_clock(header)
        if clock is not None:
            arrived = time.monotonic()
            # The estimate each implies for now: keep the later (a slow response's Date is old).
            if newest is None or clock - newest[1] > timedelta(seconds=arrived - newest[2]):
                self._newest_date = (header, clock, arrived)

    def request(
        self,
        method: str,
        url: str,
        *,
        route: str,
        params: Mapping[str, Any] | list[tuple[str, Any]] | None = None,
        json: Any = None,
        idempotent: bool | None = None,
    ) -> Any:
        """Send one request (retried when transient) and return the decoded JSON body.

        A non-idempotent request (a POST that creates) is retried only when the vendor
        cannot have applied it: a 429, or a connection that never opened. Otherwise the
        failure is returned as transient and the caller's claim-and-stamp protocol decides.
        """
        system = self.vendor.system
        if idempotent is None:
            idempotent = method.upper() != "POST"

        def send() -> Any:
            self.budget.acquire()
            with _COUNT_LOCK:  # the engine creates projects from several threads at once
                self.calls[route] += 1
            try:
                response = self.client.request(method, url, params=params, json=json)
                self._saw_date(response.headers.get("date"))
                self.vendor.observe(response, self.budget)
            finally:
                self.budget.answered()
            if response.status_code >= 400:
                retry_after = self.vendor.retry_after(response)
                if response.status_code == 429 and retry_after:
                    # The same cap as the retry's own wait (`_WaitRetryAfter`).
                    self.budget.pause(min(retry_after, self.policy.max_retry_after))
                raise ConnectorError(
                    system,
                    kind_for_status(response.status_code),
                    redact(self.vendor.error_message(response)),
                    status=response.status_code,
                    retry_after=retry_after,
                )
            if response.status_code == 204 or not response.content:
                return None
            try:
                return response.json()
            except ValueError as exc:
                raise ConnectorError(
                    system, ErrorKind.TRANSIENT, f"{route}: response was not JSON"
                ) from exc

        def translate(exc: Exception) -> ConnectorError | None:
            err = translate_httpx(system, exc)
            if err is not None and not idempotent and not isinstance(exc, httpx.ConnectError):
                err.retryable = False  # type: ignore[attr-defined]
            return err

        def guarded() -> Any:
            try:
                return send()
            except ConnectorError as err:
                if not idempotent and err.status != 429:
                    err.retryable = False  # type: ignore[attr-defined]
                raise

        return call_with_retry(system, self.policy, guarded, translate, what=route)


def server_clock(date_header: str | None) -> datetime | None:
    """A response's `Date` (RFC 9110 §6.6.1: the server's clock, whole seconds), less the
    second it may have been truncated by: a time the request was certainly not served
    before. None when absent or unreadable."""
    if not date_header:
        return None
    try:
        when = parsedate_to_datetime(date_header)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # "-0000": UTC by RFC 5322
        when = when.replace(tzinfo=UTC)
    return when - timedelta(seconds=1)


def parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None
