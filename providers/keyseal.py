"""Private keys sealed with a passphrase, in a form stock tools read.

A sealed key is a PEM ``ENCRYPTED PRIVATE KEY`` block: PKCS#8
EncryptedPrivateKeyInfo with PBES2 (RFC 8018), the key derived by
PBKDF2-HMAC-SHA256 at :data:`ITERATIONS` rounds and encrypted with AES-256-CBC.
It is byte for byte the structure ``openssl pkcs8 -topk8 -v2 aes-256-cbc
-v2prf hmacWithSHA256 -iter N`` writes, so ``openssl pkcs8`` decrypts it and
``openssl asn1parse`` shows the KDF and its rounds.

The algorithm identifiers at the front of a sealed blob say how it is sealed;
:func:`describe` reads them without the passphrase. Another kind of sealing (a
data key wrapped by a key management service) is told apart the same way and
lives beside this module.

Errors::

    UnsealError            the key does not decrypt: wrong passphrase, or the
    │                      ciphertext was altered (PBES2 cannot tell the two apart)
    └── SealFormatError    the blob is not a sealing this module reads

Messages never carry the passphrase or any key material.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from dataclasses import dataclass

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, padding, serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC

MIN_ITERATIONS = 600_000
"""OWASP's figure for PBKDF2-HMAC-SHA256: a sealing below it is not :attr:`Seal.current`."""
ITERATIONS = 1_000_000
"""The rounds a key is sealed with: a margin above the minimum for about a
fifth of a second per unlock (``scripts/bench-keyseal``)."""
MAX_ITERATIONS = 5_000_000
"""More rounds than this are refused unread, so an altered blob cannot stall a run."""

PEM_TYPE = "ENCRYPTED PRIVATE KEY"


class UnsealError(Exception):
    """The sealed key does not decrypt with the passphrase given."""


class SealFormatError(UnsealError):
    """The blob is not a sealed key in a form this module reads."""


@dataclass(frozen=True)
class Seal:
    """How a key is sealed: what a guesser pays per passphrase tried."""

    kdf: str
    """``PBKDF2-HMAC-SHA256``, or another PRF's name."""
    iterations: int
    cipher: str
    """``AES-256-CBC``, ``AES-192-CBC`` or ``AES-128-CBC``."""

    @property
    def current(self) -> bool:
        """Whether each guess costs at least :data:`MIN_ITERATIONS` rounds of
        PBKDF2-HMAC-SHA256; a key sealed otherwise should be sealed again."""
        return self.kdf == "PBKDF2-HMAC-SHA256" and self.iterations >= MIN_ITERATIONS

    def __str__(self) -> str:
        return f"PKCS#8 PBES2, {self.kdf} with {self.iterations} rounds, {self.cipher}"


def seal(key: PrivateKeyTypes, passphrase: bytes, *, iterations: int = ITERATIONS) -> bytes:
    """``key`` as a PEM ``ENCRYPTED PRIVATE KEY`` block sealed with ``passphrase``."""
    if not passphrase:
        raise ValueError("the passphrase is empty")
    if not 1 <= iterations <= MAX_ITERATIONS:
        raise ValueError(f"iterations must be from 1 to {MAX_ITERATIONS}")
    plain = key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    salt, iv = os.urandom(16), os.urandom(16)
    derived = PBKDF2HMAC(hashes.SHA256(), 32, salt, iterations).derive(passphrase)
    padder = padding.PKCS7(128).padder()
    padded = padder.update(plain) + padder.finalize()
    encryptor = Cipher(algorithms.AES(derived), modes.CBC(iv)).encryptor()
    ciphertext = encryptor.update(padded) + encryptor.finalize()
    der = _seq(
        _seq(
            _oid(_PBES2),
            _seq(
                _seq(
                    _oid(_PBKDF2),
                    _seq(_octets(salt), _int(iterations), _seq(_oid(_HMAC_SHA256), _NULL)),
                ),
                _seq(_oid(_AES_256_CBC), _octets(iv)),
            ),
        ),
        _octets(ciphertext),
    )
    body = base64.encodebytes(der).replace(b"\n", b"")
    lines = [body[i : i + 64] for i in range(0, len(body), 64)]
    return b"\n".join([f"-----BEGIN {PEM_TYPE}-----".encode(), *lines, _END]) + b"\n"


