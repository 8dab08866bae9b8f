"""Rate budgets shared between replicas: each connection's windows are counted in Redis or in
the PostgreSQL state database through pyrate-limiter's `RedisBucket` / `PostgresBucket`, so
any number of `handoff run` processes together stay within the vendor's budget; a vendor's
"wait" (Retry-After, X-RateLimit-Reset) is stored beside it so that every replica honours it.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import threading
import time
import zlib
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

import structlog
from pyrate_limiter import AbstractBucket, Rate, RateItem

from connectors.errors import ConnectorError, ErrorKind
from connectors.http import BudgetFactory, RateBudget, SharedPause
from connectors.secrets import redact

log = structlog.get_logger("handoff.rate_budget")

SharedKind = Literal["none", "redis", "postgres"]
# pyrate-limiter's Leaker thread is not used: a backend blip would end it for good and the
# shared log would then grow without bound. Each budget trims its log inline once a window,
# at most this long apart (PostgresBucket counts every row it keeps on each request).
LEAK_EVERY_SECONDS = 10.0
# Sleep this much past the moment a window frees, so the retry does not find it still full.
WAKE_MARGIN_SECONDS = 0.005


@dataclass(frozen=True)
class SharedBudgetSettings:
    """Where the budgets live. `url` is a Redis URL, or a libpq URL of the state database."""

    shared: SharedKind = "none"
    url: str | None = None
    key_prefix: str = "handoff"


def bucket_key(prefix: str, kind: str, connection: str, purpose: str) -> str:
    """The same in every process for one connection's budget, different per connection."""
    return f"{prefix}:{kind}:{connection}:{purpose}"


def _without_password(url: str) -> str:
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


class SharedBudgetBackend(ABC):
    """One store of budgets (a Redis server, the state database), opened on first use."""

    description: str  # for people: where the budget lives, never with a password
    errors: tuple[type[BaseException], ...]  # the backend's own failures

    @abstractmethod
    def bucket(self, key: str, rates: list[Rate]) -> AbstractBucket:
        """A pyrate-limiter bucket for `key` (network calls allowed: called lazily)."""

    @abstractmethod
    def pause(self, key: str) -> SharedPause:
        """The shared pause for `key`; its calls may raise the backend's errors."""

    def close(self) -> None:  # noqa: B027 - nothing to release unless opened
        pass


class RedisBudgetBackend(SharedBudgetBackend):
    """Budgets in Redis: a sorted set per budget (pyrate-limiter's Lua script checks and adds
    atomically), a key with a PX expiry per pause.

    RedisBucket stamps requests with this machine's wall clock: keep the replicas' clocks in
    sync (NTP); a skew of d seconds lets a window admit its requests up to d early.
    """

    # Lua, so that reading the pause left and lengthening it is one atomic step: a pause
    # never shortens another replica's longer one.
    _EXTEND_PAUSE = """
    local left = redis.call('PTTL', KEYS[1])
    if left < tonumber(ARGV[1]) then
        redis.call('SET', KEYS[1], '1', 'PX', ARGV[1])
    end
    return left
    """

    def __init__(self, url: str) -> None:
        import redis

        self.url = url
        self.description = f"Redis at {_without_password(url)}"
        self.errors = (redis.RedisError,)
        self._client: Any = None
        self._extend: Any = None
        self._lock = threading.Lock()

    @property
    def client(self) -> Any:
        with self._lock:
            if self._client is None:
                import redis

                # Short timeouts: a Redis that does not answer must fail the call (and be
                # retried), not hang the run.
                self._client = redis.Redis.from_url(
                    self.url, socket_timeout=5, socket_connect_timeout=5
                )
                self._extend = self._client.register_script(self._EXTEND_PAUSE)
            return self._client

    def bucket(self, key: str, rates: list[Rate]) -> AbstractBucket:
        from pyrate_limiter import RedisBucket

        script = self.client.script_load(_redis_put_script())
        return RedisBucket(rates, self.client, key, script)

    def pause(self, key: str) -> SharedPause:
        return _RedisPause(self, f"{key}:pause")

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None


# pyrate-limiter's script counts the window up to the new request's own stamp. Replicas stamp
# with their own clocks just before the script runs, so a replica whose stamp is a moment
# older than requests already stored does not count them, and two racing replicas both find
# room (measured: 6 requests in 0.9 s on a budget of 5 a second, 6 replicas). Counting to
# +inf includes them; it can only make the budget stricter.
_LIBRARY_COUNT = "redis.call('ZCOUNT', bucket, window_start, now)"
_COUNT_ALL_SINCE = "redis.call('ZCOUNT', bucket, window_start, '+inf')"


def _redis_put_script() -> str:
    from pyrate_limiter.buckets.redis_bucket import LuaScript

    if _LIBRARY_COUNT not in LuaScript.PUT_ITEM:
        raise RuntimeError(
            "pyrate-limiter's RedisBucket script changed: review connectors/shared_budget.py"
        )
    return LuaScript.PUT_ITEM.replace(_LIBRARY_COUNT, _COUNT_ALL_SINCE)


