"""Root rotation on Kubernetes clusters, driven with the real CLI against emulated API
servers, with istiod's rules checked on every write each cluster's API server committed.

The emulators' write logs hold every committed version of every ``cacerts`` Secret, in the
order they happened across the whole fleet: what istiod's informer sees, one update at a
time. Each check runs on that sequence, not only on where each pass ends:

* istiod's multi-root rule: on a cluster with ``istio.multiRoot``, each new ``root-cert.pem``
  contains the previous bytes or sits inside them (``bytes.Contains``, as istiod before 1.30
  checks it); on a cluster without, any change of ``root-cert.pem`` was named in the plan
  before the pass (``istiodRestart``), and reported as needing a restart after it;
* trust before use: at no moment does a cluster hold a CA whose root a cluster that must
  accept its workloads (its own mesh, a federated mesh) does not trust;
* istiod's load checks pass on every version written;
* a mesh that neither uses the rotated provider nor federates with one that does is never
  written.
"""

# The fixtures are imported, so this module runs without conftest wiring; pytest injects them as
# parameters of the same names, which pyflakes would call unused imports and redefinitions.
# ruff: noqa: F401, F811

from __future__ import annotations

import base64
import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import urllib3
import yaml

from tests.conftest import PASSPHRASE, REPO, Run, trustmgr
from tests.kube_emulator import Fault, KubeEmulator, WriteRecord, merge_kubeconfigs
from tests.kube_fixtures import KubeEmulatorFactory, kube_emulator_factory
from trustmgr.bundles import TrustBundle, fingerprint, load_certificates
from trustmgr.pki import CACERTS_FILES, CACerts, istiod_problems

NS = "istio-system"
SECRET = "cacerts"
ROTATED = "a-root"

MULTI_129: dict[str, Any] = {"multiRoot": True, "version": "1.29"}
"""istiod 1.29 with ISTIO_MULTIROOT_MESH: a new root-cert.pem must be a byte superset or subset."""
MULTI: dict[str, Any] = {"multiRoot": True}
"""With ISTIO_MULTIROOT_MESH, no version given."""
SINGLE: dict[str, Any] = {}
"""No multi-root support: every root-cert.pem change needs istiod restarted."""
SINGLE_RESTARTED: dict[str, Any] = {"restartIstiod": True}
"""No multi-root support; trustmgr restarts istiod itself."""


# --- a fleet of emulated clusters, several meshes -----------------------------------------------


def material_of(obj: Mapping[str, Any]) -> CACerts:
    data = obj.get("data") or {}
    return CACerts.from_files({n: base64.b64decode(data.get(n, "")) for n in CACERTS_FILES})


def chain_root(material: CACerts) -> str:
    return fingerprint(load_certificates(material.cert_chain, "cert-chain.pem")[-1])


def bundle_of(material: CACerts) -> tuple[str, ...]:
    return TrustBundle.from_pem(material.root_cert, "root-cert.pem").fingerprints


