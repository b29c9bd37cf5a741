"""A small, faithful Kubernetes API server emulator for tests.

One :class:`KubeEmulator` is one cluster.  It serves plain HTTP on 127.0.0.1 (ephemeral port)
and speaks enough of the Kubernetes REST API for the official ``kubernetes`` client to work with
it unmodified:

* core/v1 ``namespaces`` (get, list, create, delete), ``secrets`` and ``configmaps``,
  apps/v1 ``deployments`` and coordination.k8s.io/v1 ``leases``: get, list
  (``labelSelector``, ``fieldSelector``, ``limit``/``continue``), create (201), replace (PUT),
  patch (merge, strategic merge, JSON patch), delete, deletecollection; ``dryRun=All`` on
  writes.
* ``metadata.resourceVersion`` from one etcd-like counter per cluster, bumped by every write
  (a no-op update or patch writes nothing and keeps it, as etcd3's store does); a stale
  resourceVersion on PUT/PATCH, or failed delete preconditions, answer 409 Conflict.
* uid, creationTimestamp, generation (deployments: bumped when spec or annotations change),
  secret ``stringData`` folded into base64 ``data``, and the validation messages kube-apiserver
  gives for names, labels, data keys, sizes and immutable fields.
* Failures are ``Status`` objects worded like kube-apiserver's (NotFound, AlreadyExists, Conflict,
  Forbidden, Invalid, BadRequest, Unauthorized), so the client raises ``ApiException`` with the
  real ``.status`` and ``.body``.
* Bearer-token authentication (one token, or one per client: ``tokens``), an RBAC-like
  allow/deny rule set (:meth:`KubeEmulator.deny`, :meth:`KubeEmulator.allow`, or real Roles
  and RoleBindings with :meth:`KubeEmulator.apply_rbac`), optional TLS with a self-signed
  certificate (``tls=True``, :attr:`KubeEmulator.ca_pem`), per-verb request counters
  (:attr:`KubeEmulator.requests`), a write log of every committed write in order, each with
  the client that made it and when (:attr:`KubeEmulator.write_log`) and
  fault injection (:class:`Fault`): error statuses, delays, dropped or late answers and hooks that
  run between requests.
* Service-account tokens (:meth:`KubeEmulator.issue_service_account_token`): JWT-shaped,
  RS256-signed by the cluster, accepted as bearer tokens, and authenticated by
  authentication.k8s.io/v1 ``tokenreviews`` (POST) as kube-apiserver does; each review is
  logged in :attr:`KubeEmulator.token_reviews`.

Not emulated: watch, server-side apply, subresources (status, scale), finalizers and graceful
deletion, namespace termination (deleting a namespace removes it and its objects at once),
controllers (deployments never roll out, ``status`` stays empty), managedFields, admission
webhooks, field pruning of unknown fields, protobuf/CBOR/YAML bodies, client certificates,
API discovery.

All running emulators share one asyncio loop in one daemon thread, so hundreds of clusters cost a
listening socket each; the thread stops when the last emulator stops.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import copy
import ipaddress
import itertools
import json
import random
import re
import ssl
import tempfile
import threading
import time
import uuid
import weakref
from collections import Counter
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http import HTTPStatus
from pathlib import Path
from typing import Any, ClassVar, Final, TypeVar
from urllib.parse import parse_qs, urlsplit

__all__ = [
    "RESOURCES",
    "TOKEN_REVIEW_PATH",
    "ApiError",
    "Fault",
    "KubeEmulator",
    "RequestRecord",
    "ResourceType",
    "Rule",
    "ServiceAccountToken",
    "TokenReviewRecord",
    "WriteRecord",
    "merge_kubeconfigs",
    "start_many",
    "stop_many",
]

Obj = dict[str, Any]
T = TypeVar("T")

DEFAULT_USER: Final = "system:serviceaccount:trustmgr:trustmgr"
MAX_DATA_SIZE: Final = 1024 * 1024  # core.MaxSecretSize, also the ConfigMap limit
READ_VERBS: Final = frozenset({"get", "list", "watch"})
WRITE_VERBS: Final = frozenset({"create", "update", "patch", "delete", "deletecollection"})

_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_CONFIG_KEY = re.compile(r"[-._a-zA-Z0-9]+")
_QUALIFIED_NAME = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
_SUBDOMAIN_MSG: Final = (
    "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or "
    "'.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used "
    "for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"
)
_DNS_LABEL_MSG: Final = (
    "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and "
    "must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex "
    "used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')"
)
_CONFIG_KEY_MSG: Final = (
    "a valid config key must consist of alphanumeric characters, '-', '_' or '.' (e.g. "
    "'key.name',  or 'KEY_NAME',  or 'key-name', regex used for validation is '[-._a-zA-Z0-9]+')"
)
_MODIFIED: Final = (
    "the object has been modified; please apply your changes to the latest version and try again"
)
_MERGE_PATCH: Final = "application/merge-patch+json"
_STRATEGIC_PATCH: Final = "application/strategic-merge-patch+json"
_JSON_PATCH: Final = "application/json-patch+json"
_APPLY_PATCH: Final = "application/apply-patch+yaml"


# --- resource types and Status errors -------------------------------------------------------


@dataclass(frozen=True)
class ResourceType:
    """A served resource: REST plural, Kind, API group/version and scope."""

    plural: str
    kind: str
    group: str = ""
    version: str = "v1"
    namespaced: bool = True
    has_generation: bool = False

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def qualified(self) -> str:
        """``secrets`` or ``deployments.apps``: how kube-apiserver names it in messages."""
        return f"{self.plural}.{self.group}" if self.group else self.plural

    @property
    def qualified_kind(self) -> str:
        return f"{self.kind}.{self.group}" if self.group else self.kind

    def details(self, name: str = "", *, kind: str | None = None) -> Obj:
        details: Obj = {"name": name} if name else {}
        if self.group:
            details["group"] = self.group
        details["kind"] = kind or self.plural
        return details


RESOURCES: Final[Mapping[str, ResourceType]] = {
    r.plural: r
    for r in (
        ResourceType("namespaces", "Namespace", namespaced=False),
        ResourceType("secrets", "Secret"),
        ResourceType("configmaps", "ConfigMap"),
        ResourceType("deployments", "Deployment", "apps", has_generation=True),
        ResourceType("leases", "Lease", "coordination.k8s.io"),
    )
}
_BY_KIND: Final = {(r.api_version, r.kind): r for r in RESOURCES.values()}

TOKEN_REVIEW_PATH: Final = "/apis/authentication.k8s.io/v1/tokenreviews"
_TOKEN_REVIEWS: Final = ResourceType(
    "tokenreviews", "TokenReview", "authentication.k8s.io", namespaced=False
)
API_AUDIENCE: Final = "https://kubernetes.default.svc.cluster.local"
"""kube-apiserver's default ``--api-audiences``: what a token without an audience is good for."""


class ApiError(Exception):
    """A failure answered as a ``Status`` object, worded the way kube-apiserver words it."""

    def __init__(
        self,
        code: int,
        message: str,
        reason: str = "",
        details: Obj | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(f"{code} {reason}: {message}")
        self.code = code
        self.message = message
        self.reason = reason
        self.details = details
        self.headers = dict(headers or {})

    def status(self) -> Obj:
        """The JSON ``Status`` body."""
        body: Obj = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure"}
        body["message"] = self.message
        if self.reason:
            body["reason"] = self.reason
        if self.details is not None:
            body["details"] = self.details
        body["code"] = self.code
        return body


_STATUS_REASONS: Final = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    409: "Conflict",
    410: "Expired",
    415: "UnsupportedMediaType",
    422: "Invalid",
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
    504: "Timeout",
}


def _not_found(rt: ResourceType, name: str) -> ApiError:
    return ApiError(404, f'{rt.qualified} "{name}" not found', "NotFound", rt.details(name))


def _conflict(rt: ResourceType, name: str, why: str) -> ApiError:
    msg = f'Operation cannot be fulfilled on {rt.qualified} "{name}": {why}'
    return ApiError(409, msg, "Conflict", rt.details(name))


def _bad_request(message: str) -> ApiError:
    return ApiError(400, message, "BadRequest")


@dataclass(frozen=True)
class _FieldError:
    field: str
    reason: str
    message: str


def _required(path: str, detail: str = "") -> _FieldError:
    return _FieldError(
        path, "FieldValueRequired", "Required value" + (f": {detail}" if detail else "")
    )


def _invalid_value(path: str, value: object, detail: str) -> _FieldError:
    return _FieldError(path, "FieldValueInvalid", f"Invalid value: {json.dumps(value)}: {detail}")


