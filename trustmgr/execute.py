"""Execute: carry out a plan, and nothing else.

Order, so that nothing is left half-done: the caller has run :func:`preflight`
(every check that needs no write); then the roots the plan creates are kept,
and a root it signs with that is stored in an earlier form is stored anew
(signing itself never writes); then clusters are written in parallel, each
all-or-nothing, one cluster's failure never stopping the others; then what was
written is recorded in the state in one save.

``stop`` (set on SIGTERM or Ctrl-C) stops starting new clusters: the ones in
flight finish, what completed is recorded, the rest is reported as not started.
``fence``, when given, is called before each write to a target and each save to
the state store, and raises when this process may not write now (the daemon's
leader election); a cluster it refuses fails, a save it refuses ends the run.
A process killed outright saves nothing, yet loses nothing either: the next run
reads back each target's own record of what trustmgr wrote and records it
instead of issuing again.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from datetime import datetime

from cryptography import x509

from trustmgr.agent.document import Report as AgentReport
from trustmgr.agent.document import Signed, csr_digest, seal
from trustmgr.bundles import TrustBundle, fingerprint, load_certificates, pem
from trustmgr.errors import (
    BadMaterialError,
    ProviderAnswerError,
    TargetConflictError,
    TargetError,
    TrustmgrError,
)
from trustmgr.federation import order_bundle
from trustmgr.observe import Observation, Reading, read_cluster
from trustmgr.pki import (
    CACerts,
    ClusterCARequest,
    assemble,
    check_signed_ca,
    cluster_ca_request,
    csr_problems,
    observe,
)
from trustmgr.planner import Action, ClusterPlan, DesiredCluster, Plan, Reload, plan_cluster
from trustmgr.providers import ProviderError, ProviderTransientError, RootKeeper, SignedCA
from trustmgr.state.model import BundleRecord, ClusterRecord, State
from trustmgr.targets import Target
from trustmgr.targets.base import IstiodRestarter, Tidyable
from trustmgr.workspace import Workspace

log = logging.getLogger(__name__)

CONFLICT_ATTEMPTS = 3
"""Writes of one cluster in one pass that may meet a concurrent change."""

RESTARTED, RESTART_NEEDED = "restarted", "restart needed"
NOT_STARTED = "not started: the run was interrupted; run again to finish"


@dataclass(frozen=True)
class ClusterOutcome:
    cluster: str
    mesh: str
    action: Action
    reason: str
    message: str
    ok: bool
    error: str | None = None
    istiod: str | None = None
    """``restarted``, ``restart needed``, or None when istiod takes the change as it runs."""
    started: bool = True


@dataclass(frozen=True)
class Report:
    plan: Plan
    outcomes: tuple[ClusterOutcome, ...] = ()
    roots_created: tuple[str, ...] = ()
    interrupted: bool = False
    observation: Observation | None = field(default=None, compare=False, repr=False)
    """What the plan was made from."""

    @property
    def ok(self) -> bool:
        return all(o.ok for o in self.outcomes)

    @property
    def changed(self) -> bool:
        return (
            bool(self.roots_created)
            or bool(self.plan.rotation_changes)
            or any(o.ok and o.action.changes for o in self.outcomes)
        )


Progress = Callable[[int, int, ClusterOutcome], None]
"""Called as each cluster is done, with (done, total, outcome), from the calling thread."""

Fence = Callable[[], None]
"""Called before each write; raises a TrustmgrError when none may be made now."""


def _unfenced() -> None:
    """No fence: every write may be made."""


def outcome(
    c: ClusterPlan,
    *,
    ok: bool,
    error: str | None = None,
    istiod: str | None = None,
    started: bool = True,
) -> ClusterOutcome:
    return ClusterOutcome(
        c.cluster, c.mesh, c.action, c.reason, c.message, ok, error, istiod, started
    )


def preflight(ws: Workspace, plan: Plan) -> None:
    """Fail before any write on what can be known now: an unwritable target or
    state store, a root key that cannot be decrypted, a missing passphrase."""
    problems = []
    for c in plan.clusters:
        if c.action.writes:
            try:
                ws.targets[c.cluster].check_writable()
            except TargetError as exc:
                problems.append(f"cluster {c.cluster}: {exc}")
    if problems:
        raise TargetError(
            problems[0] if len(problems) == 1 else f"{problems[0]} (and {len(problems) - 1} more)"
        )
    unlocking = [ws.providers[p.provider] for p in plan.providers if p.create_root] + [
        ws.incoming[c.desired.incoming] if c.desired.incoming else ws.providers[c.desired.provider]
        for c in plan.clusters
        if c.desired is not None and c.action in (Action.ISSUE, Action.RENEW, Action.SIGN)
    ]
    for step in plan.rotations:
        if step.started and not step.record.mesh:
            ws.upcoming(step.key, step.record.generation).unlock()
    for provider in {id(p): p for p in unlocking}.values():
        if isinstance(provider, RootKeeper):
            provider.unlock()
    ws.store.check_writable()


def execute(
    ws: Workspace,
    plan: Plan,
    observation: Observation,
    *,
    workers: int = 16,
    stop: threading.Event | None = None,
    progress: Progress | None = None,
    fence: Fence | None = None,
) -> Report:
    """Carry out ``plan``, made from ``observation``, holding the state lock."""
    stop = stop or threading.Event()
    fence = fence or _unfenced
    created = []
    for p in plan.providers:
        if p.create_root:
            provider = ws.providers[p.provider]
            assert isinstance(provider, RootKeeper)
            fence()
            root = provider.keep_prepared_root()
            assert fingerprint(root) == p.fingerprint, "a kept root is the planned one"
            log.info("created the root of provider %s", p.provider)
            created.append(p.provider)
    saved = _record_rotations(ws, plan, fence)
    if any(c.document is not None and c.changes for c in plan.clusters) and ws.publisher() is None:
        fence()
        ws.publisher(create=True)
        log.info("created the publisher key of desired documents")
    _reseal(ws, plan, fence)
    results = _apply_all(ws, plan, observation, workers, stop, progress, fence)
    state = saved if saved is not None else ws.store.load()
    new_state = _with_imports(state, observation)
    trusted = {c.cluster: c.trust_agent for c in plan.clusters if c.trust_agent}
    if trusted:
        new_state = replace(new_state, agents={**new_state.agents, **trusted})
        for cluster, key in sorted(trusted.items()):
            log.info("cluster %s: trusting agent key %s… from now on", cluster, key[:16])
    for o, record in results:
        if record is not None:
            new_state = new_state.with_cluster(o.cluster, record)
    if new_state != state:
        fence()
        ws.store.save(new_state)
    return Report(plan, tuple(o for o, _ in results), tuple(created), stop.is_set())


def _signers(ws: Workspace, plan: Plan) -> list[RootKeeper]:
    """The providers that keep their own root and that the plan signs with, once each."""
    signing = [
        ws.incoming[c.desired.incoming] if c.desired.incoming else ws.providers[c.desired.provider]
        for c in plan.clusters
        if c.desired is not None and c.action in (Action.ISSUE, Action.RENEW, Action.SIGN)
    ]
    return [p for p in {id(p): p for p in signing}.values() if isinstance(p, RootKeeper)]


def _reseal(ws: Workspace, plan: Plan, fence: Fence) -> None:
    """Store anew, fenced, each root the plan signs with that is kept in an
    earlier form: here, before any cluster, as signing never writes."""
    for provider in _signers(ws, plan):
        provider.reseal_if_needed(fence)


def _record_rotations(ws: Workspace, plan: Plan, fence: Fence) -> State | None:
    """Save each rotation's phase before that phase's writes: a run stopped at
    any point resumes the phase it had started. The state as saved, if it was."""
    changes = plan.rotation_changes
    if not changes:
        return None
    state = ws.store.load()
    rotations, generations = dict(state.rotations), dict(state.generations)
    for step in changes:
        if step.started:
            if not step.record.mesh:  # a renewal: its new root is kept now
                fence()
                ws.upcoming(step.key, step.record.generation).keep_prepared_root()
                ws.bring_in(step.key)
            rotations[step.key] = step.record
            log.info("%s: started", step.record.what)
        elif step.finished:
            if not step.record.mesh:
                generations[step.record.provider] = step.record.generation
            del rotations[step.key]
            log.info("%s: done", step.record.what)
        elif step.aborted:
            del rotations[step.key]
            log.info("%s: aborted", step.record.what)
        else:
            rotations[step.key] = step.record
            if step.advanced_from is not None:
                log.info("%s: %s -> %s", step.record.what, step.advanced_from, step.record.phase)
    fence()
    return ws.store.save(replace(state, rotations=rotations, generations=generations))


def _apply_all(
    ws: Workspace,
    plan: Plan,
    observation: Observation,
    workers: int,
    stop: threading.Event,
    progress: Progress | None,
    fence: Fence = _unfenced,
) -> list[tuple[ClusterOutcome, ClusterRecord | None]]:
    """Every cluster's outcome, in plan order; pending ones worked on in parallel."""
    results: dict[str, tuple[ClusterOutcome, ClusterRecord | None]] = {
        c.cluster: (outcome(c, ok=True), None) for c in plan.clusters if not c.action.changes
    }
    pending = [c for c in plan.clusters if c.action.changes]

    def work(c: ClusterPlan) -> tuple[ClusterOutcome, ClusterRecord | None]:
        if stop.is_set():
            return outcome(c, ok=False, error=NOT_STARTED, started=False), None
        return _apply_cluster_guarded(ws, c, observation.clusters[c.cluster], fence)

    if pending:
        with ThreadPoolExecutor(max_workers=max(1, min(workers, len(pending)))) as pool:
            futures = [pool.submit(work, c) for c in pending]
            for done, future in enumerate(as_completed(futures), 1):
                o, record = future.result()
                results[o.cluster] = (o, record)
                if progress is not None and o.started:
                    progress(done, len(pending), o)
    return [results[c.cluster] for c in plan.clusters]


