"""The ``kubernetes`` state store: one Secret, and a Lease as the run lock.

The Secret ``<namespace>/<name>`` holds the state under ``state.json`` and each
blob under ``blob.<name>``, the name escaped into the characters a data key may
hold (``corp/root.pem`` is ``blob.corp_2Froot.pem``). Every change is one
replace carrying the resourceVersion it read, so a save or a blob write lands
whole or not at all, and a writer that read before another wrote gets a
conflict: the Secret is read again and, for the state, the save refused if its
version moved ("changed during this run; run again").

The run lock is the Lease ``<name>-lock`` (coordination.k8s.io/v1):
``holderIdentity``, ``leaseDurationSeconds`` and ``renewTime``, taken by a
create, or by a replace carrying the resourceVersion once the holder's
``renewTime`` plus duration has passed; renewed in the background while held,
and released by clearing the holder. Expiry is judged with this machine's
clock, so the machines sharing a store need clocks that roughly agree.

The API is reached as a Kubernetes target's (:mod:`trustmgr.targets.kubeapi`):
kubeconfig context or in-cluster service account, the same retries and
one-line errors, none of which carries the Secret's content."""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
import string
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, suppress
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Final
from urllib.parse import quote

from trustmgr.config import KubernetesStateStoreConfig, KubernetesTargetConfig
from trustmgr.errors import LockedError, StateError, TargetConflictError, TargetError
from trustmgr.errors import TransientTargetError as _Transient
from trustmgr.state.lease import Holding, LockLostError, RunLock
from trustmgr.state.model import State
from trustmgr.state.store import (
    LOCK_DURATION,
    SAVE_ATTEMPTS,
    StoreUnavailableError,
    check_blob_name,
)
from trustmgr.targets.kubeapi import KubeApi, NotFoundError, Request

log = logging.getLogger(__name__)

STATE_KEY: Final = "state.json"
BLOB_PREFIX: Final = "blob."
MAX_SECRET_BYTES: Final = 1024 * 1024
"""The API server refuses a Secret whose data is larger."""
MANAGED_BY: Final = {"app.kubernetes.io/managed-by": "trustmgr"}

_SECRETS = "/api/v1/namespaces/{namespace}/secrets"
_LEASES = "/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases"
_KEPT = frozenset(string.ascii_letters + string.digits + "-.")
_ESCAPED = re.compile(r"_([0-9A-F]{2})")

Data = dict[str, str]
"""A Secret's data: key → base64 text."""


def _now() -> datetime:
    return datetime.now(UTC)


def blob_key(name: str) -> str:
    """The Secret data key holding blob ``name``: ``_`` and ``/`` (the characters a
    blob name may hold that a key may not, or that escaping uses) as ``_XX``."""
    check_blob_name(name)
    return BLOB_PREFIX + "".join(c if c in _KEPT else f"_{ord(c):02X}" for c in name)


def blob_name(key: str) -> str:
    """The blob name data key ``key`` holds (``key`` starts with ``blob.``)."""
    return _ESCAPED.sub(lambda m: chr(int(m.group(1), 16)), key.removeprefix(BLOB_PREFIX))


def micro_time(moment: datetime) -> str:
    """A Kubernetes MicroTime: ``2006-01-02T15:04:05.000000Z``."""
    return f"{moment.astimezone(UTC):%Y-%m-%dT%H:%M:%S.%fZ}"


def _parse_time(value: object) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def lease_expiry(spec: Mapping[str, Any]) -> datetime | None:
    """When a Lease's hold ends: its last renewal (or acquisition) plus its
    duration; None when it does not say, which counts as expired."""
    renewed = _parse_time(spec.get("renewTime")) or _parse_time(spec.get("acquireTime"))
    duration = spec.get("leaseDurationSeconds")
    if renewed is None or not isinstance(duration, int) or isinstance(duration, bool):
        return None
    return renewed + timedelta(seconds=duration)


