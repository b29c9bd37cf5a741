"""A self-signed root key wrapped by a real OpenBao transit key: wrap, unwrap,
a rotated transit key, a policy that denies decrypt, Vault unreachable, a
deleted key, a tampered envelope; each failure one line, nothing written."""

from __future__ import annotations

import base64
import stat
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from tests.conftest import PASSPHRASE, REPO, snapshot, trustmgr
from tests.openbao import (  # noqa: F401  (session fixture)
    VaultTransit,
    transit_policy,
    vault_transit_fixture,
)
from trustmgr.pki import cluster_ca_request
from trustmgr.providers import ProviderNeedsFixError, envelope
from trustmgr.providers.config import SelfSignedConfig
from trustmgr.providers.keys import KeyAlgorithm
from trustmgr.providers.selfsigned import SelfSignedProvider
from trustmgr.state.file import FileStateStore

ENVELOPE = b"-----BEGIN TRUSTMGR ENVELOPE-----"


def transit_config(transit: VaultTransit, key: str, **overrides: Any) -> SelfSignedConfig:
    settings = {
        "address": transit.address,
        "key": key,
        "auth": {"token": {"file": str(transit.token_file)}},
        **overrides,
    }
    return SelfSignedConfig.model_validate({"keyEncryption": {"vaultTransit": settings}})


def _provider(store: FileStateStore, config: SelfSignedConfig) -> SelfSignedProvider:
    return SelfSignedProvider("corp", config, store.blobs(), lambda: datetime.now(UTC))


def _signs(provider: SelfSignedProvider, root: x509.Certificate) -> None:
    request = cluster_ca_request("a.test", cluster="c", algorithm=KeyAlgorithm.ECDSA_P256)
    answer = provider.sign_ca(request.csr, timedelta(hours=1))
    answer.chain[0].verify_directly_issued_by(root)
    assert answer.roots == (root,)


def _unit(store: FileStateStore) -> bytes:
    return (store.path / "providers" / "corp" / "root.pem").read_bytes()


@pytest.fixture
def store(tmp_path: Path) -> FileStateStore:
    return FileStateStore(tmp_path / "state")


def test_a_root_key_wrapped_by_transit_opens_on_the_next_run(
    vault_transit: VaultTransit, store: FileStateStore
) -> None:
    key = vault_transit.new_key()
    config = transit_config(vault_transit, key)
    with _provider(store, config) as first:
        root = first.create_root()
    unit = _unit(store)
    assert unit.startswith(b"-----BEGIN CERTIFICATE-----")
    assert ENVELOPE in unit
    assert b"PRIVATE KEY" not in unit
    assert stat.S_IMODE((store.path / "providers/corp/root.pem").stat().st_mode) == 0o600
    sealed = envelope.describe(unit[unit.index(ENVELOPE) :])
    assert (sealed.wrapping, sealed.key_id) == ("vault-transit", f"transit/{key}")
    assert sealed.data_key.startswith("vault:v1:")
    with _provider(store, config) as fresh:
        fresh.unlock()
        _signs(fresh, root)
    assert _unit(store) == unit, "signing with a wrapped key writes nothing"


def test_a_key_rotated_in_transit_still_unwraps_and_rekey_wraps_with_its_new_version(
    vault_transit: VaultTransit, store: FileStateStore
) -> None:
    key = vault_transit.new_key()
    config = transit_config(vault_transit, key)
    with _provider(store, config) as first:
        root = first.create_root()
    vault_transit.write(f"keys/{key}/rotate")
    with _provider(store, config) as after_rotation:
        _signs(after_rotation, root)
        done = after_rotation.rekey()
    assert done.changed
    assert done.before == f"wrapped by vault-transit key transit/{key}" == done.after
    unit = _unit(store)
    assert envelope.describe(unit[unit.index(ENVELOPE) :]).data_key.startswith("vault:v2:")
    vault_transit.write(f"keys/{key}/config", min_decryption_version=2)
    with _provider(store, config) as fresh:
        _signs(fresh, root)


