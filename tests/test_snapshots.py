"""Copy-on-write snapshots, restores, clones and shared base layers, with real mounts."""

from __future__ import annotations

import errno
import itertools
import os
import subprocess
import tarfile
import threading
from pathlib import Path

import grpc
import pytest

from csi_driver import host
from csi_driver.proto import csi_pb2 as csi
from driver_harness import MOUNT_SKIP, Driver, cleanup, make_driver

MiB = 1 << 20


def code_of(call, *args, **kwargs) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as e:
        call(*args, **kwargs)
    return e.value.code()


def write(d: Driver, volume_id: str, files: dict[str, bytes], remove: tuple[str, ...] = ()) -> None:
    """Stage the volume, write/remove files through the overlay, unstage."""
    staging, _ = d.paths("w-" + volume_id)
    d.client.stage(volume_id, staging)
    try:
        for name, data in files.items():
            (staging / name).write_bytes(data)
        for name in remove:
            (staging / name).unlink()
    finally:
        d.client.unstage(volume_id, staging)


def read(d: Driver, volume_id: str) -> dict[str, bytes]:
    staging, _ = d.paths("r-" + volume_id)
    d.client.stage(volume_id, staging)
    try:
        return {p.name: p.read_bytes() for p in staging.iterdir() if p.is_file() and not p.is_symlink()}
    finally:
        d.client.unstage(volume_id, staging)


def layer_dirs(d: Driver) -> list[str]:
    return sorted(p.name for p in d.engine.backend.layout.layers.iterdir())


def test_snapshot_restore_and_clone_semantics(driver: Driver):
    c = driver.client
    src = c.create_volume("src", 64 * MiB).volume_id
    write(driver, src, {"a": b"before", "gone": b"deleted later"})
    snap = c.create_snapshot("s1", src)
    assert snap.ready_to_use and snap.source_volume_id == src
    write(driver, src, {"a": b"after", "b": b"new"}, remove=("gone",))

    restored = c.create_volume("restored", 64 * MiB, snapshot=snap.snapshot_id)
    assert restored.content_source.snapshot.snapshot_id == snap.snapshot_id
    assert read(driver, restored.volume_id) == {"a": b"before", "gone": b"deleted later"}

    clones = [c.create_volume(f"clone{i}", 64 * MiB, volume=src).volume_id for i in range(3)]
    for i, clone in enumerate(clones):
        assert read(driver, clone) == {"a": b"after", "b": b"new"}
        write(driver, clone, {"mine": str(i).encode()})
    for i, clone in enumerate(clones):  # isolated from each other and from the source
        assert read(driver, clone) == {"a": b"after", "b": b"new", "mine": str(i).encode()}
    assert read(driver, src) == {"a": b"after", "b": b"new"}
    assert read(driver, restored.volume_id) == {"a": b"before", "gone": b"deleted later"}


def test_restore_and_clone_copy_no_data(driver: Driver):
    c = driver.client
    src = c.create_volume("data", 256 * MiB).volume_id
    write(driver, src, {"blob": os.urandom(64 * MiB)})
    before = driver.engine.disk_usage()
    snap = c.create_snapshot("s", src).snapshot_id
    c.create_volume("r", 256 * MiB, snapshot=snap)
    for i in range(3):
        c.create_volume(f"c{i}", 256 * MiB, volume=src)
    grown = driver.engine.disk_usage() - before
    assert grown < 16 * MiB, f"snapshot+restore+3 clones of 64 MiB cost {grown / MiB:.1f} MiB"


