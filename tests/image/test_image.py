"""The image, built from the Dockerfile and run as the chart's node pod.

Built with podman on a Python base made from Debian's archive (cached between
runs); every image the test makes is removed at the end. The pod runs as
rendered by ``helm template`` (see nodepod.py for how, without a container
runtime), and is driven from the host side through the chart's hostPath socket,
as kubelet and the sidecars reach it.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import imagebuild
import nodepod
import pytest

from csi_driver.client import Client
from csi_driver.proto import csi_pb2 as csi
from driver_harness import MOUNT_SKIP, cleanup, online_ext4_growth_missing

SKIP = MOUNT_SKIP or imagebuild.missing_tools()
pytestmark = pytest.mark.skipif(bool(SKIP), reason=SKIP or "ok")

MiB = 1 << 20
DRIVER = "overlay.csi.dev"
SANITY = os.environ.get("CSI_SANITY") or shutil.which("csi-sanity")
REF = "localhost/overlay-csi:ci"



@pytest.fixture(scope="module")
def image() -> Iterator[imagebuild.BuiltImage]:
    before = imagebuild.image_ids()
    try:
        built = imagebuild.build()
        print(f"\nimage {built.ref}: {built.size_bytes / 1e6:.0f} MB on {built.base}; "
              f"build {built.build_seconds:.1f} s, base {built.base_seconds:.1f} s (0: cached)")
        yield built
    finally:
        imagebuild.unmount_rootfs(REF)
        imagebuild.remove_new_images(before)


@pytest.fixture(scope="module")
def image_root(image: imagebuild.BuiltImage) -> Path:
    return imagebuild.mount_rootfs(image.ref)


class Node:
    """A node's host side: the kubelet and state dirs the chart names, made shared."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.kubelet = root / "kubelet"
        self.state = root / "state"
        self.pod = nodepod.render(
            # no pool file: the default's lies on the real host (tests/test_pool_file.py covers it)
            {"kubeletDir": str(self.kubelet), "node.stateDir": str(self.state), "node.poolFile.path": "",
             "image.repository": "localhost/overlay-csi", "image.tag": "ci"},
            node_name="image-node",
            image_env=imagebuild.environment(REF),
        )
        self.socket = self.kubelet / "plugins" / DRIVER / "csi.sock"

    def share(self) -> None:
        for path in (self.kubelet, self.state):
            nodepod.share(path)
        for sub in ("plugins_registry", "pods", "plugins"):  # kubelet makes them at start
            (self.kubelet / sub).mkdir()

    def staging(self, handle: str) -> Path:
        """csi_attacher.go makeDeviceMountPath: the sha256 of the volume handle."""
        sha = hashlib.sha256(handle.encode()).hexdigest()
        return self.kubelet / "plugins" / "kubernetes.io" / "csi" / DRIVER / sha / "globalmount"

    def target(self, pod_uid: str, pv: str) -> Path:
        return self.kubelet / "pods" / pod_uid / "volumes" / "kubernetes.io~csi" / pv / "mount"

    def close(self) -> list[str]:
        mounts, loops = cleanup(self.root)  # the shared binds themselves, and any leak
        return [m for m in mounts if m not in (str(self.kubelet), str(self.state))] + loops


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    n = Node(tmp_path)
    leaks: list[str] = []
    try:
        n.share()
        yield n
    finally:
        leaks = n.close()
    assert not leaks, f"the pod left mounts or loop devices behind: {leaks}"


def test_image_is_lean_and_holds_nothing_of_the_machine(image: imagebuild.BuiltImage, image_root: Path):
    for tool in ("mount", "umount", "losetup", "fsfreeze", "blockdev", "findmnt", "mkfs.ext4", "e2fsck",
                 "resize2fs", "tune2fs", "mkfs.xfs", "xfs_growfs", "xfs_repair"):
        assert any((image_root / d / tool).exists() for d in ("usr/sbin", "usr/bin", "sbin", "bin")), tool
    entry = imagebuild.entrypoint(image.ref)
    assert entry == ["overlay-csi"]
    assert (image_root / "opt/venv/bin/overlay-csi").exists()
    for absent in ("usr/bin/gcc", "usr/bin/cc", "root/.cache/pip", "wheels", "src", "etc/pip.conf",
                   "var/lib/apt/lists/lock", "var/cache/apt/pkgcache.bin", "opt/venv/bin/pip"):
        assert not (image_root / absent).exists(), f"{absent} should not be in the image"
    assert not list((image_root / "var/cache/apt/archives").glob("*.deb"))
    # Debian's python3 (~220 MB with the base) plus the tools and wheels: 386 MB when measured,
    # 97 MB of it the official kubernetes client with its dependencies (its asyncio half removed)
    assert image.size_bytes < 400e6, f"{image.size_bytes / 1e6:.0f} MB"
    assert not list(image_root.glob("opt/venv/lib/python3*/site-packages/kubernetes/aio"))


