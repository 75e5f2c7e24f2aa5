"""Check-then-use races on node paths (issue: a path string was checked, then
mounted, bound, chowned or removed by that string again). Another process swaps a
node path's last component or a parent for a symlink out of the kubelet dir, or for
another dir (renameat2 RENAME_EXCHANGE, in a loop), while the real driver, with
--kubelet-dir, serves NodeStage/NodePublish/NodeUnpublish/NodeUnstage of a mount and a
block volume. Nothing may ever be mounted, chowned or deleted outside the kubelet dir,
and a publish never binds a host dir into a pod's target."""

from __future__ import annotations

import collections
import ctypes
import errno
import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from csi_driver import host
from csi_driver.client import mount_capability
from csi_driver.host.libc import libc
from csi_driver.proto import csi_pb2 as csi
from driver_harness import MOUNT_SKIP, Driver, cleanup, make_driver

MiB = 1 << 20
DRIVER = "overlay.csi.dev"
GID = 4321
pytestmark = pytest.mark.skipif(bool(MOUNT_SKIP), reason=MOUNT_SKIP or "")

# the attacker: another process exchanging each pair of paths as fast as it can
RACER = r"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
pairs = [(os.fsencode(a), os.fsencode(b)) for a, b in zip(sys.argv[1::2], sys.argv[2::2])]
print("ready", flush=True)
while True:
    for a, b in pairs:
        libc.renameat2(-100, a, -100, b, 2)  # RENAME_EXCHANGE
