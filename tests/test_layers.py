"""The edges between the parts (DESIGN "Parts and their edges"), read from the imports."""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PROVIDERS_MAY_IMPORT = ("trustmgr.providers", "trustmgr.errors", "trustmgr.schema")
LEAVES = ("trustmgr/errors.py", "trustmgr/schema.py")


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def _sources(*dirs: str) -> list[Path]:
    return sorted(p for d in dirs for p in (REPO / d).rglob("*.py"))


def _ours(module: str) -> bool:
    return module.split(".")[0] in ("trustmgr", "providers")


@pytest.mark.parametrize("path", _sources("providers"), ids=lambda p: p.name)
def test_providers_import_only_their_own_modules_errors_and_schema(path: Path) -> None:
    outside = {
        m
        for m in _imports(path)
        if _ours(m) and not any(m == a or m.startswith(a + ".") for a in PROVIDERS_MAY_IMPORT)
    }
    assert not outside, f"{path.name} imports {sorted(outside)}"


@pytest.mark.parametrize("leaf", LEAVES)
def test_the_modules_providers_share_import_nothing_of_trustmgr(leaf: str) -> None:
    assert not {m for m in _imports(REPO / leaf) if _ours(m)}


def test_nothing_imports_the_bare_providers_name() -> None:
    """The package is installed as trustmgr.providers; a bare ``providers`` exists
    only in a checkout and would be a second copy of every class."""
    bare = [
        f"{p.relative_to(REPO)}: {m}"
        for p in _sources("trustmgr", "providers", "tests", "scripts")
        if "trustmgr/providers" not in p.as_posix()
        for m in _imports(p)
        if m.split(".")[0] == "providers"
    ]
    assert not bare


def test_the_wheel_installs_only_the_trustmgr_package(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "-q",
            "-w",
            str(tmp_path),
            str(REPO),
        ],
        check=True,
        cwd=tmp_path,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("trustmgr-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {
        "trustmgr",
        wheel.name.split("-py")[0] + ".dist-info",
    }
    assert "trustmgr/providers/selfsigned.py" in names
    assert "trustmgr/providers/py.typed" in names
