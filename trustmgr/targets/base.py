"""The contract of a target, and the cacerts Secret manifest both targets share."""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import yaml

from trustmgr.pki import CACerts

MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGED_BY = "trustmgr"
DIGEST_ANNOTATION = "trustmgr.io/digest"
CLUSTER_ANNOTATION = "trustmgr.io/cluster"


class Target(Protocol):
    """One cluster's destination. A target object serves one pass: ``read`` may
    remember what it saw (a resourceVersion, whether trustmgr owns it) for the
    ``write`` that follows."""

    description: str
    foreign: str | None
    """After ``read``: why what the target holds is not trustmgr's (made by hand or
    by Istio's tools), or None when it is trustmgr's or nothing is there."""

    def read(self) -> CACerts | None:
        """What the target holds now, or None if it holds no cacerts files at all.
        Missing files of a partial set read as empty."""
        ...

    def check_writable(self) -> None:
        """Raise TargetError if a write would certainly fail; writes nothing."""
        ...

    def write(self, material: CACerts, *, adopt: bool = False) -> None:
        """Replace the target's cacerts with ``material``, all files at once.

        Raises TargetConflictError when the target changed since ``read`` (the
        caller reads again and re-plans), and TargetError when it holds foreign
        cacerts and ``adopt`` is False."""
        ...

    def close(self) -> None:
        """Release connections; the target is not used afterwards."""
        ...


@dataclass(frozen=True)
class Previous:
    """The cacerts a target held before trustmgr's last write to it."""

    material: CACerts
    managed: bool
    """Whether trustmgr had written it (False: it was adopted)."""
    saved_at: str | None = None


@runtime_checkable
class Rollbackable(Protocol):
    """A target that keeps the cacerts it replaced, and can put it back."""

    def previous(self) -> Previous | None:
        """The kept cacerts, or None; remembers what it read for ``restore``."""
        ...

    def restore(self, previous: Previous) -> None:
        """Put back exactly what ``previous`` returned in place of what the last
        ``read`` saw (a conflict if it changed since), keeping the replaced
        cacerts as the new previous one: a second rollback undoes the first."""
        ...


@runtime_checkable
class Tidyable(Protocol):
    """A target where an interrupted write can leave things behind."""

    def tidy(self) -> None:
        """Remove what an interrupted write left (never what istiod reads)."""
        ...


@runtime_checkable
class IstiodRestarter(Protocol):
    """A target that can restart the cluster's istiod."""

    def restart_istiod(self) -> None:
        """Roll istiod's pods, as ``kubectl rollout restart`` does."""
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
    dumper: Any = getattr(yaml, "CSafeDumper", yaml.SafeDumper)  # libyaml: ~20x faster
    return yaml.dump(
        secret_manifest(material, cluster=cluster), Dumper=dumper, sort_keys=False
    ).encode()