def _fields(c: ClusterPlan) -> dict[str, str]:
    """Fields of a log record about one cluster (``--log-format json`` shows them)."""
    return {"cluster": c.cluster, "mesh": c.mesh}


def _apply_cluster_guarded(
    ws: Workspace, c: ClusterPlan, reading: Reading, fence: Fence = _unfenced
) -> tuple[ClusterOutcome, ClusterRecord | None]:
    """A bug met in one cluster fails that cluster only, so the records of the
    clusters already written are still saved."""
    try:
        return _apply_cluster(ws, c, reading, fence)
    except Exception as exc:
        log.debug("cluster %s: unexpected error", c.cluster, exc_info=True, extra=_fields(c))
        error = f"unexpected {type(exc).__name__}; run with -vv for the traceback"
        return outcome(c, ok=False, error=error), None


def _apply_cluster(
    ws: Workspace, c: ClusterPlan, reading: Reading, fence: Fence = _unfenced
) -> tuple[ClusterOutcome, ClusterRecord | None]:
    """Write one cluster. On a conflict the cluster is read and planned again,
    never overwritten blindly; a CA issued for it is kept across such retries."""
    assert c.desired is not None
    d = c.desired
    if c.action in (Action.FAIL, Action.REFUSE):
        return outcome(c, ok=False, error=c.message), None
    if c.action in (Action.PUBLISH, Action.SIGN):
        return _publish(ws, c, d, reading, fence), None
    target = ws.targets[c.cluster]
    issued: CACerts | None = None
    for _ in range(CONFLICT_ATTEMPTS):
        if c.action is Action.NONE:
            return outcome(c, ok=True), None
        if c.action in (Action.FAIL, Action.REFUSE):
            return outcome(c, ok=False, error=c.message), None
        if c.action is Action.RECORD:
            assert reading.material is not None
            if isinstance(target, Tidyable):
                try:
                    fence()
                except TrustmgrError as exc:
                    return outcome(c, ok=False, error=str(exc)), None
                target.tidy()  # an interrupted write may have left a set behind
            return outcome(c, ok=True), _record(ws, reading.material, d)
        try:
            material = _material_for(ws, c, d, reading.material, issued)
            if c.action is not Action.UPDATE_BUNDLE:
                issued = material
            check_writable(material, d.trust_domain, now=ws.clock())
            fence()
            target.write(material, adopt=d.adopt)
        except TargetConflictError as exc:
            log.info("cluster %s: %s; reading it again", c.cluster, exc, extra=_fields(c))
            reading = read_cluster(ws, c.cluster)
            if reading.material == material and reading.why_foreign is None:
                break  # our write landed, its answer was lost
            c = _replan(ws, c, d, reading)
            continue
        except (TrustmgrError, ProviderError) as exc:
            kind = "transient" if isinstance(exc, ProviderTransientError) else "error"
            log.warning("cluster %s: %s (%s)", c.cluster, exc, kind, extra=_fields(c))
            return outcome(c, ok=False, error=str(exc)), None
        break
    else:
        return outcome(
            c,
            ok=False,
            error=f"the cacerts kept changing while trustmgr wrote it ({CONFLICT_ATTEMPTS} "
            "conflicts); nothing was overwritten; run again",
        ), None
    return _restart_if_needed(ws, c, target, fence), _record(ws, material, d)


