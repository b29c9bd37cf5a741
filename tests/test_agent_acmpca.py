"""Agent mode with AWS Private CA: an agent-mode cluster's agent gets its CSR signed
by the private CA itself, with its own AWS identity and the settings the central
run publishes; the central run reads the private CA's certificate for the bundle
and signs only for its push clusters.

Both sides run as a user runs them (``trustmgr reconcile`` and ``trustmgr agent
run --once``, in-process, with one fixed clock), and build their acm-pca client
with trustmgr's own ``build_client`` from the environment of the side running.
Only the network is replaced: AWS, played by ``tests/pca.py``, is attached to
each client built, through botocore's Stubber (the exact requests) or in place
of sending the signed HTTP requests (who signed them, what botocore logs).
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
    load_pem_private_key,
)

from tests.agent_reports import payload
from tests.conftest import Run, trustmgr
from tests.pca import (
    ARN,
    NOW,
    REGION,
    Authority,
    Call,
    PlayedPca,
    StubbedPca,
    WirePca,
    aws_identity,
    idempotency_token,
)
from trustmgr.agent.document import seal, unseal
from trustmgr.bundles import TrustBundle, fingerprint, load_certificates
from trustmgr.config import load as load_config
from trustmgr.engine import Workspace
from trustmgr.pki import CACERTS_FILES, CACerts, cluster_ca_request, istiod_problems, uri_sans
from trustmgr.providers import acmpca
from trustmgr.providers.config import AcmPcaConfig
from trustmgr.providers.keys import KeyAlgorithm

if TYPE_CHECKING:
    from mypy_boto3_acm_pca.client import ACMPCAClient

TRUST_DOMAIN = "payments.example"
SIGNING = "SHA384WITHECDSA"
"""Not the CA's own (SHA256WITHECDSA, from Describe): the agent sends what the document says."""
TEMPLATE = "arn:aws:acm-pca:::template/SubordinateCACertificate_PathLen0_APICSRPassthrough/V1"
CENTRAL_KEY_ID, CENTRAL_SECRET = "AKIACENTRALRUN000001", "central/secret/0000000000000000000000001"
AGENT_KEY_ID, AGENT_SECRET = "AKIAAGENTCLUSTER0001", "agent/secret/00000000000000000000000000001"
DOCS = "docs/providers/acmpca.md"
ISSUANCE = [
    "DescribeCertificateAuthority",
    "GetCertificateAuthorityCertificate",
    "IssueCertificate",
    "GetCertificate",  # the certificate_issued waiter
    "GetCertificate",
]
ROOTS = ["DescribeCertificateAuthority", "GetCertificateAuthorityCertificate"]

CONFIG = f"""\
stateStore: {{file: {{path: state}}}}
providers:
  pca:
    acmPca:
      certificateAuthorityArn: "{ARN}"
      region: {REGION}
      signingAlgorithm: {SIGNING}
      templateArn: "{TEMPLATE}"
meshes:
  payments:
    trustDomain: {TRUST_DOMAIN}
    provider: pca
    clusters:
      push-1: {{directory: {{path: out/push-1}}}}
      agent-1: {{directory: {{path: out/agent-1}}, mode: agent}}
"""
AGENT_CONFIG = """\
cluster: agent-1
publisherKeyFile: publisher.pem
directory: {path: out/agent-1}
providers:
  pca: {acmPca: {maxWait: 10s, maxAttempts: 1}}
"""


BUILD_CLIENT = acmpca.build_client
"""trustmgr's own: each side's client is built by it, from that side's environment."""


class Impostor(Authority):
    """The private CA answering with a certificate for a key of its own choosing."""

    def sign(
        self,
        csr: x509.CertificateSigningRequest,
        *,
        not_after: datetime,
        now: datetime,
        not_before: datetime | None = None,
    ) -> x509.Certificate:
        other = cluster_ca_request(
            TRUST_DOMAIN, cluster="agent-1", algorithm=KeyAlgorithm.ECDSA_P256
        )
        return super().sign(other.csr, not_after=not_after, now=now, not_before=not_before)


