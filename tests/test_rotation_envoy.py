"""Proof with real TLS that a root rotation never breaks a handshake a live mesh needs.

Meshes a (a-1, a-2; provider corp) and b (provider partner) are federated, c is
isolated (provider iso). corp's root is rotated on directory targets; after every
step the clusters' ``cacerts`` are kept as one *generation*, named after the step.

At each step ("at"), every cluster gets an Envoy listener configured as istiod
configures a sidecar: the cluster's ``root-cert.pem`` at that step as its trusted
CA, and SAN prefixes of its mesh and of the meshes it federates with. It serves a
workload certificate minted by the cluster's CA of some generation. Clients hold a
workload certificate minted by their cluster's CA of some generation and trust their
cluster's ``root-cert.pem`` at that step. Workloads renew their certificates over
time, so a live mesh holds certificates of the previous step and of the current
one at once: every pair of them must complete the handshake (request and answer).

O is corp's old root, N the new one.
"""

from __future__ import annotations

import enum
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import snapshot, trustmgr
from tests.envoy_harness import (
    EnvoyListener,
    ListenerGroup,
    issue_workload_cert,
    mtls_request,
    require_envoy,
)
from tests.workload import load_cluster_ca
from trustmgr.bundles import TrustBundle, fingerprint, load_certificates


@pytest.fixture(autouse=True, scope="module")
def envoy_required() -> str:
    """Skips these tests without Envoy, or fails them under CI."""
    return require_envoy()


CONFIG = """\
stateStore: {file: {path: state}}
rotation: {soak: SOAK, canary: 1}
providers:
  corp: {selfSigned: {passphraseEnv: TRUSTMGR_PASSPHRASE}}
  partner: {selfSigned: {passphraseEnv: TRUSTMGR_PASSPHRASE}}
  iso: {selfSigned: {passphraseEnv: TRUSTMGR_PASSPHRASE}}
meshes:
  a:
    trustDomain: a.test
    provider: corp
    clusters:
      a-1: {directory: {path: out/a-1}, istio: {multiRoot: true}}
      a-2: {directory: {path: out/a-2}, istio: {multiRoot: true}}
  b:
    trustDomain: b.test
    provider: partner
    clusters:
      b-1: {directory: {path: out/b-1}, istio: {multiRoot: true}}
  c:
    trustDomain: c.test
    provider: iso
    clusters:
      c-1: {directory: {path: out/c-1}, istio: {multiRoot: true}}
federations:
  - meshes: [a, b]
"""
MESH_OF = {"a-1": "a", "a-2": "a", "b-1": "b", "c-1": "c"}

# --------------------------------------------------------------------------------------------
# The scenarios: each step, what the clusters must hold after it
# --------------------------------------------------------------------------------------------

Command = tuple[str, ...]
START: tuple[Command, ...] = (("rotate", "start", "--provider", "corp"),)
PASS: tuple[Command, ...] = (("reconcile",),)
ROLLBACK: tuple[Command, ...] = (("rotate", "rollback", "--provider", "corp"), ("reconcile",))
RESUME: tuple[Command, ...] = (("rotate", "resume", "--provider", "corp"), ("reconcile",))
ABORT: tuple[Command, ...] = (("rotate", "abort", "--provider", "corp"), ("reconcile",))


NO_ROTATION = "(no rotation)"


@dataclass(frozen=True)
class Step:
    name: str
    """The generation the clusters' material is kept as after this step."""
    commands: tuple[Command, ...]
    phase: str | None
    """corp's phase in `rotate status` after the step (None: not checked)."""
    bundle: str | None
    """corp's roots in every bundle of a and b: "O", "O+N" or "N" (None: not checked)."""
    under_new: tuple[str, ...] = ()
    """a's clusters whose CA chains to N (the others chain to O)."""
    held: bool = False
    writes: bool = True
    """False: the step must leave every cluster as it was."""
    refusable: bool = False
    """The engine may refuse the step's commands (exit status 2); the test goes on."""


