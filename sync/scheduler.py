"""The daemon (`handoff run`): APScheduler runs each pipeline on its schedule, never two of
one pipeline at once (coalesce + one instance + the state-store lease, so cron-started runs
and other replicas never overlap either), and stops cleanly: on SIGTERM the page in hand is
finished, the run is recorded as interrupted, and the lease released. Every few seconds it
also works slices of backfill plans (`handoff backfill --slices`), one at a time, beside any
other replicas; a pipeline's sync waits while a backfill of it is unfinished.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import structlog
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from state.backfill_slices import BackfillSlices
from state.store import StateStore
from sync.backfill_plan import work_backfill
from sync.config import LoadedConfig, PipelineConfig, parse_duration
from sync.runner import Connections, PipelineResult, new_owner, run_pipeline

log = structlog.get_logger("handoff.daemon")


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        labels = ["pipeline"]
        self.runs = Counter(
            "handoff_runs", "Pipeline runs by outcome", [*labels, "status"], registry=self.registry
        )
        self.records = Counter(
            "handoff_records", "Records by outcome", [*labels, "outcome"], registry=self.registry
        )
        self.api_calls = Counter(
            "handoff_api_calls", "API calls", [*labels, "connection"], registry=self.registry
        )
        self.parked = Gauge(
            "handoff_parked_records", "Dead letters now", labels, registry=self.registry
        )
        self.last_success = Gauge(
            "handoff_last_success_timestamp_seconds",
            "Unix time of the last successful run",
            labels,
            registry=self.registry,
        )
        self.throttled = Counter(
            "handoff_http_429", "429 responses received", ["connection"], registry=self.registry
        )

    def observe(self, result: PipelineResult, parked: int) -> None:
        name = result.name
        self.runs.labels(name, result.status).inc()
        c = result.counts
        for outcome in ("created", "adopted", "updated", "unchanged", "skipped", "dead_lettered"):
            self.records.labels(name, outcome).inc(getattr(c, outcome))
        for conn, n in result.api_calls.items():
            self.api_calls.labels(name, conn).inc(n)
        self.parked.labels(name).set(parked)
        if result.status in ("ok", "partial"):
            self.last_success.labels(name).set(time.time())


class _Health(BaseHTTPRequestHandler):
    daemon: Daemon

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        if self.path == "/healthz":
            ok = self.daemon.healthy()
            body = b"ok\n" if ok else b"stopping\n"
            self._send(200 if ok else 503, body, "text/plain")
        elif self.path == "/metrics":
            self._send(200, generate_latest(self.daemon.metrics.registry), CONTENT_TYPE_LATEST)
        else:
            self._send(404, b"not found\n", "text/plain")

    def _send(self, status: int, body: bytes, ctype: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        return None


class Daemon:
    def __init__(
        self,
        loaded: LoadedConfig,
        *,
        metrics_port: int | None = None,
        owner: str | None = None,
        backfill_every: float = 5.0,
    ) -> None:
        self.loaded = loaded
        self.owner = owner or new_owner()
        self.store = StateStore(loaded.state_url)
        self.connections = Connections(loaded)
        self.metrics = Metrics()
        self.stopping = threading.Event()
        self.scheduler = BackgroundScheduler(
            timezone=UTC,
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
        )
        self.metrics_port = metrics_port
        self.backfill_every = backfill_every
        self._http: ThreadingHTTPServer | None = None
        self._active = 0
        self._lock = threading.Lock()

    def healthy(self) -> bool:
        return not self.stopping.is_set() and self.scheduler.running

    def _trigger(self, p: PipelineConfig) -> Any:
        if p.schedule and p.schedule.cron:
            return CronTrigger.from_crontab(p.schedule.cron, timezone=UTC)
        every = parse_duration(p.schedule.every if p.schedule and p.schedule.every else "5m")
        return IntervalTrigger(seconds=max(1.0, every.total_seconds()), timezone=UTC)

    def run_once(self, name: str) -> PipelineResult | None:
        if self.stopping.is_set():
            return None
        with self._lock:
            self._active += 1
        try:
            p = self.loaded.config.pipeline(name)
            if BackfillSlices(self.store.engine).unfinished(name):
                # The backfill holds the pipeline; its slices are worked by `work_backfills`.
                log.info("run.deferred", pipeline=name, reason="a backfill of it is unfinished")
                return None
            result = run_pipeline(
                self.loaded,
                p,
                self.store,
                self.connections,
                owner=self.owner,
                should_stop=self.stopping.is_set,
            )
            self.metrics.observe(result, self.store.dead_letter_count(name))
            return result
        except Exception as exc:  # a bug must not kill the daemon; it is logged and counted
            log.exception("run.crashed", pipeline=name, error=str(exc))
            return None
        finally:
            with self._lock:
                self._active -= 1

    def work_backfills(self) -> int:
        """Work claimable backfill slices of this config's pipelines; returns how many."""
        if self.stopping.is_set():
            return 0
        with self._lock:
            self._active += 1
        try:
            runs = work_backfill(
                self.loaded,
                self.store,
                self.connections,
                owner=self.owner,
                should_stop=self.stopping.is_set,
            )
            for r in runs:
                self.metrics.observe(r.result, self.store.dead_letter_count(r.slice.pipeline))
            return len(runs)
        except Exception as exc:  # logged and counted; the next tick tries again
            log.exception("backfill.crashed", error=str(exc))
            return 0
        finally:
            with self._lock:
                self._active -= 1

    def start(self) -> None:
        # A job still running at its next tick is skipped by design (one instance per
        # pipeline); APScheduler's plain-text warning about it would only be noise.
        logging.getLogger("apscheduler").setLevel(logging.ERROR)
        now = datetime.now(UTC)
        for p in self.loaded.config.pipelines:
            if not p.enabled:
                continue
            self.scheduler.add_job(
                self.run_once,
                self._trigger(p),
                args=[p.name],
                id=p.name,
                name=p.name,
                next_run_time=now,
            )
        self.scheduler.add_job(
            self.work_backfills,
            IntervalTrigger(seconds=max(0.2, self.backfill_every), timezone=UTC),
            id="_backfill_slices",  # no pipeline name starts with "_"
            name="backfill slices",
            next_run_time=now,
        )
        self.scheduler.start()
        if self.metrics_port is not None:
            handler = type("Handler", (_Health,), {"daemon": self})
            self._http = ThreadingHTTPServer(("127.0.0.1", self.metrics_port), handler)
            self.metrics_port = self._http.server_address[1]
            threading.Thread(target=self._http.serve_forever, daemon=True).start()
        log.info(
            "daemon.started",
            pipelines=[j.id for j in self.scheduler.get_jobs() if j.id != "_backfill_slices"],
            metrics_port=self.metrics_port,
        )

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the page in hand, record runs as interrupted, release leases."""
        log.info("daemon.stopping")
        self.stopping.set()
        self.scheduler.shutdown(wait=False)
        deadline = time.monotonic() + timeout
        while self._active and time.monotonic() < deadline:
            time.sleep(0.05)
        if self._http:
            self._http.shutdown()
        self.connections.close()
        self.store.close()
        log.info("daemon.stopped", unfinished=self._active)
