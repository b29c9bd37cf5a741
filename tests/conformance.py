"""The provider conformance suite: one set of tests every provider passes, and
the answers no provider may give.

A provider's test module subclasses ``ProviderConformance`` and supplies a
``provider`` fixture (and may override ``supported_algorithms``). Besides
signing well, every provider's own answer is refused once tampered with.

``HOSTILE`` lists answers that each break one rule, built on an ``Upstream``
PKI made in the test (P-256), each with the exact refusal trustmgr must give;
a ``HostileProvider`` gives such an answer to whatever CSR it is asked to
sign. tests/test_hostile_providers.py runs each through the check and through
``trustmgr bootstrap``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.workload import assert_openssl_enforces_trust_domain
from trustmgr.bundles import TrustBundle
from trustmgr.errors import ProviderAnswerError
from trustmgr.pki import (
    ClusterCARequest,
    assemble,
    check_signed_ca,
    cluster_ca_request,
    istiod_problems,
)
from trustmgr.providers import Clock, Provider, SignedCA
from trustmgr.providers.base import BACKDATE
from trustmgr.providers.keys import KeyAlgorithm, ca_key_usage

TRUST_DOMAIN = "conformance.test"
OTHER_DOMAIN = "other.test"


def _name(cert: x509.Certificate) -> str:
    return cert.subject.rfc4514_string()


def _when(moment: datetime) -> str:
    return f"{moment:%Y-%m-%dT%H:%M:%SZ}"


Tampering = Callable[[Provider, ClusterCARequest, SignedCA, x509.Certificate], tuple[SignedCA, str]]
"""A provider, the request it signed, its answer and the answer's root → the
tampered answer and its exact refusal."""


def _another_csrs_certificate(
    provider: Provider, request: ClusterCARequest, answer: SignedCA, root: x509.Certificate
) -> tuple[SignedCA, str]:
    other = cluster_ca_request(TRUST_DOMAIN, cluster="c2", algorithm=KeyAlgorithm.ECDSA_P256)
    chain = provider.sign_ca(other.csr, timedelta(hours=1)).chain
    return SignedCA(chain, answer.roots), _unusable(
        "the issued certificate's public key is not the CSR's"
    )


TAMPERINGS: dict[str, Tampering] = {
    "another-csrs-certificate": _another_csrs_certificate,
    "root-inside-the-chain": lambda provider, request, answer, root: (
        SignedCA((*answer.chain, root), answer.roots),
        _unusable("chain includes a self-signed root; roots are reported apart"),
    ),
    "a-root-it-does-not-report": lambda provider, request, answer, root: (
        SignedCA(answer.chain, (make_ca("Foreign Root", now=datetime.now(UTC)).cert,)),
        _unusable("chain does not end under any root the provider reports"),
    ),
    "a-reported-root-not-self-signed": lambda provider, request, answer, root: (
        SignedCA(answer.chain, (*answer.roots, answer.chain[0])),
        _unusable(f"reported root {_name(answer.chain[0])} is not self-signed"),
    ),
    "an-empty-chain": lambda provider, request, answer, root: (
        SignedCA((), answer.roots),
        "returned an empty chain",
    ),
    "no-roots": lambda provider, request, answer, root: (
        SignedCA(answer.chain, ()),
        "reported no roots",
    ),
}


class ProviderConformance:
    supported_algorithms: tuple[KeyAlgorithm, ...] = (
        KeyAlgorithm.ECDSA_P256,
        KeyAlgorithm.ECDSA_P384,
        KeyAlgorithm.RSA_2048,
    )

    def test_signs_a_name_constrained_cluster_ca(self, provider: Provider) -> None:
        request = cluster_ca_request(TRUST_DOMAIN, cluster="c1", algorithm=KeyAlgorithm.ECDSA_P256)
        answer = provider.sign_ca(request.csr, timedelta(hours=24))
        root = check_signed_ca(
            answer, request, TRUST_DOMAIN, provider=provider.name, now=datetime.now(UTC)
        )
        assert root in TrustBundle.of(provider.roots())

    def test_ttl_is_honoured_or_shortened(self, provider: Provider) -> None:
        request = cluster_ca_request(TRUST_DOMAIN, cluster="c1", algorithm=KeyAlgorithm.ECDSA_P256)
        before = datetime.now(UTC)
        answer = provider.sign_ca(request.csr, timedelta(hours=2))
        assert answer.chain[0].not_valid_after_utc <= before + timedelta(hours=2, minutes=1)
        assert answer.chain[0].not_valid_after_utc > before + timedelta(minutes=30)

    def test_every_issuance_is_distinct(self, provider: Provider) -> None:
        serials = set()
        for _ in range(3):
            request = cluster_ca_request(
                TRUST_DOMAIN, cluster="c1", algorithm=KeyAlgorithm.ECDSA_P256
            )
            serials.add(provider.sign_ca(request.csr, timedelta(hours=1)).chain[0].serial_number)
        assert len(serials) == 3

    @pytest.mark.parametrize(
        "algorithm", [KeyAlgorithm.ECDSA_P256, KeyAlgorithm.ECDSA_P384, KeyAlgorithm.RSA_2048]
    )
    def test_key_algorithms(self, provider: Provider, algorithm: KeyAlgorithm) -> None:
        if algorithm not in self.supported_algorithms:
            pytest.skip(f"{provider.name} does not sign {algorithm} CSRs")
        request = cluster_ca_request(TRUST_DOMAIN, cluster="c1", algorithm=algorithm)
        answer = provider.sign_ca(request.csr, timedelta(hours=1))
        check_signed_ca(
            answer, request, TRUST_DOMAIN, provider=provider.name, now=datetime.now(UTC)
        )

    def test_istiod_loads_it_and_openssl_enforces_the_trust_domain(
        self, provider: Provider, tmp_path: Path
    ) -> None:
        request = cluster_ca_request(TRUST_DOMAIN, cluster="c1", algorithm=KeyAlgorithm.ECDSA_P256)
        answer = provider.sign_ca(request.csr, timedelta(hours=24))
        root = check_signed_ca(
            answer, request, TRUST_DOMAIN, provider=provider.name, now=datetime.now(UTC)
        )
        material = assemble(request, answer, root, TrustBundle.of(provider.roots()))
        assert istiod_problems(material, now=datetime.now(UTC)) == []
        for name, data in material.files().items():
            (tmp_path / name).write_bytes(data)
        assert_openssl_enforces_trust_domain(tmp_path, TRUST_DOMAIN, OTHER_DOMAIN, tmp_path)

    @pytest.mark.parametrize("tampering", list(TAMPERINGS))
    def test_its_answer_tampered_with_is_refused(self, provider: Provider, tampering: str) -> None:
        """The check that passes the provider's answer refuses it with one rule
        broken, and names the rule."""
        now = datetime.now(UTC)
        request = cluster_ca_request(TRUST_DOMAIN, cluster="c1", algorithm=KeyAlgorithm.ECDSA_P256)
        answer = provider.sign_ca(request.csr, timedelta(hours=1))
        root = check_signed_ca(answer, request, TRUST_DOMAIN, provider=provider.name, now=now)
        tampered, refusal = TAMPERINGS[tampering](provider, request, answer, root)
        with pytest.raises(ProviderAnswerError) as info:
            check_signed_ca(tampered, request, TRUST_DOMAIN, provider=provider.name, now=now)
        assert str(info.value) == f"provider {provider.name} {refusal}"


# --- answers no provider may give ---------------------------------------------------------


@dataclass(frozen=True)
class Issuer:
    """A CA certificate and its key, made in the test."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def name(self) -> str:
        return _name(self.cert)


