"""Leader election's decisions, with injected clocks and an in-memory Lease that
does resourceVersion compare-and-set as the API server does."""

from __future__ import annotations

import copy
import json
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from prometheus_client import generate_latest

from trustmgr import config as config_mod
from trustmgr.config import LeaderElectionConfig
from trustmgr.daemon import Daemon, Health
from trustmgr.engine import Workspace
from trustmgr.errors import ConfigError, TargetConflictError, TransientTargetError
from trustmgr.leader import LeaderElector, Move, NotLeaderError, decide, may_write
from trustmgr.state.kubernetes import LeaseView, holding_spec, micro_time, released_spec

START = datetime(2026, 12, 1, tzinfo=UTC)
SETTINGS = LeaderElectionConfig(
    lease_duration=timedelta(seconds=15),
    renew_deadline=timedelta(seconds=10),
    retry_period=timedelta(seconds=2),
)


@dataclass
class Clocks:
    """One machine's wall clock and monotonic clock, moved by the test."""

    wall: datetime = START
    mono: float = 1000.0

    def advance(self, seconds: float) -> None:
        self.wall += timedelta(seconds=seconds)
        self.mono += seconds


@dataclass
class FakeLeases:
    """One Lease: get, create (conflict if present) and replace (conflict on a
    stale resourceVersion), each write moving the resourceVersion."""

    lease: dict[str, Any] | None = None
    version: int = 0
    fail: Exception | None = None
    lose_answer: bool = False
    writes: list[str] = field(default_factory=list)
    hang: threading.Event | None = None
    """While set, each request waits until it is cleared, then fails."""
    hanging: threading.Event = field(default_factory=threading.Event)

    @property
    def what(self) -> str:
        return "lease trustmgr/trustmgr-leader"

    def _answer(self) -> None:
        if self.hang is not None:
            self.hanging.set()
            self.hang.wait(10)
            raise TransientTargetError("no answer within 10s")
        if self.fail is not None:
            raise self.fail

    def get(self) -> dict[str, Any] | None:
        self._answer()
        return copy.deepcopy(self.lease)

    def _store(self, spec: Mapping[str, Any]) -> dict[str, Any]:
        self.version += 1
        self.lease = {
            "metadata": {"name": "trustmgr-leader", "resourceVersion": str(self.version)},
            "spec": dict(spec),
        }
        self.writes.append(str(spec.get("holderIdentity")))
        if self.lose_answer:
            raise TransientTargetError("the connection was dropped")
        return copy.deepcopy(self.lease)

    def create(self, spec: Mapping[str, Any]) -> dict[str, Any]:
        self._answer()
        if self.lease is not None:
            raise TargetConflictError("leases trustmgr/trustmgr-leader already exists")
        return self._store(spec)

    def replace(self, read: Mapping[str, Any], spec: Mapping[str, Any]) -> dict[str, Any]:
        self._answer()
        if self.lease is None:
            from trustmgr.targets.kubeapi import NotFoundError

            raise NotFoundError('leases "trustmgr-leader" not found')
        if read["metadata"]["resourceVersion"] != self.lease["metadata"]["resourceVersion"]:
            raise TargetConflictError("leases trustmgr/trustmgr-leader changed since it was read")
        return self._store(spec)

    def edit(self, **spec: Any) -> None:
        """Someone else's write."""
        assert self.lease is not None
        self._store({**self.lease["spec"], **spec})
        self.writes.pop()


@dataclass
class Replica:
    elector: LeaderElector
    started: list[int]
    """The terms it started."""
    stopped: list[str]
    """Why each term ended."""


def replica(leases: FakeLeases, identity: str, clocks: Clocks) -> Replica:
    settings = SETTINGS.model_copy(update={"identity": identity})
    started: list[int] = []
    stopped: list[str] = []
    elector = LeaderElector(
        settings,
        leases=leases,
        clock=lambda: clocks.wall,
        monotonic=lambda: clocks.mono,
        on_start=started.append,
        on_stop=stopped.append,
    )
    return Replica(elector, started, stopped)


