"""The promises a user relies on most: no silent root swap, a plan that says
what the next run does, nothing half-written, owner-only files."""

from __future__ import annotations

import json
import os
import shutil
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.conftest import PASSPHRASE, snapshot, trustmgr
from trustmgr import config as config_mod
from trustmgr.engine import Workspace, apply, make_plan
from trustmgr.providers.config import SelfSignedConfig
from trustmgr.providers.selfsigned import SelfSignedProvider
from trustmgr.state.file import FileStateStore

TWO_MESHES = """\
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
      web-2: {directory: {path: out/web-2}, istio: {multiRoot: true}}
"""

NEW_FEDERATED_MESH = """\
  pay:
    selfSigned: {passphraseEnv: TRUSTMGR_PASSPHRASE}
"""


def _config(workdir: Path, text: str = TWO_MESHES) -> Path:
    path = workdir / "trustmgr.yaml"
    path.write_text(text)
    return path


def _with_new_federated_mesh(text: str) -> str:
    """A mesh with a root of its own, federated with web."""
    text = text.replace("meshes:\n", NEW_FEDERATED_MESH + "meshes:\n", 1)
    return (
        text
        + """\
  payments:
    trustDomain: payments.example
    provider: pay
    clusters:
      pay-1: {directory: {path: out/pay-1}}
federations:
  - meshes: [web, payments]
"""
    )


def _fingerprints(workdir: Path) -> dict[str, bytes]:
    return {d.name: (d / "ca-cert.pem").read_bytes() for d in sorted((workdir / "out").iterdir())}


# --- lost or replaced state ---------------------------------------------------


def test_lost_state_never_swaps_the_root(workdir: Path) -> None:
    _config(workdir)
    assert trustmgr("bootstrap").code == 0
    shutil.rmtree(workdir / "state")
    before = snapshot(workdir)
    run = trustmgr("bootstrap")
    assert run.code == 2
    (line,) = run.err.strip().splitlines()
    assert line.startswith("trustmgr: clusters web-1, web-2 hold CAs trustmgr issued under root ")
    assert "provider corp has no root" in line
    assert "restore that root (the state store's providers/corp/) from a backup" in line
    assert snapshot(workdir) == before  # no new root, no cluster touched
    plan = trustmgr("plan")
    assert plan.code == 2 and plan.err == run.err


def test_a_replaced_root_under_the_same_passphrase_is_refused(workdir: Path) -> None:
    _config(workdir)
    assert trustmgr("bootstrap").code == 0
    old_root = (workdir / "state/providers/corp/root.pem").read_bytes()
    other = FileStateStore(workdir / "elsewhere")
    SelfSignedProvider(
        "corp", SelfSignedConfig(passphrase_env="TRUSTMGR_PASSPHRASE"), other.blobs(), _now
    ).create_root()
    shutil.copy(workdir / "elsewhere/providers/corp/root.pem", workdir / "state/providers/corp")
    before = snapshot(workdir / "out")
    run = trustmgr("reconcile")
    assert run.code == 2
    assert "provider corp has another root" in run.err
    assert snapshot(workdir / "out") == before
    # Restoring the root, as the message says, is all it takes.
    (workdir / "state/providers/corp/root.pem").write_bytes(old_root)
    run = trustmgr("reconcile")
    assert run.code == 0, run.err
    assert "0 changed" in run.out


def test_the_refusal_names_the_root_by_its_fingerprint(workdir: Path) -> None:
    _config(workdir)
    assert trustmgr("bootstrap").code == 0
    chain = (workdir / "out/web-1/cert-chain.pem").read_bytes()
    shutil.rmtree(workdir / "state")
    run = trustmgr("bootstrap")
    from trustmgr.bundles import fingerprint, load_certificates

    root = load_certificates(chain, "chain")[-1]
    colons = ":".join(f"{b:02X}" for b in bytes.fromhex(fingerprint(root)))
    assert colons in run.err


def _now() -> datetime:
    return datetime.now(UTC)


# --- the plan is a promise ----------------------------------------------------


