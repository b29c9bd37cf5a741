"""Agents that sign through Vault with their own identity, through a renewal of
the mount's root: the canary switches first, the others keep the old signer
until it converged, and after the rotation every agent issues under the new
issuer (real OpenBao)."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import trustmgr
from tests.openbao import VaultPKI, create_root_mount, create_token, root_client, signer_policy
from tests.test_vault_bootstrap import config
from trustmgr.bundles import fingerprint, load_certificates

AGENTS = ("pci-east", "pci-west")


def _agent(workdir: Path, cluster: str, token_file: Path) -> tuple[int, str]:
    path = workdir / f"agent-{cluster}.yaml"
    path.write_text(
        f"cluster: {cluster}\npublisherKeyFile: publisher.pem\n"
        f"directory: {{path: out/{cluster}}}\n"
        f"providers:\n  vault-prod:\n    vault: {{auth: {{token: {{file: {token_file}}}}}}}\n"
    )
    run = trustmgr("agent", "run", "--once", "-c", str(path))
    return run.code, run.err


def _root(workdir: Path, cluster: str) -> str:
    chain = (workdir / f"out/{cluster}/cert-chain.pem").read_bytes()
    return fingerprint(load_certificates(chain, "cert-chain.pem")[-1])


def _phase() -> str | None:
    rows = json.loads(trustmgr("rotate", "status", "-o", "json").out)
    return str(rows[0]["phase"]) if rows else None


def test_agents_on_vault_renew_the_root_canary_first_and_issue_under_the_new_one(
    vault_pki: VaultPKI, workdir: Path
) -> None:
    mount = "pki_agents_renewal"
    with root_client(vault_pki.server) as client:
        create_root_mount(client, mount, "Agents Root", issuer_name="first")
        policy = signer_policy(mount) + (
            f'\npath "{mount}/root/generate/internal" {{ capabilities = ["update"] }}'
        )
        client.sys.create_or_update_policy("agents-renewer", policy)
    token = workdir / "token"
    token.write_text(create_token(vault_pki.server, "agents-renewer"))
    text = config(vault_pki, mount, f"{{token: {{file: {token}}}}}").replace(
        "stateStore: {file: {path: state}}\n",
        "stateStore: {file: {path: state}}\nrotation: {soak: 0s, canary: 1}\n",
    )
    for cluster in AGENTS:
        text = text.replace(
            f"{cluster}: {{directory: {{path: out/{cluster}}}}}",
            f"{cluster}: {{directory: {{path: out/{cluster}}}, mode: agent}}",
        )
    (workdir / "trustmgr.yaml").write_text(text)
    assert trustmgr("agent", "publisher-key", "--out", "publisher.pem").code == 0
    for _ in range(2):
        assert trustmgr("reconcile").code == 0
        for cluster in AGENTS:
            assert _agent(workdir, cluster, token)[0] == 0
    old = _root(workdir, "pci-east")
    assert _root(workdir, "pci-west") == old

    assert trustmgr("rotate", "start", "--provider", "vault-prod").code == 0
    switched_alone = False
    for _ in range(12):
        phase = _phase()
        if phase is None:
            break
        assert trustmgr("reconcile").code == 0
        plan = json.loads(trustmgr("plan", "-o", "json").out)
        west = next(c for c in plan["clusters"] if c["cluster"] == "pci-west")
        if west["reason"] == "CanaryFirst":
            # the canary has the new signer, pci-west still the old one
            assert _agent(workdir, "pci-west", token)[0] == 0
            assert _root(workdir, "pci-west") == old
            switched_alone = True
        for cluster in AGENTS:
            code, err = _agent(workdir, cluster, token)
            assert code == 0, err
    assert _phase() is None
    assert switched_alone
    new = _root(workdir, "pci-east")
    assert new != old and _root(workdir, "pci-west") == new

    # After the rotation the agents still sign through the new issuer: a lost key
    # is issued again at once, under the new root.
    (workdir / "out/pci-west/ca-key.pem").unlink()
    code, err = _agent(workdir, "pci-west", token)
    assert code == 0, err
    assert _root(workdir, "pci-west") == new
    assert trustmgr("reconcile").code == 0
    assert json.loads(trustmgr("plan", "-o", "json").out)["pending"] is False
