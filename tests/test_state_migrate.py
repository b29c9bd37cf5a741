"""``trustmgr state migrate``: a file state, with a rotation under way, copied into
the emulated cluster's Secret and into OpenBao's KV, read back, and used."""

# The fixtures are imported, so this module runs without conftest wiring; pytest injects them as
# parameters of the same names, which pyflakes would call unused imports and redefinitions.
# ruff: noqa: F401, F811

from __future__ import annotations

import base64
import json
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import Run, trustmgr
from tests.kube_emulator import KubeEmulator
from tests.kube_fixtures import KubeEmulatorFactory, kube_emulator_factory
from tests.openbao import OpenBaoServer
from trustmgr.config import VaultStateStoreConfig
from trustmgr.errors import StateError
from trustmgr.state.file import FileStateStore
from trustmgr.state.migrate import migrate
from trustmgr.state.model import State
from trustmgr.state.vault import VaultStateStore

CONFIG: dict[str, Any] = {
    "stateStore": {"file": {"path": "state"}},
    "providers": {
        "corp": {"selfSigned": {"passphraseEnv": "TRUSTMGR_PASSPHRASE"}},
        "pci": {"selfSigned": {"passphraseEnv": "TRUSTMGR_PASSPHRASE"}},
    },
    "meshes": {
        "web": {
            "trustDomain": "web.example",
            "provider": "corp",
            "clusters": {"web-1": {"directory": {"path": "out/web-1"}}},
        },
        "pay": {
            "trustDomain": "pay.example",
            "provider": "pci",
            "clusters": {"pay-1": {"directory": {"path": "out/pay-1"}}},
        },
    },
    "federations": [{"meshes": ["web", "pay"]}],
}


def write(workdir: Path, name: str, store: dict[str, Any]) -> Path:
    path = workdir / name
    path.write_text(yaml.safe_dump({**CONFIG, "stateStore": store}))
    return path


def ok(*args: str) -> Run:
    result = trustmgr(*args)
    assert result.code == 0, result.out + result.err
    return result


@pytest.fixture
def source(workdir: Path) -> Path:
    """A file state with two roots, two clusters and a root rotation under way."""
    config = write(workdir, "trustmgr.yaml", CONFIG["stateStore"])
    ok("-c", str(config), "bootstrap")
    ok("-c", str(config), "rotate", "start", "--provider", "corp")
    return config


def file_blobs(workdir: Path) -> dict[str, bytes]:
    root = workdir / "state" / "providers"
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def plan_json(config: Path) -> Any:
    return json.loads(trustmgr("-c", str(config), "plan", "-o", "json").out)


def test_a_file_state_moves_into_a_kubernetes_secret(
    workdir: Path, source: Path, kube_emulator_factory: KubeEmulatorFactory
) -> None:
    cluster = kube_emulator_factory(namespaces=["trustmgr"])
    kubeconfig = workdir / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump(cluster.kubeconfig("state")))
    target = write(workdir, "to-kube.yaml", {"kubernetes": {"kubeconfig": str(kubeconfig)}})
    blobs = file_blobs(workdir)
    assert len(blobs) == 3  # two roots and the rotation's new one

    done = ok("-c", str(source), "state", "migrate", "--to", str(target))
    assert "and 3 blobs from directory state to secret trustmgr/trustmgr-state" in done.out
    assert "read them back equal" in done.out

    secret = cluster.get_object("secrets", "trustmgr", "trustmgr-state")
    assert secret is not None
    data = {k: base64.b64decode(v) for k, v in secret["data"].items()}
    copied = {
        k.removeprefix("blob.").replace("_2F", "/"): v for k, v in data.items() if k != "state.json"
    }
    assert copied == blobs
    moved = State.from_json(json.loads(data["state.json"]), "secret")
    kept = FileStateStore(workdir / "state").load()
    assert moved == replace(kept, version=1)
    assert moved.rotations and len(moved.clusters) == 2
    lease = cluster.get_object("leases", "trustmgr", "trustmgr-state-lock")
    assert lease is not None and lease["spec"]["holderIdentity"] == ""
    assert plan_json(target) == plan_json(source)  # the next run sees the same world


def test_a_file_state_moves_into_vault(workdir: Path, source: Path, openbao: OpenBaoServer) -> None:
    token = workdir / "token"
    token.write_text(openbao.root_token)
    path = f"tests/{uuid.uuid4().hex[:12]}"
    store = {"address": openbao.address, "path": path, "auth": {"token": {"file": str(token)}}}
    target = write(workdir, "to-vault.yaml", {"vault": store})

    done = ok("-c", str(source), "state", "migrate", "--to-config", str(target))
    assert f"and 3 blobs from directory state to Vault KV secret/{path}" in done.out
    assert plan_json(target) == plan_json(source)
    # and it carries on from there: the rotation's next phase is saved in Vault alone
    ok("-c", str(target), "reconcile")
    moved = VaultStateStore(VaultStateStoreConfig.model_validate(store))
    try:
        assert moved.load().rotations["corp"].phase == "trust-distributed"
    finally:
        moved.close()
    assert FileStateStore(workdir / "state").load().rotations["corp"].phase == "prepared"


def test_a_destination_that_holds_a_state_is_refused(
    workdir: Path, source: Path, kube_emulator_factory: KubeEmulatorFactory
) -> None:
    cluster = kube_emulator_factory(namespaces=["trustmgr"])
    kubeconfig = workdir / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump(cluster.kubeconfig("state")))
    target = write(workdir, "to-kube.yaml", {"kubernetes": {"kubeconfig": str(kubeconfig)}})
    ok("-c", str(source), "state", "migrate", "--to", str(target))
    before = cluster.get_object("secrets", "trustmgr", "trustmgr-state")

    again = trustmgr("-c", str(source), "state", "migrate", "--to", str(target))
    assert again.code == 2
    assert (
        "secret trustmgr/trustmgr-state (the current context of "
        f"{kubeconfig}) already holds a state (version 1, 3 blobs); migrate only into an empty store"
    ) in again.err
    assert cluster.get_object("secrets", "trustmgr", "trustmgr-state") == before

    itself = trustmgr("-c", str(source), "state", "migrate", "--to", str(source))
    assert itself.code == 2
    assert "the destination is the current state store (directory state)" in itself.err


def test_a_copy_that_does_not_read_back_equal_is_reported(workdir: Path, source: Path) -> None:
    class Garbling(FileStateStore):
        """A store whose blob writes land altered."""

        def blobs(self) -> Any:
            inner = super().blobs()
            real_save = inner.save

            def save(name: str, data: bytes, *, secret: bool) -> None:
                real_save(name, data[:-1] + b"?", secret=secret)

            inner.save = save  # type: ignore[method-assign]
            return inner

    with pytest.raises(
        StateError, match=r"blob corp/.*root.pem read back from directory .* differs"
    ):
        migrate(FileStateStore(workdir / "state"), Garbling(workdir / "elsewhere"))
