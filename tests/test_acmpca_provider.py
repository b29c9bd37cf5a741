"""The AWS Private CA provider.

Three seams, each where the remote side cannot run here:

* botocore's ``Stubber`` on a real client: the exact requests (CSR bytes,
  template, signing algorithm, validity from the injected clock, idempotency
  token) and answers carrying certificates the test builds as AWS would with the
  template, including RequestInProgressException polls and every error class;
* ``StubbedPca`` (tests/pca.py): the Stubber answering dynamically for the
  conformance suite;
* moto's ACM PCA over HTTP (``MotoServer``): the call sequence, botocore's own
  retries, assume-role, and the core refusing moto's non-CA certificates.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import boto3
import pytest
from botocore.awsrequest import AWSPreparedRequest, AWSResponse
from botocore.exceptions import ClientError
from botocore.model import OperationModel
from botocore.stub import Stubber
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from pydantic import ValidationError

from tests.conformance import ProviderConformance
from tests.moto_server import MotoServer
from tests.pca import (
    ARN,
    CERT_ARN,
    KEY_ID,
    NOW,
    REGION,
    SECRET,
    TEMPLATE,
    Authority,
    StubbedPca,
    aws_identity,
    described,
    idempotency_token,
    json_error,
    operation_of,
)
from tests.workload import assert_openssl_enforces_trust_domain
from trustmgr.bundles import load_certificates
from trustmgr.config import load as load_config
from trustmgr.engine import Workspace, apply
from trustmgr.errors import ProviderAnswerError
from trustmgr.pki import check_signed_ca, cluster_ca_request, uri_sans
from trustmgr.providers import Provider, ProviderNeedsFixError, ProviderTransientError
from trustmgr.providers.acmpca import AcmPcaProvider, build_client, default_template_arn
from trustmgr.providers.base import BACKDATE
from trustmgr.providers.config import AcmPcaConfig
from trustmgr.providers.keys import KeyAlgorithm
from trustmgr.status import verify_all

if TYPE_CHECKING:
    from mypy_boto3_acm_pca.client import ACMPCAClient

TRUST_DOMAIN = "payments.corp"
DOCS = "docs/providers/acmpca.md"


def _config(**overrides: Any) -> AcmPcaConfig:
    return AcmPcaConfig.model_validate(
        {"certificateAuthorityArn": ARN, "region": REGION, **overrides}
    )


def _provider(
    client: ACMPCAClient, *, clock: Callable[[], datetime] = lambda: NOW, **config: Any
) -> AcmPcaProvider:
    return AcmPcaProvider("pca", _config(**config), clock, client, poll_seconds=0)


@pytest.fixture
def pca_client() -> Iterator[ACMPCAClient]:
    client = boto3.client(
        "acm-pca", region_name=REGION, aws_access_key_id=KEY_ID, aws_secret_access_key=SECRET
    )
    yield client
    client.close()


@pytest.fixture
def stubber(pca_client: ACMPCAClient) -> Iterator[Stubber]:
    with Stubber(pca_client) as stub:
        yield stub


def _expect_start(stub: Stubber, authority: Authority, signing: str = "SHA256WITHECDSA") -> None:
    params = {"CertificateAuthorityArn": ARN}
    stub.add_response("describe_certificate_authority", described(signing=signing), params)
    stub.add_response(
        "get_certificate_authority_certificate", authority.certificate_answer(), params
    )


def _expect_polls(
    stub: Stubber, authority: Authority, cert: x509.Certificate, *, in_progress: int
) -> None:
    params = {"CertificateAuthorityArn": ARN, "CertificateArn": CERT_ARN}
    for _ in range(in_progress):
        stub.add_client_error(
            "get_certificate",
            service_error_code="RequestInProgressException",
            service_message="The certificate is being issued",
            http_status_code=400,
            expected_params=params,
        )
    stub.add_response("get_certificate", authority.issued_answer(cert), params)  # waiter
    stub.add_response("get_certificate", authority.issued_answer(cert), params)  # the read


# --- exact requests -------------------------------------------------------------------


@pytest.mark.parametrize("subordinate", [True, False], ids=["pca-is-subordinate", "pca-is-root"])
def test_issues_with_the_exact_request_and_returns_the_chain_without_the_root(
    pca_client: ACMPCAClient, stubber: Stubber, subordinate: bool
) -> None:
    authority = Authority.create(NOW, subordinate=subordinate)
    request = cluster_ca_request(TRUST_DOMAIN, cluster="east", algorithm=KeyAlgorithm.ECDSA_P256)
    issued = authority.sign(request.csr, not_after=NOW + timedelta(days=30), now=NOW)
    _expect_start(stubber, authority, signing="SHA384WITHECDSA")
    stubber.add_response(
        "issue_certificate",
        {"CertificateArn": CERT_ARN},
        {
            "CertificateAuthorityArn": ARN,
            "Csr": request.csr.public_bytes(Encoding.PEM),
            "SigningAlgorithm": "SHA384WITHECDSA",  # the CA's own, from Describe
            "TemplateArn": TEMPLATE,
            "Validity": {"Type": "ABSOLUTE", "Value": 1932724800},  # NOW + 30 days
            "ValidityNotBefore": {"Type": "ABSOLUTE", "Value": 1930132500},  # NOW - 5 minutes
            "IdempotencyToken": idempotency_token(request.csr),
        },
    )
    _expect_polls(stubber, authority, issued, in_progress=1)

    answer = _provider(pca_client).sign_ca(request.csr, timedelta(days=30))

    stubber.assert_no_pending_responses()
    assert answer.chain == ((issued, authority.ca) if subordinate else (issued,))
    assert answer.roots == (authority.root,)
    root = check_signed_ca(answer, request, TRUST_DOMAIN, provider="pca", now=NOW)
    assert root == authority.root


def test_configured_signing_algorithm_and_template_win(
    pca_client: ACMPCAClient, stubber: Stubber
) -> None:
    template = "arn:aws:acm-pca:::template/SubordinateCACertificate_PathLen0_APICSRPassthrough/V1"
    authority = Authority.create(NOW)
    request = cluster_ca_request(TRUST_DOMAIN, cluster="east", algorithm=KeyAlgorithm.ECDSA_P256)
    issued = authority.sign(request.csr, not_after=NOW + timedelta(hours=1), now=NOW)
    _expect_start(stubber, authority, signing="SHA384WITHECDSA")
    stubber.add_response(
        "issue_certificate",
        {"CertificateArn": CERT_ARN},
        {
            "CertificateAuthorityArn": ARN,
            "Csr": request.csr.public_bytes(Encoding.PEM),
            "SigningAlgorithm": "SHA256WITHECDSA",
            "TemplateArn": template,
            "Validity": {"Type": "ABSOLUTE", "Value": int((NOW + timedelta(hours=1)).timestamp())},
            "ValidityNotBefore": {"Type": "ABSOLUTE", "Value": int((NOW - BACKDATE).timestamp())},
            "IdempotencyToken": idempotency_token(request.csr),
        },
    )
    _expect_polls(stubber, authority, issued, in_progress=0)
    provider = _provider(pca_client, signingAlgorithm="SHA256WITHECDSA", templateArn=template)
    provider.sign_ca(request.csr, timedelta(hours=1))
    stubber.assert_no_pending_responses()


def test_validity_is_cut_to_the_private_cas_not_after(
    pca_client: ACMPCAClient, stubber: Stubber
) -> None:
    authority = Authority.create(NOW, lifetime=timedelta(days=10))
    request = cluster_ca_request(TRUST_DOMAIN, cluster="east", algorithm=KeyAlgorithm.ECDSA_P256)
    ca_end = authority.ca.not_valid_after_utc
    issued = authority.sign(request.csr, not_after=ca_end, now=NOW)
    _expect_start(stubber, authority)
    stubber.add_response(
        "issue_certificate",
        {"CertificateArn": CERT_ARN},
        {
            "CertificateAuthorityArn": ARN,
            "Csr": request.csr.public_bytes(Encoding.PEM),
            "SigningAlgorithm": "SHA256WITHECDSA",
            "TemplateArn": TEMPLATE,
            "Validity": {"Type": "ABSOLUTE", "Value": int(ca_end.timestamp())},
            "ValidityNotBefore": {"Type": "ABSOLUTE", "Value": int((NOW - BACKDATE).timestamp())},
            "IdempotencyToken": idempotency_token(request.csr),
        },
    )
    _expect_polls(stubber, authority, issued, in_progress=0)
    answer = _provider(pca_client).sign_ca(request.csr, timedelta(days=30))
    assert answer.chain[0].not_valid_after_utc == ca_end


def _expect_issue(
    stub: Stubber, request: x509.CertificateSigningRequest, *, not_before: int, not_after: int
) -> None:
    stub.add_response(
        "issue_certificate",
        {"CertificateArn": CERT_ARN},
        {
            "CertificateAuthorityArn": ARN,
            "Csr": request.public_bytes(Encoding.PEM),
            "SigningAlgorithm": "SHA256WITHECDSA",
            "TemplateArn": TEMPLATE,
            "Validity": {"Type": "ABSOLUTE", "Value": not_after},
            "ValidityNotBefore": {"Type": "ABSOLUTE", "Value": not_before},
            "IdempotencyToken": idempotency_token(request),
        },
    )


def test_not_before_is_backdated_from_the_injected_clock_and_not_after_never_exceeds_the_ttl(
    pca_client: ACMPCAClient, stubber: Stubber
) -> None:
    """Sent in whole seconds, rounded down: notBefore at least BACKDATE back,
    notAfter no later than now + ttl."""
    now = NOW + timedelta(microseconds=750_000)
    authority = Authority.create(NOW)
    request = cluster_ca_request(TRUST_DOMAIN, cluster="east", algorithm=KeyAlgorithm.ECDSA_P256)
    not_before, not_after = NOW - timedelta(minutes=5), NOW + timedelta(hours=6)
    issued = authority.sign(request.csr, not_after=not_after, now=NOW, not_before=not_before)
    _expect_start(stubber, authority)
    _expect_issue(
        stubber,
        request.csr,
        not_before=1930132500,  # 2031-03-01T11:55:00Z
        not_after=1930154400,  # 2031-03-01T18:00:00Z
    )
    _expect_polls(stubber, authority, issued, in_progress=0)

    answer = _provider(pca_client, clock=lambda: now).sign_ca(request.csr, timedelta(hours=6))

    stubber.assert_no_pending_responses()
    ca = answer.chain[0]
    assert now - ca.not_valid_before_utc >= BACKDATE
    assert ca.not_valid_after_utc <= now + timedelta(hours=6)
    check_signed_ca(answer, request, TRUST_DOMAIN, provider="pca", now=now)


def test_not_before_is_not_earlier_than_a_young_private_cas(
    pca_client: ACMPCAClient, stubber: Stubber
) -> None:
    authority = Authority.create(NOW, age=timedelta(minutes=2))
    request = cluster_ca_request(TRUST_DOMAIN, cluster="east", algorithm=KeyAlgorithm.ECDSA_P256)
    born = authority.ca.not_valid_before_utc
    issued = authority.sign(
        request.csr, not_after=NOW + timedelta(days=1), now=NOW, not_before=born
    )
    _expect_start(stubber, authority)
    _expect_issue(
        stubber,
        request.csr,
        not_before=int(born.timestamp()),  # NOW - 2 minutes, not NOW - BACKDATE
        not_after=int((NOW + timedelta(days=1)).timestamp()),
    )
    _expect_polls(stubber, authority, issued, in_progress=0)
    _provider(pca_client).sign_ca(request.csr, timedelta(days=1))
    stubber.assert_no_pending_responses()


def test_a_retried_issuance_sends_the_same_idempotencyidempotency_token(
    pca_client: ACMPCAClient, stubber: Stubber
) -> None:
    authority = Authority.create(NOW)
    request = cluster_ca_request(TRUST_DOMAIN, cluster="east", algorithm=KeyAlgorithm.ECDSA_P256)
    later = NOW + timedelta(minutes=2)
    clock = iter([NOW, NOW, later, later])
    issued = authority.sign(request.csr, not_after=NOW + timedelta(days=1), now=NOW)
    _expect_start(stubber, authority)
    issue = {
        "CertificateAuthorityArn": ARN,
        "Csr": request.csr.public_bytes(Encoding.PEM),
        "SigningAlgorithm": "SHA256WITHECDSA",
        "TemplateArn": TEMPLATE,
        "IdempotencyToken": idempotency_token(request.csr),
    }
    stubber.add_client_error(
        "issue_certificate",
        service_error_code="ServiceUnavailable",
        http_status_code=503,
        expected_params={
            **issue,
            "Validity": {"Type": "ABSOLUTE", "Value": int((NOW + timedelta(days=1)).timestamp())},
            "ValidityNotBefore": {"Type": "ABSOLUTE", "Value": int((NOW - BACKDATE).timestamp())},
        },
    )
    # The CA's certificates, read two minutes ago, are not asked for again.
    stubber.add_response(
        "issue_certificate",
        {"CertificateArn": CERT_ARN},
        {
            **issue,
            "Validity": {
                "Type": "ABSOLUTE",
                "Value": int((later + timedelta(days=1)).timestamp()),
            },
            "ValidityNotBefore": {
                "Type": "ABSOLUTE",
                "Value": int((later - BACKDATE).timestamp()),
            },
        },
    )
    _expect_polls(stubber, authority, issued, in_progress=0)
    provider = _provider(pca_client, clock=lambda: next(clock))
    with pytest.raises(ProviderTransientError):
        provider.sign_ca(request.csr, timedelta(days=1))
    provider.sign_ca(request.csr, timedelta(days=1))
    stubber.assert_no_pending_responses()


def test_waiting_is_bounded_by_max_wait(pca_client: ACMPCAClient, stubber: Stubber) -> None:
    authority = Authority.create(NOW)
    request = cluster_ca_request(TRUST_DOMAIN, cluster="east", algorithm=KeyAlgorithm.ECDSA_P256)
    _expect_start(stubber, authority)
    stubber.add_response("issue_certificate", {"CertificateArn": CERT_ARN})
    for _ in range(3):  # maxWait 3s at one poll a second
        stubber.add_client_error("get_certificate", "RequestInProgressException")
    provider = _provider(pca_client, maxWait="3s")
    with pytest.raises(ProviderTransientError, match=r"was not issued within 3s \(maxWait\)"):
        provider.sign_ca(request.csr, timedelta(days=1))
    stubber.assert_no_pending_responses()


# --- the CA's state and AWS errors --------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "error", "advice"),
    [
        ("PENDING_CERTIFICATE", ProviderNeedsFixError, "install its CA certificate"),
        ("DISABLED", ProviderNeedsFixError, "enable it"),
        ("EXPIRED", ProviderNeedsFixError, "renew its CA certificate"),
        ("DELETED", ProviderNeedsFixError, "restore it"),
        ("FAILED", ProviderNeedsFixError, "create a new private CA"),
        ("CREATING", ProviderTransientError, "it is still being created"),
    ],
)
def test_a_ca_that_is_not_active_is_refused_on_first_use(
    pca_client: ACMPCAClient,
    stubber: Stubber,
    status: str,
    error: type[Exception],
    advice: str,
) -> None:
    stubber.add_response("describe_certificate_authority", described(status))
    request = cluster_ca_request(TRUST_DOMAIN, cluster="east", algorithm=KeyAlgorithm.ECDSA_P256)
    with pytest.raises(error) as info:
        _provider(pca_client).sign_ca(request.csr, timedelta(days=1))
    assert str(info.value).startswith(
        f"provider pca: certificate authority {ARN} is {status}, not ACTIVE: {advice}"
    )


def _stub_failure(
    stub: Stubber, authority: Authority, operation: str, code: str, status: int
) -> None:
    """Answer every call up to ``operation`` as AWS would, then fail it."""
    order = [
        "describe_certificate_authority",
        "get_certificate_authority_certificate",
        "issue_certificate",
        "get_certificate",
    ]
    answers: dict[str, dict[str, Any]] = {
        "describe_certificate_authority": described(),
        "get_certificate_authority_certificate": authority.certificate_answer(),
        "issue_certificate": {"CertificateArn": CERT_ARN},
    }
    for method in order[: order.index(operation)]:
        stub.add_response(method, answers[method])
    stub.add_client_error(
        operation,
        service_error_code=code,
        service_message=f"{code} for {KEY_ID}",  # AWS never sends a key id; masked anyway
        http_status_code=status,
    )


IAM_HINT = f"allow it in the IAM policy (see {DOCS})"


@pytest.mark.parametrize(
    ("operation", "code", "status", "error", "message"),
    [
        (
            "issue_certificate",
            "AccessDeniedException",
            400,
            ProviderNeedsFixError,
            f"provider pca: access denied for acm-pca:IssueCertificate on {ARN}: {IAM_HINT}",
        ),
        (
            "describe_certificate_authority",
            "AccessDeniedException",
            400,
            ProviderNeedsFixError,
            f"provider pca: access denied for acm-pca:DescribeCertificateAuthority on {ARN}: "
            f"{IAM_HINT}",
        ),
        (
            "get_certificate_authority_certificate",
            "AccessDeniedException",
            400,
            ProviderNeedsFixError,
            f"provider pca: access denied for acm-pca:GetCertificateAuthorityCertificate "
            f"on {ARN}: {IAM_HINT}",
        ),
        (  # the waiter's failure acceptor
            "get_certificate",
            "AccessDeniedException",
            400,
            ProviderNeedsFixError,
            f"provider pca: access denied for acm-pca:GetCertificate on {ARN}: {IAM_HINT}",
        ),
        (
            "describe_certificate_authority",
            "UnrecognizedClientException",
            400,
            ProviderNeedsFixError,
            f"provider pca: AWS rejected the credentials used for "
            f"acm-pca:DescribeCertificateAuthority on {ARN} (UnrecognizedClientException): "
            f"check the credentials trustmgr runs with (see {DOCS})",
        ),
        (
            "describe_certificate_authority",
            "ResourceNotFoundException",
            400,
            ProviderNeedsFixError,
            "check certificateAuthorityArn and region",
        ),
        ("issue_certificate", "InvalidArgsException", 400, ProviderNeedsFixError, "check"),
        ("issue_certificate", "ValidationException", 400, ProviderNeedsFixError, "templateArn"),
        ("issue_certificate", "MalformedCSRException", 400, ProviderNeedsFixError, "the CSR"),
        ("issue_certificate", "InvalidStateException", 400, ProviderNeedsFixError, "ACTIVE"),
        ("issue_certificate", "ThrottlingException", 400, ProviderTransientError, "throttling"),
        ("issue_certificate", "LimitExceededException", 400, ProviderTransientError, "quota"),
        (
            "issue_certificate",
            "RequestInProgressException",
            400,
            ProviderTransientError,
            "still in progress",
        ),
        ("issue_certificate", "InternalFailure", 500, ProviderTransientError, "unavailable"),
        ("issue_certificate", "ServiceUnavailable", 503, ProviderTransientError, "unavailable"),
        (  # an error the waiter has no acceptor for
            "get_certificate",
            "RequestFailedException",
            400,
            ProviderTransientError,
            "could not complete",
        ),
    ],
)
def test_aws_errors_are_sorted_into_transient_and_needs_fix(
    pca_client: ACMPCAClient,
    stubber: Stubber,
    operation: str,
    code: str,
    status: int,
    error: type[Exception],
    message: str,
) -> None:
    authority = Authority.create(NOW)
    _stub_failure(stubber, authority, operation, code, status)
    request = cluster_ca_request(TRUST_DOMAIN, cluster="east", algorithm=KeyAlgorithm.ECDSA_P256)
    with pytest.raises(error) as info:
        _provider(pca_client).sign_ca(request.csr, timedelta(days=1))
    text = str(info.value)
    assert message in text
    assert ARN in text
    assert KEY_ID not in text and SECRET not in text
    stubber.assert_no_pending_responses()


def test_a_needs_fix_error_makes_the_next_use_check_the_ca_again(
    pca_client: ACMPCAClient, stubber: Stubber
) -> None:
    authority = Authority.create(NOW)
    _stub_failure(stubber, authority, "issue_certificate", "InvalidStateException", 400)
    stubber.add_response("describe_certificate_authority", described("DISABLED"))
    provider = _provider(pca_client)
    request = cluster_ca_request(TRUST_DOMAIN, cluster="east", algorithm=KeyAlgorithm.ECDSA_P256)
    with pytest.raises(ProviderNeedsFixError, match="InvalidStateException"):
        provider.sign_ca(request.csr, timedelta(days=1))
    with pytest.raises(ProviderNeedsFixError, match=f"{ARN} is DISABLED, not ACTIVE"):
        provider.sign_ca(request.csr, timedelta(days=1))


def test_a_denied_assume_role_names_sts_and_the_role(pca_client: ACMPCAClient) -> None:
    role = "arn:aws:iam::111122223333:role/trustmgr-issuer"

    def deny(**_: Any) -> None:
        # botocore raises STS errors from inside the PCA call, while refreshing credentials.
        error = {"Error": {"Code": "AccessDenied", "Message": "not authorized"}}
        raise ClientError(error, "AssumeRole")  # type: ignore[arg-type]

    pca_client.meta.events.register("before-call.acm-pca.DescribeCertificateAuthority", deny)
    provider = _provider(pca_client, assumeRoleArn=role)
    with pytest.raises(ProviderNeedsFixError) as info:
        provider.roots()
    assert str(info.value) == (
        f"provider pca: access denied for sts:AssumeRole on {role}: {IAM_HINT}"
    )


# --- building the client, configuration -----------------------------------------------------


def test_the_client_uses_botocore_retry_modes_region_and_endpoint(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    config = _config(endpointUrl="https://pca.vpce.example", retryMode="adaptive", maxAttempts=7)
    client = build_client("pca", config)
    try:
        assert client.meta.region_name == REGION
        assert client.meta.endpoint_url == "https://pca.vpce.example"
        retries = getattr(client.meta.config, "retries", None)  # untyped in botocore-stubs
        assert retries == {"mode": "adaptive", "total_max_attempts": 7}
    finally:
        client.close()


def test_constructing_the_provider_does_no_io() -> None:
    provider = AcmPcaProvider("pca", _config(), lambda: NOW)
    assert isinstance(provider, Provider)
    assert provider.template_arn == TEMPLATE


def test_the_core_imports_without_boto3() -> None:
    code = (
        "import sys; import trustmgr.providers.acmpca, trustmgr.providers.config; "
        "loaded = [m for m in sys.modules if m.split('.')[0] in ('boto3', 'botocore')]; "
        "assert not loaded, loaded"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent.parent)


def test_the_default_template_is_in_the_cas_partition() -> None:
    gov = "arn:aws-us-gov:acm-pca:us-gov-west-1:111122223333:certificate-authority/abc"
    assert default_template_arn(gov) == (
        "arn:aws-us-gov:acm-pca:::template/SubordinateCACertificate_PathLen0_CSRPassthrough/V1"
    )


@pytest.mark.parametrize(
    ("overrides", "problem"),
    [
        ({"region": "eu-west-1"}, "region eu-west-1 is not the region of certificateAuthorityArn"),
        (
            {"templateArn": "arn:aws-cn:acm-pca:::template/SubordinateCACertificate_PathLen0/V1"},
            "templateArn is in partition aws-cn",
        ),
        ({"signingAlgorithm": "SHA1WITHRSA"}, "SHA256WITHECDSA"),
        ({"certificateAuthorityArn": "arn:aws:acm-pca:us-east-1:1:ca/x"}, "pattern"),
        ({"maxWait": "0s"}, "greater than zero"),
        ({"retryMode": "legacy"}, "standard"),
        ({"maxAttempts": 0}, "greater than or equal to 1"),
        ({"assumeRoleArn": "trustmgr"}, "pattern"),
        ({"accessKeyId": KEY_ID}, "Extra inputs are not permitted"),
    ],
)
def test_bad_configuration_is_refused(overrides: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValidationError, match=problem):
        _config(**overrides)


# --- conformance: the Stubber answering dynamically ----------------------------------------


class TestAcmPcaConformance(ProviderConformance):
    @pytest.fixture
    def provider(self, pca_client: ACMPCAClient) -> Iterator[AcmPcaProvider]:
        def clock() -> datetime:
            return datetime.now(UTC)

        authority = Authority.create(clock(), subordinate=True)
        with StubbedPca(pca_client, authority, clock):
            yield AcmPcaProvider("pca", _config(), clock, pca_client, poll_seconds=0)


# --- over HTTP: moto's ACM PCA ---------------------------------------------------------------


@pytest.fixture(scope="module")
def moto_url() -> Iterator[str]:
    with MotoServer() as url:
        yield url


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Fake credentials, and nothing else from this machine's AWS setup."""
    aws_identity(monkeypatch, tmp_path, "AKIDMOTOEXAMPLE", "moto-secret")


