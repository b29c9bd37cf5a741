"""An AWS KMS key that wraps the self-signed root key's data key.

``GenerateDataKey`` (``KeySpec`` ``AES_256``) makes each data key and returns it
in the clear and wrapped; ``Decrypt`` unwraps it, naming the key that wrapped
it (the ARN stored in the envelope), so a data key wrapped by another key is
refused. Both carry the envelope's context as the ``EncryptionContext``, which
CloudTrail records beside each call. The credentials need ``kms:GenerateDataKey``
and ``kms:Decrypt`` on the key; trustmgr never creates or changes a KMS key.

Credentials come from the standard chain (environment, profile, web identity,
container or instance role). boto3 is imported only when a client is built or
an error translated. Throttling and 5xx answers are retried by botocore's
``standard`` mode; what still fails is translated in ``_translate``.
"""

from __future__ import annotations

import base64
import binascii
import re
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Protocol

from trustmgr.providers.awscodes import ACCESS_DENIED, BAD_CREDENTIALS
from trustmgr.providers.base import ProviderError, ProviderNeedsFixError, ProviderTransientError
from trustmgr.providers.config import AwsKmsKeyEncryption
from trustmgr.providers.envelope import DataKey

if TYPE_CHECKING:
    from typing import Unpack

    from mypy_boto3_kms.client import KMSClient
    from mypy_boto3_kms.type_defs import (
        DecryptRequestTypeDef,
        DecryptResponseTypeDef,
        GenerateDataKeyRequestTypeDef,
        GenerateDataKeyResponseTypeDef,
    )

MAX_ATTEMPTS = 3
"""Attempts per call, the first included (botocore's ``standard`` retry mode)."""

_ACCESS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA|AIDA|AROA)[A-Z0-9]{12,}\b")


class KmsClient(Protocol):
    """The slice of boto3's ``kms`` client the wrapper calls."""

    def generate_data_key(
        self, **kwargs: Unpack[GenerateDataKeyRequestTypeDef]
    ) -> GenerateDataKeyResponseTypeDef: ...

    def decrypt(self, **kwargs: Unpack[DecryptRequestTypeDef]) -> DecryptResponseTypeDef: ...


def build_client(config: AwsKmsKeyEncryption) -> KMSClient:
    """A boto3 ``kms`` client for ``config``'s region and endpoint, credentials
    from the default chain, botocore's ``standard`` retries."""
    import boto3
    from botocore.config import Config

    return boto3.Session(region_name=config.region).client(
        "kms",
        region_name=config.region,
        endpoint_url=config.endpoint_url,
        config=Config(
            retries={"mode": "standard", "total_max_attempts": MAX_ATTEMPTS},
            user_agent_extra="trustmgr",
        ),
    )