@dataclass
class Aws:
    """AWS as each side reaches it. Every acm-pca client trustmgr builds, while
    ``side`` runs, is answered by the private CA as ``authority[side]`` plays it:
    through the Stubber, or (``wire``) in place of sending its signed requests."""

    authority: dict[str, Authority]
    wire: bool = False
    side: str = "central"
    played: list[tuple[str, PlayedPca]] = field(default_factory=list)
    configs: list[tuple[str, AcmPcaConfig]] = field(default_factory=list)
    """The settings each client was built with, by side."""
    closed: list[str] = field(default_factory=list)
    """The side of each client closed."""

    def build(self, name: str, config: AcmPcaConfig) -> ACMPCAClient:
        client = BUILD_CLIENT(name, config)
        self.configs.append((self.side, config))
        side, authority = self.side, self.authority[self.side]
        settings: dict[str, Any] = {"signing": SIGNING, "template": TEMPLATE, "in_progress": False}
        pca: PlayedPca
        if self.wire:
            pca = WirePca(authority, lambda: NOW, **settings)
            pca.attach(client)
        else:
            pca = StubbedPca(client, authority, lambda: NOW, **settings).__enter__()
        self.played.append((side, pca))
        close = client.close

        def closing() -> None:
            self.closed.append(side)
            close()

        client.close = closing  # type: ignore[method-assign]
        return client

    def calls(self, side: str) -> list[Call]:
        return [call for s, pca in self.played if s == side for call in pca.calls]

    def operations(self, side: str) -> list[str]:
        return [call.operation for call in self.calls(side)]

    def finish(self) -> None:
        for _, pca in self.played:
            if isinstance(pca, StubbedPca):
                pca.__exit__(None, None, None)


@dataclass
class Fleet:
    """The central configuration with one push and one agent-mode cluster on
    directory targets, each side run with its own AWS identity."""

    path: Path
    aws: Aws
    monkeypatch: pytest.MonkeyPatch

    def central(self, command: str = "reconcile") -> Run:
        self.aws.side = "central"
        aws_identity(self.monkeypatch, self.path, CENTRAL_KEY_ID, CENTRAL_SECRET)
        return trustmgr(*command.split())

    def agent(self, key_id: str | None = AGENT_KEY_ID, secret: str | None = AGENT_SECRET) -> Run:
        self.aws.side = "agent"
        aws_identity(self.monkeypatch, self.path, key_id, secret)
        return trustmgr("agent", "run", "--once", "-c", "agent.yaml")

    def converge(self, rounds: int = 2) -> None:
        for _ in range(rounds):
            run = self.central()
            assert run.code == 0, run.out + run.err
            run = self.agent()
            assert run.code == 0, run.err

    def held(self, cluster: str) -> CACerts | None:
        base = self.path / "out" / cluster
        if not (base / "ca-cert.pem").exists():
            return None
        return CACerts.from_files({n: (base / n).read_bytes() for n in CACERTS_FILES})

    def document(self) -> dict[str, Any]:
        envelope = json.loads((self.path / "out/agent-1/trustmgr-desired.json").read_text())
        payload = json.loads(base64.b64decode(envelope["payload"]))
        assert isinstance(payload, dict)
        return payload

    def report(self) -> dict[str, Any]:
        report = payload((self.path / "out/agent-1/trustmgr-report.json").read_bytes())
        assert isinstance(report, dict)
        return report

    def agent_files(self) -> bytes:
        """Everything on disk in the agent's cluster but the agent's own record
        (which holds the key it signs its reports with)."""
        return b"".join(
            p.read_bytes()
            for p in sorted((self.path / "out/agent-1").rglob("*"))
            if p.is_file() and p.name != ".trustmgr-agent.json"
        )


@pytest.fixture
def authority() -> Authority:
    return Authority.create(NOW)


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch, authority: Authority) -> Iterator[Aws]:
    played = Aws({"central": authority, "agent": authority})
    monkeypatch.setattr(acmpca, "build_client", played.build)
    yield played
    played.finish()