def _promised(workdir: Path) -> tuple[set[str], set[str], list[str]]:
    plan = json.loads(trustmgr("plan", "-o", "json").out)
    changing = {c["cluster"] for c in plan["clusters"] if c["action"] != "none"}
    restarting = {c["cluster"] for c in plan["clusters"] if c["istiodRestart"]}
    return changing, restarting, [p["provider"] for p in plan["providers"]]


def _done(workdir: Path) -> tuple[set[str], set[str], list[str]]:
    run = trustmgr("bootstrap", "-o", "json")
    assert run.code == 0, run.err
    report = json.loads(run.out)
    changed = {c["cluster"] for c in report["clusters"] if c["action"] != "none" and c["ok"]}
    restarted = {c["cluster"] for c in report["clusters"] if c["istiod"]}
    return changed, restarted, report["rootsCreated"]


@pytest.mark.parametrize(
    "scenario",
    [
        "first run",
        "new mesh with its own root, federated",
        "federation removed",
        "new cluster",
        "edited files",
    ],
)
def test_plan_lists_exactly_what_bootstrap_changes_and_restarts(
    workdir: Path, scenario: str
) -> None:
    config = _config(workdir)
    if scenario == "federation removed":
        config.write_text(_with_new_federated_mesh(TWO_MESHES))
    if scenario != "first run":
        assert trustmgr("bootstrap").code == 0
    if scenario == "federation removed":
        config.write_text(config.read_text().replace("  - meshes: [web, payments]\n", ""))
        config.write_text(config.read_text().replace("federations:\n", ""))
    elif scenario == "new mesh with its own root, federated":
        config.write_text(_with_new_federated_mesh(TWO_MESHES))
    elif scenario == "new cluster":
        config.write_text(TWO_MESHES + "      web-3: {directory: {path: out/web-3}}\n")
    elif scenario == "edited files":
        (workdir / "out/web-2/root-cert.pem").resolve().write_bytes(
            (workdir / "out/web-1/ca-cert.pem").read_bytes()
        )
    promised = _promised(workdir)
    assert _done(workdir) == promised
    if scenario == "new mesh with its own root, federated":
        # the new root reaches web's clusters: web-1 (no multi-root) needs a restart
        assert promised == ({"web-1", "web-2", "pay-1"}, {"web-1"}, ["pay"])
    if scenario == "federation removed":
        # pay's root leaves every bundle; without multi-root that takes a restart
        assert promised == ({"web-1", "web-2", "pay-1"}, {"web-1", "pay-1"}, [])
    assert _promised(workdir) == (set(), set(), [])


def test_no_root_is_created_when_preflight_fails(workdir: Path) -> None:
    config = _config(workdir)
    assert trustmgr("bootstrap").code == 0
    config.write_text(_with_new_federated_mesh(TWO_MESHES))
    (workdir / "out/pay-1").parent.mkdir(exist_ok=True)
    (workdir / "out/pay-1").write_text("a file where the directory should be")
    before = snapshot(workdir)
    run = trustmgr("bootstrap")
    assert run.code == 1
    assert "cluster pay-1: cannot write" in run.err
    assert snapshot(workdir) == before
    assert not (workdir / "state/providers/pay").exists()


def test_a_trust_domain_change_says_so(workdir: Path) -> None:
    config = _config(workdir)
    assert trustmgr("bootstrap").code == 0
    config.write_text(TWO_MESHES.replace("web.example", "web2.example"))
    plan = json.loads(trustmgr("plan", "-o", "json").out)
    web1 = next(c for c in plan["clusters"] if c["cluster"] == "web-1")
    assert (web1["action"], web1["reason"]) == ("issue", "TrustDomainChanged")
    assert web1["message"] == (
        "the CA is for trust domain web.example, the mesh's is now web2.example"
    )


# --- the state store ----------------------------------------------------------