def describe(data: bytes) -> Seal:
    """How the PEM key in ``data`` is sealed, read without the passphrase.
    Raises SealFormatError if it is not PBES2 with PBKDF2 and AES-CBC."""
    return _parse(_der_of(data))


def unseal(data: bytes, passphrase: bytes) -> PrivateKeyTypes:
    """The private key sealed in the PEM ``data``. Raises UnsealError if it
    does not decrypt, SealFormatError if it is not a sealing :func:`describe` reads."""
    der = _der_of(data)
    _parse(der)
    try:
        return serialization.load_der_private_key(der, passphrase)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise UnsealError("the key does not decrypt: a wrong passphrase, or altered data") from None


_END = f"-----END {PEM_TYPE}-----".encode()
_PEM = re.compile(
    rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n(.*?)-----END \1-----",
    re.S,
)

_PBES2 = "1.2.840.113549.1.5.13"
_PBKDF2 = "1.2.840.113549.1.5.12"
_OTHER_KDFS = {"1.3.6.1.4.1.11591.4.11": "scrypt"}
_HMAC_SHA1 = "1.2.840.113549.2.7"
_HMAC_SHA256 = "1.2.840.113549.2.9"
_PRFS = {
    _HMAC_SHA1: "PBKDF2-HMAC-SHA1",
    "1.2.840.113549.2.8": "PBKDF2-HMAC-SHA224",
    _HMAC_SHA256: "PBKDF2-HMAC-SHA256",
    "1.2.840.113549.2.10": "PBKDF2-HMAC-SHA384",
    "1.2.840.113549.2.11": "PBKDF2-HMAC-SHA512",
}
_AES_256_CBC = "2.16.840.1.101.3.4.1.42"
_CIPHERS = {
    "2.16.840.1.101.3.4.1.2": "AES-128-CBC",
    "2.16.840.1.101.3.4.1.22": "AES-192-CBC",
    _AES_256_CBC: "AES-256-CBC",
}
_NULL = b"\x05\x00"
_SEQUENCE, _INTEGER, _OCTET_STRING, _OID = 0x30, 0x02, 0x04, 0x06


def _der_of(data: bytes) -> bytes:
    blocks = _PEM.findall(data)
    if len(blocks) != 1 or blocks[0][0].decode() != PEM_TYPE:
        raise SealFormatError(f"expected one PEM {PEM_TYPE} block")
    try:
        return base64.b64decode(re.sub(rb"\s+", b"", blocks[0][1]), validate=True)
    except binascii.Error:
        raise SealFormatError(f"the PEM {PEM_TYPE} block is not valid base64") from None


