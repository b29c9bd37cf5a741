"""The Helm chart, rendered by Helm's own engine (helm-python-sdk, in process):
every mode and a matrix of values, strict lint, the Kubernetes schemas of 1.29
to the newest kubernetes-validate carries in strict mode, values the schema or
the templates must refuse, and policy on what is rendered: least-privilege RBAC
and the Pod Security "restricted" profile."""

from __future__ import annotations

import copy
import functools
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import helm_python
import kubernetes_validate
import pytest
import yaml
from packaging.version import Version

from tests.conftest import REPO
from trustmgr import __version__
from trustmgr.config import parse

CHART = REPO / "charts" / "trustmgr"
RELEASE, NAMESPACE = "trustmgr", "trustmgr"
CONFIG_PATH = "/etc/trustmgr/config/trustmgr.yaml"
POD_KINDS = ("CronJob", "Deployment")

Obj = dict[str, Any]


# --- rendering -----------------------------------------------------------------


@functools.cache
def _chart() -> helm_python.Chart:
    return helm_python.Chart.load(CHART)


@dataclass(frozen=True)
class Rendered:
    objects: list[Obj]
    notes: str
    values: Obj
    """The values Helm rendered with: the chart's defaults and the overrides."""

    def all(self, kind: str) -> list[Obj]:
        return [o for o in self.objects if o["kind"] == kind]

    def one(self, kind: str, name: str | None = None) -> Obj:
        found = [o for o in self.all(kind) if name is None or o["metadata"]["name"] == name]
        assert len(found) == 1, f"{len(found)} {kind} {name or ''} in {self.kinds()}"
        return found[0]

    def kinds(self) -> list[str]:
        return sorted(f"{o['kind']}/{o['metadata']['name']}" for o in self.objects)

    def workload(self) -> Obj:
        (workload,) = [o for o in self.objects if o["kind"] in POD_KINDS]
        return workload

    def pod_spec(self) -> Obj:
        return pod_spec(self.workload())

    def config(self) -> Obj:
        """trustmgr.yaml as the chart's ConfigMap holds it."""
        configmap = self.one("ConfigMap")
        loaded: Obj = yaml.safe_load(configmap["data"]["trustmgr.yaml"])
        return loaded


def pod_spec(workload: Obj) -> Obj:
    spec: Obj = workload["spec"]
    if workload["kind"] == "CronJob":
        spec = spec["jobTemplate"]["spec"]
    template: Obj = spec["template"]["spec"]
    return template


def render(values: Obj, *, name: str = RELEASE, namespace: str = NAMESPACE) -> Rendered:
    """The chart rendered as `helm template` would, NOTES.txt apart."""
    manifests = _chart().render(copy.deepcopy(values), name=name, namespace=namespace)
    objects: list[Obj] = []
    notes = ""
    for path, text in sorted(manifests.items()):
        if path.endswith("NOTES.txt"):
            notes = text
            continue
        objects += [o for o in yaml.safe_load_all(text) if o]
    return Rendered(objects, notes, _chart().merge_values(copy.deepcopy(values)))


def base_values() -> Obj:
    """One self-signed mesh whose only cluster is the one the chart runs in."""
    values: Obj = yaml.safe_load((CHART / "ci" / "cronjob-values.yaml").read_text())
    return values


