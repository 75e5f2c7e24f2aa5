"""End-to-end tests on a real multi-node kind cluster.

What runs, in order (one cluster for the module):

1. `kind create cluster` from deploy/kind/cluster.yaml (1 control plane +
   2 workers), `docker build` of the image and `kind load docker-image`;
2. the snapshot.storage.k8s.io CRDs, then `helm install` of
   charts/overlay-csi with the chart's own snapshot-controller
   (--enable-distributed-snapshotting);
3. on real pods: a PVC written and read back after the pod is replaced;
   snapshot and restore; clone; online expansion; a raw block volume; an
   inline ephemeral volume; a volume on each worker; a node plugin restart
   while a pod uses its volume;
4. the Kubernetes external storage suite (`e2e.test
   -storage.testdriver=deploy/test-driver.yaml`) when an e2e.test binary is
   given (E2E_TEST_BINARY, or on PATH).

`bash deploy/e2e.sh` prepares everything and runs this module. It needs
docker and kind; without them (or without OVERLAY_CSI_E2E=1, which the script
sets) the module skips and says why.

Environment: KIND_CLUSTER (name, default overlay-csi-e2e), KIND_NODE_IMAGE,
E2E_KEEP_CLUSTER=1 (leave the cluster up; an existing cluster of that name is
reused and always left up), E2E_IMAGE (default overlay-csi:e2e),
E2E_SKIP_BUILD=1, E2E_TEST_BINARY, E2E_FOCUS / E2E_SKIP (ginkgo regexps),
SNAPSHOTTER_VERSION (CRDs, default v8.6.0), HELM, KUBECTL, E2E_LOG_DIR (logs and
the suite's report; default <tmp>/overlay-csi-e2e-logs).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "overlay-csi"
KIND_CONFIG = ROOT / "deploy" / "kind" / "cluster.yaml"
TEST_DRIVER = ROOT / "deploy" / "test-driver.yaml"
LOG_DIR = Path(os.environ.get("E2E_LOG_DIR") or Path(tempfile.gettempdir()) / "overlay-csi-e2e-logs")

CLUSTER = os.environ.get("KIND_CLUSTER", "overlay-csi-e2e")
IMAGE = os.environ.get("E2E_IMAGE", "overlay-csi:e2e")
SNAPSHOTTER_VERSION = os.environ.get("SNAPSHOTTER_VERSION", "v8.6.0")
RELEASE = "overlay-csi"
NAMESPACE = "kube-system"
DRIVER = "overlay.csi.dev"
STORAGE_CLASS = "overlay-csi"
SNAPSHOT_CLASS = "overlay-csi"
TOPOLOGY_KEY = f"topology.{DRIVER}/node"
BUSYBOX = "busybox:1.36"
CRD_BASE = (
    "https://raw.githubusercontent.com/kubernetes-csi/external-snapshotter/"
    f"{SNAPSHOTTER_VERSION}/client/config/crd"
)
CRD_FILES = [
    "snapshot.storage.k8s.io_volumesnapshotclasses.yaml",
    "snapshot.storage.k8s.io_volumesnapshotcontents.yaml",
    "snapshot.storage.k8s.io_volumesnapshots.yaml",
]


def _tool(env: str, name: str) -> str | None:
    if os.environ.get(env):
        return os.environ[env]
    local = ROOT / ".ci" / "bin" / name
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    return shutil.which(name)


def _skip_reason() -> str:
    if shutil.which("kind") is None:
        return "kind is not installed: the kind e2e needs docker and kind (run deploy/e2e.sh where both are)"
    if shutil.which("docker") is None:
        return "docker is not installed: the kind e2e needs a docker engine"
    try:
        proc = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"`docker info` failed ({e}): no usable docker engine"
    if proc.returncode != 0:
        first = (proc.stderr.strip().splitlines() or ["no output"])[0]
        return f"`docker info` failed: no usable docker engine ({first})"
    if _tool("HELM", "helm") is None:
        return "no helm binary: set HELM or run `bash .ci/install-helm.sh`"
    if _tool("KUBECTL", "kubectl") is None:
        return "no kubectl binary: set KUBECTL or run `bash .ci/install-helm.sh`"
    if os.environ.get("OVERLAY_CSI_E2E") != "1":
        return "docker and kind are here; set OVERLAY_CSI_E2E=1 (deploy/e2e.sh does) to create a kind cluster"
    return ""


SKIP_REASON = _skip_reason()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(bool(SKIP_REASON), reason=SKIP_REASON or "ok")]

if not SKIP_REASON:
    kubernetes = pytest.importorskip("kubernetes", reason="pip install kubernetes (deploy/e2e.sh does)")
    from kubernetes import client, config
    from kubernetes.client.rest import ApiException
    from kubernetes.stream import stream


# ---------------------------------------------------------------- plumbing


def run(*argv: str, timeout: float = 900, check: bool = True, **kw: Any) -> subprocess.CompletedProcess[str]:
    print("+", " ".join(argv), flush=True)
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def wait_for(what: str, check: Callable[[], Any], timeout: float = 300, interval: float = 2) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except Exception as e:  # noqa: BLE001 - API hiccups while objects appear
            last = e
        else:
            if last:
                return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; last: {last!r}")


@dataclass
class Cluster:
    kubeconfig: str
    helm: str
    kubectl: str
    core: Any
    apps: Any
    storage: Any
    custom: Any
    workers: list[str]

    def kubectl_run(self, *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        return run(self.kubectl, "--kubeconfig", self.kubeconfig, *args, **kw)


def _cluster_exists() -> bool:
    proc = run("kind", "get", "clusters", check=False)
    return CLUSTER in proc.stdout.split()


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    helm = _tool("HELM", "helm")
    kubectl = _tool("KUBECTL", "kubectl")
    assert helm and kubectl
    work = Path(tempfile.mkdtemp(prefix="overlay-csi-e2e-"))
    kubeconfig = str(work / "kubeconfig")
    created = False
    if not _cluster_exists():
        argv = ["kind", "create", "cluster", "--name", CLUSTER, "--config", str(KIND_CONFIG),
                "--kubeconfig", kubeconfig, "--wait", "180s"]
        if os.environ.get("KIND_NODE_IMAGE"):
            argv += ["--image", os.environ["KIND_NODE_IMAGE"]]
        run(*argv)
        created = True
    else:
        run("kind", "export", "kubeconfig", "--name", CLUSTER, "--kubeconfig", kubeconfig)
    try:
        if os.environ.get("E2E_SKIP_BUILD") != "1":
            run("docker", "build", "-t", IMAGE, str(ROOT), env={**os.environ, "DOCKER_BUILDKIT": "1"},
                timeout=1800)
        run("kind", "load", "docker-image", IMAGE, "--name", CLUSTER)

        config.load_kube_config(config_file=kubeconfig)
        c = Cluster(kubeconfig, helm, kubectl, client.CoreV1Api(), client.AppsV1Api(),
                    client.StorageV1Api(), client.CustomObjectsApi(), [])
        c.workers = sorted(
            n.metadata.name for n in c.core.list_node().items
            if "node-role.kubernetes.io/control-plane" not in (n.metadata.labels or {})
        )
        assert len(c.workers) == 2, f"expected 2 workers, got {c.workers}"

        for name in CRD_FILES:
            c.kubectl_run("apply", "-f", f"{CRD_BASE}/{name}")
        c.kubectl_run("wait", "--for=condition=Established", "--timeout=120s",
                      "crd/volumesnapshotclasses.snapshot.storage.k8s.io",
                      "crd/volumesnapshotcontents.snapshot.storage.k8s.io",
                      "crd/volumesnapshots.snapshot.storage.k8s.io")

        repo, _, tag = IMAGE.rpartition(":")
        run(helm, "upgrade", "--install", RELEASE, str(CHART), "--namespace", NAMESPACE,
            "--kubeconfig", kubeconfig,
            "--set", f"image.repository={repo}", "--set", f"image.tag={tag}",
            "--set", "image.pullPolicy=Never",
            "--set", "snapshotController.install=true",
            "--set", "driver.logLevel=debug",
            # inline volumes are off by default; the scenarios and the storage suite use them
            "--set", "csiDriver.ephemeral.enabled=true", "--set", "csiDriver.ephemeral.maxSize=4Gi",
            "--wait", "--timeout", "10m")

        def registered_everywhere() -> bool:
            nodes = {n.metadata.name for n in c.core.list_node().items}
            ok = set()
            for csinode in c.storage.list_csi_node().items:
                drivers = csinode.spec.drivers or []
                if any(d.name == DRIVER and TOPOLOGY_KEY in (d.topology_keys or []) for d in drivers):
                    ok.add(csinode.metadata.name)
            return ok == nodes

        wait_for("the driver to register on every node", registered_everywhere, timeout=300)
        yield c
    finally:
        if os.environ.get("E2E_DUMP_LOGS", "1") == "1":
            _dump_logs(kubectl, kubeconfig, work)
        if created and os.environ.get("E2E_KEEP_CLUSTER") != "1":
            run("kind", "delete", "cluster", "--name", CLUSTER, check=False)
        shutil.rmtree(work, ignore_errors=True)


def _dump_logs(kubectl: str, kubeconfig: str, work: Path) -> None:
    out = LOG_DIR
    out.mkdir(parents=True, exist_ok=True)
    for selector in (f"app.kubernetes.io/instance={RELEASE}",):
        proc = run(kubectl, "--kubeconfig", kubeconfig, "-n", NAMESPACE, "logs", "-l", selector,
                   "--all-containers", "--prefix", "--tail=-1", "--max-log-requests=20", check=False)
        (out / "overlay-csi.log").write_text(proc.stdout + proc.stderr)
    proc = run(kubectl, "--kubeconfig", kubeconfig, "get", "events", "-A", "--sort-by=.lastTimestamp",
               check=False)
    (out / "events.txt").write_text(proc.stdout + proc.stderr)


@pytest.fixture
def ns(cluster: Cluster) -> Iterator[str]:
    name = f"e2e-{uuid.uuid4().hex[:8]}"
    cluster.core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    yield name
    cluster.core.delete_namespace(name)

    def gone() -> bool:
        try:
            cluster.core.read_namespace(name)
        except ApiException as e:
            return e.status == 404
        return False

    wait_for(f"namespace {name} to be deleted (volumes released)", gone, timeout=300)


# ---------------------------------------------------------------- object builders


def pvc(name: str, size: str = "64Mi", *, data_source: dict[str, str] | None = None,
        block: bool = False) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "accessModes": ["ReadWriteOnce"],
        "storageClassName": STORAGE_CLASS,
        "resources": {"requests": {"storage": size}},
    }
    if data_source:
        spec["dataSource"] = data_source
    if block:
        spec["volumeMode"] = "Block"
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": name}, "spec": spec}


def pod(name: str, *, claim: str | None = None, node: str | None = None, block: bool = False,
        inline: dict[str, str] | None = None, command: str = "sleep 3600") -> dict[str, Any]:
    container: dict[str, Any] = {
        "name": "app",
        "image": BUSYBOX,
        "command": ["sh", "-c", command],
    }
    volumes: list[dict[str, Any]] = []
    if claim:
        volumes.append({"name": "data", "persistentVolumeClaim": {"claimName": claim}})
    if inline is not None:
        volumes.append({"name": "data", "csi": {"driver": DRIVER, "volumeAttributes": inline}})
    if volumes:
        if block:
            container["volumeDevices"] = [{"name": "data", "devicePath": "/dev/xvda"}]
        else:
            container["volumeMounts"] = [{"name": "data", "mountPath": "/data"}]
    spec: dict[str, Any] = {
        "containers": [container],
        "volumes": volumes,
        "terminationGracePeriodSeconds": 1,
        "restartPolicy": "Never",
    }
    if node:
        spec["nodeSelector"] = {"kubernetes.io/hostname": node}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec}


def create(c: Cluster, namespace: str, obj: dict[str, Any]) -> None:
    if obj["kind"] == "Pod":
        c.core.create_namespaced_pod(namespace, obj)
    elif obj["kind"] == "PersistentVolumeClaim":
        c.core.create_namespaced_persistent_volume_claim(namespace, obj)
    elif obj["kind"] == "VolumeSnapshot":
        c.custom.create_namespaced_custom_object("snapshot.storage.k8s.io", "v1", namespace,
                                                 "volumesnapshots", obj)
    else:
        raise ValueError(obj["kind"])


def running(c: Cluster, namespace: str, name: str, timeout: float = 300) -> Any:
    def check() -> Any:
        p = c.core.read_namespaced_pod(name, namespace)
        if p.status.phase == "Running":
            return p
        if p.status.phase in ("Failed", "Succeeded"):
            raise AssertionError(f"pod {name} ended: {p.status.phase}")
        return None

    return wait_for(f"pod {namespace}/{name} to run", check, timeout=timeout)


def delete_pod(c: Cluster, namespace: str, name: str) -> None:
    c.core.delete_namespaced_pod(name, namespace, grace_period_seconds=1)

    def gone() -> bool:
        try:
            c.core.read_namespaced_pod(name, namespace)
        except ApiException as e:
            return e.status == 404
        return False

    wait_for(f"pod {name} to be deleted (volume unpublished)", gone, timeout=180)


def sh(c: Cluster, namespace: str, name: str, script: str, container: str | None = None) -> str:
    kw = {"container": container} if container else {}
    resp = stream(c.core.connect_get_namespaced_pod_exec, name, namespace,
                  command=["sh", "-c", script], stderr=True, stdin=False, stdout=True, tty=False,
                  _preload_content=False, **kw)
    resp.run_forever(timeout=120)
    out = resp.read_all()
    rc = resp.returncode
    resp.close()
    assert rc == 0, f"`{script}` in {namespace}/{name} exited {rc}:\n{out}"
    return out


def bound_pv(c: Cluster, namespace: str, claim: str, timeout: float = 300) -> Any:
    def check() -> Any:
        p = c.core.read_namespaced_persistent_volume_claim(claim, namespace)
        if p.status.phase == "Bound":
            return c.core.read_persistent_volume(p.spec.volume_name)
        return None

    return wait_for(f"claim {namespace}/{claim} to bind", check, timeout=timeout)


def pv_node(pv: Any) -> str:
    terms = pv.spec.node_affinity.required.node_selector_terms
    for term in terms:
        for expr in term.match_expressions or []:
            if expr.key == TOPOLOGY_KEY:
                return expr.values[0]
    raise AssertionError(f"PV {pv.metadata.name} has no {TOPOLOGY_KEY} node affinity: {terms}")


def snapshot(c: Cluster, namespace: str, name: str, claim: str) -> None:
    create(c, namespace, {
        "apiVersion": "snapshot.storage.k8s.io/v1",
        "kind": "VolumeSnapshot",
        "metadata": {"name": name},
        "spec": {"volumeSnapshotClassName": SNAPSHOT_CLASS, "source": {"persistentVolumeClaimName": claim}},
    })

    def ready() -> bool:
        s = c.custom.get_namespaced_custom_object("snapshot.storage.k8s.io", "v1", namespace,
                                                  "volumesnapshots", name)
        status = s.get("status") or {}
        if status.get("error"):
            raise AssertionError(f"snapshot {name} failed: {status['error']}")
        return bool(status.get("readyToUse"))

    wait_for(f"snapshot {namespace}/{name} to be ready", ready, timeout=300)


def kib_of(df_output: str) -> int:
    """Size column of `df -k /data` (busybox)."""
    line = df_output.strip().splitlines()[-1].split()
    return int(line[1])


# ---------------------------------------------------------------- scenarios


def test_pvc_data_survives_pod_restart(cluster, ns):
    create(cluster, ns, pvc("data"))
    create(cluster, ns, pod("writer", claim="data"))
    first = running(cluster, ns, "writer")
    sh(cluster, ns, "writer", "echo hello-overlay > /data/file && sync && id > /data/owner")
    pv = bound_pv(cluster, ns, "data")
    assert pv.spec.csi.driver == DRIVER
    assert pv_node(pv) == first.spec.node_name, "the volume must live where the pod first ran"
    delete_pod(cluster, ns, "writer")
    create(cluster, ns, pod("reader", claim="data"))
    second = running(cluster, ns, "reader")
    assert second.spec.node_name == first.spec.node_name, "topology pins the pod to the volume's node"
    assert sh(cluster, ns, "reader", "cat /data/file").strip() == "hello-overlay"


def test_snapshot_and_restore(cluster, ns):
    create(cluster, ns, pvc("src"))
    create(cluster, ns, pod("src-pod", claim="src"))
    running(cluster, ns, "src-pod")
    sh(cluster, ns, "src-pod", "echo before > /data/f && sync")
    snapshot(cluster, ns, "snap", "src")
    # Changes after the snapshot must not leak into the restore.
    sh(cluster, ns, "src-pod", "echo after > /data/f && echo new > /data/g && sync")
    create(cluster, ns, pvc("restored", data_source={
        "apiGroup": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot", "name": "snap"}))
    create(cluster, ns, pod("restore-pod", claim="restored"))
    running(cluster, ns, "restore-pod")
    assert sh(cluster, ns, "restore-pod", "cat /data/f").strip() == "before"
    assert sh(cluster, ns, "restore-pod", "test -e /data/g && echo yes || echo no").strip() == "no"
    # Both volumes stay writable and independent.
    sh(cluster, ns, "restore-pod", "echo restored > /data/f && sync")
    assert sh(cluster, ns, "src-pod", "cat /data/f").strip() == "after"
    snap = cluster.custom.get_namespaced_custom_object(
        "snapshot.storage.k8s.io", "v1", ns, "volumesnapshots", "snap")
    content = snap["status"]["boundVolumeSnapshotContentName"]
    labels = cluster.custom.get_cluster_custom_object(
        "snapshot.storage.k8s.io", "v1", "volumesnapshotcontents", content)["metadata"].get("labels", {})
    src_node = pv_node(bound_pv(cluster, ns, "src"))
    assert src_node in labels.values(), f"distributed snapshotting did not label {content} with {src_node}"


def test_clone(cluster, ns):
    create(cluster, ns, pvc("origin"))
    create(cluster, ns, pod("origin-pod", claim="origin"))
    running(cluster, ns, "origin-pod")
    sh(cluster, ns, "origin-pod", "mkdir -p /data/d && echo cloned > /data/d/f && sync")
    create(cluster, ns, pvc("copy", data_source={"kind": "PersistentVolumeClaim", "name": "origin"}))
    create(cluster, ns, pod("copy-pod", claim="copy"))
    running(cluster, ns, "copy-pod")
    assert sh(cluster, ns, "copy-pod", "cat /data/d/f").strip() == "cloned"
    assert pv_node(bound_pv(cluster, ns, "copy")) == pv_node(bound_pv(cluster, ns, "origin"))
    sh(cluster, ns, "copy-pod", "echo changed > /data/d/f && sync")
    assert sh(cluster, ns, "origin-pod", "cat /data/d/f").strip() == "cloned"


def test_online_expansion(cluster, ns):
    create(cluster, ns, pvc("grow", "64Mi"))
    create(cluster, ns, pod("grow-pod", claim="grow"))
    node = running(cluster, ns, "grow-pod").spec.node_name
    # what online ext4 growth needs and the unprivileged tests cannot show (see
    # driver_harness.online_ext4_growth_missing): the node plugin has CAP_SYS_RESOURCE in the
    # initial user namespace
    node_plugins = f"app.kubernetes.io/instance={RELEASE},app.kubernetes.io/component=node"
    plugin = cluster.core.list_namespaced_pod(
        NAMESPACE, label_selector=node_plugins, field_selector=f"spec.nodeName={node}").items[0]
    name = plugin.metadata.name
    status = sh(cluster, NAMESPACE, name, "cat /proc/self/status", container="overlay-csi")
    cap_eff = int(next(x for x in status.splitlines() if x.startswith("CapEff:")).split()[1], 16)
    assert cap_eff >> 24 & 1, f"the node plugin lacks CAP_SYS_RESOURCE: CapEff {cap_eff:016x}"
    uid_map = sh(cluster, NAMESPACE, name, "cat /proc/self/uid_map", container="overlay-csi")
    assert uid_map.split() == ["0", "0", "4294967295"], f"the node plugin is in a user namespace: {uid_map}"
    sh(cluster, ns, "grow-pod", "echo keep > /data/f && sync")
    before = kib_of(sh(cluster, ns, "grow-pod", "df -k /data"))
    cluster.core.patch_namespaced_persistent_volume_claim(
        "grow", ns, {"spec": {"resources": {"requests": {"storage": "256Mi"}}}})

    def expanded() -> bool:
        p = cluster.core.read_namespaced_persistent_volume_claim("grow", ns)
        cap = (p.status.capacity or {}).get("storage")
        pending = [cond.type for cond in (p.status.conditions or [])]
        return cap == "256Mi" and not pending

    wait_for("the claim to report 256Mi with no pending resize", expanded, timeout=300)
    def grown() -> int:
        kib = kib_of(sh(cluster, ns, "grow-pod", "df -k /data"))
        return kib if kib > before * 2 else 0

    after = wait_for("the pod to see the larger file system", grown, timeout=120)
    assert after >= 200 * 1024, f"df shows {after} KiB after expanding to 256Mi"
    assert sh(cluster, ns, "grow-pod", "cat /data/f").strip() == "keep"
    sh(cluster, ns, "grow-pod", "dd if=/dev/zero of=/data/big bs=1M count=128 && sync")


def test_block_volume(cluster, ns):
    create(cluster, ns, pvc("raw", "64Mi", block=True))
    create(cluster, ns, pod("raw-pod", claim="raw", block=True))
    running(cluster, ns, "raw-pod")
    sh(cluster, ns, "raw-pod", "echo block-data | dd of=/dev/xvda bs=512 count=1 conv=sync && sync")
    size = int(sh(cluster, ns, "raw-pod", "blockdev --getsize64 /dev/xvda").strip())
    assert size == 64 * 1024 * 1024
    delete_pod(cluster, ns, "raw-pod")
    create(cluster, ns, pod("raw-pod2", claim="raw", block=True))
    running(cluster, ns, "raw-pod2")
    assert sh(cluster, ns, "raw-pod2", "dd if=/dev/xvda bs=10 count=1 2>/dev/null").startswith("block-data")


def test_ephemeral_inline_volume(cluster, ns):
    create(cluster, ns, pod("inline", inline={"size": "64Mi"}))
    running(cluster, ns, "inline")
    sh(cluster, ns, "inline", "echo ephemeral > /data/f && cat /data/f")
    kib = kib_of(sh(cluster, ns, "inline", "df -k /data"))
    assert kib <= 64 * 1024, f"inline volume of 64Mi shows {kib} KiB"
    delete_pod(cluster, ns, "inline")
    # A new pod with the same inline volume starts empty.
    create(cluster, ns, pod("inline2", inline={"size": "64Mi"}))
    running(cluster, ns, "inline2")
    assert sh(cluster, ns, "inline2", "test -e /data/f && echo yes || echo no").strip() == "no"


def test_a_volume_on_each_worker(cluster, ns):
    for i, node in enumerate(cluster.workers):
        create(cluster, ns, pvc(f"v{i}"))
        create(cluster, ns, pod(f"p{i}", claim=f"v{i}", node=node))
    for i, node in enumerate(cluster.workers):
        p = running(cluster, ns, f"p{i}")
        assert p.spec.node_name == node
        assert pv_node(bound_pv(cluster, ns, f"v{i}")) == node
        sh(cluster, ns, f"p{i}", f"echo {node} > /data/node && sync")
    capacities = cluster.storage.list_namespaced_csi_storage_capacity(NAMESPACE).items
    covered = {
        (cap.node_topology.match_labels or {}).get(TOPOLOGY_KEY)
        for cap in capacities if cap.storage_class_name == STORAGE_CLASS and cap.node_topology
    }
    assert set(cluster.workers) <= covered, f"CSIStorageCapacity covers {covered}"


def test_node_plugin_restart_with_a_volume_in_use(cluster, ns):
    create(cluster, ns, pvc("busy"))
    create(cluster, ns, pod("busy-pod", claim="busy"))
    node = running(cluster, ns, "busy-pod").spec.node_name
    sh(cluster, ns, "busy-pod", "echo one > /data/f && sync")
    node_plugins = f"app.kubernetes.io/instance={RELEASE},app.kubernetes.io/component=node"
    plugin_pods = cluster.core.list_namespaced_pod(
        NAMESPACE, label_selector=node_plugins, field_selector=f"spec.nodeName={node}").items
    assert len(plugin_pods) == 1
    old = plugin_pods[0].metadata.name
    cluster.core.delete_namespaced_pod(old, NAMESPACE)

    def replaced() -> bool:
        pods = cluster.core.list_namespaced_pod(
            NAMESPACE, label_selector=node_plugins, field_selector=f"spec.nodeName={node}").items
        return any(p.metadata.name != old and p.status.phase == "Running"
                   and all(cs.ready for cs in (p.status.container_statuses or [])) for p in pods)

    wait_for("a new node plugin pod to be ready", replaced, timeout=300)
    # The volume kept working through the restart and still does.
    assert sh(cluster, ns, "busy-pod", "cat /data/f").strip() == "one"
    sh(cluster, ns, "busy-pod", "echo two >> /data/f && sync")
    # The restarted plugin can unpublish and publish again.
    delete_pod(cluster, ns, "busy-pod")
    create(cluster, ns, pod("busy-pod2", claim="busy"))
    running(cluster, ns, "busy-pod2")
    assert sh(cluster, ns, "busy-pod2", "cat /data/f").split() == ["one", "two"]


def test_external_storage_suite(cluster):
    binary = os.environ.get("E2E_TEST_BINARY") or shutil.which("e2e.test")
    if not binary:
        pytest.skip("no e2e.test binary: set E2E_TEST_BINARY (deploy/e2e.sh downloads it)")
    focus = os.environ.get("E2E_FOCUS", r"External.Storage")
    # Snapshot tests carry [Feature:VolumeSnapshotDataSource] and must run;
    # skip what needs a whole cluster to itself or features we do not claim.
    skip = os.environ.get(
        "E2E_SKIP",
        r"\[Disruptive\]|\[Serial\]|\[Slow\]|\[Feature:Windows\]"
        r"|\[Feature:VolumeGroupSnapshotDataSource\]|\[Feature:VolumeAttributesClass\]",
    )
    report = LOG_DIR
    report.mkdir(parents=True, exist_ok=True)
    proc = run(binary, f"-kubeconfig={cluster.kubeconfig}", f"-storage.testdriver={TEST_DRIVER}",
               f"-ginkgo.focus={focus}", f"-ginkgo.skip={skip}", "-ginkgo.v", "-ginkgo.timeout=3h",
               f"-report-dir={report}", f"-repo-root={ROOT}",
               timeout=4 * 3600, check=False)
    (report / "e2e.test.log").write_text(proc.stdout + proc.stderr)
    tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-60:])
    assert proc.returncode == 0, f"external storage suite failed (full log in {report}):\n{tail}"
