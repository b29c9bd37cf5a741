"""trustmgr against Kubernetes clusters, as an operator runs it: the official client over
HTTP against emulated API servers, with their faults, RBAC and concurrent writers.

Every scenario ends with each cluster's cacerts either complete (key matches cert, istiod
would load it) or unchanged, and reported."""

# The fixtures are imported, so this module runs without conftest wiring; pytest injects them as
# parameters of the same names, which pyflakes would call unused imports and redefinitions.
# ruff: noqa: F401, F811

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import urllib3
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from kubernetes.client.exceptions import ApiException
from tenacity import RetryCallState

from tests.conftest import Run, trustmgr
from tests.kube_emulator import Fault, KubeEmulator, merge_kubeconfigs
from tests.kube_fixtures import KubeEmulatorFactory, kube_emulator_factory
from tests.workload import handmade_cacerts
from trustmgr.bundles import pem
from trustmgr.pki import CACERTS_FILES, CACerts, istiod_problems, private_key_pem
from trustmgr.targets import kubeapi

NS = "istio-system"
BACKUP = "cacerts-trustmgr-previous"
MANAGED = {"app.kubernetes.io/managed-by": "trustmgr"}


# --- a fleet of emulated clusters and its configuration ---------------------------------------


@dataclass
class Fleet:
    workdir: Path
    emulators: dict[str, KubeEmulator]
    meshes: dict[str, list[str]] = field(default_factory=dict)

    def configure(
        self,
        *,
        meshes: dict[str, list[str]] | None = None,
        federate: bool = False,
        key_algorithm: str = "ECDSA_P256",
        clusters: dict[str, dict[str, Any]] | None = None,
    ) -> Path:
        """Write kubeconfig and trustmgr.yaml: one self-signed provider per mesh."""
        kubeconfig = self.workdir / "kubeconfig"
        merged = merge_kubeconfigs(e.kubeconfig(name) for name, e in self.emulators.items())
        kubeconfig.write_text(yaml.safe_dump(merged))
        self.meshes = meshes or {"web": list(self.emulators)}
        extra = clusters or {}
        config = {
            "stateStore": {"file": {"path": "state"}},
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
                                "requestTimeout": "500ms",
                                **extra.get(name, {}).get("kubernetes", {}),
                            },
                            **{k: v for k, v in extra.get(name, {}).items() if k != "kubernetes"},
                        }
                        for name in names
                    },
                }
                for mesh, names in self.meshes.items()
            },
            "intermediates": {"keyAlgorithm": key_algorithm},
        }
        if federate:
            config["federations"] = [{"meshes": list(self.meshes)}]
        path = self.workdir / "trustmgr.yaml"
        path.write_text(yaml.safe_dump(config))
        return path

    def secret(self, cluster: str, name: str = "cacerts") -> dict[str, Any] | None:
        return self.emulators[cluster].get_object("secrets", NS, name)

    def material(self, cluster: str, name: str = "cacerts") -> CACerts:
        secret = self.secret(cluster, name)
        assert secret is not None, f"{cluster} has no secret {name}"
        return material_of(secret)

    def assert_whole(self) -> None:
        """Each cluster holds a complete, matching cacerts, or none."""
        now = datetime.now(UTC)
        for cluster in self.emulators:
            secret = self.secret(cluster)
            if secret is not None:
                assert istiod_problems(material_of(secret), now=now) == [], cluster

    def reset_counters(self) -> None:
        for emulator in self.emulators.values():
            emulator.reset_counters()


def material_of(secret: dict[str, Any]) -> CACerts:
    data = secret.get("data") or {}
    return CACerts.from_files({n: base64.b64decode(data.get(n, "")) for n in CACERTS_FILES})


def secret_body(
    material: CACerts, *, labels: dict[str, str] | None = None, name: str = "cacerts"
) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": NS, "labels": labels or {}},
        "data": {k: base64.b64encode(v).decode() for k, v in material.files().items()},
    }


@pytest.fixture
def fleet(workdir: Path, kube_emulator_factory: KubeEmulatorFactory) -> Callable[..., Fleet]:
    def start(*names: str, **kwargs: Any) -> Fleet:
        return Fleet(workdir, {name: kube_emulator_factory(**kwargs) for name in names})

    return start


def run(config: Path, *args: str) -> Run:
    return trustmgr("-c", str(config), *args)


def ok(config: Path, *args: str) -> Run:
    result = run(config, *args)
    assert result.code == 0, result.out + result.err
    return result


def status_of(config: Path) -> dict[str, Any]:
    return {r["cluster"]: r for r in json.loads(ok(config, "status", "-o", "json").out)}


