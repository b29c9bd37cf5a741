"""Workload certificates as istiod would sign them, and OpenSSL's verdict on them."""

from __future__ import annotations

import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import NameOID

from tests.envoy_harness import issue_workload_cert
from trustmgr.bundles import pem
from trustmgr.pki import CACerts, private_key_pem


def load_cluster_ca(directory: Path) -> tuple[x509.Certificate, CertificateIssuerPrivateKeyTypes]:
    """The cluster CA cert and key from an Istio cacerts directory."""
    cert = x509.load_pem_x509_certificate((directory / "ca-cert.pem").read_bytes())
    key = serialization.load_pem_private_key((directory / "ca-key.pem").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey)
    return cert, key


def openssl_verify(
    leaf: x509.Certificate, *, cert_chain: Path, root_cert: Path, tmp: Path
) -> subprocess.CompletedProcess[str]:
    """``openssl verify`` of a leaf with cert-chain.pem as untrusted intermediates."""
    leaf_path = tmp / f"leaf-{leaf.serial_number:x}.pem"
    leaf_path.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    return subprocess.run(
        [
            "openssl",
            "verify",
            "-CAfile",
            str(root_cert),
            "-untrusted",
            str(cert_chain),
            str(leaf_path),
        ],
        capture_output=True,
        text=True,
        check=False,
    )


def assert_openssl_enforces_trust_domain(
    directory: Path, trust_domain: str, foreign: str, tmp: Path
) -> None:
    """A workload of the cluster's own trust domain verifies; one claiming ``foreign`` does not."""
    ca_cert, ca_key = load_cluster_ca(directory)
    own, _ = issue_workload_cert(ca_cert, ca_key, f"spiffe://{trust_domain}/ns/default/sa/app")
    result = openssl_verify(
        own, cert_chain=directory / "cert-chain.pem", root_cert=directory / "root-cert.pem", tmp=tmp
    )
    assert result.returncode == 0, result.stdout + result.stderr
    alien, _ = issue_workload_cert(ca_cert, ca_key, f"spiffe://{foreign}/ns/default/sa/app")
    result = openssl_verify(
        alien,
        cert_chain=directory / "cert-chain.pem",
        root_cert=directory / "root-cert.pem",
        tmp=tmp,
    )
    assert result.returncode != 0
    assert "permitted subtree violation" in result.stderr, result.stderr


def handmade_cacerts() -> CACerts:
    """A root and an intermediate made by hand, as with Istio's tools/certs."""
    now = datetime.now(UTC)

    def cert(subject: str, key: Any, issuer: str, signer: Any, pathlen: int | None) -> Any:
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(hours=1))
            .not_valid_after(now + timedelta(days=365))
            .add_extension(x509.BasicConstraints(ca=True, path_length=pathlen), critical=True)
            .sign(signer, hashes.SHA256())
        )

    root_key, ca_key = (
        ec.generate_private_key(ec.SECP256R1()),
        ec.generate_private_key(ec.SECP256R1()),
    )
    root = cert("Root CA", root_key, "Root CA", root_key, None)
    ca = cert("Intermediate CA", ca_key, "Root CA", root_key, 0)
    return CACerts(pem(ca), private_key_pem(ca_key), pem(ca) + pem(root), pem(root))
