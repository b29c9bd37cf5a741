"""One pass of work: observe, plan, apply, report.

Order matters for "nothing half-written": everything that can be checked
without writing (config, state, roots, passphrases, target writability) is
checked before the first write; each cluster is then written all-or-nothing,
and one cluster failing never stops the others.

Targets are read once per pass. When the state store moved between that
reading and taking the lock (another run saved), they are read again; otherwise the
first reading stands, since a target that changed since is caught by the write
itself: a Kubernetes write carries the resourceVersion it read and answers a
conflict, upon which that cluster alone is read again and planned again."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType

from cryptography import x509

from trustmgr import external, spiffe
from trustmgr.bundles import TrustBundle, fingerprint, load_certificates
from trustmgr.config import ClusterConfig, Config
from trustmgr.errors import (
    BadInputError,
    TargetConflictError,
    TargetError,
    TrustmgrError,
)
from trustmgr.federation import Federation, MeshRoots, order_bundle
from trustmgr.pki import (
    CACerts,
    ObservedCA,
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
    Reload,
    change_reload,
    plan,
    plan_cluster,
)
from trustmgr.providers import Clock, Provider, ProviderError, ProviderTransientError
from trustmgr.providers.selfsigned import SelfSignedProvider
from trustmgr.spiffe import SpiffeBundle
from trustmgr.state.file import FileStateStore
from trustmgr.state.model import BundleRecord, ClusterRecord, State
from trustmgr.targets import Target
from trustmgr.targets.base import IstiodRestarter, Rollbackable
from trustmgr.targets.directory import DirectoryTarget
from trustmgr.upstream import build_provider

log = logging.getLogger(__name__)

TargetFactory = Callable[[str, ClusterConfig], Target]

CONFLICT_ATTEMPTS = 3
"""Writes of one cluster in one pass that may meet a concurrent change."""

RESTARTED, RESTART_NEEDED = "restarted", "restart needed"


def default_target(cluster: str, config: ClusterConfig) -> Target:
    if config.directory is not None:
        return DirectoryTarget(Path(config.directory.path).expanduser(), cluster=cluster)
    from trustmgr.targets.kubernetes import KubernetesTarget

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
    istiod: str | None = None
    """``restarted``, ``restart needed``, or None when istiod takes the change as it runs."""


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


Progress = Callable[[int, int, ClusterOutcome], None]
"""Called as each cluster is done, with (done, total, outcome), from the calling thread."""


@dataclass(frozen=True)
class Seen:
    """One reading of a target."""

    material: CACerts | None
    observed: ObservedCA | None
    foreign: str | None = None
    error: str | None = None


@dataclass
class Workspace:
    """Everything one pass works with, built once from the configuration.
    Close it (or use it as a context manager) to release the targets' connections."""

    config: Config
    clock: Clock
    store: FileStateStore
    providers: dict[str, Provider]
    targets: dict[str, Target]
    meshes_of: dict[str, str] = field(default_factory=dict)
    _external: dict[str, SpiffeBundle] = field(default_factory=dict)
    _roots: dict[str, tuple[x509.Certificate, ...]] = field(default_factory=dict)

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

    def new_pass(self) -> None:
        """Forget what providers and external meshes said: a pass asks each once."""
        self._roots.clear()
        self._external.clear()

    def provider_roots(self, name: str) -> tuple[x509.Certificate, ...]:
        """The provider's roots, asked for once per pass (a network call for Vault and AWS)."""
        if name not in self._roots:
            self._roots[name] = self.providers[name].roots()
        return self._roots[name]

    def federation(self) -> Federation:
        """Every mesh with its current roots: providers' for issued meshes, the
        imported SPIFFE bundle for external ones."""
        provider_roots = {name: self.provider_roots(name) for name in self.providers}
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

    def desired_cluster(
        self, cluster: str, bundle: TrustBundle | None, seen: Seen, *, adopt: bool
    ) -> DesiredCluster:
        """The cluster's desired state; its bundle keeps the order of what the
        cluster holds now, so that istiod can hot-reload the change."""
        mesh_name = self.meshes_of[cluster]
        if bundle is not None and seen.observed is not None:
            bundle = order_bundle(bundle, seen.observed.bundle)
        mesh = self.config.meshes[mesh_name]
        cfg = mesh.clusters[cluster]
        inter = self.config.intermediates_for(mesh_name)
        return DesiredCluster(
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
            adopt=adopt,
        )

    def read(self, cluster: str) -> Seen:
        """Read one target; a failure to read is part of what is seen."""
        trust_domain = self.config.meshes[self.meshes_of[cluster]].trust_domain
        target = self.targets[cluster]
        try:
            material = target.read()
        except TargetError as exc:
            return Seen(None, None, error=str(exc))
        seen = observe(material, trust_domain=trust_domain, now=self.clock()) if material else None
        return Seen(material, seen, foreign=target.foreign)

    def observe(self, workers: int = 16) -> dict[str, Seen]:
        """Read every target, ``workers`` at a time."""
        names = list(self.targets)
        with ThreadPoolExecutor(max_workers=max(1, min(workers, len(names)))) as pool:
            return dict(zip(names, pool.map(self.read, names), strict=True))

    def decide(self, state: State, seen: Mapping[str, Seen], *, adopt: bool = False) -> Pass:
        """Plan from what was seen. Refuses a federation that would merge two
        meshes into one."""
        federation = self.federation()
        for mesh, bundle in self._external.items():
            known = state.imported.get(mesh)
            if known and bundle.sequence is not None and bundle.sequence < known.sequence:
                raise BadInputError(
                    f"mesh {mesh}: the SPIFFE bundle's sequence went backwards ({bundle.sequence} < "
                    f"{known.sequence}); refusing a possibly replayed bundle"
                )
        errors = [f.message for f in federation.findings() if f.level == "error"]
        if errors:
            raise BadInputError(errors[0])
        missing = [name for name, m in federation.meshes.items() if not m.roots and m.provider]
        _refuse_root_swap(state, missing, self.config)
        bundles = {mesh: federation.bundle(mesh) for mesh in self.config.meshes}
        desired = [
            self.desired_cluster(c, bundles[self.meshes_of[c]], seen[c], adopt=adopt)
            for c in self.targets
        ]
        observed = {c: _observed(seen[c], state.clusters.get(c)) for c in self.targets}
        decided = plan(
            desired, observed, sorted(set(missing_providers(self, missing))), self.clock()
        )
        return Pass(decided, dict(seen), {d.name: d for d in desired}, federation, state, adopt)

    def plan(self, state: State, workers: int = 16, *, adopt: bool = False) -> Pass:
        """Observe everything once and decide."""
        return self.decide(state, self.observe(workers), adopt=adopt)

    def replan(self, current: Pass, cluster: str, seen: Seen) -> tuple[ClusterPlan, DesiredCluster]:
        """One cluster planned again from a new reading, within ``current``'s pass."""
        d = self.desired_cluster(
            cluster, current.federation.bundle(self.meshes_of[cluster]), seen, adopt=current.adopt
        )
        o = _observed(seen, current.state.clusters.get(cluster))
        return plan_cluster(d, o, self.clock()), d


