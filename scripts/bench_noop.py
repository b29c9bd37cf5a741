"""A pass with nothing to do, on many directory clusters: what the daemon pays
every few minutes, side by side with a converged re-run of an earlier release.

Measured, after one bootstrap of ``--clusters`` directory clusters:

* daemon pass: ``Daemon.run_pass`` in one process, passes 2..N (the first pass
  of a process parses every cluster's material; later ones reuse what they
  parsed while it is unchanged);
* reconcile: ``trustmgr reconcile`` as a process, interpreter start included;
* the baseline: ``trustmgr bootstrap`` of ``--baseline`` (default 0.1.0) on
  the same converged directories, as a process.

Run through ``scripts/bench-noop``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scripts.bench_release import PASSPHRASE_ENV, REPO, _config, _export


def _process(source: Path, workdir: Path, command: str, env: dict[str, str]) -> float:
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "trustmgr", "-c", "trustmgr.yaml", command],
        cwd=workdir,
        env={**env, "PYTHONPATH": str(source)},
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise SystemExit(f"{command} failed: {result.stderr.strip()}")
    return time.perf_counter() - started


def _cell(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} s ({min(values):.2f}–{max(values):.2f} s)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--baseline", default="98c6a56")
    args = parser.parse_args()
    env = {"PATH": "/usr/bin:/bin", PASSPHRASE_ENV: "bench passphrase"}
    os.environ[PASSPHRASE_ENV] = env[PASSPHRASE_ENV]
    with tempfile.TemporaryDirectory(prefix="trustmgr-noop-") as tmp:
        root = Path(tmp)
        baseline = _export(args.baseline, root / "baseline")
        workdir, older = root / "fleet", root / "fleet-baseline"
        for directory, source in ((workdir, REPO), (older, baseline)):
            directory.mkdir()
            (directory / "trustmgr.yaml").write_text(_config(args.clusters))
            _process(source, directory, "bootstrap", env)
        os.chdir(workdir)
        from trustmgr import config as config_mod
        from trustmgr.daemon import Daemon
        from trustmgr.workspace import Workspace

        config = config_mod.load(workdir / "trustmgr.yaml")

        def now() -> datetime:
            return datetime.now(UTC)

        daemon = Daemon(config, clock=now, workspace=lambda: Workspace.build(config, clock=now))
        passes, reconciles, baselines = [], [], []
        daemon.run_pass()
        for i in range(args.runs):
            started = time.perf_counter()
            report = daemon.run_pass()
            passes.append(time.perf_counter() - started)
            assert report is not None and not report.changed
            reconciles.append(_process(REPO, workdir, "reconcile", env))
            baselines.append(_process(baseline, older, "bootstrap", env))
            print(
                f"run {i + 1}/{args.runs}: daemon pass {passes[-1]:.2f} s, reconcile "
                f"{reconciles[-1]:.2f} s, {args.baseline} {baselines[-1]:.2f} s",
                file=sys.stderr,
            )
    print(f"| {args.clusters} converged directory clusters, {args.runs} runs | median (min–max) |")
    print("|---|---|")
    print(f"| daemon pass (this checkout, in one process) | {_cell(passes)} |")
    print(f"| `trustmgr reconcile` (this checkout, a process) | {_cell(reconciles)} |")
    print(f"| `trustmgr bootstrap` of {args.baseline} (a process) | {_cell(baselines)} |")


if __name__ == "__main__":
    main()