def test_restore_larger_is_really_larger(driver: Driver):
    c = driver.client
    src = c.create_volume("small", 32 * MiB).volume_id
    write(driver, src, {"x": b"1"})
    snap = c.create_snapshot("s", src).snapshot_id
    big = c.create_volume("big", 256 * MiB, snapshot=snap)
    assert big.capacity_bytes == 256 * MiB
    staging, _ = driver.paths("big")
    c.stage(big.volume_id, staging)
    try:
        st = os.statvfs(staging)
        assert st.f_bavail * st.f_frsize >= 256 * MiB
        assert (staging / "x").read_bytes() == b"1"
    finally:
        c.unstage(big.volume_id, staging)
    default = c.controller.CreateVolume(csi.CreateVolumeRequest(
        name="default-size", volume_capabilities=[csi.VolumeCapability(
            mount=csi.VolumeCapability.MountVolume(),
            access_mode=csi.VolumeCapability.AccessMode(mode=1))],
        volume_content_source=csi.VolumeContentSource(
            snapshot=csi.VolumeContentSource.SnapshotSource(snapshot_id=snap)))).volume
    assert default.capacity_bytes == 32 * MiB, "a restore defaults to the source's size"
    req = csi.CreateVolumeRequest(
        name="too-small", volume_capabilities=[csi.VolumeCapability(
            mount=csi.VolumeCapability.MountVolume(),
            access_mode=csi.VolumeCapability.AccessMode(mode=1))],
        capacity_range=csi.CapacityRange(required_bytes=MiB, limit_bytes=MiB))
    req.volume_content_source.volume.volume_id = src
    assert code_of(c.controller.CreateVolume, req) == grpc.StatusCode.OUT_OF_RANGE


def test_missing_sources_are_not_found(driver: Driver):
    c = driver.client
    assert code_of(c.create_volume, "r", MiB, snapshot="snap-" + "0" * 32) == grpc.StatusCode.NOT_FOUND
    assert code_of(c.create_volume, "c", MiB, volume="vol-" + "0" * 32) == grpc.StatusCode.NOT_FOUND
    assert code_of(c.create_volume, "c2", MiB, volume="../../etc") == grpc.StatusCode.NOT_FOUND
    assert code_of(c.create_snapshot, "s", "vol-" + "0" * 32) == grpc.StatusCode.NOT_FOUND
    assert code_of(c.controller.GetSnapshot, csi.GetSnapshotRequest(snapshot_id="x")) == \
        grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("order", list(itertools.permutations(["source", "snapshot", "restore", "clone"])))
def test_delete_in_any_order_leaves_the_rest_readable(driver: Driver, order):
    c = driver.client
    src = c.create_volume("src", 32 * MiB).volume_id
    write(driver, src, {"f": b"v1"})
    snap = c.create_snapshot("snap", src).snapshot_id
    write(driver, src, {"f": b"v2"})
    objs = {"source": src, "snapshot": snap,
            "restore": c.create_volume("restore", 32 * MiB, snapshot=snap).volume_id,
            "clone": c.create_volume("clone", 32 * MiB, volume=src).volume_id}
    expect = {"source": b"v2", "restore": b"v1", "clone": b"v2"}
    alive = set(objs)
    for kind in order:
        if kind == "snapshot":
            c.delete_snapshot(objs[kind])
        else:
            c.delete_volume(objs[kind])
        alive.discard(kind)
        for other in alive - {"snapshot"}:
            assert read(driver, objs[other]) == {"f": expect[other]}, (kind, other)
        if "snapshot" in alive:
            r = c.create_volume(f"probe-{kind}", 32 * MiB, snapshot=snap).volume_id
            assert read(driver, r) == {"f": b"v1"}
            c.delete_volume(r)
    assert layer_dirs(driver) == [], "no layer stays on disk once nothing uses it"
    assert list(driver.engine.backend.layout.links.iterdir()) == []


def test_deep_chains_flatten_and_still_mount(tmp_path: Path):
    """200 snapshot-restore generations under a depth cap of 16."""
    if MOUNT_SKIP:
        pytest.skip(MOUNT_SKIP)
    d = make_driver(tmp_path, max_layer_depth=16)
    try:
        c, eng = d.client, d.engine
        vol = c.create_volume("gen0", 16 * MiB).volume_id
        for gen in range(1, 201):
            # write straight into the upper (what the overlay does for a new file), cheaply
            upper = eng.chain(eng.get_volume(vol).upper)[0]
            eng.backend.activate(upper)
            files = eng.backend.layout.upper(upper.id)
            (files / f"g{gen:03d}").write_text(str(gen))
            if gen > 1:
                (files / "latest").write_text(str(gen))
            eng.backend.deactivate(upper)
            snap = c.create_snapshot(f"s{gen}", vol).snapshot_id
            if gen % 50 == 0:
                files = read(d, vol)
                assert len([n for n in files if n.startswith("g")]) == gen
                assert files["latest"] == str(gen).encode()
            vol = c.create_volume(f"gen{gen}", 16 * MiB, snapshot=snap).volume_id
            upper = eng.get_volume(vol).upper
            with eng.store.tx() as tx:
                depth = len(tx.chain(upper)) - 1
            assert depth <= 16
        files = read(d, vol)
        assert sorted(n for n in files if n.startswith("g")) == [f"g{i:03d}" for i in range(1, 201)]
        assert files["g137"] == b"137"
    finally:
        d.stop()
        mounts, loops = cleanup(tmp_path)
    assert not mounts and not loops


