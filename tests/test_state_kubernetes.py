"""The kubernetes state store against the emulated API server over HTTP: the
state and blobs in one Secret written by resourceVersion compare-and-set, the
run lock as a Lease, and whole runs of trustmgr keeping their state there."""

# The fixtures are imported, so this module runs without conftest wiring; pytest injects them as
# parameters of the same names, which pyflakes would call unused imports and redefinitions.
# ruff: noqa: F401, F811

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import REPO, snapshot, trustmgr
from tests.kube_emulator import Fault, KubeEmulator
from tests.kube_fixtures import KubeEmulatorFactory, kube_emulator_factory
from trustmgr.config import KubernetesStateStoreConfig
from trustmgr.errors import LockedError, StateError
from trustmgr.state.kubernetes import KubernetesStateStore, blob_key, blob_name, micro_time
from trustmgr.state.model import State

NS = "trustmgr"
SECRET = "trustmgr-state"
LEASE = "trustmgr-state-lock"

Stores = Callable[..., KubernetesStateStore]


@pytest.fixture
def cluster(kube_emulator_factory: KubeEmulatorFactory) -> KubeEmulator:
    return kube_emulator_factory(namespaces=["default", NS])


@pytest.fixture
def kubeconfig(tmp_path: Path, cluster: KubeEmulator) -> Path:
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(cluster.kubeconfig("state")))
    return path


@pytest.fixture
def stores(kubeconfig: Path) -> Iterator[Stores]:
    """Stores on the emulated cluster, as separate runs would build them; closed after."""
    made: list[KubernetesStateStore] = []

    def make(
        lock_duration: timedelta = timedelta(seconds=60), **config: Any
    ) -> KubernetesStateStore:
        cfg = KubernetesStateStoreConfig.model_validate(
            {"kubeconfig": str(kubeconfig), "requestTimeout": "2s", **config}
        )
        store = KubernetesStateStore(cfg, lock_duration=lock_duration)
        made.append(store)
        return store

    yield make
    for store in made:
        store.close()


def stored(cluster: KubeEmulator) -> dict[str, bytes]:
    secret = cluster.get_object("secrets", NS, SECRET)
    assert secret is not None
    return {k: base64.b64decode(v) for k, v in (secret.get("data") or {}).items()}


def lease_spec(cluster: KubeEmulator) -> dict[str, Any]:
    lease = cluster.get_object("leases", NS, LEASE)
    assert lease is not None
    return dict(lease["spec"])


def take(store: KubernetesStateStore) -> None:
    """Take the store's lock and give it back."""
    with store.lock():
        pass


def with_generation(state: State, provider: str, generation: str) -> State:
    return State(version=state.version, generations={**state.generations, provider: generation})


# --- the Secret ------------------------------------------------------------------------------


def test_state_and_blobs_are_keys_of_one_secret(stores: Stores, cluster: KubeEmulator) -> None:
    store = stores()
    assert store.load() == State()
    assert store.blobs().names() == []
    saved = store.save(with_generation(store.load(), "corp", "20300101"))
    assert saved.version == 1
    store.blobs().save("corp/root.pem", b"sealed root", secret=True)
    store.blobs().save("my_ca/generation-2/root.pem", b"later root", secret=True)

    data = stored(cluster)
    assert sorted(data) == [
        "blob.corp_2Froot.pem",
        "blob.my_5Fca_2Fgeneration-2_2Froot.pem",
        "state.json",
    ]
    assert json.loads(data["state.json"])["generations"] == {"corp": "20300101"}
    secret = cluster.get_object("secrets", NS, SECRET)
    assert secret is not None
    assert secret["metadata"]["labels"] == {"app.kubernetes.io/managed-by": "trustmgr"}

    again = stores()
    assert again.load() == saved
    assert again.blobs().names() == ["corp/root.pem", "my_ca/generation-2/root.pem"]
    assert again.blobs().load("my_ca/generation-2/root.pem") == b"later root"
    again.blobs().delete("corp/root.pem")
    again.blobs().delete("corp/root.pem")  # absent: nothing happens
    assert store.blobs().load("corp/root.pem") is None
    assert store.load() == saved


