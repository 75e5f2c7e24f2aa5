"""Layers from and onto whole trees, for any backend: the naive diff of two trees (a
parent's view and a new one) written as a layer tar, and a layer tar applied onto a
complete tree (a backend that cannot stack).

``export_naive`` compares the parent's merged view with the new one, as moby's
overlay2 does when an upper alone is no complete diff; a backend that keeps plain
trees uses it for every export."""

from __future__ import annotations

import os
import shutil
import stat
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from csi_driver.layerstore.layertar import (
    CHUNK,
    WH_META_PREFIX,
    WH_OPAQUE,
    WH_PREFIX,
    DiffError,
    DiffStats,
    Node,
    TarWriter,
    check_entries,
    check_name,
    join,
    member_path,
    mtime_ns,
    read_node,
    read_stream,
    tar_xattrs,
)

#: whether two regular files of equal metadata hold the same bytes: (rel, old path, new path)
SameData = Callable[[str, str, str], bool]


def _link_groups(root: str) -> dict[str, frozenset[str]]:
    """For each non-directory that shares its inode with another path of the tree: all those paths."""
    by_inode: dict[tuple[int, int], list[str]] = {}
    stack = [""]
    while stack:
        parent = stack.pop()
        with os.scandir(os.path.join(root, parent)) as it:
            for entry in it:
                rel = join(parent, entry.name)
                if entry.is_dir(follow_symlinks=False):
                    stack.append(rel)
                    continue
                st = entry.stat(follow_symlinks=False)
                if st.st_nlink > 1:
                    by_inode.setdefault((st.st_dev, st.st_ino), []).append(rel)
    return {rel: frozenset(paths) for paths in by_inode.values() if len(paths) > 1 for rel in paths}


def _same(a: Node, b: Node) -> bool:
    sa, sb = a.st, b.st
    return (
        sa.st_mode == sb.st_mode
        and sa.st_uid == sb.st_uid
        and sa.st_gid == sb.st_gid
        and sa.st_mtime_ns == sb.st_mtime_ns
        and (stat.S_ISDIR(sa.st_mode) or sa.st_size == sb.st_size)
        and sa.st_rdev == sb.st_rdev
        and a.xattrs == b.xattrs
        and a.target == b.target
    )


class _Dir:
    """A directory of the new merged view, written to the tar at most once."""

    __slots__ = ("rel", "node", "up", "written")

    def __init__(self, rel: str, node: Node, up: _Dir | None, written: bool) -> None:
        self.rel, self.node, self.up, self.written = rel, node, up, written


def export_naive(
    parent: Path | None, merged: Path, out: BinaryIO, *, same_data: SameData | None = None
) -> DiffStats:
    """Write what changed from the merged view ``parent`` (None: nothing) to ``merged`` as a layer tar.

    Regular files whose metadata (type, mode, owner, size, mtime, xattrs,
    hard-link group) is unchanged count as unchanged; their contents are
    compared only with ``same_data`` (``rel``, old path, new path: whether the
    two files hold the same bytes), which an incremental export passes.
    A removed path is one whiteout, a directory included. A path whose type
    changed is written as the new entry, which hides the old one by itself.
    A changed entry's directories are written too (with their metadata in
    ``merged``), so that the importer never has to invent them, and so is the
    root: the root of an upper is the root of its merged view.
    """
    old_root, new_root = (str(parent) if parent is not None else None), str(merged)
    old_groups = _link_groups(old_root) if old_root is not None else {}
    new_groups = _link_groups(new_root)
    w = TarWriter(out)

    def write_dirs(d: _Dir | None) -> None:
        pending = []
        while d is not None and not d.written:
            pending.append(d)
            d = d.up
        for d in reversed(pending):
            w.entry(d.rel, os.path.join(new_root, d.rel), d.node)
            d.written = True

    root = _Dir("", read_node(new_root), None, True)
    w.entry("", new_root, root.node)
    stack = [(root, old_root is not None)]
    while stack:
        d, old_is_dir = stack.pop()
        new_names = set(os.listdir(os.path.join(new_root, d.rel)))
        old_names = set(os.listdir(os.path.join(old_root, d.rel))) if old_is_dir else set()
        subdirs = []
        for name in sorted(new_names | old_names):
            rel = join(d.rel, name)
            check_name(rel, name)
            if name not in new_names:
                write_dirs(d)
                w.whiteout(rel)
                continue
            path = os.path.join(new_root, rel)
            node = read_node(path)
            old = read_node(os.path.join(old_root, rel)) if name in old_names else None
            if stat.S_ISSOCK(node.st.st_mode):
                if old is not None:
                    write_dirs(d)
                    w.whiteout(rel)
                continue
            changed = old is None or not _same(old, node) or old_groups.get(rel) != new_groups.get(rel)
            if not changed and same_data is not None and stat.S_ISREG(node.st.st_mode):
                changed = not same_data(rel, os.path.join(old_root, rel), path)  # type: ignore[arg-type]
            if changed:
                write_dirs(d)
                w.entry(rel, path, node)
            if stat.S_ISDIR(node.st.st_mode):
                old_dir = old is not None and stat.S_ISDIR(old.st.st_mode)
                subdirs.append((_Dir(rel, node, d, changed), old_dir))
        stack.extend(reversed(subdirs))
    return w.close()


