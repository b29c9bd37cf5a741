"""Observe: read everything a pass decides on into one value, and decide nothing.

What is read, in one vocabulary:

- a :class:`Reading` of each cluster's target: the material, what it says
  (:class:`~trustmgr.pki.ObservedCA`), and whose it is (:class:`Owner`);
- each provider's roots, and for a provider that keeps its own root but has
  none yet, the root it would create (made in memory, not stored);
- the SPIFFE bundles of external meshes;
- the state store's content.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum

from cryptography import x509

from trustmgr import external, spiffe
from trustmgr.agent.document import Desired, DocumentError, Report, open_report, unseal
from trustmgr.errors import BadMaterialError, TargetError, TrustmgrError
from trustmgr.pki import CACerts, ObservedCA, observe, observe_public
from trustmgr.providers import Provider, RootKeeper
from trustmgr.spiffe import SpiffeBundle
from trustmgr.state.model import State
from trustmgr.targets import Target
from trustmgr.workspace import Workspace

log = logging.getLogger(__name__)


class Owner(StrEnum):
    """Whose the cacerts a target holds are."""

    NOBODY = "nobody"
    """The target holds no cacerts."""
    TRUSTMGR = "trustmgr"
    """Written by trustmgr (the target's own marks say so: a label, a ``..data`` link)."""
    FOREIGN = "foreign"
    """Made by hand or by other tools; replaced only when adopting."""


@dataclass(frozen=True)
class Reading:
    """One reading of a cluster's target."""

    material: CACerts | None
    ca: ObservedCA | None
    owner: Owner
    why_foreign: str | None = None
    """Why the material is not trustmgr's, in the target's words."""
    error: str | None = None
    """Why the target could not be read; nothing else is known then."""
    stamp: str | None = None
    """The digest trustmgr recorded beside the files when it wrote them: equal to
    ``ca.digest`` when the material is exactly what trustmgr wrote."""
    exposed: str | None = None
    """Why the CA key can be read by others than its owner, if it can."""
    agent: AgentView | None = None
    """For a cluster in agent mode: its exchange, as read."""

    @property
    def untouched(self) -> bool:
        """The material is exactly what trustmgr wrote, by the target's own record."""
        return (
            self.owner is Owner.TRUSTMGR
            and self.ca is not None
            and self.stamp is not None
            and self.stamp == self.ca.digest
        )


def unreadable(error: str) -> Reading:
    return Reading(None, None, Owner.NOBODY, error=error)


@dataclass(frozen=True)
class AgentView:
    """An agent-mode cluster's exchange: what the central run published there and
    what the agent reported. Only public material: the key stays in the cluster."""

    published: Desired | None
    """The desired document there, if the publisher key's signature holds."""
    published_sequence: int = 0
    """Its sequence, even if it could not be trusted (the next one goes beyond it)."""
    published_problem: str | None = None
    """Why what is there cannot stand (tampered, unreadable): published again."""
    report: Report | None = None
    report_problem: str | None = None
    first_use: str = ""
    """The key id of the agent whose report is trusted now for the first time
    ("" when the cluster's agent was known, or pinned by ``agentKey``)."""


@dataclass(frozen=True)
class Observation:
    """Everything one pass decides on, read at ``taken_at``."""

    clusters: Mapping[str, Reading]
    roots: Mapping[str, tuple[x509.Certificate, ...]]
    """Each provider's roots as it reports them now."""
    prepared: Mapping[str, x509.Certificate]
    """For providers that keep their own root and have none: the root they would create."""
    external: Mapping[str, SpiffeBundle]
    state: State
    taken_at: datetime
    incoming: Mapping[str, tuple[x509.Certificate, ...]] = field(default_factory=dict)
    """Per provider under rotation, the roots of the new authority."""
    upcoming: Mapping[str, tuple[str, x509.Certificate]] = field(default_factory=dict)
    """Per self-signed provider whose root entered ``rotation.rootRenewBefore``, with
    no rotation yet: the generation and root a rotation would start with."""

    def roots_of(self, provider: str) -> tuple[x509.Certificate, ...]:
        """The provider's roots once prepared roots are kept."""
        if provider in self.prepared:
            return (self.prepared[provider],)
        return self.roots.get(provider, ())


def read_cluster(ws: Workspace, cluster: str) -> Reading:
    """Read one target; a failure to read is part of what is read."""
    trust_domain = ws.config.meshes[ws.meshes_of[cluster]].trust_domain
    if cluster in ws.exchanges:
        return read_agent(ws, cluster, trust_domain)
    return read_target(ws.targets[cluster], trust_domain, ws.clock())


def read_target(target: Target, trust_domain: str, now: datetime) -> Reading:
    """What ``target`` holds, checked for ``trust_domain`` at ``now``."""
    try:
        material = target.read()
    except TargetError as exc:
        return unreadable(str(exc))
    if material is None:
        return Reading(None, None, Owner.NOBODY)
    ca = observe(material, trust_domain=trust_domain, now=now)
    foreign = target.foreign
    return Reading(
        material,
        ca,
        Owner.FOREIGN if foreign is not None else Owner.TRUSTMGR,
        why_foreign=foreign,
        stamp=getattr(target, "stamp", None),
        exposed=getattr(target, "exposed", None),
    )


def read_agent(ws: Workspace, cluster: str, trust_domain: str) -> Reading:
    """An agent-mode cluster, from its exchange: the agent's report stands for
    the target (its public part), the publication is checked with the publisher key.

    The exchange is written by parties weaker than the cluster's cacerts: what
    cannot be read or understood there is this cluster's problem, in one line,
    and never stops the reading of the others."""
    try:
        return _read_agent(ws, cluster, trust_domain)
    except Exception as exc:  # a bug met reading one cluster fails that cluster only
        # The type alone: the exception may quote what the exchange holds.
        log.warning("cluster %s: unexpected %s reading its exchange", cluster, type(exc).__name__)
        log.debug("cluster %s: unexpected error", cluster, exc_info=True)
        return unreadable(
            f"cluster {cluster}: its exchange could not be read (unexpected "
            f"{type(exc).__name__}; run with -vv for the traceback)"
        )


def _read_agent(ws: Workspace, cluster: str, trust_domain: str) -> Reading:
    exchange = ws.exchanges[cluster]
    try:
        published_bytes = exchange.read_desired()
        report_bytes = exchange.read_report()
        key = ws.publisher()
    except TrustmgrError as exc:
        return unreadable(str(exc))
    published, sequence, problem = None, 0, None
    if published_bytes is not None:
        try:
            if key is None:
                raise DocumentError(f"{exchange.where}: signed with a key this state does not hold")
            published = unseal(published_bytes, key.public_key(), where=exchange.where)
            sequence = published.sequence
        except DocumentError as exc:
            problem = str(exc)
            with contextlib.suppress(DocumentError):  # the next one is numbered past it
                sequence = unseal(published_bytes, None, where=exchange.where).sequence
    report, report_problem, first_use = None, None, ""
    if report_bytes is not None:
        try:
            report, reporter = open_report(report_bytes, where=exchange.where)
            if report.cluster != cluster:
                raise BadMaterialError(
                    f"{exchange.where}: the report is of cluster {report.cluster}"
                )
            expected = ws.trusted_agent(cluster)
            if expected is None:
                first_use = reporter
            elif reporter != expected:
                raise BadMaterialError(
                    f"{exchange.where}: the report is signed by agent key {reporter[:16]}…, "
                    f"this cluster's agent is {expected[:16]}…: refusing it (for an agent "
                    f"installed anew, set clusters.{cluster}.agentKey to what `trustmgr agent "
                    "identity` prints there)"
                )
            report.csr_request()  # a CSR that does not parse is the report's problem
        except BadMaterialError as exc:
            report, report_problem, first_use = None, str(exc), ""
    view = AgentView(published, sequence, problem, report, report_problem, first_use)
    if report is None or not report.ca_cert:
        return Reading(None, None, Owner.NOBODY, agent=view)
    public = CACerts(
        report.ca_cert.encode(), b"", report.cert_chain.encode(), report.root_cert.encode()
    )
    ca = observe_public(public, trust_domain=trust_domain, now=ws.clock(), reported=report.problems)
    if report.foreign:
        return Reading(None, ca, Owner.FOREIGN, why_foreign=report.foreign, agent=view)
    # The agent is trustmgr: what it holds is what it wrote.
    return Reading(None, ca, Owner.TRUSTMGR, stamp=ca.digest, agent=view)


def read_clusters(ws: Workspace, workers: int = 16) -> dict[str, Reading]:
    """Read every target, ``workers`` at a time."""
    names = list(ws.meshes_of)
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(names)))) as pool:
        return dict(zip(names, pool.map(lambda c: read_cluster(ws, c), names), strict=True))