@pytest.fixture
def moto_ca(moto_url: str, aws_env: None) -> tuple[str, x509.Certificate]:
    """An ACTIVE root CA in moto: created, self-signed through its own CSR, imported."""
    client = boto3.client("acm-pca", region_name=REGION, endpoint_url=moto_url)
    try:
        arn = client.create_certificate_authority(
            CertificateAuthorityConfiguration={
                "KeyAlgorithm": "RSA_2048",
                "SigningAlgorithm": "SHA256WITHRSA",
                "Subject": {"CommonName": "moto root"},
            },
            CertificateAuthorityType="ROOT",
        )["CertificateAuthorityArn"]
        csr = client.get_certificate_authority_csr(CertificateAuthorityArn=arn)["Csr"]
        root_arn = client.issue_certificate(
            CertificateAuthorityArn=arn,
            Csr=csr.encode(),
            SigningAlgorithm="SHA256WITHRSA",
            TemplateArn="arn:aws:acm-pca:::template/RootCACertificate/V1",
            Validity={"Type": "YEARS", "Value": 10},
        )["CertificateArn"]
        pem = client.get_certificate(CertificateAuthorityArn=arn, CertificateArn=root_arn)
        client.import_certificate_authority_certificate(
            CertificateAuthorityArn=arn, Certificate=pem["Certificate"].encode()
        )
    finally:
        client.close()
    return arn, x509.load_pem_x509_certificate(pem["Certificate"].encode())


