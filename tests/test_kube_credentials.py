"""Kubeconfigs and their credentials, as the official client gets them from trustmgr:
merged files, files named relative to each kubeconfig, and credential plugins, whose
output never reaches trustmgr's output."""

# The fixtures are imported, so this module runs without conftest wiring; pytest injects them as
# parameters of the same names, which pyflakes would call unused imports and redefinitions.
# ruff: noqa: F401, F811

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.kube_fixtures import kube_emulator_factory
from tests.test_kubernetes_target import Fleet, fleet, ok, run
from trustmgr.targets import kubeapi

REPO = Path(__file__).resolve().parent.parent
FAKE_TOKEN = "tkn-9f2c4e7a1b"
"""Short enough that no base64 scrubbing would catch it: only keeping plugin output
out of every message does."""


def write_plugin(path: Path, script: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def use_plugin(kubeconfig: Path, user: str, command: str) -> None:
    """Make ``user`` of ``kubeconfig`` get its credentials from the plugin ``command``."""
    text = yaml.safe_load(kubeconfig.read_text())
    for entry in text["users"]:
        if entry["name"] == user:
            entry["user"] = {
                "exec": {
                    "apiVersion": "client.authentication.k8s.io/v1",
                    "command": command,
                    "interactiveMode": "Never",
                }
            }
    kubeconfig.write_text(yaml.safe_dump(text))


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """trustmgr as its own process, so that its logging goes where a user sees it."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "trustmgr", *args, "-c", str(config), "bootstrap"],
        capture_output=True,
        text=True,
        cwd=config.parent,
        env=env,
        timeout=120,
        check=False,
    )


# --- merged kubeconfigs -----------------------------------------------------------------------


def test_files_named_relative_to_each_kubeconfig_are_found_next_to_it(tmp_path: Path) -> None:
    def kubeconfig(directory: Path, name: str, **user: Any) -> Path:
        directory.mkdir()
        path = directory / "config"
        value = {
            "current-context": name,
            "clusters": [
                {"name": name, "cluster": {"server": "https://x", "certificate-authority": "ca"}}
            ],
            "users": [{"name": name, "user": user}],
            "contexts": [{"name": name, "context": {"cluster": name, "user": name}}],
        }
        path.write_text(yaml.safe_dump(value))
        return path

    first = kubeconfig(tmp_path / "a", "east", **{"client-key": "k", "tokenFile": "/abs/t"})
    second = kubeconfig(tmp_path / "b", "west", exec={"command": "bin/get-token"})
    other = kubeconfig(tmp_path / "c", "east", exec={"command": "aws"})  # east again: ignored
    loaded = kubeapi.kubeconfig(os.pathsep.join(map(str, (first, second, other))))

    assert loaded.current_context == "east"
    east = loaded.only("east")
    assert east["clusters"][0]["cluster"]["certificate-authority"] == str(tmp_path / "a" / "ca")
    assert east["users"][0]["user"] == {
        "client-key": str(tmp_path / "a" / "k"),
        "tokenFile": "/abs/t",
    }
    west = loaded.only("west")
    assert west["clusters"][0]["cluster"]["certificate-authority"] == str(tmp_path / "b" / "ca")
    assert west["users"][0]["user"]["exec"]["command"] == str(tmp_path / "b" / "bin" / "get-token")
    alone = kubeapi.kubeconfig(str(other)).only("east")
    assert alone["users"][0]["user"]["exec"]["command"] == "aws"  # a bare name is looked up


def test_a_credential_plugin_named_relative_to_the_kubeconfig_signs_in(
    fleet: Callable[..., Fleet],
) -> None:
    f = fleet("c0", token="s3cret-token")
    config = f.configure()
    token = '{"apiVersion": "client.authentication.k8s.io/v1", "kind": "ExecCredential", '
    token += '"status": {"token": "s3cret-token"}}'
    write_plugin(f.workdir / "bin" / "get-token", f"echo '{token}'\n")
    use_plugin(f.workdir / "kubeconfig", "c0", "./bin/get-token")
    ok(config, "bootstrap")
    assert f.secret("c0") is not None


# --- plugin output stays out of every message -------------------------------------------------


@pytest.mark.parametrize("flags", [(), ("-v",), ("-vv", "--debug")], ids=["default", "-v", "-vv"])
def test_a_failing_credential_plugin_is_named_without_its_output(
    flags: tuple[str, ...], fleet: Callable[..., Fleet]
) -> None:
    f = fleet("c0", "c1", token="s3cret-token")
    config = f.configure()
    plugin = write_plugin(
        f.workdir / "get-token",
        f'echo "error: token {FAKE_TOKEN} was revoked" >&2\necho "{FAKE_TOKEN}"\nexit 1\n',
    )
    use_plugin(f.workdir / "kubeconfig", "c0", str(plugin))
    use_plugin(f.workdir / "kubeconfig", "c1", "/bin/true")  # a plugin answering nothing

    result = cli(config, *flags)
    assert result.returncode == 1
    assert FAKE_TOKEN not in result.stdout + result.stderr
    assert (
        f"failed        c0: context c0: the kubeconfig's credential plugin {plugin} exited "
        "with status 1; run it by hand to see why"
    ) in result.stderr
    assert (
        "failed        c1: context c1: the kubeconfig's credential plugin /bin/true printed "
        "no ExecCredential JSON; run it by hand to see why"
    ) in result.stderr
    assert f.emulators["c0"].count() == 0  # nothing is sent without credentials


def test_a_failing_credential_plugin_in_process_output(fleet: Callable[..., Fleet]) -> None:
    f = fleet("c0", token="s3cret-token")
    config = f.configure()
    plugin = write_plugin(f.workdir / "get-token", f'echo "{FAKE_TOKEN}" >&2\nexit 3\n')
    use_plugin(f.workdir / "kubeconfig", "c0", str(plugin))
    planned = run(config, "plan")
    assert FAKE_TOKEN not in planned.out + planned.err
    assert f"credential plugin {plugin} exited with status 3" in planned.out + planned.err