class _RedisPause:
    def __init__(self, backend: RedisBudgetBackend, key: str) -> None:
        self.backend, self.key = backend, key

    def extend(self, seconds: float) -> None:
        if seconds > 0:
            client = self.backend.client
            self.backend._extend(keys=[self.key], args=[max(1, int(seconds * 1000))], client=client)

    def remaining(self) -> float:
        # PTTL counts on the Redis server's clock: no skew between replicas.
        left = self.backend.client.pttl(self.key)
        return max(0, int(left)) / 1000


def postgres_table(key: str) -> str:
    """A table name for a budget key: readable, unique (hashed), and short enough that
    pyrate-limiter's prefixes stay within PostgreSQL's 63-byte identifiers."""
    slug = re.sub(r"[^a-z0-9]+", "_", key.lower()).strip("_")[:36]
    return f"{slug}_{hashlib.sha256(key.encode()).hexdigest()[:8]}"


PAUSE_TABLE = "handoff_rate_pause"


class PostgresBudgetBackend(SharedBudgetBackend):
    """Budgets in the state database: pyrate-limiter's table per budget (`ratelimit___*`,
    checked and filled under a table lock, stamped with the database clock), and one small
    table of pauses, both created on first use."""

    def __init__(self, conninfo: str) -> None:
        import psycopg

        self.conninfo = conninfo
        self.description = f"PostgreSQL at {_without_password(conninfo)}"
        self.errors = (psycopg.Error,)  # psycopg_pool's PoolTimeout is one too
        self._pool: Any = None
        self._pause_table_ready = False
        self._lock = threading.Lock()

    @property
    def pool(self) -> Any:
        with self._lock:
            if self._pool is None:
                from psycopg_pool import ConnectionPool

                # A few connections: budgets of one process take turns per budget anyway.
                self._pool = ConnectionPool(
                    self.conninfo,
                    min_size=1,
                    max_size=4,
                    timeout=5,
                    open=True,
                    configure=_no_commit_wait,
                    name="handoff-rate-budget",
                )
            return self._pool

    def bucket(self, key: str, rates: list[Rate]) -> AbstractBucket:
        from pyrate_limiter import PostgresBucket

        return PostgresBucket(self.pool, postgres_table(key), rates)

    def pause(self, key: str) -> SharedPause:
        return _PostgresPause(self, key)

    def ensure_pause_table(self) -> None:
        if self._pause_table_ready:
            return
        with self.pool.connection() as conn:
            # CREATE TABLE IF NOT EXISTS races between processes (pg_type's unique index):
            # the first replica creates it while the others wait on the advisory lock.
            conn.execute(
                "SELECT pg_advisory_xact_lock(%s)", (zlib.crc32(PAUSE_TABLE.encode()) & 0x7FFFFFFF,)
            )
            conn.execute(
                f"CREATE TABLE IF NOT EXISTS {PAUSE_TABLE} "
                "(bucket TEXT PRIMARY KEY, until TIMESTAMPTZ NOT NULL)"
            )
        self._pause_table_ready = True

    def close(self) -> None:
        with self._lock:
            if self._pool is not None:
                self._pool.close()
                self._pool = None


def _no_commit_wait(conn: Any) -> None:
    # Budget rows matter for one window: losing the last few to a database crash costs
    # nothing, waiting for the WAL flush on every request costs most of an acquire.
    conn.execute("SET synchronous_commit TO off")
    conn.commit()


class _PostgresPause:
    def __init__(self, backend: PostgresBudgetBackend, key: str) -> None:
        self.backend, self.key = backend, key

    def extend(self, seconds: float) -> None:
        if seconds <= 0:
            return
        self.backend.ensure_pause_table()
        with self.backend.pool.connection() as conn:
            conn.execute(
                f"INSERT INTO {PAUSE_TABLE} (bucket, until) "
                "VALUES (%s, clock_timestamp() + make_interval(secs => %s)) "
                "ON CONFLICT (bucket) DO UPDATE "
                f"SET until = GREATEST({PAUSE_TABLE}.until, EXCLUDED.until)",
                (self.key, seconds),
            )

    def remaining(self) -> float:
        self.backend.ensure_pause_table()
        with self.backend.pool.connection() as conn:
            # The database clock for both ends: no skew between replicas.
            row = conn.execute(
                f"SELECT EXTRACT(EPOCH FROM until - clock_timestamp()) FROM {PAUSE_TABLE} "
                "WHERE bucket = %s",
                (self.key,),
            ).fetchone()
        return max(0.0, float(row[0])) if row else 0.0


@contextmanager
def _as_connector_error(backend: SharedBudgetBackend, connection: str) -> Iterator[None]:
    """A failing budget store stops calls the way an unreachable system does: retried with
    backoff, then the run stops (exit 3) instead of calling the vendor unpaced."""
    try:
        yield
    except backend.errors as exc:
        err = ConnectorError(
            connection,
            ErrorKind.TRANSIENT,
            redact(
                f"the shared rate budget ({backend.description}) failed: "
                f"{type(exc).__name__}: {exc}; check that it is up and rate_budget in the "
                "config, or set rate_budget.shared: none to pace each replica alone"
            ),
        )
        err.connect_failed = True  # type: ignore[attr-defined]
        raise err from None