def make_ca(
    common_name: str,
    *,
    now: datetime,
    issuer: Issuer | None = None,
    ca: bool = True,
    path_length: int | None = None,
    key_usage: x509.KeyUsage | None = None,
    not_before: datetime | None = None,
    not_after: datetime | None = None,
) -> Issuer:
    """A P-256 root (without ``issuer``) or intermediate, valid from a day
    before ``now`` for ten years, with keyCertSign and cRLSign unless
    ``key_usage`` says otherwise."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.cert.subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or now - timedelta(days=1))
        .not_valid_after(not_after or now + timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=path_length), critical=True)
        .add_extension(key_usage or ca_key_usage(digital_signature=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(issuer.key if issuer else key, hashes.SHA256())
    )
    return Issuer(cert, key)


Changes = Mapping[type[x509.ExtensionType], tuple[x509.ExtensionType, bool] | None]
"""Extension type → (value, critical), or None to leave the extension out."""


def cluster_ca_extensions(
    trust_domain: str = TRUST_DOMAIN,
) -> dict[type[x509.ExtensionType], tuple[x509.ExtensionType, bool] | None]:
    """Every extension DESIGN "Hierarchy" requires of a cluster CA, with its criticality."""
    return {
        x509.BasicConstraints: (x509.BasicConstraints(ca=True, path_length=0), True),
        x509.KeyUsage: (ca_key_usage(), True),
        x509.SubjectAlternativeName: san(f"spiffe://{trust_domain}"),
        x509.NameConstraints: permitted(x509.UniformResourceIdentifier(trust_domain)),
    }


def make_cluster_ca(
    issuer: Issuer,
    public_key: CertificatePublicKeyTypes,
    *,
    now: datetime,
    subject: x509.Name | None = None,
    changes: Changes | None = None,
    not_before: datetime | None = None,
    not_after: datetime | None = None,
) -> x509.Certificate:
    """A cluster CA for ``TRUST_DOMAIN`` as trustmgr accepts it, valid from
    ``BACKDATE`` before ``now`` for a day, but for ``changes`` to its extensions."""
    name = subject or x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "c1 cluster CA")])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or now - BACKDATE)
        .not_valid_after(not_after or now + timedelta(days=1))
    )
    for extension in {**cluster_ca_extensions(), **(changes or {})}.values():
        if extension is not None:
            builder = builder.add_extension(extension[0], critical=extension[1])
    return builder.sign(issuer.key, hashes.SHA256())


def key_usage(**usage: bool) -> x509.KeyUsage:
    """A cluster CA's KeyUsage (digitalSignature, keyCertSign, cRLSign), changed by ``usage``."""
    flags = dict.fromkeys(
        ("content_commitment", "key_encipherment", "data_encipherment", "key_agreement"), False
    )
    flags |= {"digital_signature": True, "key_cert_sign": True, "crl_sign": True}
    return x509.KeyUsage(**(flags | usage), encipher_only=False, decipher_only=False)


