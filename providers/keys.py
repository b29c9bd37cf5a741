"""Key algorithms trustmgr and its providers generate."""

from __future__ import annotations

from enum import StrEnum

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes


class KeyAlgorithm(StrEnum):
    ECDSA_P256 = "ECDSA_P256"
    ECDSA_P384 = "ECDSA_P384"
    RSA_2048 = "RSA_2048"
    RSA_3072 = "RSA_3072"
    RSA_4096 = "RSA_4096"

    @property
    def is_rsa(self) -> bool:
        return self.value.startswith("RSA_")

    def generate(self) -> CertificateIssuerPrivateKeyTypes:
        """A fresh private key of this algorithm."""
        if self is KeyAlgorithm.ECDSA_P256:
            return ec.generate_private_key(ec.SECP256R1())
        if self is KeyAlgorithm.ECDSA_P384:
            return ec.generate_private_key(ec.SECP384R1())
        return rsa.generate_private_key(public_exponent=65537, key_size=int(self.value[4:]))

    def signature_hash(self) -> hashes.SHA256 | hashes.SHA384:
        """The digest a key of this algorithm signs with."""
        if self is KeyAlgorithm.ECDSA_P384:
            return hashes.SHA384()
        return hashes.SHA256()


def key_algorithm_of(key: object) -> KeyAlgorithm | None:
    """The algorithm of a public or private key, or None if it is none of ours."""
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        return {
            "secp256r1": KeyAlgorithm.ECDSA_P256,
            "secp384r1": KeyAlgorithm.ECDSA_P384,
        }.get(key.curve.name)
    if isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey):
        try:
            return KeyAlgorithm(f"RSA_{key.key_size}")
        except ValueError:
            return None
    return None


def ca_key_usage(*, digital_signature: bool = True) -> x509.KeyUsage:
    """keyCertSign and cRLSign, which every CA here carries (OpenSSL refuses
    leaves under a CA without keyCertSign); digitalSignature for cluster CAs."""
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )
