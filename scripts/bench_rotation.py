"""Benchmark a full root rotation of many emulated Kubernetes clusters.

Each run starts N emulated API servers (``tests/kube_emulator.py``) in a separate process,
as real API servers would be, each adding L seconds of latency to every request; writes
one merged kubeconfig and a trustmgr.yaml with one mesh of N clusters (one self-signed
provider, istiod with ``multiRoot``, ``rotation: {soak: 0s, canary: 1}``) and bootstraps
it (not timed). Then it times, in-process through the CLI's ``main``, the whole rotation
as an operator runs it: ``rotate start``, then ``reconcile`` passes until one reports
that old-removed converged (prepared → trust-distributed → issuer-switched, canary then
the rest → old-removed → done), and each of those commands.

A run counts only if, afterwards, ``rotate status`` shows no rotation, every cluster's CA
chains to one new root, every ``root-cert.pem`` holds that root alone, each cluster's
cacerts was written exactly three times (new root added, CA under the new root, old root
removed), each of those writes contained the previous ``root-cert.pem`` or sat inside it
(istiod's multi-root rule, read from the emulators' write logs), and istiod's load checks
pass on every cluster.

Every ``--workers`` value given (default: the CLI's 32, and 16) and the one-at-a-time
baseline (``--workers 1``) run in the same invocation, alternating; the baseline sends
one request at a time, so it gets fewer runs (``--baseline-runs``). Imports are warmed
before timing; the cost of starting a process for each command is measured apart.
Medians, in a Markdown table on stdout; progress on stderr.

Run through ``scripts/bench-rotation`` (it creates .venv first). ``--quick`` is a smoke run.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import multiprocessing
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.kube_emulator import KubeEmulator, merge_kubeconfigs, start_many, stop_many  # noqa: E402
from trustmgr.bundles import TrustBundle, fingerprint, load_certificates  # noqa: E402
from trustmgr.cli import main  # noqa: E402
from trustmgr.pki import CACERTS_FILES, CACerts, istiod_problems  # noqa: E402
from trustmgr.targets import kubernetes as _warm_imports  # noqa: E402, F401

PASSPHRASE_ENV = "TRUSTMGR_BENCH_PASSPHRASE"
NS, SECRET, PROVIDER = "istio-system", "cacerts", "corp"
STEPS = (
    "`rotate start`",
    "pass 1: → trust-distributed",
    "pass 2: → issuer-switched, the canary",
    "pass 3: issuer-switched, the rest",
    "pass 4: → old-removed",
    "pass 5: → done",
)
GOAL = 10.0
"""Seconds for the whole rotation of 200 clusters at 50 ms per request."""


# --- the emulated clusters, in their own process -----------------------------------------------


def names(clusters: int) -> list[str]:
    return [f"cluster-{i:03d}" for i in range(clusters)]


def material(obj: dict[str, Any]) -> CACerts:
    data = obj.get("data") or {}
    return CACerts.from_files({n: base64.b64decode(data.get(n, "")) for n in CACERTS_FILES})


def chain_root(m: CACerts) -> str:
    return fingerprint(load_certificates(m.cert_chain, "cert-chain.pem")[-1])


def rotation_problem(emulators: Sequence[KubeEmulator], start: list[int]) -> str | None:
    """Why the rotation did not end as it must, from the write logs; None if it did.
    ``start``: each cluster's count of cacerts writes when the rotation started."""
    now = datetime.now(UTC)
    roots = set()
    for name, emulator, before in zip(names(len(emulators)), emulators, start, strict=True):
        writes = emulator.writes_of("secrets", NS, SECRET)
        if len(writes) - before != 3:
            return f"{name}: {len(writes) - before} writes of its cacerts, not 3"
        old_root = chain_root(material(writes[before - 1].object or {}))
        for old, new in zip(writes[before - 1 :], writes[before:], strict=False):
            a, b = material(old.object or {}).root_cert, material(new.object or {}).root_cert
            if a not in b and b not in a:
                return f"{name}: a root-cert.pem that istiod cannot hot-reload"
        final = material(writes[-1].object or {})
        root = chain_root(final)
        roots.add(root)
        bundle = TrustBundle.from_pem(final.root_cert, "root-cert.pem").fingerprints
        if root == old_root or bundle != (root,) or istiod_problems(final, now=now):
            return f"{name} did not end under the new root alone"
    if len(roots) != 1:
        return f"the clusters ended under {len(roots)} different roots"
    return None


