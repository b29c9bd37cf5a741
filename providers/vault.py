"""Vault or OpenBao PKI as a provider.

A cluster CA is signed through ``<mount>/root/sign-intermediate`` (or
``<mount>/issuer/<ref>/sign-intermediate`` when ``issuer`` is set) with
``use_csr_values``, so the CSR's URI SAN and critical name constraints are
copied into the certificate; ``max_path_length=0`` makes it a leaf CA. The
roots are the self-signed ends of the chains of every issuer of the mount.

hvac supplies the session, TLS settings, namespace and Vault headers. Every call
goes through ``_VaultHTTP.call`` with ``raise_exception=False``, so each failure
arrives with its HTTP status, and ``VaultProvider._translate`` is the one place
that turns failures into provider errors. Vault's own error text is quoted only
for PKI paths, never for logins, and every secret value the provider has read is
scrubbed from it; tokens, secret ids and JWTs never reach a message or a log.

Retries: a call that fails with 429, 412, 500, 502 or 504 is retried up to
``maxRetries`` times with jittered exponential backoff (about 0.25 s, 0.5 s,
... capped at 2 s). A sealed or unavailable Vault (503), an unreachable address
and a timeout are not retried: they surface at once as ProviderTransientError,
and the caller's next pass tries again. A request refused because the token
was revoked or expired is repeated once after logging in again.

Thread safety: one provider may sign from several threads. Token login and
renewal are serialised by a lock; the requests session is shared.
"""

from __future__ import annotations

import logging
import random
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import cached_property
from pathlib import Path
from types import TracebackType
from typing import Final, Literal, Protocol, Self, TypeVar

import hvac
import hvac.exceptions
import requests
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from trustmgr.providers.base import (
    BACKDATE,
    Clock,
    ProviderError,
    ProviderNeedsFixError,
    ProviderTransientError,
    SignedCA,
    read_secret,
)
from trustmgr.providers.chains import is_self_signed, issued_by
from trustmgr.providers.config import VaultAuth, VaultConfig

log = logging.getLogger(__name__)

RENEW_FRACTION: Final = 1 / 3
"""The token is renewed once less than this share of its lifetime remains."""

SNAPSHOT_MAX_AGE: Final = timedelta(seconds=60)
"""How long sign_ca reuses the mount's issuers and roots before reading them again."""

BACKOFF_BASE: Final = 0.25
BACKOFF_CAP: Final = 2.0

_RETRYABLE_STATUS: Final = frozenset({412, 429, 500, 502, 504})
_DENIED_STATUS: Final = frozenset({401, 403})
_MISSING_ISSUER = re.compile(
    r"unable to find PKI issuer for reference|no default issuer|could not fetch the CA certificate"
)

T = TypeVar("T")
Answer = dict[str, object]
Reason = Literal["http", "unreachable", "timeout", "tls", "answer"]


class _Failure(Exception):
    """A Vault call that did not succeed. Carries no request data.

    ``reason`` is ``http`` (Vault answered ``status`` with ``errors``),
    ``unreachable``, ``timeout``, ``tls`` or ``answer`` (a reply of the wrong shape).
    """

    def __init__(
        self,
        path: str,
        *,
        reason: Reason = "http",
        status: int | None = None,
        errors: tuple[str, ...] = (),
        detail: str = "",
    ) -> None:
        super().__init__(f"{reason} {status} on {path}")
        self.path = path
        self.reason: Reason = reason
        self.status = status
        self.errors = errors
        self.detail = detail

    @property
    def text(self) -> str:
        return " ".join(" ".join(self.errors).split())

    @property
    def missing_issuer(self) -> bool:
        return self.status in (400, 404, 500) and bool(_MISSING_ISSUER.search(self.text))

    @property
    def retryable(self) -> bool:
        return (
            self.reason == "http" and self.status in _RETRYABLE_STATUS and not self.missing_issuer
        )


def _connection_detail(exc: requests.exceptions.ConnectionError) -> str:
    text = str(exc)
    if "Connection refused" in text:
        return "connection refused"
    if any(
        marker in text
        for marker in ("Name or service not known", "nodename nor servname", "name resolution")
    ):
        return "the host name does not resolve"
    if "No route to host" in text or "Network is unreachable" in text:
        return "no route to host"
    return "connection failed"


def _errors_of(response: requests.Response) -> tuple[str, ...]:
    try:
        body: object = response.json()
    except ValueError:
        return ()
    if isinstance(body, dict):
        errors = body.get("errors")
        if isinstance(errors, list):
            return tuple(str(e) for e in errors)
    return ()


