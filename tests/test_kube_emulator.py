"""The Kubernetes API emulator's rules, checked through the official ``kubernetes`` client."""

# The fixtures are imported, so this module runs without conftest wiring; pytest injects them as
# parameters of the same names, which pyflakes would call unused imports and redefinitions.
# ruff: noqa: F401, F811

from __future__ import annotations

import base64
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
import urllib3
import yaml
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from tests.kube_emulator import (
    ApiError,
    Fault,
    KubeEmulator,
    merge_kubeconfigs,
    start_many,
    stop_many,
)
from tests.kube_fixtures import (
    KubeEmulatorFactory,
    kube_client,
    kube_emulator,
    kube_emulator_factory,
    new_api_client,
)

NS = "istio-system"


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def secret(name: str = "cacerts", labels: dict[str, str] | None = None, **data: str) -> Any:
    """A Secret body in istio-system; ``ca_crt="x"`` becomes data key ``ca-crt``."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": NS, "labels": labels or {}},
        "data": {key.replace("_", "-"): b64(value) for key, value in data.items()},
    }


def secret_in(namespace: str) -> Any:
    return {"metadata": {"name": "cacerts", "namespace": namespace}}


def deployment(name: str = "istiod") -> dict[str, Any]:
    labels = {"app": name}
    template_meta = {"labels": labels, "annotations": {"existing": "kept"}}
    container = {"name": "discovery", "image": "istio/pilot:1.24"}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": NS, "labels": labels},
        "spec": {
            "selector": {"matchLabels": labels},
            "template": {"metadata": template_meta, "spec": {"containers": [container]}},
        },
    }


def status_body(exc: pytest.ExceptionInfo[ApiException]) -> Any:
    assert exc.value.body is not None
    return json.loads(exc.value.body)


def core_api(api_client: Any) -> Any:
    """CoreV1Api, untyped: its models make every field Optional."""
    return client.CoreV1Api(api_client)


@pytest.fixture
def core(kube_client: Any) -> Any:
    return core_api(kube_client)


@pytest.fixture
def apps(kube_client: Any) -> Any:
    return client.AppsV1Api(kube_client)


# --- connection and kubeconfig ---------------------------------------------------------------


def test_kubeconfig_file_selects_the_right_cluster(
    tmp_path: Path, kube_emulator_factory: KubeEmulatorFactory
) -> None:
    first, second = kube_emulator_factory(token="one"), kube_emulator_factory(token="two")
    second.put_object(secret(ca_crt="only in second"))
    path = tmp_path / "kubeconfig"
    merged = merge_kubeconfigs([first.kubeconfig("east"), second.kubeconfig("west")])
    path.write_text(yaml.safe_dump(merged))
    configuration = client.Configuration()
    config.load_kube_config(  # type: ignore[no-untyped-call]
        config_file=str(path), context="west", client_configuration=configuration
    )
    with closing(client.ApiClient(configuration)) as api_client:
        found = core_api(api_client).read_namespaced_secret("cacerts", NS)
    assert found.data == {"ca-crt": b64("only in second")}
    assert second.count("get", "secrets") == 1
    assert first.count() == 0


def test_bearer_token_is_required_when_set(kube_emulator_factory: KubeEmulatorFactory) -> None:
    emulator = kube_emulator_factory(token="s3cret")
    with closing(new_api_client(emulator)) as api_client:
        assert core_api(api_client).read_namespace(NS).metadata.name == NS
    for user in ({"token": "wrong"}, {}):
        kubeconfig = emulator.kubeconfig("c")
        kubeconfig["users"][0]["user"] = user
        with (
            closing(config.new_client_from_config_dict(kubeconfig)) as api_client,  # type: ignore[no-untyped-call]
            pytest.raises(ApiException) as exc,
        ):
            core_api(api_client).read_namespace(NS)
        assert exc.value.status == 401
        assert status_body(exc)["reason"] == "Unauthorized"


def test_namespaces_get_and_list(core: Any) -> None:
    names = [ns.metadata.name for ns in core.list_namespace().items]
    assert names == ["default", "istio-system", "kube-system"]
    namespace = core.read_namespace(NS)
    assert namespace.status.phase == "Active"
    assert namespace.metadata.labels == {"kubernetes.io/metadata.name": NS}
    core.create_namespace({"metadata": {"name": "mesh"}})
    assert core.create_namespaced_secret("mesh", secret_in("mesh")).metadata.namespace == "mesh"


def test_list_items_carry_no_kind_like_kube_apiserver(kube_emulator: KubeEmulator) -> None:
    with urllib.request.urlopen(f"{kube_emulator.url}/api/v1/namespaces") as response:
        listing = json.load(response)
    assert listing["kind"] == "NamespaceList"
    assert listing["metadata"]["resourceVersion"] == kube_emulator.resource_version
    assert all("kind" not in item for item in listing["items"])


# --- create, get, metadata ------------------------------------------------------------------


def test_create_answers_201_with_server_metadata(core: Any) -> None:
    body = secret(labels={"app": "trustmgr"}, ca_crt="PEM")
    body["metadata"]["annotations"] = {"trustmgr.io/hash": "abc"}
    created, status_code, _ = core.create_namespaced_secret_with_http_info(NS, body)
    assert status_code == 201
    assert isinstance(created.metadata.resource_version, str)
    assert created.metadata.uid and created.metadata.creation_timestamp
    assert created.metadata.generation is None  # only spec-bearing kinds have one
    assert created.metadata.labels == {"app": "trustmgr"}
    assert created.metadata.annotations == {"trustmgr.io/hash": "abc"}
    assert created.type == "Opaque"
    assert core.read_namespaced_secret("cacerts", NS).metadata.uid == created.metadata.uid


def test_create_existing_name_is_409_already_exists(core: Any) -> None:
    core.create_namespaced_secret(NS, secret())
    with pytest.raises(ApiException) as exc:
        core.create_namespaced_secret(NS, secret())
    assert exc.value.status == 409
    body = status_body(exc)
    assert body["reason"] == "AlreadyExists"
    assert body["message"] == 'secrets "cacerts" already exists'


def test_create_in_missing_namespace_is_404_on_the_namespace(core: Any) -> None:
    with pytest.raises(ApiException) as exc:
        core.create_namespaced_secret("foo", {"metadata": {"name": "cacerts"}})
    assert exc.value.status == 404
    body = status_body(exc)
    assert body["message"] == 'namespaces "foo" not found'
    assert body["details"] == {"name": "foo", "kind": "namespaces"}


def test_get_missing_is_404_status(core: Any, apps: Any) -> None:
    with pytest.raises(ApiException) as exc:
        core.read_namespaced_secret("cacerts", NS)
    assert exc.value.status == 404
    assert status_body(exc) == {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": 'secrets "cacerts" not found',
        "reason": "NotFound",
        "details": {"name": "cacerts", "kind": "secrets"},
        "code": 404,
    }
    with pytest.raises(ApiException) as exc:
        apps.read_namespaced_deployment("istiod", NS)
    assert status_body(exc)["details"] == {"name": "istiod", "group": "apps", "kind": "deployments"}


def test_create_with_resource_version_is_rejected(core: Any) -> None:
    body = secret()
    body["metadata"]["resourceVersion"] = "7"
    with pytest.raises(ApiException) as exc:
        core.create_namespaced_secret(NS, body)
    assert exc.value.status == 500
    assert status_body(exc)["message"] == (
        "resourceVersion should not be set on objects to be created"
    )


def test_generate_name_and_dry_run(core: Any, kube_emulator: KubeEmulator) -> None:
    body = secret()
    body["metadata"] = {"generateName": "cacerts-"}
    created = core.create_namespaced_secret(NS, body)
    assert created.metadata.name.startswith("cacerts-")
    assert len(created.metadata.name) == len("cacerts-") + 5
    revision = kube_emulator.resource_version
    core.create_namespaced_secret(NS, secret("dry"), dry_run="All")
    assert kube_emulator.get_object("secrets", NS, "dry") is None
    assert kube_emulator.resource_version == revision


# --- secrets' data ---------------------------------------------------------------------------


def test_string_data_is_folded_into_base64_data(core: Any, kube_emulator: KubeEmulator) -> None:
    body = secret(ca_crt="old", root_cert="root")
    body["stringData"] = {"ca-crt": "new", "cert-chain.pem": "chain"}
    created = core.create_namespaced_secret(NS, body)
    expected = {"ca-crt": b64("new"), "root-cert": b64("root"), "cert-chain.pem": b64("chain")}
    assert created.data == expected
    assert created.string_data is None
    stored = kube_emulator.get_object("secrets", NS, "cacerts")
    assert stored is not None
    assert "stringData" not in stored
    assert stored["data"] == expected


def test_invalid_base64_is_400(core: Any) -> None:
    body = secret()
    body["data"] = {"ca.crt": "not base64!"}
    with pytest.raises(ApiException) as exc:
        core.create_namespaced_secret(NS, body)
    assert exc.value.status == 400
    assert status_body(exc)["reason"] == "BadRequest"


@pytest.mark.parametrize(
    ("metadata_name", "data", "field"),
    [
        ("CaCerts", {"ca.crt": "eA=="}, "metadata.name"),
        ("cacerts", {"bad/key": "eA=="}, "data[bad/key]"),
        ("cacerts", {"big": b64("x" * (1024 * 1024 + 1))}, "data"),
    ],
)
def test_secret_validation_is_422_invalid(
    core: Any, metadata_name: str, data: dict[str, str], field: str
) -> None:
    body = secret(metadata_name)
    body["data"] = data
    with pytest.raises(ApiException) as exc:
        core.create_namespaced_secret(NS, body)
    assert exc.value.status == 422
    status = status_body(exc)
    assert status["reason"] == "Invalid"
    assert status["message"].startswith(f'Secret "{metadata_name}" is invalid: {field}: ')
    assert [cause["field"] for cause in status["details"]["causes"]] == [field]


# --- resourceVersion and replace --------------------------------------------------------------


def test_every_write_bumps_one_cluster_wide_resource_version(
    core: Any, kube_emulator: KubeEmulator
) -> None:
    versions = [int(core.create_namespaced_secret(NS, secret("a")).metadata.resource_version)]
    versions.append(int(core.create_namespaced_secret(NS, secret("b")).metadata.resource_version))
    patched = core.patch_namespaced_secret("a", NS, {"data": {"k": b64("v")}})
    versions.append(int(patched.metadata.resource_version))
    core.delete_namespaced_secret("b", NS)
    versions.append(int(kube_emulator.resource_version))
    assert versions == list(range(versions[0], versions[0] + 4))
    listing = core.list_namespaced_secret(NS)
    assert listing.metadata.resource_version == kube_emulator.resource_version


def test_replace_with_stale_resource_version_is_409_conflict(core: Any) -> None:
    stale = core.create_namespaced_secret(NS, secret(ca_crt="v1"))
    core.replace_namespaced_secret("cacerts", NS, secret(ca_crt="v2"))
    stale.data = {"ca-crt": b64("v3")}
    with pytest.raises(ApiException) as exc:
        core.replace_namespaced_secret("cacerts", NS, stale)
    assert exc.value.status == 409
    body = status_body(exc)
    assert body["reason"] == "Conflict"
    assert body["message"] == (
        'Operation cannot be fulfilled on secrets "cacerts": the object has been modified; '
        "please apply your changes to the latest version and try again"
    )
    assert body["details"] == {"name": "cacerts", "kind": "secrets"}


def test_replace_with_current_or_no_resource_version_succeeds(core: Any) -> None:
    current = core.create_namespaced_secret(NS, secret(ca_crt="v1"))
    current.data = {"ca-crt": b64("v2")}
    replaced = core.replace_namespaced_secret("cacerts", NS, current)
    assert int(replaced.metadata.resource_version) > int(current.metadata.resource_version)
    assert replaced.metadata.uid == current.metadata.uid
    unconditional = core.replace_namespaced_secret("cacerts", NS, secret(ca_crt="v3"))
    assert unconditional.data == {"ca-crt": b64("v3")}


def test_unchanged_replace_writes_nothing(core: Any, kube_emulator: KubeEmulator) -> None:
    created = core.create_namespaced_secret(NS, secret(ca_crt="same"))
    replaced = core.replace_namespaced_secret("cacerts", NS, secret(ca_crt="same"))
    assert replaced.metadata.resource_version == created.metadata.resource_version
    assert kube_emulator.resource_version == created.metadata.resource_version


def test_replace_missing_is_404_and_name_mismatch_is_400(core: Any) -> None:
    with pytest.raises(ApiException) as exc:
        core.replace_namespaced_secret("cacerts", NS, secret())
    assert exc.value.status == 404
    core.create_namespaced_secret(NS, secret())
    with pytest.raises(ApiException) as exc:
        core.replace_namespaced_secret("cacerts", NS, secret("other"))
    assert exc.value.status == 400


# --- list selectors --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        ("app=istio", ["a", "b"]),
        ("app==istio,tier!=edge", ["a"]),
        ("tier", ["b", "c"]),
        ("!tier", ["a", "d"]),
        ("tier in (edge,core)", ["b", "c"]),
        ("app notin (istio)", ["c", "d"]),
        ("", ["a", "b", "c", "d"]),
    ],
)
def test_list_with_label_selector(core: Any, selector: str, expected: list[str]) -> None:
    for name, labels in {
        "a": {"app": "istio"},
        "b": {"app": "istio", "tier": "edge"},
        "c": {"app": "other", "tier": "core"},
        "d": {},
    }.items():
        core.create_namespaced_secret(NS, secret(name, labels))
    listing = core.list_namespaced_secret(NS, label_selector=selector)
    assert [item.metadata.name for item in listing.items] == expected


def test_invalid_label_selector_is_400(core: Any) -> None:
    with pytest.raises(ApiException) as exc:
        core.list_namespaced_secret(NS, label_selector="a in b")
    assert exc.value.status == 400


def test_field_selector_pagination_and_other_namespaces(core: Any) -> None:
    for name in ("a", "b", "c"):
        core.create_namespaced_secret(NS, secret(name))
    core.create_namespaced_secret("default", {"metadata": {"name": "a"}})
    assert [s.metadata.name for s in core.list_namespaced_secret("default").items] == ["a"]
    assert core.list_namespaced_secret("missing").items == []  # as kube-apiserver does
    only_b = core.list_namespaced_secret(NS, field_selector="metadata.name=b")
    assert [item.metadata.name for item in only_b.items] == ["b"]
    first = core.list_namespaced_secret(NS, limit=2)
    assert [item.metadata.name for item in first.items] == ["a", "b"]
    assert first.metadata.remaining_item_count == 1
    rest = core.list_namespaced_secret(NS, limit=2, _continue=first.metadata._continue)
    assert [item.metadata.name for item in rest.items] == ["c"]
    assert rest.metadata._continue is None
    everywhere = core.list_secret_for_all_namespaces()
    assert [(s.metadata.namespace, s.metadata.name) for s in everywhere.items] == [
        ("default", "a"),
        (NS, "a"),
        (NS, "b"),
        (NS, "c"),
    ]


# --- patch and delete ------------------------------------------------------------------------


def patch(emulator: KubeEmulator, name: str, body: Any, content_type: str) -> tuple[int, Any]:
    """PATCH secret ``name`` with the given content type: (status, JSON answer).
    The client picks the content type of a patch itself before kubernetes 37."""
    request = urllib.request.Request(
        f"{emulator.url}/api/v1/namespaces/{NS}/secrets/{name}",
        data=json.dumps(body).encode(),
        method="PATCH",
        headers={"Content-Type": content_type},
    )
    try:
        with urllib.request.urlopen(request) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.loads(exc.read())


def test_patch_content_types(core: Any, kube_emulator: KubeEmulator) -> None:
    core.create_namespaced_secret(NS, secret(ca_crt="ca", key_pem="key"))
    # A dict body goes out as strategic merge patch: keys merge.
    merged = core.patch_namespaced_secret("cacerts", NS, {"data": {"extra": b64("x")}})
    assert set(merged.data) == {"ca-crt", "key-pem", "extra"}
    # JSON merge patch: null deletes a key.
    code, removed = patch(
        kube_emulator, "cacerts", {"data": {"extra": None}}, "application/merge-patch+json"
    )
    assert code == 200
    assert set(removed["data"]) == {"ca-crt", "key-pem"}
    # A list body goes out as JSON patch.
    ops = [{"op": "replace", "path": "/data/ca-crt", "value": b64("ca2")}]
    replaced = core.patch_namespaced_secret("cacerts", NS, ops)
    assert replaced.data["ca-crt"] == b64("ca2")
    stale = [{"op": "test", "path": "/metadata/resourceVersion", "value": "1"}]
    with pytest.raises(ApiException) as exc:
        core.patch_namespaced_secret("cacerts", NS, stale)
    assert exc.value.status == 422


def test_patch_with_stale_resource_version_is_409_and_missing_is_404(core: Any) -> None:
    created = core.create_namespaced_secret(NS, secret(ca_crt="v1"))
    core.patch_namespaced_secret("cacerts", NS, {"data": {"ca-crt": b64("v2")}})
    guarded = {"metadata": {"resourceVersion": created.metadata.resource_version}}
    with pytest.raises(ApiException) as exc:
        core.patch_namespaced_secret("cacerts", NS, guarded)
    assert exc.value.status == 409
    with pytest.raises(ApiException) as exc:
        core.patch_namespaced_secret("missing", NS, {"data": {}})
    assert exc.value.status == 404


def test_server_side_apply_is_not_emulated(core: Any, kube_emulator: KubeEmulator) -> None:
    core.create_namespaced_secret(NS, secret())
    code, _ = patch(kube_emulator, "cacerts", secret(), "application/apply-patch+yaml")
    assert code == 415


def test_delete_with_preconditions(core: Any, kube_emulator: KubeEmulator) -> None:
    created = core.create_namespaced_secret(NS, secret())
    stale = client.V1DeleteOptions(preconditions=client.V1Preconditions(resource_version="1"))
    with pytest.raises(ApiException) as exc:
        core.delete_namespaced_secret("cacerts", NS, body=stale)
    assert exc.value.status == 409
    status = json.loads(core.delete_namespaced_secret("cacerts", NS, _preload_content=False).data)
    assert status["status"] == "Success"
    assert status["details"] == {"name": "cacerts", "kind": "secrets", "uid": created.metadata.uid}
    assert kube_emulator.get_object("secrets", NS, "cacerts") is None
    with pytest.raises(ApiException) as exc:
        core.delete_namespaced_secret("cacerts", NS)
    assert exc.value.status == 404


def test_deleting_a_namespace_removes_its_objects(core: Any, kube_emulator: KubeEmulator) -> None:
    core.create_namespaced_secret(NS, secret())
    deleted = json.loads(core.delete_namespace(NS, _preload_content=False).data)
    assert deleted["status"] == {"phase": "Terminating"}
    assert kube_emulator.list_objects("secrets") == []
    with pytest.raises(ApiException) as exc:
        core.read_namespace(NS)
    assert exc.value.status == 404


# --- deployments and configmaps --------------------------------------------------------------


def test_rollout_restart_patch_merges_and_bumps_generation(apps: Any) -> None:
    created = apps.create_namespaced_deployment(NS, deployment())
    assert created.metadata.generation == 1
    assert created.spec.replicas == 1
    restart = {"kubectl.kubernetes.io/restartedAt": "2025-01-01T00:00:00Z"}
    patch = {"spec": {"template": {"metadata": {"annotations": restart}}}}
    restarted = apps.patch_namespaced_deployment("istiod", NS, patch)
    assert restarted.spec.template.metadata.annotations == {"existing": "kept", **restart}
    assert restarted.spec.template.spec.containers[0].image == "istio/pilot:1.24"
    assert restarted.metadata.generation == 2
    relabelled = apps.patch_namespaced_deployment(
        "istiod", NS, {"metadata": {"labels": {"x": "y"}}}
    )
    assert relabelled.metadata.generation == 2  # labels are not spec
    annotated = apps.patch_namespaced_deployment(
        "istiod", NS, {"metadata": {"annotations": {"note": "n"}}}
    )
    assert annotated.metadata.generation == 3  # deployment annotations are copied to pods


def test_strategic_merge_patch_merges_containers_by_name(apps: Any) -> None:
    apps.create_namespaced_deployment(NS, deployment())
    patch = {"spec": {"template": {"spec": {"containers": [{"name": "sidecar", "image": "s"}]}}}}
    patched = apps.patch_namespaced_deployment("istiod", NS, patch)
    names = [c.name for c in patched.spec.template.spec.containers]
    assert names == ["discovery", "sidecar"]


def test_deployment_selector_must_match_template(apps: Any) -> None:
    body = deployment()
    body["spec"]["selector"] = {"matchLabels": {"app": "other"}}
    with pytest.raises(ApiException) as exc:
        apps.create_namespaced_deployment(NS, body)
    assert exc.value.status == 422
    assert status_body(exc)["message"].startswith('Deployment.apps "istiod" is invalid: ')


def test_configmap_round_trip(core: Any) -> None:
    body = {"metadata": {"name": "istio-ca-root-cert"}, "data": {"root-cert.pem": "PEM"}}
    created = core.create_namespaced_config_map(NS, body)
    assert created.data == {"root-cert.pem": "PEM"}
    assert core.read_namespaced_config_map("istio-ca-root-cert", NS).data == created.data


# --- authorization ---------------------------------------------------------------------------


def test_denied_update_is_403_worded_like_kube_apiserver(
    kube_emulator_factory: KubeEmulatorFactory,
) -> None:
    emulator = kube_emulator_factory(user="system:serviceaccount:x:y")
    emulator.put_object(secret())
    emulator.deny("update", "secrets", namespaces=NS)
    with closing(new_api_client(emulator)) as api_client:
        core = core_api(api_client)
        assert core.read_namespaced_secret("cacerts", NS).metadata.name == "cacerts"
        with pytest.raises(ApiException) as exc:
            core.replace_namespaced_secret("cacerts", NS, secret(ca_crt="new"))
    assert exc.value.status == 403
    body = status_body(exc)
    assert body["reason"] == "Forbidden"
    assert body["details"] == {"name": "cacerts", "kind": "secrets"}
    assert body["message"] == (
        'secrets "cacerts" is forbidden: User "system:serviceaccount:x:y" cannot update resource '
        '"secrets" in API group "" in the namespace "istio-system"'
    )
    assert emulator.count("update") == 1  # a refused write still counts as an attempt


def test_allow_rules_switch_to_least_privilege(kube_emulator: KubeEmulator, core: Any) -> None:
    kube_emulator.allow(("get", "update"), "secrets", namespaces=NS, names="cacerts")
    with pytest.raises(ApiException) as exc:
        core.create_namespaced_secret(NS, secret())
    assert status_body(exc)["message"] == (
        'secrets is forbidden: User "system:serviceaccount:trustmgr:trustmgr" cannot create '
        'resource "secrets" in API group "" in the namespace "istio-system"'
    )
    with pytest.raises(ApiException) as exc:
        core.read_namespace(NS)
    assert exc.value.status == 403
    with pytest.raises(ApiException) as exc:
        core.read_namespaced_secret("cacerts", NS)
    assert exc.value.status == 404  # allowed, and absent
    kube_emulator.reset_rbac()
    core.create_namespaced_secret(NS, secret())


def _role_and_binding(name: str, verbs: list[str], subject: dict[str, str]) -> list[Any]:
    role = {
        "kind": "Role",
        "metadata": {"name": name, "namespace": NS},
        "rules": [{"apiGroups": [""], "resources": ["secrets"], "verbs": verbs}],
    }
    binding = {
        "kind": "RoleBinding",
        "metadata": {"name": name, "namespace": NS},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
        "subjects": [subject],
    }
    return [role, binding]


def test_two_identities_each_with_its_own_role(
    kube_emulator_factory: KubeEmulatorFactory,
) -> None:
    """Roles bound to a user of ``tokens`` authorize that client alone, at the same time as
    the emulator's own user works with its Roles; a 403 names the client refused."""
    emulator = kube_emulator_factory(token="reader-token", tokens={"writer-token": "writer"})
    sa = {"kind": "ServiceAccount", "name": "trustmgr", "namespace": "trustmgr"}
    emulator.apply_rbac(_role_and_binding("reader", ["get"], sa))
    emulator.apply_rbac(
        _role_and_binding("writer", ["create"], {"kind": "User", "name": "writer"}), user="writer"
    )
    emulator.put_object(secret())
    with (
        closing(new_api_client(emulator)) as reader_client,
        closing(new_api_client(emulator, token="writer-token")) as writer_client,
    ):
        reader, writer = core_api(reader_client), core_api(writer_client)
        assert reader.read_namespaced_secret("cacerts", NS).metadata.name == "cacerts"
        writer.create_namespaced_secret(NS, secret("other"))
        with pytest.raises(ApiException) as exc:
            writer.read_namespaced_secret("cacerts", NS)
        assert status_body(exc)["message"].startswith(
            'secrets "cacerts" is forbidden: User "writer" cannot get resource "secrets"'
        )
        with pytest.raises(ApiException) as exc:
            reader.create_namespaced_secret(NS, secret("third"))
        assert (
            'User "system:serviceaccount:trustmgr:trustmgr" cannot create'
            in (status_body(exc)["message"])
        )
    assert [(r.client, r.verb, r.status) for r in emulator.requests] == [
        ("system:serviceaccount:trustmgr:trustmgr", "get", 200),
        ("writer", "create", 201),
        ("writer", "get", 403),
        ("system:serviceaccount:trustmgr:trustmgr", "create", 403),
    ]


