"""Least privilege per cluster with Vault or OpenBao (docs/agent.md), against a real OpenBao
whose Kubernetes auth reviews service-account tokens with the Kubernetes emulator.

The setup is the doc's own, run by tests/agent_vault.py: its ``sh`` blocks as written for mesh
``a`` and cluster ``a1``, and with the names of mesh ``b`` and cluster ``b1``; its ``hcl`` block
is the policy file those commands load, and its ``yaml`` block the provider each agent uses. So
the doc cannot drift from what is tested here.

Name constraints are checked with ``openssl verify``: cryptography's verifier refuses URI
name constraints altogether (FACTS.md).
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import hvac
import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import NameOID

from tests.agent_vault import (
    NAMES_OF_A,
    NAMESPACE,
    OTHER,
    SERVICE_ACCOUNT,
    A,
    B,
    Mesh,
    Setup,
    doc_blocks,
    doc_policy,
    doc_provider,
    doc_setup,
    for_mesh,
    sa_token,
)
from tests.envoy_harness import issue_workload_cert
from tests.openbao import OpenBaoServer, root_client
from tests.workload import openssl_verify
from trustmgr.bundles import pem
from trustmgr.errors import ProviderAnswerError
from trustmgr.pki import ClusterCARequest, check_signed_ca, cluster_ca_problems, cluster_ca_request
from trustmgr.providers import ProviderNeedsFixError, SignedCA
from trustmgr.providers.chains import issued_by
from trustmgr.providers.config import VaultConfig
from trustmgr.providers.keys import KeyAlgorithm, ca_key_usage
from trustmgr.providers.vault import VaultProvider

DENIED = ["1 error occurred:\n\t* permission denied\n\n"]
"""OpenBao's ``errors`` for a request its policies refuse."""

Agent = Callable[..., VaultProvider]


@pytest.fixture(scope="module")
def setup(openbao: OpenBaoServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    with doc_setup(openbao, tmp_path_factory.mktemp("agent-vault")) as done:
        yield done


@pytest.fixture
def agent(setup: Setup, tmp_path: Path) -> Iterator[Agent]:
    """``agent(mesh, **changes)``: the provider the agent of ``mesh``'s cluster builds from the
    mesh's mount and the doc's yaml, logging in with its service-account token; ``changes``
    override the settings (``auth_mount``/``role`` override the Kubernetes auth, ``token_file``
    the token)."""
    made: list[VaultProvider] = []

    def build(mesh: Mesh, **changes: Any) -> VaultProvider:
        settings = {"mount": mesh.mount, **doc_provider(mesh)}
        kubernetes = settings["auth"]["kubernetes"]
        kubernetes["mount"] = changes.pop("auth_mount", kubernetes["mount"])
        kubernetes["role"] = changes.pop("role", kubernetes["role"])
        token_file = changes.pop("token_file", None) or sa_token(setup, mesh.cluster, tmp_path)
        kubernetes["tokenPath"] = str(token_file)
        settings |= {"address": setup.server.address, "timeout": "10s", **changes}
        provider = VaultProvider(
            mesh.provider, VaultConfig.model_validate(settings), lambda: datetime.now(UTC)
        )
        made.append(provider)
        return provider

    yield build
    for provider in made:
        provider.close()


# -- certificates -----------------------------------------------------------------------------


def _leaf_verdict(
    ca: x509.Certificate,
    ca_key: CertificateIssuerPrivateKeyTypes,
    answer: SignedCA,
    root: x509.Certificate,
    spiffe_id: str,
    tmp_path: Path,
) -> subprocess.CompletedProcess[str]:
    """``openssl verify`` of a workload certificate for ``spiffe_id`` signed by ``ca``, with
    the answer's chain as untrusted intermediates and ``root`` as the only trusted CA."""
    leaf, _ = issue_workload_cert(ca, ca_key, spiffe_id)
    (tmp_path / "cert-chain.pem").write_bytes(b"".join(pem(c) for c in answer.chain))
    (tmp_path / "root-cert.pem").write_bytes(pem(root))
    return openssl_verify(
        leaf,
        cert_chain=tmp_path / "cert-chain.pem",
        root_cert=tmp_path / "root-cert.pem",
        tmp=tmp_path,
    )


def _request(trust_domain: str, cluster: str) -> ClusterCARequest:
    return cluster_ca_request(trust_domain, cluster=cluster, algorithm=KeyAlgorithm.ECDSA_P256)


def _hostile_request(*names: str) -> ClusterCARequest:
    """A CA CSR as an attacker would write it: no name constraints, and URI SANs ``names``
    (none at all when empty)."""
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hostile CA")]))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(ca_key_usage(), critical=True)
    )
    if names:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(n) for n in names]),
            critical=False,
        )
    return ClusterCARequest(key, builder.sign(key, hashes.SHA256()))


