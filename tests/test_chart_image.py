"""The container image the chart runs, checked from its Dockerfile: multi-stage,
the base pinned by digest, binary wheels only (nothing compiled, so no compiler
anywhere), the wheel with the extras the chart's modes use, a user that is not
root, and the environment the chart's wiring test lays out. hadolint lints it."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.test_chart import base_values, render
from tests.test_chart_wiring import IMAGE_ENV, IMAGE_USER
from trustmgr import __version__

DOCKERFILE = REPO / "Dockerfile"
EXTRAS = {"kubernetes", "vault", "aws", "daemon"}
COMPILERS = re.compile(
    r"\b(gcc|g\+\+|cc|clang|make|build-essential|rustc|cargo|gfortran|libc6-dev|python3-dev)\b"
)


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [arg for kw, arg in self.instructions if kw == keyword]


@dataclass
class Dockerfile:
    args: dict[str, str]
    stages: list[Stage]

    @property
    def final(self) -> Stage:
        return self.stages[-1]


def parse(text: str) -> Dockerfile:
    """Instructions with their continuation lines joined; ARGs before the first FROM
    substituted into FROM lines."""
    lines: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.rstrip()
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.lstrip().startswith("#"):
            continue  # a comment between continuation lines
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        lines.append(pending + line)
        pending = ""
    assert not pending, "the Dockerfile ends in a continuation"
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in lines:
        keyword, _, rest = line.strip().partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "FROM":
            words = rest.split()
            base = re.sub(
                r"\$\{(\w+)\}|\$(\w+)", lambda m: args[m.group(1) or m.group(2)], words[0]
            )
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base, name))
        elif not stages:
            assert keyword == "ARG", f"{keyword} before the first FROM"
            key, _, value = rest.partition("=")
            args[key] = value
        else:
            stages[-1].instructions.append((keyword, rest))
    return Dockerfile(args, stages)


@pytest.fixture(scope="module")
def dockerfile() -> Dockerfile:
    return parse(DOCKERFILE.read_text())


def test_multi_stage_with_every_base_pinned_by_digest(dockerfile: Dockerfile) -> None:
    assert len(dockerfile.stages) >= 2
    for stage in dockerfile.stages:
        assert re.fullmatch(r"[a-z0-9./_-]+(:[\w.-]+)?@sha256:[0-9a-f]{64}", stage.base), stage.base
    assert dockerfile.stages[0].name == "build"


def test_dependencies_are_binary_wheels_and_no_compiler_is_installed(
    dockerfile: Dockerfile,
) -> None:
    (install,) = [r for r in dockerfile.stages[0].all("RUN") if "pip install" in r]
    assert "--only-binary=:all:" in install
    for stage in dockerfile.stages:
        for run in stage.all("RUN"):
            if "apt-get" in run or "apk" in run:
                assert not COMPILERS.search(run), run


def test_the_wheel_is_installed_with_the_extras_the_chart_uses(dockerfile: Dockerfile) -> None:
    (install,) = [r for r in dockerfile.stages[0].all("RUN") if "pip install" in r]
    extras = re.search(r"trustmgr-\*\.whl\)\[([a-z,]+)\]", install)
    assert extras is not None, install
    assert set(extras.group(1).split(",")) == EXTRAS
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    assert set(declared) >= EXTRAS
    assert "/opt/trustmgr/bin/trustmgr --version" in install  # the build stage runs it once


def test_final_stage_copies_only_the_environment(dockerfile: Dockerfile) -> None:
    final = dockerfile.final
    assert final.name is None
    assert final.all("COPY") == ["--from=build /opt/trustmgr /opt/trustmgr"]
    assert not final.all("ADD")
    for run in final.all("RUN"):
        assert "apt-get" not in run and "pip install" not in run, run
    # pip goes from the final image: from the environment in the build stage, from the base here.
    assert any("pip uninstall --yes --quiet pip setuptools wheel" in r for r in final.all("RUN"))
    (build_install,) = [r for r in dockerfile.stages[0].all("RUN") if "pip install" in r]
    assert "/opt/trustmgr/bin/pip uninstall --yes pip setuptools" in build_install


def test_runs_as_the_chart_user_not_root(dockerfile: Dockerfile) -> None:
    (user,) = dockerfile.final.all("USER")
    uid, _, gid = user.partition(":")
    assert int(uid) == int(gid) == IMAGE_USER != 0
    default = render(base_values()).pod_spec()["securityContext"]
    assert default["runAsUser"] == default["runAsGroup"] == IMAGE_USER


def test_environment_and_entrypoint_are_what_the_chart_expects(dockerfile: Dockerfile) -> None:
    env: dict[str, str] = {}
    for item in dockerfile.final.all("ENV"):
        for word in shlex.split(item):
            key, _, value = word.partition("=")
            env[key] = value
    assert env == IMAGE_ENV
    (entrypoint,) = dockerfile.final.all("ENTRYPOINT")
    assert json.loads(entrypoint) == ["trustmgr"]
    (container,) = render(base_values()).pod_spec()["containers"]
    assert container["command"] == ["trustmgr"]
    assert env["PATH"].split(":")[0] == "/opt/trustmgr/bin"


def test_the_build_context_holds_what_is_copied(dockerfile: Dockerfile) -> None:
    ignore = (REPO / ".dockerignore").read_text().split()
    assert ignore[ignore.index("*") :][:1] == ["*"]  # everything is excluded, then listed back
    for keyword, rest in dockerfile.stages[0].instructions:
        if keyword != "COPY" or rest.startswith("--from"):
            continue
        *sources, _ = rest.split()
        for source in sources:
            assert (REPO / source).exists(), source
            assert f"!{source}" in ignore, f"{source} is not in the build context"
    # The provider packages are installed as trustmgr.providers through this link.
    assert (REPO / "trustmgr" / "providers").resolve() == REPO / "providers"


def hadolint() -> str:
    found = shutil.which("hadolint") or shutil.which(
        "hadolint", path=str(Path(sys.executable).parent)
    )
    if found is None:
        pytest.fail("hadolint is missing: install the test extra (pip install -e '.[test]')")
    return found


def test_hadolint_finds_nothing() -> None:
    result = subprocess.run(
        [
            hadolint(),
            "--no-color",
            "--format",
            "json",
            "--failure-threshold",
            "style",
            str(DOCKERFILE),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert json.loads(result.stdout or "[]") == [], result.stdout
    assert result.returncode == 0, result.stderr


def test_hadolint_is_not_vacuous(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get install gcc\nUSER root\n")
    result = subprocess.run(
        [hadolint(), "--no-color", "--format", "json", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    codes = {finding["code"] for finding in json.loads(result.stdout)}
    assert {"DL3007", "DL3002"} <= codes, codes


# --- building it (opt in: TRUSTMGR_IMAGE_BUILD=1, with buildah and debootstrap) ------------
#
# The pinned base comes from a container registry these machines cannot reach; Debian's
# package mirror they can. The build therefore runs against a stand-in base made here from
# Debian bookworm's python3.11, given as the Dockerfile's PYTHON_IMAGE build argument: every
# step of the Dockerfile runs as written. Two minutes or so, most of it downloads.


def _buildah(*args: str, timeout: float = 900) -> str:
    result = subprocess.run(
        ["buildah", "--storage-driver", "vfs", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.skipif(
    os.environ.get("TRUSTMGR_IMAGE_BUILD") != "1"
    or not (shutil.which("buildah") and shutil.which("debootstrap"))
    or os.geteuid() != 0,
    reason="builds the image: set TRUSTMGR_IMAGE_BUILD=1, as root, with buildah and debootstrap",
)
def test_image_builds_and_runs(tmp_path: Path) -> None:
    rootfs = tmp_path / "rootfs"
    subprocess.run(
        [
            "debootstrap",
            "--variant=minbase",
            "--include=python3,python3-venv,python3-pip,python-is-python3,ca-certificates",
            "bookworm",
            str(rootfs),
            "http://deb.debian.org/debian",
        ],
        capture_output=True,
        check=True,
        timeout=900,
    )
    (rootfs / "usr/lib/python3.11/EXTERNALLY-MANAGED").unlink(missing_ok=True)  # as python:slim
    base = _buildah("from", "scratch").strip()
    try:
        mount = _buildah("mount", base).strip()
        subprocess.run(["cp", "-a", f"{rootfs}/.", mount], check=True)
        _buildah("config", "--env", "PATH=/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", base)
        _buildah("commit", "-q", base, "localhost/trustmgr-test-base:3.11")
    finally:
        _buildah("rm", base)
    # pip inside the build trusts what this machine's pip trusts (a proxy's CA, say).
    pip_conf = tmp_path / "pip.conf"
    bundle = os.environ.get("PIP_CERT", "/etc/ssl/certs/ca-certificates.crt")
    pip_conf.write_text(f"[global]\ncert = {bundle}\n")
    _buildah(
        "bud",
        "--isolation",
        "chroot",
        "--build-arg",
        "PYTHON_IMAGE=localhost/trustmgr-test-base:3.11",
        "--volume",
        f"{pip_conf}:/etc/pip.conf:ro",
        "--volume",
        f"{bundle}:{bundle}:ro",
        "-t",
        "localhost/trustmgr:test",
        str(REPO),
    )
    container = _buildah("from", "--pull=never", "localhost/trustmgr:test").strip()
    try:
        version = _buildah("run", "--isolation", "chroot", container, "--", "trustmgr", "--version")
        assert version.strip() == f"trustmgr, version {__version__}"
        probe = "id -u; id -g; command -v gcc cc pip || true"
        assert _buildah(
            "run", "--isolation", "chroot", container, "--", "sh", "-c", probe
        ).split() == [
            str(IMAGE_USER),
            str(IMAGE_USER),
        ]
    finally:
        _buildah("rm", container)
        _buildah("rmi", "localhost/trustmgr:test", "localhost/trustmgr-test-base:3.11")
