"""Benchmark ``trustmgr bootstrap`` against Istio's ``tools/certs`` openssl procedure.

Two scenarios, each timed from an empty directory and an empty state on every run:

* defaults: N clusters (100) bootstrapped by trustmgr with its defaults (ECDSA P-256
  root and cluster CAs) against the same N clusters made with the openssl commands of
  Istio's ``tools/certs/Makefile.selfsigned.mk`` + ``common.mk`` (RSA-4096 root and
  intermediates, what that procedure uses);
* RSA-4096 on both sides: M clusters (20), trustmgr with an RSA-4096 root and RSA-4096
  cluster CAs.

Both sides are timed as the wall clock of a whole process tree (``trustmgr bootstrap``
including interpreter start; a shell running the openssl commands), and both get every
core: trustmgr signs clusters in its own thread pool, the openssl per-cluster steps run
``--jobs`` at a time under ``xargs -P`` (the Makefile itself is serial, and ``make -j2``
is not parallel-safe). Prints a Markdown table; see docs/benchmarks.md.

Run through ``scripts/bench`` (it creates .venv first). ``--quick`` is a smoke run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cryptography
from cryptography import x509
from cryptography.hazmat.backends.openssl.backend import backend as openssl_backend
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

REPO = Path(__file__).resolve().parent.parent
TRUSTMGR = REPO / ".venv" / "bin" / "trustmgr"
PASSPHRASE_ENV = "TRUSTMGR_BENCH_PASSPHRASE"
TRUST_DOMAIN = "bench.example"

# Istio tools/certs (common.mk): ROOTCA_DAYS, INTERMEDIATE_DAYS, *_KEYSZ, *_ORG, *_CN,
# INTERMEDIATE_SAN_DNS. Validity has no effect on the time taken.
ROOTCA_DAYS = 3650
INTERMEDIATE_DAYS = 3650
KEYSZ = 4096

# The per-target recipes of Makefile.selfsigned.mk and the conf files of common.mk, as
# the shell commands make runs for `make root-ca` then `make <cluster>-cacerts`. The
# conf files are written with one heredoc instead of make's one shell per `echo` line,
# which can only make the openssl side faster. The one change for parallelism: the
# signing step holds a lock on the root's serial file (-CAcreateserial reads and
# rewrites root-cert.srl, which two concurrent signers would corrupt).
ROOT_SCRIPT = f"""\
#!/bin/sh
# Istio tools/certs: `make -f Makefile.selfsigned.mk root-ca`, then every
# `<cluster>-cacerts`, $JOBS clusters at a time.
set -eu
cat > root-ca.conf <<'EOF'
[ req ]
encrypt_key = no
prompt = no
utf8 = yes
default_md = sha256
default_bits = {KEYSZ}
req_extensions = req_ext
x509_extensions = req_ext
distinguished_name = req_dn
[ req_ext ]
subjectKeyIdentifier = hash
basicConstraints = critical, CA:true
keyUsage = critical, digitalSignature, nonRepudiation, keyEncipherment, keyCertSign
[ req_dn ]
O = Istio
CN = Root CA
EOF
openssl genrsa -out root-key.pem {KEYSZ}
openssl req -new -key root-key.pem -config root-ca.conf -out root-cert.csr
openssl x509 -req -days {ROOTCA_DAYS} -signkey root-key.pem \\
    -extensions req_ext -extfile root-ca.conf \\
    -in root-cert.csr -out root-cert.pem
