"""Agent mode end to end: two clusters whose agents make their CA keys in their own
(emulated) clusters and get them signed by a real OpenBao with their cluster's own Kubernetes
auth role (the emulator answers OpenBao's TokenReviews), and the central run publishing their
desired documents; a third, push-mode mesh beside them, not federated.

- meshes ``a`` (cluster ``a1``) and ``b`` (cluster ``b1``), each on its own PKI mount and
  name-constrained intermediate under one organisation root, set up by docs/agent.md's recipe
  (tests/agent_vault.py), both clusters ``mode: agent`` with a Kubernetes target; federated;
- mesh ``c`` (cluster ``c1``): push mode, a directory target, a self-signed provider.

The central run logs in to OpenBao with a token whose policy may only read the two mounts'
issuers (what VaultProvider.roots() reads: LIST <mount>/issuers and GET
<mount>/issuer/<ref>/json): it cannot sign, and need not, as docs/agent.md says. Each agent
reaches its cluster with a kubeconfig presenting its service account's token (standing in for
the pod's in-cluster identity), the same token it logs in to OpenBao with.

The world is built and converged once per module; the tests that change it put it back. The
agent runs in-process, except where what it prints is checked: there it runs as a process of
its own, whose stderr holds its log lines too."""

from __future__ import annotations

import base64
import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tests.agent_reports import payload
from tests.agent_vault import (
    NAMESPACE,
    OTHER,
    SERVICE_ACCOUNT,
    A,
    B,
    Setup,
    doc_policy,
    doc_provider,
    doc_setup,
    sa_token,
)
from tests.conftest import PASSPHRASE, REPO, Run, trustmgr
from tests.envoy_harness import (
    EnvoyListener,
    issue_workload_cert,
    mtls_request,
    require_envoy,
    running,
)
from tests.kube_emulator import KubeEmulator, merge_kubeconfigs
from tests.openbao import OpenBaoServer, root_client, start_openbao
from trustmgr.bundles import TrustBundle, load_certificates
from trustmgr.config import KubernetesTargetConfig
from trustmgr.pki import CACERTS_FILES, CACerts, istiod_problems
from trustmgr.providers.chains import issued_by
from trustmgr.targets.kubeapi import CONFIGMAPS, KubeApi, Request, object_path

AGENT_USER = f"system:serviceaccount:{NAMESPACE}:{SERVICE_ACCOUNT}"
CENTRAL_POLICY = "trustmgr-central-read"
AGENT_ONCE = ("run", "--once")
MESHES = {"a1": A, "b1": B}
"""The agent clusters and the docs/agent.md mesh each belongs to."""
MESH_OF = {"a1": "a", "b1": "b", "c1": "c"}
TRUST_DOMAIN = {"a": "a.example", "b": "b.example", "c": "c.example"}
MAX_ROUNDS = 3
"""A round: the central run, then every agent. Agents of Vault meshes sign themselves, so the
first convergence takes exactly one; converging again after a change may take one more (the
central run sees a refusal, then publishes), and the bound keeps a loop from passing."""

CONFIG = """\
stateStore: {file: {path: state}}
providers:
  vault-mesh-a:
    vault: {address: ADDRESS, mount: pki-mesh-a, auth: {token: {file: central.token}}}
  vault-mesh-b:
    vault: {address: ADDRESS, mount: pki-mesh-b, auth: {token: {file: central.token}}}
  corp-c:
    selfSigned: {passphraseEnv: TRUSTMGR_PASSPHRASE}
meshes:
  a:
    trustDomain: a.example
    provider: vault-mesh-a
    clusters:
      a1: {kubernetes: {kubeconfig: central.kubeconfig, context: a1}, mode: agent}
  b:
    trustDomain: b.example
    provider: vault-mesh-b
    INTERMEDIATES_B
    clusters:
      b1: {kubernetes: {kubeconfig: central.kubeconfig, context: b1}, mode: agent}
  c:
    trustDomain: c.example
    provider: corp-c
    clusters:
      c1: {directory: {path: out/c1}}
federations:
  - meshes: [a, b]
"""


