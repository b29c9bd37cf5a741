"""Agent mode's exchange in a cluster, against the emulated API server over HTTP with the
official client: the desired document and the report as ConfigMaps, the agent's own record
as a Secret, each written by create or by a replace carrying the resourceVersion read; their
failures as one line each, never with the Secret's content; and the Roles each side needs."""

# The fixtures are imported, so this module runs without conftest wiring; pytest injects them as
# parameters of the same names, which pyflakes would call unused imports and redefinitions.
# ruff: noqa: F401, F811

from __future__ import annotations

import base64
import json
import logging
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.kube_emulator import DEFAULT_USER, Fault, KubeEmulator
from tests.kube_fixtures import KubeEmulatorFactory, kube_emulator_factory
from trustmgr.agent.document import Desired, Report, Signer, seal, unseal
from trustmgr.agent.exchange import AgentLocal
from trustmgr.agent.kubernetes import (
    KubernetesExchange,
    KubernetesLocalStore,
)
from trustmgr.config import KubernetesTargetConfig
from trustmgr.errors import StateError, TargetConflictError, TargetError, TransientTargetError
from trustmgr.pki import private_key_pem

NS = "istio-system"
CONTEXT = "c1"
MANAGED = {"app.kubernetes.io/managed-by": "trustmgr"}
AGENT_USER = "system:serviceaccount:istio-system:trustmgr-agent"
CENTRAL_USER = DEFAULT_USER  # system:serviceaccount:trustmgr:trustmgr

# The least the agent needs in its own cluster's namespace for the exchange and its own record
# (its cacerts Secret needs the cacerts target's rules besides). RBAC cannot name what a
# `create` makes, so `create` is granted on the resource, without resourceNames.
AGENT_ROLE: dict[str, Any] = {
    "apiVersion": "rbac.authorization.k8s.io/v1",
    "kind": "Role",
    "metadata": {"name": "trustmgr-agent", "namespace": NS},
    "rules": [
        {
            "apiGroups": [""],
            "resources": ["configmaps"],
            "resourceNames": ["trustmgr-desired"],
            "verbs": ["get"],
        },
        {
            "apiGroups": [""],
            "resources": ["configmaps"],
            "resourceNames": ["trustmgr-report"],
            "verbs": ["get", "update"],
        },
        {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["create"]},
        {
            "apiGroups": [""],
            "resources": ["secrets"],
            "resourceNames": ["trustmgr-agent"],
            "verbs": ["get", "update"],
        },
        {"apiGroups": [""], "resources": ["secrets"], "verbs": ["create"]},
    ],
}

# The least the central run needs in an agent cluster's namespace: it never reads a Secret there.
CENTRAL_ROLE: dict[str, Any] = {
    "apiVersion": "rbac.authorization.k8s.io/v1",
    "kind": "Role",
    "metadata": {"name": "trustmgr-central", "namespace": NS},
    "rules": [
        {
            "apiGroups": [""],
            "resources": ["configmaps"],
            "resourceNames": ["trustmgr-desired"],
            "verbs": ["get", "update"],
        },
        {
            "apiGroups": [""],
            "resources": ["configmaps"],
            "resourceNames": ["trustmgr-report"],
            "verbs": ["get"],
        },
        {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["create"]},
    ],
}


def no_sleep(_: float) -> None:
    pass


@pytest.fixture
def cluster(kube_emulator_factory: KubeEmulatorFactory) -> KubeEmulator:
    return kube_emulator_factory()


@dataclass
class Sides:
    """Exchanges and local stores on one emulated cluster, as separate processes would
    build them; closed at teardown."""

    kubeconfig: Path
    made: list[KubernetesExchange | KubernetesLocalStore]

    def config(self) -> KubernetesTargetConfig:
        return KubernetesTargetConfig.model_validate(
            {"kubeconfig": str(self.kubeconfig), "context": CONTEXT, "requestTimeout": "500ms"}
        )

    def exchange(self) -> KubernetesExchange:
        exchange = KubernetesExchange("c1", self.config(), sleep=no_sleep)
        self.made.append(exchange)
        return exchange

    def local(self) -> KubernetesLocalStore:
        store = KubernetesLocalStore("c1", self.config(), sleep=no_sleep)
        self.made.append(store)
        return store


@pytest.fixture
def sides(tmp_path: Path, cluster: KubeEmulator) -> Iterator[Sides]:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump(cluster.kubeconfig(CONTEXT)))
    made = Sides(kubeconfig, [])
    yield made
    for side in made.made:
        side.close()


