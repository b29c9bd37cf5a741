"""SPIFFE trust bundles (JWKS, SPIFFE Trust Domain and Bundle spec §4)."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from trustmgr.errors import BadMaterialError

_CURVES = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}


def _b64url(n: int | bytes) -> str:
    raw = n if isinstance(n, bytes) else n.to_bytes((n.bit_length() + 7) // 8, "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def jwk(cert: x509.Certificate) -> dict[str, Any]:
    """A JWK for an X.509 authority: ``use: x509-svid`` and exactly one ``x5c``."""
    key = cert.public_key()
    der = cert.public_bytes(serialization.Encoding.DER)
    out: dict[str, Any] = {"use": "x509-svid", "x5c": [base64.b64encode(der).decode()]}
    if isinstance(key, ec.EllipticCurvePublicKey):
        numbers = key.public_numbers()
        size = (key.curve.key_size + 7) // 8
        out |= {
            "kty": "EC",
            "crv": _CURVES[key.curve.name],
            "x": _b64url(numbers.x.to_bytes(size, "big")),
            "y": _b64url(numbers.y.to_bytes(size, "big")),
        }
    elif isinstance(key, rsa.RSAPublicKey):
        numbers_rsa = key.public_numbers()
        out |= {"kty": "RSA", "n": _b64url(numbers_rsa.n), "e": _b64url(numbers_rsa.e)}
    else:
        raise BadMaterialError("SPIFFE bundles carry EC or RSA authorities only")
    return out


def encode(roots: tuple[x509.Certificate, ...], *, sequence: int, refresh_hint: int) -> bytes:
    document = {
        "keys": [jwk(r) for r in roots],
        "spiffe_sequence": sequence,
        "spiffe_refresh_hint": refresh_hint,
    }
    return json.dumps(document, indent=2).encode() + b"\n"


@dataclass(frozen=True)
class SpiffeBundle:
    roots: tuple[x509.Certificate, ...]
    sequence: int | None
    refresh_hint: int | None


def decode(data: bytes, *, source: str, now: datetime) -> SpiffeBundle:
    """Parse and check an imported bundle: X.509 authorities only, each a CA
    certificate, not expired. Anything else is refused with where it is."""
    try:
        document = json.loads(data)
    except ValueError:
        raise BadMaterialError(f"{source}: not a JSON SPIFFE bundle") from None
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise BadMaterialError(f"{source}: a SPIFFE bundle needs a 'keys' list")
    roots = []
    for index, key in enumerate(document["keys"]):
        where = f"{source}: keys[{index}]"
        if not isinstance(key, dict):
            raise BadMaterialError(f"{where} is not an object")
        if key.get("use") == "jwt-svid":
            continue
        if key.get("use") != "x509-svid":
            raise BadMaterialError(f"{where} has use {key.get('use')!r}, expected x509-svid")
        x5c = key.get("x5c")
        if not isinstance(x5c, list) or len(x5c) != 1:
            raise BadMaterialError(f"{where} must hold exactly one x5c certificate")
        try:
            cert = x509.load_der_x509_certificate(base64.b64decode(x5c[0], validate=True))
        except (ValueError, TypeError):
            raise BadMaterialError(f"{where}: the x5c certificate cannot be parsed") from None
        try:
            ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except x509.ExtensionNotFound:
            ca = False
        if not ca:
            raise BadMaterialError(f"{where} is not a CA certificate")
        if now > cert.not_valid_after_utc:
            raise BadMaterialError(f"{where} expired at {cert.not_valid_after_utc:%Y-%m-%d}")
        roots.append(cert)
    if not roots:
        raise BadMaterialError(f"{source}: the bundle holds no X.509 authority")
    sequence = document.get("spiffe_sequence")
    hint = document.get("spiffe_refresh_hint")
    if sequence is not None and not isinstance(sequence, int):
        raise BadMaterialError(f"{source}: spiffe_sequence must be an integer")
    if hint is not None and not isinstance(hint, int):
        raise BadMaterialError(f"{source}: spiffe_refresh_hint must be an integer")
    return SpiffeBundle(tuple(roots), sequence, hint)
