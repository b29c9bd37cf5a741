"""The state's content, independent of where it is stored."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from enum import StrEnum
from typing import Any

from trustmgr.errors import StateError

FORMAT = 2
"""2: rotations and generations; self-signed roots stored as one unit (root.pem).
Format 1 is read as well; a release that knows only 1 refuses format 2."""
READABLE = (1, 2)


@dataclass(frozen=True)
class ClusterRecord:
    """What trustmgr last wrote to a cluster's target. No key material."""

    mesh: str
    trust_domain: str
    provider: str
    fingerprint: str
    serial: str
    not_after: datetime
    digest: str
    bundle: tuple[str, ...]
    written_at: datetime

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["not_after"] = self.not_after.isoformat()
        data["written_at"] = self.written_at.isoformat()
        data["bundle"] = list(self.bundle)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ClusterRecord:
        return cls(
            mesh=str(data["mesh"]),
            trust_domain=str(data["trust_domain"]),
            provider=str(data["provider"]),
            fingerprint=str(data["fingerprint"]),
            serial=str(data["serial"]),
            not_after=datetime.fromisoformat(data["not_after"]),
            digest=str(data["digest"]),
            bundle=tuple(str(f) for f in data["bundle"]),
            written_at=datetime.fromisoformat(data["written_at"]),
        )


@dataclass(frozen=True)
class BundleRecord:
    """A SPIFFE bundle's sequence number and the roots it had then."""

    sequence: int
    fingerprints: tuple[str, ...]


class Phase(StrEnum):
    """The phases of a root rotation, in order (DESIGN "Rotation")."""

    PREPARED = "prepared"
    TRUST_DISTRIBUTED = "trust-distributed"
    ISSUER_SWITCHED = "issuer-switched"
    OLD_REMOVED = "old-removed"
    DONE = "done"

    @property
    def order(self) -> int:
        return list(Phase).index(self)

    def next(self) -> Phase:
        return list(Phase)[self.order + 1]

    def previous(self) -> Phase:
        return list(Phase)[self.order - 1]