def san(*uris: str) -> tuple[x509.ExtensionType, bool]:
    return x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]), False


def permitted(*names: x509.GeneralName, critical: bool = True) -> tuple[x509.ExtensionType, bool]:
    return x509.NameConstraints(permitted_subtrees=list(names), excluded_subtrees=None), critical


@dataclass(frozen=True)
class Upstream:
    """A provider's PKI: root → upper CA → issuing CA, which signs cluster CAs."""

    root: Issuer
    upper: Issuer
    issuing: Issuer

    @classmethod
    def create(cls, now: datetime) -> Upstream:
        root = make_ca("Test Root", now=now)
        upper = make_ca("Test Upper CA", now=now, issuer=root)
        return cls(root, upper, make_ca("Test Issuing CA", now=now, issuer=upper))

    def answer(
        self,
        csr: x509.CertificateSigningRequest,
        *,
        now: datetime,
        key: CertificatePublicKeyTypes | None = None,
        issuing: Issuer | None = None,
        changes: Changes | None = None,
        not_before: datetime | None = None,
        not_after: datetime | None = None,
    ) -> SignedCA:
        """A well-behaved provider's answer to ``csr`` (chain: cluster CA,
        issuing CA, upper CA; roots: the root), but for what is given:
        another ``key`` or ``issuing`` CA, ``changes`` to the extensions, the
        validity."""
        issuing = issuing or self.issuing
        ca = make_cluster_ca(
            issuing,
            key or csr.public_key(),
            now=now,
            subject=csr.subject,
            changes=changes,
            not_before=not_before,
            not_after=not_after,
        )
        return SignedCA((ca, issuing.cert, self.upper.cert), (self.root.cert,))


Answer = Callable[[Upstream, x509.CertificateSigningRequest, datetime], tuple[SignedCA, str]]
"""The PKI, the CSR and the time → the answer, and its refusal (after ``provider <name> ``)."""


