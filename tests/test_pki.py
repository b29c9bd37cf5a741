"""The checks istiod relies on and the cluster CA policy, as trustmgr applies
them to what it reads: keys, ``cluster_ca_problems`` branch by branch, and
``istiod_problems``."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.conformance import (
    OTHER_DOMAIN,
    TRUST_DOMAIN,
    Changes,
    Issuer,
    Upstream,
    key_usage,
    make_ca,
    make_cluster_ca,
    permitted,
    san,
)
from trustmgr.bundles import load_certificates
from trustmgr.bundles import pem as cert_pem
from trustmgr.errors import BadMaterialError
from trustmgr.pki import (
    CACerts,
    cluster_ca_problems,
    istiod_problems,
    load_private_key,
    private_key_pem,
)
from trustmgr.providers.base import BACKDATE

RSA = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def pem(
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, fmt: serialization.PrivateFormat
) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())


@pytest.mark.parametrize(
    "data",
    [
        pem(RSA, serialization.PrivateFormat.PKCS8),
        pem(RSA, serialization.PrivateFormat.TraditionalOpenSSL),  # PKCS#1
        pem(
            ec.generate_private_key(ec.SECP256R1()), serialization.PrivateFormat.TraditionalOpenSSL
        ),  # SEC1
    ],
)
def test_loads_the_formats_istiod_loads(data: bytes) -> None:
    load_private_key(data, "ca-key.pem")


def test_refuses_a_corrupted_rsa_key() -> None:
    n = RSA.private_numbers()
    broken = rsa.RSAPrivateNumbers(n.p, n.q, n.d + 2, n.dmp1, n.dmq1, n.iqmp, n.public_numbers)
    data = pem(
        broken.private_key(unsafe_skip_rsa_key_validation=True), serialization.PrivateFormat.PKCS8
    )
    with pytest.raises(BadMaterialError, match="the RSA private key is inconsistent"):
        load_private_key(data, "ca-key.pem")


def test_refuses_an_encrypted_key() -> None:
    data = RSA.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"pw"),
    )
    with pytest.raises(
        BadMaterialError, match="the key is encrypted; istiod needs an unencrypted key"
    ):
        load_private_key(data, "ca-key.pem")


def test_refuses_two_keys_or_none() -> None:
    data = pem(RSA, serialization.PrivateFormat.PKCS8)
    with pytest.raises(BadMaterialError, match="expected exactly one PEM private key"):
        load_private_key(data + data, "ca-key.pem")
    with pytest.raises(BadMaterialError, match="expected exactly one PEM private key"):
        load_private_key(b"", "ca-key.pem")


# --- cluster_ca_problems: the cluster CA policy, branch by branch ---------------------------

NOW = datetime(2031, 3, 1, 12, 0, tzinfo=UTC)
SPIFFE = f"spiffe://{TRUST_DOMAIN}"
BC, KU = x509.BasicConstraints, x509.KeyUsage
SAN, NC = x509.SubjectAlternativeName, x509.NameConstraints
EXACTLY = f"expected exactly [{TRUST_DOMAIN}]"


@pytest.fixture(scope="module")
def upstream() -> Upstream:
    return Upstream.create(NOW)


def cluster_ca(upstream: Upstream, changes: Changes | None = None) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    return make_cluster_ca(upstream.issuing, key.public_key(), now=NOW, changes=changes)


@pytest.mark.parametrize(
    ("changes", "problems"),
    [
        pytest.param({}, [], id="as-designed"),
        pytest.param(
            {BC: (BC(ca=False, path_length=None), True)},
            ["is not a CA (BasicConstraints CA:TRUE missing)"],
            id="not-a-ca",
        ),
        pytest.param(
            {BC: None},
            ["is not a CA (BasicConstraints CA:TRUE missing)"],
            id="no-basic-constraints",
        ),
        pytest.param(
            {BC: (BC(ca=True, path_length=2), True)},
            ["has path length 2, expected 0"],
            id="path-length-2",
        ),
        pytest.param(
            {BC: (BC(ca=True, path_length=None), True)},
            ["has no path length limit, expected path length 0"],
            id="no-path-length",
        ),
        pytest.param(
            {BC: (BC(ca=True, path_length=0), False)},
            ["BasicConstraints is not critical"],
            id="basic-constraints-not-critical",
        ),
        pytest.param({KU: None}, ["has no KeyUsage (keyCertSign is required)"], id="no-key-usage"),
        pytest.param(
            {KU: (key_usage(key_cert_sign=False), True)},
            ["KeyUsage lacks keyCertSign"],
            id="no-keycertsign",
        ),
        pytest.param(
            {KU: (key_usage(crl_sign=False), True)}, ["KeyUsage lacks cRLSign"], id="no-crlsign"
        ),
        pytest.param(
            {KU: (key_usage(key_cert_sign=False, crl_sign=False), False)},
            ["KeyUsage lacks keyCertSign", "KeyUsage lacks cRLSign", "KeyUsage is not critical"],
            id="key-usage-empty-and-not-critical",
        ),
        pytest.param(
            {KU: (key_usage(digital_signature=False), True)}, [], id="digital-signature-optional"
        ),
        pytest.param(
            {
                x509.ExtendedKeyUsage: (
                    x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                    False,
                )
            },
            ["lists extended key usages; a cluster CA must have none"],
            id="extended-key-usage",
        ),
        pytest.param({SAN: None}, [f"has no URI SAN {SPIFFE}"], id="no-san"),
        pytest.param(
            {SAN: san(f"{SPIFFE}/ns/default")}, [f"has no URI SAN {SPIFFE}"], id="san-with-a-path"
        ),
        pytest.param(
            {SAN: san(SPIFFE, f"spiffe://{OTHER_DOMAIN}")},
            [f"also names spiffe://{OTHER_DOMAIN}; a cluster CA names its own trust domain only"],
            id="san-of-a-second-trust-domain",
        ),
        pytest.param({SAN: san(SPIFFE, "https://ca.example/")}, [], id="non-spiffe-uri-san"),
        pytest.param(
            {NC: None},
            [f"has no NameConstraints; expected permitted URI subtree {TRUST_DOMAIN}"],
            id="no-name-constraints",
        ),
        pytest.param(
            {NC: permitted(x509.UniformResourceIdentifier(TRUST_DOMAIN), critical=False)},
            ["NameConstraints is not critical"],
            id="name-constraints-not-critical",
        ),
        pytest.param(
            {NC: permitted(x509.UniformResourceIdentifier(SPIFFE))},
            [f"permits URI subtrees ['{SPIFFE}'], {EXACTLY}"],
            id="name-constraint-in-spiffe-form",
        ),
        pytest.param(
            {NC: permitted(x509.UniformResourceIdentifier(f".{TRUST_DOMAIN}"))},
            [f"permits URI subtrees ['.{TRUST_DOMAIN}'], {EXACTLY}"],
            id="name-constraint-of-subdomains",
        ),
        pytest.param(
            {
                NC: (
                    NC(
                        permitted_subtrees=None,
                        excluded_subtrees=[x509.UniformResourceIdentifier(OTHER_DOMAIN)],
                    ),
                    True,
                )
            },
            [f"permits URI subtrees none, {EXACTLY}"],
            id="name-constraint-excluding-only",
        ),
    ],
)
def test_cluster_ca_problems(upstream: Upstream, changes: Changes, problems: list[str]) -> None:
    assert cluster_ca_problems(cluster_ca(upstream, changes), TRUST_DOMAIN, now=NOW) == problems


def test_cluster_ca_problems_are_all_listed_at_once(upstream: Upstream) -> None:
    """A certificate without extensions (what moto issues) breaks every rule at once."""
    bare = cluster_ca(upstream, {BC: None, KU: None, SAN: None, NC: None})
    assert cluster_ca_problems(bare, TRUST_DOMAIN, now=NOW) == [
        "is not a CA (BasicConstraints CA:TRUE missing)",
        "has no KeyUsage (keyCertSign is required)",
        f"has no URI SAN {SPIFFE}",
        f"has no NameConstraints; expected permitted URI subtree {TRUST_DOMAIN}",
    ]


def test_cluster_ca_problems_of_another_trust_domain(upstream: Upstream) -> None:
    assert cluster_ca_problems(cluster_ca(upstream), OTHER_DOMAIN, now=NOW) == [
        f"has no URI SAN spiffe://{OTHER_DOMAIN}",
        f"also names {SPIFFE}; a cluster CA names its own trust domain only",
        f"permits URI subtrees ['{TRUST_DOMAIN}'], expected exactly [{OTHER_DOMAIN}]",
    ]


def test_cluster_ca_validity_bounds(upstream: Upstream) -> None:
    ca = cluster_ca(upstream)
    start, end = ca.not_valid_before_utc, ca.not_valid_after_utc
    assert start == NOW - BACKDATE
    early = start - timedelta(seconds=1)
    assert cluster_ca_problems(ca, TRUST_DOMAIN, now=early) == [
        "is not valid before 2031-03-01T11:55:00Z"
    ]
    assert cluster_ca_problems(ca, TRUST_DOMAIN, now=start) == []
    assert cluster_ca_problems(ca, TRUST_DOMAIN, now=end - timedelta(seconds=1)) == []
    assert cluster_ca_problems(ca, TRUST_DOMAIN, now=end) == ["expired at 2031-03-02T12:00:00Z"]


# --- istiod_problems: istiod's load checks ---------------------------------------------------


def cacerts(
    upstream: Upstream,
    *,
    key: ec.EllipticCurvePrivateKey | None = None,
    issuing: Issuer | None = None,
    upper: Issuer | None = None,
    roots: tuple[x509.Certificate, ...] | None = None,
    changes: Changes | None = None,
) -> CACerts:
    """A cacerts set under ``upstream`` (or the ``issuing`` and ``upper`` CAs
    given), as trustmgr writes it, with what is given in place."""
    issuing = issuing or upstream.issuing
    upper = upper or upstream.upper
    own = ec.generate_private_key(ec.SECP256R1())
    ca = make_cluster_ca(issuing, own.public_key(), now=NOW, changes=changes)
    return CACerts(
        ca_cert=cert_pem(ca),
        ca_key=private_key_pem(key or own),
        cert_chain=b"".join(
            cert_pem(c) for c in (ca, issuing.cert, upper.cert, upstream.root.cert)
        ),
        root_cert=b"".join(cert_pem(r) for r in roots or (upstream.root.cert,)),
    )


def test_istiod_loads_a_well_formed_set(upstream: Upstream) -> None:
    assert istiod_problems(cacerts(upstream), now=NOW) == []


def test_istiod_refuses_a_key_that_is_not_the_certificates(upstream: Upstream) -> None:
    material = cacerts(upstream, key=ec.generate_private_key(ec.SECP256R1()))
    assert istiod_problems(material, now=NOW) == ["ca-key.pem does not match ca-cert.pem"]


@pytest.mark.parametrize(
    ("usages", "refused"),
    [
        ([ExtendedKeyUsageOID.CLIENT_AUTH], True),
        ([ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.CODE_SIGNING], True),
        ([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH], False),
        ([ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE], False),
    ],
    ids=["client-auth", "client-auth-and-code-signing", "with-server-auth", "any"],
)
def test_istiod_refuses_a_ca_listing_ekus_without_server_auth(
    upstream: Upstream, usages: list[x509.ObjectIdentifier], refused: bool
) -> None:
    eku: Changes = {x509.ExtendedKeyUsage: (x509.ExtendedKeyUsage(usages), False)}
    material = cacerts(upstream, changes=eku)
    name = load_certificates(material.ca_cert, "ca-cert.pem")[0].subject.rfc4514_string()
    expected = [f"{name} lists extended key usages without serverAuth; Go's verifier rejects it"]
    assert istiod_problems(material, now=NOW) == (expected if refused else [])


def test_istiod_refuses_an_issuer_listing_ekus_without_server_auth(upstream: Upstream) -> None:
    """Go nests EKUs down the whole path, so an intermediate's count too."""
    issuing = _issuing_ca(upstream, eku=[ExtendedKeyUsageOID.CLIENT_AUTH])
    assert istiod_problems(cacerts(upstream, issuing=issuing), now=NOW) == [
        f"{issuing.name} lists extended key usages without serverAuth; Go's verifier rejects it"
    ]


