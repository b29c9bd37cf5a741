"""The vault provider against a real OpenBao dev server (tests/openbao.py)."""

from __future__ import annotations

import base64
import gc
import json
import logging
import re
import socket
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import hvac
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from tests.conformance import TRUST_DOMAIN, ProviderConformance
from tests.openbao import (
    SIGNER_POLICY,
    OpenBaoServer,
    VaultPKI,
    add_root,
    approle_credentials,
    create_root_mount,
    create_token,
    root_client,
    setup_pki,
    signer_policy,
    start_openbao,
)
from trustmgr.pki import check_signed_ca, cluster_ca_request
from trustmgr.providers import ProviderNeedsFixError, ProviderTransientError
from trustmgr.providers.config import VaultConfig
from trustmgr.providers.keys import KeyAlgorithm
from trustmgr.providers.vault import VaultProvider

HOUR = timedelta(hours=1)


class MovableClock:
    """Real time plus an offset the test moves forward."""

    def __init__(self) -> None:
        self.offset = timedelta(0)

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset

    def advance(self, delta: timedelta) -> None:
        self.offset += delta


Connect = Callable[..., VaultProvider]


@pytest.fixture(autouse=True)
def _all_logs(caplog: pytest.LogCaptureFixture) -> None:
    # Everything, urllib3's request lines included, so secrets are looked for everywhere.
    caplog.set_level(logging.DEBUG)


@pytest.fixture
def connect(vault_pki: VaultPKI) -> Iterator[Connect]:
    """Build providers as trustmgr.yaml would (camelCase keys); close them afterwards."""
    made: list[VaultProvider] = []

    def make(
        config: dict[str, Any] | None = None,
        *,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        sleep: Callable[[float], None] = time.sleep,
    ) -> VaultProvider:
        settings: dict[str, Any] = {
            "address": vault_pki.address,
            "auth": {"token": {"file": str(vault_pki.token_file)}},
            "timeout": "5s",
        }
        settings.update(config or {})
        provider = VaultProvider(
            "vault-test", VaultConfig.model_validate(settings), clock, sleep=sleep
        )
        made.append(provider)
        return provider

    yield make
    for provider in made:
        provider.close()


def approle(role_id_file: Path, secret_id_file: Path) -> dict[str, Any]:
    return {"appRole": {"roleIdFile": str(role_id_file), "secretIdFile": str(secret_id_file)}}


def sign(provider: VaultProvider, ttl: timedelta = HOUR) -> x509.Certificate:
    """Sign a fresh cluster CA request and check the answer as trustmgr does."""
    request = cluster_ca_request(TRUST_DOMAIN, cluster="c1", algorithm=KeyAlgorithm.ECDSA_P256)
    answer = provider.sign_ca(request.csr, ttl)
    check_signed_ca(answer, request, TRUST_DOMAIN, provider=provider.name, now=datetime.now(UTC))
    return answer.chain[0]


def assert_secrets_absent(
    error: BaseException | None, caplog: pytest.LogCaptureFixture, *secrets: str
) -> None:
    """None of ``secrets`` in the error's text or repr, nor in anything logged."""
    texts = [caplog.text, *(r.getMessage() for r in caplog.records)]
    if error is not None:
        texts += [str(error), repr(error)]
    for secret in secrets:
        assert secret
        for text in texts:
            assert secret not in text


def read(path: Path) -> str:
    return path.read_text().strip()


def lookup_accessor(server: OpenBaoServer, accessor: str) -> dict[str, Any] | None:
    with root_client(server) as client:
        answer = client.adapter.request(
            "post",
            "/v1/auth/token/lookup-accessor",
            json={"accessor": accessor},
            raise_exception=False,
        )
    return answer["data"] if isinstance(answer, dict) else None


def accessor_of(server: OpenBaoServer, token: str) -> str:
    with root_client(server) as client:
        return str(client.auth.token.lookup(token)["data"]["accessor"])