# --- faults ----------------------------------------------------------------------------------


def test_injected_500_then_success(core: Any, kube_emulator: KubeEmulator) -> None:
    kube_emulator.put_object(secret())
    fault = kube_emulator.inject(Fault("GET", r"/secrets/cacerts$", status=500))
    with pytest.raises(ApiException) as exc:
        core.read_namespaced_secret("cacerts", NS)
    assert exc.value.status == 500
    assert status_body(exc)["reason"] == "InternalError"
    assert core.read_namespaced_secret("cacerts", NS).metadata.name == "cacerts"
    assert fault.hits == 1
    assert [r.status for r in kube_emulator.requests] == [500, 200]


def test_injected_429_carries_retry_after(kube_emulator: KubeEmulator) -> None:
    kube_emulator.inject(Fault(status=429, retry_after=0))
    with (
        closing(new_api_client(kube_emulator, retries=False)) as api_client,
        pytest.raises(ApiException) as exc,
    ):
        core_api(api_client).list_namespaced_secret(NS)
    assert exc.value.status == 429
    assert exc.value.headers is not None
    assert exc.value.headers["Retry-After"] == "0"
    assert status_body(exc)["reason"] == "TooManyRequests"


def test_client_honours_retry_after_by_default(core: Any, kube_emulator: KubeEmulator) -> None:
    kube_emulator.inject(Fault(status=503, retry_after=0, times=2))
    assert core.list_namespaced_secret(NS).items == []
    assert [r.status for r in kube_emulator.requests] == [503, 503, 200]  # urllib3's Retry