BEFORE = Step("before", (), NO_ROTATION, "O", writes=False)
PREPARED = Step("prepared", START, "prepared", "O", writes=False)
DISTRIBUTED = Step("trust-distributed", PASS, "trust-distributed", "O+N")
CANARY = Step("canary-switched", PASS, "issuer-switched", "O+N", ("a-1",))
ALL = Step("all-switched", PASS, "issuer-switched", "O+N", ("a-1", "a-2"))

FORWARD = (
    BEFORE,
    PREPARED,
    DISTRIBUTED,
    CANARY,
    ALL,
    Step("old-removed", PASS, "old-removed", "N", ("a-1", "a-2")),
    Step("done", PASS, NO_ROTATION, "N", ("a-1", "a-2")),
)


class Expect(enum.Enum):
    FEDERATED = "every pair within a mesh or between a and b connects; no other pair does"
    A_CLIENTS_REFUSED = "as FEDERATED, except that no client of mesh a connects"
    A_SERVERS_REFUSED = "as FEDERATED, except that no client connects to a server of mesh a"

    def connects(self, client: str, server: str) -> bool:
        meshes = {MESH_OF[client], MESH_OF[server]}
        federated = len(meshes) == 1 or meshes == {"a", "b"}
        if self is Expect.A_CLIENTS_REFUSED:
            return federated and MESH_OF[client] != "a"
        if self is Expect.A_SERVERS_REFUSED:
            return federated and MESH_OF[server] != "a"
        return federated


FEDERATED = Expect.FEDERATED

Row = tuple[str, tuple[str, ...], tuple[str, ...], Expect]
"""(at step, generations of the clients' certs, generations of the servers' certs, expected)"""

FORWARD_HANDSHAKES: list[Row] = [
    # at                  clients' certs of                           servers' certs of
    ("prepared",          ("before", "prepared"),                     ("before", "prepared"),                     FEDERATED),
    ("trust-distributed", ("prepared", "trust-distributed"),          ("prepared", "trust-distributed"),          FEDERATED),
    ("canary-switched",   ("trust-distributed", "canary-switched"),   ("trust-distributed", "canary-switched"),   FEDERATED),
    ("all-switched",      ("canary-switched", "all-switched"),        ("canary-switched", "all-switched"),        FEDERATED),
    ("old-removed",       ("all-switched", "old-removed"),            ("all-switched", "old-removed"),            FEDERATED),
    ("done",              ("old-removed", "done"),                    ("old-removed", "done"),                    FEDERATED),
    # O has really left: a's certificates minted under it are refused both ways
    ("old-removed",       ("trust-distributed",),                     ("old-removed",),                           Expect.A_CLIENTS_REFUSED),
    ("old-removed",       ("old-removed",),                           ("trust-distributed",),                     Expect.A_SERVERS_REFUSED),
]  # fmt: skip

# A rollback: certificates of the CA rolled back to and of the one just replaced are
# accepted while the rotation is held (a held pass writes nothing), then the phase after
# resume has its own pair.
FROM_DISTRIBUTED = (
    BEFORE,
    PREPARED,
    DISTRIBUTED,
    Step("rolled-back", ROLLBACK, "prepared", "O", held=True),
    Step("held", PASS, "prepared", "O", held=True, writes=False),
    Step("resumed", RESUME, "trust-distributed", "O+N"),
)
FROM_DISTRIBUTED_HANDSHAKES: list[Row] = [
    ("rolled-back", ("trust-distributed", "rolled-back"), ("trust-distributed", "rolled-back"), FEDERATED),
    ("resumed",     ("held", "resumed"),                  ("held", "resumed"),                  FEDERATED),
]  # fmt: skip

