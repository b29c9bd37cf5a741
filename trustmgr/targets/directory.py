"""A directory in Istio's cacerts layout.

All files change at once: they live in a timestamped subdirectory reached
through the ``..data`` symlink, which is swapped by one rename, the way the
kubelet projects a Secret into a pod. A reader, or a crash, sees the old set or
the new set, never a certificate from one and a key from the other::

    <path>/ca-cert.pem -> ..data/ca-cert.pem
    <path>/..data -> ..2026_11_22_16_40_00.123456
    <path>/..previous -> ..2026_11_01_09_12_00.654321   the set it replaced, for rollback

What is read is what istiod reads: the top-level names. When all four are
trustmgr's links they are read from the one ``..data`` target, resolved once (a
consistent snapshot even mid-swap); when any is not (a plain file moved over a
link, a link elsewhere), the top-level names themselves are read, so the
mismatch shows as drift.

Whose the files are:

- trustmgr's: ``..data`` is a link to a ``..<stamp>`` directory written by trustmgr.
  A top-level name that is not its link is drift, repaired by the next write
  without ``--adopt``.
- foreign: cacerts files are there but there is no ``..data`` link of trustmgr's
  (plain files as Istio's tools/certs makes them, or links into a ``..data``
  pointing elsewhere), or ``..data`` points at a set trustmgr kept from such
  files and rollback put back. Only ``adopt`` replaces them.

Before a write replaces files that are not all trustmgr's links, their bytes
are copied into a new ``..<stamp>`` directory, marked as not written by
trustmgr, and the names are switched to links into it; then the usual single
swap of ``..data`` follows and ``..previous`` points at the kept copy, so
``rollback`` gives back exactly what istiod read before.

Only link targets that are a bare ``..YYYY_MM_DD_HH_MM_SS.ffffff`` name (a real
directory beside the links) are trustmgr's: nothing else is ever deleted.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import stat
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from trustmgr.atomic import fsync_dir, make_private_dirs
from trustmgr.errors import TargetConflictError, TargetError
from trustmgr.pki import CACERTS_FILES, CACerts
from trustmgr.targets.base import Previous, secret_manifest_yaml

log = logging.getLogger(__name__)

DATA_LINK = "..data"
PREVIOUS_LINK = "..previous"
MANIFEST = "cacerts.yaml"
FOREIGN_MARK = ".not-written-by-trustmgr"
"""In a ``..<stamp>`` directory: its files were kept from outside trustmgr."""
STAMP_FORMAT = "..%Y_%m_%d_%H_%M_%S.%f"
STAMP = re.compile(r"\.\.\d{4}_\d{2}_\d{2}_\d{2}_\d{2}_\d{2}\.\d{6}")
_SECRET_FILES = {"ca-key.pem", MANIFEST}
_ALL_FILES = (*CACERTS_FILES, MANIFEST)


@dataclass(frozen=True)
class _Layout:
    """What the directory's links say, before any file is read."""

    data: str | None
    """``..data``'s target when it is trustmgr's: a stamp directory beside it."""
    previous: str | None
    """``..previous``'s target when it is trustmgr's."""
    linked: bool
    """``data`` is set and every cacerts name is the link ``..data/<name>``."""
    kept_foreign: bool
    """``data`` holds files kept from outside trustmgr (put back by rollback)."""


