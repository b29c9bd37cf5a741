"""Upstream authorities that sign cluster CA CSRs and report their roots.

A provider knows cryptography and its own SDK, nothing of meshes, clusters,
Kubernetes or rotation. trustmgr checks every answer before using it.
"""

from trustmgr.providers.base import (
    BlobStore,
    Clock,
    Provider,
    ProviderError,
    ProviderNeedsFixError,
    ProviderTransientError,
    RootKeeper,
    RootRenewer,
    SignedCA,
)

__all__ = [
    "BlobStore",
    "Clock",
    "Provider",
    "ProviderError",
    "ProviderNeedsFixError",
    "ProviderTransientError",
    "RootKeeper",
    "RootRenewer",
    "SignedCA",
]
