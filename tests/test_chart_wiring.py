"""The chart's wiring, end to end: the rendered CronJob's and Deployment's
container runs exactly as written (command, args, env, volume mounts, user and
read-only root file system) against the Kubernetes API emulator, which serves
TLS like an API server and authorizes every request by the chart's own Roles
and RoleBindings. A missing permission, a wrong mount or a file the pod's user
cannot read fails the run; a right chart writes a valid cacerts.

The pod is laid out the way the kubelet would: each volume's files from the
ConfigMaps and Secrets stored in the emulated cluster (a projected
service-account token, kube-root-ca.crt, the namespace), mounted at the
manifest's paths in a root of its own (a private mount namespace, bind mounts,
chroot), the root file system read-only when the manifest says so, the
process run as the pod's user with its fsGroup. The image's contents are those
of the Dockerfile: trustmgr on PATH at /opt/trustmgr/bin, HOME and the Python
settings of its ENV.
"""

# The fixtures are imported, so this module runs without conftest wiring; pytest injects them as
# parameters of the same names, which pyflakes would call unused imports and redefinitions.
# ruff: noqa: F401, F811

from __future__ import annotations

import base64
import contextlib
import copy
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509

from tests.conftest import PASSPHRASE, REPO
from tests.kube_emulator import DEFAULT_USER, KubeEmulator
from tests.kube_fixtures import KubeEmulatorFactory, kube_emulator_factory
from tests.test_chart import (
    NAMESPACE,
    Rendered,
    base_values,
    merged,
    pod_spec,
    render,
)
from trustmgr.pki import CACERTS_FILES, CACerts, cluster_ca_problems, istiod_problems

Obj = dict[str, Any]

IMAGE_USER = 65532
"""The Dockerfile's USER: the pod's user when the manifest names none."""
IMAGE_ENV = {
    "PATH": "/opt/trustmgr/bin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/home/trustmgr",
    "PYTHONDONTWRITEBYTECODE": "1",
    "PYTHONUNBUFFERED": "1",
}
"""The Dockerfile's ENV of the final image (tests/test_chart_image.py checks they agree)."""
ISTIO = "istio-system"
TOKEN = "in-cluster-service-account-token"

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("chroot") is None,
    reason="laying out a pod's file system needs root, unshare and chroot",
)


# --- the kubelet, as far as this pod needs it -------------------------------------------------


def _host_tools() -> dict[str, str]:
    tools = {}
    for tool in ("mount", "chroot", "sh"):
        path = shutil.which(tool, path="/usr/sbin:/usr/bin:/sbin:/bin")
        assert path, tool
        tools[tool] = path
    return tools


