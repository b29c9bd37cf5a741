from __future__ import annotations

import base64
import os
import signal
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.conformance import ProviderConformance
from tests.conftest import PASSPHRASE, REPO, snapshot, trustmgr
from trustmgr.errors import StateError
from trustmgr.pki import cluster_ca_request
from trustmgr.providers import BlobStore, ProviderNeedsFixError, keyseal
from trustmgr.providers.config import SelfSignedConfig
from trustmgr.providers.keys import KeyAlgorithm, key_algorithm_of
from trustmgr.providers.selfsigned import SelfSignedProvider
from trustmgr.state.file import FileStateStore


@pytest.fixture
def store(tmp_path: Path) -> Iterator[FileStateStore]:
    yield FileStateStore(tmp_path / "state")


@pytest.fixture
def provider(store: FileStateStore, monkeypatch: pytest.MonkeyPatch) -> SelfSignedProvider:
    monkeypatch.setenv("TEST_PASSPHRASE", "correct horse")
    return SelfSignedProvider(
        "corp",
        SelfSignedConfig(passphrase_env="TEST_PASSPHRASE"),
        store.blobs(),
        lambda: datetime.now(UTC),
    )


class TestSelfSignedConformance(ProviderConformance):
    pass


def test_root_key_is_encrypted_and_private(provider: SelfSignedProvider, tmp_path: Path) -> None:
    provider.create_root()
    key_file = tmp_path / "state" / "providers" / "corp" / "root.pem"
    unit = key_file.read_bytes()
    assert unit.startswith(b"-----BEGIN CERTIFICATE-----")
    assert b"-----BEGIN ENCRYPTED PRIVATE KEY-----" in unit
    assert b"-----BEGIN PRIVATE KEY-----" not in unit
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600


