"""Layer images: sizing, building, mount options, journal replay."""

from __future__ import annotations

import logging
import os
import shutil
import tarfile
from pathlib import Path

from csi_driver import host
from csi_driver.errors import CommandFailed

log = logging.getLogger(__name__)

MiB = 1 << 20


def journal_bytes(capacity: int) -> int:
    """The ext4 journal we ask mkfs for (fixed, so sizing is predictable)."""
    if capacity <= 256 * MiB:
        return 4 * MiB
    if capacity <= 2 << 30:
        return 16 * MiB
    if capacity <= 64 << 30:
        return 64 * MiB
    return 256 * MiB


def image_size_for(capacity: int, fs_type: str = "ext4") -> int:
    """Virtual image size whose file system offers at least ``capacity`` bytes.

    The image is sparse, so the padding (journal, inode tables: 256 bytes per
    16 KiB, ext4's reserved clusters) costs nothing until the file system writes it.
    """
    if fs_type == "xfs":
        capacity = max(capacity, 300 * MiB)
    size = capacity
    for _ in range(3):  # the journal size depends on the image size
        size = capacity + capacity // 50 + journal_bytes(size) + min(16 * MiB, capacity // 25) + 4 * MiB
    return (size + MiB - 1) // MiB * MiB


def image_size_for_entries(data_bytes: int, entries: int) -> tuple[int, int]:
    """(image size, inode count) for a tree of ``entries`` entries holding
    ``data_bytes`` of file data: a block per entry besides its data (a
    directory, a file's last partial block), an inode per entry, 256 bytes of
    inode table per inode, a quarter more and 64 MiB of slack; the size leaves
    ext4 room for the inodes (at most one per 4 KiB)."""
    inodes = entries + entries // 8 + 1024
    need = data_bytes + data_bytes // 4 + EXT4_BLOCK * entries + INODE_BYTES * inodes + 64 * MiB
    return image_size_for(need), inodes


EXT4_BLOCK = 4096
INODE_BYTES = 256
BYTES_PER_INODE = 16384  # mkfs.ext4 -i: the inodes an image gets unless it asks for more


