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

import copy
import json
import logging
import os
import random
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import urllib3
import yaml
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubernetes.config import ConfigException, kube_config
from tenacity import RetryCallState, Retrying, retry_if_exception
from tenacity.stop import stop_after_attempt, stop_before_delay

from trustmgr.config import KubernetesTargetConfig
from trustmgr.errors import TargetConflictError, TargetError, TransientTargetError, one_line

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


SECRETS = "/api/v1/namespaces/{namespace}/secrets"
CONFIGMAPS = "/api/v1/namespaces/{namespace}/configmaps"


def object_path(collection: str, namespace: str, name: str | None = None) -> str:
    """The URL path of ``collection`` (e.g. :data:`SECRETS`) in ``namespace``, or of the
    object ``name`` in it; both quoted."""
    path = collection.format(namespace=quote(namespace, safe=""))
    return f"{path}/{quote(name, safe='')}" if name is not None else path


def scrub(text: str, limit: int = 300) -> str:
    """``text`` without PEM blocks or long base64-like runs, on one line, and not too long."""
    return one_line(_LONG_TOKEN.sub("[redacted]", _PEM.sub("[redacted]", text)), limit)


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


_PATHS = {
    "clusters": ("cluster", ("certificate-authority",)),
    "users": ("user", ("client-certificate", "client-key", "tokenFile")),
}


@dataclass(frozen=True)
class Kubeconfig:
    """A parsed kubeconfig, its entries indexed by name, file paths in them absolute."""

    spec: str
    current_context: str | None
    entries: dict[str, dict[str, dict[str, Any]]]

    def only(self, context: str) -> dict[str, Any]:
        """A kubeconfig holding just ``context``, its cluster and its user: loading one
        context from a file of hundreds otherwise scans every list for every name.
        A copy: the client may write refreshed credentials into what it is given."""
        value: dict[str, Any] = {"current-context": context}
        value["contexts"] = [self.entries["contexts"][context]]
        for section in ("clusters", "users"):
            entry = self._referenced(context, section)
            value[section] = [entry] if entry else []
        return copy.deepcopy(value)

    def plugin(self, context: str) -> str | None:
        """The command of the credential plugin ``context``'s user runs, if any."""
        user = (self._referenced(context, "users") or {}).get("user")
        exec_ = user.get("exec") if isinstance(user, dict) else None
        return str(exec_.get("command")) if isinstance(exec_, dict) else None

    def _referenced(self, context: str, section: str) -> dict[str, Any] | None:
        refs = self.entries["contexts"][context].get("context")
        name = refs.get(section[:-1]) if isinstance(refs, dict) else None
        return self.entries[section].get(str(name)) if name is not None else None


_kubeconfigs: dict[tuple[str, tuple[int, ...]], Kubeconfig] = {}
_kubeconfigs_lock = threading.Lock()


def kubeconfig(spec: str) -> Kubeconfig:
    """The kubeconfig ``spec`` names (a path, or a ``:`` list merged as kubectl does:
    the first entry of each name wins, and the first current-context), parsed once
    while its files are unchanged: 200 clusters in one file cost one parse."""
    paths = [Path(p).expanduser() for p in spec.split(os.pathsep) if p]
    stamps = tuple(p.stat().st_mtime_ns for p in paths if p.exists())
    with _kubeconfigs_lock:
        key = (spec, stamps)
        if key not in _kubeconfigs:
            if not stamps:
                raise TargetError(f"kubeconfig {spec} does not exist")
            _kubeconfigs[key] = _merge(spec, [p for p in paths if p.exists()])
        return _kubeconfigs[key]