class DirectoryTarget:
    def __init__(self, path: Path, *, cluster: str) -> None:
        self.path = path
        self.cluster = cluster
        self.description = f"directory {path}"
        self.foreign: str | None = None
        self.stamp: str | None = None
        """After ``read``: the digest in the cacerts.yaml trustmgr wrote with the files."""
        self.exposed: str | None = None
        """After ``read``: why the CA key trustmgr wrote can be read by others, if it can."""

    def close(self) -> None:
        pass

    def _fail(self, doing: str, exc: OSError) -> TargetError:
        hint = " (check the directory's owner and mode)" if isinstance(exc, PermissionError) else ""
        return TargetError(f"cannot {doing} {exc.filename or self.path}: {exc.strerror}{hint}")

    # reading

    def _own(self, link_name: str) -> str | None:
        """The target of ``link_name`` if it is trustmgr's: a bare stamp name
        that is a real directory beside it, never a path leading elsewhere."""
        link = self.path / link_name
        if not link.is_symlink():
            return None
        to = os.readlink(link)
        if not STAMP.fullmatch(to):
            return None
        target = self.path / to
        return to if not target.is_symlink() and target.is_dir() else None

    def _layout(self) -> _Layout:
        data = self._own(DATA_LINK)
        linked = data is not None and all(
            (self.path / name).is_symlink()
            and os.readlink(self.path / name) == f"{DATA_LINK}/{name}"
            for name in CACERTS_FILES
        )
        kept_foreign = data is not None and (self.path / data / FOREIGN_MARK).exists()
        return _Layout(data, self._own(PREVIOUS_LINK), linked, kept_foreign)

    def _foreign(self, layout: _Layout, material: CACerts | None) -> str | None:
        if material is None:
            return None
        if layout.data is None:
            return (
                f"directory {self.path} holds cacerts files trustmgr did not write "
                f"(no {DATA_LINK} link of trustmgr's)"
            )
        if layout.kept_foreign:
            return (
                f"directory {self.path} holds cacerts trustmgr did not write "
                "(kept by trustmgr when it replaced them, and put back)"
            )
        return None

    def read(self) -> CACerts | None:
        self.foreign = self.stamp = self.exposed = None
        try:
            layout = self._layout()
            # All links ours: one readlink, then every file from that snapshot,
            # consistent even mid-swap. Otherwise what istiod reads: the names.
            base = self.path / layout.data if layout.linked and layout.data else self.path
            material = self._read(base)
            self.foreign = self._foreign(layout, material)
            if material is not None and self.foreign is None and layout.data is not None:
                self.stamp = _stamp(self.path / layout.data / MANIFEST)
                self.exposed = _exposed(base)
        except OSError as exc:
            raise self._fail("read", exc) from None
        return material

    def _read(self, base: Path) -> CACerts | None:
        files = {}
        for name in CACERTS_FILES:
            try:
                files[name] = (base / name).read_bytes()
            except (FileNotFoundError, NotADirectoryError):
                files[name] = b""
        if not any(files.values()):
            return None
        return CACerts.from_files(files)

    def check_writable(self) -> None:
        probe = self.path
        while not probe.exists():
            if probe.parent == probe:
                break
            probe = probe.parent
        if not probe.is_dir():
            raise TargetError(f"cannot write {self.path}: {probe} is not a directory")
        if not os.access(probe, os.W_OK | os.X_OK):
            raise TargetError(
                f"cannot write {self.path}: permission denied on {probe} (check the directory's owner and mode)"
            )
        if os.statvfs(probe).f_flag & os.ST_RDONLY:
            raise TargetError(f"cannot write {self.path}: {probe} is on a read-only mount")

    # writing

    def write(self, material: CACerts, *, adopt: bool = False) -> None:
        files = {**material.files(), MANIFEST: secret_manifest_yaml(material, cluster=self.cluster)}
        try:
            make_private_dirs(self.path)
            layout = self._layout()
            current = None if layout.linked else self._read(self.path)
            held = self._read(self.path / layout.data) if layout.linked and layout.data else current
        except OSError as exc:
            raise self._fail("write", exc) from None
        foreign = self._foreign(layout, held)
        if foreign is not None and not adopt:
            if self.foreign is None:
                raise TargetConflictError(f"{foreign}; it changed since it was read")
            raise TargetError(f"{foreign}; run with --adopt to replace it")
        self._check_data_link()
        released: list[str] = []
        data = layout.data
        if current is not None:
            kept = self._capture()
            if data is not None:
                released.append(data)
            data = kept
        new = self._new_set(files)
        old_previous = layout.previous
        try:
            if data is not None:
                # Kept before the switch: should this fail, nothing has changed.
                _swap_link(self.path, PREVIOUS_LINK, data)
            # Names first: on a first write they dangle until ..data exists, so
            # all files appear at once with the one rename below, never some.
            self._link_names(_ALL_FILES)
            _swap_link(self.path, DATA_LINK, new)
            fsync_dir(self.path)
        except OSError as exc:
            if self._own(DATA_LINK) != new:
                self._drop(new, keep=set())
            raise self._fail("write", exc) from None
        self.foreign = None
        keep = {new, data} if data else {new}
        for name in (*released, old_previous):
            self._drop(name, keep=keep)
        self.tidy()

    def tidy(self) -> None:
        """Delete stamp directories nothing refers to: sets an interrupted write
        made, or stopped before releasing, CA keys included."""
        try:
            keep = {self._own(DATA_LINK), self._own(PREVIOUS_LINK)}
            strays = [
                e.name
                for e in os.scandir(self.path)
                if STAMP.fullmatch(e.name) and e.is_dir(follow_symlinks=False)
            ]
        except OSError as exc:
            log.warning("could not list %s: %s", self.path, exc.strerror)
            return
        for name in strays:
            if name not in keep:
                log.info(
                    "cluster %s: removing %s, left by an interrupted write", self.cluster, name
                )
                self._drop(name, keep=set())

    def _check_data_link(self) -> None:
        link = self.path / DATA_LINK
        if link.exists() and not link.is_symlink():
            raise TargetError(
                f"cannot write {self.path}: {DATA_LINK} there is not a link, trustmgr "
                "switches it as one; move it away"
            )

    def _capture(self) -> str:
        """Keep what istiod reads now (top-level names that are not all trustmgr's
        links) in a new stamp directory, and point ``..data`` and the names at it.

        Every rename here replaces a name with a link to a copy of the same bytes:
        istiod reads the same certificate and key before and after each one, so
        switching the names one by one opens no window where ca-cert.pem and
        ca-key.pem disagree. What remains: a change made to the files by someone
        else between the copy and the switch is not seen (the copy wins), the
        switched files are new inodes (a file watcher fires, and reads the same
        bytes), and a crash mid-way leaves some names plain and some linked, to
        the same bytes. After a crash, ``..data`` may point at the kept set,
        which reads as foreign: the next run asks for ``--adopt`` again, even
        where the names were only drift in a directory of trustmgr's."""
        stamp = self._new_dir()
        kept = self.path / stamp
        try:
            present = []
            for name in _ALL_FILES:
                source = self.path / name
                try:
                    content = source.read_bytes()
                    mode = stat.S_IMODE(source.stat().st_mode)
                    if name in _SECRET_FILES:  # a key trustmgr writes is never readable by others
                        mode &= 0o600
                except (FileNotFoundError, NotADirectoryError):
                    continue
                _write_file(kept / name, content, mode)
                present.append(name)
            when = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            _write_file(
                kept / FOREIGN_MARK,
                f"kept by trustmgr at {when} from {self.path}; not written by trustmgr\n".encode(),
                0o644,
            )
            fsync_dir(kept)
            _swap_link(self.path, DATA_LINK, stamp)
            self._link_names(present)
            fsync_dir(self.path)
        except OSError as exc:
            if self._own(DATA_LINK) != stamp:
                self._drop(stamp, keep=set())
            raise self._fail("write", exc) from None
        return stamp

    def _new_set(self, files: dict[str, bytes]) -> str:
        stamp = self._new_dir()
        try:
            for name, content in files.items():
                _write_file(
                    self.path / stamp / name, content, 0o600 if name in _SECRET_FILES else 0o644
                )
            fsync_dir(self.path / stamp)
        except OSError as exc:
            self._drop(stamp, keep=set())
            raise self._fail("write", exc) from None
        return stamp

    def _new_dir(self) -> str:
        """A new, empty stamp directory; its name."""
        now = datetime.now(UTC)
        for tick in range(1000):
            stamp = (now + timedelta(microseconds=tick)).strftime(STAMP_FORMAT)
            try:
                (self.path / stamp).mkdir(mode=0o755)
            except FileExistsError:
                continue
            except OSError as exc:
                raise self._fail("write", exc) from None
            return stamp
        raise TargetError(f"cannot write {self.path}: no free {STAMP_FORMAT} name")

    def _link_names(self, names: tuple[str, ...] | list[str]) -> None:
        for name in names:
            link = self.path / name
            if not (link.is_symlink() and os.readlink(link) == f"{DATA_LINK}/{name}"):
                _swap_link(self.path, name, f"{DATA_LINK}/{name}", tmp=f".{name}.link")

    def _drop(self, name: str | None, *, keep: set[str]) -> None:
        """Delete a stamp directory trustmgr no longer refers to; anything else stays."""
        if name is None or name in keep or not STAMP.fullmatch(name):
            return
        try:
            if name in (self._own(DATA_LINK), self._own(PREVIOUS_LINK)):
                return
            target = self.path / name
            if not target.is_symlink() and target.is_dir():
                shutil.rmtree(target, ignore_errors=True)
        except OSError as exc:
            log.warning("could not delete %s: %s", self.path / name, exc)

    # rollback

    def previous(self) -> Previous | None:
        try:
            kept = self._own(PREVIOUS_LINK)
            if kept is None:
                return None
            material = self._read(self.path / kept)
            foreign = (self.path / kept / FOREIGN_MARK).exists()
        except OSError as exc:
            raise self._fail("read", exc) from None
        if material is None:
            return None
        saved_at = None
        if foreign:  # kept when it was replaced: its stamp says when
            saved_at = datetime.strptime(kept, STAMP_FORMAT).strftime("%Y-%m-%dT%H:%M:%SZ")
        return Previous(material, managed=not foreign, saved_at=saved_at)

    def restore(self, previous: Previous) -> None:
        """Swap ``..data`` and ``..previous``: one rename each, files never mixed.
        Names that were not trustmgr's links are kept first, as a write keeps them."""
        if self.previous() != previous:
            raise TargetError(f"the previous set in {self.path} changed; run again")
        try:
            layout = self._layout()
            current = None if layout.linked else self._read(self.path)
        except OSError as exc:
            raise self._fail("write", exc) from None
        kept = layout.previous
        if kept is None:
            raise TargetError(f"the previous set in {self.path} changed; run again")
        self._check_data_link()
        released: list[str] = []
        data = layout.data
        if current is not None:
            captured = self._capture()
            if data is not None:
                released.append(data)
            data = captured
        try:
            _swap_link(self.path, DATA_LINK, kept)
            if data is not None:
                _swap_link(self.path, PREVIOUS_LINK, data)
            else:
                (self.path / PREVIOUS_LINK).unlink()
            self._link_names(_ALL_FILES)
            fsync_dir(self.path)
        except OSError as exc:
            raise self._fail("write", exc) from None
        for name in released:
            self._drop(name, keep={kept, data} if data else {kept})


_DIGEST = re.compile(rb"trustmgr\.io/digest: ([0-9a-f]{64})\b")


def _stamp(manifest: Path) -> str | None:
    """The digest annotation of a cacerts.yaml trustmgr wrote, if readable."""
    try:
        match = _DIGEST.search(manifest.read_bytes())
    except (FileNotFoundError, NotADirectoryError):
        return None
    return match.group(1).decode() if match else None


def _exposed(base: Path) -> str | None:
    """Why the files holding the CA key can be read by others than their owner."""
    for name in sorted(_SECRET_FILES):
        try:
            mode = stat.S_IMODE((base / name).stat().st_mode)
        except (FileNotFoundError, NotADirectoryError):
            continue
        if mode & 0o077:
            return f"{name} is readable by others than its owner (mode {mode:04o})"
    return None


def _write_file(path: Path, content: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), mode)
        f.write(content)
        f.flush()
        os.fsync(f.fileno())


def _swap_link(directory: Path, name: str, to: str, *, tmp: str | None = None) -> None:
    """Point ``directory/name`` at ``to`` by one rename."""
    tmp_link = directory / (tmp or f"{name}_tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp_link.unlink()
    tmp_link.symlink_to(to)
    tmp_link.replace(directory / name)