def _invalid(rt: ResourceType, name: str, errors: Sequence[_FieldError]) -> ApiError:
    parts = [f"{e.field}: {e.message}" for e in errors]
    summary = parts[0] if len(parts) == 1 else "[" + ", ".join(parts) + "]"
    details = rt.details(name, kind=rt.kind)
    details["causes"] = [
        {"reason": e.reason, "message": e.message, "field": e.field} for e in errors
    ]
    return ApiError(422, f'{rt.qualified_kind} "{name}" is invalid: {summary}', "Invalid", details)


# --- authorization and faults ---------------------------------------------------------------


def _names(value: str | Iterable[str]) -> tuple[str, ...]:
    return (value,) if isinstance(value, str) else tuple(value)


@dataclass(frozen=True)
class Rule:
    """An RBAC-like rule; ``"*"`` matches anything.

    As in RBAC, a rule naming objects never matches requests that carry no name (list, create),
    and a rule naming namespaces never matches cluster-scoped requests.
    """

    verbs: tuple[str, ...] = ("*",)
    resources: tuple[str, ...] = ("*",)
    namespaces: tuple[str, ...] = ("*",)
    names: tuple[str, ...] = ("*",)
    groups: tuple[str, ...] = ("*",)
    """API groups (``""`` is the core group), as a Role's ``apiGroups``."""

    def matches(
        self, verb: str, resource: str, namespace: str, name: str, group: str | None = None
    ) -> bool:
        return (
            _rule_match(self.verbs, verb)
            and _rule_match(self.resources, resource)
            and _rule_match(self.namespaces, namespace)
            and _rule_match(self.names, name)
            and (group is None or "*" in self.groups or group in self.groups)
        )


def _rule_match(allowed: tuple[str, ...], value: str) -> bool:
    return "*" in allowed or (bool(value) and value in allowed)


@dataclass
class Fault:
    """A scripted misbehaviour for the next ``times`` requests matching ``method`` and ``path``.

    ``path`` is a regex searched in the URL path (no query string); ``method`` None matches any.
    ``times`` None means forever.  For a matching request, in this order: sleep ``delay``
    seconds; run ``hook`` in a worker thread (it may call this emulator over HTTP); then either
    close the connection without answering (``drop``), answer ``status`` with a Status body
    (plus ``Retry-After`` when ``retry_after`` is set), or serve the request normally.  With
    ``lose_response`` the request is served (a write is applied) but the connection is closed
    instead of answering, as when a network fails after the apiserver committed; with
    ``answer_delay`` it is served, then answered that many seconds later, as when an apiserver
    commits a write and answers after the client gave up waiting.
    ``hits`` counts the requests it has matched.
    """

    method: str | None = None
    path: str = ""
    times: int | None = 1
    status: int | None = None
    delay: float = 0.0
    drop: bool = False
    lose_response: bool = False
    answer_delay: float = 0.0
    hook: Callable[[], object] | None = None
    retry_after: int | None = None
    message: str = "injected fault"
    hits: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self._path_re = re.compile(self.path)

    def matches(self, method: str, path: str) -> bool:
        if self.times is not None and self.hits >= self.times:
            return False
        if self.method is not None and self.method.upper() != method:
            return False
        return self._path_re.search(path) is not None

    def error(self) -> ApiError:
        assert self.status is not None
        reason = _STATUS_REASONS.get(self.status, "")
        message = self.message
        details: Obj | None = None
        headers: dict[str, str] = {}
        if self.status == 500:
            message = f"Internal error occurred: {self.message}"
            details = {"causes": [{"message": self.message}]}
        if self.retry_after is not None:
            headers["Retry-After"] = str(self.retry_after)
            details = {"retryAfterSeconds": self.retry_after}
        return ApiError(self.status, message, reason, details, headers)


@dataclass
class RequestRecord:
    """One HTTP request the emulator received; ``status`` 0 means it was not answered."""

    method: str
    path: str
    query: dict[str, str]
    verb: str | None
    resource: str | None
    namespace: str
    name: str
    status: int = 0
    client: str = ""
    """The user the request authenticated as (see ``tokens``)."""
    user_agent: str = ""


@dataclass(frozen=True)
class ServiceAccountToken:
    """A service-account token the emulator issued: who it names and until when it is good."""

    token: str = field(repr=False)
    namespace: str
    name: str
    uid: str
    expires: float
    """Unix seconds (the ``exp`` claim)."""
    audiences: tuple[str, ...] = (API_AUDIENCE,)

    @property
    def username(self) -> str:
        return f"system:serviceaccount:{self.namespace}:{self.name}"

    @property
    def groups(self) -> list[str]:
        return ["system:serviceaccounts", f"system:serviceaccounts:{self.namespace}"]


@dataclass(frozen=True)
class TokenReviewRecord:
    """One TokenReview the emulator answered.

    ``token`` is the token reviewed (``spec.token``), ``reviewer`` the user the request
    authenticated as; ``username`` and ``uid`` are empty and ``error`` says why when the token
    was not authenticated.
    """

    token: str = field(repr=False)
    authenticated: bool
    username: str
    uid: str
    error: str
    reviewer: str
    at: float


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


_WRITE_SEQUENCE: Final = itertools.count(1)
"""Orders committed writes across every emulator of the process: all are served by one loop."""


@dataclass(frozen=True)
class WriteRecord:
    """One write that an HTTP request committed (the resourceVersion moved).

    ``object`` is the object as stored after the write, which is what a watcher (istiod's
    informer) sees next; None for a delete.  ``sequence`` orders writes across every emulator
    in the process, so the logs of several clusters merge into the order they happened in.
    A write whose answer was lost or delayed (:class:`Fault`) is logged all the same.
    ``client`` is the user the request authenticated as (one per token, see ``tokens``),
    ``at`` the wall-clock time the write was committed.
    """

    sequence: int
    verb: str
    resource: str
    namespace: str
    name: str
    object: Obj | None
    resource_version: str
    client: str = ""
    user_agent: str = ""
    at: float = 0.0


# --- selectors and patches ------------------------------------------------------------------

_REQ_SET = re.compile(r"\s*(?P<key>[^\s!=()]+)\s+(?P<op>in|notin)\s*\((?P<values>[^()]*)\)\s*")
_REQ_EQ = re.compile(r"\s*(?P<key>[^\s!=()]+)\s*(?P<op>==|=|!=)\s*(?P<value>[^\s!=(),]*)\s*")
_REQ_EXISTS = re.compile(r"\s*(?P<neg>!?)\s*(?P<key>[^\s!=()]+)\s*")

Selector = Callable[[Mapping[str, str]], bool]


