"""The chart's mode ``agent``, end to end: the rendered CronJob's and Deployment's
container runs exactly as written (args, agent.yaml from the rendered ConfigMap at
its mount path, the projected service-account token, user and read-only root)
in the emulated pod of tests/test_chart_wiring.py, against an emulated cluster
that authorizes the pod's service account by the chart's agent Role and nothing
else. The central run works on the same cluster at the same time with an
identity of its own, bound to the central Role alone: it publishes the signed
desired document, signs the agent's CSR and sees the cluster converge.

A Role short of one verb fails the agent with one line naming that verb; the
chart's Role is exactly enough (no 403 anywhere, no list, watch, delete, and
the istiod restart by patch alone)."""

# The fixtures are imported, so this module runs without conftest wiring; pytest injects them as
# parameters of the same names, which pyflakes would call unused imports and redefinitions.
# ruff: noqa: F401, F811

from __future__ import annotations

import base64
import copy
import json
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests import test_chart_wiring as wiring
from tests.agent_reports import payload
from tests.conftest import PASSPHRASE, Run, trustmgr
from tests.kube_emulator import KubeEmulator
from tests.kube_fixtures import KubeEmulatorFactory, kube_emulator_factory
from tests.test_agent_kubernetes_exchange import CENTRAL_ROLE
from tests.test_chart import NAMESPACE, Rendered, merged, render
from tests.test_chart_wiring import ISTIO, TOKEN, Completed, Kubelet, running
from trustmgr.agent.exchange import DESIRED_NAME, LOCAL_NAME, REPORT_NAME
from trustmgr.bundles import TrustBundle
from trustmgr.pki import CACerts, istiod_problems

Obj = dict[str, Any]

pytestmark = wiring.pytestmark

CLUSTER = "a1"
AGENT_USER = f"system:serviceaccount:{NAMESPACE}:trustmgr"
"""The chart's ServiceAccount: the identity of the pod's projected token."""
CENTRAL_USER = "trustmgr-central"
CENTRAL_TOKEN = "central-run-token"
RESTARTED_AT = "kubectl.kubernetes.io/restartedAt"

CENTRAL_CONFIG = """\
stateStore: {file: {path: state}}
providers:
  corp:
    selfSigned: {passphraseEnv: TRUSTMGR_PASSPHRASE}
  partner:
    selfSigned: {passphraseEnv: TRUSTMGR_PASSPHRASE}
meshes:
  web:
    trustDomain: web.corp
    provider: corp
    clusters:
      a1:
        mode: agent
        kubernetes: {kubeconfig: a1.kubeconfig, context: a1}
        istio: {multiRoot: MULTIROOT}
  partner:
    trustDomain: partner.corp
    provider: partner
    clusters:
      p1: {directory: {path: out/p1}, istio: {multiRoot: true}}
"""
FEDERATED = "federations:\n  - meshes: [web, partner]\n"


def central_binding() -> Obj:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": {"name": "trustmgr-central", "namespace": ISTIO},
        "roleRef": {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "Role",
            "name": CENTRAL_ROLE["metadata"]["name"],
        },
        "subjects": [{"kind": "User", "name": CENTRAL_USER}],
    }


@pytest.fixture
def cluster(kube_emulator_factory: KubeEmulatorFactory) -> KubeEmulator:
    """Cluster a1: istiod, the API server's CA in the release's namespace, and the
    central run's Role for its own user (its token is not the pod's)."""
    emulator = kube_emulator_factory(
        namespaces=["default", "kube-system", ISTIO, NAMESPACE],
        token=TOKEN,
        tokens={CENTRAL_TOKEN: CENTRAL_USER},
        tls=True,
    )
    assert emulator.user == AGENT_USER
    emulator.put_object(wiring.istiod())
    emulator.put_object(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "kube-root-ca.crt", "namespace": NAMESPACE},
            "data": {"ca.crt": emulator.ca_pem.decode()},
        }
    )
    return emulator


