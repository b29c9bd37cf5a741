"""The exchange and the agent's own record in a cluster's namespace, through the
Kubernetes API (the namespace of the cluster's cacerts Secret).

- The desired document: ConfigMap ``trustmgr-desired``, key ``desired.json``,
  written by the central run and read by the agent.
- The agent's report: ConfigMap ``trustmgr-report``, key ``report.json``,
  written by the agent and read by the central run.
- The agent's own record: Secret ``trustmgr-agent``, key ``agent.json``, which
  only the agent reads and writes (it holds the key of the CSR it waits on).

Each object holds its one key and the label ``app.kubernetes.io/managed-by:
trustmgr``. A write reads the object and creates it when absent, else replaces
it carrying the resourceVersion it read; a conflict (someone wrote between the
read and the write) reads again, a few times. A write whose answer was lost is
read back before it is called failed, and a write of what the object already
holds writes nothing. A missing namespace is an error, never created here.

The API is reached as a Kubernetes target's (:mod:`trustmgr.targets.kubeapi`):
kubeconfig context or in-cluster service account, the same retries and one-line
errors, none of which carries an object's content."""

from __future__ import annotations

import base64
import binascii
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Final

from trustmgr.agent.exchange import DESIRED_NAME, LOCAL_NAME, REPORT_NAME, AgentLocal
from trustmgr.config import KubernetesTargetConfig
from trustmgr.errors import StateError, TargetConflictError, TargetError, TransientTargetError
from trustmgr.targets.base import MANAGED_BY, MANAGED_BY_LABEL
from trustmgr.targets.kubeapi import (
    CONFIGMAPS,
    SECRETS,
    KubeApi,
    NotFoundError,
    Request,
    object_path,
)

log = logging.getLogger(__name__)

DESIRED_KEY: Final = "desired.json"
REPORT_KEY: Final = "report.json"
LOCAL_KEY: Final = "agent.json"
WRITE_ATTEMPTS: Final = 3
"""Reads and writes of one document when each write conflicts with another writer."""


@dataclass(frozen=True)
class _Kind:
    kind: str
    resource: str
    collection: str


_CONFIGMAP = _Kind("ConfigMap", "configmaps", CONFIGMAPS)
_SECRET = _Kind("Secret", "secrets", SECRETS)


@dataclass(frozen=True)
class _Read:
    """An object as read: what a replace carries over, and the value of trustmgr's key
    as stored (text in a ConfigMap, base64 in a Secret)."""

    resource_version: str
    labels: dict[str, str]
    annotations: dict[str, str]
    type: str
    value: str | None = field(repr=False)

    @classmethod
    def of(cls, obj: dict[str, Any], key: str) -> _Read:
        meta = obj.get("metadata") or {}
        value = (obj.get("data") or {}).get(key)
        return cls(
            str(meta.get("resourceVersion", "")),
            dict(meta.get("labels") or {}),
            dict(meta.get("annotations") or {}),
            str(obj.get("type") or "Opaque"),
            None if value is None else str(value),
        )

    def holds(self, value: str) -> bool:
        return self.value == value and self.labels.get(MANAGED_BY_LABEL) == MANAGED_BY


