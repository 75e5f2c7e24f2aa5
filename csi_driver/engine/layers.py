"""Layer images: building them and reference-counted loop mounts of them."""

from __future__ import annotations

import logging
import shutil
import tarfile
import threading
from pathlib import Path

from csi_driver.engine import host
from csi_driver.engine.compose import overlay_options
from csi_driver.engine.layout import Layout
from csi_driver.engine.locks import KeyedLocks

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
    if fs_type == "xfs":
        host.mkfs(dest, "xfs")
        mnt = dest.parent / "skel-mnt"
        mnt.mkdir(exist_ok=True)
        host.mount_image(dest, mnt, "xfs", ["nouuid"], readonly=False)
        try:
            for name in ("upper", "work"):
                (mnt / name).mkdir(exist_ok=True)
        finally:
            host.umount(mnt)
    else:
        host.mkfs(dest, "ext4", populate=populate, journal_mib=journal_bytes(size) // MiB)
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


class LayerMounts:
    """Loop mounts of layer images at ``layers/<id>/mnt``, counted per user.

    A layer is mounted while any staged volume (or a running copy) uses it,
    and unmounted when the last user releases it. Locks are per layer.
    """

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self._locks = KeyedLocks()
        self._counts: dict[str, int] = {}
        self._guard = threading.Lock()

    def acquire(self, layer_id: str, fs_type: str, readonly: bool) -> Path:
        mnt = self.layout.mnt(layer_id)
        with self._locks.hold(layer_id):
            if not host.is_mounted(mnt):
                mnt.mkdir(exist_ok=True)
                image = self.layout.image(layer_id)
                host.mount_image(image, mnt, fs_type, mount_options(fs_type, readonly), readonly)
            with self._guard:
                self._counts[layer_id] = self._counts.get(layer_id, 0) + 1
        return mnt

    def release(self, layer_id: str) -> None:
        with self._locks.hold(layer_id):
            with self._guard:
                n = self._counts.get(layer_id, 0) - 1
                if n > 0:
                    self._counts[layer_id] = n
                    return
                self._counts.pop(layer_id, None)
            host.umount(self.layout.mnt(layer_id))

    def count(self, layer_id: str) -> int:
        with self._guard:
            return self._counts.get(layer_id, 0)

    def in_use(self) -> set[str]:
        with self._guard:
            return set(self._counts)


def ext4_needs_recovery(image: Path) -> bool:
    """True when the image's journal holds transactions not yet replayed."""
    sb = host.ext4_superblock(image)
    return sb is not None and bool(int.from_bytes(sb[0x60:0x64], "little") & 0x4)  # INCOMPAT_RECOVER


def make_clean(image: Path, fs_type: str) -> None:
    """Replay a pending journal so the image can be mounted read-only."""
    if fs_type == "ext4" and ext4_needs_recovery(image):
        host.run(["e2fsck", "-p", "-E", "journal_only", str(image)], check=False)
    elif fs_type == "xfs":  # mounting read-write once replays the log
        mnt = image.parent / "mnt"
        mnt.mkdir(exist_ok=True)
        host.mount_image(image, mnt, "xfs", mount_options("xfs", readonly=False), readonly=False)
        host.umount(mnt)


def populate_from_tar(archive: Path, dest_upper: Path) -> None:
    """Extract ``archive`` safely (no absolute paths, no escapes, no devices)."""
    with tarfile.open(archive) as tar:
        tar.extractall(dest_upper, filter="data")


def flatten_into(layout: Layout, links: list[str], root: Path) -> None:
    """Mount the merged view of ``links`` (nearest first) at ``root/upper``."""
    target = root / "upper"
    target.mkdir(parents=True, exist_ok=True)
    if len(links) == 1:
        host.bind_mount(layout.link(links[0]).resolve(), target, readonly=True)
        return
    opts = overlay_options(links[:-1], None)
    # a lowers-only overlay is read-only; the last link replaces "empty"
    opts[0] = "lowerdir=" + ":".join(f"l/{x}" for x in links)
    host.mount("overlay", target, "overlay", ["ro"] + opts, cwd=layout.root)


def remove_tree(path: Path) -> None:
    """Remove a directory that holds no mounts (refuses to cross one)."""
    if not path.exists():
        return
    for m in host.mounts_under(path):
        host.umount(m.target)
    shutil.rmtree(path, ignore_errors=False)
