"""The chart's mode ``agent``, rendered by Helm's own engine as tests/test_chart.py
renders the other modes: strict lint, the Kubernetes schemas in strict mode, the
rendered agent.yaml read by the agent's own schema (so the chart and
``AgentConfig`` cannot drift apart), exactly one least-privilege Role whose names
come from that same file and from the agent's exchange, the Pod Security
"restricted" profile, and every value the chart must refuse in this mode."""

from __future__ import annotations

import copy
import functools
import json
from pathlib import PurePosixPath
from typing import Any

import helm_python
import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.test_chart import (
    ALLOWED_VERBS,
    CHART,
    NAMESPACE,
    Rendered,
    base_values,
    kube_versions,
    merged,
    mounts,
    pod_labels,
    pod_spec,
    render,
    restricted_violations,
    validate_strict,
    volumes,
)
from trustmgr.agent.config import DEFAULT_AGENT_CONFIG, AgentConfig
from trustmgr.agent.document import load_public_key, public_key_pem
from trustmgr.agent.exchange import DESIRED_NAME, LOCAL_NAME, REPORT_NAME
from trustmgr.config import parse_as
from trustmgr.errors import ConfigError
from trustmgr.providers.config import VaultKubernetesAuth
from trustmgr.targets.kubernetes import BACKUP_SUFFIX

Obj = dict[str, Any]

AGENT_YAML = "/etc/trustmgr/agent.yaml"
PUBLISHER = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
"""The publisher key whose public half ci/agent-values.yaml holds."""
API_TOKEN_DIR = str(PurePosixPath(VaultKubernetesAuth.model_fields["token_path"].default).parent)
"""Where Vault Kubernetes auth reads the pod's API token unless told otherwise."""


def agent_values() -> Obj:
    """Cluster a1's agent: a Vault role of its own, istiod restarted (the ci values file)."""
    values: Obj = yaml.safe_load((CHART / "ci" / "agent-values.yaml").read_text())
    return values


MATRIX: dict[str, Obj] = {
    "agent-cronjob": {},
    "agent-cronjob-no-restart": {"agent": {"istio": {"restartIstiod": False}}},
    "agent-deployment": {
        "agent": {
            "runAs": "deployment",
            "namespace": "istio-canary",
            "secretName": "cacerts-canary",
            "istiodDeployment": "istiod-1-24",
            "interval": "10m",
            "jitter": "0s",
            "terminationGracePeriodSeconds": 120,
            "istio!": {},
            "providers!": {
                "pca": {"acmPca": {"assumeRoleArn": "arn:aws:iam::123456789012:role/trustmgr-a1"}},
                "vault-b": {
                    "vault": {
                        "auth": {
                            "kubernetes": {
                                "role": "cluster-a1",
                                "tokenPath": "/var/run/secrets/trustmgr/vault/token",
                            }
                        }
                    }
                },
            },
        },
        "vault": {"kubernetesAuth": {"enabled": True, "audience": "vault.example.com"}},
        "serviceAccount": {
            "annotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/a1"}
        },
        "extraEnv": [{"name": "AWS_REGION", "value": "eu-west-1"}],
    },
    "agent-renamed": {
        "fullnameOverride": "pki",
        "serviceAccount": {"create": False, "name": "pki-agent"},
        "securityContext": {"runAsUser": None, "runAsGroup": None, "fsGroup": None},
        "cronjob": {"timeZone": "Europe/Berlin", "suspend": True, "backoffLimit": 0},
        "agent": {"schedule": "@hourly", "logFormat": "text"},
    },
    "agent-no-rbac": {"rbac": {"create": False}},
}


@functools.cache
def rendered(case: str) -> Rendered:
    return render(merged(agent_values(), MATRIX[case]))


def agent_yaml(out: Rendered) -> str:
    text: str = out.one("ConfigMap")["data"]["agent.yaml"]
    return text


def agent_config(out: Rendered) -> AgentConfig:
    return parse_as(AgentConfig, agent_yaml(out), "agent.yaml")


@functools.cache
def _validated(serialized: str, version: str) -> None:
    validate_strict(json.loads(serialized), version)


# --- Helm and Kubernetes accept it ---------------------------------------------------


@pytest.mark.parametrize("case", list(MATRIX))
def test_agent_objects_validate_against_kubernetes_1_29_to_newest(case: str) -> None:
    objects = rendered(case).objects
    assert objects
    for obj in objects:
        for version in kube_versions():
            _validated(json.dumps(obj, sort_keys=True), version)


