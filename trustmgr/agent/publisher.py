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
    return _load_at(blobs, BLOB)


def ensure(blobs: BlobStore) -> Ed25519PrivateKey:
    """The publisher key, made and stored on first use."""
    key = load(blobs)
    if key is None:
        key = Ed25519PrivateKey.generate()
        blobs.save(BLOB, _pem(key), secret=True)
    return key


NEXT = "_agents/publisher-key.next.pem"
"""The key that replaces the publisher key once promoted, while agents learn it."""


def _load_at(blobs: BlobStore, name: str) -> Ed25519PrivateKey | None:
    data = blobs.load(name)
    if data is None:
        return None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        key = None
    if not isinstance(key, Ed25519PrivateKey):
        raise StateError(
            f"the state store's {name} is not an Ed25519 private key: restore it from a "
            "backup (a new key means giving every agent the new public key)"
        )
    return key


def _pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def ensure_next(blobs: BlobStore) -> Ed25519PrivateKey:
    """The next publisher key, made and stored on first use: agents are given its
    public half beside the current one before it is promoted."""
    key = _load_at(blobs, NEXT)
    if key is None:
        key = Ed25519PrivateKey.generate()
        blobs.save(NEXT, _pem(key), secret=True)
    return key


def promote(blobs: BlobStore) -> Ed25519PrivateKey:
    """The next key becomes the publisher key. Stopped between the two steps, the
    next run finds the next key equal to the current one and finishes."""
    key = _load_at(blobs, NEXT)
    if key is None:
        raise StateError(
            "there is no next publisher key: make one with `trustmgr agent publisher-key "
            "--next` and give every agent both keys first"
        )
    blobs.save(BLOB, _pem(key), secret=True)
    blobs.delete(NEXT)
    return key
