"""AWS Private CA (ACM PCA): cluster CAs issued by an existing private CA.

One issuance is DescribeCertificateAuthority (on first use: is the CA ACTIVE,
which algorithm does it sign with), GetCertificateAuthorityCertificate (its
chain and root, and the notAfter an issued CA may not pass), IssueCertificate
with the ``SubordinateCACertificate_PathLen0_CSRPassthrough/V1`` template and
an explicit validity (notBefore ``BACKDATE`` in the past, notAfter as asked or
shortened), the ``certificate_issued`` waiter, and GetCertificate.

The provider needs only ``PcaClient``, a five-method slice of boto3's client,
so tests can stub it. boto3 and botocore are imported only when a client is
built or an AWS error is translated: the rest of trustmgr imports without them.
Throttling and 5xx answers are retried by botocore's own retry modes; what
still fails is translated, in ``_translate``, into the provider error tree.
"""

from __future__ import annotations

import hashlib
import math
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Literal, Protocol

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from trustmgr.providers.awscodes import ACCESS_DENIED, BAD_CREDENTIALS
from trustmgr.providers.base import (
    BACKDATE,
    Clock,
    ProviderError,
    ProviderNeedsFixError,
    ProviderTransientError,
    SignedCA,
)
from trustmgr.providers.chains import is_self_signed
from trustmgr.providers.config import AcmPcaConfig

if TYPE_CHECKING:
    from typing import Unpack

    from mypy_boto3_acm_pca.client import ACMPCAClient
    from mypy_boto3_acm_pca.literals import SigningAlgorithmType
    from mypy_boto3_acm_pca.type_defs import (
        DescribeCertificateAuthorityRequestTypeDef,
        DescribeCertificateAuthorityResponseTypeDef,
        GetCertificateAuthorityCertificateRequestTypeDef,
        GetCertificateAuthorityCertificateResponseTypeDef,
        GetCertificateRequestTypeDef,
        GetCertificateResponseTypeDef,
        IssueCertificateRequestTypeDef,
        IssueCertificateResponseTypeDef,
    )
    from mypy_boto3_acm_pca.waiter import CertificateIssuedWaiter

DEFAULT_TEMPLATE = "SubordinateCACertificate_PathLen0_CSRPassthrough/V1"
"""Critical CA:TRUE with pathlen 0 and critical keyCertSign/cRLSign come from
the template; every other CSR extension (the URI SAN, NameConstraints) is
copied into the certificate. The base template would drop NameConstraints and
the API-passthrough ones would need them repeated outside the CSR."""

DOCS = "docs/providers/acmpca.md"

_ACCESS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA|AIDA|AROA)[A-Z0-9]{12,}\b")


class PcaClient(Protocol):
    """The slice of boto3's ``acm-pca`` client the provider calls."""

    def describe_certificate_authority(
        self, **kwargs: Unpack[DescribeCertificateAuthorityRequestTypeDef]
    ) -> DescribeCertificateAuthorityResponseTypeDef: ...

    def get_certificate_authority_certificate(
        self, **kwargs: Unpack[GetCertificateAuthorityCertificateRequestTypeDef]
    ) -> GetCertificateAuthorityCertificateResponseTypeDef: ...

    def issue_certificate(
        self, **kwargs: Unpack[IssueCertificateRequestTypeDef]
    ) -> IssueCertificateResponseTypeDef: ...

    def get_certificate(
        self, **kwargs: Unpack[GetCertificateRequestTypeDef]
    ) -> GetCertificateResponseTypeDef: ...

    def get_waiter(self, waiter_name: Literal["certificate_issued"]) -> CertificateIssuedWaiter: ...


def default_template_arn(certificate_authority_arn: str) -> str:
    """``DEFAULT_TEMPLATE`` in the partition of the given CA."""
    partition = certificate_authority_arn.split(":")[1]
    return f"arn:{partition}:acm-pca:::template/{DEFAULT_TEMPLATE}"


