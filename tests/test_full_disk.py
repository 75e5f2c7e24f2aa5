"""A full node disk, for real: the state dir is a small ext4 on a loop device.

Admission keeps the node from promising more than the disk holds; when an
operator overprovisions anyway and the disk fills, the volume that fills it sees
the errors, its neighbours keep their data, stay writable and fsck-clean, and a
restage brings the filler back once space is freed.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from csi_driver import host
from csi_driver.client import mount_capability
from csi_driver.engine.capacity import HELD_TTL, CapacityPolicy, Share
from csi_driver.layerstore.overlay.images import metadata_held
from csi_driver.proto import csi_pb2 as csi
from driver_harness import Driver, cleanup, needs_mounts

MiB = 1 << 20
pytestmark = needs_mounts
CHUNK = os.urandom(MiB)
needs_xfs = pytest.mark.skipif(shutil.which("mkfs.xfs") is None, reason="xfsprogs is not installed")


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 640 MiB ext4 mounted where the driver keeps its state; ``tmp_path/node``."""
    root = tmp_path / "node"
    (root / "state").mkdir(parents=True)
    image = tmp_path / "disk.img"
    image.touch()
    os.truncate(image, 640 * MiB)
    host.run(["mkfs.ext4", "-q", "-F", "-m", "0", str(image)])
    host.run(["mount", "-o", "loop", str(image), str(root / "state")])
    try:
        yield root
    finally:
        cleanup(root)
        host.umount(root / "state")
        assert not host.loops_under(tmp_path), "the test's loop devices are gone"


def start(root: Path, ratio: float, watermark: str = "10%") -> Driver:
    pct = float(watermark.rstrip("%"))
    return Driver(root, capacity=CapacityPolicy(ratio, Share(percent=1.0), Share(percent=pct)))


def write(path: Path, mib: int) -> int:
    """Write ``mib`` MiB and fsync, as an application would: 0, or the errno it got."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    except OSError as e:
        return e.errno or -1
    try:
        for _ in range(mib):
            os.write(fd, CHUNK)
        os.fsync(fd)
        return 0
    except OSError as e:
        return e.errno or -1
    finally:
        try:
            os.close(fd)
        except OSError:
            pass


def keep(path: Path, mib: int) -> str:
    """Write ``mib`` MiB of fresh random data, fsync'd (acknowledged); its digest."""
    data = os.urandom(mib * MiB)
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return hashlib.sha256(data).hexdigest()


def keep_shared(path: Path, mib: int, timeout: float = 10.0) -> str:
    """``keep`` on an overprovisioned node: while the volumes' allocations are shared out
    a fast writer may use its share up before the next look and get ENOSPC early (with
    room left on the disk); the next look gives it more, so it tries again (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return keep(path, mib)
        except OSError as e:
            if e.errno != errno.ENOSPC or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def code_of(call, *args, **kwargs) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as e:
        call(*args, **kwargs)
    return e.value.code(), e.value.details()


def capacity(d: Driver) -> int:
    return d.client.controller.GetCapacity(csi.GetCapacityRequest()).available_capacity


def condition(d: Driver, vid: str, target: Path) -> str:
    c = d.client.stats(vid, target).volume_condition
    return c.message if c.abnormal else ""


def take_the_rest(path: Path) -> None:
    """Fill the state dir's file system to its last block."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for size in (MiB, 4096):
            try:
                while True:
                    os.write(fd, CHUNK[:size])
            except OSError as e:
                assert e.errno == errno.ENOSPC
    finally:
        os.close(fd)


def recorded_errors(image: Path) -> bool:
    """Whether an ext4 noted an error (an aborted journal, a failed metadata write)."""
    sb = host.ext4_superblock(image)
    assert sb is not None
    return bool(int.from_bytes(sb[0x3A:0x3C], "little") & 2 or int.from_bytes(sb[0x194:0x198], "little"))


def upper_image(d: Driver, vid: str) -> Path:
    return d.state / "layers" / d.engine.get_volume(vid).upper / "image"


def state_free(d: Driver) -> int:
    st = os.statvfs(d.state)
    return st.f_bavail * st.f_frsize


def test_the_node_promises_no_more_than_its_disk_holds(small_disk: Path):
    d = start(small_disk, ratio=1.0)
    try:
        c = d.client
        room = capacity(d)
        assert 400 * MiB < room < state_free(d), "what is free, less the reserve and padding"
        a = c.create_volume("a", 256 * MiB)
        assert not metadata_held(upper_image(d, a.volume_id)), "at ratio 1 the disk cannot fill: no hold"
        left = capacity(d)
        # its whole image (the capacity and the file system's padding), and its spares' few MiB
        assert room - 340 * MiB < left < room - 256 * MiB, "a volume's whole image is promised"

        before = (c.controller.ListVolumes(csi.ListVolumesRequest()), sorted(os.listdir(d.state / "layers")))
        code, details = code_of(c.create_volume, "too-big", left + 64 * MiB)
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "promised" in details and "--overprovision-ratio" in details, details
        after = (c.controller.ListVolumes(csi.ListVolumesRequest()), sorted(os.listdir(d.state / "layers")))
        assert after == before, "a refusal changes nothing"
        fits = c.create_volume("fits", left - 32 * MiB)  # up to what GetCapacity said
        assert capacity(d) < 64 * MiB
        assert c.create_volume("fits", left - 32 * MiB) == fits, "a retry is no new promise"

        code, details = code_of(
            c.controller.ControllerExpandVolume,
            csi.ControllerExpandVolumeRequest(
                volume_id=a.volume_id, capacity_range=csi.CapacityRange(required_bytes=512 * MiB)
            ),
        )
        assert code == grpc.StatusCode.OUT_OF_RANGE and "promised" in details, details

        # a snapshot makes the volume's written data a committed layer and gives it a new
        # upper, which may fill again: it needs room for what was written
        staging, target = d.paths("a")
        c.stage(a.volume_id, staging)
        c.publish(a.volume_id, staging, target)
        assert write(target / "data", 96) == 0
        code, details = code_of(c.create_snapshot, "snap", a.volume_id)
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "snapshot 'snap'" in details, details
        c.delete_volume(fits.volume_id)
        c.create_snapshot("snap", a.volume_id)  # room again
        c.unpublish(a.volume_id, target)
        c.unstage(a.volume_id, staging)
    finally:
        d.stop()
    d = start(small_disk, ratio=2.0)  # overprovisioned now: a volume made before holds at staging
    try:
        assert not metadata_held(upper_image(d, a.volume_id))
        d.client.stage(a.volume_id, staging)
        assert metadata_held(upper_image(d, a.volume_id))
        d.client.unstage(a.volume_id, staging)
    finally:
        d.stop()


