"""A self-signed root kept in an earlier form is stored anew in execute's fenced
step, before any cluster is written; signing, in the workers, never writes.
And each blob of the root is read once per operation."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from tests.conftest import PASSPHRASE, snapshot, trustmgr
from trustmgr import config as config_mod
from trustmgr.execute import Fence, Report, execute, preflight
from trustmgr.leader import NotLeaderError
from trustmgr.observe import observe_all
from trustmgr.pki import cluster_ca_request
from trustmgr.planner import Action, decide
from trustmgr.providers import BlobStore, RootKeeper, keyseal
from trustmgr.providers.config import SelfSignedConfig
from trustmgr.providers.keys import KeyAlgorithm
from trustmgr.providers.selfsigned import SelfSignedProvider
from trustmgr.state.file import FileStateStore
from trustmgr.workspace import Workspace

CONFIG = """\
stateStore: {file: {path: state}}
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
MORE_CLUSTERS = "".join(f"      web-{i}: {{directory: {{path: out/web-{i}}}}}\n" for i in (2, 3, 4))
UNIT = Path("state/providers/corp/root.pem")
KEY_BLOCK = b"-----BEGIN ENCRYPTED PRIVATE KEY-----"


class _Recording:
    """A BlobStore that counts reads and records each write: what, from which
    thread, after how many calls of the fence."""

    def __init__(self, blobs: BlobStore, fenced: list[int] | None = None) -> None:
        self._blobs = blobs
        self._fenced = fenced if fenced is not None else []
        self.loads: list[str] = []
        self.writes: list[tuple[str, str, bool, int]] = []
        self._lock = threading.Lock()

    def load(self, name: str) -> bytes | None:
        with self._lock:
            self.loads.append(name)
        return self._blobs.load(name)

    def _wrote(self, what: str, name: str) -> None:
        main = threading.current_thread() is threading.main_thread()
        with self._lock:
            self.writes.append((what, name, main, len(self._fenced)))

    def save(self, name: str, data: bytes, *, secret: bool) -> None:
        self._wrote("save", name)
        self._blobs.save(name, data, secret=secret)

    def delete(self, name: str) -> None:
        self._wrote("delete", name)
        self._blobs.delete(name)


def _key_seal(unit: bytes) -> keyseal.Seal:
    return keyseal.describe(unit[unit.index(KEY_BLOCK) :])


def _earlier_form(workdir: Path) -> None:
    """A root bootstrapped, then its key put back as earlier releases sealed it,
    and clusters added that the next pass signs for."""
    (workdir / "trustmgr.yaml").write_text(CONFIG)
    assert trustmgr("bootstrap").code == 0
    unit = (workdir / UNIT).read_bytes()
    cut = unit.index(KEY_BLOCK)
    key = keyseal.unseal(unit[cut:], PASSPHRASE.encode())
    earlier = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(PASSPHRASE.encode()),
    )
    (workdir / UNIT).write_bytes(unit[:cut] + earlier)
    assert not _key_seal((workdir / UNIT).read_bytes()).current
    with (workdir / "trustmgr.yaml").open("a") as config:
        config.write(MORE_CLUSTERS)


def _workspace(workdir: Path, blobs: _Recording) -> Workspace:
    config = config_mod.load(workdir / "trustmgr.yaml")
    store = FileStateStore(workdir / "state")
    entry = config.providers["corp"].self_signed
    assert entry is not None
    clock = lambda: datetime.now(UTC)  # noqa: E731
    provider = SelfSignedProvider("corp", entry, blobs, clock)
    return Workspace.build(config, clock=clock, store=store, providers={"corp": provider})


def _pass(ws: Workspace, fence: Fence) -> Report:
    observation = observe_all(ws)
    plan = decide(ws.config, observation)
    assert sum(c.action is Action.ISSUE for c in plan.clusters) == 3
    preflight(ws, plan)
    with ws.store.lock():
        return execute(ws, plan, observation, fence=fence)


