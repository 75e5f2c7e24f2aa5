"""Compressed layers: a VolumeSnapshotClass's ``compression`` (none, gzip, zstd) says how
an exported snapshot's layers travel; a restore reads every layer media type the OCI
image spec names (and Docker's gzip layer), bounded as an uncompressed one is, and
refuses any other by name."""

from __future__ import annotations

import gzip
import io
import os
import tarfile
from pathlib import Path

import grpc
import pytest
import zstandard
from test_registry_stream import announce, no_download, nodes, nothing_left, push_artifact, tar_of

from csi_driver.proto import csi_pb2 as csi
from csi_driver.registry import artifact
from csi_driver.registry.client import RegistryClient
from csi_driver.registry.reference import Repository
from driver_harness import Driver, staged
from registry_harness import REGISTRY_BINARY, LocalRegistry
from registry_nodes import code_of

pytestmark = [
    pytest.mark.mounts,
    pytest.mark.skipif(not REGISTRY_BINARY.exists(), reason="needs Debian's docker-registry package"),
]

__all__ = ["nodes"]  # the fixture: a registry and two drivers

MiB = 1 << 20
REPO = "backups/db"
OCI = "application/vnd.oci.image.layer.v1.tar"
NONDISTRIBUTABLE = "application/vnd.oci.image.layer.nondistributable.v1.tar"