@dataclass
class RotationFleet:
    """Meshes of emulated clusters; each mesh has its own self-signed provider."""

    workdir: Path
    meshes: dict[str, dict[str, dict[str, Any]]]
    """mesh → cluster → its ``istio`` settings."""
    federations: list[list[str]]
    emulators: dict[str, KubeEmulator] = field(default_factory=dict)
    config: Path = Path()

    @property
    def clusters(self) -> dict[str, str]:
        """cluster → mesh."""
        return {c: m for m, clusters in self.meshes.items() for c in clusters}

    def istio(self, cluster: str) -> dict[str, Any]:
        return self.meshes[self.clusters[cluster]][cluster]

    def multi_root(self, cluster: str) -> bool:
        return bool(self.istio(cluster).get("multiRoot"))

    def accepting(self, mesh: str) -> list[str]:
        """Meshes whose workloads must accept ``mesh``'s: itself and its federated peers."""
        peers = {m for f in self.federations if mesh in f for m in f}
        return sorted(peers | {mesh})

    def affected(self, provider_mesh: str) -> set[str]:
        """Clusters a rotation of ``provider_mesh``'s provider touches."""
        return {c for c, m in self.clusters.items() if m in self.accepting(provider_mesh)}

    def start(self, factory: KubeEmulatorFactory, *, latency: float = 0.0) -> None:
        for cluster in self.clusters:
            emulator = factory(latency=latency)
            if self.istio(cluster).get("restartIstiod"):
                emulator.put_object(istiod_deployment())
            self.emulators[cluster] = emulator
        kubeconfig = self.workdir / "kubeconfig"
        merged = merge_kubeconfigs(e.kubeconfig(name) for name, e in self.emulators.items())
        kubeconfig.write_text(yaml.safe_dump(merged))
        config = {
            "stateStore": {"file": {"path": "state"}},
            "rotation": {"soak": "0s", "canary": 1},
            "providers": {
                f"{mesh}-root": {
                    "selfSigned": {
                        "subject": {"commonName": f"{mesh} root"},
                        "passphraseEnv": "TRUSTMGR_PASSPHRASE",
                    }
                }
                for mesh in self.meshes
            },
            "meshes": {
                mesh: {
                    "trustDomain": f"{mesh}.example",
                    "provider": f"{mesh}-root",
                    "clusters": {
                        name: {
                            "kubernetes": {
                                "kubeconfig": str(kubeconfig),
                                "context": name,
                                "requestTimeout": "2s",
                            },
                            **({"istio": istio} if istio else {}),
                        }
                        for name, istio in clusters.items()
                    },
                }
                for mesh, clusters in self.meshes.items()
            },
            "federations": [{"meshes": f} for f in self.federations],
        }
        self.config = self.workdir / "trustmgr.yaml"
        self.config.write_text(yaml.safe_dump(config))

    def held(self) -> dict[str, CACerts]:
        """What each cluster's cacerts holds now."""
        out = {}
        for cluster, emulator in self.emulators.items():
            secret = emulator.get_object("secrets", NS, SECRET)
            assert secret is not None, f"{cluster} has no cacerts"
            out[cluster] = material_of(secret)
        return out

    def log(self) -> list[tuple[str, WriteRecord]]:
        """Every committed write of a cacerts Secret in the fleet, in the order it happened."""
        writes = [
            (cluster, w)
            for cluster, emulator in self.emulators.items()
            for w in emulator.writes_of("secrets", NS, SECRET)
        ]
        return sorted(writes, key=lambda cw: cw[1].sequence)

    def settle(self, timeout: float = 10.0) -> None:
        """Wait until every request the emulators received has been served."""
        deadline = time.monotonic() + timeout
        while any(r.status == 0 for e in self.emulators.values() for r in list(e.requests)):
            assert time.monotonic() < deadline, "requests still in flight"
            time.sleep(0.01)

    def cli(self, *args: str) -> Run:
        return trustmgr("-c", str(self.config), *args)

    def ok(self, *args: str) -> Run:
        run = self.cli(*args)
        assert run.code == 0, run.out + run.err
        return run

    def rotations(self) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = json.loads(self.ok("rotate", "status", "-o", "json").out)
        return rows


def istiod_deployment() -> dict[str, Any]:
    labels = {"app": "istiod"}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "istiod", "namespace": NS, "labels": labels},
        "spec": {
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {"containers": [{"name": "discovery", "image": "istio/pilot:1.29"}]},
            },
        },
    }


# --- the rules, on the write log -----------------------------------------------------------------


def replay(
    fleet: RotationFleet, log: list[tuple[str, WriteRecord]], held: dict[str, CACerts]
) -> Iterator[tuple[str, CACerts | None, CACerts]]:
    """Apply ``log`` to ``held`` (what each cluster holds, updated in place) one write at
    a time, checking after each that no cluster holds a CA under a root that a cluster that
    must accept it does not trust. Yields (cluster, previous material, new material)."""
    now = datetime.now(UTC)
    for cluster, write in log:
        assert write.object is not None, f"{cluster}: its cacerts was deleted"
        material = material_of(write.object)
        problems = istiod_problems(material, now=now)
        assert problems == [], f"{cluster}, revision {write.resource_version}: {problems}"
        previous = held.get(cluster)
        held[cluster] = material
        for presenting, ca in held.items():
            root = chain_root(ca)
            for mesh in fleet.accepting(fleet.clusters[presenting]):
                for peer in fleet.meshes[mesh]:
                    if peer in held:
                        assert root in bundle_of(held[peer]), (
                            f"after the write to {cluster} (revision {write.resource_version}): "
                            f"{peer} does not trust the root of {presenting}'s CA"
                        )
        yield cluster, previous, material