def plan_of(config: Path, *args: str) -> dict[str, Any]:
    plan = json.loads(run(config, "plan", "-o", "json", *args).out)
    return {c["cluster"]: c for c in plan["clusters"]}


# --- writing ----------------------------------------------------------------------------------


def test_bootstrap_writes_a_complete_managed_cacerts_to_every_cluster(
    fleet: Callable[..., Fleet],
) -> None:
    f = fleet("c0", "c1", "c2")
    config = f.configure()
    result = ok(config, "bootstrap")
    assert "3 clusters: 3 changed, 0 up to date, 0 failed" in result.out
    assert "issue         c0 (Missing) -> context c0, secret istio-system/cacerts" in result.out
    assert "[3/3] " in result.err  # progress, as plain lines when stderr is not a terminal
    certs = set()
    for name, emulator in f.emulators.items():
        secret = f.secret(name)
        assert secret is not None
        assert secret["type"] == "Opaque"
        assert set(secret["data"]) == set(CACERTS_FILES)
        assert secret["metadata"]["labels"] == MANAGED
        material = material_of(secret)
        assert secret["metadata"]["annotations"]["trustmgr.io/digest"] == material.digest()
        assert istiod_problems(material, now=datetime.now(UTC)) == []
        certs.add(material.ca_cert)
        # one read, one create: nothing else is asked of a cluster
        assert emulator.verbs == {"get": 1, "create": 1}
    assert len(certs) == 3


def test_a_converged_pass_reads_each_secret_once_and_writes_nothing(
    fleet: Callable[..., Fleet],
) -> None:
    f = fleet("c0", "c1", "c2")
    config = f.configure()
    ok(config, "bootstrap")
    f.reset_counters()
    result = ok(config, "bootstrap")
    assert "3 clusters: 0 changed, 3 up to date, 0 failed" in result.out
    for emulator in f.emulators.values():
        assert (emulator.reads, emulator.writes) == (1, 0)
        assert emulator.count("get", "secrets") == 1


def test_many_clusters_are_written_in_parallel_each_with_two_requests(
    fleet: Callable[..., Fleet],
) -> None:
    f = fleet(*(f"c{i}" for i in range(24)), latency=0.05)
    config = f.configure()
    result = ok(config, "bootstrap", "--workers", "8")
    assert "24 clusters: 24 changed" in result.out
    assert all(e.verbs == {"get": 1, "create": 1} for e in f.emulators.values())
    f.assert_whole()


# --- drift, observed from the cluster ---------------------------------------------------------


def test_an_edited_key_is_drift_reported_and_repaired(fleet: Callable[..., Fleet]) -> None:
    f = fleet("c0", "c1")
    config = f.configure()
    ok(config, "bootstrap")
    edited = f.material("c1")
    edited = CACerts(edited.ca_cert, f.material("c0").ca_key, edited.cert_chain, edited.root_cert)
    f.emulators["c1"].put_object(secret_body(edited, labels=MANAGED))
    assert status_of(config)["c1"]["drift"] == "files changed outside trustmgr"
    assert status_of(config)["c0"]["drift"] is None
    verify = run(config, "verify")
    assert verify.code == 1
    assert "FAIL c1: ca-key.pem does not match ca-cert.pem" in verify.out
    assert plan_of(config)["c1"]["reason"] == "Invalid"
    result = ok(config, "bootstrap")
    assert "1 changed, 1 up to date" in result.out
    f.assert_whole()
    assert run(config, "verify").code == 0
    assert f.material("c1", BACKUP) == edited  # what was replaced is kept


def test_an_edit_istiod_would_accept_is_still_drift(fleet: Callable[..., Fleet]) -> None:
    f = fleet("c0")
    config = f.configure()
    ok(config, "bootstrap")
    written = f.material("c0")
    key = serialization.load_pem_private_key(written.ca_key, password=None)
    sec1 = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    edited = CACerts(written.ca_cert, sec1, written.cert_chain, written.root_cert)
    assert istiod_problems(edited, now=datetime.now(UTC)) == []
    f.emulators["c0"].put_object(secret_body(edited, labels=MANAGED))
    assert status_of(config)["c0"]["drift"] == "files changed outside trustmgr"
    planned = plan_of(config)["c0"]
    assert (planned["action"], planned["reason"]) == ("issue", "Drift")
    ok(config, "bootstrap")
    assert status_of(config)["c0"]["drift"] is None


