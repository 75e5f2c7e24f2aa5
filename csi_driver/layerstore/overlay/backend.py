"""The overlay-on-loop-images backend: each layer a sparse ext4/xfs image,
loop-mounted in direct-I/O mode while used, stacked by overlayfs.

A committed layer is an image mounted read-only; an active layer (a volume's
upper) is one mounted read-write. Committing a detached upper is a metadata
flip; capturing one in use freezes its file system and copies the image's
allocated extents (a reflink where the host file system can clone).
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import shutil
import threading
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import BinaryIO

from csi_driver import host
from csi_driver.errors import CommandFailed, FailedPrecondition
from csi_driver.ids import ID_RE, new_link
from csi_driver.layerstore import treediff
from csi_driver.layerstore.backend import Built, Capabilities, CleanupReport, FsUsage, Mount, Ration
from csi_driver.layerstore.layertar import DiffStats
from csi_driver.layerstore.overlay import shared, tuning, upperdiff
from csi_driver.layerstore.overlay.compose import overlay_options, view_options
from csi_driver.layerstore.overlay.images import (
    build_image,
    image_size_for,
    image_size_for_entries,
    make_clean,
    metadata_held,
    mount_options,
    populate_from_tar,
    release_metadata,
    try_hold_metadata,
    unshare_metadata,
)
from csi_driver.layerstore.overlay.layout import Layout
from csi_driver.layerstore.overlay.mounts import LayerMounts
from csi_driver.layerstore.overlay.ration import Rationing
from csi_driver.layerstore.overlay.spares import SpareImages
from csi_driver.store import Layer

log = logging.getLogger(__name__)

MiB = 1 << 20
BLOCK = "block"
#: raw block volumes keep the classic 512-byte sectors a pod's tools expect
BLOCK_SECTOR = host.loopdev.BLOCK_SECTOR


def _nothing() -> None:
    pass


def capabilities() -> Capabilities:
    """ext4 uppers, xfs ones where mkfs.xfs is installed, and raw block images."""
    return Capabilities(
        fs_types=frozenset({"ext4"} | ({"xfs"} if shutil.which("mkfs.xfs") else set())),
        default_fs_type="ext4",
        block=True,
        # an exported layer is a tar, whatever the source volume's file system was
        artifact_fs_types=frozenset({"ext4", "xfs", "dir"}),
        modifiable=tuning.MODIFIABLE,
        enforces_capacity=True,
        stacks=True,
    )


class OverlayLoopBackend:
    name = "overlay-loop"

    def __init__(self, root: Path, *, hold_metadata: bool = False) -> None:
        """``hold_metadata``: the node is overprovisioned, so its disk may fill;
        every ext4 upper allocates its fixed metadata (``images.hold_metadata``)."""
        self.capabilities = capabilities()
        self.layout = Layout(root)
        self.layout.ensure()
        self.held = LayerMounts(self.layout)
        self.rationing = Rationing(self.layout, self.held.writable, self.held.device)
        self.hold = hold_metadata
        self._freezing = threading.Lock()  # a capture's freeze window, or a checkpoint
        self._clones: bool | None = None  # can_clone, once known
        self.spares = SpareImages(self.layout.spares, functools.partial(build_image, hold=hold_metadata))

    @staticmethod
    def new_link() -> str:
        """A short name for ``l/<link>``: deep lowerdir= options stay under one page."""
        return new_link()

    @staticmethod
    def size_for(capacity: int, fs_type: str) -> int:
        return capacity if fs_type == BLOCK else image_size_for(capacity, fs_type)

    # ---- builds -------------------------------------------------------------
    def prepare(self, build: Path, parents: Sequence[Layer], size: int, fs_type: str) -> Built:
        image = build / "image"
        if self.spares.take(fs_type, size, image):
            return Built(image_bytes=size, base_bytes=host.fs_used_bytes(image, fs_type))
        empty = build_image(image, size, fs_type, hold=self.hold)
        return Built(image_bytes=size, base_bytes=empty)

    def prepare_block(self, build: Path, size: int, source: Path | None) -> Built:
        dest = build / "image"
        if source is None and dest.exists():
            pass  # a capture into this build made it: only its size is ours to set
        elif source is None:
            host.create_sparse(dest, size)
        elif not host.reflink(source, dest):
            host.copy_sparse(source, dest)
        if os.path.getsize(dest) < size:
            os.truncate(dest, size)
        return Built(image_bytes=os.path.getsize(dest))

    def capture(
        self, builds: Mapping[str, Path], layers: Sequence[Layer], frozen_hook: Callable[[], None] = _nothing
    ) -> dict[str, Built]:
        """Every file system is frozen at once, the images cloned (a reflink) or their
        allocated extents copied, then all thawed; raw block layers are copied in
        the same window."""
        frozen: list[Path] = []
        cloned: list[Layer] = []
        out: dict[str, Built] = {}
        self._freezing.acquire()
        try:
            for layer in layers:
                if layer.fs_type != BLOCK:
                    mnt = self.layout.mnt(layer.id)
                    frozen.append(mnt)  # before freezing: a timed-out fsfreeze may have frozen it
                    host.freeze(mnt)
            frozen_hook()
            for layer in layers:
                if layer.fs_type == BLOCK:
                    out[layer.id] = self.block_capture(layer, builds[layer.id], self._devices(layer))
                elif host.reflink(self.layout.image(layer.id), builds[layer.id] / "image"):
                    cloned.append(layer)
                else:
                    host.copy_sparse(self.layout.image(layer.id), builds[layer.id] / "image")
        finally:
            for mnt in frozen:
                host.thaw(mnt)
            self._freezing.release()
        for layer in cloned:
            if metadata_held(self.layout.image(layer.id)):
                # the clone shares the upper's blocks: make its held metadata its own again
                unshare_metadata(self.layout.image(layer.id))
        for layer in layers:
            if layer.fs_type != BLOCK:
                data = host.fs_used_bytes(builds[layer.id] / "image", layer.fs_type) - layer.base_bytes
                out[layer.id] = Built(layer.image_bytes, max(0, data), layer.base_bytes)
        return out

    def live_copy_bytes(self, layer: Layer) -> int:
        """Where the state dir's file system clones, nothing; else the image's allocated
        bytes, copied while the volume is frozen. A raw block layer in use is never
        copied (``block_capture`` refuses), so it costs nothing here."""
        if layer.fs_type == BLOCK or self.can_clone():
            return 0
        return host.allocated_bytes(self.layout.image(layer.id))

    def can_clone(self) -> bool:
        """Whether the state dir's file system clones files (reflink): probed once."""
        if self._clones is None:
            self._clones = host.can_reflink(self.layout.root)
        return self._clones

    def squash(self, build: Path, chain: Sequence[Layer]) -> Built:
        root = build / "root"
        (root / "upper").mkdir(parents=True)
        for layer in chain:
            self.held.acquire(layer.id, layer.fs_type, readonly=True)  # a view: never written
        try:
            self._mount_view(chain, root / "upper")
            try:
                (root / "work").mkdir(exist_ok=True)
                tree, entries = host.tree_usage(root / "upper")
                size, inodes = image_size_for_entries(tree, entries + 2)  # from the tree: no compounding
                build_image(build / "image", size, "ext4", populate=root, inodes=inodes)
            finally:
                host.umount(root / "upper")
        finally:
            for layer in chain:
                self.deactivate(layer)
        host.remove_tree(root)
        return Built(image_bytes=size, used_bytes=tree, fs_type="ext4")

    def import_tree(self, build: Path, source: Path) -> Built:
        root = build / "root"
        (root / "work").mkdir(parents=True)
        (root / "upper").mkdir()
        if source.is_dir():
            host.bind_mount(source, root / "upper", readonly=True)
        else:
            populate_from_tar(source, root / "upper")
        try:
            used, entries = host.tree_usage(root / "upper")
            size, inodes = image_size_for_entries(used, entries + 2)
            build_image(build / "image", size, "ext4", populate=root, inodes=inodes)
        finally:
            host.umount(root / "upper")
        host.remove_tree(root)  # unmounts again whatever is still below (a bind of the source)
        return Built(image_bytes=size, used_bytes=used, fs_type="ext4")

    def import_diff(
        self, build: Path, diff: BinaryIO, parents: Sequence[Layer], size_hint: int = 0, entries: int = 0
    ) -> Built:
        """The tar becomes an overlay upper (whiteouts as 0:0 devices, opaque dirs as
        xattrs) in a fresh ext4 image, which needs nothing of the parents. With a
        size, it is written in place into the image, mounted; without one (or when
        that image is too small, e.g. for a tar of many empty directories), into a
        directory that mkfs then copies in. ``entries`` (the tar's, counted before):
        the image gets an inode for each, and room for them."""
        if size_hint and (entries or diff.seekable()):
            start = diff.tell() if diff.seekable() else 0
            if entries:
                size, inodes = image_size_for_entries(size_hint, entries)
            else:
                size, inodes = image_size_for(4 * size_hint + 64 * MiB), 0
            try:
                return self._import_in_place(build, diff, size, inodes, entries)
            except OSError as e:
                if e.errno not in (errno.ENOSPC, errno.EDQUOT) or not diff.seekable():
                    raise
                log.info(
                    "layer tar of %d bytes did not fit its image in place; importing it via a tree", size_hint
                )
                host.remove_tree(build / "mnt")
                (build / "image").unlink(missing_ok=True)
                diff.seek(start)
        root = build / "root"
        (root / "work").mkdir(parents=True)
        (root / "upper").mkdir()
        stats = upperdiff.import_as_upper(diff, root / "upper", max_entries=entries)
        used = host.tree_bytes(root / "upper")
        size, inodes = image_size_for_entries(used, stats.entries + 2)
        build_image(build / "image", size, "ext4", populate=root, inodes=inodes)
        host.remove_tree(root)
        return Built(image_bytes=size, used_bytes=used, fs_type="ext4")

    def _import_in_place(
        self, build: Path, diff: BinaryIO, size: int, inodes: int = 0, entries: int = 0
    ) -> Built:
        """Write the tar straight into a new image's ``upper/`` (one write of the data, not two)."""
        image, mnt = build / "image", build / "mnt"
        build_image(image, size, "ext4", inodes=inodes)
        mnt.mkdir()
        host.mount_image(image, mnt, "ext4", mount_options("ext4", readonly=False), readonly=False)
        try:
            upperdiff.import_as_upper(diff, mnt / "upper", max_entries=entries)
            used = host.tree_bytes(mnt / "upper")
        finally:
            host.umount(mnt)
        mnt.rmdir()
        return Built(image_bytes=size, used_bytes=used, fs_type="ext4")

    def export_diff(self, chain: Sequence[Layer], scratch: Path, out: BinaryIO) -> DiffStats:
        """The upper alone when it is a complete diff; else (a renamed directory)
        the naive diff of two read-only views, the chain with and without it.
        Whatever it holds or mounts is released however it ends."""
        top = chain[0]
        with ExitStack() as held:
            self.held.acquire(top.id, top.fs_type, readonly=True)
            held.callback(self.deactivate, top)
            upper = self.layout.upper(top.id)
            if not upperdiff.needs_naive_diff(upper):
                return upperdiff.export_upper(upper, out)
            for layer in chain[1:]:
                self.held.acquire(layer.id, layer.fs_type, readonly=True)
                held.callback(self.deactivate, layer)
            below, merged = scratch / "below", scratch / "merged"
            below.mkdir()
            merged.mkdir()
            if len(chain) > 1:
                self._mount_view(chain[1:], below)
                held.callback(host.umount, below)
            self._mount_view(chain, merged)
            held.callback(host.umount, merged)
            return treediff.export_naive(below if len(chain) > 1 else None, merged, out)

    def export_diff_over(
        self, base: Sequence[Layer], chain: Sequence[Layer], scratch: Path, out: BinaryIO
    ) -> DiffStats:
        """The naive diff of two read-only views, ``base`` and ``chain``; a file whose
        metadata is equal in both is unchanged when its extents prove it (``same_extents``:
        two captures of one upper share their unchanged blocks), else when its bytes are."""
        with ExitStack() as held:
            for layer in {x.id: x for x in [*base, *chain]}.values():
                self.held.acquire(layer.id, layer.fs_type, readonly=True)
                held.callback(self.deactivate, layer)
            old, new = scratch / "base", scratch / "merged"
            old.mkdir()
            new.mkdir()
            self._mount_view(base, old)
            held.callback(host.umount, old)
            self._mount_view(chain, new)
            held.callback(host.umount, new)
            return treediff.export_naive(old, new, out, same_data=self._same_data(base, chain))

    def _same_data(self, base: Sequence[Layer], chain: Sequence[Layer]) -> treediff.SameData:
        """Whether two files of equal metadata hold the same bytes (``export_diff_over``):
        the same lower file in both views, or one whose blocks the two top images share
        (``shared``), is; else their contents tell."""
        old_upper, new_upper = self.layout.upper(base[0].id), self.layout.upper(chain[0].id)
        old_image, new_image = self.layout.image(base[0].id), self.layout.image(chain[0].id)
        same_lowers = [x.id for x in base[1:]] == [x.id for x in chain[1:]]

        def same(rel: str, old: str, new: str) -> bool:
            a, b = shared.upper_file(old_upper, rel), shared.upper_file(new_upper, rel)
            if a is None and b is None and same_lowers:
                return True  # neither top holds it: both views show the same lower file
            if isinstance(a, str) and isinstance(b, str) and shared.same_blocks(a, b, old_image, new_image):
                return True
            return treediff.same_content(old, new)

        return same

    def install(self, build: Path, layer: Layer) -> None:
        os.rename(build, self.layout.layer_dir(layer.id))

    def expose(self, layer: Layer) -> None:
        link = self.layout.link(layer.link)
        if not link.is_symlink():
            tmp = link.with_name(link.name + ".tmp")
            tmp.unlink(missing_ok=True)
            tmp.symlink_to(f"../layers/{layer.id}/mnt/upper")
            os.rename(tmp, link)

    def remove(self, layer: Layer) -> None:
        self.held.forget(layer.id)
        self.layout.link(layer.link).unlink(missing_ok=True)
        host.remove_tree(self.layout.layer_dir(layer.id))

    # ---- changes in place ---------------------------------------------------
    def commit(self, layer: Layer) -> int:
        image = self.layout.image(layer.id)
        make_clean(image, layer.fs_type)
        if metadata_held(image):  # read-only from now: it needs no held metadata
            release_metadata(image)
        return max(0, host.fs_used_bytes(image, layer.fs_type) - layer.base_bytes)

    def size(self, layer: Layer) -> int:
        return os.path.getsize(self.layout.image(layer.id))

    def resize(self, layer: Layer, size: int) -> None:
        image = self.layout.image(layer.id)
        if size != os.path.getsize(image):
            os.truncate(image, size)
        for device in self._devices(layer):
            host.loop_refresh(device)

    def grow_fs(self, layer: Layer) -> int:
        image = self.layout.image(layer.id)
        mnt = self.layout.mnt(layer.id)
        device = self.held.device(layer.id) if host.is_mount_point(mnt) else None
        if device is None:  # offline: nothing is written but the new groups' metadata
            before = host.fs_used_bytes(image, layer.fs_type)
            if layer.fs_type == "ext4":
                host.e2fsck(image)
                host.resize2fs(image)
                if metadata_held(image):
                    try_hold_metadata(image)  # the new groups' tables
            else:
                self.held.acquire(layer.id, layer.fs_type, readonly=False)
                try:
                    host.grow_fs(layer.fs_type, "", mnt)
                finally:
                    self.held.release(layer.id)
            return max(0, host.fs_used_bytes(image, layer.fs_type) - before)
        host.loop_refresh(device)
        blocks = os.statvfs(mnt).f_blocks
        try:
            host.grow_fs(layer.fs_type, device, mnt)
        except CommandFailed as e:
            if "Permission denied" in e.stderr or "Operation not permitted" in e.stderr:
                raise FailedPrecondition(
                    "growing a mounted ext4 file system needs CAP_SYS_RESOURCE: run the node plugin "
                    "privileged (the Helm chart does), or use fsType xfs, which grows online without it"
                ) from e
            raise
        if layer.fs_type == "ext4" and metadata_held(image):
            try_hold_metadata(image, device)
        # mounted, the superblock on disk lags: estimate the new groups' metadata from
        # how many blocks the file system grew by (256-byte inodes per 16 KiB, as made)
        st = os.statvfs(mnt)
        return (st.f_blocks - blocks) * st.f_frsize // 64 if layer.fs_type == "ext4" else 0

    @staticmethod
    def check_tune(params: Mapping[str, str], fs_type: str) -> None:
        """The parameters and their values: the table in tuning.py."""
        tuning.check(params, fs_type)

    def tune(self, layer: Layer, params: Mapping[str, str]) -> None:
        """Apply the parameters of tuning.py's table (checked first): read-ahead to the
        loop devices, discard and commit interval by a remount of the mounted image,
        reserved blocks by ``tune2fs -m`` on its device or, detached, its image."""
        tuning.check(params, layer.fs_type)
        if "readAheadKiB" in params:
            for device in self._devices(layer):
                host.set_read_ahead(device, int(params["readAheadKiB"]))
        if layer.fs_type == BLOCK:
            return
        mnt = self.layout.mnt(layer.id)
        mounted = host.is_mount_point(mnt)
        opts = []
        if "discard" in params:
            opts.append("discard" if params["discard"] == "true" else "nodiscard")
        if "commitSeconds" in params:
            opts.append(f"commit={params['commitSeconds']}")
        if opts and mounted:
            host.remount(mnt, opts)
        if "reservedPercent" in params:
            target = self.held.device(layer.id) if mounted else self.layout.image(layer.id)
            if target:
                host.tune2fs_reserved(target, int(params["reservedPercent"]))

    # ---- use ----------------------------------------------------------------
    def activate(self, layer: Layer) -> None:
        if self.hold and layer.active and layer.fs_type == "ext4":
            image = self.layout.image(layer.id)
            if not metadata_held(image):  # made before the node was overprovisioned
                try_hold_metadata(image)
        self.held.acquire(layer.id, layer.fs_type, readonly=not layer.active)
        if layer.active and layer.fs_type == "ext4":
            self.rationing.admit(layer.id)

    def deactivate(self, layer: Layer) -> None:
        self.held.release(layer.id)

    def is_active(self, layer: Layer) -> bool:
        return host.is_mount_point(self.layout.mnt(layer.id))

    def settle(self) -> None:
        """A freeze checkpoints the journal: every change it holds goes to its
        place in the image now, while the host disk has room for the blocks that
        are still holes (a directory's new block, say), not later when it may not."""
        for layer_id, fs_type in sorted(self.held.writable().items()):
            if fs_type != "ext4":  # xfs retries a failed metadata write itself, and its
                continue  # freeze would wait for those retries on a full disk
            # never inside a capture's freeze; a layer being mounted or checked is skipped
            with self._freezing, self.held.try_hold(layer_id) as free:
                mnt = self.layout.mnt(layer_id)
                if not free or not host.is_mount_point(mnt):
                    continue
                try:
                    host.freeze(mnt)
                except CommandFailed as e:  # already frozen by a capture, or shut down
                    log.info("could not checkpoint layer %s: %s", layer_id, e)
                    continue
                host.thaw(mnt)

    def ration(self, room: int) -> Ration:
        return self.rationing.apply(room)

    def active_layers(self) -> set[str]:
        """Layers this process holds activated."""
        return self.held.in_use()

    def mounts(self, chain: Sequence[Layer]) -> list[Mount]:
        top, lowers = chain[0], chain[1:]
        if top.active:
            opts = overlay_options([x.link for x in lowers], top.id)
            return [Mount("overlay", "overlay", tuple(opts), str(self.layout.root))]
        if len(chain) == 1:
            return [Mount("bind", str(self.layout.upper(top.id)), ("bind", "ro"))]
        opts = view_options([x.link for x in chain])
        return [Mount("overlay", "overlay", tuple(opts), str(self.layout.root))]

    def mounted_layer(self, entry: host.MountEntry) -> str | None:
        """The active layer a mount-table entry is an overlay of, or None."""
        if entry.fstype != "overlay":
            return None
        for opt in entry.super_options.split(","):
            if opt.startswith("upperdir="):
                parts = opt[len("upperdir=") :].split("/")
                if (
                    len(parts) == 4
                    and parts[0] == "layers"
                    and ID_RE.match(parts[1])
                    and parts[2:]
                    == [
                        "mnt",
                        "upper",
                    ]
                ):
                    return parts[1]
        return None

    def usage(self, layer: Layer) -> int:
        # a string path, as in health: metrics sum this over thousands of layers
        return host.allocated_bytes(f"{self.layout.layers}/{layer.id}/image")

    def usages(self, layer_ids: Sequence[str]) -> dict[str, int]:
        root = self.layout.layers
        return {x: host.allocated_bytes(f"{root}/{x}/image") for x in layer_ids}

    def fs_usage(self, layer: Layer) -> FsUsage | None:
        mnt = self.layout.mnt(layer.id)
        if not host.is_mount_point(mnt):
            return None
        st = os.statvfs(mnt)
        return FsUsage(
            st.f_blocks * st.f_frsize,
            (st.f_blocks - st.f_bfree) * st.f_frsize,
            st.f_bavail * st.f_frsize,
            st.f_files,
            st.f_files - st.f_ffree,
            st.f_favail,
        )

    def health(self, layer: Layer, table: host.Mounts | None = None) -> str:
        if not os.path.exists(f"{self.layout.layers}/{layer.id}/image"):  # a store id: engine-made
            return "its image is missing"
        if layer.active and layer.fs_type != BLOCK and table is not None:
            entry = table.at(self.layout.mnt(layer.id))
            if entry is not None and _read_only(entry):
                return "its file system no longer writes (read-only after an I/O error, or shut down)"
        return ""

    def describe(self, layer: Layer) -> dict[str, str]:
        """Where and how a layer is kept, for operators."""
        return {
            "image": str(self.layout.image(layer.id)),
            "mountpoint": str(self.layout.mnt(layer.id)),
            "link": str(self.layout.link(layer.link)),
        }

    # ---- raw block layers ---------------------------------------------------
    def block_file(self, layer: Layer) -> Path:
        return self.layout.image(layer.id)

    def block_mount(self, layer: Layer, readonly: bool = False) -> Mount:
        """The image on a direct-I/O loop device (one page cache, not two; the kernel
        runs it buffered where the state dir cannot do O_DIRECT)."""
        mode = "ro" if readonly else "rw"
        return Mount(
            "loop", str(self.layout.image(layer.id)), (mode, "direct-io", f"sector-size={BLOCK_SECTOR}")
        )

    def import_block(self, build: Path, size: int, fill: Callable[[int], int]) -> Built:
        dest = build / "image"
        with open(dest, "wb") as f:
            f.truncate(size)
            fill(f.fileno())
            os.fsync(f.fileno())
        return Built(image_bytes=size, used_bytes=host.allocated_bytes(dest), fs_type=BLOCK)

    def block_capture(self, layer: Layer, build: Path, devices: Sequence[str]) -> Built:
        """A detached image does not change, so any copy is exact. An attached one
        is written to while we read; only a reflink (one atomic clone of the file,
        after flushing the devices) is a point-in-time copy, and without one we
        refuse rather than hand out a torn image."""
        image, dest = self.layout.image(layer.id), build / "image"
        for device in devices:
            host.flush_buffers(device)
        if not host.reflink(image, dest):
            if devices:
                raise FailedPrecondition(
                    "an in-use block volume: a consistent copy needs reflink on the state dir's file "
                    "system (xfs or btrfs); unpublish and unstage it first, or move the state dir to "
                    "such a file system"
                )
            host.copy_sparse(image, dest)
        return Built(image_bytes=os.path.getsize(dest), used_bytes=host.allocated_bytes(dest))

    # ---- housekeeping -------------------------------------------------------
    def walk(self) -> list[str]:
        return sorted(p.name for p in self.layout.layers.iterdir() if ID_RE.match(p.name))

    def cleanup(self, known: Mapping[str, Layer], keep_devices: set[str]) -> CleanupReport:
        """Remove layer dirs and links the store does not know, thaw what a crash left
        frozen, unmount layers nobody holds, detach loop devices nobody uses."""
        # strings and os calls, not Paths: a node may hold thousands of layers
        rep = CleanupReport()
        rep.removed += self.spares.cleanup()
        layers_dir, links_dir = str(self.layout.layers), str(self.layout.links)
        on_disk = set(os.listdir(layers_dir))
        for name in sorted(on_disk - known.keys()):
            _settle(host.remove_tree, self.layout.layers / name, rep.removed, rep)
        links = {x.link for x in known.values()}
        present = set(os.listdir(links_dir))
        for name in sorted(present - links):
            os.unlink(f"{links_dir}/{name}")
            rep.removed.append(f"{links_dir}/{name}")
        for layer in known.values():
            if layer.link not in present and layer.id in on_disk:
                self.expose(layer)
        table = host.MountTable.read()
        for m in table.under(self.layout.layers):
            host.thaw(Path(m.target))
        held = self.held.in_use()
        for m in table.under(self.layout.layers):
            parts = os.path.relpath(m.target, self.layout.layers).split("/")
            if len(parts) == 2 and parts[1] == "mnt" and parts[0] not in held:
                _settle(host.umount, m.target, rep.unmounted, rep)
        mounted = host.MountTable.read().sources()
        ours = {host.file_id(f"{layers_dir}/{x}/image") for x in known} - {None}
        for device, backing in host.loop_backing_ids().items():
            if backing in ours and device not in mounted and device not in keep_devices:
                host.loop_detach(device)
                rep.detached.append(device)
        return rep

    def close(self) -> None:
        self.spares.stop()

    def devices(self) -> int:
        """Loop devices backed by files under the state dir: layer images and raw
        block volumes (from sysfs)."""
        return host.count_loops_under(self.layout.root)

    def free_bytes(self) -> int:
        st = os.statvfs(self.layout.root)
        return st.f_bavail * st.f_frsize

    def fs_size(self) -> int:
        st = os.statvfs(self.layout.root)
        return st.f_blocks * st.f_frsize

    # ---- helpers ------------------------------------------------------------
    def _devices(self, layer: Layer) -> list[str]:
        """Loop devices attached to a layer's image (a block layer may have several)."""
        if layer.fs_type != BLOCK:
            mnt = self.layout.mnt(layer.id)
            device = self.held.device(layer.id) if host.is_mount_point(mnt) else None
            return [device] if device else []
        image = str(self.layout.image(layer.id))
        return [d for d, f in host.loop_devices().items() if f == image]

    def _mount_view(self, chain: Sequence[Layer], target: Path) -> None:
        (m,) = self.mounts(chain)
        if m.type == "bind":
            host.bind_mount(m.source, target, readonly=True)
        else:
            host.mount(m.source, target, m.type, ["ro", *m.options], cwd=m.cwd)


def _read_only(entry: host.MountEntry) -> bool:
    """Whether writes to a mount fail: the mount, or its file system ("ro" first in
    its options), or ext4 after an error or a shutdown ("emergency_ro", "shutdown"
    while still called rw)."""
    sb = entry.super_options.split(",")
    return "ro" in entry.options.split(",") or sb[0] == "ro" or "emergency_ro" in sb or "shutdown" in sb


def _settle(action, target, done: list[str], rep: CleanupReport) -> None:
    """One repair; a busy mount or dir is logged and left for the next start
    rather than stopping the driver from serving what is healthy."""
    try:
        action(target)
        done.append(str(target))
    except (CommandFailed, OSError) as e:
        log.error("cleanup could not remove %s: %s", target, e)
        rep.failed.append(str(target))
