"""The envelope format: what is stored, what binds it to its certificate, every
alteration refused; and the keyEncryption configuration."""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.x509.oid import NameOID
from pydantic import ValidationError

from trustmgr.providers import ProviderNeedsFixError, envelope, keyseal
from trustmgr.providers.config import SelfSignedConfig
from trustmgr.providers.envelope import DataKey


class MemoryKms:
    """A KMS in memory: one AES-GCM key per key id, the context as associated data."""

    wrapping = "vault-transit"

    def __init__(self, key_id: str = "transit/root", *, binds_context: bool = True) -> None:
        self.key_id = key_id
        self._binds = binds_context
        self._keys = {key_id: AESGCM.generate_key(256)}
        self.calls: list[tuple[str, dict[str, str]]] = []

    def data_key(self, context: Mapping[str, str]) -> DataKey:
        self.calls.append(("wrap", dict(context)))
        plaintext, nonce = os.urandom(32), os.urandom(12)
        aad = _aad(context) if self._binds else None
        sealed = AESGCM(self._keys[self.key_id]).encrypt(nonce, plaintext, aad)
        wrapped = "mem:" + base64.b64encode(nonce + sealed).decode()
        return DataKey(self.key_id, wrapped, plaintext)

    def unwrap(self, key_id: str, wrapped: str, context: Mapping[str, str]) -> bytes:
        self.calls.append(("unwrap", dict(context)))
        if key_id not in self._keys:
            raise ProviderNeedsFixError(f"no key {key_id}")
        raw = base64.b64decode(wrapped.removeprefix("mem:"))
        aad = _aad(context) if self._binds else None
        return AESGCM(self._keys[key_id]).decrypt(raw[:12], raw[12:], aad)


def _aad(context: Mapping[str, str]) -> bytes:
    return json.dumps(dict(context), sort_keys=True).encode()


def _root(name: str = "Root") -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return key, cert


@pytest.fixture(scope="module")
def root() -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    return _root()


