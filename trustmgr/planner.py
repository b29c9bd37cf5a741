"""Decide: configuration + observation → a plan of typed actions with reasons.
Pure: no I/O; the time is the observation's.

Each policy looks at one cluster and either says why it needs an action or
passes; the first that speaks decides (cert-manager's renewal policies)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from cryptography import x509

from trustmgr.agent.config import AGENT_OWN
from trustmgr.agent.document import Desired, Signed, Signer, csr_digest
from trustmgr.bundles import TrustBundle, fingerprint
from trustmgr.config import Config
from trustmgr.errors import BadInputError
from trustmgr.federation import Federation, MeshRoots, order_bundle
from trustmgr.observe import Observation, Owner, Reading
from trustmgr.pki import ObservedCA, csr_problems
from trustmgr.providers.keys import KeyAlgorithm
from trustmgr.rotation import RotationStep, gate, root_sets
from trustmgr.spiffe import SpiffeBundle
from trustmgr.state.model import ClusterRecord, Phase, RotationRecord


class Action(StrEnum):
    NONE = "none"
    ISSUE = "issue"
    RENEW = "renew"
    UPDATE_BUNDLE = "update-bundle"
    RECORD = "record"
    """The target holds exactly what trustmgr wrote, as desired, but the state has no
    record of it (a run stopped before saving): recorded, nothing written to the target."""
    FAIL = "fail"
    REFUSE = "refuse"
    """The target holds cacerts trustmgr did not create; only ``--adopt`` replaces it."""
    PUBLISH = "publish"
    """Agent mode: publish the cluster's desired document for its agent."""
    SIGN = "sign"
    """Agent mode: sign the CSR the agent published, and publish the answer."""
    AWAIT = "await-agent"
    """Agent mode: what is published is right; the agent has yet to act on it.
    Nothing to do here, but the cluster has not converged."""

    @property
    def writes(self) -> bool:
        """Whether the action writes the cluster's target."""
        return self in (Action.ISSUE, Action.RENEW, Action.UPDATE_BUNDLE)

    @property
    def changes(self) -> bool:
        """Whether applying the plan does something for this action."""
        return self not in (Action.NONE, Action.AWAIT)


class Reload(StrEnum):
    """How istiod takes a change of its cacerts."""

    HOT = "hot"
    RESTART = "restart"


@dataclass(frozen=True)
class DesiredCluster:
    name: str
    mesh: str
    trust_domain: str
    provider: str
    key_algorithm: KeyAlgorithm
    ttl: timedelta
    renew_before: timedelta
    bundle: TrustBundle | None
    """None while a mesh of the bundle has no root (an external mesh's bundle is empty)."""
    own_roots: tuple[str, ...] = ()
    """Fingerprints of the mesh provider's roots: the CA must chain to one of them."""
    istio_version: str | None = None
    multi_root: bool = False
    adopt: bool = False
    """The operator allows replacing cacerts that trustmgr did not create."""
    incoming: str = ""
    """The rotation whose incoming authority signs (a renewed root); "" for ``provider``."""
    organization: str | None = None


@dataclass(frozen=True)
class ClusterPlan:
    cluster: str
    mesh: str
    action: Action
    reason: str
    message: str
    reload: Reload = Reload.HOT
    desired: DesiredCluster | None = field(default=None, compare=False, repr=False)
    document: Desired | None = field(default=None, compare=False, repr=False)
    """Agent mode: the desired document to publish (without its sequence)."""
    trust_agent: str = ""
    """Agent mode: the key id of the cluster's agent, trusted from now on (its
    first report); recorded in the state."""

    @property
    def pending(self) -> bool:
        """The cluster has not converged to what is desired."""
        return self.action is not Action.NONE

    @property
    def changes(self) -> bool:
        """Applying the plan does something for this cluster."""
        return self.action.changes or bool(self.trust_agent)

    @property
    def restarts(self) -> bool:
        """Whether the write needs istiod restarted (by trustmgr or by hand)."""
        return self.action.writes and self.reload is Reload.RESTART


@dataclass(frozen=True)
class ProviderPlan:
    provider: str
    create_root: bool
    fingerprint: str = ""
    """The SHA-256 fingerprint of the root to be created."""


@dataclass(frozen=True)
class Plan:
    providers: tuple[ProviderPlan, ...]
    clusters: tuple[ClusterPlan, ...]
    generated_at: datetime = field(compare=False)
    rotations: tuple[RotationStep, ...] = ()
    rotations_before: Mapping[str, RotationRecord] = field(default_factory=dict, compare=False)

    @property
    def rotation_changes(self) -> tuple[RotationStep, ...]:
        """Steps that change what the state records of their rotation."""
        return tuple(
            s
            for s in self.rotations
            if s.changes_state or s.record != self.rotations_before.get(s.key)
        )

    @property
    def pending(self) -> bool:
        return (
            any(p.create_root for p in self.providers)
            or any(c.changes for c in self.clusters)
            or bool(self.rotation_changes)
        )


Verdict = tuple[Action, str, str] | None
Policy = Callable[[DesiredCluster, Reading, ClusterRecord | None, datetime], Verdict]