@dataclass(frozen=True)
class Hostile:
    """An answer that breaks one rule, and the refusal it must meet."""

    id: str
    answer: Answer


def _unusable(*problems: str) -> str:
    return f"gave an unusable certificate: {'; '.join(problems)}"


def _policy(id: str, changes: Changes, *problems: str) -> Hostile:
    """The cluster CA breaks a rule of DESIGN "Hierarchy"; nothing else is wrong."""
    return Hostile(
        id,
        lambda up, csr, now: (
            up.answer(csr, now=now, changes=changes),
            _unusable(*(f"the issued CA {p}" for p in problems)),
        ),
    )


def _bad_issuing(
    id: str,
    problem: str,
    *,
    ca: bool = True,
    path_length: int | None = None,
    key_usage: x509.KeyUsage | None = None,
    expired: bool = False,
) -> Hostile:
    """The CA that signs the cluster CA is unfit to sign it; ``problem`` after its name."""

    def answer(
        up: Upstream, csr: x509.CertificateSigningRequest, now: datetime
    ) -> tuple[SignedCA, str]:
        issuing = make_ca(
            f"Unfit Issuing CA {id}",
            now=now,
            issuer=up.upper,
            ca=ca,
            path_length=path_length,
            key_usage=key_usage,
            not_before=now - timedelta(days=2) if expired else None,
            not_after=now - timedelta(minutes=1) if expired else None,
        )
        result = up.answer(csr, now=now, issuing=issuing)
        problems = [f"issuer {issuing.name} {problem}"]
        if expired:
            problems[0] += f" {_when(issuing.cert.not_valid_after_utc)}"
            problems.append(
                f"the issued CA outlives its issuer: notAfter "
                f"{_when(result.chain[0].not_valid_after_utc)} is after "
                f"{_when(issuing.cert.not_valid_after_utc)}"
            )
        return result, _unusable(*problems)

    return Hostile(id, answer)


def _key_is_not_the_csrs(
    up: Upstream, csr: x509.CertificateSigningRequest, now: datetime
) -> tuple[SignedCA, str]:
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    return up.answer(csr, now=now, key=key), _unusable(
        "the issued certificate's public key is not the CSR's"
    )


def _chain_out_of_order(
    up: Upstream, csr: x509.CertificateSigningRequest, now: datetime
) -> tuple[SignedCA, str]:
    ca, issuing, upper = up.answer(csr, now=now).chain
    return SignedCA((ca, upper, issuing), (up.root.cert,)), _unusable(
        f"chain is out of order: {_name(ca)} is not issued by {_name(upper)}",
        f"chain is out of order: {_name(upper)} is not issued by {_name(issuing)}",
        "chain does not end under any root the provider reports",
    )


def _root_inside_the_chain(
    up: Upstream, csr: x509.CertificateSigningRequest, now: datetime
) -> tuple[SignedCA, str]:
    good = up.answer(csr, now=now)
    return SignedCA((*good.chain, up.root.cert), good.roots), _unusable(
        "chain includes a self-signed root; roots are reported apart"
    )


def _not_under_a_reported_root(
    up: Upstream, csr: x509.CertificateSigningRequest, now: datetime
) -> tuple[SignedCA, str]:
    other = make_ca("Another Root", now=now).cert
    return SignedCA(up.answer(csr, now=now).chain, (other,)), _unusable(
        "chain does not end under any root the provider reports"
    )


def _root_not_self_signed(
    up: Upstream, csr: x509.CertificateSigningRequest, now: datetime
) -> tuple[SignedCA, str]:
    chain = up.answer(csr, now=now).chain[:2]
    return SignedCA(chain, (up.upper.cert,)), _unusable(
        f"reported root {up.upper.name} is not self-signed"
    )


def _upper_path_length_too_short(
    up: Upstream, csr: x509.CertificateSigningRequest, now: datetime
) -> tuple[SignedCA, str]:
    # The cross-signing trap: fine for istiod's load check, fatal for every leaf.
    upper = make_ca("Short Upper CA", now=now, issuer=up.root, path_length=1)
    issuing = make_ca("Test Issuing CA", now=now, issuer=upper)
    ca = make_cluster_ca(issuing, csr.public_key(), now=now, subject=csr.subject)
    return SignedCA((ca, issuing.cert, upper.cert), (up.root.cert,)), _unusable(
        f"issuer {upper.name} has path length 1, too short for the chain below it (needs 2)"
    )