@pytest.mark.parametrize("fs_type", ["ext4", pytest.param("xfs", marks=needs_xfs)])
def test_a_full_disk_stops_only_the_volume_that_fills_it(small_disk: Path, caplog, fs_type: str):
    d = start(small_disk, ratio=4.0)
    try:
        c = d.client
        cap = mount_capability(fs_type=fs_type)
        vols = {name: c.create_volume(name, 512 * MiB, cap=cap).volume_id for name in ("a", "b", "c")}
        paths = {name: d.paths(name) for name in vols}
        # ext4 holds its fixed metadata; xfs retries a metadata write until there is room
        assert all(metadata_held(upper_image(d, vid)) == (fs_type == "ext4") for vid in vols.values())
        for name, vid in vols.items():
            c.stage(vid, paths[name][0], cap)
            c.publish(vid, *paths[name], cap=cap)
        target = {name: paths[name][1] for name in vols}

        # xfs volumes and their spares start with their 64 MiB logs written: less room here
        ballast_mib, a_mib = (128, 150) if fs_type == "ext4" else (64, 100)
        ballast = d.state / "ballast"  # what an operator can free later: logs, say
        assert write(ballast, ballast_mib) == 0
        kept = {"a": keep_shared(target["a"] / "kept", a_mib), "b": keep_shared(target["b"] / "kept", 20)}
        assert all(condition(d, vid, target[n]) == "" for n, vid in vols.items())

        # below the watermark: nothing new is promised, and the volumes say why
        for _ in range(200):  # bounded: 16 MiB at a time
            if state_free(d) <= 60 * MiB:
                break
            # near the slop a writer can use its share up before the rationing looks
            # again: ENOSPC early, and room again at the next look
            assert settles(lambda: write(target["b"] / f"fill-{state_free(d)}", 16) == 0, timeout=5)
        code, details = code_of(c.create_volume, "late", 64 * MiB)
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "node storage is low" in details, details
        assert capacity(d) == 0
        assert "node storage is low" in condition(d, vols["a"], target["a"])
        deadline = time.monotonic() + 30  # entering the low state checkpoints every volume
        while d.engine.capacity.settled == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert d.engine.capacity.settled > 0

        # b fills the disk: its application sees the error
        assert write(target["b"] / "overflow", 400) in (errno.ENOSPC, errno.EIO, errno.EROFS)
        take_the_rest(d.state / "ballast-rest")
        assert state_free(d) == 0

        # neighbours on a full disk: new data fails (there is no space), but their file
        # systems go on: new files (inodes, journal commits) and their acknowledged data
        for name in ("a", "c"):
            assert write(target[name] / "small", 1) in (errno.ENOSPC, errno.EIO)
            for i in range(20):
                (target[name] / f"touched-{i}").touch()
            os.sync()
            assert "no longer writes" not in condition(d, vols[name], target[name])
        d.engine.capacity.settle()  # what the watch does every 2 s while storage is low
        for name in ("a", "c"):
            assert "no longer writes" not in condition(d, vols[name], target[name])
        (d.state / "ballast-rest").unlink()
        assert digest(target["a"] / "kept") == kept["a"]

        # space comes back; the filler is restaged: checked, repaired, read-write again
        ballast.unlink()
        for name in ("a", "b", "c"):
            c.unpublish(vols[name], target[name])
            c.unstage(vols[name], paths[name][0])
        for name in ("a", "c"):  # never damaged: no error recorded, clean without a repair
            image = upper_image(d, vols[name])
            if fs_type == "ext4":
                assert not recorded_errors(image), f"{name}'s file system recorded an error"
            fsck = ["e2fsck", "-fn"] if fs_type == "ext4" else ["xfs_repair", "-n", "-f"]
            check = subprocess.run([*fsck, str(image)], capture_output=True, text=True)
            assert check.returncode == 0, check.stdout + check.stderr
        b_image = upper_image(d, vols["b"])
        damaged = fs_type == "ext4" and recorded_errors(b_image)  # the filler's journal aborted
        c.stage(vols["b"], paths["b"][0], cap)
        assert not damaged or "checking and repairing it" in caplog.text
        c.publish(vols["b"], *paths["b"], cap=cap)
        assert digest(target["b"] / "kept") == kept["b"], "b's acknowledged data survived"
        for junk in [*target["b"].glob("fill-*"), target["b"] / "overflow"]:
            junk.unlink(missing_ok=True)  # what it failed to write, and what filled the disk
        assert write(target["b"] / "after", 8) == 0
        # Under load the host's free space has been seen to come back a moment after the
        # unlink on xfs (freed blocks reach the host through discard); finding why is issue
        # 25's, this wait only keeps CI from failing on it. Bounded: 15 s.
        deadline = time.monotonic() + 15
        while condition(d, vols["b"], target["b"]) != "" and time.monotonic() < deadline:
            os.sync()
            time.sleep(0.2)
        assert condition(d, vols["b"], target["b"]) == ""
        # promises resume once the watermark is passed and the volumes' allocations are
        # read again (at most HELD_TTL seconds old: until then the node errs on caution)
        time.sleep(HELD_TTL)
        assert c.create_volume("late", 64 * MiB).capacity_bytes == 64 * MiB
        c.unpublish(vols["b"], target["b"])
        c.unstage(vols["b"], paths["b"][0])
        if fs_type == "ext4":
            assert not recorded_errors(b_image), "repaired: the next stage mounts it without a check"
    finally:
        d.stop()


def test_a_volume_that_recorded_an_error_is_repaired_when_staged(driver: Driver, caplog):
    c = driver.client
    vid = c.create_volume("hurt", 64 * MiB).volume_id
    staging, target = driver.paths("hurt")
    c.stage(vid, staging)
    c.publish(vid, staging, target)
    kept = keep(target / "kept", 4)
    c.unpublish(vid, target)
    c.unstage(vid, staging)
    image = upper_image(driver, vid)
    host.run(["debugfs", "-w", "-R", "ssv state 2", str(image)])  # as an aborted journal leaves it
    assert recorded_errors(image)
    c.stage(vid, staging)
    assert "checking and repairing it" in caplog.text
    c.publish(vid, staging, target)
    assert digest(target / "kept") == kept
    assert write(target / "more", 1) == 0
    c.unpublish(vid, target)
    c.unstage(vid, staging)
    assert not recorded_errors(image), "checked once: the next stage mounts it at once"