def _unreadable(d: DesiredCluster, r: Reading, rec: ClusterRecord | None, now: datetime) -> Verdict:
    if r.error:
        return Action.FAIL, "TargetUnreadable", r.error
    return None


def _not_managed(
    d: DesiredCluster, r: Reading, rec: ClusterRecord | None, now: datetime
) -> Verdict:
    if r.owner is not Owner.FOREIGN:
        return None
    if d.adopt:
        return (
            Action.ISSUE,
            "Adopt",
            f"{r.why_foreign}; replacing it, the previous one kept for rollback",
        )
    return (
        Action.REFUSE,
        "NotManaged",
        f"{r.why_foreign}; to replace it, keeping the previous one for `trustmgr rollback`, "
        "run `trustmgr bootstrap --adopt`",
    )


def _missing(d: DesiredCluster, r: Reading, rec: ClusterRecord | None, now: datetime) -> Verdict:
    if r.ca is None:
        return Action.ISSUE, "Missing", "no cacerts yet"
    return None


def _expired(d: DesiredCluster, r: Reading, rec: ClusterRecord | None, now: datetime) -> Verdict:
    m = r.ca
    if m is not None and m.not_after is not None and now >= m.not_after:
        return Action.ISSUE, "Expired", f"the cluster CA expired at {m.not_after:%Y-%m-%d %H:%M}Z"
    return None


def _trust_domain_changed(
    d: DesiredCluster, r: Reading, rec: ClusterRecord | None, now: datetime
) -> Verdict:
    m = r.ca
    if m is not None and m.trust_domain is not None and m.trust_domain != d.trust_domain:
        return (
            Action.ISSUE,
            "TrustDomainChanged",
            f"the CA is for trust domain {m.trust_domain}, the mesh's is now {d.trust_domain}",
        )
    return None


def _invalid(d: DesiredCluster, r: Reading, rec: ClusterRecord | None, now: datetime) -> Verdict:
    m = r.ca
    if m is not None and (m.fingerprint is None or not m.healthy):
        return Action.ISSUE, "Invalid", m.problems[0] if m.problems else "unreadable material"
    return None


def _key_exposed(
    d: DesiredCluster, r: Reading, rec: ClusterRecord | None, now: datetime
) -> Verdict:
    if r.exposed is not None:
        return Action.ISSUE, "KeyExposed", f"{r.exposed}; issuing a CA with a new key"
    return None


def _edited(d: DesiredCluster, r: Reading, rec: ClusterRecord | None, now: datetime) -> Verdict:
    """Material changed after trustmgr wrote it. The target's own record of what
    was written decides where there is one; else the state's record."""
    m = r.ca
    if m is None or r.untouched:
        return None
    if r.stamp is not None:
        return Action.ISSUE, "Drift", "the files were changed outside trustmgr"
    if rec is None:
        return Action.ISSUE, "Unrecorded", "holds a CA trustmgr has no record of writing"
    if m.fingerprint != rec.fingerprint:
        return (
            Action.ISSUE,
            "Drift",
            f"holds CA {(m.fingerprint or '')[:16]}…, trustmgr wrote {rec.fingerprint[:16]}…",
        )
    if m.digest != rec.digest:
        return Action.ISSUE, "Drift", "the files were changed outside trustmgr"
    return None


def _issuer_changed(
    d: DesiredCluster, r: Reading, rec: ClusterRecord | None, now: datetime
) -> Verdict:
    m = r.ca
    if d.bundle is None or m is None:
        return None
    if m.chain_root not in d.own_roots or (rec is not None and rec.provider != d.provider):
        return (
            Action.ISSUE,
            "IssuerChanged",
            f"the CA is not signed by a current root of provider {d.provider}",
        )
    return None


def _key_algorithm_changed(
    d: DesiredCluster, r: Reading, rec: ClusterRecord | None, now: datetime
) -> Verdict:
    m = r.ca
    if m is not None and m.key_algorithm is not d.key_algorithm:
        return (
            Action.ISSUE,
            "KeyAlgorithmChanged",
            f"the CA key is {m.key_algorithm}, configured {d.key_algorithm}",
        )
    return None


def _renewal_due(
    d: DesiredCluster, r: Reading, rec: ClusterRecord | None, now: datetime
) -> Verdict:
    m = r.ca
    if m is not None and m.not_after is not None and now >= m.not_after - d.renew_before:
        if m.issuer_not_after is not None and m.not_after >= m.issuer_not_after:
            return None  # a new CA would end no later: renewing every run changes nothing
        left = m.not_after - now
        return (
            Action.RENEW,
            "RenewalDue",
            f"expires in {_human(left)}, inside renewBefore {_human(d.renew_before)}",
        )
    return None


def _issuer_expiring(
    d: DesiredCluster, r: Reading, rec: ClusterRecord | None, now: datetime
) -> Verdict:
    m = r.ca
    if (
        m is not None
        and m.not_after is not None
        and m.issuer_not_after is not None
        and m.not_after >= m.issuer_not_after
        and now >= m.not_after - d.renew_before
    ):
        return (
            Action.NONE,
            "IssuerExpiring",
            f"the CA ends with its issuer on {m.issuer_not_after:%Y-%m-%d}; renewing cannot "
            f"extend it: rotate the provider's root",
        )
    return None


