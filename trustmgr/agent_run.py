"""One pass of the agent, inside its cluster: read the desired document, check
it, decide with the same policies as the central run, make the CA key here,
get the CSR signed, write cacerts, and report public material back.

The order keeps every promise under interruption: the document's sequence is
recorded before anything acts on it (a replay stays refused); a key waiting
for the central run's signature is kept in the agent's own record before its
CSR is reported; cacerts is written in one write of the target; the report is
written last and says only what the target holds."""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel, ValidationError

from trustmgr.agent.config import AgentConfig
from trustmgr.agent.document import (
    Desired,
    DocumentError,
    Report,
    Signer,
    check_expiry,
    check_sequence,
    csr_digest,
    digest,
    key_id,
    load_public_keys,
    open_report,
    seal_report,
    unseal,
)
from trustmgr.agent.exchange import (
    AgentLocal,
    DirectoryLocalStore,
    Exchange,
    LocalStore,
)
from trustmgr.bundles import TrustBundle, load_certificates
from trustmgr.config import ClusterConfig
from trustmgr.errors import (
    BadInputError,
    BadMaterialError,
    ProviderAnswerError,
    StateError,
    TrustmgrError,
)
from trustmgr.execute import RESTARTED, check_writable, restart_istiod_if, signed_root
from trustmgr.observe import Reading, read_target
from trustmgr.pki import (
    CACerts,
    ClusterCARequest,
    assemble,
    cluster_ca_request,
    csr_problems,
    load_private_key,
    observe,
    private_key_pem,
)
from trustmgr.planner import Action, ClusterPlan, DesiredCluster, Reload, plan_cluster
from trustmgr.providers import Clock, Provider, ProviderError, ProviderNeedsFixError, SignedCA
from trustmgr.providers.config import AcmPcaConfig, ProviderConfig, VaultConfig
from trustmgr.providers.keys import KeyAlgorithm
from trustmgr.targets import Target
from trustmgr.upstream import build_provider
from trustmgr.workspace import close_provider, default_exchange, default_target

log = logging.getLogger(__name__)

ProviderFactory = Callable[[Signer], Provider]
M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True)
class AgentOutcome:
    """What one pass did: ``action`` as the policies decided it, ``error`` one line."""

    action: Action
    reason: str
    message: str
    sequence: int = 0
    error: str = ""
    exit_code: int = 0
    """``trustmgr agent run --once``'s: 2 for what a person must fix (a refused
    document, a missing credential), 1 for other failures."""

    @property
    def ok(self) -> bool:
        return not self.error