class Kubelet:
    """Starts a rendered pod's only container on this machine, against ``cluster``."""

    def __init__(self, workdir: Path, cluster: KubeEmulator, namespace: str = NAMESPACE) -> None:
        self.workdir = workdir
        self.cluster = cluster
        self.namespace = namespace
        self._pods = 0

    # volumes

    def _object(self, resource: str, name: str) -> Obj:
        obj = self.cluster.get_object(resource, self.namespace, name)
        if obj is None:  # the kubelet would keep the pod in ContainerCreating
            raise AssertionError(
                f"the pod mounts {resource} {self.namespace}/{name}, which does not exist"
            )
        return obj

    def _data(self, resource: str, name: str) -> dict[str, bytes]:
        obj = self._object(resource, name)
        if resource == "secrets":
            return {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}
        return {k: v.encode() for k, v in (obj.get("data") or {}).items()}

    @staticmethod
    def _select(data: dict[str, bytes], items: list[Obj] | None, what: str) -> dict[str, bytes]:
        if items is None:
            return dict(data)
        out = {}
        for item in items:
            if item["key"] not in data:
                raise AssertionError(f"{what} has no key {item['key']!r}")
            out[item["path"]] = data[item["key"]]
        return out

    def _projected(self, source: Obj) -> dict[str, bytes]:
        if "serviceAccountToken" in source:
            token = source["serviceAccountToken"]
            audience = token.get("audience")
            # A token for another audience is not one the API server accepts.
            value = TOKEN if audience is None else f"token-for-audience-{audience}"
            return {token["path"]: value.encode()}
        if "configMap" in source:
            ref = source["configMap"]
            return self._select(
                self._data("configmaps", ref["name"]), ref.get("items"), ref["name"]
            )
        if "secret" in source:
            ref = source["secret"]
            return self._select(self._data("secrets", ref["name"]), ref.get("items"), ref["name"])
        if "downwardAPI" in source:
            out = {}
            for item in source["downwardAPI"]["items"]:
                assert item["fieldRef"]["fieldPath"] == "metadata.namespace", item
                out[item["path"]] = self.namespace.encode()
            return out
        raise AssertionError(f"projected source not emulated: {source}")

    def _volume(self, volume: Obj, where: Path, fs_group: int | None) -> None:
        where.mkdir(parents=True)
        if "emptyDir" in volume:
            where.chmod(0o777)
            return
        if "configMap" in volume:
            ref = volume["configMap"]
            files = self._select(
                self._data("configmaps", ref["name"]), ref.get("items"), ref["name"]
            )
            mode = ref.get("defaultMode", 0o644)
        elif "secret" in volume:
            ref = volume["secret"]
            files = self._select(
                self._data("secrets", ref["secretName"]), ref.get("items"), ref["secretName"]
            )
            mode = ref.get("defaultMode", 0o644)
        elif "projected" in volume:
            files = {}
            for source in volume["projected"]["sources"]:
                files.update(self._projected(source))
            mode = volume["projected"].get("defaultMode", 0o644)
        else:
            raise AssertionError(f"volume type not emulated: {volume}")
        for path, data in files.items():
            target = where / path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
            # Owned by root; with an fsGroup, by that group (as the kubelet does).
            os.chown(target, 0, fs_group if fs_group is not None else 0)
            target.chmod(mode)

    # the container

    def _env(self, container: Obj) -> dict[str, str]:
        env = dict(IMAGE_ENV)
        # The kubelet always sets these, enableServiceLinks or not.
        env["KUBERNETES_SERVICE_HOST"] = "127.0.0.1"
        env["KUBERNETES_SERVICE_PORT"] = str(self.cluster.port)
        for item in container.get("env", []):
            if "value" in item:
                env[item["name"]] = item["value"]
                continue
            source = item["valueFrom"]
            if "secretKeyRef" in source:
                ref = source["secretKeyRef"]
                env[item["name"]] = self._data("secrets", ref["name"])[ref["key"]].decode()
            elif "configMapKeyRef" in source:
                ref = source["configMapKeyRef"]
                env[item["name"]] = self._data("configmaps", ref["name"])[ref["key"]].decode()
            else:
                assert source["fieldRef"]["fieldPath"] == "metadata.namespace", item
                env[item["name"]] = self.namespace
        return env

    def start(self, pod: Obj) -> subprocess.Popen[str]:
        """Lay the pod out and start its container; the caller waits for it."""
        (container,) = pod["containers"]
        assert "workingDir" not in container
        assert not pod.get("initContainers")
        self._pods += 1
        base = self.workdir / f"pod-{self._pods}"
        root, volumes_dir = base / "root", base / "volumes"
        pod_sc, sc = pod.get("securityContext", {}), container.get("securityContext", {})
        uid = sc.get("runAsUser", pod_sc.get("runAsUser", IMAGE_USER))
        gid = sc.get("runAsGroup", pod_sc.get("runAsGroup", uid))
        fs_group = pod_sc.get("fsGroup")
        if sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")):
            assert uid != 0, "runAsNonRoot with user 0: the kubelet refuses to start it"

        by_name = {v["name"]: v for v in pod.get("volumes", [])}
        mounts: list[tuple[Path, str, bool]] = []
        for mount in container.get("volumeMounts", []):
            source = volumes_dir / mount["name"]
            if not source.exists():
                self._volume(by_name[mount["name"]], source, fs_group)
            if mount.get("subPath"):
                # One file or directory of the volume; one the volume lacks is made an
                # empty directory, as the kubelet does.
                source = source / mount["subPath"]
                if not source.exists():
                    source.mkdir(parents=True)
            mounts.append((source, mount["mountPath"], bool(mount.get("readOnly"))))

        # The image: the host's system and Python read-only, trustmgr on PATH, an /etc
        # of its own with the image's user.
        # The checkout's code alone, at a path of the image's: the checkout itself
        # may sit in a directory only its owner can enter (mktemp -d makes 0700).
        host_dirs = ["/usr", "/etc/ssl", sys.base_prefix, sys.prefix]
        source = "/opt/trustmgr/src"
        code = [(str(REPO / name), f"{source}/{name}") for name in ("trustmgr", "providers")]
        etc = root / "etc"
        etc.mkdir(parents=True)
        (etc / "passwd").write_text(
            f"root:x:0:0:root:/root:/usr/sbin/nologin\n"
            f"trustmgr:x:{IMAGE_USER}:{IMAGE_USER}::/home/trustmgr:/usr/sbin/nologin\n"
        )
        (etc / "group").write_text(f"root:x:0:\ntrustmgr:x:{IMAGE_USER}:\n")
        for name in ("bin", "sbin", "lib", "lib64"):
            top = Path("/", name)
            if top.is_symlink():
                (root / name).symlink_to(os.readlink(top))
            elif top.exists():
                host_dirs.append(str(top))
        bin_dir = root / "opt/trustmgr/bin"
        bin_dir.mkdir(parents=True)
        launcher = bin_dir / "trustmgr"
        launcher.write_text(
            f"#!{sys.executable}\nimport sys\nsys.path.insert(0, {source!r})\n"
            "from trustmgr.cli import main\nmain()\n"
        )
        launcher.chmod(0o755)
        for path in [*host_dirs, *(c[1] for c in code), "/dev", "/proc"]:
            (root / path.lstrip("/")).mkdir(parents=True, exist_ok=True)
        for source_path, path, _ in mounts:  # a file is mounted on a file, a directory on one
            mount_point = root / path.lstrip("/")
            if source_path.is_file():
                mount_point.parent.mkdir(parents=True, exist_ok=True)
                mount_point.touch()
            else:
                mount_point.mkdir(parents=True, exist_ok=True)
        for directory in (root, *root.rglob("*")):
            if directory.is_dir() and not directory.is_symlink():
                directory.chmod(0o755)
            elif directory.is_file() and directory.parent == etc:
                directory.chmod(0o644)

        tools = _host_tools()
        mount = tools["mount"]
        q = shlex.quote
        script = ["set -e", f"{mount} --bind {q(str(root))} {q(str(root))}"]
        # The pod's volumes first, the host's directories over them: a checkout
        # under /tmp stays visible through the pod's /tmp.
        for source, path, _ in mounts:
            inside = q(str(root / path.lstrip("/")))
            script.append(f"{mount} --bind {q(str(source))} {inside}")
        for path, at in [*((d, d) for d in host_dirs), *code]:
            inside = q(str(root / at.lstrip("/")))
            script += [
                f"mkdir -p {inside}",
                f"{mount} --bind {q(path)} {inside}",
                f"{mount} -o remount,bind,ro {inside}",
            ]
        script += [f"{mount} --rbind /dev {q(str(root / 'dev'))}"]
        script += [f"{mount} --rbind /proc {q(str(root / 'proc'))}"]
        for _, path, read_only in mounts:
            if read_only:
                script.append(f"{mount} -o remount,bind,ro {q(str(root / path.lstrip('/')))}")
        if sc.get("readOnlyRootFilesystem"):
            script.append(f"{mount} -o remount,bind,ro {q(str(root))}")
        groups = f" --groups={fs_group}" if fs_group is not None else ""
        command = [*container.get("command", []), *container.get("args", [])]
        script.append(
            f"exec {tools['chroot']} --userspec={uid}:{gid}{groups} {q(str(root))} "
            + " ".join(q(c) for c in command)
        )
        return subprocess.Popen(
            [
                "unshare",
                "--mount",
                "--propagation",
                "private",
                tools["sh"],
                "-c",
                "\n".join(script),
            ],
            env=self._env(container),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def run(self, pod: Obj, timeout: float = 60) -> Completed:
        process = self.start(pod)
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            out, err = process.communicate()
            raise AssertionError(f"the pod did not finish within {timeout} s: {err}") from None
        return Completed(process.returncode, out, err)


@dataclass(frozen=True)
class Completed:
    code: int
    out: str
    err: str


# --- the cluster ---------------------------------------------------------------------------


def secret(name: str, data: dict[str, bytes], namespace: str = NAMESPACE, **meta: Any) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": namespace, **meta},
        "type": "Opaque",
        "data": {k: base64.b64encode(v).decode() for k, v in data.items()},
    }


