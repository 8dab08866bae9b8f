"""Shared machinery of the vendor emulators: fault injection, rate windows, request counting.

Every emulator is a Starlette app wrapped in :class:`EmulatorMiddleware`; the vendor module
supplies a :class:`VendorFlavor` that knows its own error bodies and rate-limit headers.
The `/_sandbox/*` control routes are ours, not the vendor's: tests and `handoff sandbox`
use them to count calls and to switch faults on and off in a running (even remote) emulator.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any, Protocol

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


@dataclass
class FaultConfig:
    """Probabilities (0..1) of each injected fault, drawn per request."""

    rate_429: float = 0.0
    retry_after: float | None = 1.0  # seconds; None = send no Retry-After (HubSpot does that)
    rate_5xx: float = 0.0
    latency_ms: float = 0.0
    rate_timeout: float = 0.0
    timeout_seconds: float = 30.0
    rate_reset: float = 0.0
    rate_apply_then_fail: float = 0.0  # writes only: commit the change, then 500 or drop
    seed: int | None = None

    def any_active(self) -> bool:
        return any(
            (
                self.rate_429,
                self.rate_5xx,
                self.latency_ms,
                self.rate_timeout,
                self.rate_reset,
                self.rate_apply_then_fail,
            )
        )


@dataclass
class Window:
    """A fixed window of `limit` requests per `seconds`, as the vendors document theirs."""

    name: str
    limit: int
    seconds: float
    _started: float = 0.0
    _used: int = 0

    def take(self, now: float) -> bool:
        if now - self._started >= self.seconds:
            self._started, self._used = now, 0
        if self._used >= self.limit:
            return False
        self._used += 1
        return True

    def remaining(self, now: float) -> int:
        if now - self._started >= self.seconds:
            return self.limit
        return max(0, self.limit - self._used)

    def reset_in(self, now: float) -> float:
        return max(0.0, self._started + self.seconds - now)


@dataclass
class SlidingWindow(Window):
    """At most `limit` requests in any `seconds`-long span (a rolling window): a request is
    allowed once the one `limit` places before it is `seconds` old."""

    # Some vendors count the requests they refuse against the quota too (Asana: "Requests
    # rejected by this limiter still count against the quotas").
    rejected_count: bool = False
    hits: deque = field(default_factory=deque)

    def _prune(self, now: float) -> None:
        while self.hits and self.hits[0] <= now - self.seconds:
            self.hits.popleft()

    def take(self, now: float) -> bool:
        self._prune(now)
        ok = len(self.hits) < self.limit
        if ok or self.rejected_count:
            self.hits.append(now)
        return ok

    def remaining(self, now: float) -> int:
        self._prune(now)
        return max(0, self.limit - len(self.hits))

    def reset_in(self, now: float) -> float:
        """Seconds until one more request is allowed (0 when one is allowed now)."""
        self._prune(now)
        if len(self.hits) < self.limit:
            return 0.0
        return max(0.0, self.hits[len(self.hits) - self.limit] + self.seconds - now)


@dataclass
class RateLimitConfig:
    enabled: bool = False
    # Multiply every documented rate by this (benchmarks run a scaled-up vendor; the ratio
    # to the floor is what counts).
    multiplier: float = 1.0


@dataclass
class RequestStats:
    """Counts of requests the emulator answered, by route name and outcome."""

    by_route: Counter = field(default_factory=Counter)
    writes: int = 0
    reads: int = 0
    throttled: int = 0
    faults: int = 0
    # Requests answered (any outcome) per whole second since the stats were reset: where a
    # rate-limited run left its budget unused (the benchmark reports it).
    started: float = field(default_factory=time.monotonic)
    per_second: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict[str, Any]:
        return {
            "by_route": dict(self.by_route),
            "per_second": {str(k): v for k, v in sorted(self.per_second.items())},
            "writes": self.writes,
            "reads": self.reads,
            "throttled": self.throttled,
            "faults": self.faults,
            "total": self.reads + self.writes,
        }


class VendorFlavor(Protocol):
    """What differs between vendors at the HTTP edge."""

    def windows_for(self, request: Request, rates: RateLimitConfig) -> list[Window]:
        """The rate windows this request draws on (empty when rate limiting is off)."""

    def too_many_requests(self, window: Window, retry_after: float | None) -> Response:
        """The vendor's own 429 (or 403 for Salesforce) response."""

    def server_error(self, status: int) -> Response:
        """The vendor's own 5xx body."""

    def rate_headers(self, request: Request, windows: list[Window], now: float) -> dict[str, str]:
        """Headers the vendor adds to every response (rate-limit counters)."""

    def route_name(self, request: Request) -> str:
        """A stable name for the route (e.g. `POST /crm/v3/objects/deals/search`)."""