# --- Leases, shared by the run lock and the daemon's leader election ------------------------


@dataclass(frozen=True)
class LeaseView:
    """What a Lease says: who holds it, until when, how often it changed hands,
    and the resourceVersion a compare-and-set of it must carry."""

    holder: str
    expires: datetime | None
    transitions: int
    version: str | None
    spec: Mapping[str, Any]

    @classmethod
    def of(cls, lease: Mapping[str, Any]) -> LeaseView:
        spec = dict(lease.get("spec") or {})
        transitions = spec.get("leaseTransitions")
        version = (lease.get("metadata") or {}).get("resourceVersion")
        return cls(
            holder=str(spec.get("holderIdentity") or ""),
            expires=lease_expiry(spec),
            transitions=transitions
            if isinstance(transitions, int) and not isinstance(transitions, bool)
            else 0,
            version=str(version) if version is not None else None,
            spec=spec,
        )

    def free(self, now: datetime) -> bool:
        """Nobody holds it: no holder, or the holder's last renewal plus the
        duration has passed on this machine's clock."""
        return not self.holder or self.expires is None or self.expires <= now


def holding_spec(
    current: LeaseView | None, identity: str, seconds: int, now: datetime, *, take: bool
) -> dict[str, Any]:
    """The spec naming ``identity`` holder from ``now`` for ``seconds``: a take
    sets acquireTime and counts a transition when the holder changes; a renewal
    moves renewTime only."""
    spec = dict(current.spec) if current is not None else {}
    spec.update(holderIdentity=identity, leaseDurationSeconds=seconds, renewTime=micro_time(now))
    if take or "acquireTime" not in spec:
        spec["acquireTime"] = micro_time(now)
    if current is None:
        spec["leaseTransitions"] = 0
    elif take:
        spec["leaseTransitions"] = current.transitions + (current.holder != identity)
    return spec


def released_spec(current: LeaseView, now: datetime) -> dict[str, Any]:
    """The spec of a Lease given back: no holder, so that anyone takes it at once."""
    return {**current.spec, "holderIdentity": "", "renewTime": micro_time(now)}


Send = Callable[[Request, str, str, Any], dict[str, Any]]
"""One API request (request, method, path, body) → the answer; raises
NotFoundError and TargetConflictError, other failures as the caller words them."""


class LeaseClient:
    """Get, create and compare-and-set replace of the Lease ``<namespace>/<name>``."""

    def __init__(self, namespace: str, name: str, send: Send) -> None:
        self.namespace, self.name = namespace, name
        self._send = send
        self._collection = _LEASES.format(namespace=quote(namespace, safe=""))

    @property
    def what(self) -> str:
        return f"lease {self.namespace}/{self.name}"

    def _request(self, verb: str) -> Request:
        return Request(verb, "leases", self.name, self.namespace)

    def get(self) -> dict[str, Any] | None:
        path = f"{self._collection}/{quote(self.name, safe='')}"
        try:
            return self._send(self._request("get"), "GET", path, None)
        except NotFoundError:
            return None

    def create(self, spec: Mapping[str, Any]) -> dict[str, Any]:
        """TargetConflictError when it exists already."""
        body = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {
                "name": self.name,
                "namespace": self.namespace,
                "labels": dict(MANAGED_BY),
            },
            "spec": dict(spec),
        }
        return self._send(self._request("create"), "POST", self._collection, body)

    def replace(self, read: Mapping[str, Any], spec: Mapping[str, Any]) -> dict[str, Any]:
        """``read`` (as it was read, resourceVersion included) with ``spec``:
        TargetConflictError when it changed since, NotFoundError when it is gone."""
        body = {**read, "spec": dict(spec)}
        path = f"{self._collection}/{quote(self.name, safe='')}"
        return self._send(self._request("update"), "PUT", path, body)