xargs -P "$JOBS" -n 1 sh ./cluster-cacerts.sh < clusters.txt
"""

CLUSTER_SCRIPT = f"""\
#!/bin/sh
# Istio tools/certs: `make -f Makefile.selfsigned.mk $1-cacerts` (root-ca already made).
set -eu
c=$1
mkdir -p "$c"
openssl genrsa -out "$c/ca-key.pem" {KEYSZ}
cat > "$c/intermediate.conf" <<EOF
[ req ]
encrypt_key = no
prompt = no
utf8 = yes
default_md = sha256
default_bits = {KEYSZ}
req_extensions = req_ext
x509_extensions = req_ext
distinguished_name = req_dn
[ req_ext ]
subjectKeyIdentifier = hash
basicConstraints = critical, CA:true, pathlen:0
keyUsage = critical, digitalSignature, nonRepudiation, keyEncipherment, keyCertSign
subjectAltName=@san
[ san ]
DNS.1 = istiod.istio-system.svc
[ req_dn ]
O = Istio
CN = Intermediate CA
L = $c
EOF
openssl req -new -config "$c/intermediate.conf" -key "$c/ca-key.pem" -out "$c/cluster-ca.csr"
flock root-cert.srl.lock openssl x509 -req -days {INTERMEDIATE_DAYS} \\
    -CA root-cert.pem -CAkey root-key.pem -CAcreateserial \\
    -extensions req_ext -extfile "$c/intermediate.conf" \\
    -in "$c/cluster-ca.csr" -out "$c/ca-cert.pem"
cat "$c/ca-cert.pem" root-cert.pem > "$c/cert-chain.pem"
cp root-cert.pem "$c/"
"""


class BenchError(Exception):
    """A run failed or produced the wrong files: the measurement is void."""


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    clusters: int
    rsa: bool
    """trustmgr with an RSA-4096 root and cluster CAs; otherwise trustmgr's defaults."""
    goal: float

    @property
    def trustmgr_key(self) -> str:
        return "RSA-4096" if self.rsa else "ECDSA P-256"


@dataclass(frozen=True)
class Sample:
    wall: float
    cpu: float
    """CPU seconds of the whole process tree, user + system."""


@dataclass
class Series:
    samples: list[Sample] = field(default_factory=list)

    @property
    def walls(self) -> list[float]:
        return [s.wall for s in self.samples]

    @property
    def median(self) -> float:
        return statistics.median(self.walls)

    @property
    def cores(self) -> float:
        """Average cores busy: CPU time over wall time, all runs together."""
        return sum(s.cpu for s in self.samples) / sum(self.walls)

    def cell(self) -> str:
        if not self.samples:
            return "not run"
        low, high = min(self.walls), max(self.walls)
        return f"{seconds(self.median)} ({seconds(low, unit=False)}–{seconds(high)})"

    def cores_text(self) -> str:
        return f"{self.cores:.2f}" if self.samples else "–"


@dataclass
class Result:
    scenario: Scenario
    trustmgr: Series = field(default_factory=Series)
    noop: Series = field(default_factory=Series)
    openssl: Series = field(default_factory=Series)
    others: str = "unknown"
    """Average cores other processes kept busy while this scenario ran."""

    @property
    def speedup(self) -> float | None:
        if not self.openssl.samples:
            return None
        return self.openssl.median / self.trustmgr.median