def _split_requirements(selector: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, char in enumerate(selector):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(selector[start:i])
            start = i + 1
    parts.append(selector[start:])
    return [p for p in parts if p.strip()]


def _requirement(text: str) -> Selector:
    if m := _REQ_SET.fullmatch(text):
        key, values = m["key"], {v.strip() for v in m["values"].split(",")}
        if m["op"] == "in":
            return lambda labels: labels.get(key) in values
        return lambda labels: labels.get(key) not in values
    if m := _REQ_EQ.fullmatch(text):
        key, value = m["key"], m["value"]
        if m["op"] == "!=":
            return lambda labels: labels.get(key) != value
        return lambda labels: labels.get(key) == value
    if m := _REQ_EXISTS.fullmatch(text):
        key, negated = m["key"], bool(m["neg"])
        return lambda labels: (key in labels) != negated
    raise _bad_request(f"unable to parse requirement: {text.strip()!r}")


def parse_label_selector(selector: str) -> Selector:
    """Compile a label selector (``a=b,c!=d,e,!f,g in (x,y),h notin (z)``) to a predicate."""
    requirements = [_requirement(part) for part in _split_requirements(selector)]
    return lambda labels: all(req(labels) for req in requirements)


def _field_value(obj: Obj, path: str) -> str:
    node: Any = obj
    for part in path.split("."):
        node = node.get(part, "") if isinstance(node, dict) else ""
    return str(node)


def _parse_field_selector(rt: ResourceType, selector: str) -> Callable[[Obj], bool]:
    supported = {"metadata.name", "metadata.namespace"}
    supported |= {"secrets": {"type"}, "namespaces": {"status.phase"}}.get(rt.plural, set())
    checks: list[Callable[[Obj], bool]] = []
    for part in _split_requirements(selector):
        m = _REQ_EQ.fullmatch(part)
        if m is None:
            raise _bad_request(f"invalid field selector: {part.strip()!r}")
        if m["key"] not in supported:
            raise _bad_request(f"field label not supported: {m['key']}")
        checks.append(_field_check(m["key"], m["value"], negated=m["op"] == "!="))
    return lambda obj: all(check(obj) for check in checks)


def _field_check(path: str, value: str, *, negated: bool) -> Callable[[Obj], bool]:
    return lambda obj: (_field_value(obj, path) == value) != negated


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: objects merge recursively, null deletes, the rest replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def strategic_merge_patch(target: Any, patch: Any) -> Any:
    """Strategic merge patch, for the shapes built-in types use.

    Objects merge like :func:`merge_patch`; ``$patch: replace`` replaces an object; other ``$``
    directives are ignored.  Lists of objects that all carry ``name`` (containers, env, volumes,
    imagePullSecrets) merge by name and honour ``$patch: delete``; other lists are replaced.
    """
    if isinstance(patch, dict):
        if patch.get("$patch") == "replace":
            return {k: copy.deepcopy(v) for k, v in patch.items() if k != "$patch"}
        result = dict(target) if isinstance(target, dict) else {}
        for key, value in patch.items():
            if key.startswith("$"):
                continue
            if value is None:
                result.pop(key, None)
            else:
                result[key] = strategic_merge_patch(result.get(key), value)
        return result
    if isinstance(patch, list) and isinstance(target, list) and _named_items(patch + target):
        merged = {item["name"]: item for item in target}
        for item in patch:
            if item.get("$patch") == "delete":
                merged.pop(item["name"], None)
            else:
                merged[item["name"]] = strategic_merge_patch(merged.get(item["name"]), item)
        return list(merged.values())
    return copy.deepcopy(patch)


def _named_items(items: list[Any]) -> bool:
    return bool(items) and all(isinstance(i, dict) and "name" in i for i in items)


def _pointer(path: object) -> list[str]:
    if not isinstance(path, str) or (path and not path.startswith("/")):
        raise ValueError(f"invalid JSON pointer {path!r}")
    return [t.replace("~1", "/").replace("~0", "~") for t in path.split("/")[1:]]


def _index(token: str, size: int) -> int:
    if not token.isdigit() or int(token) >= size:
        raise IndexError(f"index {token} out of range")
    return int(token)


def _resolve(doc: Any, tokens: list[str]) -> Any:
    for token in tokens:
        if isinstance(doc, dict):
            doc = doc[token]
        elif isinstance(doc, list):
            doc = doc[_index(token, len(doc))]
        else:
            raise KeyError(token)
    return doc


def _add(doc: Any, tokens: list[str], value: Any) -> Any:
    if not tokens:
        return value
    parent, last = _resolve(doc, tokens[:-1]), tokens[-1]
    if isinstance(parent, dict):
        parent[last] = value
    elif isinstance(parent, list):
        parent.insert(len(parent) if last == "-" else _index(last, len(parent) + 1), value)
    else:
        raise KeyError(last)
    return doc


def _remove(doc: Any, tokens: list[str]) -> Any:
    if not tokens:
        raise KeyError("cannot remove the whole document")
    parent, last = _resolve(doc, tokens[:-1]), tokens[-1]
    if isinstance(parent, list):
        return parent.pop(_index(last, len(parent)))
    if isinstance(parent, dict):
        return parent.pop(last)
    raise KeyError(last)


def json_patch(doc: Any, operations: list[Any]) -> Any:
    """RFC 6902 JSON patch (add, remove, replace, move, copy, test) on a copy of ``doc``.

    Raises ValueError, KeyError or IndexError when an operation does not apply.
    """
    doc = copy.deepcopy(doc)
    for op in operations:
        if not isinstance(op, dict):
            raise ValueError(f"invalid operation {op!r}")
        kind, path = op.get("op"), _pointer(op.get("path"))
        if kind in ("move", "copy"):
            source = _pointer(op.get("from"))
            value = _remove(doc, source) if kind == "move" else copy.deepcopy(_resolve(doc, source))
            doc = _add(doc, path, value)
        elif kind == "add":
            doc = _add(doc, path, copy.deepcopy(op["value"]))
        elif kind == "remove":
            _remove(doc, path)
        elif kind == "replace":
            _resolve(doc, path)
            if path:
                _remove(doc, path)
            doc = _add(doc, path, copy.deepcopy(op["value"]))
        elif kind == "test":
            if _resolve(doc, path) != op.get("value"):
                raise ValueError(f"testing value {op['path']} failed: test failed")
        else:
            raise ValueError(f"unexpected kind of operation: {kind!r}")
    return doc


# --- admission: defaults and validation per kind ---------------------------------------------


def _validate_meta(rt: ResourceType, meta: Obj) -> list[_FieldError]:
    name = meta.get("name", "")
    errors: list[_FieldError] = []
    if not name:
        errors.append(_required("metadata.name", "name or generateName is required"))
    elif rt.namespaced and (len(name) > 253 or not _SUBDOMAIN.fullmatch(name)):
        errors.append(_invalid_value("metadata.name", name, _SUBDOMAIN_MSG))
    elif not rt.namespaced and (len(name) > 63 or not _DNS_LABEL.fullmatch(name)):
        errors.append(_invalid_value("metadata.name", name, _DNS_LABEL_MSG))
    labels = meta.get("labels") or {}
    if not isinstance(labels, dict):
        raise _bad_request("metadata.labels must be a map of strings")
    for key, value in labels.items():
        prefix, _, short = key.rpartition("/")
        if (prefix and not _SUBDOMAIN.fullmatch(prefix)) or not _qualified(short):
            errors.append(_invalid_value("metadata.labels", key, "name part must be valid"))
        if not isinstance(value, str) or (value and not _qualified(value)):
            errors.append(_invalid_value("metadata.labels", value, "a valid label value"))
    return errors


def _qualified(text: str) -> bool:
    return len(text) <= 63 and _QUALIFIED_NAME.fullmatch(text) is not None


def _decode_b64(kind: str, field_name: str, data: object) -> dict[str, bytes]:
    if not isinstance(data, dict):
        raise _bad_request(f'{kind} in version "v1" cannot be handled as a {kind}: {field_name}')
    decoded: dict[str, bytes] = {}
    for key, value in data.items():
        try:
            decoded[key] = base64.b64decode(value, validate=True)
        except (binascii.Error, TypeError, ValueError) as exc:
            message = f'{kind} in version "v1" cannot be handled as a {kind}: illegal base64 data'
            raise _bad_request(f"{message} in {field_name}[{key}]: {exc}") from exc
    return decoded


def _validate_data(field_name: str, values: Mapping[str, bytes]) -> list[_FieldError]:
    errors = [
        _invalid_value(f"{field_name}[{key}]", key, _CONFIG_KEY_MSG)
        for key in values
        if not _CONFIG_KEY.fullmatch(key)
    ]
    if sum(len(v) for v in values.values()) > MAX_DATA_SIZE:
        message = f"Too long: must have at most {MAX_DATA_SIZE} bytes"
        errors.append(_FieldError(field_name, "FieldValueTooLong", message))
    return errors


def _immutable(path: str, value: object) -> _FieldError:
    return _invalid_value(path, value, "field is immutable")


def _admit_secret(obj: Obj, old: Obj | None) -> list[_FieldError]:
    values = _decode_b64("Secret", "data", obj.get("data") or {})
    string_data = obj.pop("stringData", None) or {}
    if not isinstance(string_data, dict) or not all(
        isinstance(v, str) for v in string_data.values()
    ):
        raise _bad_request('Secret in version "v1" cannot be handled as a Secret: stringData')
    values.update((k, v.encode()) for k, v in string_data.items())
    obj.pop("data", None)
    if values:
        obj["data"] = {k: base64.b64encode(v).decode() for k, v in values.items()}
    obj.setdefault("type", "Opaque")
    errors = _validate_data("data", values)
    if obj["type"] == "kubernetes.io/tls":
        errors += [_required(f"data[{k}]") for k in ("tls.crt", "tls.key") if k not in values]
    return errors + _immutable_errors(obj, old, ("type",), ("data",))


def _admit_configmap(obj: Obj, old: Obj | None) -> list[_FieldError]:
    data = obj.get("data") or {}
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        raise _bad_request('ConfigMap in version "v1" cannot be handled as a ConfigMap: data')
    binary = _decode_b64("ConfigMap", "binaryData", obj.get("binaryData") or {})
    errors = _validate_data("data", {k: v.encode() for k, v in data.items()})
    errors += _validate_data("binaryData", binary)
    errors += [
        _invalid_value(f"data[{key}]", key, "duplicate of key present in binaryData")
        for key in data.keys() & binary.keys()
    ]
    return errors + _immutable_errors(obj, old, (), ("data", "binaryData"))


def _immutable_errors(
    obj: Obj, old: Obj | None, always: tuple[str, ...], when_immutable: tuple[str, ...]
) -> list[_FieldError]:
    if old is None:
        return []
    errors = [_immutable(f, obj.get(f)) for f in always if obj.get(f) != old.get(f)]
    if old.get("immutable"):
        if not obj.get("immutable"):
            errors.append(_immutable("immutable", obj.get("immutable")))
        detail = "field is immutable when `immutable` is set"
        errors += [
            _FieldError(f, "FieldValueForbidden", f"Forbidden: {detail}")
            for f in when_immutable
            if obj.get(f) != old.get(f)
        ]
    return errors


def _admit_deployment(obj: Obj, old: Obj | None) -> list[_FieldError]:
    spec = obj.setdefault("spec", {})
    if not isinstance(spec, dict):
        raise _bad_request('Deployment in version "v1" cannot be handled as a Deployment: spec')
    spec.setdefault("replicas", 1)
    spec.setdefault("revisionHistoryLimit", 10)
    spec.setdefault("progressDeadlineSeconds", 600)
    rolling = {"maxUnavailable": "25%", "maxSurge": "25%"}
    spec.setdefault("strategy", {"type": "RollingUpdate", "rollingUpdate": rolling})
    obj["status"] = copy.deepcopy(old["status"]) if old else {}
    errors: list[_FieldError] = []
    selector = spec.get("selector")
    template = spec.get("template") or {}
    labels = (template.get("metadata") or {}).get("labels") or {}
    match = (selector or {}).get("matchLabels") or {}
    if not selector:
        errors.append(_required("spec.selector"))
    elif any(labels.get(k) != v for k, v in match.items()):
        detail = "`selector` does not match template `labels`"
        errors.append(_invalid_value("spec.template.metadata.labels", labels, detail))
    if not (template.get("spec") or {}).get("containers"):
        errors.append(_required("spec.template.spec.containers"))
    if old is not None and selector != old["spec"].get("selector"):
        errors.append(_immutable("spec.selector", selector))
    return errors


def _admit_namespace(obj: Obj, old: Obj | None) -> list[_FieldError]:
    name = obj["metadata"].get("name", "")
    obj["metadata"].setdefault("labels", {})["kubernetes.io/metadata.name"] = name
    obj.setdefault("spec", {}).setdefault("finalizers", ["kubernetes"])
    obj["status"] = copy.deepcopy(old["status"]) if old else {"phase": "Active"}
    return []


_MICRO_TIME = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?(Z|[+-]\d{2}:\d{2})")


def _admit_lease(obj: Obj, old: Obj | None) -> list[_FieldError]:
    """coordination.k8s.io/v1 Lease: the times must parse as MicroTime (else the
    body is refused as undecodable, 400); durations and transitions are checked
    as ValidateLeaseSpec does."""
    spec = obj.setdefault("spec", {})
    if not isinstance(spec, dict):
        raise _bad_request('Lease in version "v1" cannot be handled as a Lease: spec')
    for name in ("acquireTime", "renewTime"):
        value = spec.get(name)
        if value is not None and not (isinstance(value, str) and _MICRO_TIME.fullmatch(value)):
            raise _bad_request(
                f'Lease in version "v1" cannot be handled as a Lease: parsing time '
                f"{json.dumps(value)}: spec.{name}"
            )
    errors: list[_FieldError] = []
    holder = spec.get("holderIdentity")
    if holder is not None and not isinstance(holder, str):
        raise _bad_request('Lease in version "v1" cannot be handled as a Lease: holderIdentity')
    for name, least in (("leaseDurationSeconds", 1), ("leaseTransitions", 0)):
        value = spec.get(name)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool):
            raise _bad_request(f'Lease in version "v1" cannot be handled as a Lease: {name}')
        if value < least:
            detail = "must be greater than 0" if least else "must be greater than or equal to 0"
            errors.append(_invalid_value(f"spec.{name}", value, detail))
    return errors


