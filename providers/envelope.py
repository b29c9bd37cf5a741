"""Private keys under envelope encryption: a data key wrapped by a key
management service, so no passphrase exists and the key opens only where the
KMS answers.

A key is encrypted with a fresh 256-bit data key by AES-256-GCM; the data key
is then wrapped by a key that never leaves the KMS (a Vault or OpenBao transit
key, an AWS KMS key). Only the wrapped data key and the ciphertext are kept,
in one PEM block stored after the certificate it belongs to::

    -----BEGIN TRUSTMGR ENVELOPE-----
    Wrapping: vault-transit
    Key-Id: transit/trustmgr-root
    Cipher: AES-256-GCM
    Data-Key: vault:v1:8SDd3WHDOjf7mq69CyCqYjBXAiQQAVZRkFM96XUZvNd...
    Nonce: 3q2+7wAAAAAAAAAA

    base64 of the ciphertext and its 16-byte tag
    -----END TRUSTMGR ENVELOPE-----

The headers say, without any secret, how the data key is wrapped and by which
key. The associated data of the GCM encryption is every header and the DER of
the certificate, so an envelope with a header changed, or moved under another
certificate, does not decrypt. The KMS is given :func:`context_of` the
certificate too (AWS's EncryptionContext, transit's associated data): the
wrapped data key opens for this root only, and the KMS's audit log names it.

Errors::

    keyseal.UnsealError            the ciphertext does not decrypt: it was altered
    └── keyseal.SealFormatError    the block is not an envelope this module reads

A :class:`KeyWrapper` raises provider errors for the KMS's own failures.
Messages never carry key material.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from cryptography import x509
from cryptography.exceptions import InvalidTag, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from trustmgr.providers.keyseal import SealFormatError, UnsealError

PEM_TYPE = "TRUSTMGR ENVELOPE"
CIPHER = "AES-256-GCM"
WRAPPINGS = ("vault-transit", "aws-kms")
MAX_SIZE = 64 * 1024
"""A larger block is refused unread."""


@dataclass(frozen=True)
class DataKey:
    """A fresh data key: in the clear for one encryption, and as the KMS wrapped it."""

    key_id: str
    """The wrapping key as the KMS names it (a transit ``mount/key``, a KMS key ARN)."""
    wrapped: str
    """Printable ASCII, as stored in the ``Data-Key`` header."""
    plaintext: bytes = field(repr=False)


class KeyWrapper(Protocol):
    """A key in a key management service that wraps and unwraps data keys.

    KMS failures are raised as ProviderNeedsFixError (denied, missing or
    disabled key, a wrapped key it refuses) or ProviderTransientError
    (unreachable, throttled, unavailable), one line each, no secret in them."""

    wrapping: str
    """One of :data:`WRAPPINGS`."""

    def data_key(self, context: Mapping[str, str]) -> DataKey:
        """A new 32-byte data key, wrapped under ``context``."""
        ...

    def unwrap(self, key_id: str, wrapped: str, context: Mapping[str, str]) -> bytes:
        """The data key that ``key_id`` wrapped under ``context``."""
        ...


@dataclass(frozen=True)
class Envelope:
    """An envelope's headers and ciphertext, as read from its PEM block."""

    wrapping: str
    key_id: str
    data_key: str
    nonce: bytes
    ciphertext: bytes

    def __str__(self) -> str:
        return f"envelope, data key wrapped by {self.wrapping} key {self.key_id}, {CIPHER}"

    def headers(self) -> list[tuple[str, str]]:
        return [
            ("Wrapping", self.wrapping),
            ("Key-Id", self.key_id),
            ("Cipher", CIPHER),
            ("Data-Key", self.data_key),
            ("Nonce", base64.b64encode(self.nonce).decode()),
        ]


def context_of(certificate: x509.Certificate) -> dict[str, str]:
    """What the KMS binds a wrapped data key to: the root certificate's SHA-256."""
    der = certificate.public_bytes(serialization.Encoding.DER)
    return {"trustmgr:root-sha256": hashlib.sha256(der).hexdigest()}


def is_envelope(data: bytes) -> bool:
    """Whether ``data`` holds a PEM block of :data:`PEM_TYPE`."""
    return f"-----BEGIN {PEM_TYPE}-----".encode() in data


