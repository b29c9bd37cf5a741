"""trustmgr.yaml: strict typed models, and a loader that reports every problem at
once, each with the path of the field and its line in the file."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import AfterValidator, Field, ValidationError, model_validator

from trustmgr.errors import ConfigError
from trustmgr.providers.config import (
    ProviderConfig,
    VaultAuth,
    VaultPath,
    VaultTokenAuth,
    _vault_address,
)
from trustmgr.providers.keys import KeyAlgorithm
from trustmgr.schema import (
    CA_LIFETIME_FLOOR,
    MIN_CA_LIFETIME,
    Duration,
    LocalPath,
    Model,
    NameValue,
    NonNegativeDuration,
    at_least,
    format_duration,
    parse_duration,
)

DEFAULT_CONFIG = "trustmgr.yaml"
M = TypeVar("M", bound=Model)

# Labels joined by single dots: a leading dot would make the URI name constraint
# ".td" permit every subdomain of td (RFC 5280 4.2.1.10).
_TRUST_DOMAIN = re.compile(r"^[a-z0-9_-]+(\.[a-z0-9_-]+)*$")
DNS_LABEL = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
_NAME = re.compile(DNS_LABEL)
_DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"


def _trust_domain(value: str) -> str:
    if value.startswith("spiffe://"):
        raise ValueError(
            f"write the trust domain without the scheme: {value.removeprefix('spiffe://')}"
        )
    if not _TRUST_DOMAIN.match(value) or len(value) > 255:
        raise ValueError(
            f"{value!r} is not a SPIFFE trust domain: use lowercase letters, digits, '-' and '_' "
            "in labels joined by single dots"
        )
    return value


TrustDomain = Annotated[str, AfterValidator(_trust_domain)]


class FileStateStoreConfig(Model):
    path: LocalPath = ".trustmgr"


class KubernetesStateStoreConfig(Model):
    """The state and the providers' blobs in one Secret, the run lock in a Lease
    ``<name>-lock`` beside it. The API is reached as a Kubernetes target's is."""

    namespace: str = Field(default="trustmgr", pattern=DNS_LABEL)
    name: str = Field(default="trustmgr-state", pattern=_DNS_SUBDOMAIN, max_length=248)
    """The Secret's name; the Lease is named after it, with ``-lock`` appended."""
    kubeconfig: LocalPath | None = None
    context: str | None = None
    in_cluster: bool = False
    request_timeout: Duration = timedelta(seconds=10)
    attempts: int = Field(default=4, ge=1, le=10)

    @model_validator(mode="after")
    def _in_cluster_or_kubeconfig(self) -> KubernetesStateStoreConfig:
        if self.in_cluster and (self.kubeconfig or self.context):
            raise ValueError(
                "inCluster uses the pod's service account; drop kubeconfig and context"
            )
        return self


class VaultStateStoreConfig(Model):
    """Vault or OpenBao KV version 2: the state at ``<path>``, blobs under
    ``<path>/blobs/``, the run lock at ``<path>/lock``."""

    address: Annotated[str, AfterValidator(_vault_address)]
    mount: VaultPath = "secret"
    path: VaultPath = "trustmgr/state"
    auth: VaultAuth = VaultAuth(token=VaultTokenAuth())
    namespace: str | None = None
    ca_cert: LocalPath | None = None


class StateStoreConfig(Model):
    """Exactly one store; ``file`` when none is named."""

    file: FileStateStoreConfig = FileStateStoreConfig()
    kubernetes: KubernetesStateStoreConfig | None = None
    vault: VaultStateStoreConfig | None = None

    @model_validator(mode="after")
    def _one_store(self) -> StateStoreConfig:
        named = [k for k in ("file", "kubernetes", "vault") if k in self.model_fields_set]
        if len(named) > 1:
            raise ValueError(f"choose one state store, not {' and '.join(named)}")
        return self

    @property
    def kind(self) -> str:
        """``file``, ``kubernetes`` or ``vault``."""
        if self.kubernetes is not None:
            return "kubernetes"
        return "vault" if self.vault is not None else "file"