def _moto_config(arn: str, moto_url: str, **overrides: Any) -> AcmPcaConfig:
    return AcmPcaConfig.model_validate(
        {"certificateAuthorityArn": arn, "region": REGION, "endpointUrl": moto_url, **overrides}
    )


def test_the_call_sequence_over_http_and_the_core_refuses_motos_non_ca_certificate(
    moto_url: str, moto_ca: tuple[str, x509.Certificate]
) -> None:
    arn, root = moto_ca
    config = _moto_config(arn, moto_url)
    client = build_client("pca", config)
    calls: list[str] = []
    client.meta.events.register(
        "before-send.acm-pca", lambda request, **_: calls.append(operation_of(request))
    )
    provider = AcmPcaProvider("pca", config, lambda: datetime.now(UTC), client)
    request = cluster_ca_request(TRUST_DOMAIN, cluster="east", algorithm=KeyAlgorithm.ECDSA_P256)
    try:
        answer = provider.sign_ca(request.csr, timedelta(hours=24))
    finally:
        client.close()

    assert calls == [
        "DescribeCertificateAuthority",
        "GetCertificateAuthorityCertificate",
        "IssueCertificate",
        "GetCertificate",  # the waiter
        "GetCertificate",
    ]
    assert answer.roots == (root,)
    assert answer.chain[0].public_key() == request.csr.public_key()
    assert uri_sans(answer.chain[0]) == [f"spiffe://{TRUST_DOMAIN}"]
    # moto issues subordinates with no CA extensions (FACTS): trustmgr must not use them.
    with pytest.raises(ProviderAnswerError) as info:
        check_signed_ca(answer, request, TRUST_DOMAIN, provider="pca", now=datetime.now(UTC))
    assert "the issued CA is not a CA (BasicConstraints CA:TRUE missing)" in str(info.value)
    assert "has no NameConstraints" in str(info.value)


