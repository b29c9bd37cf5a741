"""The state store contract (:mod:`trustmgr.state.build` builds the configured store).

A store keeps the :class:`~trustmgr.state.model.State` and the providers' blobs
(a self-signed root, its key sealed by the provider before it gets here), and
holds the run lock, so that a CLI run and the daemon never write at once,
whichever machines they run on:

- ``file``: a local directory (:mod:`trustmgr.state.file`);
- ``kubernetes``: a Secret, and a Lease as the lock (:mod:`trustmgr.state.kubernetes`);
- ``vault``: Vault or OpenBao KV version 2 (:mod:`trustmgr.state.vault`).
"""

from __future__ import annotations

import re
from contextlib import AbstractContextManager
from datetime import timedelta
from typing import Final, Protocol

from trustmgr.errors import StateError, TrustmgrError
from trustmgr.providers.base import BlobStore
from trustmgr.state.model import State

LOCK_DURATION: Final = timedelta(seconds=60)
"""How long a lock stays valid after its last renewal: a run that died holding it
blocks others for at most this long. A live run renews it every third of it."""

SAVE_ATTEMPTS: Final = 5
"""Writes tried against a store object that keeps changing under them (a blob
saved by the same run between the read and the write), before giving up."""

_BLOB_NAME = re.compile(r"[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*")


class StoreUnavailableError(TrustmgrError):
    """The store could not be reached or did not answer; nothing was changed
    that the next run would not see. Worth running again later."""


class StoreBlobs(BlobStore, Protocol):
    """A store's blobs: a :class:`BlobStore` that can also list what it holds."""

    def names(self) -> list[str]:
        """Every blob's name, sorted."""
        ...


class StateStore(Protocol):
    """Where trustmgr keeps its state between runs.

    ``save`` is a compare-and-set on ``State.version``: it refuses with
    StateError ("changed during this run; run again") when the stored version
    moved since ``state`` was loaded, and returns the state as saved, its
    version one higher. ``lock`` is held for the whole of a run; while another
    holder has it, taking it fails at once with LockedError. A lock whose holder
    died expires by itself (the file store's lock dies with its process)."""

    @property
    def description(self) -> str:
        """Where the state is, for messages: ``directory .trustmgr``."""
        ...

    def load(self) -> State: ...

    def save(self, state: State) -> State: ...

    def lock(self) -> AbstractContextManager[None]: ...

    def check_writable(self) -> None:
        """Raise StateError unless a save would succeed as far as can be known
        without writing anything."""
        ...

    def blobs(self) -> StoreBlobs: ...

    def close(self) -> None:
        """Release connections; the store is unusable afterwards."""
        ...


def check_blob_name(name: str) -> str:
    """``name`` if it is a relative, slash-separated name without ``.`` or ``..``
    parts, as providers name their blobs (``corp/root.pem``)."""
    if not _BLOB_NAME.fullmatch(name) or any(p in (".", "..") for p in name.split("/")):
        raise StateError(f"refusing to store a blob named {name!r}: not a plain relative name")
    return name