class _Recorder(logging.Handler):
    """Every record of trustmgr's loggers, formatted with its traceback."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@dataclass
class World:
    dir: Path
    setup: Setup
    recorder: _Recorder
    printed: list[str] = field(default_factory=list)
    """Everything the central CLI printed, stdout and stderr, in this module."""
    rounds: int = 0
    """Rounds the first convergence took."""

    def write_config(self, *, key_algorithm_b: str | None = None) -> None:
        text = CONFIG.replace("ADDRESS", self.setup.server.address)
        b = f"intermediates: {{keyAlgorithm: {key_algorithm_b}}}" if key_algorithm_b else ""
        text = text.replace("INTERMEDIATES_B", b)
        (self.dir / "trustmgr.yaml").write_text(text)

    def central(self, *args: str) -> Run:
        """The central CLI in-process, with trustmgr's debug logs on."""
        run = trustmgr("-vv", *args)
        self.printed += [run.out, run.err]
        return run

    def agent(self, cluster: str) -> Run:
        """``trustmgr agent run --once`` of ``cluster``'s agent, in-process."""
        return trustmgr("-vv", "-c", f"agent-{cluster}.yaml", "agent", *AGENT_ONCE)

    def agent_process(self, cluster: str) -> subprocess.CompletedProcess[str]:
        """The same in a process of its own, as in the agent's pod: what it prints, logs
        included, is all there is."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
        return subprocess.run(
            [sys.executable, "-m", "trustmgr", "-c", f"agent-{cluster}.yaml", "agent", *AGENT_ONCE],
            cwd=self.dir,
            env=env,
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )

    def plan(self) -> dict[str, Any]:
        run = self.central("plan", "-o", "json")
        assert run.code == 0, run.err
        plan: dict[str, Any] = json.loads(run.out)
        return plan

    def converged(self) -> bool:
        plan = self.plan()
        return not plan["pending"] and all(c["action"] == "none" for c in plan["clusters"])

    def converge(self) -> int:
        """Rounds of the central run and every agent until the plan has nothing left."""
        for rounds in range(1, MAX_ROUNDS + 1):
            run = self.central("reconcile")
            assert run.code == 0, run.out + run.err
            for cluster in MESHES:
                done = self.agent(cluster)
                assert done.code == 0, done.err
            if self.converged():
                return rounds
        raise AssertionError(f"not converged after {MAX_ROUNDS} rounds: {self.plan()}")

    def emulator(self, cluster: str) -> KubeEmulator:
        return self.setup.clusters[cluster]

    def secret(self, cluster: str) -> dict[str, Any]:
        obj = self.emulator(cluster).get_object("secrets", NAMESPACE, "cacerts")
        assert obj is not None, cluster
        return obj

    def held(self, cluster: str) -> CACerts:
        if cluster == "c1":
            base = self.dir / "out" / "c1"
            return CACerts.from_files({n: (base / n).read_bytes() for n in CACERTS_FILES})
        data = self.secret(cluster)["data"]
        return CACerts.from_files({n: base64.b64decode(data[n]) for n in CACERTS_FILES})

    def configmap(self, cluster: str, name: str) -> dict[str, Any]:
        obj = self.emulator(cluster).get_object("configmaps", NAMESPACE, name)
        assert obj is not None, (cluster, name)
        return obj


def _central_token(server: OpenBaoServer) -> str:
    """A token that may read the issuers of both meshes' mounts and nothing else: the last
    two paths of docs/agent.md's policy, for each mount."""
    rules = [
        line
        for mesh in (A, B)
        for line in doc_policy(mesh).splitlines()
        if "/issuers" in line or "/json" in line
    ]
    assert len(rules) == 4
    with root_client(server) as client:
        client.sys.create_or_update_policy(CENTRAL_POLICY, "\n".join(rules))
        answer = client.auth.token.create(policies=[CENTRAL_POLICY], ttl="1h")
    return str(answer["auth"]["client_token"])


