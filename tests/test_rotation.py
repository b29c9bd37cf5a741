"""Root rotation through every phase, on directory targets, with the rules that
keep a live mesh up checked after every pass."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.conftest import snapshot, trustmgr
from trustmgr import config as config_mod
from trustmgr.bundles import TrustBundle, fingerprint, load_certificates
from trustmgr.engine import Workspace, apply, make_plan
from trustmgr.pki import CACERTS_FILES, CACerts, istiod_problems

CONFIG = """\
stateStore: {file: {path: state}}
rotation: {soak: SOAK, canary: 1}
providers:
  corp:
    selfSigned: {passphraseEnv: TRUSTMGR_PASSPHRASE}
  partner:
    selfSigned: {passphraseEnv: TRUSTMGR_PASSPHRASE}
  iso:
    selfSigned: {passphraseEnv: TRUSTMGR_PASSPHRASE}
meshes:
  a:
    trustDomain: a.example
    provider: corp
    clusters:
      a-1: {directory: {path: out/a-1}, istio: {multiRoot: true}}
      a-2: {directory: {path: out/a-2}, istio: {multiRoot: true}}
      a-3: {directory: {path: out/a-3}, istio: {multiRoot: true}}
  b:
    trustDomain: b.example
    provider: partner
    clusters:
      b-1: {directory: {path: out/b-1}, istio: {multiRoot: true, version: "1.29"}}
  c:
    trustDomain: c.example
    provider: iso
    clusters:
      c-1: {directory: {path: out/c-1}, istio: {multiRoot: true}}
federations:
  - meshes: [a, b]