class IstioSettings(Model):
    """What trustmgr must know of the cluster's istiod to keep updates hot-reloadable.

    ``restart_istiod``: when a write cannot be hot-reloaded, roll the istiod
    Deployment after it (Kubernetes targets); otherwise the plan and the summary
    say that a restart is needed."""

    version: str | None = Field(default=None, pattern=r"^\d+\.\d+(\.\d+)?$")
    multi_root: bool = False
    restart_istiod: bool = False


class DirectoryTargetConfig(Model):
    path: LocalPath


class KubernetesTargetConfig(Model):
    """A cluster's API: a kubeconfig context (``$KUBECONFIG`` or ~/.kube/config and
    its current context by default) or the pod's service account."""

    kubeconfig: LocalPath | None = None
    context: str | None = None
    in_cluster: bool = False
    namespace: str = Field(default="istio-system", pattern=DNS_LABEL)
    secret_name: str = Field(default="cacerts", pattern=_DNS_SUBDOMAIN, max_length=233)
    istiod_deployment: str = Field(default="istiod", pattern=_DNS_SUBDOMAIN)
    request_timeout: Duration = timedelta(seconds=10)
    """Per request; a request that takes longer is abandoned and retried."""
    attempts: int = Field(default=4, ge=1, le=10)
    """Tries per request for transient failures (5xx, 429, timeouts, lost connections)."""

    @model_validator(mode="after")
    def _in_cluster_or_kubeconfig(self) -> KubernetesTargetConfig:
        if self.in_cluster and (self.kubeconfig or self.context):
            raise ValueError(
                "inCluster uses the pod's service account; drop kubeconfig and context"
            )
        return self


def _ed25519_public(pem: str) -> bool:
    try:
        key = serialization.load_pem_public_key(pem.encode())
    except (ValueError, TypeError):
        return False
    return isinstance(key, Ed25519PublicKey)


class ClusterConfig(Model):
    """One cluster: exactly one target.

    ``mode``: ``push`` (trustmgr makes the CA key and writes cacerts through the
    target) or ``agent`` (trustmgr running in the cluster makes the key there and
    writes cacerts itself; through the target, the central run only publishes the
    cluster's desired document and reads the agent's report: docs/agent.md)."""

    directory: DirectoryTargetConfig | None = None
    kubernetes: KubernetesTargetConfig | None = None
    istio: IstioSettings = IstioSettings()
    mode: Literal["push", "agent"] = "push"
    agent_key: str | None = None
    """Agent mode: the public key the cluster's agent signs its reports with (PEM,
    what ``trustmgr agent identity`` prints); without it, the key of the first
    report is trusted and recorded in the state."""

    @property
    def agent(self) -> bool:
        return self.mode == "agent"

    @model_validator(mode="after")
    def _one_target(self) -> ClusterConfig:
        if (self.directory is None) == (self.kubernetes is None):
            raise ValueError("a cluster has exactly one target: directory or kubernetes")
        if self.agent_key is not None:
            if not self.agent:
                raise ValueError("agentKey is for a cluster in mode agent")
            if "PRIVATE" in self.agent_key or not _ed25519_public(self.agent_key):
                raise ValueError(
                    "agentKey is the agent's public key in PEM, as `trustmgr agent identity` "
                    "prints it"
                )
        return self


class IntermediatesConfig(Model):
    """How cluster CAs are made."""

    key_algorithm: KeyAlgorithm = KeyAlgorithm.ECDSA_P256
    ttl: Annotated[Duration, CA_LIFETIME_FLOOR] = timedelta(hours=720)
    renew_before: Annotated[
        Duration,
        at_least(
            timedelta(minutes=5), "so that a renewal has time to finish before the CA expires"
        ),
    ] = timedelta(hours=240)
    organization: NameValue | None = None

    @model_validator(mode="after")
    def _renew_inside_ttl(self) -> IntermediatesConfig:
        if self.renew_before >= self.ttl:
            raise ValueError("renewBefore must be shorter than ttl, or every run would renew")
        return self


class SpiffeBundleSource(Model):
    """Where an external mesh publishes its SPIFFE trust bundle (JWKS)."""

    file: LocalPath | None = None
    url: str | None = Field(default=None, pattern=r"^https://")
    ca_file: LocalPath | None = None
    """CA bundle to verify the URL's server with; the system's by default."""

    @model_validator(mode="after")
    def _one_source(self) -> SpiffeBundleSource:
        if (self.file is None) == (self.url is None):
            raise ValueError("set exactly one of file or url")
        return self