def role_accessors(server: OpenBaoServer, role: str) -> set[str]:
    """Accessors of the live tokens AppRole ``role`` has handed out."""
    with root_client(server) as client:
        listed = client.adapter.request("list", "/v1/auth/token/accessors")["data"]["keys"]
    found = set()
    for accessor in listed:
        data = lookup_accessor(server, accessor)
        if data and (data.get("meta") or {}).get("role_name") == role:
            found.add(str(accessor))
    return found


def expire_time(data: dict[str, Any]) -> datetime:
    # OpenBao writes nanoseconds; Python parses at most microseconds.
    text = re.sub(r"(\.\d{6})\d*", r"\1", str(data["expire_time"]))
    return datetime.fromisoformat(text)


def new_role(server: OpenBaoServer, role: str, **settings: str) -> tuple[str, str]:
    with root_client(server) as client:
        client.auth.approle.create_or_update_approle(
            role, token_policies=[SIGNER_POLICY], **settings
        )
        return approle_credentials(client, role)


# -- conformance ----------------------------------------------------------------------------


class TestVaultConformance(ProviderConformance):
    @pytest.fixture
    def provider(self, connect: Connect) -> VaultProvider:
        return connect()

    def test_roots_are_the_mount_root(self, provider: VaultProvider, vault_pki: VaultPKI) -> None:
        assert provider.roots() == (vault_pki.root,)


class TestVaultIntermediateConformance(ProviderConformance):
    @pytest.fixture
    def provider(self, connect: Connect, vault_pki: VaultPKI) -> VaultProvider:
        return connect({"mount": vault_pki.int_mount})

    def test_chain_runs_through_the_intermediate_to_the_pki_root(
        self, provider: VaultProvider, vault_pki: VaultPKI
    ) -> None:
        request = cluster_ca_request(TRUST_DOMAIN, cluster="c1", algorithm=KeyAlgorithm.ECDSA_P256)
        answer = provider.sign_ca(request.csr, HOUR)
        assert answer.chain[1:] == (vault_pki.intermediate,)
        assert answer.roots == (vault_pki.root,)
        root = check_signed_ca(
            answer, request, TRUST_DOMAIN, provider=provider.name, now=datetime.now(UTC)
        )
        assert root == vault_pki.root


# -- what is signed ---------------------------------------------------------------------------


def test_ttl_is_capped_by_the_configured_ceiling(connect: Connect) -> None:
    provider = connect({"ttl": "2h"})
    before = datetime.now(UTC)
    cert = sign(provider, ttl=timedelta(days=30))
    assert before + timedelta(hours=2) - timedelta(minutes=1) < cert.not_valid_after_utc
    assert cert.not_valid_after_utc <= before + timedelta(hours=2, minutes=1)
    assert cert.not_valid_before_utc <= before - timedelta(minutes=4)


@pytest.fixture(scope="module")
def multi_issuer_mount(vault_pki: VaultPKI) -> tuple[str, x509.Certificate, x509.Certificate]:
    """A mount with two roots: "first" (the default) and "second"."""
    with root_client(vault_pki.server) as client:
        first = create_root_mount(client, "pki_multi", "Multi Root One", issuer_name="first")
        second = add_root(client, "pki_multi", "Multi Root Two", issuer_name="second")
        client.sys.create_or_update_policy(
            "multi-signer", 'path "pki_multi/*" { capabilities = ["read", "list", "update"] }'
        )
    return (
        "pki_multi",
        x509.load_pem_x509_certificate(first.encode()),
        x509.load_pem_x509_certificate(second.encode()),
    )


