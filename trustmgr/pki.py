"""Keys, CSRs and certificate checks: the Istio contract for cluster CAs.

Knows nothing of where material is stored. Every check returns problems as
plain sentences rather than raising, so ``verify`` can list them all.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import datetime

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
    PrivateKeyTypes,
    PublicKeyTypes,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from trustmgr.bundles import TrustBundle, fingerprint, load_certificates, pem, pem_blocks
from trustmgr.errors import BadMaterialError, ProviderAnswerError, one_line
from trustmgr.providers import SignedCA
from trustmgr.providers.chains import is_self_signed, issued_by
from trustmgr.providers.keys import KeyAlgorithm, ca_key_usage, key_algorithm_of

CACERTS_FILES = ("ca-cert.pem", "ca-key.pem", "cert-chain.pem", "root-cert.pem")


def spiffe_uri(trust_domain: str) -> str:
    return f"spiffe://{trust_domain}"


def same_public_key(a: PublicKeyTypes, b: PublicKeyTypes) -> bool:
    der, spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    return a.public_bytes(der, spki) == b.public_bytes(der, spki)


@dataclass(frozen=True)
class ClusterCARequest:
    """A fresh key and the CSR a provider signs into a cluster CA."""

    key: CertificateIssuerPrivateKeyTypes
    csr: x509.CertificateSigningRequest


def cluster_ca_request(
    trust_domain: str, *, cluster: str, algorithm: KeyAlgorithm, organization: str | None = None
) -> ClusterCARequest:
    """Build a CSR carrying every extension the cluster CA must have, so that
    providers which copy CSR values (Vault ``use_csr_values``, AWS CSR
    passthrough) produce the same certificate as the self-signed path."""
    key = algorithm.generate()
    # RFC 5280 bounds these names at 64. A cluster name is a DNS label, at most 63;
    # a trust domain may be longer, and the SAN and the name constraint carry it anyway.
    bound = 64
    common_name = f"{cluster} cluster CA"
    if len(common_name.encode()) > bound:
        common_name = cluster
    names = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if organization:
        names.insert(0, x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    if len(trust_domain.encode()) <= bound:
        names.insert(0, x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, trust_domain))
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name(names))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(ca_key_usage(), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_uri(trust_domain))]),
            critical=False,
        )
        # The permitted subtree is the bare trust domain: OpenSSL, BoringSSL and Go
        # compare a URI constraint with the URI's host. "spiffe://td" breaks every leaf.
        .add_extension(
            x509.NameConstraints(
                permitted_subtrees=[x509.UniformResourceIdentifier(trust_domain)],
                excluded_subtrees=None,
            ),
            critical=True,
        )
        .sign(key, algorithm.signature_hash())
    )
    return ClusterCARequest(key, csr)


def csr_problems(
    csr: x509.CertificateSigningRequest, trust_domain: str, algorithm: KeyAlgorithm
) -> list[str]:
    """Why a CSR an agent published is not a cluster CA request for
    ``trust_domain`` as :func:`cluster_ca_request` makes it (empty: none)."""
    if not csr.is_signature_valid:
        return ["is not signed by its own key"]
    problems = []
    if key_algorithm_of(csr.public_key()) is not algorithm:
        problems.append(
            f"has a {key_algorithm_of(csr.public_key()) or 'other'} key, not {algorithm}"
        )
    exts = {type(e.value): e.value for e in csr.extensions}
    bc = exts.get(x509.BasicConstraints)
    if not isinstance(bc, x509.BasicConstraints) or not bc.ca or bc.path_length != 0:
        problems.append("does not ask for a CA with path length 0")
    san = exts.get(x509.SubjectAlternativeName)
    uris = (
        san.get_values_for_type(x509.UniformResourceIdentifier)
        if isinstance(san, x509.SubjectAlternativeName)
        else []
    )
    if uris != [spiffe_uri(trust_domain)]:
        problems.append(f"names {uris or 'no URI'}, not exactly {spiffe_uri(trust_domain)}")
    nc = exts.get(x509.NameConstraints)
    subtrees = list(nc.permitted_subtrees or ()) if isinstance(nc, x509.NameConstraints) else []
    if (
        not isinstance(nc, x509.NameConstraints)
        or nc.excluded_subtrees
        or len(subtrees) != 1
        or not isinstance(subtrees[0], x509.UniformResourceIdentifier)
        or subtrees[0].value != trust_domain
    ):
        problems.append(f"does not constrain names to exactly the trust domain {trust_domain}")
    return problems


def _ext(
    cert: x509.Certificate, kind: type[x509.ExtensionType]
) -> x509.Extension[x509.ExtensionType] | None:
    try:
        return cert.extensions.get_extension_for_class(kind)
    except x509.ExtensionNotFound:
        return None


def uri_sans(cert: x509.Certificate) -> list[str]:
    ext = _ext(cert, x509.SubjectAlternativeName)
    if ext is None:
        return []
    assert isinstance(ext.value, x509.SubjectAlternativeName)
    return list(ext.value.get_values_for_type(x509.UniformResourceIdentifier))


def permitted_uri_domains(cert: x509.Certificate) -> list[str] | None:
    """The permitted URI subtrees, or None when the CA has no name constraints."""
    ext = _ext(cert, x509.NameConstraints)
    if ext is None:
        return None
    assert isinstance(ext.value, x509.NameConstraints)
    return [
        n.value
        for n in ext.value.permitted_subtrees or []
        if isinstance(n, x509.UniformResourceIdentifier)
    ]


def trust_domain_of(cert: x509.Certificate) -> str | None:
    for uri in uri_sans(cert):
        if uri.startswith("spiffe://"):
            return uri.removeprefix("spiffe://").split("/", 1)[0]
    return None


def cluster_ca_problems(ca: x509.Certificate, trust_domain: str, *, now: datetime) -> list[str]:
    """Policy checks on a cluster CA certificate (DESIGN "Hierarchy")."""
    problems = []
    bc = _ext(ca, x509.BasicConstraints)
    if bc is None or not isinstance(bc.value, x509.BasicConstraints) or not bc.value.ca:
        problems.append("is not a CA (BasicConstraints CA:TRUE missing)")
    else:
        if bc.value.path_length is None:
            problems.append("has no path length limit, expected path length 0")
        elif bc.value.path_length != 0:
            problems.append(f"has path length {bc.value.path_length}, expected 0")
        if not bc.critical:
            problems.append("BasicConstraints is not critical")
    ku = _ext(ca, x509.KeyUsage)
    if ku is None or not isinstance(ku.value, x509.KeyUsage):
        problems.append("has no KeyUsage (keyCertSign is required)")
    else:
        if not ku.value.key_cert_sign:
            problems.append("KeyUsage lacks keyCertSign")
        if not ku.value.crl_sign:
            problems.append("KeyUsage lacks cRLSign")
        if not ku.critical:
            problems.append("KeyUsage is not critical")
    if _ext(ca, x509.ExtendedKeyUsage) is not None:
        problems.append("lists extended key usages; a cluster CA must have none")
    expected_uri = spiffe_uri(trust_domain)
    uris = uri_sans(ca)
    if expected_uri not in uris:
        problems.append(f"has no URI SAN {expected_uri}")
    # The first SPIFFE URI is read back as the CA's trust domain (trust_domain_of).
    others = [
        u
        for u in uris
        if u.startswith("spiffe://")
        and u.removeprefix("spiffe://").split("/", 1)[0] != trust_domain
    ]
    if others:
        problems.append(
            f"also names {', '.join(others)}; a cluster CA names its own trust domain only"
        )
    permitted = permitted_uri_domains(ca)
    if permitted is None:
        problems.append(f"has no NameConstraints; expected permitted URI subtree {trust_domain}")
    else:
        nc = _ext(ca, x509.NameConstraints)
        if nc is not None and not nc.critical:
            problems.append("NameConstraints is not critical")
        if permitted != [trust_domain]:
            problems.append(
                f"permits URI subtrees {permitted or 'none'}, expected exactly [{trust_domain}]"
            )
    if now < ca.not_valid_before_utc:
        problems.append(f"is not valid before {ca.not_valid_before_utc:%Y-%m-%dT%H:%M:%SZ}")
    if now >= ca.not_valid_after_utc:
        problems.append(f"expired at {ca.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}")
    return problems


def _constraint_problems(issuer: x509.Certificate, trust_domain: str) -> list[str]:
    """An issuer's URI name constraints must leave room for the trust domain:
    otherwise no verifier accepts a workload of it under the chain (a mesh
    intermediate constrained to another mesh's trust domain, docs/agent.md)."""
    ext = _ext(issuer, x509.NameConstraints)
    if ext is None:
        return []
    assert isinstance(ext.value, x509.NameConstraints)

    def uris(subtrees: Iterable[x509.GeneralName] | None) -> list[str]:
        return [n.value for n in subtrees or () if isinstance(n, x509.UniformResourceIdentifier)]

    def within(constraint: str) -> bool:  # RFC 5280 4.2.1.10, for a URI's host
        if constraint.startswith("."):
            return trust_domain.endswith(constraint)
        return trust_domain == constraint

    name = issuer.subject.rfc4514_string()
    excluded = [c for c in uris(ext.value.excluded_subtrees) if within(c)]
    if excluded:
        return [f"issuer {name} excludes URI names in {excluded[0]}, trust domain {trust_domain}"]
    permitted = uris(ext.value.permitted_subtrees)
    if permitted and not any(within(c) for c in permitted):
        return [
            f"issuer {name} permits URI names in {permitted} only, not trust domain {trust_domain}"
        ]
    return []


def _issuer_problems(cert: x509.Certificate, cas_below: int, *, now: datetime) -> list[str]:
    """What OpenSSL, BoringSSL and Go demand of a certificate above a cluster CA,
    with ``cas_below`` CA certificates between it and a workload certificate."""
    name = f"issuer {cert.subject.rfc4514_string()}"
    problems = []
    bc = _ext(cert, x509.BasicConstraints)
    if bc is None or not isinstance(bc.value, x509.BasicConstraints) or not bc.value.ca:
        problems.append(f"{name} is not a CA (BasicConstraints CA:TRUE missing)")
    elif bc.value.path_length is not None and bc.value.path_length < cas_below:
        problems.append(
            f"{name} has path length {bc.value.path_length}, "
            f"too short for the chain below it (needs {cas_below})"
        )
    ku = _ext(cert, x509.KeyUsage)
    if ku is not None and isinstance(ku.value, x509.KeyUsage) and not ku.value.key_cert_sign:
        problems.append(f"{name} KeyUsage lacks keyCertSign")
    if now < cert.not_valid_before_utc:
        problems.append(
            f"{name} is not valid before {cert.not_valid_before_utc:%Y-%m-%dT%H:%M:%SZ}"
        )
    if now >= cert.not_valid_after_utc:
        problems.append(f"{name} expired at {cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}")
    return problems


def check_signed_ca(
    answer: SignedCA,
    request: ClusterCARequest | x509.CertificateSigningRequest,
    trust_domain: str,
    *,
    provider: str,
    now: datetime,
) -> x509.Certificate:
    """Check a provider's answer before anything uses it; return the root the
    chain ends under. Raises ProviderAnswerError listing every problem.

    Beyond the cluster CA's own policy (``cluster_ca_problems``): its key is the
    CSR's; the chain runs in issuing order, without a root, up to a reported
    root; every reported root is self-signed; every issuer on the way is a CA,
    valid now, allowed to sign certificates, with a path length that leaves
    room for the CAs between it and a workload certificate; the cluster CA
    does not outlive its issuer."""
    problems: list[str] = []
    if not answer.chain:
        raise ProviderAnswerError(f"provider {provider} returned an empty chain")
    if not answer.roots:
        raise ProviderAnswerError(f"provider {provider} reported no roots")
    ca = answer.chain[0]
    csr = request.csr if isinstance(request, ClusterCARequest) else request
    if not same_public_key(ca.public_key(), csr.public_key()):
        problems.append("the issued certificate's public key is not the CSR's")
    problems += [f"the issued CA {p}" for p in cluster_ca_problems(ca, trust_domain, now=now)]
    for child, parent in itertools.pairwise(answer.chain):
        if not issued_by(child, parent):
            problems.append(
                f"chain is out of order: {child.subject.rfc4514_string()} is not issued by "
                f"{parent.subject.rfc4514_string()}"
            )
    for cert in answer.chain:
        if is_self_signed(cert):
            problems.append("chain includes a self-signed root; roots are reported apart")
    root = next((r for r in answer.roots if issued_by(answer.chain[-1], r)), None)
    if root is None:
        problems.append("chain does not end under any root the provider reports")
    issuers = [*answer.chain[1:], *([root] if root is not None else [])]
    for cas_below, issuer in enumerate(issuers, 1):
        problems += _issuer_problems(issuer, cas_below, now=now)
        problems += _constraint_problems(issuer, trust_domain)
    if issuers and ca.not_valid_after_utc > issuers[0].not_valid_after_utc:
        problems.append(
            f"the issued CA outlives its issuer: notAfter "
            f"{ca.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ} is after "
            f"{issuers[0].not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}"
        )
    for r in answer.roots:
        if not is_self_signed(r):
            problems.append(f"reported root {r.subject.rfc4514_string()} is not self-signed")
    if problems or root is None:
        raise ProviderAnswerError(
            f"provider {provider} gave an unusable certificate: {'; '.join(problems)}"
        )
    return root


@dataclass(frozen=True)
class CACerts:
    """Istio's cacerts material, as bytes exactly as written."""

    ca_cert: bytes
    ca_key: bytes = field(repr=False)
    cert_chain: bytes
    root_cert: bytes

    def files(self) -> dict[str, bytes]:
        return dict(
            zip(
                CACERTS_FILES,
                (self.ca_cert, self.ca_key, self.cert_chain, self.root_cert),
                strict=True,
            )
        )

    @classmethod
    def from_files(cls, files: dict[str, bytes]) -> CACerts:
        return cls(*(files[name] for name in CACERTS_FILES))

    def digest(self) -> str:
        """SHA-256 over all four files; what a target records as written."""
        h = hashlib.sha256()
        for name, data in self.files().items():
            h.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
        return h.hexdigest()

    def with_bundle(self, bundle: TrustBundle) -> CACerts:
        return CACerts(self.ca_cert, self.ca_key, self.cert_chain, bundle.to_pem())


def private_key_pem(key: PrivateKeyTypes) -> bytes:
    """Unencrypted PKCS#8, which istiod requires."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def assemble(
    request: ClusterCARequest, answer: SignedCA, root: x509.Certificate, bundle: TrustBundle
) -> CACerts:
    """cert-chain.pem runs cluster CA first, each issuer, then the root."""
    return CACerts(
        ca_cert=pem(answer.chain[0]),
        ca_key=private_key_pem(request.key),
        cert_chain=b"".join(pem(c) for c in (*answer.chain, root)),
        root_cert=bundle.to_pem(),
    )


def load_private_key(data: bytes, what: str) -> PrivateKeyTypes:
    """Load an unencrypted PEM private key (PKCS#1, SEC1 or PKCS#8), as istiod does."""
    blocks = pem_blocks(data, what)
    if len(blocks) != 1 or "PRIVATE KEY" not in blocks[0][0]:
        raise BadMaterialError(f"{what}: expected exactly one PEM private key")
    if blocks[0][0] == "ENCRYPTED PRIVATE KEY":
        raise BadMaterialError(f"{what}: the key is encrypted; istiod needs an unencrypted key")
    try:
        # OpenSSL's RSA validation costs ~0.3 s per 4096-bit key with the GIL held;
        # the arithmetic below checks the same consistency in well under 1 ms.
        key = serialization.load_pem_private_key(
            blocks[0][1], password=None, unsafe_skip_rsa_key_validation=True
        )
    except (ValueError, TypeError, x509.UnsupportedGeneralNameType):
        raise BadMaterialError(f"{what}: the private key cannot be parsed") from None
    if isinstance(key, rsa.RSAPrivateKey) and not _rsa_consistent(key.private_numbers()):
        raise BadMaterialError(f"{what}: the RSA private key is inconsistent (corrupted)")
    return key


def _rsa_consistent(n: rsa.RSAPrivateNumbers) -> bool:
    """p·q = n and d·e ≡ 1 (mod λ(n)), and the CRT values agree with them."""
    p, q, d, e = n.p, n.q, n.d, n.public_numbers.e
    lam = (p - 1) * (q - 1) // math.gcd(p - 1, q - 1)
    return (
        p * q == n.public_numbers.n
        and (d * e) % lam == 1
        and n.dmp1 == d % (p - 1)
        and n.dmq1 == d % (q - 1)
        and (n.iqmp * q) % p == 1
    )


@dataclass(frozen=True)
class ObservedCA:
    """What a target holds, parsed; ``problems`` lists what istiod or the policy
    would refuse. Pure data, no key material."""

    digest: str
    fingerprint: str | None = None
    serial: str | None = None
    not_after: datetime | None = None
    trust_domain: str | None = None
    key_algorithm: KeyAlgorithm | None = None
    chain_root: str | None = None
    issuer_not_after: datetime | None = None
    """When the CA's issuer expires: a renewal cannot reach past it."""
    bundle: tuple[str, ...] = ()
    problems: tuple[str, ...] = field(default=())

    @property
    def healthy(self) -> bool:
        return not self.problems


def _is_ca(cert: x509.Certificate) -> bool:
    bc = _ext(cert, x509.BasicConstraints)
    return bc is not None and isinstance(bc.value, x509.BasicConstraints) and bc.value.ca


MAX_SIGNATURE_CHECKS = 100
"""Go's x509.Verify gives up after this many signature checks (maxChainSignatureChecks):
certificates issuing each other would otherwise make exponentially many paths."""


class _TooManyChecks(Exception):
    pass


def _path_to_root(
    leaf: x509.Certificate, intermediates: list[x509.Certificate], roots: list[x509.Certificate]
) -> list[x509.Certificate] | None:
    """Go x509.Verify's path building, depth-first: leaf, intermediates…, root.
    As Go, it takes an intermediate only if it is a CA, and a parent only if its
    path length covers the intermediates between it and the leaf; and it raises
    _TooManyChecks past MAX_SIGNATURE_CHECKS signature checks, where Go gives up."""
    checks = 0

    def signed(cert: x509.Certificate, parent: x509.Certificate) -> bool:
        nonlocal checks
        if cert.issuer != parent.subject:
            return False  # not a candidate, as Go's findPotentialParents: no check counted
        checks += 1
        if checks > MAX_SIGNATURE_CHECKS:
            raise _TooManyChecks
        return issued_by(cert, parent)

    def room(parent: x509.Certificate, below: int) -> bool:
        bc = _ext(parent, x509.BasicConstraints)
        if bc is None or not isinstance(bc.value, x509.BasicConstraints):
            return True
        return bc.value.path_length is None or bc.value.path_length >= below

    def walk(cert: x509.Certificate, path: list[x509.Certificate]) -> list[x509.Certificate] | None:
        below = len(path) - 1
        for root in roots:
            if room(root, below) and signed(cert, root):
                return [*path, root]
        if len(path) > 8:
            return None
        for parent in intermediates:
            if (
                parent not in path
                and _is_ca(parent)
                and room(parent, below)
                and signed(cert, parent)
            ):
                found = walk(parent, [*path, parent])
                if found:
                    return found
        return None

    return walk(leaf, [leaf])


def istiod_problems(material: CACerts, *, now: datetime, with_key: bool = True) -> list[str]:
    """istiod's load checks on a cacerts set (FACTS: keycertbundle.go, ca.go);
    without ``with_key``, all but the key's (public material, as an agent reports it)."""
    problems: list[str] = []
    try:
        ca = load_certificates(material.ca_cert, "ca-cert.pem")[0]
        chain = load_certificates(material.cert_chain, "cert-chain.pem")
        roots = load_certificates(material.root_cert, "root-cert.pem")
    except BadMaterialError as exc:
        return [str(exc)]
    try:
        if with_key:
            key = load_private_key(material.ca_key, "ca-key.pem")
            if not same_public_key(key.public_key(), ca.public_key()):
                problems.append("ca-key.pem does not match ca-cert.pem")
    except BadMaterialError as exc:
        problems.append(str(exc))
    if not _is_ca(ca):
        problems.append("ca-cert.pem is not a CA certificate")
    try:
        path = _path_to_root(ca, chain, roots)
    except _TooManyChecks:
        problems.append(
            f"ca-cert.pem: finding its path to a root takes over {MAX_SIGNATURE_CHECKS} "
            "signature checks, where Go's verifier gives up"
        )
        return problems
    if path is None:
        problems.append("ca-cert.pem does not chain to any root in root-cert.pem")
        return problems
    for cert in path:
        name = cert.subject.rfc4514_string()
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            problems.append(f"{name} is outside its validity period")
        eku = _ext(cert, x509.ExtendedKeyUsage)
        if eku is not None and isinstance(eku.value, x509.ExtendedKeyUsage):
            usages = list(eku.value)
            if (
                ExtendedKeyUsageOID.SERVER_AUTH not in usages
                and ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE not in usages
            ):
                problems.append(
                    f"{name} lists extended key usages without serverAuth; Go's verifier rejects it"
                )
    return problems


def chain_problems(material: CACerts) -> list[str]:
    """cert-chain.pem must run cluster CA first, each issuer next, up to a root of the bundle."""
    try:
        ca = load_certificates(material.ca_cert, "ca-cert.pem")[0]
        chain = load_certificates(material.cert_chain, "cert-chain.pem")
        bundle = TrustBundle.from_pem(material.root_cert, "root-cert.pem")
    except BadMaterialError as exc:
        return [str(exc)]
    problems = []
    if fingerprint(chain[0]) != fingerprint(ca):
        problems.append("cert-chain.pem does not start with ca-cert.pem")
    for child, parent in itertools.pairwise(chain):
        if not issued_by(child, parent):
            problems.append("cert-chain.pem is not in issuing order")
            break
    if not is_self_signed(chain[-1]):
        problems.append("cert-chain.pem does not end with a root")
    elif chain[-1] not in bundle:
        problems.append("cert-chain.pem ends with a root that root-cert.pem does not hold")
    if len(chain) > 1 and ca.not_valid_after_utc > chain[1].not_valid_after_utc:
        problems.append("ca-cert.pem outlives its issuer")
    return problems


_SEEN_MAX = 8192
_seen: dict[tuple[str, str | None, bool], tuple[ObservedCA, datetime, datetime]] = {}
_seen_lock = threading.Lock()


def observe(
    material: CACerts, *, trust_domain: str | None, now: datetime, with_key: bool = True
) -> ObservedCA:
    """Parse and check a target's material. Never raises on bad material.

    The answer depends on ``now`` only through comparisons with the validity
    bounds of the certificates in ``material``; it is kept (by the material's
    digest) with the open interval between the bounds around the time it was
    made, and given again for any ``now`` inside it: a process that observes the
    same material pass after pass (the daemon) parses and verifies it once."""
    key = (material.digest(), trust_domain, with_key)
    kept = _seen.get(key)
    if kept is not None and kept[1] < now < kept[2]:
        return kept[0]
    observed = _observe(material, trust_domain=trust_domain, now=now, with_key=with_key)
    after, before = _bounds_around(material, now)
    if after < now < before:
        with _seen_lock:
            if len(_seen) >= _SEEN_MAX:
                _seen.clear()
            _seen[key] = (observed, after, before)
    return observed


def _bounds_around(material: CACerts, now: datetime) -> tuple[datetime, datetime]:
    """The latest validity bound of any certificate of ``material`` at or before
    ``now``, and the earliest after it (an empty interval when unparseable)."""
    try:
        certs = [
            *load_certificates(material.ca_cert, "ca-cert.pem"),
            *load_certificates(material.cert_chain, "cert-chain.pem"),
            *load_certificates(material.root_cert, "root-cert.pem"),
        ]
    except BadMaterialError:
        return now, now
    bounds = [b for c in certs for b in (c.not_valid_before_utc, c.not_valid_after_utc)]
    after = max((b for b in bounds if b <= now), default=datetime.min.replace(tzinfo=now.tzinfo))
    before = min((b for b in bounds if b > now), default=datetime.max.replace(tzinfo=now.tzinfo))
    return after, before


def observe_public(
    material: CACerts, *, trust_domain: str | None, now: datetime, reported: tuple[str, ...] = ()
) -> ObservedCA:
    """What public material says (``material.ca_key`` is empty: an agent's report),
    with the problems the agent ``reported`` of the key it alone holds. Its words
    come from the agent's certificates (names, URIs): each is made one line."""
    observed = observe(material, trust_domain=trust_domain, now=now, with_key=False)
    problems = tuple(dict.fromkeys(one_line(p, 1000) for p in (*observed.problems, *reported)))
    domain = observed.trust_domain
    return replace(
        observed, problems=problems, trust_domain=None if domain is None else one_line(domain)
    )


def _observe(
    material: CACerts, *, trust_domain: str | None, now: datetime, with_key: bool = True
) -> ObservedCA:
    problems = istiod_problems(material, now=now, with_key=with_key) + chain_problems(material)
    try:
        ca = load_certificates(material.ca_cert, "ca-cert.pem")[0]
    except BadMaterialError:
        return ObservedCA(digest=material.digest(), problems=tuple(dict.fromkeys(problems)))
    if trust_domain is not None:
        problems += [f"ca-cert.pem {p}" for p in cluster_ca_problems(ca, trust_domain, now=now)]
    try:
        bundle = TrustBundle.from_pem(material.root_cert, "root-cert.pem").fingerprints
    except BadMaterialError:
        bundle = ()
    try:
        chain = load_certificates(material.cert_chain, "cert-chain.pem")
        chain_root = fingerprint(chain[-1]) if is_self_signed(chain[-1]) else None
        issuer_not_after = chain[1].not_valid_after_utc if len(chain) > 1 else None
    except BadMaterialError:
        chain_root, issuer_not_after = None, None
    return ObservedCA(
        digest=material.digest(),
        fingerprint=fingerprint(ca),
        serial=format(ca.serial_number, "x"),
        not_after=ca.not_valid_after_utc,
        trust_domain=trust_domain_of(ca),
        key_algorithm=key_algorithm_of(ca.public_key()),
        chain_root=chain_root,
        issuer_not_after=issuer_not_after,
        bundle=bundle,
        problems=tuple(dict.fromkeys(problems)),
    )