class _SharedLimiter:
    """Acquires from a pyrate-limiter bucket in a shared store, built on first use (building
    a connector makes no network call) and trimmed inline.

    Not through pyrate-limiter's blocking `Limiter`: after a wait it re-puts the request
    stamped with the time it planned to wake (`item.timestamp += delay`), so a replica that
    overslept (a busy host) records its request earlier than it was sent, and the shared
    window then admits the next ones too early. Here each attempt is stamped by the clock.
    """

    def __init__(
        self, backend: SharedBudgetBackend, key: str, rates: list[Rate], connection: str
    ) -> None:
        self.backend, self.key, self.rates, self.connection = backend, key, rates, connection
        self._bucket: AbstractBucket | None = None
        self._next_leak = 0.0
        self._leak_every = min(LEAK_EVERY_SECONDS, max(r.interval for r in rates) / 1000)
        self._lock = threading.Lock()

    def try_acquire(self, name: str) -> bool:
        with _as_connector_error(self.backend, self.connection):
            while True:
                with self._lock:  # the bucket keeps its last verdict: one thread at a time
                    if self._bucket is None:
                        self._bucket = self.backend.bucket(self.key, self.rates)
                    bucket = self._bucket
                    try:
                        decision = bucket.put_decision(RateItem(name, bucket.now()))
                    except self.backend.errors:
                        # Built again on the next try: a restarted Redis has forgotten the
                        # loaded script (NOSCRIPT), a recreated database the table.
                        self._bucket = None
                        raise
                    if decision.allowed:
                        self._leak_if_due(bucket)
                        return True
                if decision.retry_after_ms is None:
                    # PostgresBucket refuses without a wait when another replica holds the
                    # table's lock (LOCK ... NOWAIT): try again in a moment.
                    time.sleep(random.uniform(0.002, 0.02))
                else:
                    time.sleep(decision.retry_after_ms / 1000 + WAKE_MARGIN_SECONDS)

    def _leak_if_due(self, bucket: AbstractBucket) -> None:
        if time.monotonic() >= self._next_leak:
            self._next_leak = time.monotonic() + self._leak_every
            bucket.leak(bucket.now())


class _GuardedPause:
    def __init__(self, pause: SharedPause, backend: SharedBudgetBackend, connection: str) -> None:
        self.pause, self.backend, self.connection = pause, backend, connection

    def extend(self, seconds: float) -> None:
        # Best effort: this replica's own pause holds regardless, and the other replicas
        # would learn the same from their own 429s.
        try:
            self.pause.extend(seconds)
        except self.backend.errors as exc:
            log.warning(
                "rate_budget.pause_not_shared",
                connection=self.connection,
                error=redact(f"{type(exc).__name__}: {exc}"),
            )

    def remaining(self) -> float:
        with _as_connector_error(self.backend, self.connection):
            return self.pause.remaining()


class SharedBudgets:
    """Makes the budgets of every connection of one process on one backend."""

    def __init__(self, backend: SharedBudgetBackend, key_prefix: str = "handoff") -> None:
        self.backend = backend
        self.key_prefix = key_prefix

    def for_connection(self, kind: str, connection: str) -> BudgetFactory:
        """The `BudgetFactory` a connector of `kind` named `connection` builds its budgets with."""

        def make(purpose: str, rates: list[tuple[int, float]]) -> RateBudget:
            key = bucket_key(self.key_prefix, kind, connection, purpose)
            windows = [Rate(n, max(1, int(seconds * 1000))) for n, seconds in rates]
            limiter = _SharedLimiter(self.backend, key, windows, connection) if rates else None
            pause = _GuardedPause(self.backend.pause(key), self.backend, connection)
            return RateBudget(rates, limiter=limiter, shared_pause=pause)

        return make


_backends: dict[tuple[int, str, str], SharedBudgetBackend] = {}
_backends_lock = threading.Lock()


def shared_budgets(settings: SharedBudgetSettings) -> SharedBudgets | None:
    """The shared budgets for `settings`, or None for in-process budgets (`shared: none`).

    One backend (one Redis client, one connection pool) per process and URL, however many
    times connectors are built; a forked child opens its own (a pool's connections and
    threads do not survive a fork).
    """
    if settings.shared == "none":
        return None
    if not settings.url:
        raise ValueError(f"rate_budget.shared: {settings.shared} needs a URL")
    key = (os.getpid(), settings.shared, settings.url)
    with _backends_lock:
        backend = _backends.get(key)
        if backend is None:
            backend = (
                RedisBudgetBackend(settings.url)
                if settings.shared == "redis"
                else PostgresBudgetBackend(settings.url)
            )
            _backends[key] = backend
    return SharedBudgets(backend, settings.key_prefix)
