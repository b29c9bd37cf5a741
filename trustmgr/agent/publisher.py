"""The publisher key: the Ed25519 key the central run signs desired documents
with. It lives in the state store beside the providers' blobs, stored as a
secret; agents are given only its public half."""

from __future__ import annotations

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from trustmgr.errors import StateError
from trustmgr.providers import BlobStore

BLOB = "_agents/publisher-key.pem"
"""No provider can be named ``_agents``: provider names are DNS labels."""


def load(blobs: BlobStore) -> Ed25519PrivateKey | None:
    data = blobs.load(BLOB)
    if data is None:
        return None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        key = None
    if not isinstance(key, Ed25519PrivateKey):
        raise StateError(
            f"the state store's {BLOB} is not an Ed25519 private key: restore it from a backup "
            "(a new key means giving every agent the new public key)"
        )
    return key


def ensure(blobs: BlobStore) -> Ed25519PrivateKey:
    """The publisher key, made and stored on first use."""
    key = load(blobs)
    if key is None:
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        blobs.save(BLOB, pem, secret=True)
    return key
