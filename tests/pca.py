"""AWS Private CA played by the test, for the provider's tests and the agent's.

The remote side cannot run here. An ``Authority`` (a root, and the private CA
issuing under it, both made by the test) answers each call from the call's own
parameters, as AWS does with the CSR-passthrough template. Two ways in:

* ``StubbedPca``: botocore's Stubber on a real client. It checks every answer
  against the service model, and answers before the request is signed or sent.
* ``WirePca``: a ``before-send`` handler. botocore builds, signs and logs each
  request as for AWS and parses the HTTP answer; the request's credential
  scope (access key id, date, region, service) is recorded with it.

Each records the calls it answered, with their parameters, in ``calls``.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import pytest
from botocore import xform_name
from botocore.awsrequest import AWSPreparedRequest, AWSResponse
from botocore.compat import HTTPHeaders
from botocore.model import OperationModel
from botocore.stub import Stubber
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from trustmgr.providers.keys import ca_key_usage

if TYPE_CHECKING:
    from mypy_boto3_acm_pca.client import ACMPCAClient

REGION = "us-east-1"
ARN = f"arn:aws:acm-pca:{REGION}:111122223333:certificate-authority/0e1f2a3b-4c5d-6e7f-8091-a2b3c4d5e6f7"
TEMPLATE = "arn:aws:acm-pca:::template/SubordinateCACertificate_PathLen0_CSRPassthrough/V1"
CERT_ARN = f"{ARN}/certificate/6f0c2e9a1b7d4c3e8a5f0b1c2d3e4f50"
NOW = datetime(2031, 3, 1, 12, 0, tzinfo=UTC)
KEY_ID = "AKIAIOSFODNN7EXAMPLE"
SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"


def pems(*certs: x509.Certificate) -> str:
    return "".join(c.public_bytes(Encoding.PEM).decode() for c in certs)


@dataclass(frozen=True)
class Authority:
    """What the test plays AWS with: a root, and the private CA that issues
    (the root itself, or a subordinate of it)."""

    root: x509.Certificate
    ca: x509.Certificate
    ca_key: ec.EllipticCurvePrivateKey

    @classmethod
    def create(
        cls,
        now: datetime,
        *,
        subordinate: bool = True,
        lifetime: timedelta = timedelta(days=3650),
        age: timedelta = timedelta(days=1),
    ) -> Authority:
        """``age``: how long before ``now`` the private CA became valid."""
        root_key = ec.generate_private_key(ec.SECP256R1())
        root_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Test PCA Root")])
        root = (
            x509.CertificateBuilder()
            .subject_name(root_name)
            .issuer_name(root_name)
            .public_key(root_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(days=1))
            .not_valid_after(now + lifetime)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(ca_key_usage(digital_signature=False), critical=True)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(root_key.public_key()), critical=False
            )
            .sign(root_key, hashes.SHA256())
        )
        if not subordinate:
            return cls(root=root, ca=root, ca_key=root_key)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Test PCA")]))
            .issuer_name(root_name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - age)
            .not_valid_after(now + lifetime)
            .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
            .add_extension(ca_key_usage(digital_signature=True), critical=True)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(root_key.public_key()),
                critical=False,
            )
            .sign(root_key, hashes.SHA256())
        )
        return cls(root=root, ca=ca, ca_key=ca_key)

    @property
    def above(self) -> tuple[x509.Certificate, ...]:
        """The certificates above the private CA, root last."""
        return () if self.ca == self.root else (self.root,)

    def sign(
        self,
        csr: x509.CertificateSigningRequest,
        *,
        not_after: datetime,
        now: datetime,
        not_before: datetime | None = None,
    ) -> x509.Certificate:
        """What AWS issues with SubordinateCACertificate_PathLen0_CSRPassthrough/V1:
        the template's BasicConstraints and KeyUsage, SKI from the CSR's key,
        AKI from the CA, every other CSR extension copied, notBefore as asked
        (ValidityNotBefore) or 60 minutes back (AWS's default)."""
        template = (x509.BasicConstraints, x509.KeyUsage)
        builder = (
            x509.CertificateBuilder()
            .subject_name(csr.subject)
            .issuer_name(self.ca.subject)
            .public_key(csr.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before or now - timedelta(minutes=60))
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(ca_key_usage(digital_signature=True), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(csr.public_key()), False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.ca_key.public_key()), False
            )
        )
        for ext in csr.extensions:
            if not isinstance(ext.value, template):
                builder = builder.add_extension(ext.value, critical=ext.critical)
        return builder.sign(self.ca_key, hashes.SHA256())

    def certificate_answer(self) -> dict[str, str]:
        """GetCertificateAuthorityCertificate: a root CA has no chain."""
        answer = {"Certificate": pems(self.ca)}
        if self.above:
            answer["CertificateChain"] = pems(*self.above)
        return answer

    def issued_answer(self, cert: x509.Certificate) -> dict[str, str]:
        """GetCertificate: the chain runs issuer first, root last."""
        return {"Certificate": pems(cert), "CertificateChain": pems(self.ca, *self.above)}


