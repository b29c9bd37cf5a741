"""Agent mode on directory targets: each agent-mode cluster's key is made by its
agent, the central run publishes signed desired documents and signs the CSRs
of self-signed meshes; replayed, tampered and foreign documents are refused."""

from __future__ import annotations

import base64
import json
import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.agent_reports import payload, rewrite
from tests.conftest import snapshot, trustmgr
from trustmgr.bundles import TrustBundle, fingerprint, load_certificates
from trustmgr.pki import CACERTS_FILES, CACerts, istiod_problems

CONFIG = """\
stateStore: {file: {path: state}}
rotation: {soak: 0s, canary: 1}
providers:
  corp:
    selfSigned: {passphraseEnv: TRUSTMGR_PASSPHRASE}
  partner:
    selfSigned: {passphraseEnv: TRUSTMGR_PASSPHRASE}
meshes:
  a:
    trustDomain: a.example
    provider: corp
    clusters:
      a-1: {directory: {path: out/a-1}, istio: {multiRoot: true}}
      a-2: {directory: {path: out/a-2}, istio: {multiRoot: true}, mode: agent}
      a-3: {directory: {path: out/a-3}, istio: {multiRoot: true}, mode: agent}
  b:
    trustDomain: b.example
    provider: partner
    clusters:
      b-1: {directory: {path: out/b-1}, istio: {multiRoot: true}, mode: agent}
FEDERATIONS"""
AGENTS = ("a-2", "a-3", "b-1")
FEDERATED = "federations:\n  - meshes: [a, b]\n"


def _agent_config(workdir: Path, cluster: str) -> Path:
    path = workdir / f"agent-{cluster}.yaml"
    path.write_text(
        f"cluster: {cluster}\npublisherKeyFile: publisher.pem\n"
        f"directory: {{path: out/{cluster}}}\nistio: {{multiRoot: true}}\n"
    )
    return path


def _agent(workdir: Path, cluster: str) -> tuple[int, str]:
    run = trustmgr("agent", "run", "--once", "-c", str(_agent_config(workdir, cluster)))
    return run.code, run.err


def _held(workdir: Path, cluster: str) -> CACerts | None:
    base = workdir / "out" / cluster
    if not (base / "ca-cert.pem").exists():
        return None
    return CACerts.from_files({n: (base / n).read_bytes() for n in CACERTS_FILES})


def _converge(workdir: Path, rounds: int = 4) -> None:
    for _ in range(rounds):
        run = trustmgr("reconcile")
        assert run.code == 0, run.err
        for cluster in AGENTS:
            code, err = _agent(workdir, cluster)
            assert code == 0, err


@pytest.fixture
def fleet(workdir: Path) -> Path:
    (workdir / "trustmgr.yaml").write_text(CONFIG.replace("FEDERATIONS", FEDERATED))
    run = trustmgr("agent", "publisher-key", "--out", "publisher.pem")
    assert run.code == 0, run.err
    _converge(workdir)
    return workdir


def test_a_mixed_fleet_bootstraps_each_agent_making_its_own_key(
    fleet: Path, caplog: pytest.LogCaptureFixture
) -> None:
    now = datetime.now(UTC)
    for cluster in ("a-1", *AGENTS):
        held = _held(fleet, cluster)
        assert held is not None, cluster
        assert istiod_problems(held, now=now) == [], cluster
    a_root = fingerprint(load_certificates(_held(fleet, "a-1").cert_chain, "c")[-1])  # type: ignore[union-attr]
    b_root = fingerprint(load_certificates(_held(fleet, "b-1").cert_chain, "c")[-1])  # type: ignore[union-attr]
    for cluster in ("a-1", *AGENTS):  # federated: every cluster trusts both roots
        held = _held(fleet, cluster)
        assert held is not None
        assert set(TrustBundle.from_pem(held.root_cert).fingerprints) == {a_root, b_root}
    plan = trustmgr("plan", "-o", "json")
    assert json.loads(plan.out)["pending"] is False, plan.out
    assert trustmgr("verify").code == 0
    status = json.loads(trustmgr("status", "-o", "json").out)
    assert {row["cluster"]: row["drift"] for row in status} == dict.fromkeys(("a-1", *AGENTS), None)
    applied = {row["cluster"]: row["agent"] for row in status}
    assert applied["a-1"] is None  # pushed
    for cluster in AGENTS:  # what each agent reports it applied
        published = json.loads((fleet / "out" / cluster / "trustmgr-desired.json").read_text())
        sequence = json.loads(base64.b64decode(published["payload"]))["sequence"]
        assert applied[cluster]["sequence"] == sequence and applied[cluster]["phase"] is None
    # The central side never saw an agent's key: not in its state, not in what it
    # published, not in what it printed or logged.
    central = b"".join(p.read_bytes() for p in (fleet / "state").rglob("*") if p.is_file())
    central += b"".join((fleet / "out" / c / "trustmgr-desired.json").read_bytes() for c in AGENTS)
    central += b"".join((fleet / "out" / c / "trustmgr-report.json").read_bytes() for c in AGENTS)
    central += (plan.out + plan.err + caplog.text).encode()
    for cluster in AGENTS:
        held = _held(fleet, cluster)
        assert held is not None
        body = b"".join(held.ca_key.splitlines()[1:-1])
        assert body and body not in central.replace(b"\n", b""), cluster
        assert base64.b64encode(held.ca_key) not in central


