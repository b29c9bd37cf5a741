"""The ``vault`` state store: Vault or OpenBao KV version 2.

Under ``<mount>`` (default ``secret``) and ``<path>`` (default ``trustmgr/state``):

- ``<path>``: the state's JSON as the secret's data, written with ``cas`` set
  to the version read, so a writer that read before another wrote is refused
  by Vault, and the save with StateError ("changed during this run; run again");
- ``<path>/blobs/<name>``: one secret per blob, ``{"blob": <base64>}``, also
  written with ``cas``; a removed blob's versions are all destroyed (its
  metadata deleted);
- ``<path>/lock``: the run lock, ``{"holder", "expires", "renewed"}``, taken
  with ``cas`` when absent, released or expired, renewed in the background
  while held, released by clearing the holder.

Logging in, renewing and logging in again are the Vault provider's
(:class:`trustmgr.providers.vault.VaultSession`), with the same auth methods.
Messages never carry a token or anything read from the store."""

from __future__ import annotations

import base64
import binascii
import logging
import random
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, suppress
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from trustmgr.config import VaultStateStoreConfig
from trustmgr.errors import LockedError, StateError
from trustmgr.providers.base import ProviderError, ProviderTransientError
from trustmgr.providers.config import VaultConfig
from trustmgr.providers.vault import Answer, VaultFailure, VaultSession
from trustmgr.state.lease import Holding, LockLostError, RunLock
from trustmgr.state.model import State
from trustmgr.state.store import (
    LOCK_DURATION,
    SAVE_ATTEMPTS,
    StoreUnavailableError,
    check_blob_name,
)

log = logging.getLogger(__name__)

NAME: Final = "stateStore.vault"
"""How the token keeper names this store in its messages and logs."""
RETRIES: Final = 2
"""Retries of a request Vault answered with 412, 429, 500, 502 or 504."""
_CAS_MISMATCH = "check-and-set parameter did not match"


def _now() -> datetime:
    return datetime.now(UTC)


class _CasMismatch(Exception):
    """Vault refused a write: the secret's version is not the one given."""


@dataclass(frozen=True)
class _Secret:
    data: dict[str, Any] = field(repr=False)
    version: int