FROM_CANARY = (
    BEFORE,
    PREPARED,
    DISTRIBUTED,
    CANARY,
    Step("rolled-back", ROLLBACK, "trust-distributed", "O+N", held=True),
    Step("held", PASS, "trust-distributed", "O+N", held=True, writes=False),
    Step("resumed", RESUME, "issuer-switched", "O+N", ("a-1",)),
)
FROM_CANARY_HANDSHAKES: list[Row] = [
    ("rolled-back", ("canary-switched", "rolled-back"), ("canary-switched", "rolled-back"), FEDERATED),
    ("resumed",     ("held", "resumed"),                ("held", "resumed"),                FEDERATED),
]  # fmt: skip

FROM_ALL_SWITCHED = (
    *FROM_CANARY[:4],
    ALL,
    *FROM_CANARY[4:],
)
FROM_ALL_SWITCHED_HANDSHAKES: list[Row] = [
    ("rolled-back", ("all-switched", "rolled-back"), ("all-switched", "rolled-back"), FEDERATED),
    ("resumed",     ("held", "resumed"),             ("held", "resumed"),             FEDERATED),
]  # fmt: skip

# Certificates no mesh may accept: a cluster CA minting an identity of another trust
# domain (a and b trust each other's roots; the name constraints refuse these).
FORGERS = {"b-1": "a.test", "a-1": "b.test", "a-2": "b.test"}

# --------------------------------------------------------------------------------------------
# Driving the rotation, keeping each step's material
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rotation:
    workdir: Path
    generations: dict[str, Path]
    """Each step's name: a copy of every cluster's cacerts directory after it."""
    prefixes: dict[str, list[str]]
    """Each cluster's accepted SAN prefixes (its trust domain and the aliases)."""


def _corp_rotation() -> dict[str, Any] | None:
    rows: list[dict[str, Any]] = json.loads(trustmgr("rotate", "status", "-o", "json").out)
    return next((r for r in rows if r["provider"] == "corp"), None)


def _chain_root(directory: Path) -> str:
    chain = load_certificates((directory / "cert-chain.pem").read_bytes(), "cert-chain.pem")
    return fingerprint(chain[-1])


def _accepted_prefixes(cluster: str) -> list[str]:
    """What istiod gives the cluster's sidecars: its trust domain plus the
    trustDomainAliases of trustmgr's meshConfig fragment."""
    run = trustmgr("federation", "export", "--mesh", MESH_OF[cluster])
    assert run.code == 0, run.err
    mesh_config = yaml.safe_load(run.out)["meshConfig"]
    return [
        f"spiffe://{td}/" for td in [mesh_config["trustDomain"], *mesh_config["trustDomainAliases"]]
    ]


def rotate(workdir: Path, steps: tuple[Step, ...]) -> Rotation:
    """Run each step's commands; check what every cluster holds after it and keep a copy."""
    out = workdir / "out"
    old = _chain_root(out / "a-1")
    new = ""
    isolated = snapshot(out / "c-1")
    generations = {}
    for step in steps:
        before = snapshot(out)
        for command in step.commands:
            run = trustmgr(*command)
            refused = step.refusable and run.code == 2
            assert run.code == 0 or refused, f"{step.name}: {' '.join(command)}: {run.err}"
        row = _corp_rotation()
        if row is not None:
            new = row["newRoots"][0]
        seen = (NO_ROTATION, False) if row is None else (row["phase"], row["held"])
        if step.phase is not None:
            assert seen == (step.phase, step.held), step.name
        roots = {"O": old, "N": new}
        for cluster in ("a-1", "a-2", "b-1"):
            if step.bundle is not None:
                bundle = TrustBundle.from_pem((out / cluster / "root-cert.pem").read_bytes())
                wanted = {roots[r] for r in step.bundle.split("+")}
                trusted = set(bundle.fingerprints) & {old, new}
                assert trusted == wanted, f"{step.name}: corp's roots in {cluster}"
        for cluster in ("a-1", "a-2"):
            wanted_root = new if cluster in step.under_new else old
            assert _chain_root(out / cluster) == wanted_root, f"{step.name}: {cluster}'s CA"
        assert snapshot(out / "c-1") == isolated, f"{step.name}: c was touched"
        if not step.writes:
            assert snapshot(out) == before, f"{step.name}: a cluster was written"
        generations[step.name] = workdir / "generations" / step.name
        shutil.copytree(out, generations[step.name])
    prefixes = {c: _accepted_prefixes(c) for c in MESH_OF}
    return Rotation(workdir, generations, prefixes)