def _publish(
    ws: Workspace, c: ClusterPlan, d: DesiredCluster, reading: Reading, fence: Fence
) -> ClusterOutcome:
    """Publish an agent-mode cluster's desired document (with the answer to the
    agent's CSR for SIGN), numbered past anything the exchange has seen."""
    assert c.document is not None and reading.agent is not None
    view = reading.agent
    document = c.document
    try:
        if c.action is Action.SIGN:
            assert view.report is not None
            document = replace(document, signed=_sign_for_agent(ws, d, view.report))
        key = ws.publisher()
        assert key is not None, "execute makes the publisher key before any publication"
        # Past anything either side has seen, and past any number this run could have
        # given before (a document lost with its report): milliseconds since 1970.
        seen = max(view.published_sequence, view.report.sequence if view.report else 0)
        sequence = max(seen + 1, int(ws.clock().timestamp() * 1000))
        fence()
        ws.exchanges[c.cluster].publish(seal(document.published(sequence, ws.clock()), key))
    except (TrustmgrError, ProviderError) as exc:
        log.warning("cluster %s: %s", c.cluster, exc, extra=_fields(c))
        return outcome(c, ok=False, error=str(exc))
    log.info("cluster %s: published sequence %d", c.cluster, sequence, extra=_fields(c))
    return outcome(c, ok=True)


