"""The plain-directory backend: each layer a full directory tree, shown by a bind mount.

A reference backend for tests and development clusters (``serve --backend plaindir``),
in the spirit of containerd's native snapshotter:
a directory cannot stack, so a layer prepared over a parent starts as a copy of
the parent's tree (which is already complete) and every layer holds its whole
view. Nothing here needs root: the backend only copies, renames and removes
directories; whoever mounts what ``mounts()`` returns needs the privilege (and
copying a tree that holds other users' files or device nodes needs CAP_CHOWN
or CAP_MKNOD: a copy keeps owners, modes, times, xattrs and hard links, or fails).

Accounting (see backend.py): every tree is whole, but a layer's data is the
change over its parent's tree, found by comparing the two (``_change_bytes``),
so the engine's sums along a chain count each byte once, as on a backend that
stacks. ``usage`` is the whole tree: the host really spends it on the copy.

What it cannot do, it says so rather than pretends:

* no quota (``capabilities.enforces_capacity`` is False): ``size`` is recorded by
  the store only, ``resize`` and ``grow_fs`` change nothing and a layer may grow
  until its file system is full;
* no freeze: ``capture`` copies a tree file by file, so the copy is a
  point-in-time one only when nobody writes to the layer during it, and a
  group's members are copied one after another, not at one instant;
* no raw block layers (``Unsupported``) and no mutable parameters;
* activation is a reference count in this process's memory: after a restart
  nothing is active until the engine activates it again.

Layout under ``root``: ``dirs/<id>/tree`` is a layer's tree; builds are made in
``<build>/tree`` and ``install`` renames ``<build>`` to ``dirs/<id>``.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import tarfile
import threading
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import BinaryIO

from csi_driver import host
from csi_driver.errors import InvalidArgument
from csi_driver.ids import ID_RE, new_id
from csi_driver.layerstore import treediff
from csi_driver.layerstore.backend import (
    Built,
    Capabilities,
    CleanupReport,
    FsUsage,
    Mount,
    Ration,
    Unsupported,
)
from csi_driver.layerstore.layertar import DiffStats
from csi_driver.locks import KeyedLocks
from csi_driver.store import Layer

DIR = "dir"
CAPABILITIES = Capabilities(
    fs_types=frozenset({DIR}),
    default_fs_type=DIR,
    block=False,
    # an exported layer is a tar whatever the source volume's file system was
    artifact_fs_types=frozenset({"ext4", "xfs", DIR}),
    modifiable=frozenset(),
    enforces_capacity=False,
    stacks=True,  # a copy reports what it changed over its parent's tree (commit, capture)
)


def _nothing() -> None:
    pass


class PlainDirBackend:
    name = "plain-dir"
    capabilities = CAPABILITIES

    def __init__(self, root: Path) -> None:
        self.root = root
        self.dirs = root / "dirs"
        self.dirs.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._locks = KeyedLocks()  # serialises copies of a layer with commit/remove of it
        self._guard = threading.Lock()
        self._counts: dict[str, int] = {}

    def layer_dir(self, layer_id: str) -> Path:
        if not ID_RE.match(layer_id):
            raise ValueError(f"bad layer id {layer_id!r}")
        return self.dirs / layer_id

    def tree(self, layer_id: str) -> Path:
        return self.layer_dir(layer_id) / "tree"

    def _parent_tree(self, layer: Layer) -> Path | None:
        return self.tree(layer.parent) if layer.parent else None

    @staticmethod
    def new_link() -> str:
        """A layer's record needs a unique link; a tree is found by its id alone."""
        return new_id()

    @staticmethod
    def size_for(capacity: int, fs_type: str) -> int:
        """A directory has no overhead to pad for (and no quota to hold it to)."""
        return capacity

    # ---- builds -------------------------------------------------------------
    def prepare(self, build: Path, parents: Sequence[Layer], size: int, fs_type: str) -> Built:
        if parents:
            with self._locks.hold(parents[0].id):
                _copy_tree(self.tree(parents[0].id), build / "tree")
        else:
            (build / "tree").mkdir(mode=0o755)
        return Built(image_bytes=size)

    def prepare_block(self, build: Path, size: int, source: Path | None) -> Built:
        raise Unsupported("the plain-dir backend keeps no raw block layers")

    def capture(
        self, builds: Mapping[str, Path], layers: Sequence[Layer], frozen_hook: Callable[[], None] = _nothing
    ) -> dict[str, Built]:
        """Copies of the layers' trees, one after another: point-in-time only for
        layers nobody writes to meanwhile (there is no freeze for a directory).
        ``frozen_hook`` runs once every layer is locked, before the first copy."""
        out = {}
        with ExitStack() as stack:
            for layer_id in sorted({x.id for x in layers}):
                stack.enter_context(self._locks.hold(layer_id))
            frozen_hook()
            for layer in layers:
                dest = builds[layer.id] / "tree"
                _copy_tree(self.tree(layer.id), dest)
                out[layer.id] = Built(layer.image_bytes, _change_bytes(dest, self._parent_tree(layer)))
        return out

    @staticmethod
    def live_copy_bytes(layer: Layer) -> int:
        """0: a tree is copied without a freeze, so no writer waits for it."""
        return 0

    def squash(self, build: Path, chain: Sequence[Layer]) -> Built:
        """Every tree is complete, so the merged view is the top's tree."""
        with self._locks.hold(chain[0].id):
            _copy_tree(self.tree(chain[0].id), build / "tree")
        used = host.tree_bytes(build / "tree")
        return Built(image_bytes=used, used_bytes=used, fs_type=DIR)

    def import_tree(self, build: Path, source: Path) -> Built:
        dest = build / "tree"
        if source.is_dir():
            _copy_tree(source, dest)
        else:
            dest.mkdir(mode=0o755)
            with tarfile.open(source) as tar:
                tar.extractall(dest, filter="data")
        used = host.tree_bytes(dest)
        return Built(image_bytes=used, used_bytes=used, fs_type=DIR)

    def import_diff(
        self, build: Path, diff: BinaryIO, parents: Sequence[Layer], size_hint: int = 0, entries: int = 0
    ) -> Built:
        """A copy of the parent's (complete) tree with the diff applied to it."""
        dest = build / "tree"
        if parents:
            with self._locks.hold(parents[0].id):
                _copy_tree(self.tree(parents[0].id), dest)
        else:
            dest.mkdir(mode=0o755)
        treediff.apply_to_tree(diff, dest, max_entries=entries)
        used = _change_bytes(dest, self.tree(parents[0].id) if parents else None)
        return Built(image_bytes=host.tree_bytes(dest), used_bytes=used, fs_type=DIR)

    def export_diff(self, chain: Sequence[Layer], scratch: Path, out: BinaryIO) -> DiffStats:
        """Every tree is complete: the naive diff of the parent's tree and the top's."""
        below = self.tree(chain[1].id) if len(chain) > 1 else None
        return treediff.export_naive(below, self.tree(chain[0].id), out)

    def export_diff_over(
        self, base: Sequence[Layer], chain: Sequence[Layer], scratch: Path, out: BinaryIO
    ) -> DiffStats:
        """The naive diff of two complete trees, contents compared (a capture copies
        a tree: nothing proves a file unchanged but its bytes)."""
        return treediff.export_naive(
            self.tree(base[0].id), self.tree(chain[0].id), out, same_data=_same_content
        )

    def install(self, build: Path, layer: Layer) -> None:
        os.rename(build, self.layer_dir(layer.id))

    def expose(self, layer: Layer) -> None:
        """Nothing to do: a tree is usable as soon as it is in place."""

    def remove(self, layer: Layer) -> None:
        with self._locks.hold(layer.id):
            _remove(self.layer_dir(layer.id))

    # ---- changes in place ---------------------------------------------------
    def commit(self, layer: Layer) -> int:
        """In place: the tree stays where it is and later views bind it read-only.
        Its data is what it changed over its parent's tree (the accounting contract)."""
        with self._locks.hold(layer.id):
            return _change_bytes(self.tree(layer.id), self._parent_tree(layer))

    def size(self, layer: Layer) -> int:
        """A directory has no size of its own: the one the store recorded."""
        return layer.image_bytes

    def resize(self, layer: Layer, size: int) -> None:
        """No quota: a directory has no size to change."""

    def grow_fs(self, layer: Layer) -> int:
        return 0

    @staticmethod
    def check_tune(params: Mapping[str, str], fs_type: str) -> None:
        """A directory has nothing to tune (``capabilities.modifiable`` is empty)."""
        if params:
            raise InvalidArgument(f"mutable parameters {sorted(params)}: a plain directory has none")

    def tune(self, layer: Layer, params: Mapping[str, str]) -> None:
        self.check_tune(params, layer.fs_type)

    # ---- use ----------------------------------------------------------------
    def activate(self, layer: Layer) -> None:
        with self._guard:
            self._counts[layer.id] = self._counts.get(layer.id, 0) + 1

    def deactivate(self, layer: Layer) -> None:
        with self._guard:
            n = self._counts.get(layer.id, 0) - 1
            if n > 0:
                self._counts[layer.id] = n
            else:
                self._counts.pop(layer.id, None)

    def is_active(self, layer: Layer) -> bool:
        with self._guard:
            return self._counts.get(layer.id, 0) > 0

    def active_layers(self) -> set[str]:
        with self._guard:
            return set(self._counts)

    def mounts(self, chain: Sequence[Layer]) -> list[Mount]:
        top = chain[0]
        return [Mount("bind", str(self.tree(top.id)), ("bind",) if top.active else ("bind", "ro"))]

    def mounted_layer(self, entry: host.MountEntry) -> str | None:
        """A bind mount's ``root`` is the path of its source inside the source's
        file system, so a mount of one of our trees ends in ``dirs/<id>/tree``."""
        parts = entry.root.rstrip("/").split("/")
        if len(parts) >= 3 and parts[-1] == "tree" and parts[-3] == "dirs" and ID_RE.match(parts[-2]):
            return parts[-2]
        return None

    def usage(self, layer: Layer) -> int:
        return host.tree_bytes(self.tree(layer.id))

    def usages(self, layer_ids: Sequence[str]) -> dict[str, int]:
        return {x: host.tree_bytes(self.tree(x)) for x in layer_ids}

    def fs_usage(self, layer: Layer) -> FsUsage | None:
        """The host file system's size and free space, with the layer's own use:
        its change over its parent (as ``commit`` counts it) and its tree's inodes."""
        if not self.is_active(layer):
            return None
        _, inodes = _tree_usage(self.tree(layer.id))
        used = _change_bytes(self.tree(layer.id), self._parent_tree(layer))
        st = os.statvfs(self.root)
        return FsUsage(
            st.f_blocks * st.f_frsize, used, st.f_bavail * st.f_frsize, st.f_files, inodes, st.f_favail
        )

    def health(self, layer: Layer, table: host.Mounts | None = None) -> str:
        return "" if self.tree(layer.id).is_dir() else "its tree is missing"

    def describe(self, layer: Layer) -> dict[str, str]:
        return {"tree": str(self.tree(layer.id))}

    # ---- raw block layers ---------------------------------------------------
    def block_file(self, layer: Layer) -> Path:
        raise Unsupported("the plain-dir backend keeps no raw block layers")

    def block_mount(self, layer: Layer, readonly: bool = False) -> Mount:
        raise Unsupported("the plain-dir backend keeps no raw block layers")

    def import_block(self, build: Path, size: int, fill: Callable[[int], int]) -> Built:
        raise Unsupported("the plain-dir backend keeps no raw block layers")

    def block_capture(self, layer: Layer, build: Path, devices: Sequence[str]) -> Built:
        raise Unsupported("the plain-dir backend keeps no raw block layers")

    # ---- housekeeping -------------------------------------------------------
    def walk(self) -> list[str]:
        return sorted(p.name for p in self.dirs.iterdir() if ID_RE.match(p.name))

    def cleanup(self, known: Mapping[str, Layer], keep_devices: set[str]) -> CleanupReport:
        """Remove what the store does not know under ``dirs/``; nothing else
        outlives a process (activations are in memory, there are no devices)."""
        rep = CleanupReport()
        for path in sorted(self.dirs.iterdir()):
            if path.name in known and ID_RE.match(path.name):
                continue
            try:
                _remove(path)
                rep.removed.append(str(path))
            except OSError:
                rep.failed.append(str(path))
        return rep

    def close(self) -> None:
        """Nothing runs in the background."""

    def settle(self) -> None:
        """Directories have no journal of their own to checkpoint."""

    def ration(self, room: int) -> Ration:
        """A directory's writes take the host's space directly: nothing to limit."""
        return Ration(False, room, 0)

    @staticmethod
    def devices() -> int:
        """Trees need no block devices."""
        return 0

    def free_bytes(self) -> int:
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize

    def fs_size(self) -> int:
        st = os.statvfs(self.root)
        return st.f_blocks * st.f_frsize