def _observed(seen: Seen, record: ClusterRecord | None) -> ObservedCluster:
    return ObservedCluster(seen.observed, record, seen.error, seen.foreign)


def _refuse_root_swap(state: State, rootless_meshes: list[str], config: Config) -> None:
    """A provider without a root whose clusters were issued under one has lost
    it: creating a new root would swap every cluster's trust at once."""
    for provider in sorted({config.meshes[m].provider or "" for m in rootless_meshes}):
        issued = sorted(c for c, r in state.clusters.items() if r.provider == provider)
        if issued:
            raise BadInputError(
                f"provider {provider} has no root, yet clusters {', '.join(issued)} were issued "
                f"under one: restore providers/{provider}/ in the state store from a backup "
                "(to start over with a new root, remove the state's state.json first)"
            )


def missing_providers(ws: Workspace, meshes: list[str]) -> list[str]:
    """Self-signed providers without a root yet, among those of ``meshes``."""
    names = {ws.config.meshes[m].provider for m in meshes}
    return [n for n in names if n and isinstance(ws.providers[n], SelfSignedProvider)]


@dataclass(frozen=True)
class Pass:
    """One observation of the system and the plan made from it."""

    plan: Plan
    seen: dict[str, Seen]
    desired: dict[str, DesiredCluster]
    federation: Federation
    state: State
    adopt: bool = False


@contextmanager
def _locked(ws: Workspace) -> Iterator[State]:
    with ws.store.lock():
        yield ws.store.load()


def make_plan(ws: Workspace, *, workers: int = 16, adopt: bool = False) -> Plan:
    """The plan, with no side effect beyond reading."""
    ws.new_pass()
    return ws.plan(ws.store.load(), workers, adopt=adopt).plan


