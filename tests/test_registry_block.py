"""Block volumes' snapshots and group snapshots through a real OCI registry: pushed by
one driver, restored by another with its own state dir (two nodes)."""

from __future__ import annotations

import hashlib
import os
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from csi_driver import host
from csi_driver.errors import NotFound
from csi_driver.layerstore import blockimage
from csi_driver.proto import csi_pb2 as csi
from csi_driver.proto import csi_pb2_grpc
from csi_driver.registry.client import RegistryClient
from csi_driver.registry.reference import Repository
from csi_driver.service.pending_deletes import DeleteRetrier
from driver_harness import Driver
from registry_harness import REGISTRY_BINARY, FaultProxy, LocalRegistry
from registry_nodes import code_of, registry_nodes

pytestmark = [
    pytest.mark.mounts,
    pytest.mark.skipif(not REGISTRY_BINARY.exists(), reason="needs Debian's docker-registry package"),
]

MiB = 1 << 20
REPO = "backups/blk"
WRITES = [(0, b"boot" * 1024), (37 * MiB + 5, os.urandom(3 * MiB)), (255 * MiB, os.urandom(MiB))]


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[tuple[LocalRegistry, Driver, Driver]]:
    with registry_nodes(tmp_path) as n:
        yield n


def block_cap() -> csi.VolumeCapability:
    mode = csi.VolumeCapability.AccessMode.SINGLE_NODE_WRITER
    return csi.VolumeCapability(
        block=csi.VolumeCapability.BlockVolume(), access_mode=csi.VolumeCapability.AccessMode(mode=mode)
    )


def image(d: Driver, volume_id: str) -> Path:
    """The file behind a detached block volume."""
    with d.engine.store.read() as tx:
        vol = tx.volume(volume_id)
        assert vol is not None
        layer = tx.layer(vol.upper)
    assert layer is not None
    return d.engine.backend.block_file(layer)


def written_volume(d: Driver, name: str, writes: list[tuple[int, bytes]]) -> tuple[str, str]:
    """A 256 MiB block volume with ``writes`` in it, and the sha256 of its bytes."""
    vid = d.client.create_volume(name, 256 * MiB, cap=block_cap()).volume_id
    with open(image(d, vid), "r+b") as f:
        for offset, data in writes:
            os.pwrite(f.fileno(), data, offset)
        os.fsync(f.fileno())
    return vid, sha256(image(d, vid))


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(MiB):
            h.update(chunk)
    return h.hexdigest()


def registry(reg: LocalRegistry) -> RegistryClient:
    return RegistryClient(Repository(reg.host, REPO), insecure=True)


def manifest_of(reg: LocalRegistry, snapshot_id: str) -> dict | None:
    try:
        return registry(reg).pull_manifest(snapshot_id.rpartition(":")[2]).body
    except NotFound:
        return None


def nothing_left(d: Driver) -> None:
    assert d.engine.layers() == []
    assert d.engine.list_snapshots(0, 100) == []
    assert list((d.state / "tmp").iterdir()) == []


def test_a_block_snapshot_moves_between_nodes_with_its_holes(
    nodes: tuple[LocalRegistry, Driver, Driver],
) -> None:
    reg, a, b = nodes
    repository = f"{reg.host}/{REPO}"
    vid, digest = written_volume(a, "blk", WRITES)
    snap = a.client.create_snapshot("s", vid, parameters={"repository": repository})
    assert snap.snapshot_id.startswith(f"{repository}:snap-") and snap.ready_to_use
    assert snap.size_bytes == 256 * MiB
    manifest = manifest_of(reg, snap.snapshot_id)
    assert manifest is not None
    (layer,) = manifest["layers"]
    assert layer["mediaType"] == blockimage.MEDIA_TYPE
    assert layer["size"] < 8 * MiB, "the blob carries the data, not the holes"
    assert manifest["annotations"]["dev.overlay-csi.snapshot.access-type"] == "block"

    restored = b.client.create_volume("copy", 256 * MiB, snapshot=snap.snapshot_id, cap=block_cap())
    copy = image(b, restored.volume_id)
    assert os.path.getsize(copy) == 256 * MiB
    assert sha256(copy) == digest, "identical bytes on node B"
    assert host.allocated_bytes(copy) < 16 * MiB, "holes stay holes"
    code, message = code_of(b.client.create_volume, "as-fs", 256 * MiB, snapshot=snap.snapshot_id)
    assert code == grpc.StatusCode.INVALID_ARGUMENT, message

    b.client.delete_volume(restored.volume_id)
    nothing_left(b)
    a.client.delete_snapshot(snap.snapshot_id)
    code, message = code_of(
        b.client.create_volume, "late", 256 * MiB, snapshot=snap.snapshot_id, cap=block_cap()
    )
    assert code == grpc.StatusCode.NOT_FOUND, message
    a.client.delete_volume(vid)
    nothing_left(a)


def _blob(size: int, extents: list[tuple[int, int]], data: bytes) -> bytes:
    head = struct.pack(">8sIIQQ", blockimage.MAGIC, 1, 0, size, len(extents))
    return head + b"".join(struct.pack(">QQ", o, n) for o, n in extents) + data


