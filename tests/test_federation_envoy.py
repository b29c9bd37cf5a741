"""Proof with real TLS: Envoy listeners configured as Istio configures sidecars,
fed with what trustmgr wrote, accept exactly the same-mesh and federated peers.

Meshes: a (two clusters) and b federated; c isolated, sharing b's provider root.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.conftest import trustmgr
from tests.envoy_harness import (
    EnvoyListener,
    issue_workload_cert,
    mtls_request,
    require_envoy,
    running,
)
from tests.workload import load_cluster_ca
from trustmgr.bundles import load_certificates


@pytest.fixture(autouse=True, scope="module")
def envoy_required() -> str:
    """Skips these tests without Envoy, or fails them under CI."""
    return require_envoy()


CONFIG = """\
stateStore: {file: {path: state}}
providers:
  root-a: {selfSigned: {passphraseEnv: TRUSTMGR_PASSPHRASE}}
  root-bc: {selfSigned: {passphraseEnv: TRUSTMGR_PASSPHRASE}}
meshes:
  a:
    trustDomain: a.test
    provider: root-a
    clusters:
      a1: {directory: {path: out/a1}}
      a2: {directory: {path: out/a2}}
  b:
    trustDomain: b.test
    provider: root-bc
    clusters:
      b1: {directory: {path: out/b1}}
  c:
    trustDomain: c.test
    provider: root-bc
    clusters:
      c1: {directory: {path: out/c1}}
federations:
  - meshes: [a, b]
"""

MESH_OF = {"a1": "a", "a2": "a", "b1": "b", "c1": "c"}
EXPECTED = {  # (server cluster, client cluster) pairs that must connect
    (s, c)
    for s in MESH_OF
    for c in MESH_OF
    if MESH_OF[s] == MESH_OF[c] or {MESH_OF[s], MESH_OF[c]} == {"a", "b"}
}


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


def accepted_domains(cluster: str) -> list[str]:
    """What istiod gives the cluster's sidecars: its trust domain plus the
    trustDomainAliases of trustmgr's meshConfig fragment."""
    run = trustmgr("federation", "export", "--mesh", MESH_OF[cluster])
    assert run.code == 0, run.err
    mesh_config = yaml.safe_load(run.out)["meshConfig"]
    return [mesh_config["trustDomain"], *mesh_config["trustDomainAliases"]]


def workload(workdir: Path, cluster: str, spiffe_id: str, *, name: str) -> Workload:
    """A workload cert from the cluster CA, with Istio's chain: leaf, then cert-chain.pem."""
    out = workdir / "out" / cluster
    ca_cert, ca_key = load_cluster_ca(out)
    chain = load_certificates((out / "cert-chain.pem").read_bytes(), "cert-chain.pem")
    roots = load_certificates((out / "root-cert.pem").read_bytes(), "root-cert.pem")
    directory = workdir / "workloads" / name
    issue_workload_cert(ca_cert, ca_key, spiffe_id, ca_chain=chain, roots=roots, out_dir=directory)
    return Workload(cluster, directory)


@pytest.fixture
def meshes(workdir: Path) -> Iterator[Path]:
    (workdir / "trustmgr.yaml").write_text(CONFIG)
    run = trustmgr("bootstrap")
    assert run.code == 0, run.err
    yield workdir


def sidecar_listener(w: Workload, prefixes: list[str]) -> EnvoyListener:
    return EnvoyListener.from_workload_dir(w.directory, name=w.cluster, san_prefixes=prefixes)


def handshake_matrix(
    listeners: dict[str, EnvoyListener],
    clients: dict[str, Workload],
    prefixes: dict[str, list[str]],
) -> set[tuple[str, str]]:
    """Every client against every listener; the (server, client) pairs that got a 200."""
    with running(listeners.values()):
        return {
            (server, client)
            for server, listener in listeners.items()
            for client, w in clients.items()
            if mtls_request(listener.port, w.chain, w.key, w.roots, prefixes[client]).ok
        }


@pytest.fixture
def workloads(meshes: Path) -> tuple[dict[str, Workload], dict[str, Workload]]:
    def make(role: str) -> dict[str, Workload]:
        return {
            c: workload(
                meshes, c, f"spiffe://{MESH_OF[c]}.test/ns/app/sa/{role}", name=f"{c}-{role}"
            )
            for c in MESH_OF
        }

    return make("server"), make("client")


def test_handshakes_succeed_exactly_within_meshes_and_federations(
    workloads: tuple[dict[str, Workload], dict[str, Workload]],
) -> None:
    servers, clients = workloads
    prefixes = {c: [f"spiffe://{td}/" for td in accepted_domains(c)] for c in MESH_OF}
    listeners = {c: sidecar_listener(servers[c], prefixes[c]) for c in MESH_OF}
    assert handshake_matrix(listeners, clients, prefixes) == EXPECTED


def test_a_federated_ca_cannot_impersonate_another_mesh(
    meshes: Path, workloads: tuple[dict[str, Workload], dict[str, Workload]]
) -> None:
    """a trusts b's root, yet a cert minted by b's cluster CA for a's trust domain
    is rejected: the name constraint on b's CA, enforced by BoringSSL."""
    servers, clients = workloads
    forged = workload(meshes, "b1", "spiffe://a.test/ns/app/sa/client", name="forged")
    prefixes = [f"spiffe://{td}/" for td in accepted_domains("a1")]
    with sidecar_listener(servers["a1"], prefixes) as listener:
        honest = mtls_request(
            listener.port, clients["b1"].chain, clients["b1"].key, clients["b1"].roots, prefixes
        )
        assert honest.ok, honest.error
        result = mtls_request(listener.port, forged.chain, forged.key, forged.roots, prefixes)
        assert not result.ok
        assert any("permitted subtree violation" in e for e in listener.wait_tls_errors())


def test_same_matrix_with_spiffe_validator_and_exported_bundles(
    meshes: Path, workloads: tuple[dict[str, Workload], dict[str, Workload]]
) -> None:
    """Envoy's SPIFFE validator, one bundle per trust domain, each exported by
    `trustmgr bundle export` and read back as Envoy wants it (PEM)."""
    servers, clients = workloads
    bundles = {}
    for mesh in ("a", "b", "c"):
        run = trustmgr("bundle", "export", "--mesh", mesh)
        assert run.code == 0, run.err
        document = json.loads(run.out)
        pem = b"".join(
            b"-----BEGIN CERTIFICATE-----\n"
            + b"\n".join(
                key["x5c"][0].encode()[i : i + 64] for i in range(0, len(key["x5c"][0]), 64)
            )
            + b"\n-----END CERTIFICATE-----\n"
            for key in document["keys"]
        )
        bundles[f"{mesh}.test"] = meshes / f"{mesh}.bundle.pem"
        bundles[f"{mesh}.test"].write_bytes(pem)
    prefixes = {c: [f"spiffe://{td}/" for td in accepted_domains(c)] for c in MESH_OF}
    listeners = {
        c: EnvoyListener.from_workload_dir(
            servers[c].directory,
            name=c,
            spiffe_bundles={td: bundles[td] for td in accepted_domains(c)},
        )
        for c in MESH_OF
    }
    assert handshake_matrix(listeners, clients, prefixes) == EXPECTED