def _issued_on(server: OpenBaoServer, mount: str) -> list[str]:
    """Serial numbers of every certificate ``mount`` has issued or imported."""
    with root_client(server) as client:
        return sorted(client.list(f"{mount}/certs")["data"]["keys"])


def _login(setup: Setup, mesh: Mesh) -> str:
    """A token of ``mesh``'s cluster role, logged in with the agent's service-account token."""
    jwt = setup.clusters[mesh.cluster].issue_service_account_token(NAMESPACE, SERVICE_ACCOUNT)
    client = hvac.Client(url=setup.server.address, timeout=10)
    try:
        answer = client.auth.kubernetes.login(mesh.role, jwt, mount_point=mesh.auth_mount)
    finally:
        client.adapter.close()
    return str(answer["auth"]["client_token"])


# -- the tests --------------------------------------------------------------------------------


@pytest.mark.parametrize("mesh", [A, B], ids=lambda m: m.name)
def test_the_doc_recipe_makes_a_constrained_mesh_intermediate_policy_and_role(
    setup: Setup, mesh: Mesh
) -> None:
    blocks = [*doc_blocks("sh"), *doc_blocks("hcl"), *doc_blocks("yaml")]
    assert len(blocks) >= 3
    for block in blocks:
        ours = for_mesh(mesh, block)
        assert (ours == block) is (mesh is A)
        assert mesh is A or not NAMES_OF_A.search(ours)
    intermediate = setup.intermediates[mesh]
    assert issued_by(intermediate, setup.root)
    constraints = intermediate.extensions.get_extension_for_class(x509.NameConstraints)
    assert constraints.critical
    assert constraints.value.permitted_subtrees == [
        x509.UniformResourceIdentifier(mesh.trust_domain)
    ]
    assert constraints.value.excluded_subtrees is None
    basic = intermediate.extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical and basic.value.ca and basic.value.path_length == 1

    with root_client(setup.server) as client:
        # The policy OpenBao enforces is the doc's text, byte for byte.
        assert client.sys.read_policy(mesh.policy)["data"]["rules"] == doc_policy(mesh)
        # The mount signs with the constrained intermediate; it holds the root's certificate,
        # and one key only: the intermediate's.
        listed = client.list(f"{mesh.mount}/issuers")["data"]["key_info"]
        default = client.read(f"{mesh.mount}/issuer/default/json")["data"]
        assert x509.load_pem_x509_certificate(default["certificate"].encode()) == intermediate
        (with_key,) = [i for i in listed.values() if i["key_id"]]
        assert with_key["is_default"]
        assert len(listed) == 2
        assert client.list(f"{mesh.mount}/keys")["data"]["keys"] == [with_key["key_id"]]
        assert setup.root in [
            x509.load_pem_x509_certificate(c.encode()) for c in default["ca_chain"]
        ]
        role = client.read(f"auth/{mesh.auth_mount}/role/{mesh.role}")["data"]
    assert role["bound_service_account_names"] == [SERVICE_ACCOUNT]
    assert role["bound_service_account_namespaces"] == [NAMESPACE]
    assert role["token_policies"] == [mesh.policy]
    assert (role["token_ttl"], role["token_max_ttl"]) == (15 * 60, 60 * 60)