def build_client(name: str, config: AcmPcaConfig) -> ACMPCAClient:
    """A boto3 ``acm-pca`` client for ``config``: its region and endpoint,
    botocore's ``standard`` or ``adaptive`` retries, and, with ``assumeRoleArn``,
    credentials from STS AssumeRole that botocore refreshes before they expire.

    Credentials come from the default chain (environment, profile, web
    identity, container or instance role); none is ever read from the config.
    """
    import boto3
    import botocore.session
    from botocore.config import Config
    from botocore.credentials import (
        AssumeRoleCredentialFetcher,
        CredentialProvider,
        DeferredRefreshableCredentials,
    )

    botocore_config = Config(
        # total_max_attempts counts the first call, as AWS_MAX_ATTEMPTS does;
        # botocore's "max_attempts" key would count retries only.
        retries={"mode": config.retry_mode, "total_max_attempts": config.max_attempts},
        user_agent_extra="trustmgr",
    )
    session = boto3.Session(region_name=config.region)
    if config.assume_role_arn is not None:
        source = session
        source_credentials = source.get_credentials()
        if source_credentials is None:
            raise ProviderNeedsFixError(
                f"provider {name}: found no AWS credentials to call sts:AssumeRole "
                f"for {config.assume_role_arn} with (see {DOCS})"
            )
        fetcher = AssumeRoleCredentialFetcher(
            client_creator=lambda service, **kwargs: source.client(
                service,
                region_name=config.region,
                config=botocore_config,
                **kwargs,
            ),
            source_credentials=source_credentials,
            role_arn=config.assume_role_arn,
            extra_args={"RoleSessionName": f"trustmgr-{name}"[:64]},
        )
        assumed = DeferredRefreshableCredentials(
            refresh_using=fetcher.fetch_credentials, method="assume-role"
        )

        class _AssumedRole(CredentialProvider):
            METHOD = "trustmgr-assume-role"

            def load(self) -> DeferredRefreshableCredentials:
                return assumed

        core = botocore.session.Session()
        core.get_component("credential_provider").insert_before("env", _AssumedRole())
        session = boto3.Session(botocore_session=core, region_name=config.region)
    return session.client(
        "acm-pca",
        region_name=config.region,
        endpoint_url=config.endpoint_url,
        config=botocore_config,
    )


def _idempotency_token(csr: x509.CertificateSigningRequest) -> str:
    # Each CSR carries a fresh key, so its digest names one issuance: a call
    # retried within AWS's five-minute window returns the same certificate.
    der = csr.public_bytes(serialization.Encoding.DER)
    return hashlib.sha256(der).hexdigest()[:32]


AUTHORITY_MAX_AGE = timedelta(minutes=5)
"""How long sign_ca reuses the private CA's certificates before reading them again."""