def desired(sequence: int, bundle: str = "root A") -> Desired:
    return Desired(
        cluster="c1",
        mesh="web",
        trust_domain="web.example",
        bundle=bundle,
        signing_roots=("ab" * 32,),
        key_algorithm="ECDSA_P256",
        ttl=timedelta(days=30),
        renew_before=timedelta(days=10),
        signer=Signer("central", "web-root"),
        sequence=sequence,
        not_after=datetime(2030, 1, 1, tzinfo=UTC),
    )


def configmap(cluster: KubeEmulator, name: str) -> dict[str, Any]:
    obj = cluster.get_object("configmaps", NS, name)
    assert obj is not None, f"no configmap {name}"
    return obj


def pending_key() -> bytes:
    return private_key_pem(ec.generate_private_key(ec.SECP256R1()))


# --- the desired document and the report -----------------------------------------------------


def test_a_published_document_reads_back_byte_for_byte(sides: Sides, cluster: KubeEmulator) -> None:
    central, agent = sides.exchange(), sides.exchange()
    assert agent.read_desired() is None
    assert central.read_report() is None
    publisher = Ed25519PrivateKey.generate()
    envelope = seal(desired(1), publisher)

    central.publish(envelope)

    assert agent.read_desired() == envelope
    assert unseal(envelope, publisher.public_key(), where=agent.where) == desired(1)
    stored = configmap(cluster, "trustmgr-desired")
    assert stored["metadata"]["labels"] == MANAGED
    assert stored["data"] == {"desired.json": envelope.decode()}
    assert "binaryData" not in stored
    assert agent.where == "cluster c1 (namespace istio-system, context c1)"
    # Any UTF-8 text comes back as it went: no re-encoding, no trimming.
    odd = '{"é": "\\n"}\n  \r\n'.encode()
    central.publish(odd)
    assert agent.read_desired() == odd


def test_publishing_again_replaces_the_configmap_and_the_same_bytes_write_nothing(
    sides: Sides, cluster: KubeEmulator
) -> None:
    central = sides.exchange()
    publisher = Ed25519PrivateKey.generate()
    first, second = seal(desired(1), publisher), seal(desired(2, "root A + B"), publisher)
    central.publish(first)
    uid = configmap(cluster, "trustmgr-desired")["metadata"]["uid"]
    cluster.reset_counters()

    central.publish(second)

    assert [(r.verb, r.status) for r in cluster.requests] == [("get", 200), ("update", 200)]
    stored = configmap(cluster, "trustmgr-desired")
    assert stored["metadata"]["uid"] == uid  # replaced, not deleted and made again
    assert sides.exchange().read_desired() == second
    cluster.reset_counters()
    central.publish(second)
    assert cluster.writes == 0


def test_a_concurrent_change_is_read_again_and_the_latest_publication_wins(
    sides: Sides, cluster: KubeEmulator
) -> None:
    central = sides.exchange()
    central.publish(b'{"n": 1}')

    def someone_else() -> None:
        cluster.put_object(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": "trustmgr-desired", "namespace": NS, "labels": MANAGED},
                "data": {"desired.json": '{"n": "theirs"}'},
            }
        )

    fault = cluster.inject(Fault("PUT", "/configmaps/trustmgr-desired$", hook=someone_else))
    cluster.reset_counters()

    central.publish(b'{"n": 2}')

    assert fault.hits == 1
    assert [(r.verb, r.status) for r in cluster.requests] == [
        ("get", 200),
        ("update", 409),  # it carried the resourceVersion read before the other write
        ("get", 200),
        ("update", 200),
    ]
    assert sides.exchange().read_desired() == b'{"n": 2}'


def test_a_document_that_keeps_changing_is_given_up_with_one_line(
    sides: Sides, cluster: KubeEmulator
) -> None:
    agent = sides.exchange()
    agent.write_report(b"{}")
    counter = iter(range(100))

    def someone_else() -> None:
        cluster.put_object(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": "trustmgr-report", "namespace": NS},
                "data": {"report.json": str(next(counter))},
            }
        )

    cluster.inject(Fault("PUT", "/configmaps/trustmgr-report$", hook=someone_else, times=None))
    with pytest.raises(TargetConflictError) as caught:
        agent.write_report(b'{"mine": true}')
    assert str(caught.value) == (
        "cluster c1: configmap istio-system/trustmgr-report kept changing while it was written "
        "(3 conflicts): another writer is at work; only one trustmgr should write it"
    )
    assert cluster.count("update", "configmaps") == 3