_ADMIT: Final[Mapping[str, Callable[[Obj, Obj | None], list[_FieldError]]]] = {
    "secrets": _admit_secret,
    "configmaps": _admit_configmap,
    "deployments": _admit_deployment,
    "namespaces": _admit_namespace,
    "leases": _admit_lease,
}


# --- HTTP plumbing --------------------------------------------------------------------------


@dataclass
class _HttpRequest:
    method: str
    target: str
    headers: dict[str, str]
    body: bytes


async def _read_request(reader: asyncio.StreamReader) -> _HttpRequest | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    request_line, *header_lines = head.decode("latin-1").split("\r\n")
    method, target, _ = request_line.split(" ", 2)
    headers: dict[str, str] = {}
    for line in header_lines:
        if line:
            key, _, value = line.partition(":")
            headers[key.strip().lower()] = value.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = bytearray()
        while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
            body += await reader.readexactly(size + 2)
            del body[-2:]
        await reader.readuntil(b"\r\n")
        return _HttpRequest(method, target, headers, bytes(body))
    length = int(headers.get("content-length", "0"))
    return _HttpRequest(method, target, headers, await reader.readexactly(length))


def _http_response(
    code: int, body: Obj | str, headers: Mapping[str, str] | None = None, *, close: bool = False
) -> bytes:
    if isinstance(body, str):
        payload, content_type = body.encode(), "text/plain; charset=utf-8"
    else:
        payload, content_type = json.dumps(body, separators=(",", ":")).encode(), "application/json"
    try:
        phrase = HTTPStatus(code).phrase
    except ValueError:
        phrase = "Unknown"
    lines = [f"HTTP/1.1 {code} {phrase}", f"Content-Type: {content_type}"]
    lines.append(f"Content-Length: {len(payload)}")
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + payload


@dataclass(frozen=True)
class _Route:
    rt: ResourceType
    namespace: str
    name: str


def _route(path: str) -> _Route | None:
    parts = [p for p in path.split("/") if p]
    if parts[:2] == ["api", "v1"]:
        group, version, rest = "", "v1", parts[2:]
    elif len(parts) >= 3 and parts[0] == "apis":
        group, version, rest = parts[1], parts[2], parts[3:]
    else:
        return None
    namespace = ""
    if len(rest) >= 3 and rest[0] == "namespaces":
        namespace, rest = rest[1], rest[2:]
    rt = RESOURCES.get(rest[0]) if 1 <= len(rest) <= 2 else None
    if rt is None or (rt.group, rt.version) != (group, version):
        return None
    name = rest[1] if len(rest) == 2 else ""
    if (namespace and not rt.namespaced) or (rt.namespaced and name and not namespace):
        return None
    return _Route(rt, namespace, name)


def _verb(method: str, route: _Route, query: Mapping[str, str]) -> str | None:
    if route.name:
        return {"GET": "get", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}.get(method)
    if method == "GET":
        return "watch" if query.get("watch") in ("1", "true") else "list"
    if method == "POST" and (route.namespace or not route.rt.namespaced):
        return "create"
    return "deletecollection" if method == "DELETE" and route.namespace else None


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _generate_suffix() -> str:
    return "".join(random.choices("bcdfghjklmnpqrstvwxz2456789", k=5))


class _LoopThread:
    """The asyncio loop, in one daemon thread, that serves every running emulator."""

    _lock: ClassVar = threading.Lock()
    _current: ClassVar[_LoopThread | None] = None
    _users: ClassVar = 0

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, name="kube-emulator", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
            self.loop.run_until_complete(self.loop.shutdown_default_executor())
        finally:
            self.loop.close()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    @classmethod
    def acquire(cls, users: int = 1) -> _LoopThread:
        with cls._lock:
            if cls._current is None:
                cls._current = _LoopThread()
            cls._users += users
            return cls._current

    @classmethod
    def release(cls, users: int = 1) -> None:
        with cls._lock:
            cls._users -= users
            if cls._users == 0 and cls._current is not None:
                current, cls._current = cls._current, None
                current.loop.call_soon_threadsafe(current.loop.stop)
                current.thread.join()


# --- the emulator ---------------------------------------------------------------------------