def test_a_ca_swapped_by_hand_is_drift(fleet: Callable[..., Fleet]) -> None:
    f = fleet("c0", "c1")
    config = f.configure()
    ok(config, "bootstrap")
    f.emulators["c1"].put_object(secret_body(f.material("c0"), labels=MANAGED))
    assert status_of(config)["c1"]["drift"] == "CA replaced outside trustmgr"
    planned = plan_of(config)["c1"]
    assert (planned["action"], planned["reason"]) == ("issue", "Drift")
    ok(config, "bootstrap")
    assert f.material("c1").ca_cert != f.material("c0").ca_cert
    assert status_of(config)["c1"]["drift"] is None


# --- secrets trustmgr does not own: refusal, adoption, rollback -------------------------------


def test_an_unmanaged_cacerts_is_refused_adopted_and_rolled_back(
    fleet: Callable[..., Fleet],
) -> None:
    f = fleet("c0", "c1")
    config = f.configure()
    handmade = handmade_cacerts()
    f.emulators["c0"].put_object(secret_body(handmade))
    version = f.emulators["c0"].resource_version

    planned = plan_of(config)["c0"]
    assert (planned["action"], planned["reason"]) == ("refuse", "NotManaged")
    assert "trustmgr bootstrap --adopt" in planned["message"]
    refused = run(config, "bootstrap")
    assert refused.code == 1
    assert (
        "refused       c0: secret istio-system/cacerts was not created by trustmgr "
        "(no app.kubernetes.io/managed-by=trustmgr label)"
    ) in refused.err
    assert "1 changed, 0 up to date, 0 failed, 1 refused" in refused.out
    assert f.emulators["c0"].resource_version == version  # not touched at all
    assert f.emulators["c0"].writes == 0

    assert "Adopt" in ok(config, "bootstrap", "--adopt").out
    secret = f.secret("c0")
    assert secret is not None and secret["metadata"]["labels"] == MANAGED
    f.assert_whole()
    backup = f.secret("c0", BACKUP)
    assert backup is not None
    assert backup["type"] == "Opaque"
    assert backup["metadata"]["labels"] == MANAGED
    assert material_of(backup) == handmade
    adopted = f.material("c0")

    rolled = ok(config, "rollback", "--cluster", "c0")
    assert "rolled back c0" in rolled.out and "--adopt" in rolled.out
    restored = f.secret("c0")
    assert restored is not None
    assert material_of(restored) == handmade
    assert not restored["metadata"].get("labels")  # as it was: not trustmgr's
    assert f.material("c0", BACKUP) == adopted  # a second rollback would undo this one
    assert plan_of(config)["c0"]["reason"] == "NotManaged"
    assert status_of(config)["c0"]["drift"] == "not written by trustmgr"


def test_rollback_puts_back_the_previous_trustmgr_cacerts(fleet: Callable[..., Fleet]) -> None:
    f = fleet("c0")
    config = f.configure()
    ok(config, "bootstrap")
    first = f.material("c0")
    config = f.configure(key_algorithm="ECDSA_P384")
    assert "KeyAlgorithmChanged" in ok(config, "bootstrap").out
    second = f.material("c0")
    assert second.ca_cert != first.ca_cert

    ok(config, "rollback", "--cluster", "c0")
    assert f.material("c0") == first
    assert f.material("c0", BACKUP) == second
    assert status_of(config)["c0"]["drift"] is None  # the state knows what is there now
    ok(config, "rollback", "--cluster", "c0")  # and back again
    assert f.material("c0") == second


def test_rollback_refuses_a_previous_cacerts_whose_key_does_not_match(
    fleet: Callable[..., Fleet],
) -> None:
    f = fleet("c0")
    config = f.configure()
    ok(config, "bootstrap")
    ok(f.configure(key_algorithm="ECDSA_P384"), "bootstrap")
    kept = f.material("c0", BACKUP)
    broken = CACerts(kept.ca_cert, handmade_cacerts().ca_key, kept.cert_chain, kept.root_cert)
    backup = f.secret("c0", BACKUP)
    assert backup is not None
    backup["data"]["ca-key.pem"] = base64.b64encode(broken.ca_key).decode()
    f.emulators["c0"].put_object(backup)
    current = f.secret("c0")

    result = run(config, "rollback", "--cluster", "c0")
    assert result.code == 1
    assert result.err.strip() == (
        "trustmgr: cluster c0: refusing to put back the previous cacerts: "
        "ca-key.pem does not match ca-cert.pem"
    )
    assert f.secret("c0") == current


def two_writes(f: Fleet) -> tuple[Path, CACerts, CACerts]:
    """Bootstrap c0, then replace its CA: (config, first CA, second CA), the first kept."""
    ok(f.configure(), "bootstrap")
    first = f.material("c0")
    config = f.configure(key_algorithm="ECDSA_P384")
    ok(config, "bootstrap")
    assert f.material("c0", BACKUP) == first
    return config, first, f.material("c0")