def istiod() -> Obj:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "istiod", "namespace": ISTIO},
        "spec": {
            "selector": {"matchLabels": {"app": "istiod"}},
            "template": {
                "metadata": {"labels": {"app": "istiod"}},
                "spec": {"containers": [{"name": "discovery", "image": "istio/pilot"}]},
            },
        },
    }


@dataclass
class Install:
    """A release of the chart in an emulated cluster: what `helm install` would have
    created (ConfigMap, RBAC), what the user created beforehand (the passphrase
    and kubeconfig Secrets), and what the API server provides (kube-root-ca.crt)."""

    rendered: Rendered
    cluster: KubeEmulator
    kubelet: Kubelet

    @property
    def pod(self) -> Obj:
        return self.rendered.pod_spec()

    def cacerts(self, cluster: KubeEmulator | None = None) -> Obj | None:
        return (cluster or self.cluster).get_object("secrets", ISTIO, "cacerts")

    def forbidden(self, cluster: KubeEmulator | None = None) -> list[str]:
        return [
            f"{r.verb} {r.resource} {r.namespace}/{r.name}"
            for r in (cluster or self.cluster).requests
            if r.status == 403
        ]


@pytest.fixture
def cluster(kube_emulator_factory: KubeEmulatorFactory) -> KubeEmulator:
    emulator = kube_emulator_factory(
        namespaces=["default", "kube-system", ISTIO, NAMESPACE], token=TOKEN, tls=True
    )
    assert emulator.user == f"system:serviceaccount:{NAMESPACE}:trustmgr"
    emulator.put_object(istiod())
    emulator.put_object(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "kube-root-ca.crt", "namespace": NAMESPACE},
            "data": {"ca.crt": emulator.ca_pem.decode()},
        }
    )
    emulator.put_object(secret("trustmgr-passphrase", {"passphrase": PASSPHRASE.encode()}))
    return emulator


