"""Rollback on a directory target: the replaced set is kept beside the current one."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import trustmgr
from tests.test_bootstrap import bootstrapped, material


def test_rollback_swaps_back_the_previous_set(quickstart: Path, workdir: Path) -> None:
    bootstrapped(quickstart)
    directory = workdir / "out" / "web-east"
    first = material(directory)
    assert "no previous cacerts is kept" in trustmgr("rollback", "--cluster", "web-east").err
    quickstart.write_text(
        quickstart.read_text().replace("keyAlgorithm: ECDSA_P256", "keyAlgorithm: ECDSA_P384")
    )
    bootstrapped(quickstart)
    second = material(directory)
    assert second.ca_cert != first.ca_cert

    run = trustmgr("-c", str(quickstart), "rollback", "--cluster", "web-east")
    assert run.code == 0, run.err
    assert material(directory) == first
    status = {
        r["cluster"]: r
        for r in json.loads(trustmgr("-c", str(quickstart), "status", "-o", "json").out)
    }
    assert status["web-east"]["drift"] is None
    assert trustmgr("-c", str(quickstart), "verify").code == 0
    assert trustmgr("-c", str(quickstart), "rollback", "--cluster", "web-east").code == 0
    assert material(directory) == second
    # only the current set and the one before it are kept
    kept = [p for p in directory.iterdir() if p.name.startswith("..2")]
    assert len(kept) == 2
