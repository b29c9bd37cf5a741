"""A self-signed root key wrapped by an AWS KMS key.

Two seams, where AWS cannot run here: moto's KMS over HTTP (``MotoServer``) for
the call sequence, a key that does not exist, a wrapped key moved under another
root, an unreachable endpoint; botocore's ``Stubber`` on a real client for the
exact requests (KeyId, KeySpec, EncryptionContext) and the errors moto does not
play (a disabled key, one pending deletion, a policy that denies decrypt,
throttling)."""

from __future__ import annotations

import base64
import os
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import boto3
import pytest
from botocore.awsrequest import AWSPreparedRequest
from botocore.stub import Stubber
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

from tests.conftest import snapshot, trustmgr
from tests.moto_server import MotoServer
from trustmgr.pki import cluster_ca_request
from trustmgr.providers import ProviderNeedsFixError, ProviderTransientError, awskms, envelope
from trustmgr.providers.awskms import AwsKmsWrapper
from trustmgr.providers.config import AwsKmsKeyEncryption, SelfSignedConfig
from trustmgr.providers.keys import KeyAlgorithm
from trustmgr.providers.selfsigned import SelfSignedProvider
from trustmgr.state.file import FileStateStore

if TYPE_CHECKING:
    from mypy_boto3_kms.client import KMSClient

REGION = "eu-west-1"
ARN = f"arn:aws:kms:{REGION}:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"
ALIAS = "alias/trustmgr-root"
ACCESS_KEY_ID = "AKIAIOSFODNN7EXAMPLE"
SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
ENVELOPE = b"-----BEGIN TRUSTMGR ENVELOPE-----"


def _kms_config(key_id: str, endpoint_url: str | None = None) -> SelfSignedConfig:
    settings: dict[str, Any] = {"keyId": key_id, "region": REGION}
    if endpoint_url:
        settings["endpointUrl"] = endpoint_url
    return SelfSignedConfig.model_validate({"keyEncryption": {"awsKms": settings}})


def _provider(store: FileStateStore, config: SelfSignedConfig) -> SelfSignedProvider:
    return SelfSignedProvider("corp", config, store.blobs(), lambda: datetime.now(UTC))


def _signs(provider: SelfSignedProvider, root: x509.Certificate) -> None:
    request = cluster_ca_request("a.test", cluster="c", algorithm=KeyAlgorithm.ECDSA_P256)
    provider.sign_ca(request.csr, timedelta(hours=1)).chain[0].verify_directly_issued_by(root)


def _envelope_of(store: FileStateStore) -> envelope.Envelope:
    unit = (store.path / "providers" / "corp" / "root.pem").read_bytes()
    return envelope.describe(unit[unit.index(ENVELOPE) :])


def _context(cert: x509.Certificate) -> dict[str, str]:
    return {"trustmgr:root-sha256": cert.fingerprint(hashes.SHA256()).hex()}


@pytest.fixture
def store(tmp_path: Path) -> FileStateStore:
    return FileStateStore(tmp_path / "state")


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Fake credentials, and nothing else from this machine's AWS setup."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ROLE_ARN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


# --- over HTTP: moto's KMS -------------------------------------------------------------------


@pytest.fixture(scope="module")
def moto_url() -> Iterator[str]:
    with MotoServer() as url:
        yield url


