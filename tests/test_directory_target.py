"""A directory target holding what trustmgr did not write: hand-made cacerts,
a file moved over one of trustmgr's links, links pointing elsewhere."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Run, snapshot, trustmgr
from tests.workload import handmade_cacerts
from trustmgr.errors import TargetError
from trustmgr.pki import CACERTS_FILES, CACerts
from trustmgr.targets import directory as directory_mod
from trustmgr.targets.directory import DirectoryTarget

CONFIG = """\
stateStore: {file: {path: state}}
providers:
  corp:
    selfSigned: {passphraseEnv: TRUSTMGR_PASSPHRASE}
meshes:
  web:
    trustDomain: web.example
    provider: corp
    clusters:
      web-1: {directory: {path: out/web-1}}
      web-2: {directory: {path: out/web-2}}
intermediates:
  keyAlgorithm: ECDSA_P256
"""


@pytest.fixture
def config(workdir: Path) -> Iterator[Path]:
    path = workdir / "trustmgr.yaml"
    path.write_text(CONFIG)
    yield path


def run(config: Path, *args: str) -> Run:
    return trustmgr("-c", str(config), *args)


def ok(config: Path, *args: str) -> Run:
    result = run(config, *args)
    assert result.code == 0, result.out + result.err
    return result


def plan_of(config: Path, *args: str) -> dict[str, Any]:
    plan = json.loads(run(config, "plan", "-o", "json", *args).out)
    return {c["cluster"]: c for c in plan["clusters"]}


def status_of(config: Path) -> dict[str, Any]:
    return {r["cluster"]: r for r in json.loads(run(config, "status", "-o", "json").out)}


def write_handmade(directory: Path) -> dict[str, bytes]:
    """Plain files, as ``make -f tools/certs/Makefile.selfsigned.mk <cluster>-cacerts`` leaves them."""
    directory.mkdir(parents=True, exist_ok=True)
    files = handmade_cacerts().files()
    for name, content in files.items():
        (directory / name).write_bytes(content)
        (directory / name).chmod(0o600 if name == "ca-key.pem" else 0o644)
    return files


def contents(directory: Path) -> dict[str, bytes]:
    """What istiod reads: the top-level names."""
    return {name: (directory / name).read_bytes() for name in CACERTS_FILES}


# --- hand-made cacerts ------------------------------------------------------------------------


def test_handmade_cacerts_is_refused_without_adopt(config: Path, workdir: Path) -> None:
    directory = workdir / "out" / "web-1"
    old = write_handmade(directory)
    before = snapshot(directory)

    planned = plan_of(config)
    assert (planned["web-1"]["action"], planned["web-1"]["reason"]) == ("refuse", "NotManaged")
    assert "--adopt" in planned["web-1"]["message"]
    assert planned["web-2"]["reason"] == "Missing"
    assert status_of(config)["web-1"]["drift"] == "not written by trustmgr"

    result = run(config, "bootstrap")
    assert result.code == 1
    assert "web-1" in result.out + result.err
    assert contents(directory) == old
    assert snapshot(directory) == before
    # the other cluster is written all the same
    assert (workdir / "out" / "web-2" / "..data").is_symlink()


def test_adopt_replaces_handmade_cacerts_and_rollback_brings_them_back(
    config: Path, workdir: Path
) -> None:
    directory = workdir / "out" / "web-1"
    old = write_handmade(directory)
    (directory / "ca-key.pem").chmod(0o644)  # as tools/certs leaves it under umask 022

    assert plan_of(config, "--adopt")["web-1"]["reason"] == "Adopt"
    ok(config, "bootstrap", "--adopt")
    adopted = contents(directory)
    assert adopted["ca-key.pem"] != old["ca-key.pem"]
    assert all((directory / name).is_symlink() for name in CACERTS_FILES)
    ok(config, "verify")
    assert plan_of(config)["web-1"]["action"] == "none"

    result = ok(config, "rollback", "--cluster", "web-1")
    assert "not trustmgr's" in result.out
    assert contents(directory) == old
    assert stat.S_IMODE((directory / "ca-key.pem").stat().st_mode) == 0o600
    # foreign again, as before the adoption
    planned = plan_of(config)
    assert (planned["web-1"]["action"], planned["web-1"]["reason"]) == ("refuse", "NotManaged")
    assert run(config, "bootstrap").code == 1
    assert contents(directory) == old

    # a second rollback undoes the first
    ok(config, "rollback", "--cluster", "web-1")
    assert contents(directory) == adopted
    assert plan_of(config)["web-1"]["action"] == "none"
    ok(config, "verify")


def test_adoption_never_shows_istiod_a_mixed_set(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At every rename, the top-level files are all the old ones or all the new ones."""
    directory = workdir / "out" / "web-1"
    old = write_handmade(directory)
    new = handmade_cacerts()
    seen: list[dict[str, bytes]] = []
    swap = directory_mod._swap_link

    def watched(*args: Any, **kwargs: Any) -> None:
        swap(*args, **kwargs)
        seen.append(contents(directory))

    monkeypatch.setattr(directory_mod, "_swap_link", watched)
    target = DirectoryTarget(directory, cluster="web-1")
    assert target.read() == CACerts.from_files(old)
    assert target.foreign is not None
    with pytest.raises(TargetError, match="--adopt"):
        target.write(new)
    assert contents(directory) == old
    target.write(new, adopt=True)
    assert seen
    assert all(files in (old, new.files()) for files in seen)
    assert contents(directory) == new.files()
    previous = target.previous()
    assert previous is not None and not previous.managed
    assert previous.material == CACerts.from_files(old)