@pytest.mark.parametrize("mesh", [A, B], ids=lambda m: m.cluster)
def test_a_cluster_role_gets_a_ca_for_its_own_trust_domain(
    setup: Setup, agent: Agent, mesh: Mesh, tmp_path: Path
) -> None:
    provider = agent(mesh)
    request = _request(mesh.trust_domain, mesh.cluster)
    answer = provider.sign_ca(request.csr, timedelta(hours=24))
    now = datetime.now(UTC)
    root = check_signed_ca(answer, request, mesh.trust_domain, provider=mesh.provider, now=now)
    assert root == setup.root and answer.roots == (setup.root,)
    assert answer.chain[1:] == (setup.intermediates[mesh],)
    # Logged in through its own cluster's TokenReview, with the role's 15-minute token.
    review = setup.clusters[mesh.cluster].token_reviews[-1]
    assert review.authenticated
    assert review.username == f"system:serviceaccount:{NAMESPACE}:{SERVICE_ACCOUNT}"
    expires = provider.token_expires_at
    assert expires is not None
    assert timedelta(minutes=14) < expires - now <= timedelta(minutes=15)

    ca = answer.chain[0]
    own = _leaf_verdict(
        ca, request.key, answer, setup.root, f"spiffe://{mesh.trust_domain}/ns/x/sa/y", tmp_path
    )
    assert own.returncode == 0, own.stdout + own.stderr
    foreign_domain = OTHER[mesh].trust_domain
    foreign = _leaf_verdict(
        ca, request.key, answer, setup.root, f"spiffe://{foreign_domain}/ns/x/sa/y", tmp_path
    )
    assert foreign.returncode != 0
    assert "permitted subtree violation" in foreign.stderr, foreign.stderr


@pytest.mark.parametrize("mesh", [A, B], ids=lambda m: m.cluster)
def test_a_cluster_role_is_refused_on_the_other_mesh_mount(
    setup: Setup, agent: Agent, mesh: Mesh
) -> None:
    other = OTHER[mesh]
    provider = agent(mesh, mount=other.mount)
    before = _issued_on(setup.server, other.mount)
    with pytest.raises(ProviderNeedsFixError) as refused:
        provider.sign_ca(_request(other.trust_domain, mesh.cluster).csr, timedelta(hours=24))
    assert str(refused.value) == (
        f"provider {mesh.provider}: permission denied on {other.mount}/root/sign-intermediate: "
        'the token\'s policy needs "update" on that path'
    )
    # The same with the other mesh's issuer named (issuer/<ref>/sign-intermediate).
    provider = agent(mesh, mount=other.mount, issuer="default")
    with pytest.raises(ProviderNeedsFixError, match="permission denied on") as refused:
        provider.sign_ca(_request(other.trust_domain, mesh.cluster).csr, timedelta(hours=24))
    assert f" {other.mount}/issuer/default/sign-intermediate:" in str(refused.value)
    assert _issued_on(setup.server, other.mount) == before


CSRS = {
    "trustmgr's CSR for b.example": lambda: _request(B.trust_domain, A.cluster),
    "no name constraints, SAN spiffe://b.example": lambda: _hostile_request("spiffe://b.example"),
    "no name constraints, no SAN": lambda: _hostile_request(),
}


@pytest.mark.parametrize("shape", list(CSRS))
def test_a_ca_for_the_other_trust_domain_from_the_own_mount_vouches_for_none_of_it(
    setup: Setup, agent: Agent, shape: str, tmp_path: Path
) -> None:
    request = CSRS[shape]()
    answer = agent(A).sign_ca(request.csr, timedelta(hours=24))
    # OpenBao signs whatever the CSR says: it does not hold a CSR against the name constraints
    # of the issuer that signs it.
    ca = answer.chain[0]
    assert ca.public_key() == request.csr.public_key()
    assert answer.chain[1:] == (setup.intermediates[A],)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca

    # The mesh-a intermediate permits URIs in a.example only, so nothing below it can stand
    # for a b.example workload.
    foreign = _leaf_verdict(
        ca, request.key, answer, setup.root, "spiffe://b.example/ns/x/sa/y", tmp_path
    )
    assert foreign.returncode != 0
    assert "permitted subtree violation" in foreign.stderr, foreign.stderr
    # A CA that names b.example is itself outside the constraint: it is good for nothing.
    # Without a name it is just another a.example CA, as the policy allows.
    own = _leaf_verdict(
        ca, request.key, answer, setup.root, "spiffe://a.example/ns/x/sa/y", tmp_path
    )
    if shape == "no name constraints, no SAN":
        assert own.returncode == 0, own.stdout + own.stderr
    else:
        assert own.returncode != 0
        assert "permitted subtree violation" in own.stderr, own.stderr