@pytest.fixture
def kms_key(moto_url: str, aws_env: None) -> str:
    """A new symmetric key in moto, with alias ``alias/trustmgr-root-<n>``; returns its ARN."""
    client = boto3.client("kms", region_name=REGION, endpoint_url=moto_url)
    try:
        arn = client.create_key(Description="trustmgr root key wrapping")["KeyMetadata"]["Arn"]
    finally:
        client.close()
    return arn


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The KMS operations every client the wrapper builds sends, in order."""
    sent: list[str] = []
    build = awskms.build_client

    def recording(config: AwsKmsKeyEncryption) -> KMSClient:
        client = build(config)

        def record(request: AWSPreparedRequest, **_: Any) -> None:
            target = request.headers["X-Amz-Target"]
            text = target.decode() if isinstance(target, bytes) else str(target)
            sent.append(text.rsplit(".", 1)[-1])

        client.meta.events.register("before-send.kms", record)
        return client

    monkeypatch.setattr(awskms, "build_client", recording)
    return sent


def test_the_call_sequence_over_http(
    moto_url: str, kms_key: str, store: FileStateStore, calls: list[str]
) -> None:
    client = boto3.client("kms", region_name=REGION, endpoint_url=moto_url)
    alias = f"alias/trustmgr-root-{kms_key[-12:]}"
    client.create_alias(AliasName=alias, TargetKeyId=kms_key)
    client.close()
    config = _kms_config(alias, moto_url)
    with _provider(store, config) as first:
        root = first.create_root()
    assert calls == ["GenerateDataKey", "Decrypt"], "the new envelope is opened before it is kept"
    sealed = _envelope_of(store)
    assert (sealed.wrapping, sealed.key_id) == ("aws-kms", kms_key)
    calls.clear()
    with _provider(store, config) as fresh:
        fresh.unlock()
        _signs(fresh, root)
        _signs(fresh, root)
    assert calls == ["Decrypt"], "unwrapped once per run"


def test_a_key_that_does_not_exist_needs_a_fix_and_nothing_is_stored(
    moto_url: str, aws_env: None, store: FileStateStore
) -> None:
    missing = f"arn:aws:kms:{REGION}:123456789012:key/11111111-1111-1111-1111-111111111111"
    with (
        _provider(store, _kms_config(missing, moto_url)) as provider,
        pytest.raises(ProviderNeedsFixError) as info,
    ):
        provider.create_root()
    assert str(info.value) == (
        f"provider corp: keyEncryption: kms:GenerateDataKey on {missing} failed "
        "(NotFoundException): no such KMS key in this account and region; check "
        "keyEncryption.awsKms.keyId and region (a deleted key cannot unwrap the root key again)"
    )
    assert not (store.path / "providers").exists()


def test_a_wrapped_key_moved_under_another_root_is_refused_by_kms(
    moto_url: str, kms_key: str, tmp_path: Path
) -> None:
    config = _kms_config(kms_key, moto_url)
    first, second = FileStateStore(tmp_path / "a"), FileStateStore(tmp_path / "b")
    for each in (first, second):
        with _provider(each, config) as provider:
            provider.create_root()
    unit_a = (first.path / "providers/corp/root.pem").read_bytes()
    unit_b = (second.path / "providers/corp/root.pem").read_bytes()
    moved = unit_b[: unit_b.index(ENVELOPE)] + unit_a[unit_a.index(ENVELOPE) :]
    (second.path / "providers/corp/root.pem").write_bytes(moved)
    with _provider(second, config) as provider, pytest.raises(ProviderNeedsFixError) as info:
        provider.unlock()
    assert str(info.value) == (
        f"provider corp: keyEncryption: kms:Decrypt on {kms_key} failed "
        "(InvalidCiphertextException): KMS refused the wrapped data key: it was altered, or it "
        "belongs to another root; restore root.pem from a backup"
    )


def test_kms_unreachable_is_transient(aws_env: None, store: FileStateStore) -> None:
    config = _kms_config(ALIAS, "http://127.0.0.1:9")
    with _provider(store, config) as provider, pytest.raises(ProviderTransientError) as info:
        provider.create_root()
    assert str(info.value) == (
        f"provider corp: keyEncryption: cannot reach AWS KMS in {REGION} for "
        f"kms:GenerateDataKey on {ALIAS} (EndpointConnectionError); the root key cannot be "
        "unwrapped without it"
    )


CONFIG = """\
stateStore: {{file: {{path: state}}}}
providers:
  corp:
    selfSigned:
      keyEncryption:
        awsKms: {{keyId: "{key}", region: {region}, endpointUrl: "{url}"}}
meshes:
  web:
    trustDomain: web.example
    provider: corp
    clusters:
      web-1: {{directory: {{path: out/web-1}}}}