def hot_reloadable(old: bytes, new: bytes) -> bool:
    """istiod's multi-root rule before 1.30 (FACTS: bytes.Contains either way)."""
    return old in new or new in old


# --- the rotation, pass by pass ------------------------------------------------------------------


@pytest.fixture
def three_meshes(workdir: Path, kube_emulator_factory: KubeEmulatorFactory) -> RotationFleet:
    """Meshes a and b federated, c on its own; istiod with and without multi-root."""
    fleet = RotationFleet(
        workdir,
        meshes={
            "a": {
                "a-1": MULTI_129,
                "a-2": MULTI,
                "a-3": SINGLE,
                "a-4": MULTI_129,
                "a-5": SINGLE_RESTARTED,
            },
            "b": {"b-1": MULTI_129, "b-2": MULTI, "b-3": SINGLE},
            "c": {"c-1": MULTI_129, "c-2": SINGLE},
        },
        federations=[["a", "b"]],
    )
    fleet.start(kube_emulator_factory)
    return fleet


def test_a_rotation_of_kubernetes_clusters_keeps_istiods_rules_on_every_write(
    three_meshes: RotationFleet,
) -> None:
    fleet = three_meshes
    fleet.ok("bootstrap")
    start = fleet.held()
    old_root = chain_root(start["a-1"])
    b_root = chain_root(start["b-1"])
    bootstrapped = len(fleet.log())
    isolated = {c: len(fleet.emulators[c].write_log) for c in fleet.meshes["c"]}
    fleet.ok("rotate", "start", "--provider", ROTATED)
    (row,) = fleet.rotations()
    new_root = row["newRoots"][0]
    assert {c["cluster"] for c in row["clusters"]} == fleet.affected("a")

    held: dict[str, CACerts] = {}
    list(replay(fleet, fleet.log()[:bootstrapped], held))
    phases: list[str] = []
    restarts = dict.fromkeys(fleet.clusters, 0)
    for _ in range(10):
        rows = fleet.rotations()
        if not rows:
            break
        phases.append(rows[0]["phase"])
        plan = {c["cluster"]: c for c in json.loads(fleet.ok("plan", "-o", "json").out)["clusters"]}
        patches = {c: fleet.emulators[c].count("patch", "deployments") for c in fleet.clusters}
        seen = len(fleet.log())
        report = json.loads(fleet.ok("reconcile", "-o", "json").out)
        outcomes = {o["cluster"]: o for o in report["clusters"]}
        written: set[str] = set()
        for cluster, before, after in replay(fleet, fleet.log()[seen:], held):
            assert before is not None
            written.add(cluster)
            assert plan[cluster]["action"] in ("issue", "renew", "update-bundle"), cluster
            if before.root_cert == after.root_cert:
                continue
            if fleet.multi_root(cluster):
                assert hot_reloadable(before.root_cert, after.root_cert), (
                    f"{cluster}: istiod ignores a root-cert.pem that neither contains the "
                    "previous bytes nor sits inside them"
                )
            else:
                assert plan[cluster]["istiodRestart"], f"{cluster}: restart not planned"
                restarted = fleet.istio(cluster).get("restartIstiod")
                expect = "restarted" if restarted else "restart needed"
                assert outcomes[cluster]["istiod"] == expect, cluster
                restarts[cluster] += 1
                if restarted:
                    emulator = fleet.emulators[cluster]
                    assert emulator.count("patch", "deployments") == patches[cluster] + 1
        # the pass wrote exactly what the plan before it listed, each cluster at most once
        assert written == {c for c, p in plan.items() if p["action"] != "none"}
        assert len(fleet.log()) - seen == len(written)
        # a restart is named only where a write needs one
        for cluster, p in plan.items():
            if p["istiodRestart"]:
                assert not fleet.multi_root(cluster), cluster
    assert not fleet.rotations(), "the rotation did not finish"
    assert phases == [
        "prepared",
        "trust-distributed",
        "issuer-switched",  # the canary, a-1
        "issuer-switched",  # the rest
        "old-removed",
    ]
    # clusters without multi-root: a restart when the new root came, and when the old one left
    assert {c: n for c, n in restarts.items() if n} == {"a-3": 2, "a-5": 2, "b-3": 2}

    end = fleet.held()
    for cluster in fleet.affected("a"):
        assert set(bundle_of(end[cluster])) == {new_root, b_root}, cluster
        assert old_root.encode() not in end[cluster].root_cert
    for cluster in fleet.meshes["a"]:
        assert chain_root(end[cluster]) == new_root
    for cluster in fleet.meshes["b"]:
        assert end[cluster].ca_cert == start[cluster].ca_cert  # b's CAs never reissued
    for cluster in fleet.meshes["c"]:
        # neither uses nor federates with the rotated provider: never written, backup included
        assert len(fleet.emulators[cluster].write_log) == isolated[cluster]
        assert end[cluster] == start[cluster]
    assert fleet.ok("verify")
    again = json.loads(fleet.ok("reconcile", "-o", "json").out)
    assert not again["changed"]