def install(cluster: KubeEmulator, tmp_path: Path, values: Obj) -> Install:
    rendered = render(values)
    for obj in rendered.objects:
        if obj["kind"] == "ConfigMap":
            cluster.put_object(obj)
    cluster.reset_rbac()
    cluster.apply_rbac(rendered.objects)
    return Install(rendered, cluster, Kubelet(tmp_path, cluster))


def assert_valid_cacerts(obj: Obj | None, trust_domain: str) -> CACerts:
    assert obj is not None, "no cacerts was written"
    assert obj["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "trustmgr"
    data = obj["data"]
    material = CACerts.from_files({n: base64.b64decode(data[n]) for n in CACERTS_FILES})
    now = datetime.now(UTC)
    assert istiod_problems(material, now=now) == []
    ca = x509.load_pem_x509_certificate(material.ca_cert)
    assert cluster_ca_problems(ca, trust_domain, now=now) == []
    return material


def with_remote(values: Obj) -> Obj:
    values = copy.deepcopy(values)
    values["remoteClusters"] = [{"kubeconfigSecret": "edge-1"}]
    values["config"]["meshes"]["web"]["clusters"]["edge-1"] = {
        "kubernetes": {"kubeconfig": "/etc/trustmgr/kubeconfigs/edge-1/kubeconfig"}
    }
    return values


# --- the CronJob -------------------------------------------------------------------------------


def test_cronjob_bootstraps_local_and_remote_clusters_with_only_its_roles(
    cluster: KubeEmulator, kube_emulator_factory: KubeEmulatorFactory, tmp_path: Path
) -> None:
    remote = kube_emulator_factory(token="edge-1-token", tls=True)
    remote.put_object(istiod())
    cluster.put_object(
        secret("edge-1", {"kubeconfig": yaml.safe_dump(remote.kubeconfig("edge-1")).encode()})
    )
    release = install(cluster, tmp_path, with_remote(base_values()))
    # The remote cluster's Role is the one the chart gives the local targets.
    remote.apply_rbac(
        o for o in release.rendered.objects if o["metadata"].get("namespace") == ISTIO
    )
    assert release.rendered.workload()["kind"] == "CronJob"

    first = release.kubelet.run(release.pod)
    assert first.code == 0, first.err
    local = assert_valid_cacerts(release.cacerts(), "web.corp")
    edge = assert_valid_cacerts(release.cacerts(remote), "web.corp")
    assert local.root_cert == edge.root_cert and local.ca_cert != edge.ca_cert
    state = cluster.get_object("secrets", NAMESPACE, "trustmgr-state")
    assert state is not None and "state.json" in state["data"]
    lease = cluster.get_object("leases", NAMESPACE, "trustmgr-state-lock")
    assert lease is not None and not lease["spec"].get("holderIdentity")  # released
    assert release.forbidden() == [] and release.forbidden(remote) == []

    # The next scheduled run finds nothing to do and writes nothing.
    cluster.clear_write_log()
    again = release.kubelet.run(release.pod)
    assert again.code == 0, again.err
    assert [w for w in cluster.write_log if w.resource == "secrets"] == []
    assert release.cacerts() is not None
    assert release.forbidden() == []


def test_istiod_restart_is_allowed_when_configured(cluster: KubeEmulator, tmp_path: Path) -> None:
    """Adopting a cacerts of another root changes the root: istiod needs a restart,
    and the Role allows exactly that patch."""
    other = install(
        cluster,
        tmp_path / "other",
        merged(base_values(), {"stateStore": {"kubernetes": {"name": "other"}}}),
    )
    assert other.kubelet.run(other.pod).code == 0
    foreign = other.cacerts()
    assert foreign is not None
    del foreign["metadata"]["labels"]  # now made by someone else
    cluster.put_object(foreign)

    release = install(cluster, tmp_path / "release", base_values())
    pod = copy.deepcopy(release.pod)
    pod["containers"][0]["args"].append("--adopt")
    result = release.kubelet.run(pod)
    assert result.code == 0, result.err
    assert "istiod restarted" in result.out
    adopted = assert_valid_cacerts(release.cacerts(), "web.corp")
    assert adopted.root_cert != base64.b64decode(foreign["data"]["root-cert.pem"])
    deployment = cluster.get_object("deployments", ISTIO, "istiod")
    assert deployment is not None
    assert (
        "kubectl.kubernetes.io/restartedAt"
        in deployment["spec"]["template"]["metadata"]["annotations"]
    )
    assert release.forbidden() == []


def test_without_create_the_first_cacerts_is_refused(cluster: KubeEmulator, tmp_path: Path) -> None:
    """rbac.createSecrets false: trustmgr may not create cacerts, and says so."""
    release = install(cluster, tmp_path, merged(base_values(), {"rbac": {"createSecrets": False}}))
    result = release.kubelet.run(release.pod)
    assert result.code == 1
    assert "lack create on secrets" in result.err, result.err
    assert release.cacerts() is None
    assert release.forbidden() == [f"create secrets {ISTIO}/"]


def test_without_create_replacing_works(cluster: KubeEmulator, tmp_path: Path) -> None:
    """Once cacerts exists, get and update on the named Secrets are all a renewal needs:
    a cacerts edited by hand is replaced and the edited one kept for rollback."""
    first = install(cluster, tmp_path / "first", base_values())
    assert first.kubelet.run(first.pod).code == 0
    written = first.cacerts()
    assert written is not None
    edited = copy.deepcopy(written)
    edited["data"]["root-cert.pem"] = edited["data"]["ca-cert.pem"]
    cluster.put_object(edited)
    kept = secret("cacerts-trustmgr-previous", {}, namespace=ISTIO)
    kept["metadata"]["labels"] = {"app.kubernetes.io/managed-by": "trustmgr"}
    cluster.put_object(kept)  # created once by hand, as NOTES.txt says

    release = install(
        cluster, tmp_path / "second", merged(base_values(), {"rbac": {"createSecrets": False}})
    )
    result = release.kubelet.run(release.pod)
    assert result.code == 0, result.err
    replaced = assert_valid_cacerts(release.cacerts(), "web.corp")
    assert replaced.ca_cert != base64.b64decode(written["data"]["ca-cert.pem"])
    previous = cluster.get_object("secrets", ISTIO, "cacerts-trustmgr-previous")
    assert previous is not None and previous["data"] == edited["data"]
    assert release.forbidden() == []


def test_a_wrong_mount_fails_the_run(cluster: KubeEmulator, tmp_path: Path) -> None:
    """The harness reads what the manifest says: a passphrase mounted where the
    configuration does not look for it fails, as it would in a pod."""
    release = install(cluster, tmp_path, base_values())
    pod = copy.deepcopy(release.pod)
    for mount in pod["containers"][0]["volumeMounts"]:
        if mount["name"] == "passphrase":
            mount["mountPath"] = "/etc/trustmgr/secrets"
    result = release.kubelet.run(pod)
    assert result.code == 2, result.err
    assert "passphrase" in result.err
    assert release.cacerts() is None


def test_secrets_unreadable_without_fs_group(cluster: KubeEmulator, tmp_path: Path) -> None:
    """The Secrets are mounted 0440: without the fsGroup the pod's user cannot read them."""
    release = install(cluster, tmp_path, base_values())
    pod = copy.deepcopy(release.pod)
    del pod["securityContext"]["fsGroup"]
    result = release.kubelet.run(pod)
    assert result.code != 0
    assert release.cacerts() is None


def test_without_the_service_account_token_nothing_is_reached(
    cluster: KubeEmulator, tmp_path: Path
) -> None:
    release = install(cluster, tmp_path, base_values())
    pod = copy.deepcopy(release.pod)
    pod["containers"][0]["volumeMounts"] = [
        m for m in pod["containers"][0]["volumeMounts"] if m["name"] != "kube-api-access"
    ]
    result = release.kubelet.run(pod)
    assert result.code != 0
    assert release.cacerts() is None


# --- the daemon ----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def probe(container: Obj, which: str) -> tuple[int, str]:
    """Do what the kubelet's HTTP probe does, with the manifest's path and port."""
    get = container[which]["httpGet"]
    port = get["port"]
    if isinstance(port, str):
        (port,) = [p["containerPort"] for p in container["ports"] if p["name"] == port]
    url = f"http://127.0.0.1:{port}{get['path']}"
    try:
        with urllib.request.urlopen(url, timeout=container[which]["timeoutSeconds"]) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError as exc:
        return 0, str(exc)


@contextlib.contextmanager
def running(kubelet: Kubelet, pod: Obj) -> Iterator[subprocess.Popen[str]]:
    process = kubelet.start(pod)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate()


def run_daemon(release: Install) -> None:
    pod = release.pod
    (container,) = pod["containers"]
    with running(release.kubelet, pod) as process:
        deadline = time.monotonic() + 60
        status, body = probe(container, "readinessProbe")
        while status != 200:
            assert process.poll() is None, process.communicate()[1]
            assert time.monotonic() < deadline, f"never ready: {status} {body}"
            time.sleep(0.2)
            status, body = probe(container, "readinessProbe")
        assert probe(container, "livenessProbe")[0] == 200
        # Ready is not yet leading: with leader election the first pass waits for the Lease.
        port = container["ports"][0]["containerPort"]
        expiry = 'trustmgr_certificate_expiration_timestamp_seconds{cluster="local"'
        metrics = ""
        while expiry not in metrics:
            assert process.poll() is None, process.communicate()[1]
            assert time.monotonic() < deadline, f"no pass wrote the cluster CA: {metrics}"
            time.sleep(0.2)
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
                metrics = answer.read().decode()
        assert_valid_cacerts(release.cacerts(), "web.corp")

        # Stopping the pod: SIGTERM, then the grace period.
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=pod["terminationGracePeriodSeconds"])
        assert process.returncode == 143, err
    assert release.forbidden() == []


