from __future__ import annotations

import stat
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.conformance import ProviderConformance
from trustmgr.pki import cluster_ca_request
from trustmgr.providers import ProviderNeedsFixError
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
