"""Federation as values: bundle order, hot-reload transitions, the trust matrix,
findings, the meshConfig fragment and SPIFFE bundles."""

from __future__ import annotations

import base64
import json
import xml.etree.ElementTree as ET
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from tests.conftest import trustmgr
from trustmgr import spiffe
from trustmgr.bundles import TrustBundle, fingerprint
from trustmgr.config import parse
from trustmgr.errors import BadMaterialError
from trustmgr.federation import Federation, MeshRoots, Trust, order_bundle
from trustmgr.planner import Reload, bundle_reload


def make_root(name: str, *, ca: bool = True, days: int = 365) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.now(UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )


R = {n: make_root(n) for n in "abcd"}


def fps(*names: str) -> tuple[str, ...]:
    return tuple(fingerprint(R[n]) for n in names)


# --- order and hot reload ------------------------------------------------------


def test_order_keeps_existing_roots_in_place_and_appends_new_ones() -> None:
    canonical = TrustBundle.of([R["c"], R["a"], R["b"]])
    assert order_bundle(canonical, fps("a", "b")).fingerprints == fps("a", "b", "c")
    assert order_bundle(canonical, ()).fingerprints == fps("c", "a", "b")
    assert order_bundle(TrustBundle.of([R["a"], R["c"]]), fps("a", "b", "c")).fingerprints == fps(
        "a", "c"
    )


@pytest.mark.parametrize(
    ("old", "new", "version", "expected"),
    [
        ("ab", "abc", "1.29", Reload.HOT),  # add: appended
        ("abc", "bc", "1.29", Reload.HOT),  # remove first
        ("abc", "ab", "1.29", Reload.HOT),  # remove last
        ("abc", "ac", "1.29", Reload.RESTART),  # remove middle: no longer a byte substring
        ("abc", "ac", "1.30", Reload.HOT),  # 1.30+ compares sets
        ("ab", "ac", "1.30", Reload.RESTART),  # neither holds the other
        ("ab", "abc", None, Reload.HOT),
    ],
)
def test_bundle_transitions(old: str, new: str, version: str | None, expected: Reload) -> None:
    assert bundle_reload(fps(*old), fps(*new), multi_root=True, istio_version=version) is expected


def test_any_root_change_needs_a_restart_without_multi_root() -> None:
    assert (
        bundle_reload(fps("a"), fps("a", "b"), multi_root=False, istio_version="1.30")
        is Reload.RESTART
    )
    assert bundle_reload(fps("a"), fps("a"), multi_root=False, istio_version="1.30") is Reload.HOT


def test_bundle_refuses_anything_but_certificates() -> None:
    key_pem = b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"
    with pytest.raises(
        BadMaterialError, match="holds a PRIVATE KEY block; only certificates belong here"
    ):
        TrustBundle.from_pem(TrustBundle.of([R["a"]]).to_pem() + key_pem)
    with pytest.raises(BadMaterialError, match="unexpected text"):
        TrustBundle.from_pem(b"junk\n" + TrustBundle.of([R["a"]]).to_pem())


def test_bundle_dedupes_by_fingerprint() -> None:
    assert TrustBundle.of([R["a"], R["b"], R["a"]]).fingerprints == fps("a", "b")


# --- matrix and findings ---------------------------------------------------------

CONFIG = """\
providers:
  p1: {selfSigned: {passphraseEnv: X}}
  p2: {selfSigned: {passphraseEnv: X}}
meshes:
  a: {trustDomain: a.test, provider: p1, clusters: {a1: {directory: {path: out/a1}}}}
  b: {trustDomain: b.test, provider: p2, clusters: {b1: {directory: {path: out/b1}}}}
  c: {trustDomain: c.test, provider: p2, clusters: {c1: {directory: {path: out/c1}}}}
federations:
  - meshes: [a, b]
"""


