"""The key checks istiod relies on, as trustmgr applies them to what it reads."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from trustmgr.errors import BadMaterialError
from trustmgr.pki import load_private_key

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