def _bundle_changed(
    d: DesiredCluster, r: Reading, rec: ClusterRecord | None, now: datetime
) -> Verdict:
    m = r.ca
    if m is not None and d.bundle is not None and m.bundle != d.bundle.fingerprints:
        added = len(set(d.bundle.fingerprints) - set(m.bundle))
        removed = len(set(m.bundle) - set(d.bundle.fingerprints))
        return (
            Action.UPDATE_BUNDLE,
            "BundleChanged",
            f"trust bundle: {added} root(s) to add, {removed} to remove",
        )
    return None


def _unrecorded(d: DesiredCluster, r: Reading, rec: ClusterRecord | None, now: datetime) -> Verdict:
    """Exactly what trustmgr wrote and as desired, but not in the state: a run
    stopped before saving. Recorded rather than issued again."""
    if (
        r.untouched
        and r.ca is not None
        and (rec is None or rec.digest != r.ca.digest or rec.provider != d.provider)
    ):
        return Action.RECORD, "Unrecorded", "holds what trustmgr wrote; recording it"
    return None


POLICIES: tuple[Policy, ...] = (
    _unreadable,
    _not_managed,
    _missing,
    _expired,
    _trust_domain_changed,
    _invalid,
    _edited,
    _key_exposed,
    _issuer_changed,
    _key_algorithm_changed,
    _renewal_due,
    _bundle_changed,
    _unrecorded,
    _issuer_expiring,
)


def _human(delta: timedelta) -> str:
    hours = int(delta.total_seconds() // 3600)
    return f"{hours // 24}d{hours % 24}h" if hours >= 24 else f"{max(hours, 0)}h"


def _version_tuple(version: str | None) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split(".")) if version else (0,)


def _contiguous(inner: tuple[str, ...], outer: tuple[str, ...]) -> bool:
    n = len(inner)
    return any(outer[i : i + n] == inner for i in range(len(outer) - n + 1))


def bundle_reload(
    old: tuple[str, ...], new: tuple[str, ...], *, multi_root: bool, istio_version: str | None
) -> Reload:
    """Whether istiod hot-reloads root-cert.pem changing from ``old`` to ``new``
    (root fingerprints, in file order). FACTS: only with ISTIO_MULTIROOT_MESH, and
    only if one set holds the other; before 1.30 as a byte substring of the file,
    which for trustmgr's canonical PEM is a contiguous run of the same roots."""
    if old == new:
        return Reload.HOT
    if not multi_root:
        return Reload.RESTART
    if istio_version is None or _version_tuple(istio_version) >= (1, 30):
        ok = set(old) <= set(new) or set(new) <= set(old)
    else:
        ok = _contiguous(old, new) or _contiguous(new, old)
    return Reload.HOT if ok else Reload.RESTART


def change_reload(
    old: ObservedCA,
    new_bundle: tuple[str, ...] | None,
    *,
    ca_changes: bool,
    multi_root: bool,
    istio_version: str | None,
) -> Reload:
    """Whether istiod hot-reloads its cacerts changing from ``old`` to a CA (new
    if ``ca_changes``) under the roots ``new_bundle`` (None: not known yet)."""
    if ca_changes and istio_version is not None and _version_tuple(istio_version) < (1, 18):
        return Reload.RESTART  # intermediate hot reload is on by default only since 1.18
    if new_bundle is None:
        return Reload.HOT
    return bundle_reload(old.bundle, new_bundle, multi_root=multi_root, istio_version=istio_version)


def _reload(d: DesiredCluster, r: Reading, action: Action) -> Reload:
    if not action.writes or r.ca is None:
        return Reload.HOT
    return change_reload(
        r.ca,
        d.bundle.fingerprints if d.bundle is not None else None,
        ca_changes=action is not Action.UPDATE_BUNDLE,
        multi_root=d.multi_root,
        istio_version=d.istio_version,
    )


def plan_cluster(
    d: DesiredCluster, r: Reading, record: ClusterRecord | None, now: datetime
) -> ClusterPlan:
    """One cluster's plan: the first policy that speaks decides."""
    for policy in POLICIES:
        verdict = policy(d, r, record, now)
        if verdict is not None:
            action, reason, message = verdict
            return ClusterPlan(d.name, d.mesh, action, reason, message, _reload(d, r, action), d)
    return ClusterPlan(d.name, d.mesh, Action.NONE, "UpToDate", "nothing to do", desired=d)


def federation_of(
    config: Config,
    roots: Callable[[str], tuple[x509.Certificate, ...]],
    external: Mapping[str, SpiffeBundle],
) -> Federation:
    """Every mesh with its roots: ``roots(mesh)`` for issued meshes, the imported
    SPIFFE bundle's for external ones."""
    meshes = {}
    for name, mesh in config.meshes.items():
        if mesh.external is not None:
            mesh_roots = external[name].roots if name in external else ()
        else:
            mesh_roots = roots(name)
        meshes[name] = MeshRoots(name, mesh.trust_domain, mesh_roots, mesh.provider)
    return Federation(config, meshes)


