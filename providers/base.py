"""The contract every provider implements.

Error tree::

    ProviderError                 anything a provider raises on purpose
    ├── ProviderTransientError    worth retrying unchanged (sealed, throttled, 5xx, unreachable)
    └── ProviderNeedsFixError     retrying will not help (denied, unknown mount/ARN, bad config)

Messages never carry tokens, keys or passphrases.
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Protocol, runtime_checkable

from cryptography import x509

BACKDATE = timedelta(minutes=5)
"""How far a new CA's notBefore is set in the past, so a peer with a slow clock accepts it."""

Clock = Callable[[], datetime]
"""Returns the current time, timezone-aware UTC. Injected so tests control time."""


class ProviderError(Exception):
    """A provider could not do what was asked. The message says what to do."""


class ProviderTransientError(ProviderError):
    """A failure that may pass if the same call is made again later."""


class ProviderNeedsFixError(ProviderError):
    """A failure that needs a change of configuration or permissions."""


@dataclass(frozen=True)
class SignedCA:
    """A provider's answer to a CA CSR.

    ``chain`` runs from the issued certificate up to, but excluding, the root:
    the issued CA first, then each intermediate issuer. ``roots`` are the
    provider's current self-signed roots, one of which ``chain`` ends under.
    """

    chain: tuple[x509.Certificate, ...]
    roots: tuple[x509.Certificate, ...]


@runtime_checkable
class Provider(Protocol):
    """An upstream authority.

    ``name`` is the provider's key in the configuration, used in messages.
    """

    name: str

    def roots(self) -> tuple[x509.Certificate, ...]:
        """The provider's current roots; empty if it has none yet."""
        ...

    def sign_ca(self, csr: x509.CertificateSigningRequest, ttl: timedelta) -> SignedCA:
        """Sign ``csr`` as a CA with path length 0. ``ttl`` is advisory: a
        provider may shorten it (to its issuer's notAfter, or its own ceiling)."""
        ...


@runtime_checkable
class RootKeeper(Protocol):
    """A provider that makes and keeps its own root (the self-signed one), as
    opposed to one that only reports the roots of a remote authority."""

    def prepare_root(self) -> x509.Certificate:
        """A new root, made in memory and held by the provider; nothing is stored.
        Asking again returns the same one until it is kept."""
        ...

    def keep_prepared_root(self) -> x509.Certificate:
        """Store the prepared root, certificate and encrypted key as one unit.
        Refuses if the provider already has a root: a root is never replaced here."""
        ...

    def unlock(self) -> None:
        """Check, without writing, that signing will work: the stored root key
        decrypts, or with no root yet, the secret that will protect it is there."""
        ...

    def reseal_if_needed(self, before_write: Callable[[], None]) -> bool:
        """Store the root anew if it is kept in an earlier form (the key sealed
        at a lower cost, an earlier layout); nothing if it is kept as it should
        be. ``before_write`` is called before the first write and raises when
        none may be made. Signing never writes: a run calls this first. A write
        that fails is logged and leaves the root as it was, still usable. True
        when something was written."""
        ...


@runtime_checkable
class RootRenewer(Protocol):
    """A provider that can make a new root beside its current one at its remote
    authority (a new root issuer in a Vault mount)."""

    def new_root(self, label: str) -> tuple[str, x509.Certificate]:
        """Make the new root, named ``label`` where the authority names things;
        return the reference that selects it (its generation) and its certificate."""
        ...


class BlobStore(Protocol):
    """Durable storage a provider may keep its own material in (the self-signed
    provider keeps its root there). Writes are atomic; files holding secrets are
    written readable by the owner only. A failed write or removal raises
    StateError and leaves the blob as it was."""

    def load(self, name: str) -> bytes | None: ...

    def save(self, name: str, data: bytes, *, secret: bool) -> None: ...

    def delete(self, name: str) -> None:
        """Remove ``name``; nothing happens if it is not there."""
        ...


def read_secret(source: str, *, env: str | None = None, file: str | None = None) -> str:
    """The value of environment variable ``env``, or the content of ``file``
    without surrounding whitespace. ``source`` names what is read, for messages.

    A message never holds the value, nor anything that could be the secret
    written where its name or path belongs: a variable is named only if its
    name is well formed, a file only once it is known to exist."""
    if file:
        path = Path(file).expanduser()
        try:
            value = path.read_text().strip()
        except UnicodeDecodeError:
            raise ProviderNeedsFixError(f"{source}: {path} is not UTF-8 text") from None
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ENAMETOOLONG):
                raise ProviderNeedsFixError(f"{source}: {_NO_FILE}") from None
            raise ProviderNeedsFixError(
                f"{source}: cannot read {path}: {exc.strerror or 'unreadable'}"
            ) from None
        except ValueError:  # a NUL in the path
            raise ProviderNeedsFixError(f"{source}: {_NO_FILE}") from None
        if not value:
            raise ProviderNeedsFixError(f"{source}: {path} is empty")
        return value
    if env is None or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", env):
        raise ProviderNeedsFixError(
            f"{source}: the environment variable is not a valid name; "
            "write the variable's name in the configuration, not its value"
        )
    value = os.environ.get(env, "")
    if not value.strip():
        raise ProviderNeedsFixError(f"{source}: environment variable {env} is empty or unset")
    return value


_NO_FILE = (
    "no file at the configured path; check it (the path is not shown, "
    "in case it is the secret itself)"
)