def test_a_multi_issuer_mount_reports_every_root_and_signs_with_the_chosen_issuer(
    connect: Connect, vault_pki: VaultPKI, multi_issuer_mount: tuple[str, Any, Any]
) -> None:
    mount, first, second = multi_issuer_mount
    token = create_token(vault_pki.server, "multi-signer")
    auth_file = vault_pki.token_file.with_name("multi-token")
    auth_file.write_text(token)
    auth = {"token": {"file": str(auth_file)}}
    default = connect({"mount": mount, "auth": auth})
    assert default.roots() == (first, second)
    assert sign(default).issuer == first.subject
    chosen = connect({"mount": mount, "issuer": "second", "auth": auth})
    request = cluster_ca_request(TRUST_DOMAIN, cluster="c1", algorithm=KeyAlgorithm.ECDSA_P256)
    answer = chosen.sign_ca(request.csr, HOUR)
    assert answer.roots == (first, second)
    root = check_signed_ca(answer, request, TRUST_DOMAIN, provider="v", now=datetime.now(UTC))
    assert root == second


def test_a_mount_in_a_namespace(connect: Connect, vault_pki: VaultPKI, tmp_path: Path) -> None:
    server = vault_pki.server
    with root_client(server) as client:
        client.write_data("sys/namespaces/team", data={})
    team = hvac.Client(url=server.address, token=server.root_token, namespace="team")
    try:
        root = x509.load_pem_x509_certificate(
            create_root_mount(team, "pki", "Team Root", issuer_name="root").encode()
        )
        team.sys.create_or_update_policy("signer", signer_policy("pki"))
        token = str(team.auth.token.create(policies=["signer"], ttl="1h")["auth"]["client_token"])
    finally:
        team.adapter.close()
    (tmp_path / "token").write_text(token)
    provider = connect({"namespace": "team", "auth": {"token": {"file": str(tmp_path / "token")}}})
    assert provider.roots() == (root,)
    assert root != vault_pki.root
    assert sign(provider).issuer == root.subject


# -- logins -------------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["file", "env"])
def test_token_login(
    source: str, connect: Connect, vault_pki: VaultPKI, monkeypatch: pytest.MonkeyPatch
) -> None:
    if source == "env":
        monkeypatch.setenv("TEST_VAULT_TOKEN", vault_pki.token)
        auth = {"token": {"env": "TEST_VAULT_TOKEN"}}
    else:
        auth = {"token": {"file": str(vault_pki.token_file)}}
    sign(connect({"auth": auth}))


