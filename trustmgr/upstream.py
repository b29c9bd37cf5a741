"""Providers built from the configuration."""

from __future__ import annotations

import importlib.util

from trustmgr.errors import BadInputError
from trustmgr.providers import BlobStore, Clock, Provider
from trustmgr.providers.config import ProviderConfig
from trustmgr.providers.selfsigned import SelfSignedProvider


def _require(package: str, *, provider: str, kind: str, extra: str) -> None:
    if importlib.util.find_spec(package) is None:
        raise BadInputError(
            f"provider {provider} is of kind {kind}, which needs the {package} package: "
            f"pip install 'trustmgr[{extra}]'"
        )


def build_provider(
    name: str, config: ProviderConfig, *, blobs: BlobStore, clock: Clock, generation: str = ""
) -> Provider:
    """The provider named ``name``; SDKs are imported only for the kinds in use.
    ``generation``, for a Vault provider, is the issuer a root rotation made: it
    signs, and its root alone is reported."""
    if config.self_signed is not None:
        return SelfSignedProvider(name, config.self_signed, blobs, clock)
    if config.vault is not None:
        _require("hvac", provider=name, kind="vault", extra="vault")
        from trustmgr.providers.vault import VaultProvider

        if generation:
            scoped = config.vault.model_copy(update={"issuer": generation})
            return VaultProvider(name, scoped, clock, issuer_roots_only=True)
        return VaultProvider(name, config.vault, clock)
    assert config.acm_pca is not None
    _require("boto3", provider=name, kind="acmPca", extra="aws")
    from trustmgr.providers.acmpca import AcmPcaProvider

    return AcmPcaProvider(name, config.acm_pca, clock)