def test_a_failed_write_keeps_the_rollback_point(fleet: Callable[..., Fleet]) -> None:
    f = fleet("c0")
    _, first, second = two_writes(f)
    f.emulators["c0"].inject(Fault("PUT", r"/secrets/cacerts$", status=500, times=None))
    config = f.configure(key_algorithm="ECDSA_P256")
    assert run(config, "bootstrap").code == 1
    assert f.material("c0") == second
    assert f.material("c0", BACKUP) == first  # not moved: nothing replaced the second CA

    f.emulators["c0"].clear_faults()
    assert "rolled back c0" in ok(config, "rollback", "--cluster", "c0").out
    assert f.material("c0") == first
    assert f.material("c0", BACKUP) == second


def test_rollback_says_so_when_the_cluster_already_holds_the_kept_cacerts(
    fleet: Callable[..., Fleet], caplog: pytest.LogCaptureFixture
) -> None:
    f = fleet("c0")
    config, first, _ = two_writes(f)
    # A rollback that puts the first CA back but cannot keep the one it replaced: the
    # kept copy and the cluster then hold the same, as after a crash between the two.
    f.emulators["c0"].inject(Fault("PUT", f"/secrets/{BACKUP}$", status=500, times=None))
    ok(config, "rollback", "--cluster", "c0")
    assert "the cacerts it replaced could not be kept" in caplog.text
    assert f.material("c0") == f.material("c0", BACKUP) == first
    f.emulators["c0"].clear_faults()
    before = f.secret("c0")

    result = run(config, "rollback", "--cluster", "c0")
    assert result.code == 1
    saved = f.secret("c0", BACKUP)["metadata"]["annotations"]["trustmgr.io/saved-at"]  # type: ignore[index]
    assert result.err.strip() == (
        "trustmgr: cluster c0: secret istio-system/cacerts already holds the cacerts kept in "
        f"{BACKUP} (saved at {saved}): there is nothing to roll back to"
    )
    assert f.secret("c0") == before


def test_rollback_refuses_a_kept_cacerts_older_than_the_last_one_replaced(
    fleet: Callable[..., Fleet],
) -> None:
    f = fleet("c0")
    _, first, _ = two_writes(f)
    # The third CA is written but the second, which it replaced, cannot be kept.
    f.emulators["c0"].inject(Fault("PUT", f"/secrets/{BACKUP}$", status=500, times=None))
    config = f.configure(key_algorithm="ECDSA_P256")
    assert "1 changed" in ok(config, "bootstrap").out  # the write stands, and is recorded
    third = f.material("c0")
    assert f.material("c0", BACKUP) == first
    f.emulators["c0"].clear_faults()

    result = run(config, "rollback", "--cluster", "c0")
    assert result.code == 1
    assert "is older than the one the last write to secret istio-system/cacerts replaced" in (
        result.err
    )
    assert f.material("c0") == third


def test_rollback_without_a_previous_cacerts_says_so(fleet: Callable[..., Fleet]) -> None:
    f = fleet("c0")
    config = f.configure()
    ok(config, "bootstrap")
    result = run(config, "rollback", "--cluster", "c0")
    assert result.code == 1
    assert "cluster c0: no previous cacerts is kept" in result.err
    unknown = run(config, "rollback", "--cluster", "nope")
    assert unknown.code == 2
    assert "unknown cluster 'nope' (known: c0)" in unknown.err


# --- permissions, namespaces, connections -----------------------------------------------------


def test_a_forbidden_update_names_the_verb_and_resource(fleet: Callable[..., Fleet]) -> None:
    f = fleet("c0", "c1")
    config = f.configure()
    ok(config, "bootstrap")
    before = f.secret("c1")
    f.emulators["c1"].deny("update", "secrets", names="cacerts")
    result = run(f.configure(key_algorithm="ECDSA_P384"), "bootstrap")
    assert result.code == 1
    assert (
        "failed        c1: forbidden: the credentials of context c1 "
        '(system:serviceaccount:trustmgr:trustmgr) lack update on secrets "cacerts" in '
        "namespace istio-system; grant it with a Role (docs/kubernetes.md)"
    ) in result.err
    assert "1 changed, 0 up to date, 1 failed" in result.out
    assert f.secret("c1") == before
    assert f.emulators["c1"].count("update", "secrets") == 1  # a 403 is not retried


