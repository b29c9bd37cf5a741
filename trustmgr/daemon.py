"""``trustmgr daemon``: the same observe → decide → execute pass on a schedule,
with Prometheus metrics and health endpoints.

One pass at a time: the scheduler never starts a pass while one runs, and
passes missed meanwhile are coalesced into one. SIGTERM (or Ctrl-C) stops the
schedule, lets the pass in flight finish the clusters it started and save,
then stops the HTTP server.

Endpoints, on ``daemon.listen``:

- ``/metrics``: Prometheus text format (see docs/daemon.md);
- ``/healthz``: the loop is alive (a pass started within two intervals, or
  the first is still to come) and the clock is sane; never depends on a
  provider, a target or the state store, so a Vault outage never restarts it;
- ``/readyz``: the last pass reached the state store and every provider.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from trustmgr.bundles import fingerprint
from trustmgr.config import Config
from trustmgr.errors import TargetError, TrustmgrError
from trustmgr.execute import Report
from trustmgr.providers import ProviderError, ProviderTransientError
from trustmgr.workspace import Workspace

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]


class Metrics:
    """The daemon's Prometheus metrics, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.expiry = Gauge(
            "trustmgr_certificate_expiration_timestamp_seconds",
            "When each certificate trustmgr manages expires (notAfter), in Unix seconds.",
            ["cluster", "mesh", "kind"],
            registry=r,
        )
        self.root_expiry = Gauge(
            "trustmgr_root_expiration_timestamp_seconds",
            "When each provider root expires (notAfter), in Unix seconds.",
            ["provider", "fingerprint"],
            registry=r,
        )
        self.rotation_phase = Gauge(
            "trustmgr_rotation_phase",
            "1 for the phase each rotation in progress is at.",
            ["rotation", "phase"],
            registry=r,
        )
        self.last_success = Gauge(
            "trustmgr_last_successful_pass_timestamp_seconds",
            "When the last pass that failed nothing ended, in Unix seconds.",
            registry=r,
        )
        self.duration = Histogram(
            "trustmgr_pass_duration_seconds",
            "How long each pass took.",
            buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
            registry=r,
        )
        self.failures = Counter(
            "trustmgr_pass_failures_total",
            "Passes that failed, or clusters that failed in a pass, by reason.",
            ["reason"],
            registry=r,
        )
        self.changes = Counter(
            "trustmgr_cluster_changes_total",
            "Clusters written (or recorded), by action.",
            ["action"],
            registry=r,
        )

    def observe_report(self, report: Report) -> None:
        for o in report.outcomes:
            if not o.ok:
                self.failures.labels(reason=o.reason if o.started else "Interrupted").inc()
            elif o.action.value != "none":
                self.changes.labels(action=o.action.value).inc()


@dataclass
class Health:
    """What /healthz and /readyz answer, updated by the loop."""

    interval: timedelta
    clock: Clock
    started: datetime = field(default_factory=lambda: datetime.now(UTC))
    last_pass: datetime | None = None
    ready: bool = False
    why_not_ready: str = "no pass has run yet"
    _wall_at_start: float = field(default_factory=time.time)
    _mono_at_start: float = field(default_factory=time.monotonic)

    def alive(self) -> tuple[bool, str]:
        now = self.clock()
        since = now - (self.last_pass or self.started)
        if since > 2 * self.interval + timedelta(minutes=1):
            return False, f"no pass started for {int(since.total_seconds())} s"
        drift = abs((time.time() - self._wall_at_start) - (time.monotonic() - self._mono_at_start))
        if drift > 300:
            return False, f"the wall clock jumped by {int(drift)} s"
        return True, "ok"