def merged(base: Obj, override: Obj) -> Obj:
    """``override`` merged into ``base``; a key written with a trailing ``!`` replaces."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if key.endswith("!"):
            out[key[:-1]] = copy.deepcopy(value)
        elif isinstance(value, dict) and isinstance(out.get(key), dict) and value:
            out[key] = merged(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


# --- the matrix ------------------------------------------------------------------

REMOTE_ONLY_CONFIG: Obj = {
    "providers": {
        "vault": {
            "vault": {
                "address": "https://vault.example.com:8200",
                "auth": {
                    "kubernetes": {
                        "role": "trustmgr",
                        "tokenPath": "/var/run/secrets/trustmgr/vault/token",
                    }
                },
            }
        }
    },
    "meshes": {
        "payments": {
            "trustDomain": "payments.corp",
            "provider": "vault",
            "clusters": {
                "pci-east": {
                    "kubernetes": {
                        "kubeconfig": "/etc/trustmgr/kubeconfigs/pci-east/kubeconfig",
                        "context": "pci-east",
                    }
                }
            },
        }
    },
}

MATRIX: dict[str, Obj] = {
    "cronjob": {},
    "cronjob-no-create-no-restart": {
        "rbac": {"createSecrets": False},
        "config": {"meshes": {"web": {"clusters": {"local": {"istio": {"restartIstiod": False}}}}}},
    },
    "cronjob-vault-state-remote-only": {
        "config!": REMOTE_ONLY_CONFIG,
        "passphrase": {"existingSecret": ""},
        "stateStore": {
            "type": "vault",
            "vault": {
                "address": "https://vault.example.com:8200",
                "auth": {
                    "kubernetes": {
                        "role": "trustmgr",
                        "tokenPath": "/var/run/secrets/trustmgr/vault/token",
                    }
                },
            },
        },
        "vault": {"kubernetesAuth": {"enabled": True, "audience": "vault.example.com"}},
        "remoteClusters": [{"kubeconfigSecret": "pci-east"}],
    },
    "cronjob-existing-configmap": {
        "config!": {},
        "existingConfigMap": "my-trustmgr-config",
        "rbac": {"targets": [{"namespace": "istio-system", "restartIstiod": True}]},
        "cronjob": {"schedule": "@hourly", "timeZone": "Europe/Berlin", "suspend": True},
    },
    "cronjob-two-namespaces": {
        "config": {
            "meshes": {
                "web": {
                    "clusters": {
                        "local": {"kubernetes": {"inCluster": True}},
                        "canary": {
                            "kubernetes": {
                                "inCluster": True,
                                "namespace": "istio-canary",
                                "secretName": "cacerts-canary",
                                "istiodDeployment": "istiod-1-24",
                            },
                            "istio": {"restartIstiod": True},
                        },
                    }
                }
            }
        }
    },
    "cronjob-renamed": {
        "fullnameOverride": "pki",
        "serviceAccount": {"create": False, "name": "pki-runner"},
        "stateStore": {"kubernetes": {"name": "pki-state"}},
        "image": {
            "repository": "registry.example.com/platform/trustmgr",
            "digest": "sha256:" + "ab" * 32,
        },
        "securityContext": {"runAsUser": None, "runAsGroup": None, "fsGroup": None},
    },
    "cronjob-no-rbac": {"rbac": {"create": False}},
    "daemon": {"mode": "daemon"},
    "daemon-single-monitored": {
        "mode": "daemon",
        "daemon": {"replicas": 1, "port": 9500, "interval": "10m", "jitter": "1m"},
        "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}}},
    },
    "daemon-vault-approle-remote": {
        "mode": "daemon",
        "daemon": {"replicas": 3, "podDisruptionBudget": {"enabled": False}},
        "metrics": {"service": {"enabled": False}},
        "vault": {
            "token": {"existingSecret": "vault-token"},
            "appRole": {"existingSecret": "vault-approle"},
        },
        "remoteClusters": [{"kubeconfigSecret": "edge-1"}, {"kubeconfigSecret": "edge-2"}],
        "extraEnv": [{"name": "AWS_REGION", "value": "eu-west-1"}],
        "extraVolumes": [{"name": "vault-ca", "configMap": {"name": "vault-ca"}}],
        "extraVolumeMounts": [
            {"name": "vault-ca", "mountPath": "/etc/trustmgr/vault-ca", "readOnly": True}
        ],
        "podAnnotations": {"example.com/team": "platform"},
        "tolerations": [{"key": "infra", "operator": "Exists", "effect": "NoSchedule"}],
    },
}


@functools.cache
def rendered(case: str) -> Rendered:
    return render(merged(base_values(), MATRIX[case]))


def cases() -> Iterator[str]:
    yield from MATRIX


# --- Kubernetes schemas -----------------------------------------------------------


def kube_versions() -> list[str]:
    """1.29 to the newest kubernetes-validate carries, one per minor."""
    versions = sorted({Version(v) for v in kubernetes_validate.utils.all_versions()})
    chosen = [f"{v.major}.{v.minor}" for v in versions if v >= Version("1.29")]
    assert chosen and chosen[0] == "1.29", chosen
    return chosen


def validate_strict(obj: Obj, version: str) -> None:
    kubernetes_validate.validate(obj, version, strict=True)


@functools.cache
def _validated(serialized: str, version: str) -> None:
    validate_strict(json.loads(serialized), version)


def test_strict_validation_catches_an_unknown_field() -> None:
    """The validation below is not vacuous: strict mode refuses a misspelt field."""
    cronjob = copy.deepcopy(rendered("cronjob").workload())
    pod_spec(cronjob)["containers"][0]["securityContexts"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_strict(cronjob, "1.29")


@pytest.mark.parametrize("case", list(cases()))
def test_every_object_validates_against_kubernetes_1_29_to_newest(case: str) -> None:
    checked = 0
    for obj in rendered(case).objects:
        if obj["kind"] == "ServiceMonitor":
            continue  # a CRD: not in kubernetes-validate; checked by its own test
        for version in kube_versions():
            _validated(json.dumps(obj, sort_keys=True), version)
            checked += 1
    assert checked


def test_service_monitor_selects_the_metrics_service() -> None:
    out = rendered("daemon-single-monitored")
    monitor = out.one("ServiceMonitor")
    service = out.one("Service")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == service["spec"]["ports"][0]["name"] == "http-metrics"
    assert endpoint["path"] == "/metrics"
    assert service["spec"]["ports"][0]["port"] == 9500


# --- lint -------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(cases()))
def test_lint_strict(case: str) -> None:
    report = helm_python.lint(
        CHART, merged(base_values(), MATRIX[case]), strict=True, namespace=NAMESPACE
    )
    assert report["errors"] == []
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert problems == []


def test_lint_strict_with_every_ci_values_file() -> None:
    files = sorted((CHART / "ci").glob("*-values.yaml"))
    assert files
    for path in files:
        report = helm_python.lint(CHART, yaml.safe_load(path.read_text()), strict=True)
        assert report["errors"] == [], path.name
        assert [m for m in report["messages"] if m["severity"] >= 2] == [], path.name


def test_chart_version_follows_the_package() -> None:
    meta = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert meta["appVersion"] == __version__
    assert (
        rendered("cronjob").workload()["spec"]["jobTemplate"]["spec"]["template"]["spec"][
            "containers"
        ][0]["image"]
        == f"trustmgr:{__version__}"
    )


# --- what each mode renders ---------------------------------------------------------


def test_cronjob_mode() -> None:
    out = rendered("cronjob")
    cronjob = out.one("CronJob", "trustmgr")
    spec = cronjob["spec"]
    assert spec["schedule"] == "*/15 * * * *"
    assert spec["concurrencyPolicy"] == "Forbid"
    assert spec["startingDeadlineSeconds"] == 300
    assert spec["successfulJobsHistoryLimit"] == 3 and spec["failedJobsHistoryLimit"] == 3
    job = spec["jobTemplate"]["spec"]
    assert job["backoffLimit"] == 2 and job["activeDeadlineSeconds"] == 1800
    pod = pod_spec(cronjob)
    assert pod["restartPolicy"] == "Never"
    (container,) = pod["containers"]
    assert container["command"] == ["trustmgr"]
    assert container["args"] == ["--config", CONFIG_PATH, "reconcile"]
    assert "ports" not in container and "livenessProbe" not in container
    assert not out.all("Deployment") and not out.all("Service")
    assert not out.all("PodDisruptionBudget")
    assert "daemon" not in out.config()
    assert "CronJob trustmgr runs `trustmgr reconcile`" in out.notes


def test_cronjob_schedule_settings() -> None:
    spec = rendered("cronjob-existing-configmap").one("CronJob")["spec"]
    assert spec["schedule"] == "@hourly"
    assert spec["timeZone"] == "Europe/Berlin"
    assert spec["suspend"] is True
    assert "SUSPENDED" in rendered("cronjob-existing-configmap").notes


def test_daemon_mode() -> None:
    out = rendered("daemon")
    deployment = out.one("Deployment", "trustmgr")
    assert deployment["spec"]["replicas"] == 2
    pod = pod_spec(deployment)
    (container,) = pod["containers"]
    assert container["args"] == ["--config", CONFIG_PATH, "daemon", "--log-format", "json"]
    assert container["ports"] == [
        {"name": "http-metrics", "containerPort": 9403, "protocol": "TCP"}
    ]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http-metrics"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http-metrics"}
    assert pod["terminationGracePeriodSeconds"] == 60
    pdb = out.one("PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1
    labels = pod_labels(deployment)
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    service = out.one("Service", "trustmgr-metrics")
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == "http-metrics"
    assert not out.all("ServiceMonitor") and not out.all("CronJob")
    config = out.config()
    assert config["daemon"] == {
        "interval": "5m",
        "jitter": "30s",
        "listen": "0.0.0.0:9403",
        "leaderElection": {"namespace": NAMESPACE, "name": "trustmgr-leader", "inCluster": True},
    }
    assert "electing a leader through Lease trustmgr/trustmgr-leader" in out.notes


def test_a_single_daemon_replica_elects_no_leader() -> None:
    out = rendered("daemon-single-monitored")
    config = out.config()
    assert config["daemon"] == {"interval": "10m", "jitter": "1m", "listen": "0.0.0.0:9500"}
    role = out.one("Role", "trustmgr")
    lease_names = [
        n for r in role["rules"] if "leases" in r["resources"] for n in r.get("resourceNames", [])
    ]
    assert lease_names == ["trustmgr-state-lock"]
    (container,) = out.pod_spec()["containers"]
    assert container["ports"][0]["containerPort"] == 9500


def test_daemon_without_budget_or_service() -> None:
    out = rendered("daemon-vault-approle-remote")
    assert out.one("Deployment")["spec"]["replicas"] == 3
    assert not out.all("PodDisruptionBudget") and not out.all("Service")


def test_config_change_rolls_the_pods() -> None:
    a = rendered("daemon").workload()["spec"]["template"]["metadata"]["annotations"]
    b = rendered("daemon-single-monitored").workload()["spec"]["template"]["metadata"][
        "annotations"
    ]
    assert a["checksum/config"] != b["checksum/config"]


def pod_labels(workload: Obj) -> dict[str, str]:
    spec = workload["spec"]
    if workload["kind"] == "CronJob":
        spec = spec["jobTemplate"]["spec"]
    labels: dict[str, str] = spec["template"]["metadata"]["labels"]
    return labels


# --- the configuration the pod reads -------------------------------------------------


@pytest.mark.parametrize("case", [c for c in cases() if not MATRIX[c].get("existingConfigMap")])
def test_rendered_configuration_is_valid(case: str) -> None:
    """trustmgr.yaml as rendered passes trustmgr's own validation."""
    out = rendered(case)
    text = out.one("ConfigMap")["data"]["trustmgr.yaml"]
    config = parse(text, "trustmgr.yaml")
    if MATRIX[case].get("stateStore", {}).get("type") == "vault":
        assert config.state_store.kind == "vault"
    else:
        assert config.state_store.kubernetes is not None
        assert config.state_store.kubernetes.in_cluster
        assert config.state_store.kubernetes.namespace == NAMESPACE


