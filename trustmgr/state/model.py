"""The state's content, independent of where it is stored."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from typing import Any

from trustmgr.errors import StateError

FORMAT = 1


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


@dataclass(frozen=True)
class State:
    """``version`` increases on every save; a save carrying a stale version is refused.

    ``exported`` holds the SPIFFE bundles trustmgr published per mesh;
    ``imported`` the last bundle accepted from each external mesh."""

    version: int = 0
    clusters: dict[str, ClusterRecord] = field(default_factory=dict)
    exported: dict[str, BundleRecord] = field(default_factory=dict)
    imported: dict[str, BundleRecord] = field(default_factory=dict)

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
        }

    @classmethod
    def from_json(cls, data: Any, source: str) -> State:
        try:
            if data.get("format") != FORMAT:
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
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise StateError(
                f"{source}: the state is malformed ({type(exc).__name__}: {exc}); "
                "restore it from a backup or remove it to start over"
            ) from None