# --- a file moved over trustmgr's link ---------------------------------------------------------


def test_plain_key_over_a_link_is_drift_and_bootstrap_repairs_it(
    config: Path, workdir: Path
) -> None:
    ok(config, "bootstrap")
    directory = workdir / "out" / "web-1"
    other = workdir / "other-key.pem"
    other.write_bytes((workdir / "out" / "web-2" / "ca-key.pem").read_bytes())
    other.replace(directory / "ca-key.pem")  # mv other-key.pem out/web-1/ca-key.pem

    verify = run(config, "verify")
    assert verify.code == 1
    assert "FAIL web-1: ca-key.pem does not match ca-cert.pem" in verify.out
    assert status_of(config)["web-1"]["drift"] == "files changed outside trustmgr"
    planned = plan_of(config)
    assert planned["web-1"]["action"] == "issue"
    assert planned["web-1"]["reason"] not in ("NotManaged", "UpToDate")

    ok(config, "bootstrap")  # drift, not foreign: no --adopt needed
    assert (directory / "ca-key.pem").is_symlink()
    ok(config, "verify")
    assert status_of(config)["web-1"]["drift"] is None
    # What was replaced is kept, as istiod read it; rollback refuses to put back
    # a key that does not match its certificate.
    refused = run(config, "rollback", "--cluster", "web-1")
    assert refused.code == 1
    assert "ca-key.pem does not match ca-cert.pem" in refused.err
    ok(config, "verify")


# --- links pointing elsewhere ------------------------------------------------------------------


def outside_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "keep.txt").write_text("not trustmgr's")
    return path


@pytest.mark.parametrize("where", ["absolute", "relative", "parent"])
def test_links_pointing_outside_are_never_deleted(
    config: Path, workdir: Path, tmp_path_factory: pytest.TempPathFactory, where: str
) -> None:
    directory = workdir / "out" / "web-1"
    directory.mkdir(parents=True)
    if where == "absolute":
        elsewhere = tmp_path_factory.mktemp("elsewhere")
        data_to, previous_to = str(outside_dir(elsewhere / "a")), str(outside_dir(elsewhere / "b"))
        guarded = [elsewhere / "a" / "keep.txt", elsewhere / "b" / "keep.txt"]
    elif where == "relative":
        outside_dir(workdir / "out" / "x")
        outside_dir(workdir / "out" / "y")
        data_to, previous_to = "../x", "../y"
        guarded = [workdir / "out" / "x" / "keep.txt", workdir / "out" / "y" / "keep.txt"]
    else:  # the working directory and out/
        data_to, previous_to = "../..", ".."
        guarded = [outside_dir(workdir / "out") / "keep.txt", config]
    os.symlink(data_to, directory / "..data")
    os.symlink(previous_to, directory / "..previous")

    ok(config, "bootstrap")
    assert all(path.exists() for path in guarded)
    assert "no previous cacerts is kept" in run(config, "rollback", "--cluster", "web-1").err
    config.write_text(CONFIG.replace("ECDSA_P256", "ECDSA_P384"))
    ok(config, "bootstrap")  # a second write rotates ..previous
    assert all(path.exists() for path in guarded)
    ok(config, "verify")
    ok(config, "rollback", "--cluster", "web-1")  # to the first write's set
    assert all(path.exists() for path in guarded)
    assert plan_of(config)["web-1"]["reason"] == "KeyAlgorithmChanged"


def test_names_linked_into_a_data_dir_elsewhere_are_foreign(config: Path, workdir: Path) -> None:
    directory = workdir / "out" / "web-1"
    elsewhere = workdir / "elsewhere"
    old = write_handmade(elsewhere)
    directory.mkdir(parents=True)
    os.symlink("../../elsewhere", directory / "..data")
    for name in CACERTS_FILES:
        os.symlink(f"..data/{name}", directory / name)

    assert plan_of(config)["web-1"]["reason"] == "NotManaged"
    assert run(config, "bootstrap").code == 1
    ok(config, "bootstrap", "--adopt")
    assert contents(elsewhere) == old  # left alone
    ok(config, "rollback", "--cluster", "web-1")
    assert contents(directory) == old