def described(status: str = "ACTIVE", signing: str = "SHA256WITHECDSA") -> dict[str, Any]:
    """DescribeCertificateAuthority's answer for the private CA at ``ARN``."""
    return {
        "CertificateAuthority": {
            "Arn": ARN,
            "Type": "SUBORDINATE",
            "Status": status,
            "UsageMode": "GENERAL_PURPOSE",
            "CertificateAuthorityConfiguration": {
                "KeyAlgorithm": "EC_prime256v1",
                "SigningAlgorithm": signing,
                "Subject": {"CommonName": "Test PCA"},
            },
        }
    }


def idempotency_token(csr: x509.CertificateSigningRequest) -> str:
    return hashlib.sha256(csr.public_bytes(Encoding.DER)).hexdigest()[:32]


@dataclass(frozen=True)
class Call:
    """One call AWS answered."""

    operation: str
    params: dict[str, Any]
    """As the provider passed them (through the wire: decoded from the JSON body)."""
    credential: str | None = None
    """The signed request's ``Credential=`` scope, ``<key id>/<date>/<region>/<service>/aws4_request``;
    None through the Stubber, which answers before anything is signed."""
    host: str | None = None

    @property
    def key_id(self) -> str | None:
        return self.credential.split("/", 1)[0] if self.credential else None


class PlayedPca:
    """The private CA at ``ARN``, played by ``authority``: each call's answer is
    made from its parameters. The first poll of each certificate answers
    RequestInProgressException (as AWS may) when ``in_progress``."""

    def __init__(
        self,
        authority: Authority,
        clock: Callable[[], datetime],
        *,
        signing: str = "SHA256WITHECDSA",
        template: str = TEMPLATE,
        in_progress: bool = True,
    ) -> None:
        self.authority = authority
        self.clock = clock
        self.signing = signing
        self.template = template
        self.in_progress = in_progress
        self.calls: list[Call] = []
        self._issued: dict[str, x509.Certificate] = {}
        self._polled: set[str] = set()

    def issue(
        self, csr: x509.CertificateSigningRequest, *, not_after: datetime, not_before: datetime
    ) -> x509.Certificate:
        """The certificate AWS issues for ``csr`` (a test may answer otherwise)."""
        return self.authority.sign(
            csr, not_after=not_after, now=self.clock(), not_before=not_before
        )

    def answer(self, operation: str, params: Mapping[str, Any]) -> dict[str, Any] | str:
        """The answer to one call, or the code of the error AWS answers with."""
        authority = self.authority
        if operation == "DescribeCertificateAuthority":
            return described()
        if operation == "GetCertificateAuthorityCertificate":
            return authority.certificate_answer()
        if operation == "IssueCertificate":
            assert params["TemplateArn"] == self.template
            assert params["SigningAlgorithm"] == self.signing
            assert params["Validity"]["Type"] == "ABSOLUTE"
            assert params["ValidityNotBefore"]["Type"] == "ABSOLUTE"
            csr = x509.load_pem_x509_csr(params["Csr"])
            not_after = datetime.fromtimestamp(params["Validity"]["Value"], UTC)
            not_before = datetime.fromtimestamp(params["ValidityNotBefore"]["Value"], UTC)
            cert = self.issue(csr, not_after=not_after, not_before=not_before)
            arn = f"{ARN}/certificate/{cert.serial_number:x}"
            self._issued[arn] = cert
            return {"CertificateArn": arn}
        if operation == "GetCertificate":
            arn = params["CertificateArn"]
            if self.in_progress and arn not in self._polled:
                self._polled.add(arn)
                return "RequestInProgressException"
            return authority.issued_answer(self._issued[arn])
        raise AssertionError(f"unexpected call to {operation}")

    def operations(self) -> list[str]:
        return [call.operation for call in self.calls]


