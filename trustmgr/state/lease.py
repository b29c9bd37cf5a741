"""The run lock of a store kept on a server: a record naming its holder and
when it expires, taken and renewed by compare-and-set.

The holder renews the record from a background thread every third of the lock
duration, so a long run keeps it; a holder that dies stops renewing, and once
the duration has passed since its last renewal, anyone may take the record
over. A holder that finds its record taken (it could not renew in time) has
lost the lock: from then on the store refuses its writes (:meth:`RunLock.check`)."""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

from trustmgr.errors import LockedError, TrustmgrError

log = logging.getLogger(__name__)


class LockLostError(TrustmgrError):
    """The lock record names another holder, or is gone."""


@dataclass
class Holding:
    """A lock this process holds: ``version`` is the record's compare-and-set
    token (a resourceVersion, a KV version) after the last write."""

    identity: str
    expires: datetime
    version: object
    lost: str | None = None


class LockRecord(Protocol):
    """One store's lock record."""

    @property
    def what(self) -> str:
        """The record, for messages: ``lease trustmgr/trustmgr-state-lock``."""
        ...

    def take(self, identity: str, now: datetime) -> Holding:
        """Write ``identity`` as holder, if the record is free or expired; else
        raise LockedError naming the holder and when its hold expires."""
        ...

    def renew(self, holding: Holding, now: datetime) -> Holding:
        """Extend the hold; LockLostError when the record is no longer ours."""
        ...

    def release(self, holding: Holding, now: datetime) -> None:
        """Clear the holder, unless the record has another one by now."""
        ...


def new_identity() -> str:
    """Who holds a lock, for the holder and for whoever finds it taken."""
    return f"{socket.gethostname()}/pid-{os.getpid()}/{secrets.token_hex(4)}"


class RunLock:
    """Holds a :class:`LockRecord` for the length of a ``with`` block."""

    def __init__(
        self, record: LockRecord, duration: timedelta, clock: Callable[[], datetime]
    ) -> None:
        self.record = record
        self.duration = duration
        self._clock = clock
        self._holding: Holding | None = None
        self._guard = threading.Lock()

    @contextmanager
    def hold(self) -> Iterator[None]:
        holding = self.record.take(new_identity(), self._clock())
        with self._guard:
            self._holding = holding
        stop = threading.Event()
        renewer = threading.Thread(
            target=self._renew_until, args=(stop,), name="trustmgr-lock-renewal", daemon=True
        )
        renewer.start()
        try:
            yield
        finally:
            stop.set()
            renewer.join()
            with self._guard:
                self._holding = None
            if holding.lost is None:
                try:
                    self.record.release(holding, self._clock())
                except TrustmgrError as exc:
                    log.warning(
                        "could not release the state lock (%s): %s; it expires by itself at %s",
                        self.record.what,
                        exc,
                        f"{holding.expires:%Y-%m-%dT%H:%M:%SZ}",
                    )

    def check(self) -> None:
        """Raise LockedError if this process took the lock and has lost it since."""
        with self._guard:
            holding = self._holding
        if holding is None:
            return
        if holding.lost is None and self._clock() >= holding.expires:
            holding.lost = f"it was not renewed before it expired at {holding.expires:%H:%M:%SZ}"
        if holding.lost is not None:
            raise LockedError(
                f"this run lost the state lock ({self.record.what}): {holding.lost}; "
                "nothing more was saved; run again"
            )

    def _renew_until(self, stop: threading.Event) -> None:
        interval = self.duration.total_seconds() / 3
        while not stop.wait(interval):
            with self._guard:
                holding = self._holding
            if holding is None or holding.lost is not None:
                return
            try:
                renewed = self.record.renew(holding, self._clock())
            except LockLostError as exc:
                holding.lost = str(exc)
                log.error("lost the state lock (%s): %s", self.record.what, exc)
                return
            except Exception as exc:  # the next tick tries again; check() sees an expired hold
                log.warning(
                    "could not renew the state lock (%s): %s; trying again",
                    self.record.what,
                    exc if isinstance(exc, TrustmgrError) else f"unexpected {type(exc).__name__}",
                )
                continue
            holding.expires, holding.version = renewed.expires, renewed.version