def test_held_ranges_are_allocated_and_given_back_without_changing_a_byte(tmp_path: Path):
    f = tmp_path / "image"
    f.touch()
    os.truncate(f, 64 * MiB)
    host.allocate(f, [(0, 8 * MiB), (32 * MiB, 8 * MiB)])
    assert os.stat(f).st_blocks * 512 >= 16 * MiB, "held: real blocks, no data"
    with open(f, "r+b") as out:  # half of one range is written, as a file system would
        out.seek(MiB)
        out.write(CHUNK * 2)
    before = hashlib.sha256(f.read_bytes()).hexdigest()
    released = host.release_unwritten(f)
    assert released >= 14 * MiB - 4096
    assert os.stat(f).st_blocks * 512 < 3 * MiB, "only what was written stays"
    assert hashlib.sha256(f.read_bytes()).hexdigest() == before


def test_a_block_volume_reports_low_node_storage_too(small_disk: Path):
    d = start(small_disk, ratio=4.0)
    try:
        cap = csi.VolumeCapability(
            block=csi.VolumeCapability.BlockVolume(),
            access_mode=csi.VolumeCapability.AccessMode(
                mode=csi.VolumeCapability.AccessMode.SINGLE_NODE_WRITER
            ),
        )
        vid = d.client.create_volume("raw", 16 * MiB, cap=cap).volume_id
        staging, _ = d.paths("raw")
        d.client.stage(vid, staging, cap)
        assert not d.client.stats(vid, staging).volume_condition.abnormal
        ballast = d.state / "ballast"
        ballast.touch()
        fd = os.open(ballast, os.O_WRONLY)
        try:
            os.posix_fallocate(fd, 0, state_free(d) - 40 * MiB)  # below the 10% watermark
        finally:
            os.close(fd)
        c = d.client.stats(vid, staging).volume_condition
        assert c.abnormal and "node storage is low" in c.message, c.message
        ballast.unlink()
        assert not d.client.stats(vid, staging).volume_condition.abnormal
        d.client.unstage(vid, staging)
    finally:
        d.stop()


def mounted_rw(path: Path) -> bool:
    """Whether the file system holding ``path`` is still mounted read-write."""
    return not os.statvfs(path).f_flag & os.ST_RDONLY


def settles(check, timeout: float = 10.0) -> bool:
    """``check()`` becomes true within ``timeout`` seconds (the rationing looks again)."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        os.sync()
        time.sleep(0.1)
    return True


def test_one_volume_filling_an_overprovisioned_disk_hurts_no_neighbour(small_disk: Path, caplog):
    """Issue 25's case: at ratio 3, b writes more than the disk has. b gets ENOSPC in
    its own volume, the disk never fills, a and c keep every write they were told was
    done and stay writable, the driver's calls work, and nothing needs a restage."""
    d = start(small_disk, ratio=3.0)
    try:
        c = d.client
        sizes = {"a": 512, "b": 512, "c": 64}
        vols = {n: c.create_volume(n, s * MiB).volume_id for n, s in sizes.items()}
        paths = {n: d.paths(n) for n in vols}
        for n, vid in vols.items():
            c.stage(vid, paths[n][0])
            c.publish(vid, *paths[n])
        target = {n: paths[n][1] for n in vols}
        kept = {"a": keep_shared(target["a"] / "kept", 256), "c": keep_shared(target["c"] / "kept", 40)}
        kept["b"] = keep_shared(target["b"] / "kept", 8)

        # b writes far more than the disk has free: the error is b's, at write or fsync
        assert write(target["b"] / "fill", 450) == errno.ENOSPC
        os.sync()  # whatever b was allowed is on the disk now
        assert state_free(d) > 4 * MiB, "the volumes never fill the disk"
        ration = d.engine.capacity.last_ration
        assert ration is not None and ration.limited, "at ratio 3 the volumes' allocations are shared out"

        for n in ("a", "c"):
            for i in range(20):  # new files, a rename, fsync of written data
                (target[n] / f"touched-{i}").write_bytes(b"x" * 100)
            (target[n] / "touched-0").rename(target[n] / "renamed")
            with open(target[n] / "kept", "r+b") as f:  # an overwrite needs no new block
                f.write(b"\0" * 4096)
                f.flush()
                os.fsync(f.fileno())
            kept[n] = digest(target[n] / "kept")
            assert write(target[n] / "new", 1) in (0, errno.ENOSPC), "new data: ENOSPC at most"
            os.sync()
            assert mounted_rw(target[n]), f"{n} turned read-only"

        # the node can free space through Kubernetes: c's calls and its delete work
        c.unpublish(vols["c"], target["c"])
        c.unstage(vols["c"], paths["c"][0])
        c_image = upper_image(d, vols["c"])
        check = subprocess.run(["e2fsck", "-fn", str(c_image)], capture_output=True, text=True)
        assert check.returncode == 0 and not recorded_errors(c_image), check.stdout
        c.delete_volume(vols["c"])

        # space is free again: a and b write at once, without a restage
        (target["b"] / "fill").unlink()
        assert settles(lambda: write(target["a"] / "after", 16) == 0), "a writes again"
        assert write(target["b"] / "after", 16) == 0
        for n in ("a", "b"):
            assert digest(target[n] / "kept") == kept[n], f"{n}'s acknowledged data"
            c.unpublish(vols[n], target[n])
            c.unstage(vols[n], paths[n][0])
            image = upper_image(d, vols[n])
            check = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True)
            assert check.returncode == 0 and not recorded_errors(image), check.stdout
        assert "checking and repairing it" not in caplog.text
    finally:
        d.stop()


