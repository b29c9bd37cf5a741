"""Root rotation: each phase as the roots a provider's meshes trust and sign
under, and the gate that moves a rotation to its next phase. Pure.

A rotation is not a second engine: it only changes what :func:`decide` wants
(which roots are in the bundles, which root the cluster CAs must chain to, which
authority signs), and the same observe → decide → execute pass converges it.

=================  ========================  =====================  ==========
phase              roots in every bundle     cluster CAs under      signer
=================  ========================  =====================  ==========
prepared           old                       old                    old
trust-distributed  old + new                 old                    old
issuer-switched    old + new                 new (canaries first)   new
old-removed        new                       new                    new
done               new (now the current)     new                    new
=================  ========================  =====================  ==========

Trust before use: a root signs nothing that reaches a cluster until every
cluster that relies on it holds it, and leaves a bundle only once nothing is
signed under it. A phase advances only when a pass observes every affected
cluster converged, and from issuer-switched only after the soak besides;
never on a timeout.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from cryptography import x509

from trustmgr.state.model import Phase, RotationRecord


@dataclass(frozen=True)
class RootSets:
    """What a rotating provider's meshes want at one phase."""

    bundle: tuple[x509.Certificate, ...]
    """The provider's roots in every bundle that trusts it."""
    signing: tuple[x509.Certificate, ...]
    """The roots cluster CAs must chain to."""
    new_signer: bool
    """Whether the new root's authority signs."""


def root_sets(
    phase: Phase, old: tuple[x509.Certificate, ...], new: tuple[x509.Certificate, ...]
) -> RootSets:
    if phase is Phase.PREPARED:
        return RootSets(old, old, new_signer=False)
    if phase is Phase.TRUST_DISTRIBUTED:
        return RootSets(old + new, old, new_signer=False)
    if phase is Phase.ISSUER_SWITCHED:
        return RootSets(old + new, new, new_signer=True)
    return RootSets(new, new, new_signer=True)


@dataclass(frozen=True)
class RotationStep:
    """What a pass does to one rotation's record, and why it goes no further."""

    key: str
    """The rotation's key in the state (see RotationRecord.key)."""
    record: RotationRecord
    """The record as this pass leaves it (its phase: what the pass converges to)."""
    advanced_from: Phase | None = None
    finished: bool = False
    """The old-removed phase converged: the new root becomes the current one."""
    aborted: bool = False
    """An abort converged back to prepared: the rotation is dropped."""
    started: bool = False
    """The root entered its renewal window: the pass keeps the new root and records the rotation."""
    blocked: str = ""
    """What keeps the rotation at its phase, in words."""

    @property
    def changes_state(self) -> bool:
        return self.advanced_from is not None or self.finished or self.aborted or self.started


def gate(
    record: RotationRecord,
    *,
    converged: bool,
    pending: list[str],
    now: datetime,
    soak: timedelta,
) -> RotationStep:
    """The next step of ``record``, given whether every affected cluster holds
    the material of its phase (``pending``: those that do not)."""
    if not converged:
        waiting = ", ".join(pending[:3]) + (
            f" and {len(pending) - 3} more" if len(pending) > 3 else ""
        )
        return RotationStep(
            record.key,
            replace(record, converged_at=None),
            blocked=f"waiting for {waiting} to converge",
        )
    seen = record.converged_at or now
    settled = replace(record, converged_at=seen)
    if record.held:
        how = "abort" if record.aborting else "rollback"
        return RotationStep(
            record.key,
            settled,
            blocked=f"held after {how}: `trustmgr rotate resume {_option(record)}` continues",
        )
    if record.aborting:
        if record.phase is Phase.TRUST_DISTRIBUTED:
            # Rolled back from the switch: workloads may still hold certificates
            # under the new root; it stays trusted for the soak, as the old one did.
            if now < seen + soak:
                return RotationStep(
                    record.key,
                    settled,
                    blocked=f"aborting: the new root stays trusted until {seen + soak:%Y-%m-%d %H:%M}Z",
                )
            return RotationStep(
                record.key,
                replace(record, phase=Phase.PREPARED, phase_at=now, converged_at=None),
                advanced_from=record.phase,
            )
        return RotationStep(record.key, settled, aborted=True)
    if record.phase is Phase.ISSUER_SWITCHED and now < seen + soak:
        return RotationStep(
            record.key,
            settled,
            blocked=f"soaking until {seen + soak:%Y-%m-%d %H:%M}Z",
        )
    if record.phase is Phase.OLD_REMOVED:
        return RotationStep(record.key, replace(settled, phase=Phase.DONE), finished=True)
    ahead = record.phase.next()
    return RotationStep(
        record.key,
        replace(
            record,
            phase=ahead,
            phase_at=now,
            converged_at=None,
            switched=record.switched or ahead is Phase.ISSUER_SWITCHED,
        ),
        advanced_from=record.phase,
    )


def _option(record: RotationRecord) -> str:
    """The command-line option that names the rotation."""
    return f"--mesh {record.mesh}" if record.mesh else f"--provider {record.provider}"