def test_a_converged_fleet_is_left_alone(fleet: Path) -> None:
    before = snapshot(fleet / "out")
    run = trustmgr("reconcile")
    assert run.code == 0 and "0 changed" in run.out, run.out
    for cluster in AGENTS:
        assert _agent(fleet, cluster)[0] == 0
    after = snapshot(fleet / "out")
    assert after == before  # not even a report is written again


def _tamper(path: Path) -> None:
    envelope = json.loads(path.read_text())
    payload = json.loads(base64.b64decode(envelope["payload"]))
    payload["trustDomain"] = "evil.example"
    envelope["payload"] = base64.b64encode(json.dumps(payload).encode()).decode()
    path.write_text(json.dumps(envelope))


def test_a_tampered_document_is_refused_with_one_line(fleet: Path) -> None:
    before = _held(fleet, "a-2")
    _tamper(fleet / "out/a-2/trustmgr-desired.json")
    code, err = _agent(fleet, "a-2")
    assert code == 2
    assert err.strip().splitlines() == [
        f"trustmgr: cluster a-2 ({Path('out/a-2')}): the desired document's signature does not "
        "verify: refusing a tampered document; nothing was changed"
    ]
    assert _held(fleet, "a-2") == before
    # the central run sees the damage and publishes again; the agent then accepts it
    plan = json.loads(trustmgr("plan", "-o", "json").out)
    (row,) = [c for c in plan["clusters"] if c["cluster"] == "a-2"]
    assert row["action"] == "publish" and "does not verify" in row["message"]
    _converge(fleet, rounds=1)
    assert _agent(fleet, "a-2")[0] == 0


def test_a_replayed_document_is_refused(fleet: Path) -> None:
    old = (fleet / "out/b-1/trustmgr-desired.json").read_bytes()
    # un-federate: b's bundle loses a's root, a new document is published and applied
    (fleet / "trustmgr.yaml").write_text(CONFIG.replace("FEDERATIONS", ""))
    _converge(fleet, rounds=2)
    held = _held(fleet, "b-1")
    assert held is not None and len(TrustBundle.from_pem(held.root_cert)) == 1
    (fleet / "out/b-1/trustmgr-desired.json").write_bytes(old)
    code, err = _agent(fleet, "b-1")
    assert code == 2
    assert "refusing a replayed document; nothing was changed" in err
    assert len(err.strip().splitlines()) == 1
    assert _held(fleet, "b-1") == held  # still trusts b alone
    # the report says why; the next publication goes past the applied sequence
    report = payload((fleet / "out/b-1/trustmgr-report.json").read_bytes())
    assert "replayed" in report["error"]
    _converge(fleet, rounds=1)
    assert _held(fleet, "b-1") == held


def test_a_document_for_another_cluster_or_key_is_refused(fleet: Path) -> None:
    (fleet / "out/a-3/trustmgr-desired.json").write_bytes(
        (fleet / "out/a-2/trustmgr-desired.json").read_bytes()
    )
    code, err = _agent(fleet, "a-3")
    assert code == 2 and "is for cluster a-2, this agent is a-3: refusing it" in err
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from trustmgr.agent.document import public_key_pem

    other = public_key_pem(Ed25519PrivateKey.generate().public_key())
    (fleet / "publisher.pem").write_bytes(other)
    code, err = _agent(fleet, "a-2")
    assert code == 2 and "this agent trusts" in err and "refusing it" in err


