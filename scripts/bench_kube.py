"""Benchmark ``trustmgr bootstrap`` against many emulated Kubernetes clusters.

Each run starts N emulated API servers in this process (``tests/kube_emulator.py``),
each adding L seconds of latency to every request, writes one merged kubeconfig and a
trustmgr.yaml with one mesh of N clusters (one self-signed provider, one context per
cluster), then times, in-process through the CLI's ``main``:

* ``bootstrap`` from nothing: the whole pass (plan, root, N cluster CAs, N secrets, state);
* ``bootstrap`` again, converged: it must make no write and at most one read per cluster
  (checked with the emulators' request counters);

with the default workers, and with ``--workers 1`` as the one-at-a-time baseline on fresh
clusters. Imports are warmed before timing (a CLI process would pay them once). Several
runs; the median is reported in a Markdown table.

Run through ``scripts/bench-kube`` (it creates .venv first). ``--quick`` is a smoke run.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.kube_emulator import KubeEmulator, merge_kubeconfigs, start_many, stop_many  # noqa: E402
from trustmgr.cli import main  # noqa: E402
from trustmgr.targets import kubernetes as _warm_imports  # noqa: E402, F401

PASSPHRASE_ENV = "TRUSTMGR_BENCH_PASSPHRASE"


@dataclass(frozen=True)
class Timing:
    bootstrap: float
    noop: float
    noop_reads: int
    noop_writes: int


def write_config(directory: Path, emulators: Sequence[KubeEmulator]) -> Path:
    names = [f"cluster-{i:03d}" for i in range(len(emulators))]
    kubeconfig = directory / "kubeconfig"
    merged = merge_kubeconfigs(e.kubeconfig(n) for n, e in zip(names, emulators, strict=True))
    kubeconfig.write_text(yaml.safe_dump(merged))
    config = {
        "stateStore": {"file": {"path": str(directory / "state")}},
        "providers": {
            "corp": {
                "selfSigned": {
                    "subject": {"commonName": "Bench Root CA"},
                    "passphraseEnv": PASSPHRASE_ENV,
                }
            }
        },
        "meshes": {
            "bench": {
                "trustDomain": "bench.example",
                "provider": "corp",
                "clusters": {
                    n: {"kubernetes": {"kubeconfig": str(kubeconfig), "context": n}} for n in names
                },
            }
        },
    }
    path = directory / "trustmgr.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def trustmgr(*args: str) -> float:
    """Run the CLI in-process, output discarded; seconds taken. Fails on a non-zero exit."""
    out, err = io.StringIO(), io.StringIO()
    began = time.perf_counter()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(list(args))
        except SystemExit as exc:
            code = int(exc.code or 0)
    took = time.perf_counter() - began
    if code != 0:
        raise SystemExit(f"trustmgr {' '.join(args)} exited {code}:\n{err.getvalue()[-2000:]}")
    return took


def one_run(clusters: int, latency: float, workers: int) -> Timing:
    emulators = start_many(clusters, latency=latency)
    try:
        with tempfile.TemporaryDirectory(prefix="trustmgr-bench-kube-") as tmp:
            config = write_config(Path(tmp), emulators)
            flags = ("-c", str(config), "bootstrap", "--workers", str(workers))
            bootstrap = trustmgr(*flags)
            missing = [i for i, e in enumerate(emulators) if e.count("create", "secrets") != 1]
            if missing:
                raise SystemExit(f"clusters without exactly one create: {missing[:10]}")
            for emulator in emulators:
                emulator.reset_counters()
            noop = trustmgr(*flags)
            reads = max(e.reads for e in emulators)
            writes = sum(e.writes for e in emulators)
            if writes or reads > 1:
                raise SystemExit(f"no-op pass: {writes} writes, up to {reads} reads per cluster")
            return Timing(bootstrap, noop, reads, writes)
    finally:
        stop_many(emulators)


def startup() -> float:
    """Seconds a fresh interpreter takes to import the CLI and the Kubernetes target:
    what a ``trustmgr`` process pays once, on top of the pass timed in-process."""
    code = "import trustmgr.cli, trustmgr.targets.kubernetes"
    began = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
    return time.perf_counter() - began


def median(values: Sequence[float]) -> str:
    return f"{statistics.median(values):.2f} s"


def spread(values: Sequence[float]) -> str:
    return f"{min(values):.2f}–{max(values):.2f}"


def main_bench(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clusters", type=int, default=200)
    parser.add_argument("--latency", type=float, default=0.05, help="seconds per request")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workers", type=int, default=32, help="the parallel side's workers")
    parser.add_argument("--no-baseline", action="store_true", help="skip --workers 1")
    parser.add_argument("--quick", action="store_true", help="20 clusters, 1 run")
    args = parser.parse_args(argv)
    if args.quick:
        args.clusters, args.runs = 20, 1
    os.environ.setdefault(PASSPHRASE_ENV, "bench passphrase")
    sides = [("parallel", args.workers)] + ([] if args.no_baseline else [("one at a time", 1)])
    results: dict[str, list[Timing]] = {name: [] for name, _ in sides}
    for run in range(args.runs):
        for name, workers in sides:
            timing = one_run(args.clusters, args.latency, workers)
            results[name].append(timing)
            print(
                f"run {run + 1}/{args.runs} {name} (--workers {workers}): bootstrap "
                f"{timing.bootstrap:.2f} s, no-op {timing.noop:.2f} s",
                file=sys.stderr,
            )
    print(
        f"\n{args.clusters} emulated clusters, {args.latency * 1000:.0f} ms added per request, "
        f"median of {args.runs} run(s); Python {platform.python_version()}, "
        f"{os.cpu_count()} cores\n"
    )
    print("| pass | workers | bootstrap | no-op bootstrap | no-op requests per cluster |")
    print("|---|---|---|---|---|")
    for name, workers in sides:
        timings = results[name]
        boot = [t.bootstrap for t in timings]
        noop = [t.noop for t in timings]
        print(
            f"| {name} | {workers} | {median(boot)} ({spread(boot)}) | "
            f"{median(noop)} ({spread(noop)}) | ≤{max(t.noop_reads for t in timings)} read, "
            f"{sum(t.noop_writes for t in timings)} writes |"
        )
    if not args.no_baseline:
        base = statistics.median(t.bootstrap for t in results["one at a time"])
        fast = statistics.median(t.bootstrap for t in results["parallel"])
        print(f"\nbootstrap speed-up over one at a time: {base / fast:.1f}×")
    cold = statistics.median(startup() for _ in range(3))
    print(f"a trustmgr process also pays {cold:.2f} s once for interpreter start and imports")


if __name__ == "__main__":
    main_bench()
