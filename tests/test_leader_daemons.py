"""Three ``trustmgr daemon`` processes against two emulated clusters, the Lease
and the state in the first: exactly one writes; killed with SIGKILL, another
takes over within the lease duration and a retry period; stopped with SIGTERM,
it hands over at once; and the write log, each write with the client that made
it, never shows a write outside its writer's leadership term."""

# The fixtures are imported, so this module runs without conftest wiring; pytest injects them as
# parameters of the same names, which pyflakes would call unused imports and redefinitions.
# ruff: noqa: F401, F811

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest
import yaml

from tests.conftest import PASSPHRASE, REPO
from tests.kube_emulator import KubeEmulator, WriteRecord, merge_kubeconfigs
from tests.kube_fixtures import KubeEmulatorFactory, kube_emulator_factory

NS, LEASE = "trustmgr", "trustmgr-leader"
REPLICAS = ("replica-a", "replica-b", "replica-c")
LEASE_DURATION, RENEW_DEADLINE, RETRY_PERIOD = 3.0, 2.0, 0.5
MARGIN = 1.5
"""Seconds allowed beyond the protocol's bound, for a loaded machine."""


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(port: int, path: str) -> tuple[int, str]:
    """The status and body at ``path``; (0, why) while nothing listens yet."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except urllib.error.URLError as exc:
        return 0, str(exc.reason)


@dataclass
class Replica:
    name: str
    port: int
    process: subprocess.Popen[str]
    stderr: Path

    def metric(self, line: str) -> bool:
        try:
            status, text = _get(self.port, "/metrics")
        except OSError:
            return False
        return status == 200 and line in text.splitlines()


@dataclass
class Fleet:
    east: KubeEmulator
    west: KubeEmulator
    replicas: dict[str, Replica]

    def log(self) -> list[WriteRecord]:
        """Every committed write of both clusters, in the order they happened."""
        return sorted(self.east.write_log + self.west.write_log, key=lambda w: w.sequence)

    def election(self) -> list[WriteRecord]:
        return [w for w in self.log() if w.resource == "leases" and w.name == LEASE]

    def holder(self) -> str:
        lease = self.east.get_object("leases", NS, LEASE)
        return str(lease["spec"]["holderIdentity"]) if lease else ""

    def leaders(self) -> list[str]:
        return [r.name for r in self.replicas.values() if r.metric("trustmgr_leader 1.0")]


def _config(directory: Path, replica: str, kubeconfig: Path, port: int) -> dict[str, object]:
    api = {"kubeconfig": str(kubeconfig)}
    return {
        "stateStore": {"kubernetes": {**api, "context": "east", "namespace": NS}},
        "daemon": {
            "interval": "1s",
            "jitter": "0s",
            "listen": f"127.0.0.1:{port}",
            "leaderElection": {
                **api,
                "context": "east",
                "namespace": NS,
                "name": LEASE,
                "identity": replica,
                "leaseDuration": f"{LEASE_DURATION:g}s",
                "renewDeadline": f"{RENEW_DEADLINE:g}s",
                "retryPeriod": f"{RETRY_PERIOD * 1000:g}ms",
            },
        },
        "providers": {"corp": {"selfSigned": {"passphraseEnv": "TRUSTMGR_PASSPHRASE"}}},
        "meshes": {
            "web": {
                "trustDomain": "web.example",
                "provider": "corp",
                "clusters": {
                    "east": {"kubernetes": {**api, "context": "east"}},
                    "west": {"kubernetes": {**api, "context": "west"}},
                },
            }
        },
    }


@pytest.fixture
def fleet(tmp_path: Path, kube_emulator_factory: KubeEmulatorFactory) -> Iterator[Fleet]:
    tokens = {f"token-{r}": r for r in REPLICAS}
    east = kube_emulator_factory(namespaces=["default", "istio-system", NS], tokens=tokens)
    west = kube_emulator_factory(namespaces=["default", "istio-system"], tokens=tokens)
    env = {**os.environ, "TRUSTMGR_PASSPHRASE": PASSPHRASE, "PYTHONPATH": str(REPO)}
    replicas: dict[str, Replica] = {}
    try:
        for name in REPLICAS:
            directory = tmp_path / name
            directory.mkdir()
            kubeconfig = directory / "kubeconfig"
            # Each replica presents a token of its own: the write log names it.
            token = f"token-{name}"
            merged = merge_kubeconfigs(
                [east.kubeconfig("east", token=token), west.kubeconfig("west", token=token)]
            )
            kubeconfig.write_text(yaml.safe_dump(merged))
            port = _port()
            config = directory / "trustmgr.yaml"
            config.write_text(yaml.safe_dump(_config(directory, name, kubeconfig, port)))
            with (directory / "stderr").open("w") as stderr:
                process = subprocess.Popen(
                    [sys.executable, "-m", "trustmgr", "-c", str(config), "daemon"],
                    cwd=directory,
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=stderr,
                    text=True,
                )
            replicas[name] = Replica(name, port, process, directory / "stderr")
        yield Fleet(east, west, replicas)
    finally:
        for replica in replicas.values():
            if replica.process.poll() is None:
                replica.process.kill()
            replica.process.wait()


def wait_for(condition: Callable[[], object], seconds: float, what: str) -> float:
    """When ``condition`` first held (time.time()); fails after ``seconds``."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return time.time()