def test_existing_configmap_is_mounted_and_none_rendered() -> None:
    out = rendered("cronjob-existing-configmap")
    assert not out.all("ConfigMap")
    volume = volumes(out.pod_spec())["config"]
    assert volume["configMap"]["name"] == "my-trustmgr-config"
    role = out.one("Role", "trustmgr-cacerts")
    assert role["metadata"]["namespace"] == "istio-system"
    assert any("deployments" in r["resources"] for r in role["rules"])


def test_state_store_name_and_renames() -> None:
    out = rendered("cronjob-renamed")
    assert out.config()["stateStore"]["kubernetes"]["name"] == "pki-state"
    role = out.one("Role", "pki")
    names = {n for r in role["rules"] for n in r.get("resourceNames", [])}
    assert names == {"pki-state", "pki-state-lock"}
    assert not out.all("ServiceAccount")
    pod = out.pod_spec()
    assert pod["serviceAccountName"] == "pki-runner"
    for binding in out.all("RoleBinding"):
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": "pki-runner", "namespace": NAMESPACE}
        ]
    assert (
        pod["containers"][0]["image"]
        == "registry.example.com/platform/trustmgr@sha256:" + "ab" * 32
    )
    assert pod["securityContext"] == {
        "runAsNonRoot": True,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


# --- credentials: existing Secrets and projected tokens, never values ------------------


def volumes(pod: Obj) -> dict[str, Obj]:
    return {v["name"]: v for v in pod.get("volumes", [])}


def mounts(pod: Obj) -> dict[str, str]:
    (container,) = pod["containers"]
    return {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}


def test_passphrase_comes_from_an_existing_secret_as_a_file() -> None:
    pod = rendered("cronjob").pod_spec()
    assert mounts(pod)["/etc/trustmgr/passphrase"] == "passphrase"
    secret = volumes(pod)["passphrase"]["secret"]
    assert secret["secretName"] == "trustmgr-passphrase"
    assert secret["items"] == [{"key": "passphrase", "path": "passphrase"}]
    assert secret["defaultMode"] == 0o440
    assert not rendered("cronjob").all("Secret")


def test_vault_kubernetes_auth_gets_a_projected_token_with_its_audience() -> None:
    out = rendered("cronjob-vault-state-remote-only")
    pod = out.pod_spec()
    assert mounts(pod)["/var/run/secrets/trustmgr/vault"] == "vault-sa-token"
    (source,) = volumes(pod)["vault-sa-token"]["projected"]["sources"]
    assert source["serviceAccountToken"] == {
        "path": "token",
        "audience": "vault.example.com",
        "expirationSeconds": 3600,
    }
    assert out.config()["stateStore"]["vault"]["address"] == "https://vault.example.com:8200"


def test_vault_token_approle_and_kubeconfigs_from_existing_secrets() -> None:
    pod = rendered("daemon-vault-approle-remote").pod_spec()
    mounted = mounts(pod)
    vols = volumes(pod)
    assert vols[mounted["/etc/trustmgr/vault-token"]]["secret"]["secretName"] == "vault-token"
    approle = vols[mounted["/etc/trustmgr/vault-approle"]]["secret"]
    assert approle["secretName"] == "vault-approle"
    assert [i["path"] for i in approle["items"]] == ["role-id", "secret-id"]
    for name in ("edge-1", "edge-2"):
        volume = vols[mounted[f"/etc/trustmgr/kubeconfigs/{name}"]]
        assert volume["secret"]["secretName"] == name
    assert mounted["/etc/trustmgr/vault-ca"] == "vault-ca"
    assert pod["containers"][0]["env"] == [{"name": "AWS_REGION", "value": "eu-west-1"}]


@pytest.mark.parametrize("case", list(cases()))
def test_no_secret_material_in_rendered_objects(case: str) -> None:
    out = rendered(case)
    assert not out.all("Secret")
    text = json.dumps(out.objects)
    assert "PRIVATE KEY" not in text
    for container in out.pod_spec()["containers"]:
        for env in container.get("env", []):
            assert "value" not in env or "secret" not in env["name"].lower()


@pytest.mark.parametrize("case", list(cases()))
def test_service_account_token_only_where_the_api_is_used(case: str) -> None:
    out = rendered(case)
    pod = out.pod_spec()
    assert pod["automountServiceAccountToken"] is False
    for account in out.all("ServiceAccount"):
        assert account["automountServiceAccountToken"] is False
    uses_api = case != "cronjob-vault-state-remote-only"
    api_mount = "/var/run/secrets/kubernetes.io/serviceaccount"
    assert (api_mount in mounts(pod)) is uses_api
    if uses_api:
        sources = volumes(pod)[mounts(pod)[api_mount]]["projected"]["sources"]
        assert sources[0]["serviceAccountToken"]["path"] == "token"
        assert "audience" not in sources[0]["serviceAccountToken"]
        assert sources[1]["configMap"]["name"] == "kube-root-ca.crt"


# --- least privilege ------------------------------------------------------------------

ALLOWED_VERBS = {"get", "update", "create", "patch"}


def rules_by_namespace(out: Rendered) -> dict[str, list[Obj]]:
    by: dict[str, list[Obj]] = {}
    for role in out.all("Role"):
        by.setdefault(role["metadata"]["namespace"], []).extend(role["rules"])
    return by


@pytest.mark.parametrize("case", list(cases()))
def test_rbac_is_least_privilege(case: str) -> None:
    out = rendered(case)
    assert not out.all("ClusterRole") and not out.all("ClusterRoleBinding")
    for role in out.all("Role"):
        for rule in role["rules"]:
            for field in ("verbs", "resources", "apiGroups", "resourceNames"):
                assert "*" not in rule.get(field, []), (role["metadata"]["name"], rule)
            assert set(rule["verbs"]) <= ALLOWED_VERBS, rule
            assert "nonResourceURLs" not in rule
            if "resourceNames" not in rule:
                # Unnamed rules can only create: nothing to read, list or change.
                assert rule["verbs"] == ["create"], rule
            if rule["apiGroups"] == ["apps"]:
                assert rule["resources"] == ["deployments"] and rule["verbs"] == ["patch"]
    for binding in out.all("RoleBinding"):
        assert binding["roleRef"]["kind"] == "Role"
        roles = [
            r
            for r in out.all("Role")
            if r["metadata"]["name"] == binding["roleRef"]["name"]
            and r["metadata"]["namespace"] == binding["metadata"]["namespace"]
        ]
        assert len(roles) == 1
        assert binding["subjects"] == [
            {
                "kind": "ServiceAccount",
                "name": out.pod_spec()["serviceAccountName"],
                "namespace": NAMESPACE,
            }
        ]


@pytest.mark.parametrize("case", list(cases()))
def test_secret_writes_only_on_named_secrets(case: str) -> None:
    """Secrets are read and changed only by name: the state Secret in trustmgr's
    namespace, each cacerts and its kept copy where the targets are; create only
    where it is needed (the state, and the targets when opted in)."""
    out = rendered(case)
    values = out.values
    state = None
    if values["stateStore"]["type"] == "kubernetes":
        state = values["stateStore"]["kubernetes"]["name"] or f"{fullname(values)}-state"
    for namespace, rules in rules_by_namespace(out).items():
        for rule in rules:
            if rule["resources"] != ["secrets"]:
                continue
            if "resourceNames" not in rule:
                own = namespace == NAMESPACE and state is not None
                assert own or values["rbac"]["createSecrets"], (namespace, rule)
                continue
            assert set(rule["verbs"]) == {"get", "update"}
            for name in rule["resourceNames"]:
                if namespace == NAMESPACE and name == state:
                    continue
                assert name.startswith("cacerts"), name


def fullname(values: Obj) -> str:
    return str(values.get("fullnameOverride") or RELEASE)


def test_target_roles_follow_the_configuration() -> None:
    out = rendered("cronjob-two-namespaces")
    by = rules_by_namespace(out)
    assert set(by) == {NAMESPACE, "istio-system", "istio-canary"}
    assert by["istio-system"] == [
        {
            "apiGroups": [""],
            "resources": ["secrets"],
            "resourceNames": ["cacerts", "cacerts-trustmgr-previous"],
            "verbs": ["get", "update"],
        },
        {"apiGroups": [""], "resources": ["secrets"], "verbs": ["create"]},
        {
            "apiGroups": ["apps"],
            "resources": ["deployments"],
            "resourceNames": ["istiod"],
            "verbs": ["patch"],
        },
    ]
    canary = by["istio-canary"]
    assert canary[0]["resourceNames"] == ["cacerts-canary", "cacerts-canary-trustmgr-previous"]
    assert canary[2]["resourceNames"] == ["istiod-1-24"]


def test_no_istiod_patch_without_restarts_and_no_create_unless_opted_in() -> None:
    out = rendered("cronjob-no-create-no-restart")
    rules = rules_by_namespace(out)["istio-system"]
    assert rules == [
        {
            "apiGroups": [""],
            "resources": ["secrets"],
            "resourceNames": ["cacerts", "cacerts-trustmgr-previous"],
            "verbs": ["get", "update"],
        }
    ]
    assert "rbac.createSecrets is false" in out.notes


def test_state_and_leader_leases_in_own_namespace() -> None:
    rules = rules_by_namespace(rendered("daemon"))[NAMESPACE]
    assert rules == [
        {
            "apiGroups": [""],
            "resources": ["secrets"],
            "resourceNames": ["trustmgr-state"],
            "verbs": ["get", "update"],
        },
        {"apiGroups": [""], "resources": ["secrets"], "verbs": ["create"]},
        {
            "apiGroups": ["coordination.k8s.io"],
            "resources": ["leases"],
            "resourceNames": ["trustmgr-state-lock", "trustmgr-leader"],
            "verbs": ["get", "update"],
        },
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
    ]


def test_vault_state_and_remote_targets_need_no_role_here() -> None:
    out = rendered("cronjob-vault-state-remote-only")
    assert not out.all("Role") and not out.all("RoleBinding")


def test_rbac_can_be_left_to_the_operator() -> None:
    out = rendered("cronjob-no-rbac")
    assert not out.all("Role") and not out.all("RoleBinding")


# --- Pod Security "restricted" ---------------------------------------------------------

RESTRICTED_VOLUME_TYPES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}