def test_snapshot_under_a_running_writer_is_consistent(driver: Driver):
    c = driver.client
    vol = c.create_volume("busy", 128 * MiB).volume_id
    staging, target = driver.paths("busy")
    c.stage(vol, staging)
    c.publish(vol, staging, target)
    stop = threading.Event()

    def writer() -> None:
        i = 0
        while not stop.is_set():
            (target / f"f{i % 200}").write_bytes(os.urandom(256 * 1024))
            i += 1

    t = threading.Thread(target=writer)
    t.start()
    try:
        snaps = [c.create_snapshot(f"live{i}", vol) for i in range(3)]
    finally:
        stop.set()
        t.join()
    c.unpublish(vol, target)
    c.unstage(vol, staging)
    for s in snaps:
        image = driver.engine.backend.layout.image(driver.engine.get_snapshot(s.snapshot_id).layer)
        fsck = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True)
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr
        restored = c.create_volume(f"r-{s.snapshot_id}", 128 * MiB, snapshot=s.snapshot_id).volume_id
        files = read(driver, restored)
        assert files and all(len(b) in (0, 256 * 1024) for b in files.values())


def test_snapshot_api(driver: Driver):
    c = driver.client
    ctl = c.controller
    a = c.create_volume("a", 64 * MiB).volume_id
    b = c.create_volume("b", 64 * MiB).volume_id
    write(driver, a, {"data": os.urandom(8 * MiB)})
    s1 = c.create_snapshot("s1", a)
    assert 8 * MiB <= s1.size_bytes <= 12 * MiB, "size_bytes is what the snapshot holds"
    assert c.create_snapshot("s1", a).snapshot_id == s1.snapshot_id
    assert code_of(c.create_snapshot, "s1", b) == grpc.StatusCode.ALREADY_EXISTS
    s2 = c.create_snapshot("s2", b)
    s3 = c.create_snapshot("s3", a)
    by_id = ctl.ListSnapshots(csi.ListSnapshotsRequest(snapshot_id=s2.snapshot_id)).entries
    assert [e.snapshot.snapshot_id for e in by_id] == [s2.snapshot_id]
    by_src = ctl.ListSnapshots(csi.ListSnapshotsRequest(source_volume_id=a)).entries
    assert [e.snapshot.snapshot_id for e in by_src] == [s1.snapshot_id, s3.snapshot_id]
    assert ctl.ListSnapshots(csi.ListSnapshotsRequest(snapshot_id="nope")).entries == []
    page = ctl.ListSnapshots(csi.ListSnapshotsRequest(max_entries=2))
    assert len(page.entries) == 2 and page.next_token
    rest = ctl.ListSnapshots(csi.ListSnapshotsRequest(starting_token=page.next_token))
    assert [e.snapshot.snapshot_id for e in rest.entries] == [s3.snapshot_id]
    got = ctl.GetSnapshot(csi.GetSnapshotRequest(snapshot_id=s1.snapshot_id)).snapshot
    assert got.snapshot_id == s1.snapshot_id and got.creation_time.seconds > 0
    c.delete_snapshot(s1.snapshot_id)
    c.delete_snapshot(s1.snapshot_id)


def test_layer_reclaim_survives_restart(tmp_path: Path):
    if MOUNT_SKIP:
        pytest.skip(MOUNT_SKIP)
    d = make_driver(tmp_path)
    try:
        src = d.client.create_volume("src", 32 * MiB).volume_id
        write(d, src, {"f": b"x"})
        snap = d.client.create_snapshot("s", src).snapshot_id
        d.client.delete_volume(src)
        assert layer_dirs(d), "the snapshot keeps its layer"
    finally:
        d.stop()
    d = make_driver(tmp_path)
    try:
        r = d.client.create_volume("r", 32 * MiB, snapshot=snap).volume_id
        assert read(d, r) == {"f": b"x"}
        d.client.delete_volume(r)
        d.client.delete_snapshot(snap)
        assert layer_dirs(d) == []
    finally:
        d.stop()
        cleanup(tmp_path)