def test_a_forbidden_read_fails_that_cluster_in_the_plan(fleet: Callable[..., Fleet]) -> None:
    f = fleet("c0", "c1")
    config = f.configure()
    f.emulators["c0"].deny("get", "secrets")
    planned = plan_of(config)
    assert planned["c0"]["reason"] == "TargetUnreadable"
    assert 'lack get on secrets "cacerts" in namespace istio-system' in planned["c0"]["message"]
    assert planned["c1"]["reason"] == "Missing"


def test_the_least_privilege_role_of_the_docs_is_enough(fleet: Callable[..., Fleet]) -> None:
    f = fleet("c0")
    emulator = f.emulators["c0"]
    emulator.put_object(istiod_deployment())
    emulator.allow(["get", "update"], "secrets", namespaces=NS, names=["cacerts", BACKUP])
    emulator.allow("create", "secrets", namespaces=NS)  # RBAC cannot name what is created
    emulator.allow("patch", "deployments", namespaces=NS, names="istiod")
    settings = {"c0": {"istio": {"restartIstiod": True}}}
    config = f.configure(clusters=settings)
    handmade = handmade_cacerts()
    emulator.put_object(secret_body(handmade))
    ok(config, "bootstrap", "--adopt")
    assert restarted_at(emulator) is not None  # a new root: istiod cannot hot-reload it
    ok(config, "rollback", "--cluster", "c0")
    assert f.material("c0") == handmade
    assert all(r.status != 403 for r in emulator.requests), [
        (r.verb, r.resource, r.name, r.status) for r in emulator.requests
    ]


def test_a_missing_namespace_is_an_error_not_a_create(
    fleet: Callable[..., Fleet], kube_emulator_factory: KubeEmulatorFactory
) -> None:
    f = fleet("c0")
    f.emulators["c1"] = kube_emulator_factory(namespaces=("default",))
    result = run(f.configure(), "bootstrap")
    assert result.code == 1
    assert (
        "failed        c1: namespace istio-system does not exist (context c1): install "
        "Istio first, or create it (kubectl create namespace istio-system); trustmgr does "
        "not create namespaces"
    ) in result.err
    assert f.emulators["c1"].get_object("namespaces", "", NS) is None
    assert f.emulators["c1"].count("create", "secrets") == 1  # a 404 is not retried
    f.assert_whole()


def test_unreachable_servers_and_bad_kubeconfigs_fail_only_their_cluster(
    fleet: Callable[..., Fleet], workdir: Path
) -> None:
    f = fleet("c0", "c1")
    config = f.configure(
        meshes={"web": ["c0", "c1", "c2", "c3"]},
        clusters={
            "c2": {"kubernetes": {"context": "ghost"}},
            "c3": {"kubernetes": {"kubeconfig": str(workdir / "missing")}},
        },
    )
    url = f.emulators["c1"].url
    f.emulators["c1"].stop()
    result = run(config, "bootstrap")
    assert result.code == 1
    err = result.err
    assert f"failed        c1: cannot reach {url} (context c1): connection refused" in err
    assert "failed        c2: context ghost: kubeconfig " in err
    assert "has no context ghost (it has: c0, c1)" in err
    assert f"failed        c3: context c3: kubeconfig {workdir / 'missing'} does not exist" in err
    assert "4 clusters: 1 changed, 0 up to date, 3 failed" in result.out
    f.assert_whole()


