"""Snapshots as external-snapshotter takes them; expansion as external-resizer and kubelet do it.

Snapshots follow kubernetes-csi/external-snapshotter pkg/sidecar-controller/csi_handler.go
(makeSnapshotName "snapshot-<VolumeSnapshot uid>"), snapshot_controller.go (parameters
without reserved keys plus csi.storage.k8s.io/volumesnapshot/name, .../namespace,
.../volumesnapshotcontent/name with --extra-create-metadata; a non-final error retries the
same CreateSnapshot), pkg/snapshotter/snapshotter.go (GetSnapshotStatus: ListSnapshots by
snapshot_id until ready_to_use) and pkg/utils/util.go (RemovePrefixedParameters).

Expansion follows kubernetes-csi/external-resizer pkg/resizer/csi_resizer.go (controller
EXPAND_VOLUME decides the CSI resizer over the trivial one; the capability comes from the
PV), pkg/csi/client.go (Expand: capacity_range.required_bytes only); then kubernetes
pkg/volume/csi/expander.go and csi_client.go NodeExpandVolume (volume_path = the pod's
target, staging_target_path = globalmount, required_bytes = the PV's new capacity) called
from pkg/volume/util/operationexecutor/operation_generator.go (GenerateExpandInUseVolumeFunc
for a running pod, expandVolumeDuringMount after SetUp for the next pod).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import grpc
import pytest
import yaml
from kubelet_sim import PVC, NodeEnv, Pod, Resizer, Snapshotter, StorageClass, VolumeSnapshot

from csi_driver.client import Client
from csi_driver.proto import csi_pb2 as csi
from driver_harness import (
    MOUNT_SKIP,
    Driver,
    DriverProcess,
    cleanup,
    online_ext4_growth_missing,
    store_dump,
)

MiB = 1 << 20


EXT4_GROWTH_MISSING = online_ext4_growth_missing()


def expand_on_node(node: NodeEnv, pod: Pod, pv) -> int | None:
    """kubelet's NodeExpandVolume. Where online ext4 growth is possible it must succeed;
    where it is not (EXT4_GROWTH_MISSING says why), the driver must answer
    FAILED_PRECONDITION naming CAP_SYS_RESOURCE, which kubelet (expander.go inUseError ->
    operation_generator.go MarkForInUseExpansionError) records without failing the mount.
    Returns None in that case."""
    try:
        return node.kubelet.node_expand(pod, pv)
    except grpc.RpcError as e:
        if not EXT4_GROWTH_MISSING or e.code() != grpc.StatusCode.FAILED_PRECONDITION:
            raise
        assert "CAP_SYS_RESOURCE" in (e.details() or ""), e.details()
        return None


def fs_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_blocks * st.f_frsize


@pytest.fixture
def expand_controller(tmp_path: Path):
    """The chart's controller Deployment: `overlay-csi serve --mode=controller-expand`
    next to csi-resizer (charts/overlay-csi/templates/controller-deployment.yaml)."""
    if MOUNT_SKIP:
        pytest.skip(MOUNT_SKIP)
    root = tmp_path / "controller"
    root.mkdir()
    d = Driver(root, mode="controller-expand")
    try:
        yield d
    finally:
        d.stop()
        cleanup(root)


def test_snapshot_as_the_snapshotter_takes_it(node: NodeEnv):
    """A VolumeSnapshot of a volume in use: CreateSnapshot with the sidecar's name and
    parameters, then ListSnapshots(snapshot_id) until ready_to_use; the content's
    restoreSize (size_bytes) must let a claim of the source's size restore it
    (getSnapshotSource refuses a request below restoreSize)."""
    pvc, pv = node.provision("src", 32 * MiB)
    pod = Pod("db")
    target = node.start_pod(pod, pv)
    (target / "table").write_text("v1")
    os.sync()

    vs = VolumeSnapshot("nightly", namespace="default", source=pvc)
    content = node.snapshotter.create(vs, {"csi.storage.k8s.io/snapshotter-secret-name": "s",
                                           "csi.storage.k8s.io/snapshotter-secret-namespace": "ns"})
    # what the driver holds: one snapshot of the claim's volume under the sidecar's name, its
    # layer committed on disk, and the same answer to GetSnapshot
    snaps = store_dump(node.driver.state)["snapshots"]
    assert [(x["id"], x["name"], x["source_volume_id"]) for x in snaps] == [
        (content.snapshot_handle, f"snapshot-{vs.uid}", pv.handle)]
    assert node.driver.engine.backend.layout.image(snaps[0]["layer"]).is_file()
    got = node.client.controller.GetSnapshot(
        csi.GetSnapshotRequest(snapshot_id=content.snapshot_handle)).snapshot
    assert got.ready_to_use and got.source_volume_id == pv.handle and got.size_bytes == content.restore_size
    assert content.ready_to_use and content.snapshot_handle
    assert 0 < content.restore_size <= pvc.request
    assert content.creation_time_ns > 0
    assert node.snapshotter.status(content).ready_to_use

    (target / "table").write_text("v2")
    restored = PVC(name="restored", request=pvc.request, data_source=("VolumeSnapshot", vs))
    r_pv = node.provisioner.provision(restored, node.sc, "node-1")
    reader = Pod("reader")
    tr = node.start_pod(reader, r_pv)
    assert (tr / "table").read_text() == "v1"
    node.stop_pod(reader, r_pv)
    node.stop_pod(pod, pv)
    node.snapshotter.delete(content)
    node.snapshotter.delete(content)  # the sidecar retries deletes: must stay a success
    for v in (r_pv, pv):
        node.provisioner.delete(v)


def test_snapshot_retry_after_a_timeout_gives_the_same_snapshot(node: NodeEnv):
    """A CreateSnapshot that outlives the sidecar's --timeout is retried with the same name
    (the content keeps its "volumesnapshot-being-created" annotation); the driver must
    answer with the one snapshot, not a second."""
    pvc, pv = node.provision("slow-src", 32 * MiB)
    engine = node.driver.engine
    create, slowed = engine.export_snapshot, threading.Event()

    def slow_create(*args, **kwargs):  # the first CreateSnapshot outlives the sidecar's timeout
        snap = create(*args, **kwargs)
        if not slowed.is_set():
            slowed.set()
            time.sleep(1.5)
        return snap

    engine.export_snapshot = slow_create
    snapper = Snapshotter(node.client, timeout=0.5)
    vs = VolumeSnapshot("slow", source=pvc)
    content = snapper.create(vs, poll_interval=0.2)
    assert slowed.is_set() and len([c for c in snapper.calls if c != "ListSnapshots"]) >= 2
    assert snapper.errors[0] == grpc.StatusCode.DEADLINE_EXCEEDED
    assert set(snapper.errors) <= {grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED}
    listed = node.client.controller.ListSnapshots(csi.ListSnapshotsRequest(source_volume_id=pv.handle))
    assert [e.snapshot.snapshot_id for e in listed.entries] == [content.snapshot_handle]
    snapper.delete(content)
    node.provisioner.delete(pv)


@pytest.mark.parametrize("fstype", ["", "xfs"])
def test_online_expansion_with_the_central_resizer(node: NodeEnv, expand_controller: Driver, fstype: str):
    """The resizer talks to the controller-expand instance: ControllerExpandVolume answers
    node_expansion_required, the PV gets the new size, the claim FileSystemResizePending;
    kubelet of the node then calls NodeExpandVolume for the running pod and the pod sees the
    larger file system, data intact. (StorageClass fstype "" = the driver's ext4 default;
    xfs grows online without CAP_SYS_RESOURCE.)"""
    if fstype and not shutil.which(f"mkfs.{fstype}"):
        pytest.skip(f"mkfs.{fstype} is not installed")
    node.sc = StorageClass(parameters={"csi.storage.k8s.io/fstype": fstype} if fstype else {})
    pvc, pv = node.provision("grow", 64 * MiB)
    pod = Pod("app")
    target = node.start_pod(pod, pv)
    (target / "keep").write_text("me")
    before = fs_bytes(target)

    resizer = Resizer(expand_controller.client)
    assert not resizer.trivial
    size, node_needed = resizer.resize(pvc, before + 256 * MiB)
    assert node_needed and size >= before + 256 * MiB and pv.capacity == size
    # the central instance cannot touch the node's volume: nothing has grown yet
    vol = node.driver.engine.get_volume(pv.handle)
    image = node.driver.engine.backend.layout.image(vol.upper)
    assert vol.capacity_bytes == 64 * MiB and fs_bytes(target) == before

    got = expand_on_node(node, pod, pv)
    assert (target / "keep").read_text() == "me"
    if got is None:
        (target / "still").write_text("usable")  # the pod keeps running at the old size
        assert fs_bytes(target) == before
        node.stop_pod(pod, pv)
        node.provisioner.delete(pv)
        pytest.skip(EXT4_GROWTH_MISSING + "; the driver answered FAILED_PRECONDITION as kubelet expects")
    assert got >= before + 256 * MiB
    assert fs_bytes(target) >= before + 200 * MiB
    # the node's driver records and reports the new size; the image really grew
    got_vol = node.client.controller.ControllerGetVolume(csi.ControllerGetVolumeRequest(volume_id=pv.handle))
    assert got_vol.volume.capacity_bytes == got == node.driver.engine.get_volume(pv.handle).capacity_bytes
    assert image.stat().st_size >= pv.capacity
    stats = node.client.node.NodeGetVolumeStats(
        csi.NodeGetVolumeStatsRequest(volume_id=pv.handle, volume_path=str(target)))
    assert stats.usage[0].total >= before + 200 * MiB
    # kubelet retries an expansion it could not record: same request, same answer
    assert node.kubelet.node_expand(pod, pv) == got
    node.stop_pod(pod, pv)
    node.provisioner.delete(pv)


@pytest.mark.parametrize(
    ("fstype", "size", "new"), [("", 64 * MiB, 192 * MiB), ("xfs", 320 * MiB, 640 * MiB)]
)
def test_offline_expansion_finishes_when_the_next_pod_mounts(
    node: NodeEnv, expand_controller: Driver, fstype: str, size: int, new: int
):
    """Resized while no pod uses it: the claim stays FileSystemResizePending until a pod
    mounts it; then MountDevice, SetUp and (expandVolumeDuringMount) NodeExpandVolume with
    the new target and globalmount."""
    if fstype and not shutil.which(f"mkfs.{fstype}"):
        pytest.skip(f"mkfs.{fstype} is not installed")
    node.sc = StorageClass(parameters={"csi.storage.k8s.io/fstype": fstype} if fstype else {})
    pvc, pv = node.provision("later", size)
    resizer = Resizer(expand_controller.client)
    _, node_needed = resizer.resize(pvc, new)
    assert node_needed
    pod = Pod("next")
    target = node.start_pod(pod, pv)
    if expand_on_node(node, pod, pv) is None:
        node.stop_pod(pod, pv)
        node.provisioner.delete(pv)
        pytest.skip(EXT4_GROWTH_MISSING + "; the driver answered FAILED_PRECONDITION as kubelet expects")
    assert fs_bytes(target) >= new * 0.95
    node.stop_pod(pod, pv)
    node.provisioner.delete(pv)


def test_resizer_against_the_node_controller_grows_a_detached_volume(node: NodeEnv):
    """With the resizer talking to a full controller (mode all), a detached volume is grown by
    ControllerExpandVolume alone (node_expansion_required false: the claim is done, kubelet
    calls nothing); the next pod sees the new size."""
    pvc, pv = node.provision("offline", 64 * MiB)
    resizer = Resizer(node.client)
    size, node_needed = resizer.resize(pvc, 160 * MiB)
    assert size >= 160 * MiB and not node_needed and pvc.status_capacity == size
    pod = Pod("p")
    target = node.start_pod(pod, pv)
    assert fs_bytes(target) >= 150 * MiB
    assert "NodeExpandVolume" not in [n for n, _ in node.kubelet.calls]
    node.stop_pod(pod, pv)
    node.provisioner.delete(pv)


@pytest.fixture
def limited_expand_controller(tmp_path: Path):
    """`overlay-csi serve --mode controller-expand --max-volume-size 256Mi`, as the chart runs
    it with driver.maxVolumeSize set (a real process: the flag must reach that mode)."""
    if MOUNT_SKIP:
        pytest.skip(MOUNT_SKIP)
    root = tmp_path / "limited"
    root.mkdir()
    proc = DriverProcess(root, None, "--mode", "controller-expand", "--max-volume-size", "256Mi")
    proc.start()
    client = Client(proc.sock)
    try:
        yield client
    finally:
        client.close()
        proc.terminate()
        cleanup(root)


def test_the_central_resizer_refuses_a_size_above_the_max_volume_size(
    node: NodeEnv, limited_expand_controller: Client
):
    """NewResizerFromClient takes the CSI resizer (controller EXPAND_VOLUME). A claim grown
    past --max-volume-size gets OUT_OF_RANGE from ControllerExpandVolume: IsInfeasibleError,
    so the claim is marked ControllerResizeInfeasible (slow retry) and the PV keeps its size:
    no node is asked to grow past the limit. A size within it still goes to the node."""
    pvc, pv = node.provision("capped", 64 * MiB)
    resizer = Resizer(limited_expand_controller)
    assert not resizer.trivial
    with pytest.raises(grpc.RpcError) as e:
        resizer.resize(pvc, 512 * MiB)
    assert e.value.code() == grpc.StatusCode.OUT_OF_RANGE
    assert "exceeds the driver's --max-volume-size 268435456" in e.value.details()
    assert pvc.conditions == ["ControllerResizeInfeasible"] and pv.capacity == 64 * MiB
    size, node_needed = resizer.resize(pvc, 256 * MiB)
    assert (size, node_needed) == (256 * MiB, True) and pv.capacity == 256 * MiB
    assert pvc.conditions[-1] == "FileSystemResizePending"
    node.provisioner.delete(pv)


def test_the_chart_passes_the_max_volume_size_to_the_central_instance(tmp_path: Path):
    """charts/overlay-csi: driver.maxVolumeSize reaches the controller-expand instance as
    --max-volume-size, as it reaches the node plugin; unset, neither gets the flag."""
    helm = shutil.which("helm")
    if helm is None:
        pytest.skip("helm is not installed (bash .ci/install-helm.sh)")
    chart = Path(__file__).resolve().parents[2] / "charts" / "overlay-csi"

    def args(*sets: str) -> dict[str, list[str]]:
        out = subprocess.run([helm, "template", "x", str(chart), *sets], check=True, capture_output=True,
                             text=True, timeout=120).stdout
        found = {}
        for doc in yaml.safe_load_all(out):
            if not doc or doc["kind"] not in ("Deployment", "DaemonSet"):
                continue
            name = doc["metadata"]["name"]
            if name in ("x-overlay-csi-controller", "x-overlay-csi-node"):  # the resizer's, the node's
                pod = doc["spec"]["template"]["spec"]
                ours = [c for c in pod["containers"] if c["name"] == "overlay-csi"]
                found[name] = [str(a) for a in ours[0]["args"]]
        assert len(found) == 2, sorted(found)
        return found

    for kind, a in args("--set", "driver.maxVolumeSize=100Gi").items():
        assert "--max-volume-size=100Gi" in a, (kind, a)
    for kind, a in args().items():
        assert not any(x.startswith("--max-volume-size") for x in a), (kind, a)
