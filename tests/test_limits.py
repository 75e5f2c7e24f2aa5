"""Per-node limits on what a pod spec can ask for: inline ephemeral volumes' total size
(--max-ephemeral-size) and snapshots per volume (--max-snapshots-per-volume)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from csi_driver import host
from csi_driver.client import mount_capability
from csi_driver.proto import csi_pb2 as csi
from csi_driver.proto import csi_pb2_grpc
from driver_harness import MOUNT_SKIP, Driver, cleanup, make_driver

MiB = 1 << 20
pytestmark = pytest.mark.skipif(bool(MOUNT_SKIP), reason=MOUNT_SKIP or "")


def code_of(call, *args, **kwargs) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as e:
        call(*args, **kwargs)
    return e.value.code(), e.value.details()


@pytest.fixture
def driver_with(tmp_path: Path) -> Iterator[Callable[..., Driver]]:
    made: list[Driver] = []

    def make(**opts) -> Driver:
        made.append(make_driver(tmp_path, **opts))
        return made[-1]

    try:
        yield make
    finally:
        for d in made:
            d.stop()
        mounts, loops = cleanup(tmp_path)
    assert not mounts and not loops, f"leaked {mounts} {loops}"


def inline(d: Driver, handle: str, size: str) -> Path:
    """kubelet's NodePublishVolume of an inline volume (csi_mounter.go SetUpAt)."""
    target = d.kubelet / "pods" / handle / "volumes" / "kubernetes.io~csi" / "scratch" / "mount"
    target.parent.mkdir(parents=True, exist_ok=True)
    d.client.node.NodePublishVolume(
        csi.NodePublishVolumeRequest(
            volume_id=handle,
            target_path=str(target),
            volume_capability=mount_capability(),
            volume_context={"csi.storage.k8s.io/ephemeral": "true", "size": size},
        )
    )
    return target


def unpublish(d: Driver, handle: str, target: Path) -> None:
    req = csi.NodeUnpublishVolumeRequest(volume_id=handle, target_path=str(target))
    d.client.node.NodeUnpublishVolume(req)


def inline_volumes(d: Driver) -> list[str]:
    with d.engine.store.read() as tx:
        return [v.name for v in tx.volumes() if v.ephemeral]


def test_inline_volumes_are_capped_per_node(driver_with):
    d = driver_with(max_ephemeral_size=96 * MiB)
    first = inline(d, "csi-first", "64Mi")
    code, details = code_of(inline, d, "csi-second", "64Mi")
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-ephemeral-size" in details
    assert inline_volumes(d) == ["ephemeral/csi-first"], "a refused inline volume leaves nothing"
    second = d.kubelet / "pods" / "csi-second" / "volumes" / "kubernetes.io~csi" / "scratch" / "mount"
    assert not host.is_mounted(second)
    inline(d, "csi-first", "64Mi")  # kubelet's retry of a published one is not counted twice
    unpublish(d, "csi-first", first)
    target = inline(d, "csi-second", "64Mi")  # room again
    unpublish(d, "csi-second", target)
    assert inline_volumes(d) == []


def test_the_default_cap_is_1gi_and_0_refuses_inline_volumes(driver_with, tmp_path: Path):
    d = driver_with()  # the CLI's and ServeOptions' default
    target = inline(d, "csi-big", "768Mi")
    code, _ = code_of(inline, d, "csi-more", "512Mi")
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    unpublish(d, "csi-big", target)
    d.stop()
    d2 = driver_with(max_ephemeral_size=0)
    code, details = code_of(inline, d2, "csi-none", "16Mi")
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "disabled" in details
    assert inline_volumes(d2) == []


def test_snapshots_per_volume_are_capped(driver_with):
    d = driver_with(max_snapshots_per_volume=2)
    c = d.client
    vid = c.create_volume("snapped", 16 * MiB).volume_id
    other = c.create_volume("other", 16 * MiB).volume_id
    s1 = c.create_snapshot("s1", vid).snapshot_id
    c.create_snapshot("s2", vid)
    code, details = code_of(c.create_snapshot, "s3", vid)
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "--max-snapshots-per-volume" in details
    assert c.create_snapshot("s2", vid).snapshot_id  # a retry of one it has is not a new one
    c.create_snapshot("o1", other)  # per volume
    group = csi.CreateVolumeGroupSnapshotRequest(name="g", source_volume_ids=[vid, other])
    code, _ = code_of(csi_pb2_grpc.GroupControllerStub(c.channel).CreateVolumeGroupSnapshot, group)
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    c.delete_snapshot(s1)
    c.create_snapshot("s3", vid)