def _sign_for_agent(ws: Workspace, d: DesiredCluster, report: AgentReport) -> Signed:
    """Sign the CSR an agent published, after checking it asks for exactly its
    cluster CA; the answer is checked as any provider's."""
    csr = report.csr_request()
    assert csr is not None
    problems = csr_problems(csr, d.trust_domain, d.key_algorithm)
    if problems:
        raise BadMaterialError(
            f"cluster {d.name}: the agent's CSR {problems[0]}; refusing to sign it"
        )
    provider = ws.incoming[d.incoming] if d.incoming else ws.providers[d.provider]
    answer = provider.sign_ca(csr, d.ttl)
    root = signed_root(answer, csr, d, now=ws.clock(), signer=f"provider {d.provider}")
    return Signed(
        csr_digest(csr),
        b"".join(pem(cert) for cert in answer.chain).decode(),
        pem(root).decode(),
    )


def check_writable(material: CACerts, trust_domain: str, *, now: datetime) -> None:
    """Refuse material the next observation would object to, not only istiod's load
    checks: otherwise every run would issue again."""
    problems = observe(material, trust_domain=trust_domain, now=now).problems
    if problems:
        raise TrustmgrError(f"refusing to write material istiod would reject: {problems[0]}")


def signed_root(
    answer: SignedCA,
    request: ClusterCARequest | x509.CertificateSigningRequest,
    d: DesiredCluster,
    *,
    now: datetime,
    signer: str,
) -> x509.Certificate:
    """The root an answer for the cluster ends under: checked as any provider's
    answer, and one of the roots the cluster may be under now."""
    root = check_signed_ca(answer, request, d.trust_domain, provider=d.provider, now=now)
    if fingerprint(root) not in d.own_roots:
        raise ProviderAnswerError(
            f"the CA signed by {signer} chains to root {fingerprint(root)[:16]}…, not one "
            "the desired document allows now; nothing written"
        )
    return root