def test_a_provider_builds_its_own_client_on_first_use(
    moto_url: str, moto_ca: tuple[str, x509.Certificate]
) -> None:
    arn, root = moto_ca
    provider = AcmPcaProvider("pca", _moto_config(arn, moto_url), lambda: datetime.now(UTC))
    assert provider.roots() == (root,)


@pytest.mark.parametrize(
    ("code", "status"), [("ThrottlingException", 400), ("InternalFailure", 500)]
)
def test_botocore_retries_throttling_and_5xx_with_the_sameidempotency_token(
    moto_url: str, moto_ca: tuple[str, x509.Certificate], code: str, status: int
) -> None:
    arn, _ = moto_ca
    config = _moto_config(arn, moto_url)
    client = build_client("pca", config)
    tokens: list[str] = []

    def fail_the_first_issue(request: AWSPreparedRequest, **_: Any) -> AWSResponse | None:
        if operation_of(request) != "IssueCertificate":
            return None
        assert isinstance(request.body, bytes)
        tokens.append(json.loads(request.body)["IdempotencyToken"])
        if len(tokens) > 1:
            return None  # moto answers
        return json_error(request, status, code, "try again")

    client.meta.events.register("before-send.acm-pca", fail_the_first_issue)  # type: ignore[arg-type]
    provider = AcmPcaProvider("pca", config, lambda: datetime.now(UTC), client)
    request = cluster_ca_request(TRUST_DOMAIN, cluster="east", algorithm=KeyAlgorithm.ECDSA_P256)
    try:
        provider.sign_ca(request.csr, timedelta(hours=1))
    finally:
        client.close()
    assert tokens == [idempotency_token(request.csr)] * 2