def test_a_disk_filled_from_outside_still_lets_kubernetes_free_space(small_disk: Path):
    """Something else fills the disk to its last block: the driver's own writes use its
    reserve, so unpublish, unstage and delete work; what needs space is RESOURCE_EXHAUSTED
    with the figures, never INTERNAL.

    Callers: the external-provisioner's checkError turns CreateVolume's RESOURCE_EXHAUSTED
    into ProvisioningReschedule (the driver has topology; the selected-node annotation
    goes) where INTERNAL would retry on this node; kubelet's NodeUnpublishVolume and
    NodeUnstageVolume (csi_client.go) must succeed for the pod and the PV to go, and the
    provisioner's DeleteVolume and the snapshotter's DeleteSnapshot for space to be freed."""
    d = start(small_disk, ratio=1.0)
    try:
        c = d.client
        reserve = d.state / "state.db.reserve"
        assert host.allocated_bytes(reserve) >= 16 * MiB, "the store's reserve is taken at start"
        vid = c.create_volume("v", 64 * MiB).volume_id
        snap = c.create_snapshot("s", vid).snapshot_id
        staging, target = d.paths("v")
        c.stage(vid, staging)
        c.publish(vid, staging, target)
        take_the_rest(d.state / "ballast")
        assert state_free(d) == 0
        code, details = code_of(c.create_volume, "w", 16 * MiB)
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "MiB" in details, details
        c.unpublish(vid, target)
        c.unstage(vid, staging)
        c.delete_snapshot(snap)
        c.delete_volume(vid)
        assert not reserve.exists(), "given back for the store's writes"
        listed = c.controller.ListVolumes(csi.ListVolumesRequest()).entries
        assert vid not in [e.volume.volume_id for e in listed]
        (d.state / "ballast").unlink()
        d.engine.capacity.watch()  # what the watch does every few seconds
        assert host.allocated_bytes(reserve) >= 16 * MiB, "taken again once there is room"
    finally:
        d.stop()


def test_a_limit_left_by_an_earlier_process_is_lifted(small_disk: Path):
    """The driver stopped while the volumes were limited: the limits stay with their
    mounts (safe while nobody looks). The next process lifts what is no longer needed."""
    d = start(small_disk, ratio=1.0)
    try:
        vid = d.client.create_volume("v", 64 * MiB).volume_id
        staging, target = d.paths("v")
        d.client.stage(vid, staging)
        device = d.engine.backend.held.device(d.engine.get_volume(vid).upper)
        default = host.fsreserve.reserved_clusters(device)
        host.fsreserve.set_reserved_clusters(device, default + 10000)  # as a limit left behind
        ration = d.engine.capacity.ration()
        assert not ration.limited, "one small volume on a roomy disk"
        assert host.fsreserve.reserved_clusters(device) == default
        d.client.unstage(vid, staging)
    finally:
        d.stop()