def test_a_data_key_wrapped_by_a_retired_version_says_what_to_do(
    vault_transit: VaultTransit, store: FileStateStore
) -> None:
    key = vault_transit.new_key()
    config = transit_config(vault_transit, key)
    with _provider(store, config) as first:
        first.create_root()
    vault_transit.write(f"keys/{key}/rotate")
    vault_transit.write(f"keys/{key}/config", min_decryption_version=2)
    with _provider(store, config) as fresh, pytest.raises(ProviderNeedsFixError) as info:
        fresh.unlock()
    assert str(info.value) == (
        f"provider corp: keyEncryption: transit key transit/{key} refuses the key version that "
        "wrapped the root key's data key (its min_decryption_version was raised): lower it, run "
        "`trustmgr state rekey --provider corp` to wrap it with the current version, then raise "
        "it again"
    )


def test_a_key_that_cannot_be_unwrapped_is_never_stored(
    vault_transit: VaultTransit, store: FileStateStore
) -> None:
    """A token that may encrypt but not decrypt would make a root no run can use."""
    key = vault_transit.new_key()
    config = transit_config(
        vault_transit, key, auth={"token": {"file": str(vault_transit.encrypt_only_token_file)}}
    )
    with _provider(store, config) as provider, pytest.raises(ProviderNeedsFixError) as info:
        provider.create_root()
    assert str(info.value) == (
        f"provider corp: keyEncryption: permission denied on transit/decrypt/{key}: the token's "
        'policy needs "update" on that path'
    )
    assert not (store.path / "providers" / "corp").exists()


# Through the command line: one line, the exit code of its kind, nothing written.

CONFIG = """\
stateStore: {{file: {{path: state}}}}
providers:
  corp:
    selfSigned:
      keyEncryption:
        vaultTransit:
          address: {address}
          key: {key}
          auth: {{token: {{file: {token_file}}}}}
meshes:
  web:
    trustDomain: web.example
    provider: corp
    clusters:
      web-1: {{directory: {{path: out/web-1}}}}
"""
SECOND_CLUSTER = "      web-2: {directory: {path: out/web-2}}\n"
UNIT = Path("state/providers/corp/root.pem")


def _config(transit: VaultTransit, key: str, *, token_file: Path | None = None) -> str:
    return CONFIG.format(
        address=transit.address, key=key, token_file=token_file or transit.token_file
    )


def _tamper(workdir: Path, change: Callable[[bytes], bytes]) -> None:
    unit = (workdir / UNIT).read_bytes()
    cut = unit.index(ENVELOPE)
    (workdir / UNIT).write_bytes(unit[:cut] + change(unit[cut:]))


def _flip_data_key(block: bytes) -> bytes:
    lines = block.split(b"\n")
    index = next(i for i, line in enumerate(lines) if line.startswith(b"Data-Key: vault:v1:"))
    raw = bytearray(base64.b64decode(lines[index].removeprefix(b"Data-Key: vault:v1:")))
    raw[-3] ^= 0x01
    lines[index] = b"Data-Key: vault:v1:" + base64.b64encode(bytes(raw))
    return b"\n".join(lines)


def _flip_ciphertext(block: bytes) -> bytes:
    lines = block.split(b"\n")
    body = bytearray(base64.b64decode(b"".join(lines[7:-2])))
    body[10] ^= 0x01
    return b"\n".join([*lines[:7], base64.b64encode(bytes(body)), *lines[-2:]])


