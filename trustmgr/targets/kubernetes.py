"""A cluster's ``cacerts`` Secret, through the Kubernetes API.

Write rules: an absent secret is created; trustmgr's own (labelled
``app.kubernetes.io/managed-by: trustmgr``) is replaced carrying the
resourceVersion that was read, so a concurrent change answers 409 and the
engine reads and plans again; a secret trustmgr did not create is replaced only
when adopting. Once a replace has landed, what it replaced is kept in a Secret
next to it, ``<name>-trustmgr-previous``, which ``restore`` puts back: a write
that fails leaves the kept copy as it was. A write whose answer was lost (a
timeout, a dropped connection, a 5xx) is read back before it is called failed.
A missing namespace is an error, never created here."""

from __future__ import annotations

import base64
import binascii
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from trustmgr.config import KubernetesTargetConfig
from trustmgr.errors import TargetConflictError, TargetError, TransientTargetError
from trustmgr.pki import CACERTS_FILES, CACerts
from trustmgr.targets.base import (
    DIGEST_ANNOTATION,
    MANAGED_BY,
    MANAGED_BY_LABEL,
    Previous,
    secret_manifest,
)
from trustmgr.targets.kubeapi import SECRETS, KubeApi, NotFoundError, Request, object_path

log = logging.getLogger(__name__)

BACKUP_SUFFIX = "-trustmgr-previous"
PREVIOUS_METADATA = "trustmgr.io/previous-metadata"
"""On the backup: the labels and annotations the kept cacerts had, as JSON."""
SAVED_AT = "trustmgr.io/saved-at"
REPLACED_BY = "trustmgr.io/replaced-by"
"""On the backup: the digest annotation of the cacerts written in the kept one's place."""
RESTARTED_AT = "kubectl.kubernetes.io/restartedAt"
STRATEGIC_MERGE = "application/strategic-merge-patch+json"
DEPLOYMENTS = "/apis/apps/v1/namespaces/{namespace}/deployments"


@dataclass(frozen=True)
class _Secret:
    """A Secret as read: base64 data as stored, no decoding beyond what is asked."""

    resource_version: str
    type: str
    data: dict[str, str] = field(repr=False)
    labels: dict[str, str]
    annotations: dict[str, str]

    @classmethod
    def of(cls, secret: dict[str, Any]) -> _Secret:
        """From the Secret as the API answers it (JSON)."""
        meta = secret.get("metadata") or {}
        return cls(
            str(meta.get("resourceVersion", "")),
            str(secret.get("type") or "Opaque"),
            dict(secret.get("data") or {}),
            dict(meta.get("labels") or {}),
            dict(meta.get("annotations") or {}),
        )

    @property
    def managed(self) -> bool:
        return self.labels.get(MANAGED_BY_LABEL) == MANAGED_BY

    def files(self) -> dict[str, bytes]:
        try:
            return {n: base64.b64decode(self.data.get(n, ""), validate=True) for n in CACERTS_FILES}
        except (binascii.Error, ValueError):
            raise TargetError("the secret's data is not valid base64") from None


