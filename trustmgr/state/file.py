"""The ``file`` state store: a directory, by default ``.trustmgr/``.

Layout::

    state.json                       cluster records, with a version for compare-and-set
    providers/<name>/root.pem        a self-signed root and its encrypted key, mode 0600
    lock                             held for the whole of a run
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import filelock

from trustmgr.atomic import make_private_dirs, write_atomic
from trustmgr.errors import LockedError, StateError
from trustmgr.state.model import State


class _Blobs:
    def __init__(self, root: Path) -> None:
        self._root = root

    def _path(self, name: str) -> Path:
        path = (self._root / name).resolve()
        if not path.is_relative_to(self._root.resolve()):
            raise StateError(f"refusing to store {name!r} outside the state directory")
        return path

    def load(self, name: str) -> bytes | None:
        try:
            return self._path(name).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StateError(f"cannot read {self._path(name)}: {exc.strerror}") from None

    def save(self, name: str, data: bytes, *, secret: bool) -> None:
        path = self._path(name)
        try:
            make_private_dirs(path.parent)
            write_atomic(path, data, mode=0o600 if secret else 0o644)
        except OSError as exc:
            raise StateError(f"cannot write {path}: {exc.strerror}") from None

    def delete(self, name: str) -> None:
        path = self._path(name)
        try:
            # not synced: a removal lost in a crash is done again by the next run
            path.unlink(missing_ok=True)
        except OSError as exc:
            raise StateError(f"cannot remove {path}: {exc.strerror}") from None

    def names(self) -> list[str]:
        """Every blob's name, sorted; the temporary files of writes in progress
        (or cut short) are not blobs."""
        if not self._root.is_dir():
            return []
        return sorted(
            path.relative_to(self._root).as_posix()
            for path in self._root.rglob("*")
            if path.is_file() and not path.name.startswith(".")
        )


class FileStateStore:
    """The state in a local directory; the lock an OS file lock, released by the
    OS when its process dies."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @property
    def description(self) -> str:
        return f"directory {self.path}"

    def close(self) -> None:
        """Nothing to release: files are opened and closed by each call."""

    @property
    def _state_file(self) -> Path:
        return self.path / "state.json"

    def _ensure_dir(self) -> None:
        try:
            make_private_dirs(self.path)
        except OSError as exc:
            raise StateError(
                f"cannot create the state directory {self.path}: {exc.strerror}"
            ) from None

    def blobs(self) -> _Blobs:
        return _Blobs(self.path / "providers")

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the store's lock; a second run fails at once rather than waiting."""
        self._ensure_dir()
        lock = filelock.FileLock(self.path / "lock", timeout=0, mode=0o600)
        try:
            lock.acquire()
        except filelock.Timeout:
            raise LockedError(
                f"another trustmgr run holds {self.path / 'lock'}; wait for it to finish"
            ) from None
        try:
            yield
        finally:
            lock.release()

    def check_writable(self) -> None:
        """Raise StateError unless a save would succeed as far as can be known
        without writing: the directory (or, before the first run, its nearest
        existing parent) is writable by this process and not on a read-only
        mount, which refuses even root."""
        probe = self.path
        while not probe.exists() and probe.parent != probe:
            probe = probe.parent
        what = "the state directory" if probe == self.path else "the parent of the state directory"
        if not probe.is_dir():
            raise StateError(f"cannot write {self.path}: {probe} is not a directory")
        if not os.access(probe, os.W_OK | os.X_OK) or os.statvfs(probe).f_flag & os.ST_RDONLY:
            raise StateError(
                f"cannot write {what} {probe}: it is read-only for this process; nothing "
                "was written (make it writable, or point stateStore at a writable path)"
            )
        if self._state_file.exists() and not os.access(self._state_file, os.W_OK):
            raise StateError(
                f"cannot write {self._state_file}: it is read-only for this process; nothing "
                "was written"
            )

    def load(self) -> State:
        try:
            raw = self._state_file.read_bytes()
        except FileNotFoundError:
            return State()
        except OSError as exc:
            raise StateError(f"cannot read {self._state_file}: {exc.strerror}") from None
        try:
            data = json.loads(raw)
        except ValueError:
            raise StateError(
                f"{self._state_file} is not valid JSON; restore it from a backup or remove it to start over"
            ) from None
        return State.from_json(data, str(self._state_file))

    def save(self, state: State) -> State:
        """Compare-and-set: refuses if the stored version moved since ``state`` was loaded."""
        current = self.load()
        if current.version != state.version:
            raise StateError(
                f"{self._state_file} changed during this run (version {state.version} → "
                f"{current.version}); run again"
            )
        saved = replace(state, version=state.version + 1)
        self._ensure_dir()
        data = json.dumps(saved.to_json(), indent=2, sort_keys=True).encode() + b"\n"
        try:
            write_atomic(self._state_file, data, mode=0o600)
        except OSError as exc:
            raise StateError(f"cannot write {self._state_file}: {exc.strerror}") from None
        return saved