def text_like(root: Path) -> None:
    """A compressible tree: 8 MiB of log lines, a config, a link, a hard link, a random file."""
    (root / "logs").mkdir()
    with open(root / "logs" / "app.log", "w") as f:
        for i in range(8 * MiB // 64):
            f.write(f"2026-12-07T11:{i % 60:02d}:00Z INFO request {i:10d} served in 3 ms\n")
    (root / "etc").mkdir()
    (root / "etc" / "app.conf").write_text("port = 5432\n")
    (root / "etc" / "app.conf").chmod(0o640)
    (root / "current").symlink_to("logs/app.log")
    os.link(root / "logs" / "app.log", root / "app.log.hard")
    (root / "random").write_bytes(os.urandom(256 * 1024))


def tree(root: Path) -> dict[str, tuple]:
    out: dict[str, tuple] = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if rel.startswith("lost+found"):
            continue
        st = path.lstat()
        if path.is_symlink():
            out[rel] = ("link", os.readlink(path))
        elif path.is_dir():
            out[rel] = ("dir", oct(st.st_mode))
        else:
            out[rel] = ("file", oct(st.st_mode), st.st_nlink, path.read_bytes())
    return out


def layers_of(reg: LocalRegistry, snapshot_id: str) -> list[dict]:
    client = RegistryClient(Repository(reg.host, REPO), insecure=True)
    return client.pull_manifest(snapshot_id.rpartition(":")[2]).body["layers"]


def restore_streamed_then_delete(
    monkeypatch: pytest.MonkeyPatch,
    a: Driver,
    b: Driver,
    vid: str,
    snapshots: list[tuple[csi.Snapshot, dict]],
) -> None:
    """Node B restores each snapshot to its tree, every layer read as it arrives (announced:
    never kept in a file), and is left with nothing; then node A deletes them and ``vid``."""
    tried = no_download(monkeypatch)
    for snap, want in snapshots:
        restored = b.client.create_volume("copy", 64 * MiB, snapshot=snap.snapshot_id)
        with staged(b, restored.volume_id) as root:
            assert tree(root) == want
        b.client.delete_volume(restored.volume_id)
    assert tried == []
    nothing_left(b)
    for snap, _ in snapshots:
        a.client.delete_snapshot(snap.snapshot_id)
    a.client.delete_volume(vid)


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_a_compressed_snapshot_moves_between_nodes(
    nodes: tuple[LocalRegistry, Driver, Driver], monkeypatch: pytest.MonkeyPatch, compression: str
) -> None:
    """Each layer is the tar compressed with the class's codec, under its media type,
    smaller than the tar it announces; node B restores identical trees (read as they
    arrive), and a second snapshot of the chain uploads only its new layer."""
    reg, a, b = nodes
    params = {"repository": f"{reg.host}/{REPO}", "compression": compression}
    vid = a.client.create_volume("db", 64 * MiB).volume_id
    with staged(a, vid) as root:
        text_like(root)
        first = tree(root)
    s1 = a.client.create_snapshot("s1", vid, parameters=params)
    [layer] = layers_of(reg, s1.snapshot_id)
    assert layer["mediaType"] == f"{OCI}+{compression}"
    expanded = int(layer["annotations"][artifact.LAYER_EXPANDED])
    assert expanded > 7 * MiB and layer["size"] < expanded // 4, "the tar of text compresses"

    with staged(a, vid) as root:
        (root / "logs" / "app.log").unlink()
        (root / "new").write_text("new\n" * 1000)
        second = tree(root)
    blobs = reg.blob_count(REPO)
    s2 = a.client.create_snapshot("s2", vid, parameters=params)
    assert reg.blob_count(REPO) == blobs + 1, "the first layer's compressed blob is known: only the new one"
    bottom, top = layers_of(reg, s2.snapshot_id)
    assert bottom == layer and top["mediaType"] == f"{OCI}+{compression}"

    restore_streamed_then_delete(monkeypatch, a, b, vid, [(s2, second), (s1, first)])


def test_an_unknown_compression_is_invalid(nodes: tuple[LocalRegistry, Driver, Driver]) -> None:
    reg, a, _b = nodes
    vid = a.client.create_volume("db", 64 * MiB).volume_id
    for bad in ("xz", "ZSTD", ""):
        params = {"repository": f"{reg.host}/{REPO}", "compression": bad}
        code, message = code_of(a.client.create_snapshot, "s", vid, parameters=params)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "none, gzip, zstd" in message, message
    assert a.engine.list_snapshots(0, 10) == []
    a.client.delete_volume(vid)


def test_every_oci_layer_media_type_restores(
    nodes: tuple[LocalRegistry, Driver, Driver], tmp_path: Path
) -> None:
    """tar, tar+gzip, tar+zstd, their non-distributable kinds and Docker's gzip layer, with
    and without an announcement of what they expand to."""
    reg, _a, b = nodes
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    tar = tar_of(20, b"y" * MiB)
    encoded = {"": tar, "+gzip": gzip.compress(tar, mtime=0), "+zstd": zstandard.compress(tar)}
    kinds = [(base + suffix, blob) for suffix, blob in encoded.items() for base in (OCI, NONDISTRIBUTABLE)]
    kinds.append(("application/vnd.docker.image.rootfs.diff.tar.gzip", encoded["+gzip"]))
    for media_type, blob in kinds:
        for notes in (announce(len(tar), 21), {}):
            sid = push_artifact(reg, blob, media_type, notes, scratch)
            restored = b.client.create_volume("r", 64 * MiB, snapshot=sid)
            with staged(b, restored.volume_id) as root:
                assert (root / "f0").read_bytes() == b"y" * MiB and (root / "f19").read_bytes() == b"x"
            b.client.delete_volume(restored.volume_id)
            nothing_left(b)


def test_a_layer_of_another_media_type_is_refused_by_name(
    nodes: tuple[LocalRegistry, Driver, Driver], tmp_path: Path
) -> None:
    reg, _a, b = nodes
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    tar = tar_of(3)
    for media_type in (OCI + "+bzip2", "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"):
        sid = push_artifact(reg, tar, media_type, {}, scratch)
        code, message = code_of(b.client.create_volume, "r", 64 * MiB, snapshot=sid)
        assert code == grpc.StatusCode.FAILED_PRECONDITION, message
        assert media_type in message and "not a layer media type this driver reads" in message, message
        nothing_left(b)


def zstd_bomb(size: int) -> tuple[bytes, int]:
    """A zstd of a tar holding one file of ``size`` zeros: (blob, the tar's size)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        ti = tarfile.TarInfo("zeros")
        ti.size = size
        tar.addfile(ti, io.BytesIO(bytes(size)))
    return zstandard.compress(raw.getvalue()), len(raw.getvalue())


def test_a_zstd_bomb_is_refused(nodes: tuple[LocalRegistry, Driver, Driver], tmp_path: Path) -> None:
    """A tiny zstd that announces nothing may expand GZIP_RATIO times plus 64 MiB, as a gzip;
    one that announces its expansion is read no further: DATA_LOSS beyond, nothing left."""
    reg, _a, b = nodes
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    bomb, _ = zstd_bomb(200 * MiB)
    small, expanded = zstd_bomb(20 * MiB)
    assert len(bomb) < MiB
    for blob, notes, words in (
        (bomb, {}, "expands beyond 20 times its size"),
        (small, announce(expanded // 2, 2), "expands beyond the"),
    ):
        sid = push_artifact(reg, blob, OCI + "+zstd", notes, scratch)
        code, message = code_of(b.client.create_volume, "r", 64 * MiB, snapshot=sid)
        assert code == grpc.StatusCode.DATA_LOSS and words in message, message
        nothing_left(b)
    sid = push_artifact(reg, b"\x28\xb5\x2f\xfd garbage", OCI + "+zstd", announce(10 * MiB, 2), scratch)
    code, message = code_of(b.client.create_volume, "r", 64 * MiB, snapshot=sid)
    assert code == grpc.StatusCode.DATA_LOSS and "not a valid layer" in message, message
    nothing_left(b)


def test_an_incremental_export_in_use_is_compressed(
    nodes: tuple[LocalRegistry, Driver, Driver], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A volume in use, exported twice with zstd: the second export's change layer is a
    tar+zstd that announces its expansion, and both restore to their trees in one pass."""
    reg, a, b = nodes
    params = {"repository": f"{reg.host}/{REPO}", "compression": "zstd"}
    vid = a.client.create_volume("db", 64 * MiB).volume_id
    with staged(a, vid) as root:  # in use throughout: each snapshot is a copy of the upper
        text_like(root)
        s1 = a.client.create_snapshot("s1", vid, parameters=params)
        first = tree(root)
        (root / "more.log").write_text("more lines\n" * 100_000)
        s2 = a.client.create_snapshot("s2", vid, parameters=params)
        second = tree(root)
    bottom, top = layers_of(reg, s2.snapshot_id)
    assert bottom == layers_of(reg, s1.snapshot_id)[0], "built on the first export's blob"
    assert top["mediaType"] == OCI + "+zstd" and artifact.LAYER_ENTRIES in top["annotations"]
    assert top["size"] < int(top["annotations"][artifact.LAYER_EXPANDED]) // 4
    restore_streamed_then_delete(monkeypatch, a, b, vid, [(s2, second), (s1, first)])
