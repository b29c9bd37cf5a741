"""Every planner policy, as a pure function of (desired, reading, record, now)."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from trustmgr.observe import Owner, Reading
from trustmgr.pki import ObservedCA
from trustmgr.planner import (
    Action,
    DesiredCluster,
    Reload,
    bundle_reload,
    change_reload,
    plan_cluster,
)
from trustmgr.providers.keys import KeyAlgorithm
from trustmgr.state.model import ClusterRecord

NOW = datetime(2026, 12, 1, tzinfo=UTC)
ROOT, PEER, OTHER = "a" * 64, "b" * 64, "c" * 64


def _bundle(*fps: str) -> object:
    class _B:
        fingerprints = fps

    return _B()


DESIRED = DesiredCluster(
    name="c1",
    mesh="web",
    trust_domain="web.example",
    provider="corp",
    key_algorithm=KeyAlgorithm.ECDSA_P256,
    ttl=timedelta(days=30),
    renew_before=timedelta(days=10),
    bundle=_bundle(ROOT, PEER),  # type: ignore[arg-type]
    own_roots=(ROOT,),
)
CA = ObservedCA(
    digest="d" * 64,
    fingerprint="f" * 64,
    serial="1",
    not_after=NOW + timedelta(days=25),
    trust_domain="web.example",
    key_algorithm=KeyAlgorithm.ECDSA_P256,
    chain_root=ROOT,
    issuer_not_after=NOW + timedelta(days=3650),
    bundle=(ROOT, PEER),
)
GOOD = Reading(object(), CA, Owner.TRUSTMGR, stamp=CA.digest)  # type: ignore[arg-type]
RECORD = ClusterRecord(
    mesh="web",
    trust_domain="web.example",
    provider="corp",
    fingerprint=CA.fingerprint or "",
    serial="1",
    not_after=CA.not_after or NOW,
    digest=CA.digest,
    bundle=CA.bundle,
    written_at=NOW,
)


def _ca(**changes: object) -> Reading:
    return replace(GOOD, ca=replace(CA, **changes))  # type: ignore[arg-type]


CASES = [
    ("converged", DESIRED, GOOD, RECORD, Action.NONE, "UpToDate"),
    (
        "unreadable",
        DESIRED,
        Reading(None, None, Owner.NOBODY, error="boom"),
        None,
        Action.FAIL,
        "TargetUnreadable",
    ),
    (
        "foreign",
        DESIRED,
        replace(GOOD, owner=Owner.FOREIGN, why_foreign="hand-made"),
        None,
        Action.REFUSE,
        "NotManaged",
    ),
    (
        "foreign, adopting",
        replace(DESIRED, adopt=True),
        replace(GOOD, owner=Owner.FOREIGN, why_foreign="x"),
        None,
        Action.ISSUE,
        "Adopt",
    ),
    ("missing", DESIRED, Reading(None, None, Owner.NOBODY), None, Action.ISSUE, "Missing"),
    ("expired", DESIRED, _ca(not_after=NOW), RECORD, Action.ISSUE, "Expired"),
    (
        "trust domain changed",
        DESIRED,
        _ca(trust_domain="old.example", problems=("has no URI SAN spiffe://web.example",)),
        RECORD,
        Action.ISSUE,
        "TrustDomainChanged",
    ),
    (
        "invalid",
        DESIRED,
        _ca(problems=("ca-key.pem does not match ca-cert.pem",)),
        RECORD,
        Action.ISSUE,
        "Invalid",
    ),
    ("edited after writing", DESIRED, replace(GOOD, stamp="e" * 64), RECORD, Action.ISSUE, "Drift"),
    (
        "key exposed",
        DESIRED,
        replace(GOOD, exposed="ca-key.pem is readable by others"),
        RECORD,
        Action.ISSUE,
        "KeyExposed",
    ),
    ("no stamp, no record", DESIRED, replace(GOOD, stamp=None), None, Action.ISSUE, "Unrecorded"),
    (
        "no stamp, other CA recorded",
        DESIRED,
        replace(GOOD, stamp=None),
        replace(RECORD, fingerprint="0" * 64),
        Action.ISSUE,
        "Drift",
    ),
    (
        "no stamp, other files recorded",
        DESIRED,
        replace(GOOD, stamp=None),
        replace(RECORD, digest="0" * 64),
        Action.ISSUE,
        "Drift",
    ),
    ("no stamp, as recorded", DESIRED, replace(GOOD, stamp=None), RECORD, Action.NONE, "UpToDate"),
    (
        "signed by a peer's root",
        DESIRED,
        _ca(chain_root=PEER),
        RECORD,
        Action.ISSUE,
        "IssuerChanged",
    ),
    (
        "recorded under another provider",
        DESIRED,
        GOOD,
        replace(RECORD, provider="old"),
        Action.ISSUE,
        "IssuerChanged",
    ),
    (
        "key algorithm changed",
        DESIRED,
        _ca(key_algorithm=KeyAlgorithm.RSA_2048),
        RECORD,
        Action.ISSUE,
        "KeyAlgorithmChanged",
    ),
    (
        "renewal due",
        DESIRED,
        _ca(not_after=NOW + timedelta(days=9)),
        RECORD,
        Action.RENEW,
        "RenewalDue",
    ),
    (
        "renewal due, issuer ends first",
        DESIRED,
        _ca(not_after=NOW + timedelta(days=9), issuer_not_after=NOW + timedelta(days=9)),
        RECORD,
        Action.NONE,
        "IssuerExpiring",
    ),
    ("bundle changed", DESIRED, _ca(bundle=(ROOT,)), RECORD, Action.UPDATE_BUNDLE, "BundleChanged"),
    ("written, not recorded", DESIRED, GOOD, None, Action.RECORD, "Unrecorded"),
    (
        "written, older record",
        DESIRED,
        GOOD,
        replace(RECORD, digest="0" * 64),
        Action.RECORD,
        "Unrecorded",
    ),
]


@pytest.mark.parametrize(
    ("desired", "reading", "record", "action", "reason"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_policy(
    desired: DesiredCluster,
    reading: Reading,
    record: ClusterRecord | None,
    action: Action,
    reason: str,
) -> None:
    plan = plan_cluster(desired, reading, record, NOW)
    assert (plan.action, plan.reason) == (action, reason), plan.message
    assert plan.message


def test_a_trust_domain_change_names_both_domains() -> None:
    plan = plan_cluster(DESIRED, _ca(trust_domain="old.example"), RECORD, NOW)
    assert plan.message == "the CA is for trust domain old.example, the mesh's is now web.example"


def test_renewal_says_how_long_is_left() -> None:
    plan = plan_cluster(DESIRED, _ca(not_after=NOW + timedelta(days=2, hours=3)), RECORD, NOW)
    assert plan.message == "expires in 2d3h, inside renewBefore 10d0h"


@pytest.mark.parametrize(
    ("old", "new", "multi_root", "version", "reload"),
    [
        ((ROOT,), (ROOT,), False, None, Reload.HOT),
        ((ROOT,), (ROOT, PEER), False, None, Reload.RESTART),
        ((ROOT,), (ROOT, PEER), True, None, Reload.HOT),
        ((ROOT, PEER), (ROOT,), True, "1.29", Reload.HOT),
        ((ROOT, PEER, OTHER), (ROOT, OTHER), True, "1.29", Reload.RESTART),
        ((ROOT, PEER, OTHER), (ROOT, OTHER), True, "1.30", Reload.HOT),
        ((ROOT,), (PEER,), True, None, Reload.RESTART),
    ],
)
def test_bundle_reload(
    old: tuple[str, ...],
    new: tuple[str, ...],
    multi_root: bool,
    version: str | None,
    reload: Reload,
) -> None:
    assert bundle_reload(old, new, multi_root=multi_root, istio_version=version) is reload


def test_a_new_ca_before_istio_1_18_needs_a_restart() -> None:
    assert (
        change_reload(CA, CA.bundle, ca_changes=True, multi_root=True, istio_version="1.17")
        is Reload.RESTART
    )
    assert (
        change_reload(CA, CA.bundle, ca_changes=True, multi_root=True, istio_version="1.18")
        is Reload.HOT
    )


def test_a_write_that_changes_the_bundle_is_planned_with_its_restart() -> None:
    plan = plan_cluster(replace(DESIRED, multi_root=False), _ca(bundle=(ROOT,)), RECORD, NOW)
    assert plan.action is Action.UPDATE_BUNDLE and plan.restarts
    recorded = plan_cluster(DESIRED, GOOD, None, NOW)
    assert recorded.action is Action.RECORD and not recorded.restarts