def desired_cluster(
    config: Config,
    cluster: str,
    mesh_name: str,
    federation: Federation,
    reading: Reading,
    *,
    adopt: bool,
    retiring: frozenset[str] = frozenset(),
) -> DesiredCluster:
    """The cluster's desired state; its bundle keeps the order of what the
    cluster holds now, so that istiod can hot-reload the change."""
    bundle = federation.bundle(mesh_name)
    if bundle is not None and reading.ca is not None:
        bundle = order_bundle(bundle, reading.ca.bundle, retiring)
    mesh = config.meshes[mesh_name]
    cfg = mesh.clusters[cluster]
    inter = config.intermediates_for(mesh_name)
    return DesiredCluster(
        name=cluster,
        mesh=mesh_name,
        trust_domain=mesh.trust_domain,
        provider=mesh.provider or "",
        key_algorithm=inter.key_algorithm,
        ttl=inter.ttl,
        renew_before=inter.renew_before,
        bundle=bundle,
        own_roots=tuple(fingerprint(r) for r in federation.meshes[mesh_name].roots),
        istio_version=cfg.istio.version,
        multi_root=cfg.istio.multi_root,
        adopt=adopt,
        organization=inter.organization,
    )


def signer_for(config: Config, provider: str, generation: str) -> Signer:
    """How an agent gets its CSR signed under ``provider``: through the provider
    itself with its own identity (Vault, AWS), or by the central run, which alone
    holds a self-signed root."""
    entry = config.providers[provider]
    # The provider's settings as the central file has them, but for what each agent
    # brings itself (AGENT_OWN: its identity and how it reaches the service).
    if entry.vault is not None:
        settings = entry.vault.model_dump(by_alias=True, exclude=AGENT_OWN["vault"])
        return Signer("vault", provider, _portable(settings), generation)
    if entry.acm_pca is not None:
        settings = entry.acm_pca.model_dump(by_alias=True, exclude=AGENT_OWN["acmPca"])
        return Signer("acmPca", provider, _portable(settings))
    return Signer("central", provider, {}, generation)


def _portable(settings: dict[str, Any]) -> dict[str, Any]:
    """Settings as JSON carries them: durations as seconds ("90s"), nothing unset."""
    return {
        key: f"{int(value.total_seconds())}s" if isinstance(value, timedelta) else value
        for key, value in settings.items()
        if value is not None
    }


def document_for(d: DesiredCluster, signer: Signer, phase: str, signed: Signed | None) -> Desired:
    assert d.bundle is not None
    return Desired(
        cluster=d.name,
        mesh=d.mesh,
        trust_domain=d.trust_domain,
        bundle=d.bundle.to_pem().decode(),
        signing_roots=d.own_roots,
        key_algorithm=str(d.key_algorithm),
        ttl=d.ttl,
        renew_before=d.renew_before,
        signer=signer,
        organization=d.organization,
        signed=signed,
        phase=phase,
    )


def plan_agent(
    d: DesiredCluster, r: Reading, signer: Signer, phase: str, now: datetime
) -> ClusterPlan:
    """An agent-mode cluster's plan, and the agent key it trusts for the first time."""
    plan = _plan_agent(d, r, signer, phase, now)
    if r.agent is not None and r.agent.first_use:
        return replace(plan, trust_agent=r.agent.first_use)
    return plan


