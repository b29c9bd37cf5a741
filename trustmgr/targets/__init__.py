"""Where a cluster's ``cacerts`` is written: the directory or Kubernetes target."""

from trustmgr.targets.base import Target, secret_manifest

__all__ = ["Target", "secret_manifest"]
