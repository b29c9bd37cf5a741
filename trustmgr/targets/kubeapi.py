"""One cluster's API through the official ``kubernetes`` client: the client built
from a kubeconfig context or the pod's service account, the retry policy, and
the client's failures turned into one-line TargetErrors.

Failures are sorted in one place, :func:`transient`: 5xx, 429, timeouts, refused
and dropped connections are retried with jittered exponential backoff (or the
server's Retry-After), for at most ``attempts`` tries and :data:`RETRY_BUDGET`
seconds; anything else (401, 403, 404, 409, 422) is answered at once. urllib3's
own retries are off: its default ``Retry(3)`` silently resends requests after a
drop and sleeps on Retry-After, beyond this policy's bounds. Retrying writes is
safe because every write trustmgr makes is conditional: a create conflicts if
the object exists, a replace carries the resourceVersion it read.

No message carries a request or response body: ``str(ApiException)`` includes the
HTTP body, which for a Secret holds the CA key. Only the Status reason and a
scrubbed Status message are used, and exceptions are raised ``from None``."""

from __future__ import annotations

import json
import logging
import os
import random
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import urllib3
import yaml
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException
from kubernetes.config.kube_config import ConfigNode, KubeConfigMerger
from tenacity import RetryCallState, Retrying, retry_if_exception
from tenacity.stop import stop_after_attempt, stop_before_delay

from trustmgr.config import KubernetesTargetConfig
from trustmgr.errors import TargetConflictError, TargetError, TransientTargetError

log = logging.getLogger(__name__)

T = TypeVar("T")

FIRST_WAIT = 0.1
"""Seconds; the backoff before try n is uniform in [0, FIRST_WAIT * 2**(n-1)] (full jitter)."""
MAX_WAIT = 5.0
RETRY_BUDGET = 30.0
"""Seconds one request may take, all its tries and waits together."""

_PEM = re.compile(r"-----BEGIN [A-Z0-9 ]+-----.*?(?:-----END [A-Z0-9 ]+-----|$)", re.DOTALL)
_LONG_TOKEN = re.compile(r"[A-Za-z0-9+/=_-]{40,}")


class NotFoundError(TargetError):
    """The object is absent (and its namespace is not)."""


@dataclass(frozen=True)
class Request:
    """What a request does, for messages: ``update secrets "cacerts" in istio-system``."""

    verb: str
    resource: str
    name: str
    namespace: str

    def __str__(self) -> str:
        return f'{self.verb} on {self.resource} "{self.name}" in namespace {self.namespace}'


def scrub(text: str, limit: int = 300) -> str:
    """``text`` without PEM blocks or long base64-like runs, and not too long."""
    text = _LONG_TOKEN.sub("[redacted]", _PEM.sub("[redacted]", text))
    return text if len(text) <= limit else text[: limit - 1] + "…"


def transient(exc: BaseException) -> bool:
    """Whether a failure is worth another try: the one place that decides."""
    if isinstance(exc, ApiException):
        return exc.status == 429 or ((exc.status or 0) >= 500 and exc.status != 501)
    return isinstance(exc, urllib3.exceptions.TimeoutError | urllib3.exceptions.ProtocolError)


def _retry_after(exc: BaseException | None) -> float | None:
    if not isinstance(exc, ApiException) or not exc.headers:
        return None
    try:
        return max(0.0, float(exc.headers.get("Retry-After", "")))
    except ValueError:
        return None


def backoff(state: RetryCallState) -> float:
    """Seconds before the next try: the server's Retry-After, else full jitter."""
    exc = state.outcome.exception() if state.outcome else None
    hinted = _retry_after(exc)
    if hinted is not None:
        return min(hinted, MAX_WAIT)
    ceiling = min(MAX_WAIT, FIRST_WAIT * 2 ** (state.attempt_number - 1))
    return random.uniform(0, ceiling)  # noqa: S311 -- jitter, not a secret


@dataclass(frozen=True)
class Kubeconfig:
    """A parsed kubeconfig, its entries indexed by name."""

    spec: str
    node: Any
    entries: dict[str, dict[str, Any]]

    @property
    def current_context(self) -> str | None:
        current = self.node.safe_get("current-context")
        return str(current) if current else None

    def only(self, context: str) -> Any:
        """A kubeconfig holding just ``context``, its cluster and its user: loading one
        context from a file of hundreds otherwise scans every list for every name.
        Entries keep the path of their file, for certificate files named relative to it."""
        ctx = self.entries["contexts"][context]
        refs = _field(ctx, "context") or {}
        value: dict[str, Any] = {"current-context": context, "contexts": [ctx]}
        for section, key in (("clusters", "cluster"), ("users", "user")):
            name = _field(refs, key)
            value[section] = [self.entries[section][name]] if name in self.entries[section] else []
        return ConfigNode(self.node.name, value, self.node.path)  # type: ignore[no-untyped-call]