def _issuing_ca(
    upstream: Upstream,
    *,
    eku: list[x509.ObjectIdentifier] | None = None,
    ca: bool = True,
    path_length: int | None = None,
) -> Issuer:
    if eku is None:
        return make_ca(
            "Other Issuing CA", now=NOW, issuer=upstream.upper, ca=ca, path_length=path_length
        )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "EKU Issuing CA")]))
        .issuer_name(upstream.upper.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - timedelta(days=1))
        .not_valid_after(NOW + timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(key_usage(digital_signature=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(eku), critical=False)
        .sign(upstream.upper.key, hashes.SHA256())
    )
    return Issuer(cert, key)


NOT_CHAINING = "ca-cert.pem does not chain to any root in root-cert.pem"


def test_istiod_refuses_a_ca_that_does_not_chain_to_the_bundle(upstream: Upstream) -> None:
    other = make_ca("Another Root", now=NOW).cert
    assert istiod_problems(cacerts(upstream, roots=(other,)), now=NOW) == [NOT_CHAINING]


def test_istiod_refuses_a_chain_missing_a_link(upstream: Upstream) -> None:
    material = cacerts(upstream)
    ca, _, upper, root = load_certificates(material.cert_chain, "cert-chain.pem")
    gap = CACerts(
        material.ca_cert,
        material.ca_key,
        b"".join(cert_pem(c) for c in (ca, upper, root)),
        cert_pem(root),
    )
    assert istiod_problems(gap, now=NOW) == [NOT_CHAINING]


def test_istiod_refuses_a_ca_cert_that_is_not_a_ca(upstream: Upstream) -> None:
    not_ca: Changes = {BC: (BC(ca=False, path_length=None), True)}
    assert istiod_problems(cacerts(upstream, changes=not_ca), now=NOW) == [
        "ca-cert.pem is not a CA certificate"
    ]


def test_istiod_takes_no_intermediate_that_is_not_a_ca(upstream: Upstream) -> None:
    """Go's x509.Verify skips a non-CA intermediate, so no path is left."""
    issuing = _issuing_ca(upstream, ca=False)
    assert istiod_problems(cacerts(upstream, issuing=issuing), now=NOW) == [NOT_CHAINING]


def test_istiod_applies_path_lengths_as_go_does(upstream: Upstream) -> None:
    """Go counts the intermediates between a parent and the certificate being
    verified, here the cluster CA: a pathlen-0 issuer of the cluster CA loads
    (FACTS: the cross-signing trap), a pathlen-0 CA above it does not."""
    issuing = _issuing_ca(upstream, path_length=0)
    assert istiod_problems(cacerts(upstream, issuing=issuing), now=NOW) == []
    upper = make_ca("Short Upper CA", now=NOW, issuer=upstream.root, path_length=0)
    issuing = make_ca("Other Issuing CA", now=NOW, issuer=upper)
    material = cacerts(upstream, issuing=issuing, upper=upper)
    assert istiod_problems(material, now=NOW) == [NOT_CHAINING]


def test_istiod_refuses_a_path_outside_its_validity(upstream: Upstream) -> None:
    material = cacerts(upstream)
    ca = load_certificates(material.ca_cert, "ca-cert.pem")[0]
    for moment in (ca.not_valid_before_utc - timedelta(seconds=1), NOW + timedelta(days=2)):
        assert istiod_problems(material, now=moment) == [
            f"{ca.subject.rfc4514_string()} is outside its validity period"
        ]
