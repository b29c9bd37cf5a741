"""Trust bundles as values: strict PEM, deduplicated, deterministic."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from trustmgr.errors import BadMaterialError

_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n(.*?)-----END \1-----", re.DOTALL)


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the DER encoding, lowercase hex."""
    return cert.fingerprint(hashes.SHA256()).hex()


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def pem_blocks(data: bytes, what: str) -> list[tuple[str, bytes]]:
    """Split ``data`` into (label, whole block) pairs; anything but whitespace
    between blocks is an error."""
    blocks: list[tuple[str, bytes]] = []
    pos = 0
    for match in _PEM_BLOCK.finditer(data):
        if data[pos : match.start()].strip():
            raise BadMaterialError(f"{what}: unexpected text between PEM blocks")
        blocks.append((match.group(1).decode(), match.group(0)))
        pos = match.end()
    if data[pos:].strip():
        raise BadMaterialError(f"{what}: unexpected text after the last PEM block")
    return blocks


def load_certificates(data: bytes, what: str) -> list[x509.Certificate]:
    """Parse PEM that must hold only CERTIFICATE blocks (at least one).

    A private key or any other block is refused, so a key can never travel in
    a bundle or a chain."""
    blocks = pem_blocks(data, what)
    if not blocks:
        raise BadMaterialError(f"{what}: no PEM certificate found")
    certs = []
    for label, block in blocks:
        if label != "CERTIFICATE":
            raise BadMaterialError(f"{what}: holds a {label} block; only certificates belong here")
        try:
            certs.append(x509.load_pem_x509_certificate(block))
        except ValueError as exc:
            raise BadMaterialError(f"{what}: a certificate cannot be parsed ({exc})") from None
    return certs


@dataclass(frozen=True)
class TrustBundle:
    """An ordered set of root certificates, unique by fingerprint."""

    roots: tuple[x509.Certificate, ...] = ()

    @classmethod
    def of(cls, roots: Iterable[x509.Certificate]) -> TrustBundle:
        """Keep the first occurrence of each root, in the order given."""
        seen: set[str] = set()
        kept = []
        for root in roots:
            fp = fingerprint(root)
            if fp not in seen:
                seen.add(fp)
                kept.append(root)
        return cls(tuple(kept))

    @classmethod
    def from_pem(cls, data: bytes, what: str = "trust bundle") -> TrustBundle:
        return cls.of(load_certificates(data, what))

    @property
    def fingerprints(self) -> tuple[str, ...]:
        return tuple(fingerprint(r) for r in self.roots)

    def to_pem(self) -> bytes:
        return b"".join(pem(r) for r in self.roots)

    def __contains__(self, cert: object) -> bool:
        return isinstance(cert, x509.Certificate) and fingerprint(cert) in self.fingerprints

    def __len__(self) -> int:
        return len(self.roots)
