"""Vault benchmark: sign calls per second against a local OpenBao, and a
bootstrap of 50 clusters through Vault, side by side with a one-at-a-time
baseline (--workers 1) in the same run. Median of several runs.

    scripts/bench-vault [--runs 5] [--clusters 50]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.openbao import VaultPKI, setup_pki, sign_rate, start_openbao  # noqa: E402
from trustmgr.providers.config import VaultConfig  # noqa: E402
from trustmgr.providers.vault import VaultProvider  # noqa: E402


def config(pki: VaultPKI, clusters: int) -> str:
    lines = [
        "stateStore: {file: {path: state}}",
        "providers:",
        "  vault-prod:",
        "    vault:",
        f"      address: {pki.address}",
        "      mount: pki_int",
        f"      auth: {{appRole: {{roleIdFile: {pki.role_id_file}, secretIdFile: {pki.secret_id_file}}}}}",
        "meshes:",
        "  payments:",
        "    trustDomain: payments.example",
        "    provider: vault-prod",
        "    clusters:",
    ]
    lines += [f"      c{i:03d}: {{directory: {{path: out/c{i:03d}}}}}" for i in range(clusters)]
    return "\n".join(lines) + "\n"


def bootstrap_seconds(workdir: Path, workers: int) -> float:
    """Wall time of `trustmgr bootstrap` from nothing, interpreter start included."""
    for name in ("out", "state"):
        shutil.rmtree(workdir / name, ignore_errors=True)
    start = time.perf_counter()
    subprocess.run(
        [str(REPO / ".venv/bin/trustmgr"), "bootstrap", "--workers", str(workers)],
        cwd=workdir,
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    elapsed = time.perf_counter() - start
    made = len(list((workdir / "out").glob("*/cert-chain.pem")))
    if made != len(list((workdir / "out").iterdir())):
        raise SystemExit(f"bootstrap wrote {made} complete clusters")
    return elapsed


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} s ({min(values):.2f}–{max(values):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--clusters", type=int, default=50)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, start_openbao(Path(tmp)) as server:
        pki = setup_pki(server, Path(tmp))
        vault = VaultConfig.model_validate(
            {
                "address": pki.address,
                "mount": "pki_int",
                "auth": {
                    "appRole": {
                        "roleIdFile": str(pki.role_id_file),
                        "secretIdFile": str(pki.secret_id_file),
                    }
                },
            }
        )
        with VaultProvider("bench", vault, lambda: datetime.now(UTC)) as provider:
            rates = {
                t: [sign_rate(provider, calls=300, threads=t) for _ in range(args.runs)]
                for t in (1, 8)
            }
        workdir = Path(tmp) / "mesh"
        workdir.mkdir()
        (workdir / "trustmgr.yaml").write_text(config(pki, args.clusters))
        times: dict[int, list[float]] = {16: [], 1: []}
        for _ in range(args.runs):
            for workers in times:  # interleaved, so both see the same machine
                times[workers].append(bootstrap_seconds(workdir, workers))
    print(
        f"OpenBao dev server on 127.0.0.1, {os.cpu_count()} cores, median of {args.runs} runs (min–max)\n"
    )
    print("| measure | trustmgr | baseline |")
    print("|---|---|---|")
    print(
        f"| sign calls per second (one provider) | {statistics.median(rates[8]):.0f}/s with 8 threads "
        f"| {statistics.median(rates[1]):.0f}/s sequential |"
    )
    print(
        f"| `bootstrap` of {args.clusters} clusters through Vault | {summary(times[16])} "
        f"(16 workers) | {summary(times[1])} (--workers 1) |"
    )
    goal = statistics.median(times[16]) < 2.0
    print(f"\ngoal: {args.clusters} clusters under 2 s: {'met' if goal else 'NOT met'}")


if __name__ == "__main__":
    main()