def test_what_still_fails_after_botocores_retries_is_transient(
    moto_url: str, moto_ca: tuple[str, x509.Certificate]
) -> None:
    arn, _ = moto_ca
    config = _moto_config(arn, moto_url, maxAttempts=1)
    client = build_client("pca", config)

    def throttle(request: AWSPreparedRequest, **_: Any) -> AWSResponse | None:
        if operation_of(request) != "IssueCertificate":
            return None
        return json_error(request, 400, "ThrottlingException", "Rate exceeded")

    client.meta.events.register("before-send.acm-pca", throttle)  # type: ignore[arg-type]
    provider = AcmPcaProvider("pca", config, lambda: datetime.now(UTC), client)
    request = cluster_ca_request(TRUST_DOMAIN, cluster="east", algorithm=KeyAlgorithm.ECDSA_P256)
    try:
        with pytest.raises(ProviderTransientError, match="ThrottlingException: Rate exceeded"):
            provider.sign_ca(request.csr, timedelta(hours=1))
    finally:
        client.close()


def test_an_unknown_ca_over_http_needs_a_fix(moto_url: str, aws_env: None) -> None:
    arn = f"arn:aws:acm-pca:{REGION}:123456789012:certificate-authority/does-not-exist"
    provider = AcmPcaProvider("pca", _moto_config(arn, moto_url), lambda: datetime.now(UTC))
    with pytest.raises(ProviderNeedsFixError, match="ResourceNotFoundException") as info:
        provider.roots()
    assert arn in str(info.value)