@pytest.fixture
def fleet(workdir: Path, aws: Aws, monkeypatch: pytest.MonkeyPatch) -> Fleet:
    monkeypatch.setattr("trustmgr.cli.now_utc", lambda: NOW)
    (workdir / "trustmgr.yaml").write_text(CONFIG)
    (workdir / "agent.yaml").write_text(AGENT_CONFIG)
    fleet = Fleet(workdir, aws, monkeypatch)
    run = fleet.central("agent publisher-key --out publisher.pem")
    assert run.code == 0, run.err
    return fleet


def _public(key_pem: bytes) -> bytes:
    key = load_pem_private_key(key_pem, None)
    return key.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def _csr_public(csr: x509.CertificateSigningRequest) -> bytes:
    return csr.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def _lines(run: Run) -> list[str]:
    return run.err.strip().splitlines()


# --- a mixed fleet converges ------------------------------------------------------------------


def test_the_agent_issues_its_ca_through_aws_and_the_central_run_signs_only_for_push(
    fleet: Fleet, authority: Authority
) -> None:
    fleet.converge(rounds=1)

    # The central run: the CA's certificate for the bundle, and push-1's issuance only.
    assert fleet.aws.operations("central") == ISSUANCE
    (central_issue,) = [c for c in fleet.aws.calls("central") if c.operation == "IssueCertificate"]
    push, agent = fleet.held("push-1"), fleet.held("agent-1")
    assert push is not None and agent is not None
    central_csr = x509.load_pem_x509_csr(central_issue.params["Csr"])
    assert _csr_public(central_csr) == _public(push.ca_key)

    # The agent: the exact request, for the key it made and holds.
    assert fleet.aws.operations("agent") == ISSUANCE
    (issue,) = [c for c in fleet.aws.calls("agent") if c.operation == "IssueCertificate"]
    csr = x509.load_pem_x509_csr(issue.params["Csr"])
    assert issue.params == {
        "CertificateAuthorityArn": ARN,
        "Csr": csr.public_bytes(Encoding.PEM),
        "SigningAlgorithm": SIGNING,
        "TemplateArn": TEMPLATE,
        "Validity": {"Type": "ABSOLUTE", "Value": 1932724800},  # NOW + 720h, the mesh's ttl
        "ValidityNotBefore": {"Type": "ABSOLUTE", "Value": 1930132500},  # NOW - 5 minutes
        "IdempotencyToken": idempotency_token(csr),
    }
    assert len(issue.params["IdempotencyToken"]) == 32
    assert int(issue.params["IdempotencyToken"], 16) >= 0
    assert csr.is_signature_valid
    assert _csr_public(csr) == _public(agent.ca_key)
    assert _csr_public(csr) != _public(push.ca_key)
    ca = load_certificates(agent.ca_cert, "ca-cert.pem")[0]
    assert uri_sans(ca) == [f"spiffe://{TRUST_DOMAIN}"]
    # Every call of the agent's is for the CA the document names, with the
    # document's settings and the agent's own options.
    assert all(c.params["CertificateAuthorityArn"] == ARN for c in fleet.aws.calls("agent"))
    assert [config for side, config in fleet.aws.configs if side == "agent"] == [
        AcmPcaConfig(
            certificate_authority_arn=ARN,
            region=REGION,
            signing_algorithm=SIGNING,
            template_arn=TEMPLATE,
            max_wait=timedelta(seconds=10),
            max_attempts=1,
        )
    ]

    # What the central run published for the agent: the settings, no credentials.
    document = fleet.document()
    assert document["signer"] == {
        "kind": "acmPca",
        "provider": "pca",
        "settings": {
            "certificateAuthorityArn": ARN,
            "region": REGION,
            "signingAlgorithm": SIGNING,
            "templateArn": TEMPLATE,
            "retryMode": "standard",
        },
        "generation": "",
    }
    assert document["signingRoots"] == [fingerprint(authority.root)]

    for held in (push, agent):
        assert istiod_problems(held, now=NOW) == []
        chain = load_certificates(held.cert_chain, "cert-chain.pem")
        assert chain[1:] == [authority.ca, authority.root]
        assert TrustBundle.from_pem(held.root_cert).fingerprints == (fingerprint(authority.root),)

    # Converged: the central run reads the CA's certificate and nothing else; the
    # agent has nothing to do and builds no client.
    fleet.converge(rounds=1)
    assert fleet.aws.operations("central") == ISSUANCE + ROOTS
    assert fleet.aws.operations("agent") == ISSUANCE
    assert fleet.held("agent-1") == agent and fleet.held("push-1") == push
    plan = fleet.central("plan -o json")
    assert json.loads(plan.out)["pending"] is False, plan.out
    assert fleet.central("verify").code == 0
    status = json.loads(fleet.central("status -o json").out)
    assert {row["cluster"]: row["drift"] for row in status} == {"push-1": None, "agent-1": None}