@pytest.mark.parametrize("case", list(MATRIX))
def test_agent_lint_strict(case: str) -> None:
    report = helm_python.lint(
        CHART, merged(agent_values(), MATRIX[case]), strict=True, namespace=NAMESPACE
    )
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


# --- agent.yaml is what the agent reads -------------------------------------------------


@pytest.mark.parametrize("case", list(MATRIX))
def test_agent_yaml_passes_the_agents_own_schema(case: str) -> None:
    """The rendered file parses as AgentConfig and says what the values say."""
    out = rendered(case)
    config = agent_config(out)
    agent = out.values["agent"]
    assert config.cluster == agent["cluster"] == "a1"
    assert config.publisher_key is not None and config.publisher_key_file is None
    key = load_public_key(config.publisher_key.encode(), "agent.yaml")
    assert public_key_pem(key) == public_key_pem(PUBLISHER.public_key())
    assert config.directory is None
    kube = config.kubernetes
    assert kube is not None
    assert kube.in_cluster and kube.kubeconfig is None and kube.context is None
    assert kube.namespace == agent["namespace"]
    assert kube.secret_name == agent["secretName"]
    assert kube.istiod_deployment == agent["istiodDeployment"]
    assert config.istio.model_dump(by_alias=True, exclude_unset=True) == agent["istio"]
    assert set(config.providers) == set(agent["providers"])
    raw = yaml.safe_load(agent_yaml(out))
    assert raw.get("providers", {}) == agent["providers"]
    assert (raw["interval"], raw["jitter"]) == (agent["interval"], agent["jitter"])


def test_agent_yaml_settings_arrive_typed() -> None:
    config = agent_config(rendered("agent-deployment"))
    assert config.interval.total_seconds() == 600
    assert config.jitter.total_seconds() == 0
    pca = config.providers["pca"].acm_pca
    assert pca is not None
    assert pca.assume_role_arn == "arn:aws:iam::123456789012:role/trustmgr-a1"
    vault = config.providers["vault-b"].vault
    assert vault is not None and vault.auth.kubernetes is not None
    assert vault.auth.kubernetes.token_path == "/var/run/secrets/trustmgr/vault/token"
    cronjob = agent_config(rendered("agent-cronjob"))
    assert cronjob.istio.version == "1.24" and cronjob.istio.multi_root
    assert cronjob.istio.restart_istiod
    vault_a = cronjob.providers["vault-a"].vault
    assert vault_a is not None and vault_a.auth.kubernetes is not None
    assert vault_a.auth.kubernetes.role == "cluster-a1"


def test_the_schema_check_is_not_vacuous() -> None:
    """AgentConfig refuses a rendered file with a field the agent does not know, or
    without its cluster: the test above would catch the chart drifting."""
    data = yaml.safe_load(agent_yaml(rendered("agent-cronjob")))
    drifted = copy.deepcopy(data)
    drifted["kubernetes"]["secretname"] = drifted["kubernetes"].pop("secretName")
    with pytest.raises(ConfigError, match="secretname"):
        parse_as(AgentConfig, yaml.safe_dump(drifted), "agent.yaml")
    del data["cluster"]
    with pytest.raises(ConfigError, match="cluster"):
        parse_as(AgentConfig, yaml.safe_dump(data), "agent.yaml")


@pytest.mark.parametrize("case", list(MATRIX))
def test_agent_yaml_is_mounted_where_the_command_reads_it(case: str) -> None:
    out = rendered(case)
    pod = out.pod_spec()
    (container,) = pod["containers"]
    assert container["args"][container["args"].index("--config") + 1] == AGENT_YAML
    assert AGENT_YAML == DEFAULT_AGENT_CONFIG
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == AGENT_YAML]
    assert mount == {
        "name": "config",
        "mountPath": AGENT_YAML,
        "subPath": "agent.yaml",
        "readOnly": True,
    }
    configmap = out.one("ConfigMap")
    assert volumes(pod)["config"]["configMap"] == {
        "name": configmap["metadata"]["name"],
        "items": [{"key": "agent.yaml", "path": "agent.yaml"}],
    }
    assert set(configmap["data"]) == {"agent.yaml"}
    assert not any(m["mountPath"] == "/etc/trustmgr/config" for m in container["volumeMounts"])