def test_check_signed_ca_refuses_a_b_example_ca_under_the_mesh_a_intermediate(
    agent: Agent,
) -> None:
    request = _request(B.trust_domain, A.cluster)
    answer = agent(A).sign_ca(request.csr, timedelta(hours=24))
    # The CA itself is as trustmgr asked for b.example; only its issuer rules it out.
    assert not cluster_ca_problems(answer.chain[0], B.trust_domain, now=datetime.now(UTC))
    with pytest.raises(ProviderAnswerError, match=r"permits URI names in \['a\.example'\] only"):
        check_signed_ca(answer, request, B.trust_domain, provider=A.provider, now=datetime.now(UTC))


def _denied_requests(setup: Setup) -> dict[tuple[str, str], dict[str, Any]]:
    csr = _request(A.trust_domain, A.cluster).csr.public_bytes(serialization.Encoding.PEM)
    signing = {"csr": csr.decode(), "common_name": "x", "use_csr_values": True}
    return {
        ("POST", "pki-mesh-a/root/generate/internal"): {"common_name": "x", "key_type": "ec"},
        ("POST", "pki-mesh-a/intermediate/generate/internal"): {"common_name": "x"},
        ("POST", "pki-mesh-a/config/ca"): {"pem_bundle": pem(setup.root).decode()},
        ("POST", "pki-mesh-a/intermediate/set-signed"): {"certificate": pem(setup.root).decode()},
        ("POST", "pki-mesh-a/issuers/import/bundle"): {"pem_bundle": pem(setup.root).decode()},
        ("POST", "pki-mesh-a/config/issuers"): {"default": "default"},
        ("POST", "pki-mesh-a/issuer/default"): {"leaf_not_after_behavior": "permit"},
        ("GET", "pki-mesh-a/issuer/default"): {},
        ("POST", "pki-mesh-a/sign-verbatim"): signing,
        ("POST", "pki-mesh-a/issuer/default/sign-verbatim"): signing,
        ("POST", "pki-mesh-a/root/sign-self-issued"): {"certificate": pem(setup.root).decode()},
        ("POST", "pki-mesh-a/issuer/default/sign-self-issued"): {"certificate": ""},
        ("POST", "pki-mesh-a/roles/any"): {"allow_any_name": True},
        ("POST", "pki-mesh-a/issue/any"): {"common_name": "x"},
        ("POST", "pki-mesh-a/revoke"): {"serial_number": "00"},
        ("POST", "pki-mesh-b/root/sign-intermediate"): signing,
        ("POST", "pki-mesh-b/issuer/default/sign-intermediate"): signing,
        ("GET", "sys/mounts"): {},
        ("POST", "sys/mounts/pki-mine"): {"type": "pki"},
        ("POST", "sys/policies/acl/trustmgr-agent-mesh-a"): {"policy": 'path "*" {}'},
        ("GET", "sys/policies/acl/trustmgr-agent-mesh-a"): {},
        ("POST", "auth/kubernetes-a1/role/cluster-a1"): {"token_policies": ["root"]},
        ("POST", "auth/token/create"): {"policies": ["trustmgr-agent-mesh-b"]},
    }