"""
A_AND_B = ("a-1", "a-2", "a-3", "b-1")


@dataclass(frozen=True)
class Held:
    """What one cluster holds."""

    material: CACerts

    @property
    def chain_root(self) -> str:
        return fingerprint(load_certificates(self.material.cert_chain, "chain")[-1])

    @property
    def bundle(self) -> tuple[str, ...]:
        return TrustBundle.from_pem(self.material.root_cert).fingerprints


def _held(workdir: Path) -> dict[str, Held]:
    out = {}
    for d in sorted((workdir / "out").iterdir()):
        out[d.name] = Held(CACerts.from_files({n: (d / n).read_bytes() for n in CACERTS_FILES}))
    return out


def _check_transition(before: dict[str, Held], after: dict[str, Held]) -> None:
    """What a live mesh needs after every pass."""
    now = datetime.now(UTC)
    for cluster, held in after.items():
        assert istiod_problems(held.material, now=now) == [], cluster
        old, new = before[cluster].material.root_cert, held.material.root_cert
        # istiod's multi-root rule (bytes.Contains before 1.30): superset or subset
        assert old in new or new in old, f"{cluster}: root-cert.pem cannot be hot-reloaded"
    # trust before use: a CA under a root reaches no cluster before every peer trusts it
    for cluster in A_AND_B:
        root = after[cluster].chain_root
        for peer in A_AND_B:
            assert root in after[peer].bundle, f"{peer} does not trust the root of {cluster}"


def _promise_and_pass(workdir: Path) -> None:
    """One reconcile, which changes exactly what the plan before it listed."""
    planned = json.loads(trustmgr("plan", "-o", "json").out)
    run = trustmgr("reconcile", "-o", "json")
    assert run.code == 0, run.err
    report = json.loads(run.out)
    assert {c["cluster"] for c in planned["clusters"] if c["action"] != "none"} == {
        c["cluster"] for c in report["clusters"] if c["action"] != "none"
    }


def _rotating(workdir: Path) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = json.loads(trustmgr("rotate", "status", "-o", "json").out)
    return rows


@pytest.fixture
def mesh(workdir: Path) -> Path:
    config = workdir / "trustmgr.yaml"
    config.write_text(CONFIG.replace("SOAK", "0s"))
    assert trustmgr("bootstrap").code == 0
    return config


def test_a_rotation_reaches_every_cluster_without_an_outage(mesh: Path, workdir: Path) -> None:
    start = _held(workdir)
    old_root = start["a-1"].chain_root
    untouched = snapshot(workdir / "out/c-1")
    run = trustmgr("rotate", "start", "--provider", "corp")
    assert run.code == 0, run.err
    new_root = _rotating(workdir)[0]["newRoots"][0]  # type: ignore[index]
    phases = []
    before = start
    for _ in range(10):
        if not _rotating(workdir):
            break
        phases.append(_rotating(workdir)[0]["phase"])
        _promise_and_pass(workdir)
        after = _held(workdir)
        _check_transition(before, after)
        before = after
    assert not _rotating(workdir)
    assert phases == [
        "prepared",
        "trust-distributed",
        "issuer-switched",  # the canary, a-1
        "issuer-switched",  # the rest
        "old-removed",
    ]
    end = _held(workdir)
    for cluster in A_AND_B:
        assert old_root not in end[cluster].bundle
        assert new_root in end[cluster].bundle
    assert {end[c].chain_root for c in ("a-1", "a-2", "a-3")} == {new_root}
    assert end["b-1"].chain_root == start["b-1"].chain_root
    assert snapshot(workdir / "out/c-1") == untouched  # neither uses nor federates with corp
    assert trustmgr("verify").code == 0
    # the old root's key is kept, encrypted, beside the new current one
    assert (workdir / "state/providers/corp/root.pem").exists()
    again = trustmgr("reconcile")
    assert "0 changed" in again.out


def test_the_canary_goes_first(mesh: Path, workdir: Path) -> None:
    trustmgr("rotate", "start", "--provider", "corp")
    trustmgr("reconcile")  # trust-distributed
    plan = json.loads(trustmgr("plan", "-o", "json").out)
    actions = {c["cluster"]: (c["action"], c["reason"]) for c in plan["clusters"]}
    assert actions["a-1"] == ("issue", "IssuerChanged")
    assert actions["a-2"] == actions["a-3"] == ("none", "CanaryFirst")


def test_the_soak_holds_the_old_root_until_it_has_passed(workdir: Path) -> None:
    config = workdir / "trustmgr.yaml"
    config.write_text(CONFIG.replace("SOAK", "24h"))
    assert trustmgr("bootstrap").code == 0
    trustmgr("rotate", "start", "--provider", "corp")
    for _ in range(4):
        trustmgr("reconcile")
    (row,) = _rotating(workdir)
    assert row["phase"] == "issuer-switched"
    assert str(row["blocked"]).startswith("soaking until ")
    cfg = config_mod.load(config)
    with Workspace.build(cfg, clock=lambda: datetime.now(UTC) + timedelta(hours=23)) as ws:
        assert not apply(ws).changed
    with Workspace.build(cfg, clock=lambda: datetime.now(UTC) + timedelta(hours=25)) as ws:
        plan = make_plan(ws)
        assert [s.record.phase for s in plan.rotations] == ["old-removed"]
        assert apply(ws).changed


def test_rollback_and_abort_put_back_what_was_there(mesh: Path, workdir: Path) -> None:
    start = _held(workdir)
    trustmgr("rotate", "start", "--provider", "corp")
    trustmgr("reconcile")  # trust-distributed
    trustmgr("reconcile")  # issuer-switched, canary a-1 under the new root
    assert _held(workdir)["a-1"].chain_root != start["a-1"].chain_root
    abort = trustmgr("rotate", "abort", "--provider", "corp")
    assert abort.code == 2
    assert "`trustmgr rotate rollback` to trust-distributed first, then abort" in abort.err
    assert trustmgr("rotate", "rollback", "--provider", "corp").code == 0
    before = _held(workdir)
    trustmgr("reconcile")
    after = _held(workdir)
    _check_transition(before, after)
    assert after["a-1"].chain_root == start["a-1"].chain_root  # back under the old root
    trustmgr("reconcile")
    (row,) = _rotating(workdir)
    assert (row["phase"], row["held"]) == ("trust-distributed", True)  # held, not advancing
    assert trustmgr("rotate", "abort", "--provider", "corp").code == 0
    trustmgr("reconcile")
    trustmgr("reconcile")
    assert not _rotating(workdir)
    end = _held(workdir)
    for cluster in A_AND_B:
        assert end[cluster].bundle == start[cluster].bundle
        assert end[cluster].material.root_cert == start[cluster].material.root_cert


@pytest.mark.parametrize(
    ("args", "expect"),
    [
        (["--provider", "ghost"], "unknown provider 'ghost'"),
        (["--provider", "corp", "--provider", "corp"], ""),
    ],
)
def test_rotate_start_refuses_what_it_cannot_do(
    mesh: Path, workdir: Path, args: list[str], expect: str
) -> None:
    if not expect:
        assert trustmgr("rotate", "start", "--provider", "corp").code == 0
        again = trustmgr("rotate", "start", "--provider", "corp")
        assert again.code == 2
        assert "provider corp is already rotating" in again.err
        return
    run = trustmgr("rotate", "start", *args)
    assert run.code == 2 and expect in run.err


def test_nothing_to_roll_back_before_distribution(mesh: Path) -> None:
    trustmgr("rotate", "start", "--provider", "corp")
    run = trustmgr("rotate", "rollback", "--provider", "corp")
    assert run.code == 2
    assert "`trustmgr rotate abort` drops the rotation" in run.err


def test_a_cluster_that_cannot_hot_reload_is_named_with_its_restart(workdir: Path) -> None:
    config = workdir / "trustmgr.yaml"
    config.write_text(
        CONFIG.replace("SOAK", "0s").replace(
            "a-3: {directory: {path: out/a-3}, istio: {multiRoot: true}}",
            "a-3: {directory: {path: out/a-3}}",
        )
    )
    assert trustmgr("bootstrap").code == 0
    trustmgr("rotate", "start", "--provider", "corp")
    plan = json.loads(trustmgr("plan", "-o", "json").out)
    restarts = {c["cluster"] for c in plan["clusters"] if c["istiodRestart"]}
    assert restarts == {"a-3"}
    assert "(istiod restart needed)" in trustmgr("plan").out


def test_a_rotation_killed_at_random_moments_resumes_to_its_end(workdir: Path) -> None:
    import os
    import random
    import subprocess
    import sys

    from tests.conftest import PASSPHRASE, REPO

    fleet = "".join(
        f"      a-{i:02d}: {{directory: {{path: out/a-{i:02d}}}, istio: {{multiRoot: true}}}}\n"
        for i in range(20)
    )
    text = CONFIG.replace("SOAK", "0s").replace(
        "      a-1: {directory: {path: out/a-1}, istio: {multiRoot: true}}\n"
        "      a-2: {directory: {path: out/a-2}, istio: {multiRoot: true}}\n"
        "      a-3: {directory: {path: out/a-3}, istio: {multiRoot: true}}\n",
        fleet,
    )
    (workdir / "trustmgr.yaml").write_text(text)
    assert trustmgr("bootstrap").code == 0
    assert trustmgr("rotate", "start", "--provider", "corp").code == 0
    new_root = _rotating(workdir)[0]["newRoots"][0]  # type: ignore[index]
    env = {**os.environ, "TRUSTMGR_PASSPHRASE": PASSPHRASE, "PYTHONPATH": str(REPO)}
    rng = random.Random(10)
    before = _held(workdir)
    kills = 0
    for _ in range(40):
        if not _rotating(workdir):
            break
        process = subprocess.Popen(
            [sys.executable, "-u", "-m", "trustmgr", "reconcile", "--workers", "2"],
            cwd=workdir,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert process.stderr is not None
        wanted = rng.randrange(0, 12) if rng.random() < 0.6 else 10**6  # some passes finish
        seen = 0
        while seen < wanted:
            line = process.stderr.readline()
            if not line:
                break
            seen += line.startswith("[")
        if process.poll() is None:
            process.kill()
            kills += 1
        process.wait()
        process.stderr.close()
        after = _held(workdir)  # a partial set fails to load here
        now = datetime.now(UTC)
        for cluster, held in after.items():
            assert istiod_problems(held.material, now=now) == [], cluster
        # no cluster ever holds a CA whose root a peer does not trust
        rotating = [c for c in after if c.startswith(("a-", "b-"))]
        for cluster in rotating:
            for peer in rotating:
                assert after[cluster].chain_root in after[peer].bundle, (cluster, peer)
        before = after
    assert kills >= 3
    assert not _rotating(workdir), "the rotation did not finish"
    for cluster, held in before.items():
        if cluster.startswith("a-"):
            assert held.chain_root == new_root
        if cluster.startswith(("a-", "b-")):
            assert held.bundle.count(new_root) == 1 and len(held.bundle) == 2


def test_exported_bundles_follow_the_phases(mesh: Path, workdir: Path) -> None:
    def exported(mesh_name: str) -> tuple[int, set[str]]:
        run = trustmgr("bundle", "export", "--mesh", mesh_name)
        assert run.code == 0, run.err
        data = json.loads(run.out)
        from trustmgr import spiffe

        bundle = spiffe.decode(run.out.encode(), source="export", now=datetime.now(UTC))
        return data["spiffe_sequence"], {fingerprint(r) for r in bundle.roots}

    first, roots = exported("a")
    (old,) = roots
    trustmgr("rotate", "start", "--provider", "corp")
    new = _rotating(workdir)[0]["newRoots"][0]  # type: ignore[index]
    assert exported("a") == (first, {old})  # prepared: nothing distributed yet
    trustmgr("reconcile")  # trust-distributed
    sequence, roots = exported("a")
    assert (sequence, roots) == (first + 1, {old, new})
    fragment = trustmgr("federation", "export", "--mesh", "b", "--multi-root").out
    assert fragment.count("BEGIN CERTIFICATE") == 3  # b's root, a's old and new
    for _ in range(4):
        trustmgr("reconcile")
    assert not _rotating(workdir)
    assert exported("a") == (first + 2, {new})


def test_a_root_entering_its_renewal_window_starts_a_rotation(workdir: Path) -> None:
    config = workdir / "trustmgr.yaml"
    text = CONFIG.replace("SOAK", "0s").replace(
        "rotation: {soak: 0s, canary: 1}",
        "rotation: {soak: 0s, canary: 1, rootRenewBefore: 2300h}",
    )
    config.write_text(
        text.replace("  corp:\n    selfSigned: {", "  corp:\n    selfSigned: {ttl: 2400h, ")
    )
    assert trustmgr("bootstrap").code == 0
    assert json.loads(trustmgr("plan", "-o", "json").out)["pending"] is False  # 100 days left
    cfg = config_mod.load(config)
    later = datetime.now(UTC) + timedelta(days=5)  # 95 days left: inside 2300h
    with Workspace.build(cfg, clock=lambda: later) as ws:
        plan = make_plan(ws)
        (step,) = plan.rotations
        assert step.started and step.key == "corp"
        assert not any(c.pending for c in plan.clusters)  # nothing written yet
        report = apply(ws)
        assert report.changed
    (row,) = _rotating(workdir)
    assert (row["provider"], row["phase"]) == ("corp", "prepared")
    assert row["newRoots"] == [step.record.new_roots[0]]
    for _ in range(6):
        with Workspace.build(cfg, clock=lambda: later) as ws:
            apply(ws)
    assert not _rotating(workdir)
    with Workspace.build(cfg, clock=lambda: later) as ws:
        assert not make_plan(ws).pending  # the new root ends in 100 days from its making


def test_a_renewal_window_as_long_as_the_root_is_refused(workdir: Path) -> None:
    (workdir / "trustmgr.yaml").write_text(
        CONFIG.replace("SOAK", "0s").replace(
            "rotation: {soak: 0s, canary: 1}", "rotation: {rootRenewBefore: 87600h}"
        )
    )
    run = trustmgr("validate")
    assert run.code == 2
    assert "is not shorter than the root ttl of provider 'corp'" in run.err


def test_a_mesh_moved_to_another_provider_is_rotated_there(mesh: Path, workdir: Path) -> None:
    start = _held(workdir)
    corp_root = start["a-1"].chain_root
    text = mesh.read_text().replace(
        "  iso:\n", "  next:\n    selfSigned: {passphraseEnv: TRUSTMGR_PASSPHRASE}\n  iso:\n"
    )
    mesh.write_text(text.replace("    provider: corp\n", "    provider: next\n"))
    plan = trustmgr("plan")
    assert plan.code == 0, plan.err
    assert "provider next: create root" in plan.out
    assert "move of mesh a from provider corp to next" in plan.out
    assert "meshes.a.provider changed from corp to next" in plan.out
    phases = []
    before = start
    for _ in range(10):
        _promise_and_pass(workdir)
        rows = _rotating(workdir)
        if not rows:
            break
        phases.append(rows[0]["phase"])
        assert rows[0]["mesh"] == "a" and rows[0]["fromProvider"] == "corp"
        after = _held(workdir)
        _check_transition(before, after)
        before = after
    assert phases[0] == "prepared" and phases[-1] == "old-removed"
    end = _held(workdir)
    next_root = end["a-1"].chain_root
    assert next_root != corp_root
    assert {end[c].chain_root for c in ("a-1", "a-2", "a-3")} == {next_root}
    for cluster in A_AND_B:
        assert corp_root not in end[cluster].bundle and next_root in end[cluster].bundle
    assert trustmgr("verify").code == 0
    assert "0 changed" in trustmgr("reconcile").out


def test_a_move_is_aborted_only_with_the_configuration_set_back(mesh: Path, workdir: Path) -> None:
    start = _held(workdir)
    original = mesh.read_text()
    moved = original.replace(
        "  iso:\n", "  next:\n    selfSigned: {passphraseEnv: TRUSTMGR_PASSPHRASE}\n  iso:\n"
    ).replace("    provider: corp\n", "    provider: next\n")
    mesh.write_text(moved)
    trustmgr("reconcile")  # the move starts
    trustmgr("reconcile")  # trust-distributed
    refused = trustmgr("rotate", "abort", "--mesh", "a")
    assert refused.code == 2
    assert "set meshes.a.provider back to corp first" in refused.err
    mesh.write_text(moved.replace("    provider: next\n", "    provider: corp\n"))
    stuck = trustmgr("plan")
    assert stuck.code == 2 and "`trustmgr rotate abort --mesh a`" in stuck.err
    assert trustmgr("rotate", "abort", "--mesh", "a").code == 0
    trustmgr("reconcile")
    trustmgr("reconcile")
    assert not _rotating(workdir)
    end = _held(workdir)
    for cluster in A_AND_B:
        assert end[cluster].material.root_cert == start[cluster].material.root_cert


def test_an_abort_after_the_switch_keeps_the_new_root_for_the_soak(workdir: Path) -> None:
    config = workdir / "trustmgr.yaml"
    config.write_text(CONFIG.replace("SOAK", "24h"))
    assert trustmgr("bootstrap").code == 0
    trustmgr("rotate", "start", "--provider", "corp")
    trustmgr("reconcile")  # trust-distributed
    trustmgr("reconcile")  # issuer-switched: the canary signs under the new root
    new = _rotating(workdir)[0]["newRoots"][0]  # type: ignore[index]
    assert trustmgr("rotate", "rollback", "--provider", "corp").code == 0
    trustmgr("reconcile")
    assert trustmgr("rotate", "abort", "--provider", "corp").code == 0
    for _ in range(3):
        trustmgr("reconcile")
    (row,) = _rotating(workdir)
    assert row["phase"] == "trust-distributed"
    assert str(row["blocked"]).startswith("aborting: the new root stays trusted until ")
    assert all(new in h.bundle for c, h in _held(workdir).items() if c in A_AND_B)
    cfg = config_mod.load(config)
    later = datetime.now(UTC) + timedelta(hours=25)
    for _ in range(3):
        with Workspace.build(cfg, clock=lambda: later) as ws:
            apply(ws)
    assert not _rotating(workdir)
    assert all(new not in h.bundle for h in _held(workdir).values())


def test_one_rotation_at_a_time_where_bundles_are_shared(mesh: Path, workdir: Path) -> None:
    """Two roots retiring from one bundle cannot both sit at its ends, where istiod
    before 1.30 needs a removed root: a second rotation there waits its turn."""
    assert trustmgr("rotate", "start", "--provider", "corp").code == 0
    second = trustmgr("rotate", "start", "--provider", "partner")  # b federates with a
    assert second.code == 2
    assert "the rotation of provider corp (prepared) shares trust bundles" in second.err
    assert trustmgr("rotate", "start", "--provider", "iso").code == 0  # c shares nothing
    for _ in range(8):
        trustmgr("reconcile")
    assert not _rotating(workdir)
    assert trustmgr("rotate", "start", "--provider", "partner").code == 0
