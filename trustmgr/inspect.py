"""Read-only views of the live system: ``status`` and ``verify``."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from trustmgr.engine import Workspace
from trustmgr.errors import TargetError
from trustmgr.federation import Federation
from trustmgr.pki import observe


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


def cluster_status(ws: Workspace) -> list[ClusterStatus]:
    state = ws.store.load()
    now = ws.clock()
    rows = []
    for mesh_name, cluster, _ in ws.config.clusters():
        target = ws.targets[cluster]
        record = state.clusters.get(cluster)
        trust_domain = ws.config.meshes[mesh_name].trust_domain
        try:
            material = target.read()
        except TargetError as exc:
            rows.append(
                ClusterStatus(
                    cluster,
                    mesh_name,
                    target.description,
                    None,
                    None,
                    None,
                    0,
                    f"unreadable: {exc}",
                )
            )
            continue
        seen = observe(material, trust_domain=trust_domain, now=now) if material else None
        drift: str | None = None
        if seen is None:
            drift = "missing" if record else "not bootstrapped"
        elif record is None:
            drift = "not written by trustmgr"
        elif seen.fingerprint != record.fingerprint:
            drift = "CA replaced outside trustmgr"
        elif seen.digest != record.digest:
            drift = "files changed outside trustmgr"
        elif not seen.healthy:
            drift = f"invalid: {seen.problems[0]}"
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


def verify_all(ws: Workspace) -> dict[str, list[str]]:
    """Per cluster, every reason istiod or the policy would refuse its material."""
    federation = ws.federation()
    return {cluster: verify_cluster(ws, cluster, federation) for cluster in ws.targets}


def verify_cluster(ws: Workspace, cluster: str, federation: Federation) -> list[str]:
    mesh = ws.config.meshes[ws.meshes_of[cluster]]
    try:
        material = ws.targets[cluster].read()
    except TargetError as exc:
        return [str(exc)]
    if material is None:
        return ["no cacerts; run `trustmgr bootstrap`"]
    seen = observe(material, trust_domain=mesh.trust_domain, now=ws.clock())
    problems = list(seen.problems)
    bundle = federation.bundle(ws.meshes_of[cluster])
    if bundle is not None:
        missing = set(bundle.fingerprints) - set(seen.bundle)
        extra = set(seen.bundle) - set(bundle.fingerprints)
        if missing:
            problems.append(f"root-cert.pem lacks {len(missing)} root(s) the mesh must trust")
        if extra:
            problems.append(f"root-cert.pem holds {len(extra)} root(s) no federation allows")
    return problems