def test_assume_role_signs_with_the_roles_credentials(
    moto_url: str, moto_ca: tuple[str, x509.Certificate], monkeypatch: pytest.MonkeyPatch
) -> None:
    arn, root = moto_ca
    monkeypatch.setenv("AWS_ENDPOINT_URL_STS", moto_url)
    config = _moto_config(arn, moto_url, assumeRoleArn="arn:aws:iam::123456789012:role/issuer")
    client = build_client("pca", config)
    key_ids: list[str] = []

    def record(request: AWSPreparedRequest, **_: Any) -> None:
        authorization = str(request.headers["Authorization"])
        key_ids.append(authorization.split("Credential=", 1)[1].split("/", 1)[0])

    client.meta.events.register("before-send.acm-pca", record)
    try:
        assert AcmPcaProvider("pca", config, lambda: datetime.now(UTC), client).roots() == (root,)
    finally:
        client.close()
    assert key_ids and all(k.startswith("ASIA") for k in key_ids)


# --- a whole mesh through AWS Private CA ------------------------------------------------------


def test_bootstrap_of_a_mesh_issued_by_aws_private_ca(
    pca_client: ACMPCAClient, workdir: Path
) -> None:
    """The same checks as the other providers: istiod's load checks, and OpenSSL
    accepting the cluster's own trust domain and refusing another."""
    (workdir / "trustmgr.yaml").write_text(
        f"""\
providers:
  pca: {{acmPca: {{certificateAuthorityArn: "{ARN}", region: us-east-1}}}}
meshes:
  payments:
    trustDomain: payments.example
    provider: pca
    clusters:
      pci-east: {{directory: {{path: out/pci-east}}}}
      pci-west: {{directory: {{path: out/pci-west}}}}
"""
    )

    def clock() -> datetime:
        return datetime.now(UTC)

    authority = Authority.create(clock(), subordinate=True)
    config = load_config(workdir / "trustmgr.yaml")
    with StubbedPca(pca_client, authority, clock):
        pca_config = config.providers["pca"].acm_pca
        assert pca_config is not None
        provider = AcmPcaProvider("pca", pca_config, clock, pca_client, poll_seconds=0)
        ws = Workspace.build(config, clock=clock, providers={"pca": provider})
        report = apply(ws)
        assert report.ok and report.changed
        assert all(problems == [] for problems in verify_all(ws).values())
        assert not apply(ws).changed
    for cluster in ("pci-east", "pci-west"):
        directory = workdir / "out" / cluster
        chain = load_certificates((directory / "cert-chain.pem").read_bytes(), "cert-chain.pem")
        assert len(chain) == 3  # cluster CA, the private CA (a subordinate), its root
        assert_openssl_enforces_trust_domain(directory, "payments.example", "web.example", workdir)