def test_the_central_run_refuses_to_sign_a_csr_for_another_trust_domain(fleet: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    from trustmgr.pki import cluster_ca_request
    from trustmgr.providers.keys import KeyAlgorithm

    # a-2's key made unusable: the agent must issue again, and publishes a CSR...
    hostile = cluster_ca_request("b.example", cluster="a-2", algorithm=KeyAlgorithm.ECDSA_P256)

    def ask_for_b(report: dict[str, Any]) -> None:  # a hostile agent: its own key signs
        report["csr"] = hostile.csr.public_bytes(serialization.Encoding.PEM).decode()
        report["problems"] = ["ca-key.pem does not match ca-cert.pem"]

    rewrite(fleet / "out/a-2", ask_for_b)
    published = (fleet / "out/a-2/trustmgr-desired.json").read_bytes()
    run = trustmgr("reconcile", "-o", "json")
    assert run.code == 0, run.err  # the other clusters are served; nothing signed for a-2
    rows = {c["cluster"]: c for c in json.loads(run.out)["clusters"]}
    assert (rows["a-2"]["action"], rows["a-2"]["reason"]) == ("await-agent", "CSRRefused")
    assert rows["a-2"]["message"] == (
        "the agent's CSR names ['spiffe://b.example'], not exactly spiffe://a.example; "
        "not signed: the agent makes a new one"
    )
    assert (fleet / "out/a-2/trustmgr-desired.json").read_bytes() == published
    assert _agent(fleet, "a-2")[0] == 0  # the agent reports what it really holds
    assert json.loads(trustmgr("plan", "-o", "json").out)["pending"] is False


def test_a_report_carrying_a_private_key_is_not_read(fleet: Path) -> None:
    key = (fleet / "out/a-3/ca-key.pem").read_text()
    rewrite(fleet / "out/a-3", lambda report: report.update(error=key))
    run = trustmgr("status", "-o", "json")
    rows = {row["cluster"]: row for row in json.loads(run.out)}
    assert "holds a private key; refusing to read it" in rows["a-3"]["drift"]
    assert "PRIVATE KEY" not in run.out + run.err


def test_an_agent_stopped_after_making_its_key_reuses_it(
    fleet: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from trustmgr.agent import exchange
    from trustmgr.errors import TargetError

    (fleet / "out/a-2/ca-key.pem").unlink()  # lost: the agent must issue again
    calls = []

    def lost(self: exchange.DirectoryExchange, data: bytes) -> None:
        calls.append(data)
        raise TargetError("cluster a-2: the report could not be written")

    with monkeypatch.context() as m:
        m.setattr(exchange.DirectoryExchange, "write_report", lost)
        assert _agent(fleet, "a-2")[0] == 1
    local = json.loads((fleet / "out/a-2/.trustmgr-agent.json").read_text())
    assert (
        local["pendingCsr"] and (fleet / "out/a-2/.trustmgr-agent.json").stat().st_mode & 0o077 == 0
    )
    assert _agent(fleet, "a-2")[0] == 0
    report = payload((fleet / "out/a-2/trustmgr-report.json").read_bytes())
    assert report["csr"] == local["pendingCsr"]  # the same key, not a second one
    _converge(fleet, rounds=1)
    held = _held(fleet, "a-2")
    assert held is not None and istiod_problems(held, now=datetime.now(UTC)) == []
    assert json.loads((fleet / "out/a-2/.trustmgr-agent.json").read_text())["pendingKey"] == ""


def _phase(workdir: Path) -> str | None:
    rows = json.loads(trustmgr("rotate", "status", "-o", "json").out)
    return str(rows[0]["phase"]) if rows else None


def test_a_mixed_fleet_rotates_a_root_with_agents_gating_each_phase(fleet: Path) -> None:
    old = fingerprint(load_certificates(_held(fleet, "a-2").cert_chain, "c")[-1])  # type: ignore[union-attr]
    assert trustmgr("rotate", "start", "--provider", "corp").code == 0
    seen = []
    previous = {c: _held(fleet, c) for c in ("a-1", *AGENTS)}
    for _ in range(20):
        phase = _phase(fleet)
        if phase is None:
            break
        seen.append(phase)
        assert trustmgr("reconcile").code == 0
        for cluster in AGENTS:
            assert _agent(fleet, cluster)[0] == 0
            # after every write, in any cluster: hot-reloadable, and trust before use
            now = {c: _held(fleet, c) for c in ("a-1", *AGENTS)}
            for c, held in now.items():
                assert held is not None
                assert istiod_problems(held, now=datetime.now(UTC)) == [], c
                before = previous[c]
                assert before is not None
                assert before.root_cert in held.root_cert or held.root_cert in before.root_cert, c
            for held in now.values():
                assert held is not None
                root = fingerprint(load_certificates(held.cert_chain, "c")[-1])
                for peer in now.values():
                    assert (
                        peer is not None
                        and root in TrustBundle.from_pem(peer.root_cert).fingerprints
                    )
            previous = now
    assert _phase(fleet) is None
    assert "trust-distributed" in seen and "issuer-switched" in seen and "old-removed" in seen
    new_roots = {
        fingerprint(load_certificates(_held(fleet, c).cert_chain, "c")[-1])  # type: ignore[union-attr]
        for c in ("a-1", "a-2", "a-3")
    }
    assert len(new_roots) == 1 and old not in new_roots
    for c in ("a-1", *AGENTS):
        held = _held(fleet, c)
        assert held is not None and old not in TrustBundle.from_pem(held.root_cert).fingerprints
    _converge(fleet, rounds=1)  # the documents drop the finished rotation's phase
    assert json.loads(trustmgr("plan", "-o", "json").out)["pending"] is False


def test_a_phase_waits_for_an_agent_that_has_not_acted(fleet: Path) -> None:
    assert trustmgr("rotate", "start", "--provider", "corp").code == 0
    for _ in range(3):
        assert trustmgr("reconcile").code == 0  # no agent runs
    assert _phase(fleet) == "prepared"  # published, but no agent applied it: no advance
    plan = json.loads(trustmgr("plan", "-o", "json").out)
    waiting = {c["cluster"] for c in plan["clusters"] if c["action"] == "await-agent"}
    assert waiting == {"a-2", "a-3"}  # b-1 trusts the old root, which stays: nothing new for it yet
    assert plan["pending"] is False  # nothing for apply to do meanwhile


def test_agent_logs_and_output_hold_no_key(fleet: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="trustmgr")
    (fleet / "out/a-3/ca-key.pem").unlink()
    for _ in range(2):
        trustmgr("reconcile")
        code, err = _agent(fleet, "a-3")
        assert code == 0, err
        assert "PRIVATE KEY" not in err
    assert "PRIVATE KEY" not in caplog.text


def test_the_plan_for_agents_is_what_reconcile_does(fleet: Path) -> None:
    (fleet / "trustmgr.yaml").write_text(CONFIG.replace("FEDERATIONS", ""))
    planned = json.loads(trustmgr("plan", "-o", "json").out)
    changes = {c["cluster"]: c["action"] for c in planned["clusters"] if c["action"] != "none"}
    assert changes == {"a-1": "update-bundle", "a-2": "publish", "a-3": "publish", "b-1": "publish"}
    run = trustmgr("reconcile", "-o", "json")
    assert run.code == 0, run.err
    done = {c["cluster"]: c["action"] for c in json.loads(run.out)["clusters"]}
    assert {c: a for c, a in done.items() if a != "none"} == changes
    after = json.loads(trustmgr("plan", "-o", "json").out)
    assert {
        c["cluster"]: c["action"] for c in after["clusters"] if c["action"] != "none"
    } == dict.fromkeys(AGENTS, "await-agent")


def test_a_malformed_report_fails_its_cluster_only(fleet: Path) -> None:
    bad = "-----BEGIN CERTIFICATE REQUEST-----\nnot base64\n-----END CERTIFICATE REQUEST-----\n"
    rewrite(fleet / "out/a-2", lambda report: report.update(csr=bad))
    (fleet / "trustmgr.yaml").write_text(CONFIG.replace("FEDERATIONS", ""))
    run = trustmgr("reconcile", "-o", "json")
    assert run.code == 0, run.err
    rows = {c["cluster"]: c for c in json.loads(run.out)["clusters"]}
    assert rows["a-3"]["action"] == rows["b-1"]["action"] == "publish"
    plan = {c["cluster"]: c for c in json.loads(trustmgr("plan", "-o", "json").out)["clusters"]}
    assert plan["a-2"]["action"] == "await-agent"
    assert plan["a-2"]["reason"] == "ReportUnreadable"
    assert "the agent's CSR is not a PEM CSR" in plan["a-2"]["message"]
    assert _agent(fleet, "a-2")[0] == 0  # the agent writes its report again
    assert json.loads(trustmgr("plan", "-o", "json").out)["pending"] is False


def test_an_agent_replaces_cacerts_it_did_not_write_only_when_adopting(fleet: Path) -> None:
    base = fleet / "out/a-3"
    held = _held(fleet, "a-3")
    assert held is not None
    (base / "..data").unlink()
    for name, data in held.files().items():  # plain files, as Istio's tools make them
        (base / name).unlink()
        (base / name).write_bytes(data)
        (base / name).chmod(0o600)
    code, err = _agent(fleet, "a-3")
    assert code == 1
    assert err.strip().endswith(
        "to replace it, keeping the previous one for rollback, set adopt: true in the agent's "
        "configuration"
    )
    assert (base / "ca-cert.pem").read_bytes() == held.ca_cert and not (
        base / "ca-cert.pem"
    ).is_symlink()
    config = _agent_config(fleet, "a-3")
    config.write_text(config.read_text() + "adopt: true\n")
    assert trustmgr("agent", "run", "--once", "-c", str(config)).code == 0
    trustmgr("reconcile")
    assert trustmgr("agent", "run", "--once", "-c", str(config)).code == 0
    adopted = _held(fleet, "a-3")
    assert adopted is not None and adopted.ca_key != held.ca_key
    assert (base / "ca-cert.pem").is_symlink() and (base / "..previous").exists()


def test_a_looping_agent_survives_a_failing_pass_and_stops_on_the_event(
    fleet: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    from trustmgr.agent import config as agent_config
    from trustmgr.agent_run import Agent, run_forever

    agent = Agent.build(
        agent_config.load(_agent_config(fleet, "a-2")), clock=lambda: datetime.now(UTC)
    )
    stop = threading.Event()
    passes = []

    def once() -> None:
        passes.append(1)
        if len(passes) == 1:
            raise RuntimeError("a bug")
        stop.set()

    monkeypatch.setattr(agent, "run_once", once)
    agent.config = agent.config.model_copy(
        update={"interval": timedelta(0), "jitter": timedelta(0)}
    )
    run_forever(agent, stop)
    agent.close()
    assert len(passes) == 2


def test_the_trust_matrix_says_which_agents_do_not_act_on_it_yet(fleet: Path) -> None:
    (fleet / "trustmgr.yaml").write_text(CONFIG.replace("FEDERATIONS", ""))
    assert trustmgr("reconcile").code == 0  # published; a-1, pushed, already changed
    matrix = trustmgr("trust", "matrix")
    assert matrix.code == 0, matrix.err
    lagging = [line for line in matrix.out.splitlines() if "does not act on this yet" in line]
    assert lagging == [
        f"cluster {c} does not act on this yet: its agent reports root-cert.pem holds 1 root(s) "
        "no federation allows"
        for c in AGENTS
    ]
    _converge(fleet, rounds=1)
    assert "does not act on this yet" not in trustmgr("trust", "matrix").out


def test_agents_renew_by_themselves_and_the_daemon_counts_who_it_waits_for(fleet: Path) -> None:
    from prometheus_client import generate_latest

    from trustmgr import config as config_mod
    from trustmgr.agent import config as agent_config
    from trustmgr.agent_run import Agent
    from trustmgr.daemon import Daemon
    from trustmgr.engine import Workspace

    config = config_mod.load(fleet / "trustmgr.yaml")
    now = [datetime.now(UTC)]
    daemon = Daemon(
        config,
        clock=lambda: now[0],
        workspace=lambda: Workspace.build(config, clock=lambda: now[0]),
    )

    def metric(name: str) -> str:
        text = generate_latest(daemon.metrics.registry).decode()
        return "\n".join(line for line in text.splitlines() if line.startswith(name))

    def agents() -> None:
        for cluster in AGENTS:
            agent = Agent.build(
                agent_config.load(_agent_config(fleet, cluster)), clock=lambda: now[0]
            )
            try:
                assert agent.run_once().ok
            finally:
                agent.close()

    quiet = daemon.run_pass()
    assert quiet is not None and not quiet.changed
    assert metric("trustmgr_clusters_awaiting_agent") == "trustmgr_clusters_awaiting_agent 0.0"
    before = {c: _held(fleet, c) for c in AGENTS}
    now[0] += timedelta(days=21)  # inside renewBefore, and past half the documents' life
    refreshed = daemon.run_pass()  # a-1 renewed; the agents' documents published again
    assert refreshed is not None
    assert {o.cluster: o.action.value for o in refreshed.outcomes if o.action.value != "none"} == {
        "a-1": "renew",
        **dict.fromkeys(AGENTS, "publish"),
    }
    waiting = daemon.run_pass()  # the agents have to make their CSRs first
    assert waiting is not None
    assert {o.cluster: o.action.value for o in waiting.outcomes if o.action.value != "none"} == {
        **dict.fromkeys(AGENTS, "await-agent"),
    }
    assert metric("trustmgr_clusters_awaiting_agent") == "trustmgr_clusters_awaiting_agent 3.0"
    agents()  # CSRs published
    signed = daemon.run_pass()
    assert signed is not None and {
        o.action.value for o in signed.outcomes if o.cluster in AGENTS
    } == {"sign"}
    agents()  # renewed CAs written
    done = daemon.run_pass()
    assert done is not None and not done.changed
    assert metric("trustmgr_clusters_awaiting_agent") == "trustmgr_clusters_awaiting_agent 0.0"
    assert 'trustmgr_cluster_changes_total{action="sign"} 3.0' in metric(
        "trustmgr_cluster_changes_total"
    )
    assert "await-agent" not in metric("trustmgr_cluster_changes_total")
    for cluster in AGENTS:
        held, old = _held(fleet, cluster), before[cluster]
        assert held is not None and old is not None
        new_ca = load_certificates(held.ca_cert, "ca")[0]
        assert (
            new_ca.not_valid_after_utc > load_certificates(old.ca_cert, "ca")[0].not_valid_after_utc
        )
        assert held.ca_key != old.ca_key  # a new key, made by the agent


class _Died(BaseException):
    """A process killed outright: nothing after it runs, nothing catches it."""


def test_an_agent_killed_at_any_write_leaves_a_whole_cacerts_and_finishes_next_time(
    fleet: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from trustmgr.agent import config as agent_config
    from trustmgr.agent.exchange import DirectoryExchange, DirectoryLocalStore
    from trustmgr.agent_run import Agent
    from trustmgr.targets.directory import DirectoryTarget

    writes = [
        (DirectoryLocalStore, "save"),
        (DirectoryTarget, "write"),
        (DirectoryExchange, "write_report"),
    ]
    config = fleet / "trustmgr.yaml"
    algorithms = ["ECDSA_P384", "ECDSA_P256"]
    for die_at in range(8):  # every write of the two passes a new CA takes
        algorithm = algorithms[die_at % 2]
        config.write_text(
            CONFIG.replace("FEDERATIONS", FEDERATED)
            + f"intermediates: {{keyAlgorithm: {algorithm}}}\n"
        )
        assert trustmgr("reconcile").code == 0  # publishes: a-2 must issue a CA of the new kind
        before = _held(fleet, "a-2")
        count = [0]
        with monkeypatch.context() as m:
            for cls, name in writes:
                original = getattr(cls, name)

                def dying(
                    self: object,
                    *args: object,
                    _original: object = original,
                    _count: list[int] = count,
                    _at: int = die_at,
                    **kwargs: object,
                ) -> None:
                    if _count[0] == _at:
                        raise _Died
                    _count[0] += 1
                    _original(self, *args, **kwargs)  # type: ignore[operator]

                m.setattr(cls, name, dying)
            died = False
            for _ in range(2):  # agent pass, central signs, agent pass
                agent = Agent.build(
                    agent_config.load(_agent_config(fleet, "a-2")), clock=lambda: datetime.now(UTC)
                )
                try:
                    agent.run_once()
                except _Died:
                    died = True
                    break
                finally:
                    agent.close()
                assert trustmgr("reconcile").code == 0
        assert died == (die_at < 7), die_at  # the two passes make 7 writes
        held = _held(fleet, "a-2")
        assert held is not None and istiod_problems(held, now=datetime.now(UTC)) == [], die_at
        assert held == before or die_at >= 5, die_at  # cacerts changes at the fifth write only
        assert (fleet / "out/a-2/.trustmgr-agent.json").stat().st_mode & 0o077 == 0
        for _ in range(3):  # the next passes finish only what was left
            assert _agent(fleet, "a-2")[0] == 0
            assert trustmgr("reconcile").code == 0
        held = _held(fleet, "a-2")
        assert held is not None and istiod_problems(held, now=datetime.now(UTC)) == []
        from trustmgr.pki import load_private_key
        from trustmgr.providers.keys import key_algorithm_of

        assert str(key_algorithm_of(load_private_key(held.ca_key, "key"))) == algorithm, die_at
        plan = json.loads(trustmgr("plan", "-o", "json").out)
        assert {c["cluster"]: c["action"] for c in plan["clusters"]}["a-2"] == "none", (
            die_at,
            died,
        )
        assert json.loads((fleet / "out/a-2/.trustmgr-agent.json").read_text())["pendingKey"] == ""


def test_a_mesh_of_agents_only_keeps_the_root_its_first_documents_name(workdir: Path) -> None:
    (workdir / "trustmgr.yaml").write_text(
        "stateStore: {file: {path: state}}\n"
        "providers:\n  corp:\n    selfSigned: {passphraseEnv: TRUSTMGR_PASSPHRASE}\n"
        "meshes:\n  a:\n    trustDomain: a.example\n    provider: corp\n    clusters:\n"
        "      a-2: {directory: {path: out/a-2}, mode: agent}\n"
    )
    plan = json.loads(trustmgr("plan", "-o", "json").out)
    assert [p["provider"] for p in plan["providers"] if p["createRoot"]] == ["corp"]
    assert trustmgr("agent", "publisher-key", "--out", "publisher.pem").code == 0
    run = trustmgr("reconcile")
    assert run.code == 0 and "created root of provider corp" in run.err + run.out, run.err
    published = json.loads((workdir / "out/a-2/trustmgr-desired.json").read_text())
    document = json.loads(base64.b64decode(published["payload"]))
    (root,) = load_certificates(document["bundle"].encode(), "bundle")
    assert (workdir / "state/providers/corp/root.pem").exists()
    for _ in range(2):
        assert _agent(workdir, "a-2")[0] == 0
        assert trustmgr("reconcile").code == 0
    held = _held(workdir, "a-2")
    assert held is not None and istiod_problems(held, now=datetime.now(UTC)) == []
    assert fingerprint(load_certificates(held.cert_chain, "c")[-1]) == fingerprint(root)


def test_a_pending_csr_the_configuration_no_longer_wants_is_replaced(fleet: Path) -> None:
    (fleet / "out/a-2/ca-key.pem").unlink()  # a-2 must issue again
    assert _agent(fleet, "a-2")[0] == 0  # ...and publishes a P-256 CSR
    (fleet / "trustmgr.yaml").write_text(
        CONFIG.replace("FEDERATIONS", FEDERATED) + "intermediates: {keyAlgorithm: ECDSA_P384}\n"
    )
    plan = {c["cluster"]: c for c in json.loads(trustmgr("plan", "-o", "json").out)["clusters"]}
    assert plan["a-2"]["action"] == "publish"  # the new algorithm, not a signature of the old CSR
    for _ in range(3):
        assert trustmgr("reconcile").code == 0
        assert _agent(fleet, "a-2")[0] == 0
    from trustmgr.pki import load_private_key
    from trustmgr.providers.keys import key_algorithm_of

    held = _held(fleet, "a-2")
    assert held is not None
    assert str(key_algorithm_of(load_private_key(held.ca_key, "key"))) == "ECDSA_P384"


def test_a_document_lost_with_the_report_that_acknowledged_it_is_published_past(
    fleet: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from trustmgr.agent import exchange
    from trustmgr.errors import TargetError

    (fleet / "trustmgr.yaml").write_text(CONFIG.replace("FEDERATIONS", ""))
    assert trustmgr("reconcile").code == 0

    def lost(self: exchange.DirectoryExchange, data: bytes) -> None:
        raise TargetError("cluster b-1: the report could not be written")

    with monkeypatch.context() as m:  # b-1 applies the document; its report is lost
        m.setattr(exchange.DirectoryExchange, "write_report", lost)
        assert _agent(fleet, "b-1")[0] == 1
    (fleet / "out/b-1/trustmgr-desired.json").unlink()  # and the document goes too
    (fleet / "trustmgr.yaml").write_text(CONFIG.replace("FEDERATIONS", FEDERATED))
    _converge(fleet, rounds=2)  # the new document is numbered past the one applied
    held = _held(fleet, "b-1")
    assert held is not None and len(TrustBundle.from_pem(held.root_cert)) == 2
    assert json.loads(trustmgr("plan", "-o", "json").out)["pending"] is False


def test_an_answer_under_a_root_rolled_back_from_is_not_used(fleet: Path) -> None:
    assert trustmgr("rotate", "start", "--provider", "corp").code == 0
    for _ in range(6):  # until the switch: a-1 (the canary, pushed) is under the new root
        if _phase(fleet) == "issuer-switched":
            break
        _converge(fleet, rounds=1)
    _converge(fleet, rounds=1)  # the canary converged: the agents' turn
    (fleet / "out/a-2/ca-key.pem").unlink()
    assert _agent(fleet, "a-2")[0] == 0  # CSR published
    assert trustmgr("reconcile").code == 0  # signed under the new root, not yet applied
    published = json.loads((fleet / "out/a-2/trustmgr-desired.json").read_text())
    assert json.loads(base64.b64decode(published["payload"]))["signed"] is not None
    assert trustmgr("rotate", "rollback", "--provider", "corp").code == 0
    for _ in range(4):
        _converge(fleet, rounds=1)
    held = _held(fleet, "a-2")
    assert held is not None and istiod_problems(held, now=datetime.now(UTC)) == []
    a1 = _held(fleet, "a-1")
    assert a1 is not None
    root = fingerprint(load_certificates(held.cert_chain, "c")[-1])
    assert root == fingerprint(load_certificates(a1.cert_chain, "c")[-1])  # both back on the old
    plan = json.loads(trustmgr("plan", "-o", "json").out)
    assert {c["cluster"]: c["action"] for c in plan["clusters"]}["a-2"] == "none"


def test_a_report_signed_by_another_key_gets_nothing_signed(fleet: Path) -> None:
    """Whoever can write a cluster's report, but is not its agent, cannot get a CA
    for a key of theirs, nor stand in for the agent at a rotation's gate."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from tests.agent_reports import signed
    from trustmgr.pki import cluster_ca_request
    from trustmgr.providers.keys import KeyAlgorithm

    report = payload((fleet / "out/a-2/trustmgr-report.json").read_bytes())
    theirs = cluster_ca_request("a.example", cluster="a-2", algorithm=KeyAlgorithm.ECDSA_P256)
    report.update(
        caCert="",
        csr=theirs.csr.public_bytes(serialization.Encoding.PEM).decode(),
    )
    outsider = Ed25519PrivateKey.generate()
    (fleet / "out/a-2/trustmgr-report.json").write_bytes(signed(report, outsider))
    published = (fleet / "out/a-2/trustmgr-desired.json").read_bytes()
    run = trustmgr("reconcile", "-o", "json")
    assert run.code == 0, run.err
    row = next(c for c in json.loads(run.out)["clusters"] if c["cluster"] == "a-2")
    assert (row["action"], row["reason"]) == ("await-agent", "ReportUnreadable")
    assert "this cluster's agent is" in row["message"] and "refusing it" in row["message"]
    assert (fleet / "out/a-2/trustmgr-desired.json").read_bytes() == published  # nothing signed
    # another cluster's genuine report, put in a-2's place, does not stand for a-2 either
    (fleet / "out/a-2/trustmgr-report.json").write_bytes(
        (fleet / "out/a-3/trustmgr-report.json").read_bytes()
    )
    status = {r["cluster"]: r for r in json.loads(trustmgr("status", "-o", "json").out)}
    assert "the report is of cluster a-3" in status["a-2"]["drift"]
    assert _agent(fleet, "a-2")[0] == 0  # the agent's own report is trusted again
    assert json.loads(trustmgr("plan", "-o", "json").out)["pending"] is False


def test_the_first_report_s_key_is_trusted_and_agent_key_pins_it(fleet: Path) -> None:
    state = json.loads((fleet / "state/state.json").read_text())
    assert state["agents"].keys() == set(AGENTS)  # recorded at each agent's first report
    identity = trustmgr("agent", "identity", "-c", str(_agent_config(fleet, "a-3")))
    assert identity.code == 0 and identity.out.startswith("-----BEGIN PUBLIC KEY-----")
    assert identity.err.startswith(f"# agent key {state['agents']['a-3'][:16]}… of cluster a-3")
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from trustmgr.agent.document import public_key_pem

    other = public_key_pem(Ed25519PrivateKey.generate().public_key()).decode()
    config = CONFIG.replace("FEDERATIONS", FEDERATED)
    pinned = (
        "a-3: {directory: {path: out/a-3}, istio: {multiRoot: true}, mode: agent, agentKey: KEY}"
    )
    original = "a-3: {directory: {path: out/a-3}, istio: {multiRoot: true}, mode: agent}"
    (fleet / "trustmgr.yaml").write_text(
        config.replace(original, pinned.replace("KEY", json.dumps(other)))
    )
    plan = {c["cluster"]: c for c in json.loads(trustmgr("plan", "-o", "json").out)["clusters"]}
    assert plan["a-3"]["reason"] == "ReportUnreadable"  # pinned to a key its agent does not have
    good = json.dumps(identity.out)
    (fleet / "trustmgr.yaml").write_text(config.replace(original, pinned.replace("KEY", good)))
    assert json.loads(trustmgr("plan", "-o", "json").out)["pending"] is False
    (fleet / "trustmgr.yaml").write_text(
        config.replace(original, pinned.replace("KEY", json.dumps("not a key")))
    )
    run = trustmgr("validate")
    assert run.code == 2 and "agentKey is the agent's public key in PEM" in run.err
    garbage = "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n"
    (fleet / "trustmgr.yaml").write_text(
        config.replace(original, pinned.replace("KEY", json.dumps(garbage)))
    )
    run = trustmgr("validate")
    assert run.code == 2 and "agentKey is the agent's public key in PEM" in run.err


def test_an_agent_reporting_a_ca_under_an_unknown_root_fails_alone(
    fleet: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from trustmgr.pki import CACerts as Material

    other = fleet / "elsewhere"
    other.mkdir()
    (other / "trustmgr.yaml").write_text(
        "stateStore: {file: {path: state}}\n"
        "providers:\n  corp:\n    selfSigned: {passphraseEnv: TRUSTMGR_PASSPHRASE}\n"
        "meshes:\n  a:\n    trustDomain: a.example\n    provider: corp\n    clusters:\n"
        "      x: {directory: {path: out/x}}\n"
    )
    with monkeypatch.context() as m:  # another mesh's CA, under a root corp does not have
        m.chdir(other)
        assert trustmgr("bootstrap").code == 0
    foreign = Material.from_files(
        {
            n: (other / "out/x" / n).read_bytes()
            for n in ("ca-cert.pem", "ca-key.pem", "cert-chain.pem", "root-cert.pem")
        }
    )
    rewrite(
        fleet / "out/a-2",
        lambda report: report.update(
            caCert=foreign.ca_cert.decode(),
            certChain=foreign.cert_chain.decode(),
            rootCert=foreign.root_cert.decode(),
        ),
    )
    published = (fleet / "out/a-2/trustmgr-desired.json").read_bytes()
    (fleet / "trustmgr.yaml").write_text(CONFIG.replace("FEDERATIONS", ""))
    run = trustmgr("reconcile", "-o", "json")
    assert run.code == 1  # a-2 failed; the others were served
    rows = {c["cluster"]: c for c in json.loads(run.out)["clusters"]}
    assert (rows["a-2"]["action"], rows["a-2"]["reason"]) == ("fail", "UnknownRoot")
    assert "which provider corp does not have" in rows["a-2"]["message"]
    assert rows["a-1"]["action"] == "update-bundle" and rows["a-1"]["ok"]
    assert rows["a-3"]["action"] == rows["b-1"]["action"] == "publish"
    assert (fleet / "out/a-2/trustmgr-desired.json").read_bytes() == published


def test_the_document_carries_the_provider_settings_and_the_agent_brings_its_own(
    tmp_path: Path,
) -> None:
    from trustmgr import config as config_mod
    from trustmgr.agent.config import AgentConfig
    from trustmgr.agent_run import Agent
    from trustmgr.planner import signer_for

    central = config_mod.parse(
        "providers:\n  v:\n    vault:\n      address: https://vault.example:8200\n"
        "      mount: pki-a\n      ttl: 2000h\n      timeout: 5s\n"
        "      auth: {appRole: {roleId: central, secretIdEnv: CENTRAL_SECRET}}\n"
        "meshes:\n  a:\n    trustDomain: a.example\n    provider: v\n    clusters:\n"
        "      a-1: {directory: {path: out/a-1}, mode: agent}\n",
        "central.yaml",
    )
    signer = signer_for(central, "v", "")
    # no credentials, nothing of how the central run reaches Vault: that is the agent's
    assert signer.settings == {
        "address": "https://vault.example:8200",
        "mount": "pki-a",
        "ttl": "7200000s",
    }
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from trustmgr.agent.document import public_key_pem

    own = AgentConfig.model_validate(
        {
            "cluster": "a-1",
            "publisherKey": public_key_pem(Ed25519PrivateKey.generate().public_key()).decode(),
            "directory": {"path": str(tmp_path)},
            "providers": {"v": {"vault": {"auth": {"kubernetes": {"role": "cluster-a-1"}}}}},
        }
    )
    agent = Agent.build(own, clock=lambda: datetime.now(UTC))
    from trustmgr.providers.vault import VaultProvider

    provider = agent._provider(signer)
    assert isinstance(provider, VaultProvider)
    settings = provider._config
    assert settings.ttl == timedelta(hours=2000) and settings.mount == "pki-a"
    assert settings.auth.kubernetes is not None and settings.auth.app_role is None


def test_an_expired_document_is_refused_even_when_the_agent_lost_its_record(fleet: Path) -> None:
    from trustmgr.agent import config as agent_config
    from trustmgr.agent.document import DOCUMENT_LIFETIME
    from trustmgr.agent_run import Agent

    old = (fleet / "out/b-1/trustmgr-desired.json").read_bytes()
    (fleet / "trustmgr.yaml").write_text(CONFIG.replace("FEDERATIONS", ""))
    _converge(fleet, rounds=2)
    held = _held(fleet, "b-1")
    identity = json.loads((fleet / "out/b-1/.trustmgr-agent.json").read_text())["identityKey"]
    (fleet / "out/b-1/.trustmgr-agent.json").write_text(
        json.dumps(
            {
                "sequence": 0,
                "digest": "",
                "pendingKey": "",
                "pendingCsr": "",
                "identityKey": identity,
            }
        )
    )  # the agent's record of what it applied is gone: the sequence cannot tell a replay
    (fleet / "out/b-1/trustmgr-desired.json").write_bytes(old)
    later = datetime.now(UTC) + DOCUMENT_LIFETIME + timedelta(hours=1)
    agent = Agent.build(agent_config.load(_agent_config(fleet, "b-1")), clock=lambda: later)
    try:
        outcome = agent.run_once()
    finally:
        agent.close()
    assert outcome.exit_code == 2
    assert "the desired document expired at" in outcome.error
    assert "refusing an old document" in outcome.error
    assert _held(fleet, "b-1") == held  # the federation it ended is not brought back


def test_the_publisher_key_is_replaced_while_agents_trust_both(fleet: Path) -> None:
    old_only = (fleet / "publisher.pem").read_bytes()
    both = trustmgr("agent", "publisher-key", "--next", "--out", "both.pem")
    assert both.code == 0, both.err
    assert (fleet / "both.pem").read_bytes().startswith(old_only)  # the current one first
    assert (fleet / "both.pem").read_bytes().count(b"BEGIN PUBLIC KEY") == 2
    assert trustmgr("agent", "publisher-key", "--next", "--out", "again.pem").code == 0
    assert (fleet / "again.pem").read_bytes() == (fleet / "both.pem").read_bytes()  # made once
    (fleet / "publisher.pem").write_bytes((fleet / "both.pem").read_bytes())  # agents trust both
    _converge(fleet, rounds=1)
    promoted = trustmgr("agent", "publisher-key", "--promote", "--out", "new.pem")
    assert promoted.code == 0, promoted.err
    new_only = (fleet / "new.pem").read_bytes()
    assert new_only == (fleet / "both.pem").read_bytes()[len(old_only) :]
    plan = json.loads(trustmgr("plan", "-o", "json").out)
    rows = {c["cluster"]: c for c in plan["clusters"]}
    for cluster in AGENTS:  # signed with the old key: published again with the new one
        assert rows[cluster]["action"] == "publish"
        assert "is signed by publisher key" in rows[cluster]["message"]
    _converge(fleet, rounds=1)
    (fleet / "publisher.pem").write_bytes(new_only)  # then the new key alone
    _converge(fleet, rounds=1)
    assert json.loads(trustmgr("plan", "-o", "json").out)["pending"] is False
    (fleet / "publisher.pem").write_bytes(old_only)  # an agent left with the old key alone
    code, err = _agent(fleet, "a-2")
    assert code == 2 and "is signed by publisher key" in err and "refusing it" in err
    again = trustmgr("agent", "publisher-key", "--promote")
    assert again.code == 2 and "there is no next publisher key" in again.err


def test_the_example_agent_configuration_is_one_the_agent_reads() -> None:
    from tests.conftest import REPO
    from trustmgr.agent import config as agent_config

    example = agent_config.load(REPO / "examples" / "agent.yaml")
    assert example.cluster == "pay-1" and example.kubernetes is not None
    assert example.kubernetes.in_cluster
    vault = example.providers["vault-payments"].vault
    assert vault is not None and vault.auth.kubernetes is not None