def _plan_agent(
    d: DesiredCluster, r: Reading, signer: Signer, phase: str, now: datetime
) -> ClusterPlan:
    """An agent-mode cluster's plan. The same policies say what the cluster
    needs, from what its agent reports; here that becomes what the central run
    does: publish the desired document, sign the agent's CSR, or wait for the
    agent to act on what is published."""
    assert r.agent is not None
    view = r.agent
    if r.error:
        return ClusterPlan(d.name, d.mesh, Action.FAIL, "ExchangeUnreadable", r.error, desired=d)
    if d.bundle is None:
        return ClusterPlan(
            d.name,
            d.mesh,
            Action.FAIL,
            "BundleIncomplete",
            f"the trust bundle of mesh {d.mesh} is incomplete: a provider has no root",
            desired=d,
        )
    # Adopting cacerts trustmgr did not write is the agent's choice (its adopt):
    # if it holds such, the central run serves the CSR of an agent that adopts.
    inner = plan_cluster(replace(d, adopt=True), r, None, now)
    wants_ca = inner.action in (Action.ISSUE, Action.RENEW)
    published = view.published
    report = view.report
    signed = published.signed if published is not None else None
    if signed is not None and (
        signer.kind != "central" or signed.root_fingerprint() not in d.own_roots
    ):
        signed = None  # an answer under a root the cluster may no longer be under
    document = document_for(d, signer, phase, signed)
    csr = report.csr_request() if report is not None and report.csr else None
    refused = csr_problems(csr, d.trust_domain, d.key_algorithm) if csr is not None else []
    if (
        signer.kind == "central"
        and wants_ca
        and csr is not None
        and not refused
        and (signed is None or signed.csr != csr_digest(csr))
    ):
        return ClusterPlan(
            d.name,
            d.mesh,
            Action.SIGN,
            inner.reason,
            f"{inner.message}; signing the CSR the agent published",
            desired=d,
            document=document,
        )
    # An older document than the agent applied was put back: the agent refuses it as a
    # replay even where it says what is desired now, so it must be published past.
    applied = report.sequence if report is not None else 0
    replayed = published is not None and applied > published.sequence
    expiring = published is not None and published.expiring(now)
    if replayed or expiring or not document.same_content(published):
        if view.published_problem:
            why = view.published_problem
        elif published is None and not view.published_sequence:
            why = "nothing published yet"
        elif published is not None and replayed:
            why = (
                f"the published sequence {published.sequence} is older than the {applied} the "
                "agent applied: an older document was put back"
            )
        elif published is not None and document.same_content(published) and expiring:
            assert published.not_after is not None
            why = f"the published document expires on {published.not_after:%Y-%m-%d}"
        else:
            why = "the desired state changed"
        return ClusterPlan(
            d.name, d.mesh, Action.PUBLISH, "Publish", why, desired=d, document=document
        )
    if view.report_problem:
        return ClusterPlan(
            d.name,
            d.mesh,
            Action.AWAIT,
            "ReportUnreadable",
            view.report_problem,
            desired=d,
            document=document,
        )
    if report is not None and report.error:
        return ClusterPlan(
            d.name, d.mesh, Action.AWAIT, "AgentFailing", report.error, desired=d, document=document
        )
    if refused and signer.kind == "central" and wants_ca:
        return ClusterPlan(
            d.name,
            d.mesh,
            Action.AWAIT,
            "CSRRefused",
            f"the agent's CSR {refused[0]}; not signed: the agent makes a new one",
            desired=d,
            document=document,
        )
    if inner.action not in (Action.NONE, Action.RECORD):
        waiting = "its CSR" if signer.kind == "central" and wants_ca else "it to act"
        return ClusterPlan(
            d.name,
            d.mesh,
            Action.AWAIT,
            inner.reason,
            f"{inner.message}; waiting for {waiting}",
            desired=d,
            document=document,
        )
    assert published is not None
    if report is None or report.sequence < published.sequence:
        return ClusterPlan(
            d.name,
            d.mesh,
            Action.AWAIT,
            "NotApplied",
            f"the agent has not applied sequence {published.sequence} yet",
            desired=d,
            document=document,
        )
    if inner.action is Action.RECORD:
        return ClusterPlan(d.name, d.mesh, Action.NONE, "UpToDate", "nothing to do", desired=d)
    return ClusterPlan(d.name, d.mesh, Action.NONE, inner.reason, inner.message, desired=d)


CANARY_FIRST = "CanaryFirst"


@dataclass(frozen=True)
class Scope:
    """What one rotation covers: the meshes that change root, the roots they move
    between, and who signs before and after the switch."""

    key: str
    meshes: frozenset[str]
    old: tuple[x509.Certificate, ...]
    new: tuple[x509.Certificate, ...]
    old_signer: str
    """The provider signing before the switch."""
    new_signer: str
    """The provider signing after it."""
    incoming: bool
    """The new root's authority is the provider's incoming one (a renewal)."""


def _scopes(
    config: Config, observation: Observation, rotations: Mapping[str, RotationRecord]
) -> dict[str, Scope]:
    out = {}
    for key, r in rotations.items():
        if r.mesh:
            out[key] = Scope(
                key,
                frozenset({r.mesh}),
                observation.roots.get(r.from_provider, ()),
                observation.roots_of(r.provider),
                r.from_provider,
                r.provider,
                incoming=False,
            )
        else:
            meshes = frozenset(
                m for m, mesh in config.meshes.items() if mesh.provider == r.provider
            )
            moving = {s.mesh for s in rotations.values() if s.mesh}
            out[key] = Scope(
                key,
                meshes - moving,
                observation.roots.get(r.provider, ()),
                observation.incoming.get(key, ()),
                r.provider,
                r.provider,
                incoming=True,
            )
    return out


def _valid_rotations(config: Config, observation: Observation) -> dict[str, RotationRecord]:
    """The rotations of the state that the configuration still has, checked."""
    out = {}
    for key, r in observation.state.rotations.items():
        if r.mesh:
            mesh = config.meshes.get(r.mesh)
            if mesh is None or r.from_provider not in observation.roots:
                raise BadInputError(
                    f"the {r.what} is in progress, but the configuration no longer has mesh "
                    f"{r.mesh} or provider {r.from_provider}: put them back until it is done"
                )
            if mesh.provider != r.provider and not r.aborting:
                raise BadInputError(
                    f"the {r.what} is in progress, but the configuration now says provider "
                    f"{mesh.provider}: set it back to {r.provider}, or `trustmgr rotate abort "
                    f"--mesh {r.mesh}` to move back to {r.from_provider}"
                )
        elif r.provider not in observation.roots:
            continue
        out[key] = r
    return out