class AcmPcaProvider:
    """Issues cluster CAs from an AWS Private CA that already exists.

    trustmgr never creates, activates or changes the private CA; it needs the
    four read/issue permissions listed in docs/providers/acmpca.md. When
    ``client`` is None a boto3 client is built from ``config`` on first use,
    so constructing the provider does no I/O.
    """

    def __init__(
        self,
        name: str,
        config: AcmPcaConfig,
        clock: Clock,
        client: PcaClient | None = None,
        *,
        poll_seconds: int = 1,
    ) -> None:
        """``poll_seconds`` is the pause between GetCertificate polls (AWS's
        waiter default); tests pass 0."""
        self.name = name
        self._config = config
        self._clock = clock
        self._client = client
        self._built: ACMPCAClient | None = None
        """The client this provider built, and so closes."""
        self._poll_seconds = poll_seconds
        self._lock = threading.Lock()
        self._signing_algorithm: SigningAlgorithmType | None = None
        self._authority: tuple[datetime, x509.Certificate, list[x509.Certificate]] | None = None
        self.template_arn = config.template_arn or default_template_arn(
            config.certificate_authority_arn
        )

    @property
    def certificate_authority_arn(self) -> str:
        return self._config.certificate_authority_arn

    def roots(self) -> tuple[x509.Certificate, ...]:
        """The self-signed root the private CA chains to (itself, for a root CA), read now."""
        self._check_active()
        ca, above = self._authority_certificates(max_age=None)
        return self._roots_of(ca, above)

    def sign_ca(self, csr: x509.CertificateSigningRequest, ttl: timedelta) -> SignedCA:
        """Issue ``csr`` as a pathlen-0 CA valid for ``ttl``, shortened to the
        notAfter of the private CA and of every certificate above it (AWS
        refuses a certificate that outlives its issuers). Its notBefore is
        ``BACKDATE`` ago, or the private CA's notBefore if that is later."""
        algorithm = self._check_active()
        ca, above = self._authority_certificates(max_age=AUTHORITY_MAX_AGE)
        now = self._clock()
        not_after = min([now + ttl, *(c.not_valid_after_utc for c in (ca, *above))])
        not_before = max(now - BACKDATE, ca.not_valid_before_utc)
        if not_after <= now:
            raise ProviderNeedsFixError(
                f"provider {self.name}: certificate authority {self.certificate_authority_arn} "
                f"or its chain expired at {not_after:%Y-%m-%dT%H:%M:%SZ}; renew its certificate"
            )
        arn = self.certificate_authority_arn
        client = self._pca()
        with self._aws("IssueCertificate"):
            issued = client.issue_certificate(
                CertificateAuthorityArn=arn,
                Csr=csr.public_bytes(serialization.Encoding.PEM),
                SigningAlgorithm=algorithm,
                TemplateArn=self.template_arn,
                # Whole seconds, rounded down, so notAfter is never later than
                # allowed. Without ValidityNotBefore AWS backdates by 60 minutes.
                Validity={"Type": "ABSOLUTE", "Value": math.floor(not_after.timestamp())},
                ValidityNotBefore={"Type": "ABSOLUTE", "Value": math.floor(not_before.timestamp())},
                IdempotencyToken=_idempotency_token(csr),
            )
        certificate_arn = issued["CertificateArn"]
        with self._aws("GetCertificate"):
            client.get_waiter("certificate_issued").wait(
                CertificateAuthorityArn=arn,
                CertificateArn=certificate_arn,
                WaiterConfig={"Delay": self._poll_seconds, "MaxAttempts": self._max_polls()},
            )
            answer = client.get_certificate(
                CertificateAuthorityArn=arn, CertificateArn=certificate_arn
            )
        cert = self._load("the issued certificate", answer.get("Certificate"), at_least=1)[0]
        # GetCertificate's chain runs issuer first, root last; roots are reported apart.
        chain = self._load("the issued certificate's chain", answer.get("CertificateChain"))
        return SignedCA(
            chain=(cert, *(c for c in chain if not is_self_signed(c))),
            roots=self._roots_of(ca, above),
        )

    def _max_polls(self) -> int:
        seconds = self._config.max_wait.total_seconds()
        return max(1, math.ceil(seconds / max(self._poll_seconds, 1)))

    def _pca(self) -> PcaClient:
        with self._lock:
            if self._client is None:
                self._built = build_client(self.name, self._config)
                self._client = self._built
            return self._client

    def close(self) -> None:
        """Release the connections of the client the provider built (one given
        to it is its owner's to close); a later call builds another."""
        with self._lock:
            built, self._built = self._built, None
            if built is not None:
                self._client = None
        if built is not None:
            built.close()

    def _check_active(self) -> SigningAlgorithmType:
        """On first use, refuse a CA that is not ACTIVE; return the signing algorithm."""
        if self._signing_algorithm is not None:
            return self._signing_algorithm
        client = self._pca()
        arn = self.certificate_authority_arn
        with self._aws("DescribeCertificateAuthority"):
            authority = client.describe_certificate_authority(CertificateAuthorityArn=arn)[
                "CertificateAuthority"
            ]
        status = authority.get("Status", "UNKNOWN")
        if status != "ACTIVE":
            error = ProviderTransientError if status == "CREATING" else ProviderNeedsFixError
            raise error(
                f"provider {self.name}: certificate authority {arn} is {status}, not ACTIVE: "
                f"{_STATUS_ADVICE.get(status, 'make it ACTIVE in AWS Private CA')}"
            )
        algorithm = self._config.signing_algorithm or authority.get(
            "CertificateAuthorityConfiguration", {}
        ).get("SigningAlgorithm")
        if algorithm is None:
            raise ProviderNeedsFixError(
                f"provider {self.name}: certificate authority {arn} reports no signing "
                "algorithm; set signingAlgorithm"
            )
        self._signing_algorithm = algorithm
        return algorithm

    def _authority_certificates(
        self, *, max_age: timedelta | None
    ) -> tuple[x509.Certificate, list[x509.Certificate]]:
        """The private CA's own certificate and those above it, root last: read
        now, or kept from a read younger than ``max_age``, so that signing many
        clusters asks for them once."""
        now = self._clock()
        kept = self._authority
        if max_age is not None and kept is not None and now - kept[0] < max_age:
            return kept[1], kept[2]
        with self._aws("GetCertificateAuthorityCertificate"):
            answer = self._pca().get_certificate_authority_certificate(
                CertificateAuthorityArn=self.certificate_authority_arn
            )
        ca = self._load("the CA certificate", answer.get("Certificate"), at_least=1)[0]
        # A root CA has no chain: it is its own root.
        above = self._load("the CA's chain", answer.get("CertificateChain"))
        self._authority = (now, ca, above)
        return ca, above

    def _roots_of(
        self, ca: x509.Certificate, above: list[x509.Certificate]
    ) -> tuple[x509.Certificate, ...]:
        roots = tuple(c for c in (ca, *above) if is_self_signed(c))
        if not roots:
            raise ProviderNeedsFixError(
                f"provider {self.name}: the chain of certificate authority "
                f"{self.certificate_authority_arn} does not end in a self-signed root; "
                "import its CA certificate with the full chain up to the root"
            )
        return roots

    def _load(self, what: str, pem: str | None, *, at_least: int = 0) -> list[x509.Certificate]:
        try:
            certs = x509.load_pem_x509_certificates(pem.encode()) if pem else []
        except ValueError:
            certs = []
            at_least = max(at_least, 1)
        if len(certs) < at_least:
            raise ProviderError(
                f"provider {self.name}: AWS Private CA returned {what} for "
                f"{self.certificate_authority_arn} that is not a PEM certificate"
            )
        return certs

    @contextmanager
    def _aws(self, operation: str) -> Iterator[None]:
        """Translate what botocore raises during ``operation`` into the provider's errors."""
        try:
            yield
        except ProviderError:
            raise
        except Exception as exc:
            error = self._translate(exc, operation)
            if error is None:
                raise
            if isinstance(error, ProviderNeedsFixError):
                self._signing_algorithm = None  # something changed: check the CA again next time
            raise error from None  # botocore's text may carry request data

    def _translate(self, exc: Exception, operation: str) -> ProviderError | None:
        """The one place AWS errors become provider errors; None for non-AWS errors."""
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            HTTPClientError,
            NoCredentialsError,
            ParamValidationError,
            PartialCredentialsError,
            WaiterError,
        )
        from botocore.exceptions import ConnectionError as BotoConnectionError

        prefix = f"provider {self.name}:"
        arn = self.certificate_authority_arn
        if isinstance(exc, WaiterError):
            last = exc.last_response or {}
            if "Max attempts exceeded" in str(exc):
                return ProviderTransientError(
                    f"{prefix} certificate for {arn} was not issued within "
                    f"{_duration(self._config.max_wait)} (maxWait); it is retried on the next run"
                )
            error = last.get("Error", {})
            status = last.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            return self._from_code(
                str(error.get("Code", "Unknown")), str(error.get("Message", "")), status, operation
            )
        if isinstance(exc, ClientError):
            error = exc.response.get("Error", {})
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            service = "sts" if exc.operation_name.startswith("AssumeRole") else "acm-pca"
            return self._from_code(
                error.get("Code", "Unknown"),
                error.get("Message", ""),
                status,
                exc.operation_name or operation,
                service=service,
            )
        if isinstance(exc, NoCredentialsError | PartialCredentialsError):
            return ProviderNeedsFixError(
                f"{prefix} found no usable AWS credentials for acm-pca:{operation} on {arn}: "
                f"provide them through the environment, a profile or a role (see {DOCS})"
            )
        if isinstance(exc, ParamValidationError):
            return ProviderNeedsFixError(
                f"{prefix} acm-pca:{operation} on {arn} was refused before sending: "
                f"{_scrub(str(exc))}"
            )
        if isinstance(exc, BotoConnectionError | HTTPClientError):
            return ProviderTransientError(
                f"{prefix} cannot reach AWS Private CA for acm-pca:{operation} on {arn}: "
                f"{_scrub(str(exc))}"
            )
        if isinstance(exc, BotoCoreError):
            return ProviderTransientError(
                f"{prefix} acm-pca:{operation} on {arn} failed: {_scrub(str(exc))}"
            )
        return None

    def _from_code(
        self, code: str, message: str, status: int, operation: str, *, service: str = "acm-pca"
    ) -> ProviderError:
        prefix = f"provider {self.name}:"
        action = f"{service}:{operation}"
        resource = (
            self._config.assume_role_arn
            if service == "sts" and self._config.assume_role_arn
            else self.certificate_authority_arn
        )
        detail = f" ({code}: {_scrub(message)})" if message else f" ({code})"
        if code in ACCESS_DENIED:
            return ProviderNeedsFixError(
                f"{prefix} access denied for {action} on {resource}: "
                f"allow it in the IAM policy (see {DOCS})"
            )
        if code in BAD_CREDENTIALS:
            return ProviderNeedsFixError(
                f"{prefix} AWS rejected the credentials used for {action} on {resource} "
                f"({code}): check the credentials trustmgr runs with (see {DOCS})"
            )
        if code in _NEEDS_FIX:
            return ProviderNeedsFixError(
                f"{prefix} {action} on {resource} failed{detail}: {_NEEDS_FIX[code]}"
            )
        if code in _TRANSIENT or status >= 500:
            return ProviderTransientError(
                f"{prefix} {action} on {resource} failed after retries{detail}: "
                f"{_TRANSIENT.get(code, 'AWS Private CA is unavailable; try again later')}"
            )
        return ProviderNeedsFixError(f"{prefix} {action} on {resource} failed{detail}")


