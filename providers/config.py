"""Configuration of each provider, as written under ``providers.<name>`` in
trustmgr.yaml. Field names are the documented camelCase keys; unknown keys are
errors. Nothing here touches the network or the disk."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, model_validator
from pydantic.alias_generators import to_camel

from trustmgr.providers.keys import KeyAlgorithm
from trustmgr.schema import (
    CA_LIFETIME_FLOOR,
    Country,
    Duration,
    EnvName,
    LocalPath,
    Model,
    NameValue,
)


class Subject(Model):
    common_name: NameValue = "trustmgr Root CA"
    organization: NameValue | None = None
    organizational_unit: NameValue | None = None
    country: Country | None = None


class SelfSignedConfig(Model):
    """A root CA trustmgr creates and keeps, encrypted, in its state store: sealed
    with a passphrase, or wrapped by a key management service (``keyEncryption``)."""

    key_algorithm: KeyAlgorithm = KeyAlgorithm.ECDSA_P256
    ttl: Duration = timedelta(days=3650)
    subject: Subject = Subject()
    passphrase_env: EnvName | None = None
    passphrase_file: LocalPath | None = None
    key_encryption: KeyEncryption | None = None

    @model_validator(mode="after")
    def _one_protection(self) -> SelfSignedConfig:
        sources = {
            "passphraseEnv": self.passphrase_env,
            "passphraseFile": self.passphrase_file,
            "keyEncryption": self.key_encryption,
        }
        chosen = [key for key, value in sources.items() if value]
        if len(chosen) > 1:
            raise ValueError(
                f"set exactly one of passphraseEnv, passphraseFile and keyEncryption, "
                f"not {' and '.join(chosen)}"
            )
        if not chosen:
            raise ValueError(
                "the root key is kept encrypted: set passphraseEnv (an environment "
                "variable name) or passphraseFile, or keyEncryption (a Vault transit or "
                "AWS KMS key)"
            )
        return self


def _one_source(what: str, **sources: str | None) -> None:
    """Exactly one of ``sources`` is set; the error names them in camelCase."""
    chosen = [key for key, value in sources.items() if value]
    if len(chosen) != 1:
        names = ", ".join(to_camel(key) for key in sources)
        raise ValueError(f"set exactly one of {names} for the {what}")


def _vault_path(value: str) -> str:
    path = value.strip("/")
    if not path or any(part in ("", ".", "..") for part in path.split("/")):
        raise ValueError("must be a Vault path such as pki or team/pki")
    return path


VaultPath = Annotated[str, AfterValidator(_vault_path)]


class VaultTokenAuth(Model):
    """A token read from an environment variable (default VAULT_TOKEN) or a file.

    The source is read again when Vault rejects the token, so a file kept
    current by Vault Agent is followed; a token cannot log in again by itself.
    """

    env: EnvName | None = None
    file: LocalPath | None = None

    @model_validator(mode="after")
    def _at_most_one_source(self) -> VaultTokenAuth:
        if self.env and self.file:
            raise ValueError("set env or file for the token, not both")
        return self

    @property
    def source(self) -> str:
        if self.file:
            return f"file {self.file}"
        return f"environment variable {self.env or 'VAULT_TOKEN'}"


class VaultAppRoleAuth(Model):
    """AppRole login: a role id (inline, file or env) and a secret id (file or env)."""

    mount: VaultPath = "approle"
    role_id: str | None = None
    role_id_file: LocalPath | None = None
    role_id_env: EnvName | None = None
    secret_id_file: LocalPath | None = None
    secret_id_env: EnvName | None = None

    @model_validator(mode="after")
    def _one_source_each(self) -> VaultAppRoleAuth:
        _one_source(
            "role id",
            role_id=self.role_id,
            role_id_file=self.role_id_file,
            role_id_env=self.role_id_env,
        )
        _one_source(
            "secret id", secret_id_file=self.secret_id_file, secret_id_env=self.secret_id_env
        )
        return self


class VaultKubernetesAuth(Model):
    """Kubernetes login with the pod's service-account token, read at every login."""

    role: str = Field(min_length=1)
    mount: VaultPath = "kubernetes"
    token_path: LocalPath = "/var/run/secrets/kubernetes.io/serviceaccount/token"