def restricted_violations(pod: Obj) -> list[str]:
    """The checks of the Pod Security Standards' restricted profile (v1.29+)."""
    problems: list[str] = []
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(field):
            problems.append(field)
    pod_sc = pod.get("securityContext", {})
    if pod_sc.get("sysctls"):
        problems.append("sysctls")
    for volume in pod.get("volumes", []):
        kinds = set(volume) - {"name"}
        if not kinds <= RESTRICTED_VOLUME_TYPES:
            problems.append(f"volume {volume['name']}: {kinds}")
    pod_seccomp = pod_sc.get("seccompProfile", {}).get("type")
    for container in pod.get("initContainers", []) + pod["containers"]:
        sc = container.get("securityContext", {})
        name = container["name"]
        if sc.get("privileged"):
            problems.append(f"{name}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{name}: allowPrivilegeEscalation")
        caps = sc.get("capabilities", {})
        if "ALL" not in caps.get("drop", []):
            problems.append(f"{name}: capabilities not dropped")
        if set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
            problems.append(f"{name}: capabilities added")
        if not (sc.get("runAsNonRoot") or pod_sc.get("runAsNonRoot")):
            problems.append(f"{name}: runAsNonRoot")
        if sc.get("runAsUser") == 0 or pod_sc.get("runAsUser") == 0:
            problems.append(f"{name}: runAsUser 0")
        seccomp = sc.get("seccompProfile", {}).get("type") or pod_seccomp
        if seccomp not in ("RuntimeDefault", "Localhost"):
            problems.append(f"{name}: seccomp")
        if sc.get("procMount", "Default") != "Default":
            problems.append(f"{name}: procMount")
        if any(p.get("hostPort") for p in container.get("ports", [])):
            problems.append(f"{name}: hostPort")
    return problems


