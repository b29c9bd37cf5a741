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
from dataclasses import dataclass, replace
from datetime import UTC, datetime

from cryptography import x509

from trustmgr import spiffe
from trustmgr.bundles import fingerprint
from trustmgr.errors import BadInputError, TargetError
from trustmgr.execute import (
    ClusterOutcome,
    Fence,
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
    observe_all,
    read_cluster,
)
from trustmgr.pki import ObservedCA, istiod_problems, observe
from trustmgr.planner import (
    Plan,
    Reload,
    change_reload,
    decide,
    federation_at,
    overlapping,
    provider_clusters,
)
from trustmgr.providers import RootKeeper, RootRenewer
from trustmgr.state.model import BundleRecord, Phase, RotationRecord
from trustmgr.targets.base import Rollbackable
from trustmgr.workspace import Only, Workspace, authority

__all__ = [
    "ClusterOutcome",
    "Observation",
    "Progress",
    "Reading",
    "Report",
    "Workspace",
    "apply",
    "current_federation",
    "make_plan",
    "rollback",
    "spiffe_export",
]


def current_federation(ws: Workspace) -> Federation:
    """Every mesh with the roots its bundles hold now: during a rotation, those
    of its phase (both roots while they are distributed); no root not yet made."""
    observation = observe_all(ws, clusters=dict, prepare=False)
    return federation_at(ws.config, observation, prepared=False)


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
    fence: Fence | None = None,
) -> Report:
    """Bring every target to the desired state. Writes nothing when converged.
    ``adopt`` lets it replace cacerts that trustmgr did not create; ``stop``,
    once set, stops starting new clusters; ``fence`` is called before each write
    and raises when none may be made (see :func:`~trustmgr.execute.execute`)."""
    observation = observe_all(ws, workers=workers)
    plan = decide(ws.config, observation, adopt=adopt)
    if not plan.pending:
        return Report(
            plan, tuple(outcome(c, ok=True) for c in plan.clusters), observation=observation
        )
    preflight(ws, plan)
    if fence is not None:
        fence()  # taking the state lock is a write
    with ws.store.lock():
        if ws.store.load().version != observation.state.version:
            # another run saved since: what it wrote counts
            observation = observe_all(ws, workers=workers)
            plan = decide(ws.config, observation, adopt=adopt)
            preflight(ws, plan)
        report = execute(
            ws, plan, observation, workers=workers, stop=stop, progress=progress, fence=fence
        )
        return replace(report, observation=observation)


def start_rotation(ws: Workspace, provider: str) -> RotationRecord:
    """Make a new root for ``provider`` beside its current one and record the
    rotation at phase prepared. Passes of ``reconcile`` carry it through."""
    if provider not in ws.providers:
        used = ", ".join(sorted(ws.providers)) or "none"
        raise BadInputError(f"unknown provider {provider!r} (providers in use: {used})")
    current = ws.providers[provider]
    if not isinstance(current, RootKeeper | RootRenewer):
        raise BadInputError(
            f"provider {provider} cannot make a new root beside its current one (AWS "
            "Private CA: create the new CA, add a provider for its ARN and move the "
            "meshes to it; docs/rotation.md)"
        )
    with ws.store.lock():
        state = ws.store.load()
        if provider in state.rotations:
            r = state.rotations[provider]
            raise BadInputError(
                f"provider {provider} is already rotating (rotation {r.id}, phase {r.phase}); "
                "see `trustmgr rotate status`"
            )
        busy = overlapping(
            ws.config,
            provider,
            provider_clusters(ws.config, provider),
            state.rotations.values(),
        )
        if busy is not None:
            raise BadInputError(
                f"the {busy.what} ({busy.phase}) shares trust bundles with provider "
                f"{provider}'s meshes; one rotation at a time keeps them hot-reloadable: "
                "start this one once that one is done"
            )
        old = current.roots()
        if not old:
            raise BadInputError(
                f"provider {provider} has no root yet: run `trustmgr bootstrap` first"
            )
        now = ws.clock()
        rotation_id = f"{now:%Y%m%d%H%M%S}"
        if isinstance(current, RootKeeper):
            generation = rotation_id
            incoming = authority(ws.config, ws.store, provider, generation, ws.clock)
            assert isinstance(incoming, RootKeeper)
            incoming.unlock()
            incoming.prepare_root()
            root = incoming.keep_prepared_root()
        else:
            generation, root = current.new_root(f"trustmgr-{rotation_id}")
            incoming = Only(
                authority(ws.config, ws.store, provider, generation, ws.clock),
                (fingerprint(root),),
            )
        record = RotationRecord(
            id=rotation_id,
            provider=provider,
            phase=Phase.PREPARED,
            generation=generation,
            old_roots=tuple(fingerprint(r) for r in old),
            new_roots=(fingerprint(root),),
            started_at=now,
            phase_at=now,
        )
        ws.store.save(replace(state, rotations={**state.rotations, provider: record}))
    ws.incoming[provider] = incoming
    return record