@dataclass
class Central:
    """The central run, elsewhere: its own configuration, state and kubeconfig for a1."""

    workdir: Path
    multi_root: bool = True

    def configure(self, *, federated: bool = False) -> None:
        text = CENTRAL_CONFIG.replace("MULTIROOT", "true" if self.multi_root else "false")
        (self.workdir / "trustmgr.yaml").write_text(text + (FEDERATED if federated else ""))

    def __call__(self, *args: str) -> Run:
        return trustmgr(*args)

    def reconcile(self) -> Run:
        run = self("reconcile")
        assert run.code == 0, run.out + run.err
        return run

    def converged(self) -> None:
        """a1 converged as the central run sees it: nothing to do or wait for, no drift."""
        plan = self("plan", "-o", "json")
        assert plan.code == 0, plan.out + plan.err
        # pending is the central run's own work; waiting on the agent is an action too.
        assert json.loads(plan.out)["pending"] is False, plan.out
        assert {c["cluster"]: c["action"] for c in json.loads(plan.out)["clusters"]} == {
            CLUSTER: "none",
            "p1": "none",
        }, plan.out
        status = self("status", "-o", "json")
        rows = json.loads(status.out)
        assert {r["cluster"]: r["drift"] for r in rows} == {CLUSTER: None, "p1": None}, rows


@pytest.fixture
def central(
    cluster: KubeEmulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Central]:
    workdir = tmp_path / "central"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    monkeypatch.setenv("TRUSTMGR_PASSPHRASE", PASSPHRASE)
    kubeconfig = cluster.kubeconfig(CLUSTER, token=CENTRAL_TOKEN)
    (workdir / "a1.kubeconfig").write_text(yaml.safe_dump(kubeconfig))
    central = Central(workdir)
    central.configure()
    run = central("agent", "publisher-key", "--out", "publisher.pem")
    assert run.code == 0, run.err
    yield central


def agent_values(central: Central, **agent: Any) -> Obj:
    """The chart in mode agent for a1, trusting the central run's publisher key."""
    values: Obj = {
        "mode": "agent",
        "agent": {
            "cluster": CLUSTER,
            "publisherKey": (central.workdir / "publisher.pem").read_text(),
            "istio": {"multiRoot": central.multi_root, "restartIstiod": True},
        },
    }
    return merged(values, {"agent": agent}) if agent else values


@dataclass
class Agent:
    """The chart installed in a1 with mode agent: its ConfigMap stored in the cluster,
    its Role bound to the pod's service account (and the central Role to the
    central run's user), and the kubelet that runs its pod."""

    rendered: Rendered
    cluster: KubeEmulator
    kubelet: Kubelet

    @property
    def pod(self) -> Obj:
        return self.rendered.pod_spec()

    def role(self) -> Obj:
        (role,) = self.rendered.all("Role")
        return role

    def run(self, pod: Obj | None = None) -> Completed:
        return self.kubelet.run(pod or self.pod)

    def config_map(self, name: str) -> Obj | None:
        return self.cluster.get_object("configmaps", ISTIO, name)

    def report(self) -> Obj:
        report = self.config_map(REPORT_NAME)
        assert report is not None, "the agent wrote no report"
        loaded: Obj = payload(report["data"]["report.json"])
        return loaded

    def cacerts(self) -> Obj | None:
        return self.cluster.get_object("secrets", ISTIO, "cacerts")

    def forbidden(self) -> list[str]:
        return [
            f"{r.client}: {r.verb} {r.resource} {r.namespace}/{r.name}"
            for r in self.cluster.requests
            if r.status == 403
        ]

    def requests_of(self, user: str) -> set[tuple[str, str, str]]:
        return {
            (str(r.verb), str(r.resource), r.name)
            for r in self.cluster.requests
            if r.client == user
        }


def install(cluster: KubeEmulator, tmp_path: Path, values: Obj) -> Agent:
    rendered = render(values)
    for obj in rendered.objects:
        if obj["kind"] == "ConfigMap":
            cluster.put_object(obj)
    return bind(Agent(rendered, cluster, Kubelet(tmp_path / "pods", cluster)), rendered.objects)


def bind(agent: Agent, objects: list[Obj]) -> Agent:
    """Only these objects' Roles for the pod, only the central Role for the central run."""
    agent.cluster.reset_rbac()
    agent.cluster.apply_rbac(objects)
    agent.cluster.apply_rbac([CENTRAL_ROLE, central_binding()], user=CENTRAL_USER)
    return agent


def log_lines(result: Completed) -> tuple[list[Obj], list[str]]:
    """The pod's stderr: its JSON log lines, and the lines that are not JSON."""
    records, plain = [], []
    for line in result.err.splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            plain.append(line)
    return records, plain