def test_the_write_log_holds_what_each_write_committed_in_order(
    kube_emulator_factory: KubeEmulatorFactory,
) -> None:
    """The log the rotation checks rely on: committed writes only, each with what was
    stored, in one order across clusters; a write whose answer was lost is logged too."""
    one, two = kube_emulator_factory(), kube_emulator_factory()
    http = urllib3.PoolManager(retries=False)
    path = f"/api/v1/namespaces/{NS}/secrets"

    def send(emulator: KubeEmulator, method: str, url: str, body: object, **headers: str) -> int:
        answer = http.request(
            method,
            emulator.url + url,
            body=json.dumps(body).encode(),
            headers={"Content-Type": "application/json", **headers},
        )
        return answer.status

    secret = {"metadata": {"name": SECRET}, "stringData": {"k": "1"}}
    assert send(one, "POST", path, secret) == 201
    assert send(two, "POST", path, secret) == 201
    version = one.writes_of("secrets")[0].resource_version
    replace = {"metadata": {"name": SECRET, "resourceVersion": version}, "data": {}}
    assert send(one, "PUT", f"{path}/{SECRET}", replace) == 200
    assert send(one, "PUT", f"{path}/{SECRET}", replace) == 409  # stale: nothing written
    merge = {"Content-Type": "application/merge-patch+json"}
    assert send(one, "PATCH", f"{path}/{SECRET}", {"data": {}}, **merge) == 200  # no change
    one.inject(Fault("PATCH", "/secrets/", lose_response=True))
    with pytest.raises(urllib3.exceptions.ProtocolError):  # the answer never came
        send(one, "PATCH", f"{path}/{SECRET}", {"stringData": {"k": "2"}}, **merge)
    assert send(one, "DELETE", f"{path}/{SECRET}", {}) == 200
    http.clear()
    log = one.writes_of("secrets", NS, SECRET)
    assert [w.verb for w in log] == ["create", "update", "patch", "delete"]
    stored = [w.object for w in log]
    assert stored[0] is not None and base64.b64decode(stored[0]["data"]["k"]) == b"1"
    assert stored[1] is not None and "data" not in stored[1]
    assert stored[2] is not None and base64.b64decode(stored[2]["data"]["k"]) == b"2"
    assert stored[3] is None
    assert [int(w.resource_version) for w in log] == sorted(int(w.resource_version) for w in log)
    (elsewhere,) = two.write_log
    assert log[0].sequence < elsewhere.sequence < log[1].sequence  # one order across clusters


# --- killed at random moments --------------------------------------------------------------------


KILL_MESHES: dict[str, dict[str, dict[str, Any]]] = {
    "a": {f"a-{i:02d}": (MULTI_129, MULTI, SINGLE, MULTI_129)[i % 4] for i in range(14)},
    "b": {"b-1": MULTI_129, "b-2": MULTI, "b-3": SINGLE, "b-4": MULTI_129},
    "c": {"c-1": MULTI_129, "c-2": SINGLE},
}


RECONCILE = ("reconcile", "--workers", "4")