@pytest.mark.parametrize("case", list(cases()))
def test_pods_meet_the_restricted_profile(case: str) -> None:
    pod = rendered(case).pod_spec()
    assert restricted_violations(pod) == []
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    for container in pod["containers"]:
        sc = container["securityContext"]
        assert sc == {
            "runAsNonRoot": True,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        }
        resources = container["resources"]
        assert resources["requests"]["memory"] and resources["limits"]["memory"]
        assert resources["requests"]["cpu"]
        assert mounts(pod)["/tmp"] == "tmp"  # the only writable path
        for mount in container["volumeMounts"]:
            assert mount.get("readOnly") or mount["mountPath"] == "/tmp", mount


def test_restricted_checker_finds_violations() -> None:
    pod = copy.deepcopy(rendered("cronjob").pod_spec())
    pod["hostNetwork"] = True
    pod["volumes"].append({"name": "host", "hostPath": {"path": "/"}})
    sc = pod["containers"][0]["securityContext"]
    sc["allowPrivilegeEscalation"] = True
    sc["capabilities"] = {"add": ["SYS_ADMIN"]}
    assert restricted_violations(pod) == [
        "hostNetwork",
        "volume host: {'hostPath'}",
        "trustmgr: allowPrivilegeEscalation",
        "trustmgr: capabilities not dropped",
        "trustmgr: capabilities added",
    ]


