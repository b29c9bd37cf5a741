"""Root key unlock cost: the key sealed as now (PBKDF2-HMAC-SHA256 at
keyseal.ITERATIONS rounds) side by side with the earlier form (2048 rounds),
in the same run. Median of several runs.

What is measured is what a run pays: a self-signed provider built afresh
unlocks the stored root.pem (``unlock``), then signs its first cluster CA; with
the earlier form that first signing also seals the key again, once.

    scripts/bench-keyseal [--runs 9] [--key ECDSA_P256]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import cryptography  # noqa: E402
from cryptography.hazmat.backends.openssl.backend import backend  # noqa: E402
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC  # noqa: E402

from trustmgr.pki import cluster_ca_request  # noqa: E402
from trustmgr.providers import keyseal  # noqa: E402
from trustmgr.providers.config import SelfSignedConfig  # noqa: E402
from trustmgr.providers.keys import KeyAlgorithm  # noqa: E402
from trustmgr.providers.selfsigned import SelfSignedProvider  # noqa: E402
from trustmgr.state.file import FileStateStore  # noqa: E402

PASSPHRASE = "bench passphrase"
KEY_BLOCK = b"-----BEGIN ENCRYPTED PRIVATE KEY-----"


def provider(state: Path, algorithm: KeyAlgorithm) -> SelfSignedProvider:
    config = SelfSignedConfig(passphrase_env="BENCH_PASSPHRASE", key_algorithm=algorithm)
    return SelfSignedProvider(
        "corp", config, FileStateStore(state).blobs(), lambda: datetime.now(UTC)
    )


def stored_units(tmp: Path, algorithm: KeyAlgorithm) -> dict[str, bytes]:
    """root.pem as this release writes it, and with its key sealed the earlier way."""
    state = tmp / "seed"
    provider(state, algorithm).create_root()
    unit = (state / "providers/corp/root.pem").read_bytes()
    cut = unit.index(KEY_BLOCK)
    key = keyseal.unseal(unit[cut:], PASSPHRASE.encode())
    earlier = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(PASSPHRASE.encode()),
    )
    return {"new": unit, "old": unit[:cut] + earlier}


def one_run(tmp: Path, unit: bytes, algorithm: KeyAlgorithm) -> tuple[float, float]:
    """Seconds to unlock, then to sign the first cluster CA, as a fresh run does."""
    state = tmp / "state"
    shutil.rmtree(state, ignore_errors=True)
    (state / "providers/corp").mkdir(parents=True)
    (state / "providers/corp/root.pem").write_bytes(unit)
    fresh = provider(state, algorithm)
    request = cluster_ca_request("bench.example", cluster="c", algorithm=KeyAlgorithm.ECDSA_P256)
    start = time.perf_counter()
    fresh.unlock()
    unlocked = time.perf_counter()
    fresh.sign_ca(request.csr, timedelta(hours=1))
    signed = time.perf_counter()
    seal = keyseal.describe(
        (sealed := (state / "providers/corp/root.pem").read_bytes())[sealed.index(KEY_BLOCK) :]
    )
    if not seal.current:
        raise SystemExit(f"the first signing left the key sealed as {seal}")
    return unlocked - start, signed - unlocked


def guess_seconds(seal: keyseal.Seal) -> float:
    """One passphrase tried against ``seal``: its KDF alone, as a guesser runs it."""
    start = time.perf_counter()
    PBKDF2HMAC(hashes.SHA256(), 32, b"\0" * 16, seal.iterations).derive(b"a guess")
    return time.perf_counter() - start


def summary(values: list[float]) -> str:
    ms = [v * 1000 for v in values]
    return f"{statistics.median(ms):.1f} ms ({min(ms):.1f}–{max(ms):.1f})"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument(
        "--key", type=KeyAlgorithm, default=KeyAlgorithm.ECDSA_P256, choices=list(KeyAlgorithm)
    )
    args = parser.parse_args()
    os.environ["BENCH_PASSPHRASE"] = PASSPHRASE
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        units = stored_units(tmp, args.key)
        seals = {form: keyseal.describe(u[u.index(KEY_BLOCK) :]) for form, u in units.items()}
        unlock: dict[str, list[float]] = {"new": [], "old": []}
        first_sign: dict[str, list[float]] = {"new": [], "old": []}
        guess: dict[str, list[float]] = {"new": [], "old": []}
        for _ in range(args.runs):
            for form in unlock:  # interleaved, so both see the same machine
                u, s = one_run(tmp, units[form], args.key)
                unlock[form].append(u)
                first_sign[form].append(s)
                guess[form].append(guess_seconds(seals[form]))
    new, old = seals["new"], seals["old"]
    print(
        f"{args.key.value} root, {os.cpu_count()} cores, cryptography {cryptography.__version__} "
        f"({backend.openssl_version_text()}), median of {args.runs} runs (min–max)\n"
    )
    print(f"| measure | new: {new} | old: {old} |")
    print("|---|---|---|")
    print(
        f"| `unlock()` of the stored root.pem (once per run) | {summary(unlock['new'])} "
        f"| {summary(unlock['old'])} |"
    )
    print(
        f"| first `sign_ca` after it (old: includes sealing the key again, once) "
        f"| {summary(first_sign['new'])} | {summary(first_sign['old'])} |"
    )
    print(
        f"| one guess: the KDF alone, what each passphrase tried costs "
        f"| {summary(guess['new'])} | {summary(guess['old'])} |"
    )
    ratio = statistics.median(guess["new"]) / statistics.median(guess["old"])
    print(
        f"\nrounds per guess: {new.iterations} vs {old.iterations} "
        f"({new.iterations / old.iterations:.0f}×, measured {ratio:.0f}×); "
        f"minimum {keyseal.MIN_ITERATIONS} (OWASP): {'met' if new.current else 'NOT met'}"
    )


if __name__ == "__main__":
    main()