class ExternalMeshConfig(Model):
    """A mesh trustmgr does not issue for (a SPIRE-run or partner mesh): only its roots."""

    spiffe_bundle: SpiffeBundleSource


class MeshConfig(Model):
    """A mesh trustmgr issues for (provider and clusters), or an external one."""

    trust_domain: TrustDomain
    provider: str | None = None
    clusters: dict[str, ClusterConfig] = {}
    intermediates: IntermediatesConfig | None = None
    external: ExternalMeshConfig | None = None

    @model_validator(mode="after")
    def _issued_or_external(self) -> MeshConfig:
        if self.external is not None:
            if self.provider or self.clusters or self.intermediates:
                raise ValueError("an external mesh has only trustDomain and external")
        elif not self.provider or not self.clusters:
            raise ValueError("a mesh needs a provider and at least one cluster, or external")
        return self


class FederationConfig(Model):
    """Trust both ways between every pair of the listed meshes."""

    meshes: list[str] = Field(min_length=2)


class RotationConfig(Model):
    """How root rotations advance (DESIGN "Rotation")."""

    soak: NonNegativeDuration = timedelta(hours=24)
    """Time between issuer-switched converging and the old root's removal (0: none)."""
    canary: int = Field(default=1, ge=0)
    """Clusters of each rotating mesh switched to the new root before the rest."""
    root_renew_before: NonNegativeDuration = timedelta(0)
    """Start a rotation of a self-signed root this long before it expires (0: never by itself)."""


class LeaderElectionConfig(Model):
    """One leader among the daemon's replicas: a coordination.k8s.io/v1 Lease
    ``<namespace>/<name>``, reached as a Kubernetes target's API is.

    The leader renews the Lease every ``retryPeriod`` and writes nothing once
    ``renewDeadline`` has passed since its last renewal; the others take the
    Lease over once ``leaseDuration`` has passed since then."""

    namespace: str = Field(default="trustmgr", pattern=DNS_LABEL)
    name: str = Field(default="trustmgr-leader", pattern=_DNS_SUBDOMAIN, max_length=253)
    lease_duration: Duration = timedelta(seconds=15)
    renew_deadline: Duration = timedelta(seconds=10)
    retry_period: Duration = timedelta(seconds=2)
    kubeconfig: LocalPath | None = None
    context: str | None = None
    in_cluster: bool = False
    request_timeout: Duration | None = None
    """Per Lease request; half of renewDeadline by default."""
    identity: str | None = Field(default=None, min_length=1, max_length=253)
    """This replica's name in the Lease; the host name and process id by default."""

    @model_validator(mode="after")
    def _consistent(self) -> LeaderElectionConfig:
        if self.in_cluster and (self.kubeconfig or self.context):
            raise ValueError(
                "inCluster uses the pod's service account; drop kubeconfig and context"
            )
        if self.lease_duration.total_seconds() != int(self.lease_duration.total_seconds()):
            raise ValueError(
                "leaseDuration must be whole seconds: the Lease holds leaseDurationSeconds"
            )
        if self.renew_deadline >= self.lease_duration:
            raise ValueError(
                "renewDeadline must be shorter than leaseDuration, so that a leader stops "
                "writing before its lease could have expired"
            )
        if self.retry_period >= self.renew_deadline:
            raise ValueError(
                "retryPeriod must be shorter than renewDeadline, so that a leader tries to "
                "renew more than once before it must stop"
            )
        if self.request_timeout is not None and self.request_timeout >= self.renew_deadline:
            raise ValueError("requestTimeout must be shorter than renewDeadline")
        return self

    @property
    def timeout(self) -> timedelta:
        """How long one Lease request may take."""
        return self.request_timeout or self.renew_deadline / 2


class DaemonConfig(Model):
    """How ``trustmgr daemon`` runs its passes and serves its endpoints."""

    interval: Duration = timedelta(minutes=5)
    jitter: NonNegativeDuration = timedelta(seconds=30)
    listen: str = Field(default="0.0.0.0:9403", pattern=r"^[^\s:]*(\[[0-9a-fA-F:]+\])?:\d{1,5}$")
    leader_election: LeaderElectionConfig | None = None
    """Off when absent: a single daemon."""

    @model_validator(mode="after")
    def _jitter_inside_interval(self) -> DaemonConfig:
        if self.jitter >= self.interval:
            raise ValueError("jitter must be shorter than interval, or passes could overlap")
        return self


