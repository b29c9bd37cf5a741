"""The state store the configuration names. Only the kinds in use are imported."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING

from trustmgr.errors import StateError
from trustmgr.state.store import StateStore

if TYPE_CHECKING:
    from trustmgr.config import StateStoreConfig


def _require(package: str, kind: str, extra: str) -> None:
    if importlib.util.find_spec(package) is None:
        raise StateError(
            f"stateStore.{kind} needs the {package} package: pip install 'trustmgr[{extra}]'"
        )


def build_store(config: StateStoreConfig) -> StateStore:
    """The store ``config`` names. Nothing is read or written until it is used."""
    if config.kubernetes is not None:
        _require("kubernetes", "kubernetes", "kubernetes")
        from trustmgr.state.kubernetes import KubernetesStateStore

        return KubernetesStateStore(config.kubernetes)
    if config.vault is not None:
        _require("hvac", "vault", "vault")
        from trustmgr.state.vault import VaultStateStore

        return VaultStateStore(config.vault)
    from trustmgr.state.file import FileStateStore

    return FileStateStore(Path(config.file.path).expanduser())