def seconds(value: float, *, unit: bool = True) -> str:
    text = f"{value:.2f}" if value < 10 else f"{value:.1f}"
    return f"{text} s" if unit else text


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_timed(cmd: Sequence[str], *, cwd: Path, env: dict[str, str], output: Path) -> Sample:
    """Run ``cmd`` to completion; its wall time and the CPU time of its process tree."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with output.open("wb") as out:
        start = time.perf_counter()
        proc = subprocess.run(
            cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, check=False
        )
        wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        tail = "\n".join(output.read_text(errors="replace").splitlines()[-15:])
        raise BenchError(f"`{' '.join(cmd)}` in {cwd} exited {proc.returncode}:\n{tail}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return Sample(wall, cpu)


def cluster_names(count: int) -> list[str]:
    return [f"cluster-{i:03d}" for i in range(1, count + 1)]


def describe_key(key: object) -> str:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return {"secp256r1": "ECDSA P-256", "secp384r1": "ECDSA P-384"}.get(
            key.curve.name, key.curve.name
        )
    if isinstance(key, rsa.RSAPrivateKey):
        return f"RSA-{key.key_size}"
    return type(key).__name__


def check_output(dirs: Sequence[Path], *, key: str, side: str) -> None:
    """Every cluster has a two-certificate cert-chain.pem (its CA, then the root in
    root-cert.pem); the first cluster's key is of the expected algorithm and is the
    key of its certificate."""
    chains = [d / "cert-chain.pem" for d in dirs if (d / "cert-chain.pem").is_file()]
    if len(chains) != len(dirs):
        raise BenchError(f"{side}: {len(chains)} cert-chain.pem files for {len(dirs)} clusters")
    for d in dirs:
        chain = x509.load_pem_x509_certificates((d / "cert-chain.pem").read_bytes())
        ca = x509.load_pem_x509_certificate((d / "ca-cert.pem").read_bytes())
        root = x509.load_pem_x509_certificates((d / "root-cert.pem").read_bytes())
        if len(chain) != 2 or chain[0] != ca or chain[1] != root[0]:
            raise BenchError(f"{side}: {d}/cert-chain.pem is not ca-cert.pem + root-cert.pem")
    first = dirs[0]
    ca_key = serialization.load_pem_private_key((first / "ca-key.pem").read_bytes(), None)
    ca = x509.load_pem_x509_certificate((first / "ca-cert.pem").read_bytes())
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if ca_key.public_key().public_bytes(*spki) != ca.public_key().public_bytes(*spki):
        raise BenchError(f"{side}: {first}/ca-key.pem does not match ca-cert.pem")
    if describe_key(ca_key) != key:
        raise BenchError(f"{side}: {first}/ca-key.pem is {describe_key(ca_key)}, expected {key}")


def trustmgr_config(work: Path, scenario: Scenario) -> str:
    lines = [
        "# trustmgr bench: one self-signed provider, one mesh, directory targets.",
        "stateStore:",
        f"  file: {{path: {json.dumps(str(work / 'state'))}}}",
        "providers:",
        "  bench-root:",
        "    selfSigned:",
        f"      passphraseEnv: {PASSPHRASE_ENV}",
    ]
    if scenario.rsa:
        lines.append("      keyAlgorithm: RSA_4096")
    lines += [
        "meshes:",
        "  bench:",
        f"    trustDomain: {TRUST_DOMAIN}",
        "    provider: bench-root",
        "    clusters:",
    ]
    lines += [
        f"      {name}: {{directory: {{path: {json.dumps(str(work / 'out' / name))}}}}}"
        for name in cluster_names(scenario.clusters)
    ]
    if scenario.rsa:
        lines += ["intermediates:", "  keyAlgorithm: RSA_4096"]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class CpuClock:
    """Busy CPU seconds of the whole machine and of this benchmark (itself and every
    process it waited for), to tell how much other processes took meanwhile."""

    machine: float | None
    ours: float
    at: float

    @classmethod
    def now(cls) -> CpuClock:
        own = resource.getrusage(resource.RUSAGE_SELF)
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        ours = own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime
        return cls(machine_busy_seconds(), ours, time.perf_counter())

    def others_since(self, start: CpuClock) -> str:
        """Average cores busy with other processes between ``start`` and this."""
        if self.machine is None or start.machine is None:
            return "unknown"
        others = (self.machine - start.machine) - (self.ours - start.ours)
        return f"{max(0.0, others) / (self.at - start.at):.2f}"


def machine_busy_seconds() -> float | None:
    """Busy CPU seconds of every core since boot, from /proc/stat (Linux)."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return None
    ticks = [int(v) for v in fields[1:9]]  # user nice system idle iowait irq softirq steal
    busy = sum(ticks) - ticks[3] - ticks[4]
    return busy / os.sysconf("SC_CLK_TCK")