def test_delay_beyond_request_timeout_times_out(kube_emulator: KubeEmulator) -> None:
    kube_emulator.put_object(secret())
    kube_emulator.inject(Fault("GET", "/secrets/", delay=30))
    with closing(new_api_client(kube_emulator, retries=False)) as api_client:
        core = core_api(api_client)
        with pytest.raises(urllib3.exceptions.ReadTimeoutError):
            core.read_namespaced_secret("cacerts", NS, _request_timeout=(0.2, 0.2))
        assert core.read_namespaced_secret("cacerts", NS).metadata.name == "cacerts"
    began = time.monotonic()
    kube_emulator.stop()  # cancels the request still sleeping on the server
    assert time.monotonic() - began < 1


def test_client_retries_a_timed_out_get_by_default(core: Any, kube_emulator: KubeEmulator) -> None:
    kube_emulator.put_object(secret())
    kube_emulator.inject(Fault("GET", "/secrets/", delay=30))
    assert core.read_namespaced_secret("cacerts", NS, _request_timeout=(0.2, 0.2)).metadata.name
    assert kube_emulator.count("get") == 2  # urllib3's default Retry resent the GET


def test_dropped_connection_raises_protocol_error(core: Any, kube_emulator: KubeEmulator) -> None:
    kube_emulator.inject(Fault("POST", "/secrets$", drop=True))
    with pytest.raises(urllib3.exceptions.ProtocolError):
        core.create_namespaced_secret(NS, secret())
    assert kube_emulator.requests[0].status == 0
    assert kube_emulator.get_object("secrets", NS, "cacerts") is None


