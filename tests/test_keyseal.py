"""Keys sealed with a passphrase: the cost a guesser pays, what openssl reads,
and every alteration refused."""

from __future__ import annotations

import base64
import os
import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from trustmgr.providers import keyseal

PASSPHRASE = b"correct horse battery staple"
FAST = 1000
"""Rounds for tests about structure, not cost."""


def _public(key: PrivateKeyTypes) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _pem(der: bytes) -> bytes:
    return (
        b"-----BEGIN ENCRYPTED PRIVATE KEY-----\n"
        + base64.encodebytes(der)
        + b"-----END ENCRYPTED PRIVATE KEY-----\n"
    )


def _der(pem: bytes) -> bytes:
    body = pem.split(b"-----")[2]
    return base64.b64decode(body)


def _openssl(*args: str, data: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, "KEYSEAL_PW": PASSPHRASE.decode()}
    return subprocess.run(["openssl", *args], input=data, env=env, capture_output=True)


def _asn1(path: Path) -> list[str]:
    """``openssl asn1parse`` of a PEM file: one "depth kind:value" per element,
    the hex dumps of salt, IV and ciphertext left out."""
    out = _openssl("asn1parse", "-in", str(path))
    assert out.returncode == 0, out.stderr
    lines = []
    for line in out.stdout.decode().splitlines():
        match = re.fullmatch(
            r"\s*\d+:d=(\d+)\s+hl=\d+\s+l=\s*\d+\s+(?:prim|cons):\s*(.*?)\s*", line
        )
        assert match, line
        depth, element = match.groups()
        kind, _, value = element.partition(":")
        if "[HEX DUMP]" in kind:
            kind, value = kind.replace("[HEX DUMP]", ""), ""
        lines.append(f"{depth} {kind.strip()}:{value}")
    return lines


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.mark.parametrize(
    "make",
    [
        lambda: ec.generate_private_key(ec.SECP256R1()),
        lambda: ec.generate_private_key(ec.SECP384R1()),
        lambda: rsa.generate_private_key(65537, 2048),
    ],
    ids=["P-256", "P-384", "RSA-2048"],
)
def test_a_sealed_key_unseals_to_itself(make: Callable[[], PrivateKeyTypes]) -> None:
    key = make()
    sealed = keyseal.seal(key, PASSPHRASE, iterations=FAST)
    assert sealed.startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----\n")
    assert all(len(line) <= 64 for line in sealed.splitlines())
    assert _public(keyseal.unseal(sealed, PASSPHRASE)) == _public(key)


def test_the_minimum_cost_is_owasps_and_new_keys_meet_it(
    ec_key: ec.EllipticCurvePrivateKey,
) -> None:
    assert keyseal.MIN_ITERATIONS >= 600_000
    assert keyseal.ITERATIONS >= keyseal.MIN_ITERATIONS
    seal = keyseal.describe(keyseal.seal(ec_key, PASSPHRASE))
    assert seal == keyseal.Seal("PBKDF2-HMAC-SHA256", keyseal.ITERATIONS, "AES-256-CBC")
    assert seal.current
    assert str(seal) == (
        f"PKCS#8 PBES2, PBKDF2-HMAC-SHA256 with {keyseal.ITERATIONS} rounds, AES-256-CBC"
    )


def test_openssl_shows_the_kdf_and_its_rounds_and_decrypts_the_key(
    ec_key: ec.EllipticCurvePrivateKey, tmp_path: Path
) -> None:
    path = tmp_path / "key.pem"
    path.write_bytes(keyseal.seal(ec_key, PASSPHRASE))
    parsed = _asn1(path)
    rounds = parsed.pop(8)
    assert parsed == [
        "0 SEQUENCE:",
        "1 SEQUENCE:",
        "2 OBJECT:PBES2",
        "2 SEQUENCE:",
        "3 SEQUENCE:",
        "4 OBJECT:PBKDF2",
        "4 SEQUENCE:",
        "5 OCTET STRING:",  # the salt
        "5 SEQUENCE:",
        "6 OBJECT:hmacWithSHA256",
        "6 NULL:",
        "3 SEQUENCE:",
        "4 OBJECT:aes-256-cbc",
        "4 OCTET STRING:",  # the IV
        "1 OCTET STRING:",  # the encrypted key
    ]
    assert rounds.startswith("5 INTEGER:")
    assert int(rounds.partition(":")[2], 16) == keyseal.ITERATIONS >= keyseal.MIN_ITERATIONS

    out = _openssl("pkcs8", "-in", str(path), "-passin", "env:KEYSEAL_PW")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(b"-----BEGIN PRIVATE KEY-----")
    assert _public(serialization.load_pem_private_key(out.stdout, None)) == _public(ec_key)