def test_base_layers(driver: Driver, tmp_path: Path):
    src = tmp_path / "golden"
    (src / "etc").mkdir(parents=True)
    (src / "etc" / "app.conf").write_text("golden\n")
    os.symlink("etc/app.conf", src / "link")
    driver.engine.import_layer("golden", src)
    archive = tmp_path / "base.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(src / "etc" / "app.conf", arcname="from-tar.txt")
    driver.engine.import_layer("tarred", archive)

    c = driver.client
    vols = [c.create_volume(f"g{i}", 32 * MiB, parameters={"baseLayer": "golden"}).volume_id
            for i in range(3)]
    staging, _ = driver.paths("g0")
    c.stage(vols[0], staging)
    try:
        assert (staging / "etc" / "app.conf").read_text() == "golden\n"
        assert os.readlink(staging / "link") == "etc/app.conf"
        (staging / "etc" / "app.conf").write_text("mine\n")
    finally:
        c.unstage(vols[0], staging)
    assert read(driver, vols[1]) == {}  # only a dir and a link at the top level
    staging, _ = driver.paths("g1")
    c.stage(vols[1], staging)
    try:
        assert (staging / "etc" / "app.conf").read_text() == "golden\n", "copy-on-write per volume"
    finally:
        c.unstage(vols[1], staging)
    t = c.create_volume("t", 32 * MiB, parameters={"baseLayer": "tarred"}).volume_id
    assert read(driver, t) == {"from-tar.txt": b"golden\n"}

    with pytest.raises(grpc.RpcError) as e:
        c.create_volume("missing", 32 * MiB, parameters={"baseLayer": "nope"})
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "'nope'" in e.value.details()
    driver.engine.delete_named_layer("golden")  # still used by three volumes: stays
    assert read(driver, vols[2]) == {}
    for v in vols + [t]:
        c.delete_volume(v)
    driver.engine.delete_named_layer("tarred")
    assert layer_dirs(driver) == []
    assert not host.mounts_under(driver.state)


def fill(path: Path, mib: int) -> int:
    """Write up to ``mib`` MiB; return how many MiB fit before ENOSPC."""
    chunk = b"z" * MiB
    written = 0
    try:
        with open(path, "wb") as f:
            for _ in range(mib):
                f.write(chunk)
                f.flush()
                written += 1
            os.fsync(f.fileno())
    except OSError as e:
        assert e.errno == errno.ENOSPC
        return written - 1
    return written


def test_a_volume_can_rewrite_its_layers_files_after_snapshots(driver: Driver):
    """overlayfs copies a file up whole before the first write: after a detached
    snapshot the upper must still have room for the volume's biggest file."""
    c = driver.client
    vid = c.create_volume("db", 64 * MiB).volume_id
    staging, _ = driver.paths("db")
    c.stage(vid, staging)
    assert fill(staging / "table", 40) == 40
    c.unstage(vid, staging)
    s1 = c.create_snapshot("s1", vid).snapshot_id  # detached: the upper is committed
    assert 40 * MiB <= driver.engine.get_snapshot(s1).size_bytes <= 44 * MiB, "size_bytes is the data"
    c.stage(vid, staging)
    try:
        with open(staging / "table", "ab") as f:  # the first write copies 40 MiB up
            f.write(b"one more row")
        usage = c.stats(vid, staging).usage[0]
        assert usage.total == 64 * MiB and usage.used >= 80 * MiB - MiB, "stats count layers and upper"
    finally:
        c.unstage(vid, staging)


def test_growth_is_not_counted_as_data(driver: Driver):
    """The metadata a file system gains when it grows is never reported as written data."""
    c = driver.client
    vid = c.create_volume("grown", 64 * MiB).volume_id
    c.controller.ControllerExpandVolume(csi.ControllerExpandVolumeRequest(
        volume_id=vid, capacity_range=csi.CapacityRange(required_bytes=4 << 30)))
    snap = c.create_snapshot("after-growth", vid)
    assert snap.size_bytes < MiB, f"an empty volume's snapshot holds {snap.size_bytes} bytes"