class Config(Model):
    state_store: StateStoreConfig = StateStoreConfig()
    daemon: DaemonConfig = DaemonConfig()
    rotation: RotationConfig = RotationConfig()
    providers: dict[str, ProviderConfig] = Field(min_length=1)
    meshes: dict[str, MeshConfig] = Field(min_length=1)
    federations: list[FederationConfig] = []
    intermediates: IntermediatesConfig = IntermediatesConfig()

    def intermediates_for(self, mesh: str) -> IntermediatesConfig:
        return self.meshes[mesh].intermediates or self.intermediates

    def clusters(self) -> Iterator[tuple[str, str, ClusterConfig]]:
        """(mesh, cluster, config) in a stable order."""
        for mesh_name, mesh in self.meshes.items():
            for cluster_name, cluster in mesh.clusters.items():
                yield mesh_name, cluster_name, cluster

    def federated_with(self, mesh: str) -> list[str]:
        """The meshes ``mesh`` trusts besides itself, in a stable order."""
        peers: dict[str, None] = {}
        for federation in self.federations:
            if mesh in federation.meshes:
                peers.update((m, None) for m in federation.meshes if m != mesh)
        return sorted(peers)


# --- loading -----------------------------------------------------------------

Loc = tuple[str | int, ...]


_Loader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_MERGE = "tag:yaml.org,2002:merge"
MAX_DEPTH = 32
"""Levels of nesting a file may have; the deepest key of the schema is at 6."""
ALIAS_LIMIT = 10_000
"""Values aliases may add to a file, or as many as it holds as written if that is more."""


@dataclass(frozen=True)
class _Problem:
    loc: Loc
    message: str
    line: int | None = None
    """Where the problem is, when the path alone does not say (a repeated key)."""


class _Refused(Exception):
    """The node graph cannot be turned into data at all."""

    def __init__(self, problem: _Problem) -> None:
        super().__init__(problem.message)
        self.problem = problem