def apply(
    ws: Workspace, *, workers: int = 16, adopt: bool = False, progress: Progress | None = None
) -> Report:
    """Bring every target to the desired state. Writes nothing when converged.
    ``adopt`` lets it replace cacerts that trustmgr did not create."""
    ws.new_pass()
    loaded = ws.store.load()
    seen = ws.observe(workers)
    first = ws.decide(loaded, seen, adopt=adopt).plan
    if not first.pending:
        return Report(first, tuple(_outcome(c, ok=True) for c in first.clusters))
    _preflight(ws, first)
    with _locked(ws) as state:
        if state.version != loaded.version:
            seen = ws.observe(workers)  # another run saved since: what it wrote counts
        current = ws.decide(state, seen, adopt=adopt)
        created = []
        for provider_plan in current.plan.providers:
            provider = ws.providers[provider_plan.provider]
            assert isinstance(provider, SelfSignedProvider)
            provider.create_root()
            ws._roots.pop(provider_plan.provider, None)
            log.info("created the root of provider %s", provider_plan.provider)
            created.append(provider_plan.provider)
        if created:  # the bundles now hold the new roots
            current = ws.decide(state, seen, adopt=adopt)
        results = _apply_all(ws, current, workers, progress)
        new_state = _with_imports(state, ws)
        for outcome, record in results:
            if record is not None:
                new_state = new_state.with_cluster(outcome.cluster, record)
        if new_state is not state:
            ws.store.save(new_state)
        return Report(current.plan, tuple(o for o, _ in results), tuple(created))


def _apply_all(
    ws: Workspace, current: Pass, workers: int, progress: Progress | None
) -> list[tuple[ClusterOutcome, ClusterRecord | None]]:
    """Every cluster's outcome, in plan order; pending ones worked on in parallel."""
    clusters = current.plan.clusters
    results: dict[str, tuple[ClusterOutcome, ClusterRecord | None]] = {
        c.cluster: (_outcome(c, ok=True), None) for c in clusters if not c.pending
    }
    pending = [c for c in clusters if c.pending]
    if pending:
        with ThreadPoolExecutor(max_workers=max(1, min(workers, len(pending)))) as pool:
            futures = [pool.submit(_apply_cluster_guarded, ws, current, c) for c in pending]
            for done, future in enumerate(as_completed(futures), 1):
                outcome, record = future.result()
                results[outcome.cluster] = (outcome, record)
                if progress is not None:
                    progress(done, len(pending), outcome)
    return [results[c.cluster] for c in clusters]


def _apply_cluster_guarded(
    ws: Workspace, current: Pass, c: ClusterPlan
) -> tuple[ClusterOutcome, ClusterRecord | None]:
    """A bug met in one cluster fails that cluster only, so the records of the
    clusters already written are still saved."""
    try:
        return _apply_cluster(ws, current, c)
    except Exception as exc:
        log.debug("cluster %s: unexpected error", c.cluster, exc_info=True)
        error = f"unexpected {type(exc).__name__}; run with -vv for the traceback"
        return _outcome(c, ok=False, error=error), None


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
        if c.pending and c.action not in (Action.FAIL, Action.REFUSE):
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


def _outcome(
    c: ClusterPlan, *, ok: bool, error: str | None = None, istiod: str | None = None
) -> ClusterOutcome:
    return ClusterOutcome(c.cluster, c.mesh, c.action, c.reason, c.message, ok, error, istiod)