def view(holder: str, renewed: datetime, seconds: int = 15) -> LeaseView:
    spec = {"holderIdentity": holder, "renewTime": micro_time(renewed)}
    return LeaseView.of({"spec": {**spec, "leaseDurationSeconds": seconds}})


# --- pure decisions ------------------------------------------------------------------------


def test_a_replica_creates_a_missing_lease_renews_its_own_and_takes_a_free_or_expired_one() -> None:
    now = START
    assert decide(None, "a", now) is Move.CREATE
    assert decide(view("a", now - timedelta(seconds=14)), "a", now) is Move.RENEW
    assert decide(view("a", now - timedelta(hours=1)), "a", now) is Move.RENEW
    assert decide(view("", now), "a", now) is Move.TAKE
    assert decide(view("b", now - timedelta(seconds=14)), "a", now) is Move.FOLLOW
    assert decide(view("b", now - timedelta(seconds=15)), "a", now) is Move.TAKE
    assert decide(LeaseView.of({"spec": {"holderIdentity": "b"}}), "a", now) is Move.TAKE


def test_a_leader_may_write_until_the_renew_deadline_and_not_at_it() -> None:
    assert may_write(100.0, 109.9, 10.0)
    assert not may_write(100.0, 110.0, 10.0)
    assert not may_write(None, 100.0, 10.0)


def test_the_leader_stops_writing_before_anyone_may_take_its_lease_over() -> None:
    """At every moment a leader may write, any other replica still sees the lease held."""
    renewed_wall, renewed_mono = START, 500.0
    lease = view("a", renewed_wall)
    for tenths in range(0, 200):
        elapsed = tenths / 10
        if may_write(renewed_mono, renewed_mono + elapsed, 10.0):
            assert decide(lease, "b", renewed_wall + timedelta(seconds=elapsed)) is Move.FOLLOW
    assert decide(lease, "b", renewed_wall + timedelta(seconds=15)) is Move.TAKE


def test_transitions_count_changes_of_holder_and_a_renewal_moves_renew_time_only() -> None:
    created = holding_spec(None, "a", 15, START, take=True)
    assert created["leaseTransitions"] == 0 and created["acquireTime"] == micro_time(START)
    later = START + timedelta(seconds=2)
    renewed = holding_spec(LeaseView.of({"spec": created}), "a", 15, later, take=False)
    assert renewed["acquireTime"] == micro_time(START)
    assert renewed["renewTime"] == micro_time(later) and renewed["leaseTransitions"] == 0
    taken = holding_spec(LeaseView.of({"spec": renewed}), "b", 15, later, take=True)
    assert taken["leaseTransitions"] == 1 and taken["holderIdentity"] == "b"
    released = released_spec(LeaseView.of({"spec": taken}), later)
    assert released["holderIdentity"] == "" and released["leaseTransitions"] == 1
    again = holding_spec(LeaseView.of({"spec": released}), "b", 15, later, take=True)
    assert again["leaseTransitions"] == 2


# --- the loop ------------------------------------------------------------------------------


def test_of_two_replicas_one_leads_and_the_other_takes_over_once_the_lease_expired() -> None:
    leases, clocks = FakeLeases(), Clocks()
    a, b = replica(leases, "a", clocks), replica(leases, "b", clocks)
    a.elector.step()
    b.elector.step()
    assert a.elector.leading and not b.elector.leading
    assert a.started == [1] and b.elector.holder == "a"
    for _ in range(10):  # a renews every retry period; b follows
        clocks.advance(2)
        a.elector.step()
        b.elector.step()
        assert a.elector.leading and not b.elector.leading
    assert leases.writes == ["a"] * 11
    last_renewal = clocks.wall
    # a dies: b takes over once renewTime + leaseDuration has passed, not before
    while clocks.wall < last_renewal + timedelta(seconds=15):
        b.elector.step()
        assert not b.elector.leading
        clocks.advance(0.5)
    b.elector.step()
    assert b.elector.leading and b.started == [1]
    assert leases.lease is not None
    assert leases.lease["spec"]["holderIdentity"] == "b"
    assert leases.lease["spec"]["leaseTransitions"] == 1
    assert leases.lease["spec"]["acquireTime"] == micro_time(clocks.wall)