class VaultJwtAuth(Model):
    """JWT/OIDC login with a JWT from a file or an environment variable, read at every login."""

    role: str = Field(min_length=1)
    mount: VaultPath = "jwt"
    jwt_file: LocalPath | None = None
    jwt_env: EnvName | None = None

    @model_validator(mode="after")
    def _one_jwt_source(self) -> VaultJwtAuth:
        _one_source("JWT", jwt_file=self.jwt_file, jwt_env=self.jwt_env)
        return self


class VaultAuth(Model):
    """Exactly one auth method."""

    token: VaultTokenAuth | None = None
    app_role: VaultAppRoleAuth | None = None
    kubernetes: VaultKubernetesAuth | None = None
    jwt: VaultJwtAuth | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> VaultAuth:
        chosen = [m for m in ("token", "app_role", "kubernetes", "jwt") if getattr(self, m)]
        if len(chosen) != 1:
            raise ValueError("choose exactly one auth method: token, appRole, kubernetes or jwt")
        return self


def _vault_address(value: str) -> str:
    if not re.fullmatch(r"https?://[^\s/]+(/\S*)?", value):
        raise ValueError("must be an http:// or https:// URL, e.g. https://vault.example.com:8200")
    return value.rstrip("/")


class VaultConfig(Model):
    """Vault or OpenBao PKI secrets engine. Holds no secret: credentials are
    named by where to read them (environment variable or file)."""

    address: Annotated[str, AfterValidator(_vault_address)]
    namespace: str | None = None
    ca_cert: LocalPath | None = None
    tls_skip_verify: bool = False
    mount: VaultPath = "pki"
    issuer: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]+$")] | None = None
    ttl: Annotated[Duration, CA_LIFETIME_FLOOR] | None = None
    timeout: Duration = timedelta(seconds=30)
    max_retries: int = Field(default=2, ge=0, le=10)
    auth: VaultAuth = VaultAuth(token=VaultTokenAuth())

    @model_validator(mode="after")
    def _one_tls_choice(self) -> VaultConfig:
        if self.ca_cert and self.tls_skip_verify:
            raise ValueError("set caCert or tlsSkipVerify, not both")
        return self


class AcmPcaConfig(Model):
    """AWS Private CA: an existing, ACTIVE private CA issues the cluster CAs.

    ``signingAlgorithm`` defaults to the CA's own and ``templateArn`` to
    ``SubordinateCACertificate_PathLen0_CSRPassthrough/V1`` in the CA's
    partition; the provider resolves both (docs/providers/acmpca.md).
    """

    certificate_authority_arn: str = Field(
        pattern=r"^arn:aws[\w-]*:acm-pca:[\w-]+:\d{12}:certificate-authority/[\w-]+$"
    )
    region: str
    endpoint_url: str | None = Field(default=None, pattern=r"^https?://[^\s/]+(/\S*)?$")
    assume_role_arn: str | None = Field(
        default=None, pattern=r"^arn:aws[\w-]*:iam::\d{12}:role/[\w+=,.@/-]+$"
    )
    # IssueCertificate's SigningAlgorithm values (AWS Private CA API 2017-08-22).
    signing_algorithm: (
        Literal[
            "SHA256WITHECDSA",
            "SHA384WITHECDSA",
            "SHA512WITHECDSA",
            "SHA256WITHRSA",
            "SHA384WITHRSA",
            "SHA512WITHRSA",
            "SHA256WITHRSA_PSS",
            "SHA384WITHRSA_PSS",
            "SHA512WITHRSA_PSS",
            "SM3WITHSM2",
            "ML_DSA_44",
            "ML_DSA_65",
            "ML_DSA_87",
        ]
        | None
    ) = None
    template_arn: str | None = Field(
        default=None, pattern=r"^arn:aws[\w-]*:acm-pca:::template/\w+/V\d+$"
    )
    max_wait: Duration = timedelta(seconds=60)
    retry_mode: Literal["standard", "adaptive"] = "standard"
    max_attempts: int = Field(default=5, ge=1, le=20)

    @property
    def partition(self) -> str:
        """The AWS partition of the CA (``aws``, ``aws-cn``, ``aws-us-gov``...)."""
        return self.certificate_authority_arn.split(":")[1]

    @model_validator(mode="after")
    def _matches_the_ca(self) -> AcmPcaConfig:
        arn_region = self.certificate_authority_arn.split(":")[3]
        if self.region != arn_region:
            raise ValueError(
                f"region {self.region} is not the region of certificateAuthorityArn "
                f"({arn_region}): requests must go to the CA's own region"
            )
        if self.template_arn and self.template_arn.split(":")[1] != self.partition:
            raise ValueError(
                f"templateArn is in partition {self.template_arn.split(':')[1]}, "
                f"the CA in {self.partition}"
            )
        return self