def test_the_report_round_trips_between_agent_and_central(
    sides: Sides, cluster: KubeEmulator
) -> None:
    agent, central = sides.exchange(), sides.exchange()
    report = Report(
        "c1",
        sequence=3,
        csr="-----BEGIN CERTIFICATE REQUEST-----\nMIIB\n-----END CERTIFICATE REQUEST-----\n",
        phase="adding-root",
        error="vault: permission denied",
        reported_at=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
    )
    agent.write_report(report.to_bytes())
    assert Report.parse(central.read_report() or b"", where=central.where) == report
    later = Report("c1", sequence=4)
    agent.write_report(later.to_bytes())
    assert central.read_report() == later.to_bytes()
    stored = configmap(cluster, "trustmgr-report")
    assert stored["metadata"]["labels"] == MANAGED
    assert list(stored["data"]) == ["report.json"]
    assert cluster.get_object("configmaps", NS, "trustmgr-desired") is None


def test_a_configmap_without_the_key_reads_as_absent_and_is_taken_over(
    sides: Sides, cluster: KubeEmulator
) -> None:
    cluster.put_object(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": "trustmgr-report",
                "namespace": NS,
                "labels": {"team": "mesh"},
                "annotations": {"note": "made by hand"},
            },
            "data": {"other": "x"},
        }
    )
    agent = sides.exchange()
    assert agent.read_report() is None
    agent.write_report(b"{}")
    stored = configmap(cluster, "trustmgr-report")
    assert stored["data"] == {"report.json": "{}"}
    assert stored["metadata"]["labels"] == {"team": "mesh", **MANAGED}
    assert stored["metadata"]["annotations"] == {"note": "made by hand"}


def test_a_document_that_is_not_utf8_is_refused_before_any_request(
    sides: Sides, cluster: KubeEmulator
) -> None:
    with pytest.raises(TargetError) as caught:
        sides.exchange().publish(b"\xff\xfe")
    assert str(caught.value) == (
        "cluster c1: configmap istio-system/trustmgr-desired holds text, and this document is "
        "not UTF-8"
    )
    assert cluster.requests == []


# --- failures -------------------------------------------------------------------------------


def test_a_missing_namespace_is_one_line_and_never_created(
    kube_emulator_factory: KubeEmulatorFactory, tmp_path: Path
) -> None:
    cluster = kube_emulator_factory(namespaces=("default",))
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump(cluster.kubeconfig(CONTEXT)))
    sides = Sides(kubeconfig, [])
    exchange, local = sides.exchange(), sides.local()
    try:
        assert exchange.read_desired() is None  # a read cannot tell; the first write says it
        expected = (
            "cluster c1: namespace istio-system does not exist (context c1): install Istio first, "
            "or create it (kubectl create namespace istio-system); trustmgr does not create "
            "namespaces"
        )
        writes: list[Callable[[], None]] = [
            lambda: exchange.publish(b"{}"),
            lambda: exchange.write_report(b"{}"),
            lambda: local.save(AgentLocal(1, "d", pending_key())),
        ]
        for write in writes:
            with pytest.raises(TargetError) as caught:
                write()
            assert str(caught.value) == expected
            assert type(caught.value) is TargetError
        assert cluster.get_object("namespaces", "", NS) is None
        assert cluster.count("create") == 3  # a 404 is not retried
    finally:
        exchange.close()
        local.close()


LOST: dict[str, Callable[[], Fault]] = {
    # a fault by which every try of the write is applied (or conflicts) and goes unanswered
    "create-lost": lambda: Fault("POST", "/configmaps$", None, lose_response=True),
    "replace-lost": lambda: Fault("PUT", "/trustmgr-desired$", None, lose_response=True),
    "replace-late": lambda: Fault("PUT", "/trustmgr-desired$", None, answer_delay=1),
}


@pytest.mark.parametrize("case", LOST)
def test_a_write_whose_answer_was_lost_is_read_back(
    case: str, sides: Sides, cluster: KubeEmulator
) -> None:
    fault = LOST[case]()
    central = sides.exchange()
    if fault.method == "PUT":
        central.publish(b'{"n": 1}')
    cluster.inject(fault)
    central.publish(b'{"n": 2}')
    assert fault.hits == 4  # every try of the request went unanswered
    assert sides.exchange().read_desired() == b'{"n": 2}'