@dataclass(frozen=True)
class RotationRecord:
    """A root rotation of one provider, recorded before each phase's writes so a
    stopped run resumes where it was.

    ``generation`` names where the new root lives (a self-signed provider keeps
    each generation's root apart); ``old_roots`` and ``new_roots`` are
    fingerprints; ``converged_at`` is when a pass first saw every cluster hold
    the phase's material (the soak counts from there)."""

    id: str
    provider: str
    phase: Phase
    generation: str
    old_roots: tuple[str, ...]
    new_roots: tuple[str, ...]
    started_at: datetime
    phase_at: datetime
    converged_at: datetime | None = None
    held: bool = False
    """Rolled back: converge to this phase and stay until resumed."""
    aborting: bool = False
    """Aborted: converge back to prepared, then drop the rotation."""
    switched: bool = False
    """The new root has signed cluster CAs (issuer-switched was reached): workloads
    may hold certificates under it until the soak has passed, whatever comes next."""
    mesh: str = ""
    """For a move: the mesh moving from ``from_provider`` to ``provider``."""
    from_provider: str = ""

    @property
    def key(self) -> str:
        """Where the state keeps it: the provider renewing its root, or ``mesh/<m>``."""
        return f"mesh/{self.mesh}" if self.mesh else self.provider

    @property
    def what(self) -> str:
        if self.mesh:
            return f"move of mesh {self.mesh} from provider {self.from_provider} to {self.provider}"
        return f"rotation of provider {self.provider}"

    def to_json(self) -> dict[str, Any]:
        return {
            "switched": self.switched,
            "mesh": self.mesh,
            "fromProvider": self.from_provider,
            "held": self.held,
            "aborting": self.aborting,
            "id": self.id,
            "provider": self.provider,
            "phase": str(self.phase),
            "generation": self.generation,
            "oldRoots": list(self.old_roots),
            "newRoots": list(self.new_roots),
            "startedAt": self.started_at.isoformat(),
            "phaseAt": self.phase_at.isoformat(),
            "convergedAt": self.converged_at.isoformat() if self.converged_at else None,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RotationRecord:
        converged = data.get("convergedAt")
        return cls(
            id=str(data["id"]),
            provider=str(data["provider"]),
            phase=Phase(data["phase"]),
            generation=str(data["generation"]),
            old_roots=tuple(map(str, data["oldRoots"])),
            new_roots=tuple(map(str, data["newRoots"])),
            started_at=datetime.fromisoformat(data["startedAt"]),
            phase_at=datetime.fromisoformat(data["phaseAt"]),
            converged_at=datetime.fromisoformat(converged) if converged else None,
            held=bool(data.get("held", False)),
            aborting=bool(data.get("aborting", False)),
            switched=bool(data.get("switched", False)),
            mesh=str(data.get("mesh", "")),
            from_provider=str(data.get("fromProvider", "")),
        )


@dataclass(frozen=True)
class State:
    """``version`` increases on every save; a save carrying a stale version is refused.

    ``exported`` holds the SPIFFE bundles trustmgr published per mesh;
    ``imported`` the last bundle accepted from each external mesh."""

    version: int = 0
    clusters: dict[str, ClusterRecord] = field(default_factory=dict)
    exported: dict[str, BundleRecord] = field(default_factory=dict)
    imported: dict[str, BundleRecord] = field(default_factory=dict)
    rotations: dict[str, RotationRecord] = field(default_factory=dict)
    """The rotation in progress per provider."""
    generations: dict[str, str] = field(default_factory=dict)
    """Per self-signed provider, the generation whose root is current ("" the first)."""
    agents: dict[str, str] = field(default_factory=dict)
    """Per agent-mode cluster, the key id of its agent, trusted at its first report
    (a cluster's ``agentKey`` in the configuration overrides it)."""

    def with_cluster(self, name: str, record: ClusterRecord) -> State:
        return replace(self, clusters={**self.clusters, name: record})

    def to_json(self) -> dict[str, Any]:
        def bundles(records: dict[str, BundleRecord]) -> dict[str, Any]:
            return {
                k: {"sequence": r.sequence, "fingerprints": list(r.fingerprints)}
                for k, r in sorted(records.items())
            }

        return {
            "format": FORMAT,
            "version": self.version,
            "clusters": {name: r.to_json() for name, r in sorted(self.clusters.items())},
            "exported": bundles(self.exported),
            "imported": bundles(self.imported),
            "rotations": {k: r.to_json() for k, r in sorted(self.rotations.items())},
            "generations": dict(sorted(self.generations.items())),
            "agents": dict(sorted(self.agents.items())),
        }

    @classmethod
    def from_json(cls, data: Any, source: str) -> State:
        try:
            if data.get("format") not in READABLE:
                raise StateError(
                    f"{source}: state format {data.get('format')!r} is not {FORMAT}; "
                    "use the trustmgr version that wrote it"
                )

            def bundles(key: str) -> dict[str, BundleRecord]:
                return {
                    str(k): BundleRecord(int(v["sequence"]), tuple(map(str, v["fingerprints"])))
                    for k, v in data.get(key, {}).items()
                }

            return cls(
                version=int(data["version"]),
                clusters={str(k): ClusterRecord.from_json(v) for k, v in data["clusters"].items()},
                exported=bundles("exported"),
                imported=bundles("imported"),
                rotations={
                    str(k): RotationRecord.from_json(v)
                    for k, v in data.get("rotations", {}).items()
                },
                generations={str(k): str(v) for k, v in data.get("generations", {}).items()},
                agents={str(k): str(v) for k, v in data.get("agents", {}).items()},
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise StateError(
                f"{source}: the state is malformed ({type(exc).__name__}: {exc}); "
                "restore it from a backup or remove it to start over"
            ) from None
