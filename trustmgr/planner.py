"""Desired vs observed → a plan of typed actions with reasons. Pure: no I/O, the
clock is an argument.

Each policy looks at one cluster and either says why it needs an action or
passes; the first that speaks decides (cert-manager's renewal policies)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum

from trustmgr.bundles import TrustBundle
from trustmgr.pki import ObservedCA
from trustmgr.providers.keys import KeyAlgorithm
from trustmgr.state.model import ClusterRecord


class Action(StrEnum):
    NONE = "none"
    ISSUE = "issue"
    RENEW = "renew"
    UPDATE_BUNDLE = "update-bundle"
    FAIL = "fail"
    REFUSE = "refuse"
    """The target holds cacerts trustmgr did not create; only ``--adopt`` replaces it."""


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
    """None while a provider of the bundle has no root yet."""
    istio_version: str | None = None
    multi_root: bool = False
    adopt: bool = False
    """The operator allows replacing cacerts that trustmgr did not create."""


@dataclass(frozen=True)
class ObservedCluster:
    material: ObservedCA | None
    record: ClusterRecord | None
    error: str | None = None
    foreign: str | None = None
    """Why the target's cacerts is not trustmgr's, in the target's words; None if it is."""


@dataclass(frozen=True)
class ClusterPlan:
    cluster: str
    mesh: str
    action: Action
    reason: str
    message: str
    reload: Reload = Reload.HOT

    @property
    def pending(self) -> bool:
        return self.action is not Action.NONE


@dataclass(frozen=True)
class ProviderPlan:
    provider: str
    create_root: bool


@dataclass(frozen=True)
class Plan:
    providers: tuple[ProviderPlan, ...]
    clusters: tuple[ClusterPlan, ...]
    generated_at: datetime = field(compare=False)

    @property
    def pending(self) -> bool:
        return any(p.create_root for p in self.providers) or any(c.pending for c in self.clusters)


Verdict = tuple[Action, str, str] | None
Policy = Callable[[DesiredCluster, ObservedCluster, datetime], Verdict]


def _unreadable(d: DesiredCluster, o: ObservedCluster, now: datetime) -> Verdict:
    if o.error:
        return Action.FAIL, "TargetUnreadable", o.error
    return None


def _not_managed(d: DesiredCluster, o: ObservedCluster, now: datetime) -> Verdict:
    if o.foreign is None:
        return None
    if d.adopt:
        return (
            Action.ISSUE,
            "Adopt",
            f"{o.foreign}; replacing it, the previous one kept for rollback",
        )
    return (
        Action.REFUSE,
        "NotManaged",
        f"{o.foreign}; to replace it, keeping the previous one for `trustmgr rollback`, "
        "run `trustmgr bootstrap --adopt`",
    )


def _missing(d: DesiredCluster, o: ObservedCluster, now: datetime) -> Verdict:
    if o.material is None:
        return Action.ISSUE, "Missing", "no cacerts yet"
    return None


def _expired(d: DesiredCluster, o: ObservedCluster, now: datetime) -> Verdict:
    m = o.material
    if m is not None and m.not_after is not None and now >= m.not_after:
        return Action.ISSUE, "Expired", f"the cluster CA expired at {m.not_after:%Y-%m-%d %H:%M}Z"
    return None


def _invalid(d: DesiredCluster, o: ObservedCluster, now: datetime) -> Verdict:
    m = o.material
    if m is not None and (m.fingerprint is None or not m.healthy):
        return Action.ISSUE, "Invalid", m.problems[0] if m.problems else "unreadable material"
    return None


def _trust_domain_changed(d: DesiredCluster, o: ObservedCluster, now: datetime) -> Verdict:
    m = o.material
    if m is not None and m.trust_domain != d.trust_domain:
        return (
            Action.ISSUE,
            "TrustDomainChanged",
            f"the CA is for {m.trust_domain}, the mesh is {d.trust_domain}",
        )
    return None


