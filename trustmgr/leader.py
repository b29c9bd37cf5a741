"""Leader election among the daemon's replicas: a coordination.k8s.io/v1 Lease
taken and renewed by resourceVersion compare-and-set, and a fence that keeps a
replica that does not lead, or may no longer lead, from writing.

Every ``retryPeriod`` each replica makes one move (:func:`decide`):

- a follower reads the Lease. Absent, it creates it; naming nobody, or expired
  (its ``renewTime`` plus ``leaseDurationSeconds`` has passed on this
  machine's clock), it replaces it carrying the resourceVersion it read, naming
  itself. Of replicas that try at once one write lands; the others get a
  conflict and follow.
- the leader replaces the Lease carrying the resourceVersion of its own last
  write, moving ``renewTime``. A conflict means someone else wrote it: read
  again, a Lease naming another holder ends the term at once.

The fence (:meth:`LeaderElector.check`), called before every write: the term
the pass started in is still the current one, and the last renewal that landed
was sent less than ``renewDeadline`` ago (monotonic clock). Others take over
only once ``leaseDuration`` has passed since that renewal's ``renewTime``, so
a leader stops writing ``leaseDuration - renewDeadline`` before anyone else
may start: the margin for clocks that disagree and for a write already sent.
Such a write cannot undo a new leader's work either: every Kubernetes write
trustmgr makes is a compare-and-set on what it read.

The check needs no request: nothing but a compare-and-set can move the Lease
to another holder, and no other replica does so before the hold expires.

A term ends when the Lease names another holder, when renewals fail for
``renewDeadline``, or when the daemon stops: then it gives the Lease back (no
holder, ``renewTime`` now), and a follower takes it at its next try."""

from __future__ import annotations

import functools
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Protocol

from trustmgr.config import KubernetesTargetConfig, LeaderElectionConfig
from trustmgr.errors import LockedError, TargetConflictError, TargetError
from trustmgr.state.kubernetes import LeaseClient, LeaseView, holding_spec, released_spec
from trustmgr.targets.kubeapi import KubeApi, NotFoundError, Request

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]
Monotonic = Callable[[], float]
Fence = Callable[[], None]
"""Raises when this replica may not write now."""


class NotLeaderError(LockedError):
    """This replica does not hold the leader lease, or cannot be sure it still does."""


class Leases(Protocol):
    """One Lease: what :class:`~trustmgr.state.kubernetes.LeaseClient` does."""

    @property
    def what(self) -> str: ...

    def get(self) -> dict[str, Any] | None: ...

    def create(self, spec: Mapping[str, Any]) -> dict[str, Any]: ...

    def replace(self, read: Mapping[str, Any], spec: Mapping[str, Any]) -> dict[str, Any]: ...


class Move(StrEnum):
    CREATE = "create"
    """No Lease yet: create it, naming this replica."""
    TAKE = "take"
    """Nobody holds it, or the holder's hold has expired: take it over."""
    RENEW = "renew"
    """It names this replica: renew it."""
    FOLLOW = "follow"
    """Another replica holds it."""


def decide(current: LeaseView | None, identity: str, now: datetime) -> Move:
    """What a replica does with the Lease it read, at ``now`` on its clock."""
    if current is None:
        return Move.CREATE
    if current.holder == identity:
        return Move.RENEW
    return Move.TAKE if current.free(now) else Move.FOLLOW


def may_write(renewed_at: float | None, now: float, renew_deadline: float) -> bool:
    """Whether a leader whose last renewal that landed was sent at ``renewed_at``
    may still write at ``now`` (both monotonic seconds)."""
    return renewed_at is not None and now - renewed_at < renew_deadline


def default_identity() -> str:
    """The host name (a pod's name) and the process id."""
    return f"{socket.gethostname()}_{os.getpid()}"


def _now() -> datetime:
    return datetime.now(UTC)


def api_config(config: LeaderElectionConfig) -> KubernetesTargetConfig:
    """One try per request: the loop itself tries again every retryPeriod."""
    return KubernetesTargetConfig(
        kubeconfig=config.kubeconfig,
        context=config.context,
        in_cluster=config.in_cluster,
        namespace=config.namespace,
        request_timeout=config.timeout,
        attempts=1,
    )