class VaultConnection(Protocol):
    """Where Vault is and how to log in: the fields ``VaultConfig`` and the
    self-signed provider's ``keyEncryption.vaultTransit`` share."""

    @property
    def address(self) -> str: ...
    @property
    def namespace(self) -> str | None: ...
    @property
    def ca_cert(self) -> str | None: ...
    @property
    def tls_skip_verify(self) -> bool: ...
    @property
    def timeout(self) -> timedelta: ...
    @property
    def auth(self) -> VaultAuth: ...


class _VaultHTTP:
    """Vault's HTTP API through an hvac client, with failures as ``_Failure``."""

    def __init__(self, config: VaultConnection) -> None:
        verify: bool | str = True
        if config.ca_cert:
            verify = str(Path(config.ca_cert).expanduser())
        elif config.tls_skip_verify:
            verify = False
        # token="" stops hvac from reading VAULT_TOKEN or ~/.vault-token by itself;
        # each request carries the token it was given explicitly.
        self._client = hvac.Client(
            url=config.address,
            token="",
            verify=verify,
            timeout=config.timeout.total_seconds(),
            namespace=config.namespace,
        )

    def call(
        self,
        method: str,
        path: str,
        *,
        token: str | None = None,
        body: Mapping[str, object] | None = None,
    ) -> Answer:
        """The JSON answer of ``method`` on ``/v1/<path>``; raises ``_Failure``."""
        headers = {"X-Vault-Token": token} if token else {}
        extra: dict[str, object] = {} if body is None else {"json": dict(body)}
        try:
            answer: object = self._client.adapter.request(
                method, f"/v1/{path}", headers=headers, raise_exception=False, **extra
            )
        except requests.exceptions.SSLError:
            raise _Failure(path, reason="tls") from None
        except requests.exceptions.ConnectTimeout:
            raise _Failure(path, reason="unreachable", detail="connection timed out") from None
        except requests.exceptions.Timeout:
            raise _Failure(path, reason="timeout") from None
        except requests.exceptions.ConnectionError as exc:
            detail = _connection_detail(exc)
            raise _Failure(path, reason="unreachable", detail=detail) from None
        except (requests.exceptions.RequestException, hvac.exceptions.VaultError):
            raise _Failure(path, reason="unreachable", detail="the request failed") from None
        if isinstance(answer, dict):
            return {str(k): v for k, v in answer.items()}
        if isinstance(answer, requests.Response):
            errors = _errors_of(answer)
            if method == "list" and answer.status_code == 404 and not errors:
                return {"data": {"keys": []}}  # Vault's way of saying "nothing listed"
            if answer.ok:
                raise _Failure(path, reason="answer", detail=f"HTTP {answer.status_code}, no data")
            raise _Failure(path, status=answer.status_code, errors=errors)
        raise _Failure(path, reason="answer", detail="not JSON")

    def close(self) -> None:
        self._client.adapter.close()


def _mapping(value: object, path: str, what: str) -> Answer:
    if not isinstance(value, dict):
        raise _Failure(path, reason="answer", detail=f"no {what}")
    return {str(k): v for k, v in value.items()}