def _not_yet_valid(
    up: Upstream, csr: x509.CertificateSigningRequest, now: datetime
) -> tuple[SignedCA, str]:
    answer = up.answer(csr, now=now, not_before=now + timedelta(hours=1))
    return answer, _unusable(
        f"the issued CA is not valid before {_when(answer.chain[0].not_valid_before_utc)}"
    )


def _expired(
    up: Upstream, csr: x509.CertificateSigningRequest, now: datetime
) -> tuple[SignedCA, str]:
    answer = up.answer(
        csr, now=now, not_before=now - timedelta(days=2), not_after=now - timedelta(minutes=1)
    )
    return answer, _unusable(
        f"the issued CA expired at {_when(answer.chain[0].not_valid_after_utc)}"
    )


def _outlives_its_issuer(
    up: Upstream, csr: x509.CertificateSigningRequest, now: datetime
) -> tuple[SignedCA, str]:
    end = up.issuing.cert.not_valid_after_utc
    answer = up.answer(csr, now=now, not_after=end + timedelta(days=1))
    return answer, _unusable(
        f"the issued CA outlives its issuer: notAfter {_when(end + timedelta(days=1))} "
        f"is after {_when(end)}"
    )


_SPIFFE = f"spiffe://{TRUST_DOMAIN}"
_BC, _KU = x509.BasicConstraints, x509.KeyUsage
_SAN, _NC = x509.SubjectAlternativeName, x509.NameConstraints
_EXPECTED_SUBTREE = f"expected exactly [{TRUST_DOMAIN}]"