class KubernetesTarget:
    """The ``cacerts`` Secret of one cluster. Serves one pass; close it after."""

    def __init__(
        self,
        cluster: str,
        config: KubernetesTargetConfig,
        *,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.cluster = cluster
        self.config = config
        self.api = KubeApi(config, sleep=sleep)
        self.namespace, self.name = config.namespace, config.secret_name
        self.backup_name = config.secret_name + BACKUP_SUFFIX
        self.description = f"{self.api.where}, secret {self.namespace}/{self.name}"
        self.foreign: str | None = None
        self.stamp: str | None = None
        """After ``read``: the digest annotation trustmgr wrote with the secret's data."""
        self._current: _Secret | None = None
        self._backup: _Secret | None = None

    def close(self) -> None:
        self.api.close()

    def read(self) -> CACerts | None:
        self._current = secret = self._get(self.name)
        self.foreign = self.stamp = None
        if secret is None:
            return None
        if not secret.managed:
            self.foreign = (
                f"secret {self.namespace}/{self.name} was not created by trustmgr "
                f"(no {MANAGED_BY_LABEL}={MANAGED_BY} label)"
            )
        else:
            self.stamp = secret.annotations.get(DIGEST_ANNOTATION)
        files = secret.files()
        return CACerts.from_files(files) if any(files.values()) else None

    def check_writable(self) -> None:
        """Nothing to check without a request: the write itself says what is missing
        (namespace, permission), before anything is written."""

    def write(self, material: CACerts, *, adopt: bool = False) -> None:
        body = secret_manifest(
            material, cluster=self.cluster, namespace=self.namespace, name=self.name
        )
        current = self._current
        if current is None:
            self._current = self._put(body, None)
            return
        if not current.managed and not adopt:
            raise TargetError(f"{self.foreign}; run with --adopt to replace it")
        backup = self._own_backup()
        body["type"] = current.type  # immutable: an adopted secret keeps its type
        self._current = self._put(body, current)
        self.foreign = None
        self._keep_previous(current, backup, self._current)

    def previous(self) -> Previous | None:
        self._backup = backup = self._get(self.backup_name)
        if backup is None:
            return None
        if not backup.managed:
            raise TargetError(self._foreign_backup())
        self._check_rollback_point(backup)
        labels, _ = self._previous_metadata(backup)
        return Previous(
            CACerts.from_files(backup.files()),
            managed=labels.get(MANAGED_BY_LABEL) == MANAGED_BY,
            saved_at=backup.annotations.get(SAVED_AT),
        )

    def restore(self, previous: Previous) -> None:
        backup, current = self._backup, self._current
        if backup is None or CACerts.from_files(backup.files()) != previous.material:
            raise TargetError("restore() puts back only what previous() returned")
        labels, annotations = self._previous_metadata(backup)
        body = self._secret_body(
            self.name,
            backup.data,
            labels=labels,
            annotations=annotations,
            type_=current.type if current else "Opaque",
        )
        self._current = self._put(body, current)
        if current is not None:
            self._keep_previous(current, backup, self._current)

    def restart_istiod(self) -> None:
        """Patch the pod template's restartedAt annotation, as ``kubectl rollout
        restart`` does: the Deployment controller then rolls istiod's pods."""
        name = self.config.istiod_deployment
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        body = {"spec": {"template": {"metadata": {"annotations": {RESTARTED_AT: now}}}}}
        request = Request("patch", "deployments", name, self.namespace)
        try:
            self.api.send(
                request, "PATCH", self._path(DEPLOYMENTS, name), body, content_type=STRATEGIC_MERGE
            )
        except NotFoundError:
            raise TargetError(
                f"deployment {self.namespace}/{name} not found ({self.api.where}): set "
                "istiodDeployment to istiod's Deployment, or turn off restartIstiod"
            ) from None

    def _own_backup(self) -> _Secret | None:
        """The backup Secret, read before anything is written: one trustmgr did not
        create is never replaced."""
        backup = self._get(self.backup_name)
        if backup is not None and not backup.managed:
            raise TargetError(self._foreign_backup())
        return backup

    def _keep_previous(self, replaced: _Secret, backup: _Secret | None, written: _Secret) -> None:
        """Keep ``replaced`` in the backup Secret, now that ``written`` took its place.

        The write stands even if this fails: the kept copy is then older than what
        was replaced, which its REPLACED_BY annotation shows to ``previous``."""
        metadata = {"labels": replaced.labels, "annotations": replaced.annotations}
        annotations = {
            PREVIOUS_METADATA: json.dumps(metadata, sort_keys=True),
            SAVED_AT: datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
        if DIGEST_ANNOTATION in written.annotations:
            annotations[REPLACED_BY] = written.annotations[DIGEST_ANNOTATION]
        body = self._secret_body(
            self.backup_name,
            replaced.data,
            labels={MANAGED_BY_LABEL: MANAGED_BY},
            annotations=annotations,
        )
        try:
            self._put(body, backup)
        except TargetError as exc:
            log.warning(
                "cluster %s: %s was written, but the cacerts it replaced could not be kept "
                "in %s for rollback: %s",
                self.cluster,
                self.name,
                self.backup_name,
                exc,
            )

    def _check_rollback_point(self, backup: _Secret) -> None:
        """Refuse a kept copy that putting back would not undo the last write with."""
        current = self._current
        if current is None:
            return
        saved = backup.annotations.get(SAVED_AT) or "an unknown time"
        where = f"secret {self.namespace}/{self.name}"
        if current.data == backup.data:
            raise TargetError(
                f"cluster {self.cluster}: {where} already holds the cacerts kept in "
                f"{self.backup_name} (saved at {saved}): there is nothing to roll back to"
            )
        replaced_by = backup.annotations.get(REPLACED_BY)
        holds = current.annotations.get(DIGEST_ANNOTATION)
        if replaced_by and holds and replaced_by != holds:
            raise TargetError(
                f"cluster {self.cluster}: the cacerts kept in {self.backup_name} (saved at "
                f"{saved}) is older than the one the last write to {where} replaced, which "
                "could not be kept; to put it back anyway, remove the backup's "
                f"{REPLACED_BY} annotation and run rollback again"
            )

    def _previous_metadata(self, backup: _Secret) -> tuple[dict[str, str], dict[str, str]]:
        """The labels and annotations the kept cacerts had."""
        try:
            metadata = json.loads(backup.annotations.get(PREVIOUS_METADATA) or "{}")
            return dict(metadata.get("labels") or {}), dict(metadata.get("annotations") or {})
        except (ValueError, TypeError, AttributeError):
            raise TargetError(
                f"secret {self.namespace}/{self.backup_name}: its {PREVIOUS_METADATA} "
                "annotation was edited and cannot be read"
            ) from None

    def _foreign_backup(self) -> str:
        return (
            f"secret {self.namespace}/{self.backup_name} exists but was not created by "
            "trustmgr, which keeps the previous cacerts there: rename or delete it"
        )

    def _secret_body(
        self,
        name: str,
        data: dict[str, str],
        *,
        labels: dict[str, str],
        annotations: dict[str, str],
        type_: str = "Opaque",
    ) -> dict[str, Any]:
        return {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": type_,
            "metadata": {
                "name": name,
                "namespace": self.namespace,
                "labels": labels,
                "annotations": annotations,
            },
            "data": data,
        }

    def _path(self, collection: str, name: str | None = None) -> str:
        return object_path(collection, self.namespace, name)

    def _get(self, name: str) -> _Secret | None:
        request = Request("get", "secrets", name, self.namespace)
        try:
            return _Secret.of(self.api.send(request, "GET", self._path(SECRETS, name)))
        except NotFoundError:
            return None

    def _put(self, body: dict[str, Any], current: _Secret | None) -> _Secret:
        """Create the Secret (``current`` None) or replace ``current`` with ``body``.

        A write whose answer never came (retries spent on timeouts, dropped
        connections or 5xx) may have landed, and so may one whose retry conflicted
        with it: the Secret is read back, and if it holds what was sent, the write
        succeeded."""
        try:
            return self._create(body) if current is None else self._replace(body, current)
        except (TransientTargetError, TargetConflictError) as exc:
            landed = self._read_back(body)
            if landed is None:
                raise
            log.info("cluster %s: %s; it landed all the same", self.cluster, exc)
            return landed

    def _read_back(self, body: dict[str, Any]) -> _Secret | None:
        """The Secret if it holds exactly what ``body`` sent, else None."""
        meta = body["metadata"]
        try:
            secret = self._get(meta["name"])
        except TargetError:
            return None
        if (
            secret is None
            or secret.data != body["data"]
            or secret.labels != meta["labels"]
            or secret.annotations != meta["annotations"]
        ):
            return None
        return secret

    def _create(self, body: dict[str, Any]) -> _Secret:
        request = Request("create", "secrets", body["metadata"]["name"], self.namespace)
        return _Secret.of(self.api.send(request, "POST", self._path(SECRETS), body))

    def _replace(self, body: dict[str, Any], current: _Secret) -> _Secret:
        name = body["metadata"]["name"]
        body["metadata"]["resourceVersion"] = current.resource_version
        request = Request("update", "secrets", name, self.namespace)
        try:
            model = self.api.send(request, "PUT", self._path(SECRETS, name), body)
        except NotFoundError:
            raise TargetConflictError(
                f"secret {self.namespace}/{name} was deleted since it was read"
            ) from None
        return _Secret.of(model)
