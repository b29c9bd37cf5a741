"""The contract of a target, and the cacerts Secret manifest both targets share."""

from __future__ import annotations

import base64
from typing import Any, Protocol

import yaml

from trustmgr.pki import CACerts

MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGED_BY = "trustmgr"
DIGEST_ANNOTATION = "trustmgr.io/digest"
CLUSTER_ANNOTATION = "trustmgr.io/cluster"


class Target(Protocol):
    """One cluster's destination. A target object serves one pass: ``read`` may
    remember what it saw (a resourceVersion) for the ``write`` that follows."""

    description: str

    def read(self) -> CACerts | None:
        """What the target holds now, or None if it holds no cacerts at all.
        Missing files of a partial set read as empty."""
        ...

    def check_writable(self) -> None:
        """Raise TargetError if a write would certainly fail; writes nothing."""
        ...

    def write(self, material: CACerts) -> None:
        """Replace the target's cacerts with ``material``, all files at once."""
        ...


def secret_manifest(
    material: CACerts, *, cluster: str, namespace: str = "istio-system", name: str = "cacerts"
) -> dict[str, Any]:
    """The Secret istiod reads its CA from."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {MANAGED_BY_LABEL: MANAGED_BY},
            "annotations": {DIGEST_ANNOTATION: material.digest(), CLUSTER_ANNOTATION: cluster},
        },
        "data": {k: base64.b64encode(v).decode() for k, v in material.files().items()},
    }


def secret_manifest_yaml(material: CACerts, *, cluster: str) -> bytes:
    return yaml.safe_dump(secret_manifest(material, cluster=cluster), sort_keys=False).encode()