def test_a_kubernetes_rotation_killed_at_random_moments_resumes_to_its_end(
    workdir: Path, kube_emulator_factory: KubeEmulatorFactory
) -> None:
    """20 clusters; ``reconcile`` runs as a process and is killed (SIGKILL) after a random
    number of clusters, some passes allowed to finish. After every kill each secret holds
    a complete cacerts istiod loads, and no CA is under a root a peer does not trust, at any
    write that reached an API server."""
    fleet = RotationFleet(workdir, meshes=KILL_MESHES, federations=[["a", "b"]])
    fleet.start(kube_emulator_factory, latency=0.01)
    assert len(fleet.clusters) == 20
    fleet.ok("bootstrap")
    start = fleet.held()
    b_root = chain_root(start["b-1"])
    isolated = {c: len(fleet.emulators[c].write_log) for c in fleet.meshes["c"]}
    fleet.ok("rotate", "start", "--provider", ROTATED)
    new_root = fleet.rotations()[0]["newRoots"][0]
    held: dict[str, CACerts] = {}
    seen = len(fleet.log())
    list(replay(fleet, fleet.log(), held))
    env = {**os.environ, "TRUSTMGR_PASSPHRASE": PASSPHRASE, "PYTHONPATH": str(REPO)}
    rng = random.Random(20)
    kills = finished = 0
    for _ in range(40):
        if not fleet.rotations():
            break
        process = subprocess.Popen(
            [sys.executable, "-u", "-m", "trustmgr", "-c", str(fleet.config), *RECONCILE],
            cwd=workdir,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert process.stderr is not None
        if rng.random() < 0.3:  # some passes finish
            process.stderr.read()
            assert process.wait(timeout=120) == 0
            finished += 1
        else:
            wanted, lines = rng.randrange(0, 15), 0
            while lines < wanted and (line := process.stderr.readline()):
                lines += line.startswith("[")
            process.kill()
            kills += process.wait() == -9  # else it had ended by itself
        process.stderr.close()
        fleet.settle()  # a request the process sent before it died may still land
        # every write any API server committed, killed pass or not
        log = fleet.log()
        for cluster, before, after in replay(fleet, log[seen:], held):
            if before is not None and fleet.multi_root(cluster):
                assert hot_reloadable(before.root_cert, after.root_cert), cluster
        seen = len(log)
        now = datetime.now(UTC)
        for cluster, material in fleet.held().items():
            assert istiod_problems(material, now=now) == [], cluster
            assert material == held[cluster]
    assert kills >= 3 and finished >= 1
    assert not fleet.rotations(), "the rotation did not finish"
    end = fleet.held()
    for cluster in fleet.affected("a"):
        # only the new root and the federated peer's, each once
        assert sorted(bundle_of(end[cluster])) == sorted({new_root, b_root}), cluster
    for cluster in fleet.meshes["a"]:
        assert chain_root(end[cluster]) == new_root, cluster
    for cluster in fleet.meshes["c"]:
        assert len(fleet.emulators[cluster].write_log) == isolated[cluster]
        assert end[cluster] == start[cluster]
    again = json.loads(fleet.ok("reconcile", "-o", "json").out)
    assert not again["changed"]


def test_overlapping_rotations_of_federated_providers_keep_hot_reload(
    three_meshes: RotationFleet,
) -> None:
    """Two rotations of federated providers cannot overlap: once two roots of one
    bundle are retiring, only one of them can sit at an end, and istiod 1.29 with
    ``ISTIO_MULTIROOT_MESH`` needs a removed root there (a byte superset or subset
    of what the cluster holds). So ``rotate start`` of a-root is refused while
    b-root is rotating, and accepted once it is done; every write on the way is
    hot-reloadable."""
    fleet = three_meshes
    fleet.ok("bootstrap")
    held: dict[str, CACerts] = {}
    list(replay(fleet, fleet.log(), held))
    seen = len(fleet.log())
    fleet.ok("rotate", "start", "--provider", "b-root")
    refused = fleet.cli("rotate", "start", "--provider", "a-root")
    assert refused.code == 2
    assert "the rotation of provider b-root" in refused.err
    assert "one rotation at a time" in refused.err
    broken = []
    started_a = False
    for _ in range(20):
        if not fleet.rotations():
            if started_a:
                break
            fleet.ok("rotate", "start", "--provider", "a-root")
            started_a = True
        fleet.ok("reconcile")
        for cluster, before, after in replay(fleet, fleet.log()[seen:], held):
            if before is None or fleet.istio(cluster) != MULTI_129:
                continue
            if not hot_reloadable(before.root_cert, after.root_cert):
                broken.append(cluster)
        seen = len(fleet.log())
    assert not fleet.rotations()
    assert broken == [], f"istiod 1.29 ignores the root-cert.pem written to {sorted(broken)}"