def _field(entry: Any, key: str) -> Any:
    """A key of a kubeconfig entry: a dict, or a ConfigNode when merged from files."""
    if isinstance(entry, ConfigNode):
        return entry.safe_get(key)  # type: ignore[no-untyped-call]
    return entry.get(key)


_kubeconfigs: dict[tuple[str, tuple[int, ...]], Kubeconfig] = {}
_kubeconfigs_lock = threading.Lock()


def kubeconfig(spec: str) -> Kubeconfig:
    """The kubeconfig ``spec`` names (a path, or a ``:`` list merged as kubectl does),
    parsed once while its files are unchanged: 200 clusters in one file cost one parse."""
    paths = [Path(p).expanduser() for p in spec.split(os.pathsep) if p]
    stamps = tuple(p.stat().st_mtime_ns for p in paths if p.exists())
    with _kubeconfigs_lock:
        key = (spec, stamps)
        if key not in _kubeconfigs:
            if not stamps:
                raise TargetError(f"kubeconfig {spec} does not exist")
            try:
                node = _parse(paths)
            except OSError as exc:
                raise TargetError(
                    f"cannot read kubeconfig {exc.filename}: {exc.strerror}"
                ) from None
            except yaml.YAMLError:
                raise TargetError(f"kubeconfig {spec} is not valid YAML") from None
            except ConfigException as exc:
                raise TargetError(str(exc)) from None
            if node is None or not isinstance(node.value, dict):
                raise TargetError(f"kubeconfig {spec} holds no configuration")
            entries = {
                section: {str(e["name"]): e for e in node[section].value if "name" in e}
                if section in node and isinstance(node[section].value, list)
                else {}
                for section in ("contexts", "clusters", "users")
            }
            _kubeconfigs[key] = Kubeconfig(spec, node, entries)
        return _kubeconfigs[key]


def _parse(paths: list[Path]) -> Any:
    if len(paths) > 1:
        return KubeConfigMerger(os.pathsep.join(map(str, paths))).config  # type: ignore[no-untyped-call]
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    with paths[0].open() as f:
        data = yaml.load(f, Loader=loader)  # noqa: S506 -- a safe loader, in C when available
    if data is None:
        return None
    return ConfigNode(str(paths[0]), data, str(paths[0]))  # type: ignore[no-untyped-call]