class Bench:
    def __init__(self, args: argparse.Namespace, base: Path) -> None:
        self.args = args
        self.base = base
        self.env = dict(os.environ)
        self.env[PASSPHRASE_ENV] = secrets.token_urlsafe(24)
        # Bytecode as an installed package has it (pip compiles it), in a cache of our own
        # rather than next to the sources; the warm-up run fills it.
        self.env.pop("PYTHONDONTWRITEBYTECODE", None)
        self.env["PYTHONPYCACHEPREFIX"] = str(base / "pycache")
        self.env["JOBS"] = str(args.jobs)
        self.counter = 0
        self.trustmgr_cmd = [str(TRUSTMGR)]

    def fresh_dir(self, label: str) -> Path:
        self.counter += 1
        path = self.base / f"{self.counter:03d}-{label}"
        path.mkdir()
        return path

    def done_with(self, path: Path) -> None:
        if not self.args.keep:
            shutil.rmtree(path)

    def trustmgr_run(self, scenario: Scenario) -> tuple[Sample, Sample]:
        work = self.fresh_dir(f"trustmgr-{scenario.name}")
        config = work / "trustmgr.yaml"
        config.write_text(trustmgr_config(work, scenario))
        cmd = [*self.trustmgr_cmd, "-c", str(config), "bootstrap"]
        first = run_timed(cmd, cwd=work, env=self.env, output=work / "bootstrap.log")
        changed = (work / "bootstrap.log").read_text()
        if not re.search(rf"(?<!\d){scenario.clusters} changed", changed):
            raise BenchError(f"trustmgr: first bootstrap did not change every cluster:\n{changed}")
        check_output(
            [work / "out" / n for n in cluster_names(scenario.clusters)],
            key=scenario.trustmgr_key,
            side="trustmgr",
        )
        again = run_timed(cmd, cwd=work, env=self.env, output=work / "noop.log")
        noop = (work / "noop.log").read_text()
        if not re.search(r"(?<!\d)0 changed", noop):
            raise BenchError(f"trustmgr: second bootstrap was not a no-op:\n{noop}")
        self.done_with(work)
        return first, again

    def openssl_run(self, scenario: Scenario) -> Sample:
        work = self.fresh_dir(f"openssl-{scenario.name}")
        names = cluster_names(scenario.clusters)
        write_openssl_procedure(work, names)
        sample = run_timed(
            ["sh", "./tools-certs.sh"], cwd=work, env=self.env, output=work / "openssl.log"
        )
        check_output([work / n for n in names], key=f"RSA-{KEYSZ}", side="openssl")
        self.done_with(work)
        return sample

    def warm_up(self) -> None:
        """One untimed single-cluster bootstrap: compiles trustmgr's bytecode, warms
        the page cache for the interpreter, the packages and openssl."""
        scenario = Scenario("warmup", "warm-up", 1, rsa=False, goal=0)
        self.trustmgr_run(scenario)
        subprocess.run(["openssl", "version"], check=True, capture_output=True)

    def measure(self, scenario: Scenario) -> Result:
        result = Result(scenario)
        clock = CpuClock.now()
        runs, openssl_runs = self.args.runs, self.args.openssl_runs
        for i in range(max(runs, openssl_runs)):
            # Interleaved, so a change of background load hits both sides alike.
            if i < runs:
                first, again = self.trustmgr_run(scenario)
                result.trustmgr.samples.append(first)
                result.noop.samples.append(again)
                log(
                    f"[{scenario.name}] trustmgr run {i + 1}/{runs}: {seconds(first.wall)} "
                    f"(cpu {seconds(first.cpu)}), no-op re-run {seconds(again.wall)}"
                )
            if i < openssl_runs:
                sample = self.openssl_run(scenario)
                result.openssl.samples.append(sample)
                log(
                    f"[{scenario.name}] openssl  run {i + 1}/{openssl_runs}: {seconds(sample.wall)} "
                    f"(cpu {seconds(sample.cpu)})"
                )
        result.others = CpuClock.now().others_since(clock)
        return result