def _agent_config(world: World, cluster: str) -> None:
    """The agent's file: its cluster through a kubeconfig that presents its service account's
    token, the publisher key, and docs/agent.md's provider entry with the token's path."""
    emulator = world.emulator(cluster)
    token_file = sa_token(world.setup, cluster, world.dir)
    kubeconfig = emulator.kubeconfig(cluster, token=token_file.read_text())
    (world.dir / f"agent-{cluster}.kubeconfig").write_text(yaml.safe_dump(kubeconfig))
    mesh = MESHES[cluster]
    vault = doc_provider(mesh)
    vault["auth"]["kubernetes"]["tokenPath"] = str(token_file)
    config = {
        "cluster": cluster,
        "publisherKeyFile": "publisher.pem",
        "kubernetes": {"kubeconfig": f"agent-{cluster}.kubeconfig", "namespace": NAMESPACE},
        "providers": {mesh.provider: {"vault": vault}},
    }
    (world.dir / f"agent-{cluster}.yaml").write_text(yaml.safe_dump(config))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    workdir = tmp_path_factory.mktemp("agent-e2e")
    trustmgr_log = logging.getLogger("trustmgr")
    recorder = _Recorder()
    level = trustmgr_log.level
    # A server of its own: the recipe enables fixed mount paths, which the session server's
    # other users (tests/test_agent_vault_policy.py) enable too.
    with (
        start_openbao(workdir) as server,
        doc_setup(server, workdir) as setup,
        pytest.MonkeyPatch.context() as patch,
    ):
        patch.chdir(workdir)
        patch.setenv("TRUSTMGR_PASSPHRASE", PASSPHRASE)
        trustmgr_log.addHandler(recorder)
        try:
            world = World(workdir, setup, recorder)
            (workdir / "central.token").write_text(_central_token(server))
            (workdir / "central.token").chmod(0o600)
            merged = merge_kubeconfigs(e.kubeconfig(name) for name, e in setup.clusters.items())
            (workdir / "central.kubeconfig").write_text(yaml.safe_dump(merged))
            world.write_config()
            run = world.central("agent", "publisher-key", "--out", "publisher.pem")
            assert run.code == 0, run.err
            for cluster in MESHES:
                _agent_config(world, cluster)
            world.rounds = world.converge()
            yield world
        finally:
            trustmgr_log.removeHandler(recorder)
            trustmgr_log.setLevel(level)


def _serials(server: OpenBaoServer, mount: str) -> set[int]:
    """Serial numbers of every certificate ``mount`` has issued or imported."""
    with root_client(server) as client:
        return {int(s.replace(":", ""), 16) for s in client.list(f"{mount}/certs")["data"]["keys"]}


def test_each_agent_gets_its_ca_signed_with_its_own_role_at_its_first_pass(world: World) -> None:
    # Round 1: every agent writes its cacerts; round 2: the central run records the key
    # each agent signed its first report with, and nothing is left.
    assert world.rounds == 2
    state = json.loads((world.dir / "state/state.json").read_text())
    assert state["agents"].keys() == set(MESHES)
    # The central run's token could not have signed: its policy reads issuers only.
    token = (world.dir / "central.token").read_text()
    for mesh in MESHES.values():
        refused = requests.post(
            f"{world.setup.server.address}/v1/{mesh.mount}/root/sign-intermediate",
            headers={"X-Vault-Token": token},
            json={"csr": "-", "use_csr_values": True},
            timeout=10,
        )
        assert refused.status_code == 403, refused.text
    now = datetime.now(UTC)
    for cluster, mesh in MESHES.items():
        held = world.held(cluster)
        assert istiod_problems(held, now=now) == [], cluster
        chain = load_certificates(held.cert_chain, "cert-chain.pem")
        (ca,) = load_certificates(held.ca_cert, "ca-cert.pem")
        # The cluster CA, under its mesh's constrained intermediate, under the org root.
        assert chain == [ca, world.setup.intermediates[mesh], world.setup.root], cluster
        assert issued_by(ca, world.setup.intermediates[mesh])
        assert TrustBundle.from_pem(held.root_cert).roots == (world.setup.root,)
        # OpenBao signed it on the mesh's mount, and not on the other's.
        assert ca.serial_number in _serials(world.setup.server, mesh.mount), cluster
        assert ca.serial_number not in _serials(world.setup.server, OTHER[mesh].mount), cluster
        emulator = world.emulator(cluster)
        # ... for a token of the cluster's own role: OpenBao asked this cluster's API server.
        reviews = emulator.token_reviews
        assert reviews and all(r.authenticated and r.username == AGENT_USER for r in reviews)
        # The agent alone wrote cacerts; the central run never asked for a Secret there.
        writes = [w for w in emulator.write_log if w.resource == "secrets"]
        assert {(w.name, w.client) for w in writes} >= {("cacerts", AGENT_USER)}
        assert {w.client for w in writes} == {AGENT_USER}, cluster
        central = [r for r in emulator.requests if r.client != AGENT_USER]
        assert central and {r.resource for r in central} == {"configmaps"}, cluster
    c1 = world.held("c1")
    assert istiod_problems(c1, now=now) == []
    assert world.setup.root not in TrustBundle.from_pem(c1.root_cert)
    c_root = load_certificates(c1.cert_chain, "cert-chain.pem")[-1]
    assert c_root in TrustBundle.from_pem(c1.root_cert)
    for cluster in MESHES:
        assert c_root not in TrustBundle.from_pem(world.held(cluster).root_cert)