def assert_agent_pass(result: Completed) -> list[Obj]:
    assert result.code == 0, result.err
    records, plain = log_lines(result)
    assert plain == [], result.err  # --log-format json: every line a JSON line
    return records


def cacerts_material(obj: Obj | None) -> CACerts:
    material = wiring.assert_valid_cacerts(obj, "web.corp")
    assert istiod_problems(material, now=datetime.now(UTC)) == []
    return material


# --- the CronJob ------------------------------------------------------------------------------


def test_agent_cronjob_bootstraps_its_cluster_with_only_its_role(
    cluster: KubeEmulator, central: Central, tmp_path: Path
) -> None:
    """central publishes → agent makes its key and reports its CSR → central signs →
    agent writes cacerts → central sees a1 converged; every request of each side
    allowed by its own Role, and the central run never touches a Secret."""
    agent = install(cluster, tmp_path, agent_values(central))
    assert agent.rendered.workload()["kind"] == "CronJob"
    (container,) = agent.pod["containers"]
    assert container["args"][-2:] == ["--log-format", "json"]

    central.reconcile()
    assert agent.config_map(DESIRED_NAME) is not None
    assert agent.config_map(REPORT_NAME) is None

    records = assert_agent_pass(agent.run())
    report = agent.report()
    assert report["csr"].startswith("-----BEGIN CERTIFICATE REQUEST-----")
    assert report["error"] == "" and report["caCert"] == ""
    assert agent.cacerts() is None
    assert cluster.get_object("secrets", ISTIO, LOCAL_NAME) is not None
    assert any("waiting for the central run to sign" in r["message"] for r in records), records

    central.reconcile()  # signs the CSR and publishes the answer
    records = assert_agent_pass(agent.run())
    material = cacerts_material(agent.cacerts())
    assert agent.report()["csr"] == "" and agent.report()["caCert"] == material.ca_cert.decode()
    assert all(r["level"] == "info" for r in records), records

    central.reconcile()
    central.converged()
    # The central run never saw the key: not in its state, nor in anything it reads.
    held = b"".join(p.read_bytes() for p in (central.workdir / "state").rglob("*") if p.is_file())
    body = b"".join(material.ca_key.splitlines()[1:-1])
    assert body not in held.replace(b"\n", b"")

    # The next scheduled run finds nothing to do and writes nothing.
    cluster.clear_write_log()
    assert_agent_pass(agent.run())
    assert cluster.write_log == []

    assert agent.forbidden() == []
    # What each side asked for, by its own identity (a create names no object).
    assert agent.requests_of(CENTRAL_USER) == {
        ("get", "configmaps", DESIRED_NAME),
        ("get", "configmaps", REPORT_NAME),
        ("create", "configmaps", ""),
        ("update", "configmaps", DESIRED_NAME),
    }
    assert agent.requests_of(AGENT_USER) == {
        ("get", "configmaps", DESIRED_NAME),
        ("get", "configmaps", REPORT_NAME),
        ("create", "configmaps", ""),
        ("update", "configmaps", REPORT_NAME),
        ("get", "secrets", LOCAL_NAME),
        ("get", "secrets", "cacerts"),
        ("create", "secrets", ""),
        ("update", "secrets", LOCAL_NAME),
    }


def _without(role: Obj, verb: str, resource: str, name: str | None) -> Obj:
    """``role`` with ``verb`` taken from the rule on ``resource`` naming ``name``
    (None: the rule naming no object)."""
    role = copy.deepcopy(role)
    for rule in role["rules"]:
        if rule["resources"] == [resource] and (
            (name is None and "resourceNames" not in rule)
            or (name is not None and name in rule.get("resourceNames", []))
        ):
            assert verb in rule["verbs"], rule
            rule["verbs"] = [v for v in rule["verbs"] if v != verb]
    role["rules"] = [r for r in role["rules"] if r["verbs"]]
    return role


MISSING: dict[str, tuple[str, str, str | None, str]] = {
    "update on the report": ("update", "configmaps", REPORT_NAME, REPORT_NAME),
    "get on the report": ("get", "configmaps", REPORT_NAME, REPORT_NAME),
    "get on the desired document": ("get", "configmaps", DESIRED_NAME, DESIRED_NAME),
    "create on configmaps": ("create", "configmaps", None, REPORT_NAME),
    "get on its secrets": ("get", "secrets", LOCAL_NAME, LOCAL_NAME),
    "update on its secrets": ("update", "secrets", LOCAL_NAME, LOCAL_NAME),
    "create on secrets": ("create", "secrets", None, LOCAL_NAME),
}
"""A verb taken from the chart's Role, and the object whose request it then refuses."""


