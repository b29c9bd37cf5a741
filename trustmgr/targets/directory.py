"""A directory in Istio's cacerts layout.

All files change at once: they live in a timestamped subdirectory reached
through the ``..data`` symlink, which is swapped by one rename, the way the
kubelet projects a Secret into a pod. A reader, or a crash, sees the old set or
the new set, never a certificate from one and a key from the other::

    <path>/ca-cert.pem -> ..data/ca-cert.pem
    <path>/..data -> ..2026_11_22_16_40_00.123456
    <path>/..previous -> ..2026_11_01_09_12_00.654321   the set it replaced, for rollback
"""

from __future__ import annotations

import contextlib
import os
import shutil
from datetime import UTC, datetime
from pathlib import Path

from trustmgr.atomic import fsync_dir
from trustmgr.errors import TargetError
from trustmgr.pki import CACERTS_FILES, CACerts
from trustmgr.targets.base import Previous, secret_manifest_yaml

DATA_LINK = "..data"
PREVIOUS_LINK = "..previous"
MANIFEST = "cacerts.yaml"
_SECRET_FILES = {"ca-key.pem", MANIFEST}


class DirectoryTarget:
    def __init__(self, path: Path, *, cluster: str) -> None:
        self.path = path
        self.cluster = cluster
        self.description = f"directory {path}"
        self.foreign: str | None = None

    def close(self) -> None:
        pass

    def _fail(self, doing: str, exc: OSError) -> TargetError:
        hint = " (check the directory's owner and mode)" if isinstance(exc, PermissionError) else ""
        return TargetError(f"cannot {doing} {exc.filename or self.path}: {exc.strerror}{hint}")

    def read(self) -> CACerts | None:
        base = self.path
        try:
            if (self.path / DATA_LINK).is_symlink():
                # One readlink, then every file from that snapshot: consistent even mid-swap.
                base = self.path / os.readlink(self.path / DATA_LINK)
        except OSError as exc:
            raise self._fail("read", exc) from None
        return self._read(base)

    def _read(self, base: Path) -> CACerts | None:
        try:
            files = {}
            for name in CACERTS_FILES:
                try:
                    files[name] = (base / name).read_bytes()
                except (FileNotFoundError, NotADirectoryError):
                    files[name] = b""
        except OSError as exc:
            raise self._fail("read", exc) from None
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

    def write(self, material: CACerts, *, adopt: bool = False) -> None:
        files = {**material.files(), MANIFEST: secret_manifest_yaml(material, cluster=self.cluster)}
        stamp = datetime.now(UTC).strftime("..%Y_%m_%d_%H_%M_%S.%f")
        data_dir = self.path / stamp
        swapped = False
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            old = (
                os.readlink(self.path / DATA_LINK) if (self.path / DATA_LINK).is_symlink() else None
            )
            data_dir.mkdir(mode=0o755)
            for name, content in files.items():
                fd = os.open(
                    data_dir / name,
                    os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                    0o600 if name in _SECRET_FILES else 0o644,
                )
                with os.fdopen(fd, "wb") as f:
                    f.write(content)
                    f.flush()
                    os.fsync(f.fileno())
            fsync_dir(data_dir)
            tmp_link = self.path / f"{DATA_LINK}_tmp"
            with contextlib.suppress(FileNotFoundError):
                tmp_link.unlink()
            tmp_link.symlink_to(stamp)
            tmp_link.replace(self.path / DATA_LINK)
            swapped = True
            for name in files:
                link = self.path / name
                if not (link.is_symlink() and os.readlink(link) == f"{DATA_LINK}/{name}"):
                    tmp = self.path / f".{name}.link"
                    with contextlib.suppress(FileNotFoundError):
                        tmp.unlink()
                    tmp.symlink_to(f"{DATA_LINK}/{name}")
                    tmp.replace(link)
            fsync_dir(self.path)
        except OSError as exc:
            if not swapped:
                shutil.rmtree(data_dir, ignore_errors=True)
            raise self._fail("write", exc) from None
        if old and old != stamp:
            self._keep_previous(old)

    def _keep_previous(self, old: str) -> None:
        """Point ``..previous`` at the replaced set; drop the one it pointed at."""
        link = self.path / PREVIOUS_LINK
        dropped = os.readlink(link) if link.is_symlink() else None
        try:
            _swap_link(self.path, PREVIOUS_LINK, old)
        except OSError:
            shutil.rmtree(self.path / old, ignore_errors=True)
            return
        if dropped and dropped != old:
            shutil.rmtree(self.path / dropped, ignore_errors=True)

    def previous(self) -> Previous | None:
        link = self.path / PREVIOUS_LINK
        if not link.is_symlink():
            return None
        material = self._read(self.path / os.readlink(link))
        return Previous(material, managed=True) if material else None

    def restore(self, previous: Previous) -> None:
        """Swap ``..data`` and ``..previous``: one rename each, files never mixed."""
        link = self.path / PREVIOUS_LINK
        if not link.is_symlink() or self.previous() != previous:
            raise TargetError(f"the previous set in {self.path} changed; run again")
        try:
            kept, current = os.readlink(link), os.readlink(self.path / DATA_LINK)
            _swap_link(self.path, DATA_LINK, kept)
            _swap_link(self.path, PREVIOUS_LINK, current)
            fsync_dir(self.path)
        except OSError as exc:
            raise self._fail("write", exc) from None


def _swap_link(directory: Path, name: str, to: str) -> None:
    tmp = directory / f"{name}_tmp"
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    tmp.symlink_to(to)
    tmp.replace(directory / name)