def serve(conn: Connection, clusters: int, latency: float, kubeconfig: str) -> None:
    """The emulated API servers, answering ``mark`` (the rotation starts now) and
    ``check`` (whether it ended as it must) over ``conn`` until ``stop``."""
    emulators = start_many(clusters, latency=latency)
    try:
        pairs = zip(names(clusters), emulators, strict=True)
        merged = merge_kubeconfigs(e.kubeconfig(n) for n, e in pairs)
        Path(kubeconfig).write_text(yaml.safe_dump(merged))
        conn.send("ready")
        start: list[int] = []
        cpu = 0.0
        while (command := conn.recv()) != "stop":
            if command == "mark":
                start = [len(e.writes_of("secrets", NS, SECRET)) for e in emulators]
                for emulator in emulators:
                    emulator.reset_counters()
                cpu = own_cpu()
                conn.send(None)
            elif command == "check":
                took = own_cpu() - cpu  # before the checks below
                conn.send(
                    {
                        "problem": rotation_problem(emulators, start),
                        "requests": sum(len(e.requests) for e in emulators),
                        "cpu": took,
                    }
                )
    finally:
        stop_many(emulators)


# --- trustmgr, timed ------------------------------------------------------------------------


@dataclass(frozen=True)
class Timing:
    total: float
    steps: tuple[float, ...]
    """``rotate start``, then each reconcile pass."""
    requests: int
    """Requests the rotation sent to all clusters together."""
    others: float | None
    """Cores other processes kept busy meanwhile."""


def write_config(directory: Path, clusters: int, kubeconfig: Path) -> Path:
    config = {
        "stateStore": {"file": {"path": str(directory / "state")}},
        "rotation": {"soak": "0s", "canary": 1},
        "providers": {
            PROVIDER: {
                "selfSigned": {
                    "subject": {"commonName": "Bench Root CA"},
                    "passphraseEnv": PASSPHRASE_ENV,
                }
            }
        },
        "meshes": {
            "bench": {
                "trustDomain": "bench.example",
                "provider": PROVIDER,
                "clusters": {
                    n: {
                        "kubernetes": {"kubeconfig": str(kubeconfig), "context": n},
                        "istio": {"multiRoot": True},
                    }
                    for n in names(clusters)
                },
            }
        },
    }
    path = directory / "trustmgr.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def trustmgr(*args: str) -> tuple[float, str]:
    """Run the CLI in-process; seconds taken and stdout. Fails on a non-zero exit."""
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
    return took, out.getvalue()


