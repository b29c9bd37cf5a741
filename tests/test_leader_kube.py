"""Leader election against the emulated API server over HTTP: electors each with
a client identity of their own, the Lease moved only by compare-and-set, a
released Lease handed over at once, and a daemon that follows or loses its
lease writing nothing."""

# The fixtures are imported, so this module runs without conftest wiring; pytest injects them as
# parameters of the same names, which pyflakes would call unused imports and redefinitions.
# ruff: noqa: F401, F811

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import generate_latest

from tests.conftest import REPO
from tests.kube_emulator import Fault, KubeEmulator, merge_kubeconfigs
from tests.kube_fixtures import KubeEmulatorFactory, kube_emulator_factory
from trustmgr import config as config_mod
from trustmgr.config import LeaderElectionConfig
from trustmgr.daemon import Daemon
from trustmgr.engine import Workspace
from trustmgr.leader import LeaderElector, NotLeaderError
from trustmgr.state.kubernetes import micro_time
from trustmgr.targets.directory import DirectoryTarget

NS, NAME = "trustmgr", "trustmgr-leader"
REPLICAS = ("replica-a", "replica-b", "replica-c")
LEASE = {"leaseDuration": "3s", "renewDeadline": "2s", "retryPeriod": "500ms"}

Electors = Callable[[str], LeaderElector]


@pytest.fixture
def cluster(kube_emulator_factory: KubeEmulatorFactory) -> KubeEmulator:
    return kube_emulator_factory(
        namespaces=["default", NS], tokens={f"token-{r}": r for r in REPLICAS}
    )


@pytest.fixture
def kubeconfig(tmp_path: Path, cluster: KubeEmulator) -> Path:
    """One context per replica, each presenting its own token."""
    path = tmp_path / "kubeconfig"
    merged = merge_kubeconfigs(cluster.kubeconfig(r, token=f"token-{r}") for r in REPLICAS)
    path.write_text(yaml.safe_dump(merged))
    return path


def settings(kubeconfig: Path, replica: str, **more: Any) -> dict[str, Any]:
    return {
        "namespace": NS,
        "name": NAME,
        "kubeconfig": str(kubeconfig),
        "context": replica,
        "identity": replica,
        **LEASE,
        **more,
    }


@pytest.fixture
def electors(kubeconfig: Path) -> Iterator[Electors]:
    made: list[LeaderElector] = []

    def make(replica: str) -> LeaderElector:
        elector = LeaderElector(LeaderElectionConfig.model_validate(settings(kubeconfig, replica)))
        made.append(elector)
        return elector

    yield make
    for elector in made:
        elector.stop(release=False)


def holder(cluster: KubeEmulator) -> str:
    lease = cluster.get_object("leases", NS, NAME)
    return str(lease["spec"]["holderIdentity"]) if lease else ""


def expire(cluster: KubeEmulator) -> None:
    """Make the Lease look expired, as when its holder has not renewed it for long."""
    lease = cluster.get_object("leases", NS, NAME)
    assert lease is not None
    lease["spec"]["renewTime"] = micro_time(datetime.now(UTC) - timedelta(minutes=1))
    cluster.put_object(lease)