def _copy_tree(source: Path, dest: Path) -> None:
    """``dest`` (which must not exist) becomes a copy of the directory ``source``
    as a layer holds it: contents, modes, owners, times, xattrs, symlinks, special
    files, and hard links kept as links (a pod's hard links, and an image's, stay
    one file). Owners other than the caller's need CAP_CHOWN and device nodes
    CAP_MKNOD; without them the copy fails rather than keep a different tree."""
    links: dict[tuple[int, int], str] = {}
    made: list[tuple[str, os.stat_result]] = []  # directories, parents first
    stack = [(str(source), str(dest))]
    while stack:
        src, dst = stack.pop()
        st = os.lstat(src)
        os.mkdir(dst, 0o700)  # its mode last: a read-only one must take its entries first
        _copy_meta(src, dst, st)
        made.append((dst, st))
        with os.scandir(src) as entries:
            for entry in entries:
                s, d = entry.path, os.path.join(dst, entry.name)
                est = entry.stat(follow_symlinks=False)
                if stat.S_ISDIR(est.st_mode):
                    stack.append((s, d))
                    continue
                if est.st_nlink > 1 and (first := links.setdefault((est.st_dev, est.st_ino), d)) != d:
                    os.link(first, d, follow_symlinks=False)
                    continue
                if stat.S_ISREG(est.st_mode):
                    shutil.copyfile(s, d)
                elif stat.S_ISLNK(est.st_mode):
                    os.symlink(os.readlink(s), d)
                else:  # a fifo, a socket or a device node
                    os.mknod(d, est.st_mode, est.st_rdev)
                _copy_meta(s, d, est)
                _set_mode_and_times(d, est)
    for dst, st in reversed(made):  # children first: setting a mode or time changes no parent
        _set_mode_and_times(dst, st)