class KubeApi:
    """One cluster's API client, built on first use; close it when done."""

    def __init__(
        self, cfg: KubernetesTargetConfig, *, sleep: Callable[[float], None] = time.sleep
    ) -> None:
        self.cfg = cfg
        self._sleep = sleep
        self._timeout = cfg.request_timeout.total_seconds()
        self._client: Any = None
        self._spec = cfg.kubeconfig or os.environ.get("KUBECONFIG") or "~/.kube/config"
        if cfg.in_cluster:
            self.where = "the in-cluster service account"
        elif cfg.context:
            self.where = f"context {cfg.context}"
        else:
            self.where = f"the current context of {self._spec}"

    @property
    def server(self) -> str:
        return str(self.client.configuration.host) if self._client else "the API server"

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = client.ApiClient(self._configuration())
        return self._client

    def secrets(self) -> SecretsApi:
        return SecretsApi(self.client)

    def apps(self) -> Any:
        # Imported on first use: only istiod restarts need it, and it costs ~0.3 s.
        from kubernetes.client.api.apps_v1_api import AppsV1Api

        return AppsV1Api(self.client)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def _configuration(self) -> Any:
        configuration = client.Configuration()
        try:
            if self.cfg.in_cluster:
                config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
            else:
                self._load_context(configuration)
        except ConfigException as exc:
            raise TargetError(f"{self.where}: {scrub(str(exc))}") from None
        except TargetError as exc:
            raise TargetError(f"{self.where}: {exc}") from None
        configuration.retries = False  # the retry policy is call()'s
        return configuration

    def _load_context(self, configuration: Any) -> None:
        loaded = kubeconfig(self._spec)
        wanted = self.cfg.context or loaded.current_context
        if not wanted:
            raise TargetError(f"kubeconfig {self._spec} has no current context; set context")
        contexts = list(loaded.entries["contexts"])
        if wanted not in contexts:
            known = ", ".join(contexts[:5]) + (", …" if len(contexts) > 5 else "")
            raise TargetError(
                f"kubeconfig {self._spec} has no context {wanted} (it has: {known or 'none'})"
            )
        config.load_kube_config_from_dict(  # type: ignore[no-untyped-call]
            loaded.only(wanted),
            context=wanted,
            client_configuration=configuration,
            persist_config=False,
        )

    def call(self, request: Request, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)`` under the retry policy, failures translated."""
        retrying = Retrying(
            stop=stop_after_attempt(self.cfg.attempts) | stop_before_delay(RETRY_BUDGET),
            wait=backoff,
            retry=retry_if_exception(transient),
            sleep=self._sleep,
            reraise=True,
        )
        try:
            return retrying(fn, *args, _request_timeout=(self._timeout, self._timeout), **kwargs)
        except (ApiException, urllib3.exceptions.HTTPError) as exc:
            tries = int(retrying.statistics.get("attempt_number", 1))
            raise self._translate(exc, request, tries) from None

    def _translate(self, exc: Exception, request: Request, tries: int) -> TargetError:
        after = f" (after {tries} tries)" if tries > 1 else ""
        if not isinstance(exc, ApiException):
            return self._network(exc, after)
        reason, message, details = _status(exc)
        code = exc.status
        if code == 404 and details.get("kind") == "namespaces":
            return TargetError(
                f"namespace {request.namespace} does not exist ({self.where}): install Istio "
                f"first, or create it (kubectl create namespace {request.namespace}); "
                "trustmgr does not create namespaces"
            )
        if code == 404:
            return NotFoundError(f'{request.resource} "{request.name}" not found')
        if code == 409:
            return TargetConflictError(
                f"{request.resource} {request.namespace}/{request.name} changed since it was "
                f"read ({reason or 'Conflict'})"
            )
        if code == 403:
            user = re.search(r'User "([^"]+)"', message)
            who = f" ({user.group(1)})" if user else ""
            return TargetError(
                f"forbidden: the credentials of {self.where}{who} lack {request}; "
                "grant it with a Role (docs/kubernetes.md)"
            )
        if code == 401:
            return TargetError(
                f"{self.server} rejected the credentials of {self.where} (401 Unauthorized): "
                "renew the token or certificate in the kubeconfig"
            )
        kind = TransientTargetError if transient(exc) else TargetError
        detail = f": {message}" if message else ""
        return kind(f"{request} failed with {code} {reason}{detail}{after}")

    def _network(self, exc: Exception, after: str) -> TargetError:
        where = f"{self.server} ({self.where})"
        if isinstance(exc, urllib3.exceptions.NewConnectionError):
            why = str(exc).rpartition("] ")[2] or "no connection"
            return TransientTargetError(f"cannot reach {where}: {why.lower()}{after}")
        if isinstance(exc, urllib3.exceptions.ConnectTimeoutError):
            return TransientTargetError(
                f"no connection to {where} within {self._timeout:g}s{after}"
            )
        if isinstance(exc, urllib3.exceptions.ReadTimeoutError):
            return TransientTargetError(f"no answer from {where} within {self._timeout:g}s{after}")
        if isinstance(exc, urllib3.exceptions.ProtocolError):
            return TransientTargetError(f"the connection to {where} was dropped{after}")
        if isinstance(exc, urllib3.exceptions.SSLError):
            return TargetError(f"TLS with {where} failed: {scrub(str(exc), 200)}")
        return TargetError(f"request to {where} failed: {type(exc).__name__}{after}")


def _status(exc: ApiException) -> tuple[str, str, dict[str, Any]]:
    """(reason, scrubbed message, details) of the Status an ApiException carries."""
    try:
        body = json.loads(exc.body or "")
    except (ValueError, TypeError):
        body = None
    if not isinstance(body, dict):
        return str(exc.reason or ""), "", {}
    details = body.get("details")
    return (
        str(body.get("reason") or exc.reason or ""),
        scrub(str(body.get("message") or "")),
        details if isinstance(details, dict) else {},
    )


class SecretsApi:
    """The three Secret calls trustmgr makes, through the official client's
    ApiClient (its auth, TLS and errors), answered as plain dicts.

    The generated CoreV1Api would do the same, but importing its module alone
    takes ~0.8 s, a third of a 200-cluster bootstrap."""

    PATH = "/api/v1/namespaces/{namespace}/secrets"

    def __init__(self, api_client: Any) -> None:
        self._client = api_client

    def _send(
        self,
        method: str,
        path: str,
        path_params: dict[str, str],
        body: dict[str, Any] | None = None,
        _request_timeout: Any = None,
    ) -> dict[str, Any]:
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        request = self._client.param_serialize(
            method=method,
            resource_path=path,
            path_params=path_params,
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        response = self._client.call_api(*request, _request_timeout=_request_timeout)
        response.read()
        # Raises ApiException for any status but these, as the generated API does.
        answer = self._client.response_deserialize(response, {"200": "object", "201": "object"})
        return dict(answer.data)

    def read_namespaced_secret(self, name: str, namespace: str, **kw: Any) -> dict[str, Any]:
        return self._send(
            "GET", self.PATH + "/{name}", {"namespace": namespace, "name": name}, **kw
        )

    def create_namespaced_secret(
        self, namespace: str, body: dict[str, Any], **kw: Any
    ) -> dict[str, Any]:
        return self._send("POST", self.PATH, {"namespace": namespace}, body, **kw)

    def replace_namespaced_secret(
        self, name: str, namespace: str, body: dict[str, Any], **kw: Any
    ) -> dict[str, Any]:
        return self._send(
            "PUT", self.PATH + "/{name}", {"namespace": namespace, "name": name}, body, **kw
        )