def test_lost_response_leaves_the_write_applied(core: Any, kube_emulator: KubeEmulator) -> None:
    kube_emulator.inject(Fault("POST", "/secrets$", lose_response=True))
    with pytest.raises(urllib3.exceptions.ProtocolError):
        core.create_namespaced_secret(NS, secret())
    assert kube_emulator.get_object("secrets", NS, "cacerts") is not None
    with pytest.raises(ApiException) as exc:
        core.create_namespaced_secret(NS, secret())
    assert status_body(exc)["reason"] == "AlreadyExists"


def test_late_answer_times_out_with_the_write_applied(kube_emulator: KubeEmulator) -> None:
    kube_emulator.inject(Fault("POST", "/secrets$", answer_delay=5))
    with (
        closing(new_api_client(kube_emulator, retries=False)) as api_client,
        pytest.raises(urllib3.exceptions.ReadTimeoutError),
    ):
        core_api(api_client).create_namespaced_secret(NS, secret(), _request_timeout=(0.2, 0.2))
    assert kube_emulator.get_object("secrets", NS, "cacerts") is not None


def test_dropped_get_is_retried_by_the_client(core: Any, kube_emulator: KubeEmulator) -> None:
    kube_emulator.inject(Fault("GET", drop=True))
    assert core.read_namespace(NS).metadata.name == NS
    assert [r.status for r in kube_emulator.requests] == [0, 200]


