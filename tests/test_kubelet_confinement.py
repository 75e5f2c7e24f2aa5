"""--kubelet-dir confines node paths to the shapes kubelet makes (issue: the whole
kubelet dir was in reach): nothing else is mounted over, and nothing the driver did
not make is deleted."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from csi_driver import host
from csi_driver.proto import csi_pb2 as csi
from driver_harness import MOUNT_SKIP, Driver, cleanup, make_driver

MiB = 1 << 20
DRIVER = "overlay.csi.dev"
BOGUS = "vol-" + "f" * 32  # well formed, unknown
pytestmark = pytest.mark.skipif(bool(MOUNT_SKIP), reason=MOUNT_SKIP or "")


def block_cap() -> csi.VolumeCapability:
    return csi.VolumeCapability(
        block=csi.VolumeCapability.BlockVolume(),
        access_mode=csi.VolumeCapability.AccessMode(mode=csi.VolumeCapability.AccessMode.SINGLE_NODE_WRITER),
    )


def code_of(call, *args, **kwargs) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as e:
        call(*args, **kwargs)
    return e.value.code()


class Kubelet:
    """kubelet's paths (tests/kubelet/kubelet_sim.py) under the driver's --kubelet-dir."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.csi = root / "plugins" / "kubernetes.io" / "csi"

    def staging(self, handle: str) -> Path:
        p = self.csi / DRIVER / hashlib.sha256(handle.encode()).hexdigest() / "globalmount"
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def target(self, uid: str, name: str) -> Path:
        p = self.root / "pods" / uid / "volumes" / "kubernetes.io~csi" / name / "mount"
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def block_staging(self, pv: str) -> Path:
        p = self.csi / "volumeDevices" / "staging" / pv
        p.mkdir(parents=True, exist_ok=True)
        return p

    def block_target(self, pv: str, uid: str) -> Path:
        p = self.csi / "volumeDevices" / "publish" / pv / uid
        p.parent.mkdir(parents=True, exist_ok=True)
        return p


@pytest.fixture
def confined(tmp_path: Path) -> Iterator[tuple[Driver, Kubelet]]:
    k = tmp_path / "kubelet"
    k.mkdir()
    d = make_driver(tmp_path, kubelet_dir=str(k))
    try:
        yield d, Kubelet(k)
    finally:
        d.stop()
        mounts, loops = cleanup(tmp_path)
    assert not mounts and not loops, f"leaked {mounts} {loops}"


def test_only_kubelet_shaped_paths_are_accepted(confined):
    d, k = confined
    c = d.client
    vid = c.create_volume("shaped", 16 * MiB).volume_id
    (k.root / "pods").mkdir(exist_ok=True)
    (k.root / "plugins_registry").mkdir()
    (k.root / "config.yaml").write_text("kind: KubeletConfiguration\n")
    staging, target = k.staging(vid), k.target("uid-1", "pv-1")
    wrong = [
        k.root,
        k.root / "pods",
        k.root / "plugins_registry",
        k.root / "config.yaml",
        k.root / "plugins" / "kubernetes.io" / "csi" / DRIVER / ("0" * 63) / "globalmount",
        k.root / "plugins" / "kubernetes.io" / "csi" / "other.driver" / ("0" * 64) / "globalmount",
        k.root / "pods" / "uid-1" / "volumes" / "kubernetes.io~csi" / "pv-1",
        k.root / "pods" / "uid-1" / "volumes" / "kubernetes.io~empty-dir" / "pv-1" / "mount",
    ]
    for path in wrong:
        assert code_of(c.stage, vid, path) == grpc.StatusCode.INVALID_ARGUMENT, path
        c.stage(vid, staging)
        assert code_of(c.publish, vid, staging, path) == grpc.StatusCode.INVALID_ARGUMENT, path
        assert code_of(c.unpublish, vid, path) == grpc.StatusCode.INVALID_ARGUMENT, path
        assert code_of(c.stats, vid, path) == grpc.StatusCode.INVALID_ARGUMENT, path
        assert code_of(c.unstage, vid, path) == grpc.StatusCode.INVALID_ARGUMENT, path
        c.unstage(vid, staging)
    # a target's shape as the staging path and the other way round
    assert code_of(c.stage, vid, target) == grpc.StatusCode.INVALID_ARGUMENT
    assert [m.target for m in host.mounts_under(k.root)] == []
    assert (k.root / "config.yaml").read_text() == "kind: KubeletConfiguration\n"
    assert (k.root / "plugins_registry").is_dir()
    c.stage(vid, staging)
    c.publish(vid, staging, target)
    assert c.stats(vid, target).usage
    c.unpublish(vid, target)
    c.unstage(vid, staging)