HOSTILE: tuple[Hostile, ...] = (
    # the answer as a whole
    Hostile("key-is-not-the-csrs", _key_is_not_the_csrs),
    Hostile("chain-out-of-order", _chain_out_of_order),
    Hostile("root-inside-the-chain", _root_inside_the_chain),
    Hostile("chain-not-under-a-reported-root", _not_under_a_reported_root),
    Hostile("reported-root-not-self-signed", _root_not_self_signed),
    Hostile(
        "empty-chain",
        lambda up, csr, now: (SignedCA((), (up.root.cert,)), "returned an empty chain"),
    ),
    Hostile(
        "no-roots",
        lambda up, csr, now: (SignedCA(up.answer(csr, now=now).chain, ()), "reported no roots"),
    ),
    # the cluster CA (DESIGN "Hierarchy")
    _policy(
        "not-a-ca",
        {_BC: (_BC(ca=False, path_length=None), True)},
        "is not a CA (BasicConstraints CA:TRUE missing)",
    ),
    _policy("no-basic-constraints", {_BC: None}, "is not a CA (BasicConstraints CA:TRUE missing)"),
    _policy(
        "path-length-1", {_BC: (_BC(ca=True, path_length=1), True)}, "has path length 1, expected 0"
    ),
    _policy(
        "path-length-unlimited",
        {_BC: (_BC(ca=True, path_length=None), True)},
        "has no path length limit, expected path length 0",
    ),
    _policy(
        "basic-constraints-not-critical",
        {_BC: (_BC(ca=True, path_length=0), False)},
        "BasicConstraints is not critical",
    ),
    _policy("no-key-usage", {_KU: None}, "has no KeyUsage (keyCertSign is required)"),
    _policy(
        "no-keycertsign",
        {_KU: (key_usage(key_cert_sign=False), True)},
        "KeyUsage lacks keyCertSign",
    ),
    _policy("no-crlsign", {_KU: (key_usage(crl_sign=False), True)}, "KeyUsage lacks cRLSign"),
    _policy("key-usage-not-critical", {_KU: (key_usage(), False)}, "KeyUsage is not critical"),
    _policy(
        "extended-key-usage",
        {
            x509.ExtendedKeyUsage: (
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                False,
            )
        },
        "lists extended key usages; a cluster CA must have none",
    ),
    _policy("no-san", {_SAN: None}, f"has no URI SAN {_SPIFFE}"),
    _policy(
        "dns-san-only",
        {_SAN: (_SAN([x509.DNSName("istiod.istio-system.svc")]), False)},
        f"has no URI SAN {_SPIFFE}",
    ),
    _policy(
        "san-of-another-trust-domain",
        {_SAN: san(f"spiffe://{OTHER_DOMAIN}")},
        f"has no URI SAN {_SPIFFE}",
        f"also names spiffe://{OTHER_DOMAIN}; a cluster CA names its own trust domain only",
    ),
    _policy(
        "san-of-another-trust-domain-too",
        {_SAN: san(f"spiffe://{OTHER_DOMAIN}", _SPIFFE)},
        f"also names spiffe://{OTHER_DOMAIN}; a cluster CA names its own trust domain only",
    ),
    _policy(
        "no-name-constraints",
        {_NC: None},
        f"has no NameConstraints; expected permitted URI subtree {TRUST_DOMAIN}",
    ),
    _policy(
        "name-constraints-not-critical",
        {_NC: permitted(x509.UniformResourceIdentifier(TRUST_DOMAIN), critical=False)},
        "NameConstraints is not critical",
    ),
    _policy(
        "name-constraint-in-spiffe-form",
        {_NC: permitted(x509.UniformResourceIdentifier(_SPIFFE))},
        f"permits URI subtrees ['{_SPIFFE}'], {_EXPECTED_SUBTREE}",
    ),
    _policy(
        "name-constraint-of-another-trust-domain",
        {_NC: permitted(x509.UniformResourceIdentifier(OTHER_DOMAIN))},
        f"permits URI subtrees ['{OTHER_DOMAIN}'], {_EXPECTED_SUBTREE}",
    ),
    _policy(
        "name-constraint-wider-than-the-trust-domain",
        {
            _NC: permitted(
                x509.UniformResourceIdentifier(TRUST_DOMAIN),
                x509.UniformResourceIdentifier(OTHER_DOMAIN),
            )
        },
        f"permits URI subtrees ['{TRUST_DOMAIN}', '{OTHER_DOMAIN}'], {_EXPECTED_SUBTREE}",
    ),
    _policy(
        "name-constraint-without-uri",
        {_NC: permitted(x509.DNSName(TRUST_DOMAIN))},
        f"permits URI subtrees none, {_EXPECTED_SUBTREE}",
    ),
    Hostile("not-yet-valid", _not_yet_valid),
    Hostile("expired", _expired),
    Hostile("outlives-its-issuer", _outlives_its_issuer),
    # the CAs above it
    _bad_issuing("issuer-not-a-ca", "is not a CA (BasicConstraints CA:TRUE missing)", ca=False),
    _bad_issuing(
        "issuer-path-length-0",
        "has path length 0, too short for the chain below it (needs 1)",
        path_length=0,
    ),
    Hostile("upper-path-length-too-short", _upper_path_length_too_short),
    _bad_issuing("issuer-expired", "expired at", expired=True),
    _bad_issuing(
        "issuer-without-keycertsign",
        "KeyUsage lacks keyCertSign",
        key_usage=key_usage(key_cert_sign=False, digital_signature=True),
    ),
)


HONEST = Hostile("honest", lambda up, csr, now: (up.answer(csr, now=now), ""))
"""The control: a well-formed answer from the same PKI, which trustmgr uses."""


class HostileProvider:
    """A provider whose every answer is ``hostile``'s, for the CSR it is given.
    ``refusal`` is what trustmgr must say about the last answer."""

    def __init__(
        self, hostile: Hostile, upstream: Upstream, clock: Clock, name: str = "hostile"
    ) -> None:
        self.name = name
        self.hostile = hostile
        self.upstream = upstream
        self._clock = clock
        self.refusal: str | None = None

    def roots(self) -> tuple[x509.Certificate, ...]:
        return (self.upstream.root.cert,)

    def sign_ca(self, csr: x509.CertificateSigningRequest, ttl: timedelta) -> SignedCA:
        answer, reason = self.hostile.answer(self.upstream, csr, self._clock())
        self.refusal = f"provider {self.name} {reason}"
        return answer
