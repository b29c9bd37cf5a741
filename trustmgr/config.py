"""trustmgr.yaml: strict typed models, and a loader that reports every problem at
once, each with the path of the field and its line in the file."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import AfterValidator, Field, ValidationError, model_validator

from trustmgr.errors import ConfigError
from trustmgr.providers.config import ProviderConfig
from trustmgr.providers.keys import KeyAlgorithm
from trustmgr.schema import Duration, Model, NonNegativeDuration

DEFAULT_CONFIG = "trustmgr.yaml"

# Labels joined by single dots: a leading dot would make the URI name constraint
# ".td" permit every subdomain of td (RFC 5280 4.2.1.10).
_TRUST_DOMAIN = re.compile(r"^[a-z0-9_-]+(\.[a-z0-9_-]+)*$")
_DNS_LABEL = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
_NAME = re.compile(_DNS_LABEL)
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
    path: str = ".trustmgr"


class StateStoreConfig(Model):
    file: FileStateStoreConfig = FileStateStoreConfig()


class IstioSettings(Model):
    """What trustmgr must know of the cluster's istiod to keep updates hot-reloadable.

    ``restart_istiod``: when a write cannot be hot-reloaded, roll the istiod
    Deployment after it (Kubernetes targets); otherwise the plan and the summary
    say that a restart is needed."""

    version: str | None = Field(default=None, pattern=r"^\d+\.\d+(\.\d+)?$")
    multi_root: bool = False
    restart_istiod: bool = False


class DirectoryTargetConfig(Model):
    path: str


class KubernetesTargetConfig(Model):
    """A cluster's API: a kubeconfig context (``$KUBECONFIG`` or ~/.kube/config and
    its current context by default) or the pod's service account."""

    kubeconfig: str | None = None
    context: str | None = None
    in_cluster: bool = False
    namespace: str = Field(default="istio-system", pattern=_DNS_LABEL)
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


class ClusterConfig(Model):
    """One cluster: exactly one target."""

    directory: DirectoryTargetConfig | None = None
    kubernetes: KubernetesTargetConfig | None = None
    istio: IstioSettings = IstioSettings()

    @model_validator(mode="after")
    def _one_target(self) -> ClusterConfig:
        if (self.directory is None) == (self.kubernetes is None):
            raise ValueError("a cluster has exactly one target: directory or kubernetes")
        return self


class IntermediatesConfig(Model):
    """How cluster CAs are made."""

    key_algorithm: KeyAlgorithm = KeyAlgorithm.ECDSA_P256
    ttl: Duration = timedelta(hours=720)
    renew_before: Duration = timedelta(hours=240)
    organization: str | None = None

    @model_validator(mode="after")
    def _renew_inside_ttl(self) -> IntermediatesConfig:
        if self.renew_before >= self.ttl:
            raise ValueError("renewBefore must be shorter than ttl, or every run would renew")
        return self


class SpiffeBundleSource(Model):
    """Where an external mesh publishes its SPIFFE trust bundle (JWKS)."""

    file: str | None = None
    url: str | None = Field(default=None, pattern=r"^https://")
    ca_file: str | None = None
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


class Config(Model):
    state_store: StateStoreConfig = StateStoreConfig()
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


def _load_yaml(text: str) -> tuple[yaml.Node | None, Any]:
    """Parse once: the node tree (for lines) and the data built from it."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        return node, (loader.construct_document(node) if node is not None else None)
    finally:
        loader.dispose()


def _lines(node: yaml.Node, path: Loc, out: dict[Loc, int]) -> None:
    out.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            child = (*path, str(key.value))
            out[child] = key.start_mark.line + 1
            _lines(value, child, out)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _lines(item, (*path, index), out)


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


@dataclass(frozen=True)
class _Problem:
    loc: Loc
    message: str


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
            if isinstance(directory, dict) and isinstance(directory.get("path"), str):
                path = str(Path(directory["path"]).expanduser().resolve())
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
    try:
        node, data = _load_yaml(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{mark.line + 1}: " if mark is not None else ""
        raise ConfigError(
            source, [f"{where}not valid YAML: {getattr(exc, 'problem', exc)}"]
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(source, ["the file must hold a mapping with providers and meshes"])
    lines: dict[Loc, int] = {}
    if node is not None:
        _lines(node, (), lines)
    problems = _reference_problems(data)
    config: Config | None = None
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        problems = _pydantic_problems(exc) + problems
    if problems:
        ordered = sorted(problems, key=lambda p: (_line_for(p.loc, lines) or 0, _dotted(p.loc)))
        raise ConfigError(
            source,
            [f"{_line_for(p.loc, lines) or 1}: {_dotted(p.loc)}: {p.message}" for p in ordered],
        )
    assert config is not None
    return config


def load(path: Path) -> Config:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(str(path), ["no such file; create one with `trustmgr init`"]) from None
    except OSError as exc:
        raise ConfigError(str(path), [f"cannot read: {exc.strerror}"]) from None
    return parse(text, str(path))