def seal(key: PrivateKeyTypes, certificate: x509.Certificate, wrapper: KeyWrapper) -> bytes:
    """``key`` as a PEM ``TRUSTMGR ENVELOPE`` block bound to ``certificate``,
    its data key wrapped by ``wrapper``."""
    plain = key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    data_key = wrapper.data_key(context_of(certificate))
    if len(data_key.plaintext) != 32:
        raise ValueError("the data key is not 256 bits")
    header = Envelope(wrapper.wrapping, data_key.key_id, data_key.wrapped, os.urandom(12), b"")
    _check_headers(header)
    ciphertext = AESGCM(data_key.plaintext).encrypt(
        header.nonce, plain, _associated(header, certificate)
    )
    envelope = Envelope(header.wrapping, header.key_id, header.data_key, header.nonce, ciphertext)
    body = base64.b64encode(ciphertext)
    lines = [
        f"-----BEGIN {PEM_TYPE}-----",
        *(f"{name}: {value}" for name, value in envelope.headers()),
        "",
        *(body[i : i + 64].decode() for i in range(0, len(body), 64)),
        f"-----END {PEM_TYPE}-----",
    ]
    return "\n".join(lines).encode() + b"\n"


def describe(data: bytes) -> Envelope:
    """The envelope in the PEM ``data``, read without the KMS. Raises
    SealFormatError if it is not one envelope this module reads."""
    if len(data) > MAX_SIZE:
        raise SealFormatError(f"the {PEM_TYPE} block is larger than {MAX_SIZE} bytes")
    blocks = _PEM.findall(data)
    if len(blocks) != 1:
        raise SealFormatError(f"expected one PEM {PEM_TYPE} block")
    head, sep, body = blocks[0].replace(b"\r\n", b"\n").partition(b"\n\n")
    if not sep:
        raise SealFormatError(f"the {PEM_TYPE} block has no headers")
    try:
        fields = dict(_header(line) for line in head.decode("ascii").split("\n"))
        names = ["Wrapping", "Key-Id", "Cipher", "Data-Key", "Nonce"]
        if sorted(fields) != sorted(names):
            raise SealFormatError(f"the {PEM_TYPE} headers are not {', '.join(names)}")
        if fields["Cipher"] != CIPHER:
            raise SealFormatError(f"the envelope's cipher {fields['Cipher']} is not {CIPHER}")
        envelope = Envelope(
            wrapping=fields["Wrapping"],
            key_id=fields["Key-Id"],
            data_key=fields["Data-Key"],
            nonce=base64.b64decode(fields["Nonce"], validate=True),
            ciphertext=base64.b64decode(re.sub(rb"\s+", b"", body), validate=True),
        )
    except (UnicodeDecodeError, binascii.Error):
        raise SealFormatError(f"the {PEM_TYPE} block is damaged") from None
    _check_headers(envelope)
    if len(envelope.nonce) != 12 or len(envelope.ciphertext) <= 16:
        raise SealFormatError(f"the {PEM_TYPE} block is damaged")
    return envelope


def unseal(data: bytes, certificate: x509.Certificate, wrapper: KeyWrapper) -> PrivateKeyTypes:
    """The private key in the envelope ``data``, which must be bound to
    ``certificate`` and wrapped the way ``wrapper`` unwraps. Raises UnsealError
    if the ciphertext does not decrypt, SealFormatError if it is not an
    envelope :func:`describe` reads or not one ``wrapper`` opens."""
    envelope = describe(data)
    if envelope.wrapping != wrapper.wrapping:
        raise SealFormatError(f"the data key is wrapped by {envelope.wrapping}")
    data_key = wrapper.unwrap(envelope.key_id, envelope.data_key, context_of(certificate))
    if len(data_key) != 32:
        raise UnsealError("the unwrapped data key is not 256 bits")
    try:
        plain = AESGCM(data_key).decrypt(
            envelope.nonce, envelope.ciphertext, _associated(envelope, certificate)
        )
    except InvalidTag:
        raise UnsealError(
            "the envelope does not decrypt: it was altered, or it belongs to another certificate"
        ) from None
    try:
        return serialization.load_der_private_key(plain, None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise SealFormatError("the envelope does not hold a private key") from None


_PEM = re.compile(rf"-----BEGIN {PEM_TYPE}-----\r?\n(.*?)-----END {PEM_TYPE}-----".encode(), re.S)
_VALUE = re.compile(r"[\x21-\x7e]{1,2048}")


def _header(line: str) -> tuple[str, str]:
    name, sep, value = line.partition(": ")
    if not sep:
        raise SealFormatError(f"the {PEM_TYPE} header line is not 'Name: value'")
    return name, value


def _check_headers(envelope: Envelope) -> None:
    if envelope.wrapping not in WRAPPINGS:
        raise SealFormatError(
            f"the data key's wrapping {envelope.wrapping!r} is not one trustmgr reads"
        )
    for name, value in envelope.headers():
        if not _VALUE.fullmatch(value):
            raise SealFormatError(f"the envelope's {name} header is not printable ASCII")


def _associated(envelope: Envelope, certificate: x509.Certificate) -> bytes:
    headers = "".join(f"{name}: {value}\n" for name, value in envelope.headers())
    return f"{PEM_TYPE}\n{headers}".encode() + certificate.public_bytes(serialization.Encoding.DER)