def _copy_meta(src: str, dst: str, st: os.stat_result) -> None:
    """Owner, then xattrs (a chown drops security.capability). SELinux labels are
    the destination's own, as in a layer tar (layertar.SKIPPED_XATTRS)."""
    os.lchown(dst, st.st_uid, st.st_gid)
    try:
        names = os.listxattr(src, follow_symlinks=False)
    except OSError as e:
        if e.errno != errno.EOPNOTSUPP:
            raise
        return
    for name in names:
        if name == "security.selinux":
            continue
        try:
            value = os.getxattr(src, name, follow_symlinks=False)
        except OSError as e:
            if e.errno == errno.ENODATA:  # removed meanwhile
                continue
            raise
        os.setxattr(dst, name, value, follow_symlinks=False)


def _set_mode_and_times(dst: str, st: os.stat_result) -> None:
    """Mode after the owner (a chown drops setuid bits), times last of all."""
    if not stat.S_ISLNK(st.st_mode):
        os.chmod(dst, stat.S_IMODE(st.st_mode))
    os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


def _change_bytes(tree: Path, parent: Path | None) -> int:
    """The bytes of ``tree`` (as ``host.tree_bytes`` counts them) that ``parent``,
    the tree it was copied from, does not hold: every entry the parent lacks or
    holds with other metadata (type, mode, owner, size, mtime, link target). As
    rsync's quick check, metadata and not contents decide: a copy keeps them, a
    write changes the mtime. An xattr-only change costs no data and is not counted."""
    if parent is None:
        return host.tree_bytes(tree)
    total, seen = 0, set()
    for dirpath, dirnames, filenames in os.walk(tree):
        below = os.path.join(parent, os.path.relpath(dirpath, tree))
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
                if (st.st_dev, st.st_ino) in seen:
                    continue
                seen.add((st.st_dev, st.st_ino))
            try:
                old = os.lstat(os.path.join(below, name))
            except (FileNotFoundError, NotADirectoryError):
                old = None
            if old is None or not _same_entry(st, old, path, os.path.join(below, name)):
                total += st.st_blocks * 512
    return total


