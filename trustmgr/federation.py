"""Selective trust between meshes: who trusts whose roots, and why.

Knows meshes, roots and trust domains; never how a bundle is delivered.

A mesh's trust bundle is its own roots, then the roots of every mesh it
federates with (peers in name order), each root once. Istio merges all roots of
a bundle into one pool and checks a peer only by its SPIFFE trust domain
prefix, so two meshes that share a root stay apart only through distinct trust
domains and the name constraints on their CAs.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from cryptography import x509

from trustmgr.bundles import TrustBundle, fingerprint, pem
from trustmgr.config import Config


@dataclass(frozen=True)
class MeshRoots:
    """What the federation needs to know of one mesh."""

    mesh: str
    trust_domain: str
    roots: tuple[x509.Certificate, ...]
    provider: str | None
    """None for an external mesh."""

    @property
    def external(self) -> bool:
        return self.provider is None

    @property
    def constrained(self) -> bool:
        """Whether its CAs are name-constrained to its trust domain: trustmgr's are;
        an external mesh's cannot be known to be."""
        return not self.external


class Trust(StrEnum):
    OWN = "own mesh"
    FEDERATION = "federation"
    ROOT_ONLY = "shared root only"
    NONE = "none"


@dataclass(frozen=True)
class TrustCell:
    """Whether workloads of ``accepting`` accept identities of ``presenting``."""

    accepting: str
    presenting: str
    trust: Trust

    @property
    def accepted(self) -> bool:
        return self.trust in (Trust.OWN, Trust.FEDERATION)

    @property
    def why(self) -> str:
        if self.trust is Trust.ROOT_ONLY:
            return (
                f"{self.accepting} trusts a root of {self.presenting} through another mesh; "
                "only the trust-domain check keeps them apart"
            )
        return str(self.trust)


@dataclass(frozen=True)
class Finding:
    level: str  # "error" or "warning"
    message: str


class Federation:
    """The trust relations of one configuration, given each mesh's roots."""

    def __init__(self, config: Config, roots: dict[str, MeshRoots]) -> None:
        self.config = config
        self.meshes = roots

    def peers(self, mesh: str) -> list[str]:
        return self.config.federated_with(mesh)

    def bundle(self, mesh: str) -> TrustBundle | None:
        """The canonical bundle of ``mesh``; None while a member has no root yet."""
        members = [mesh, *self.peers(mesh)]
        if any(not self.meshes[m].roots for m in members):
            return None
        return TrustBundle.of(root for m in members for root in self.meshes[m].roots)

    def trusted_domains(self, mesh: str) -> list[str]:
        """Trust domains whose identities the mesh's sidecars accept."""
        return [self.meshes[m].trust_domain for m in [mesh, *self.peers(mesh)]]

    def cell(self, accepting: str, presenting: str) -> TrustCell:
        if accepting == presenting:
            return TrustCell(accepting, presenting, Trust.OWN)
        if presenting in self.peers(accepting):
            return TrustCell(accepting, presenting, Trust.FEDERATION)
        bundle = self.bundle(accepting)
        shared = bundle is not None and any(r in bundle for r in self.meshes[presenting].roots)
        return TrustCell(accepting, presenting, Trust.ROOT_ONLY if shared else Trust.NONE)

    def matrix(self) -> list[TrustCell]:
        names = list(self.meshes)
        return [self.cell(a, p) for a in names for p in names]

    def findings(self) -> list[Finding]:
        """Errors refuse the configuration; warnings say where isolation is thin."""
        out: list[Finding] = []
        names = list(self.meshes)
        owners: dict[str, list[str]] = {}
        for name in names:
            for root in self.meshes[name].roots:
                owners.setdefault(fingerprint(root), []).append(name)
        for fp, meshes in owners.items():
            for i, a in enumerate(meshes):
                for b in meshes[i + 1 :]:
                    if self.meshes[a].trust_domain == self.meshes[b].trust_domain:
                        out.append(
                            Finding(
                                "error",
                                f"meshes {a} and {b} share root {fp[:16]}… and trust domain "
                                f"{self.meshes[a].trust_domain}: they are one mesh; give each its own trust domain",
                            )
                        )
                    elif b not in self.peers(a):
                        out.append(
                            Finding(
                                "warning",
                                f"meshes {a} and {b} share root {fp[:16]}… without a federation: "
                                "isolation rests on trust-domain checks and name constraints; "
                                "give each its own provider for a hard boundary",
                            )
                        )
        return out + _external_findings(self.config)


def order_bundle(
    canonical: TrustBundle, previous: tuple[str, ...], retiring: frozenset[str] = frozenset()
) -> TrustBundle:
    """The roots of ``canonical`` in an order that keeps istiod's hot-reload
    rule: roots already in the target keep their place, new ones are appended.
    An addition then appends and a removal drops roots from where they were.

    New roots go in front instead when the bundle ends with a root that is
    ``retiring`` (being rotated out): removing it later then drops a suffix,
    still a byte substring of the file, which istiod before 1.30 requires."""
    by_fp = dict(zip(canonical.fingerprints, canonical.roots, strict=True))
    kept = [by_fp[fp] for fp in previous if fp in by_fp]
    added = [r for r in canonical.roots if r not in kept]
    if kept and previous and previous[-1] in retiring and previous[0] not in retiring:
        return TrustBundle.of([*added, *kept])
    return TrustBundle.of([*kept, *added])


def mesh_config_fragment(
    federation: Federation, mesh: str, *, multi_root: bool
) -> dict[str, object]:
    """The meshConfig that lets ``mesh``'s sidecars accept its federated peers,
    ready to merge into istiod's Helm values."""
    own = federation.meshes[mesh]
    peers = [federation.meshes[p] for p in federation.peers(mesh)]
    mesh_config: dict[str, object] = {
        "trustDomain": own.trust_domain,
        "trustDomainAliases": [p.trust_domain for p in peers],
    }
    if multi_root:
        mesh_config["caCertificates"] = [
            {"pem": "".join(pem(r).decode() for r in m.roots), "trustDomains": [m.trust_domain]}
            for m in [own, *peers]
            if m.roots
        ]
    return {"meshConfig": mesh_config}


def config_findings(config: Config) -> list[Finding]:
    """What the configuration alone shows, without asking any provider for its
    roots: meshes that share a provider share its root."""
    out: list[Finding] = []
    names = list(config.meshes)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            provider = config.meshes[a].provider
            if (
                provider
                and provider == config.meshes[b].provider
                and b not in config.federated_with(a)
            ):
                out.append(
                    Finding(
                        "warning",
                        f"meshes {a} and {b} share provider {provider}, so its root, without a "
                        "federation: isolation rests on trust-domain checks and name constraints; "
                        "give each its own provider for a hard boundary",
                    )
                )
    return out + _external_findings(config)


def _external_findings(config: Config) -> list[Finding]:
    return [
        Finding(
            "warning",
            f"federation {'/'.join(federation.meshes)} includes {member}, whose CAs "
            "may lack name constraints: its CAs could mint identities of any trust "
            "domain its peers accept",
        )
        for federation in config.federations
        for member in federation.meshes
        if config.meshes[member].external is not None
    ]