class _Graph:
    """One pass over the composed node graph, before any Python object is built
    from it: the line of every path, repeated keys, recursion, nesting, and how
    far aliases expand.

    An alias is the anchored node object itself, reached again: sizes are kept
    per node and an alias is not entered twice, so the pass is linear in the
    nodes written however far aliases would expand them (an alias bomb costs
    microseconds here, and gigabytes once built)."""

    def __init__(self) -> None:
        self.lines: dict[Loc, int] = {}
        self.duplicates: list[_Problem] = []
        # node -> (values once every alias is expanded, levels below); None while inside it
        self._done: dict[int, tuple[int, int] | None] = {}
        self._biggest_alias: tuple[int, Loc] = (0, ())
        self._scalars = 0

    def check(self, root: yaml.Node) -> None:
        """Raise _Refused for a graph that must not be built."""
        self.lines[()] = root.start_mark.line + 1
        if not isinstance(root, yaml.CollectionNode):
            return
        expanded, _ = self._walk(root, (), 0)
        written = len(self._done) + self._scalars
        added, limit = expanded - written, max(ALIAS_LIMIT, written)
        if added > limit:
            raise self._refuse(
                self._biggest_alias[1],
                f"aliases add {added:,} values to this file (at most {limit:,} here); "
                "use fewer aliases",
            )

    def _refuse(self, path: Loc, message: str) -> _Refused:
        return _Refused(_Problem(path, message, _line_for(path, self.lines)))

    def _walk(self, node: yaml.Node, path: Loc, depth: int) -> tuple[int, int]:
        """(values once every alias is expanded, levels below) of a collection."""
        key = id(node)
        if key in self._done:
            known = self._done[key]
            if known is None:
                raise self._refuse(
                    path,
                    "this alias refers to a value that contains it; "
                    "a configuration cannot be recursive",
                )
            if known[0] > self._biggest_alias[0]:
                self._biggest_alias = (known[0], path)
        elif depth > MAX_DEPTH:
            known = None
        else:
            self._done[key] = None
            known = self._done[key] = self._children(node, path, depth + 1)
        if known is None or depth + known[1] > MAX_DEPTH:
            raise self._refuse(
                path[:1], f"nested deeper than {MAX_DEPTH} levels; no configuration needs that"
            )
        return known

    def _children(self, node: yaml.Node, path: Loc, depth: int) -> tuple[int, int]:
        # Scalars are most of a file and can hold nothing: they are counted here
        # without a call of their own. Written for speed: this runs on every load.
        lines, size, height, scalars = self.lines, 1, 0, 0
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, yaml.Node] = {}
            for key_node, value in node.value:
                if isinstance(key_node, yaml.ScalarNode):
                    name = key_node.value
                    child: Loc = (*path, name)
                    scalars += 1
                    first = seen.get(name)
                    if first is None:
                        seen[name] = key_node
                    elif first.tag == key_node.tag != _MERGE:
                        self._duplicate(child, first, key_node)
                else:
                    child = (*path, "?")
                    key_size, key_height = self._walk(key_node, child, depth)
                    size += key_size
                    height = max(height, key_height + 1)
                lines[child] = key_node.start_mark.line + 1
                if isinstance(value, yaml.ScalarNode):
                    scalars += 1
                else:
                    value_size, value_height = self._walk(value, child, depth)
                    size += value_size
                    if value_height >= height:
                        height = value_height + 1
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                if isinstance(item, yaml.ScalarNode):
                    scalars += 1
                else:
                    child = (*path, index)
                    if child not in lines:
                        lines[child] = item.start_mark.line + 1
                    item_size, item_height = self._walk(item, child, depth)
                    size += item_size
                    if item_height >= height:
                        height = item_height + 1
        self._scalars += scalars
        return size + scalars, (height or 1) if scalars else height

    def _duplicate(self, path: Loc, first: yaml.Node, again: yaml.Node) -> None:
        self.duplicates.append(
            _Problem(
                path,
                f"duplicate key {again.value!r} (also on line {first.start_mark.line + 1}); "
                "keep only one",
                again.start_mark.line + 1,
            )
        )