"""


class Racer:
    """A process that swaps ``pairs`` while running; ``restore`` puts every pair back
    as it was (the first of each pair not a decoy) while it is paused."""

    def __init__(self, pairs: list[tuple[Path, Path]], is_decoy: Callable[[Path], bool]) -> None:
        self.pairs, self.is_decoy = pairs, is_decoy
        argv = [sys.executable, "-c", RACER, *(str(p) for pair in pairs for p in pair)]
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE)
        assert self.proc.stdout is not None and self.proc.stdout.readline() == b"ready\n"
        self.pause()
        self.restore()

    def pause(self) -> None:
        os.kill(self.proc.pid, signal.SIGSTOP)
        os.waitpid(self.proc.pid, os.WUNTRACED)

    def restore(self) -> None:
        for a, b in self.pairs:
            if self.is_decoy(a):
                if exchange(a, b) == errno.EBUSY:  # a mount on what was checked, now renamed
                    unmount_here(a)
                    unmount_here(b)
                    assert exchange(a, b) == 0

    def run(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.restore()


def unmount_here(path: Path) -> None:
    """Unmount what is mounted at ``path`` itself (never through a symlink there): a
    mount the driver made in the kubelet dir on a dir or file renamed meanwhile."""
    while libc().umount2(os.fsencode(path), 0x8 | 0x2) == 0:  # UMOUNT_NOFOLLOW | MNT_DETACH
        pass


def exchange(a: Path, b: Path) -> int:
    if libc().renameat2(-100, os.fsencode(a), -100, os.fsencode(b), 2) == 0:
        return 0
    return ctypes.get_errno()


def decoy(p: Path) -> bool:
    return p.is_symlink() or (p / ".decoy").exists()


def block_cap() -> csi.VolumeCapability:
    return csi.VolumeCapability(
        block=csi.VolumeCapability.BlockVolume(),
        access_mode=csi.VolumeCapability.AccessMode(mode=csi.VolumeCapability.AccessMode.SINGLE_NODE_WRITER),
    )


def group_cap() -> csi.VolumeCapability:
    cap = mount_capability()
    cap.mount.volume_mount_group = str(GID)
    return cap


def attempt(call: Callable[[], None]) -> bool:
    try:
        call()
        return True
    except grpc.RpcError as e:
        assert e.code() != grpc.StatusCode.UNKNOWN, e.details()
        return False


class World:
    """The kubelet dir, and outside it the host's dirs and files a race must not reach."""

    def __init__(self, tmp: Path) -> None:
        self.k = tmp / "kubelet"
        self.csi = self.k / "plugins" / "kubernetes.io" / "csi"
        self.out = tmp / "host"
        self.out.mkdir()
        self.canaries: list[Path] = []

    def canary_dir(self, name: str) -> Path:
        p = self.out / name
        p.mkdir(parents=True)
        os.chmod(p, 0o755)
        (p / "keep").write_text("host data\n")
        self.canaries.append(p)
        return p

    def canary_file(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")
        self.canaries.append(path)
        return path

    def global_mount(self, volume_id: str) -> Path:
        """The staging dir the kubelet makes for a volume (made here)."""
        gm = self.csi / DRIVER / hashlib.sha256(volume_id.encode()).hexdigest() / "globalmount"
        gm.mkdir(parents=True)
        return gm

    def pod_volume(self, pod_uid: str, pv: str) -> Path:
        """A pod's dir for a CSI volume (not made here)."""
        return self.k / "pods" / pod_uid / "volumes" / "kubernetes.io~csi" / pv

    def check(self) -> None:
        outside = [m.target for m in host.MountTable.read().entries if m.target.startswith(str(self.out))]
        assert outside == [], f"mounted outside the kubelet dir: {outside}"
        for c in self.canaries:
            assert c.exists(), f"{c} outside the kubelet dir was deleted"
            if c.is_dir():
                st = c.stat()
                assert (st.st_gid, st.st_mode & 0o7777) == (0, 0o755), f"{c} outside was chowned or chmodded"
        for m in host.mounts_under(self.k):
            # every mount in the kubelet dir is a volume's: an overlay, or a block device
            assert m.fstype in ("overlay", "devtmpfs"), f"{m.target} shows a host dir ({m.fstype} {m.root})"


@pytest.fixture
def world(tmp_path: Path) -> Iterator[tuple[Driver, World]]:
    w = World(tmp_path)
    w.k.mkdir()
    d = make_driver(tmp_path, kubelet_dir=str(w.k))
    try:
        yield d, w
    finally:
        d.stop()
        mounts, loops = cleanup(tmp_path)
    assert not mounts and not loops, f"leaked {mounts} {loops}"


def swap_with_symlink(path: Path, to: Path) -> tuple[Path, Path]:
    n = 0
    while (link := path.with_name(f"{path.name}.decoy{n}")).is_symlink():
        n += 1
    link.symlink_to(to)
    return path, link


TRIES = 250


def test_racing_swaps_never_reach_outside_the_kubelet_dir(world):
    d, w = world
    c = d.client
    deadline = time.monotonic() + 55
    vid = c.create_volume("race", 16 * MiB).volume_id
    gm = w.global_mount(vid)
    pod = w.pod_volume("uid-1", "pv-1")
    target = pod / "mount"
    pod.mkdir(parents=True)

    def race(
        pairs: list[tuple[Path, Path]], tries: int, call: Callable[[], None], undo: Callable[[], None]
    ) -> None:
        r = Racer(pairs, decoy)
        try:
            for _ in range(tries):
                assert time.monotonic() < deadline, "the races took too long"
                r.run()
                attempt(call)
                r.pause()
                w.check()
                r.restore()
                attempt(undo)
        finally:
            r.stop()

    # NodeStage: the staging dir swapped for a symlink to a host dir
    stage_out = w.canary_dir("stage")
    race([swap_with_symlink(gm, stage_out)], TRIES, lambda: c.stage(vid, gm), lambda: c.unstage(vid, gm))

    # NodePublish: the target swapped for a symlink to a host dir
    c.stage(vid, gm)
    target.mkdir()
    pub_out = w.canary_dir("publish")
    race(
        [swap_with_symlink(target, pub_out)],
        TRIES,
        lambda: c.publish(vid, gm, target),
        lambda: c.unpublish(vid, target),
    )

    # NodePublish: the staging path's parent swapped for a symlink to a host dir
    # holding a globalmount, and for another dir in the kubelet dir holding one
    host_parent = w.out / "stage-parent"
    w.canary_dir("stage-parent/globalmount")
    other = w.csi / DRIVER / ("0" * 64)
    (other / "globalmount").mkdir(parents=True)
    (other / ".decoy").write_text("")
    race(
        [swap_with_symlink(gm.parent, host_parent)],
        TRIES,
        lambda: c.publish(vid, gm, target),
        lambda: c.unpublish(vid, target),
    )
    race([(gm.parent, other)], TRIES, lambda: c.publish(vid, gm, target), lambda: c.unpublish(vid, target))

    # NodeUnpublish: the target's parent swapped for a symlink to a host dir holding
    # an empty "mount" dir
    unpub_out = w.out / "unpublish"
    w.canary_dir("unpublish/mount")
    (unpub_out / "mount" / "keep").unlink()  # empty, as the driver's mount dir would be
    w.canaries[-1] = unpub_out / "mount"

    r = Racer([swap_with_symlink(pod, unpub_out)], decoy)
    try:
        for _ in range(TRIES):
            assert time.monotonic() < deadline, "the races took too long"
            c.publish(vid, gm, target)
            r.run()
            attempt(lambda: c.unpublish(vid, target))
            r.pause()
            w.check()
            r.restore()
            c.unpublish(vid, target)
    finally:
        r.stop()

    # NodePublish with volume_mount_group: the staging dir swapped for a symlink to a
    # host dir (the chown and chmod of the volume's root must land on the volume only)
    group_out = w.canary_dir("group")
    c.publish(vid, gm, target, cap=group_cap())
    race(
        [swap_with_symlink(gm, group_out)],
        2 * TRIES,
        lambda: c.publish(vid, gm, target, cap=group_cap()),
        lambda: None,
    )
    st = gm.stat()
    assert st.st_gid == GID and st.st_mode & 0o2070 == 0o2070
    c.unpublish(vid, target)

    # NodeUnstage: the staging dir swapped for a symlink to a host dir
    race([swap_with_symlink(gm, stage_out)], TRIES // 5, lambda: c.unstage(vid, gm), lambda: c.stage(vid, gm))
    c.unstage(vid, gm)

    # a block volume: its publish file swapped for a symlink to a host file, and its
    # parent for a symlink to a host dir holding an empty file of the same name
    bvid = c.create_volume("brace", 16 * MiB, cap=block_cap()).volume_id
    bstaging = w.csi / "volumeDevices" / "staging" / "pv-b"
    bstaging.mkdir(parents=True)
    c.stage(bvid, bstaging, cap=block_cap())
    btarget = w.csi / "volumeDevices" / "publish" / "pv-b" / "uid-b"
    btarget.parent.mkdir(parents=True)
    bfile = w.canary_file(w.out / "blockfile")
    race(
        [swap_with_symlink(btarget, bfile)],
        TRIES,
        lambda: c.publish(bvid, bstaging, btarget, cap=block_cap()),
        lambda: c.unpublish(bvid, btarget),
    )
    w.canary_file(w.out / "blockparent" / "uid-b")
    r = Racer([swap_with_symlink(btarget.parent, w.out / "blockparent")], decoy)
    try:
        for _ in range(TRIES):
            assert time.monotonic() < deadline, "the races took too long"
            c.publish(bvid, bstaging, btarget, cap=block_cap())
            r.run()
            attempt(lambda: c.unpublish(bvid, btarget))
            r.pause()
            w.check()
            r.restore()
            c.unpublish(bvid, btarget)
    finally:
        r.stop()
    c.unstage(bvid, bstaging)
    w.check()


# the attacker's other move: the dir itself renamed into another pod's dir while the
# driver holds it open, by an exchange with a dir there ("x") or a move there and back
# ("r"), so a mount onto the fd opened lands in that pod's dir unless it is undone
MOVER = r"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
mode, a, b = sys.argv[1], os.fsencode(sys.argv[2]), os.fsencode(sys.argv[3])
print("ready", flush=True)
while True:
    if mode == "x":
        libc.renameat2(-100, a, -100, b, 2)  # RENAME_EXCHANGE
    elif libc.renameat2(-100, a, -100, b, 1) == 0:  # RENAME_NOREPLACE
        libc.renameat2(-100, b, -100, a, 1)
"""

RENAME_TRIES = 150


class Mover:
    """A process renaming ``a`` into another pod's dir ``b`` (``mode``: "x" exchanges
    the two, "r" moves ``a`` to ``b`` and back) while running; ``settle`` puts ``a``
    back and removes ``b`` while it is paused."""

    def __init__(self, mode: str, a: Path, b: Path) -> None:
        self.mode, self.a, self.b = mode, a, b
        self.proc = subprocess.Popen(
            [sys.executable, "-c", MOVER, mode, str(a), str(b)], stdout=subprocess.PIPE
        )
        assert self.proc.stdout is not None and self.proc.stdout.readline() == b"ready\n"
        self.pause()

    def run(self) -> None:
        if self.mode == "x":
            self.b.mkdir(exist_ok=True)  # an empty dir of the other pod's to exchange with
        os.kill(self.proc.pid, signal.SIGCONT)

    def pause(self) -> None:
        os.kill(self.proc.pid, signal.SIGSTOP)
        os.waitpid(self.proc.pid, os.WUNTRACED)

    def settle(self) -> None:
        """Either dir at ``a`` serves (both are empty); a dir the driver made again at
        ``a`` meanwhile wins over the one moved away."""
        if self.b.is_dir():
            if self.a.exists():
                self.b.rmdir()
            else:
                self.b.rename(self.a)

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.settle()


def test_a_node_dir_renamed_into_another_pod_keeps_no_mount(world):
    """NodeStage and NodePublish while their dir is renamed into another pod's volume
    dir: the mount is made detached and moved onto the dir opened, wherever it is by
    then, so it must be checked there afterwards and undone if the path no longer
    shows it. Each call succeeds with the volume at its path, or is FAILED_PRECONDITION;
    never is a mount of the volume left anywhere else."""
    d, w = world
    c = d.client
    deadline = time.monotonic() + 60
    vid = c.create_volume("renamed", 16 * MiB).volume_id
    gm = w.global_mount(vid)
    target = w.pod_volume("uid-1", "pv-1") / "mount"
    target.parent.mkdir(parents=True)
    other = w.pod_volume("uid-2", "pv-2")
    other.mkdir(parents=True)
    wrong: list[str] = []

    def race(mode: str, path: Path, expected: set[Path], call: Callable[[], None], undo: Callable[[], None]):
        m = Mover(mode, path, other / "mount")
        tried, outcomes = len(wrong), collections.Counter()
        try:
            for _ in range(RENAME_TRIES):
                assert time.monotonic() < deadline, "the races took too long"
                m.run()
                try:
                    call()
                    outcome = "OK"
                except grpc.RpcError as e:
                    outcome = f"{e.code().name}: {e.details()}"
                m.pause()
                outcomes[outcome.split(":")[0]] += 1
                # the volume's mounts (its overlay, binds of it) anywhere in the test's tree
                volume_mounts = {
                    Path(e.target) for e in host.mounts_under(w.k.parent) if e.fstype == "overlay"
                }
                problems = [f"a mount left at {stray}" for stray in sorted(volume_mounts - expected)]
                for stray in volume_mounts - expected:
                    unmount_here(stray)
                if outcome == "OK" and path not in volume_mounts:
                    problems.append(f"nothing is mounted at {path}")
                if not outcome.startswith(("OK", "FAILED_PRECONDITION")):
                    problems.append("neither OK nor FAILED_PRECONDITION")
                if problems:
                    wrong.append(f"{mode} {path.name} {outcome}: {'; '.join(problems)}")
                w.check()
                undo()
                m.settle()
        finally:
            m.stop()
        left = sum("a mount left" in x for x in wrong[tried:])
        print(
            f"{mode} {path.name}: {dict(outcomes)}; wrong {len(wrong) - tried}, a mount left elsewhere {left}"
        )

    for mode in ("x", "r"):
        race(mode, gm, {gm}, lambda: c.stage(vid, gm), lambda: c.unstage(vid, gm))
    gm.mkdir(exist_ok=True)
    c.stage(vid, gm)
    for mode in ("x", "r"):
        race(mode, target, {gm, target}, lambda: c.publish(vid, gm, target), lambda: c.unpublish(vid, target))
    c.unstage(vid, gm)
    w.check()
    assert not wrong, f"{len(wrong)} of {4 * RENAME_TRIES} calls went wrong; the first: {wrong[:3]}"