def test_a_server_that_keeps_failing_is_tried_then_one_transient_line(
    sides: Sides, cluster: KubeEmulator
) -> None:
    cluster.inject(Fault("POST", "/configmaps$", status=500, times=None))
    with pytest.raises(TransientTargetError) as caught:
        sides.exchange().write_report(b"{}")
    assert str(caught.value) == (
        'cluster c1: create on configmaps "trustmgr-report" in namespace istio-system failed '
        "with 500 InternalError: Internal error occurred: injected fault (after 4 tries)"
    )
    assert cluster.count("create") == 4
    assert cluster.get_object("configmaps", NS, "trustmgr-report") is None


# --- the agent's own record -----------------------------------------------------------------


def test_the_local_record_round_trips_and_reads_empty_when_absent(
    sides: Sides, cluster: KubeEmulator
) -> None:
    store = sides.local()
    assert store.load() == AgentLocal()
    waiting = AgentLocal(4, "ab" * 32, pending_key())

    store.save(waiting)

    assert sides.local().load() == waiting
    secret = cluster.get_object("secrets", NS, "trustmgr-agent")
    assert secret is not None
    assert secret["type"] == "Opaque"
    assert secret["metadata"]["labels"] == MANAGED
    assert secret["data"] == {"agent.json": base64.b64encode(waiting.to_bytes()).decode()}
    applied = AgentLocal(4, "ab" * 32)
    cluster.reset_counters()
    store.save(applied)
    assert [(r.verb, r.status) for r in cluster.requests] == [("get", 200), ("update", 200)]
    assert sides.local().load() == applied
    cluster.delete_object("secrets", NS, "trustmgr-agent")
    assert store.load() == AgentLocal()


def test_a_malformed_local_record_names_the_secret_and_not_its_content(
    sides: Sides, cluster: KubeEmulator
) -> None:
    key = pending_key()
    broken = AgentLocal(1, "d", key).to_bytes()[:-20]  # cut short: not JSON any more
    cluster.put_object(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "trustmgr-agent", "namespace": NS},
            "data": {"agent.json": base64.b64encode(broken).decode()},
        }
    )
    with pytest.raises(StateError) as caught:
        sides.local().load()
    assert str(caught.value) == (
        "cluster c1: secret istio-system/trustmgr-agent: the agent's own record is malformed; "
        "delete it and the agent starts over (it then accepts the current desired document "
        "whatever its sequence)"
    )
    assert_no_key(key, error_text(caught.value))


def error_text(exc: BaseException) -> str:
    """Everything an operator or a log handler could see of an exception."""
    return f"{exc}\n{exc!r}\n" + "".join(traceback.format_exception(exc))


def assert_no_key(key: bytes, text: str) -> None:
    record = base64.b64encode(AgentLocal(1, "d", key).to_bytes()).decode()
    lines = key.decode().splitlines()
    assert "PRIVATE KEY" not in text
    for line in lines[1:-1]:
        assert line not in text
    for start in range(0, len(record) - 40, 20):
        assert record[start : start + 40] not in text


def echoing(status: int, method: str, path: str, key: bytes, **kwargs: Any) -> Fault:
    """A server answering ``status`` with a message that repeats what the agent wrote."""
    record = AgentLocal(1, "d", key).to_bytes()
    message = (
        f'Secret "trustmgr-agent" is invalid: data[agent.json]: {record.decode()} '
        f"{base64.b64encode(record).decode()} {key.decode()}"
    )
    return Fault(method, path, times=None, status=status, message=message, **kwargs)


SECRET_PATH = "/secrets/trustmgr-agent$"
LEAKS: dict[str, Callable[[bytes], Fault]] = {
    "create-422": lambda key: echoing(422, "POST", "/secrets$", key),
    "create-500": lambda key: echoing(500, "POST", "/secrets$", key),
    "create-429": lambda key: echoing(429, "POST", "/secrets$", key, retry_after=0),
    "update-400": lambda key: echoing(400, "PUT", SECRET_PATH, key),
    "update-403": lambda key: echoing(403, "PUT", SECRET_PATH, key),
    "update-409": lambda key: echoing(409, "PUT", SECRET_PATH, key),
    "update-503": lambda key: echoing(503, "PUT", SECRET_PATH, key),
    "read-500": lambda key: echoing(500, "GET", SECRET_PATH, key),
    "update-lost": lambda key: Fault("PUT", SECRET_PATH, times=None, lose_response=True),
    "update-dropped": lambda key: Fault("PUT", SECRET_PATH, times=None, drop=True),
}