def decide(
    config: Config, observation: Observation, *, adopt: bool = False, advance: bool = True
) -> Plan:
    """The plan for ``observation``, at the time it was taken. Pure: raises
    BadInputError, before anything is written, for what no plan may do: merge two
    meshes into one, accept a replayed bundle, or move clusters to another root
    outside a rotation.

    A rotation in progress changes what is wanted (:mod:`trustmgr.rotation`);
    when every cluster it affects holds its phase's material, and its gate is
    open, the plan moves it one phase on and wants that phase's material
    (unless ``advance`` is False: what is wanted at the phase as recorded). A
    mesh whose configured provider is not the one its clusters' CAs are under
    starts a move, which is a rotation between the two providers."""
    now = observation.taken_at
    for mesh, bundle in observation.external.items():
        known = observation.state.imported.get(mesh)
        if known and bundle.sequence is not None and bundle.sequence < known.sequence:
            raise BadInputError(
                f"mesh {mesh}: the SPIFFE bundle's sequence went backwards ({bundle.sequence} < "
                f"{known.sequence}); refusing a possibly replayed bundle"
            )
    rotations = _valid_rotations(config, observation)
    moves = _moves(config, observation, rotations, now)
    for step in moves:
        busy = overlapping(
            config, step.record.key, rotation_clusters(config, step.record), rotations.values()
        )
        if busy is not None:
            raise BadInputError(
                f"mesh {step.record.mesh} would move from provider {step.record.from_provider} "
                f"to {step.record.provider}, but the {busy.what} ({busy.phase}) shares trust "
                f"bundles with it, and one rotation at a time keeps them hot-reloadable: set "
                f"meshes.{step.record.mesh}.provider back to {step.record.from_provider} until "
                "that one is done"
            )
    everything = {**rotations, **{s.record.key: s.record for s in moves}}
    _refuse_root_swap(config, observation, _scopes(config, observation, everything))
    phases = {k: r.phase for k, r in everything.items()}
    clusters = _plan_clusters(config, observation, everything, phases, adopt=adopt)
    steps = []
    scopes = _scopes(config, observation, rotations)
    for key, record in sorted(rotations.items()):
        affected = affected_clusters(config, scopes[key].meshes)
        pending = [
            c.cluster
            for c in clusters
            if c.cluster in affected and (c.pending or c.reason == CANARY_FIRST)
        ]
        steps.append(
            gate(record, converged=not pending, pending=pending, now=now, soak=config.rotation.soak)
        )
    steps += moves
    for provider, (generation, root) in sorted(observation.upcoming.items()):
        if provider in rotations:
            continue
        others = [*rotations.values(), *(s.record for s in steps)]
        if overlapping(config, provider, provider_clusters(config, provider), others):
            continue  # starts once the rotation sharing its bundles is done
        ends = max(r.not_valid_after_utc for r in observation.roots[provider])
        steps.append(
            RotationStep(
                provider,
                RotationRecord(
                    id=generation,
                    provider=provider,
                    phase=Phase.PREPARED,
                    generation=generation,
                    old_roots=tuple(fingerprint(r) for r in observation.roots[provider]),
                    new_roots=(fingerprint(root),),
                    started_at=now,
                    phase_at=now,
                ),
                started=True,
                blocked=f"the root ends {ends:%Y-%m-%d}, inside rotation.rootRenewBefore",
            )
        )
    if not advance:
        steps = [
            RotationStep(s.key, rotations[s.key], blocked=s.blocked)
            for s in steps
            if s.key in rotations
        ]
    if any(step.advanced_from is not None for step in steps):
        phases = {**phases, **{step.key: step.record.phase for step in steps}}
        clusters = _plan_clusters(config, observation, everything, phases, adopt=adopt)
    new_roots = {fp for s in steps if s.started for fp in s.record.new_roots}
    creates = tuple(
        ProviderPlan(name, True, fingerprint(root))
        for name, root in sorted(observation.prepared.items())
        if fingerprint(root) in new_roots
        or any(
            (c.action.writes or c.action in (Action.PUBLISH, Action.SIGN))
            and c.desired is not None
            and c.desired.bundle is not None
            and fingerprint(root) in c.desired.bundle.fingerprints
            for c in clusters
        )
    )
    return Plan(
        creates,
        tuple(clusters),
        generated_at=now,
        rotations=tuple(steps),
        rotations_before=dict(rotations),
    )


def _moves(
    config: Config,
    observation: Observation,
    rotations: Mapping[str, RotationRecord],
    now: datetime,
) -> list[RotationStep]:
    """A move for each mesh whose trustmgr-written CAs are all under the root of
    another configured provider than its own: the plan starts it at prepared."""
    moving = {r.mesh for r in rotations.values() if r.mesh}
    steps = []
    for name, mesh in config.meshes.items():
        if mesh.provider is None or name in moving:
            continue
        own = {fingerprint(r) for r in observation.roots_of(mesh.provider)}
        under: set[str] = set()
        for cluster in mesh.clusters:
            reading = observation.clusters[cluster]
            ca = reading.ca
            if (
                reading.owner is Owner.TRUSTMGR
                and ca
                and ca.chain_root
                and ca.chain_root not in own
            ):
                under.add(ca.chain_root)
        if not under:
            continue
        sources = [
            p
            for p, roots in sorted(observation.roots.items())
            if p != mesh.provider and under <= {fingerprint(r) for r in roots}
        ]
        if not sources:
            continue  # a lost root, refused below
        generation = f"{now:%Y%m%d%H%M%S}"
        record = RotationRecord(
            id=generation,
            provider=mesh.provider,
            phase=Phase.PREPARED,
            generation="",
            old_roots=tuple(fingerprint(r) for r in observation.roots[sources[0]]),
            new_roots=tuple(sorted(own)),
            started_at=now,
            phase_at=now,
            mesh=name,
            from_provider=sources[0],
        )
        steps.append(
            RotationStep(
                record.key,
                record,
                started=True,
                blocked=f"meshes.{name}.provider changed from {sources[0]} to {mesh.provider}",
            )
        )
    return steps