def build_image(
    dest: Path,
    size: int,
    fs_type: str,
    populate: Path | None = None,
    *,
    hold: bool = False,
    inodes: int = 0,
) -> int:
    """A new sparse image at ``dest`` with empty ``upper/`` and ``work/`` dirs
    (or with ``populate``'s tree in it); ``hold``: an upper's fixed metadata too;
    ``inodes``: at least this many inodes (ext4; xfs allocates them as it goes)."""
    host.create_sparse(dest, size)
    upper = populate is None  # an empty writable upper, not a layer's tree
    if populate is None:
        populate = dest.parent / "skel"
        (populate / "upper").mkdir(parents=True, exist_ok=True)
        (populate / "work").mkdir(exist_ok=True)
    if fs_type == "xfs":  # upper/ and work/ from a protofile: nothing is mounted to build it
        proto = dest.parent / "skel.proto"
        proto.write_text("/dev/null\n0 0\nd--755 0 0\nupper d--755 0 0\n$\nwork d--755 0 0\n$\n$\n")
        try:
            host.mkfs(dest, "xfs", populate=proto)
        finally:
            proto.unlink()
    else:
        more = inodes if inodes > size // BYTES_PER_INODE else 0
        host.mkfs(dest, "ext4", populate=populate, journal_mib=journal_bytes(size) // MiB, inodes=more)
        if not upper:
            restore_subsecond_mtimes(dest, populate)
        if upper and hold:  # on an overprovisioned node (else at stage)
            try_hold_metadata(dest)
    skel = dest.parent / "skel"
    if skel.is_dir():
        shutil.rmtree(skel)
    return host.fs_used_bytes(dest, fs_type)


def restore_subsecond_mtimes(image: Path, tree: Path) -> None:
    """mke2fs -d (1.47.0) copies mtimes in whole seconds, yet a layer's files keep
    their nanoseconds (a diff compares them, and a pod sees them): those that have
    any are set again through a mount of the new ext4 image of ``tree``."""
    fixes = []
    for dirpath, dirnames, filenames in os.walk(tree):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if st.st_mtime_ns % 1_000_000_000:
                fixes.append((os.path.relpath(path, tree), st.st_atime_ns, st.st_mtime_ns))
    if not fixes:
        return
    mnt = image.with_name(image.name + ".times")
    mnt.mkdir()
    host.mount_image(image, mnt, "ext4", mount_options("ext4", readonly=False), readonly=False)
    try:
        for rel, atime, mtime in fixes:
            os.utime(mnt / rel, ns=(atime, mtime), follow_symlinks=False)
    finally:
        host.umount(mnt)
    mnt.rmdir()


HELD = "user.overlay-csi.held"  # an xattr of the image file: it moves with it


def hold_metadata(image: Path, source: str | None = None) -> None:
    """Allocate the image's fixed ext4 metadata now: its journal, superblocks,
    group descriptors, bitmaps and inode tables (36 MiB of a 1 GiB image, 270 MiB
    of 10 GiB; ``source``: the loop device of a mounted image).

    The image is sparse, and a full host file system fails every write into a hole.
    A data write that fails is the writer's error (its fsync says so); a metadata
    write that fails aborts the journal and stops the whole volume, even one that
    only commits a file it created. Held, the metadata of a volume that is not
    filling the disk always has a place to go. Only an overprovisioned node needs
    it: at ratio 1 the volumes cannot fill the disk.
    """
    host.allocate(image, host.ext4_metadata(source or image))
    os.setxattr(image, HELD, b"1")


def try_hold_metadata(image: Path, source: str | None = None) -> None:
    """``hold_metadata`` where failing must not fail the call (a stage, a growth):
    the volume works, only less safely on a full disk; the next stage tries again."""
    try:
        hold_metadata(image, source)
    except (OSError, CommandFailed) as e:
        log.warning("could not hold the metadata of %s (it stays thin): %s", image, e)


def release_metadata(image: Path) -> None:
    """A committed layer is read-only: give back what its hold never wrote."""
    os.removexattr(image, HELD)  # first: a crash in between leaves it unheld, never half
    try:
        host.release_unwritten(image)
    except OSError as e:  # the layer is complete either way; only the space stays taken
        log.warning("could not give back the unwritten metadata of %s: %s", image, e)


def unshare_metadata(image: Path) -> None:
    """After a reflink clone the held blocks are shared, and a write to them needs
    new space: copy them apart again (best effort)."""
    try:
        host.unshare(image, host.ext4_metadata(image))
    except (OSError, CommandFailed) as e:
        log.warning("could not unshare the held metadata of %s: %s", image, e)


def metadata_held(image: Path) -> bool:
    try:
        return os.getxattr(image, HELD) == b"1"
    except OSError:
        return False


#: An fsync in a volume is a journal commit of the upper's ext4, and the loop
#: device turns each cache flush of that commit into an fsync of the image file on
#: the host. A synchronous commit flushes twice (before and after its commit
#: block); an asynchronous one writes the commit block with a checksum and flushes
#: once, which lifts fsync'd write rates by about half and keeps every acknowledged
#: byte: the flush completes before fsync returns, and a torn commit fails its
#: checksum and is not replayed. The kernel allows it only with data=writeback,
#: and the trade is writeback's: after a power cut, data written but never
#: fsync'd may show zeros or older contents of the same volume (never another's:
#: each volume has its own image, whose unwritten parts are holes).
EXT4_RW = ["noinit_itable", "data=writeback", "journal_async_commit"]


def mount_options(fs_type: str, readonly: bool) -> list[str]:
    opts = ["ro" if readonly else "rw"]
    if fs_type == "xfs":
        opts.append("nouuid")
        if readonly:
            opts.append("norecovery")
    else:
        opts += ["noinit_itable"] if readonly else EXT4_RW
    if not readonly:
        opts.append("discard")  # freed blocks become holes again: thin stays thin
    return opts


def ext4_needs_recovery(image: Path) -> bool:
    """True when the image's journal holds transactions not yet replayed."""
    sb = host.ext4_superblock(image)
    return sb is not None and bool(int.from_bytes(sb[0x60:0x64], "little") & 0x4)  # INCOMPAT_RECOVER


def repair_if_damaged(image: Path) -> None:
    """Before a writable mount: an ext4 that recorded an error (its journal aborted
    on a write that failed, most often on a full host disk) is checked and repaired
    first, so it comes back read-write and consistent; the journal's committed
    transactions (every acknowledged write) are replayed, not dropped."""
    sb = host.ext4_superblock(image)
    if sb is None:
        return
    errors = int.from_bytes(sb[0x3A:0x3C], "little") & 0x2  # EXT4_ERROR_FS
    if not errors and not int.from_bytes(sb[0x194:0x198], "little"):  # s_error_count
        return
    log.warning("%s recorded file system errors: checking and repairing it before mounting", image)
    host.e2fsck_repair(image)


def make_clean(image: Path, fs_type: str) -> None:
    """Replay a pending journal so the image can be mounted read-only."""
    if fs_type == "ext4" and ext4_needs_recovery(image):
        host.e2fsck(image, journal_only=True)
    elif fs_type == "xfs":  # mounting read-write once replays the log
        mnt = image.parent / "mnt"
        mnt.mkdir(exist_ok=True)
        host.mount_image(image, mnt, "xfs", mount_options("xfs", readonly=False), readonly=False)
        host.umount(mnt)


def populate_from_tar(archive: Path, dest_upper: Path) -> None:
    """Extract ``archive`` safely (no absolute paths, no escapes, no devices)."""
    with tarfile.open(archive) as tar:
        tar.extractall(dest_upper, filter="data")
