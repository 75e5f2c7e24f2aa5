"""Incremental exports of a volume in use: each snapshot of it is a copy of its whole
upper, but its export after the first pushes only what changed since the one before
(a tar of the difference over that export's layers), and every export in the chain
restores on another node to the tree it was taken from."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from csi_driver.layerstore import treediff
from driver_harness import Driver, cleanup, entries, serving, staged
from registry_harness import REGISTRY_BINARY, LocalRegistry
from registry_nodes import registry_nodes

pytestmark = [
    pytest.mark.mounts,
    pytest.mark.skipif(not REGISTRY_BINARY.exists(), reason="needs Debian's docker-registry package"),
]

MiB = 1 << 20
REPO = "backups/live"


@contextmanager
def pooled(root: Path, **opts) -> Iterator[Driver]:
    """A driver whose state dir is a pool file (xfs: it clones): the pool's own mount
    and loop device are all it may leave, and they go with it."""
    d = Driver(root, pool_file=str(root / "pool.img"), pool_file_size=1 << 30, **opts)
    try:
        yield d
    finally:
        d.stop()
        mounts, loops = cleanup(root)
        assert mounts == [str(d.state)] and len(loops) == 1, f"leaked mounts {mounts} or loop devices {loops}"


@pytest.fixture(params=["copies", "clones"])
def nodes(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[LocalRegistry, Driver, Driver]]:
    """A registry and two drivers (node A and node B) that reach it over HTTP. Node A's
    state dir copies the images it captures, or clones them (a pool file)."""
    with registry_nodes(tmp_path, start_a=pooled if request.param == "clones" else serving) as (reg, a, b):
        assert a.engine.backend.can_clone() == (request.param == "clones")  # type: ignore[attr-defined]
        yield reg, a, b


def tree(root: Path) -> dict[str, tuple]:
    """Every entry: kind, mode, owner, xattrs, and content hash, link target or hard-link group."""
    out: dict[str, tuple] = {}
    inodes: dict[int, str] = {}
    for rel, path, st in entries(root):
        xattrs = tuple(
            sorted(
                (x, os.getxattr(path, x, follow_symlinks=False))
                for x in os.listxattr(path, follow_symlinks=False)
            )
        )
        meta = (oct(st.st_mode), st.st_uid, st.st_gid, xattrs)
        if stat.S_ISLNK(st.st_mode):
            out[rel] = ("link", os.readlink(path), st.st_uid, st.st_gid)
        elif stat.S_ISDIR(st.st_mode):
            out[rel] = ("dir", *meta)
        else:
            first = inodes.setdefault(st.st_ino, rel) if st.st_nlink > 1 else rel
            digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
            out[rel] = ("file", *meta, st.st_mtime_ns, digest, first)
    return out


def fill(root: Path) -> None:
    """16 MiB of data, and every kind of entry a layer keeps."""
    (root / "data").mkdir()
    for i in range(4):
        (root / "data" / f"t{i}").write_bytes(os.urandom(4 * MiB))
    os.link(root / "data" / "t0", root / "data" / "t0.hard")
    (root / "current").symlink_to("data/t1")
    (root / "etc").mkdir(mode=0o750)
    (root / "etc" / "app.conf").write_text("port = 5432\n")
    os.chown(root / "etc" / "app.conf", 1234, 5678)
    os.setxattr(root / "etc" / "app.conf", "user.origin", b"first")
    (root / "run.sh").write_text("#!/bin/sh\n")
    (root / "run.sh").chmod(0o750)
    (root / "gone.log").write_bytes(os.urandom(100_000))
    (root / "cache").mkdir()
    (root / "cache" / "a").write_bytes(b"a" * 1000)
    (root / "cache" / "b").write_bytes(b"b" * 1000)
    (root / "state").mkdir()
    (root / "state" / "old").write_text("old\n")
    (root / "same-size").write_bytes(b"1" * 4096)


def change(root: Path) -> int:
    """1 MiB more, a file deleted, directories replaced, a mode and an xattr changed, and a
    file rewritten to the same size and mtime; return about the bytes of data changed."""
    (root / "data" / "new").write_bytes(os.urandom(MiB))
    (root / "gone.log").unlink()
    shutil.rmtree(root / "cache")
    (root / "cache").write_text("a file now\n")  # a directory replaced by a file
    shutil.rmtree(root / "state")
    (root / "state").mkdir(mode=0o700)  # a directory replaced by another one
    (root / "state" / "new").write_text("new\n")
    (root / "run.sh").chmod(0o700)
    os.setxattr(root / "etc" / "app.conf", "user.origin", b"second")
    same = root / "same-size"
    st = same.stat()
    same.write_bytes(b"2" * 4096)
    os.utime(same, ns=(st.st_atime_ns, st.st_mtime_ns))  # only its bytes tell the change
    return MiB + 3 * 4096


def test_a_second_export_of_a_volume_in_use_pushes_only_what_changed(
    nodes: tuple[LocalRegistry, Driver, Driver], monkeypatch: pytest.MonkeyPatch
) -> None:
    reg, a, b = nodes
    read: list[str] = []  # files whose contents an export compared

    def same_content(old: str, new: str) -> bool:
        read.append(new)
        return compare(old, new)

    compare = treediff.same_content
    monkeypatch.setattr(treediff, "same_content", same_content)
    repository = f"{reg.host}/{REPO}"
    vid = a.client.create_volume("db", 64 * MiB).volume_id
    with staged(a, vid) as root:  # in use throughout: each snapshot is a copy of the upper
        fill(root)
        first = tree(root)
        s1 = a.client.create_snapshot("s1", vid, parameters={"repository": repository})
        assert s1.ready_to_use
        one = reg.blob_bytes(REPO)
        assert one > 16 * MiB, "the first export is the whole upper"

        changed = change(root)
        second = tree(root)
        s2 = a.client.create_snapshot("s2", vid, parameters={"repository": repository})
        two = reg.blob_bytes(REPO)
        assert two - one <= changed + MiB, f"the second export added {two - one} bytes"
        compared = {Path(x).name for x in read}
        assert "same-size" in compared, "equal metadata: its contents were compared"
        if a.engine.backend.can_clone():  # type: ignore[attr-defined]
            assert compared == {"same-size"}, "the unchanged files are proven so by their shared blocks"

        (root / "data" / "t2").unlink()
        (root / "later").write_bytes(os.urandom(MiB // 2))
        third = tree(root)
        s3 = a.client.create_snapshot("s3", vid, parameters={"repository": repository})
        assert reg.blob_bytes(REPO) - two <= MiB // 2 + MiB, "the third builds on the second"
        assert tree(root) == third

    # node B holds none of it: each export restores to the tree it was taken from
    for snap, expected in ((s2, second), (s1, first), (s3, third)):
        restored = b.client.create_volume(
            f"copy-{snap.snapshot_id[-8:]}", 64 * MiB, snapshot=snap.snapshot_id
        )
        with staged(b, restored.volume_id) as root:
            assert tree(root) == expected, snap.snapshot_id
        b.client.delete_volume(restored.volume_id)
    assert b.engine.layers() == []

    for snap in (s1, s2, s3):
        a.client.delete_snapshot(snap.snapshot_id)
    a.client.delete_volume(vid)
    assert a.engine.layers() == []


def test_an_export_whose_earlier_one_is_gone_is_whole_again(
    nodes: tuple[LocalRegistry, Driver, Driver],
) -> None:
    reg, a, b = nodes
    repository = f"{reg.host}/{REPO}"
    vid = a.client.create_volume("db", 64 * MiB).volume_id
    with staged(a, vid) as root:
        (root / "f").write_bytes(os.urandom(2 * MiB))
        s1 = a.client.create_snapshot("s1", vid, parameters={"repository": repository})
        a.engine.transfers.delete_manifest(s1.snapshot_id, "", None)  # held here, gone from the registry
        (root / "g").write_bytes(os.urandom(MiB))
        expected = tree(root)
        one = reg.blob_bytes(REPO)
        s2 = a.client.create_snapshot("s2", vid, parameters={"repository": repository})
        assert reg.blob_bytes(REPO) - one > 3 * MiB, "pushed whole: its earlier export is gone"
    restored = b.client.create_volume("copy", 64 * MiB, snapshot=s2.snapshot_id)
    with staged(b, restored.volume_id) as root:
        assert tree(root) == expected
    b.client.delete_volume(restored.volume_id)
    for snap in (s1, s2):
        a.client.delete_snapshot(snap.snapshot_id)
    a.client.delete_volume(vid)
