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

With ``daemon.leaderElection`` (:mod:`trustmgr.leader`), only the replica
holding the Lease runs passes, each write of a pass fenced by the term it
started in; a lost Lease stops the pass at once. Followers serve the same
endpoints: ``/healthz`` then asks that the election loop runs (and, of the
leader, that it renewed the Lease in time), ``/readyz`` that the Lease could be
read. SIGTERM gives the Lease back once the pass in flight has saved.
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
from trustmgr.engine import apply
from trustmgr.errors import TargetError, TrustmgrError
from trustmgr.execute import Report
from trustmgr.leader import LeaderElector, NotLeaderError
from trustmgr.planner import Action
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
        self.vault_token_expiry = Gauge(
            "trustmgr_vault_token_expiration_timestamp_seconds",
            "When the Vault token each Vault provider last used expires, in Unix seconds "
            "(absent for a token that never expires).",
            ["provider"],
            registry=r,
        )
        self.awaiting = Gauge(
            "trustmgr_clusters_awaiting_agent",
            "Agent-mode clusters whose agent has yet to act on what is published (or fails to).",
            registry=r,
        )
        self.leader = Gauge(
            "trustmgr_leader",
            "1 while this replica leads and runs passes (always, without leader election).",
            registry=r,
        )

    def observe_report(self, report: Report) -> None:
        for o in report.outcomes:
            if not o.ok:
                self.failures.labels(reason=o.reason if o.started else "Interrupted").inc()
            elif o.action.changes:
                self.changes.labels(action=o.action.value).inc()
        self.awaiting.set(sum(1 for o in report.outcomes if o.action is Action.AWAIT))


@dataclass
class Health:
    """What /healthz and /readyz answer, updated by the loop."""

    interval: timedelta
    clock: Clock
    started: datetime = field(default_factory=lambda: datetime.now(UTC))
    last_pass: datetime | None = None
    ready: bool = False
    why_not_ready: str = "no pass has run yet"
    leader: LeaderElector | None = None
    _wall_at_start: float = field(default_factory=time.time)
    _mono_at_start: float = field(default_factory=time.monotonic)

    def alive(self) -> tuple[bool, str]:
        now = self.clock()
        leading = True
        since = now - (self.last_pass or self.started)
        if self.leader is not None:
            ok, why = self.leader.healthy()
            if not ok:
                return False, why
            leading = self.leader.leading
            if self.leader.since is not None:
                since = min(since, now - self.leader.since)
        if leading and since > 2 * self.interval + timedelta(minutes=1):
            return False, f"no pass started for {int(since.total_seconds())} s"
        drift = abs((time.time() - self._wall_at_start) - (time.monotonic() - self._mono_at_start))
        if drift > 300:
            return False, f"the wall clock jumped by {int(drift)} s"
        return True, "ok"

    def readiness(self) -> tuple[bool, str]:
        """A follower is ready while it can read the Lease; a leader (or a single
        daemon) once its last pass reached the state store and every provider."""
        if self.leader is not None and not self.leader.leading:
            if self.leader.problem is not None:
                return False, f"the leader lease cannot be read: {self.leader.problem}"
            return True, f"following {self.leader.holder or 'nobody yet'}"
        return self.ready, self.why_not_ready