def test_bootstrap_with_a_wrapped_root_needs_no_passphrase(
    vault_transit: VaultTransit, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TRUSTMGR_PASSPHRASE")
    key = vault_transit.new_key()
    (workdir / "trustmgr.yaml").write_text(_config(vault_transit, key))
    run = trustmgr("bootstrap")
    assert run.code == 0, run.err
    (workdir / "trustmgr.yaml").write_text(_config(vault_transit, key) + SECOND_CLUSTER)
    assert trustmgr("bootstrap").code == 0
    roots = [(workdir / f"out/web-{i}/root-cert.pem").read_bytes() for i in (1, 2)]
    assert roots[0] == roots[1]
    assert ENVELOPE in (workdir / UNIT).read_bytes()


@pytest.mark.parametrize(
    ("breaks", "code", "expect"),
    [
        (
            "denied",
            2,
            "provider corp: keyEncryption: permission denied on transit/decrypt/{key}: the "
            'token\'s policy needs "update" on that path',
        ),
        (
            "unreachable",
            1,
            "provider corp: keyEncryption: Vault at http://127.0.0.1:9 is unreachable (connection "
            "refused); the root key cannot be unwrapped without it: check the address and that "
            "Vault is running",
        ),
        (
            "deleted",
            2,
            "provider corp: keyEncryption: transit key {key} does not exist in mount transit: "
            "check keyEncryption.vaultTransit.key; a deleted transit key cannot unwrap the root "
            "key again (restore Vault from a backup)",
        ),
        (
            "data-key",
            2,
            "provider corp: keyEncryption: Vault cannot unwrap the root key's data key with "
            "transit key transit/{key} (cipher: message authentication failed): it was altered, "
            "or it belongs to another root or transit key; restore root.pem from a backup",
        ),
        (
            "ciphertext",
            2,
            "provider corp: cannot decrypt the root key: the envelope does not decrypt: it was "
            "altered, or it belongs to another certificate; restore root.pem from a backup",
        ),
        (
            "key-id",
            2,
            "provider corp: the root key's data key is wrapped by transit key transit/other, the "
            "configuration names transit/{key}: set keyEncryption.vaultTransit's mount and key as "
            "they were, or move the key with `trustmgr state rekey --provider corp --from-config "
            "OLD-CONFIG`",
        ),
        (
            "passphrase-configured",
            2,
            "provider corp: the root key is wrapped by vault-transit key transit/{key}, but the "
            "configuration sets a passphrase: set it back, or move the key with `trustmgr state "
            "rekey --provider corp --from-config OLD-CONFIG`",
        ),
    ],
)
def test_a_wrapped_key_that_does_not_open_stops_the_run_with_one_line(
    vault_transit: VaultTransit, workdir: Path, breaks: str, code: int, expect: str
) -> None:
    key = vault_transit.new_key()
    (workdir / "trustmgr.yaml").write_text(_config(vault_transit, key))
    assert trustmgr("bootstrap").code == 0
    config = _config(vault_transit, key)
    if breaks == "denied":
        config = _config(vault_transit, key, token_file=vault_transit.encrypt_only_token_file)
    elif breaks == "unreachable":
        config = config.replace(vault_transit.address, "http://127.0.0.1:9")
    elif breaks == "deleted":
        vault_transit.delete_key(key)
    elif breaks == "data-key":
        _tamper(workdir, _flip_data_key)
    elif breaks == "ciphertext":
        _tamper(workdir, _flip_ciphertext)
    elif breaks == "key-id":
        _tamper(
            workdir,
            lambda b: b.replace(f"Key-Id: transit/{key}".encode(), b"Key-Id: transit/other"),
        )
    elif breaks == "passphrase-configured":
        config = config.replace(
            config[config.index("      keyEncryption:") : config.index("meshes:")],
            "      passphraseEnv: TRUSTMGR_PASSPHRASE\n",
        )
    (workdir / "trustmgr.yaml").write_text(config + SECOND_CLUSTER)
    before = snapshot(workdir)
    run = trustmgr("bootstrap")
    assert run.code == code, run.err
    assert run.err.strip().splitlines() == [f"trustmgr: {expect.format(key=key)}"]
    assert "Traceback" not in run.err + run.out
    assert vault_transit.token not in run.err + run.out and PASSPHRASE not in run.err
    assert snapshot(workdir) == before


def test_the_documented_policy_is_the_one_tested() -> None:
    docs = (REPO / "docs/providers/selfsigned.md").read_text()
    block = docs.split("# Vault / OpenBao policy\n", 1)[1].split("```", 1)[0]
    assert block.strip() == transit_policy("transit", "trustmgr-root")