def answers(replica: Replica, path: str, answer: tuple[int, str]) -> Callable[[], bool]:
    return lambda: _get(replica.port, path) == answer


def _moment(micro_time: str) -> float:
    return datetime.fromisoformat(micro_time.replace("Z", "+00:00")).timestamp()


def check_terms(log: list[WriteRecord]) -> set[str]:
    """Every write other than the election's own was made by the replica the
    Lease named then, before that replica's hold could have expired; a replica
    took the Lease only when it was free or expired. Returns the writers."""
    holder, renewed = "", 0.0
    writers: set[str] = set()
    for w in log:
        if w.resource == "leases" and w.name == LEASE:
            assert w.object is not None
            spec = w.object["spec"]
            named = spec["holderIdentity"]
            assert w.client in (named, holder), (w.client, named, holder)
            if named and named != holder:  # a take: the previous hold had ended
                assert not holder or _moment(spec["acquireTime"]) >= renewed + LEASE_DURATION
            holder, renewed = named, _moment(spec["renewTime"])
            continue
        assert holder, f"{w.verb} {w.resource} {w.name} by {w.client} with no leader"
        assert w.client == holder, f"{w.verb} {w.resource} {w.name} by {w.client}, {holder} led"
        assert w.at < renewed + LEASE_DURATION, "a write after its writer's hold had expired"
        writers.add(w.client)
    return writers


def test_three_daemons_one_writer_takeover_after_a_kill_and_handover_on_sigterm(
    fleet: Fleet,
) -> None:
    east, west = fleet.east, fleet.west

    def bootstrapped() -> bool:
        state = east.get_object("secrets", NS, "trustmgr-state")
        return bool(
            east.get_object("secrets", "istio-system", "cacerts")
            and west.get_object("secrets", "istio-system", "cacerts")
            and state
            and "state.json" in state.get("data", {})
        )

    wait_for(bootstrapped, 60, "the clusters' cacerts and the state")
    first = fleet.holder()
    wait_for(lambda: fleet.leaders() == [first], 10, "the leader's metric")
    for replica in fleet.replicas.values():
        # a replica on a loaded machine may still be starting its HTTP server
        wait_for(answers(replica, "/healthz", (200, "ok\n")), 10, "liveness")
        ready = "ok\n" if replica.name == first else f"following {first}\n"
        wait_for(answers(replica, "/readyz", (200, ready)), 5, "readiness")
    time.sleep(2 * LEASE_DURATION)  # passes with nothing to do, renewals, followers polling
    assert check_terms(fleet.log()) == {first}  # exactly one process wrote
    assert {w.client for w in fleet.election()} == {first}

    # SIGKILL the leader: no release, another takes over once its hold expired.
    fleet.replicas[first].process.send_signal(signal.SIGKILL)
    killed = time.time()
    fleet.replicas[first].process.wait()
    taken = wait_for(
        lambda: fleet.holder() not in ("", first), LEASE_DURATION + RETRY_PERIOD + 10, "takeover"
    )
    second = fleet.holder()
    take = next(w for w in fleet.election() if w.client == second)
    takeover = take.at - killed
    print(f"takeover after SIGKILL: {takeover:.2f} s")
    assert takeover <= LEASE_DURATION + RETRY_PERIOD + MARGIN, takeover
    assert taken - killed >= 0
    wait_for(lambda: fleet.leaders() == [second], 10, "the new leader's metric")

    # The new leader repairs what it finds: east's cacerts, deleted behind its back.
    east.delete_object("secrets", "istio-system", "cacerts")
    wait_for(lambda: east.get_object("secrets", "istio-system", "cacerts"), 30, "the repair")
    repair = east.writes_of("secrets", "istio-system", "cacerts")[-1]
    assert repair.client == second

    # SIGTERM the new leader: it gives the Lease back, the third takes it at once.
    fleet.replicas[second].process.send_signal(signal.SIGTERM)
    assert fleet.replicas[second].process.wait(timeout=30) == 128 + signal.SIGTERM
    third = wait_for(lambda: fleet.holder() not in ("", second), 10, "the handover")
    release = next(
        w
        for w in fleet.election()
        if w.client == second and w.object and not w.object["spec"]["holderIdentity"]
    )
    handover = next(w for w in fleet.election() if w.sequence > release.sequence)
    print(f"handover after SIGTERM: {handover.at - release.at:.2f} s")
    assert handover.at - release.at <= RETRY_PERIOD + MARGIN
    assert third >= release.at
    last = fleet.holder()
    assert last not in (first, second)
    fleet.replicas[last].process.send_signal(signal.SIGTERM)
    assert fleet.replicas[last].process.wait(timeout=30) == 128 + signal.SIGTERM

    # Never two writers: every write inside its writer's term, on the whole log.
    writers = check_terms(fleet.log())
    assert first in writers and second in writers
    assert fleet.holder() == ""
    for name in (second, last):
        log = fleet.replicas[name].stderr.read_text()
        assert "gave the leader lease (lease trustmgr/trustmgr-leader) back" in log
        assert "Traceback" not in log and PASSPHRASE not in log
