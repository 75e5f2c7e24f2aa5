"""The plain-directory backend: each layer a full directory tree, shown by a bind mount.

A reference and test backend, in the spirit of containerd's native snapshotter:
a directory cannot stack, so a layer prepared over a parent starts as a copy of
the parent's tree (which is already complete) and every layer holds its whole
view. Nothing here needs root: the backend only copies, renames and removes
directories; whoever mounts what ``mounts()`` returns needs the privilege.

What it cannot do, it says so rather than pretends:

* no quota: ``size`` is recorded by the store only, ``resize`` and ``grow_fs``
  change nothing and a layer may grow until its file system is full;
* no freeze: ``capture`` copies a tree file by file, so the copy is a
  point-in-time one only when nobody writes to the layer during it, and a
  group's members are copied one after another, not at one instant;
* no raw block layers (``Unsupported``);
* activation is a reference count in this process's memory: after a restart
  nothing is active until the engine activates it again.

Layout under ``root``: ``dirs/<id>/tree`` is a layer's tree; builds are made in
``<build>/tree`` and ``install`` renames ``<build>`` to ``dirs/<id>``.
"""

from __future__ import annotations

import os
import shutil
import tarfile
import threading
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import BinaryIO

from csi_driver import host
from csi_driver.ids import ID_RE
from csi_driver.layerstore import ocidiff
from csi_driver.layerstore.backend import Built, CleanupReport, FsUsage, Mount, Ration, Unsupported
from csi_driver.locks import KeyedLocks
from csi_driver.store import Layer

DIR = "dir"


def _nothing() -> None:
    pass


class PlainDirBackend:
    name = "plain-dir"
    fs_types = frozenset({DIR})

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
                out[layer.id] = Built(layer.image_bytes, host.tree_bytes(dest))
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
        ocidiff.apply_to_tree(diff, dest, max_entries=entries)
        used = host.tree_bytes(dest)
        return Built(image_bytes=used, used_bytes=used, fs_type=DIR)

    def export_diff(self, chain: Sequence[Layer], scratch: Path, out: BinaryIO) -> ocidiff.DiffStats:
        """Every tree is complete: the naive diff of the parent's tree and the top's."""
        below = self.tree(chain[1].id) if len(chain) > 1 else None
        return ocidiff.export_naive(below, self.tree(chain[0].id), out)

    def export_diff_over(
        self, base: Sequence[Layer], chain: Sequence[Layer], scratch: Path, out: BinaryIO
    ) -> ocidiff.DiffStats:
        """The naive diff of two complete trees, contents compared (a capture copies
        a tree: nothing proves a file unchanged but its bytes)."""
        return ocidiff.export_naive(
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
        A full copy, it holds all of its bytes (none are shared with the parent)."""
        with self._locks.hold(layer.id):
            return host.tree_bytes(self.tree(layer.id))

    def size(self, layer: Layer) -> int:
        """A directory has no size of its own: the one the store recorded."""
        return layer.image_bytes

    def resize(self, layer: Layer, size: int) -> None:
        """No quota: a directory has no size to change."""

    def grow_fs(self, layer: Layer) -> int:
        return 0

    def tune(self, layer: Layer, params: Mapping[str, str]) -> None:
        """None of the mutable parameters (read-ahead, discard, commit interval,
        reserved blocks) applies to a directory: all are ignored."""

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
        """The host file system's size and free space, with the layer's own use."""
        if not self.is_active(layer):
            return None
        used, inodes = _tree_usage(self.tree(layer.id))
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

    def free_bytes(self) -> int:
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize

    def fs_size(self) -> int:
        st = os.statvfs(self.root)
        return st.f_blocks * st.f_frsize


def _copy_tree(source: Path, dest: Path) -> None:
    """``dest`` (which must not exist) becomes a copy of the directory ``source``:
    modes, times, symlinks and xattrs (hard links become separate files; shared
    extents where the file system clones on ``copy_file_range``)."""
    shutil.copytree(source, dest, symlinks=True, copy_function=shutil.copy2)


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
    return ocidiff.same_content(old, new)