def test_wrong_passphrase_is_a_clear_error(
    provider: SelfSignedProvider, store: FileStateStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    provider.create_root()
    monkeypatch.setenv("TEST_PASSPHRASE", "wrong")
    fresh = SelfSignedProvider(
        "corp",
        SelfSignedConfig(passphrase_env="TEST_PASSPHRASE"),
        store.blobs(),
        lambda: datetime.now(UTC),
    )
    request = cluster_ca_request("a.test", cluster="c", algorithm=KeyAlgorithm.ECDSA_P256)
    with pytest.raises(
        ProviderNeedsFixError, match="cannot decrypt the root key; check the passphrase"
    ):
        fresh.sign_ca(request.csr, timedelta(hours=1))


def test_cluster_ca_never_outlives_the_root(
    store: FileStateStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEST_PASSPHRASE", "pw")
    config = SelfSignedConfig(passphrase_env="TEST_PASSPHRASE", ttl=timedelta(hours=10))
    provider = SelfSignedProvider("corp", config, store.blobs(), lambda: datetime.now(UTC))
    request = cluster_ca_request("a.test", cluster="c", algorithm=KeyAlgorithm.ECDSA_P256)
    answer = provider.sign_ca(request.csr, timedelta(days=30))
    assert answer.chain[0].not_valid_after_utc == answer.roots[0].not_valid_after_utc
    assert answer.chain[0].not_valid_before_utc <= datetime.now(UTC) - timedelta(minutes=4)


@pytest.mark.parametrize("algorithm", list(KeyAlgorithm))
def test_root_key_algorithms(
    store: FileStateStore, algorithm: KeyAlgorithm, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TRUSTMGR_TEST_PW", "pw")
    config = SelfSignedConfig(passphrase_env="TRUSTMGR_TEST_PW", key_algorithm=algorithm)
    root = SelfSignedProvider(
        "corp", config, store.blobs(), lambda: datetime.now(UTC)
    ).create_root()
    assert key_algorithm_of(root.public_key()) is algorithm


# The root key sealed at the current cost, and roots stored the earlier ways.

KEY_BLOCK = b"-----BEGIN ENCRYPTED PRIVATE KEY-----"
PEM = serialization.Encoding.PEM


def _corp(tmp_path: Path) -> Path:
    return tmp_path / "state" / "providers" / "corp"


def _key_seal(unit: bytes) -> keyseal.Seal:
    return keyseal.describe(unit[unit.index(KEY_BLOCK) :])


def _fresh(store: BlobStore) -> SelfSignedProvider:
    """The provider as the next run builds it."""
    config = SelfSignedConfig(passphrase_env="TEST_PASSPHRASE")
    return SelfSignedProvider("corp", config, store, lambda: datetime.now(UTC))


def _signs(provider: SelfSignedProvider, root: x509.Certificate) -> None:
    request = cluster_ca_request("a.test", cluster="c", algorithm=KeyAlgorithm.ECDSA_P256)
    answer = provider.sign_ca(request.csr, timedelta(hours=1))
    answer.chain[0].verify_directly_issued_by(root)
    assert answer.roots == (root,)


def _resealed(store: BlobStore) -> SelfSignedProvider:
    """The provider as the next run builds it, after the run's step that stores
    a root kept in an earlier form anew (signing never writes)."""
    provider = _fresh(store)
    provider.reseal_if_needed()
    return provider


def _store_earlier_form(
    provider: SelfSignedProvider, tmp_path: Path, *, two_files: bool
) -> x509.Certificate:
    """A root as earlier releases stored it: the key PKCS#8 under PBKDF2 at
    2048 rounds, in root.pem or in root-cert.pem and root-key.pem."""
    root = provider.create_root()
    corp = _corp(tmp_path)
    unit = (corp / "root.pem").read_bytes()
    key = keyseal.unseal(unit[unit.index(KEY_BLOCK) :], b"correct horse")
    earlier = key.private_bytes(
        PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"correct horse"),
    )
    if two_files:
        (corp / "root.pem").unlink()
        (corp / "root-cert.pem").write_bytes(root.public_bytes(PEM))
        (corp / "root-key.pem").write_bytes(earlier)
        (corp / "root-key.pem").chmod(0o600)
    else:
        (corp / "root.pem").write_bytes(root.public_bytes(PEM) + earlier)
    assert keyseal.describe(earlier).iterations == 2048
    return root


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_a_new_root_key_is_sealed_at_the_current_cost_and_openssl_reads_it(
    provider: SelfSignedProvider, tmp_path: Path
) -> None:
    root = provider.create_root()
    path = _corp(tmp_path) / "root.pem"
    seal = _key_seal(path.read_bytes())
    assert seal == keyseal.Seal("PBKDF2-HMAC-SHA256", keyseal.ITERATIONS, "AES-256-CBC")
    assert seal.iterations >= keyseal.MIN_ITERATIONS >= 600_000
    # break-glass with stock tools, as docs/providers/selfsigned.md shows
    out = subprocess.run(
        ["openssl", "pkcs8", "-in", str(path), "-passin", "env:TEST_PASSPHRASE"],
        capture_output=True,
        check=True,
    )
    key = serialization.load_pem_private_key(out.stdout, None)
    assert key.public_key() == root.public_key()


def test_an_earlier_key_is_sealed_again_before_signing_and_still_signs(
    provider: SelfSignedProvider, store: FileStateStore, tmp_path: Path
) -> None:
    root = _store_earlier_form(provider, tmp_path, two_files=False)
    corp = _corp(tmp_path)
    before = snapshot(corp)
    fresh = _fresh(store.blobs())
    fresh.unlock()
    assert snapshot(corp) == before, "unlocking writes nothing"
    _signs(fresh, root)
    assert snapshot(corp) == before, "signing writes nothing"
    assert fresh.reseal_if_needed()
    unit = (corp / "root.pem").read_bytes()
    assert unit.startswith(root.public_bytes(PEM))
    assert _key_seal(unit).current
    assert stat.S_IMODE((corp / "root.pem").stat().st_mode) == 0o600
    assert sorted(_files(corp)) == ["root.pem"]
    _signs(fresh, root)
    resealed = snapshot(corp)
    again = _fresh(store.blobs())
    assert not again.reseal_if_needed()
    _signs(again, root)
    assert snapshot(corp) == resealed, "a key sealed at the current cost is not written again"


def test_the_two_file_form_moves_into_one_unit(
    provider: SelfSignedProvider, store: FileStateStore, tmp_path: Path
) -> None:
    root = _store_earlier_form(provider, tmp_path, two_files=True)
    _signs(_resealed(store.blobs()), root)
    corp = _corp(tmp_path)
    assert sorted(_files(corp)) == ["root.pem"]
    assert _key_seal((corp / "root.pem").read_bytes()).current
    _signs(_resealed(store.blobs()), root)


@pytest.mark.parametrize(
    "left", [("root-cert.pem", "root-key.pem"), ("root-cert.pem",), ("root-key.pem",)]
)
def test_two_file_leftovers_of_a_stopped_run_are_removed(
    provider: SelfSignedProvider,
    store: FileStateStore,
    tmp_path: Path,
    left: tuple[str, ...],
) -> None:
    """A run stopped after root.pem was written, before (or while) the two
    files were removed: the next signing removes what is left."""
    corp = _corp(tmp_path)
    root = _store_earlier_form(provider, tmp_path, two_files=True)
    earlier = _files(corp)
    _signs(_resealed(store.blobs()), root)
    for name in left:
        (corp / name).write_bytes(earlier[name])
    unit = snapshot(corp)["root.pem"]
    _signs(_resealed(store.blobs()), root)
    assert sorted(_files(corp)) == ["root.pem"]
    assert snapshot(corp)["root.pem"] == unit


def test_a_different_root_in_the_two_files_is_left_alone(
    provider: SelfSignedProvider, store: FileStateStore, tmp_path: Path
) -> None:
    root = provider.create_root()
    other = tmp_path / "other"
    _store_earlier_form(_fresh(FileStateStore(other / "state").blobs()), other, two_files=True)
    corp = _corp(tmp_path)
    for name in ("root-cert.pem", "root-key.pem"):
        (corp / name).write_bytes((_corp(other) / name).read_bytes())
    before = _files(corp)
    _signs(_resealed(store.blobs()), root)
    assert _files(corp) == before


class _SaveFails:
    """The file store, its writes failing as on a full disk."""

    def __init__(self, blobs: BlobStore) -> None:
        self._blobs = blobs

    def load(self, name: str) -> bytes | None:
        return self._blobs.load(name)

    def save(self, name: str, data: bytes, *, secret: bool) -> None:
        raise StateError(f"cannot write {name}: No space left on device")

    def delete(self, name: str) -> None:
        raise AssertionError("nothing is removed before the new unit is written")


class _SaveLost(_SaveFails):
    """A store that acknowledges a write it does not keep."""

    def save(self, name: str, data: bytes, *, secret: bool) -> None:
        pass


@pytest.mark.parametrize("two_files", [False, True], ids=["root.pem", "two-files"])
@pytest.mark.parametrize(
    ("blobs", "reason"),
    [
        (_SaveFails, "cannot write corp/root.pem: No space left on device"),
        (_SaveLost, "corp/root.pem does not read back as written"),
    ],
    ids=["save-fails", "save-lost"],
)
def test_a_failed_save_while_sealing_again_leaves_the_earlier_form_usable(
    provider: SelfSignedProvider,
    store: FileStateStore,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    two_files: bool,
    blobs: Callable[[BlobStore], BlobStore],
    reason: str,
) -> None:
    root = _store_earlier_form(provider, tmp_path, two_files=two_files)
    corp = _corp(tmp_path)
    before = _files(corp)
    _signs(_resealed(blobs(store.blobs())), root)
    assert _files(corp) == before
    assert (
        f"provider corp: sealing the root key again did not finish; a later run finishes it: {reason}"
        in caplog.text
    )
    assert "correct horse" not in caplog.text
    _signs(_resealed(store.blobs()), root)
    assert sorted(_files(corp)) == ["root.pem"]
    assert _key_seal((corp / "root.pem").read_bytes()).current


_KILLED_BEFORE_RENAME = """
import os, signal, sys
from datetime import UTC, datetime
from pathlib import Path
from trustmgr.providers.config import SelfSignedConfig
from trustmgr.providers.selfsigned import SelfSignedProvider
from trustmgr.state.file import FileStateStore

provider = SelfSignedProvider(
    "corp",
    SelfSignedConfig(passphrase_env="TEST_PASSPHRASE"),
    FileStateStore(Path(sys.argv[1])).blobs(),
    lambda: datetime.now(UTC),
)
provider.unlock()
# the new file is written and flushed; the rename that would replace root.pem never runs
os.replace = lambda src, dst: os.kill(os.getpid(), signal.SIGKILL)
provider.reseal_if_needed()
"""


def test_a_run_killed_between_write_and_rename_leaves_a_usable_key(
    provider: SelfSignedProvider, store: FileStateStore, tmp_path: Path
) -> None:
    root = _store_earlier_form(provider, tmp_path, two_files=False)
    corp = _corp(tmp_path)
    before = (corp / "root.pem").read_bytes()
    run = subprocess.run(
        [sys.executable, "-c", _KILLED_BEFORE_RENAME, str(tmp_path / "state")],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
    )
    assert run.returncode == -signal.SIGKILL, run.stderr
    assert (corp / "root.pem").read_bytes() == before
    (written,) = corp.glob(".root.pem.*.tmp")
    assert stat.S_IMODE(written.stat().st_mode) == 0o600
    assert _key_seal(written.read_bytes()).current
    _signs(_resealed(store.blobs()), root)
    assert _key_seal((corp / "root.pem").read_bytes()).current


# Through the command line: one line, exit 2, nothing written.

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
SECOND_CLUSTER = "      web-2: {directory: {path: out/web-2}}\n"
UNIT = Path("state/providers/corp/root.pem")


def _rewrite_key(workdir: Path, change: Callable[[bytes], bytes]) -> None:
    unit = (workdir / UNIT).read_bytes()
    cut = unit.index(KEY_BLOCK)
    (workdir / UNIT).write_bytes(unit[:cut] + change(unit[cut:]))


def _pem_of(der: bytes) -> bytes:
    body = base64.encodebytes(der)
    return KEY_BLOCK + b"\n" + body + b"-----END ENCRYPTED PRIVATE KEY-----\n"


def _der_of(pem: bytes) -> bytes:
    return base64.b64decode(pem.split(b"-----")[2])


def _earlier(block: bytes) -> bytes:
    key = keyseal.unseal(block, PASSPHRASE.encode())
    return key.private_bytes(
        PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(PASSPHRASE.encode()),
    )


def _flip_ciphertext(block: bytes) -> bytes:
    der = bytearray(_der_of(block))
    der[-40] ^= 0x01
    return _pem_of(bytes(der))


def _huge_rounds(block: bytes) -> bytes:
    der = _der_of(block)
    count = b"\x02\x03" + keyseal.ITERATIONS.to_bytes(3, "big")
    assert der.count(count) == 1
    return _pem_of(der.replace(count, b"\x02\x03\x7f\xff\xff"))


def test_bootstrap_seals_an_earlier_key_again_and_plan_does_not(workdir: Path) -> None:
    (workdir / "trustmgr.yaml").write_text(CONFIG)
    assert trustmgr("bootstrap").code == 0
    _rewrite_key(workdir, _earlier)
    with (workdir / "trustmgr.yaml").open("a") as config:
        config.write(SECOND_CLUSTER)
    state = snapshot(workdir / "state")
    assert trustmgr("plan").code == 0
    assert snapshot(workdir / "state") == state
    run = trustmgr("bootstrap")
    assert run.code == 0, run.err
    assert _key_seal((workdir / UNIT).read_bytes()).current
    roots = [(workdir / f"out/web-{i}/root-cert.pem").read_bytes() for i in (1, 2)]
    assert roots[0] == roots[1]


@pytest.mark.parametrize(
    ("change", "passphrase_env", "expect"),
    [
        (
            _earlier,
            "OTHER_PASSPHRASE",
            "provider corp: cannot decrypt the root key; check the passphrase (environment "
            "variable OTHER_PASSPHRASE) or restore root.pem from a backup",
        ),
        (
            _flip_ciphertext,
            "TRUSTMGR_PASSPHRASE",
            "provider corp: cannot decrypt the root key; check the passphrase (environment "
            "variable TRUSTMGR_PASSPHRASE) or restore root.pem from a backup",
        ),
        (
            _huge_rounds,
            "TRUSTMGR_PASSPHRASE",
            "provider corp: cannot read the root key: the key asks for 8388607 PBKDF2 rounds, "
            f"outside 1 to {keyseal.MAX_ITERATIONS}; restore root.pem from a backup",
        ),
    ],
    ids=["wrong-passphrase-earlier-form", "altered-ciphertext", "altered-rounds"],
)
def test_a_key_that_does_not_unlock_stops_the_run_with_one_line(
    workdir: Path,
    monkeypatch: pytest.MonkeyPatch,
    change: Callable[[bytes], bytes],
    passphrase_env: str,
    expect: str,
) -> None:
    monkeypatch.setenv("OTHER_PASSPHRASE", "not " + PASSPHRASE)
    (workdir / "trustmgr.yaml").write_text(CONFIG)
    assert trustmgr("bootstrap").code == 0
    _rewrite_key(workdir, change)
    config = CONFIG.replace("TRUSTMGR_PASSPHRASE", passphrase_env) + SECOND_CLUSTER
    (workdir / "trustmgr.yaml").write_text(config)
    before = snapshot(workdir)
    run = trustmgr("bootstrap")
    assert run.code == 2
    assert run.err.strip().splitlines() == [f"trustmgr: {expect}"]
    assert "Traceback" not in run.err + run.out
    assert PASSPHRASE not in run.err + run.out
    assert snapshot(workdir) == before


def test_rekey_moves_the_two_file_form_into_one_unit_under_the_new_passphrase(
    provider: SelfSignedProvider,
    store: FileStateStore,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    root = _store_earlier_form(provider, tmp_path, two_files=True)
    monkeypatch.setenv("NEW_PASSPHRASE", "a new passphrase")
    config = SelfSignedConfig(passphrase_env="NEW_PASSPHRASE")
    with SelfSignedProvider("corp", config, store.blobs(), lambda: datetime.now(UTC)) as fresh:
        done = fresh.rekey(SelfSignedConfig(passphrase_env="TEST_PASSPHRASE"))
    assert done.changed and done.root == root
    assert "with 2048 rounds" in done.before and f"with {keyseal.ITERATIONS} rounds" in done.after
    corp = _corp(tmp_path)
    assert sorted(_files(corp)) == ["root.pem"]
    block = (corp / "root.pem").read_bytes()
    assert keyseal.unseal(block[block.index(KEY_BLOCK) :], b"a new passphrase")
    _signs(SelfSignedProvider("corp", config, store.blobs(), lambda: datetime.now(UTC)), root)