def _key_forms(key_pem: bytes) -> list[bytes]:
    """A private key as it could turn up in text: the base64 body of its PEM, PKCS#8 and
    SEC1/PKCS#1 alike, joined into one line (line breaks are removed from what is searched),
    each whole PEM base64-encoded (as a Secret's data holds it), and its DER in hex."""
    key = serialization.load_pem_private_key(key_pem, None)
    forms = [base64.b64encode(key_pem)]
    for layout in (
        serialization.PrivateFormat.PKCS8,
        serialization.PrivateFormat.TraditionalOpenSSL,
    ):
        encoded = key.private_bytes(
            serialization.Encoding.PEM, layout, serialization.NoEncryption()
        )
        forms += [b"".join(encoded.strip().splitlines()[1:-1]), base64.b64encode(encoded)]
        der = key.private_bytes(serialization.Encoding.DER, layout, serialization.NoEncryption())
        forms.append(der.hex().encode())
    assert all(len(form) > 100 for form in forms)
    return forms


def test_no_agent_key_reaches_the_central_side(world: World) -> None:
    for args in (("status", "-o", "json"), ("verify",), ("bundle", "export", "--mesh", "a")):
        run = world.central(*args)
        assert run.code == 0, run.out + run.err
    central = b"".join(p.read_bytes() for p in (world.dir / "state").rglob("*") if p.is_file())
    assert central, "the central state store holds nothing: wrong directory?"
    text = "\n".join([*world.printed, *world.recorder.lines])
    assert "published sequence" in text  # the recorder did hear the central run
    for cluster in MESHES:
        for name in ("trustmgr-desired", "trustmgr-report"):
            text += json.dumps(world.configmap(cluster, name))
    assert "PRIVATE KEY" not in text
    haystack = (central + text.encode()).replace(b"\n", b"").replace(b"\\n", b"")
    for cluster in MESHES:
        key = world.held(cluster).ca_key
        forms = _key_forms(key)
        # Where the key is, the search finds it: in the agent's own cacerts Secret.
        assert forms[0] in json.dumps(world.secret(cluster)).encode()
        assert any(form in key.replace(b"\n", b"") for form in forms[1::3])
        for form in forms:
            assert form not in haystack, cluster


# -- real TLS ---------------------------------------------------------------------------------

EXPECTED = {  # (server cluster, client cluster) pairs that must connect
    (s, c)
    for s in MESH_OF
    for c in MESH_OF
    if MESH_OF[s] == MESH_OF[c] or {MESH_OF[s], MESH_OF[c]} == {"a", "b"}
}


@pytest.fixture
def envoy() -> str:
    """Skips the test without Envoy, or fails it under CI."""
    return require_envoy()


@dataclass(frozen=True)
class Workload:
    cluster: str
    directory: Path

    @property
    def chain(self) -> Path:
        return self.directory / "cert-chain.pem"

    @property
    def key(self) -> Path:
        return self.directory / "key.pem"

    @property
    def roots(self) -> Path:
        return self.directory / "root-cert.pem"


def _workload(world: World, cluster: str, spiffe_id: str, directory: Path) -> Workload:
    """A workload certificate from the cacerts the cluster holds, as istiod would issue it:
    the leaf, then cert-chain.pem; root-cert.pem as its trusted roots."""
    held = world.held(cluster)
    (ca,) = load_certificates(held.ca_cert, "ca-cert.pem")
    key = serialization.load_pem_private_key(held.ca_key, None)
    assert isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey)
    issue_workload_cert(
        ca,
        key,
        spiffe_id,
        ca_chain=load_certificates(held.cert_chain, "cert-chain.pem"),
        roots=TrustBundle.from_pem(held.root_cert).roots,
        out_dir=directory,
    )
    return Workload(cluster, directory)


def _prefixes(world: World, cluster: str) -> list[str]:
    """The SAN prefixes istiod gives the cluster's sidecars: its trust domain and the
    trustDomainAliases of trustmgr's meshConfig fragment."""
    run = world.central("federation", "export", "--mesh", MESH_OF[cluster])
    assert run.code == 0, run.err
    mesh_config = yaml.safe_load(run.out)["meshConfig"]
    domains = [mesh_config["trustDomain"], *mesh_config.get("trustDomainAliases", [])]
    return [f"spiffe://{td}/" for td in domains]


