"""Read-only views of the live system: ``status`` and ``verify``."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from trustmgr.engine import Seen, Workspace
from trustmgr.federation import Federation
from trustmgr.pki import ObservedCA, observe
from trustmgr.state.model import ClusterRecord


@dataclass(frozen=True)
class ClusterStatus:
    cluster: str
    mesh: str
    target: str
    serial: str | None
    not_after: datetime | None
    days_left: int | None
    roots: int
    drift: str | None

    def to_json(self) -> dict[str, Any]:
        return {
            "cluster": self.cluster,
            "mesh": self.mesh,
            "target": self.target,
            "serial": self.serial,
            "notAfter": self.not_after.isoformat() if self.not_after else None,
            "daysLeft": self.days_left,
            "roots": self.roots,
            "drift": self.drift,
        }


def cluster_status(ws: Workspace, workers: int = 16) -> list[ClusterStatus]:
    """What each target really holds, compared with what trustmgr last wrote there."""
    state = ws.store.load()
    now = ws.clock()
    everything = ws.observe(workers)
    rows = []
    for mesh_name, cluster, _ in ws.config.clusters():
        target = ws.targets[cluster]
        record = state.clusters.get(cluster)
        seen = everything[cluster].observed
        if everything[cluster].error:
            rows.append(
                ClusterStatus(
                    cluster,
                    mesh_name,
                    target.description,
                    None,
                    None,
                    None,
                    0,
                    f"unreadable: {everything[cluster].error}",
                )
            )
            continue
        drift = _drift(seen, record, everything[cluster].foreign)
        days = (seen.not_after - now).days if seen and seen.not_after else None
        rows.append(
            ClusterStatus(
                cluster,
                mesh_name,
                target.description,
                seen.serial if seen else None,
                seen.not_after if seen else None,
                days,
                len(seen.bundle) if seen else 0,
                drift,
            )
        )
    return rows


def _drift(
    seen: ObservedCA | None, record: ClusterRecord | None, foreign: str | None
) -> str | None:
    if foreign is not None:
        return "not written by trustmgr" if record is None else "replaced outside trustmgr"
    if seen is None:
        return "missing" if record else "not bootstrapped"
    if record is None:
        return "not written by trustmgr"
    if seen.fingerprint != record.fingerprint:
        return "CA replaced outside trustmgr"
    if seen.digest != record.digest:
        return "files changed outside trustmgr"
    if not seen.healthy:
        return f"invalid: {seen.problems[0]}"
    return None


def verify_all(ws: Workspace, workers: int = 16) -> dict[str, list[str]]:
    """Per cluster, every reason istiod or the policy would refuse its material."""
    federation = ws.federation()
    everything = ws.observe(workers)
    return {
        cluster: verify_cluster(ws, cluster, federation, everything[cluster])
        for cluster in ws.targets
    }


def verify_cluster(
    ws: Workspace, cluster: str, federation: Federation, seen: Seen | None = None
) -> list[str]:
    mesh = ws.config.meshes[ws.meshes_of[cluster]]
    seen = seen or ws.read(cluster)
    if seen.error:
        return [seen.error]
    if seen.material is None:
        return ["no cacerts; run `trustmgr bootstrap`"]
    observed = seen.observed or observe(
        seen.material, trust_domain=mesh.trust_domain, now=ws.clock()
    )
    problems = list(observed.problems)
    bundle = federation.bundle(ws.meshes_of[cluster])
    if bundle is not None:
        missing = set(bundle.fingerprints) - set(observed.bundle)
        extra = set(observed.bundle) - set(bundle.fingerprints)
        if missing:
            problems.append(f"root-cert.pem lacks {len(missing)} root(s) the mesh must trust")
        if extra:
            problems.append(f"root-cert.pem holds {len(extra)} root(s) no federation allows")
    return problems