def provider_roots(providers: Mapping[str, Provider]) -> dict[str, tuple[x509.Certificate, ...]]:
    """Each provider's roots: one call each (a network call for Vault and AWS)."""
    return {name: provider.roots() for name, provider in providers.items()}


def external_bundles(ws: Workspace) -> dict[str, SpiffeBundle]:
    """The current SPIFFE bundle of every external mesh."""
    out = {}
    for name, mesh in ws.config.meshes.items():
        if mesh.external is not None:
            data, where = external.fetch(mesh.external.spiffe_bundle, mesh=name)
            out[name] = spiffe.decode(data, source=where, now=ws.clock())
    return out


def observe_all(
    ws: Workspace,
    *,
    workers: int = 16,
    clusters: Callable[[], dict[str, Reading]] | None = None,
    prepare: bool = True,
) -> Observation:
    """One observation of everything. ``clusters`` replaces the reading of the
    targets; ``prepare`` False makes no root for providers that have none."""
    roots = provider_roots(ws.providers)
    used = {m.provider for m in ws.config.meshes.values()}
    prepared = {
        name: provider.prepare_root()
        for name, provider in ws.providers.items()
        if prepare and name in used and not roots[name] and isinstance(provider, RootKeeper)
    }
    state = ws.store.load()
    return Observation(
        clusters=clusters() if clusters is not None else read_clusters(ws, workers),
        roots=roots,
        prepared=prepared,
        external=external_bundles(ws),
        state=state,
        taken_at=ws.clock(),
        incoming=provider_roots(ws.incoming),
        upcoming=_upcoming(ws, roots, state) if prepare else {},
    )


def _upcoming(
    ws: Workspace, roots: Mapping[str, tuple[x509.Certificate, ...]], state: State
) -> dict[str, tuple[str, x509.Certificate]]:
    """The next root of each self-signed provider whose roots all end inside
    ``rotation.rootRenewBefore``, made in memory (a rotation would keep it)."""
    window = ws.config.rotation.root_renew_before
    if not window:
        return {}
    now = ws.clock()
    out = {}
    used = {m.provider for m in ws.config.meshes.values()}
    for name, provider in ws.providers.items():
        have = roots.get(name, ())
        if (
            name not in used
            or name in state.rotations
            or not have
            or not isinstance(provider, RootKeeper)
            or max(r.not_valid_after_utc for r in have) - window > now
        ):
            continue
        generation = f"{now:%Y%m%d%H%M%S}"
        upcoming = ws.upcoming(name, generation)
        out[name] = (generation, upcoming.prepare_root())
    return out