def test_signing_many_clusters_asks_for_the_ca_certificate_once(
    pca_client: ACMPCAClient, stubber: Stubber
) -> None:
    """Provider calls per pass do not grow with the cluster count: only the
    issuance itself is per cluster."""
    authority = Authority.create(NOW)
    _expect_start(stubber, authority)
    requests = [
        cluster_ca_request(TRUST_DOMAIN, cluster=f"c{i}", algorithm=KeyAlgorithm.ECDSA_P256)
        for i in range(5)
    ]
    for request in requests:
        issued = authority.sign(request.csr, not_after=NOW + timedelta(days=1), now=NOW)
        stubber.add_response("issue_certificate", {"CertificateArn": CERT_ARN})
        _expect_polls(stubber, authority, issued, in_progress=0)
    provider = _provider(pca_client)
    for request in requests:
        provider.sign_ca(request.csr, timedelta(days=1))
    stubber.assert_no_pending_responses()
    # roots() always asks AWS: a pass learns of a renewed CA certificate at once.
    stubber.add_response(
        "get_certificate_authority_certificate",
        authority.certificate_answer(),
        {"CertificateAuthorityArn": ARN},
    )
    assert provider.roots()
    stubber.assert_no_pending_responses()


def test_a_mesh_moves_to_a_new_private_ca_with_the_exact_requests(workdir: Path) -> None:
    """Renewing an AWS root: the new private CA gets a provider of its own and
    the mesh is pointed at it; the passes carry the move, and every issuance
    after the switch goes to the new CA with the exact request."""
    new_arn = ARN.replace("0e1f2a3b", "9a8b7c6d")
    text = f"""\
stateStore: {{file: {{path: state}}}}
rotation: {{soak: 0s, canary: 0}}
providers:
  pca-old: {{acmPca: {{certificateAuthorityArn: "{ARN}", region: {REGION}}}}}
  pca-new: {{acmPca: {{certificateAuthorityArn: "{new_arn}", region: {REGION}}}}}
meshes:
  payments:
    trustDomain: payments.example
    provider: pca-old
    clusters:
      pci-east: {{directory: {{path: out/pci-east}}}}
      pci-west: {{directory: {{path: out/pci-west}}}}
"""
    path = workdir / "trustmgr.yaml"
    path.write_text(text)

    def clock() -> datetime:
        return datetime.now(UTC)

    old, new = Authority.create(clock()), Authority.create(clock())
    clients = {
        name: boto3.client(
            "acm-pca", region_name=REGION, aws_access_key_id=KEY_ID, aws_secret_access_key=SECRET
        )
        for name in ("pca-old", "pca-new")
    }
    issued_by_new: list[dict[str, Any]] = []

    def record(params: dict[str, Any], model: OperationModel, **_: Any) -> None:
        if model.name == "IssueCertificate":
            issued_by_new.append(dict(params))

    clients["pca-new"].meta.events.register("provide-client-params.acm-pca", record)
    try:
        with (
            StubbedPca(clients["pca-old"], old, clock),
            StubbedPca(clients["pca-new"], new, clock),
        ):
            providers: dict[str, Provider] = {
                name: AcmPcaProvider(
                    name,
                    AcmPcaConfig(certificate_authority_arn=arn, region=REGION),
                    clock,
                    clients[name],
                    poll_seconds=0,
                )
                for name, arn in (("pca-old", ARN), ("pca-new", new_arn))
            }

            def run() -> None:
                config = load_config(path)
                with Workspace.build(config, clock=clock, providers=providers) as ws:
                    assert apply(ws).ok

            run()
            path.write_text(text.replace("    provider: pca-old\n", "    provider: pca-new\n"))
            for _ in range(6):
                run()
            state = json.loads((workdir / "state/state.json").read_text())
            assert state["rotations"] == {}
    finally:
        for client in clients.values():
            client.close()
    assert len(issued_by_new) == 2  # one per cluster, at the switch
    for params in issued_by_new:
        assert params["CertificateAuthorityArn"] == new_arn
        assert params["TemplateArn"] == default_template_arn(new_arn)
        assert params["SigningAlgorithm"] == "SHA256WITHECDSA"
        lifetime = params["Validity"]["Value"] - params["ValidityNotBefore"]["Value"]
        assert lifetime == pytest.approx((timedelta(hours=720) + BACKDATE).total_seconds(), abs=2)
    for cluster in ("pci-east", "pci-west"):
        chain = load_certificates((workdir / "out" / cluster / "cert-chain.pem").read_bytes(), "c")
        assert chain[-1] == new.root
        bundle = (workdir / "out" / cluster / "root-cert.pem").read_bytes()
        assert old.root.public_bytes(Encoding.PEM) not in bundle