@dataclass
class Agent:
    """The agent's handles: its configuration, target, exchange and own record."""

    config: AgentConfig
    target: Target
    exchange: Exchange
    local: LocalStore
    publisher: tuple[Ed25519PublicKey, ...]
    """The publisher keys documents may be signed with (two while it is replaced)."""
    clock: Clock
    providers: ProviderFactory | None = None
    """Builds the provider a Signer names; None: from the configuration's credentials."""
    _unwritten: tuple[CACerts | None] | None = field(default=None, init=False, repr=False)
    """The cacerts read this pass, while nothing was written since (None: read again)."""

    @classmethod
    def build(cls, config: AgentConfig, *, clock: Clock) -> Agent:
        if config.publisher_key_file:
            path = Path(config.publisher_key_file).expanduser()
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise BadInputError(
                    f"publisherKeyFile {path}: cannot read: {exc.strerror}"
                ) from None
            keys = load_public_keys(data, f"publisherKeyFile {path}")
        else:
            assert config.publisher_key is not None
            keys = load_public_keys(config.publisher_key.encode(), "publisherKey")
        cluster = ClusterConfig(
            directory=config.directory, kubernetes=config.kubernetes, istio=config.istio
        )
        target = default_target(config.cluster, cluster)
        exchange = default_exchange(config.cluster, cluster)
        local: LocalStore
        if config.directory is not None:
            local = DirectoryLocalStore(
                Path(config.directory.path).expanduser(), cluster=config.cluster
            )
        else:
            from trustmgr.agent.kubernetes import KubernetesLocalStore

            assert config.kubernetes is not None
            local = KubernetesLocalStore(config.cluster, config.kubernetes)
        return cls(config, target, exchange, local, keys, clock)

    def close(self) -> None:
        self.target.close()
        self.exchange.close()
        self.local.close()

    def __post_init__(self) -> None:
        if not isinstance(self.local, _Remembered):
            self.local = _Remembered(self.local)

    def run_once(self, *, log_errors: bool = True) -> AgentOutcome:
        """One pass; every failure is one line in the outcome and in the report, and a
        warning in the log unless ``log_errors`` is False (``agent run --once`` prints the
        line itself: stderr holds it once)."""
        now = self.clock()
        desired: Desired | None = None
        if isinstance(self.local, _Remembered):
            self.local.forget()
        self._unwritten = None
        try:
            self._identity(self.local.load())  # what reports are signed with: first of all
        except TrustmgrError as exc:
            outcome = AgentOutcome(
                Action.FAIL, type(exc).__name__, str(exc), error=str(exc), exit_code=exc.exit_code
            )
            if log_errors:
                log.warning("%s", _of_cluster(self.config.cluster, outcome.error))
            return outcome  # no report can be signed
        try:
            desired = self._accept()
            outcome = self._converge(desired, now)
        except (TrustmgrError, ProviderError) as exc:
            code = exc.exit_code if isinstance(exc, TrustmgrError) else 1
            if isinstance(exc, ProviderNeedsFixError):
                code = 2
            outcome = AgentOutcome(
                Action.FAIL, type(exc).__name__, str(exc), error=str(exc), exit_code=code
            )
        try:
            self._report(desired, outcome, now)
        except TrustmgrError as exc:
            error = f"{outcome.error + '; ' if outcome.error else ''}cannot report: {exc}"
            outcome = replace(outcome, error=error, exit_code=outcome.exit_code or 1)
        if outcome.error:
            if log_errors:
                log.warning("%s", _of_cluster(self.config.cluster, outcome.error))
        elif outcome.action is not Action.NONE:
            log.info("cluster %s: %s (%s)", self.config.cluster, outcome.message, outcome.reason)
        return outcome

    def _accept(self) -> Desired:
        """The desired document, checked: signature, cluster, no replay."""
        data = self.exchange.read_desired()
        if data is None:
            raise DocumentError(
                f"{self.exchange.where}: no desired document yet; the central run publishes it "
                "(`trustmgr reconcile` with this cluster in mode agent)"
            )
        desired = unseal(data, self.publisher, where=self.exchange.where)
        if desired.cluster != self.config.cluster:
            raise DocumentError(
                f"{self.exchange.where}: the desired document is for cluster {desired.cluster}, "
                f"this agent is {self.config.cluster}: refusing it"
            )
        check_expiry(desired, self.clock(), where=self.exchange.where)
        local = self.local.load()
        check_sequence(
            desired, digest(data), local.sequence, local.digest, where=self.exchange.where
        )
        if (desired.sequence, digest(data)) != (local.sequence, local.digest):
            self.local.save(replace(local, sequence=desired.sequence, digest=digest(data)))
        return desired

    def _desired_cluster(self, desired: Desired, reading: Reading) -> DesiredCluster:
        try:
            algorithm = KeyAlgorithm(desired.key_algorithm)
            bundle = TrustBundle.from_pem(desired.bundle.encode(), "the desired bundle")
        except (ValueError, BadMaterialError) as exc:
            raise DocumentError(
                f"{self.exchange.where}: the desired document is unusable: {exc}"
            ) from None
        return DesiredCluster(
            name=self.config.cluster,
            mesh=desired.mesh,
            trust_domain=desired.trust_domain,
            provider=desired.signer.provider,
            key_algorithm=algorithm,
            ttl=desired.ttl,
            renew_before=desired.renew_before,
            bundle=bundle,
            own_roots=desired.signing_roots,
            istio_version=self.config.istio.version,
            multi_root=self.config.istio.multi_root,
            adopt=self.config.adopt,
            organization=desired.organization,
        )

    def _converge(self, desired: Desired, now: datetime) -> AgentOutcome:
        reading = read_target(self.target, desired.trust_domain, now)
        d = self._desired_cluster(desired, reading)
        plan = plan_cluster(d, reading, None, now)
        action = Action.NONE if plan.action is Action.RECORD else plan.action
        done = AgentOutcome(action, plan.reason, plan.message, desired.sequence)
        if reading.error is None:
            self._unwritten = (reading.material,)  # what the report tells, until a write
        if action is Action.NONE:
            return done
        if action is Action.REFUSE:
            error = (
                f"{reading.why_foreign}; to replace it, keeping the previous one for rollback, "
                "set adopt: true in the agent's configuration"
            )
            return replace(done, error=error, exit_code=1)
        if action is Action.FAIL:
            return replace(done, error=plan.message, exit_code=1)
        assert d.bundle is not None
        if action is Action.UPDATE_BUNDLE:
            assert reading.material is not None
            self._write(reading.material.with_bundle(d.bundle), d, now)
            return self._restart_if_needed(plan, done)
        material = self._issue(desired, d, now)
        if material is None:
            return replace(
                done,
                message=f"{plan.message}; CSR published, waiting for the central run to sign it",
            )
        self._write(material, d, now)
        return self._restart_if_needed(plan, done)

    def _restart_if_needed(self, plan: ClusterPlan, done: AgentOutcome) -> AgentOutcome:
        """After a write istiod cannot hot-reload: restart it if allowed, else say so."""
        if plan.reload is not Reload.RESTART:
            return done
        try:
            said = restart_istiod_if(self.config.istio.restart_istiod, self.target)
        except TrustmgrError as exc:
            error = f"cacerts written, but istiod could not be restarted: {exc}"
            return replace(done, error=error, exit_code=1)
        if said == RESTARTED:
            return replace(done, message=f"{done.message}; istiod restarted")
        return replace(done, message=f"{done.message} (istiod restart needed)")

    def _issue(self, desired: Desired, d: DesiredCluster, now: datetime) -> CACerts | None:
        """A new CA with a key made here; None while the central run has to sign."""
        local = self.local.load()
        if desired.signer.kind != "central":
            if local.pending_key:  # made for the central run, which no longer signs
                self.local.save(replace(local, pending_key=b"", pending_csr=b""))
            request = self._request(d)
            provider = (self.providers or self._provider)(desired.signer)
            try:
                answer = provider.sign_ca(request.csr, d.ttl)
            finally:
                close_provider(provider)
            return self._assemble(request, answer, d, now, f"provider {d.provider}")
        pending = _pending(local, d)
        signed = desired.signed
        if pending is not None and signed is not None and signed.csr == csr_digest(pending.csr):
            try:
                chain = tuple(load_certificates(signed.chain.encode(), "the signed chain"))
                root = load_certificates(signed.root.encode(), "the signed root")[0]
                answer = SignedCA(chain, (root,))
                return self._assemble(pending, answer, d, now, "the central run")
            except (BadMaterialError, ProviderAnswerError) as exc:
                log.warning("cluster %s: %s; asking again with a new key", d.name, exc)
                pending = None  # never asked again for this key: a new CSR replaces it
        if pending is None:
            request = self._request(d)
            self.local.save(
                replace(
                    local,
                    pending_key=private_key_pem(request.key),
                    pending_csr=request.csr.public_bytes(serialization.Encoding.PEM),
                )
            )
        return None

    def _request(self, d: DesiredCluster) -> ClusterCARequest:
        return cluster_ca_request(
            d.trust_domain, cluster=d.name, algorithm=d.key_algorithm, organization=d.organization
        )

    def _assemble(
        self,
        request: ClusterCARequest,
        answer: SignedCA,
        d: DesiredCluster,
        now: datetime,
        signer: str,
    ) -> CACerts:
        assert d.bundle is not None
        root = signed_root(answer, request, d, now=now, signer=signer)
        return assemble(request, answer, root, d.bundle)

    def _write(self, material: CACerts, d: DesiredCluster, now: datetime) -> None:
        self._unwritten = None
        check_writable(material, d.trust_domain, now=now)
        self.target.write(material, adopt=d.adopt)

    def _report(self, desired: Desired | None, outcome: AgentOutcome, now: datetime) -> None:
        trust_domain = desired.trust_domain if desired is not None else None
        # read this pass, and nothing written since: not read again
        material = self._unwritten[0] if self._unwritten is not None else self.target.read()
        local = self.local.load()
        if local.pending_key and material is not None and material.ca_key == local.pending_key:
            # the key is in cacerts now (this pass or one stopped before this point)
            local = replace(local, pending_key=b"", pending_csr=b"")
            self.local.save(local)
        waiting = (
            local.pending_csr.decode()
            if local.pending_csr and desired is not None and desired.signer.kind == "central"
            else ""
        )
        problems: tuple[str, ...] = ()
        if material is not None:
            problems = observe(material, trust_domain=trust_domain, now=now).problems
            exposed = getattr(self.target, "exposed", None)
            problems += (exposed,) if exposed else ()
        report = Report(
            cluster=self.config.cluster,
            sequence=local.sequence,
            ca_cert=material.ca_cert.decode() if material else "",
            cert_chain=material.cert_chain.decode() if material else "",
            root_cert=material.root_cert.decode() if material else "",
            problems=problems,
            csr=waiting,
            phase=desired.phase if desired is not None else "",
            error=outcome.error,
            foreign=(self.target.foreign or "") if material is not None else "",
            reported_at=now,
        )
        key, local = self._identity(local)
        current = self.exchange.read_report()
        if current is not None:
            try:
                was, signer = open_report(current, where="")
                if signer == key_id(key.public_key()) and replace(was, reported_at=now) == report:
                    return  # nothing new to say: the exchange is left as it is
            except BadMaterialError:
                pass
        self.exchange.write_report(seal_report(report, key))

    def _identity(self, local: AgentLocal) -> tuple[Ed25519PrivateKey, AgentLocal]:
        """The key this agent signs its reports with, made and kept on first use."""
        if local.identity_key:
            try:
                key = serialization.load_pem_private_key(local.identity_key, password=None)
            except (ValueError, TypeError):
                key = None
            if isinstance(key, Ed25519PrivateKey):
                return key, local
            raise StateError(
                f"{self.exchange.where}: the agent's identity key in its own record is not an "
                "Ed25519 key; delete the record to make a new one, then give the central run "
                "its public key (agentKey)"
            )
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        local = replace(local, identity_key=pem)
        self.local.save(local)
        log.info(
            "cluster %s: made this agent's identity key %s…",
            self.config.cluster,
            key_id(key.public_key())[:16],
        )
        return key, local

    def identity(self) -> Ed25519PublicKey:
        """This agent's identity key (made now if it has none): what the central
        configuration pins as the cluster's ``agentKey``."""
        key, _ = self._identity(self.local.load())
        return key.public_key()

    def _provider(self, signer: Signer) -> Provider:
        """The mesh's provider as this cluster reaches it: the document's settings,
        this agent's credentials."""
        creds = self.config.providers.get(signer.provider)
        if signer.kind == "vault":
            if creds is None or creds.vault is None:
                raise BadInputError(
                    f"the mesh signs through Vault provider {signer.provider}: add "
                    f"providers.{signer.provider}.vault.auth (this cluster's own role) to the "
                    "agent's configuration"
                )
            own = creds.vault.model_dump(by_alias=True, exclude_none=True)
            settings = {**signer.settings, **own}
            entry = ProviderConfig(vault=self._settings(VaultConfig, signer, settings))
        elif signer.kind == "acmPca":
            mine = creds.acm_pca if creds is not None else None
            own = mine.model_dump(by_alias=True, exclude_none=True) if mine is not None else {}
            settings = {**signer.settings, **own}
            entry = ProviderConfig(acm_pca=self._settings(AcmPcaConfig, signer, settings))
        else:
            raise DocumentError(
                f"the desired document names signer kind {signer.kind!r}, unknown to this agent"
            )
        return build_provider(
            signer.provider, entry, blobs=_NoBlobs(), clock=self.clock, generation=signer.generation
        )

    def _settings(self, model: type[M], signer: Signer, settings: dict[str, Any]) -> M:
        """The provider's settings, from the document's and this agent's; what
        cannot be used is one line, not a traceback."""
        try:
            return model.model_validate(settings)
        except ValidationError as exc:
            problems = []
            for error in exc.errors(include_url=False):
                where = ".".join(str(part) for part in error["loc"])
                message = str(error["msg"]).removeprefix("Value error, ")
                problems.append(f"{where}: {message}" if where else message)
            raise DocumentError(
                f"{self.exchange.where}: the desired document's {signer.kind} settings of "
                f"provider {signer.provider} are unusable: {'; '.join(problems)}; nothing written"
            ) from None