def _public(key: Any) -> bytes:
    return bytes(
        key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def test_a_key_sealed_in_an_envelope_opens_to_itself(
    root: tuple[ec.EllipticCurvePrivateKey, x509.Certificate],
) -> None:
    key, cert = root
    kms = MemoryKms()
    sealed = envelope.seal(key, cert, kms)
    assert _public(envelope.unseal(sealed, cert, kms)) == _public(key)
    fingerprint = cert.fingerprint(hashes.SHA256()).hex()
    assert kms.calls == [
        ("wrap", {"trustmgr:root-sha256": fingerprint}),
        ("unwrap", {"trustmgr:root-sha256": fingerprint}),
    ]


def test_only_the_wrapped_data_key_and_the_ciphertext_are_stored(
    root: tuple[ec.EllipticCurvePrivateKey, x509.Certificate],
) -> None:
    key, cert = root
    sealed = envelope.seal(key, cert, MemoryKms())
    lines = sealed.decode().splitlines()
    assert lines[0] == "-----BEGIN TRUSTMGR ENVELOPE-----"
    assert [line.split(": ")[0] for line in lines[1:6]] == [
        "Wrapping",
        "Key-Id",
        "Cipher",
        "Data-Key",
        "Nonce",
    ]
    assert lines[1:4] == ["Wrapping: vault-transit", "Key-Id: transit/root", "Cipher: AES-256-GCM"]
    assert lines[6] == "" and lines[-1] == "-----END TRUSTMGR ENVELOPE-----"
    assert all(len(line) <= 64 for line in lines[7:-1])
    described = envelope.describe(sealed)
    assert str(described) == (
        "envelope, data key wrapped by vault-transit key transit/root, AES-256-GCM"
    )
    plain = key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    assert len(described.ciphertext) == len(plain) + 16
    assert plain not in sealed and base64.b64encode(plain)[:40] not in sealed


def _replace_line(name: str, value: str) -> Callable[[bytes], bytes]:
    def change(sealed: bytes) -> bytes:
        lines = sealed.decode().split("\n")
        index = next(i for i, line in enumerate(lines) if line.startswith(f"{name}: "))
        lines[index] = f"{name}: {value}"
        return "\n".join(lines).encode()

    return change


def _flip_ciphertext(sealed: bytes) -> bytes:
    lines = sealed.split(b"\n")
    body = bytearray(base64.b64decode(b"".join(lines[7:-2])))
    body[5] ^= 0x01
    encoded = base64.b64encode(bytes(body))
    return b"\n".join([*lines[:7], encoded, *lines[-2:]])


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        (_flip_ciphertext, keyseal.UnsealError, "the envelope does not decrypt: it was altered"),
        (
            _replace_line("Nonce", base64.b64encode(b"\0" * 12).decode()),
            keyseal.UnsealError,
            "it was altered",
        ),
        (_replace_line("Key-Id", "transit/other"), ProviderNeedsFixError, "no key transit/other"),
        (_replace_line("Cipher", "AES-128-GCM"), keyseal.SealFormatError, "is not AES-256-GCM"),
        (
            _replace_line("Wrapping", "aws-kms"),
            keyseal.SealFormatError,
            "the data key is wrapped by aws-kms",
        ),
        (
            _replace_line("Wrapping", "rot13"),
            keyseal.SealFormatError,
            "wrapping 'rot13' is not one trustmgr reads",
        ),
        (lambda s: s.replace(b"Nonce: ", b"Nonce:"), keyseal.SealFormatError, "'Name: value'"),
        (lambda s: s.replace(b"Cipher", b"Mode"), keyseal.SealFormatError, "headers are not"),
        (lambda s: s[: len(s) // 2], keyseal.SealFormatError, "expected one PEM"),
        (lambda s: s + s, keyseal.SealFormatError, "expected one PEM"),
        (
            lambda s: s.replace(b"-----\n", b"-----\n" + b"X: y\n" * 14000, 1),
            keyseal.SealFormatError,
            "larger than 65536 bytes",
        ),
    ],
    ids=[
        "ciphertext",
        "nonce",
        "key-id",
        "cipher",
        "wrapping",
        "unknown-wrapping",
        "header-line",
        "header-name",
        "truncated",
        "two-blocks",
        "oversized",
    ],
)
def test_every_alteration_is_refused(
    root: tuple[ec.EllipticCurvePrivateKey, x509.Certificate],
    change: Callable[[bytes], bytes],
    error: type[Exception],
    message: str,
) -> None:
    key, cert = root
    kms = MemoryKms()
    altered = change(envelope.seal(key, cert, kms))
    with pytest.raises(error, match=message):
        envelope.unseal(altered, cert, kms)


def test_a_changed_data_key_is_refused_by_the_kms(
    root: tuple[ec.EllipticCurvePrivateKey, x509.Certificate],
) -> None:
    key, cert = root
    kms = MemoryKms()
    sealed = envelope.seal(key, cert, kms)
    other = envelope.describe(envelope.seal(key, cert, kms)).data_key
    with pytest.raises(keyseal.UnsealError, match="it was altered"):
        envelope.unseal(_replace_line("Data-Key", other)(sealed), cert, kms)


def test_an_envelope_moved_under_another_certificate_does_not_open(
    root: tuple[ec.EllipticCurvePrivateKey, x509.Certificate],
) -> None:
    """Refused by the KMS, which binds the data key to the certificate; and by
    the envelope itself, should a KMS ignore the context."""
    key, cert = root
    _, other = _root("Other")
    kms = MemoryKms()
    with pytest.raises(InvalidTag):
        envelope.unseal(envelope.seal(key, cert, kms), other, kms)
    careless = MemoryKms(binds_context=False)
    with pytest.raises(keyseal.UnsealError, match="it belongs to another certificate"):
        envelope.unseal(envelope.seal(key, cert, careless), other, careless)


def test_describe_needs_no_kms(root: tuple[ec.EllipticCurvePrivateKey, x509.Certificate]) -> None:
    key, cert = root
    kms = MemoryKms()
    sealed = envelope.seal(key, cert, kms)
    kms.calls.clear()
    assert envelope.describe(sealed).key_id == "transit/root"
    assert envelope.is_envelope(sealed) and not envelope.is_envelope(b"x")
    assert kms.calls == []


# --- configuration ----------------------------------------------------------------------

TRANSIT = {"vaultTransit": {"address": "https://bao.example:8200", "key": "trustmgr-root"}}
KMS = {"awsKms": {"keyId": "alias/trustmgr-root", "region": "eu-west-1"}}


def test_key_encryption_replaces_the_passphrase() -> None:
    transit = SelfSignedConfig.model_validate({"keyEncryption": TRANSIT})
    assert transit.key_encryption is not None
    vault = transit.key_encryption.vault_transit
    assert vault is not None and vault.mount == "transit"
    assert vault.auth.token is not None and vault.auth.token.source == (
        "environment variable VAULT_TOKEN"
    )
    kms = SelfSignedConfig.model_validate({"keyEncryption": KMS})
    assert kms.key_encryption is not None and kms.key_encryption.aws_kms is not None
    assert kms.key_encryption.aws_kms.endpoint_url is None


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (
            {"passphraseEnv": "P", "keyEncryption": KMS},
            "set exactly one of passphraseEnv, passphraseFile and keyEncryption, not "
            "passphraseEnv and keyEncryption",
        ),
        (
            {},
            "set passphraseEnv (an environment variable name) or passphraseFile, or keyEncryption",
        ),
        ({"keyEncryption": {}}, "choose exactly one of vaultTransit and awsKms"),
        ({"keyEncryption": {**TRANSIT, **KMS}}, "choose exactly one of vaultTransit and awsKms"),
        ({"keyEncryption": {"vaultTransit": {"address": "https://b"}}}, "key"),
        (
            {"keyEncryption": {"vaultTransit": {**TRANSIT["vaultTransit"], "key": "a/b"}}},
            "pattern",
        ),
        (
            {"keyEncryption": {"vaultTransit": {**TRANSIT["vaultTransit"], "token": "hvs.secret"}}},
            "Extra inputs are not permitted",
        ),
        (
            {
                "keyEncryption": {
                    "awsKms": {
                        "keyId": "arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab",
                        "region": "eu-west-1",
                    }
                }
            },
            "region eu-west-1 is not the region of keyId",
        ),
        ({"keyEncryption": {"awsKms": {"keyId": "my key", "region": "eu-west-1"}}}, "pattern"),
        (
            {"keyEncryption": {"awsKms": {**KMS["awsKms"], "secretAccessKey": "x"}}},
            "Extra inputs are not permitted",
        ),
    ],
)
def test_bad_key_encryption_is_refused(data: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValidationError) as info:
        SelfSignedConfig.model_validate(data)
    assert problem in str(info.value)