class VaultStateStore:
    """The state, the blobs and the run lock in a KV version 2 mount."""

    def __init__(
        self,
        config: VaultStateStoreConfig,
        *,
        lock_duration: timedelta = LOCK_DURATION,
        clock: Callable[[], datetime] = _now,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.config = config
        self.mount, self.path = config.mount, config.path
        connection = VaultConfig(
            address=config.address,
            namespace=config.namespace,
            ca_cert=config.ca_cert,
            mount=config.mount,
            auth=config.auth,
        )
        self._session = VaultSession(NAME, connection, clock)
        self._sleep = sleep
        self._jitter = random.Random()  # noqa: S311 -- backoff jitter, not a secret
        self._checked_mount = False
        self._lock = RunLock(_LockRecord(self, lock_duration), lock_duration, clock)

    @property
    def description(self) -> str:
        where = f" (namespace {self.config.namespace})" if self.config.namespace else ""
        return f"Vault KV {self.mount}/{self.path} at {self.config.address}{where}"

    def close(self) -> None:
        self._session.close()

    def lock(self) -> AbstractContextManager[None]:
        """Hold the record ``<path>/lock`` for the run; held elsewhere, LockedError at once."""
        return self._lock.hold()

    def blobs(self) -> _VaultBlobs:
        return _VaultBlobs(self)

    def load(self) -> State:
        secret = self.read(self.path)
        if secret is None:
            return State()
        return State.from_json(secret.data, f"{self.mount}/{self.path}")

    def save(self, state: State) -> State:
        """Compare-and-set on the state's version, written with Vault's ``cas``."""
        saved = replace(state, version=state.version + 1)
        sent = saved.to_json()
        for _ in range(SAVE_ATTEMPTS):
            secret = self.read(self.path)
            if secret is not None and secret.data == sent:
                return saved  # an earlier try landed without its answer
            current = (
                State.from_json(secret.data, f"{self.mount}/{self.path}").version if secret else 0
            )
            if current != state.version:
                raise StateError(
                    f"the state in {self.mount}/{self.path} changed during this run (version "
                    f"{state.version} → {current}); run again"
                )
            self._lock.check()
            try:
                self.write(self.path, sent, cas=secret.version if secret else 0)
            except _CasMismatch:
                continue
            return saved
        raise StateError(
            f"{self.mount}/{self.path} kept changing while this run saved it "
            f"({SAVE_ATTEMPTS} conflicts); run again"
        )

    def check_writable(self) -> None:
        """The token's capabilities on the state's paths, as Vault reports them."""
        paths = [f"{self.mount}/data/{self.path}", f"{self.mount}/data/{self.path}/blobs/x"]
        answer = self.call("post", "sys/capabilities-self", body={"paths": paths})
        data = answer.get("data") if isinstance(answer.get("data"), dict) else answer
        assert isinstance(data, dict)
        for path in paths:
            granted = data.get(path)
            granted = set(granted) if isinstance(granted, list) else set()
            if "root" not in granted and not {"create", "update"} <= granted:
                raise StateError(
                    f"state store: the Vault token may not write {path}: its policy needs "
                    f'"create", "update", "read", "delete" and "list" on {self.mount}/data/'
                    f"{self.path} and {self.mount}/data/{self.path}/*, and on the same under "
                    f"{self.mount}/metadata/ (docs/state.md)"
                )

    # --- KV version 2 ---------------------------------------------------------------------

    def read(self, path: str) -> _Secret | None:
        try:
            answer = self.call("get", f"{self.mount}/data/{path}")
        except _Missing:
            return None
        body = answer.get("data")
        data = body.get("data") if isinstance(body, dict) else None
        metadata = body.get("metadata") if isinstance(body, dict) else None
        version = metadata.get("version") if isinstance(metadata, dict) else None
        if not isinstance(data, dict) or not isinstance(version, int):
            raise StateError(
                f"state store: {self.mount}/{path} is not a KV version 2 secret; check "
                "stateStore.vault.mount"
            )
        return _Secret(data, version)

    def write(self, path: str, data: dict[str, Any], *, cas: int | None) -> int:
        """Write ``data`` at ``path``; with ``cas``, only over that version (0: only
        if absent). Returns the new version."""
        body: dict[str, object] = {"data": data}
        if cas is not None:
            body["options"] = {"cas": cas}
        answer = self.call("post", f"{self.mount}/data/{path}", body=body)
        meta = answer.get("data")
        version = meta.get("version") if isinstance(meta, dict) else None
        return version if isinstance(version, int) else 0

    def destroy(self, path: str) -> None:
        """Remove ``path`` and all its versions."""
        with suppress(_Missing):
            self.call("delete", f"{self.mount}/metadata/{path}")

    def listing(self, path: str) -> list[str]:
        """Every secret's path below ``path``, relative to it."""
        found: list[str] = []
        answer = self.call("list", f"{self.mount}/metadata/{path}/")
        data = answer.get("data")
        keys = data.get("keys") if isinstance(data, dict) else None
        for key in keys if isinstance(keys, list) else []:
            key = str(key)
            if key.endswith("/"):
                found += [key + sub for sub in self.listing(f"{path}/{key.rstrip('/')}")]
            else:
                found.append(key)
        return sorted(found)

    def call(self, method: str, path: str, *, body: dict[str, object] | None = None) -> Answer:
        """One request with the current token: logged in again when Vault no longer
        takes it, retried on throttling and server errors, failures translated."""
        self._check_mount()
        return self._call(method, path, body)

    def _call(self, method: str, path: str, body: dict[str, object] | None) -> Answer:
        attempt = 0
        while True:
            try:
                return self._session.call(method, path, body)
            except VaultFailure as failure:
                if failure.reason == "answer" and failure.detail.startswith("HTTP 2"):
                    return {}  # a success without a body (204)
                if failure.retryable and attempt < RETRIES:
                    self._sleep(min(2.0, 0.25 * 2**attempt) * (0.5 + self._jitter.random() / 2))
                    attempt += 1
                    continue
                raise self._translate(failure, method) from None
            except ProviderError as exc:
                kind = (
                    StoreUnavailableError if isinstance(exc, ProviderTransientError) else StateError
                )
                raise kind(str(exc).removeprefix("provider ")) from None

    def _check_mount(self) -> None:
        """Once: the mount is KV version 2, whose paths this store writes. A KV
        version 1 mount would take them as plain names and keep no versions."""
        if self._checked_mount:
            return
        try:
            answer = self._call("get", f"sys/internal/ui/mounts/{self.mount}", None)
        except (StateError, _Missing):
            self._checked_mount = True  # not allowed to look: the data paths will tell
            return
        data = answer.get("data")
        kind = data.get("type") if isinstance(data, dict) else None
        options = data.get("options") if isinstance(data, dict) else None
        version = options.get("version") if isinstance(options, dict) else None
        if kind not in ("kv", "generic") or str(version) != "2":
            raise StateError(
                f"state store: {self.mount} at {self.config.address} is not a KV version 2 "
                f"secrets engine: enable one (bao secrets enable -path={self.mount} kv-v2) or "
                "set stateStore.vault.mount"
            )
        self._checked_mount = True

    def _translate(self, failure: VaultFailure, method: str) -> Exception:
        """The one place a failed call becomes a store error (or a miss, or a CAS refusal)."""
        address = self.config.address
        text = self._session.scrub(" ".join(failure.text.split()))
        if failure.reason == "unreachable":
            return StoreUnavailableError(
                f"state store: Vault at {address} is unreachable ({failure.detail}); check "
                "stateStore.vault.address and that Vault is running"
            )
        if failure.reason == "timeout":
            return StoreUnavailableError(
                f"state store: Vault at {address} did not answer on {failure.path} in time"
            )
        if failure.reason == "tls":
            return StateError(
                f"state store: TLS verification of {address} failed: set stateStore.vault.caCert "
                "to the CA bundle that signed Vault's server certificate"
            )
        if failure.reason == "answer":
            return StateError(
                f"state store: unexpected answer from Vault on {failure.path} ({failure.detail})"
            )
        status = failure.status
        if status == 503:
            why = "sealed" if "sealed" in text.lower() else "unavailable (HTTP 503)"
            return StoreUnavailableError(f"state store: Vault at {address} is {why}")
        if status == 429 or (status is not None and status >= 500):
            return StoreUnavailableError(
                f"state store: Vault failed on {failure.path} (HTTP {status})"
            )
        token = self.config.auth.token
        if failure.path.startswith("auth/token/") and token is not None:
            return StateError(
                f"state store: Vault rejected the token from {token.source} (HTTP {status}): it "
                "is expired, revoked or mistyped; provide a valid token"
            )
        if failure.path.startswith("auth/"):
            return StateError(
                f"state store: {self._session.keeper.method} login on {failure.path} was refused (HTTP "
                f"{status}): check stateStore.vault.auth and that its credentials are current"
            )
        if status == 400 and _CAS_MISMATCH in text:
            return _CasMismatch()
        if status == 404 and "no handler for route" in text:
            return StateError(
                f"state store: nothing is mounted at {self.mount}/ in Vault at {address}: "
                "enable a KV version 2 secrets engine there, or set stateStore.vault.mount"
            )
        if status == 404:
            return _Missing()
        if status in (401, 403):
            capability = {"get": "read", "list": "list", "delete": "delete"}.get(method, "update")
            return StateError(
                f"state store: permission denied on {failure.path}: the token's policy needs "
                f'"{capability}" there (docs/state.md)'
            )
        said = f"; Vault said: {text[:200]}" if text else ""
        return StateError(f"state store: Vault refused {failure.path} (HTTP {status}){said}")


class _Missing(Exception):
    """Nothing at the path (HTTP 404)."""


class _VaultBlobs:
    """One KV secret per blob, written whole; everything in Vault counts as secret."""

    def __init__(self, store: VaultStateStore) -> None:
        self._store = store
        self._base = f"{store.path}/blobs"

    def load(self, name: str) -> bytes | None:
        secret = self._store.read(f"{self._base}/{check_blob_name(name)}")
        if secret is None:
            return None
        try:
            return base64.b64decode(str(secret.data.get("blob", "")), validate=True)
        except (binascii.Error, ValueError):
            raise StateError(
                f"{self._store.mount}/{self._base}/{name} is not a blob written by trustmgr; "
                "restore it from a backup"
            ) from None

    def save(self, name: str, data: bytes, *, secret: bool) -> None:
        """One write, with ``cas`` set to the version read, as every write of this
        store is (a mount may require it)."""
        path = f"{self._base}/{check_blob_name(name)}"
        body = {"blob": base64.b64encode(data).decode()}
        for _ in range(SAVE_ATTEMPTS):
            current = self._store.read(path)
            if current is not None and current.data == body:
                return
            self._store._lock.check()
            try:
                self._store.write(path, body, cas=current.version if current else 0)
            except _CasMismatch:
                continue
            return
        raise StateError(
            f"{self._store.mount}/{path} kept changing while this run wrote it "
            f"({SAVE_ATTEMPTS} conflicts); run again"
        )

    def delete(self, name: str) -> None:
        self._store._lock.check()
        self._store.destroy(f"{self._base}/{check_blob_name(name)}")

    def names(self) -> list[str]:
        return self._store.listing(self._base)


class _LockRecord:
    """``<path>/lock`` as the store's lock record."""

    def __init__(self, store: VaultStateStore, duration: timedelta) -> None:
        self._store = store
        self._duration = duration
        self._path = f"{store.path}/lock"

    @property
    def what(self) -> str:
        return f"{self._store.mount}/{self._path}"

    def _record(self, holder: str, now: datetime) -> dict[str, Any]:
        return {
            "holder": holder,
            "renewed": now.isoformat(),
            "expires": (now + self._duration).isoformat() if holder else "",
        }

    def take(self, identity: str, now: datetime) -> Holding:
        current = self._store.read(self._path)
        holder = str(current.data.get("holder") or "") if current else ""
        if current is not None and holder:
            try:
                expires = datetime.fromisoformat(str(current.data.get("expires")))
            except ValueError:
                expires = None  # unreadable: counts as expired
            if expires is not None and expires > now:
                raise LockedError(
                    f"another trustmgr run ({holder}) holds the state lock ({self.what}) until "
                    f"{expires:%Y-%m-%dT%H:%M:%SZ} unless it renews it; wait for it to finish "
                    "(a run that died lets it expire then)"
                )
            log.warning("taking over the state lock (%s) from %s: it expired", self.what, holder)
        try:
            version = self._store.write(
                self._path, self._record(identity, now), cas=current.version if current else 0
            )
        except _CasMismatch:
            raise LockedError(
                f"another trustmgr run took the state lock ({self.what}) just now; wait for it "
                "to finish"
            ) from None
        return Holding(identity, now + self._duration, version)

    def renew(self, holding: Holding, now: datetime) -> Holding:
        version = self._rewrite(holding, self._record(holding.identity, now))
        return Holding(holding.identity, now + self._duration, version)

    def release(self, holding: Holding, now: datetime) -> None:
        with suppress(LockLostError):  # taken over after it expired: not ours to clear
            self._rewrite(holding, self._record("", now))

    def _rewrite(self, holding: Holding, record: dict[str, Any]) -> int:
        """Write ``record`` over our own; LockLostError when the record has another
        holder. A version we do not know may still be ours: a write that landed
        without its answer."""
        assert isinstance(holding.version, int)
        version = holding.version
        for _ in range(2):
            try:
                return self._store.write(self._path, record, cas=version)
            except _CasMismatch:
                current = self._store.read(self._path)
                holder = str(current.data.get("holder") or "") if current else ""
                if current is None or holder != holding.identity:
                    raise LockLostError(f"{holder or 'nobody'} holds it now") from None
                version = current.version
        raise StoreUnavailableError(f"state store: {self.what} kept changing while it was written")
