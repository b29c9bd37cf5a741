"""The agent restarts its cluster's istiod after a write istiod cannot hot-reload,
as the central run does for the clusters it writes: only with
``istio.restartIstiod``, by patching the Deployment; otherwise it says a restart
is needed. In process, against an emulated cluster (tests/test_chart_agent_wiring.py
runs the same through the chart's pod and Role)."""

# The fixtures are imported, so this module runs without conftest wiring; pytest injects them as
# parameters of the same names, which pyflakes would call unused imports and redefinitions.
# ruff: noqa: F401, F811

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml

from tests.conftest import trustmgr
from tests.kube_emulator import KubeEmulator
from tests.kube_fixtures import KubeEmulatorFactory, kube_emulator_factory
from tests.test_chart_wiring import istiod

RESTARTED_AT = "kubectl.kubernetes.io/restartedAt"

CENTRAL = """\
stateStore: {file: {path: state}}
providers:
  corp: {selfSigned: {passphraseEnv: TRUSTMGR_PASSPHRASE}}
  partner: {selfSigned: {passphraseEnv: TRUSTMGR_PASSPHRASE}}
meshes:
  web:
    trustDomain: web.corp
    provider: corp
    clusters:
      a1: {mode: agent, kubernetes: {kubeconfig: a1.kubeconfig}}
  partner:
    trustDomain: partner.corp
    provider: partner
    clusters:
      p1: {directory: {path: out/p1}}
"""
FEDERATED = "federations:\n  - meshes: [web, partner]\n"


def _agent(restart: bool) -> tuple[int, str]:
    run = trustmgr("agent", "run", "--once", "-c", f"agent-{restart}.yaml")
    return run.code, run.err


@pytest.mark.parametrize("restart", [True, False])
def test_a_bundle_istiod_cannot_hot_reload_restarts_istiod_if_allowed(
    kube_emulator_factory: KubeEmulatorFactory,
    workdir: Path,
    caplog: pytest.LogCaptureFixture,
    restart: bool,
) -> None:
    cluster = kube_emulator_factory()
    cluster.put_object(istiod())
    (workdir / "a1.kubeconfig").write_text(yaml.safe_dump(cluster.kubeconfig("a1")))
    (workdir / "trustmgr.yaml").write_text(CENTRAL)
    assert trustmgr("agent", "publisher-key", "--out", "publisher.pem").code == 0
    (workdir / f"agent-{restart}.yaml").write_text(
        "cluster: a1\npublisherKeyFile: publisher.pem\nkubernetes: {kubeconfig: a1.kubeconfig}\n"
        f"istio: {{restartIstiod: {str(restart).lower()}}}\n"
    )
    for _ in range(2):
        assert trustmgr("reconcile").code == 0
        assert _agent(restart) == (0, "")

    # Without multiRoot, a root added to the bundle needs istiod restarted.
    (workdir / "trustmgr.yaml").write_text(CENTRAL + FEDERATED)
    assert trustmgr("reconcile").code == 0
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="trustmgr"):
        assert _agent(restart) == (0, "")
    deployment = cluster.get_object("deployments", "istio-system", "istiod")
    assert deployment is not None
    annotations = deployment["spec"]["template"]["metadata"].get("annotations") or {}
    if restart:
        assert "; istiod restarted" in caplog.text
        assert RESTARTED_AT in annotations
        assert cluster.count("patch", "deployments") == 1
    else:
        assert "(istiod restart needed)" in caplog.text
        assert RESTARTED_AT not in annotations
        assert cluster.count("patch", "deployments") == 0
    assert cluster.count("get", "deployments") == 0
    # Converged: the next pass restarts nothing again.
    assert trustmgr("reconcile").code == 0
    assert _agent(restart) == (0, "")
    assert cluster.count("patch", "deployments") == (1 if restart else 0)
