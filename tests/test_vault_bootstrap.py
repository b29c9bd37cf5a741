"""A mesh whose provider is Vault (a real OpenBao), checked like the others."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import snapshot, trustmgr
from tests.openbao import VaultPKI
from tests.workload import assert_openssl_enforces_trust_domain
from trustmgr.bundles import TrustBundle, load_certificates


def config(vault_pki: VaultPKI, mount: str, auth: str) -> str:
    return f"""\
stateStore: {{file: {{path: state}}}}
providers:
  vault-prod:
    vault:
      address: {vault_pki.address}
      mount: {mount}
      auth: {auth}
  corp:
    selfSigned: {{passphraseEnv: TRUSTMGR_PASSPHRASE}}
meshes:
  payments:
    trustDomain: payments.example
    provider: vault-prod
    clusters:
      pci-east: {{directory: {{path: out/pci-east}}}}
      pci-west: {{directory: {{path: out/pci-west}}}}
  web:
    trustDomain: web.example
    provider: corp
    clusters:
      web-1: {{directory: {{path: out/web-1}}}}
federations:
  - meshes: [payments, web]
"""


@pytest.mark.parametrize("mount", ["pki", "pki_int"])
def test_bootstrap_through_vault(vault_pki: VaultPKI, workdir: Path, mount: str) -> None:
    auth = f"{{appRole: {{roleIdFile: {vault_pki.role_id_file}, secretIdFile: {vault_pki.secret_id_file}}}}}"
    (workdir / "trustmgr.yaml").write_text(config(vault_pki, mount, auth))
    run = trustmgr("bootstrap")
    assert run.code == 0, run.err
    assert trustmgr("verify").code == 0
    for cluster in ("pci-east", "pci-west"):
        directory = workdir / "out" / cluster
        chain = load_certificates((directory / "cert-chain.pem").read_bytes(), "cert-chain.pem")
        assert len(chain) == (3 if mount == "pki_int" else 2)
        assert_openssl_enforces_trust_domain(directory, "payments.example", "web.example", workdir)
    # The web mesh trusts the Vault root, through the federation.
    vault_root = load_certificates((workdir / "out/pci-east/cert-chain.pem").read_bytes(), "chain")[
        -1
    ]
    assert vault_root in TrustBundle.from_pem((workdir / "out/web-1/root-cert.pem").read_bytes())
    before = snapshot(workdir)
    assert "0 changed, 3 up to date" in trustmgr("bootstrap").out
    assert snapshot(workdir) == before


def test_a_policy_without_the_sign_path_fails_each_cluster_clearly(
    vault_pki: VaultPKI, workdir: Path
) -> None:
    auth = f"{{appRole: {{roleIdFile: {vault_pki.denied_role_id_file}, secretIdFile: {vault_pki.denied_secret_id_file}}}}}"
    (workdir / "trustmgr.yaml").write_text(config(vault_pki, "pki", auth))
    run = trustmgr("bootstrap", "-o", "json")
    assert run.code == 1
    report = json.loads(run.out)
    failed = {c["cluster"]: c["error"] for c in report["clusters"] if not c["ok"]}
    assert set(failed) == {"pci-east", "pci-west"}
    assert "permission denied" in failed["pci-east"] and "pki/" in failed["pci-east"]
    assert not (workdir / "out" / "pci-east").exists()
    secret_id = vault_pki.denied_secret_id_file.read_text().strip()
    assert secret_id not in run.out + run.err


def test_a_mesh_moves_from_a_self_signed_root_to_vault(vault_pki: VaultPKI, workdir: Path) -> None:
    """Same machinery as a root renewal: web moves from corp to Vault phase by
    phase, payments (federated, already on Vault) trusting both until the end."""
    auth = f"{{appRole: {{roleIdFile: {vault_pki.role_id_file}, secretIdFile: {vault_pki.secret_id_file}}}}}"
    text = config(vault_pki, "pki", auth).replace(
        "stateStore: {file: {path: state}}\n",
        "stateStore: {file: {path: state}}\nrotation: {soak: 0s, canary: 0}\n",
    )
    path = workdir / "trustmgr.yaml"
    path.write_text(text)
    assert trustmgr("bootstrap").code == 0
    chain = (workdir / "out/web-1/cert-chain.pem").read_bytes()
    corp_root = load_certificates(chain, "chain")[-1]
    path.write_text(text.replace("    provider: corp\n", "    provider: vault-prod\n"))
    phases = []
    for _ in range(8):
        run = trustmgr("reconcile", "-o", "json")
        assert run.code == 0, run.err
        rows = json.loads(trustmgr("rotate", "status", "-o", "json").out)
        if not rows:
            break
        phases.append(rows[0]["phase"])
        assert trustmgr("verify").code == 0
    assert phases == ["prepared", "trust-distributed", "issuer-switched", "old-removed"]
    web_chain = load_certificates((workdir / "out/web-1/cert-chain.pem").read_bytes(), "c")
    pci_chain = load_certificates((workdir / "out/pci-east/cert-chain.pem").read_bytes(), "c")
    assert web_chain[-1] == pci_chain[-1]  # under the Vault root now
    for cluster in ("web-1", "pci-east", "pci-west"):
        bundle = TrustBundle.from_pem((workdir / "out" / cluster / "root-cert.pem").read_bytes())
        assert corp_root not in bundle
    assert_openssl_enforces_trust_domain(
        workdir / "out/web-1", "web.example", "payments.example", workdir
    )


def test_a_vault_root_is_renewed_in_the_same_mount(vault_pki: VaultPKI, workdir: Path) -> None:
    """`rotate start` on a Vault provider makes a new root issuer in its mount;
    the passes carry every cluster to it, and afterwards the provider reports
    and signs with that issuer alone."""
    from tests.openbao import create_root_mount, create_token, root_client, signer_policy

    mount = "pki_renew"
    with root_client(vault_pki.server) as client:
        create_root_mount(client, mount, "Renewed Root", issuer_name="first")
        policy = signer_policy(mount) + (
            f'\npath "{mount}/root/generate/internal" {{ capabilities = ["update"] }}'
        )
        client.sys.create_or_update_policy("renewer", policy)
    token_file = workdir / "renewer-token"
    token_file.write_text(create_token(vault_pki.server, "renewer"))
    text = config(vault_pki, mount, f"{{token: {{file: {token_file}}}}}").replace(
        "stateStore: {file: {path: state}}\n",
        "stateStore: {file: {path: state}}\nrotation: {soak: 0s, canary: 1}\n",
    )
    (workdir / "trustmgr.yaml").write_text(text)
    assert trustmgr("bootstrap").code == 0
    old = load_certificates((workdir / "out/pci-east/cert-chain.pem").read_bytes(), "c")[-1]
    start = trustmgr("rotate", "start", "--provider", "vault-prod")
    assert start.code == 0, start.err
    plan = json.loads(trustmgr("plan", "-o", "json").out)
    assert {c["cluster"] for c in plan["clusters"] if c["action"] != "none"} == {
        "pci-east",
        "pci-west",
        "web-1",
    }  # trust-distributed: the new root reaches every bundle first
    phases = []
    for _ in range(8):
        rows = json.loads(trustmgr("rotate", "status", "-o", "json").out)
        if not rows:
            break
        phases.append(rows[0]["phase"])
        run = trustmgr("reconcile")
        assert run.code == 0, run.err
        assert trustmgr("verify").code == 0
    assert phases == [
        "prepared",
        "trust-distributed",
        "issuer-switched",
        "issuer-switched",
        "old-removed",
    ]
    new = load_certificates((workdir / "out/pci-east/cert-chain.pem").read_bytes(), "c")[-1]
    assert new != old
    assert load_certificates((workdir / "out/pci-west/cert-chain.pem").read_bytes(), "c")[-1] == new
    for cluster in ("pci-east", "pci-west", "web-1"):
        bundle = TrustBundle.from_pem((workdir / "out" / cluster / "root-cert.pem").read_bytes())
        assert old not in bundle and new in bundle
    # The old issuer is still in the mount, yet no bundle takes it back.
    assert "0 changed" in trustmgr("reconcile").out