def test_chart_node_pod_serves_a_pod_volume_through_the_hostpath_socket(image_root: Path, node: Node):
    assert node.pod.privileged
    argv = imagebuild.entrypoint(REF) + node.pod.args
    pod = nodepod.RunningPod(node.pod, image_root, node.root / "ctr", argv)
    try:
        pod.wait_for(node.socket)
        with Client(node.socket) as c:
            c.wait_ready(30)
            info = c.node.NodeGetInfo(csi.NodeGetInfoRequest())
            assert info.node_id == "image-node"  # NODE_NAME from the downward API reached --node-id
            vid = c.create_volume("pvc-image", 64 * MiB).volume_id
            staging, target = node.staging(vid), node.target("uid-a", "pv-a")
            staging.mkdir(parents=True)
            with pytest.raises(grpc.RpcError) as e:  # the chart's --kubelet-dir: kubelet's paths only
                c.stage(vid, node.kubelet)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            c.stage(vid, staging)
            c.publish(vid, staging, target)
            data = os.urandom(3 * MiB)
            (target / "data.bin").write_bytes(data)  # the host sees the pod's mount: propagation works
            snap = c.create_snapshot("snap-image", vid).snapshot_id  # in use: frozen copy
            rid = c.create_volume("pvc-restore", 64 * MiB, snapshot=snap).volume_id
            r_staging, r_target = node.staging(rid), node.target("uid-b", "pv-b")
            r_staging.mkdir(parents=True)
            c.stage(rid, r_staging)
            c.publish(rid, r_staging, r_target)
            assert (r_target / "data.bin").read_bytes() == data
            for v, stg, tgt in ((rid, r_staging, r_target), (vid, staging, target)):
                c.unpublish(v, tgt)
                c.unstage(v, stg)
            assert not list(node.kubelet.glob("pods/*/volumes/*/*/mount/*"))
            c.delete_volume(rid)
            c.delete_snapshot(snap)
            c.delete_volume(vid)
    finally:
        code = pod.stop()
    assert code == 0, pod.log.read_text()[-3000:]


def test_doctor_inside_the_image(image_root: Path, node: Node):
    argv = imagebuild.entrypoint(REF) + ["doctor", "--state-dir", str(node.state)]
    out = nodepod.run_once(node.pod, image_root, node.root / "ctr", argv)
    m = re.search(r"(\d+) OK, (\d+) WARN, (\d+) FAIL", out)
    assert m and m[3] == "0", out[-3000:]
    assert "probe_loop_mount   an ext4 image mounts read-write on a direct-I/O loop device" in out, out
    # what online ext4 growth needs (driver_harness.online_ext4_growth_missing): the pod's doctor
    # must see it exactly where the host grants it, so a privileged node shows OK here
    want = "WARN  cap_sys_resource" if online_ext4_growth_missing() else "OK    cap_sys_resource"
    assert want in out, out[-3000:]


@pytest.mark.skipif(not SANITY, reason="no csi-sanity binary (set CSI_SANITY or put it on PATH)")
def test_csi_sanity_against_the_chart_node_pod(image_root: Path, node: Node):
    # as tests/test_csi_sanity.py: csi-sanity v5.4.0 does not know GET_SNAPSHOT
    argv = imagebuild.entrypoint(REF) + node.pod.args + [
        "--hide-capability", "GET_SNAPSHOT", "--max-volumes-per-node", "8",
        "--kubelet-dir", ""]  # csi-sanity's own mount and staging dirs are not kubelet's paths
    pod = nodepod.RunningPod(node.pod, image_root, node.root / "ctr", argv)
    try:
        pod.wait_for(node.socket)
        proc = subprocess.run(
            # under the kubelet dirs the chart shares with the pod (pods/ and plugins/ only)
            [SANITY, "--csi.endpoint", str(node.socket),
             "--csi.mountdir", str(node.kubelet / "pods" / "sanity-mnt"),
             "--csi.stagingdir", str(node.kubelet / "plugins" / "sanity-staging"),
             "--csi.testvolumesize", str(64 * MiB),
             "--csi.testvolumeexpandsize", str(128 * MiB), "--csi.testnodevolumeattachlimit",
             "--ginkgo.no-color"], capture_output=True, text=True, timeout=900)
    finally:
        assert pod.stop() == 0
    out = proc.stdout + proc.stderr
    m = re.search(r"(\d+) Passed \| (\d+) Failed \| (\d+) Pending \| (\d+) Skipped", out)
    assert m, out[-3000:]
    print(f"\ncsi-sanity against the image: {m[0]}")
    assert m[2] == "0", re.findall(r"\[FAIL\] (.*)", out)