def _same_entry(st: os.stat_result, old: os.stat_result, path: str, old_path: str) -> bool:
    return (
        st.st_mode == old.st_mode
        and (st.st_uid, st.st_gid) == (old.st_uid, old.st_gid)
        and st.st_mtime_ns == old.st_mtime_ns
        and (stat.S_ISDIR(st.st_mode) or st.st_size == old.st_size)
        and st.st_rdev == old.st_rdev
        and (not stat.S_ISLNK(st.st_mode) or os.readlink(path) == os.readlink(old_path))
    )


def _tree_usage(root: Path) -> tuple[int, int]:
    """Bytes (as ``host.tree_bytes``) and inodes used under ``root``."""
    if not root.is_dir():
        return 0, 0
    return host.tree_bytes(root), 1 + sum(len(dirs) + len(files) for _, dirs, files in os.walk(root))


def _remove(path: Path) -> None:
    """Remove a tree or a stray file. A directory its owner made read-only (as a
    pod may) is made writable and removal retried, so no privilege is needed."""
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        path.unlink()
        return
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        return
    except PermissionError:
        path.chmod(0o700)
        for dirpath, dirs, _ in os.walk(path):
            for d in dirs:
                if not os.path.islink(full := os.path.join(dirpath, d)):
                    os.chmod(full, 0o700)
        shutil.rmtree(path)


def _same_content(rel: str, old: str, new: str) -> bool:
    return treediff.same_content(old, new)
