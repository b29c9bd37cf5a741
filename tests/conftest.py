from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.openbao import openbao_fixture, vault_pki_fixture  # noqa: F401  (session fixtures)
from trustmgr.cli import main

REPO = Path(__file__).resolve().parent.parent
PASSPHRASE = "quickstart passphrase"


@dataclass(frozen=True)
class Run:
    code: int
    out: str
    err: str


def trustmgr(*args: str) -> Run:
    """Run the CLI in-process, as a user would from a shell."""
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(list(args))
        except SystemExit as exc:
            code = int(exc.code or 0)
    return Run(code, out.getvalue(), err.getvalue())


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An empty working directory with the root-key passphrase set."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TRUSTMGR_PASSPHRASE", PASSPHRASE)
    yield tmp_path


@pytest.fixture
def quickstart(workdir: Path) -> Path:
    """The README's quickstart configuration, copied into the working directory."""
    config = workdir / "trustmgr.yaml"
    config.write_text((REPO / "examples" / "quickstart.yaml").read_text())
    return config


def snapshot(root: Path) -> dict[str, tuple[float, int]]:
    """Every path below ``root`` with its mtime and inode: what a no-op must not touch."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = path.lstat()
            out[str(path.relative_to(root))] = (st.st_mtime, st.st_ino)
    return out