@pytest.mark.parametrize(
    "blob",
    [
        _blob(256 * MiB, [(MiB, 4), (0, 4)], b"abcdefgh"),  # unsorted
        _blob(256 * MiB, [(0, 8), (4, 4)], b"abcdefghijkl"),  # overlapping
        _blob(256 * MiB, [(256 * MiB - 2, 4)], b"abcd"),  # beyond the image
        _blob(256 * MiB, [(0, 4)], b"abcdefgh"),  # more bytes than its extents
        _blob(128 * MiB, [(0, 4)], b"abcd"),  # another size than the manifest's
        b"NOTBLOCK" + bytes(24),
    ],
    ids=["unsorted", "overlapping", "beyond", "extra-bytes", "other-size", "bad-magic"],
)
def test_a_bad_block_blob_is_data_loss_and_leaves_nothing(nodes, blob: bytes, tmp_path: Path) -> None:
    reg, a, b = nodes
    vid, _ = written_volume(a, "blk", WRITES[:1])
    snap = a.client.create_snapshot("s", vid, parameters={"repository": f"{reg.host}/{REPO}"})
    manifest = manifest_of(reg, snap.snapshot_id)
    assert manifest is not None
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    (tmp_path / "blob").write_bytes(blob)
    registry(reg).push_blob(tmp_path / "blob", digest, len(blob))
    manifest["layers"][0].update(digest=digest, size=len(blob))
    registry(reg).push_manifest(manifest, snap.snapshot_id.rpartition(":")[2])
    code, message = code_of(
        b.client.create_volume, "r", 256 * MiB, snapshot=snap.snapshot_id, cap=block_cap()
    )
    assert code == grpc.StatusCode.DATA_LOSS, message
    assert "not a valid block image" in message
    nothing_left(b)


def test_a_corrupted_block_blob_is_data_loss(nodes: tuple[LocalRegistry, Driver, Driver]) -> None:
    reg, a, b = nodes
    with FaultProxy(reg.url) as proxy:
        b.engine.transfers.insecure = b.engine.transfers.insecure | {proxy.host}
        vid, _ = written_volume(a, "blk", WRITES)
        snap = a.client.create_snapshot("s", vid, parameters={"repository": f"{reg.host}/{REPO}"})
        moved = snap.snapshot_id.replace(reg.host, proxy.host, 1)
        proxy.corrupt(r"/blobs/sha256:(?!44136fa3)", times=-1)
        code, message = code_of(b.client.create_volume, "r", 256 * MiB, snapshot=moved, cap=block_cap())
        assert code == grpc.StatusCode.DATA_LOSS, message
        nothing_left(b)


def test_an_exported_group_snapshot_restores_and_deletes(nodes: tuple[LocalRegistry, Driver, Driver]) -> None:
    reg, a, b = nodes
    repository = f"{reg.host}/{REPO}"
    v1, d1 = written_volume(a, "one", WRITES)
    v2, d2 = written_volume(a, "two", [(5 * MiB, os.urandom(MiB))])
    request = csi.CreateVolumeGroupSnapshotRequest(
        name="g", source_volume_ids=[v1, v2], parameters={"repository": repository}
    )
    groups = csi_pb2_grpc.GroupControllerStub(a.client.channel)
    group = groups.CreateVolumeGroupSnapshot(request).group_snapshot
    assert group.ready_to_use and len(group.snapshots) == 2
    again = groups.CreateVolumeGroupSnapshot(request).group_snapshot
    assert again.group_snapshot_id == group.group_snapshot_id
    members = {s.source_volume_id: s.snapshot_id for s in group.snapshots}
    assert all(sid.startswith(f"{repository}:snap-") for sid in members.values())
    for source, digest in ((v1, d1), (v2, d2)):
        restored = b.client.create_volume(source, 256 * MiB, snapshot=members[source], cap=block_cap())
        assert sha256(image(b, restored.volume_id)) == digest
        b.client.delete_volume(restored.volume_id)
    nothing_left(b)

    assert all(manifest_of(reg, sid) for sid in members.values())
    groups.DeleteVolumeGroupSnapshot(
        csi.DeleteVolumeGroupSnapshotRequest(group_snapshot_id=group.group_snapshot_id)
    )
    assert all(manifest_of(reg, sid) is None for sid in members.values()), "the members' manifests are gone"
    code, _ = code_of(b.client.create_volume, "late", 256 * MiB, snapshot=members[v1], cap=block_cap())
    assert code == grpc.StatusCode.NOT_FOUND
    for vid in (v1, v2):
        a.client.delete_volume(vid)
    nothing_left(a)


def test_a_group_deleted_while_its_registry_is_down(nodes: tuple[LocalRegistry, Driver, Driver]) -> None:
    """The group goes at once; its members' manifests once the registry is back."""
    reg, a, _b = nodes
    a.engine.pending_deletes.first = 0.2
    a.engine.pending_deletes.longest = 1.0
    retrier = next(w for w in a.server.background if isinstance(w, DeleteRetrier))
    retrier.interval = 0.05
    v1, _ = written_volume(a, "one", WRITES[:1])
    groups = csi_pb2_grpc.GroupControllerStub(a.client.channel)
    request = csi.CreateVolumeGroupSnapshotRequest(
        name="g", source_volume_ids=[v1], parameters={"repository": f"{reg.host}/{REPO}"}
    )
    group = groups.CreateVolumeGroupSnapshot(request).group_snapshot
    (sid,) = [s.snapshot_id for s in group.snapshots]
    reg.stop()
    try:
        groups.DeleteVolumeGroupSnapshot(
            csi.DeleteVolumeGroupSnapshotRequest(group_snapshot_id=group.group_snapshot_id)
        )
        code, _ = code_of(
            groups.GetVolumeGroupSnapshot,
            csi.GetVolumeGroupSnapshotRequest(group_snapshot_id=group.group_snapshot_id),
        )
        assert code == grpc.StatusCode.NOT_FOUND
        assert a.engine.pending_deletes.get(sid) is not None, "the member's manifest deletion is recorded"
    finally:
        reg.start()
    end = time.monotonic() + 60
    while a.engine.pending_deletes.get(sid) is not None:
        assert time.monotonic() < end, "the deletion is retried once the registry is back"
        time.sleep(0.05)
    assert manifest_of(reg, sid) is None
    a.client.delete_volume(v1)
    nothing_left(a)
