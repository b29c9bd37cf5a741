"""One pass of work: observe → decide → execute.

- :mod:`trustmgr.observe` reads targets, providers' roots, external bundles and
  the state into one :class:`~trustmgr.observe.Observation`;
- :func:`trustmgr.planner.decide` turns configuration and observation into a
  :class:`~trustmgr.planner.Plan`, roots to create included; pure;
- :mod:`trustmgr.execute` carries the plan out.

``plan`` shows what ``apply`` would do from the same observation: the same
clusters change and the same istiod restarts follow.

Targets are read once per pass. When the state store moved between that
reading and taking the lock (another run saved), everything is observed again;
otherwise the first reading stands, since a target that changed since is caught
by the write itself: a Kubernetes write carries the resourceVersion it read and
answers a conflict, upon which that cluster alone is read again and planned again."""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType

from cryptography import x509

from trustmgr import spiffe
from trustmgr.bundles import fingerprint
from trustmgr.config import ClusterConfig, Config
from trustmgr.errors import BadInputError, TargetError
from trustmgr.execute import (
    ClusterOutcome,
    Progress,
    Report,
    execute,
    outcome,
    preflight,
    record_of,
    restart_istiod,
)
from trustmgr.federation import Federation
from trustmgr.observe import (
    Observation,
    Reading,
    external_bundles,
    observe_all,
    provider_roots,
    read_cluster,
    read_clusters,
)
from trustmgr.pki import ObservedCA, istiod_problems, observe
from trustmgr.planner import Plan, Reload, change_reload, decide, federation_of
from trustmgr.providers import Clock, Provider
from trustmgr.state.file import FileStateStore
from trustmgr.state.model import BundleRecord
from trustmgr.targets import Target
from trustmgr.targets.base import Rollbackable
from trustmgr.targets.directory import DirectoryTarget
from trustmgr.upstream import build_provider

__all__ = [
    "ClusterOutcome",
    "Observation",
    "Progress",
    "Reading",
    "Report",
    "Workspace",
    "apply",
    "make_plan",
    "rollback",
    "spiffe_export",
]

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

    def read(self, cluster: str) -> Reading:
        return read_cluster(self, cluster)

    def read_all(self, workers: int = 16) -> dict[str, Reading]:
        return read_clusters(self, workers)

    def federation(self) -> Federation:
        """Every mesh with the roots it has now (none created)."""
        roots = provider_roots(self.providers)
        return federation_of(self.config, lambda p: roots.get(p, ()), external_bundles(self))


def make_plan(ws: Workspace, *, workers: int = 16, adopt: bool = False) -> Plan:
    """The plan, with no side effect beyond reading."""
    return decide(ws.config, observe_all(ws, workers=workers), adopt=adopt)


def apply(
    ws: Workspace,
    *,
    workers: int = 16,
    adopt: bool = False,
    progress: Progress | None = None,
    stop: threading.Event | None = None,
) -> Report:
    """Bring every target to the desired state. Writes nothing when converged.
    ``adopt`` lets it replace cacerts that trustmgr did not create; ``stop``,
    once set, stops starting new clusters."""
    observation = observe_all(ws, workers=workers)
    plan = decide(ws.config, observation, adopt=adopt)
    if not plan.pending:
        return Report(plan, tuple(outcome(c, ok=True) for c in plan.clusters))
    preflight(ws, plan)
    with ws.store.lock():
        if ws.store.load().version != observation.state.version:
            # another run saved since: what it wrote counts
            observation = observe_all(ws, workers=workers)
            plan = decide(ws.config, observation, adopt=adopt)
            preflight(ws, plan)
        return execute(ws, plan, observation, workers=workers, stop=stop, progress=progress)


def spiffe_export(
    ws: Workspace, mesh: str, roots: tuple[x509.Certificate, ...], refresh_hint: int
) -> bytes:
    """The mesh's SPIFFE bundle; its sequence is bumped, and recorded, whenever
    the roots differ from the last export."""
    fingerprints = tuple(fingerprint(r) for r in roots)
    with ws.store.lock():
        state = ws.store.load()
        record = state.exported.get(mesh)
        if record is None or record.fingerprints != fingerprints:
            record = BundleRecord((record.sequence if record else 0) + 1, fingerprints)
            ws.store.save(replace(state, exported={**state.exported, mesh: record}))
    return spiffe.encode(roots, sequence=record.sequence, refresh_hint=refresh_hint)


@dataclass(frozen=True)
class Rollback:
    cluster: str
    restored: ObservedCA
    managed: bool
    saved_at: str | None
    istiod: str | None


def rollback(ws: Workspace, cluster: str) -> Rollback:
    """Put back the cacerts the cluster held before trustmgr's last write, with
    the same write rules; refuses material istiod would reject."""
    if cluster not in ws.targets:
        known = ", ".join(ws.targets)
        raise BadInputError(f"unknown cluster {cluster!r} (known: {known})")
    target = ws.targets[cluster]
    if not isinstance(target, Rollbackable):
        raise BadInputError(f"cluster {cluster}: {target.description} keeps no previous cacerts")
    mesh = ws.config.meshes[ws.meshes_of[cluster]]
    with ws.store.lock():
        state = ws.store.load()
        replaced = ws.read(cluster)
        if replaced.error:
            raise TargetError(f"cluster {cluster}: {replaced.error}")
        previous = target.previous()
        if previous is None:
            raise TargetError(
                f"cluster {cluster}: no previous cacerts is kept; trustmgr keeps one when it "
                "replaces a cacerts"
            )
        problems = istiod_problems(previous.material, now=ws.clock())
        if problems:
            raise TargetError(
                f"cluster {cluster}: refusing to put back the previous cacerts: {problems[0]}"
            )
        target.restore(previous)
        clusters = {k: v for k, v in state.clusters.items() if k != cluster}
        if previous.managed:  # else it is foreign again, as it was before adoption
            old = state.clusters.get(cluster)
            provider = old.provider if old else mesh.provider or ""
            clusters[cluster] = record_of(
                ws,
                previous.material,
                mesh=ws.meshes_of[cluster],
                trust_domain=mesh.trust_domain,
                provider=provider,
            )
        ws.store.save(replace(state, clusters=clusters))
    restored = observe(previous.material, trust_domain=mesh.trust_domain, now=ws.clock())
    istiod = _restart_after_rollback(ws, cluster, replaced.ca, restored)
    return Rollback(cluster, restored, previous.managed, previous.saved_at, istiod)


def _restart_after_rollback(
    ws: Workspace, cluster: str, replaced: ObservedCA | None, restored: ObservedCA
) -> str | None:
    istio = ws.cluster_config(cluster).istio
    if replaced is None or (
        change_reload(
            replaced,
            restored.bundle,
            ca_changes=True,
            multi_root=istio.multi_root,
            istio_version=istio.version,
        )
        is Reload.HOT
    ):
        return None
    try:
        return restart_istiod(ws, cluster, ws.targets[cluster])
    except TargetError as exc:
        raise TargetError(
            f"cluster {cluster}: rolled back, but istiod could not be restarted: {exc}"
        ) from None


def now_utc() -> datetime:
    return datetime.now(UTC)