def _api_config(config: KubernetesStateStoreConfig) -> KubernetesTargetConfig:
    return KubernetesTargetConfig(
        kubeconfig=config.kubeconfig,
        context=config.context,
        in_cluster=config.in_cluster,
        namespace=config.namespace,
        request_timeout=config.request_timeout,
        attempts=config.attempts,
    )


@dataclass(frozen=True)
class _Stored:
    """The Secret as read."""

    data: Data = field(repr=False)
    metadata: dict[str, Any]
    type: str

    @classmethod
    def of(cls, secret: dict[str, Any]) -> _Stored:
        data = secret.get("data") or {}
        return cls(
            data={str(k): str(v) for k, v in data.items()},
            metadata=dict(secret.get("metadata") or {}),
            type=str(secret.get("type") or "Opaque"),
        )

    def value(self, key: str, where: str) -> bytes | None:
        text = self.data.get(key)
        if text is None:
            return None
        try:
            return base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise StateError(
                f"{where} key {key} is not valid base64; restore the Secret from a backup"
            ) from None


class KubernetesStateStore:
    """The state, the blobs and the run lock in trustmgr's namespace of a cluster."""

    def __init__(
        self,
        config: KubernetesStateStoreConfig,
        *,
        lock_duration: timedelta = LOCK_DURATION,
        clock: Callable[[], datetime] = _now,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.config = config
        self.namespace, self.name = config.namespace, config.name
        api_config = _api_config(config)
        self._api = KubeApi(api_config, sleep=sleep)
        # The lock's requests, renewals included, go through their own client: the
        # renewal thread and a save never share a connection pool being built.
        self._lease_api = KubeApi(api_config, sleep=sleep)
        record = _LeaseRecord(self, self._lease_api, lock_duration)
        self._lock = RunLock(record, lock_duration, clock)

    @property
    def description(self) -> str:
        return f"secret {self.namespace}/{self.name} ({self._api.where})"

    @property
    def _where(self) -> str:
        return f"secret {self.namespace}/{self.name}"

    def close(self) -> None:
        self._api.close()
        self._lease_api.close()

    def lock(self) -> AbstractContextManager[None]:
        """Hold the Lease ``<name>-lock`` for the run; held elsewhere, LockedError at once."""
        return self._lock.hold()

    def blobs(self) -> _SecretBlobs:
        return _SecretBlobs(self)

    def load(self) -> State:
        return self._state_of(self._read())

    def save(self, state: State) -> State:
        """Compare-and-set on the state's version, written with the resourceVersion read."""
        saved = replace(state, version=state.version + 1)
        encoded = base64.b64encode(
            json.dumps(saved.to_json(), sort_keys=True, separators=(",", ":")).encode()
        ).decode()

        def edit(stored: _Stored | None) -> Data | None:
            data = stored.data if stored else {}
            if data.get(STATE_KEY) == encoded:
                return None  # an earlier try landed without its answer
            current = self._state_of(stored).version
            if current != state.version:
                raise StateError(
                    f"the state in {self._where} changed during this run (version "
                    f"{state.version} → {current}); run again"
                )
            return {**data, STATE_KEY: encoded}

        self._modify(edit)
        return saved

    def check_writable(self) -> None:
        """A dry run of the write a save makes: the namespace, the permissions
        and the size are checked by the API server; nothing is stored."""
        stored = self._read()
        # A conflict means it changed since it was read: the save itself reads it again.
        with suppress(TargetConflictError, NotFoundError):
            self._write(stored, stored.data if stored else {}, dry_run=True)

    # --- the Secret ---------------------------------------------------------------------------

    def _path(self, collection: str, name: str | None = None) -> str:
        path = collection.format(namespace=quote(self.namespace, safe=""))
        return f"{path}/{quote(name, safe='')}" if name is not None else path

    def send(
        self, api: KubeApi, request: Request, method: str, path: str, body: Any = None
    ) -> dict[str, Any]:
        """One request; NotFoundError and TargetConflictError are the caller's to
        handle, every other failure is a store error."""
        try:
            return api.send(request, method, path, body)
        except (NotFoundError, TargetConflictError):
            raise
        except _Transient as exc:
            raise StoreUnavailableError(f"state store: {exc}") from None
        except TargetError as exc:
            # The target's wording for a missing namespace sends the reader to install Istio.
            if str(exc).startswith(f"namespace {self.namespace} does not exist"):
                raise StateError(
                    f"state store: namespace {self.namespace} does not exist ({api.where}): "
                    f"create it (kubectl create namespace {self.namespace}), or set "
                    "stateStore.kubernetes.namespace"
                ) from None
            # The permissions a store needs are in docs/state.md, not with the targets'.
            message = str(exc).replace("(docs/kubernetes.md)", "(docs/state.md)")
            raise StateError(f"state store: {message}") from None

    def _read(self) -> _Stored | None:
        request = Request("get", "secrets", self.name, self.namespace)
        try:
            return _Stored.of(self.send(self._api, request, "GET", self._path(_SECRETS, self.name)))
        except NotFoundError:
            return None

    def _state_of(self, stored: _Stored | None) -> State:
        where = f"{self._where} key {STATE_KEY}"
        raw = stored.value(STATE_KEY, self._where) if stored else None
        if raw is None:
            return State()
        try:
            data = json.loads(raw)
        except ValueError:
            raise StateError(
                f"{where} is not valid JSON; restore it from a backup or remove the key to "
                "start over"
            ) from None
        return State.from_json(data, where)

    def _write(self, stored: _Stored | None, data: Data, *, dry_run: bool = False) -> None:
        """Create the Secret, or replace ``stored`` carrying its resourceVersion."""
        size = sum(len(base64.b64decode(v)) for v in data.values())
        if size > MAX_SECRET_BYTES:
            raise StateError(
                f"{self._where} would hold {size} bytes, more than the 1 MiB the API server "
                "accepts in a Secret; keep this state in the vault store instead"
            )
        metadata: dict[str, Any] = {"name": self.name, "namespace": self.namespace}
        if stored is None:
            metadata["labels"] = dict(MANAGED_BY)
        else:
            for key in ("labels", "annotations", "resourceVersion", "uid"):
                if key in stored.metadata:
                    metadata[key] = stored.metadata[key]
        body = {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": metadata,
            "type": stored.type if stored else "Opaque",
            "data": data,
        }
        query = "?dryRun=All" if dry_run else ""
        if stored is None:
            request = Request("create", "secrets", self.name, self.namespace)
            self.send(self._api, request, "POST", self._path(_SECRETS) + query, body)
        else:
            request = Request("update", "secrets", self.name, self.namespace)
            self.send(self._api, request, "PUT", self._path(_SECRETS, self.name) + query, body)

    def _modify(self, edit: Callable[[_Stored | None], Data | None]) -> None:
        """Read the Secret, ``edit`` its data (None: nothing to write) and write it
        back in one compare-and-set; on a conflict, all again."""
        for _ in range(SAVE_ATTEMPTS):
            stored = self._read()
            data = edit(stored)
            if data is None:
                return
            self._lock.check()
            try:
                self._write(stored, data)
                return
            except (TargetConflictError, NotFoundError):
                continue  # changed (or removed) since it was read
            except StoreUnavailableError:
                # The write may have landed before the answer was lost.
                if edit(self._read()) is None:
                    return
                raise
        raise StateError(
            f"{self._where} kept changing while this run wrote it ({SAVE_ATTEMPTS} conflicts); "
            "run again"
        )


class _SecretBlobs:
    """Blobs as keys of the store's Secret; each save or delete is one
    compare-and-set replace of it. Everything in a Secret counts as secret."""

    def __init__(self, store: KubernetesStateStore) -> None:
        self._store = store

    def load(self, name: str) -> bytes | None:
        key = blob_key(name)
        stored = self._store._read()
        return stored.value(key, self._store._where) if stored else None

    def save(self, name: str, data: bytes, *, secret: bool) -> None:
        key, encoded = blob_key(name), base64.b64encode(data).decode()

        def edit(stored: _Stored | None) -> Data | None:
            current = stored.data if stored else {}
            return None if current.get(key) == encoded else {**current, key: encoded}

        self._store._modify(edit)

    def delete(self, name: str) -> None:
        key = blob_key(name)

        def edit(stored: _Stored | None) -> Data | None:
            if stored is None or key not in stored.data:
                return None
            return {k: v for k, v in stored.data.items() if k != key}

        self._store._modify(edit)

    def names(self) -> list[str]:
        stored = self._store._read()
        keys = stored.data if stored else {}
        return sorted(blob_name(k) for k in keys if k.startswith(BLOB_PREFIX))


class _LeaseRecord:
    """The Lease ``<name>-lock`` as the store's lock record."""

    def __init__(self, store: KubernetesStateStore, api: KubeApi, duration: timedelta) -> None:
        self._seconds = max(1, round(duration.total_seconds()))
        self.lease = LeaseClient(
            store.namespace,
            f"{store.name}-lock",
            lambda request, method, path, body: store.send(api, request, method, path, body),
        )

    @property
    def what(self) -> str:
        return self.lease.what

    def _held(self, lease: dict[str, Any], identity: str, now: datetime) -> Holding:
        version = (lease.get("metadata") or {}).get("resourceVersion")
        return Holding(identity, now + timedelta(seconds=self._seconds), version)

    def take(self, identity: str, now: datetime) -> Holding:
        lease = self.lease.get()
        just_now = LockedError(
            f"another trustmgr run took the state lock ({self.what}) just now; wait for it "
            "to finish"
        )
        if lease is None:
            try:
                made = self.lease.create(
                    holding_spec(None, identity, self._seconds, now, take=True)
                )
            except TargetConflictError:
                raise just_now from None
            return self._held(made, identity, now)
        current = LeaseView.of(lease)
        if not current.free(now):
            assert current.expires is not None
            raise LockedError(
                f"another trustmgr run ({current.holder}) holds the state lock ({self.what}) "
                f"until {current.expires:%Y-%m-%dT%H:%M:%SZ} unless it renews it; wait for it "
                "to finish (a run that died lets it expire then)"
            )
        if current.holder:
            log.warning(
                "taking over the state lock (%s) from %s: it expired at %s",
                self.what,
                current.holder,
                f"{current.expires:%Y-%m-%dT%H:%M:%SZ}" if current.expires else "an unknown time",
            )
        spec = holding_spec(current, identity, self._seconds, now, take=True)
        try:
            made = self.lease.replace(lease, spec)
        except (TargetConflictError, NotFoundError):
            raise just_now from None
        return self._held(made, identity, now)

    def renew(self, holding: Holding, now: datetime) -> Holding:
        lease = self.lease.get()
        if lease is None:
            raise LockLostError(f"{self.what} was deleted")
        current = LeaseView.of(lease)
        if current.holder != holding.identity:
            raise LockLostError(f"{current.holder or 'nobody'} holds it now")
        spec = holding_spec(current, holding.identity, self._seconds, now, take=False)
        try:
            made = self.lease.replace(lease, spec)
        except NotFoundError:
            raise LockLostError(f"{self.what} was deleted") from None
        except TargetConflictError:
            raise StoreUnavailableError(f"{self.what} changed while it was renewed") from None
        return self._held(made, holding.identity, now)

    def release(self, holding: Holding, now: datetime) -> None:
        lease = self.lease.get()
        if lease is None or LeaseView.of(lease).holder != holding.identity:
            return  # taken over after it expired: no longer ours to clear
        with suppress(TargetConflictError, NotFoundError):  # taken over in between
            self.lease.replace(lease, released_spec(LeaseView.of(lease), now))