def federation(text: str = CONFIG, roots: dict[str, str] | None = None) -> Federation:
    config = parse(text, "test.yaml")
    roots = roots or {"a": "a", "b": "b", "c": "b"}
    return Federation(
        config,
        {
            name: MeshRoots(name, mesh.trust_domain, (R[roots[name]],), mesh.provider)
            for name, mesh in config.meshes.items()
        },
    )


def test_trust_matrix() -> None:
    f = federation()
    trust = {(c.accepting, c.presenting): c.trust for c in f.matrix()}
    assert trust[("a", "a")] is Trust.OWN
    assert trust[("a", "b")] is Trust.FEDERATION and trust[("b", "a")] is Trust.FEDERATION
    # a trusts b's root, which c shares: only the trust-domain check keeps c out.
    assert trust[("a", "c")] is Trust.ROOT_ONLY
    assert trust[("c", "b")] is Trust.ROOT_ONLY
    assert trust[("c", "a")] is Trust.NONE
    assert [c.accepted for c in f.matrix() if c.accepting == "c"] == [False, False, True]


def test_bundles_follow_federations_only() -> None:
    f = federation()
    assert f.bundle("a") == TrustBundle.of([R["a"], R["b"]])
    assert f.bundle("b") == TrustBundle.of([R["b"], R["a"]])
    assert f.bundle("c") == TrustBundle.of([R["b"]])


def test_warns_on_unfederated_meshes_sharing_a_root() -> None:
    findings = federation().findings()
    assert [f.level for f in findings] == ["warning"]
    assert "meshes b and c share root" in findings[0].message


def test_refuses_shared_root_and_trust_domain() -> None:
    text = CONFIG.replace("c: {trustDomain: c.test", "c: {trustDomain: c.test")
    f = federation(text)
    object.__setattr__(f.meshes["c"], "trust_domain", "b.test")
    errors = [x for x in f.findings() if x.level == "error"]
    assert errors and "they are one mesh" in errors[0].message


def test_warns_on_federating_an_external_mesh() -> None:
    text = CONFIG + "  - meshes: [a, partner]\n"
    text = text.replace(
        "federations:",
        "  partner: {trustDomain: partner.test, external: {spiffeBundle: {file: p.json}}}\nfederations:",
    )
    config = parse(text, "t.yaml")
    roots = {
        n: MeshRoots(n, m.trust_domain, (R["d"] if n == "partner" else R[n],), m.provider)
        for n, m in config.meshes.items()
    }
    findings = Federation(config, roots).findings()
    assert any(
        "includes partner, whose CAs may lack name constraints" in f.message for f in findings
    )


# --- SPIFFE bundles ---------------------------------------------------------------


def test_spiffe_bundle_round_trip() -> None:
    data = spiffe.encode((R["a"], R["b"]), sequence=7, refresh_hint=300)
    document = json.loads(data)
    assert document["spiffe_sequence"] == 7 and document["spiffe_refresh_hint"] == 300
    for key in document["keys"]:
        assert key["use"] == "x509-svid" and len(key["x5c"]) == 1 and key["kty"] == "EC"
    bundle = spiffe.decode(data, source="t", now=datetime.now(UTC))
    assert TrustBundle.of(bundle.roots) == TrustBundle.of([R["a"], R["b"]])
    assert bundle.sequence == 7


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d["keys"][0].update(x5c=[]), "must hold exactly one x5c certificate"),
        (lambda d: d["keys"][0].update(use="sig"), "has use 'sig', expected x509-svid"),
        (lambda d: d["keys"][0].update(x5c=["bm90IGEgY2VydA=="]), "cannot be parsed"),
        (lambda d: d.update(keys=[]), "holds no X.509 authority"),
        (lambda d: d.update(spiffe_sequence="7"), "spiffe_sequence must be an integer"),
    ],
)
def test_spiffe_bundle_import_is_strict(
    mutate: Callable[[dict[str, Any]], object], message: str
) -> None:
    document = json.loads(spiffe.encode((R["a"],), sequence=1, refresh_hint=60))
    mutate(document)
    with pytest.raises(BadMaterialError, match=message):
        spiffe.decode(json.dumps(document).encode(), source="t", now=datetime.now(UTC))