def wait_for(condition: Callable[[], bool], seconds: float) -> float:
    """Seconds until ``condition`` held; fails after ``seconds``."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < seconds, "timed out"
        time.sleep(0.01)
    return time.monotonic() - started


def test_of_two_electors_exactly_one_leads(cluster: KubeEmulator, electors: Electors) -> None:
    a, b = electors("replica-a"), electors("replica-b")
    a.start()
    b.start()
    wait_for(lambda: a.leading or b.leading, 5)
    leaders = set()
    deadline = time.monotonic() + 3  # a lease duration: many renewals, no change of hands
    while time.monotonic() < deadline:
        leading = [e.identity for e in (a, b) if e.leading]
        assert len(leading) == 1, leading
        leaders.add(leading[0])
        time.sleep(0.02)
    assert len(leaders) == 1
    leader = leaders.pop()
    assert holder(cluster) == leader
    lease_writes = cluster.writes_of("leases", NS, NAME)
    assert len(lease_writes) >= 5  # created, then renewed every retry period
    assert {w.client for w in lease_writes} == {leader}
    assert {w.object["spec"]["holderIdentity"] for w in lease_writes if w.object} == {leader}


def test_a_take_over_carrying_a_stale_resource_version_is_refused(
    cluster: KubeEmulator, electors: Electors
) -> None:
    a, b = electors("replica-a"), electors("replica-b")
    a.step()
    assert a.leading
    expire(cluster)  # b will see it expired...
    # ...and a renews it between b's read and b's write.
    renewal = cluster.inject(Fault(method="PUT", path=f"/leases/{NAME}$", hook=a.step))
    b.step()
    assert renewal.hits == 1
    assert a.leading and not b.leading and holder(cluster) == "replica-a"
    b_writes = [
        r.status for r in cluster.requests if r.client == "replica-b" and r.verb == "update"
    ]
    assert b_writes == [409]
    assert all(w.client == "replica-a" for w in cluster.writes_of("leases"))


def test_an_expired_lease_is_taken_by_compare_and_set_and_its_old_holder_stops_at_once(
    cluster: KubeEmulator, electors: Electors
) -> None:
    a, b = electors("replica-a"), electors("replica-b")
    a.step()
    term = a.term
    expire(cluster)  # a was paused longer than the lease duration
    b.step()
    assert b.leading and holder(cluster) == "replica-b"
    lease = cluster.get_object("leases", NS, NAME)
    assert lease is not None and lease["spec"]["leaseTransitions"] == 1
    a.step()  # its renewal carries a stale resourceVersion: refused; the Lease names b
    assert not a.leading and a.holder == "replica-b"
    with pytest.raises(NotLeaderError, match="no longer holds the leader lease"):
        a.check(term)
    a_updates = [
        r.status for r in cluster.requests if r.client == "replica-a" and r.verb == "update"
    ]
    assert a_updates[-1] == 409
    assert holder(cluster) == "replica-b"


def test_a_released_lease_is_handed_over_at_once(cluster: KubeEmulator, electors: Electors) -> None:
    a, b = electors("replica-a"), electors("replica-b")
    a.start()
    wait_for(lambda: a.leading, 5)
    b.start()
    wait_for(lambda: b.holder == "replica-a", 5)
    started = time.monotonic()
    a.stop(release=True)
    released = time.monotonic() - started
    handed_over = released + wait_for(lambda: b.leading, 5)
    # within about one retry period (0.5 s), not the lease duration (3 s)
    assert handed_over < 1.5, handed_over
    assert holder(cluster) == "replica-b"
    writes = cluster.writes_of("leases", NS, NAME)
    release = next(w for w in writes if w.object and not w.object["spec"]["holderIdentity"])
    assert release.client == "replica-a"
    assert writes[writes.index(release) + 1].client == "replica-b"


def test_the_role_of_the_docs_is_enough_for_leader_election(
    cluster: KubeEmulator, electors: Electors
) -> None:
    text = (REPO / "docs" / "daemon.md").read_text()
    role = next(
        yaml.safe_load(block)
        for block in re.findall(r"```yaml\n(.*?)```", text, re.DOTALL)
        if "kind: Role" in block
    )
    assert role["metadata"]["namespace"] == NS
    for rule in role["rules"]:
        cluster.allow(
            rule["verbs"],
            rule["resources"],
            namespaces=role["metadata"]["namespace"],
            names=rule.get("resourceNames", "*"),
        )
    a, b = electors("replica-a"), electors("replica-b")
    a.step()
    b.step()
    a.step()
    a.release()
    b.step()
    assert b.leading
    assert cluster.count("create", "leases") and cluster.count("update", "leases")
    assert all(r.status != 403 for r in cluster.requests), [
        (r.verb, r.resource, r.name, r.status) for r in cluster.requests
    ]


def test_a_forbidden_lease_names_the_docs_with_the_role(
    cluster: KubeEmulator, electors: Electors
) -> None:
    cluster.deny("create", "leases")
    a = electors("replica-a")
    a.step()
    assert not a.leading
    assert a.problem is not None and "lack create on leases" in a.problem
    assert "(docs/daemon.md)" in a.problem


# --- the daemon ------------------------------------------------------------------------------

DAEMON = """\
stateStore: {file: {path: state}}
daemon:
  interval: 1h
  jitter: 0s
  listen: "127.0.0.1:0"
  leaderElection: LEADER