def route_template(routes: list[Any], request: Request, prefix: str = "") -> str:
    """`METHOD /path/{param}` of the route serving `request`: a stable name for stats."""
    from starlette.routing import Match

    partial = None
    for route in routes:
        match, _ = route.matches(request.scope)
        if match == Match.FULL:
            return f"{request.method} {route.path.removeprefix(prefix)}"
        if match == Match.PARTIAL and partial is None:
            partial = route.path.removeprefix(prefix)
    return f"{request.method} {partial or 'unknown'}"


def bearer_token(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip() or None
    return None


class EmulatorControls:
    """Faults, rate limits and stats of one emulator; thread-safe, changed at run time."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.faults = FaultConfig()
        self.rates = RateLimitConfig()
        self.stats = RequestStats()
        self._rng = random.Random()
        self._windows: dict[str, Window] = {}
        # The emulator's clock (its state's, which tests move): every response carries it in
        # a `Date` header, as the vendors' servers send theirs (RFC 9110 §6.6.1).
        self.clock: Callable[[], datetime] = lambda: datetime.now(UTC)

    def set_faults(self, **values: Any) -> None:
        with self.lock:
            self.faults = FaultConfig(**values)
            self._rng = random.Random(self.faults.seed)

    def set_rate_limits(self, enabled: bool, multiplier: float = 1.0) -> None:
        with self.lock:
            self.rates = RateLimitConfig(enabled=enabled, multiplier=multiplier)
            self._windows.clear()

    def reset_stats(self) -> None:
        with self.lock:
            self.stats = RequestStats()

    def window(self, key: str, limit: float, seconds: float, kind: type[Window] = Window) -> Window:
        """The shared window named `key`, created on first use with the scaled limit (the
        window's length stays as documented: scaling the count keeps its shape)."""
        w = self._windows.get(key)
        if w is None:
            scaled = max(1, int(limit * self.rates.multiplier))
            w = self._windows[key] = kind(key, scaled, seconds)
        return w

    def draw(self, p: float) -> bool:
        return p > 0 and self._rng.random() < p


class EmulatorMiddleware:
    """Pure-ASGI middleware: control routes, rate limits, faults and counting."""

    def __init__(self, app: ASGIApp, controls: EmulatorControls, flavor: VendorFlavor) -> None:
        self.app = app
        self.controls = controls
        self.flavor = flavor

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        if path.startswith("/_sandbox/"):
            await self._control(scope, receive, send)
            return

        request = Request(scope, receive)
        c = self.controls
        method = scope["method"]
        classify = getattr(self.flavor, "is_write", None)
        is_write = classify(request) if classify else method in WRITE_METHODS
        now = time.monotonic()
        date = format_datetime(c.clock(), usegmt=True)
        with c.lock:
            faults = c.faults
            route = self.flavor.route_name(request)
            c.stats.per_second[int(now - c.stats.started)] += 1
            windows = self.flavor.windows_for(request, c.rates) if c.rates.enabled else []
            exhausted = next((w for w in windows if not w.take(now)), None)
            headers = {"Date": date, **self.flavor.rate_headers(request, windows, now)}
            if exhausted is not None:
                c.stats.throttled += 1
                c.stats.by_route[f"429 {route}"] += 1
                retry_after: float | None = exhausted.reset_in(now)
            inject_429 = exhausted is None and c.draw(faults.rate_429)
            inject_5xx = c.draw(faults.rate_5xx)
            inject_timeout = c.draw(faults.rate_timeout)
            inject_reset = c.draw(faults.rate_reset)
            apply_then_fail = is_write and c.draw(faults.rate_apply_then_fail)
            counted = exhausted is None and not inject_429
            if counted:
                c.stats.by_route[route] += 1
                if is_write:
                    c.stats.writes += 1
                else:
                    c.stats.reads += 1
            if inject_429 or inject_5xx or inject_timeout or inject_reset or apply_then_fail:
                c.stats.faults += 1

        if faults.latency_ms:
            await asyncio.sleep(faults.latency_ms / 1000.0)
        if exhausted is not None:
            await self._send(self.flavor.too_many_requests(exhausted, retry_after), headers, send)
            return
        if inject_429:
            w = Window("injected", 1, faults.retry_after or 1.0)
            await self._send(self.flavor.too_many_requests(w, faults.retry_after), headers, send)
            return
        if inject_timeout:
            await asyncio.sleep(faults.timeout_seconds)
            await self._send(self.flavor.server_error(504), headers, send)
            return
        if inject_reset:
            await _drop_connection(send)
            return
        if inject_5xx:
            status = random.choice((500, 502, 503))
            await self._send(self.flavor.server_error(status), headers, send)
            return
        if apply_then_fail:
            # The vendor committed the write; the client never learns it. This is the
            # "crash between create and link" fault seen from the network side.
            await self.app(scope, receive, _swallow)
            if random.random() < 0.5:
                await self._send(self.flavor.server_error(500), headers, send)
            else:
                await _drop_connection(send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                if message.get("status") == 429:
                    # A limit the endpoint enforces itself (Asana's concurrent jobs): a
                    # refusal like the windows', so counted with them.
                    with c.lock:
                        c.stats.throttled += 1
                        c.stats.by_route[route] -= 1
                        c.stats.by_route[f"429 {route}"] += 1
                        if is_write:
                            c.stats.writes -= 1
                        else:
                            c.stats.reads -= 1
                raw = list(message.get("headers", []))
                raw += [(k.lower().encode(), v.encode()) for k, v in headers.items()]
                message = {**message, "headers": raw}
            await send(message)

        await self.app(scope, receive, send_with_headers)

    async def _send(self, response: Response, headers: dict[str, str], send: Send) -> None:
        for k, v in headers.items():
            response.headers.setdefault(k, v)

        async def _noop_receive() -> Message:
            return {"type": "http.disconnect"}

        await response({"type": "http"}, _noop_receive, send)

    async def _control(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        c = self.controls
        action = scope["path"].removeprefix("/_sandbox/")
        body: dict[str, Any] = {}
        if scope["method"] == "POST":
            raw = await request.body()
            if raw:
                body = await request.json()
        if action == "stats":
            with c.lock:
                payload: dict[str, Any] = c.stats.as_dict()
        elif action == "reset-stats":
            c.reset_stats()
            payload = {"ok": True}
        elif action == "faults":
            if scope["method"] == "POST":
                c.set_faults(**body)
            payload = asdict(c.faults)
        elif action == "rate-limits":
            if scope["method"] == "POST":
                c.set_rate_limits(bool(body.get("enabled")), float(body.get("multiplier", 1.0)))
            payload = asdict(c.rates)
        else:
            payload = {"error": f"unknown sandbox control {action!r}"}
            await JSONResponse(payload, status_code=404)(scope, receive, send)
            return
        await JSONResponse(payload)(scope, receive, send)


async def _swallow(message: Message) -> None:
    return None


async def _drop_connection(send: Send) -> None:
    """Promise a body and break off: the client sees the connection end mid-response."""
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json"), (b"content-length", b"1000")],
        }
    )
    await send({"type": "http.response.body", "body": b'{"partial', "more_body": True})
    raise ConnectionResetError("sandbox: injected connection reset")