class AwsKmsWrapper:
    """Wraps data keys with the KMS key of ``config``. When ``client`` is None
    a boto3 client is built on first use, so constructing does no I/O."""

    wrapping = "aws-kms"

    def __init__(
        self, name: str, config: AwsKmsKeyEncryption, client: KmsClient | None = None
    ) -> None:
        self.name = name
        self._config = config
        self._client = client
        self._lock = threading.Lock()

    def data_key(self, context: Mapping[str, str]) -> DataKey:
        key = self._config.key_id
        with self._aws("GenerateDataKey", key):
            answer = self._kms().generate_data_key(
                KeyId=key, KeySpec="AES_256", EncryptionContext=dict(context)
            )
        return DataKey(
            key_id=answer["KeyId"],
            wrapped=base64.b64encode(answer["CiphertextBlob"]).decode(),
            plaintext=answer["Plaintext"],
        )

    def unwrap(self, key_id: str, wrapped: str, context: Mapping[str, str]) -> bytes:
        region = key_id.split(":")[3] if key_id.startswith("arn:") else self._config.region
        if region != self._config.region:
            raise ProviderNeedsFixError(
                f"provider {self.name}: the root key's data key is wrapped by KMS key {key_id} "
                f"in region {region}, the configuration's region is {self._config.region}: set "
                "keyEncryption.awsKms.region to the key's region"
            )
        try:
            blob = base64.b64decode(wrapped, validate=True)
        except binascii.Error:
            raise ProviderNeedsFixError(
                f"provider {self.name}: the root key's wrapped data key is not base64: it was "
                "altered; restore root.pem from a backup"
            ) from None
        with self._aws("Decrypt", key_id):
            answer = self._kms().decrypt(
                CiphertextBlob=blob, KeyId=key_id, EncryptionContext=dict(context)
            )
        return answer["Plaintext"]

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                close = getattr(self._client, "close", None)
                if callable(close):
                    close()

    def _kms(self) -> KmsClient:
        with self._lock:
            if self._client is None:
                self._client = build_client(self._config)
            return self._client

    @contextmanager
    def _aws(self, operation: str, key: str) -> Iterator[None]:
        try:
            yield
        except ProviderError:
            raise
        except Exception as exc:
            error = self._translate(exc, operation, key)
            if error is None:
                raise
            raise error from None  # botocore's text may carry request data

    def _translate(self, exc: Exception, operation: str, key: str) -> ProviderError | None:
        """The one place AWS errors become provider errors; None for non-AWS errors."""
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            ConnectTimeoutError,
            EndpointConnectionError,
            HTTPClientError,
            NoCredentialsError,
            PartialCredentialsError,
            ReadTimeoutError,
        )
        from botocore.exceptions import ConnectionError as BotoConnectionError

        who = f"provider {self.name}: keyEncryption"
        action = f"kms:{operation}"
        region = self._config.region
        if isinstance(exc, ClientError):
            error = exc.response.get("Error", {})
            code = error.get("Code", "Unknown")
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            if code in _NEEDS_FIX:
                return ProviderNeedsFixError(
                    f"{who}: {action} on {key} failed ({code}): {_NEEDS_FIX[code]}"
                )
            if code in ACCESS_DENIED:
                return ProviderNeedsFixError(
                    f"{who}: access denied for {action} on {key}: allow it in the key policy "
                    "or the IAM policy of the credentials trustmgr runs with"
                )
            if code in BAD_CREDENTIALS:
                return ProviderNeedsFixError(
                    f"{who}: AWS rejected the credentials used for {action} on {key} ({code}): "
                    "check the credentials trustmgr runs with"
                )
            if code in _TRANSIENT or status >= 500:
                return ProviderTransientError(
                    f"{who}: {action} on {key} failed after {MAX_ATTEMPTS} attempts ({code}): "
                    "AWS KMS is throttling or unavailable; try again later"
                )
            message = _scrub(str(error.get("Message", "")))
            detail = f"{code}: {message}" if message else code
            return ProviderNeedsFixError(f"{who}: {action} on {key} failed ({detail})")
        if isinstance(exc, NoCredentialsError | PartialCredentialsError):
            return ProviderNeedsFixError(
                f"{who}: found no usable AWS credentials for {action} on {key}: provide them "
                "through the environment, a profile or a role"
            )
        if isinstance(
            exc,
            EndpointConnectionError
            | ConnectTimeoutError
            | ReadTimeoutError
            | BotoConnectionError
            | HTTPClientError,
        ):
            return ProviderTransientError(
                f"{who}: cannot reach AWS KMS in {region} for {action} on {key} "
                f"({type(exc).__name__}); the root key cannot be unwrapped without it"
            )
        if isinstance(exc, BotoCoreError):
            return ProviderTransientError(
                f"{who}: {action} on {key} failed ({type(exc).__name__}): {_scrub(str(exc))}"
            )
        return None


_NEEDS_FIX = {
    "NotFoundException": "no such KMS key in this account and region; check "
    "keyEncryption.awsKms.keyId and region (a deleted key cannot unwrap the root key again)",
    "DisabledException": "the KMS key is disabled; enable it (aws kms enable-key)",
    "KMSInvalidStateException": "the KMS key cannot be used in its state (pending deletion "
    "or import); cancel the deletion (aws kms cancel-key-deletion) and enable it",
    "InvalidCiphertextException": "KMS refused the wrapped data key: it was altered, or it "
    "belongs to another root; restore root.pem from a backup",
    "IncorrectKeyException": "the data key was wrapped by another KMS key; restore root.pem "
    "from a backup",
    "InvalidKeyUsageException": "the KMS key is not a symmetric ENCRYPT_DECRYPT key",
    "InvalidGrantTokenException": "KMS refused the grant token",
}
_TRANSIENT = frozenset(
    {
        "ThrottlingException",
        "LimitExceededException",
        "KMSInternalException",
        "KeyUnavailableException",
        "DependencyTimeoutException",
        "ServiceUnavailable",
        "InternalFailure",
    }
)


def _scrub(text: str) -> str:
    """AWS messages name ARNs, never secrets; an access key id is masked all the same."""
    return _ACCESS_KEY_ID.sub("<access key id>", " ".join(text.split()))[:300]