class LeaderElector:
    """Holds the Lease while it can; :meth:`check` fences each write."""

    def __init__(
        self,
        config: LeaderElectionConfig,
        *,
        leases: Leases | None = None,
        clock: Clock = _now,
        monotonic: Monotonic = time.monotonic,
        on_start: Callable[[int], None] | None = None,
        on_stop: Callable[[str], None] | None = None,
    ) -> None:
        self.config = config
        self.identity = config.identity or default_identity()
        self._seconds = int(config.lease_duration.total_seconds())
        self._deadline = config.renew_deadline.total_seconds()
        self._retry = config.retry_period.total_seconds()
        self._api: KubeApi | None = None
        if leases is None:
            self._api = KubeApi(api_config(config))
            leases = LeaseClient(config.namespace, config.name, self._send)
        self.leases = leases
        self._clock, self._monotonic = clock, monotonic
        self._on_start, self._on_stop = on_start, on_stop
        self._guard = threading.Lock()
        self._written: dict[str, Any] | None = None
        """The Lease as this replica last wrote it, while it leads."""
        self._term = 0
        self._leading = False
        self._renewed: float | None = None
        self.since: datetime | None = None
        """When the current term started, on the wall clock."""
        self.holder = ""
        """Who held the Lease when it was last read or written."""
        self.problem: str | None = None
        """Why the Lease could not be read or written at the last try, if it could not."""
        self._ticked: float | None = None
        self._halt = threading.Event()
        self._thread: threading.Thread | None = None

    # the state, for the daemon

    @property
    def what(self) -> str:
        return self.leases.what

    @property
    def leading(self) -> bool:
        with self._guard:
            return self._leading

    @property
    def term(self) -> int:
        """The current term's number while leading; it grows with each term."""
        with self._guard:
            return self._term

    def check(self, term: int) -> None:
        """The fence: raise NotLeaderError unless term ``term`` is still on and the
        Lease was renewed less than renewDeadline ago."""
        with self._guard:
            current = self._leading and self._term == term
            renewed = self._renewed
        if not current:
            raise NotLeaderError(
                f"this replica ({self.identity}) no longer holds the leader lease "
                f"({self.what}); it writes nothing more"
            )
        now = self._monotonic()
        if not may_write(renewed, now, self._deadline):
            assert renewed is not None
            raise NotLeaderError(
                f"the leader lease ({self.what}) was last renewed {now - renewed:.1f} s ago, "
                f"renewDeadline is {self._deadline:g} s: writing nothing until it is renewed"
            )

    def fence(self, term: int) -> Fence:
        """The fence of a pass started in term ``term``."""
        return functools.partial(self.check, term)

    def healthy(self) -> tuple[bool, str]:
        """The loop ran lately, and a leader renewed its Lease in time."""
        now = self._monotonic()
        with self._guard:
            leading, renewed, ticked = self._leading, self._renewed, self._ticked
        stalled = 2 * self._seconds + self.config.timeout.total_seconds()
        if self._thread is not None and ticked is not None and now - ticked > stalled:
            return False, f"the leader election loop has not run for {now - ticked:.0f} s"
        if leading and not may_write(renewed, now, self._deadline):
            assert renewed is not None
            return False, (
                f"leading, but the leader lease was last renewed {now - renewed:.0f} s ago "
                f"(renewDeadline {self._deadline:g} s)"
            )
        return True, "ok"

    # the loop

    def start(self) -> None:
        """Try every retryPeriod, in a thread of its own, until :meth:`stop`."""
        self._halt.clear()
        self._thread = threading.Thread(target=self._loop, name="trustmgr-leader", daemon=True)
        self._thread.start()

    def stop(self, *, release: bool = True) -> None:
        """End the loop; give the Lease back if this replica holds it."""
        self._halt.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if release:
            self.release()
        if self._api is not None:
            self._api.close()

    def _loop(self) -> None:
        while True:
            try:
                self.step()
            except Exception as exc:  # the next try may fare better; the fence holds meanwhile
                log.error("leader election: unexpected %s", type(exc).__name__, exc_info=True)
            if self._halt.wait(self._retry):
                return

    def step(self) -> None:
        """One try: renew while leading, else take the Lease if it is free."""
        started, now = self._monotonic(), self._clock()
        with self._guard:
            self._ticked = started
            leading = self._leading
        try:
            if leading:
                self._renew(started, now)
            else:
                self._acquire(started, now)
            self.problem = None
        except TargetError as exc:
            self.problem = str(exc)
            log.warning("leader election: %s: %s", self.what, exc)
        with self._guard:
            late = self._leading and not may_write(self._renewed, self._monotonic(), self._deadline)
        if late:
            self._lose(f"it could not be renewed for renewDeadline ({self._deadline:g} s)")

    def _acquire(self, started: float, now: datetime) -> None:
        read = self.leases.get()
        current = LeaseView.of(read) if read is not None else None
        move = decide(current, self.identity, now)
        if move is Move.FOLLOW:
            assert current is not None
            if current.holder != self.holder:
                log.info("following: %s holds the leader lease (%s)", current.holder, self.what)
            self.holder = current.holder
            return
        spec = holding_spec(current, self.identity, self._seconds, now, take=move is Move.TAKE)
        try:
            written = self.leases.create(spec) if read is None else self.leases.replace(read, spec)
        except (TargetConflictError, NotFoundError):
            read = self.leases.get()  # who was first
            self.holder = LeaseView.of(read).holder if read is not None else ""
            log.info(
                "following: %s wrote the leader lease (%s) first",
                self.holder or "another replica",
                self.what,
            )
            return
        if current is not None and current.holder and current.holder != self.identity:
            log.warning(
                "taking over the leader lease (%s) from %s: its hold ended at %s",
                self.what,
                current.holder,
                f"{current.expires:%Y-%m-%dT%H:%M:%S.%fZ}"
                if current.expires
                else "an unknown time",
            )
        with self._guard:
            self._written = written
            self._term += 1
            self._leading = True
            self._renewed = started
            self.since = now
            term = self._term
        self.holder = self.identity
        log.info(
            "leading: this replica (%s) holds the leader lease (%s), term %d",
            self.identity,
            self.what,
            term,
        )
        if self._on_start is not None:
            self._on_start(term)

    def _renew(self, started: float, now: datetime) -> None:
        with self._guard:
            written = self._written
        assert written is not None
        try:
            try:
                renewed = self.leases.replace(
                    written,
                    holding_spec(
                        LeaseView.of(written), self.identity, self._seconds, now, take=False
                    ),
                )
            except TargetConflictError:
                # Written since this replica's last write: by whom?
                read = self.leases.get()
                current = LeaseView.of(read) if read is not None else None
                if read is None or current is None:
                    raise NotFoundError("the lease was deleted") from None
                if current.holder != self.identity:
                    self.holder = current.holder
                    self._lose(f"{current.holder or 'nobody'} holds it now")
                    return
                # Ours still: a renewal whose answer was lost landed after all.
                renewed = self.leases.replace(
                    read, holding_spec(current, self.identity, self._seconds, now, take=False)
                )
        except NotFoundError:
            self._lose("it was deleted")
            return
        with self._guard:
            if self._leading:
                self._written, self._renewed = renewed, started

    def _lose(self, why: str) -> None:
        with self._guard:
            if not self._leading:
                return
            self._leading = False
            self._written = None
        log.error("lost the leader lease (%s): %s; stopping work at once", self.what, why)
        if self._on_stop is not None:
            self._on_stop(why)

    def release(self) -> None:
        """Give the Lease back, so that another replica takes it at once."""
        with self._guard:
            written, leading = self._written, self._leading
            self._leading = False
            self._written = None
        if not leading or written is None:
            return
        if self._on_stop is not None:
            self._on_stop("this replica is stopping")
        try:
            try:
                self.leases.replace(written, released_spec(LeaseView.of(written), self._clock()))
            except TargetConflictError:
                read = self.leases.get()
                if read is None or LeaseView.of(read).holder != self.identity:
                    return  # no longer ours to give back
                self.leases.replace(read, released_spec(LeaseView.of(read), self._clock()))
        except TargetError as exc:
            log.warning(
                "could not give the leader lease (%s) back: %s; another replica takes it "
                "over once it expires",
                self.what,
                exc,
            )
            return
        self.holder = ""
        log.info("gave the leader lease (%s) back", self.what)

    def _send(self, request: Request, method: str, path: str, body: Any = None) -> dict[str, Any]:
        assert self._api is not None
        try:
            return self._api.send(request, method, path, body)
        except (NotFoundError, TargetConflictError):
            raise
        except TargetError as exc:
            # The permissions election needs are in docs/daemon.md, not with the targets'.
            message = str(exc).replace("(docs/kubernetes.md)", "(docs/daemon.md)")
            raise type(exc)(message) from None