def affected_clusters(config: Config, meshes: frozenset[str] | set[str]) -> set[str]:
    """Clusters of ``meshes`` and of every mesh federated with one of them."""
    around = set(meshes) | {peer for m in meshes for peer in config.federated_with(m)}
    return {c for m, c, _ in config.clusters() if m in around}


def overlapping(
    config: Config, key: str, clusters: set[str], others: Iterable[RotationRecord]
) -> RotationRecord | None:
    """Another rotation than ``key`` whose clusters share trust bundles with
    ``clusters``. Two roots retiring from one bundle cannot both sit at its ends,
    where istiod before 1.30 needs a removed root to be: one rotation at a time there."""
    for other in others:
        if other.key != key and clusters & rotation_clusters(config, other):
            return other
    return None


def provider_clusters(config: Config, provider: str) -> set[str]:
    """The clusters a renewal of ``provider``'s root affects."""
    return affected_clusters(
        config, {m for m, mesh in config.meshes.items() if mesh.provider == provider}
    )


def rotation_clusters(config: Config, record: RotationRecord) -> set[str]:
    """The clusters a rotation affects, as the configuration stands."""
    if record.mesh:
        return affected_clusters(config, {record.mesh})
    return provider_clusters(config, record.provider)


def federation_at(
    config: Config,
    observation: Observation,
    phases: Mapping[str, Phase] | None = None,
    *,
    prepared: bool = True,
    rotations: Mapping[str, RotationRecord] | None = None,
) -> Federation:
    """Every mesh with the roots its bundles hold with each rotation at its phase
    (by default, as recorded), and with the roots that would be created unless
    ``prepared`` is False."""
    if rotations is None:
        rotations = _valid_rotations(config, observation)
    if phases is None:
        phases = {k: r.phase for k, r in rotations.items()}
    scopes = _scopes(config, observation, rotations)
    by_mesh = {m: (scopes[k], phases[k]) for k in scopes for m in scopes[k].meshes}

    def bundle_roots(mesh: str) -> tuple[x509.Certificate, ...]:
        if mesh in by_mesh:
            scope, phase = by_mesh[mesh]
            return root_sets(phase, scope.old, scope.new).bundle
        provider = config.meshes[mesh].provider or ""
        return observation.roots_of(provider) if prepared else observation.roots.get(provider, ())

    return federation_of(config, bundle_roots, observation.external)


def _plan_clusters(
    config: Config,
    observation: Observation,
    rotations: Mapping[str, RotationRecord],
    phases: Mapping[str, Phase],
    *,
    adopt: bool,
) -> list[ClusterPlan]:
    """Every cluster planned with each rotation at its phase in ``phases``."""
    scopes = _scopes(config, observation, rotations)
    federation = federation_at(config, observation, phases, rotations=rotations)
    errors = [f.message for f in federation.findings() if f.level == "error"]
    if errors:
        raise BadInputError(errors[0])
    retiring = frozenset(fingerprint(r) for scope in scopes.values() for r in scope.old)
    by_mesh = {m: scope for scope in scopes.values() for m in scope.meshes}

    def plan_one(mesh_name: str, cluster: str, phases: Mapping[str, Phase]) -> ClusterPlan:
        reading = observation.clusters[cluster]
        d = desired_cluster(
            config, cluster, mesh_name, federation, reading, adopt=adopt, retiring=retiring
        )
        scope = by_mesh.get(mesh_name)
        if scope is not None:
            rs = root_sets(phases[scope.key], scope.old, scope.new)
            d = replace(
                d,
                provider=scope.new_signer if rs.new_signer else scope.old_signer,
                own_roots=tuple(fingerprint(r) for r in rs.signing),
                incoming=scope.key if rs.new_signer and scope.incoming else "",
            )
        if reading.agent is None:
            record = observation.state.clusters.get(cluster)
            return plan_cluster(d, reading, record, observation.taken_at)
        phase = f"{scope.key}:{phases[scope.key]}" if scope is not None else ""
        generation = (
            rotations[d.incoming].generation
            if d.incoming
            else observation.state.generations.get(d.provider, "")
        )
        signer = signer_for(config, d.provider, generation)
        return plan_agent(d, reading, signer, phase, observation.taken_at)

    lost = _lost_agents(config, observation, scopes)
    clusters = [
        ClusterPlan(cluster, mesh, Action.FAIL, "UnknownRoot", lost[cluster])
        if cluster in lost
        else plan_one(mesh, cluster, phases)
        for mesh, cluster, _ in config.clusters()
    ]
    for key, scope in scopes.items():
        if phases[key] is not Phase.ISSUER_SWITCHED:
            continue
        held = _held_for_canaries(config, scope.meshes, clusters)
        if not held:
            continue
        # Agents sign by themselves: until the canaries converged, the others are
        # given what they had before the switch.
        before = {**phases, key: Phase.TRUST_DISTRIBUTED}
        clusters = [
            _waiting_for(c, plan_one(c.mesh, c.cluster, before), held)
            if c.cluster in held[1] and c.document is not None
            else _waiting_for(c, c, held)
            if c.cluster in held[1] and c.reason == "IssuerChanged"
            else c
            for c in clusters
        ]
    return clusters