def test_blob_names_escape_into_data_keys_and_back() -> None:
    for name in ("corp/root.pem", "a_b/_5F/x-y.z", "p/generation-20300101/root.pem"):
        key = blob_key(name)
        assert key.startswith("blob.") and set(key) <= set(
            "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._"
        )
        assert blob_name(key) == name
    for bad in ("../x", "/abs", "a//b", "a/./b", ""):
        with pytest.raises(StateError, match="not a plain relative name"):
            blob_key(bad)


def test_a_save_over_a_newer_state_is_refused(stores: Stores, cluster: KubeEmulator) -> None:
    first, second = stores(), stores()
    seen_first, seen_second = first.load(), second.load()
    first.save(with_generation(seen_first, "corp", "one"))
    with pytest.raises(StateError, match=r"changed during this run \(version 0 → 1\); run again"):
        second.save(with_generation(seen_second, "corp", "two"))
    assert json.loads(stored(cluster)["state.json"])["generations"] == {"corp": "one"}


def test_a_writer_between_read_and_replace_gets_a_conflict(
    stores: Stores, cluster: KubeEmulator
) -> None:
    """The other writer saves after this one read the Secret and before its replace
    arrives: the API server answers 409 to the stale resourceVersion, the Secret
    is read again, and the save refused because the state's version moved."""
    mine, other = stores(), stores()
    mine.save(State())  # the Secret exists: saves are replaces from here on
    seen, theirs = mine.load(), other.load()
    cluster.inject(
        Fault(
            method="PUT",
            path=f"/secrets/{SECRET}$",
            hook=lambda: other.save(with_generation(theirs, "corp", "theirs")),
        )
    )
    with pytest.raises(StateError, match="changed during this run"):
        mine.save(with_generation(seen, "corp", "mine"))
    # this run's replace arrived first and was answered after the other's
    assert [r.status for r in cluster.requests if r.verb == "update"] == [409, 200]
    assert mine.load().generations == {"corp": "theirs"}


def test_blob_saves_are_whole_replaces_that_lose_nothing(
    stores: Stores, cluster: KubeEmulator
) -> None:
    """A blob saved by someone else between this save's read and its replace makes
    the replace conflict; it is read and edited again, so both blobs are kept."""
    mine, other = stores(), stores()
    mine.blobs().save("a/root.pem", b"a", secret=True)
    cluster.inject(
        Fault(
            method="PUT",
            path=f"/secrets/{SECRET}$",
            hook=lambda: other.blobs().save("b/root.pem", b"b", secret=True),
        )
    )
    mine.blobs().save("c/root.pem", b"c", secret=True)
    assert 409 in [r.status for r in cluster.requests if r.verb == "update"]
    assert stored(cluster) == {
        "blob.a_2Froot.pem": b"a",
        "blob.b_2Froot.pem": b"b",
        "blob.c_2Froot.pem": b"c",
    }


def test_a_save_whose_answer_was_lost_is_not_refused_by_itself(
    stores: Stores, cluster: KubeEmulator
) -> None:
    store = stores()
    store.save(State())
    cluster.inject(Fault(method="PUT", path=f"/secrets/{SECRET}$", lose_response=True))
    saved = store.save(with_generation(store.load(), "corp", "x"))
    assert store.load() == saved


def test_check_writable_is_a_dry_run_the_api_server_judges(
    stores: Stores, cluster: KubeEmulator
) -> None:
    store = stores()
    store.check_writable()  # a dry-run create
    assert cluster.get_object("secrets", NS, SECRET) is None
    store.save(State())
    cluster.deny("update", "secrets")
    with pytest.raises(
        StateError,
        match=r'state store: forbidden: .* lack update on secrets "trustmgr-state" .*docs/state.md',
    ):
        store.check_writable()
    missing = stores(namespace="elsewhere")
    with pytest.raises(
        StateError,
        match=r"namespace elsewhere does not exist .*kubectl create namespace elsewhere",
    ):
        missing.check_writable()