class VaultTransitKeyEncryption(Model):
    """A key of a Vault or OpenBao transit engine wraps the root key's data key.
    Holds no secret: auth names where credentials are read, as for the vault provider."""

    address: Annotated[str, AfterValidator(_vault_address)]
    namespace: str | None = None
    ca_cert: LocalPath | None = None
    tls_skip_verify: bool = False
    mount: VaultPath = "transit"
    key: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]+$")]
    timeout: Duration = timedelta(seconds=30)
    auth: VaultAuth = VaultAuth(token=VaultTokenAuth())

    @model_validator(mode="after")
    def _one_tls_choice(self) -> VaultTransitKeyEncryption:
        if self.ca_cert and self.tls_skip_verify:
            raise ValueError("set caCert or tlsSkipVerify, not both")
        return self


class AwsKmsKeyEncryption(Model):
    """A symmetric AWS KMS key wraps the root key's data key. Credentials come
    from the standard AWS chain, never from the configuration."""

    key_id: str = Field(
        pattern=r"^(arn:aws[\w-]*:kms:[\w-]+:\d{12}:(key|alias)/[\w/_+=,.@-]+"
        r"|alias/[\w/_+=,.@-]+|[0-9a-fA-F-]{36}|mrk-[0-9a-f]{32})$"
    )
    region: str = Field(pattern=r"^[a-z]{2}(-[a-z]+)+-\d+$")
    endpoint_url: str | None = Field(default=None, pattern=r"^https?://[^\s/]+(/\S*)?$")

    @model_validator(mode="after")
    def _key_in_region(self) -> AwsKmsKeyEncryption:
        if self.key_id.startswith("arn:") and self.key_id.split(":")[3] != self.region:
            raise ValueError(
                f"region {self.region} is not the region of keyId ({self.key_id.split(':')[3]})"
            )
        return self


class KeyEncryption(Model):
    """Exactly one key management service that wraps the root key."""

    vault_transit: VaultTransitKeyEncryption | None = None
    aws_kms: AwsKmsKeyEncryption | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> KeyEncryption:
        if (self.vault_transit is None) == (self.aws_kms is None):
            raise ValueError("choose exactly one of vaultTransit and awsKms")
        return self


class ProviderConfig(Model):
    """One entry under ``providers``: exactly one kind."""

    self_signed: SelfSignedConfig | None = None
    vault: VaultConfig | None = None
    acm_pca: AcmPcaConfig | None = None

    @model_validator(mode="before")
    @classmethod
    def _exactly_one_kind(cls, data: Any) -> Any:
        if isinstance(data, dict):
            kinds = [
                k for k in ("selfSigned", "vault", "acmPca", "self_signed", "acm_pca") if k in data
            ]
            if len(kinds) != 1:
                raise ValueError("a provider has exactly one kind: selfSigned, vault or acmPca")
        return data

    @property
    def kind(self) -> str:
        if self.self_signed is not None:
            return "selfSigned"
        if self.vault is not None:
            return "vault"
        return "acmPca"