"""


def test_bootstrap_with_a_kms_wrapped_root_and_kms_gone_is_one_line_exit_1(
    moto_url: str, kms_key: str, workdir: Path
) -> None:
    config = CONFIG.format(key=kms_key, region=REGION, url=moto_url)
    (workdir / "trustmgr.yaml").write_text(config)
    run = trustmgr("bootstrap")
    assert run.code == 0, run.err
    second = "      web-2: {directory: {path: out/web-2}}\n"
    (workdir / "trustmgr.yaml").write_text(config + second)
    assert trustmgr("bootstrap").code == 0
    unreachable = CONFIG.format(key=kms_key, region=REGION, url="http://127.0.0.1:9")
    (workdir / "trustmgr.yaml").write_text(
        unreachable + second + "      web-3: {directory: {path: out/web-3}}\n"
    )
    before = snapshot(workdir)
    run = trustmgr("bootstrap")
    assert run.code == 1
    assert run.err.strip().splitlines() == [
        f"trustmgr: provider corp: keyEncryption: cannot reach AWS KMS in {REGION} for "
        f"kms:Decrypt on {kms_key} (EndpointConnectionError); the root key cannot be unwrapped "
        "without it"
    ]
    assert snapshot(workdir) == before


# --- exact requests: botocore's Stubber ------------------------------------------------------


@pytest.fixture
def kms_client() -> Iterator[KMSClient]:
    client = boto3.client(
        "kms",
        region_name=REGION,
        aws_access_key_id=ACCESS_KEY_ID,
        aws_secret_access_key=SECRET,
    )
    yield client
    client.close()


@pytest.fixture
def stubber(kms_client: KMSClient) -> Iterator[Stubber]:
    with Stubber(kms_client) as stub:
        yield stub


@pytest.fixture(scope="module")
def root() -> tuple[Any, x509.Certificate]:
    key = KeyAlgorithm.ECDSA_P256.generate()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Root")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return key, cert


def test_the_exact_requests_wrap_with_aes_256_and_the_roots_context(
    kms_client: KMSClient, stubber: Stubber, root: tuple[Any, x509.Certificate]
) -> None:
    key, cert = root
    data_key, blob = os.urandom(32), os.urandom(184)
    context = _context(cert)
    stubber.add_response(
        "generate_data_key",
        {"KeyId": ARN, "Plaintext": data_key, "CiphertextBlob": blob},
        {"KeyId": ALIAS, "KeySpec": "AES_256", "EncryptionContext": context},
    )
    stubber.add_response(
        "decrypt",
        {"KeyId": ARN, "Plaintext": data_key},
        {"CiphertextBlob": blob, "KeyId": ARN, "EncryptionContext": context},
    )
    wrapper = AwsKmsWrapper("corp", AwsKmsKeyEncryption(key_id=ALIAS, region=REGION), kms_client)
    sealed = envelope.seal(key, cert, wrapper)
    described = envelope.describe(sealed)
    assert (described.wrapping, described.key_id) == ("aws-kms", ARN)
    assert base64.b64decode(described.data_key) == blob
    opened = envelope.unseal(sealed, cert, wrapper)
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    assert opened.public_key().public_bytes(*spki) == cert.public_key().public_bytes(*spki)
    stubber.assert_no_pending_responses()


@pytest.mark.parametrize(
    ("code", "status", "error", "message"),
    [
        (
            "AccessDeniedException",
            400,
            ProviderNeedsFixError,
            f"access denied for kms:Decrypt on {ARN}: allow it in the key policy or the IAM "
            "policy of the credentials trustmgr runs with",
        ),
        (
            "DisabledException",
            400,
            ProviderNeedsFixError,
            f"kms:Decrypt on {ARN} failed (DisabledException): the KMS key is disabled; enable "
            "it (aws kms enable-key)",
        ),
        (
            "KMSInvalidStateException",
            400,
            ProviderNeedsFixError,
            "(KMSInvalidStateException): the KMS key cannot be used in its state (pending "
            "deletion or import); cancel the deletion (aws kms cancel-key-deletion) and enable it",
        ),
        ("NotFoundException", 400, ProviderNeedsFixError, "no such KMS key"),
        ("InvalidCiphertextException", 400, ProviderNeedsFixError, "it was altered"),
        ("IncorrectKeyException", 400, ProviderNeedsFixError, "wrapped by another KMS key"),
        ("UnrecognizedClientException", 400, ProviderNeedsFixError, "rejected the credentials"),
        (
            "ThrottlingException",
            400,
            ProviderTransientError,
            f"kms:Decrypt on {ARN} failed after 3 attempts (ThrottlingException): AWS KMS is "
            "throttling or unavailable; try again later",
        ),
        ("KMSInternalException", 500, ProviderTransientError, "try again later"),
        ("KeyUnavailableException", 500, ProviderTransientError, "try again later"),
        ("DependencyTimeoutException", 503, ProviderTransientError, "try again later"),
    ],
)
def test_kms_errors_are_one_line_sorted_into_transient_and_needs_fix(
    kms_client: KMSClient,
    stubber: Stubber,
    root: tuple[Any, x509.Certificate],
    code: str,
    status: int,
    error: type[Exception],
    message: str,
) -> None:
    _, cert = root
    stubber.add_client_error(
        "decrypt",
        service_error_code=code,
        service_message=f"{code} for {ACCESS_KEY_ID}",
        http_status_code=status,
    )
    wrapper = AwsKmsWrapper("corp", AwsKmsKeyEncryption(key_id=ALIAS, region=REGION), kms_client)
    with pytest.raises(error) as info:
        wrapper.unwrap(ARN, base64.b64encode(b"blob").decode(), _context(cert))
    text = str(info.value)
    assert text.startswith("provider corp: keyEncryption: ")
    assert message in text
    assert "\n" not in text
    assert ACCESS_KEY_ID not in text and SECRET not in text


def test_a_disabled_key_stops_the_run_with_one_line_and_nothing_written(
    moto_url: str,
    kms_key: str,
    workdir: Path,
    kms_client: KMSClient,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """moto does not refuse a disabled key: AWS's answer is played by the Stubber."""
    config = CONFIG.format(key=kms_key, region=REGION, url=moto_url)
    (workdir / "trustmgr.yaml").write_text(config)
    assert trustmgr("bootstrap").code == 0
    (workdir / "trustmgr.yaml").write_text(config + "      web-2: {directory: {path: out/web-2}}\n")
    stub = Stubber(kms_client)
    stub.add_client_error("decrypt", "DisabledException", "is disabled", 400)
    stub.activate()
    monkeypatch.setattr(awskms, "build_client", lambda config: kms_client)
    before = snapshot(workdir)
    run = trustmgr("bootstrap")
    stub.deactivate()
    assert run.code == 2
    assert run.err.strip().splitlines() == [
        f"trustmgr: provider corp: keyEncryption: kms:Decrypt on {kms_key} failed "
        "(DisabledException): the KMS key is disabled; enable it (aws kms enable-key)"
    ]
    assert snapshot(workdir) == before