@pytest.mark.parametrize("case", list(MISSING))
def test_a_role_short_of_one_verb_fails_the_agent_with_one_line_naming_it(
    cluster: KubeEmulator, central: Central, tmp_path: Path, case: str
) -> None:
    """Every verb of the chart's Role is needed by the bootstrap: without it the agent
    stops with exit 1 and one plain line naming the verb, the object and the docs,
    refused once (not retried)."""
    verb, resource, name, refused = MISSING[case]
    agent = install(cluster, tmp_path, agent_values(central))
    objects = [
        _without(o, verb, resource, name) if o["kind"] == "Role" else o
        for o in agent.rendered.objects
    ]
    bind(agent, objects)

    failed: Completed | None = None
    for _ in range(3):
        central.reconcile()
        result = agent.run()
        if result.code != 0:
            failed = result
            break
    assert failed is not None, f"the agent never needed {verb} on {resource} {name}"
    assert failed.code == 1, failed.err
    plain = log_lines(failed)[1]
    assert len(plain) == 1, failed.err
    (line,) = plain
    assert line.startswith("trustmgr: ") and f"cluster {CLUSTER}: forbidden: " in line, line
    assert f'lack {verb} on {resource} "{refused}" in namespace {ISTIO}' in line, line
    assert "grant it with a Role (docs/agent.md)" in line, line
    assert "BEGIN" not in failed.err
    # Refused once, not retried; what else the pass tried (its report) is refused for the
    # same missing verb.
    forbidden = agent.forbidden()
    expected = f"{AGENT_USER}: {verb} {resource} {ISTIO}/" + (name or "")
    assert forbidden[0] == expected and forbidden.count(expected) == 1, forbidden
    assert all(f": {verb} {resource} " in f for f in forbidden), forbidden


def test_the_report_refused_is_said_after_cacerts_was_written(
    cluster: KubeEmulator, central: Central, tmp_path: Path
) -> None:
    """Without update on trustmgr-report the cacerts still lands; the one line says the
    report could not be written, and the central run keeps waiting for it."""
    agent = install(cluster, tmp_path, agent_values(central))
    bind(
        agent,
        [
            _without(o, "update", "configmaps", REPORT_NAME) if o["kind"] == "Role" else o
            for o in agent.rendered.objects
        ],
    )
    central.reconcile()
    assert_agent_pass(agent.run())
    central.reconcile()
    result = agent.run()
    assert result.code == 1
    (line,) = log_lines(result)[1]
    assert line.startswith("trustmgr: cannot report: cluster a1: forbidden: "), line
    cacerts_material(agent.cacerts())
    plan = json.loads(central("plan", "-o", "json").out)
    (a1,) = [c for c in plan["clusters"] if c["cluster"] == CLUSTER]
    assert a1["action"] == "await-agent", plan
    status = json.loads(central("status", "-o", "json").out)
    assert {r["cluster"]: r["drift"] for r in status}[CLUSTER] == "agent: no cacerts yet"


# --- istiod restart ---------------------------------------------------------------------------


def test_the_agent_restarts_istiod_with_patch_alone(
    cluster: KubeEmulator, central: Central, tmp_path: Path
) -> None:
    """Without multiRoot a new root in the bundle cannot be hot-reloaded: the agent
    restarts istiod, and the Role's patch (no get) is all it takes."""
    central.multi_root = False
    central.configure()
    agent = install(cluster, tmp_path, agent_values(central))
    assert agent.role()["rules"][-1] == {
        "apiGroups": ["apps"],
        "resources": ["deployments"],
        "resourceNames": ["istiod"],
        "verbs": ["patch"],
    }
    for _ in range(2):
        central.reconcile()
        assert_agent_pass(agent.run())
    before = cacerts_material(agent.cacerts())
    central.reconcile()
    central.converged()
    istiod = cluster.get_object("deployments", ISTIO, "istiod")
    assert istiod is not None
    assert RESTARTED_AT not in (istiod["spec"]["template"]["metadata"].get("annotations") or {})

    central.configure(federated=True)  # a1 is to trust partner.corp's root too
    central.reconcile()
    records = assert_agent_pass(agent.run())
    after = cacerts_material(agent.cacerts())
    assert after.ca_cert == before.ca_cert and after.root_cert != before.root_cert
    kept = cluster.get_object("secrets", ISTIO, "cacerts-trustmgr-previous")
    assert (
        kept is not None
        and kept["data"]["root-cert.pem"] == base64.b64encode(before.root_cert).decode()
    )
    assert any("istiod restarted" in r["message"] for r in records), records
    istiod = cluster.get_object("deployments", ISTIO, "istiod")
    assert istiod is not None
    assert RESTARTED_AT in istiod["spec"]["template"]["metadata"]["annotations"]
    # Replacing cacerts keeps the replaced one: the Role's get and update on cacerts and
    # its kept copy, the create of that copy, and patch on istiod, nothing more.
    assert agent.requests_of(AGENT_USER) >= {
        ("update", "secrets", "cacerts"),
        ("get", "secrets", "cacerts-trustmgr-previous"),
        ("patch", "deployments", "istiod"),
    }
    assert {r for r in agent.requests_of(AGENT_USER) if r[1] == "deployments"} == {
        ("patch", "deployments", "istiod")
    }
    assert agent.forbidden() == []
    central.reconcile()
    central.converged()