def test_a_pass_whose_fence_refuses_leaves_the_earlier_form_untouched(workdir: Path) -> None:
    _earlier_form(workdir)
    before = snapshot(workdir)
    blobs = _Recording(FileStateStore(workdir / "state").blobs())

    def refuse() -> None:
        raise NotLeaderError("no longer holds the leader lease")

    with _workspace(workdir, blobs) as ws, pytest.raises(NotLeaderError):
        _pass(ws, refuse)
    assert blobs.writes == []
    assert snapshot(workdir) == before
    assert not _key_seal((workdir / UNIT).read_bytes()).current


def test_a_fenced_pass_seals_the_key_again_once_before_the_workers(workdir: Path) -> None:
    _earlier_form(workdir)
    fenced: list[int] = []
    blobs = _Recording(FileStateStore(workdir / "state").blobs(), fenced)
    with _workspace(workdir, blobs) as ws:
        report = _pass(ws, lambda: fenced.append(1))
    assert report.ok
    # one write of the unit, by the calling thread, after the fence passed it;
    # the four workers that signed wrote nothing
    assert blobs.writes == [("save", "corp/root.pem", True, 1)]
    assert _key_seal((workdir / UNIT).read_bytes()).current
    roots = {(workdir / f"out/web-{i}/root-cert.pem").read_bytes() for i in (1, 2, 3, 4)}
    assert len(roots) == 1

    again = _Recording(FileStateStore(workdir / "state").blobs())
    with _workspace(workdir, again) as ws:
        provider = ws.providers["corp"]
        assert isinstance(provider, RootKeeper)
        assert not provider.reseal_if_needed(lambda: None)
    assert again.writes == []


def test_signing_never_writes_the_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Even with the key in an earlier form and no pass's step before it."""
    monkeypatch.setenv("TEST_PASSPHRASE", "correct horse")
    config = SelfSignedConfig(passphrase_env="TEST_PASSPHRASE")
    clock = lambda: datetime.now(UTC)  # noqa: E731
    store = FileStateStore(tmp_path / "state")
    root = SelfSignedProvider("corp", config, store.blobs(), clock).create_root()
    unit = store.blobs().load("corp/root.pem")
    assert unit is not None
    cut = unit.index(KEY_BLOCK)
    key = keyseal.unseal(unit[cut:], b"correct horse")
    earlier = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"correct horse"),
    )
    store.blobs().save("corp/root.pem", unit[:cut] + earlier, secret=True)
    blobs = _Recording(store.blobs())
    provider = SelfSignedProvider("corp", config, blobs, clock)
    request = cluster_ca_request("a.test", cluster="c", algorithm=KeyAlgorithm.ECDSA_P256)
    provider.sign_ca(request.csr, timedelta(hours=1)).chain[0].verify_directly_issued_by(root)
    assert blobs.writes == []


# Each blob read once per operation: one GET each with the Kubernetes state store.


@pytest.fixture
def counted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> _Recording:
    """The blobs of a provider whose root is stored; reads counted from here."""
    monkeypatch.setenv("TEST_PASSPHRASE", "correct horse")
    store = FileStateStore(tmp_path / "state")
    _provider(store.blobs()).create_root()
    return _Recording(store.blobs())


def _provider(blobs: BlobStore) -> SelfSignedProvider:
    config = SelfSignedConfig(passphrase_env="TEST_PASSPHRASE")
    return SelfSignedProvider("corp", config, blobs, lambda: datetime.now(UTC))


def test_one_signing_reads_the_root_once(counted: _Recording) -> None:
    provider = _provider(counted)
    request = cluster_ca_request("a.test", cluster="c", algorithm=KeyAlgorithm.ECDSA_P256)
    provider.sign_ca(request.csr, timedelta(hours=1))
    assert counted.loads == ["corp/root.pem"]
    provider.sign_ca(request.csr, timedelta(hours=1))
    assert counted.loads == ["corp/root.pem"], "the unlocked root is kept for the next signing"


def test_roots_reads_the_root_once(counted: _Recording) -> None:
    assert len(_provider(counted).roots()) == 1
    assert counted.loads == ["corp/root.pem"]


def test_unlocking_then_signing_reads_the_root_once(counted: _Recording) -> None:
    provider = _provider(counted)
    provider.unlock()
    request = cluster_ca_request("a.test", cluster="c", algorithm=KeyAlgorithm.ECDSA_P256)
    provider.sign_ca(request.csr, timedelta(hours=1))
    assert counted.loads == ["corp/root.pem"]