def test_token_login_defaults_to_vault_token(
    connect: Connect, vault_pki: VaultPKI, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VAULT_TOKEN", vault_pki.token)
    sign(connect({"auth": {"token": {}}}))


@pytest.mark.parametrize("source", ["files", "env"])
def test_approle_login(
    source: str,
    connect: Connect,
    vault_pki: VaultPKI,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    if source == "env":
        monkeypatch.setenv("TEST_ROLE_ID", read(vault_pki.role_id_file))
        monkeypatch.setenv("TEST_SECRET_ID", read(vault_pki.secret_id_file))
        auth = {"appRole": {"roleIdEnv": "TEST_ROLE_ID", "secretIdEnv": "TEST_SECRET_ID"}}
    else:
        auth = approle(vault_pki.role_id_file, vault_pki.secret_id_file)
    provider = connect({"auth": auth})
    sign(provider)
    assert "logged in to Vault with AppRole at auth/approle" in caplog.text
    assert read(vault_pki.secret_id_file) not in caplog.text + repr(provider)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def es256_jwt(key: ec.EllipticCurvePrivateKey, claims: dict[str, Any]) -> str:
    header = _b64(json.dumps({"alg": "ES256", "typ": "JWT"}).encode())
    payload = _b64(json.dumps(claims).encode())
    r, s = decode_dss_signature(key.sign(f"{header}.{payload}".encode(), ec.ECDSA(hashes.SHA256())))
    return f"{header}.{payload}.{_b64(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"


def public_pem(key: ec.EllipticCurvePrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


@pytest.fixture(scope="module")
def jwt_key(vault_pki: VaultPKI) -> ec.EllipticCurvePrivateKey:
    """JWT auth at auth/jwt trusting this key; role "signer" wants audience trustmgr."""
    key = ec.generate_private_key(ec.SECP256R1())
    with root_client(vault_pki.server) as client:
        client.sys.enable_auth_method("jwt", path="jwt")
        client.write_data("auth/jwt/config", data={"jwt_validation_pubkeys": [public_pem(key)]})
        client.write_data(
            "auth/jwt/role/signer",
            data={
                "role_type": "jwt",
                "user_claim": "sub",
                "bound_audiences": ["trustmgr"],
                "token_policies": [SIGNER_POLICY],
                "token_ttl": "1h",
            },
        )
    return key


@pytest.mark.parametrize("source", ["file", "env"])
def test_jwt_login(
    source: str,
    connect: Connect,
    jwt_key: ec.EllipticCurvePrivateKey,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = int(time.time())
    jwt = es256_jwt(jwt_key, {"sub": "trustmgr", "aud": "trustmgr", "iat": now, "exp": now + 300})
    if source == "env":
        monkeypatch.setenv("TEST_JWT", jwt)
        auth = {"jwt": {"role": "signer", "jwtEnv": "TEST_JWT"}}
    else:
        (tmp_path / "jwt").write_text(jwt)
        auth = {"jwt": {"role": "signer", "jwtFile": str(tmp_path / "jwt")}}
    sign(connect({"auth": auth}))
    assert jwt not in caplog.text


def test_a_jwt_vault_refuses_is_a_clear_error_without_the_jwt(
    connect: Connect,
    jwt_key: ec.EllipticCurvePrivateKey,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    jwt = es256_jwt(jwt_key, {"sub": "trustmgr", "aud": "someone-else", "exp": 2**31})
    (tmp_path / "jwt").write_text(jwt)
    provider = connect({"auth": {"jwt": {"role": "signer", "jwtFile": str(tmp_path / "jwt")}}})
    with pytest.raises(ProviderNeedsFixError, match="JWT login on auth/jwt/login was refused") as e:
        sign(provider)
    assert "role signer" in str(e.value)
    assert_secrets_absent(e.value, caplog, jwt)


class _TokenReview(BaseHTTPRequestHandler):
    """The Kubernetes TokenReview API, approving every token for istio-system/trustmgr."""

    def do_POST(self) -> None:
        spec = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["spec"]
        answer = json.dumps(
            {
                "apiVersion": "authentication.k8s.io/v1",
                "kind": "TokenReview",
                "status": {
                    "authenticated": True,
                    "user": {
                        "username": "system:serviceaccount:istio-system:trustmgr",
                        "uid": "7e1d0c36",
                        "groups": ["system:serviceaccounts"],
                    },
                    "audiences": spec.get("audiences") or [],
                },
            }
        ).encode()
        self.send_response(201)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def token_review() -> Iterator[str]:
    server = HTTPServer(("127.0.0.1", 0), _TokenReview)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_kubernetes_login(
    connect: Connect,
    vault_pki: VaultPKI,
    token_review: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with root_client(vault_pki.server) as client:
        client.sys.enable_auth_method("kubernetes", path="k8s-test")
        client.write_data(
            "auth/k8s-test/config",
            data={
                "kubernetes_host": token_review,
                "kubernetes_ca_cert": vault_pki.root.public_bytes(
                    serialization.Encoding.PEM
                ).decode(),
                "disable_local_ca_jwt": True,
            },
        )
        client.write_data(
            "auth/k8s-test/role/trustmgr",
            data={
                "bound_service_account_names": ["trustmgr"],
                "bound_service_account_namespaces": ["istio-system"],
                "token_policies": [SIGNER_POLICY],
                "token_ttl": "1h",
            },
        )
    service_account_token = es256_jwt(
        ec.generate_private_key(ec.SECP256R1()),
        {
            "iss": "kubernetes/serviceaccount",
            "sub": "system:serviceaccount:istio-system:trustmgr",
            "kubernetes.io/serviceaccount/namespace": "istio-system",
            "kubernetes.io/serviceaccount/service-account.name": "trustmgr",
            "kubernetes.io/serviceaccount/service-account.uid": "7e1d0c36",
        },
    )
    (tmp_path / "token").write_text(service_account_token)
    auth = {
        "kubernetes": {
            "role": "trustmgr",
            "mount": "k8s-test",
            "tokenPath": str(tmp_path / "token"),
        }
    }
    sign(connect({"auth": auth}))
    assert "logged in to Vault with Kubernetes at auth/k8s-test" in caplog.text
    assert service_account_token not in caplog.text


# -- token lifetime ---------------------------------------------------------------------------


def test_an_approle_token_is_renewed_then_replaced_by_a_new_login_when_renewal_fails(
    connect: Connect,
    vault_pki: VaultPKI,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = vault_pki.server
    role_id, secret_id = new_role(server, "renewal", token_ttl="1h", token_max_ttl="24h")
    monkeypatch.setenv("TEST_ROLE_ID", role_id)
    monkeypatch.setenv("TEST_SECRET_ID", secret_id)
    clock = MovableClock()
    provider = connect(
        {"auth": {"appRole": {"roleIdEnv": "TEST_ROLE_ID", "secretIdEnv": "TEST_SECRET_ID"}}},
        clock=clock,
    )
    sign(provider)
    (accessor,) = role_accessors(server, "renewal")
    issued = lookup_accessor(server, accessor)
    assert issued is not None

    clock.advance(timedelta(minutes=45))  # under a third of the hour left: renew
    sign(provider)
    renewed = lookup_accessor(server, accessor)
    assert renewed is not None
    assert expire_time(renewed) > expire_time(issued)
    assert role_accessors(server, "renewal") == {accessor}

    with root_client(server) as client:
        client.auth.token.revoke_accessor(accessor)
    clock.advance(timedelta(minutes=45))  # renewal is due again, and now refused
    sign(provider)
    (replacement,) = role_accessors(server, "renewal")
    assert replacement != accessor
    assert "Vault refused to renew the token" in caplog.text
    assert_secrets_absent(None, caplog, secret_id)


def test_a_token_revoked_between_renewals_is_replaced_by_a_new_login(
    connect: Connect, vault_pki: VaultPKI, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = vault_pki.server
    role_id, secret_id = new_role(server, "revoked", token_ttl="1h")
    monkeypatch.setenv("TEST_SECRET_ID", secret_id)
    provider = connect({"auth": {"appRole": {"roleId": role_id, "secretIdEnv": "TEST_SECRET_ID"}}})
    sign(provider)
    (accessor,) = role_accessors(server, "revoked")
    with root_client(server) as client:
        client.auth.token.revoke_accessor(accessor)
    sign(provider)  # refused, the token is found revoked, a new login, the request again
    assert role_accessors(server, "revoked") - {accessor}


def test_a_token_at_its_max_ttl_is_replaced_by_a_new_login(
    connect: Connect,
    vault_pki: VaultPKI,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = vault_pki.server
    role_id, secret_id = new_role(server, "short", token_ttl="3s", token_max_ttl="3s")
    monkeypatch.setenv("TEST_SECRET_ID", secret_id)
    provider = connect({"auth": {"appRole": {"roleId": role_id, "secretIdEnv": "TEST_SECRET_ID"}}})
    sign(provider)
    (first,) = role_accessors(server, "short")
    # Real time, since Vault caps the renewal by its own clock: after 2 of 3 seconds the
    # renewal is due, and Vault can extend the token by under a second at most.
    time.sleep(2.1)
    sign(provider)
    assert "logging in again" in caplog.text
    assert role_accessors(server, "short") - {first}


def test_token_auth_renews_its_token_and_says_clearly_when_it_is_revoked(
    connect: Connect, vault_pki: VaultPKI, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = vault_pki.server
    token = create_token(server, SIGNER_POLICY, ttl="1h")
    token_file = tmp_path / "token"
    token_file.write_text(token)
    clock = MovableClock()
    provider = connect({"auth": {"token": {"file": str(token_file)}}}, clock=clock)
    sign(provider)
    accessor = accessor_of(server, token)
    issued = lookup_accessor(server, accessor)
    clock.advance(timedelta(minutes=45))
    sign(provider)
    renewed = lookup_accessor(server, accessor)
    assert issued is not None and renewed is not None
    assert expire_time(renewed) > expire_time(issued)

    with root_client(server) as client:
        client.auth.token.revoke_accessor(accessor)
    with pytest.raises(ProviderNeedsFixError) as e:
        sign(provider)
    assert str(e.value) == (
        f"provider vault-test: Vault rejected the token from file {token_file} (expired, revoked "
        "or mistyped), and token auth cannot log in again: provide a fresh token there, or use "
        "appRole, kubernetes or jwt auth"
    )
    assert_secrets_absent(e.value, caplog, token)

    token_file.write_text(create_token(server, SIGNER_POLICY))  # e.g. Vault Agent's sink
    sign(provider)


def test_one_renewal_serves_concurrent_signers(
    connect: Connect, vault_pki: VaultPKI, caplog: pytest.LogCaptureFixture
) -> None:
    clock = MovableClock()
    token_file = vault_pki.token_file.with_name("concurrent-token")
    token_file.write_text(create_token(vault_pki.server, SIGNER_POLICY, ttl="1h"))
    provider = connect({"auth": {"token": {"file": str(token_file)}}}, clock=clock)
    sign(provider)
    clock.advance(timedelta(minutes=45))
    with ThreadPoolExecutor(max_workers=8) as pool:
        certs = list(pool.map(lambda _: sign(provider), range(16)))
    assert len({c.serial_number for c in certs}) == 16
    assert caplog.text.count("renewed the Vault token") == 1


# -- failures -----------------------------------------------------------------------------------


def test_a_policy_without_the_sign_path_is_a_permission_error_naming_the_path(
    connect: Connect, vault_pki: VaultPKI, caplog: pytest.LogCaptureFixture
) -> None:
    provider = connect(
        {"auth": approle(vault_pki.denied_role_id_file, vault_pki.denied_secret_id_file)}
    )
    assert provider.roots() == (vault_pki.root,)  # reading is allowed
    with pytest.raises(ProviderNeedsFixError) as e:
        sign(provider)
    assert str(e.value) == (
        "provider vault-test: permission denied on pki/root/sign-intermediate: the token's "
        'policy needs "update" on that path'
    )
    assert_secrets_absent(
        e.value, caplog, read(vault_pki.denied_secret_id_file), read(vault_pki.token_file)
    )


def test_an_unknown_mount_is_a_needs_fix_error(
    connect: Connect, vault_pki: VaultPKI, caplog: pytest.LogCaptureFixture
) -> None:
    provider = connect({"mount": "nope"})
    for call in (provider.roots, lambda: sign(provider)):
        with pytest.raises(ProviderNeedsFixError, match=r"nothing is mounted at nope/") as e:
            call()
        assert_secrets_absent(e.value, caplog, vault_pki.token)


def test_an_unknown_issuer_is_a_needs_fix_error(
    connect: Connect, vault_pki: VaultPKI, caplog: pytest.LogCaptureFixture
) -> None:
    provider = connect({"issuer": "missing"})
    with pytest.raises(ProviderNeedsFixError) as e:
        sign(provider)
    assert str(e.value).startswith('provider vault-test: mount pki has no issuer "missing"')
    assert_secrets_absent(e.value, caplog, vault_pki.token)


def test_a_wrong_secret_id_is_a_clear_login_error(
    connect: Connect, vault_pki: VaultPKI, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    wrong = tmp_path / "secret-id"
    wrong.write_text("00000000-1111-2222-3333-444444444444")
    provider = connect({"auth": approle(vault_pki.role_id_file, wrong)})
    with pytest.raises(ProviderNeedsFixError) as e:
        sign(provider)
    assert str(e.value).startswith(
        "provider vault-test: AppRole login on auth/approle/login was refused (HTTP 400): "
    )
    assert_secrets_absent(e.value, caplog, read(wrong), read(vault_pki.secret_id_file))


def test_an_auth_mount_that_does_not_exist_is_named(
    connect: Connect, vault_pki: VaultPKI, caplog: pytest.LogCaptureFixture
) -> None:
    auth = approle(vault_pki.role_id_file, vault_pki.secret_id_file)
    auth["appRole"]["mount"] = "elsewhere"
    with pytest.raises(ProviderNeedsFixError) as e:
        sign(connect({"auth": auth}))
    assert str(e.value).startswith(
        "provider vault-test: AppRole login on auth/elsewhere/login was refused (HTTP 403): "
        "check that AppRole auth is enabled at auth/elsewhere and the role id and secret id are "
        "current"
    )
    assert_secrets_absent(e.value, caplog, read(vault_pki.secret_id_file))


def test_an_empty_credential_source_is_named(
    connect: Connect, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("NO_SUCH_TOKEN", raising=False)
    provider = connect({"auth": {"token": {"env": "NO_SUCH_TOKEN"}}})
    with pytest.raises(ProviderNeedsFixError, match="environment variable NO_SUCH_TOKEN is empty"):
        provider.roots()


@contextmanager
def closed_port() -> Iterator[int]:
    """A port on 127.0.0.1 that refuses connections: bound, never listened on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])


def test_a_wrong_address_is_one_clear_unreachable_line_quickly(
    connect: Connect, vault_pki: VaultPKI, caplog: pytest.LogCaptureFixture
) -> None:
    with closed_port() as port:
        provider = connect({"address": f"http://127.0.0.1:{port}", "timeout": "2s"})
        for call in (provider.roots, lambda: sign(provider)):
            start = time.monotonic()
            with pytest.raises(ProviderTransientError) as e:
                call()
            assert time.monotonic() - start < 1
            assert str(e.value) == (
                f"provider vault-test: Vault at http://127.0.0.1:{port} is unreachable "
                "(connection refused); check the address and that Vault is running"
            )
            assert "\n" not in str(e.value)
            assert_secrets_absent(e.value, caplog, vault_pki.token)


def test_rate_limiting_is_transient_and_retried_with_backoff(
    connect: Connect, vault_pki: VaultPKI, caplog: pytest.LogCaptureFixture
) -> None:
    with root_client(vault_pki.server) as client:
        create_root_mount(client, "pki_limited", "Limited Root", issuer_name="root")
        client.write_data(
            "sys/quotas/rate-limit/pki-limited",
            data={"path": "pki_limited/", "rate": 1, "interval": "1s"},
        )
    impatient = connect({"mount": "pki_limited", "maxRetries": 0})
    with pytest.raises(
        ProviderTransientError, match=r"rate-limited the request to pki_limited/"
    ) as e:
        impatient.roots()  # LIST takes the one request a second, the issuer read gets 429
    assert_secrets_absent(e.value, caplog, vault_pki.token)

    delays: list[float] = []

    def sleep(seconds: float) -> None:
        delays.append(seconds)
        time.sleep(1.05)  # let the quota refill, whatever the backoff chose

    patient = connect({"mount": "pki_limited", "maxRetries": 2}, sleep=sleep)
    assert len(patient.roots()) == 1
    assert delays
    assert 0.125 <= delays[0] <= 0.25  # the first backoff: 0.25 s, half of it jittered


@pytest.fixture(scope="module")
def private_pki(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VaultPKI]:
    """A server of its own, for tests that seal it."""
    workdir = tmp_path_factory.mktemp("openbao-private")
    with start_openbao(workdir) as server:
        yield setup_pki(server, workdir)


def test_a_sealed_vault_is_transient_and_signing_resumes_after_unseal(
    private_pki: VaultPKI, caplog: pytest.LogCaptureFixture
) -> None:
    server = private_pki.server
    config = VaultConfig.model_validate(
        {
            "address": server.address,
            "auth": approle(private_pki.role_id_file, private_pki.secret_id_file),
        }
    )
    with VaultProvider("vault-test", config, lambda: datetime.now(UTC)) as provider:
        sign(provider)
        with root_client(server) as client:
            client.sys.seal()
        for call in (provider.roots, lambda: sign(provider)):
            start = time.monotonic()
            with pytest.raises(ProviderTransientError) as e:
                call()
            assert time.monotonic() - start < 1
            assert str(e.value) == (
                f"provider vault-test: Vault at {server.address} is sealed; signing resumes "
                "once it is unsealed"
            )
            assert_secrets_absent(e.value, caplog, read(private_pki.secret_id_file))
        with root_client(server) as client:
            client.sys.submit_unseal_key(server.unseal_key)
        sign(provider)


def test_a_fresh_provider_logs_in_against_a_sealed_vault_with_a_transient_error(
    private_pki: VaultPKI, caplog: pytest.LogCaptureFixture
) -> None:
    server = private_pki.server
    config = VaultConfig.model_validate(
        {
            "address": server.address,
            "auth": approle(private_pki.role_id_file, private_pki.secret_id_file),
        }
    )
    with root_client(server) as client:
        client.sys.seal()
    try:
        with (
            VaultProvider("vault-test", config, lambda: datetime.now(UTC)) as provider,
            pytest.raises(ProviderTransientError, match="is sealed") as e,
        ):
            sign(provider)
        assert_secrets_absent(e.value, caplog, read(private_pki.secret_id_file))
    finally:
        with root_client(server) as client:
            client.sys.submit_unseal_key(server.unseal_key)


# -- configuration and reprs ----------------------------------------------------------------


def test_no_secret_in_reprs(connect: Connect, vault_pki: VaultPKI) -> None:
    auth = approle(vault_pki.role_id_file, vault_pki.secret_id_file)
    provider = connect({"auth": auth})
    sign(provider)
    config = VaultConfig.model_validate({"address": vault_pki.address, "auth": auth})
    for text in (repr(provider), str(provider), repr(config)):
        assert read(vault_pki.secret_id_file) not in text
    assert repr(provider) == (
        f"VaultProvider(name='vault-test', address='{vault_pki.address}', mount='pki')"
    )


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"address": "vault:8200"}, "must be an http:// or https:// URL"),
        ({"address": "https://v", "mount": "/"}, "must be a Vault path"),
        ({"address": "https://v", "issuer": "a/b"}, "should match pattern"),
        ({"address": "https://v", "caCert": "ca.pem", "tlsSkipVerify": True}, "not both"),
        (
            {"address": "https://v", "auth": {"token": {}, "jwt": {"role": "r", "jwtEnv": "J"}}},
            "exactly one auth",
        ),
        (
            {"address": "https://v", "auth": {"appRole": {"roleId": "r"}}},
            "secretIdFile, secretIdEnv",
        ),
        (
            {"address": "https://v", "auth": {"appRole": {"secretIdEnv": "S"}}},
            "roleId, roleIdFile, roleIdEnv",
        ),
        ({"address": "https://v", "auth": {"jwt": {"role": "r"}}}, "jwtFile, jwtEnv"),
        ({"address": "https://v", "auth": {"token": {"env": "A", "file": "f"}}}, "not both"),
        ({"address": "https://v", "maxRetries": 11}, "less than or equal to 10"),
        ({"address": "https://v", "tokn": {}}, "Extra inputs are not permitted"),
    ],
)
def test_config_errors(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        VaultConfig.model_validate(settings)


def test_a_provider_nobody_closes_leaves_no_socket_behind(vault_pki: VaultPKI) -> None:
    config = VaultConfig.model_validate(
        {"address": vault_pki.address, "auth": {"token": {"file": str(vault_pki.token_file)}}}
    )
    provider = VaultProvider("vault-test", config, lambda: datetime.now(UTC))
    sign(provider)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        del provider
        gc.collect()
    assert [w for w in caught if issubclass(w.category, ResourceWarning)] == []


def test_skipping_tls_verification_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    config = VaultConfig.model_validate({"address": "https://vault.invalid", "tlsSkipVerify": True})
    with VaultProvider("vault-test", config, lambda: datetime.now(UTC)):
        pass
    assert "TLS verification of https://vault.invalid is disabled" in caplog.text
