"""The daemon against a real OpenBao: Kubernetes auth validated by the Kubernetes emulator's
TokenReview, OpenBao sealed and restarted mid-run, and the Vault token expiry metric."""

# The emulator fixtures are imported, so pytest injects them as parameters of the same names,
# which pyflakes would call unused imports and redefinitions.
# ruff: noqa: F401, F811

from __future__ import annotations

import base64
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from prometheus_client import generate_latest

from tests.conftest import REPO, snapshot
from tests.kube_emulator import TOKEN_REVIEW_PATH, KubeEmulator
from tests.kube_fixtures import KubeEmulatorFactory, kube_emulator, kube_emulator_factory
from tests.openbao import (
    SIGNER_POLICY,
    OpenBaoServer,
    VaultPKI,
    create_token,
    root_client,
    setup_kubernetes_auth,
    setup_pki,
    start_openbao,
    start_openbao_with_storage,
)
from trustmgr import config as config_mod
from trustmgr.daemon import Daemon
from trustmgr.engine import Workspace
from trustmgr.execute import Report

NAMESPACE, SERVICE_ACCOUNT = "trustmgr", "trustmgr"
K8S_MOUNT = "k8s-daemon"


def _write_config(workdir: Path, address: str, auth: dict[str, Any]) -> Path:
    path = workdir / "trustmgr.yaml"
    path.write_text(f"""\
stateStore: {{file: {{path: state}}}}
daemon: {{interval: 1s, jitter: 0s, listen: "127.0.0.1:0"}}
providers:
  vault-prod:
    vault:
      address: {address}
      mount: pki
      timeout: 5s
      auth: {json.dumps(auth)}
meshes:
  payments:
    trustDomain: payments.example
    provider: vault-prod
    clusters:
      pci-east: {{directory: {{path: out/pci-east}}}}
      pci-west: {{directory: {{path: out/pci-west}}}}
intermediates: {{ttl: 720h, renewBefore: 240h}}
""")
    return path


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _daemon(path: Path, clock: Callable[[], datetime]) -> Daemon:
    config = config_mod.load(path)
    return Daemon(config, clock=clock, workspace=lambda: Workspace.build(config, clock=clock))


def _metrics(daemon: Daemon) -> str:
    return generate_latest(daemon.metrics.registry).decode()


def _failures(daemon: Daemon, reason: str) -> float:
    found = re.search(
        rf'trustmgr_pass_failures_total\{{reason="{reason}"\}} (\S+)', _metrics(daemon)
    )
    return float(found.group(1)) if found else 0.0


def _token_expiry(daemon: Daemon) -> float | None:
    found = re.search(
        r'trustmgr_vault_token_expiration_timestamp_seconds\{provider="vault-prod"\} (\S+)',
        _metrics(daemon),
    )
    return float(found.group(1)) if found else None


def _changed(report: Report) -> int:
    return sum(1 for o in report.outcomes if o.ok and o.action.value != "none")


def _ca_pem(pki: VaultPKI) -> str:
    return pki.root.public_bytes(serialization.Encoding.PEM).decode()


def _outputs(workdir: Path) -> dict[str, tuple[float, int]]:
    return {**snapshot(workdir / "out"), **snapshot(workdir / "state")}


# -- the emulator's TokenReview -----------------------------------------------------------