@pytest.fixture
def workloads(world: World, tmp_path: Path) -> tuple[dict[str, Workload], dict[str, Workload]]:
    def make(role: str) -> dict[str, Workload]:
        return {
            c: _workload(
                world,
                c,
                f"spiffe://{TRUST_DOMAIN[MESH_OF[c]]}/ns/app/sa/{role}",
                tmp_path / f"{c}-{role}",
            )
            for c in MESH_OF
        }

    return make("server"), make("client")


def test_federated_agents_handshake_and_the_unfederated_mesh_is_kept_out(
    envoy: str, world: World, workloads: tuple[dict[str, Workload], dict[str, Workload]]
) -> None:
    servers, clients = workloads
    prefixes = {c: _prefixes(world, c) for c in MESH_OF}
    assert prefixes["a1"] == ["spiffe://a.example/", "spiffe://b.example/"]
    assert prefixes["c1"] == ["spiffe://c.example/"]
    listeners = {
        c: EnvoyListener.from_workload_dir(w.directory, name=c, san_prefixes=prefixes[c])
        for c, w in servers.items()
    }
    with running(listeners.values()):
        connected = {
            (server, client)
            for server, listener in listeners.items()
            for client, w in clients.items()
            if mtls_request(listener.port, w.chain, w.key, w.roots, prefixes[client]).ok
        }
    assert connected == EXPECTED


def test_a1s_ca_cannot_stand_for_a_b_example_workload_at_b1(
    envoy: str,
    world: World,
    workloads: tuple[dict[str, Workload], dict[str, Workload]],
    tmp_path: Path,
) -> None:
    """b1 trusts the org root a1's CA chains to, and accepts b.example peers; a certificate
    a1's CA minted for b.example is refused all the same: mesh a's intermediate permits
    a.example only, and BoringSSL enforces it."""
    servers, clients = workloads
    forged = _workload(world, "a1", "spiffe://b.example/ns/app/sa/client", tmp_path / "forged")
    prefixes = _prefixes(world, "b1")
    with EnvoyListener.from_workload_dir(
        servers["b1"].directory, name="b1", san_prefixes=prefixes
    ) as listener:
        honest = mtls_request(
            listener.port, clients["a1"].chain, clients["a1"].key, clients["a1"].roots, prefixes
        )
        assert honest.ok, honest.error
        result = mtls_request(listener.port, forged.chain, forged.key, forged.roots, prefixes)
        assert not result.ok
        assert any("permitted subtree violation" in e for e in listener.wait_tls_errors())


# -- refused documents ------------------------------------------------------------------------


def _put_desired(world: World, cluster: str, envelope: str) -> None:
    """The desired ConfigMap made to hold ``envelope``, through the API (the official
    ApiClient, as trustmgr drives it), by someone who may write it but is neither the central
    run nor the agent: a service account of the default namespace."""
    emulator = world.emulator(cluster)
    token = emulator.issue_service_account_token("default", "intruder")
    kubeconfig = world.dir / f"intruder-{cluster}.kubeconfig"
    kubeconfig.write_text(yaml.safe_dump(emulator.kubeconfig(cluster, token=token)))
    api = KubeApi(KubernetesTargetConfig(kubeconfig=str(kubeconfig)))
    path = object_path(CONFIGMAPS, NAMESPACE, "trustmgr-desired")
    try:
        configmap = api.send(
            Request("get", "configmaps", "trustmgr-desired", NAMESPACE), "GET", path
        )
        configmap["data"] = {"desired.json": envelope}
        api.send(
            Request("update", "configmaps", "trustmgr-desired", NAMESPACE), "PUT", path, configmap
        )
    finally:
        api.close()
    writes = [w for w in emulator.write_log if w.resource == "configmaps"]
    assert writes[-1].client == "system:serviceaccount:default:intruder"


def _desired(world: World, cluster: str) -> str:
    value = world.configmap(cluster, "trustmgr-desired")["data"]["desired.json"]
    assert isinstance(value, str)
    return value


def _where(cluster: str) -> str:
    return f"cluster {cluster} (namespace {NAMESPACE}, the current context of agent-{cluster}.kubeconfig)"


def _report_error(world: World, cluster: str) -> str:
    report = payload(world.configmap(cluster, "trustmgr-report")["data"]["report.json"])
    return str(report["error"])