def _record(ws: Workspace, material: CACerts, d: DesiredCluster) -> ClusterRecord:
    return record_of(ws, material, mesh=d.mesh, trust_domain=d.trust_domain, provider=d.provider)


def _replan(ws: Workspace, c: ClusterPlan, d: DesiredCluster, reading: Reading) -> ClusterPlan:
    """The cluster planned again from a new reading, with the pass's desired state."""
    if d.bundle is not None and reading.ca is not None:
        d = replace(d, bundle=order_bundle(d.bundle, reading.ca.bundle))
    record = ws.store.load().clusters.get(c.cluster)
    return plan_cluster(d, reading, record, ws.clock())


def record_of(
    ws: Workspace, material: CACerts, *, mesh: str, trust_domain: str, provider: str
) -> ClusterRecord:
    """What was written, from material already checked: parsed, not verified again."""
    ca = load_certificates(material.ca_cert, "ca-cert.pem")[0]
    return ClusterRecord(
        mesh=mesh,
        trust_domain=trust_domain,
        provider=provider,
        fingerprint=fingerprint(ca),
        serial=format(ca.serial_number, "x"),
        not_after=ca.not_valid_after_utc,
        digest=material.digest(),
        bundle=TrustBundle.from_pem(material.root_cert, "root-cert.pem").fingerprints,
        written_at=ws.clock(),
    )


def _restart_if_needed(
    ws: Workspace, c: ClusterPlan, target: Target, fence: Fence = _unfenced
) -> ClusterOutcome:
    """After a write istiod cannot hot-reload: restart it if allowed, else say so."""
    if c.reload is not Reload.RESTART:
        return outcome(c, ok=True)
    try:
        fence()
        return outcome(c, ok=True, istiod=restart_istiod(ws, c.cluster, target))
    except TrustmgrError as exc:
        return outcome(
            c,
            ok=False,
            error=f"cacerts written, but istiod could not be restarted: {exc}",
            istiod=RESTART_NEEDED,
        )


def restart_istiod(ws: Workspace, cluster: str, target: Target) -> str:
    """Restart istiod if the cluster allows it and the target can; say which."""
    return restart_istiod_if(ws.cluster_config(cluster).istio.restart_istiod, target)


def restart_istiod_if(allowed: bool, target: Target) -> str:
    """Restart istiod if ``allowed`` (``istio.restartIstiod``) and the target can:
    ``restarted``, or ``restart needed``."""
    if not allowed or not isinstance(target, IstiodRestarter):
        return RESTART_NEEDED
    target.restart_istiod()
    return RESTARTED


def _material_for(
    ws: Workspace,
    c: ClusterPlan,
    d: DesiredCluster,
    current: CACerts | None,
    issued: CACerts | None = None,
) -> CACerts:
    if d.bundle is None:
        raise TrustmgrError(
            f"the trust bundle of mesh {d.mesh} is incomplete: a provider has no root"
        )
    if c.action is Action.UPDATE_BUNDLE and current is not None:
        return current.with_bundle(d.bundle)
    if issued is not None:
        return issued.with_bundle(d.bundle)
    inter = ws.config.intermediates_for(d.mesh)
    request = cluster_ca_request(
        d.trust_domain, cluster=d.name, algorithm=d.key_algorithm, organization=inter.organization
    )
    provider = ws.incoming[d.incoming] if d.incoming else ws.providers[d.provider]
    answer = provider.sign_ca(request.csr, d.ttl)
    root = check_signed_ca(answer, request, d.trust_domain, provider=d.provider, now=ws.clock())
    return assemble(request, answer, root, d.bundle)


def _with_imports(state: State, observation: Observation) -> State:
    """Record the sequence of every imported bundle, so that a replay is refused."""
    imported = dict(state.imported)
    for mesh, bundle in observation.external.items():
        if bundle.sequence is not None:
            imported[mesh] = BundleRecord(
                bundle.sequence, tuple(fingerprint(r) for r in bundle.roots)
            )
    return state if imported == state.imported else replace(state, imported=imported)