def change_rotation(ws: Workspace, key: str, how: str) -> RotationRecord:
    """``rollback`` (one phase back, then held), ``abort`` (back to before the
    rotation, then dropped) or ``resume`` (no longer held) of the rotation
    ``key`` (a provider's name, or ``mesh/<name>`` for a move)."""
    with ws.store.lock():
        state = ws.store.load()
        record = state.rotations.get(key)
        if record is None:
            what = (
                f"mesh {key.removeprefix('mesh/')}"
                if key.startswith("mesh/")
                else f"provider {key}"
            )
            raise BadInputError(f"{what} has no rotation in progress")
        phase = record.phase
        if how == "rollback":
            if phase not in (Phase.TRUST_DISTRIBUTED, Phase.ISSUER_SWITCHED):
                why = (
                    "nothing has been distributed yet; `trustmgr rotate abort` drops the rotation"
                    if phase is Phase.PREPARED
                    else "the old root has left the bundles: finish the rotation, or start another"
                )
                raise BadInputError(f"rotation {record.id} is at {phase}: {why}")
            changed = replace(
                record, phase=phase.previous(), phase_at=ws.clock(), converged_at=None, held=True
            )
        elif how == "abort":
            mesh = ws.config.meshes.get(record.mesh) if record.mesh else None
            if mesh is not None and mesh.provider != record.from_provider:
                raise BadInputError(
                    f"the {record.what} follows the configuration: set meshes.{record.mesh}"
                    f".provider back to {record.from_provider} first, then abort"
                )
            if phase not in (Phase.PREPARED, Phase.TRUST_DISTRIBUTED):
                raise BadInputError(
                    f"rotation {record.id} is at {phase}: cluster CAs are under the new root; "
                    "`trustmgr rotate rollback` to trust-distributed first, then abort"
                )
            # Once the new root has signed, it leaves the bundles only after the
            # soak (the gate sees to it); before, at once.
            back = Phase.TRUST_DISTRIBUTED if record.switched else Phase.PREPARED
            changed = replace(
                record,
                phase=back if phase is not Phase.PREPARED else phase,
                converged_at=None,
                held=False,
                aborting=True,
            )
        else:
            changed = replace(record, held=False)
        ws.store.save(replace(state, rotations={**state.rotations, key: changed}))
    return changed


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
    if cluster in ws.exchanges:
        raise BadInputError(
            f"cluster {cluster} is in agent mode: only its agent writes its cacerts, and the "
            "previous one is kept in the cluster (docs/agent.md, rollback)"
        )
    if cluster not in ws.targets:
        known = ", ".join(ws.meshes_of)
        raise BadInputError(f"unknown cluster {cluster!r} (known: {known})")
    target = ws.targets[cluster]
    if not isinstance(target, Rollbackable):
        raise BadInputError(f"cluster {cluster}: {target.description} keeps no previous cacerts")
    mesh = ws.config.meshes[ws.meshes_of[cluster]]
    with ws.store.lock():
        state = ws.store.load()
        replaced = read_cluster(ws, cluster)
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