# --- the Lease -------------------------------------------------------------------------------


def test_a_held_lock_fails_a_second_holder_at_once(stores: Stores, cluster: KubeEmulator) -> None:
    first, second = stores(), stores()
    with first.lock():
        spec = lease_spec(cluster)
        assert spec["leaseDurationSeconds"] == 60
        assert spec["holderIdentity"].split("/")[1] == f"pid-{os.getpid()}"
        started = time.monotonic()
        with pytest.raises(LockedError, match=r"another trustmgr run \(.*\) holds the state lock"):
            take(second)
        assert time.monotonic() - started < 1
    assert lease_spec(cluster)["holderIdentity"] == ""  # released
    with second.lock():
        assert lease_spec(cluster)["leaseTransitions"] == 1


def test_an_expired_lock_is_taken_over(stores: Stores, cluster: KubeEmulator) -> None:
    long_ago = datetime.now(UTC) - timedelta(minutes=5)
    cluster.put_object(
        {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": LEASE, "namespace": NS},
            "spec": {
                "holderIdentity": "dead-host/pid-1/0000",
                "leaseDurationSeconds": 60,
                "acquireTime": micro_time(long_ago),
                "renewTime": micro_time(long_ago),
                "leaseTransitions": 4,
            },
        }
    )
    store = stores()
    with store.lock():
        spec = lease_spec(cluster)
        assert spec["holderIdentity"] != "dead-host/pid-1/0000"
        assert spec["leaseTransitions"] == 5
        store.save(State())
    assert lease_spec(cluster)["holderIdentity"] == ""


def test_a_long_run_keeps_its_lock_renewed(stores: Stores, cluster: KubeEmulator) -> None:
    holder, other = stores(lock_duration=timedelta(seconds=1.5)), stores()
    with holder.lock():
        acquired = lease_spec(cluster)["renewTime"]
        time.sleep(3.5)  # more than twice the duration
        assert lease_spec(cluster)["renewTime"] > acquired
        with pytest.raises(LockedError):
            take(other)
        holder.save(State())  # still the holder: writes go through


def test_a_run_that_lost_its_lock_writes_nothing_more(
    stores: Stores, cluster: KubeEmulator
) -> None:
    store = stores(lock_duration=timedelta(seconds=3))
    with store.lock():
        lease = cluster.get_object("leases", NS, LEASE)
        assert lease is not None
        lease["spec"]["holderIdentity"] = "intruder"
        cluster.put_object(lease)
        time.sleep(2)  # a renewal (every second) finds the lease taken
        with pytest.raises(
            LockedError, match=r"this run lost the state lock .*intruder holds it now"
        ):
            store.save(State())
        with pytest.raises(LockedError, match="lost the state lock"):
            store.blobs().save("corp/root.pem", b"x", secret=True)
    assert cluster.get_object("secrets", NS, SECRET) is None
    assert lease_spec(cluster)["holderIdentity"] == "intruder"  # not cleared: not ours


HOLD_AND_WAIT = """\
import sys, time
from datetime import timedelta
from trustmgr.config import KubernetesStateStoreConfig
from trustmgr.state.kubernetes import KubernetesStateStore

store = KubernetesStateStore(
    KubernetesStateStoreConfig(kubeconfig=sys.argv[1]), lock_duration=timedelta(seconds=2)
)
with store.lock():
    print("held", flush=True)
    time.sleep(60)
"""