class StubbedPca(PlayedPca):
    """``PlayedPca`` behind botocore's Stubber on ``client``.

    The Stubber only serves answers queued in advance, but the CSR differs per
    call. So each answer is computed from the call's own parameters and queued
    on ``provide-client-params``, the event botocore emits before the Stubber
    checks the parameters and serves the queue. The Stubber still validates
    every answer against the service model.
    """

    def __init__(
        self,
        client: ACMPCAClient,
        authority: Authority,
        clock: Callable[[], datetime],
        **settings: Any,
    ) -> None:
        super().__init__(authority, clock, **settings)
        self._client = client
        self._stubber = Stubber(client)

    def __enter__(self) -> StubbedPca:
        self._client.meta.events.register("provide-client-params.acm-pca", self._answer)
        self._stubber.activate()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._stubber.deactivate()
        self._client.meta.events.unregister("provide-client-params.acm-pca", self._answer)
        self._stubber.assert_no_pending_responses()

    def _answer(self, params: dict[str, Any], model: OperationModel, **_: Any) -> None:
        self.calls.append(Call(model.name, dict(params)))
        answer = self.answer(model.name, params)
        method = xform_name(model.name)
        if isinstance(answer, str):
            self._stubber.add_client_error(method, answer, expected_params=params)
        else:
            self._stubber.add_response(method, answer, params)


class WirePca(PlayedPca):
    """``PlayedPca`` answering the signed HTTP requests of the clients it is
    attached to, in place of the network."""

    def attach(self, client: ACMPCAClient) -> None:
        client.meta.events.register("before-send.acm-pca", self._send)  # type: ignore[arg-type]

    def _send(self, request: AWSPreparedRequest, **_: Any) -> AWSResponse:
        operation = operation_of(request)
        assert isinstance(request.body, bytes)
        params = json.loads(request.body)
        if "Csr" in params:  # a blob: base64 in the JSON protocol
            params["Csr"] = base64.b64decode(params["Csr"])
        authorization = _header(request, "Authorization")
        credential = authorization.split("Credential=", 1)[1].split(",", 1)[0]
        self.calls.append(Call(operation, params, credential, urlsplit(request.url).hostname))
        answer = self.answer(operation, params)
        if isinstance(answer, str):
            return json_error(request, 400, answer, f"{answer} (played)")
        return json_answer(request, 200, answer)


class _Body:
    """A raw HTTP body for an AWSResponse made up by a test."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    def stream(self, **_: Any) -> Iterator[bytes]:
        yield self._data


def json_answer(request: AWSPreparedRequest, status: int, body: Mapping[str, Any]) -> AWSResponse:
    """An AWS JSON-protocol answer, as returned by a ``before-send`` handler
    (botocore then skips the network; the stubs type handlers as returning None)."""
    headers = HTTPHeaders.from_dict({"Content-Type": "application/x-amz-json-1.1"})
    return AWSResponse(request.url, status, headers, _Body(json.dumps(body).encode()))


def json_error(request: AWSPreparedRequest, status: int, code: str, message: str) -> AWSResponse:
    """An AWS JSON-protocol error, as returned by a ``before-send`` handler."""
    return json_answer(request, status, {"__type": code, "message": message})


def _header(request: AWSPreparedRequest, name: str) -> str:
    value = request.headers[name]
    return value.decode() if isinstance(value, bytes) else str(value)


def operation_of(request: AWSPreparedRequest) -> str:
    return _header(request, "X-Amz-Target").rsplit(".", 1)[-1]


AWS_SETTINGS = (
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_ACM_PCA",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN",
)


def aws_identity(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, key_id: str | None, secret: str | None
) -> None:
    """This process's AWS identity from now on: ``key_id`` and ``secret`` in the
    environment (None: no credentials at all), and nothing from this machine's
    AWS setup (files, profiles, roles, instance metadata)."""
    for name in AWS_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    if key_id is not None and secret is not None:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
