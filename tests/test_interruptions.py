"""A run stopped at any moment (kill -9, SIGTERM, Ctrl-C) leaves no cluster
half-written, and the next run finishes only what was left."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import PASSPHRASE, REPO
from trustmgr.pki import CACERTS_FILES, CACerts, istiod_problems
from trustmgr.targets.directory import STAMP

CLUSTERS = 200


def _config(workdir: Path) -> None:
    clusters = "".join(
        f"      c-{i:03d}: {{directory: {{path: out/c-{i:03d}}}}}\n" for i in range(CLUSTERS)
    )
    (workdir / "trustmgr.yaml").write_text(
        "stateStore: {file: {path: state}}\n"
        "providers:\n  corp:\n    selfSigned: {passphraseEnv: TRUSTMGR_PASSPHRASE}\n"
        "meshes:\n  fleet:\n    trustDomain: fleet.example\n    provider: corp\n"
        "    clusters:\n" + clusters
    )


def _start(workdir: Path, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "TRUSTMGR_PASSPHRASE": PASSPHRASE, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-u", "-m", "trustmgr", "bootstrap", "--workers", "4", *args],
        cwd=workdir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_progress(process: subprocess.Popen[str], clusters: int) -> None:
    """Read progress lines until ``clusters`` are done: the run is mid-way."""
    assert process.stderr is not None
    done = 0
    while done < clusters:
        line = process.stderr.readline()
        assert line, f"the run ended early (exit {process.wait()})"
        if line.startswith("["):
            done += 1


def _complete(workdir: Path) -> dict[str, bytes]:
    """Each cluster's CA certificate where the set is complete. Fails on any
    partial set, or a complete one istiod would refuse."""
    complete = {}
    for i in range(CLUSTERS):
        directory = workdir / "out" / f"c-{i:03d}"
        files = {}
        for name in CACERTS_FILES:
            try:
                files[name] = (directory / name).read_bytes()
            except (FileNotFoundError, NotADirectoryError):
                files[name] = b""
        present = [n for n, data in files.items() if data]
        if not present:
            continue
        assert len(present) == len(CACERTS_FILES), f"{directory}: partial set {present}"
        from datetime import UTC, datetime

        problems = istiod_problems(CACerts.from_files(files), now=datetime.now(UTC))
        assert not problems, f"{directory}: {problems}"
        complete[directory.name] = files["ca-cert.pem"]
    return complete


def _strays(workdir: Path) -> list[Path]:
    """Stamp directories that neither ..data nor ..previous refers to."""
    out = []
    for directory in (workdir / "out").iterdir():
        referenced = {
            os.readlink(directory / link)
            for link in ("..data", "..previous")
            if (directory / link).is_symlink()
        }
        out += [
            p for p in directory.iterdir() if STAMP.fullmatch(p.name) and p.name not in referenced
        ]
    return out


def _finish(workdir: Path) -> dict[str, object]:
    process = _start(workdir, "-o", "json")
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    report: dict[str, object] = json.loads(out)
    return report


def _changed(report: dict[str, object]) -> dict[str, str]:
    clusters = report["clusters"]
    assert isinstance(clusters, list)
    return {c["cluster"]: c["action"] for c in clusters if c["action"] != "none"}


def test_kill_9_at_random_moments_leaves_no_partial_set(workdir: Path) -> None:
    _config(workdir)
    rng = random.Random(9)
    complete: dict[str, bytes] = {}
    for _ in range(4):
        process = _start(workdir)
        _wait_for_progress(process, rng.randrange(1, 40))
        process.kill()
        process.wait()
        assert process.stderr is not None and process.stdout is not None
        process.stderr.close()
        process.stdout.close()
        complete = _complete(workdir)  # raises on any partial set
    assert 0 < len(complete) < CLUSTERS
    report = _finish(workdir)
    changed = _changed(report)
    # what a killed run completed is recorded, never issued again
    everyone = {f"c-{i:03d}" for i in range(CLUSTERS)}
    assert {c for c, action in changed.items() if action == "issue"} == everyone - set(complete)
    assert all(changed[c] == "record" for c in complete if c in changed)
    after = _complete(workdir)
    assert len(after) == CLUSTERS
    assert all(after[c] == ca for c, ca in complete.items())
    assert not _strays(workdir)
    assert _changed(_finish(workdir)) == {}


@pytest.mark.parametrize(
    ("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"]
)
def test_a_signal_finishes_the_clusters_in_flight_and_saves_them(
    workdir: Path, signum: int, code: int
) -> None:
    _config(workdir)
    process = _start(workdir)
    _wait_for_progress(process, 30)
    process.send_signal(signum)
    out, err = process.communicate(timeout=60)
    assert process.returncode == code, err
    assert f"{signal.Signals(signum).name}: finishing the clusters in flight" in err
    assert "not started (interrupted; run again)" in out
    complete = _complete(workdir)
    state = json.loads((workdir / "state/state.json").read_text())
    assert set(state["clusters"]) == set(complete)  # recorded as they completed
    assert 30 <= len(complete) < CLUSTERS
    report = _finish(workdir)
    assert set(_changed(report)) == {f"c-{i:03d}" for i in range(CLUSTERS)} - set(complete)
    assert all(_complete(workdir)[c] == ca for c, ca in complete.items())


class _Crash(BaseException):
    """The process dying at this step."""


def _material(workdir: Path) -> CACerts:
    """A complete cacerts set from a small bootstrap elsewhere."""
    from tests.conftest import trustmgr

    (workdir / "src").mkdir()
    (workdir / "src/trustmgr.yaml").write_text(
        "stateStore: {file: {path: state}}\n"
        "providers:\n  corp:\n    selfSigned: {passphraseEnv: TRUSTMGR_PASSPHRASE}\n"
        "meshes:\n  m:\n    trustDomain: m.example\n    provider: corp\n"
        "    clusters:\n      one: {directory: {path: out/one}}\n      two: {directory: {path: out/two}}\n"
    )
    assert trustmgr("-c", str(workdir / "src/trustmgr.yaml"), "bootstrap").code == 0
    files = {n: (workdir / "out/one" / n).read_bytes() for n in CACERTS_FILES}
    return CACerts.from_files(files)


def _visible(directory: Path) -> list[str]:
    """The cacerts names istiod would find (a dangling link is no file)."""
    return [n for n in CACERTS_FILES if (directory / n).exists()]


@pytest.mark.parametrize("first", [True, False], ids=["first write", "replacing write"])
def test_every_write_is_one_step_whatever_step_it_dies_at(
    workdir: Path, monkeypatch: pytest.MonkeyPatch, first: bool
) -> None:
    from trustmgr.targets import directory as directory_mod
    from trustmgr.targets.directory import DirectoryTarget

    material = _material(workdir)
    other = CACerts.from_files({n: (workdir / "out/two" / n).read_bytes() for n in CACERTS_FILES})
    steps = {"n": 0, "die_at": -1}
    real_swap, real_write = directory_mod._swap_link, directory_mod._write_file

    def counted(real: Callable[..., None]) -> Callable[..., None]:
        def step(*args: object, **kwargs: object) -> None:
            steps["n"] += 1
            if steps["n"] == steps["die_at"]:
                raise _Crash
            return real(*args, **kwargs)

        return step

    monkeypatch.setattr(directory_mod, "_swap_link", counted(real_swap))
    monkeypatch.setattr(directory_mod, "_write_file", counted(real_write))
    crashed_at = 0
    for die_at in range(1, 40):
        path = workdir / f"t{die_at}"
        if not first:
            steps["die_at"] = -1
            DirectoryTarget(path, cluster="c").write(other)
        steps.update(n=0, die_at=die_at)
        target = DirectoryTarget(path, cluster="c")
        target.read()
        try:
            target.write(material)
        except _Crash:
            crashed_at += 1
            seen = DirectoryTarget(path, cluster="c").read()
            if first:
                assert _visible(path) in ([], list(CACERTS_FILES)), die_at
                assert seen in (None, material)
            else:
                assert _visible(path) == list(CACERTS_FILES)
                assert seen in (other, material)
            # the next write finishes the job and leaves no stray set with a key
            steps["die_at"] = -1
            again = DirectoryTarget(path, cluster="c")
            again.read()
            again.write(material)
            assert again.read() == material
            strays = [p for p in path.iterdir() if STAMP.fullmatch(p.name)]
            assert len(strays) <= 2  # ..data's set and ..previous's
        else:
            break
    assert crashed_at >= 6  # every step of a write was tried
