"""One pass of work: observe, plan, apply, report.

Order matters for "nothing half-written": everything that can be checked
without writing (config, state, roots, passphrases, target writability) is
checked before the first write; each cluster is then written all-or-nothing,
and one cluster failing never stops the others."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509

from providers import Clock, Provider, ProviderError, ProviderTransientError
from providers.selfsigned import SelfSignedProvider
from trustmgr import external, spiffe
from trustmgr.bundles import fingerprint
from trustmgr.config import ClusterConfig, Config
from trustmgr.errors import BadInputError, TargetError, TrustmgrError
from trustmgr.federation import Federation, MeshRoots, order_bundle
from trustmgr.pki import (
    CACerts,
    assemble,
    check_signed_ca,
    cluster_ca_request,
    istiod_problems,
    observe,
)
from trustmgr.planner import (
    Action,
    ClusterPlan,
    DesiredCluster,
    ObservedCluster,
    Plan,
    plan,
)
from trustmgr.spiffe import SpiffeBundle
from trustmgr.state.file import FileStateStore
from trustmgr.state.model import BundleRecord, ClusterRecord, State
from trustmgr.targets import Target
from trustmgr.targets.directory import DirectoryTarget
from trustmgr.upstream import build_provider

log = logging.getLogger(__name__)

TargetFactory = Callable[[str, ClusterConfig], Target]


def default_target(cluster: str, config: ClusterConfig) -> Target:
    if config.directory is not None:
        return DirectoryTarget(Path(config.directory.path).expanduser(), cluster=cluster)
    from trustmgr.targets.kubernetes import KubernetesTarget  # type: ignore[import-not-found,unused-ignore]

    assert config.kubernetes is not None
    target: Target = KubernetesTarget(cluster, config.kubernetes)
    return target


@dataclass(frozen=True)
class ClusterOutcome:
    cluster: str
    mesh: str
    action: Action
    reason: str
    message: str
    ok: bool
    error: str | None = None


@dataclass(frozen=True)
class Report:
    plan: Plan
    outcomes: tuple[ClusterOutcome, ...] = ()
    roots_created: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return all(o.ok for o in self.outcomes)

    @property
    def changed(self) -> bool:
        return bool(self.roots_created) or any(
            o.ok and o.action is not Action.NONE for o in self.outcomes
        )


@dataclass
class Workspace:
    """Everything one pass works with, built once from the configuration."""

    config: Config
    clock: Clock
    store: FileStateStore
    providers: dict[str, Provider]
    targets: dict[str, Target]
    meshes_of: dict[str, str] = field(default_factory=dict)
    _external: dict[str, SpiffeBundle] = field(default_factory=dict)

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

    def federation(self) -> Federation:
        """Every mesh with its current roots: providers' for issued meshes, the
        imported SPIFFE bundle for external ones."""
        provider_roots = {name: p.roots() for name, p in self.providers.items()}
        meshes = {}
        for name, mesh in self.config.meshes.items():
            if mesh.external is not None:
                roots = self.external_bundle(name).roots
            else:
                assert mesh.provider is not None
                roots = provider_roots[mesh.provider]
            meshes[name] = MeshRoots(name, mesh.trust_domain, roots, mesh.provider)
        return Federation(self.config, meshes)

    def external_bundle(self, mesh: str) -> SpiffeBundle:
        if mesh not in self._external:
            source = self.config.meshes[mesh].external
            assert source is not None
            data, where = external.fetch(source.spiffe_bundle, mesh=mesh)
            self._external[mesh] = spiffe.decode(data, source=where, now=self.clock())
        return self._external[mesh]

    def desired(
        self, federation: Federation, observed: dict[str, ObservedCluster]
    ) -> list[DesiredCluster]:
        """Each cluster's desired state; its bundle keeps the order of what the
        cluster holds now, so that istiod can hot-reload the change."""
        bundles = {mesh: federation.bundle(mesh) for mesh in self.config.meshes}
        out = []
        for mesh_name, cluster, cfg in self.config.clusters():
            bundle = bundles[mesh_name]
            seen = observed[cluster]
            if bundle is not None and seen.material is not None:
                bundle = order_bundle(bundle, seen.material.bundle)
            mesh = self.config.meshes[mesh_name]
            inter = self.config.intermediates_for(mesh_name)
            out.append(
                DesiredCluster(
                    name=cluster,
                    mesh=mesh_name,
                    trust_domain=mesh.trust_domain,
                    provider=mesh.provider or "",
                    key_algorithm=inter.key_algorithm,
                    ttl=inter.ttl,
                    renew_before=inter.renew_before,
                    bundle=bundle,
                    istio_version=cfg.istio.version,
                    multi_root=cfg.istio.multi_root,
                )
            )
        return out

    def observe(
        self, state: State, workers: int
    ) -> tuple[dict[str, ObservedCluster], dict[str, CACerts | None]]:
        now = self.clock()

        def one(cluster: str) -> tuple[ObservedCluster, CACerts | None]:
            trust_domain = self.config.meshes[self.meshes_of[cluster]].trust_domain
            try:
                material = self.targets[cluster].read()
            except TargetError as exc:
                return ObservedCluster(None, state.clusters.get(cluster), str(exc)), None
            seen = observe(material, trust_domain=trust_domain, now=now) if material else None
            return ObservedCluster(seen, state.clusters.get(cluster)), material

        names = list(self.targets)
        with ThreadPoolExecutor(max_workers=max(1, min(workers, len(names)))) as pool:
            results = list(pool.map(one, names))
        return (
            {n: r[0] for n, r in zip(names, results, strict=True)},
            {n: r[1] for n, r in zip(names, results, strict=True)},
        )

    def plan(self, state: State, workers: int = 16) -> Pass:
        """Observe everything once and decide. Refuses a federation that would
        merge two meshes into one."""
        federation = self.federation()
        for mesh, bundle in self._external.items():
            seen = state.imported.get(mesh)
            if seen and bundle.sequence is not None and bundle.sequence < seen.sequence:
                raise BadInputError(
                    f"mesh {mesh}: the SPIFFE bundle's sequence went backwards ({bundle.sequence} < "
                    f"{seen.sequence}); refusing a possibly replayed bundle"
                )
        errors = [f.message for f in federation.findings() if f.level == "error"]
        if errors:
            raise BadInputError(errors[0])
        missing = [name for name, m in federation.meshes.items() if not m.roots and m.provider]
        observed, materials = self.observe(state, workers)
        desired = self.desired(federation, observed)
        decided = plan(
            desired, observed, sorted(set(missing_providers(self, missing))), self.clock()
        )
        return Pass(decided, materials, {d.name: d for d in desired}, federation)


def missing_providers(ws: Workspace, meshes: list[str]) -> list[str]:
    """Self-signed providers without a root yet, among those of ``meshes``."""
    names = {ws.config.meshes[m].provider for m in meshes}
    return [n for n in names if n and isinstance(ws.providers[n], SelfSignedProvider)]


@dataclass(frozen=True)
class Pass:
    """One observation of the system and the plan made from it."""

    plan: Plan
    materials: dict[str, CACerts | None]
    desired: dict[str, DesiredCluster]
    federation: Federation


@contextmanager
def _locked(ws: Workspace) -> Iterator[State]:
    with ws.store.lock():
        yield ws.store.load()


def make_plan(ws: Workspace) -> Plan:
    """The plan, with no side effect beyond reading."""
    return ws.plan(ws.store.load()).plan


def apply(ws: Workspace, *, workers: int = 16) -> Report:
    """Bring every target to the desired state. Writes nothing when converged."""
    first = ws.plan(ws.store.load(), workers).plan
    if not first.pending:
        return Report(first, tuple(_outcome(c, ok=True) for c in first.clusters))
    _preflight(ws, first)
    with _locked(ws) as state:
        # Observed again under the lock: another run may have acted since.
        current = ws.plan(state, workers)
        first = current.plan
        created = []
        for provider_plan in first.providers:
            provider = ws.providers[provider_plan.provider]
            assert isinstance(provider, SelfSignedProvider)
            provider.create_root()
            log.info("created the root of provider %s", provider_plan.provider)
            created.append(provider_plan.provider)
        if created:  # the bundles now hold the new roots
            current = ws.plan(state, workers)
        clusters = current.plan.clusters
        results: list[tuple[ClusterOutcome, ClusterRecord | None]]
        with ThreadPoolExecutor(max_workers=max(1, min(workers, len(clusters)))) as pool:
            results = list(
                pool.map(
                    lambda c: _apply_cluster(
                        ws, c, current.desired[c.cluster], current.materials[c.cluster]
                    ),
                    clusters,
                )
            )
        new_state = _with_imports(state, ws)
        for outcome, record in results:
            if record is not None:
                new_state = new_state.with_cluster(outcome.cluster, record)
        if new_state is not state:
            ws.store.save(new_state)
        return Report(current.plan, tuple(o for o, _ in results), tuple(created))


def spiffe_export(
    ws: Workspace, mesh: str, roots: tuple[x509.Certificate, ...], refresh_hint: int
) -> bytes:
    """The mesh's SPIFFE bundle; its sequence is bumped, and recorded, whenever
    the roots differ from the last export."""
    fingerprints = tuple(fingerprint(r) for r in roots)
    with _locked(ws) as state:
        record = state.exported.get(mesh)
        if record is None or record.fingerprints != fingerprints:
            record = BundleRecord((record.sequence if record else 0) + 1, fingerprints)
            ws.store.save(replace(state, exported={**state.exported, mesh: record}))
    return spiffe.encode(roots, sequence=record.sequence, refresh_hint=refresh_hint)


def _with_imports(state: State, ws: Workspace) -> State:
    """Record the sequence of every imported bundle, so that a replay is refused."""
    imported = dict(state.imported)
    for mesh, bundle in ws._external.items():
        if bundle.sequence is not None:
            imported[mesh] = BundleRecord(
                bundle.sequence, tuple(fingerprint(r) for r in bundle.roots)
            )
    return state if imported == state.imported else replace(state, imported=imported)


def _preflight(ws: Workspace, first: Plan) -> None:
    """Fail before any write on what can be known now: an unwritable target, a
    root key that cannot be decrypted."""
    problems = []
    for c in first.clusters:
        if c.pending and c.action is not Action.FAIL:
            try:
                ws.targets[c.cluster].check_writable()
            except TargetError as exc:
                problems.append(f"cluster {c.cluster}: {exc}")
    if problems:
        raise TargetError(
            problems[0] if len(problems) == 1 else f"{problems[0]} (and {len(problems) - 1} more)"
        )
    signing = {
        ws.config.meshes[c.mesh].provider or ""
        for c in first.clusters
        if c.action in (Action.ISSUE, Action.RENEW)
    }
    for name in sorted(signing):
        provider = ws.providers[name]
        if isinstance(provider, SelfSignedProvider):
            provider.unlock()


def _outcome(c: ClusterPlan, *, ok: bool, error: str | None = None) -> ClusterOutcome:
    return ClusterOutcome(c.cluster, c.mesh, c.action, c.reason, c.message, ok, error)


def _apply_cluster(
    ws: Workspace, c: ClusterPlan, d: DesiredCluster, current: CACerts | None
) -> tuple[ClusterOutcome, ClusterRecord | None]:
    if c.action is Action.NONE:
        return _outcome(c, ok=True), None
    if c.action is Action.FAIL:
        return _outcome(c, ok=False, error=c.message), None
    try:
        material = _material_for(ws, c, d, current)
        problems = istiod_problems(material, now=ws.clock())
        if problems:
            raise TrustmgrError(f"refusing to write material istiod would reject: {problems[0]}")
        ws.targets[c.cluster].write(material)
    except (TrustmgrError, ProviderError) as exc:
        kind = "transient" if isinstance(exc, ProviderTransientError) else "error"
        log.warning("cluster %s: %s (%s)", c.cluster, exc, kind)
        return _outcome(c, ok=False, error=str(exc)), None
    seen = observe(material, trust_domain=d.trust_domain, now=ws.clock())
    assert seen.fingerprint and seen.serial and seen.not_after
    record = ClusterRecord(
        mesh=d.mesh,
        trust_domain=d.trust_domain,
        provider=d.provider,
        fingerprint=seen.fingerprint,
        serial=seen.serial,
        not_after=seen.not_after,
        digest=material.digest(),
        bundle=seen.bundle,
        written_at=ws.clock(),
    )
    return _outcome(c, ok=True), record


def _material_for(
    ws: Workspace, c: ClusterPlan, d: DesiredCluster, current: CACerts | None
) -> CACerts:
    if d.bundle is None:
        raise TrustmgrError(
            f"the trust bundle of mesh {d.mesh} is incomplete: a provider has no root"
        )
    if c.action is Action.UPDATE_BUNDLE and current is not None:
        return current.with_bundle(d.bundle)
    inter = ws.config.intermediates_for(d.mesh)
    request = cluster_ca_request(
        d.trust_domain, cluster=d.name, algorithm=d.key_algorithm, organization=inter.organization
    )
    provider = ws.providers[d.provider]
    answer = provider.sign_ca(request.csr, d.ttl)
    root = check_signed_ca(answer, request, d.trust_domain, provider=d.provider, now=ws.clock())
    return assemble(request, answer, root, d.bundle)


def now_utc() -> datetime:
    return datetime.now(UTC)