def test_an_unwritable_state_store_is_found_before_any_write(
    workdir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A renewal with a read-only state directory must not write every cluster
    and then fail to record it (the next run would call them all drift)."""
    config = _config(workdir)
    assert trustmgr("bootstrap").code == 0
    state = workdir / "state"
    cfg = config_mod.load(config)
    later = datetime.now(UTC) + timedelta(days=21)
    before = snapshot(workdir / "out")
    state.chmod(0o500)
    try:
        if os.geteuid() == 0:
            # root writes through modes: a read-only mount stands for it here
            real = os.statvfs

            class _ReadOnly:
                """statvfs as on a read-only mount, for the state directory only."""

                def __init__(self, path: str | os.PathLike[str]) -> None:
                    self.f_flag = real(path).f_flag
                    if Path(path).resolve() == state.resolve():
                        self.f_flag |= os.ST_RDONLY

            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(os, "statvfs", _ReadOnly)
                with Workspace.build(cfg, clock=lambda: later) as ws:
                    assert {c.action for c in make_plan(ws).clusters} == {"renew"}
                    with pytest.raises(Exception, match="cannot write the state directory"):
                        apply(ws)
        else:
            with (
                Workspace.build(cfg, clock=lambda: later) as ws,
                pytest.raises(Exception, match="cannot write the state directory"),
            ):
                apply(ws)
    finally:
        state.chmod(0o700)
    assert snapshot(workdir / "out") == before


# --- permissions --------------------------------------------------------------


def test_directories_are_owner_only_whatever_the_umask(workdir: Path) -> None:
    _config(workdir)
    old = os.umask(0)
    try:
        assert trustmgr("bootstrap").code == 0
    finally:
        os.umask(old)
    for path in ("state", "state/providers", "state/providers/corp", "out", "out/web-1"):
        mode = stat.S_IMODE((workdir / path).stat().st_mode)
        assert mode & 0o077 == 0, f"{path} is {mode:04o}"
    for path in ("state/providers/corp/root.pem", "out/web-1/ca-key.pem", "state/state.json"):
        assert stat.S_IMODE((workdir / path).resolve().stat().st_mode) == 0o600, path


def test_a_key_readable_by_others_is_reported_and_replaced(workdir: Path) -> None:
    _config(workdir)
    assert trustmgr("bootstrap").code == 0
    key = (workdir / "out/web-1/ca-key.pem").resolve()
    old_cert = (workdir / "out/web-1/ca-cert.pem").read_bytes()
    key.chmod(0o644)
    status = {r["cluster"]: r for r in json.loads(trustmgr("status", "-o", "json").out)}
    assert status["web-1"]["drift"] == (
        "key exposed: ca-key.pem is readable by others than its owner (mode 0644)"
    )
    assert status["web-2"]["drift"] is None
    verify = trustmgr("verify")
    assert verify.code == 1
    assert "FAIL web-1: ca-key.pem is readable by others than its owner (mode 0644)" in verify.out
    run = trustmgr("reconcile")
    assert run.code == 0, run.err
    assert "issue         web-1 (KeyExposed)" in run.out
    assert (workdir / "out/web-1/ca-cert.pem").read_bytes() != old_cert
    assert stat.S_IMODE((workdir / "out/web-1/ca-key.pem").resolve().stat().st_mode) == 0o600
    assert trustmgr("verify").code == 0


# --- the command line -----------------------------------------------------------


def test_global_options_work_after_the_subcommand_and_from_the_environment(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    elsewhere = workdir / "conf"
    elsewhere.mkdir()
    config = _config(elsewhere)
    run = trustmgr("bootstrap", "-c", str(config), "-v")
    assert run.code == 0, run.err
    assert trustmgr("status", "--config", str(config)).code == 0
    assert trustmgr("trust", "matrix", "-c", str(config)).code == 0
    monkeypatch.setenv("TRUSTMGR_CONFIG", str(config))
    plan = trustmgr("plan", "--detailed-exitcode")
    assert plan.code == 0, plan.err
    assert "nothing to do" in plan.out
    assert PASSPHRASE not in plan.out + plan.err


def test_a_state_of_the_previous_format_is_read_and_an_unknown_one_refused(
    workdir: Path,
) -> None:
    _config(workdir)
    assert trustmgr("bootstrap").code == 0
    state = workdir / "state/state.json"
    data = json.loads(state.read_text())
    data["format"] = 1
    for key in ("rotations", "generations"):
        data.pop(key)
    state.write_text(json.dumps(data))
    assert "0 changed" in trustmgr("reconcile").out
    data["format"] = 3
    state.write_text(json.dumps(data))
    run = trustmgr("reconcile")
    assert run.code == 2 and "state format 3 is not 2" in run.err