def _merge(spec: str, paths: list[Path]) -> Kubeconfig:
    entries: dict[str, dict[str, dict[str, Any]]] = {
        s: {} for s in ("contexts", "clusters", "users")
    }
    current: str | None = None
    found = False
    for path in paths:
        data = _load(path)
        if data is None:
            continue
        if not isinstance(data, dict):
            raise TargetError(f"kubeconfig {path} holds no configuration")
        found = True
        current = current or (str(data["current-context"]) if data.get("current-context") else None)
        base = path.absolute().parent
        for section, named in entries.items():
            listed = data.get(section)
            for entry in listed if isinstance(listed, list) else []:
                if isinstance(entry, dict) and "name" in entry:
                    named.setdefault(str(entry["name"]), _absolute(section, entry, base))
    if not found:
        raise TargetError(f"kubeconfig {spec} holds no configuration")
    return Kubeconfig(spec, current, entries)


def _load(path: Path) -> Any:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        with path.open() as f:
            return yaml.load(f, Loader=loader)  # noqa: S506 -- a safe loader, in C when available
    except OSError as exc:
        raise TargetError(f"cannot read kubeconfig {path}: {exc.strerror}") from None
    except yaml.YAMLError:
        raise TargetError(f"kubeconfig {path} is not valid YAML") from None


def _absolute(section: str, entry: dict[str, Any], base: Path) -> dict[str, Any]:
    """``entry`` with the files it names relative to its kubeconfig made absolute, as
    kubectl resolves them (a plugin command only when it is a path, not a bare name)."""
    if section not in _PATHS:
        return entry
    key, fields = _PATHS[section]
    inner = entry.get(key)
    if not isinstance(inner, dict):
        return entry
    inner = dict(inner)
    # An absolute path stays as it is: base / "/abs" is "/abs".
    for name in fields:
        if isinstance(inner.get(name), str) and inner[name]:
            inner[name] = str(base / inner[name])
    exec_ = inner.get("exec")
    if isinstance(exec_, dict) and os.sep in str(exec_.get("command", "")):
        inner["exec"] = {**exec_, "command": str(base / exec_["command"])}
    return {**entry, key: inner}


class _PluginLog(logging.Filter):
    """Keeps the kubernetes client's kubeconfig log records off every handler.

    The client runs a kubeconfig's credential plugin while loading the context (and
    again when its token expires); when the plugin fails it logs the plugin's stderr,
    which can hold a token, with ``logging.error`` on the root logger and goes on
    without credentials. Installed on the root logger, this filter sees exactly those
    calls; :meth:`watch` collects what failed, as safe words, for the thread inside it."""

    def __init__(self) -> None:
        super().__init__()
        self._source = os.path.normcase(kube_config.__file__)
        self._local = threading.local()

    def filter(self, record: logging.LogRecord) -> bool:
        if os.path.normcase(record.pathname) != self._source:
            return True
        failures: list[str] | None = getattr(self._local, "failures", None)
        if failures is not None:
            failures.append(_plugin_failure(record.getMessage()))
        return False

    @contextmanager
    def watch(self) -> Iterator[list[str]]:
        outer = getattr(self._local, "failures", None)
        failures: list[str] = []
        self._local.failures = failures
        try:
            yield failures
        finally:
            self._local.failures = outer
            if outer is not None:
                outer.extend(failures)


def _plugin_failure(message: str) -> str:
    """What a credential plugin's failure was, without anything it printed."""
    exited = re.match(r"(?:exec|cmd-path): process returned (-?\d+)", message)
    if exited:
        return f"exited with status {exited.group(1)}"
    if "decode process output" in message:
        return "printed no ExecCredential JSON"
    return "returned no usable credentials"


_PLUGIN_LOG = _PluginLog()
logging.getLogger().addFilter(_PLUGIN_LOG)