def test_without_patch_the_restart_fails_with_one_line(
    cluster: KubeEmulator, central: Central, tmp_path: Path
) -> None:
    """The write stands; the one line says istiod was not restarted, and why."""
    central.multi_root = False
    central.configure()
    agent = install(cluster, tmp_path, agent_values(central))
    for _ in range(2):
        central.reconcile()
        assert_agent_pass(agent.run())
    bind(
        agent,
        [
            _without(o, "patch", "deployments", "istiod") if o["kind"] == "Role" else o
            for o in agent.rendered.objects
        ],
    )
    central.configure(federated=True)
    central.reconcile()
    result = agent.run()
    assert result.code == 1
    (line,) = log_lines(result)[1]
    assert line.startswith("trustmgr: cacerts written, but istiod could not be restarted: "), line
    assert f'lack patch on deployments "istiod" in namespace {ISTIO}' in line, line
    assert agent.forbidden() == [f"{AGENT_USER}: patch deployments {ISTIO}/istiod"]
    assert len(TrustBundle.from_pem(cacerts_material(agent.cacerts()).root_cert)) == 2


# --- the Deployment ---------------------------------------------------------------------------


def test_agent_deployment_converges_while_the_central_run_works_and_stops_on_sigterm(
    cluster: KubeEmulator, central: Central, tmp_path: Path
) -> None:
    """One long-running agent pod, a pass a second, and the central run beside it with
    its own Role: the same flow without a restart of the pod; SIGTERM stops it with
    143 within the grace period."""
    values = agent_values(
        central, runAs="deployment", interval="1s", jitter="0s", terminationGracePeriodSeconds=10
    )
    agent = install(cluster, tmp_path, values)
    deployment = agent.rendered.workload()
    assert deployment["kind"] == "Deployment"
    pod = agent.pod
    assert pod["containers"][0]["args"][-2:] == ["--log-format", "json"]

    central.reconcile()
    with running(agent.kubelet, pod) as process:
        deadline = time.monotonic() + 60
        while agent.config_map(REPORT_NAME) is None or not agent.report()["csr"]:
            assert process.poll() is None, process.communicate()[1]
            assert time.monotonic() < deadline, "the agent never reported a CSR"
            time.sleep(0.2)
        central.reconcile()  # signs, while the agent keeps running
        while agent.cacerts() is None:
            assert process.poll() is None, process.communicate()[1]
            assert time.monotonic() < deadline, "the agent never wrote cacerts"
            time.sleep(0.2)
        cacerts_material(agent.cacerts())
        # The report of the pass that wrote cacerts lands right after it.
        while not agent.report()["caCert"]:
            assert time.monotonic() < deadline, "the agent never reported its cacerts"
            time.sleep(0.2)
        central.reconcile()
        central.converged()

        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=pod["terminationGracePeriodSeconds"])
        assert process.returncode == 143, err
        assert time.monotonic() - started < pod["terminationGracePeriodSeconds"]
    records, plain = log_lines(Completed(process.returncode, "", err))
    assert any("waiting for the central run to sign" in r["message"] for r in records), err
    # Every log line is JSON; the one plain line is the signal's notice.
    assert len(plain) == 1 and "SIGTERM" in plain[0], err
    assert agent.forbidden() == []
