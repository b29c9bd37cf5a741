"""Where the central run and an agent meet, per cluster.

An exchange holds two documents: the desired document, written by the
central run and read by the agent, and the agent's report, written by the
agent and read by the central run. Neither is secret. The agent also keeps a
private record in its own cluster (:class:`AgentLocal`): the sequence it
applied, and the key of a CSR it is waiting on; the central run never reads it.

Two kinds: a directory (files beside the cluster's cacerts files) and a
Kubernetes namespace (ConfigMaps and a Secret beside the cacerts Secret, in
:mod:`trustmgr.agent.kubernetes`)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from trustmgr.atomic import make_private_dirs, write_atomic
from trustmgr.errors import StateError, TargetError

DESIRED_NAME = "trustmgr-desired"
REPORT_NAME = "trustmgr-report"
LOCAL_NAME = "trustmgr-agent"


class Exchange(Protocol):
    """One cluster's meeting point. Reads answer None when the document is not there."""

    where: str
    """Names the place in messages, e.g. ``cluster a1 (ConfigMap istio-system/trustmgr-desired)``."""

    def read_desired(self) -> bytes | None: ...

    def publish(self, envelope: bytes) -> None:
        """Replace the desired document (the central run)."""
        ...

    def read_report(self) -> bytes | None: ...

    def write_report(self, data: bytes) -> None:
        """Replace the report (the agent)."""
        ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class AgentLocal:
    """The agent's private record, kept in its own cluster."""

    sequence: int = 0
    """The sequence of the last desired document it accepted."""
    digest: str = ""
    """SHA-256 of that document's envelope."""
    pending_key: bytes = field(default=b"", repr=False)
    """PEM private key of the CSR it waits on the central run to sign (b"" none)."""
    pending_csr: bytes = b""
    """PEM of that CSR."""
    identity_key: bytes = field(default=b"", repr=False)
    """PEM Ed25519 private key the agent signs its reports with (made on first use)."""

    def to_bytes(self) -> bytes:
        return json.dumps(
            {
                "sequence": self.sequence,
                "digest": self.digest,
                "pendingKey": self.pending_key.decode(),
                "pendingCsr": self.pending_csr.decode(),
                "identityKey": self.identity_key.decode(),
            },
            sort_keys=True,
        ).encode()

    @classmethod
    def parse(cls, data: bytes, *, where: str) -> AgentLocal:
        try:
            d: Any = json.loads(data)
            return cls(
                int(d["sequence"]),
                str(d["digest"]),
                str(d["pendingKey"]).encode(),
                str(d["pendingCsr"]).encode(),
                str(d.get("identityKey") or "").encode(),
            )
        except (ValueError, KeyError, TypeError):
            raise StateError(
                f"{where}: the agent's own record is malformed; delete it and the agent starts "
                "over (it then accepts the current desired document whatever its sequence)"
            ) from None


class LocalStore(Protocol):
    def load(self) -> AgentLocal: ...

    def save(self, local: AgentLocal) -> None: ...

    def close(self) -> None: ...


class DirectoryExchange:
    """Files beside a directory target's cacerts: ``trustmgr-desired.json`` and
    ``trustmgr-report.json`` (readable by all, like root-cert.pem), and
    ``.trustmgr-agent.json`` (the agent's own record, readable by its owner only)."""

    def __init__(self, path: Path, *, cluster: str) -> None:
        self.path = path
        self.cluster = cluster
        self.where = f"cluster {cluster} ({path})"

    def _read(self, name: str) -> bytes | None:
        try:
            return (self.path / name).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise TargetError(
                f"cluster {self.cluster}: cannot read {self.path / name}: {exc.strerror}"
            ) from None

    def _write(self, name: str, data: bytes, *, mode: int) -> None:
        try:
            make_private_dirs(self.path)
            write_atomic(self.path / name, data, mode=mode)
        except OSError as exc:
            raise TargetError(
                f"cluster {self.cluster}: cannot write {self.path / name}: {exc.strerror}"
            ) from None

    def read_desired(self) -> bytes | None:
        return self._read(f"{DESIRED_NAME}.json")

    def publish(self, envelope: bytes) -> None:
        self._write(f"{DESIRED_NAME}.json", envelope, mode=0o644)

    def read_report(self) -> bytes | None:
        return self._read(f"{REPORT_NAME}.json")

    def write_report(self, data: bytes) -> None:
        self._write(f"{REPORT_NAME}.json", data, mode=0o644)

    def close(self) -> None:
        pass


class DirectoryLocalStore:
    """The agent's own record in ``.trustmgr-agent.json`` (mode 0600)."""

    def __init__(self, path: Path, *, cluster: str) -> None:
        self.file = path / f".{LOCAL_NAME}.json"
        self.cluster = cluster

    def load(self) -> AgentLocal:
        try:
            data = self.file.read_bytes()
        except FileNotFoundError:
            return AgentLocal()
        except OSError as exc:
            raise StateError(
                f"cluster {self.cluster}: cannot read {self.file}: {exc.strerror}"
            ) from None
        return AgentLocal.parse(data, where=str(self.file))

    def save(self, local: AgentLocal) -> None:
        try:
            make_private_dirs(self.file.parent)
            write_atomic(self.file, local.to_bytes(), mode=0o600)
        except OSError as exc:
            raise StateError(
                f"cluster {self.cluster}: cannot write {self.file}: {exc.strerror}"
            ) from None

    def close(self) -> None:
        pass