providers:
  corp:
    selfSigned: {passphraseEnv: TRUSTMGR_PASSPHRASE}
meshes:
  web:
    trustDomain: web.example
    provider: corp
    clusters:
      web-1: {directory: {path: out/web-1}}
      web-2: {directory: {path: out/web-2}}
      web-3: {directory: {path: out/web-3}}
      web-4: {directory: {path: out/web-4}}
"""


def daemon_for(workdir: Path, kubeconfig: Path, replica: str) -> Daemon:
    path = workdir / "trustmgr.yaml"
    leader = yaml.safe_dump(settings(kubeconfig, replica), default_flow_style=True).strip()
    path.write_text(DAEMON.replace("LEADER", leader))
    config = config_mod.load(path)
    clock = lambda: datetime.now(UTC)  # noqa: E731
    return Daemon(config, clock=clock, workspace=lambda: Workspace.build(config, clock=clock))


def metric(daemon: Daemon, line: str) -> bool:
    return line in generate_latest(daemon.metrics.registry).decode().splitlines()


def give_lease_to(cluster: KubeEmulator, who: str) -> None:
    now = micro_time(datetime.now(UTC))
    spec = {"holderIdentity": who, "leaseDurationSeconds": 3600, "renewTime": now}
    lease = cluster.get_object("leases", NS, NAME)
    if lease is None:
        lease = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease"}
        lease["metadata"] = {"name": NAME, "namespace": NS}
    cluster.put_object({**lease, "spec": {**lease.get("spec", {}), **spec}})


def test_a_follower_runs_no_pass_stays_ready_and_leads_once_the_lease_is_free(
    workdir: Path, cluster: KubeEmulator, kubeconfig: Path
) -> None:
    give_lease_to(cluster, "elsewhere")
    daemon = daemon_for(workdir, kubeconfig, "replica-a")
    assert daemon.elector is not None
    daemon.elector.step()
    assert daemon.run_pass() is None
    assert not (workdir / "out").exists() and not (workdir / "state").exists()
    assert daemon.health.readiness() == (True, "following elsewhere")
    assert daemon.health.alive() == (True, "ok")
    assert metric(daemon, "trustmgr_leader 0.0")
    give_lease_to(cluster, "")
    daemon.elector.step()
    assert metric(daemon, "trustmgr_leader 1.0")
    report = daemon.run_pass()
    assert report is not None and report.ok and report.changed
    assert daemon.health.readiness() == (True, "ok")
    daemon.elector.stop(release=True)
    assert holder(cluster) == ""


def test_a_lost_lease_stops_the_pass_at_once_and_nothing_more_is_written(
    workdir: Path, cluster: KubeEmulator, kubeconfig: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    daemon = daemon_for(workdir, kubeconfig, "replica-a")
    daemon.workers = 1  # one cluster after another
    elector = daemon.elector
    assert elector is not None
    elector.step()
    write = DirectoryTarget.write
    written: list[str] = []

    def write_and_lose_the_lease(self: DirectoryTarget, *args: Any, **kwargs: Any) -> None:
        if not written:  # while the first cluster is written, another replica takes over
            give_lease_to(cluster, "replica-b")
            elector.step()
        written.append(str(self.path))
        write(self, *args, **kwargs)

    monkeypatch.setattr(DirectoryTarget, "write", write_and_lose_the_lease)
    assert daemon.run_pass() is None
    assert len(written) == 1  # the write in flight finished; no other started
    assert sorted(p.name for p in (workdir / "out").iterdir() if any(p.iterdir())) == [
        Path(written[0]).name
    ]
    with Workspace.build(daemon.config, clock=daemon.clock) as ws:
        assert ws.store.load().clusters == {}  # the save was fenced
    assert metric(daemon, 'trustmgr_pass_failures_total{reason="NotLeader"} 1.0')
    assert metric(daemon, "trustmgr_leader 0.0")
    assert daemon.health.readiness() == (True, "following replica-b")
    assert daemon.run_pass() is None  # and no pass while following
    assert len(written) == 1
