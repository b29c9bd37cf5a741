"""Providers built from the configuration."""

from __future__ import annotations

from providers import BlobStore, Clock, Provider
from providers.config import ProviderConfig
from providers.selfsigned import SelfSignedProvider


def build_provider(
    name: str, config: ProviderConfig, *, blobs: BlobStore, clock: Clock
) -> Provider:
    """The provider named ``name``; SDKs are imported only for the kinds in use."""
    if config.self_signed is not None:
        return SelfSignedProvider(name, config.self_signed, blobs, clock)
    if config.vault is not None:
        from providers.vault import VaultProvider  # type: ignore[import-not-found,unused-ignore]

        provider: Provider = VaultProvider(name, config.vault, clock)
        return provider
    assert config.acm_pca is not None
    from providers.acmpca import AcmPcaProvider  # type: ignore[import-not-found,unused-ignore]

    aws: Provider = AcmPcaProvider(name, config.acm_pca, clock)
    return aws