class KubeEmulator:
    """One emulated cluster: an object store plus an HTTP server speaking the Kubernetes API.

    Every request is recorded in :attr:`requests` (also those answered by a fault or dropped).
    ``latency`` seconds are added to each request.  When ``token`` is set, requests must carry
    ``Authorization: Bearer <token>`` (else 401); every request acts as ``user``, which RBAC
    messages name.  ``tokens`` maps further tokens to the users they act as (one per client:
    the request records and the write log name the client); with it, a request carrying none
    of the tokens is refused (401) too.  The state helpers (:meth:`get_object`, :meth:`put_object`, ...) bypass
    HTTP, authorization, faults and counters, and are safe to call from any thread.
    """

    def __init__(
        self,
        *,
        namespaces: Iterable[str] = ("default", "kube-system", "istio-system"),
        latency: float = 0.0,
        token: str | None = None,
        user: str = DEFAULT_USER,
        tokens: Mapping[str, str] | None = None,
        tls: bool = False,
    ) -> None:
        self.latency = latency
        self.token = token
        self.user = user
        self.tokens = dict(tokens or {})
        self.tls = tls
        self.ca_pem: bytes = b""
        """With ``tls``: the self-signed certificate the emulator serves (IP SAN 127.0.0.1),
        which clients trust as their cluster CA."""
        self._ssl: ssl.SSLContext | None = None
        if tls:
            self.ca_pem, self._ssl = _self_signed_server()
        self.requests: list[RequestRecord] = []
        self.write_log: list[WriteRecord] = []
        self.token_reviews: list[TokenReviewRecord] = []
        self._service_accounts: dict[str, ServiceAccountToken] = {}
        self._revoked: set[str] = set()
        self._service_account_uids: dict[tuple[str, str], str] = {}
        self._signing_key: Any = None
        self.errors: list[BaseException] = []  # emulator bugs, answered as 500
        self._lock = threading.RLock()
        self._objects: dict[tuple[str, str, str], Obj] = {}
        self._revision = 0
        self._faults: list[Fault] = []
        self._allow: list[Rule] | None = None
        self._allow_of: dict[str, list[Rule]] = {}
        """Users other than :attr:`user` given Roles of their own (:meth:`apply_rbac`)."""
        self._deny: list[Rule] = []
        self._server: asyncio.Server | None = None
        self._hub: _LoopThread | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._connections: weakref.WeakSet[asyncio.WriteTransport] = weakref.WeakSet()
        """Every connection's transport until it is collected: one closed with TLS may still
        be shutting down (waiting for the client's close_notify) when the server stops."""
        self._port = 0
        for name in namespaces:
            self.add_namespace(name)

    # lifecycle

    def start(self) -> None:
        """Listen on an ephemeral 127.0.0.1 port; see :attr:`url`."""
        _start_all([self])

    def stop(self) -> None:
        """Close the listener and every connection, cancelling requests in flight."""
        stop_many([self])

    def __enter__(self) -> KubeEmulator:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._server is not None

    @property
    def url(self) -> str:
        if not self._port:
            raise RuntimeError("the emulator is not started")
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self._port}"

    @property
    def port(self) -> int:
        if not self._port:
            raise RuntimeError("the emulator is not started")
        return self._port

    def kubeconfig(self, context: str, *, token: str | None = None) -> Obj:
        """A kubeconfig dict whose cluster, user and current context are all named ``context``;
        its user presents ``token``, else the emulator's ``token`` if it has one."""
        token = token or self.token
        user: Obj = {"token": token} if token else {}
        cluster: Obj = {"server": self.url}
        if self.tls:
            cluster["certificate-authority-data"] = base64.b64encode(self.ca_pem).decode()
        return {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": context, "cluster": cluster}],
            "users": [{"name": context, "user": user}],
            "contexts": [{"name": context, "context": {"cluster": context, "user": context}}],
            "current-context": context,
            "preferences": {},
        }

    # fault injection and authorization

    def inject(self, fault: Fault) -> Fault:
        """Add a fault; faults are tried in injection order and one applies per request."""
        with self._lock:
            self._faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def deny(
        self,
        verbs: str | Iterable[str] = "*",
        resources: str | Iterable[str] = "*",
        *,
        namespaces: str | Iterable[str] = "*",
        names: str | Iterable[str] = "*",
    ) -> Rule:
        """Forbid matching requests (403); deny rules win over allow rules."""
        rule = Rule(_names(verbs), _names(resources), _names(namespaces), _names(names))
        with self._lock:
            self._deny.append(rule)
        return rule

    def allow(
        self,
        verbs: str | Iterable[str] = "*",
        resources: str | Iterable[str] = "*",
        *,
        namespaces: str | Iterable[str] = "*",
        names: str | Iterable[str] = "*",
    ) -> Rule:
        """Allow matching requests; after the first call, requests no allow rule matches get 403.

        Until then everything not denied is allowed, like a cluster-admin.
        """
        rule = Rule(_names(verbs), _names(resources), _names(namespaces), _names(names))
        with self._lock:
            self._allow = [*(self._allow or []), rule]
        return rule

    def apply_rbac(
        self, objects: Iterable[Mapping[str, Any]], *, user: str | None = None
    ) -> list[Rule]:
        """Authorize exactly what these Roles grant ``user`` (:attr:`user` unless given)
        through these RoleBindings.

        Bindings naming ``user`` (a ``User`` of that name, or the ``ServiceAccount`` behind a
        ``system:serviceaccount:<namespace>:<name>`` user) make each rule of their Role, in the
        binding's namespace, an allow rule with its ``apiGroups``, ``resources``, ``verbs`` and
        ``resourceNames``.  Everything else is then forbidden, as it is for a service account
        with only these Roles.  ClusterRoles are not emulated: a binding to one is an error.

        A ``user`` other than :attr:`user` is a client of its own (a user of ``tokens``, or an
        issued service-account token's): its requests are authorized by the rules granted to
        it alone, the others' by :attr:`user`'s, so two identities with different Roles can
        work on one cluster at once.  Deny rules apply to every client.
        """
        user = self.user if user is None else user
        objects = list(objects)
        roles = {
            (o["metadata"]["namespace"], o["metadata"]["name"]): o
            for o in objects
            if o.get("kind") == "Role"
        }
        granted: list[Rule] = []
        for binding in (o for o in objects if o.get("kind") == "RoleBinding"):
            namespace = binding["metadata"]["namespace"]
            if not any(self._is_user(s, namespace, user) for s in binding.get("subjects", [])):
                continue
            ref = binding["roleRef"]
            if ref.get("kind") != "Role":
                raise ValueError(f"{ref.get('kind')} {ref.get('name')} is not emulated")
            role = roles.get((namespace, ref["name"]))
            if role is None:
                continue  # a binding to a missing Role grants nothing, as in RBAC
            for rule in role.get("rules", []):
                granted.append(
                    Rule(
                        verbs=tuple(rule.get("verbs", ())),
                        resources=tuple(rule.get("resources", ())),
                        namespaces=(namespace,),
                        names=tuple(rule.get("resourceNames") or ("*",)),
                        groups=tuple(rule.get("apiGroups", ())),
                    )
                )
        with self._lock:
            if user == self.user:
                self._allow = [*(self._allow or []), *granted]
            else:
                self._allow_of[user] = [*self._allow_of.get(user, []), *granted]
        return granted

    @staticmethod
    def _is_user(subject: Mapping[str, Any], binding_namespace: str, user: str) -> bool:
        if subject.get("kind") == "ServiceAccount":
            namespace = subject.get("namespace") or binding_namespace
            return user == f"system:serviceaccount:{namespace}:{subject.get('name')}"
        return subject.get("kind") == "User" and subject.get("name") == user

    def reset_rbac(self) -> None:
        with self._lock:
            self._allow, self._deny = None, []
            self._allow_of.clear()

    # service-account tokens

    def issue_service_account_token(
        self,
        namespace: str,
        name: str,
        *,
        ttl: float = 3600.0,
        uid: str | None = None,
        audiences: Sequence[str] = (API_AUDIENCE,),
    ) -> str:
        """A new token of service account ``namespace/name``, as the kubelet would mount it.

        A JWT (header.payload.signature, RS256 with a key of this cluster) with the claims
        ``iss``, ``sub``, ``kubernetes.io/serviceaccount/namespace``,
        ``.../service-account.name``, ``.../service-account.uid``, ``iat`` and ``exp`` (now
        plus ``ttl`` seconds).  The service account's uid is the same for all its tokens unless
        ``uid`` is given.  The token authenticates requests and TokenReviews until it expires or
        is revoked (:meth:`revoke_service_account_token`).
        """
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding, rsa

        now = int(time.time())
        with self._lock:
            if self._signing_key is None:
                self._signing_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            key = self._signing_key
            uid = uid or self._service_account_uids.setdefault((namespace, name), str(uuid.uuid4()))
        claims = {
            "iss": "kubernetes/serviceaccount",
            "sub": f"system:serviceaccount:{namespace}:{name}",
            "kubernetes.io/serviceaccount/namespace": namespace,
            "kubernetes.io/serviceaccount/service-account.name": name,
            "kubernetes.io/serviceaccount/service-account.uid": uid,
            "iat": now,
            "exp": now + int(ttl),
            "jti": str(uuid.uuid4()),
        }
        header = {"alg": "RS256", "kid": "kube-emulator", "typ": "JWT"}
        signed = ".".join(
            _b64url(json.dumps(part, separators=(",", ":")).encode()) for part in (header, claims)
        )
        signature = key.sign(signed.encode(), padding.PKCS1v15(), hashes.SHA256())
        token = f"{signed}.{_b64url(signature)}"
        with self._lock:
            self._service_accounts[token] = ServiceAccountToken(
                token, namespace, name, uid, float(now + int(ttl)), tuple(audiences)
            )
        return token

    def revoke_service_account_token(self, token: str) -> bool:
        """Forget an issued token, as deleting its service account or bound pod does: it no
        longer authenticates.  False if the emulator did not know it."""
        with self._lock:
            known = self._service_accounts.pop(token, None)
            if known is not None:
                self._revoked.add(token)
            return known is not None

    def service_account_of(self, token: str) -> ServiceAccountToken | None:
        """The issued token ``token``, if it is known (revoked ones are not)."""
        with self._lock:
            return self._service_accounts.get(token)

    def _authenticate_service_account(self, token: str) -> tuple[ServiceAccountToken | None, str]:
        """The service account ``token`` authenticates as, or None and why not."""
        known = self._service_accounts.get(token)
        if known is None:
            why = "token has been invalidated" if token in self._revoked else "token lookup failed"
            return None, f"[invalid bearer token, {why}]"
        if known.expires <= time.time():
            return None, "[invalid bearer token, service account token has expired]"
        return known, ""

    # counters

    def count(self, verb: str | None = None, resource: str | None = None) -> int:
        """How many requests had this Kubernetes verb (get, list, create, ...) and resource."""
        with self._lock:
            return sum(
                1
                for r in self.requests
                if (verb is None or r.verb == verb) and (resource is None or r.resource == resource)
            )

    @property
    def verbs(self) -> Counter[str]:
        with self._lock:
            return Counter(r.verb for r in self.requests if r.verb)

    @property
    def reads(self) -> int:
        """Requests with a read verb (get, list, watch)."""
        return sum(n for verb, n in self.verbs.items() if verb in READ_VERBS)

    @property
    def writes(self) -> int:
        """Requests with a write verb, including failed, forbidden and dry-run ones."""
        return sum(n for verb, n in self.verbs.items() if verb in WRITE_VERBS)

    def reset_counters(self) -> None:
        with self._lock:
            self.requests.clear()

    # the write log

    def writes_of(
        self, resource: str, namespace: str | None = None, name: str | None = None
    ) -> list[WriteRecord]:
        """The committed writes of one resource (optionally one namespace and name), in order."""
        with self._lock:
            return [
                w
                for w in self.write_log
                if w.resource == resource
                and namespace in (None, w.namespace)
                and name in (None, w.name)
            ]

    def clear_write_log(self) -> None:
        with self._lock:
            self.write_log.clear()

    # direct state access

    @property
    def resource_version(self) -> str:
        """The cluster's current resourceVersion (the etcd revision)."""
        with self._lock:
            return str(self._revision)

    def get_object(self, resource: str, namespace: str, name: str) -> Obj | None:
        """A copy of the stored object, or None; ``namespace`` is "" for namespaces."""
        with self._lock:
            obj = self._objects.get((resource, namespace, name))
            return copy.deepcopy(obj)

    def list_objects(self, resource: str, namespace: str | None = None) -> list[Obj]:
        """Copies of the stored objects of a resource, sorted by namespace and name."""
        with self._lock:
            return [
                copy.deepcopy(obj)
                for (res, ns, _), obj in sorted(self._objects.items())
                if res == resource and namespace in (None, ns)
            ]

    def put_object(self, obj: Mapping[str, Any]) -> Obj:
        """Create or unconditionally replace an object, as the API would store it.

        ``apiVersion`` and ``kind`` pick the resource; the namespace must exist.  Raises
        :class:`ApiError` for what the API would reject.
        """
        rt = _BY_KIND.get((obj.get("apiVersion", ""), obj.get("kind", "")))
        if rt is None:
            raise ValueError(
                f"unsupported apiVersion/kind: {obj.get('apiVersion')}/{obj.get('kind')}"
            )
        body = copy.deepcopy(dict(obj))
        meta = body.setdefault("metadata", {})
        meta.pop("resourceVersion", None)
        namespace = meta.get("namespace", "default") if rt.namespaced else ""
        with self._lock:
            if (rt.plural, namespace, meta.get("name", "")) in self._objects:
                return self._update(_Route(rt, namespace, meta.get("name", "")), body, False)
            return self._create(_Route(rt, namespace, ""), body, False)

    def delete_object(self, resource: str, namespace: str, name: str) -> bool:
        """Delete a stored object; False if there was none."""
        with self._lock:
            if (resource, namespace, name) not in self._objects:
                return False
            self._delete(_Route(RESOURCES[resource], namespace, name), b"", False)
            return True

    def add_namespace(self, name: str) -> Obj:
        """Create a namespace unless it exists; returns it."""
        with self._lock:
            existing = self._objects.get(("namespaces", "", name))
            if existing is not None:
                return copy.deepcopy(existing)
            return self.put_object(
                {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}
            )

    # request handling (loop thread)

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self._ssl)
        self._port = self._server.sockets[0].getsockname()[1]

    async def _stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._server.wait_closed()
        self._server, self._port = None, 0
        for transport in list(self._connections):
            transport.abort()  # a TLS shutdown still waiting on its client ends now
        await asyncio.sleep(0)  # let the closed transports release their sockets

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._connections.add(writer.transport)
        try:
            while (request := await _read_request(reader)) is not None:
                close = request.headers.get("connection", "").lower() == "close"
                response = await self._handle(request, close)
                if response is None:
                    break
                writer.write(response)
                await writer.drain()
                if close:
                    break
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # the client went away mid-request; there is nobody left to answer
        except asyncio.CancelledError:
            # stop() cancels us; ending normally keeps asyncio's stream callback (which calls
            # task.exception() on Python 3.11) from logging the cancellation as an error.
            pass
        except ValueError:
            writer.write(_http_response(400, "malformed HTTP request", close=True))
        finally:
            self._tasks.discard(task)
            writer.close()

    async def _handle(self, request: _HttpRequest, close: bool) -> bytes | None:
        url = urlsplit(request.target)
        query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        route = _route(url.path)
        verb = _verb(request.method, route, query) if route else None
        review = route is None and url.path.rstrip("/") == TOKEN_REVIEW_PATH
        record = RequestRecord(
            request.method,
            url.path,
            query,
            ("create" if request.method == "POST" else None) if review else verb,
            route.rt.plural if route else ("tokenreviews" if review else None),
            route.namespace if route else "",
            route.name if route else "",
            client=self._client(request),
            user_agent=request.headers.get("user-agent", ""),
        )
        with self._lock:
            self.requests.append(record)
            fault = next((f for f in self._faults if f.matches(request.method, url.path)), None)
            if fault is not None:
                fault.hits += 1
        fault = fault or Fault()
        await asyncio.sleep(self.latency + fault.delay)
        headers: dict[str, str] = {}
        try:
            if fault.hook is not None:
                await asyncio.get_running_loop().run_in_executor(None, fault.hook)
            if fault.drop:
                return None
            if fault.status is not None:
                raise fault.error()
            with self._lock:
                revision = self._revision
                code, body = self._respond(request, url.path, query, route, verb)
                if self._revision != revision and route is not None and verb is not None:
                    self._log_write(verb, route, body, record)
        except ApiError as exc:
            code, body, headers = exc.code, exc.status(), exc.headers
        except Exception as exc:  # an emulator or hook bug: answer like an apiserver panic would
            self.errors.append(exc)
            code, body = 500, ApiError(500, f"kube emulator error: {exc!r}").status()
        if fault.lose_response:
            return None
        if fault.answer_delay:
            await asyncio.sleep(fault.answer_delay)
        record.status = code
        return _http_response(code, body, headers, close=close)

    def _respond(
        self,
        request: _HttpRequest,
        path: str,
        query: Mapping[str, str],
        route: _Route | None,
        verb: str | None,
    ) -> tuple[int, Obj | str]:
        # The scheme is case-insensitive, as kube-apiserver reads it (the official client's
        # in-cluster configuration sends "bearer").
        scheme, _, credentials = (request.headers.get("authorization") or "").partition(" ")
        bearer = credentials if scheme.lower() == "bearer" else ""
        accepted = {t for t in (self.token, *self.tokens) if t is not None}
        service_account = None
        if bearer in self._service_accounts or bearer in self._revoked:
            # kube-apiserver refuses a service-account token it cannot authenticate (401) even
            # where anonymous requests are let through.
            service_account, _ = self._authenticate_service_account(bearer)
            if service_account is None:
                raise ApiError(401, "Unauthorized", "Unauthorized")
        elif accepted and bearer not in accepted:
            raise ApiError(401, "Unauthorized", "Unauthorized")
        if route is None and path.rstrip("/") == TOKEN_REVIEW_PATH:
            return self._token_review(request)
        if route is None:
            return self._non_resource(request.method, path)
        if verb is None:
            message = "the server does not allow this method on the requested resource"
            raise ApiError(405, message, "MethodNotAllowed", route.rt.details(route.name))
        self._authorize(verb, route, self._client(request))
        dry_run = query.get("dryRun") == "All"
        if verb == "get":
            return 200, self._get(route)
        if verb == "list":
            return 200, self._list(route, query)
        if verb == "create":
            obj = self._decode(route.rt, request.body)
            return 201, self._create(route, obj, dry_run)
        if verb == "update":
            return 200, self._update(route, self._decode(route.rt, request.body), dry_run)
        if verb == "patch":
            content_type = request.headers.get("content-type", "")
            return 200, self._patch(route, content_type, request.body, dry_run)
        if verb == "delete":
            return 200, self._delete(route, request.body, dry_run)
        if verb == "deletecollection":
            return 200, self._delete_collection(route, query, dry_run)
        raise ApiError(405, f"kube emulator: {verb} is not emulated", "MethodNotAllowed")

    def _client(self, request: _HttpRequest) -> str:
        """The user a request acts as: the one its bearer token names, else ``user``."""
        scheme, _, credentials = (request.headers.get("authorization") or "").partition(" ")
        token = credentials if scheme.lower() == "bearer" else ""
        with self._lock:
            service_account = self._service_accounts.get(token)
        if service_account is not None:
            return service_account.username
        return self.tokens.get(token, self.user)

    def _token_review(self, request: _HttpRequest) -> tuple[int, Obj]:
        """POST tokenreviews: authenticate ``spec.token`` as kube-apiserver does (201, the
        review with its ``status``); nothing is stored."""
        route = _Route(_TOKEN_REVIEWS, "", "")
        if request.method != "POST":
            message = "the server does not allow this method on the requested resource"
            raise ApiError(405, message, "MethodNotAllowed", _TOKEN_REVIEWS.details())
        self._authorize("create", route, self._client(request))
        review = self._decode(_TOKEN_REVIEWS, request.body)
        spec = review.get("spec")
        spec = spec if isinstance(spec, dict) else {}
        token = spec.get("token")
        if not isinstance(token, str) or not token:
            raise _invalid(_TOKEN_REVIEWS, "", [_required("spec.token")])
        wanted = spec.get("audiences")
        wanted = [str(a) for a in wanted] if isinstance(wanted, list) and wanted else None
        service_account, error = self._authenticate_service_account(token)
        if service_account is not None and wanted is not None:
            granted = [a for a in wanted if a in service_account.audiences]
            if not granted:
                error = (
                    f"[invalid bearer token, token audiences {list(service_account.audiences)!r} "
                    f"is invalid for the target audiences {wanted!r}]"
                )
                service_account = None
        status: Obj
        if service_account is None:
            status = {"user": {}, "error": error}
        else:
            status = {
                "authenticated": True,
                "user": {
                    "username": service_account.username,
                    "uid": service_account.uid,
                    "groups": [*service_account.groups, "system:authenticated"],
                },
                "audiences": granted if wanted is not None else list(service_account.audiences),
            }
        self.token_reviews.append(
            TokenReviewRecord(
                token,
                service_account is not None,
                service_account.username if service_account else "",
                service_account.uid if service_account else "",
                error,
                self._client(request),
                time.time(),
            )
        )
        answer: Obj = {
            "kind": "TokenReview",
            "apiVersion": _TOKEN_REVIEWS.api_version,
            "metadata": {"creationTimestamp": None},
            "spec": spec,
            "status": status,
        }
        return 201, answer

    def _log_write(
        self, verb: str, route: _Route, body: Obj | str, request: RequestRecord | None = None
    ) -> None:
        """Append what a committed write stored; callers hold self._lock."""
        if not isinstance(body, dict):
            return
        written: list[tuple[str, Obj | None]]
        if verb in ("create", "update", "patch"):
            written = [(body["metadata"]["name"], copy.deepcopy(body))]
        elif verb == "delete":
            written = [(route.name, None)]
        elif verb == "deletecollection":
            written = [(item["metadata"]["name"], None) for item in body.get("items", [])]
        else:
            return
        revision = str(self._revision)
        at = time.time()
        for name, obj in written:
            self.write_log.append(
                WriteRecord(
                    next(_WRITE_SEQUENCE),
                    verb,
                    route.rt.plural,
                    route.namespace,
                    name,
                    obj,
                    revision,
                    client=request.client if request else "",
                    user_agent=request.user_agent if request else "",
                    at=at,
                )
            )

    def _non_resource(self, method: str, path: str) -> tuple[int, Obj | str]:
        if method == "GET" and path in ("/healthz", "/livez", "/readyz"):
            return 200, "ok"
        if method == "GET" and path == "/version":
            version = {"major": "1", "minor": "33", "gitVersion": "v1.33.0-kube-emulator"}
            return 200, {**version, "platform": "linux/amd64"}
        message = "the server could not find the requested resource"
        raise ApiError(404, message, "NotFound", {})

    def _authorize(self, verb: str, route: _Route, client: str) -> None:
        rt, name = route.rt, route.name
        # kube's RequestInfo takes a namespace's own name as the request's namespace.
        namespace = name if rt.plural == "namespaces" else route.namespace
        denied = any(rule.matches(verb, rt.plural, namespace, name) for rule in self._deny)
        allow = self._allow_of.get(client, self._allow) if client != self.user else self._allow
        if not denied and allow is not None:
            denied = not any(r.matches(verb, rt.plural, namespace, name, rt.group) for r in allow)
        if not denied:
            return
        subject = f'{rt.qualified} "{name}"' if name else rt.qualified
        scope = f'in the namespace "{namespace}"' if namespace else "at the cluster scope"
        message = (
            f'{subject} is forbidden: User "{client}" cannot {verb} resource "{rt.plural}" '
            f'in API group "{rt.group}" {scope}'
        )
        raise ApiError(403, message, "Forbidden", rt.details(name))

    # store operations; callers hold self._lock

    def _bump(self) -> str:
        self._revision += 1
        return str(self._revision)

    @staticmethod
    def _decode(rt: ResourceType, body: bytes) -> Obj:
        try:
            obj = json.loads(body)
        except ValueError as exc:
            raise _bad_request(f"couldn't get version/kind; json parse error: {exc}") from exc
        return KubeEmulator._check_type(rt, obj)

    @staticmethod
    def _check_type(rt: ResourceType, obj: object) -> Obj:
        if not isinstance(obj, dict):
            raise _bad_request(f"the body of the request must be a {rt.kind} object")
        api_version, kind = obj.get("apiVersion", rt.api_version), obj.get("kind", rt.kind)
        if api_version != rt.api_version:
            raise _bad_request(
                f"the API version in the data ({api_version}) does not match the expected "
                f"API version ({rt.api_version})"
            )
        if kind != rt.kind:
            raise _bad_request(f"the kind in the data ({kind}) does not match {rt.kind}")
        if not isinstance(obj.setdefault("metadata", {}), dict):
            raise _bad_request("metadata must be an object")
        obj["apiVersion"], obj["kind"] = rt.api_version, rt.kind
        return obj

    def _check_namespace(self, route: _Route, meta: Obj) -> None:
        if route.rt.namespaced and meta.setdefault("namespace", route.namespace) != route.namespace:
            raise _bad_request(
                "the namespace of the provided object does not match the namespace sent "
                "on the request"
            )

    def _admit(self, rt: ResourceType, obj: Obj, old: Obj | None) -> None:
        errors = _validate_meta(rt, obj["metadata"]) + _ADMIT[rt.plural](obj, old)
        if errors:
            raise _invalid(rt, obj["metadata"].get("name", ""), errors)

    def _get(self, route: _Route) -> Obj:
        obj = self._objects.get((route.rt.plural, route.namespace, route.name))
        if obj is None:
            raise _not_found(route.rt, route.name)
        return obj

    def _create(self, route: _Route, obj: Obj, dry_run: bool) -> Obj:
        rt, meta = route.rt, obj["metadata"]
        self._check_namespace(route, meta)
        if meta.get("resourceVersion"):
            # etcd3's storage.ErrResourceVersionSetOnCreate surfaces as a reason-less 500.
            raise ApiError(500, "resourceVersion should not be set on objects to be created")
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + _generate_suffix()
        if rt.namespaced and ("namespaces", "", route.namespace) not in self._objects:
            raise _not_found(RESOURCES["namespaces"], route.namespace)
        self._admit(rt, obj, None)
        key = (rt.plural, route.namespace, meta["name"])
        if key in self._objects:
            message = f'{rt.qualified} "{meta["name"]}" already exists'
            raise ApiError(409, message, "AlreadyExists", rt.details(meta["name"]))
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = _now()
        if rt.has_generation:
            meta["generation"] = 1
        else:
            meta.pop("generation", None)
        if dry_run:
            return obj
        meta["resourceVersion"] = self._bump()
        self._objects[key] = obj
        return obj

    def _update(self, route: _Route, obj: Obj, dry_run: bool) -> Obj:
        rt, meta = route.rt, obj["metadata"]
        if meta.get("name", "") != route.name:
            raise _bad_request(
                f"the name of the object ({meta.get('name', '')}) does not match the name on "
                f"the URL ({route.name})"
            )
        self._check_namespace(route, meta)
        old = self._get(route)
        old_meta = old["metadata"]
        if meta.get("resourceVersion") and meta["resourceVersion"] != old_meta["resourceVersion"]:
            raise _conflict(rt, route.name, _MODIFIED)
        if meta.get("uid") and meta["uid"] != old_meta["uid"]:
            why = f"Precondition failed: UID in precondition: {meta['uid']}, UID in object meta: "
            raise _conflict(rt, route.name, why + old_meta["uid"])
        for key in ("uid", "creationTimestamp", "resourceVersion"):
            meta[key] = old_meta[key]
        self._admit(rt, obj, old)
        if rt.has_generation:
            changed = obj.get("spec") != old.get("spec")
            changed |= meta.get("annotations") != old_meta.get("annotations")
            meta["generation"] = old_meta["generation"] + changed
        else:
            meta.pop("generation", None)
        if obj == old or dry_run:
            return obj  # etcd3 skips writing an unchanged object, keeping its resourceVersion
        meta["resourceVersion"] = self._bump()
        self._objects[(rt.plural, route.namespace, route.name)] = obj
        return obj

    def _patch(self, route: _Route, content_type: str, body: bytes, dry_run: bool) -> Obj:
        rt = route.rt
        current = copy.deepcopy(self._get(route))
        media_type = content_type.split(";")[0].strip().lower()
        try:
            patch = json.loads(body)
        except ValueError as exc:
            raise _bad_request(f"error decoding patch: {exc}") from exc
        if media_type in (_MERGE_PATCH, _STRATEGIC_PATCH):
            if not isinstance(patch, dict):
                raise _bad_request("the patch must be a JSON object")
            merge = merge_patch if media_type == _MERGE_PATCH else strategic_merge_patch
            patched = merge(current, patch)
        elif media_type == _JSON_PATCH:
            if not isinstance(patch, list):
                raise _bad_request("a JSON patch must be a list of operations")
            try:
                patched = json_patch(current, patch)
            except (KeyError, IndexError, ValueError) as exc:
                raise ApiError(422, f"the JSON patch does not apply: {exc}", "Invalid") from exc
        elif media_type == _APPLY_PATCH:
            message = "kube emulator: server-side apply is not emulated"
            raise ApiError(415, message, "UnsupportedMediaType")
        else:
            message = (
                "the body of the request was in an unknown format - accepted media types "
                f"include: {_JSON_PATCH}, {_MERGE_PATCH}, {_APPLY_PATCH}, {_STRATEGIC_PATCH}"
            )
            raise ApiError(415, message, "UnsupportedMediaType")
        return self._update(route, self._check_type(rt, patched), dry_run)

    def _delete(self, route: _Route, body: bytes, dry_run: bool) -> Obj:
        rt = route.rt
        old = self._get(route)
        try:
            options = json.loads(body) if body.strip() else {}
        except ValueError as exc:
            raise _bad_request(f"invalid DeleteOptions: {exc}") from exc
        preconditions = (options.get("preconditions") if isinstance(options, dict) else None) or {}
        for field_name, label in (("uid", "UID"), ("resourceVersion", "ResourceVersion")):
            wanted, actual = preconditions.get(field_name), old["metadata"][field_name]
            if wanted and wanted != actual:
                why = f"Precondition failed: {label} in precondition: {wanted}, {label} in "
                raise _conflict(rt, route.name, f"{why}object meta: {actual}")
        status: Obj = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"}
        status["details"] = {**rt.details(route.name), "uid": old["metadata"]["uid"]}
        if dry_run:
            return status
        del self._objects[(rt.plural, route.namespace, route.name)]
        if rt.plural == "namespaces":
            for key in [k for k in self._objects if k[1] == route.name]:
                del self._objects[key]
            old = copy.deepcopy(old)
            old["metadata"]["deletionTimestamp"] = _now()
            old["status"] = {"phase": "Terminating"}
            status = old
        self._bump()
        return status

    def _select(
        self, route: _Route, query: Mapping[str, str]
    ) -> list[tuple[tuple[str, str, str], Obj]]:
        labels = parse_label_selector(query.get("labelSelector", ""))
        fields = _parse_field_selector(route.rt, query.get("fieldSelector", ""))
        return [
            (key, obj)
            for key, obj in sorted(self._objects.items())
            if key[0] == route.rt.plural
            and route.namespace in ("", key[1])
            and labels(obj["metadata"].get("labels") or {})
            and fields(obj)
        ]

    def _list(self, route: _Route, query: Mapping[str, str]) -> Obj:
        selected = self._select(route, query)
        metadata: Obj = {"resourceVersion": str(self._revision)}
        if token := query.get("continue"):
            try:
                after = tuple(json.loads(base64.urlsafe_b64decode(token)))
            except (ValueError, TypeError) as exc:
                raise _bad_request("continue key is not valid") from exc
            selected = [(key, obj) for key, obj in selected if key > after]
        try:
            limit = int(query.get("limit") or 0)
        except ValueError as exc:
            raise _bad_request(f"invalid limit: {exc}") from exc
        if 0 < limit < len(selected):
            last_key = selected[limit - 1][0]
            metadata["continue"] = base64.urlsafe_b64encode(json.dumps(last_key).encode()).decode()
            if not query.get("labelSelector") and not query.get("fieldSelector"):
                metadata["remainingItemCount"] = len(selected) - limit
            selected = selected[:limit]
        # kube-apiserver leaves kind and apiVersion out of list items.
        items = [
            {k: v for k, v in obj.items() if k not in ("kind", "apiVersion")} for _, obj in selected
        ]
        kind = f"{route.rt.kind}List"
        return {
            "kind": kind,
            "apiVersion": route.rt.api_version,
            "metadata": metadata,
            "items": items,
        }

    def _delete_collection(self, route: _Route, query: Mapping[str, str], dry_run: bool) -> Obj:
        selected = self._select(route, query)
        if not dry_run and selected:
            for key, _ in selected:
                del self._objects[key]
            self._bump()
        items = [
            {k: v for k, v in obj.items() if k not in ("kind", "apiVersion")} for _, obj in selected
        ]
        metadata = {"resourceVersion": str(self._revision)}
        kind = f"{route.rt.kind}List"
        return {
            "kind": kind,
            "apiVersion": route.rt.api_version,
            "metadata": metadata,
            "items": items,
        }