def test_daemon_serves_its_probes_and_writes_cacerts(cluster: KubeEmulator, tmp_path: Path) -> None:
    values = merged(
        base_values(), {"mode": "daemon", "daemon": {"replicas": 1, "port": free_port()}}
    )
    release = install(cluster, tmp_path, values)
    assert release.rendered.workload()["kind"] == "Deployment"
    run_daemon(release)


def test_daemon_replicas_elect_a_leader_with_the_roles_lease(
    cluster: KubeEmulator, tmp_path: Path
) -> None:
    values = merged(base_values(), {"mode": "daemon", "daemon": {"port": free_port()}})
    release = install(cluster, tmp_path, values)
    assert release.rendered.workload()["spec"]["replicas"] == 2
    run_daemon(release)
    assert cluster.get_object("leases", NAMESPACE, "trustmgr-leader") is not None


def test_the_pod_runs_as_its_user_on_a_read_only_root(
    cluster: KubeEmulator, tmp_path: Path
) -> None:
    """What the emulated pod enforces: the manifest's user and fsGroup, a read-only
    root and read-only mounts, and /tmp as the only place to write."""
    release = install(cluster, tmp_path, base_values())
    pod = copy.deepcopy(release.pod)
    container = pod["containers"][0]
    container["command"] = [sys.executable, "-c", PROBE]
    container["args"] = []
    result = release.kubelet.run(pod)
    assert result.code == 0, result.err
    assert result.out.splitlines() == [
        "65532 65532 [65532]",
        "/tmp writable",
        "/ Errno 30",
        "/etc/trustmgr/config Errno 30",
        "/home/trustmgr Errno 30",
        "passphrase readable",
    ]


PROBE = """
import os
print(os.getuid(), os.getgid(), os.getgroups())
for path in ("/tmp", "/", "/etc/trustmgr/config", "/home/trustmgr"):
    try:
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "probe"), "w"):
            pass
        print(path, "writable")
    except OSError as exc:
        print(path, f"Errno {exc.errno}")
with open("/etc/trustmgr/passphrase/passphrase") as f:
    print("passphrase", "readable" if f.read() else "empty")
"""