# --------------------------------------------------------------------------------------------
# Handshakes
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    chain: Path
    key: Path


@dataclass(frozen=True)
class Attempt:
    at: str
    client: str
    """The client's cluster, or ``forged-by-<cluster>``."""
    client_generation: str
    server: str
    server_generation: str
    connects: bool

    def __str__(self) -> str:
        return (
            f"at {self.at}: client {self.client} (cert of {self.client_generation}) -> "
            f"server {self.server} (cert of {self.server_generation})"
        )


class Sidecars:
    """Workload certificates and sidecar listeners of a kept rotation."""

    def __init__(self, rotation: Rotation) -> None:
        self.rotation = rotation
        self._workloads: dict[tuple[str, str, str], Workload] = {}
        self.listeners: dict[tuple[str, str, str], EnvoyListener] = {}

    def workload(self, generation: str, cluster: str, spiffe_id: str) -> Workload:
        """A certificate the cluster's CA of ``generation`` mints, with Istio's chain
        (leaf, then cert-chain.pem); the same one each time it is asked for."""
        key = (generation, cluster, spiffe_id)
        if key not in self._workloads:
            cacerts = self.rotation.generations[generation] / cluster
            ca_cert, ca_key = load_cluster_ca(cacerts)
            chain = load_certificates((cacerts / "cert-chain.pem").read_bytes(), "cert-chain.pem")
            directory = self.rotation.workdir / "workloads" / f"w{len(self._workloads)}"
            issue_workload_cert(ca_cert, ca_key, spiffe_id, ca_chain=chain, out_dir=directory)
            self._workloads[key] = Workload(directory / "cert-chain.pem", directory / "key.pem")
        return self._workloads[key]

    def roots(self, at: str, cluster: str) -> Path:
        return self.rotation.generations[at] / cluster / "root-cert.pem"

    def listener(self, at: str, cluster: str, generation: str) -> EnvoyListener:
        """The cluster's sidecar at step ``at``, serving a certificate of ``generation``."""
        key = (at, cluster, generation)
        if key not in self.listeners:
            served = self.workload(
                generation, cluster, f"spiffe://{MESH_OF[cluster]}.test/ns/app/sa/server"
            )
            self.listeners[key] = EnvoyListener(
                name=f"{at}/{cluster}/{generation}",
                cert_chain=served.chain,
                private_key=served.key,
                trusted_ca=self.roots(at, cluster),
                san_prefixes=self.rotation.prefixes[cluster],
            )
        return self.listeners[key]


def attempts(rows: list[Row]) -> list[Attempt]:
    """Every client of each row against every server of it, and the forgeries."""
    out = []
    for at, clients, servers, expect in rows:
        for cg in clients:
            for sg in servers:
                out += [
                    Attempt(at, client, cg, server, sg, expect.connects(client, server))
                    for client in MESH_OF
                    for server in MESH_OF
                ]
            if expect is FEDERATED:  # a listener's trust does not depend on what it serves
                out += [
                    Attempt(at, f"forged-by-{forger}", cg, server, servers[-1], False)
                    for forger in FORGERS
                    for server in ("a-1", "a-2", "b-1")
                ]
    return out