def _self_signed_server() -> tuple[bytes, ssl.SSLContext]:
    """A P-256 certificate for 127.0.0.1 and localhost, and a server context serving it."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-emulator")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with tempfile.TemporaryDirectory() as tmp:
        cert_path, key_path = Path(tmp, "tls.crt"), Path(tmp, "tls.key")
        cert_path.write_bytes(cert_pem)
        key_path.write_bytes(key_pem)
        context.load_cert_chain(cert_path, key_path)
    return cert_pem, context


def _start_all(emulators: Sequence[KubeEmulator]) -> None:
    if any(e.running for e in emulators):
        raise RuntimeError("an emulator is already started")
    hub = _LoopThread.acquire(len(emulators))

    async def start() -> None:
        await asyncio.gather(*(e._start() for e in emulators))

    async def stop() -> None:
        await asyncio.gather(*(e._stop() for e in emulators))

    try:
        hub.run(start())
    except BaseException:
        hub.run(stop())
        _LoopThread.release(len(emulators))
        raise
    for emulator in emulators:
        emulator._hub = hub


def start_many(n: int, latency: float = 0.0, **kwargs: Any) -> list[KubeEmulator]:
    """Start ``n`` emulators (clusters) at once; stop them with :func:`stop_many`.

    ``kwargs`` go to :class:`KubeEmulator`.
    """
    emulators = [KubeEmulator(latency=latency, **kwargs) for _ in range(n)]
    _start_all(emulators)
    return emulators


def stop_many(emulators: Iterable[KubeEmulator]) -> None:
    """Stop every running emulator given; stopped ones are skipped."""
    running = [e for e in emulators if e._hub is not None]
    if not running:
        return
    hub = running[0]._hub
    assert hub is not None

    async def stop() -> None:
        await asyncio.gather(*(e._stop() for e in running))

    try:
        hub.run(stop())
    finally:
        for emulator in running:
            emulator._hub = None
        _LoopThread.release(len(running))


def merge_kubeconfigs(configs: Iterable[Mapping[str, Any]]) -> Obj:
    """One kubeconfig holding every cluster, user and context; the first context is current."""
    merged: Obj = {"apiVersion": "v1", "kind": "Config", "preferences": {}}
    for section in ("clusters", "users", "contexts"):
        merged[section] = []
    configs = list(configs)
    for config in configs:
        for section in ("clusters", "users", "contexts"):
            merged[section] += copy.deepcopy(config[section])
    merged["current-context"] = configs[0]["current-context"] if configs else ""
    return merged
