"""The handles a pass works with: configuration, clock, state store, providers,
targets and agents' exchanges, built once from the configuration. It decides
nothing, and reads only what a handle needs, once: the publisher key, and the
agent keys the state trusts."""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from types import TracebackType

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from trustmgr.agent import publisher
from trustmgr.agent.document import key_id, load_public_key
from trustmgr.agent.exchange import DirectoryExchange, Exchange
from trustmgr.bundles import fingerprint
from trustmgr.config import ClusterConfig, Config
from trustmgr.providers import BlobStore, Clock, Provider, RootKeeper, SignedCA
from trustmgr.state.build import build_store
from trustmgr.state.store import StateStore
from trustmgr.targets import Target
from trustmgr.targets.directory import DirectoryTarget
from trustmgr.upstream import build_provider

TargetFactory = Callable[[str, ClusterConfig], Target]
ExchangeFactory = Callable[[str, ClusterConfig], Exchange]


def default_target(cluster: str, config: ClusterConfig) -> Target:
    if config.directory is not None:
        return DirectoryTarget(Path(config.directory.path).expanduser(), cluster=cluster)
    from trustmgr.targets.kubernetes import KubernetesTarget

    assert config.kubernetes is not None
    target: Target = KubernetesTarget(cluster, config.kubernetes)
    return target


def default_exchange(cluster: str, config: ClusterConfig) -> Exchange:
    """Where the central run meets an agent-mode cluster's agent: beside its target."""
    if config.directory is not None:
        return DirectoryExchange(Path(config.directory.path).expanduser(), cluster=cluster)
    from trustmgr.agent.kubernetes import KubernetesExchange

    assert config.kubernetes is not None
    exchange: Exchange = KubernetesExchange(cluster, config.kubernetes)
    return exchange


@dataclass
class Workspace:
    """The handles one pass works with, built once from the configuration: the
    configuration, the clock, the state store, providers and targets. It decides
    nothing. Close it (or use it as a context manager) to release connections."""

    config: Config
    clock: Clock
    store: StateStore
    providers: dict[str, Provider]
    targets: dict[str, Target]
    """Push-mode clusters' targets, written by this process."""
    meshes_of: dict[str, str] = field(default_factory=dict)
    """Every cluster's mesh."""
    incoming: dict[str, Provider] = field(default_factory=dict)
    """Per provider under rotation, the authority of the new root."""
    exchanges: dict[str, Exchange] = field(default_factory=dict)
    """Agent-mode clusters' exchanges: their targets are the agents' alone."""
    _upcoming: dict[str, RootKeeper] = field(default_factory=dict)
    _publisher: Ed25519PrivateKey | None = None
    _agents: dict[str, str] | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    """Guards the two above: clusters are read by many threads."""

    @classmethod
    def build(
        cls,
        config: Config,
        *,
        clock: Clock,
        target_factory: TargetFactory = default_target,
        exchange_factory: ExchangeFactory = default_exchange,
        store: StateStore | None = None,
        providers: Mapping[str, Provider] | None = None,
    ) -> Workspace:
        """``providers`` replaces the providers built from the configuration,
        by name: the seam for a provider whose remote side cannot run here."""
        built_store = store is None
        store = store or build_store(config.state_store)
        try:
            state = store.load()
        except BaseException:
            if built_store:
                store.close()
            raise
        given = providers or {}
        # Providers of meshes, and those clusters or moves were issued under: a
        # mesh moving to another provider is read against the one it leaves.
        wanted = {m.provider for m in config.meshes.values()}
        wanted |= {r.provider for r in state.clusters.values()}
        wanted |= {r.from_provider for r in state.rotations.values()}
        built = {
            name: given.get(name)
            or authority(config, store, name, state.generations.get(name, ""), clock)
            for name in config.providers
            if name in wanted
        }
        incoming = {
            key: authority(config, store, r.provider, r.generation, clock)
            for key, r in state.rotations.items()
            if not r.mesh and r.provider in built
        }
        for key, r in state.rotations.items():
            # A provider that reports every root it has (a Vault mount) would show
            # the new one before its phase: during a renewal it shows the old ones.
            current = built.get(r.provider)
            if key in incoming and current is not None and not isinstance(current, RootKeeper):
                built[r.provider] = Only(current, r.old_roots)
                incoming[key] = Only(incoming[key], r.new_roots)
        targets = {
            cluster: target_factory(cluster, c)
            for _, cluster, c in config.clusters()
            if not c.agent
        }
        exchanges = {
            cluster: exchange_factory(cluster, c) for _, cluster, c in config.clusters() if c.agent
        }
        meshes_of = {cluster: mesh for mesh, cluster, _ in config.clusters()}
        return cls(config, clock, store, built, targets, meshes_of, incoming, exchanges)

    def close(self) -> None:
        """Release every target's, provider's and the state store's connections."""
        self.store.close()
        for target in self.targets.values():
            target.close()
        for exchange in self.exchanges.values():
            exchange.close()
        for provider in (*self.providers.values(), *self.incoming.values()):
            close_provider(provider)

    def __enter__(self) -> Workspace:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def upcoming(self, provider: str, generation: str) -> RootKeeper:
        """The authority a rotation of ``provider`` starting now would bring in;
        the same object for the whole pass, so the root it prepares is the one kept."""
        if provider not in self._upcoming:
            made = authority(self.config, self.store, provider, generation, self.clock)
            assert isinstance(made, RootKeeper)
            self._upcoming[provider] = made
        return self._upcoming[provider]

    def bring_in(self, provider: str) -> None:
        """The upcoming authority of ``provider`` becomes its incoming one."""
        made = self._upcoming.pop(provider)
        assert isinstance(made, Provider)
        self.incoming[provider] = made

    def cluster_config(self, cluster: str) -> ClusterConfig:
        return self.config.meshes[self.meshes_of[cluster]].clusters[cluster]

    def description(self, cluster: str) -> str:
        """Where the cluster's cacerts is, or its exchange for an agent-mode cluster."""
        if cluster in self.exchanges:
            return f"agent: {self.exchanges[cluster].where}"
        return self.targets[cluster].description

    def trusted_agent(self, cluster: str) -> str | None:
        """The key id an agent-mode cluster's reports must be signed with: its
        ``agentKey``, else the one trusted at its first report (None: none yet)."""
        pinned = self.cluster_config(cluster).agent_key
        if pinned is not None:
            where = f"clusters.{cluster}.agentKey"
            return key_id(
                load_public_key(pinned.encode(), where, command="trustmgr agent identity")
            )
        with self._lock:
            if self._agents is None:
                self._agents = dict(self.store.load().agents)
            return self._agents.get(cluster)

    def publisher(self, *, create: bool = False) -> Ed25519PrivateKey | None:
        """The key desired documents are signed with; made and stored if ``create``."""
        with self._lock:
            if self._publisher is None:
                blobs = self.store.blobs()
                self._publisher = publisher.ensure(blobs) if create else publisher.load(blobs)
            return self._publisher