def test_agent_yaml_change_rolls_the_pods() -> None:
    def checksum(values: Obj) -> str:
        template = render(values).workload()["spec"]["jobTemplate"]["spec"]["template"]
        annotations: dict[str, str] = template["metadata"]["annotations"]
        return annotations["checksum/config"]

    values = agent_values()
    same = checksum(values)
    assert checksum(merged(values, {"podAnnotations": {"team": "platform"}})) == same
    assert checksum(merged(values, {"agent": {"interval": "10m"}})) != same
    assert checksum(merged(values, {"agent": {"secretName": "cacerts-2"}})) != same


# --- what runs -----------------------------------------------------------------------------


def test_agent_as_cronjob() -> None:
    out = rendered("agent-cronjob")
    cronjob = out.one("CronJob", "trustmgr")
    spec = cronjob["spec"]
    assert spec["schedule"] == "*/5 * * * *"
    assert spec["concurrencyPolicy"] == "Forbid"
    assert spec["jobTemplate"]["spec"]["backoffLimit"] == 2
    pod = pod_spec(cronjob)
    assert pod["restartPolicy"] == "Never"
    (container,) = pod["containers"]
    assert container["command"] == ["trustmgr"]
    assert container["args"] == [
        "agent",
        "run",
        "--config",
        AGENT_YAML,
        "--once",
        "--log-format",
        "json",
    ]
    assert "ports" not in container and "livenessProbe" not in container
    assert cronjob["metadata"]["labels"]["app.kubernetes.io/component"] == "agent"
    assert not out.all("Deployment")
    assert 'CronJob trustmgr runs `trustmgr agent run --once` on "*/5 * * * *"' in out.notes
    assert "as cluster a1" in out.notes
    assert f"ConfigMap {DESIRED_NAME}" in out.notes and f"ConfigMap {REPORT_NAME}" in out.notes
    assert "restarts deployment istiod when" in out.notes


def test_agent_cronjob_takes_the_other_cronjob_settings() -> None:
    out = rendered("agent-renamed")
    spec = out.one("CronJob", "pki")["spec"]
    assert spec["schedule"] == "@hourly"
    assert out.pod_spec()["containers"][0]["args"][-2:] == ["--log-format", "text"]
    assert spec["timeZone"] == "Europe/Berlin" and spec["suspend"] is True
    assert spec["jobTemplate"]["spec"]["backoffLimit"] == 0
    assert "SUSPENDED" in out.notes