def test_hook_between_read_and_replace_makes_replace_conflict(
    core: Any, kube_emulator: KubeEmulator
) -> None:
    kube_emulator.put_object(secret(ca_crt="v1"))

    def concurrent_writer() -> None:
        # Over HTTP, from the hook's worker thread, like another controller would.
        with closing(new_api_client(kube_emulator)) as other:
            core_api(other).replace_namespaced_secret("cacerts", NS, secret(ca_crt="them"))

    kube_emulator.inject(Fault("PUT", r"/secrets/cacerts$", hook=concurrent_writer))
    ours = core.read_namespaced_secret("cacerts", NS)
    ours.data = {"ca-crt": b64("us")}
    with pytest.raises(ApiException) as exc:
        core.replace_namespaced_secret("cacerts", NS, ours)
    assert exc.value.status == 409
    stored = kube_emulator.get_object("secrets", NS, "cacerts")
    assert stored is not None
    assert stored["data"] == {"ca-crt": b64("them")}


def test_failing_hook_is_a_500_and_recorded(core: Any, kube_emulator: KubeEmulator) -> None:
    def broken() -> None:
        raise RuntimeError("hook bug")

    kube_emulator.inject(Fault(hook=broken))
    with pytest.raises(ApiException) as exc:
        core.read_namespace(NS)
    assert exc.value.status == 500
    assert [repr(error) for error in kube_emulator.errors] == ["RuntimeError('hook bug')"]
    kube_emulator.errors.clear()  # else the fixture fails the test at teardown