def close_provider(provider: object) -> None:
    """Release a provider's connections, if it holds any (Provider has no close)."""
    close = getattr(provider, "close", None)
    if callable(close):
        close()


def authority(
    config: Config, store: StateStore, provider: str, generation: str, clock: Clock
) -> Provider:
    """Provider ``provider`` holding the root of ``generation``: a self-signed
    provider keeps each generation's root apart ("" is the first)."""
    blobs: BlobStore = store.blobs()
    entry = config.providers[provider]
    if generation and entry.self_signed is not None:
        blobs = _Prefixed(blobs, f"{provider}/generation-{generation}/")
    return build_provider(provider, entry, blobs=blobs, clock=clock, generation=generation)


class Only:
    """A provider whose reported roots are limited to ``fingerprints``."""

    def __init__(self, provider: Provider, fingerprints: tuple[str, ...]) -> None:
        self.name = provider.name
        self._provider, self._fingerprints = provider, set(fingerprints)

    def roots(self) -> tuple[x509.Certificate, ...]:
        return tuple(r for r in self._provider.roots() if fingerprint(r) in self._fingerprints)

    def sign_ca(self, csr: x509.CertificateSigningRequest, ttl: timedelta) -> SignedCA:
        answer = self._provider.sign_ca(csr, ttl)
        kept = tuple(r for r in answer.roots if fingerprint(r) in self._fingerprints)
        return SignedCA(answer.chain, kept or answer.roots)

    def close(self) -> None:
        close_provider(self._provider)


class _Prefixed:
    """A BlobStore under a prefix of another."""

    def __init__(self, blobs: BlobStore, prefix: str) -> None:
        self._blobs, self._prefix = blobs, prefix

    def load(self, name: str) -> bytes | None:
        return self._blobs.load(self._prefix + name)

    def save(self, name: str, data: bytes, *, secret: bool) -> None:
        self._blobs.save(self._prefix + name, data, secret=secret)

    def delete(self, name: str) -> None:
        self._blobs.delete(self._prefix + name)