def test_agent_as_deployment() -> None:
    out = rendered("agent-deployment")
    deployment = out.one("Deployment", "trustmgr")
    spec = deployment["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}
    assert spec["selector"]["matchLabels"].items() <= pod_labels(deployment).items()
    pod = pod_spec(deployment)
    assert pod["terminationGracePeriodSeconds"] == 120
    (container,) = pod["containers"]
    assert container["command"] == ["trustmgr"]
    assert container["args"] == ["agent", "run", "--config", AGENT_YAML, "--log-format", "json"]
    assert "ports" not in container and "livenessProbe" not in container
    assert "readinessProbe" not in container
    assert container["env"] == [{"name": "AWS_REGION", "value": "eu-west-1"}]
    # The daemon's defaults (a budget, a metrics Service) are not the agent's.
    assert not out.all("CronJob") and not out.all("Service")
    assert not out.all("PodDisruptionBudget") and not out.all("ServiceMonitor")
    assert "Deployment trustmgr (one replica) runs `trustmgr agent run`, a pass every 10m" in (
        out.notes
    )
    assert "restarts deployment" not in out.notes


@pytest.mark.parametrize("case", list(MATRIX))
def test_agent_renders_nothing_of_the_central_run(case: str) -> None:
    """No trustmgr.yaml, state Secret, Lease or target Role; no secret material."""
    out = rendered(case)
    kinds = {o["kind"] for o in out.objects}
    assert kinds <= {"ConfigMap", "CronJob", "Deployment", "ServiceAccount", "Role", "RoleBinding"}
    text = json.dumps(out.objects)
    assert "trustmgr.yaml" not in text and "leases" not in text and "-state" not in text
    assert "PRIVATE KEY" not in text
    assert "State:" not in out.notes and "rbac.createSecrets" not in out.notes


# --- least privilege ---------------------------------------------------------------------------

SECRETS_RULE = {
    "apiGroups": [""],
    "resources": ["secrets"],
    "resourceNames": ["cacerts", "cacerts-trustmgr-previous", "trustmgr-agent"],
    "verbs": ["get", "update"],
}
CREATE_SECRETS = {"apiGroups": [""], "resources": ["secrets"], "verbs": ["create"]}
DESIRED_RULE = {
    "apiGroups": [""],
    "resources": ["configmaps"],
    "resourceNames": ["trustmgr-desired"],
    "verbs": ["get"],
}
REPORT_RULE = {
    "apiGroups": [""],
    "resources": ["configmaps"],
    "resourceNames": ["trustmgr-report"],
    "verbs": ["get", "update"],
}
CREATE_CONFIGMAPS = {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["create"]}
ISTIOD_RULE = {
    "apiGroups": ["apps"],
    "resources": ["deployments"],
    "resourceNames": ["istiod"],
    "verbs": ["patch"],
}


def test_agent_role_is_exactly_the_agents_needs_with_istiod_restart() -> None:
    out = rendered("agent-cronjob")
    role = out.one("Role")
    assert role["metadata"]["name"] == "trustmgr-agent"
    assert role["metadata"]["namespace"] == "istio-system"
    assert role["rules"] == [
        SECRETS_RULE,
        CREATE_SECRETS,
        DESIRED_RULE,
        REPORT_RULE,
        CREATE_CONFIGMAPS,
        ISTIOD_RULE,
    ]


def test_agent_role_has_no_deployments_rule_without_istiod_restart() -> None:
    role = rendered("agent-cronjob-no-restart").one("Role")
    assert role["rules"] == [
        SECRETS_RULE,
        CREATE_SECRETS,
        DESIRED_RULE,
        REPORT_RULE,
        CREATE_CONFIGMAPS,
    ]
    # istio: {} (restartIstiod unset) is the same.
    assert not any(
        r["apiGroups"] == ["apps"] for r in rendered("agent-deployment").one("Role")["rules"]
    )


@pytest.mark.parametrize("case", [c for c in MATRIX if c != "agent-no-rbac"])
def test_agent_role_names_what_agent_yaml_and_the_exchange_name(case: str) -> None:
    """Derived from the file the agent reads and the agent's own constants, not
    from the values: a renamed Secret, namespace or istiod moves the Role with it."""
    out = rendered(case)
    config = agent_config(out)
    kube = config.kubernetes
    assert kube is not None
    role = out.one("Role")
    assert role["metadata"]["namespace"] == kube.namespace
    expected = [
        {
            "apiGroups": [""],
            "resources": ["secrets"],
            "resourceNames": [kube.secret_name, kube.secret_name + BACKUP_SUFFIX, LOCAL_NAME],
            "verbs": ["get", "update"],
        },
        CREATE_SECRETS,
        {
            "apiGroups": [""],
            "resources": ["configmaps"],
            "resourceNames": [DESIRED_NAME],
            "verbs": ["get"],
        },
        {
            "apiGroups": [""],
            "resources": ["configmaps"],
            "resourceNames": [REPORT_NAME],
            "verbs": ["get", "update"],
        },
        CREATE_CONFIGMAPS,
    ]
    if config.istio.restart_istiod:
        expected.append(
            {
                "apiGroups": ["apps"],
                "resources": ["deployments"],
                "resourceNames": [kube.istiod_deployment],
                "verbs": ["patch"],
            }
        )
    assert role["rules"] == expected


@pytest.mark.parametrize("case", list(MATRIX))
def test_agent_rbac_is_one_namespaced_least_privilege_role(case: str) -> None:
    out = rendered(case)
    assert not out.all("ClusterRole") and not out.all("ClusterRoleBinding")
    if not out.values["rbac"]["create"]:
        assert not out.all("Role") and not out.all("RoleBinding")
        assert "rbac.create is false" in out.notes
        return
    role, binding = out.one("Role"), out.one("RoleBinding")
    namespace = out.values["agent"]["namespace"]
    assert role["metadata"]["namespace"] == binding["metadata"]["namespace"] == namespace
    for rule in role["rules"]:
        for field in ("verbs", "resources", "apiGroups", "resourceNames"):
            assert "*" not in rule.get(field, []), rule
        assert set(rule["verbs"]) <= ALLOWED_VERBS, rule
        assert "nonResourceURLs" not in rule
        if "resourceNames" not in rule:
            assert rule["verbs"] == ["create"], rule
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    assert binding["subjects"] == [
        {
            "kind": "ServiceAccount",
            "name": out.pod_spec()["serviceAccountName"],
            "namespace": NAMESPACE,
        }
    ]


def test_agent_role_and_service_account_renamed() -> None:
    out = rendered("agent-renamed")
    assert out.one("Role")["metadata"]["name"] == "pki-agent"
    assert not out.all("ServiceAccount")
    assert out.pod_spec()["serviceAccountName"] == "pki-agent"
    assert out.one("RoleBinding")["subjects"][0]["name"] == "pki-agent"


# --- the pod ----------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(MATRIX))
def test_agent_pod_meets_the_restricted_profile(case: str) -> None:
    pod = rendered(case).pod_spec()
    assert restricted_violations(pod) == []
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (container,) = pod["containers"]
    assert container["securityContext"] == {
        "runAsNonRoot": True,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    resources = container["resources"]
    assert resources["requests"]["memory"] and resources["limits"]["memory"]
    assert resources["requests"]["cpu"]
    assert mounts(pod)["/tmp"] == "tmp"
    for mount in container["volumeMounts"]:
        assert mount.get("readOnly") or mount["mountPath"] == "/tmp", mount


def test_agent_pod_user_and_image_follow_the_values() -> None:
    default = rendered("agent-cronjob").pod_spec()
    assert default["securityContext"]["runAsUser"] == 65532
    assert default["containers"][0]["image"].startswith("trustmgr:")
    renamed = rendered("agent-renamed").pod_spec()
    assert renamed["securityContext"] == {
        "runAsNonRoot": True,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


@pytest.mark.parametrize("case", list(MATRIX))
def test_agent_pod_gets_its_api_token_where_vault_kubernetes_auth_reads_it(case: str) -> None:
    """The agent always talks to its own cluster's API, and Vault Kubernetes auth
    reads the same token by default: projected (automount stays off), with the API
    server's audience, at the directory of VaultKubernetesAuth's default tokenPath."""
    out = rendered(case)
    pod = out.pod_spec()
    assert pod["automountServiceAccountToken"] is False
    for account in out.all("ServiceAccount"):
        assert account["automountServiceAccountToken"] is False
    assert API_TOKEN_DIR == "/var/run/secrets/kubernetes.io/serviceaccount"
    sources = volumes(pod)[mounts(pod)[API_TOKEN_DIR]]["projected"]["sources"]
    assert sources[0]["serviceAccountToken"]["path"] == "token"
    assert "audience" not in sources[0]["serviceAccountToken"]
    assert sources[1]["configMap"]["name"] == "kube-root-ca.crt"


def test_agent_vault_token_of_its_own_audience_when_asked() -> None:
    pod = rendered("agent-deployment").pod_spec()
    (source,) = volumes(pod)[mounts(pod)["/var/run/secrets/trustmgr/vault"]]["projected"]["sources"]
    assert source["serviceAccountToken"]["audience"] == "vault.example.com"


# --- values the chart refuses in mode agent --------------------------------------------------------

PRIVATE_PEM = PUBLISHER.private_bytes(
    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
).decode()
PUBLIC_PEM = public_key_pem(PUBLISHER.public_key()).decode()
CERTIFICATE_PEM = "-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIU\n-----END CERTIFICATE-----\n"

BAD_AGENT_VALUES: dict[str, tuple[Obj, str]] = {
    "no cluster": (
        {"agent": {"cluster": ""}},
        "mode agent needs agent.cluster: this cluster's name in the central configuration",
    ),
    "no publisher key": (
        {"agent": {"publisherKey": ""}},
        "mode agent needs agent.publisherKey: the PEM public key that "
        "`trustmgr agent publisher-key` prints",
    ),
    "blank publisher key": ({"agent": {"publisherKey": " \n"}}, "needs agent.publisherKey"),
    "neither cluster nor key": (
        {"agent": {"cluster": "", "publisherKey": ""}},
        "mode agent needs agent.cluster",
    ),
    "private key as publisher key": (
        {"agent": {"publisherKey": PRIVATE_PEM}},
        "agent.publisherKey holds a PRIVATE key",
    ),
    "private key after the public key": (
        {"agent": {"publisherKey": PUBLIC_PEM + PRIVATE_PEM}},
        "agent.publisherKey holds a PRIVATE key",
    ),
    "certificate as publisher key": (
        {"agent": {"publisherKey": CERTIFICATE_PEM}},
        "agent.publisherKey is not one PEM public key",
    ),
    "two public keys": (
        {"agent": {"publisherKey": PUBLIC_PEM + PUBLIC_PEM}},
        "agent.publisherKey is not one PEM public key",
    ),
    "publisher key without PEM armour": (
        {"agent": {"publisherKey": "MCowBQYDK2VwAyEAA6EHv/POEL4dcN0Y50vAmWfk1jCbpQ1fHdyGZBJVMbg="}},
        "agent.publisherKey is not one PEM public key",
    ),
    "cluster name": ({"agent": {"cluster": "A1"}}, "/agent/cluster"),
    "cluster name too long": ({"agent": {"cluster": "a" * 64}}, "/agent/cluster"),
    "runAs": ({"agent": {"runAs": "daemonset"}}, "/agent/runAs"),
    "schedule": ({"agent": {"schedule": "every 5 minutes"}}, "/agent/schedule"),
    "interval": ({"agent": {"interval": "5 minutes"}}, "/agent/interval"),
    "jitter": ({"agent": {"jitter": "-1s"}}, "/agent/jitter"),
    "log format": ({"agent": {"logFormat": "yaml"}}, "/agent/logFormat"),
    "namespace": ({"agent": {"namespace": "Istio_System"}}, "/agent/namespace"),
    "secret name": ({"agent": {"secretName": "ca certs"}}, "/agent/secretName"),
    "istiod name": ({"agent": {"istiodDeployment": "istiod/x"}}, "/agent/istiodDeployment"),
    "istio typo": ({"agent": {"istio": {"restartistiod": True}}}, "restartistiod"),
    "istio version": ({"agent": {"istio": {"version": "latest"}}}, "/agent/istio/version"),
    "provider with two kinds": (
        {"agent": {"providers": {"both": {"vault": {"auth": {}}, "acmPca": {}}}}},
        "/agent/providers/both",
    ),
    "provider of a kind the agent has no credentials for": (
        {"agent": {"providers": {"root": {"selfSigned": {}}}}},
        "/agent/providers/root",
    ),
    "vault provider without auth": (
        {"agent": {"providers": {"vault-z": {"vault": {"caCert": "/etc/vault/ca.pem"}}}}},
        "/agent/providers/vault-z/vault",
    ),
    "unknown agent value": ({"agent": {"replicas": 2}}, "replicas"),
    "central configuration": (
        {"config": {"meshes": {"web": {"trustDomain": "web.corp"}}}},
        "mode agent does not read config or existingConfigMap",
    ),
    "existing configmap": ({"existingConfigMap": "mine"}, "does not read config"),
    "vault state store": (
        {"stateStore": {"type": "vault", "vault": {"address": "https://vault:8200"}}},
        "mode agent keeps no state store",
    ),
    "state secret name": (
        {"stateStore": {"kubernetes": {"name": "x"}}},
        "mode agent keeps no state store",
    ),
    "passphrase": (
        {"passphrase": {"existingSecret": "trustmgr-passphrase"}},
        "drop passphrase.existingSecret",
    ),
    "remote clusters": ({"remoteClusters": [{"kubeconfigSecret": "b2"}]}, "drop remoteClusters"),
    "rbac targets": ({"rbac": {"targets": [{"namespace": "istio-system"}]}}, "drop rbac.targets"),
}


def _refusal(values: Obj) -> str:
    with pytest.raises((helm_python.HelmValuesError, helm_python.HelmRenderError)) as caught:
        render(values)
    return str(caught.value)


@pytest.mark.parametrize("case", list(BAD_AGENT_VALUES))
def test_bad_agent_values_are_refused_at_render_time(case: str) -> None:
    override, message = BAD_AGENT_VALUES[case]
    assert message in _refusal(merged(agent_values(), override))


def test_agent_settings_without_mode_agent_are_refused() -> None:
    """Agent values with the mode forgotten say so, not "set config"; and a central
    install with agent settings in it is refused rather than ignoring them."""
    forgotten = {k: v for k, v in agent_values().items() if k != "mode"}
    message = _refusal(forgotten)
    assert "agent.cluster is set but mode is cronjob; set mode: agent" in message
    daemon = merged(base_values(), {"mode": "daemon", "agent": {"cluster": "a1"}})
    assert "agent.cluster is set but mode is daemon" in _refusal(daemon)


def test_the_central_modes_still_render_with_the_agent_defaults() -> None:
    out = render(base_values())
    assert out.values["agent"]["cluster"] == ""
    assert "trustmgr.yaml" in out.one("ConfigMap")["data"]
    assert not [r for r in out.all("Role") if r["metadata"]["name"].endswith("-agent")]


def test_the_refused_values_fail_for_their_own_fault() -> None:
    """Every refusal above starts from values that render: the ci agent values."""
    out = render(agent_values())
    assert out.one("Role")["rules"][0] == SECRETS_RULE
    assert agent_config(out).cluster == "a1"
