"""Copying a state and its blobs to another store, verified by reading it back."""

from __future__ import annotations

from dataclasses import dataclass, replace

from trustmgr.errors import StateError
from trustmgr.state.model import State
from trustmgr.state.store import StateStore


@dataclass(frozen=True)
class Migration:
    """What was copied: the source's state version, and the blobs by name."""

    source: str
    destination: str
    state: State
    blobs: tuple[str, ...]


def migrate(source: StateStore, destination: StateStore) -> Migration:
    """Copy ``source``'s state and blobs into ``destination``, which must be empty.

    Both locks are held throughout, so no run changes either store meanwhile.
    The copy is read back: every blob byte for byte, and the state equal but
    for its version, which restarts at 1 in the destination (versions only
    order the saves of one store). Blobs are written before the state: a copy
    cut short leaves blobs without a state, which counts as not empty (empty
    it and migrate again). Every blob is written as secret: a store does not
    record which were."""
    if source.description == destination.description:
        raise StateError(
            f"the destination is the current state store ({source.description}); name another"
        )
    with source.lock(), destination.lock():
        state = source.load()
        blobs: dict[str, bytes] = {}
        for name in source.blobs().names():
            data = source.blobs().load(name)
            if data is None:
                raise StateError(f"blob {name} of {source.description} vanished while it was read")
            blobs[name] = data
        present, present_blobs = destination.load(), destination.blobs().names()
        if present != State() or present_blobs:
            raise StateError(
                f"{destination.description} already holds a state (version {present.version}, "
                f"{len(present_blobs)} blobs); migrate only into an empty store"
            )
        destination.check_writable()
        for name, data in blobs.items():
            destination.blobs().save(name, data, secret=True)
        destination.save(replace(state, version=0))
        _verify(destination, state, blobs)
    return Migration(source.description, destination.description, state, tuple(blobs))


def _verify(destination: StateStore, state: State, blobs: dict[str, bytes]) -> None:
    again = "empty it and migrate again"
    copied = destination.load()
    if replace(copied, version=state.version) != state:
        raise StateError(f"the state read back from {destination.description} differs; {again}")
    names = destination.blobs().names()
    if names != sorted(blobs):
        raise StateError(
            f"{destination.description} holds blobs {', '.join(names) or 'none'} after the copy, "
            f"not {', '.join(sorted(blobs))}; {again}"
        )
    for name, data in blobs.items():
        if destination.blobs().load(name) != data:
            raise StateError(
                f"blob {name} read back from {destination.description} differs; {again}"
            )