def machine_busy() -> float | None:
    """Busy CPU seconds of every core since boot, from /proc/stat (Linux)."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return None
    ticks = [int(v) for v in fields[1:9]]  # user nice system idle iowait irq softirq steal
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def own_cpu() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    return own.ru_utime + own.ru_stime


def one_run(clusters: int, latency: float, workers: int) -> Timing:
    with tempfile.TemporaryDirectory(prefix="trustmgr-bench-rotation-") as tmp:
        kubeconfig = Path(tmp) / "kubeconfig"
        ours, theirs = multiprocessing.get_context("spawn").Pipe()
        server = multiprocessing.get_context("spawn").Process(
            target=serve, args=(theirs, clusters, latency, str(kubeconfig)), daemon=True
        )
        server.start()
        try:
            if not ours.poll(120) or ours.recv() != "ready":
                raise SystemExit("the emulated clusters did not start")
            config = str(write_config(Path(tmp), clusters, kubeconfig))
            trustmgr("-c", config, "bootstrap", "--workers", str(max(workers, 16)))
            ours.send("mark")
            ours.recv()
            cpu, busy = own_cpu(), machine_busy()
            began = time.perf_counter()
            steps = [trustmgr("-c", config, "rotate", "start", "--provider", PROVIDER)[0]]
            while True:
                took, out = trustmgr("-c", config, "reconcile", "--workers", str(workers))
                steps.append(took)
                if "old-removed converged" in out:
                    break
                if len(steps) > len(STEPS) + 2:
                    raise SystemExit(f"no end after {len(steps) - 1} passes:\n{out[-2000:]}")
            total = time.perf_counter() - began
            cpu, after = own_cpu() - cpu, machine_busy()
            ours.send("check")
            check = ours.recv()
            if check["problem"]:
                raise SystemExit(f"--workers {workers}: {check['problem']}")
            if json.loads(trustmgr("-c", config, "rotate", "status", "-o", "json")[1]):
                raise SystemExit(f"--workers {workers}: the rotation did not finish")
            others = None
            if busy is not None and after is not None:
                others = max(0.0, after - busy - cpu - check["cpu"]) / total
            return Timing(total, tuple(steps), check["requests"], others)
        finally:
            ours.send("stop")
            server.join(60)


def startup() -> float:
    """Seconds a fresh interpreter takes to import the CLI and the Kubernetes target:
    what each ``trustmgr`` command run as a process pays, on top of what is timed here."""
    code = "import trustmgr.cli, trustmgr.targets.kubernetes"
    began = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
    return time.perf_counter() - began


def seconds(values: Sequence[float]) -> str:
    middle = statistics.median(values)
    if len(values) == 1:
        return f"{middle:.2f} s"
    return f"{middle:.2f} s ({min(values):.2f}–{max(values):.2f})"


def main_bench(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clusters", type=int, default=200)
    parser.add_argument("--latency", type=float, default=0.05, help="seconds per request")
    parser.add_argument("--runs", type=int, default=5, help="runs of each parallel side")
    parser.add_argument("--baseline-runs", type=int, default=1, help="runs of --workers 1")
    parser.add_argument(
        "--workers", default="32,16", help="the parallel sides' workers, comma-separated"
    )
    parser.add_argument("--quick", action="store_true", help="20 clusters, 1 run each")
    parser.add_argument("--check-goal", action="store_true", help=f"exit 1 above {GOAL:.0f} s")
    args = parser.parse_args(argv)
    if args.quick:
        args.clusters, args.runs, args.baseline_runs = 20, 1, 1
    os.environ.setdefault(PASSPHRASE_ENV, "bench passphrase")
    sides = [(int(w), args.runs) for w in args.workers.split(",")]
    sides += [(1, args.baseline_runs)] if args.baseline_runs else []
    results: dict[int, list[Timing]] = {w: [] for w, _ in sides}
    began = time.perf_counter()
    for run in range(max(runs for _, runs in sides)):
        for workers, runs in sides:
            if run >= runs:
                continue
            timing = one_run(args.clusters, args.latency, workers)
            results[workers].append(timing)
            steps = ", ".join(f"{s:.2f}" for s in timing.steps)
            print(
                f"run {run + 1}/{runs} --workers {workers}: rotation {timing.total:.2f} s "
                f"(steps: {steps}); other processes {timing.others or 0:.2f} cores",
                file=sys.stderr,
            )
    took = time.perf_counter() - began
    cold = statistics.median(startup() for _ in range(3))
    others = [t.others for ts in results.values() for t in ts if t.others is not None]
    print(
        f"\nA root rotation of {args.clusters} emulated Kubernetes clusters, "
        f"{args.latency * 1000:.0f} ms added per request, soak 0, canary 1: median (min–max); "
        f"Python {platform.python_version()}, {os.cpu_count()} cores; other processes kept "
        f"{min(others, default=0):.2f}–{max(others, default=0):.2f} cores busy; "
        f"{took / 60:.1f} minutes in all\n"
    )
    head = " | ".join(f"`--workers {w}` ({n} run{'s' * (n > 1)})" for w, n in sides)
    print(f"| step | {head} |")
    print("|---" + "|---:" * len(sides) + "|")
    for i, step in enumerate(STEPS):
        cells = " | ".join(seconds([t.steps[i] for t in results[w]]) for w, _ in sides)
        print(f"| {step} | {cells} |")
    totals = " | ".join(f"**{seconds([t.total for t in results[w]])}**" for w, _ in sides)
    print(f"| **whole rotation** | {totals} |")
    requests = " | ".join(
        str(int(statistics.median(t.requests for t in results[w]))) for w, _ in sides
    )
    print(f"| requests to the API servers | {requests} |")
    medians = {w: statistics.median(t.total for t in results[w]) for w, _ in sides}
    if 1 in medians:
        for workers, _ in sides[:-1]:
            print(
                f"\n`--workers {workers}`: {medians[1] / medians[workers]:.1f}× faster than "
                "one at a time",
                end="",
            )
        print()
    print(
        f"\nEach of the {len(STEPS)} commands run as its own process also pays {cold:.2f} s "
        "for interpreter start and imports."
    )
    best = min(medians[w] for w, _ in sides if w != 1)
    if args.clusters == 200 and args.latency == 0.05:
        for workers, _ in sides:
            if workers != 1:
                verdict = "met" if medians[workers] < GOAL else "missed"
                print(f"goal, under {GOAL:.0f} s, with `--workers {workers}`: {verdict}")
    if args.check_goal and best >= GOAL:
        raise SystemExit(1)


if __name__ == "__main__":
    main_bench()