def _issuer_changed(d: DesiredCluster, o: ObservedCluster, now: datetime) -> Verdict:
    m = o.material
    if d.bundle is None:
        return None
    own_roots = set(d.bundle.fingerprints)
    if m is not None and (
        m.chain_root not in own_roots or (o.record and o.record.provider != d.provider)
    ):
        return (
            Action.ISSUE,
            "IssuerChanged",
            f"the CA is not signed by a current root of provider {d.provider}",
        )
    return None


def _not_ours(d: DesiredCluster, o: ObservedCluster, now: datetime) -> Verdict:
    m = o.material
    if m is not None and o.record is None:
        return Action.ISSUE, "Unrecorded", "holds a CA trustmgr has no record of writing"
    if m is not None and o.record is not None and m.fingerprint != o.record.fingerprint:
        return (
            Action.ISSUE,
            "Drift",
            (
                f"holds CA {m.fingerprint and m.fingerprint[:16]}…, trustmgr wrote {o.record.fingerprint[:16]}…"
            ),
        )
    return None


def _edited(d: DesiredCluster, o: ObservedCluster, now: datetime) -> Verdict:
    m = o.material
    if m is not None and o.record is not None and m.digest != o.record.digest:
        return Action.ISSUE, "Drift", "the files were changed outside trustmgr"
    return None


def _key_algorithm_changed(d: DesiredCluster, o: ObservedCluster, now: datetime) -> Verdict:
    m = o.material
    if m is not None and m.key_algorithm is not d.key_algorithm:
        return (
            Action.ISSUE,
            "KeyAlgorithmChanged",
            f"the CA key is {m.key_algorithm}, configured {d.key_algorithm}",
        )
    return None


def _renewal_due(d: DesiredCluster, o: ObservedCluster, now: datetime) -> Verdict:
    m = o.material
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


def _issuer_expiring(d: DesiredCluster, o: ObservedCluster, now: datetime) -> Verdict:
    m = o.material
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


def _bundle_changed(d: DesiredCluster, o: ObservedCluster, now: datetime) -> Verdict:
    m = o.material
    if m is not None and d.bundle is not None and m.bundle != d.bundle.fingerprints:
        added = len(set(d.bundle.fingerprints) - set(m.bundle))
        removed = len(set(m.bundle) - set(d.bundle.fingerprints))
        return (
            Action.UPDATE_BUNDLE,
            "BundleChanged",
            f"trust bundle: {added} root(s) to add, {removed} to remove",
        )
    return None


POLICIES: tuple[Policy, ...] = (
    _unreadable,
    _not_managed,
    _missing,
    _expired,
    _invalid,
    _trust_domain_changed,
    _not_ours,
    _edited,
    _issuer_changed,
    _key_algorithm_changed,
    _renewal_due,
    _bundle_changed,
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


def _reload(d: DesiredCluster, o: ObservedCluster, action: Action) -> Reload:
    if action not in (Action.ISSUE, Action.RENEW, Action.UPDATE_BUNDLE) or o.material is None:
        return Reload.HOT
    return change_reload(
        o.material,
        d.bundle.fingerprints if d.bundle is not None else None,
        ca_changes=action is not Action.UPDATE_BUNDLE,
        multi_root=d.multi_root,
        istio_version=d.istio_version,
    )


def plan_cluster(d: DesiredCluster, o: ObservedCluster, now: datetime) -> ClusterPlan:
    for policy in POLICIES:
        verdict = policy(d, o, now)
        if verdict is not None:
            action, reason, message = verdict
            return ClusterPlan(d.name, d.mesh, action, reason, message, _reload(d, o, action))
    return ClusterPlan(d.name, d.mesh, Action.NONE, "UpToDate", "nothing to do")


def plan(
    desired: list[DesiredCluster],
    observed: dict[str, ObservedCluster],
    roots_missing: list[str],
    now: datetime,
) -> Plan:
    """The whole plan. ``roots_missing`` names providers whose root must be created first."""
    return Plan(
        providers=tuple(ProviderPlan(p, True) for p in sorted(roots_missing)),
        clusters=tuple(plan_cluster(d, observed[d.name], now) for d in desired),
        generated_at=now,
    )