def prove(rotation: Rotation, rows: list[Row]) -> None:
    """Run every attempt of ``rows`` against Envoy; each connects exactly when expected."""
    sidecars = Sidecars(rotation)
    todo = attempts(rows)
    calls = []
    for a in todo:
        if a.client.startswith("forged-by-"):
            cluster = a.client.removeprefix("forged-by-")
            spiffe_id = f"spiffe://{FORGERS[cluster]}/ns/app/sa/client"
        else:
            cluster = a.client
            spiffe_id = f"spiffe://{MESH_OF[cluster]}.test/ns/app/sa/client"
        cert = sidecars.workload(a.client_generation, cluster, spiffe_id)
        listener = sidecars.listener(a.at, a.server, a.server_generation)
        calls.append((listener, cert, sidecars.roots(a.at, cluster), rotation.prefixes[cluster]))
    with ListenerGroup(list(sidecars.listeners.values())) as group:
        results = [
            (a, mtls_request(listener.port, cert.chain, cert.key, roots, prefixes))
            for a, (listener, cert, roots, prefixes) in zip(todo, calls, strict=True)
        ]
        wrong = [
            f"{a}: expected {'a connection' if a.connects else 'a refusal'}, "
            f"got {'a connection' if r.ok else r.error}"
            for a, r in results
            if r.ok != a.connects
        ]
        assert not wrong, "\n".join(wrong)
        # the forgeries were refused by the name constraints, not by chance
        forged = sum(1 for a in todo if a.client.startswith("forged-by-"))
        assert _subtree_violations(group, forged) >= forged


def _subtree_violations(group: ListenerGroup, wanted: int) -> int:
    deadline = time.monotonic() + 5
    while True:
        seen = sum("permitted subtree violation" in e for e in group.tls_errors())
        if seen >= wanted or time.monotonic() > deadline:
            return seen
        time.sleep(0.05)


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------


def _bootstrap(workdir: Path, soak: str) -> Path:
    (workdir / "trustmgr.yaml").write_text(CONFIG.replace("SOAK", soak))
    run = trustmgr("bootstrap")
    assert run.code == 0, run.err
    return workdir


@pytest.fixture
def meshes(workdir: Path) -> Path:
    return _bootstrap(workdir, "0s")


def test_every_phase_of_a_rotation_keeps_every_handshake(meshes: Path) -> None:
    prove(rotate(meshes, FORWARD), FORWARD_HANDSHAKES)


@pytest.mark.parametrize(
    ("steps", "rows"),
    [
        (FROM_DISTRIBUTED, FROM_DISTRIBUTED_HANDSHAKES),
        (FROM_CANARY, FROM_CANARY_HANDSHAKES),
        (FROM_ALL_SWITCHED, FROM_ALL_SWITCHED_HANDSHAKES),
    ],
    ids=["from-trust-distributed", "from-issuer-switched-canary", "from-issuer-switched-all"],
)
def test_a_rollback_keeps_every_handshake(
    meshes: Path, steps: tuple[Step, ...], rows: list[Row]
) -> None:
    prove(rotate(meshes, steps), rows)


ABORT_AFTER_CANARY = (
    *FROM_CANARY[:5],
    # what a correct engine holds here (or whether it takes the abort) is not checked:
    # only the handshakes are
    Step("aborted", ABORT, None, None, refusable=True),
)
ABORT_AFTER_CANARY_HANDSHAKES: list[Row] = [
    ("rolled-back", ("canary-switched", "rolled-back"),            ("canary-switched", "rolled-back"),            FEDERATED),
    ("aborted",     ("canary-switched", "rolled-back", "aborted"), ("canary-switched", "rolled-back", "aborted"), FEDERATED),
]  # fmt: skip


def test_an_abort_after_rolling_back_the_issuer_switch_keeps_every_handshake(
    workdir: Path,
) -> None:
    """With ``rotation.soak: 24h``: the canary a-1 switches to a CA under N, and its
    workloads get certificates under N, valid for the workload TTL. `rotate
    rollback` puts a-1's CA back under O while every bundle keeps O+N; `rotate
    abort` then keeps N in every a and b bundle until the soak has passed, as the
    forward rotation keeps O, so those certificates are accepted throughout."""
    prove(rotate(_bootstrap(workdir, "24h"), ABORT_AFTER_CANARY), ABORT_AFTER_CANARY_HANDSHAKES)
