"""``trustmgr bootstrap`` of this checkout against an earlier release, side by side.

Both sides run from the same virtual environment (``.venv``, made by
``scripts/setup``): the baseline's source is exported with ``git archive`` into a
temporary directory and put first on ``PYTHONPATH``. Runs alternate between the
two sides, so a change in background load hits both alike. Each run starts
from an empty directory and an empty state and is timed as a whole process
(interpreter start included); then a re-run on the converged result, which must
change nothing, is timed too. Prints a Markdown table of medians, with min and max.

Run through ``scripts/bench-release``.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PASSPHRASE_ENV = "TRUSTMGR_BENCH_PASSPHRASE"


def _config(clusters: int) -> str:
    lines = [
        "stateStore: {file: {path: state}}",
        "providers:",
        "  corp:",
        f"    selfSigned: {{passphraseEnv: {PASSPHRASE_ENV}}}",
        "meshes:",
        "  bench:",
        "    trustDomain: bench.example",
        "    provider: corp",
        "    clusters:",
    ]
    lines += [f"      c-{i:04d}: {{directory: {{path: out/c-{i:04d}}}}}" for i in range(clusters)]
    return "\n".join(lines) + "\n"


def _export(ref: str, into: Path) -> Path:
    """The source of ``ref``, as files under ``into``."""
    into.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", ref], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def _timed(source: Path, workdir: Path, env: dict[str, str]) -> float:
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "trustmgr", "-c", "trustmgr.yaml", "bootstrap"],
        cwd=workdir,
        env={**env, "PYTHONPATH": str(source)},
        capture_output=True,
        text=True,
    )
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"bootstrap failed in {workdir}: {result.stderr.strip()}")
    return elapsed


def _run(source: Path, root: Path, clusters: int, env: dict[str, str]) -> tuple[float, float]:
    """One fresh bootstrap and one converged re-run: their wall clock."""
    workdir = Path(tempfile.mkdtemp(dir=root))
    (workdir / "trustmgr.yaml").write_text(_config(clusters))
    try:
        return _timed(source, workdir, env), _timed(source, workdir, env)
    finally:
        shutil.rmtree(workdir)


def _cell(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} s ({min(values):.2f}–{max(values):.2f} s)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--baseline", default="98c6a56", help="git ref of the earlier release (default: 0.1.0)"
    )
    parser.add_argument("--clusters", type=int, default=100)
    parser.add_argument("--runs", type=int, default=7, help="runs per side")
    args = parser.parse_args()
    env = {
        "PATH": "/usr/bin:/bin",
        PASSPHRASE_ENV: "bench passphrase",
        "PYTHONDONTWRITEBYTECODE": "",
    }
    with tempfile.TemporaryDirectory(prefix="trustmgr-bench-") as tmp:
        root = Path(tmp)
        sides = {"this checkout": REPO, args.baseline: _export(args.baseline, root / "baseline")}
        for source in sides.values():  # compile bytecode once, as an installed package has it
            _run(source, root, 1, env)
        fresh: dict[str, list[float]] = {name: [] for name in sides}
        rerun: dict[str, list[float]] = {name: [] for name in sides}
        for i in range(args.runs):
            for name, source in sides.items():
                first, again = _run(source, root, args.clusters, env)
                fresh[name].append(first)
                rerun[name].append(again)
                print(
                    f"run {i + 1}/{args.runs} {name}: {first:.2f} s, re-run {again:.2f} s",
                    file=sys.stderr,
                )
    base, this = args.baseline, "this checkout"
    print(f"| {args.clusters} clusters, {args.runs} runs each | {this} | {base} | ratio |")
    print("|---|---|---|---:|")
    for label, table in (("bootstrap from empty", fresh), ("converged re-run", rerun)):
        ratio = statistics.median(table[this]) / statistics.median(table[base])
        print(f"| {label} | {_cell(table[this])} | {_cell(table[base])} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