def test_block_paths_and_a_block_publish_never_covers_a_file(confined):
    d, k = confined
    c = d.client
    vid = c.create_volume("blk", 16 * MiB, cap=block_cap()).volume_id
    assert code_of(c.stage, vid, k.staging(vid), cap=block_cap()) == grpc.StatusCode.INVALID_ARGUMENT
    staging = k.block_staging("pv-blk")
    c.stage(vid, staging, cap=block_cap())
    taken = k.block_target("pv-blk", "uid-taken")
    taken.write_text("somebody's data\n")
    code = code_of(c.publish, vid, staging, taken, cap=block_cap())
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert not host.is_mounted(taken) and taken.read_text() == "somebody's data\n"
    with d.engine.store.read() as tx:
        assert tx.publications(vid) == []
    target = k.block_target("pv-blk", "uid-1")
    c.publish(vid, staging, target, cap=block_cap())
    # kubelet's stats path: its bind mount of the publish path in the global map path
    map_path = k.csi / "volumeDevices" / "pv-blk" / "dev" / "uid-1"
    assert code_of(c.stats, vid, map_path) == grpc.StatusCode.NOT_FOUND  # shaped, not bound here
    c.unpublish(vid, target)
    assert not target.exists() and taken.exists()
    c.unstage(vid, staging)


def test_an_unknown_volumes_teardown_deletes_only_what_the_driver_makes(confined):
    d, k = confined
    c = d.client
    registry = k.root / "plugins_registry"
    registry.mkdir()
    assert code_of(c.unpublish, BOGUS, registry) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(c.unstage, BOGUS, registry) == grpc.StatusCode.INVALID_ARGUMENT
    assert registry.is_dir()
    target = k.target("uid-1", "pv-1")
    target.mkdir()
    c.unpublish(BOGUS, target)  # an empty mount dir at kubelet's target: the driver's
    assert not target.exists()
    block = k.block_target("pv-2", "uid-2")
    block.mkdir()  # a dir where the driver makes a file: not its
    c.unpublish(BOGUS, block)
    assert block.is_dir()
    block.rmdir()
    block.write_text("x")  # a file with data: not its
    c.unpublish(BOGUS, block)
    assert block.read_text() == "x"
    block.write_text("")
    c.unpublish(BOGUS, block)
    assert not block.exists()
    staging = k.staging("gone")
    staging.mkdir()
    c.unstage(BOGUS, staging)
    assert staging.is_dir()  # kubelet removes its own staging dir


def test_a_failed_stage_or_publish_leaves_no_record(confined):
    d, k = confined
    c = d.client
    vid = c.create_volume("fails", 16 * MiB).volume_id
    bad_staging = k.staging("file-parent")
    bad_staging.parent.rmdir()
    bad_staging.parent.write_text("")  # the parent is a file: mkdir fails after the record
    assert code_of(c.stage, vid, bad_staging) != grpc.StatusCode.OK
    assert d.engine.get_volume(vid).staging_path is None
    staging = k.staging(vid)
    c.stage(vid, staging)
    bad_target = k.target("uid-f", "pv-f")
    bad_target.parent.rmdir()
    bad_target.parent.write_text("")
    assert code_of(c.publish, vid, staging, bad_target) != grpc.StatusCode.OK
    with d.engine.store.read() as tx:
        assert tx.publications(vid) == []
    target = k.target("uid-1", "pv-1")
    c.publish(vid, staging, target)
    c.unpublish(vid, target)
    c.unstage(vid, staging)
    bvid = c.create_volume("bfails", 16 * MiB, cap=block_cap()).volume_id
    bad_block = k.csi / "volumeDevices" / "staging" / "pv-b"
    bad_block.parent.mkdir(parents=True, exist_ok=True)
    (k.csi / "volumeDevices" / "staging").rmdir()
    (k.csi / "volumeDevices" / "staging").write_text("")
    assert code_of(c.stage, bvid, bad_block, cap=block_cap()) != grpc.StatusCode.OK
    assert d.engine.get_volume(bvid).staging_path is None


def test_without_kubelet_dir_an_unknown_volumes_unpublish_deletes_nothing(tmp_path: Path):
    d = make_driver(tmp_path)
    try:
        dir_ = tmp_path / "somewhere"
        dir_.mkdir()
        d.client.unpublish(BOGUS, dir_)
        assert dir_.is_dir()  # not a path kubelet would name: not the driver's to delete
        target = tmp_path / "k" / "pods" / "uid" / "volumes" / "kubernetes.io~csi" / "pv" / "mount"
        target.mkdir(parents=True)
        d.client.unpublish(BOGUS, target)
        assert not target.exists()
    finally:
        d.stop()
        cleanup(tmp_path)