def test_in_cluster_outside_a_pod_says_so(
    fleet: Callable[..., Fleet], workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    f = fleet("c0")
    config = f.configure()
    text = yaml.safe_load(config.read_text())
    text["meshes"]["web"]["clusters"]["c0"] = {"kubernetes": {"inCluster": True}}
    config.write_text(yaml.safe_dump(text))
    planned = plan_of(config)["c0"]
    assert planned["message"].startswith("the in-cluster service account: ")


# --- transient faults, retries and conflicts --------------------------------------------------


@dataclass(frozen=True)
class FaultCase:
    id: str
    fault: Fault
    requests: list[tuple[str, int]]
    """(verb, status) of every request to the faulty cluster; status 0: no answer."""


FAULTS = [
    FaultCase(
        "500-on-read",
        Fault("GET", "/secrets/cacerts$", status=500),
        [("get", 500), ("get", 404), ("create", 201)],
    ),
    FaultCase(
        "503-retry-after",
        Fault("POST", "/secrets$", status=503, retry_after=0, times=2),
        [("get", 404), ("create", 503), ("create", 503), ("create", 201)],
    ),
    FaultCase(
        "429-retry-after",
        Fault("POST", "/secrets$", status=429, retry_after=0),
        [("get", 404), ("create", 429), ("create", 201)],
    ),
    FaultCase(
        "slow-past-the-timeout",
        Fault("POST", "/secrets$", delay=5),
        [("get", 404), ("create", 0), ("create", 201)],
    ),
    FaultCase(
        "dropped-connection",
        Fault("POST", "/secrets$", drop=True),
        [("get", 404), ("create", 0), ("create", 201)],
    ),
    FaultCase(
        # the create was applied but its answer lost: the retry conflicts, a read shows it landed
        "lost-answer",
        Fault("POST", "/secrets$", lose_response=True),
        [("get", 404), ("create", 0), ("create", 409), ("get", 200)],
    ),
]


@pytest.mark.parametrize("case", FAULTS, ids=[c.id for c in FAULTS])
def test_transient_faults_are_retried(case: FaultCase, fleet: Callable[..., Fleet]) -> None:
    f = fleet("c0", "c1")
    config = f.configure()
    f.emulators["c0"].inject(case.fault)
    result = ok(config, "bootstrap")
    assert "2 changed" in result.out
    assert [(r.verb, r.status) for r in f.emulators["c0"].requests] == case.requests
    f.assert_whole()
    f.reset_counters()
    assert "2 up to date" in ok(config, "bootstrap").out  # what was written is what is recorded


LANDED: dict[str, tuple[str, Callable[[], Fault]]] = {
    # the write, and a fault by which every try is applied or conflicts, unanswered
    "create-lost": ("create", partial(Fault, "POST", "/secrets$", None, lose_response=True)),
    "replace-lost": ("replace", partial(Fault, "PUT", "/cacerts$", None, lose_response=True)),
    "replace-late": ("replace", partial(Fault, "PUT", "/cacerts$", None, answer_delay=2)),
}


@pytest.mark.parametrize("case", LANDED)
def test_a_write_that_landed_without_an_answer_is_a_success(
    case: str, fleet: Callable[..., Fleet]
) -> None:
    write, make_fault = LANDED[case]
    fault = make_fault()
    f = fleet("c0")
    emulator = f.emulators["c0"]
    config = f.configure()
    if write == "replace":
        ok(config, "bootstrap")
        first = f.material("c0")
        config = f.configure(key_algorithm="ECDSA_P384")
    emulator.inject(fault)
    assert "1 changed, 0 up to date, 0 failed" in ok(config, "bootstrap").out
    assert fault.hits == 4  # every try went unanswered
    f.assert_whole()
    if write == "replace":
        assert f.material("c0", BACKUP) == first
    emulator.clear_faults()
    f.reset_counters()
    assert "0 changed, 1 up to date" in ok(config, "bootstrap").out
    assert emulator.writes == 0


def test_a_cluster_that_keeps_failing_is_reported_and_left_unchanged(
    fleet: Callable[..., Fleet],
) -> None:
    f = fleet("c0", "c1")
    config = f.configure()
    f.emulators["c0"].inject(Fault("POST", "/secrets$", status=500, times=None))
    result = run(config, "bootstrap")
    assert result.code == 1
    assert (
        'failed        c0: create on secrets "cacerts" in namespace istio-system failed with '
        "500 InternalError: Internal error occurred: injected fault (after 4 tries)"
    ) in result.err
    assert f.emulators["c0"].count("create") == 4
    assert f.secret("c0") is None
    assert "1 changed, 0 up to date, 1 failed" in result.out


def test_only_trustmgrs_policy_retries_not_the_clients_own(fleet: Callable[..., Fleet]) -> None:
    f = fleet("c0")
    config = f.configure()
    f.emulators["c0"].inject(Fault("GET", drop=True, times=None))
    result = run(config, "bootstrap")
    assert result.code == 1
    url = f.emulators["c0"].url
    assert f"c0: the connection to {url} (context c0) was dropped (after 4 tries)" in result.err
    assert f.emulators["c0"].count("get") == 4  # urllib3's Retry(3) would have made it 16


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
def test_permanent_failures_are_not_retried(status: int, fleet: Callable[..., Fleet]) -> None:
    f = fleet("c0")
    config = f.configure()
    f.emulators["c0"].inject(Fault("POST", "/secrets$", status=status, times=None))
    assert run(config, "bootstrap").code == 1
    assert f.emulators["c0"].count("create") == 1


def test_a_concurrent_writer_between_read_and_replace_is_not_overwritten_blindly(
    fleet: Callable[..., Fleet],
) -> None:
    f = fleet("c0", "c1")
    config = f.configure()
    ok(config, "bootstrap")
    theirs = f.material("c1")
    emulator = f.emulators["c0"]

    def concurrent_writer() -> None:
        emulator.put_object(secret_body(theirs, labels=MANAGED))

    emulator.inject(Fault("PUT", r"/secrets/cacerts$", hook=concurrent_writer))
    emulator.reset_counters()
    ok(f.configure(key_algorithm="ECDSA_P384"), "bootstrap")
    puts = [r.status for r in emulator.requests if r.verb == "update" and r.name == "cacerts"]
    assert puts == [409, 200]
    f.assert_whole()
    assert f.material("c0") not in (theirs,)
    assert f.material("c0", BACKUP) == theirs  # planned again from what they wrote
    assert status_of(config)["c0"]["drift"] is None


def test_a_concurrent_writer_that_takes_the_secret_over_wins(
    fleet: Callable[..., Fleet],
) -> None:
    f = fleet("c0")
    config = f.configure()
    ok(config, "bootstrap")
    theirs = handmade_cacerts()
    emulator = f.emulators["c0"]
    emulator.inject(
        Fault("PUT", r"/secrets/cacerts$", hook=lambda: emulator.put_object(secret_body(theirs)))
    )
    result = run(f.configure(key_algorithm="ECDSA_P384"), "bootstrap")
    assert result.code == 1
    assert "c0: secret istio-system/cacerts was not created by trustmgr" in result.err
    assert f.material("c0") == theirs


# --- istiod restarts --------------------------------------------------------------------------


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
                "spec": {"containers": [{"name": "discovery", "image": "istio/pilot:1.24"}]},
            },
        },
    }