# --- values the chart refuses --------------------------------------------------------------

BAD_VALUES: dict[str, tuple[Obj, str]] = {
    "unknown mode": ({"mode": "sidecar"}, "/mode"),
    "root user": ({"securityContext": {"runAsUser": 0}}, "/securityContext/runAsUser"),
    "stateStore in config": ({"config": {"stateStore": {"file": {}}}}, "stateStore"),
    "daemon in config": ({"config": {"daemon": {"interval": "1m"}}}, "daemon"),
    "privileged port": ({"mode": "daemon", "daemon": {"port": 443}}, "/daemon/port"),
    "schedule": ({"cronjob": {"schedule": "every hour"}}, "/cronjob/schedule"),
    "schedule with time zone": ({"cronjob": {"schedule": "CRON_TZ=UTC 0 * * * *"}}, "schedule"),
    "duration": ({"daemon": {"interval": "5 minutes"}}, "/daemon/interval"),
    "digest": ({"image": {"digest": "sha256:abc"}}, "/image/digest"),
    "secret name": ({"passphrase": {"existingSecret": "My_Secret"}}, "/passphrase/existingSecret"),
    "unknown value": ({"replicas": 2}, "replicas"),
    "no memory limit": ({"resources": {"limits": {"memory": None}}}, "/resources/limits"),
    "zero replicas": ({"daemon": {"replicas": 0}}, "/daemon/replicas"),
    "remote cluster without secret": ({"remoteClusters": [{}]}, "/remoteClusters/0"),
    "target with a typo": ({"rbac": {"targets": [{"namspace": "x"}]}}, "/rbac/targets/0"),
    "state store kind": ({"stateStore": {"type": "file"}}, "/stateStore/type"),
    "vault address": ({"stateStore": {"vault": {"address": "vault:8200"}}}, "address"),
    "no configuration": ({"config!": {}}, "set config (providers and meshes"),
    "config and configmap": ({"existingConfigMap": "mine"}, "not both"),
    "vault state without address": (
        {"stateStore": {"type": "vault"}},
        "needs stateStore.vault.address",
    ),
    "vault settings unused": (
        {"stateStore": {"vault": {"address": "https://vault:8200"}}},
        "stateStore.type is kubernetes",
    ),
    "monitor without service": (
        {
            "mode": "daemon",
            "metrics": {"service": {"enabled": False}, "serviceMonitor": {"enabled": True}},
        },
        "needs metrics.service.enabled",
    ),
}


@pytest.mark.parametrize("case", list(BAD_VALUES))
def test_bad_values_are_refused_at_render_time(case: str) -> None:
    override, message = BAD_VALUES[case]
    values = merged(base_values(), override)
    with pytest.raises((helm_python.HelmValuesError, helm_python.HelmRenderError)) as caught:
        render(values)
    assert message in str(caught.value)