def test_a_tampered_document_is_refused_with_one_line_and_cacerts_untouched(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    version = world.secret("a1")["metadata"]["resourceVersion"]
    envelope = json.loads(_desired(world, "a1"))
    payload = json.loads(base64.b64decode(envelope["payload"]))
    assert payload["trustDomain"] == "a.example"
    payload["trustDomain"] = "b.example"  # the signature is left as it was
    envelope["payload"] = base64.b64encode(json.dumps(payload).encode()).decode()
    _put_desired(world, "a1", json.dumps(envelope))

    refused = world.agent_process("a1")
    line = (
        f"{_where('a1')}: the desired document's signature does not verify: refusing a "
        "tampered document; nothing was changed"
    )
    assert (refused.returncode, refused.stdout) == (2, "")
    assert refused.stderr.splitlines() == [f"trustmgr: {line}"]
    assert world.secret("a1")["metadata"]["resourceVersion"] == version
    assert _report_error(world, "a1") == line
    # The long-running agent logs the same line, once, naming its cluster once.
    from trustmgr.agent.config import load
    from trustmgr.agent_run import Agent

    agent = Agent.build(load(world.dir / "agent-a1.yaml"), clock=lambda: datetime.now(UTC))
    try:
        with caplog.at_level(logging.INFO, logger="trustmgr"):
            assert agent.run_once().exit_code == 2
    finally:
        agent.close()
    logged = [
        (r.levelname, r.getMessage()) for r in caplog.records if r.name.startswith("trustmgr")
    ]
    assert logged == [("WARNING", line)]
    assert world.secret("a1")["metadata"]["resourceVersion"] == version

    # The central run sees it, publishes again, and the agent accepts that: nothing to change.
    (row,) = [c for c in world.plan()["clusters"] if c["cluster"] == "a1"]
    assert row["action"] == "publish" and "does not verify" in row["message"], row
    assert world.converge() <= MAX_ROUNDS
    assert world.secret("a1")["metadata"]["resourceVersion"] == version
    assert _report_error(world, "a1") == ""


def _ca_algorithm(held: CACerts) -> str:
    key = load_certificates(held.ca_cert, "ca-cert.pem")[0].public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    return key.curve.name


def test_a_replayed_document_is_refused_with_one_line_and_cacerts_untouched(
    world: World,
) -> None:
    old = _desired(world, "b1")
    assert _ca_algorithm(world.held("b1")) == "secp256r1"
    try:
        # A new desired state for b1: a P-384 CA, which its agent makes and gets signed.
        world.write_config(key_algorithm_b="ECDSA_P384")
        assert world.converge() <= MAX_ROUNDS
        assert _ca_algorithm(world.held("b1")) == "secp384r1"
        assert istiod_problems(world.held("b1"), now=datetime.now(UTC)) == []
        new = json.loads(base64.b64decode(json.loads(_desired(world, "b1"))["payload"]))
        was = json.loads(base64.b64decode(json.loads(old)["payload"]))
        assert new["sequence"] > was["sequence"]
        version = world.secret("b1")["metadata"]["resourceVersion"]

        # The old document, genuinely signed, put back: acted on, it would bring P-256 back.
        _put_desired(world, "b1", old)
        refused = world.agent_process("b1")
        line = (
            f"{_where('b1')}: the desired document has sequence {was['sequence']}, older than "
            "the applied "
            f"{new['sequence']}: refusing a replayed document; nothing was changed"
        )
        assert (refused.returncode, refused.stdout) == (2, "")
        assert refused.stderr.splitlines() == [f"trustmgr: {line}"]
        assert world.secret("b1")["metadata"]["resourceVersion"] == version
        assert _report_error(world, "b1") == line
        assert _ca_algorithm(world.held("b1")) == "secp384r1"
    finally:
        world.write_config()
    # Back to P-256 centrally: the put-back document says just that, but the agent refuses
    # it all the same, so the central run publishes past the applied sequence.
    (row,) = [c for c in world.plan()["clusters"] if c["cluster"] == "b1"]
    assert row["action"] == "publish", row
    assert f"older than the {new['sequence']} the agent applied" in row["message"]
    assert world.converge() <= MAX_ROUNDS
    assert _ca_algorithm(world.held("b1")) == "secp256r1"
    assert istiod_problems(world.held("b1"), now=datetime.now(UTC)) == []
