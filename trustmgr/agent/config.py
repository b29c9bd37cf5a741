"""The agent's own configuration file: which cluster it is, the publisher key it
trusts, its cacerts target, and its own credentials for the providers that
sign its CSR. Trust domains, bundles and rotation phases are not here: they
come from the central run's desired document."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Annotated

from pydantic import Field, model_validator

from trustmgr.config import (
    DNS_LABEL,
    DirectoryTargetConfig,
    IstioSettings,
    KubernetesTargetConfig,
    load_as,
)
from trustmgr.providers.config import VaultAuth
from trustmgr.schema import Duration, LocalPath, Model, NonNegativeDuration

DEFAULT_AGENT_CONFIG = "/etc/trustmgr/agent.yaml"


AGENT_OWN: dict[str, set[str]] = {
    "vault": {"auth", "ca_cert", "tls_skip_verify", "timeout", "max_retries"},
    "acmPca": {"endpoint_url", "assume_role_arn", "max_wait", "max_attempts"},
}
"""Per provider kind, the settings (field names) each agent has of its own: the
desired document carries the provider's others, the agent's file these."""


class AgentVaultCredentials(Model):
    """How this cluster logs in to the mesh's Vault or OpenBao: its own role
    (docs/agent.md: a role per cluster, allowed to sign for its mesh only)."""

    auth: VaultAuth
    ca_cert: LocalPath | None = None
    tls_skip_verify: bool = False
    timeout: Duration = timedelta(seconds=30)
    max_retries: int = Field(default=2, ge=0, le=10)

    @model_validator(mode="after")
    def _one_tls_choice(self) -> AgentVaultCredentials:
        if self.ca_cert and self.tls_skip_verify:
            raise ValueError("set caCert or tlsSkipVerify, not both")
        return self


class AgentAcmPcaCredentials(Model):
    """AWS Private CA with the pod's own AWS identity (IRSA, EKS Pod Identity or
    any source of the standard chain); nothing secret is configured here."""

    endpoint_url: str | None = Field(default=None, pattern=r"^https?://[^\s/]+(/\S*)?$")
    assume_role_arn: str | None = Field(
        default=None, pattern=r"^arn:aws[\w-]*:iam::\d{12}:role/[\w+=,.@/-]+$"
    )
    max_wait: Duration = timedelta(seconds=60)
    max_attempts: int = Field(default=5, ge=1, le=20)


class AgentProviderCredentials(Model):
    """This cluster's identity towards one provider, by the provider's central name."""

    vault: AgentVaultCredentials | None = None
    acm_pca: AgentAcmPcaCredentials | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> AgentProviderCredentials:
        if (self.vault is None) == (self.acm_pca is None):
            raise ValueError("choose exactly one of vault and acmPca")
        return self


class AgentConfig(Model):
    """``trustmgr agent run``'s file (docs/agent.md)."""

    cluster: Annotated[str, Field(pattern=DNS_LABEL)]
    """This cluster's name in the central configuration."""
    publisher_key: str | None = None
    """The central run's publisher public key, PEM (``trustmgr agent publisher-key``)."""
    publisher_key_file: LocalPath | None = None
    directory: DirectoryTargetConfig | None = None
    kubernetes: KubernetesTargetConfig | None = None
    istio: IstioSettings = IstioSettings()
    adopt: bool = False
    """Replace a cacerts that trustmgr did not write (kept for rollback), as
    ``bootstrap --adopt`` does for a push-mode cluster."""
    providers: dict[str, AgentProviderCredentials] = {}
    interval: Duration = timedelta(minutes=5)
    """Between passes of ``trustmgr agent run`` without ``--once``."""
    jitter: NonNegativeDuration = timedelta(seconds=30)

    @model_validator(mode="after")
    def _choices(self) -> AgentConfig:
        if (self.publisher_key is None) == (self.publisher_key_file is None):
            raise ValueError("set exactly one of publisherKey and publisherKeyFile")
        if (self.directory is None) == (self.kubernetes is None):
            raise ValueError("the agent has exactly one target: directory or kubernetes")
        return self


def load(path: Path) -> AgentConfig:
    return load_as(AgentConfig, path)
