"""Read-only views of the live system: ``status`` and ``verify``."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from trustmgr.bundles import TrustBundle
from trustmgr.engine import Reading, Workspace
from trustmgr.observe import Owner, observe_all, read_clusters
from trustmgr.planner import decide
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
    agent: dict[str, Any] | None = None
    """Agent mode: what the agent reports it applied (sequence, phase, reported at)."""

    def to_json(self) -> dict[str, Any]:
        return {
            "agent": self.agent,
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
    everything = read_clusters(ws, workers)
    rows = []
    for mesh_name, cluster, _ in ws.config.clusters():
        where = ws.description(cluster)
        record = state.clusters.get(cluster)
        seen = everything[cluster].ca
        if everything[cluster].error:
            rows.append(
                ClusterStatus(
                    cluster,
                    mesh_name,
                    where,
                    None,
                    None,
                    None,
                    0,
                    f"unreadable: {everything[cluster].error}",
                )
            )
            continue
        drift = _drift(everything[cluster], record)
        days = (seen.not_after - now).days if seen and seen.not_after else None
        rows.append(
            ClusterStatus(
                cluster,
                mesh_name,
                where,
                seen.serial if seen else None,
                seen.not_after if seen else None,
                days,
                len(seen.bundle) if seen else 0,
                drift,
                _applied(everything[cluster]),
            )
        )
    return rows


def _applied(reading: Reading) -> dict[str, Any] | None:
    report = reading.agent.report if reading.agent is not None else None
    if report is None:
        return None
    return {
        "sequence": report.sequence,
        "phase": report.phase or None,
        "reportedAt": report.reported_at.isoformat() if report.reported_at else None,
    }


def _drift(reading: Reading, record: ClusterRecord | None) -> str | None:
    seen = reading.ca
    if reading.agent is not None:
        return _agent_drift(reading)
    if reading.owner is Owner.FOREIGN:
        return "not written by trustmgr" if record is None else "replaced outside trustmgr"
    if seen is None:
        return "missing" if record else "not bootstrapped"
    if reading.stamp is not None and not reading.untouched:
        return "files changed outside trustmgr"
    if reading.exposed is not None:
        return f"key exposed: {reading.exposed}"
    if record is None:
        return (
            "written by trustmgr, not recorded" if reading.untouched else "not written by trustmgr"
        )
    if seen.fingerprint != record.fingerprint:
        return "CA replaced outside trustmgr"
    if seen.digest != record.digest:
        return "files changed outside trustmgr"
    if not seen.healthy:
        return f"invalid: {seen.problems[0]}"
    return None


def _agent_drift(reading: Reading) -> str | None:
    """What an agent-mode cluster's agent reports, against what was published."""
    view = reading.agent
    assert view is not None
    if view.report_problem:
        return view.report_problem
    if view.report is None:
        return "no report from the agent yet"
    if view.report.error:
        return f"agent: {view.report.error}"
    if reading.ca is None:
        return "agent: no cacerts yet"
    if view.published is not None and view.report.sequence < view.published.sequence:
        return f"agent has not applied sequence {view.published.sequence} yet"
    if not reading.ca.healthy:
        return f"invalid: {reading.ca.problems[0]}"
    return None


def verify_all(ws: Workspace, workers: int = 16) -> dict[str, list[str]]:
    """Per cluster, every reason istiod or the policy would refuse its material,
    and any difference from the bundle it should hold now (during a rotation:
    at the rotation's current phase)."""
    observation = observe_all(ws, workers=workers)
    plan = decide(ws.config, observation, advance=False)
    return {
        c.cluster: verify_cluster(
            observation.clusters[c.cluster], c.desired.bundle if c.desired else None
        )
        for c in plan.clusters
    }


def verify_cluster(reading: Reading, bundle: TrustBundle | None) -> list[str]:
    if reading.error:
        return [reading.error]
    if reading.ca is None:
        if reading.agent is not None:
            return ["the agent reports no cacerts yet; see `trustmgr status`"]
        return ["no cacerts; run `trustmgr bootstrap`"]
    observed = reading.ca
    problems = list(observed.problems)
    if reading.exposed is not None:
        problems.append(f"{reading.exposed}; `trustmgr reconcile` issues a CA with a new key")
    if bundle is not None:
        problems += bundle_problems(observed.bundle, bundle)
    return problems


def bundle_problems(held: tuple[str, ...], bundle: TrustBundle) -> list[str]:
    """How a held bundle (fingerprints) differs from the one the federation gives."""
    problems = []
    missing = set(bundle.fingerprints) - set(held)
    extra = set(held) - set(bundle.fingerprints)
    if missing:
        problems.append(f"root-cert.pem lacks {len(missing)} root(s) the mesh must trust")
    if extra:
        problems.append(f"root-cert.pem holds {len(extra)} root(s) no federation allows")
    return problems


def held_trust(ws: Workspace, workers: int = 16) -> dict[str, list[str]]:
    """Per cluster whose bundle is not yet the one the federation gives its mesh
    now, how it differs: what the matrix shows is not yet what the cluster does.
    Agent-mode clusters are read from their agents' reports."""
    observation = observe_all(ws, workers=workers)
    plan = decide(ws.config, observation, advance=False)
    out = {}
    for c in plan.clusters:
        ca = observation.clusters[c.cluster].ca
        if ca is not None and c.desired is not None and c.desired.bundle is not None:
            problems = bundle_problems(ca.bundle, c.desired.bundle)
            if problems:
                out[c.cluster] = problems
    return out