def write_openssl_procedure(work: Path, names: Sequence[str]) -> None:
    (work / "tools-certs.sh").write_text(ROOT_SCRIPT)
    (work / "cluster-cacerts.sh").write_text(CLUSTER_SCRIPT)
    (work / "clusters.txt").write_text("".join(f"{n}\n" for n in names))


def first_line(cmd: Sequence[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, check=False).stdout
    except OSError:
        return "?"
    return out.strip().splitlines()[0] if out.strip() else "?"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def filesystem_of(path: Path) -> str:
    """The type of the filesystem holding ``path``, from /proc/mounts."""
    try:
        mounts = [line.split() for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return "?"
    best = ("", "?")
    resolved = str(path.resolve())
    for fields in mounts:
        if len(fields) < 3:
            continue
        mount = fields[1]
        inside = resolved == mount or resolved.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) > len(best[0]):
            best = (mount, fields[2])
    return best[1]


def report(
    results: Sequence[Result],
    args: argparse.Namespace,
    *,
    base: Path,
    others: str,
    elapsed: float,
) -> str:
    out = [
        "| scenario | clusters | trustmgr (median, min–max) | openssl tools/certs (median, min–max) "
        "| speedup | goal | cores busy (trustmgr / openssl) |",
        "|---|---:|---|---|---:|---|---|",
    ]
    for r in results:
        s = r.scenario
        speedup = r.speedup
        if speedup is None:
            verdict, ratio = "n/a (openssl not run)", "–"
        elif args.quick:
            verdict, ratio = "n/a (--quick)", f"{speedup:.1f}×"
        else:
            verdict = f"≥ {s.goal:g}×: {'met' if speedup >= s.goal else 'NOT met'}"
            ratio = f"{speedup:.1f}×"
        out.append(
            f"| {s.title} | {s.clusters} | {r.trustmgr.cell()} | {r.openssl.cell()} "
            f"| {ratio} | {verdict} | {r.trustmgr.cores_text()} / {r.openssl.cores_text()} |"
        )
    out.append("")
    for r in results:
        out.append(
            f"- No-op re-run of `trustmgr bootstrap` on the converged {r.scenario.clusters} "
            f"cluster{'s' if r.scenario.clusters != 1 else ''} ({r.scenario.title}): "
            f"{r.noop.cell()}, nothing written. Other processes kept {r.others} cores "
            "busy on average during this scenario."
        )
    fewer = (
        " (fewer: one 100-cluster run of the RSA-4096 openssl procedure takes 1–2 minutes)"
        if 0 < args.openssl_runs < args.runs
        else ""
    )
    out += [
        f"- Runs per scenario: trustmgr {args.runs}, openssl {args.openssl_runs}{fewer}; "
        "runs interleaved, each from an empty directory and an empty state; "
        "cores busy = CPU time of the process tree / wall time.",
        "- Timed: wall clock of the whole process tree, `trustmgr bootstrap` with interpreter "
        "start; for openssl, a shell running Istio's `tools/certs` commands "
        "(Makefile.selfsigned.mk + common.mk: RSA-4096 root and intermediates). "
        f"The Makefile is serial and `make -j2` is not parallel-safe, so the openssl baseline "
        f"was given {args.jobs}-way parallelism to be fair: the per-cluster steps run under "
        f"`xargs -P {args.jobs}`. trustmgr uses its own thread pool.",
        f"- Machine: {os.cpu_count()} CPUs ({cpu_model()}), {platform.system()} "
        f"{platform.release()}, Python {platform.python_version()}, cryptography "
        f"{cryptography.__version__} ({openssl_backend.openssl_version_text()}), openssl CLI "
        f"{first_line(['openssl', 'version'])}; work directory on {filesystem_of(base)}; "
        f"other processes kept {others} cores busy on average meanwhile; whole benchmark "
        f"{elapsed / 60:.1f} min.",
    ]
    return "\n".join(out)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="scripts/bench",
        description="Time `trustmgr bootstrap` against Istio's tools/certs openssl procedure "
        "and print a Markdown table.",
    )
    parser.add_argument("--runs", type=int, help="trustmgr runs per scenario (default 5)")
    parser.add_argument(
        "--openssl-runs",
        type=int,
        help="openssl runs per scenario (default 3, they are slow; 0: trustmgr only)",
    )
    parser.add_argument(
        "--clusters", type=int, help="clusters of the defaults scenario (default 100)"
    )
    parser.add_argument(
        "--rsa-clusters", type=int, help="clusters of the RSA-4096 scenario (default 20)"
    )
    parser.add_argument(
        "--scenario",
        choices=["all", "defaults", "rsa"],
        default="all",
        help="which scenario to run (default all)",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=os.cpu_count() or 1,
        help="openssl per-cluster steps run this many at a time (default: every CPU)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 2 and 1 clusters, 2 trustmgr runs and 1 openssl run (< 30 s)",
    )
    parser.add_argument("--workdir", type=Path, help="where runs write (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep every run's files")
    parser.add_argument(
        "--check-goals", action="store_true", help="exit 1 when a speedup goal is not met"
    )
    parser.add_argument(
        "--print-openssl-script",
        action="store_true",
        help="print the openssl procedure that is timed, and exit",
    )
    args = parser.parse_args(argv)
    small = args.quick
    defaults: dict[str, int] = {
        "runs": 2 if small else 5,
        "openssl_runs": 1 if small else 3,
        "clusters": 2 if small else 100,
        "rsa_clusters": 1 if small else 20,
    }
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
        lowest = 0 if name == "openssl_runs" else 1
        if getattr(args, name) < lowest:
            parser.error(f"--{name.replace('_', '-')} must be at least {lowest}")
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    return args


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    if args.print_openssl_script:
        print("# tools-certs.sh (run in an empty directory, JOBS=<n> in the environment)")
        print(ROOT_SCRIPT)
        print("# cluster-cacerts.sh <cluster>")
        print(CLUSTER_SCRIPT, end="")
        return 0
    for tool in ("openssl", "xargs", "flock", "sh"):
        if shutil.which(tool) is None:
            log(f"bench: {tool} is not on PATH")
            return 2
    if not TRUSTMGR.exists():
        log(f"bench: {TRUSTMGR} is missing; run scripts/setup")
        return 2
    scenarios = [
        Scenario(
            "defaults",
            "trustmgr defaults (ECDSA P-256) vs tools/certs (RSA-4096)",
            args.clusters,
            rsa=False,
            goal=50,
        ),
        Scenario("rsa", "RSA-4096 on both sides", args.rsa_clusters, rsa=True, goal=2),
    ]
    if args.scenario != "all":
        scenarios = [s for s in scenarios if s.name == args.scenario]
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="trustmgr-bench-", dir=args.workdir))

    def cleanup() -> None:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)

    start = time.perf_counter()
    clock = CpuClock.now()
    log(
        f"bench: work directory {base}; trustmgr {args.runs} runs, openssl {args.openssl_runs} "
        "runs per scenario"
    )
    try:
        bench = Bench(args, base)
        bench.warm_up()
        results = [bench.measure(s) for s in scenarios]
    except BenchError as exc:
        log(f"bench: FAILED, no result: {exc}")
        log(f"bench: files kept in {base}")
        return 1
    except KeyboardInterrupt:
        cleanup()
        return 130
    cleanup()
    print(
        report(
            results,
            args,
            base=base.parent,
            others=CpuClock.now().others_since(clock),
            elapsed=time.perf_counter() - start,
        )
    )
    missed = [r for r in results if (r.speedup or 0) < r.scenario.goal]
    if args.check_goals and missed and not args.quick:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