class KubeApi:
    """One cluster's API client, built on first use; close it when done."""

    def __init__(
        self, cfg: KubernetesTargetConfig, *, sleep: Callable[[float], None] = time.sleep
    ) -> None:
        self.cfg = cfg
        self._sleep = sleep
        self._timeout = cfg.request_timeout.total_seconds()
        self._client: Any = None
        self._plugin: str | None = None
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

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def _configuration(self) -> Any:
        configuration = client.Configuration()
        try:
            with _PLUGIN_LOG.watch() as failures:
                if self.cfg.in_cluster:
                    config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
                else:
                    self._load_context(configuration)
        except ConfigException as exc:
            raise TargetError(f"{self.where}: {self._config_error(str(exc))}") from None
        except TargetError as exc:
            raise TargetError(f"{self.where}: {exc}") from None
        if failures:
            raise TargetError(self._plugin_failed(failures[0]))
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
        self._plugin = loaded.plugin(wanted)
        config.load_kube_config_from_dict(  # type: ignore[no-untyped-call]
            loaded.only(wanted),
            context=wanted,
            client_configuration=configuration,
            persist_config=False,
        )

    def _plugin_failed(self, failure: str) -> str:
        return (
            f"{self.where}: the kubeconfig's credential plugin {self._plugin or '(exec)'} "
            f"{failure}; run it by hand to see why"
        )

    def _config_error(self, message: str) -> str:
        """A ConfigException's message, one line, without a plugin's output (the
        client puts a failed auth-provider command's stderr in it)."""
        exited = re.match(r"cmd-path: process returned (-?\d+)\nCmd: (\S*)", message)
        if exited:
            return (
                f"the kubeconfig's auth-provider command {exited.group(2)} exited with status "
                f"{exited.group(1)}; run it by hand to see why"
            )
        return scrub(message.splitlines()[0] if message else "invalid kubeconfig")

    def send(
        self,
        request: Request,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        *,
        content_type: str = "application/json",
    ) -> dict[str, Any]:
        """One API request under the retry policy; the answer's JSON object."""
        return self.call(request, self._send, method, path, body, content_type)

    def _send(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None,
        content_type: str,
        _request_timeout: Any = None,
    ) -> dict[str, Any]:
        """Through the official ApiClient (its auth, TLS and errors), without the
        generated CoreV1Api: importing that module alone takes ~0.8 s with kubernetes
        37. ApiClient's request method changed in 37; both forms are public."""
        api = self.client
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type
        if hasattr(api, "param_serialize"):  # kubernetes >= 37
            serialized = api.param_serialize(
                method=method,
                resource_path=path,
                header_params=headers,
                body=body,
                auth_settings=["BearerToken"],
            )
            response = api.call_api(*serialized, _request_timeout=_request_timeout)
            response.read()
            # Raises ApiException for any other status, as the generated API does.
            answer = api.response_deserialize(response, {"200": "object", "201": "object"})
            return dict(answer.data)
        raw = api.call_api(  # raises ApiException for any status but 2xx
            path,
            method,
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
            _return_http_data_only=True,
            _preload_content=False,
            _request_timeout=_request_timeout,
        )
        return dict(json.loads(raw.data))

    def call(self, request: Request, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)`` under the retry policy, failures translated."""
        retrying = Retrying(
            stop=stop_after_attempt(self.cfg.attempts) | stop_before_delay(RETRY_BUDGET),
            wait=backoff,
            retry=retry_if_exception(transient),
            sleep=self._sleep,
            reraise=True,
        )
        # An expired token makes the client run the credential plugin again.
        with _PLUGIN_LOG.watch() as failures:
            try:
                return retrying(
                    fn, *args, _request_timeout=(self._timeout, self._timeout), **kwargs
                )
            except (ApiException, urllib3.exceptions.HTTPError) as exc:
                if failures:
                    raise TargetError(self._plugin_failed(failures[0])) from None
                tries = int(retrying.statistics.get("attempt_number", 1))
                raise self._translate(exc, request, tries) from None

    def _translate(self, exc: Exception, request: Request, tries: int) -> TargetError:
        after = f" (after {tries} tries)" if tries > 1 else ""
        if not isinstance(exc, ApiException):
            return self._network(exc, after)
        if not exc.status:  # the client's own failure before any answer
            reason = str(exc.reason or "")
            if reason.startswith("SSLError"):
                detail = reason.partition("\n")[2]
                return TargetError(
                    f"TLS with {self.server} ({self.where}) failed: {scrub(detail, 200)}"
                )
            return TargetError(f"{request} could not be sent to {self.server}")
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