_NEEDS_FIX = {
    "ResourceNotFoundException": "no such certificate authority or certificate; "
    "check certificateAuthorityArn and region",
    "InvalidArnException": "check certificateAuthorityArn",
    "InvalidStateException": "the certificate authority is not in a state that allows this; "
    "check that it is ACTIVE",
    "MalformedCSRException": "AWS Private CA refused the CSR",
    "InvalidArgsException": "check signingAlgorithm (it must suit the CA's key), templateArn "
    "and the requested validity",
    "ValidationException": "check templateArn (the CA must allow a pathlen-0 subordinate) "
    "and the requested validity",
    "InvalidRequestException": "AWS Private CA refused the request",
    "InvalidPolicyException": "check the CA's resource policy",
}
_TRANSIENT = {
    "ThrottlingException": "AWS Private CA is throttling; try again later, or raise maxAttempts "
    "or use retryMode adaptive",
    "LimitExceededException": "an AWS Private CA quota was exceeded; if it persists, "
    "request a quota increase",
    "RequestInProgressException": "the request is still in progress; try again later",
    "RequestFailedException": "AWS Private CA could not complete the request; try again later",
    "ConcurrentModificationException": "the CA is being changed; try again later",
}
_STATUS_ADVICE = {
    "CREATING": "it is still being created; try again shortly",
    "PENDING_CERTIFICATE": "install its CA certificate first",
    "DISABLED": "enable it (aws acm-pca update-certificate-authority --status ACTIVE)",
    "EXPIRED": "renew its CA certificate",
    "DELETED": "restore it or configure another certificateAuthorityArn",
    "FAILED": "create a new private CA and configure its ARN",
}


def _scrub(text: str) -> str:
    """AWS messages name ARNs, never secrets; an access key id is masked all the same."""
    return _ACCESS_KEY_ID.sub("<access key id>", text)


def _duration(value: timedelta) -> str:
    seconds = value.total_seconds()
    return f"{seconds:g}s"