class Daemon:
    """Runs passes on a schedule; serves metrics and health while it does."""

    def __init__(
        self,
        config: Config,
        *,
        clock: Clock,
        workspace: Callable[[], Workspace],
        workers: int = 16,
    ) -> None:
        self.config = config
        self.clock = clock
        self.workspace = workspace
        self.workers = workers
        self.metrics = Metrics()
        self.health = Health(config.daemon.interval, clock)
        self.stop = threading.Event()
        self._pass_lock = threading.Lock()

    # one pass

    def run_pass(self) -> Report | None:
        """One observe → decide → execute pass; never raises. None when it could
        not run (state store or a provider unreachable, bad configuration)."""
        if not self._pass_lock.acquire(blocking=False):
            log.info("a pass is still running; skipping this one")
            return None
        started = time.monotonic()
        self.health.last_pass = self.clock()
        try:
            with self.workspace() as ws:
                from trustmgr.engine import apply

                report = apply(ws, workers=self.workers, stop=self.stop)
                self._export(ws, report)
            self.metrics.observe_report(report)
            self.health.ready, self.health.why_not_ready = True, "ok"
            if report.ok:
                self.metrics.last_success.set(self.clock().timestamp())
            changed = sum(1 for o in report.outcomes if o.ok and o.action.value != "none")
            failed = sum(1 for o in report.outcomes if not o.ok)
            if changed or failed:
                log.info("pass: %d changed, %d failed", changed, failed)
            return report
        except (TrustmgrError, ProviderError) as exc:
            reason = (
                "Unreachable"
                if isinstance(exc, ProviderTransientError | TargetError)
                else type(exc).__name__.removesuffix("Error")
            )
            self.metrics.failures.labels(reason=reason).inc()
            self.health.ready, self.health.why_not_ready = False, str(exc)
            log.warning("pass failed: %s", exc)
            return None
        except Exception as exc:
            self.metrics.failures.labels(reason="Unexpected").inc()
            self.health.ready, self.health.why_not_ready = False, type(exc).__name__
            log.error("pass failed: unexpected %s", type(exc).__name__, exc_info=True)
            return None
        finally:
            self.metrics.duration.observe(time.monotonic() - started)
            self._pass_lock.release()

    def _export(self, ws: Workspace, report: Report) -> None:
        """Expiry of each cluster CA and root, and rotation phases, from what the
        pass read and recorded: no request of its own."""
        state = ws.store.load()
        self.metrics.expiry.clear()
        for cluster, record in state.clusters.items():
            if cluster in ws.meshes_of:
                self.metrics.expiry.labels(
                    cluster=cluster, mesh=ws.meshes_of[cluster], kind="cluster-ca"
                ).set(record.not_after.timestamp())
        self.metrics.root_expiry.clear()
        if report.observation is not None:
            for provider, roots in report.observation.roots.items():
                for root in roots:
                    self.metrics.root_expiry.labels(
                        provider=provider, fingerprint=fingerprint(root)[:16]
                    ).set(root.not_valid_after_utc.timestamp())
        self.metrics.rotation_phase.clear()
        for key, rotation in state.rotations.items():
            self.metrics.rotation_phase.labels(rotation=key, phase=str(rotation.phase)).set(1)

    # the schedule

    def run(self, *, serve: bool = True) -> None:
        """Serve and run passes until ``stop`` is set."""
        from apscheduler.schedulers.background import BackgroundScheduler

        server = self.serve() if serve else None
        scheduler = BackgroundScheduler(timezone=UTC)
        scheduler.add_job(
            self.run_pass,
            trigger=make_trigger(self.config.daemon.interval, self.config.daemon.jitter),
            max_instances=1,
            coalesce=True,
            next_run_time=datetime.now(UTC),
            misfire_grace_time=None,
        )
        scheduler.start()
        try:
            self.stop.wait()
        finally:
            scheduler.shutdown(wait=True)  # the pass in flight sees ``stop`` and finishes
            if server is not None:
                server.shutdown()
                server.server_close()

    def serve(self) -> ThreadingHTTPServer:
        host, _, port = self.config.daemon.listen.rpartition(":")
        server_class: type[ThreadingHTTPServer] = ThreadingHTTPServer
        if host.startswith("["):
            host = host.strip("[]")
            server_class = _ThreadingHTTPServerV6
        server = server_class((host or "0.0.0.0", int(port)), _handler(self))  # noqa: S104
        threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
        log.info("serving /metrics, /healthz and /readyz on %s", self.config.daemon.listen)
        return server


class _ThreadingHTTPServerV6(ThreadingHTTPServer):
    address_family = socket.AF_INET6


def make_trigger(interval: timedelta, jitter: timedelta) -> Any:
    """Every ``interval``, each run moved by up to ``jitter`` either way so that
    replicas and clusters of daemons do not act in step."""
    from apscheduler.triggers.interval import IntervalTrigger

    return IntervalTrigger(
        seconds=interval.total_seconds(),
        jitter=int(jitter.total_seconds()) or None,
        timezone=UTC,
    )


def _handler(daemon: Daemon) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/metrics":
                self._answer(200, generate_latest(daemon.metrics.registry), CONTENT_TYPE_LATEST)
            elif self.path == "/healthz":
                ok, why = daemon.health.alive()
                self._answer(200 if ok else 503, f"{why}\n".encode())
            elif self.path == "/readyz":
                ready = daemon.health.ready
                self._answer(200 if ready else 503, f"{daemon.health.why_not_ready}\n".encode())
            else:
                self._answer(404, b"not found\n")

        def _answer(self, status: int, body: bytes, content_type: str = "text/plain") -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("http: " + format, *args)

    return Handler