def test_the_lock_of_a_killed_run_expires_after_its_duration(
    stores: Stores, cluster: KubeEmulator, kubeconfig: Path
) -> None:
    process = subprocess.Popen(
        [sys.executable, "-c", HOLD_AND_WAIT, str(kubeconfig)],
        stdout=subprocess.PIPE,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        assert process.stdout is not None
        assert process.stdout.readline() == b"held\n"
        time.sleep(1)  # it renews
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
        if process.stdout is not None:
            process.stdout.close()
    killed_at = time.monotonic()
    store = stores()
    with pytest.raises(LockedError, match=r"\(a run that died lets it expire then\)"):
        take(store)
    while True:
        try:
            with store.lock():
                break
        except LockedError:
            assert time.monotonic() - killed_at < 4, "the dead run's lock did not expire"
            time.sleep(0.2)


# --- whole runs ------------------------------------------------------------------------------


def write_config(workdir: Path, kubeconfig: Path) -> Path:
    config = {
        "stateStore": {
            "kubernetes": {"kubeconfig": str(kubeconfig), "context": "state", "namespace": NS}
        },
        "providers": {
            "corp": {"selfSigned": {"passphraseEnv": "TRUSTMGR_PASSPHRASE"}},
        },
        "meshes": {
            "web": {
                "trustDomain": "web.example",
                "provider": "corp",
                "clusters": {
                    "web-1": {"directory": {"path": "out/web-1"}},
                    "web-2": {"directory": {"path": "out/web-2"}},
                },
            }
        },
    }
    path = workdir / "trustmgr.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_bootstrap_and_a_rerun_keep_the_state_in_the_cluster(
    workdir: Path, cluster: KubeEmulator, kubeconfig: Path, stores: Stores
) -> None:
    config = write_config(workdir, kubeconfig)

    other_run = stores()
    with other_run.lock():
        refused = trustmgr("-c", str(config), "bootstrap")
    assert refused.code == 1
    assert "holds the state lock (lease trustmgr/trustmgr-state-lock)" in refused.err
    assert cluster.get_object("secrets", NS, SECRET) is None

    first = trustmgr("-c", str(config), "bootstrap")
    assert first.code == 0, first.err
    assert not (workdir / ".trustmgr").exists()
    data = stored(cluster)
    state = json.loads(data["state.json"])
    assert sorted(state["clusters"]) == ["web-1", "web-2"]
    root = data["blob.corp_2Froot.pem"]
    assert b"BEGIN ENCRYPTED PRIVATE KEY" in root
    assert b"BEGIN PRIVATE KEY" not in root and b"BEGIN EC PRIVATE KEY" not in root
    assert lease_spec(cluster)["holderIdentity"] == ""

    before = snapshot(workdir / "out")
    cluster.reset_counters()
    again = trustmgr("-c", str(config), "bootstrap")
    assert again.code == 0, again.err
    assert snapshot(workdir / "out") == before
    assert cluster.count("update", "secrets") == cluster.count("create", "secrets") == 0
    status = trustmgr("-c", str(config), "status", "-o", "json")
    assert {r["cluster"] for r in json.loads(status.out)} == {"web-1", "web-2"}


def test_a_missing_state_namespace_is_named_with_the_fix(
    workdir: Path, cluster: KubeEmulator, kubeconfig: Path
) -> None:
    config = write_config(workdir, kubeconfig)
    config.write_text(config.read_text().replace("namespace: trustmgr", "namespace: absent"))
    result = trustmgr("-c", str(config), "bootstrap")
    assert result.code == 2
    assert "kubectl create namespace absent" in result.err


def test_the_role_of_the_docs_is_enough(
    workdir: Path, cluster: KubeEmulator, kubeconfig: Path
) -> None:
    text = (REPO / "docs" / "state.md").read_text()
    role = next(
        yaml.safe_load(block)
        for block in re.findall(r"```yaml\n(.*?)```", text, re.DOTALL)
        if "kind: Role" in block
    )
    for rule in role["rules"]:
        cluster.allow(
            rule["verbs"],
            rule["resources"],
            namespaces=role["metadata"]["namespace"],
            names=rule.get("resourceNames", "*"),
        )
    config = write_config(workdir, kubeconfig)
    assert trustmgr("-c", str(config), "bootstrap").code == 0
    (workdir / "out" / "web-1" / "ca-cert.pem").unlink()  # drift: a second run writes
    assert trustmgr("-c", str(config), "bootstrap").code == 0
    assert cluster.count("update", "secrets") and cluster.count("update", "leases")
    assert all(r.status != 403 for r in cluster.requests), [
        (r.verb, r.resource, r.name, r.status) for r in cluster.requests
    ]