def _review(emulator: KubeEmulator, token: str, *, bearer: str) -> tuple[int, dict[str, Any]]:
    body = json.dumps(
        {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": {"token": token}}
    ).encode()
    request = urllib.request.Request(
        emulator.url + TOKEN_REVIEW_PATH,
        data=body,
        method="POST",
        headers={"Authorization": f"Bearer {bearer}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as answer:
            return int(answer.status), json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_the_emulator_reviews_the_service_account_tokens_it_issued(
    kube_emulator: KubeEmulator,
) -> None:
    token = kube_emulator.issue_service_account_token(NAMESPACE, SERVICE_ACCOUNT)
    header, payload, signature = token.split(".")
    assert json.loads(base64.urlsafe_b64decode(header + "=="))["alg"] == "RS256"
    assert len(base64.urlsafe_b64decode(signature + "==")) == 256
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    assert claims["sub"] == "system:serviceaccount:trustmgr:trustmgr"
    assert claims["kubernetes.io/serviceaccount/namespace"] == NAMESPACE
    assert claims["kubernetes.io/serviceaccount/service-account.name"] == SERVICE_ACCOUNT
    uid = claims["kubernetes.io/serviceaccount/service-account.uid"]
    assert claims["exp"] > datetime.now(UTC).timestamp()

    status, answer = _review(kube_emulator, token, bearer=token)  # as OpenBao asks
    assert status == 201
    assert answer["kind"] == "TokenReview"
    assert answer["status"]["authenticated"] is True
    assert answer["status"]["user"]["username"] == "system:serviceaccount:trustmgr:trustmgr"
    assert answer["status"]["user"]["uid"] == uid
    # Another token of the same service account has the same uid.
    again = kube_emulator.issue_service_account_token(NAMESPACE, SERVICE_ACCOUNT)
    assert _review(kube_emulator, again, bearer=again)[1]["status"]["user"]["uid"] == uid

    status, answer = _review(kube_emulator, "not-a-token", bearer=again)
    assert status == 201
    assert "authenticated" not in answer["status"] and answer["status"]["user"] == {}
    assert "invalid bearer token" in answer["status"]["error"]

    assert kube_emulator.revoke_service_account_token(token)
    status, answer = _review(kube_emulator, token, bearer=again)
    assert status == 201 and answer["status"]["error"].endswith("token has been invalidated]")
    # As a bearer token it no longer authenticates anything.
    assert _review(kube_emulator, again, bearer=token)[0] == 401
    reviews = kube_emulator.token_reviews
    assert [r.authenticated for r in reviews] == [True, True, False, False]
    assert reviews[0].token == token and reviews[0].reviewer.endswith(":trustmgr:trustmgr")


# -- Kubernetes auth end to end ------------------------------------------------------------


def test_a_daemon_pass_logs_in_with_kubernetes_auth_and_rereads_the_token_file(
    vault_pki: VaultPKI,
    kube_emulator: KubeEmulator,
    workdir: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    setup_kubernetes_auth(
        vault_pki.server,
        kubernetes_host=kube_emulator.url,
        ca_pem=_ca_pem(vault_pki),
        role="trustmgr-daemon",
        namespace=NAMESPACE,
        service_account=SERVICE_ACCOUNT,
        mount=K8S_MOUNT,
    )
    token_file = workdir / "sa-token"
    first = kube_emulator.issue_service_account_token(NAMESPACE, SERVICE_ACCOUNT)
    token_file.write_text(first)
    auth = {
        "kubernetes": {"role": "trustmgr-daemon", "mount": K8S_MOUNT, "tokenPath": str(token_file)}
    }
    daemon = _daemon(_write_config(workdir, vault_pki.address, auth), lambda: datetime.now(UTC))

    report = daemon.run_pass()
    assert report is not None and report.ok and _changed(report) == 2
    assert (workdir / "out/pci-east/ca-cert.pem").exists()
    assert [r.token for r in kube_emulator.token_reviews] == [first]
    assert kube_emulator.token_reviews[0].authenticated
    assert daemon.health.ready
    # The Kubernetes role's token: 1 h, renewable.
    expiry = _token_expiry(daemon)
    assert expiry is not None
    assert abs(expiry - (datetime.now(UTC) + timedelta(hours=1)).timestamp()) < 30

    # The kubelet rotates the projected token: the next pass logs in with the new one.
    second = kube_emulator.issue_service_account_token(NAMESPACE, SERVICE_ACCOUNT)
    token_file.write_text(second + "\n")
    assert daemon.run_pass() is not None
    assert [r.token for r in kube_emulator.token_reviews] == [first, second]

    # A token the cluster no longer knows: the pass fails with one line, nothing is written,
    # the daemon turns unready and stays alive.
    kube_emulator.revoke_service_account_token(second)
    before = _outputs(workdir)
    caplog.clear()
    assert daemon.run_pass() is None
    assert _outputs(workdir) == before
    why = daemon.health.why_not_ready
    assert not daemon.health.ready and "\n" not in why
    assert why.startswith(f"provider vault-prod: Kubernetes login on auth/{K8S_MOUNT}/login")
    assert "was refused (HTTP 403)" in why and str(token_file) in why
    assert daemon.health.readiness() == (False, why)
    assert daemon.health.alive() == (True, "ok")
    assert _failures(daemon, "ProviderNeedsFix") == 1
    assert kube_emulator.token_reviews[-1].token == second
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("pass failed")]
    assert logged == [f"pass failed: {why}"]
    assert all(t not in caplog.text for t in (first, second))

    # A fresh token in the file: the next pass recovers by itself.
    third = kube_emulator.issue_service_account_token(NAMESPACE, SERVICE_ACCOUNT)
    token_file.write_text(third)
    assert daemon.run_pass() is not None
    assert daemon.health.ready


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as answer:
            return int(answer.status), answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""


def _wait_for(port: int, path: str, check: Callable[[int, str], bool]) -> tuple[int, str]:
    deadline = time.monotonic() + 30
    answer = _get(port, path)
    while not check(*answer) and time.monotonic() < deadline:
        time.sleep(0.2)
        answer = _get(port, path)
    return answer


def test_the_daemon_process_stays_up_unready_while_its_service_account_token_is_refused(
    vault_pki: VaultPKI, kube_emulator: KubeEmulator, workdir: Path
) -> None:
    setup_kubernetes_auth(
        vault_pki.server,
        kubernetes_host=kube_emulator.url,
        ca_pem=_ca_pem(vault_pki),
        role="trustmgr-process",
        namespace=NAMESPACE,
        service_account=SERVICE_ACCOUNT,
        mount=K8S_MOUNT,
    )
    token_file = workdir / "sa-token"
    token = kube_emulator.issue_service_account_token(NAMESPACE, SERVICE_ACCOUNT)
    token_file.write_text(token)
    auth = {
        "kubernetes": {"role": "trustmgr-process", "mount": K8S_MOUNT, "tokenPath": str(token_file)}
    }
    path = _write_config(workdir, vault_pki.address, auth)
    port = _port()
    path.write_text(path.read_text().replace("127.0.0.1:0", f"127.0.0.1:{port}"))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(
        [sys.executable, "-m", "trustmgr", "daemon"],
        cwd=workdir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert _wait_for(port, "/readyz", lambda code, _: code == 200) == (200, "ok\n")
        assert (workdir / "out/pci-west/ca-cert.pem").exists()
        kube_emulator.revoke_service_account_token(token)
        code, why = _wait_for(port, "/readyz", lambda code, _: code == 503)
        assert code == 503 and why.count("\n") == 1
        assert why.startswith(f"provider vault-prod: Kubernetes login on auth/{K8S_MOUNT}/login")
        assert _get(port, "/healthz") == (200, "ok\n")
        assert process.poll() is None
        token_file.write_text(kube_emulator.issue_service_account_token(NAMESPACE, SERVICE_ACCOUNT))
        assert _wait_for(port, "/readyz", lambda code, _: code == 200)[0] == 200
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=15)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 143, err
    assert token not in err
    failed = [line for line in err.splitlines() if "pass failed" in line]
    assert failed and all(why.strip() in line for line in failed)


# -- OpenBao sealed and restarted mid-run --------------------------------------------------


def _token_auth(server: OpenBaoServer, workdir: Path) -> dict[str, Any]:
    token_file = workdir / "vault-token"
    token_file.write_text(create_token(server, SIGNER_POLICY, ttl="24h"))
    return {"token": {"file": str(token_file)}}


def test_a_sealed_openbao_makes_passes_write_nothing_until_it_is_unsealed(
    workdir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    bao_dir = tmp_path_factory.mktemp("sealed-openbao")
    with start_openbao(bao_dir) as server:
        setup_pki(server, bao_dir)
        now = [datetime.now(UTC)]
        daemon = _daemon(
            _write_config(workdir, server.address, _token_auth(server, workdir)), lambda: now[0]
        )
        first = daemon.run_pass()
        assert first is not None and first.ok and daemon.health.ready

        with root_client(server) as client:
            client.sys.seal()
        now[0] += timedelta(days=21)  # inside renewBefore: the passes have work to do
        before = _outputs(workdir)
        for _ in range(2):
            assert daemon.run_pass() is None
        assert _outputs(workdir) == before
        assert not daemon.health.ready
        assert "Vault at" in daemon.health.why_not_ready
        assert "is sealed" in daemon.health.why_not_ready
        assert _failures(daemon, "Unreachable") == 2
        assert daemon.health.alive() == (True, "ok")

        with root_client(server) as client:
            client.sys.submit_unseal_key(server.unseal_key)
        renewed = daemon.run_pass()
        assert renewed is not None and renewed.ok and _changed(renewed) == 2
        assert daemon.health.ready and daemon.health.why_not_ready == "ok"
        assert _outputs(workdir) != before


def test_a_restarted_openbao_is_used_again_once_it_is_back(
    workdir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    bao_dir = tmp_path_factory.mktemp("restarted-openbao")
    now = [datetime.now(UTC)]
    with ExitStack() as running:
        server = running.enter_context(start_openbao_with_storage(bao_dir))
        setup_pki(server, bao_dir)
        daemon = _daemon(
            _write_config(workdir, server.address, _token_auth(server, workdir)), lambda: now[0]
        )
        first = daemon.run_pass()
        assert first is not None and first.ok
    # Stopped: unreachable.
    now[0] += timedelta(days=21)
    before = _outputs(workdir)
    assert daemon.run_pass() is None
    assert _outputs(workdir) == before
    assert not daemon.health.ready
    assert f"Vault at {server.address} is unreachable" in daemon.health.why_not_ready
    assert _failures(daemon, "Unreachable") == 1
    port = int(server.address.rsplit(":", 1)[1])
    with start_openbao_with_storage(bao_dir, port=port) as again:
        assert again.address == server.address
        renewed = daemon.run_pass()  # the same token, from storage
        assert renewed is not None and renewed.ok and _changed(renewed) == 2
        assert daemon.health.ready


# -- the token expiry metric ---------------------------------------------------------------


def test_the_token_expiry_metric_is_the_expiry_of_the_token_used(
    vault_pki: VaultPKI, workdir: Path
) -> None:
    token = create_token(vault_pki.server, SIGNER_POLICY, ttl="2h")
    (workdir / "vault-token").write_text(token)
    auth = {"token": {"file": str(workdir / "vault-token")}}
    daemon = _daemon(_write_config(workdir, vault_pki.address, auth), lambda: datetime.now(UTC))
    assert _token_expiry(daemon) is None  # no pass yet
    assert daemon.run_pass() is not None
    expiry = _token_expiry(daemon)
    with root_client(vault_pki.server) as client:
        looked_up = client.auth.token.lookup(token)["data"]
    assert looked_up["renewable"] is True
    expire_time = datetime.fromisoformat(looked_up["expire_time"]).timestamp()
    assert expiry is not None and abs(expiry - expire_time) < 5

    # A token that never expires has no expiry to show.
    (workdir / "vault-token").write_text(vault_pki.server.root_token)
    assert daemon.run_pass() is not None
    assert _token_expiry(daemon) is None