def same_content(old: str, new: str) -> bool:
    """Whether two regular files hold the same bytes (read until they differ;
    holes read as zeros, as they export)."""
    fa = os.open(old, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        fb = os.open(new, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            if os.fstat(fa).st_size != os.fstat(fb).st_size:
                return False
            pos = 0
            while True:
                a, b = os.pread(fa, CHUNK, pos), os.pread(fb, CHUNK, pos)
                if a != b:
                    return False
                if not a:
                    return True
                pos += len(a)
        finally:
            os.close(fb)
    finally:
        os.close(fa)


def _inside(tree: Path, rel: str) -> Path:
    """``tree/rel`` when no component of ``rel`` is a symlink (an earlier entry
    must not lead a whiteout or an extraction out of the tree), else DiffError."""
    path = tree
    for part in rel.split("/") if rel else ():
        path = path / part
        if path.is_symlink():
            raise DiffError(f"{rel}: a path below a symlink")
    return path


def _remove_path(path: Path) -> None:
    """A file, a symlink (not what it points to) or a whole directory."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def apply_to_tree(tar: BinaryIO, tree: Path, max_entries: int = 0) -> DiffStats:
    """Apply the OCI layer tar ``tar`` onto the complete tree ``tree``, for a
    backend that cannot stack: a whiteout removes its path, an opaque marker
    empties its directory of what this tar did not write, other entries are
    extracted as they are (owners, modes, xattrs, exact mtimes, symlinks to
    anywhere), each below a checked name whose parents are no symlinks; the
    directories' mtimes are set last, as entries written into them change them.
    Device nodes and sparse members
    are refused; more than ``max_entries`` entries (0: no limit) raise ``TooManyEntries``.
    Not atomic: apply to a copy, and discard it on error."""
    stats = DiffStats()
    written: set[str] = set()
    dir_mtimes: dict[Path, int] = {}
    try:
        with read_stream(tar) as tf:
            while (ti := tf.next()) is not None:
                check_entries(stats.entries + 1, max_entries)
                rel = member_path(ti.name)
                parent, _, base = rel.rpartition("/")
                stats.entries += 1
                folder = _inside(tree, parent)
                if base == WH_OPAQUE or (base.startswith(WH_PREFIX) and not base.startswith(WH_META_PREFIX)):
                    stats.whiteouts += 1
                    if base == WH_OPAQUE:
                        children = folder.iterdir() if folder.is_dir() else ()
                        doomed = [c for c in children if join(parent, c.name) not in written]
                    else:
                        name = base[len(WH_PREFIX) :]
                        if name in ("", ".", ".."):
                            raise DiffError(f"{rel}: a whiteout without a name")
                        doomed = [folder / name] if join(parent, name) not in written else []
                    for path in doomed:
                        _remove_path(path)
                    continue
                if base.startswith(WH_META_PREFIX):
                    continue
                if ti.ischr() or ti.isblk():
                    raise DiffError(f"{rel}: device nodes are refused in a layer")
                if ti.issparse():
                    raise DiffError(f"{rel}: sparse tar members are refused in a layer")
                if rel:
                    dest = folder / base
                    if (dest.is_symlink() or dest.exists()) and not (ti.isdir() and dest.is_dir()):
                        _remove_path(dest)
                    if ti.isreg():
                        stats.bytes += ti.size
                if ti.islnk():  # a hard link to an earlier entry of the tree, reached without symlinks
                    linked = _inside(tree, member_path(ti.linkname))
                    if linked.is_symlink() or not linked.is_file():
                        raise DiffError(f"{rel}: a hard link to {ti.linkname!r}, which is no file here")
                # names, parents and link targets are checked above: ownership, modes and
                # symlinks to anywhere are kept as a layer holds them
                xattrs = tar_xattrs(rel, ti)
                tf.extract(ti, tree, numeric_owner=True, filter="fully_trusted")
                written.add(rel)
                dest = folder / base if rel else tree
                # xattrs after the owner (a chown drops a capability); a hard link's inode has them
                for name, value in xattrs.items() if not ti.islnk() else ():
                    os.setxattr(dest, name, value, follow_symlinks=False)
                if ti.isdir():
                    dir_mtimes[dest] = mtime_ns(ti)
                else:  # tarfile sets a float's mtime (a hard link's too), and none on a symlink
                    os.utime(dest, ns=(mtime_ns(ti), mtime_ns(ti)), follow_symlinks=False)
    except tarfile.TarError as e:
        raise DiffError(f"not a valid layer tar: {e}") from e
    for path, mtime in sorted(dir_mtimes.items(), key=lambda x: -len(x[0].parts)):
        if path.is_dir() and not path.is_symlink():  # not removed by a later entry
            os.utime(path, ns=(mtime, mtime))
    return stats