def test_latency_is_added_to_every_request(kube_emulator_factory: KubeEmulatorFactory) -> None:
    emulator = kube_emulator_factory(latency=0.05)
    with closing(new_api_client(emulator)) as api_client:
        began = time.monotonic()
        core_api(api_client).read_namespace(NS)
    assert time.monotonic() - began >= 0.05


# --- counters, direct state, many clusters ---------------------------------------------------


def test_counters_by_verb(core: Any, kube_emulator: KubeEmulator) -> None:
    core.create_namespaced_secret(NS, secret())
    core.read_namespaced_secret("cacerts", NS)
    core.list_namespaced_secret(NS)
    core.patch_namespaced_secret("cacerts", NS, {"data": {"k": b64("v")}})
    core.read_namespace(NS)
    assert kube_emulator.verbs == {"create": 1, "get": 2, "list": 1, "patch": 1}
    assert (kube_emulator.reads, kube_emulator.writes) == (3, 2)
    assert kube_emulator.count("get", "secrets") == 1
    kube_emulator.reset_counters()
    assert kube_emulator.count() == 0


def test_put_object_validates_like_the_api(kube_emulator: KubeEmulator) -> None:
    with pytest.raises(ApiError) as exc:
        kube_emulator.put_object({**secret(), "metadata": {"name": "x", "namespace": "nope"}})
    assert exc.value.code == 404
    stored = kube_emulator.put_object(secret(ca_crt="v1"))
    again = kube_emulator.put_object(secret(ca_crt="v2"))
    assert int(again["metadata"]["resourceVersion"]) > int(stored["metadata"]["resourceVersion"])
    assert again["metadata"]["uid"] == stored["metadata"]["uid"]
    assert kube_emulator.count() == 0  # direct access is not API traffic


@pytest.fixture
def many() -> Iterator[list[KubeEmulator]]:
    emulators = start_many(20, latency=0.0)
    yield emulators
    stop_many(emulators)


def test_start_many_gives_independent_clusters(many: list[KubeEmulator]) -> None:
    assert len({emulator.url for emulator in many}) == len(many)
    results: dict[int, str] = {}

    def read(index: int, emulator: KubeEmulator) -> None:
        emulator.put_object(secret(ca_crt=f"cluster-{index}"))
        with closing(new_api_client(emulator)) as api_client:
            data = core_api(api_client).read_namespaced_secret("cacerts", NS).data
        results[index] = base64.b64decode(data["ca-crt"]).decode()

    threads = [threading.Thread(target=read, args=item) for item in enumerate(many)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == {i: f"cluster-{i}" for i in range(len(many))}
    assert all((e.reads, e.writes) == (1, 0) for e in many)


def test_stopped_emulator_refuses_connections(kube_emulator_factory: KubeEmulatorFactory) -> None:
    emulator = kube_emulator_factory()
    with closing(new_api_client(emulator, retries=False)) as api_client:
        emulator.stop()
        with pytest.raises(urllib3.exceptions.NewConnectionError):
            core_api(api_client).read_namespace(NS)