def test_the_structure_is_the_one_openssl_writes(
    ec_key: ec.EllipticCurvePrivateKey, tmp_path: Path
) -> None:
    ours = tmp_path / "ours.pem"
    ours.write_bytes(keyseal.seal(ec_key, PASSPHRASE, iterations=FAST))
    theirs = tmp_path / "theirs.pem"
    plain = ec_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    out = _openssl(
        "pkcs8",
        "-topk8",
        "-v2",
        "aes-256-cbc",
        "-v2prf",
        "hmacWithSHA256",
        "-iter",
        str(FAST),
        "-passout",
        "env:KEYSEAL_PW",
        "-out",
        str(theirs),
        data=plain,
    )
    assert out.returncode == 0, out.stderr
    assert _asn1(ours) == _asn1(theirs)
    assert _public(keyseal.unseal(theirs.read_bytes(), PASSPHRASE)) == _public(ec_key)
    assert keyseal.describe(theirs.read_bytes()) == keyseal.Seal(
        "PBKDF2-HMAC-SHA256", FAST, "AES-256-CBC"
    )


def test_the_earlier_form_is_read_and_told_apart(ec_key: ec.EllipticCurvePrivateKey) -> None:
    earlier = ec_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(PASSPHRASE),
    )
    seal = keyseal.describe(earlier)
    assert seal == keyseal.Seal("PBKDF2-HMAC-SHA256", 2048, "AES-256-CBC")
    assert not seal.current
    assert _public(keyseal.unseal(earlier, PASSPHRASE)) == _public(ec_key)


def test_a_wrong_passphrase_is_refused_without_echoing_it(
    ec_key: ec.EllipticCurvePrivateKey,
) -> None:
    sealed = keyseal.seal(ec_key, PASSPHRASE, iterations=FAST)
    with pytest.raises(keyseal.UnsealError) as caught:
        keyseal.unseal(sealed, b"Tr0ub4dor&3")
    assert type(caught.value) is keyseal.UnsealError
    assert "Tr0ub4dor" not in str(caught.value)


@pytest.mark.parametrize(
    "make",
    [
        lambda: ec.generate_private_key(ec.SECP256R1()),
        lambda: rsa.generate_private_key(65537, 2048),
    ],
    ids=["P-256", "RSA-2048"],
)
def test_an_altered_bit_is_refused(make: Callable[[], PrivateKeyTypes]) -> None:
    """One bit flipped, in the parameters or the ciphertext: the key is
    refused, never returned altered. Every bit position of the parameters is
    tried, and in the ciphertext one byte of each 16-byte block, as CBC garbles
    a whole block whichever of its bytes is altered."""
    key = make()
    der = _der(keyseal.seal(key, PASSPHRASE, iterations=FAST))
    plain = key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    size = (len(plain) // 16 + 1) * 16
    ciphertext = len(der) - size
    header = b"\x04" + (bytes([0x81, size]) if size < 256 else b"\x82" + size.to_bytes(2, "big"))
    assert der[ciphertext - len(header) : ciphertext] == header
    for i in [*range(ciphertext), *range(ciphertext + 7, len(der), 16)]:
        for bit in (0x01, 0x80):
            altered = bytearray(der)
            altered[i] ^= bit
            with pytest.raises(keyseal.UnsealError):
                keyseal.unseal(_pem(bytes(altered)), PASSPHRASE)


def test_rounds_beyond_the_ceiling_are_refused_unread(ec_key: ec.EllipticCurvePrivateKey) -> None:
    der = _der(keyseal.seal(ec_key, PASSPHRASE, iterations=0x8000))
    count = bytes.fromhex("0203008000")
    assert der.count(count) == 1
    assert keyseal.MAX_ITERATIONS < 0x7FFFFF
    altered = _pem(der.replace(count, bytes.fromhex("02037fffff")))  # the same length
    started = time.perf_counter()
    with pytest.raises(keyseal.SealFormatError, match=r"asks for 8388607 PBKDF2 rounds, outside"):
        keyseal.unseal(altered, PASSPHRASE)
    assert time.perf_counter() - started < 0.5


def test_other_kdfs_are_refused_by_name(ec_key: ec.EllipticCurvePrivateKey) -> None:
    plain = ec_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    out = _openssl("pkcs8", "-topk8", "-scrypt", "-passout", "env:KEYSEAL_PW", data=plain)
    assert out.returncode == 0, out.stderr
    with pytest.raises(keyseal.SealFormatError, match="the key's KDF is scrypt, not PBKDF2"):
        keyseal.describe(out.stdout)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "expected one PEM ENCRYPTED PRIVATE KEY block"),
        (b"-----BEGIN PRIVATE KEY-----\nAA==\n-----END PRIVATE KEY-----\n", "expected one"),
        (
            b"-----BEGIN ENCRYPTED PRIVATE KEY-----\n!!\n-----END ENCRYPTED PRIVATE KEY-----\n",
            "not valid base64",
        ),
        (_pem(b"\x30\x03\x02\x01\x00"), "structure is damaged"),
        (_pem(b"\x30\x84\xff\xff\xff\xff"), "structure is damaged"),
    ],
    ids=["empty", "unencrypted", "base64", "not-pbes2", "truncated"],
)
def test_malformed_blobs_are_refused(data: bytes, message: str) -> None:
    with pytest.raises(keyseal.SealFormatError, match=message):
        keyseal.unseal(data, PASSPHRASE)


def test_two_keys_in_one_blob_are_refused(ec_key: ec.EllipticCurvePrivateKey) -> None:
    sealed = keyseal.seal(ec_key, PASSPHRASE, iterations=FAST)
    with pytest.raises(keyseal.SealFormatError, match="expected one"):
        keyseal.describe(sealed + sealed)
