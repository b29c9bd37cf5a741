"""The handles a pass works with: configuration, clock, state store, providers
and targets, built once from the configuration. It reads and decides nothing."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from trustmgr.config import ClusterConfig, Config
from trustmgr.providers import Clock, Provider
from trustmgr.state.file import FileStateStore
from trustmgr.targets import Target
from trustmgr.targets.directory import DirectoryTarget
from trustmgr.upstream import build_provider

TargetFactory = Callable[[str, ClusterConfig], Target]


def default_target(cluster: str, config: ClusterConfig) -> Target:
    if config.directory is not None:
        return DirectoryTarget(Path(config.directory.path).expanduser(), cluster=cluster)
    from trustmgr.targets.kubernetes import KubernetesTarget

    assert config.kubernetes is not None
    target: Target = KubernetesTarget(cluster, config.kubernetes)
    return target


@dataclass
class Workspace:
    """The handles one pass works with, built once from the configuration: the
    configuration, the clock, the state store, providers and targets. It decides
    nothing. Close it (or use it as a context manager) to release connections."""

    config: Config
    clock: Clock
    store: FileStateStore
    providers: dict[str, Provider]
    targets: dict[str, Target]
    meshes_of: dict[str, str] = field(default_factory=dict)

    @classmethod
    def build(
        cls,
        config: Config,
        *,
        clock: Clock,
        target_factory: TargetFactory = default_target,
        store: FileStateStore | None = None,
        providers: Mapping[str, Provider] | None = None,
    ) -> Workspace:
        """``providers`` replaces the providers built from the configuration,
        by name: the seam for a provider whose remote side cannot run here."""
        store = store or FileStateStore(Path(config.state_store.file.path).expanduser())
        given = providers or {}
        built = {
            name: given.get(name) or build_provider(name, p, blobs=store.blobs(), clock=clock)
            for name, p in config.providers.items()
            if any(m.provider == name for m in config.meshes.values())
        }
        targets = {cluster: target_factory(cluster, c) for _, cluster, c in config.clusters()}
        meshes_of = {cluster: mesh for mesh, cluster, _ in config.clusters()}
        return cls(config, clock, store, built, targets, meshes_of)

    def close(self) -> None:
        """Release every target's and provider's connections."""
        for target in self.targets.values():
            target.close()
        for provider in self.providers.values():
            close = getattr(provider, "close", None)
            if callable(close):
                close()

    def __enter__(self) -> Workspace:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def cluster_config(self, cluster: str) -> ClusterConfig:
        return self.config.meshes[self.meshes_of[cluster]].clusters[cluster]