def _parse(der: bytes) -> Seal:
    """The sealing of a DER EncryptedPrivateKeyInfo."""
    try:
        algorithm, encrypted = _items(_read(der, _SEQUENCE))
        _read(encrypted, _OCTET_STRING)
        scheme_oid, scheme_params = _items(_read(algorithm, _SEQUENCE))
        if _oid_of(scheme_oid) != _PBES2:
            raise SealFormatError(f"the key is sealed with {_oid_of(scheme_oid)}, not PBES2")
        kdf, cipher = _items(_read(scheme_params, _SEQUENCE))
        kdf_oid, kdf_params = _items(_read(kdf, _SEQUENCE))
        if _oid_of(kdf_oid) != _PBKDF2:
            kdf_name = _OTHER_KDFS.get(_oid_of(kdf_oid), _oid_of(kdf_oid))
            raise SealFormatError(f"the key's KDF is {kdf_name}, not PBKDF2")
        salt, count, *optional = _items(_read(kdf_params, _SEQUENCE))
        _read(salt, _OCTET_STRING)
        iterations = _int_of(_read(count, _INTEGER))
        prf = _HMAC_SHA1  # RFC 8018's default when the PRF is left out
        for field in optional:
            if field[0] == _SEQUENCE:
                prf = _oid_of(_items(_read(field, _SEQUENCE))[0])
            else:
                _int_of(_read(field, _INTEGER))  # keyLength
        cipher_oid = _oid_of(_items(_read(cipher, _SEQUENCE))[0])
    except (IndexError, ValueError):
        raise SealFormatError("the encrypted key's structure is damaged") from None
    if prf not in _PRFS:
        raise SealFormatError(f"the key's PBKDF2 PRF {prf} is not one trustmgr reads")
    if cipher_oid not in _CIPHERS:
        raise SealFormatError(f"the key's cipher {cipher_oid} is not one trustmgr reads")
    if not 1 <= iterations <= MAX_ITERATIONS:
        raise SealFormatError(
            f"the key asks for {iterations} PBKDF2 rounds, outside 1 to {MAX_ITERATIONS}"
        )
    return Seal(_PRFS[prf], iterations, _CIPHERS[cipher_oid])


# DER, just what EncryptedPrivateKeyInfo needs: definite lengths, single-byte tags.


def _tlv(tag: int, body: bytes) -> bytes:
    n = len(body)
    if n < 0x80:
        return bytes([tag, n]) + body
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(size)]) + size + body


def _seq(*items: bytes) -> bytes:
    return _tlv(_SEQUENCE, b"".join(items))


def _octets(data: bytes) -> bytes:
    return _tlv(_OCTET_STRING, data)


def _int(value: int) -> bytes:
    return _tlv(_INTEGER, value.to_bytes(value.bit_length() // 8 + 1, "big"))


def _oid(dotted: str) -> bytes:
    arcs = [int(a) for a in dotted.split(".")]
    body = bytearray([40 * arcs[0] + arcs[1]])
    for arc in arcs[2:]:
        chunk = [arc & 0x7F]
        while arc > 0x7F:
            arc >>= 7
            chunk.append(0x80 | (arc & 0x7F))
        body += bytes(reversed(chunk))
    return _tlv(_OID, bytes(body))


def _split(data: bytes) -> tuple[int, bytes]:
    """The tag and the whole of the first element of ``data``."""
    if len(data) < 2:
        raise ValueError("truncated")
    tag, first = data[0], data[1]
    if first < 0x80:
        start, length = 2, first
    else:
        count = first & 0x7F
        if not 1 <= count <= 4 or len(data) < 2 + count:
            raise ValueError("bad length")
        start, length = 2 + count, int.from_bytes(data[2 : 2 + count], "big")
    if len(data) < start + length:
        raise ValueError("truncated")
    return tag, data[: start + length]


def _read(element: bytes, tag: int) -> bytes:
    """The content of ``element``, which must carry ``tag``."""
    found, whole = _split(element)
    if found != tag or whole != element:
        raise ValueError("unexpected element")
    header = 2 if whole[1] < 0x80 else 2 + (whole[1] & 0x7F)
    return whole[header:]


def _items(content: bytes) -> list[bytes]:
    """The elements of a SEQUENCE's content, each whole."""
    items = []
    while content:
        _, whole = _split(content)
        items.append(whole)
        content = content[len(whole) :]
    return items


def _int_of(content: bytes) -> int:
    if not content or content[0] & 0x80:
        raise ValueError("not a positive INTEGER")
    return int.from_bytes(content, "big")


def _oid_of(element: bytes) -> str:
    content = _read(element, _OID)
    if not content or content[-1] & 0x80:
        raise ValueError("bad OID")
    values, value = [], 0
    for byte in content:
        value = (value << 7) | (byte & 0x7F)
        if not byte & 0x80:
            values.append(value)
            value = 0
    first = min(values[0] // 40, 2)
    return ".".join(map(str, [first, values[0] - 40 * first, *values[1:]]))
