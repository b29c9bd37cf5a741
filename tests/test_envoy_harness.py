"""Tests of the real-Envoy mTLS harness (tests/envoy_harness.py).

Each test builds its PKI here with ``cryptography``: roots, one intermediate per trust domain
name-constrained (critical NameConstraints, permitted URI subtree = the bare trust domain) the
way trustmgr issues them, and workload certs minted by the harness.
"""

from __future__ import annotations

import datetime
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.envoy_harness import (
    EnvoyListener,
    EnvoyStartError,
    MtlsResult,
    WorkloadFiles,
    issue_workload_cert,
    mtls_request,
    require_envoy,
    running,
    write_workload_files,
)
from trustmgr.providers.keys import ca_key_usage


@pytest.fixture(autouse=True, scope="module")
def envoy_required() -> str:
    """Skips these tests without Envoy, or fails them under CI."""
    return require_envoy()


# --------------------------------------------------------------------------------------------
# PKI built in the test
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CA:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


_CA_KEY_USAGE = ca_key_usage()


def make_root(cn: str) -> CA:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "trustmgr-test"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(_CA_KEY_USAGE, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return CA(cert, key)


def make_intermediate(root: CA, trust_domain: str, *, constrained: bool = True) -> CA:
    """A per-cluster intermediate for ``trust_domain``: pathlen 0, URI SAN
    ``spiffe://<td>``, no EKU and (unless ``constrained=False``) a critical NameConstraints
    extension whose only permitted subtree is the URI host ``<td>``."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "trustmgr-test"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"intermediate {trust_domain}"),
        ]
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(root.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_CA_KEY_USAGE, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(root.key.public_key()),
            critical=False,
        )
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]
            ),
            critical=False,
        )
    )
    if constrained:
        builder = builder.add_extension(
            x509.NameConstraints(
                permitted_subtrees=[x509.UniformResourceIdentifier(trust_domain)],
                excluded_subtrees=None,
            ),
            critical=True,
        )
    return CA(builder.sign(root.key, hashes.SHA256()), key)


def workload(
    base: Path, label: str, ca: CA, root: CA, spiffe_id: str, *, roots: list[CA] | None = None
) -> WorkloadFiles:
    """Mint a workload cert under ``ca`` and write Istio-style files to ``base/label``:
    cert-chain.pem = leaf + intermediate, root-cert.pem = ``roots`` (default: ``root``)."""
    trusted = [r.cert for r in (roots or [root])]
    cert, key = issue_workload_cert(ca.cert, ca.key, spiffe_id, server=True, client=True)
    return write_workload_files(base / label, cert, key, [ca.cert], trusted)


@dataclass(frozen=True)
class Pki:
    root: CA
    a: CA  # name-constrained to a.test
    b: CA  # name-constrained to b.test
    unconstrained: CA  # same root, no name constraints (control)
    rogue_root: CA  # a root nobody trusts
    rogue_a: CA  # a.test intermediate under the rogue root


@pytest.fixture(scope="module")
def pki() -> Pki:
    root = make_root("root")
    rogue_root = make_root("rogue root")
    return Pki(
        root=root,
        a=make_intermediate(root, "a.test"),
        b=make_intermediate(root, "b.test"),
        unconstrained=make_intermediate(root, "a.test", constrained=False),
        rogue_root=rogue_root,
        rogue_a=make_intermediate(rogue_root, "a.test"),
    )


A_PREFIX = "spiffe://a.test/"


@pytest.fixture
def server_a(pki: Pki, tmp_path: Path) -> WorkloadFiles:
    return workload(tmp_path, "server-a", pki.a, pki.root, "spiffe://a.test/ns/srv/sa/server")


def request(
    port: int, client: WorkloadFiles, server_prefixes: tuple[str, ...] = (A_PREFIX,)
) -> MtlsResult:
    assert client.root_cert is not None
    return mtls_request(port, client.cert_chain, client.key, client.root_cert, server_prefixes)


# --------------------------------------------------------------------------------------------
# CA bundle + SAN prefix mode (Istio's default)
# --------------------------------------------------------------------------------------------


def test_same_trust_domain_client_accepted(
    pki: Pki, server_a: WorkloadFiles, tmp_path: Path
) -> None:
    client = workload(tmp_path, "client", pki.a, pki.root, "spiffe://a.test/ns/app/sa/client")
    with EnvoyListener.from_workload_dir(
        server_a.directory, name="a-inbound", san_prefixes=[A_PREFIX]
    ) as lst:
        res = request(lst.port, client)
        assert res.ok, res.error
        assert res.status == 200
        assert res.body == "listener=a-inbound\n"
        assert res.headers["x-listener"] == "a-inbound"
        assert res.headers["x-peer-uri-san"] == "spiffe://a.test/ns/app/sa/client"
        assert res.server_uris == ["spiffe://a.test/ns/srv/sa/server"]
        assert lst.ssl_stats()["handshake"] == 1


def test_untrusted_root_rejected(pki: Pki, server_a: WorkloadFiles, tmp_path: Path) -> None:
    # The client chains to a root the server does not trust (it still trusts the server).
    client = workload(
        tmp_path,
        "rogue",
        pki.rogue_a,
        pki.rogue_root,
        "spiffe://a.test/ns/app/sa/client",
        roots=[pki.root],
    )
    with EnvoyListener.from_workload_dir(
        server_a.directory, name="a-inbound", san_prefixes=[A_PREFIX]
    ) as lst:
        res = request(lst.port, client)
        assert not res.ok
        assert res.status is None
        assert res.error
        assert lst.ssl_stats()["fail_verify_error"] == 1
        errors = lst.wait_tls_errors()
        assert any("unable to get local issuer certificate" in e for e in errors), errors


def test_san_outside_accepted_prefixes_rejected(
    pki: Pki, server_a: WorkloadFiles, tmp_path: Path
) -> None:
    # Trusted root, valid chain (b.test intermediate minting a b.test ID), but the listener
    # only accepts spiffe://a.test/.
    client = workload(tmp_path, "b-client", pki.b, pki.root, "spiffe://b.test/ns/app/sa/client")
    with EnvoyListener.from_workload_dir(
        server_a.directory, name="a-inbound", san_prefixes=[A_PREFIX]
    ) as lst:
        res = request(lst.port, client)
        assert not res.ok, res
        stats = lst.ssl_stats()
        assert stats["fail_verify_san"] == 1
        assert stats["fail_verify_error"] == 0


def test_alias_prefix_accepts_other_trust_domain(
    pki: Pki, server_a: WorkloadFiles, tmp_path: Path
) -> None:
    # Istio's trustDomainAliases: the listener accepts several prefixes.
    client = workload(tmp_path, "b-client", pki.b, pki.root, "spiffe://b.test/ns/app/sa/client")
    with EnvoyListener.from_workload_dir(
        server_a.directory, name="a-inbound", san_prefixes=[A_PREFIX, "spiffe://b.test/"]
    ) as lst:
        res = request(lst.port, client)
        assert res.ok, res.error
        assert res.headers["x-peer-uri-san"] == "spiffe://b.test/ns/app/sa/client"


def test_prefix_is_not_fooled_by_longer_trust_domain(
    pki: Pki, server_a: WorkloadFiles, tmp_path: Path
) -> None:
    # "spiffe://a.test.evil/..." must not pass the "spiffe://a.test/" prefix (trailing slash).
    evil = make_intermediate(pki.root, "a.test.evil")
    client = workload(tmp_path, "evil", evil, pki.root, "spiffe://a.test.evil/ns/x/sa/y")
    with EnvoyListener.from_workload_dir(
        server_a.directory, name="a-inbound", san_prefixes=[A_PREFIX]
    ) as lst:
        assert not request(lst.port, client)
        assert lst.ssl_stats()["fail_verify_san"] == 1


def test_name_constraints_enforced_by_boringssl(
    pki: Pki, server_a: WorkloadFiles, tmp_path: Path
) -> None:
    # b.test's intermediate (name-constrained to b.test) mints an a.test identity. The root is
    # trusted and the SAN matches the accepted prefix, so only the name constraint stops it.
    forged = workload(tmp_path, "forged", pki.b, pki.root, "spiffe://a.test/ns/app/sa/client")
    # Control: the same forgery from an intermediate without name constraints gets in.
    control = workload(
        tmp_path, "control", pki.unconstrained, pki.root, "spiffe://a.test/ns/app/sa/client"
    )
    with EnvoyListener.from_workload_dir(
        server_a.directory, name="a-inbound", san_prefixes=[A_PREFIX]
    ) as lst:
        res = request(lst.port, forged)
        assert not res.ok, res
        stats = lst.ssl_stats()
        assert stats["fail_verify_error"] == 1
        assert stats["fail_verify_san"] == 0
        errors = lst.wait_tls_errors()
        assert any("permitted subtree violation" in e for e in errors), errors

        ok = request(lst.port, control)
        assert ok.ok, ok.error


def test_client_rejects_server_outside_expected_sans(
    pki: Pki, server_a: WorkloadFiles, tmp_path: Path
) -> None:
    client = workload(tmp_path, "client", pki.a, pki.root, "spiffe://a.test/ns/app/sa/client")
    with EnvoyListener.from_workload_dir(
        server_a.directory, name="a-inbound", san_prefixes=[A_PREFIX]
    ) as lst:
        res = request(lst.port, client, ("spiffe://b.test/",))
        assert not res.ok
        assert res.error is not None
        assert res.error.startswith("server-san:")


def test_client_rejects_untrusted_server(pki: Pki, server_a: WorkloadFiles, tmp_path: Path) -> None:
    client = workload(
        tmp_path,
        "client",
        pki.a,
        pki.root,
        "spiffe://a.test/ns/app/sa/client",
        roots=[pki.rogue_root],
    )
    with EnvoyListener.from_workload_dir(
        server_a.directory, name="a-inbound", san_prefixes=[A_PREFIX]
    ) as lst:
        res = request(lst.port, client)
        assert not res.ok
        assert res.error is not None
        assert res.error.startswith("server-cert-verify:")


# --------------------------------------------------------------------------------------------
# SPIFFE validator mode
# --------------------------------------------------------------------------------------------


def test_spiffe_validator_selects_bundle_per_trust_domain(tmp_path: Path) -> None:
    # Independent roots per trust domain, as in a federation of separate meshes.
    roots = {td: make_root(f"root {td}") for td in ("a.test", "b.test", "c.test")}
    inter = {td: make_intermediate(r, td) for td, r in roots.items()}
    bundles: dict[str, Path] = {}
    for td in ("a.test", "b.test"):  # c.test is not federated with a.test
        bundles[td] = tmp_path / f"bundle-{td}.pem"
        bundles[td].write_bytes(roots[td].cert.public_bytes(serialization.Encoding.PEM))
    server = workload(
        tmp_path, "server", inter["a.test"], roots["a.test"], "spiffe://a.test/ns/srv/sa/server"
    )

    def client(label: str, td: str, spiffe_id: str) -> WorkloadFiles:
        # Clients trust a.test's root so they can verify the server.
        return workload(tmp_path, label, inter[td], roots[td], spiffe_id, roots=[roots["a.test"]])

    a_client = client("a", "a.test", "spiffe://a.test/ns/app/sa/client")
    b_client = client("b", "b.test", "spiffe://b.test/ns/app/sa/client")
    c_client = client("c", "c.test", "spiffe://c.test/ns/app/sa/client")
    # A b.test identity under a.test's root: a.test's bundle is not used for b.test (and the
    # a.test intermediate's name constraint forbids it anyway).
    b_from_a = client("b-from-a", "a.test", "spiffe://b.test/ns/app/sa/client")

    with EnvoyListener.from_workload_dir(
        server.directory, name="a-spiffe", spiffe_bundles=bundles
    ) as lst:
        ok_a = request(lst.port, a_client)
        assert ok_a.ok, ok_a.error
        ok_b = request(lst.port, b_client, ())
        assert ok_b.ok, ok_b.error
        assert ok_b.headers["x-peer-uri-san"] == "spiffe://b.test/ns/app/sa/client"

        assert not request(lst.port, c_client)
        assert not request(lst.port, b_from_a)
        stats = lst.ssl_stats()
        assert stats["handshake"] == 2
        assert stats["fail_verify_error"] == 2


def test_spiffe_validator_same_root_absent_trust_domain_rejected(pki: Pki, tmp_path: Path) -> None:
    # Even with one shared root, the map decides: b.test is absent, so b.test peers fail.
    bundle = tmp_path / "root.pem"
    bundle.write_bytes(pki.root.cert.public_bytes(serialization.Encoding.PEM))
    server = workload(tmp_path, "server", pki.a, pki.root, "spiffe://a.test/ns/srv/sa/server")
    a_client = workload(tmp_path, "a", pki.a, pki.root, "spiffe://a.test/ns/app/sa/client")
    b_client = workload(tmp_path, "b", pki.b, pki.root, "spiffe://b.test/ns/app/sa/client")
    forged = workload(tmp_path, "forged", pki.b, pki.root, "spiffe://a.test/ns/app/sa/client")
    with EnvoyListener.from_workload_dir(
        server.directory, name="a-spiffe", spiffe_bundles={"a.test": bundle}
    ) as lst:
        res = request(lst.port, a_client)
        assert res.ok, res.error
        assert not request(lst.port, b_client)
        assert not request(lst.port, forged)  # name constraints hold in this mode too
        assert lst.ssl_stats()["fail_verify_error"] == 2
        errors = lst.wait_tls_errors(2)
        assert any("permitted subtree violation" in e for e in errors), errors


def test_spiffe_validator_with_san_prefixes(pki: Pki, tmp_path: Path) -> None:
    bundle = tmp_path / "root.pem"
    bundle.write_bytes(pki.root.cert.public_bytes(serialization.Encoding.PEM))
    server = workload(tmp_path, "server", pki.a, pki.root, "spiffe://a.test/ns/srv/sa/server")
    allowed = workload(tmp_path, "ok", pki.a, pki.root, "spiffe://a.test/ns/app/sa/client")
    other = workload(tmp_path, "other", pki.a, pki.root, "spiffe://a.test/ns/other/sa/client")
    with EnvoyListener.from_workload_dir(
        server.directory,
        name="a-spiffe",
        spiffe_bundles={"a.test": bundle},
        san_prefixes=["spiffe://a.test/ns/app/"],
    ) as lst:
        assert request(lst.port, allowed)
        assert not request(lst.port, other)
        assert lst.ssl_stats()["fail_verify_san"] == 1


# --------------------------------------------------------------------------------------------
# Harness mechanics
# --------------------------------------------------------------------------------------------


def test_many_listeners_in_parallel(pki: Pki, tmp_path: Path) -> None:
    n = 10
    servers = [
        workload(tmp_path, f"server-{i}", pki.a, pki.root, f"spiffe://a.test/ns/s{i}/sa/server")
        for i in range(n)
    ]
    listeners = [
        EnvoyListener.from_workload_dir(
            s.directory, name=f"l{i}", san_prefixes=[f"spiffe://a.test/ns/c{i}/"]
        )
        for i, s in enumerate(servers)
    ]
    clients = [
        workload(tmp_path, f"client-{i}", pki.a, pki.root, f"spiffe://a.test/ns/c{i}/sa/client")
        for i in range(n)
    ]
    t0 = time.monotonic()
    with running(listeners):
        elapsed = time.monotonic() - t0
        assert len({lst.port for lst in listeners}) == n
        for i, lst in enumerate(listeners):
            res = request(lst.port, clients[i])
            assert res.ok, res.error
            assert res.body == f"listener=l{i}\n"
            assert not request(lst.port, clients[(i + 1) % n])
    assert all(not lst.running for lst in listeners)
    assert elapsed < 20, f"{n} listeners took {elapsed:.1f}s to start"


def test_start_failure_reports_log_tail(pki: Pki, tmp_path: Path) -> None:
    server = workload(tmp_path, "server", pki.a, pki.root, "spiffe://a.test/ns/srv/sa/server")
    lst = EnvoyListener(
        name="broken",
        cert_chain=server.cert_chain,
        private_key=tmp_path / "missing-key.pem",
        trusted_ca=server.root_cert,
        work_dir=tmp_path / "envoy-broken",
    )
    with pytest.raises(EnvoyStartError, match=r"missing-key\.pem"):
        lst.start()
    assert not lst.running


def test_issued_workload_cert_shape(pki: Pki, tmp_path: Path) -> None:
    cert, _ = issue_workload_cert(
        pki.a.cert,
        pki.a.key,
        "spiffe://a.test/ns/x/sa/y",
        server=False,
        client=True,
        out_dir=tmp_path / "w",
        roots=[pki.root.cert],
    )
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical
    assert san.value.get_values_for_type(x509.UniformResourceIdentifier) == [
        "spiffe://a.test/ns/x/sa/y"
    ]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = pki.a.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    chain = x509.load_pem_x509_certificates((tmp_path / "w" / "cert-chain.pem").read_bytes())
    assert chain == [cert, pki.a.cert]
    with pytest.raises(ValueError):
        issue_workload_cert(pki.a.cert, pki.a.key, "spiffe://a.test/x", server=False, client=False)