@pytest.mark.parametrize("case", LEAKS)
def test_the_pending_key_is_in_no_error_text_and_no_log_line(
    case: str, sides: Sides, cluster: KubeEmulator, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    key = pending_key()
    store = sides.local()
    if not case.startswith("create"):
        store.save(AgentLocal(1, "d", key))  # what a failing read or update would echo
        store.save(AgentLocal(0, "", pending_key()))
    cluster.inject(LEAKS[case](key))
    caught: list[BaseException] = []
    try:
        if case.startswith("read"):
            store.load()
        else:
            store.save(AgentLocal(1, "d", key))
    except (TargetError, StateError) as exc:
        caught.append(exc)
    assert bool(caught) is (case != "update-lost")  # that write landed and was read back
    text = "\n".join(error_text(e) for e in caught)
    assert_no_key(key, text + caplog.text + repr(store) + repr(AgentLocal(1, "d", key)))
    for error in caught:
        assert len(str(error).splitlines()) == 1
        assert str(error).startswith("cluster c1: ")


# --- the Roles each side needs ----------------------------------------------------------------


def binding(role: dict[str, Any], user: str) -> dict[str, Any]:
    _, namespace, name = user.rsplit(":", 2)
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": {"name": role["metadata"]["name"], "namespace": NS},
        "roleRef": {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "Role",
            "name": role["metadata"]["name"],
        },
        "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": namespace}],
    }


def act_as(cluster: KubeEmulator, user: str, role: dict[str, Any]) -> None:
    """From now on every request is ``user``'s, bound to ``role`` and nothing else."""
    cluster.reset_rbac()
    cluster.user = user
    cluster.apply_rbac([role, binding(role, user)])


def test_each_side_works_with_its_own_role_alone(sides: Sides, cluster: KubeEmulator) -> None:
    central, agent, local = sides.exchange(), sides.exchange(), sides.local()
    key = pending_key()

    act_as(cluster, CENTRAL_USER, CENTRAL_ROLE)
    assert central.read_report() is None
    central.publish(b'{"n": 1}')  # create
    central.publish(b'{"n": 2}')  # get, update

    act_as(cluster, AGENT_USER, AGENT_ROLE)
    assert agent.read_desired() == b'{"n": 2}'
    assert local.load() == AgentLocal()
    local.save(AgentLocal(2, "d", key))  # create
    local.save(AgentLocal(2, "e"))  # get, update
    assert local.load() == AgentLocal(2, "e")
    agent.write_report(b'{"r": 1}')  # create
    agent.write_report(b'{"r": 2}')  # get, update

    act_as(cluster, CENTRAL_USER, CENTRAL_ROLE)
    assert central.read_report() == b'{"r": 2}'
    central.publish(b'{"n": 3}')
    refused = [(r.verb, r.resource, r.name) for r in cluster.requests if r.status == 403]
    assert refused == []
    assert {(r.verb, r.resource) for r in cluster.requests} == {
        ("get", "configmaps"),
        ("create", "configmaps"),
        ("update", "configmaps"),
        ("get", "secrets"),
        ("create", "secrets"),
        ("update", "secrets"),
    }


def test_each_side_is_refused_the_other_sides_objects(sides: Sides, cluster: KubeEmulator) -> None:
    central, agent, local = sides.exchange(), sides.exchange(), sides.local()
    central.publish(b'{"n": 1}')
    agent.write_report(b'{"r": 1}')
    local.save(AgentLocal(1, "d", pending_key()))

    def refused(
        write: Callable[[], object], verb: str, resource: str, name: str, user: str
    ) -> None:
        cluster.reset_counters()
        with pytest.raises(TargetError) as caught:
            write()
        assert str(caught.value) == (
            f"cluster c1: forbidden: the credentials of context c1 ({user}) lack {verb} on "
            f'{resource} "{name}" in namespace istio-system; grant it with a Role '
            "(docs/agent.md)"
        )
        assert [r.status for r in cluster.requests].count(403) == 1  # not retried

    act_as(cluster, AGENT_USER, AGENT_ROLE)
    refused(
        lambda: agent.publish(b'{"n": "forged"}'),
        "update",
        "configmaps",
        "trustmgr-desired",
        AGENT_USER,
    )

    act_as(cluster, CENTRAL_USER, CENTRAL_ROLE)
    refused(
        lambda: central.write_report(b'{"r": "forged"}'),
        "update",
        "configmaps",
        "trustmgr-report",
        CENTRAL_USER,
    )
    refused(local.load, "get", "secrets", "trustmgr-agent", CENTRAL_USER)
    refused(lambda: local.save(AgentLocal()), "get", "secrets", "trustmgr-agent", CENTRAL_USER)
    cluster.reset_rbac()
    assert sides.exchange().read_desired() == b'{"n": 1}'
    assert sides.exchange().read_report() == b'{"r": 1}'