def test_a_cluster_role_is_refused_every_other_pki_and_admin_path(
    setup: Setup, agent: Agent
) -> None:
    token = _login(setup, A)
    session = requests.Session()
    session.headers["X-Vault-Token"] = token

    def call(method: str, path: str, body: dict[str, Any]) -> requests.Response:
        url = f"{setup.server.address}/v1/{path}"
        return session.request(method, url, json=body or None, timeout=10)

    try:
        # The token works: it signs on its own mount, with the default issuer or a named one.
        csr = _request(A.trust_domain, A.cluster).csr.public_bytes(serialization.Encoding.PEM)
        signing = {"csr": csr.decode(), "use_csr_values": True, "max_path_length": 0}
        for path in (
            "pki-mesh-a/root/sign-intermediate",
            "pki-mesh-a/issuer/default/sign-intermediate",
        ):
            assert call("POST", path, signing).status_code == 200, path
        refused = {}
        for (method, path), body in _denied_requests(setup).items():
            answer = call(method, path, body)
            refused[method, path] = (answer.status_code, answer.json().get("errors"))
    finally:
        session.close()
    assert refused == dict.fromkeys(_denied_requests(setup), (403, DENIED))

    # trustmgr says so in one line where it would write to the mount itself.
    with pytest.raises(ProviderNeedsFixError) as denied:
        agent(A).new_root("next")
    assert str(denied.value) == (
        "provider vault-mesh-a: permission denied on pki-mesh-a/root/generate/internal: the "
        'token\'s policy needs "update" on that path'
    )


def test_the_policy_allows_naming_the_root_issuer_but_the_mount_has_no_key_for_it(
    setup: Setup, agent: Agent
) -> None:
    with root_client(setup.server) as client:
        listed = client.list(f"{A.mount}/issuers")["data"]["key_info"]
    (root_issuer,) = [ref for ref, info in listed.items() if not info["key_id"]]
    before = _issued_on(setup.server, A.mount)
    csr = _request(A.trust_domain, A.cluster).csr

    answer = requests.post(
        f"{setup.server.address}/v1/{A.mount}/issuer/{root_issuer}/sign-intermediate",
        headers={"X-Vault-Token": _login(setup, A)},
        json={"csr": csr.public_bytes(serialization.Encoding.PEM).decode(), "use_csr_values": True},
        timeout=10,
    )
    assert answer.status_code == 500  # the policy let it through; the mount cannot sign
    (error,) = answer.json()["errors"]
    assert f"unable to fetch corresponding key for issuer {root_issuer}" in error

    provider = agent(A, issuer=root_issuer, maxRetries=0)
    with pytest.raises(ProviderNeedsFixError) as refused:
        provider.sign_ca(csr, timedelta(hours=24))
    assert root_issuer in str(refused.value)
    assert _issued_on(setup.server, A.mount) == before


LOGINS = {
    # whose token: (cluster, namespace, service account); presented as which cluster's agent
    "another service account of a1": (("a1", NAMESPACE, "istiod"), A),
    "the agent's name in another namespace of a1": (("a1", "default", SERVICE_ACCOUNT), A),
    "b1's agent as a1's": (("b1", NAMESPACE, SERVICE_ACCOUNT), A),
    "a1's agent as b1's": (("a1", NAMESPACE, SERVICE_ACCOUNT), B),
}


@pytest.mark.parametrize("case", list(LOGINS))
def test_only_the_agent_of_the_cluster_logs_in_with_its_role(
    setup: Setup, agent: Agent, case: str, tmp_path: Path
) -> None:
    (cluster, namespace, name), target = LOGINS[case]
    token_file = sa_token(setup, cluster, tmp_path, namespace=namespace, name=name)
    reviewed = {c: len(e.token_reviews) for c, e in setup.clusters.items()}
    provider = agent(target, token_file=token_file)
    with pytest.raises(ProviderNeedsFixError) as refused:
        provider.sign_ca(_request(target.trust_domain, target.cluster).csr, timedelta(hours=24))
    assert str(refused.value) == (
        f"provider {target.provider}: Kubernetes login on auth/{target.auth_mount}/login was "
        f"refused (HTTP 403): check that Kubernetes auth is enabled at auth/{target.auth_mount} "
        f"and role {target.role} exists and binds this service account, and {token_file} "
        "holds a current token"
    )
    reviews = {c: e.token_reviews[reviewed[c] :] for c, e in setup.clusters.items()}
    if cluster == target.cluster:
        # The role's bound names and namespaces refuse it from the token's claims alone.
        assert reviews == {"a1": [], "b1": []}
    else:
        # The claims match the role, but the target cluster's API server does not know the
        # token: only one auth mount per cluster makes that so.
        (review,) = reviews[target.cluster]
        assert not review.authenticated
        assert review.error == "[invalid bearer token, token lookup failed]"
        assert reviews[cluster] == []
