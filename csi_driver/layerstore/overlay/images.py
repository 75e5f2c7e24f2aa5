"""Layer images: sizing, building, mount options, journal replay."""

from __future__ import annotations

import logging
import shutil
import tarfile
from pathlib import Path

from csi_driver import host

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


def build_image(dest: Path, size: int, fs_type: str, populate: Path | None = None) -> int:
    """A new sparse image at ``dest`` with empty ``upper/`` and ``work/`` dirs
    (or with ``populate``'s tree in it)."""
    host.create_sparse(dest, size)
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
        host.mkfs(dest, "ext4", populate=populate, journal_mib=journal_bytes(size) // MiB)
    skel = dest.parent / "skel"
    if skel.is_dir():
        shutil.rmtree(skel)
    return host.fs_used_bytes(dest, fs_type)


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
