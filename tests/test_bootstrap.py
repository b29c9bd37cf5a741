"""The quickstart as a user runs it: bootstrap, verify, status, plan, re-run."""

from __future__ import annotations

import json
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml

from tests.conftest import Run, snapshot, trustmgr
from tests.workload import assert_openssl_enforces_trust_domain
from trustmgr import config as config_mod
from trustmgr.bundles import TrustBundle
from trustmgr.engine import Workspace, apply, make_plan
from trustmgr.pki import CACerts, istiod_problems, observe
from trustmgr.planner import Action
from trustmgr.status import cluster_status, verify_all

CLUSTERS = {
    "pci-east": "payments.example",
    "pci-west": "payments.example",
    "web-east": "web.example",
    "web-west": "web.example",
    "admin-1": "admin.example",
}


def material(cluster_dir: Path) -> CACerts:
    return CACerts.from_files(
        {
            n: (cluster_dir / n).read_bytes()
            for n in ("ca-cert.pem", "ca-key.pem", "cert-chain.pem", "root-cert.pem")
        }
    )


def bootstrapped(config: Path) -> Run:
    run = trustmgr("-c", str(config), "bootstrap")
    assert run.code == 0, run.err
    return run


def test_bootstrap_writes_istio_valid_material_for_every_cluster(
    quickstart: Path, workdir: Path
) -> None:
    run = bootstrapped(quickstart)
    assert "created root of provider pci-root" in run.out
    assert "5 clusters: 5 changed" in run.out
    now = datetime.now(UTC)
    for cluster, trust_domain in CLUSTERS.items():
        directory = workdir / "out" / cluster
        m = material(directory)
        assert istiod_problems(m, now=now) == []
        assert observe(m, trust_domain=trust_domain, now=now).problems == ()
        assert stat.S_IMODE((directory / "ca-key.pem").stat().st_mode) == 0o600
        assert stat.S_IMODE((directory / "cacerts.yaml").stat().st_mode) == 0o600
        foreign = "web.example" if trust_domain != "web.example" else "payments.example"
        assert_openssl_enforces_trust_domain(directory, trust_domain, foreign, workdir)


def test_each_cluster_has_its_own_ca_and_key(quickstart: Path, workdir: Path) -> None:
    bootstrapped(quickstart)
    certs = {(workdir / "out" / c / "ca-cert.pem").read_bytes() for c in CLUSTERS}
    keys = {(workdir / "out" / c / "ca-key.pem").read_bytes() for c in CLUSTERS}
    assert len(certs) == len(keys) == len(CLUSTERS)


def test_bundles_hold_own_and_federated_roots_only(quickstart: Path, workdir: Path) -> None:
    bootstrapped(quickstart)
    roots = {
        c: TrustBundle.from_pem((workdir / "out" / c / "root-cert.pem").read_bytes()).fingerprints
        for c in CLUSTERS
    }
    pci_root, corp_root = roots["pci-east"][0], roots["web-east"][0]
    assert roots["pci-east"] == roots["pci-west"] == (pci_root, corp_root)
    assert roots["web-east"] == roots["web-west"] == (corp_root, pci_root)
    assert roots["admin-1"] == (corp_root,)


def test_cert_chain_runs_from_cluster_ca_to_root(quickstart: Path, workdir: Path) -> None:
    bootstrapped(quickstart)
    directory = workdir / "out" / "pci-east"
    chain = (directory / "cert-chain.pem").read_bytes()
    assert chain.startswith((directory / "ca-cert.pem").read_bytes())
    assert chain.endswith(
        (directory / "root-cert.pem").read_bytes().split(b"-----END CERTIFICATE-----\n")[0]
        + b"-----END CERTIFICATE-----\n"
    )