def _number(value: object, path: str, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _Failure(path, reason="answer", detail=f"no {what}")
    return int(value)


def _certificates(value: object, path: str) -> list[x509.Certificate]:
    """Certificates from a PEM string (one or more blocks) or a list of them."""
    if value is None or value == "":
        return []
    texts = value if isinstance(value, list) else [value]
    certs: list[x509.Certificate] = []
    for text in texts:
        if not isinstance(text, str):
            raise _Failure(path, reason="answer", detail="a certificate that is not PEM")
        try:
            certs.extend(x509.load_pem_x509_certificates(text.encode()))
        except ValueError:
            raise _Failure(path, reason="answer", detail="a certificate that is not PEM") from None
    return certs


def _chain_up(
    leaf: x509.Certificate, candidates: list[x509.Certificate]
) -> tuple[tuple[x509.Certificate, ...], x509.Certificate | None]:
    """``leaf`` and its issuers found among ``candidates``, up to but excluding
    the root, and the root if it is among them. Vault's order is not relied on."""
    chain = [leaf]
    while True:
        parent = next((c for c in candidates if c not in chain and issued_by(chain[-1], c)), None)
        if parent is None:
            return tuple(chain), None
        if is_self_signed(parent):
            return tuple(chain), parent
        chain.append(parent)


def _read_secret(source: str, *, env: str | None = None, file: str | None = None) -> str:
    # Tokens and ids carry no meaningful surrounding whitespace, from a file or not.
    return read_secret(source, env=env, file=file).strip()


def _signed_chain(answer: Answer, path: str) -> tuple[x509.Certificate, ...]:
    """The issued CA and its issuers from a sign-intermediate answer, root excluded."""
    data = _mapping(answer.get("data"), path, "data")
    issued = _certificates(data.get("certificate"), path)
    if not issued:
        raise _Failure(path, reason="answer", detail="no certificate")
    # OpenBao's ca_chain starts with the issued certificate, Vault's with its issuer.
    others = _certificates(data.get("ca_chain"), path) or _certificates(
        data.get("issuing_ca"), path
    )
    leaf = issued[0]
    chain, _ = _chain_up(leaf, [c for c in dict.fromkeys([*issued[1:], *others]) if c != leaf])
    return chain


def _new_issuer(answer: Answer, path: str) -> tuple[str, x509.Certificate]:
    """The id and certificate of an issuer a generate call made."""
    data = answer.get("data")
    if not isinstance(data, dict) or not data.get("issuer_id") or not data.get("certificate"):
        raise _Failure(path, reason="answer", detail="no issuer_id or certificate")
    try:
        cert = x509.load_pem_x509_certificate(str(data["certificate"]).encode())
    except ValueError:
        raise _Failure(path, reason="answer", detail="certificate is not PEM") from None
    return str(data["issuer_id"]), cert


def _issuer_list(answer: Answer, path: str) -> list[tuple[str, str, bool]]:
    """(id, name, is default) of each issuer of a mount, from LIST <mount>/issuers."""
    data = _mapping(answer.get("data"), path, "data")
    keys = data.get("keys") or []
    info = data.get("key_info")
    if not isinstance(keys, list):
        raise _Failure(path, reason="answer", detail="no issuer list")
    listed = []
    for key in keys:
        meta = info.get(key) if isinstance(info, dict) else None
        meta = meta if isinstance(meta, dict) else {}
        listed.append(
            (str(key), str(meta.get("issuer_name") or ""), meta.get("is_default") is True)
        )
    return listed


def _issuer_chain(answer: Answer, path: str) -> tuple[x509.Certificate, ...]:
    """An issuer's certificate, its issuers, and its root if the mount knows it."""
    data = _mapping(answer.get("data"), path, "data")
    certificate = _certificates(data.get("certificate"), path)
    if not certificate:
        raise _Failure(path, reason="answer", detail="no certificate")
    own = certificate[0]
    if is_self_signed(own):
        return (own,)
    rest = [c for c in _certificates(data.get("ca_chain"), path) if c != own]
    chain, root = _chain_up(own, rest)
    return chain if root is None else (*chain, root)


@dataclass(frozen=True)
class _Lease:
    token: str = field(repr=False)
    expires_at: datetime | None
    """None for a token that never expires (a root token, or TTL 0)."""
    lifetime: timedelta
    renewable: bool


class _TokenKeeper:
    """Holds the current token: logs in, renews before expiry, logs in again
    when renewal stops working. All of it under one lock."""

    def __init__(self, name: str, auth: VaultAuth, http: _VaultHTTP, clock: Clock) -> None:
        self._name = name
        self._auth = auth
        self._http = http
        self._clock = clock
        self._lock = threading.Lock()
        self._lease: _Lease | None = None
        self._warned_expiry = False
        # Every secret value read, so Vault's error text can be scrubbed of it.
        self.secrets: set[str] = set()

    @property
    def method(self) -> str:
        if self._auth.app_role is not None:
            return "AppRole"
        if self._auth.kubernetes is not None:
            return "Kubernetes"
        if self._auth.jwt is not None:
            return "JWT"
        return "token"

    @property
    def expires_at(self) -> datetime | None:
        """When the current token expires; None before the first login or for a
        token that never expires."""
        lease = self._lease
        return None if lease is None else lease.expires_at

    def token(self) -> str:
        """A token good for the next request."""
        with self._lock:
            lease = self._lease
            if lease is None:
                lease = self._obtain(rejected=None)
            elif self._due(lease):
                lease = self._refresh(lease)
            self._lease = lease
            return lease.token

    def recover(self, rejected: str) -> bool:
        """Called after Vault refused a request made with ``rejected``. True when
        a different token is now current (repeat the request); False when
        ``rejected`` is still valid, so the refusal is the policy's."""
        with self._lock:
            if self._lease is not None and self._lease.token != rejected:
                return True
            try:
                self._http.call("get", "auth/token/lookup-self", token=rejected)
            except _Failure as failure:
                if failure.status not in _DENIED_STATUS:
                    raise
            else:
                return False
            log.info("provider %s: Vault no longer accepts the token; logging in again", self._name)
            self._lease = None
            self._lease = self._obtain(rejected=rejected)
            return True

    def _due(self, lease: _Lease) -> bool:
        if lease.expires_at is None:
            return False
        return self._clock() >= lease.expires_at - lease.lifetime * RENEW_FRACTION

    def _refresh(self, lease: _Lease) -> _Lease:
        renewed: _Lease | None = None
        if lease.renewable:
            try:
                renewed = self._renew(lease)
            except _Failure as failure:
                # Sealed, throttled or unreachable: a login would fail alike. Anything else
                # (403 revoked, 500 "past the max TTL") means this token is at its end.
                if failure.reason != "http" or failure.status in (429, 503):
                    raise
                log.info(
                    "provider %s: Vault refused to renew the token (HTTP %s)",
                    self._name,
                    failure.status,
                )
            else:
                if not self._due(renewed):
                    log.info(
                        "provider %s: renewed the Vault token; it expires at %s",
                        self._name,
                        f"{renewed.expires_at:%Y-%m-%dT%H:%M:%SZ}",
                    )
                    return renewed
        if self._auth.token is None:
            log.info(
                "provider %s: the token cannot be renewed further; logging in again", self._name
            )
            return self._obtain(rejected=None)
        fresh = self._read_token()
        if fresh != lease.token:
            return self._lookup(fresh)
        lease = renewed or lease
        if not self._warned_expiry:
            self._warned_expiry = True
            log.warning(
                "provider %s: the Vault token from %s cannot be renewed (it expires at %s); "
                "provide a fresh one there",
                self._name,
                self._auth.token.source,
                f"{lease.expires_at:%Y-%m-%dT%H:%M:%SZ}",
            )
        # Used until Vault rejects it; then the error says what to do.
        return lease

    def _renew(self, lease: _Lease) -> _Lease:
        path = "auth/token/renew-self"
        answer = self._http.call("post", path, token=lease.token, body={})
        return self._lease_from_auth(answer, path, lifetime=lease.lifetime)

    def _lease_from_auth(self, answer: Answer, path: str, *, lifetime: timedelta | None) -> _Lease:
        auth = _mapping(answer.get("auth"), path, "auth block")
        token = auth.get("client_token")
        if not isinstance(token, str) or not token:
            raise _Failure(path, reason="answer", detail="no client token")
        self.secrets.add(token)
        ttl = timedelta(seconds=_number(auth.get("lease_duration", 0), path, "lease duration"))
        now = self._clock()
        if ttl:
            expires_at: datetime | None = now + ttl
        else:
            # A login without a TTL never expires; a renewal answering 0 is at its end.
            expires_at = None if lifetime is None else now
        return _Lease(
            token=token,
            expires_at=expires_at,
            lifetime=lifetime or ttl,
            renewable=auth.get("renewable") is True,
        )

    def _read_token(self) -> str:
        assert self._auth.token is not None
        cfg = self._auth.token
        token = _read_secret(
            f"provider {self._name}: auth.token",
            env=None if cfg.file else (cfg.env or "VAULT_TOKEN"),
            file=cfg.file,
        )
        self.secrets.add(token)
        return token

    def _lookup(self, token: str) -> _Lease:
        path = "auth/token/lookup-self"
        data = _mapping(self._http.call("get", path, token=token).get("data"), path, "data")
        ttl = timedelta(seconds=_number(data.get("ttl", 0), path, "ttl"))
        created = timedelta(seconds=_number(data.get("creation_ttl", 0), path, "creation ttl"))
        now = self._clock()
        return _Lease(
            token=token,
            expires_at=now + ttl if ttl else None,
            lifetime=max(created, ttl),
            renewable=data.get("renewable") is True,
        )

    def _obtain(self, *, rejected: str | None) -> _Lease:
        """A new token: log in, or for token auth read the source again."""
        auth = self._auth
        if auth.token is not None:
            token = self._read_token()
            if token == rejected:
                raise ProviderNeedsFixError(
                    f"provider {self._name}: Vault rejected the token from {auth.token.source} "
                    "(expired, revoked or mistyped), and token auth cannot log in again: "
                    "provide a fresh token there, or use appRole, kubernetes or jwt auth"
                )
            return self._lookup(token)
        where = f"provider {self._name}: auth"
        if auth.app_role is not None:
            cfg = auth.app_role
            role_id = cfg.role_id or _read_secret(
                f"{where}.appRole.roleId", env=cfg.role_id_env, file=cfg.role_id_file
            )
            secret_id = _read_secret(
                f"{where}.appRole.secretId", env=cfg.secret_id_env, file=cfg.secret_id_file
            )
            self.secrets.update((role_id, secret_id))
            mount, body = cfg.mount, {"role_id": role_id, "secret_id": secret_id}
        elif auth.kubernetes is not None:
            k8s = auth.kubernetes
            jwt = _read_secret(f"{where}.kubernetes.tokenPath", file=k8s.token_path)
            self.secrets.add(jwt)
            mount, body = k8s.mount, {"role": k8s.role, "jwt": jwt}
        else:
            assert auth.jwt is not None
            cfg_jwt = auth.jwt
            jwt = _read_secret(f"{where}.jwt", env=cfg_jwt.jwt_env, file=cfg_jwt.jwt_file)
            self.secrets.add(jwt)
            mount, body = cfg_jwt.mount, {"role": cfg_jwt.role, "jwt": jwt}
        path = f"auth/{mount}/login"
        lease = self._lease_from_auth(self._http.call("post", path, body=body), path, lifetime=None)
        self._warned_expiry = False
        log.info(
            "provider %s: logged in to Vault with %s at auth/%s (token TTL %s)",
            self._name,
            self.method,
            mount,
            lease.lifetime if lease.expires_at else "unlimited",
        )
        return lease


@dataclass(frozen=True)
class _Issuer:
    id: str
    name: str
    is_default: bool
    chain: tuple[x509.Certificate, ...]
    """The issuer's certificate first, then up to its root if the mount knows it."""

    @cached_property
    def root(self) -> x509.Certificate | None:
        end = self.chain[-1]
        return end if is_self_signed(end) else None


@dataclass(frozen=True)
class _MountSnapshot:
    issuers: tuple[_Issuer, ...]
    taken_at: datetime

    @cached_property
    def roots(self) -> tuple[x509.Certificate, ...]:
        """Each issuer's root, the default issuer's first, without duplicates."""
        ordered = sorted(self.issuers, key=lambda i: not i.is_default)
        return tuple(dict.fromkeys(i.root for i in ordered if i.root is not None))

    def find(self, ref: str | None) -> _Issuer | None:
        if ref is None or ref == "default":
            return next((i for i in self.issuers if i.is_default), None)
        return next((i for i in self.issuers if ref in (i.id, i.name)), None)


VaultFailure = _Failure
"""A Vault call that did not succeed: ``reason``, ``status``, ``errors``, ``path``."""


def connection_error(
    who: str,
    connection: VaultConnection,
    failure: VaultFailure,
    where: str,
    *,
    why_it_matters: str = "",
) -> ProviderError | None:
    """A failure to reach Vault at all (unreachable, no answer in time, TLS)
    as one line, or None when Vault answered. ``why_it_matters`` is added to
    the unreachable case."""
    if failure.reason == "unreachable":
        return ProviderTransientError(
            f"{who}: Vault at {connection.address} is unreachable ({failure.detail}); "
            f"{why_it_matters}check the address and that Vault is running"
        )
    if failure.reason == "timeout":
        return ProviderTransientError(
            f"{who}: Vault at {connection.address} did not answer on {where} within "
            f"{connection.timeout.total_seconds():g}s"
        )
    if failure.reason == "tls":
        return ProviderNeedsFixError(
            f"{who}: TLS verification of {connection.address} failed: set caCert to the CA "
            "bundle that signed Vault's server certificate"
        )
    return None


class VaultSession:
    """Calls to Vault with a token from the configured auth method: the same
    HTTP client, login, renewal and login again on a rejected token as the
    PKI provider, for other parts of the provider package (the self-signed
    provider's transit key). Failures are raised as ``VaultFailure``."""

    def __init__(self, name: str, connection: VaultConnection, clock: Clock) -> None:
        self.name = name
        self.http = _VaultHTTP(connection)
        self.keeper = _TokenKeeper(name, connection.auth, self.http, clock)
        self._auth = connection.auth

    def call(self, method: str, path: str, body: Mapping[str, object] | None = None) -> Answer:
        """The JSON answer of ``method`` on ``/v1/<path>``, logged in; a request
        refused because the token was revoked or expired is repeated once after
        logging in again."""
        token = self.keeper.token()
        try:
            return self.http.call(method, path, token=token, body=body)
        except _Failure as failure:
            if failure.status not in _DENIED_STATUS or not self.keeper.recover(token):
                raise
        return self.http.call(method, path, token=self.keeper.token(), body=body)

    def scrub(self, text: str) -> str:
        """``text`` (Vault's error text) without any secret read for a login, shortened."""
        for secret in tuple(self.keeper.secrets):  # a copy: other threads may add to it
            text = text.replace(secret, "[redacted]")
        text = re.sub(r"^\d+ errors? occurred: \* ", "", text)
        return text if len(text) <= 300 else text[:297] + "..."

    def login_error(self, failure: VaultFailure, where: str) -> ProviderNeedsFixError:
        """A refused login (a failure on an ``auth/`` path) as one line that says
        what to check. Vault's text is left out: it might echo credentials."""
        return _login_error(self.name, self._auth, self.keeper.method, failure, where)

    def close(self) -> None:
        self.http.close()


class VaultProvider:
    """Signs cluster CA CSRs with a Vault or OpenBao PKI mount.

    Credentials are read when first needed, not at construction. ``close()``
    (or a ``with`` block) releases the connections at once; without it they are
    closed when the provider is garbage-collected.
    """

    def __init__(
        self,
        name: str,
        config: VaultConfig,
        clock: Clock,
        *,
        sleep: Callable[[float], None] = time.sleep,
        issuer_roots_only: bool = False,
    ) -> None:
        """``sleep`` waits between retries; tests may pass their own.
        ``issuer_roots_only``: report only the root of the configured issuer,
        not those of every issuer of the mount."""
        self.name = name
        self._config = config
        self._issuer_roots_only = issuer_roots_only
        self._clock = clock
        self._session = VaultSession(name, config, clock)
        self._http = self._session.http
        self._keeper = self._session.keeper
        self._snapshot: _MountSnapshot | None = None
        self._snapshot_lock = threading.Lock()
        self._sleep = sleep
        self._jitter = random.Random()  # noqa: S311  backoff jitter, not a secret
        if config.tls_skip_verify:
            log.warning(
                "provider %s: TLS verification of %s is disabled (tlsSkipVerify); anyone on "
                "the network path can read the Vault token",
                name,
                config.address,
            )

    def __repr__(self) -> str:
        return (
            f"VaultProvider(name={self.name!r}, address={self._config.address!r}, "
            f"mount={self._config.mount!r})"
        )

    def close(self) -> None:
        """Release the HTTP connections now rather than when collected (urllib3
        closes them then). The provider is unusable afterwards."""
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def token_expires_at(self) -> datetime | None:
        """When the Vault token this provider last used expires; None before its
        first login, or for a token that never expires. Read-only; makes no request."""
        return self._keeper.expires_at

    def roots(self) -> tuple[x509.Certificate, ...]:
        """The self-signed ends of the chains of every issuer of the mount, read now
        (of the configured issuer only, when so built)."""
        snapshot = self._read_snapshot()
        if not self._issuer_roots_only:
            return snapshot.roots
        issuer = snapshot.find(self._config.issuer)
        if issuer is None:
            raise self._no_issuer()
        return (issuer.root,) if issuer.root is not None else ()

    def new_root(self, label: str) -> tuple[str, x509.Certificate]:
        """Generate a new root issuer in the mount, beside the others and not the
        default (``<mount>/root/generate/internal``, named ``label``), with the
        key type, subject and lifetime of the configured issuer's root. Returns
        its issuer id and certificate."""
        cfg = self._config
        current = self._read_snapshot().find(cfg.issuer)
        if current is None or current.root is None:
            raise self._no_issuer()
        root = current.root
        names = root.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        base = str(names[0].value) if names else "trustmgr root"
        common_name = f"{base} {label}"
        public = root.public_key()
        key_type, key_bits = (
            ("rsa", public.key_size)
            if isinstance(public, rsa.RSAPublicKey)
            else (
                "ec",
                public.curve.key_size if isinstance(public, ec.EllipticCurvePublicKey) else 256,
            )
        )
        lifetime = root.not_valid_after_utc - root.not_valid_before_utc
        body: dict[str, object] = {
            "common_name": common_name[:64],
            "issuer_name": label,
            "key_type": key_type,
            "key_bits": key_bits,
            "ttl": f"{int(lifetime.total_seconds())}s",
        }
        made = self._request(
            "post",
            f"{cfg.mount}/root/generate/internal",
            capability="update",
            body=body,
            parse=_new_issuer,
        )
        with self._snapshot_lock:
            self._snapshot = None  # the mount has one issuer more
        return made

    def sign_ca(self, csr: x509.CertificateSigningRequest, ttl: timedelta) -> SignedCA:
        """Sign ``csr`` with the configured issuer (the mount's default when none is set).

        ``ttl`` is shortened to the ``ttl`` ceiling of the config and to the
        issuer's notAfter. The chain excludes the root; ``roots`` are the mount's.
        """
        cfg = self._config
        snapshot = self._read_snapshot(SNAPSHOT_MAX_AGE)
        issuer = snapshot.find(cfg.issuer)
        if issuer is None:
            snapshot = self._read_snapshot()
            issuer = snapshot.find(cfg.issuer)
        if issuer is None:
            raise self._no_issuer()
        now = self._clock()
        lifetime = min(ttl, cfg.ttl or ttl, issuer.chain[0].not_valid_after_utc - now)
        if lifetime < timedelta(seconds=1):
            raise ProviderNeedsFixError(
                f"provider {self.name}: issuer {issuer.name or issuer.id} of mount {cfg.mount} "
                f"expired at {issuer.chain[0].not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}; "
                "give the mount a new issuer"
            )
        path = (
            f"{cfg.mount}/issuer/{cfg.issuer}/sign-intermediate"
            if cfg.issuer
            else f"{cfg.mount}/root/sign-intermediate"
        )
        body: dict[str, object] = {
            "csr": csr.public_bytes(serialization.Encoding.PEM).decode(),
            "use_csr_values": True,
            "max_path_length": 0,
            "exclude_cn_from_sans": True,
            "ttl": f"{int(lifetime.total_seconds())}s",
            "not_before_duration": f"{int(BACKDATE.total_seconds())}s",
            "format": "pem",
        }
        names = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        if names:
            # Vault's clients (Terraform, vaultrs) treat common_name as required here; with
            # use_csr_values the CSR's subject wins, so passing its own CN changes nothing.
            body["common_name"] = str(names[0].value)
        chain = self._request("post", path, capability="update", body=body, parse=_signed_chain)
        roots = snapshot.roots
        if not any(issued_by(chain[-1], r) for r in roots):
            roots = self._read_snapshot().roots
        if not any(issued_by(chain[-1], r) for r in roots):
            raise ProviderNeedsFixError(
                f"provider {self.name}: the chain of the issuer that signed on {path} does not "
                f"reach a self-signed root known to mount {cfg.mount}: import the root "
                "certificate into the mount (set-signed with the full chain, or issuers/import/cert)"
            )
        return SignedCA(chain=chain, roots=roots)

    def _read_snapshot(self, max_age: timedelta | None = None) -> _MountSnapshot:
        """The mount's issuers, read now, or kept from a read younger than ``max_age``."""
        mount = self._config.mount
        with self._snapshot_lock:
            kept = self._snapshot
            if max_age is not None and kept and self._clock() - kept.taken_at <= max_age:
                return kept
            listed = self._request(
                "list", f"{mount}/issuers", capability="list", parse=_issuer_list
            )
            issuers = []
            for issuer_id, name, is_default in listed:
                chain = self._request(
                    "get",
                    f"{mount}/issuer/{issuer_id}/json",
                    capability="read",
                    parse=_issuer_chain,
                )
                issuer = _Issuer(issuer_id, name, is_default, chain)
                if issuer.root is None:
                    log.warning(
                        "provider %s: the chain of issuer %s of mount %s does not reach a "
                        "self-signed root; import the root into the mount",
                        self.name,
                        name or issuer_id,
                        mount,
                    )
                issuers.append(issuer)
            self._snapshot = _MountSnapshot(tuple(issuers), self._clock())
            return self._snapshot

    def _no_issuer(self) -> ProviderNeedsFixError:
        cfg = self._config
        if cfg.issuer:
            return ProviderNeedsFixError(
                f'provider {self.name}: mount {cfg.mount} has no issuer "{cfg.issuer}" '
                f"(checked {cfg.mount}/issuers): set issuer to an issuer's name or id, or remove it "
                "to sign with the default issuer"
            )
        return ProviderNeedsFixError(
            f"provider {self.name}: mount {cfg.mount} has no default issuer (checked "
            f"{cfg.mount}/issuers): generate or import a CA there, or check that mount names a "
            "PKI secrets engine"
        )

    def _request(
        self,
        method: str,
        path: str,
        *,
        capability: str,
        parse: Callable[[Answer, str], T],
        body: Mapping[str, object] | None = None,
    ) -> T:
        """``parse`` of the answer, with authentication, bounded retries of
        transient failures, and every failure translated by ``_translate``."""
        attempt = 0
        while True:
            try:
                return parse(self._authorized(method, path, body), path)
            except _Failure as failure:
                if failure.retryable and attempt < self._config.max_retries:
                    delay = self._backoff(attempt)
                    attempt += 1
                    log.info(
                        "provider %s: Vault answered HTTP %s on %s; retry %d of %d in %.2fs",
                        self.name,
                        failure.status,
                        failure.path,
                        attempt,
                        self._config.max_retries,
                        delay,
                    )
                    self._sleep(delay)
                    continue
                raise self._translate(failure, capability) from None

    def _authorized(self, method: str, path: str, body: Mapping[str, object] | None) -> Answer:
        return self._session.call(method, path, body)

    def _backoff(self, attempt: int) -> float:
        ceiling = min(BACKOFF_CAP, BACKOFF_BASE * 2.0**attempt)
        return ceiling / 2 + self._jitter.uniform(0, ceiling / 2)

    def _scrub(self, text: str) -> str:
        return self._session.scrub(text)

    def _translate(self, failure: _Failure, capability: str) -> ProviderError:
        """The one place a failed Vault call becomes a provider error."""
        cfg = self._config
        who = f"provider {self.name}"
        where = failure.path + (f" (namespace {cfg.namespace})" if cfg.namespace else "")
        status = failure.status
        reached = connection_error(who, cfg, failure, where)
        if reached is not None:
            return reached
        if failure.reason == "answer":
            hint = "" if failure.path.startswith("auth/") else f"; is {cfg.mount} a PKI mount?"
            return ProviderNeedsFixError(
                f"{who}: unexpected answer from Vault on {where} ({failure.detail}){hint}"
            )
        said = f"; Vault said: {self._scrub(failure.text)}" if failure.text else ""
        if status == 503:
            if "sealed" in failure.text.lower():
                return ProviderTransientError(
                    f"{who}: Vault at {cfg.address} is sealed; signing resumes once it is unsealed"
                )
            return ProviderTransientError(
                f"{who}: Vault at {cfg.address} is unavailable (HTTP 503)"
            )
        if status == 429:
            return ProviderTransientError(
                f"{who}: Vault rate-limited the request to {where} (HTTP 429); try again later "
                "or raise the rate-limit quota"
            )
        if status == 501:
            return ProviderNeedsFixError(f"{who}: Vault at {cfg.address} is not initialized")
        if failure.path.startswith("auth/"):
            if status is not None and status >= 500 and not failure.missing_issuer:
                return ProviderTransientError(f"{who}: Vault failed on {where} (HTTP {status})")
            return self._session.login_error(failure, where)
        if failure.missing_issuer:
            return self._no_issuer()
        if status is not None and (status >= 500 or status == 412):
            return ProviderTransientError(f"{who}: Vault failed on {where} (HTTP {status}){said}")
        if status in _DENIED_STATUS and failure.path == f"{cfg.mount}/issuers":
            return ProviderNeedsFixError(
                f"{who}: nothing is mounted at {cfg.mount}/ (Vault refused to list {where}, "
                "which every PKI mount lists for anyone): check mount; it must be the path of a "
                "PKI secrets engine"
            )
        if status in _DENIED_STATUS:
            return ProviderNeedsFixError(
                f"{who}: permission denied on {where}: the token's policy needs "
                f'"{capability}" on that path'
            )
        if status == 404 and "no handler for route" in failure.text:
            return ProviderNeedsFixError(
                f"{who}: nothing is mounted at {cfg.mount}/ (request to {where}): check mount; "
                "it must be the path of a PKI secrets engine"
            )
        if status == 404:
            return ProviderNeedsFixError(f"{who}: {where} was not found{said}")
        if status == 400:
            return ProviderNeedsFixError(f"{who}: Vault refused the request to {where}{said}")
        return ProviderNeedsFixError(f"{who}: unexpected HTTP {status} from {where}{said}")


def _login_error(
    name: str, auth: VaultAuth, method: str, failure: _Failure, where: str
) -> ProviderNeedsFixError:
    """Login refusals. Vault's text is left out: it might echo credentials."""
    who = f"provider {name}"
    if failure.path.startswith("auth/token/"):
        source = auth.token.source if auth.token is not None else "the last login"
        return ProviderNeedsFixError(
            f"{who}: Vault rejected the token from {source} on {where} (HTTP "
            f"{failure.status}): it is expired, revoked or mistyped; provide a valid token"
        )
    mount = failure.path.removeprefix("auth/").removesuffix("/login")
    if failure.status == 404 or "no handler for route" in failure.text:
        return ProviderNeedsFixError(
            f"{who}: no auth method is enabled at auth/{mount}: check the mount of the "
            f"{method} auth settings"
        )
    if auth.app_role is not None:
        hint = "the role id and secret id are current (a secret id may expire or run out of uses)"
    elif auth.kubernetes is not None:
        hint = (
            f"role {auth.kubernetes.role} exists and binds this service account, and "
            f"{auth.kubernetes.token_path} holds a current token"
        )
    elif auth.jwt is not None:
        hint = (
            f"role {auth.jwt.role} exists and the JWT is unexpired and matches the role's "
            "bound audience and claims"
        )
    else:
        hint = "the credentials are current"
    if failure.status in _DENIED_STATUS:
        # Vault answers 403, not 404, for a login path where nothing is mounted.
        hint = f"{method} auth is enabled at auth/{mount} and {hint}"
    return ProviderNeedsFixError(
        f"{who}: {method} login on {where} was refused (HTTP {failure.status}): check that {hint}"
    )