def test_the_fence_passes_only_in_the_current_term_within_the_renew_deadline() -> None:
    leases, clocks = FakeLeases(), Clocks()
    a = replica(leases, "a", clocks)
    with pytest.raises(NotLeaderError, match="no longer holds the leader lease"):
        a.elector.check(0)
    a.elector.step()
    fence = a.elector.fence(a.elector.term)
    fence()
    leases.fail = TransientTargetError("cannot reach the API server")
    clocks.advance(2)
    a.elector.step()  # fails; still within the deadline
    assert a.elector.leading and a.elector.problem == "cannot reach the API server"
    clocks.advance(7.9)
    fence()
    clocks.advance(0.1)  # 10 s since the last renewal that landed
    with pytest.raises(NotLeaderError, match=r"last renewed 10\.0 s ago, renewDeadline is 10 s"):
        fence()
    assert a.elector.healthy()[0] is False
    assert "last renewed 10 s ago" in a.elector.healthy()[1]
    a.elector.step()
    assert not a.elector.leading
    assert a.stopped == ["it could not be renewed for renewDeadline (10 s)"]
    assert a.elector.healthy() == (True, "ok")  # a follower
    # the API is back; the lease still names a and has expired: a new term
    leases.fail = None
    clocks.advance(6)
    a.elector.step()
    assert a.elector.leading and a.elector.term == 2
    with pytest.raises(NotLeaderError, match="no longer holds"):
        fence()  # a pass of the first term writes nothing more
    a.elector.fence(2)()


def test_a_lease_taken_by_another_ends_the_term_at_the_next_try() -> None:
    leases, clocks = FakeLeases(), Clocks()
    a = replica(leases, "a", clocks)
    a.elector.step()
    term = a.elector.term
    leases.edit(holderIdentity="intruder", renewTime=micro_time(clocks.wall))
    clocks.advance(2)
    a.elector.step()  # the renewal conflicts; the Lease names another
    assert not a.elector.leading and a.stopped == ["intruder holds it now"]
    assert a.elector.holder == "intruder"
    with pytest.raises(NotLeaderError):
        a.elector.check(term)
    assert leases.writes == ["a"]


def test_a_renewal_whose_answer_was_lost_is_recognised_as_ours() -> None:
    leases, clocks = FakeLeases(), Clocks()
    a = replica(leases, "a", clocks)
    a.elector.step()
    leases.lose_answer = True
    clocks.advance(2)
    a.elector.step()  # landed, answer lost: a's resourceVersion is now stale
    leases.lose_answer = False
    clocks.advance(2)
    a.elector.step()  # conflict, read, still a's: renewed
    assert a.elector.leading and a.stopped == [] and a.elector.term == 1
    assert leases.writes == ["a", "a", "a"]


def test_a_deleted_lease_ends_the_term() -> None:
    leases, clocks = FakeLeases(), Clocks()
    a = replica(leases, "a", clocks)
    a.elector.step()
    leases.lease = None
    clocks.advance(2)
    a.elector.step()
    assert not a.elector.leading and a.stopped == ["it was deleted"]
    a.elector.step()  # and creates it again as a follower would
    assert a.elector.leading and a.elector.term == 2


def test_a_released_lease_is_taken_at_the_next_try() -> None:
    leases, clocks = FakeLeases(), Clocks()
    a, b = replica(leases, "a", clocks), replica(leases, "b", clocks)
    a.elector.step()
    b.elector.step()
    a.elector.release()
    assert not a.elector.leading and a.stopped == ["this replica is stopping"]
    assert leases.lease is not None and leases.lease["spec"]["holderIdentity"] == ""
    b.elector.step()  # no waiting for the lease duration
    assert b.elector.leading
    assert leases.lease["spec"]["leaseTransitions"] == 1