def test_secret_manifest_matches_the_files(quickstart: Path, workdir: Path) -> None:
    bootstrapped(quickstart)
    directory = workdir / "out" / "web-east"
    manifest = yaml.safe_load((directory / "cacerts.yaml").read_text())
    assert manifest["kind"] == "Secret"
    assert manifest["metadata"]["namespace"] == "istio-system"
    assert manifest["metadata"]["name"] == "cacerts"
    assert manifest["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "trustmgr"
    import base64

    for name, value in manifest["data"].items():
        assert base64.b64decode(value) == (directory / name).read_bytes()


def test_second_bootstrap_touches_nothing(quickstart: Path, workdir: Path) -> None:
    bootstrapped(quickstart)
    before = snapshot(workdir)
    run = bootstrapped(quickstart)
    assert "0 changed, 5 up to date" in run.out
    assert snapshot(workdir) == before


def test_plan_shows_pending_work_and_detailed_exit_code(quickstart: Path) -> None:
    run = trustmgr("-c", str(quickstart), "plan", "--detailed-exitcode")
    assert run.code == 3
    assert "provider pci-root: create root" in run.out
    assert "Missing" in run.out
    bootstrapped(quickstart)
    run = trustmgr("-c", str(quickstart), "plan", "--detailed-exitcode", "-o", "json")
    assert run.code == 0
    plan = json.loads(run.out)
    assert plan["pending"] is False
    assert {c["action"] for c in plan["clusters"]} == {"none"}


def test_plan_writes_nothing(quickstart: Path, workdir: Path) -> None:
    before = snapshot(workdir)
    assert trustmgr("-c", str(quickstart), "plan").code == 0
    assert snapshot(workdir) == before


def test_renewal_inside_renew_before(quickstart: Path, workdir: Path) -> None:
    bootstrapped(quickstart)
    old_serial = json.loads(trustmgr("-c", str(quickstart), "status", "-o", "json").out)[0][
        "serial"
    ]
    cfg = config_mod.load(quickstart)
    later = datetime.now(UTC) + timedelta(days=21)  # ttl 30d, renewBefore 10d
    ws = Workspace.build(cfg, clock=lambda: later)
    planned = {c.cluster: c for c in make_plan(ws).clusters}
    assert {c.action for c in planned.values()} == {Action.RENEW}
    assert planned["pci-east"].reason == "RenewalDue"
    report = apply(ws)
    assert report.ok and report.changed
    status = {s.cluster: s for s in cluster_status(ws)}
    assert status["pci-east"].serial != old_serial
    assert status["pci-east"].drift is None
    # The renewed CA is under the same root: the bundle did not change.
    assert all(problems == [] for problems in verify_all(ws).values())
    assert not apply(ws).changed


def test_status_reports_drift_and_bootstrap_repairs_it(quickstart: Path, workdir: Path) -> None:
    bootstrapped(quickstart)
    directory = workdir / "out" / "web-west"
    other = (workdir / "out" / "web-east" / "ca-key.pem").read_bytes()
    target = (directory / "ca-key.pem").resolve()
    target.chmod(0o600)
    target.write_bytes(other)
    status = {
        r["cluster"]: r
        for r in json.loads(trustmgr("-c", str(quickstart), "status", "-o", "json").out)
    }
    assert status["web-west"]["drift"] == "files changed outside trustmgr"
    verify = trustmgr("-c", str(quickstart), "verify")
    assert verify.code == 1
    assert "FAIL web-west: ca-key.pem does not match ca-cert.pem" in verify.out
    plan = trustmgr("-c", str(quickstart), "plan")
    assert "web-west" in plan.out and "Invalid" in plan.out
    bootstrapped(quickstart)
    assert trustmgr("-c", str(quickstart), "verify").code == 0


def test_federation_change_updates_bundles_only(quickstart: Path, workdir: Path) -> None:
    bootstrapped(quickstart)
    ca_before = (workdir / "out" / "admin-1" / "ca-cert.pem").read_bytes()
    text = quickstart.read_text().replace(
        "  - meshes: [payments, web]", "  - meshes: [payments, web]\n  - meshes: [admin, payments]"
    )
    quickstart.write_text(text)
    run = trustmgr("-c", str(quickstart), "plan", "-o", "json")
    actions = {c["cluster"]: (c["action"], c["reason"]) for c in json.loads(run.out)["clusters"]}
    assert actions["admin-1"] == ("update-bundle", "BundleChanged")
    # payments already trusts corp-root, admin's root, through web: nothing changes there.
    assert actions["pci-east"] == ("none", "UpToDate")
    assert actions["web-east"] == ("none", "UpToDate")
    bootstrapped(quickstart)
    assert (workdir / "out" / "admin-1" / "ca-cert.pem").read_bytes() == ca_before
    assert (
        len(TrustBundle.from_pem((workdir / "out" / "admin-1" / "root-cert.pem").read_bytes())) == 2
    )
    assert trustmgr("-c", str(quickstart), "verify").code == 0


def test_init_writes_a_config_that_bootstraps(workdir: Path) -> None:
    assert trustmgr("init").code == 0
    assert trustmgr("validate").code == 0
    run = trustmgr("bootstrap")
    assert run.code == 0, run.err
    assert trustmgr("init").code == 2  # refuses to overwrite


@pytest.mark.parametrize("algorithm", ["ECDSA_P384", "RSA_2048"])
def test_other_key_algorithms(quickstart: Path, algorithm: str) -> None:
    quickstart.write_text(
        quickstart.read_text().replace("keyAlgorithm: ECDSA_P256", f"keyAlgorithm: {algorithm}")
    )
    bootstrapped(quickstart)
    assert trustmgr("-c", str(quickstart), "verify").code == 0
    quickstart.write_text(
        quickstart.read_text().replace(f"keyAlgorithm: {algorithm}", "keyAlgorithm: ECDSA_P256")
    )
    plan = json.loads(trustmgr("-c", str(quickstart), "plan", "-o", "json").out)
    assert {c["reason"] for c in plan["clusters"]} == {"KeyAlgorithmChanged"}


def test_a_root_expiring_inside_renew_before_does_not_renew_every_run(workdir: Path) -> None:
    """The CA is clamped to its root's notAfter; renewing cannot extend it, so
    re-runs converge and the plan says to rotate the root."""
    (workdir / "trustmgr.yaml").write_text(
        """\
stateStore: {file: {path: state}}
providers:
  short: {selfSigned: {passphraseEnv: TRUSTMGR_PASSPHRASE, ttl: 100h}}
meshes:
  m: {trustDomain: m.example, provider: short, clusters: {c1: {directory: {path: out/c1}}}}
"""
    )
    assert trustmgr("bootstrap").code == 0
    before = snapshot(workdir)
    assert "0 changed, 1 up to date" in trustmgr("bootstrap").out
    assert snapshot(workdir) == before
    plan = json.loads(trustmgr("plan", "-o", "json").out)["clusters"][0]
    assert (plan["action"], plan["reason"]) == ("none", "IssuerExpiring")
    assert "rotate the provider's root" in plan["message"]


def test_each_provider_is_asked_for_its_roots_once_per_pass(
    quickstart: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """For Vault and AWS every roots() is a network call: one per provider per pass."""
    assert trustmgr("-c", str(quickstart), "bootstrap").code == 0
    ws = Workspace.build(config_mod.load(quickstart), clock=lambda: datetime.now(UTC))
    calls: dict[str, int] = {}
    for name, provider in ws.providers.items():
        original = provider.roots

        def counted(name: str = name, original: object = original) -> object:
            calls[name] = calls.get(name, 0) + 1
            return original()  # type: ignore[operator]

        monkeypatch.setattr(provider, "roots", counted)
    quickstart.write_text(
        quickstart.read_text().replace("[payments, web]", "[payments, web, admin]")
    )
    ws = Workspace.build(
        config_mod.load(quickstart), clock=lambda: datetime.now(UTC), providers=ws.providers
    )
    report = apply(ws)
    assert report.ok and report.changed  # admin's bundle changed
    assert calls == {"pci-root": 1, "corp-root": 1}