def _apply_cluster(
    ws: Workspace, current: Pass, c: ClusterPlan
) -> tuple[ClusterOutcome, ClusterRecord | None]:
    """Write one cluster. On a conflict the cluster is read and planned again,
    never overwritten blindly; a CA issued for it is kept across such retries."""
    d, seen = current.desired[c.cluster], current.seen[c.cluster]
    target = ws.targets[c.cluster]
    issued: CACerts | None = None
    for _ in range(CONFLICT_ATTEMPTS):
        if c.action is Action.NONE:
            return _outcome(c, ok=True), None
        if c.action in (Action.FAIL, Action.REFUSE):
            return _outcome(c, ok=False, error=c.message), None
        try:
            material = _material_for(ws, c, d, seen.material, issued)
            if c.action is not Action.UPDATE_BUNDLE:
                issued = material
            # Everything the next observation would object to, not only istiod's
            # load checks: otherwise every run would re-issue.
            problems = observe(material, trust_domain=d.trust_domain, now=ws.clock()).problems
            if problems:
                raise TrustmgrError(
                    f"refusing to write material istiod would reject: {problems[0]}"
                )
            target.write(material, adopt=d.adopt)
        except TargetConflictError as exc:
            log.info("cluster %s: %s; reading it again", c.cluster, exc)
            seen = ws.read(c.cluster)
            if seen.material == material and seen.foreign is None:
                break  # our write landed, its answer was lost
            c, d = ws.replan(current, c.cluster, seen)
            continue
        except (TrustmgrError, ProviderError) as exc:
            kind = "transient" if isinstance(exc, ProviderTransientError) else "error"
            log.warning("cluster %s: %s (%s)", c.cluster, exc, kind)
            return _outcome(c, ok=False, error=str(exc)), None
        break
    else:
        return _outcome(
            c,
            ok=False,
            error=f"the cacerts kept changing while trustmgr wrote it ({CONFLICT_ATTEMPTS} "
            "conflicts); nothing was overwritten; run again",
        ), None
    record = _record(ws, material, d.mesh, d.trust_domain, d.provider)
    return _restart_if_needed(ws, c, target), record


def _record(
    ws: Workspace, material: CACerts, mesh: str, trust_domain: str, provider: str
) -> ClusterRecord:
    """What was written, from material already checked: parsed, not verified again."""
    ca = load_certificates(material.ca_cert, "ca-cert.pem")[0]
    return ClusterRecord(
        mesh=mesh,
        trust_domain=trust_domain,
        provider=provider,
        fingerprint=fingerprint(ca),
        serial=format(ca.serial_number, "x"),
        not_after=ca.not_valid_after_utc,
        digest=material.digest(),
        bundle=TrustBundle.from_pem(material.root_cert, "root-cert.pem").fingerprints,
        written_at=ws.clock(),
    )


def _restart_if_needed(ws: Workspace, c: ClusterPlan, target: Target) -> ClusterOutcome:
    """After a write istiod cannot hot-reload: restart it if allowed, else say so."""
    if c.reload is not Reload.RESTART:
        return _outcome(c, ok=True)
    try:
        return _outcome(c, ok=True, istiod=_restart_istiod(ws, c.cluster, target))
    except TargetError as exc:
        return _outcome(
            c,
            ok=False,
            error=f"cacerts written, but istiod could not be restarted: {exc}",
            istiod=RESTART_NEEDED,
        )


def _restart_istiod(ws: Workspace, cluster: str, target: Target) -> str:
    """Restart istiod if the cluster allows it and the target can; say which."""
    if not ws.cluster_config(cluster).istio.restart_istiod or not isinstance(
        target, IstiodRestarter
    ):
        return RESTART_NEEDED
    target.restart_istiod()
    return RESTARTED


def _material_for(
    ws: Workspace,
    c: ClusterPlan,
    d: DesiredCluster,
    current: CACerts | None,
    issued: CACerts | None = None,
) -> CACerts:
    if d.bundle is None:
        raise TrustmgrError(
            f"the trust bundle of mesh {d.mesh} is incomplete: a provider has no root"
        )
    if c.action is Action.UPDATE_BUNDLE and current is not None:
        return current.with_bundle(d.bundle)
    if issued is not None:
        return issued.with_bundle(d.bundle)
    inter = ws.config.intermediates_for(d.mesh)
    request = cluster_ca_request(
        d.trust_domain, cluster=d.name, algorithm=d.key_algorithm, organization=inter.organization
    )
    provider = ws.providers[d.provider]
    answer = provider.sign_ca(request.csr, d.ttl)
    root = check_signed_ca(answer, request, d.trust_domain, provider=d.provider, now=ws.clock())
    return assemble(request, answer, root, d.bundle)


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
    with _locked(ws) as state:
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
            clusters[cluster] = _record(
                ws, previous.material, ws.meshes_of[cluster], mesh.trust_domain, provider
            )
        ws.store.save(replace(state, clusters=clusters))
    restored = observe(previous.material, trust_domain=mesh.trust_domain, now=ws.clock())
    istiod = _restart_after_rollback(ws, cluster, replaced.observed, restored)
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
        return _restart_istiod(ws, cluster, ws.targets[cluster])
    except TargetError as exc:
        raise TargetError(
            f"cluster {cluster}: rolled back, but istiod could not be restarted: {exc}"
        ) from None


def now_utc() -> datetime:
    return datetime.now(UTC)