def test_spiffe_bundle_import_refuses_non_ca_and_expired() -> None:
    leaf = make_root("leaf", ca=False)
    document = json.loads(spiffe.encode((leaf,), sequence=1, refresh_hint=60))
    with pytest.raises(BadMaterialError, match="is not a CA certificate"):
        spiffe.decode(json.dumps(document).encode(), source="t", now=datetime.now(UTC))
    expired = make_root("old", days=1)
    data = spiffe.encode((expired,), sequence=1, refresh_hint=60)
    with pytest.raises(BadMaterialError, match="expired at"):
        spiffe.decode(data, source="t", now=datetime.now(UTC) + timedelta(days=3))


# --- through the CLI --------------------------------------------------------------


def test_export_sequence_increases_only_on_change(quickstart: Path) -> None:
    assert trustmgr("-c", str(quickstart), "bootstrap").code == 0
    first = json.loads(trustmgr("-c", str(quickstart), "bundle", "export", "--mesh", "web").out)
    again = json.loads(trustmgr("-c", str(quickstart), "bundle", "export", "--mesh", "web").out)
    assert first == again and first["spiffe_sequence"] == 1
    x5c = {k["x5c"][0] for k in first["keys"]}
    web_root = TrustBundle.from_pem(
        (quickstart.parent / "out/web-east/root-cert.pem").read_bytes()
    ).roots[0]
    assert x5c == {base64.b64encode(web_root.public_bytes(Encoding.DER)).decode()}


def test_meshconfig_fragment(quickstart: Path) -> None:
    assert trustmgr("-c", str(quickstart), "bootstrap").code == 0
    run = trustmgr("-c", str(quickstart), "federation", "export", "--mesh", "payments")
    assert run.code == 0, run.err
    fragment = yaml.safe_load(run.out)
    assert fragment == {
        "meshConfig": {"trustDomain": "payments.example", "trustDomainAliases": ["web.example"]}
    }
    run = trustmgr(
        "-c", str(quickstart), "federation", "export", "--mesh", "payments", "--multi-root"
    )
    entries = yaml.safe_load(run.out)["meshConfig"]["caCertificates"]
    assert [e["trustDomains"] for e in entries] == [["payments.example"], ["web.example"]]
    roots = (quickstart.parent / "out/pci-east/root-cert.pem").read_text()
    assert "".join(e["pem"] for e in entries) == roots
    bad = trustmgr("-c", str(quickstart), "federation", "export", "--mesh", "nope")
    assert bad.code == 2 and "unknown mesh 'nope'" in bad.err


def test_trust_matrix_and_graph_commands(quickstart: Path, tmp_path: Path) -> None:
    assert trustmgr("-c", str(quickstart), "bootstrap").code == 0
    cells = json.loads(trustmgr("-c", str(quickstart), "trust", "matrix", "-o", "json").out)
    accepted = {(c["accepting"], c["presenting"]) for c in cells if c["accepted"]}
    assert accepted == {
        ("payments", "payments"),
        ("web", "web"),
        ("admin", "admin"),
        ("payments", "web"),
        ("web", "payments"),
    }
    svg = tmp_path / "g.svg"
    assert (
        trustmgr("-c", str(quickstart), "trust", "graph", "-f", "svg", "--out", str(svg)).code == 0
    )
    texts = {t.text for t in ET.parse(svg).iter("{http://www.w3.org/2000/svg}text")}
    assert {"payments", "web", "admin", "pci-root", "corp-root", "federation"} <= texts
    dot = trustmgr("-c", str(quickstart), "trust", "graph", "-f", "dot").out
    assert '"m:payments" -> "m:web" [dir=both' in dot