def restarted_at(emulator: KubeEmulator) -> str | None:
    deployment = emulator.get_object("deployments", NS, "istiod")
    assert deployment is not None
    annotations = deployment["spec"]["template"]["metadata"].get("annotations") or {}
    value = annotations.get("kubectl.kubernetes.io/restartedAt")
    return str(value) if value is not None else None


def test_istiod_is_restarted_only_when_the_change_cannot_be_hot_reloaded(
    fleet: Callable[..., Fleet],
) -> None:
    f = fleet("c0", "c1")
    for emulator in f.emulators.values():
        emulator.put_object(istiod_deployment())
    settings = {"c0": {"istio": {"restartIstiod": True}}}
    meshes = {"web": ["c0"], "api": ["c1"]}
    config = f.configure(meshes=meshes, clusters=settings)
    ok(config, "bootstrap")
    assert restarted_at(f.emulators["c0"]) is None  # a first cacerts: nothing to reload

    config = f.configure(meshes=meshes, clusters=settings, federate=True)
    plan = run(config, "plan").out
    assert "(istiod will be restarted)" in plan and "(istiod restart needed)" in plan
    result = ok(config, "bootstrap")
    assert "update-bundle c0 (BundleChanged)" in result.out
    assert "(istiod restarted)" in result.out
    assert "(istiod restart needed)" in result.out
    assert "; 1 need an istiod restart" in result.out
    stamp = restarted_at(f.emulators["c0"])
    assert stamp is not None and datetime.fromisoformat(stamp) > datetime.now(UTC) - timedelta(
        minutes=1
    )
    assert restarted_at(f.emulators["c1"]) is None
    patches = [r for r in f.emulators["c0"].requests if r.verb == "patch"]
    assert len(patches) == 1
    f.reset_counters()
    ok(config, "bootstrap")
    assert all(e.writes == 0 for e in f.emulators.values())


def test_multi_root_istiod_takes_an_appended_root_without_restart(
    fleet: Callable[..., Fleet],
) -> None:
    f = fleet("c0", "c1")
    f.emulators["c0"].put_object(istiod_deployment())
    settings = {"c0": {"istio": {"restartIstiod": True, "multiRoot": True, "version": "1.24"}}}
    meshes = {"web": ["c0"], "api": ["c1"]}
    ok(f.configure(meshes=meshes, clusters=settings), "bootstrap")
    result = ok(f.configure(meshes=meshes, clusters=settings, federate=True), "bootstrap")
    assert "istiod" not in result.out.split("c0 (BundleChanged)")[1].splitlines()[0]
    assert restarted_at(f.emulators["c0"]) is None


def test_a_failed_restart_is_reported_after_the_secret_is_written(
    fleet: Callable[..., Fleet],
) -> None:
    f = fleet("c0")
    settings = {"c0": {"istio": {"restartIstiod": True}}}
    f.emulators["c0"].put_object(secret_body(handmade_cacerts()))
    result = run(f.configure(clusters=settings), "bootstrap", "--adopt")
    assert result.code == 1
    assert (
        "failed        c0: cacerts written, but istiod could not be restarted: deployment "
        "istio-system/istiod not found (context c0): set istiodDeployment"
    ) in result.err
    f.assert_whole()
    assert f.secret("c0", "cacerts") is not None
    assert "1 up to date" in ok(f.configure(clusters=settings), "bootstrap").out