def _held_for_canaries(
    config: Config, meshes: frozenset[str], clusters: list[ClusterPlan]
) -> tuple[list[str], set[str]] | None:
    """While a canary of ``meshes`` has not converged: the canaries waited for,
    and the clusters that switch to the new root after them."""
    own = sorted(c for m, c, _ in config.clusters() if m in meshes)
    canaries = own[: config.rotation.canary]
    waiting = [c.cluster for c in clusters if c.cluster in canaries and c.pending]
    if not waiting:
        return None
    return waiting, set(own) - set(canaries)


def _waiting_for(
    now: ClusterPlan, before: ClusterPlan, held: tuple[list[str], set[str]]
) -> ClusterPlan:
    """A cluster held back until the canaries converged: what it needs before the
    switch, if anything, else nothing yet."""
    if before is not now and before.pending:
        return before
    return replace(
        before,
        action=Action.NONE,
        reason=CANARY_FIRST,
        message=f"switches to the new root once canaries {', '.join(held[0])} converged",
        reload=Reload.HOT,
        document=None,
    )


def _refuse_root_swap(
    config: Config, observation: Observation, scopes: Mapping[str, Scope]
) -> None:
    """Clusters holding trustmgr's material under a root their mesh may not be
    under (lost or replaced state): issuing again would swap their trust at once,
    an outage in a live mesh. Moving clusters to another root is rotation's job."""
    by_mesh = {m: scope for scope in scopes.values() for m in scope.meshes}
    lost: dict[tuple[str, str], list[str]] = {}
    for mesh_name, cluster, _ in config.clusters():
        reading = observation.clusters[cluster]
        provider = config.meshes[mesh_name].provider or ""
        if reading.owner is not Owner.TRUSTMGR or reading.ca is None or not reading.ca.chain_root:
            continue
        if reading.agent is not None:
            continue  # an agent's word holds for its own cluster only: _lost_agents
        allowed = list(observation.roots.get(provider, ()))
        if mesh_name in by_mesh:
            allowed += [*by_mesh[mesh_name].old, *by_mesh[mesh_name].new]
        if reading.ca.chain_root not in {fingerprint(r) for r in allowed}:
            lost.setdefault((provider, reading.ca.chain_root), []).append(cluster)
    recorded_without_root = {
        r.provider: sorted(
            c for c, rec in observation.state.clusters.items() if rec.provider == r.provider
        )
        for r in observation.state.clusters.values()
        if not observation.roots.get(r.provider) and r.provider in observation.prepared
    }
    if lost:
        (provider, root), clusters = sorted(lost.items())[0]
        more = f" (and {len(lost) - 1} more root(s))" if len(lost) > 1 else ""
        has = "has no root" if not observation.roots.get(provider) else "has another root"
        raise BadInputError(
            f"clusters {_some(clusters)} hold CAs trustmgr issued under root "
            f"{_colons(root)}, but provider {provider} {has}{more}: restore that root "
            f"(the state store's providers/{provider}/) from a backup; moving clusters to "
            "another root is a root rotation, never a side effect"
        )
    for provider, issued in sorted(recorded_without_root.items()):
        raise BadInputError(
            f"provider {provider} has no root, yet clusters {_some(issued)} were issued "
            f"under one: restore providers/{provider}/ in the state store from a backup "
            "(to start over with a new root, remove the state's state.json first)"
        )


def _lost_agents(
    config: Config, observation: Observation, scopes: Mapping[str, Scope]
) -> dict[str, str]:
    """Agent-mode clusters whose agent reports a CA under a root their mesh may not be
    under, with why: such a cluster fails alone, and nothing is published to it, since
    a new document would move its agent to another root at once."""
    by_mesh = {m: scope for scope in scopes.values() for m in scope.meshes}
    out = {}
    for mesh_name, cluster, _ in config.clusters():
        reading = observation.clusters[cluster]
        ca = reading.ca
        if reading.agent is None or reading.owner is not Owner.TRUSTMGR or ca is None:
            continue
        provider = config.meshes[mesh_name].provider or ""
        allowed = list(observation.roots.get(provider, ()))
        if mesh_name in by_mesh:
            allowed += [*by_mesh[mesh_name].old, *by_mesh[mesh_name].new]
        if ca.chain_root and ca.chain_root not in {fingerprint(r) for r in allowed}:
            out[cluster] = (
                f"the agent reports a CA under root {_colons(ca.chain_root)}, which provider "
                f"{provider} does not have: restore that root, or if the report is not to be "
                "believed, see the agent; nothing is published to this cluster meanwhile"
            )
    return out


def _some(names: list[str], shown: int = 5) -> str:
    """Names for a one-line message: the first few, then how many more."""
    names = sorted(names)
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def _colons(fp: str) -> str:
    """SHA-256 fingerprint as openssl prints it."""
    return ":".join(fp[i : i + 2] for i in range(0, len(fp), 2)).upper()
