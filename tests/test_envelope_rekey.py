"""``trustmgr state rekey``: passphrase to transit and back, old passphrase to
new, a rotation's new root too; a refused rekey is one line and writes nothing;
a run killed between write and rename leaves a key that opens."""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from tests.conftest import PASSPHRASE, REPO, snapshot, trustmgr
from tests.openbao import VaultTransit, vault_transit_fixture  # noqa: F401  (session fixture)
from trustmgr.providers import keyseal

KEY_BLOCK = b"-----BEGIN ENCRYPTED PRIVATE KEY-----"
ENVELOPE = b"-----BEGIN TRUSTMGR ENVELOPE-----"
NEW_PASSPHRASE = "a new and longer passphrase"
UNIT = Path("state/providers/corp/root.pem")

CONFIG = """\
stateStore: {{file: {{path: state}}}}
providers:
  corp:
    selfSigned:
{protection}
meshes:
  web:
    trustDomain: web.example
    provider: corp
    clusters:
      web-1: {{directory: {{path: out/web-1}}}}
"""
SECOND_CLUSTER = "      web-2: {directory: {path: out/web-2}}\n"


def passphrase(env: str = "TRUSTMGR_PASSPHRASE") -> str:
    return CONFIG.format(protection=f"      passphraseEnv: {env}")


def transit(vault: VaultTransit, key: str, token_file: Path | None = None) -> str:
    protection = (
        "      keyEncryption:\n"
        "        vaultTransit:\n"
        f"          address: {vault.address}\n"
        f"          key: {key}\n"
        f"          auth: {{token: {{file: {token_file or vault.token_file}}}}}"
    )
    return CONFIG.format(protection=protection)


def _root(workdir: Path, unit: Path = UNIT) -> x509.Certificate:
    return x509.load_pem_x509_certificate((workdir / unit).read_bytes())


def _key_block(workdir: Path, unit: Path = UNIT) -> bytes:
    data = (workdir / unit).read_bytes()
    return data[data.index(KEY_BLOCK) :]


def _bootstrap(workdir: Path, config: str) -> None:
    (workdir / "trustmgr.yaml").write_text(config)
    run = trustmgr("bootstrap")
    assert run.code == 0, run.err


def _one_line(run_err: str) -> str:
    lines = run_err.strip().splitlines()
    assert len(lines) == 1, run_err
    return lines[0].removeprefix("trustmgr: ")