def _load_yaml(text: str) -> tuple[Any, _Graph | None]:
    """Parse once: the data, and the graph's line map and repeated keys (which
    YAML would otherwise resolve silently, the last one winning)."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None, None
        graph = _Graph()
        graph.check(node)
        return loader.construct_document(node), graph
    finally:
        loader.dispose()


def _line_for(loc: Loc, lines: dict[Loc, int]) -> int | None:
    for end in range(len(loc), -1, -1):
        if loc[:end] in lines:
            return lines[loc[:end]]
    return None


def _dotted(loc: Loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _reference_problems(data: Any) -> list[_Problem]:
    """Cross-field rules, on the raw document so they are reported together with
    type errors."""
    problems: list[_Problem] = []
    if not isinstance(data, dict):
        return problems
    raw_providers, raw_meshes = data.get("providers"), data.get("meshes")
    providers: dict[Any, Any] = raw_providers if isinstance(raw_providers, dict) else {}
    meshes: dict[Any, Any] = raw_meshes if isinstance(raw_meshes, dict) else {}
    for kind, names in (("provider", providers), ("mesh", meshes)):
        for name in names:
            if not _NAME.match(str(name)):
                section = "providers" if kind == "provider" else "meshes"
                problems.append(
                    _Problem(
                        (section, str(name)), f"{kind} name {name!r} must be a lowercase DNS label"
                    )
                )
    seen_domains: dict[str, str] = {}
    seen_clusters: dict[str, str] = {}
    seen_paths: dict[str, str] = {}
    for mesh_name, mesh in meshes.items():
        if not isinstance(mesh, dict):
            continue
        provider = mesh.get("provider")
        if isinstance(provider, str) and provider not in providers:
            known = ", ".join(sorted(providers)) or "none"
            problems.append(
                _Problem(
                    ("meshes", mesh_name, "provider"),
                    f"unknown provider {provider!r} (known: {known})",
                )
            )
        domain = mesh.get("trustDomain")
        if isinstance(domain, str):
            if domain in seen_domains:
                problems.append(
                    _Problem(
                        ("meshes", mesh_name, "trustDomain"),
                        f"trust domain {domain!r} is already used by mesh {seen_domains[domain]!r}; "
                        "two meshes with one trust domain are one mesh",
                    )
                )
            seen_domains.setdefault(domain, mesh_name)
        clusters = mesh.get("clusters")
        if not isinstance(clusters, dict):
            continue
        for cluster_name, cluster in clusters.items():
            loc: Loc = ("meshes", mesh_name, "clusters", str(cluster_name))
            if not _NAME.match(str(cluster_name)):
                problems.append(
                    _Problem(loc, f"cluster name {cluster_name!r} must be a lowercase DNS label")
                )
            if cluster_name in seen_clusters:
                problems.append(
                    _Problem(
                        loc,
                        f"cluster {cluster_name!r} is also in mesh {seen_clusters[cluster_name]!r}; a cluster is in exactly one mesh",
                    )
                )
            seen_clusters.setdefault(cluster_name, mesh_name)
            directory = cluster.get("directory") if isinstance(cluster, dict) else None
            written = directory.get("path") if isinstance(directory, dict) else None
            # A path the schema refuses is reported there; resolving it could raise.
            if isinstance(written, str) and written.strip() and "\0" not in written:
                path = str(Path(written).expanduser().resolve())
                if path in seen_paths:
                    problems.append(
                        _Problem(
                            (*loc, "directory", "path"),
                            f"cluster {seen_paths[path]!r} writes to the same directory",
                        )
                    )
                seen_paths.setdefault(path, str(cluster_name))
    federations = data.get("federations")
    if isinstance(federations, list):
        for index, federation in enumerate(federations):
            if not isinstance(federation, dict) or not isinstance(federation.get("meshes"), list):
                continue
            members = federation["meshes"]
            for position, member in enumerate(members):
                if isinstance(member, str) and member not in meshes:
                    problems.append(
                        _Problem(
                            ("federations", index, "meshes", position), f"unknown mesh {member!r}"
                        )
                    )
            if len(set(map(str, members))) != len(members):
                problems.append(
                    _Problem(("federations", index, "meshes"), "a mesh is listed twice")
                )
    return problems


ROOT_LIFETIME_FLOOR = timedelta(hours=24)


def _lifetime_problems(data: dict[Any, Any]) -> list[_Problem]:
    """Lifetimes that are each valid but would not converge in this file: a root
    too short to be rotated, and a Vault ceiling that cuts cluster CAs to within
    their renewBefore, so that every run would renew them."""
    problems: list[_Problem] = []
    providers, meshes = data.get("providers"), data.get("meshes")
    if not isinstance(providers, dict) or not isinstance(meshes, dict):
        return problems
    rotation = data.get("rotation")
    window = (
        _duration(rotation.get("rootRenewBefore"))
        if isinstance(rotation, dict) and rotation.get("rootRenewBefore") not in (None, 0, "0")
        else None
    )
    for name, provider in providers.items():
        if not isinstance(provider, dict):
            continue
        root = provider.get("selfSigned")
        ttl = _duration(root.get("ttl", "87600h")) if isinstance(root, dict) else None
        if ttl is not None and window is not None and window >= ttl:
            problems.append(
                _Problem(
                    ("rotation", "rootRenewBefore"),
                    f"{format_duration(window)} is not shorter than the root ttl of provider "
                    f"{name!r} ({format_duration(ttl)}): every new root would start another "
                    "rotation at once; lower rootRenewBefore",
                )
            )
        if ttl is not None and timedelta(0) < ttl < ROOT_LIFETIME_FLOOR:
            problems.append(
                _Problem(
                    ("providers", name, "selfSigned", "ttl"),
                    f"must be at least {format_duration(ROOT_LIFETIME_FLOOR)}: a root is "
                    "replaced by a rotation, which takes longer than that",
                )
            )
        vault = provider.get("vault")
        ceiling = _duration(vault.get("ttl")) if isinstance(vault, dict) else None
        if ceiling is None or ceiling < MIN_CA_LIFETIME:  # the schema says so
            continue
        for mesh_name, mesh in meshes.items():
            if not isinstance(mesh, dict) or mesh.get("provider") != name:
                continue
            own = mesh.get("intermediates")
            renew = _renew_before(data.get("intermediates") if own is None else own)
            if renew is not None and ceiling <= renew:
                problems.append(
                    _Problem(
                        ("providers", name, "vault", "ttl"),
                        f"{format_duration(ceiling)} caps the cluster CAs of mesh {mesh_name!r} "
                        f"at no more than their renewBefore ({format_duration(renew)}), so they "
                        "would be renewed on every run: raise ttl or lower renewBefore",
                    )
                )
    return problems


def _duration(value: Any) -> timedelta | None:
    """A duration as written, or None where the schema reports it."""
    try:
        return parse_duration(value)
    except ValueError:
        return None


def _renew_before(intermediates: Any) -> timedelta | None:
    if intermediates is None:
        intermediates = {}
    if not isinstance(intermediates, dict):
        return None
    if "renewBefore" not in intermediates:
        default = IntermediatesConfig.model_fields["renew_before"].default
        assert isinstance(default, timedelta)
        return default
    return _duration(intermediates["renewBefore"])


def _pydantic_problems(exc: ValidationError) -> list[_Problem]:
    problems = []
    for error in exc.errors(include_url=False):
        loc: Loc = tuple(error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = f"unknown key {loc[-1]!r}"
        elif error["type"] == "too_short":
            least = (error.get("ctx") or {}).get("min_length", 1)
            message = f"needs at least {least} {'entry' if least == 1 else 'entries'}"
        elif error["type"] == "missing":
            message = f"{loc[-1]} is required"
        problems.append(_Problem(loc, message))
    return problems


def parse(text: str, source: str) -> Config:
    """Parse and validate a configuration; raise ConfigError with every problem."""
    return parse_as(Config, text, source)


def parse_as(model: type[M], text: str, source: str) -> M:
    """Parse and validate a YAML file of ``model``'s schema (the configuration,
    or an agent's); raise ConfigError with every problem, each with its line."""
    try:
        data, graph = _load_yaml(text)
    except _Refused as exc:
        raise ConfigError(source, [_format(exc.problem, {})]) from None
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1
        raise ConfigError(
            source,
            [f"{line}: the character U+{exc.character:04X} cannot appear in YAML; remove it"]
            if isinstance(exc.character, int)
            else [f"{line}: not valid YAML: {exc.reason}"],
        ) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{mark.line + 1}: " if mark is not None else ""
        raise ConfigError(
            source, [f"{where}not valid YAML: {getattr(exc, 'problem', exc)}"]
        ) from None
    if not isinstance(data, dict):
        what = "with providers and meshes" if model is Config else "of settings"
        raise ConfigError(source, [f"the file must hold a mapping {what}"])
    assert graph is not None
    lines = graph.lines
    problems = list(graph.duplicates)
    if model is Config:
        problems += _reference_problems(data) + _lifetime_problems(data)
    config: M | None = None
    try:
        config = model.model_validate(data)
    except ValidationError as exc:
        problems = _pydantic_problems(exc) + problems
    if problems:
        ordered = sorted(
            problems, key=lambda p: (p.line or _line_for(p.loc, lines) or 0, _dotted(p.loc))
        )
        raise ConfigError(source, [_format(p, lines) for p in ordered])
    assert config is not None
    return config


def _format(problem: _Problem, lines: dict[Loc, int]) -> str:
    line = problem.line or _line_for(problem.loc, lines) or 1
    return f"{line}: {_dotted(problem.loc)}: {problem.message}"


def load(path: Path) -> Config:
    return load_as(Config, path)


def load_as(model: type[M], path: Path) -> M:
    """Read ``path`` and parse it as ``model``; every problem in one ConfigError."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(str(path), ["no such file; create one with `trustmgr init`"]) from None
    except OSError as exc:
        raise ConfigError(str(path), [f"cannot read: {exc.strerror}"]) from None
    try:
        text = raw.decode()
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        column = exc.start - raw.rfind(b"\n", 0, exc.start)
        raise ConfigError(
            str(path),
            [
                f"{line}: not UTF-8 text (byte 0x{raw[exc.start]:02x} in column {column}); "
                "save the file as UTF-8"
            ],
        ) from None
    return parse_as(model, text, str(path))