# --- no key material in any output ------------------------------------------------------------


def test_an_api_error_echoing_the_secret_prints_no_key_material(
    fleet: Callable[..., Fleet],
) -> None:
    f = fleet("c0")
    key = handmade_cacerts().ca_key
    echoed = f'Secret "cacerts" is invalid: data: {key.decode()} {base64.b64encode(key).decode()}'
    f.emulators["c0"].inject(Fault("POST", "/secrets$", status=422, message=echoed))
    result = run(f.configure(), "-vv", "--debug", "bootstrap")
    assert result.code == 1
    output = result.out + result.err
    assert "PRIVATE KEY" not in output
    assert base64.b64encode(key).decode()[:40] not in output
    assert 'failed with 422 Invalid: Secret "cacerts" is invalid: data: [redacted]' in output


# --- the retry policy, alone ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("failure", "retried"),
    [
        (ApiException(status=500), True),
        (ApiException(status=503), True),
        (ApiException(status=504), True),
        (ApiException(status=429), True),
        (ApiException(status=501), False),
        (ApiException(status=400), False),
        (ApiException(status=401), False),
        (ApiException(status=403), False),
        (ApiException(status=404), False),
        (ApiException(status=409), False),
        (ApiException(status=422), False),
        (urllib3.exceptions.ReadTimeoutError(None, "/", "read timed out"), True),  # type: ignore[arg-type]
        (urllib3.exceptions.ConnectTimeoutError(), True),
        (urllib3.exceptions.NewConnectionError(None, "refused"), True),  # type: ignore[arg-type]
        (urllib3.exceptions.ProtocolError("Connection aborted."), True),
        (urllib3.exceptions.SSLError("certificate verify failed"), False),
    ],
)
def test_transient_failures_are_classified_in_one_place(
    failure: BaseException, retried: bool
) -> None:
    assert kubeapi.transient(failure) is retried


def _state_after(attempt: int, failure: BaseException) -> RetryCallState:
    state = RetryCallState(retry_object=None, fn=None, args=(), kwargs={})  # type: ignore[arg-type]
    state.attempt_number = attempt
    state.set_exception((type(failure), failure, None))
    return state


def test_backoff_is_jittered_exponential_and_honours_retry_after() -> None:
    failure = ApiException(status=500)
    for attempt in (1, 2, 3, 10):
        ceiling = min(kubeapi.MAX_WAIT, kubeapi.FIRST_WAIT * 2 ** (attempt - 1))
        waits = {kubeapi.backoff(_state_after(attempt, failure)) for _ in range(20)}
        assert all(0 <= w <= ceiling for w in waits)
        assert len(waits) > 1  # jittered
    throttled = ApiException(status=429)
    throttled.headers = {"Retry-After": "2"}
    assert kubeapi.backoff(_state_after(1, throttled)) == 2.0
    throttled.headers = {"Retry-After": "3600"}
    assert kubeapi.backoff(_state_after(1, throttled)) == kubeapi.MAX_WAIT


def test_scrub_removes_pem_and_base64() -> None:
    key = handmade_cacerts().ca_key
    text = f"before {key.decode().strip()} middle {base64.b64encode(key).decode()} after"
    assert kubeapi.scrub(text) == "before [redacted] middle [redacted] after"


def test_lost_records_are_recovered_from_the_clusters_and_a_lost_root_refused(
    fleet: Callable[..., Fleet],
) -> None:
    """state.json lost: what each secret's digest annotation vouches for is
    recorded, nothing issued again. The root lost too: the run stops, no write."""
    f = fleet("c0", "c1")
    config = f.configure()
    ok(config, "bootstrap")
    before = {c: f.material(c) for c in f.emulators}
    (f.workdir / "state" / "state.json").unlink()
    f.reset_counters()
    result = ok(config, "bootstrap", "-o", "json")
    report = json.loads(result.out)
    assert {c["action"] for c in report["clusters"]} == {"record"}
    assert {c: f.material(c) for c in f.emulators} == before
    assert all(e.writes == 0 for e in f.emulators.values())
    assert json.loads(ok(config, "plan", "-o", "json").out)["pending"] is False
    import shutil

    shutil.rmtree(f.workdir / "state")
    lost = run(config, "bootstrap")
    assert lost.code == 2
    assert "clusters c0, c1 hold CAs trustmgr issued under root " in lost.err
    assert all(e.writes == 0 for e in f.emulators.values())
    assert {c: f.material(c) for c in f.emulators} == before