def test_passphrase_to_transit_and_back(
    vault_transit: VaultTransit, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = vault_transit.new_key()
    _bootstrap(workdir, passphrase())
    root = _root(workdir)

    # the configuration now names the transit key; the key is still sealed the old way
    (workdir / "trustmgr.yaml").write_text(transit(vault_transit, key) + SECOND_CLUSTER)
    before = snapshot(workdir)
    run = trustmgr("bootstrap")
    assert run.code == 2
    assert _one_line(run.err) == (
        "provider corp: the root key is sealed with a passphrase (PKCS#8 PBES2, "
        f"PBKDF2-HMAC-SHA256 with {keyseal.ITERATIONS} rounds, AES-256-CBC), but the "
        "configuration sets keyEncryption.vaultTransit: set it back, or move the key with "
        "`trustmgr state rekey --provider corp --from-passphrase-env VAR (or "
        "--from-passphrase-file PATH)`"
    )
    assert snapshot(workdir) == before

    run = trustmgr(
        "state", "rekey", "--provider", "corp", "--from-passphrase-env", "TRUSTMGR_PASSPHRASE"
    )
    assert run.code == 0, run.err
    assert run.out.splitlines() == [
        f"provider corp, root {root.fingerprint(hashes.SHA256()).hex()[:16]}…: sealed with a "
        f"passphrase (PKCS#8 PBES2, PBKDF2-HMAC-SHA256 with {keyseal.ITERATIONS} rounds, "
        f"AES-256-CBC) -> wrapped by vault-transit key transit/{key}; opened again before it "
        "replaced the stored key"
    ]
    unit = (workdir / UNIT).read_bytes()
    assert ENVELOPE in unit and KEY_BLOCK not in unit
    assert _root(workdir) == root
    assert stat.S_IMODE((workdir / UNIT).stat().st_mode) == 0o600

    monkeypatch.delenv("TRUSTMGR_PASSPHRASE")
    run = trustmgr("bootstrap")
    assert run.code == 0, run.err
    for cluster in ("web-1", "web-2"):
        assert (workdir / f"out/{cluster}/root-cert.pem").read_bytes() == root.public_bytes(
            serialization.Encoding.PEM
        )

    # a second run finds the work done
    wrapped = snapshot(workdir / "state")
    run = trustmgr(
        "state", "rekey", "--provider", "corp", "--from-passphrase-env", "TRUSTMGR_PASSPHRASE"
    )
    assert run.code == 0, run.err
    assert run.out.endswith(
        f"already wrapped by vault-transit key transit/{key}; nothing changed\n"
    )
    assert snapshot(workdir / "state") == wrapped

    # and back, to a new passphrase, opened with the configuration it was written under
    shutil.copy(workdir / "trustmgr.yaml", workdir / "transit.yaml")
    monkeypatch.setenv("NEW_PASSPHRASE", NEW_PASSPHRASE)
    (workdir / "trustmgr.yaml").write_text(passphrase("NEW_PASSPHRASE") + SECOND_CLUSTER)
    run = trustmgr("state", "rekey", "--provider", "corp", "--from-config", "transit.yaml")
    assert run.code == 0, run.err
    assert f"wrapped by vault-transit key transit/{key} -> sealed with a passphrase" in run.out
    out = subprocess.run(
        ["openssl", "pkcs8", "-in", str(workdir / UNIT), "-passin", "env:NEW_PASSPHRASE"],
        capture_output=True,
        check=True,
    )
    assert serialization.load_pem_private_key(out.stdout, None).public_key() == root.public_key()
    assert ENVELOPE not in (workdir / UNIT).read_bytes()
    assert trustmgr("bootstrap").code == 0


def test_old_passphrase_to_new(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _bootstrap(workdir, passphrase())
    root = _root(workdir)
    (workdir / "old-passphrase").write_text(PASSPHRASE + "\n")
    monkeypatch.setenv("NEW_PASSPHRASE", NEW_PASSPHRASE)
    monkeypatch.delenv("TRUSTMGR_PASSPHRASE")
    (workdir / "trustmgr.yaml").write_text(passphrase("NEW_PASSPHRASE") + SECOND_CLUSTER)
    run = trustmgr(
        "state", "rekey", "--provider", "corp", "--from-passphrase-file", "old-passphrase"
    )
    assert run.code == 0, run.err
    block = _key_block(workdir)
    assert keyseal.describe(block).current
    with pytest.raises(keyseal.UnsealError):
        keyseal.unseal(block, PASSPHRASE.encode())
    assert keyseal.unseal(block, NEW_PASSPHRASE.encode()).public_key() == root.public_key()
    assert trustmgr("bootstrap").code == 0
    assert _root(workdir) == root


def test_the_new_root_of_a_rotation_in_progress_is_rekeyed_too(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _bootstrap(workdir, passphrase())
    assert trustmgr("rotate", "start", "--provider", "corp").code == 0
    (new_unit,) = (workdir / "state/providers/corp").glob("generation-*/corp/root.pem")
    generation = new_unit.parent.parent.name.removeprefix("generation-")
    monkeypatch.setenv("NEW_PASSPHRASE", NEW_PASSPHRASE)
    (workdir / "trustmgr.yaml").write_text(passphrase("NEW_PASSPHRASE"))
    run = trustmgr(
        "state", "rekey", "--provider", "corp", "--from-passphrase-env", "TRUSTMGR_PASSPHRASE"
    )
    assert run.code == 0, run.err
    lines = run.out.splitlines()
    assert len(lines) == 2 and f"(generation {generation}): sealed with" in lines[1]
    for unit in (UNIT, new_unit.relative_to(workdir)):
        block = _key_block(workdir, unit)
        key = keyseal.unseal(block, NEW_PASSPHRASE.encode())
        assert key.public_key() == _root(workdir, unit).public_key()


@pytest.mark.parametrize(
    ("breaks", "args", "code", "expect"),
    [
        (
            "",
            ("--from-passphrase-env", "OTHER_PASSPHRASE"),
            2,
            "provider corp: cannot decrypt the root key; check the passphrase (environment "
            "variable OTHER_PASSPHRASE) or restore root.pem from a backup",
        ),
        (
            "",
            ("--from-passphrase-env", PASSPHRASE),
            2,
            "--from-passphrase-env takes the name of an environment variable (letters, digits "
            "and _), not the passphrase",
        ),
        (
            "",
            ("--from-passphrase-env", "TRUSTMGR_PASSPHRASE", "--from-config", "old.yaml"),
            2,
            "give at most one of --from-passphrase-env, --from-passphrase-file and --from-config",
        ),
        (
            "encrypt-only",
            ("--from-passphrase-env", "TRUSTMGR_PASSPHRASE"),
            2,
            "provider corp: keyEncryption: permission denied on transit/decrypt/{key}: the "
            'token\'s policy needs "update" on that path',
        ),
        (
            "unreachable",
            ("--from-passphrase-env", "TRUSTMGR_PASSPHRASE"),
            1,
            "provider corp: keyEncryption: Vault at http://127.0.0.1:9 is unreachable "
            "(connection refused); the root key cannot be unwrapped without it: check the "
            "address and that Vault is running",
        ),
        (
            "",
            ("--from-config", "trustmgr.yaml"),
            2,
            "provider corp: the root key is sealed with a passphrase (PKCS#8 PBES2, "
            f"PBKDF2-HMAC-SHA256 with {keyseal.ITERATIONS} rounds, AES-256-CBC), not under "
            "keyEncryption.vaultTransit as the --from option says: pass --from-passphrase-env "
            "VAR (or --from-passphrase-file PATH) with what protects it now",
        ),
    ],
    ids=[
        "wrong-old-passphrase",
        "passphrase-instead-of-its-variable",
        "two-from-options",
        "policy-denies-decrypt",
        "vault-unreachable",
        "from-the-wrong-protection",
    ],
)
def test_a_refused_rekey_is_one_line_and_writes_nothing(
    vault_transit: VaultTransit,
    workdir: Path,
    monkeypatch: pytest.MonkeyPatch,
    breaks: str,
    args: tuple[str, ...],
    code: int,
    expect: str,
) -> None:
    monkeypatch.setenv("OTHER_PASSPHRASE", "not " + PASSPHRASE)
    key = vault_transit.new_key()
    _bootstrap(workdir, passphrase())
    config = transit(vault_transit, key)
    if breaks == "encrypt-only":
        config = transit(vault_transit, key, vault_transit.encrypt_only_token_file)
    elif breaks == "unreachable":
        config = config.replace(vault_transit.address, "http://127.0.0.1:9")
    (workdir / "trustmgr.yaml").write_text(config)
    (workdir / "old.yaml").write_text(passphrase())
    before = snapshot(workdir)
    run = trustmgr("state", "rekey", "--provider", "corp", *args)
    assert run.code == code, run.err
    assert _one_line(run.err) == expect.format(key=key)
    assert PASSPHRASE not in run.err.replace(f"not {PASSPHRASE}", "")
    assert vault_transit.token not in run.err + run.out
    assert snapshot(workdir) == before


def test_rekey_names_what_it_cannot_rekey(workdir: Path) -> None:
    _bootstrap(workdir, passphrase())
    run = trustmgr("state", "rekey", "--provider", "nope")
    assert run.code == 2
    assert _one_line(run.err) == "unknown provider 'nope' (providers: corp)"
    (workdir / "trustmgr.yaml").write_text(passphrase().replace("state}}", "fresh}}"))
    run = trustmgr("state", "rekey", "--provider", "corp")
    assert run.code == 2
    assert _one_line(run.err) == (
        "provider corp has no root yet: nothing to rekey (`trustmgr bootstrap` creates it under "
        "the configured protection)"
    )


_KILLED_BEFORE_RENAME = """
import os, signal, sys
from pathlib import Path
from trustmgr.config import load
from trustmgr.engine import now_utc
from trustmgr.rekey import previous_protection, rekey

config = load(Path("trustmgr.yaml"))
previous = previous_protection(config, "corp", passphrase_env="TRUSTMGR_PASSPHRASE")
# the new unit is written and flushed; the rename that would replace root.pem never runs
os.replace = lambda src, dst: os.kill(os.getpid(), signal.SIGKILL)
rekey(config, "corp", previous=previous, clock=now_utc)
"""


def test_a_rekey_killed_between_write_and_rename_leaves_a_usable_key(
    vault_transit: VaultTransit, workdir: Path
) -> None:
    key = vault_transit.new_key()
    _bootstrap(workdir, passphrase())
    root = _root(workdir)
    before = (workdir / UNIT).read_bytes()
    (workdir / "trustmgr.yaml").write_text(transit(vault_transit, key))
    killed = subprocess.run(
        [sys.executable, "-c", _KILLED_BEFORE_RENAME],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        cwd=workdir,
        capture_output=True,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert (workdir / UNIT).read_bytes() == before
    (written,) = (workdir / UNIT).parent.glob(".root.pem.*.tmp")
    assert stat.S_IMODE(written.stat().st_mode) == 0o600
    assert ENVELOPE in written.read_bytes()
    # the key opens as it did: a run under the earlier configuration signs with it
    (workdir / "trustmgr.yaml").write_text(passphrase() + SECOND_CLUSTER)
    assert trustmgr("bootstrap").code == 0
    assert _root(workdir) == root
    # and the rekey, run again, finishes
    (workdir / "trustmgr.yaml").write_text(transit(vault_transit, key) + SECOND_CLUSTER)
    run = trustmgr(
        "state", "rekey", "--provider", "corp", "--from-passphrase-env", "TRUSTMGR_PASSPHRASE"
    )
    assert run.code == 0, run.err
    assert ENVELOPE in (workdir / UNIT).read_bytes()
    (workdir / "trustmgr.yaml").write_text(
        transit(vault_transit, key)
        + SECOND_CLUSTER
        + "      web-3: {directory: {path: out/web-3}}\n"
    )
    assert trustmgr("bootstrap").code == 0