def test_a_follower_is_healthy_without_passes_and_a_leader_needs_a_renewed_lease() -> None:
    leases, clocks = FakeLeases(), Clocks()
    a, b = replica(leases, "a", clocks), replica(leases, "b", clocks)
    a.elector.step()
    b.elector.step()
    follower = Health(timedelta(minutes=5), lambda: clocks.wall, leader=b.elector)
    leader = Health(timedelta(minutes=5), lambda: clocks.wall, leader=a.elector)
    assert follower.readiness() == (True, "following a")
    leases.fail = TransientTargetError("cannot reach the API server")
    b.elector.step()
    assert follower.readiness() == (
        False,
        "the leader lease cannot be read: cannot reach the API server",
    )
    leases.fail = None
    b.elector.step()
    assert follower.readiness() == (True, "following a")
    leader.ready, leader.why_not_ready = True, "ok"
    assert leader.readiness() == (True, "ok")
    clocks.advance(3600)  # no pass for an hour: only the leader owes one
    assert follower.alive() == (True, "ok")
    ok, why = leader.alive()
    assert not ok and "last renewed 3600 s ago" in why


def test_a_stuck_election_loop_makes_the_replica_unhealthy() -> None:
    leases, clocks = FakeLeases(), Clocks()
    a = replica(leases, "a", clocks)
    a.elector.step()
    answer = leases.hang = threading.Event()
    a.elector.start()
    try:
        assert leases.hanging.wait(5)
        assert a.elector.healthy() == (True, "ok")
        clocks.advance(36)  # two lease durations and a request timeout
        ok, why = a.elector.healthy()
        assert not ok and why == "the leader election loop has not run for 36 s"
    finally:
        answer.set()
        a.elector.stop(release=False)


@pytest.mark.parametrize(
    ("settings", "problem"),
    [
        ({"leaseDuration": "2500ms"}, "leaseDuration must be whole seconds"),
        ({"renewDeadline": "15s"}, "renewDeadline must be shorter than leaseDuration"),
        ({"retryPeriod": "10s"}, "retryPeriod must be shorter than renewDeadline"),
        ({"requestTimeout": "10s"}, "requestTimeout must be shorter than renewDeadline"),
        ({"inCluster": True, "context": "x"}, "drop kubeconfig and context"),
    ],
)
def test_election_settings_that_could_not_keep_one_writer_are_refused(
    settings: dict[str, Any], problem: str
) -> None:
    text = "daemon:\n  leaderElection: " + json.dumps(settings) + "\n"
    with pytest.raises(ConfigError) as caught:
        config_mod.parse(text + MINIMAL, "trustmgr.yaml")
    assert any(problem in line and "daemon.leaderElection" in line for line in caught.value.lines())


def test_without_election_settings_the_daemon_runs_alone() -> None:
    config = config_mod.parse(MINIMAL, "trustmgr.yaml")
    assert config.daemon.leader_election is None
    elected = config_mod.parse("daemon: {leaderElection: {}}\n" + MINIMAL, "trustmgr.yaml")
    assert elected.daemon.leader_election == LeaderElectionConfig()
    assert elected.daemon.leader_election.timeout == timedelta(seconds=5)
    daemon = Daemon(
        config, clock=lambda: START, workspace=lambda: Workspace.build(config, clock=lambda: START)
    )
    assert daemon.elector is None
    assert "trustmgr_leader 1.0" in generate_latest(daemon.metrics.registry).decode()
    once = Daemon(
        elected,
        clock=lambda: START,
        workspace=lambda: Workspace.build(elected, clock=lambda: START),
        election=False,
    )
    assert once.elector is None


MINIMAL = """\
providers:
  corp:
    selfSigned: {passphraseEnv: TRUSTMGR_PASSPHRASE}
meshes:
  web:
    trustDomain: web.example
    provider: corp
    clusters:
      web-1: {directory: {path: out/web-1}}
"""
