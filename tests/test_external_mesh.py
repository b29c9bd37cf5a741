"""An external mesh (SPIRE-run, a partner's): trusted only through its imported
SPIFFE bundle, and only where a federation says so."""

from __future__ import annotations

import http.server
import ipaddress
import ssl
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.conftest import snapshot, trustmgr
from tests.test_federation import make_root
from trustmgr import spiffe
from trustmgr.bundles import TrustBundle, fingerprint

PARTNER = make_root("Partner SPIRE root")

CONFIG = """\
stateStore: {file: {path: state}}
providers:
  corp: {selfSigned: {passphraseEnv: TRUSTMGR_PASSPHRASE}}
meshes:
  web:
    trustDomain: web.example
    provider: corp
    clusters:
      web-1: {directory: {path: out/web-1}}
  api:
    trustDomain: api.example
    provider: corp
    clusters:
      api-1: {directory: {path: out/api-1}}
  partner:
    trustDomain: partner.example
    external: {spiffeBundle: SOURCE}
federations:
  - meshes: [web, partner]
"""


def roots_of(workdir: Path, cluster: str) -> tuple[str, ...]:
    return TrustBundle.from_pem(
        (workdir / "out" / cluster / "root-cert.pem").read_bytes()
    ).fingerprints


@pytest.fixture
def partner_file(workdir: Path) -> Path:
    bundle = workdir / "partner.json"
    bundle.write_bytes(spiffe.encode((PARTNER,), sequence=5, refresh_hint=300))
    (workdir / "trustmgr.yaml").write_text(CONFIG.replace("SOURCE", "{file: partner.json}"))
    return bundle


def test_federated_external_roots_reach_only_the_federated_mesh(
    partner_file: Path, workdir: Path
) -> None:
    run = trustmgr("validate")
    assert run.code == 0
    assert "includes partner, whose CAs may lack name constraints" in run.err
    assert trustmgr("bootstrap").code == 0
    assert fingerprint(PARTNER) in roots_of(workdir, "web-1")
    assert fingerprint(PARTNER) not in roots_of(workdir, "api-1")
    assert trustmgr("verify").code == 0


def test_a_new_partner_root_is_appended_and_hot_reloadable(
    partner_file: Path, workdir: Path
) -> None:
    assert trustmgr("bootstrap").code == 0
    before = roots_of(workdir, "web-1")
    rotated = make_root("Partner SPIRE root 2")
    partner_file.write_bytes(spiffe.encode((PARTNER, rotated), sequence=6, refresh_hint=300))
    text = (workdir / "trustmgr.yaml").read_text()
    (workdir / "trustmgr.yaml").write_text(
        text.replace(
            "web-1: {directory: {path: out/web-1}}",
            "web-1: {directory: {path: out/web-1}, istio: {multiRoot: true}}",
        )
    )
    plan = trustmgr("plan")
    assert "BundleChanged" in plan.out and "restart" not in plan.out
    assert trustmgr("bootstrap").code == 0
    assert roots_of(workdir, "web-1") == (*before, fingerprint(rotated))


def test_a_replayed_older_bundle_is_refused(partner_file: Path, workdir: Path) -> None:
    assert trustmgr("bootstrap").code == 0
    partner_file.write_bytes(spiffe.encode((make_root("evil"),), sequence=4, refresh_hint=300))
    before = snapshot(workdir)
    run = trustmgr("bootstrap")
    assert run.code == 2
    assert run.err.strip() == (
        "trustmgr: mesh partner: the SPIFFE bundle's sequence went backwards (4 < 5); "
        "refusing a possibly replayed bundle"
    )
    assert snapshot(workdir) == before


def test_an_invalid_imported_bundle_is_refused(partner_file: Path, workdir: Path) -> None:
    partner_file.write_bytes(
        spiffe.encode((make_root("leaf", ca=False),), sequence=9, refresh_hint=300)
    )
    run = trustmgr("bootstrap")
    assert run.code == 2
    assert run.err.strip() == "trustmgr: partner.json: keys[0] is not a CA certificate"
    assert not (workdir / "out").exists()


# --- from an HTTPS URL ------------------------------------------------------------------------


def _tls_server_material(tmp: Path) -> tuple[Path, Path, Path]:
    now = datetime.now(UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bundle server CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = (tmp / "server.pem", tmp / "server.key", tmp / "ca.pem")
    paths[0].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    paths[2].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    return paths


@pytest.fixture
def bundle_url(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    cert, key, ca = _tls_server_material(tmp_path)
    body = spiffe.encode((PARTNER,), sequence=1, refresh_hint=60)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}/bundle", ca
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_bundle_from_https_url(bundle_url: tuple[str, Path], workdir: Path) -> None:
    url, ca = bundle_url
    (workdir / "trustmgr.yaml").write_text(
        CONFIG.replace("SOURCE", f"{{url: '{url}', caFile: '{ca}'}}")
    )
    run = trustmgr("bootstrap")
    assert run.code == 0, run.err
    assert fingerprint(PARTNER) in roots_of(workdir, "web-1")


def test_an_unverifiable_bundle_server_is_refused(
    bundle_url: tuple[str, Path], workdir: Path
) -> None:
    url, _ = bundle_url
    (workdir / "trustmgr.yaml").write_text(CONFIG.replace("SOURCE", f"{{url: '{url}'}}"))
    run = trustmgr("bootstrap")
    assert run.code == 1
    assert run.err.startswith(f"trustmgr: mesh partner: cannot fetch SPIFFE bundle from {url}: ")
    assert "CERTIFICATE_VERIFY_FAILED" in run.err
    assert not (workdir / "out").exists()