class _Remembered:
    """The agent's own record, read once per pass: later reads in the pass are
    answered from what was read or saved (each a request to the API server)."""

    def __init__(self, store: LocalStore) -> None:
        self._store = store
        self._known: AgentLocal | None = None

    def forget(self) -> None:
        self._known = None

    def load(self) -> AgentLocal:
        if self._known is None:
            self._known = self._store.load()
        return self._known

    def save(self, local: AgentLocal) -> None:
        self._known = None  # a failed save leaves nothing known
        self._store.save(local)
        self._known = local

    def close(self) -> None:
        self._store.close()


def run_forever(agent: Agent, stop: threading.Event) -> None:
    """Passes every ``interval`` (plus up to ``jitter``) until ``stop`` is set; a
    pass in flight finishes first."""
    interval = agent.config.interval.total_seconds()
    jitter = agent.config.jitter.total_seconds()
    while not stop.is_set():
        try:
            agent.run_once()
        except Exception as exc:  # a bug met in one pass must not end the agent
            log.error(
                "cluster %s: unexpected %s in a pass", agent.config.cluster, type(exc).__name__
            )
            log.debug("cluster %s: unexpected error", agent.config.cluster, exc_info=True)
        stop.wait(interval + random.uniform(0, jitter))  # noqa: S311 - spreading load, not secrecy


class _NoBlobs:
    """Providers that sign remotely keep nothing."""

    def load(self, name: str) -> bytes | None:
        return None

    def save(self, name: str, data: bytes, *, secret: bool) -> None:
        raise BadInputError("an agent keeps no provider material")

    def delete(self, name: str) -> None:
        pass


def _of_cluster(cluster: str, message: str) -> str:
    """``message`` naming ``cluster`` first, once (many errors name it already)."""
    if message.startswith((f"cluster {cluster} ", f"cluster {cluster}:")):
        return message
    return f"cluster {cluster}: {message}"


def _pending(local: AgentLocal, d: DesiredCluster) -> ClusterCARequest | None:
    """The request the agent waits on, if it still asks for what is desired."""
    if not local.pending_key or not local.pending_csr:
        return None
    try:
        key = load_private_key(local.pending_key, "the pending key")
        csr = x509.load_pem_x509_csr(local.pending_csr)
    except (BadMaterialError, ValueError):
        return None
    if csr_problems(csr, d.trust_domain, d.key_algorithm):
        return None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        return None
    return ClusterCARequest(key, csr)