class _Documents:
    """Single-key ConfigMaps and Secrets of trustmgr's in one namespace of one cluster."""

    def __init__(
        self, cluster: str, config: KubernetesTargetConfig, sleep: Callable[[float], None]
    ) -> None:
        self.cluster = cluster
        self.namespace = config.namespace
        self.api = KubeApi(config, sleep=sleep)

    def close(self) -> None:
        self.api.close()

    def what(self, kind: _Kind, name: str) -> str:
        return f"{kind.kind.lower()} {self.namespace}/{name}"

    @contextmanager
    def named(self) -> Iterator[None]:
        """A failure's one line, starting with the cluster; its class is kept (a
        TransientTargetError is still worth another pass). The permissions the
        exchange needs are in docs/agent.md, not with the cacerts target's."""
        try:
            yield
        except TargetError as exc:
            message = str(exc).replace("(docs/kubernetes.md)", "(docs/agent.md)")
            raise type(exc)(f"cluster {self.cluster}: {message}") from None

    def get(self, kind: _Kind, name: str, key: str) -> _Read | None:
        request = Request("get", kind.resource, name, self.namespace)
        path = object_path(kind.collection, self.namespace, name)
        try:
            return _Read.of(self.api.send(request, "GET", path), key)
        except NotFoundError:
            return None

    def write(self, kind: _Kind, name: str, key: str, value: str) -> None:
        """Make the object hold exactly ``{key: value}`` (as stored) and trustmgr's label."""
        for _ in range(WRITE_ATTEMPTS):
            current = self.get(kind, name, key)
            if current is not None and current.holds(value):
                return  # already there, or an earlier try landed without its answer
            try:
                self._put(kind, self._body(kind, name, key, value, current), current)
                return
            except (TargetConflictError, NotFoundError):
                continue  # written or removed by someone else since it was read
            except TransientTargetError as exc:
                if self._landed(kind, name, key, value):
                    log.info("cluster %s: %s; it landed all the same", self.cluster, exc)
                    return
                raise
        raise TargetConflictError(
            f"{self.what(kind, name)} kept changing while it was written ({WRITE_ATTEMPTS} "
            "conflicts): another writer is at work; only one trustmgr should write it"
        )

    def _landed(self, kind: _Kind, name: str, key: str, value: str) -> bool:
        try:
            current = self.get(kind, name, key)
        except TargetError:
            return False
        return current is not None and current.holds(value)

    def _body(
        self, kind: _Kind, name: str, key: str, value: str, current: _Read | None
    ) -> dict[str, Any]:
        metadata: dict[str, Any] = {"name": name, "namespace": self.namespace}
        labels = dict(current.labels) if current else {}
        metadata["labels"] = {**labels, MANAGED_BY_LABEL: MANAGED_BY}
        if current is not None:
            metadata["annotations"] = current.annotations
            metadata["resourceVersion"] = current.resource_version
        body: dict[str, Any] = {
            "apiVersion": "v1",
            "kind": kind.kind,
            "metadata": metadata,
            "data": {key: value},
        }
        if kind is _SECRET:
            body["type"] = current.type if current else "Opaque"  # immutable once created
        return body

    def _put(self, kind: _Kind, body: dict[str, Any], current: _Read | None) -> None:
        name = body["metadata"]["name"]
        if current is None:
            request = Request("create", kind.resource, name, self.namespace)
            path = object_path(kind.collection, self.namespace)
            self.api.send(request, "POST", path, body)
        else:
            request = Request("update", kind.resource, name, self.namespace)
            path = object_path(kind.collection, self.namespace, name)
            self.api.send(request, "PUT", path, body)


class KubernetesExchange:
    """One agent cluster's desired document and report, as ConfigMaps in
    ``config.namespace``. Serves one pass; close it after."""

    def __init__(
        self,
        cluster: str,
        config: KubernetesTargetConfig,
        *,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.cluster = cluster
        self._documents = _Documents(cluster, config, sleep)
        self.where = (
            f"cluster {cluster} (namespace {config.namespace}, {self._documents.api.where})"
        )

    def read_desired(self) -> bytes | None:
        return self._read(DESIRED_NAME, DESIRED_KEY)

    def publish(self, envelope: bytes) -> None:
        self._write(DESIRED_NAME, DESIRED_KEY, envelope)

    def read_report(self) -> bytes | None:
        return self._read(REPORT_NAME, REPORT_KEY)

    def write_report(self, data: bytes) -> None:
        self._write(REPORT_NAME, REPORT_KEY, data)

    def close(self) -> None:
        self._documents.close()

    def _read(self, name: str, key: str) -> bytes | None:
        """The key's text as UTF-8 bytes; None when the ConfigMap or its key is absent."""
        with self._documents.named():
            current = self._documents.get(_CONFIGMAP, name, key)
        return None if current is None or current.value is None else current.value.encode()

    def _write(self, name: str, key: str, data: bytes) -> None:
        try:
            text = data.decode()
        except UnicodeDecodeError:
            raise TargetError(
                f"cluster {self.cluster}: {self._documents.what(_CONFIGMAP, name)} holds text, "
                "and this document is not UTF-8"
            ) from None
        with self._documents.named():
            self._documents.write(_CONFIGMAP, name, key, text)


class KubernetesLocalStore:
    """The agent's own record, in the Secret ``trustmgr-agent`` of ``config.namespace``.
    It holds a private key: nothing here puts the Secret's content in a message."""

    def __init__(
        self,
        cluster: str,
        config: KubernetesTargetConfig,
        *,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.cluster = cluster
        self._documents = _Documents(cluster, config, sleep)
        self.where = f"cluster {cluster}: {self._documents.what(_SECRET, LOCAL_NAME)}"

    def load(self) -> AgentLocal:
        """The record; an empty one when the Secret or its key is absent."""
        with self._documents.named():
            current = self._documents.get(_SECRET, LOCAL_NAME, LOCAL_KEY)
        if current is None or current.value is None:
            return AgentLocal()
        try:
            data = base64.b64decode(current.value, validate=True)
        except (binascii.Error, ValueError):
            raise StateError(
                f"{self.where}: key {LOCAL_KEY} is not valid base64; delete the secret and the "
                "agent starts over"
            ) from None
        return AgentLocal.parse(data, where=self.where)

    def save(self, local: AgentLocal) -> None:
        value = base64.b64encode(local.to_bytes()).decode()
        with self._documents.named():
            self._documents.write(_SECRET, LOCAL_NAME, LOCAL_KEY, value)

    def close(self) -> None:
        self._documents.close()