class Daemon:
    """Runs passes on a schedule; serves metrics and health while it does."""

    def __init__(
        self,
        config: Config,
        *,
        clock: Clock,
        workspace: Callable[[], Workspace],
        workers: int = 16,
        election: bool = True,
    ) -> None:
        """``election=False`` ignores ``daemon.leaderElection``: one pass under
        the state lock, as ``trustmgr reconcile`` runs it (``--once``)."""
        self.config = config
        self.clock = clock
        self.workspace = workspace
        self.workers = workers
        self.metrics = Metrics()
        self.health = Health(config.daemon.interval, clock)
        self.stop = threading.Event()
        self._pass_lock = threading.Lock()
        self._pass_stop: threading.Event | None = None
        self._stops = threading.Lock()
        self._job: Any = None
        self.elector: LeaderElector | None = None
        settings = config.daemon.leader_election
        if settings is not None and election:
            self.elector = LeaderElector(settings, on_start=self._leading, on_stop=self._following)
            self.health.leader = self.elector
        self.metrics.leader.set(0 if self.elector else 1)

    # leadership

    def _leading(self, term: int) -> None:
        self.metrics.leader.set(1)
        if self._job is not None:  # a new leader's first pass runs at once
            self._job.modify(next_run_time=datetime.now(UTC))

    def _following(self, why: str) -> None:
        self.metrics.leader.set(0)
        self._stop_pass()

    def _stop_pass(self) -> None:
        """Stop the pass in flight from starting new clusters."""
        with self._stops:
            if self._pass_stop is not None:
                self._pass_stop.set()

    # one pass

    def run_pass(self) -> Report | None:
        """One observe → decide → execute pass; never raises. None when it could
        not run (state store or a provider unreachable, bad configuration)."""
        fence = None
        if self.elector is not None:
            term = self.elector.term
            if not self.elector.leading:
                log.debug("not leading: no pass")
                return None
            fence = self.elector.fence(term)
        if not self._pass_lock.acquire(blocking=False):
            log.info("a pass is still running; skipping this one")
            return None
        started = time.monotonic()
        self.health.last_pass = self.clock()
        stop = threading.Event()
        with self._stops:
            self._pass_stop = stop
        if self.stop.is_set() or (self.elector is not None and not self.elector.leading):
            stop.set()
        try:
            with self.workspace() as ws:
                try:
                    report = apply(ws, workers=self.workers, stop=stop, fence=fence)
                    self._export(ws, report)
                finally:
                    self._export_tokens(ws)
            self.metrics.observe_report(report)
            self.health.ready, self.health.why_not_ready = True, "ok"
            if report.ok:
                self.metrics.last_success.set(self.clock().timestamp())
            changed = sum(1 for o in report.outcomes if o.ok and o.action.changes)
            failed = sum(1 for o in report.outcomes if not o.ok)
            if changed or failed:
                log.info("pass: %d changed, %d failed", changed, failed)
            return report
        except NotLeaderError as exc:
            self.metrics.failures.labels(reason="NotLeader").inc()
            log.warning("pass stopped: %s", exc)
            return None
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
            with self._stops:
                self._pass_stop = None
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

    def _export_tokens(self, ws: Workspace) -> None:
        """Expiry of the Vault token each Vault provider used in the pass, also
        of a pass that failed: no request of its own."""
        expiries: dict[str, datetime] = {}
        for provider in (*ws.providers.values(), *ws.incoming.values()):
            expires = _token_expiry(provider)
            if expires is not None:
                name = provider.name
                expiries[name] = min(expires, expiries.get(name, expires))
        self.metrics.vault_token_expiry.clear()
        for name, expires in expiries.items():
            self.metrics.vault_token_expiry.labels(provider=name).set(expires.timestamp())

    # the schedule

    def run(self, *, serve: bool = True) -> None:
        """Serve and run passes until ``stop`` is set; with leader election, only
        while leading. On stop, the pass in flight finishes and saves, then the
        Lease is given back."""
        from apscheduler.schedulers.background import BackgroundScheduler

        server = self.serve() if serve else None
        scheduler = BackgroundScheduler(timezone=UTC)
        self._job = scheduler.add_job(
            self.run_pass,
            trigger=make_trigger(self.config.daemon.interval, self.config.daemon.jitter),
            max_instances=1,
            coalesce=True,
            next_run_time=datetime.now(UTC),
            misfire_grace_time=None,
        )
        scheduler.start()
        if self.elector is not None:
            self.elector.start()
        try:
            self.stop.wait()
        finally:
            self._job = None
            self._stop_pass()
            scheduler.shutdown(wait=True)  # the pass in flight finishes and saves
            if self.elector is not None:
                self.elector.stop(release=True)
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


def _token_expiry(provider: object) -> datetime | None:
    """``token_expires_at`` of a Vault provider (also one limited to some of its
    roots during a rotation); None for other kinds."""
    inner = getattr(provider, "_provider", provider)
    expires = getattr(inner, "token_expires_at", None)
    return expires if isinstance(expires, datetime) else None


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
                ready, why = daemon.health.readiness()
                self._answer(200 if ready else 503, f"{why}\n".encode())
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