def test_each_side_closes_the_aws_client_it_built(fleet: Fleet) -> None:
    """Each pass, central or agent, builds its client: it is closed when the pass
    ends, not left open, with its connections, until garbage collection."""
    fleet.converge(rounds=1)
    assert [side for side, _ in fleet.aws.played] == ["central", "agent"]
    assert fleet.aws.closed == ["central", "agent"]


# --- whose identity signs -------------------------------------------------------------------


def test_the_agent_signs_its_requests_with_its_own_aws_identity(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    fleet.aws.wire = True
    run = fleet.central()
    assert run.code == 0, run.err
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")  # the agent's: the document's region wins
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    run = fleet.agent()
    assert run.code == 0, run.err
    fleet.converge(rounds=1)

    agent_calls, central_calls = fleet.aws.calls("agent"), fleet.aws.calls("central")
    assert [c.operation for c in agent_calls] == ISSUANCE
    for call in agent_calls:
        assert call.credential is not None
        key_id, _date, region, service, terminal = call.credential.split("/")
        assert (key_id, region, service, terminal) == (
            AGENT_KEY_ID,
            REGION,
            "acm-pca",
            "aws4_request",
        )
        assert call.host == f"acm-pca.{REGION}.amazonaws.com"
    assert [c.operation for c in central_calls] == ISSUANCE + ROOTS
    assert {c.key_id for c in central_calls} == {CENTRAL_KEY_ID}
    # Nothing of the central run's identity reached the agent's cluster.
    in_cluster = fleet.agent_files()
    for secret in (CENTRAL_KEY_ID, CENTRAL_SECRET, AGENT_SECRET):
        assert secret.encode() not in in_cluster
    assert fleet.held("agent-1") is not None


def test_an_agent_without_aws_credentials_fails_with_one_line_and_writes_nothing(
    fleet: Fleet,
) -> None:
    fleet.aws.wire = True
    assert fleet.central().code == 0
    run = fleet.agent(key_id=None, secret=None)
    assert run.code == 2
    line = (
        f"provider pca: found no usable AWS credentials for acm-pca:DescribeCertificateAuthority "
        f"on {ARN}: provide them through the environment, a profile or a role (see {DOCS})"
    )
    assert _lines(run) == [f"trustmgr: {line}"]
    assert fleet.aws.calls("agent") == []  # nothing was sent
    assert fleet.held("agent-1") is None
    assert b"PRIVATE KEY" not in fleet.agent_files()
    assert fleet.report()["error"] == line
    # The central run does not stand in with its own identity: it waits, and says why.
    assert fleet.central().code == 0
    assert fleet.aws.operations("central") == ISSUANCE + ROOTS
    plan = json.loads(fleet.central("plan -o json").out)
    (row,) = [c for c in plan["clusters"] if c["cluster"] == "agent-1"]
    assert row["message"] == line
    # Given its identity, the agent converges.
    fleet.converge(rounds=1)
    assert fleet.held("agent-1") is not None and fleet.report()["error"] == ""


# --- answers the agent refuses ------------------------------------------------------------------


def test_a_certificate_for_another_key_is_refused_and_nothing_written(
    fleet: Fleet, authority: Authority
) -> None:
    fleet.aws.authority["agent"] = Impostor(authority.root, authority.ca, authority.ca_key)
    assert fleet.central().code == 0
    run = fleet.agent()
    assert run.code == 1
    assert _lines(run) == [
        "trustmgr: provider pca gave an unusable certificate: the issued certificate's public "
        "key is not the CSR's"
    ]
    assert fleet.aws.operations("agent") == ISSUANCE
    assert fleet.held("agent-1") is None
    assert b"PRIVATE KEY" not in fleet.agent_files()


def test_a_certificate_under_a_root_the_document_does_not_allow_is_refused(fleet: Fleet) -> None:
    """The private CA's certificate changed between the central run and the agent's:
    its new root is in no cluster's bundle yet."""
    renewed = Authority.create(NOW)
    fleet.aws.authority["agent"] = renewed
    assert fleet.central().code == 0
    run = fleet.agent()
    assert run.code == 1
    assert _lines(run) == [
        f"trustmgr: the CA signed by provider pca chains to root {fingerprint(renewed.root)[:16]}…, "
        "not one the desired document allows now; nothing written"
    ]
    assert fleet.held("agent-1") is None
    assert b"PRIVATE KEY" not in fleet.agent_files()


def test_a_document_whose_region_is_not_the_cas_is_refused_with_one_line(fleet: Fleet) -> None:
    assert fleet.central().code == 0
    path = fleet.path / "out/agent-1/trustmgr-desired.json"
    desired = unseal(path.read_bytes(), None, where="")
    settings = {**desired.signer.settings, "region": "eu-west-1"}
    forged = replace(
        desired, signer=replace(desired.signer, settings=settings), sequence=desired.sequence + 1
    )
    with Workspace.build(load_config(fleet.path / "trustmgr.yaml"), clock=lambda: NOW) as ws:
        key = ws.publisher()
    assert key is not None
    path.write_bytes(seal(forged, key))
    run = fleet.agent()
    assert run.code == 2
    line = (
        f"cluster agent-1 ({Path('out/agent-1')}): the desired document's acmPca settings of "
        f"provider pca are unusable: region eu-west-1 is not the region of certificateAuthorityArn "
        f"({REGION}): requests must go to the CA's own region; nothing written"
    )
    assert _lines(run) == [f"trustmgr: {line}"]
    assert fleet.aws.calls("agent") == []  # no client was even built
    assert fleet.held("agent-1") is None
    assert b"PRIVATE KEY" not in fleet.agent_files()
    assert fleet.report()["error"] == line  # the central run learns why
    # The central run publishes its own settings again; the agent then issues.
    fleet.converge(rounds=1)
    assert fleet.held("agent-1") is not None and fleet.report()["error"] == ""


# --- logs -----------------------------------------------------------------------------------------


def test_the_agents_key_is_not_in_botocores_debug_log(
    fleet: Fleet, caplog: pytest.LogCaptureFixture
) -> None:
    fleet.aws.wire = True
    caplog.set_level(logging.DEBUG, logger="botocore")
    caplog.set_level(logging.DEBUG, logger="trustmgr")
    fleet.converge(rounds=1)
    held = fleet.held("agent-1")
    assert held is not None
    text = caplog.text
    assert "IssueCertificate" in text and AGENT_KEY_ID in text  # the signed requests are logged
    flat = text.replace("\n", "").replace("\\n", "")
    key_body = b"".join(held.ca_key.splitlines()[1:-1]).decode()
    assert key_body and key_body not in flat
    assert "PRIVATE KEY" not in text
    key = load_pem_private_key(held.ca_key, None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    der = key.private_bytes(Encoding.DER, PrivateFormat.PKCS8, NoEncryption())
    assert der.hex() not in flat and base64.b64encode(der).decode() not in flat
    assert AGENT_SECRET not in text and CENTRAL_SECRET not in text
