"""Layers to and from OCI image-layer tars (application/vnd.oci.image.layer.v1.tar, uncompressed).

An overlay upper directory is nearly an OCI layer already: it marks a deletion
with a char device 0:0 where the tar has a ``.wh.<name>`` entry, and a
directory that hides its lower namesake with ``trusted.overlay.opaque=y`` where
the tar has ``<dir>/.wh..wh..opq``. ``export_upper`` translates one into the
other. The upper is a complete diff only while no directory was renamed,
though: under ``redirect_dir=on`` a renamed directory is an upper directory
that points (``trusted.overlay.redirect``) at lower contents the upper does
not hold. ``export_naive`` then compares the parent's merged view with the new
one instead, as moby's overlay2 does; ``export_layer`` picks between the two.
``import_as_upper`` goes the other way: a tar becomes a directory that works as
an overlay upper over the layer's parent.

What a layer cannot hold: device nodes (refused with ``DiffError``), names
starting with ``.wh.`` (refused), sockets (written as a whiteout, so that an
older entry at that path does not show through), overlay's own
``trusted.overlay.*`` xattrs (dropped on export, refused on import) and
``security.selinux`` (the host's policy labels files, not the layer).
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import stat
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, NamedTuple

WH_PREFIX = ".wh."
WH_META_PREFIX = ".wh..wh."
WH_OPAQUE = ".wh..wh..opq"
OVERLAY_XATTRS = "trusted.overlay."
OPAQUE_XATTR = "trusted.overlay.opaque"
_INCOMPLETE_XATTRS = ("trusted.overlay.redirect", "trusted.overlay.metacopy")
_SKIPPED_XATTRS = frozenset({"security.selinux"})
PAX_XATTR = "SCHILY.xattr."

_CHUNK = 1 << 20
_KICK = 8 << 20  # bytes of a file written between two starts of its writeback
_BLOCK = 4096
_ZEROS = bytes(_CHUNK)
_ZERO_BLOCK = bytes(_BLOCK)
_NS = 10**9
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_DECIMAL = re.compile(r"(-?)(\d+)(?:\.(\d*))?")


#: whether two regular files of equal metadata hold the same bytes: (rel, old path, new path)
SameData = Callable[[str, str, str], bool]


class DiffError(Exception):
    """A tree or a tar that cannot become a layer safely."""


class TooManyEntries(DiffError):
    """A tar with more entries than a layer may hold (each is an inode of its image)."""


class NeedsNaiveDiff(DiffError):
    """The upper alone is an incomplete diff (a renamed directory, a metacopy file)."""


@dataclass
class DiffStats:
    entries: int = 0  # tar entries, whiteouts and the root included
    bytes: int = 0  # regular-file payload
    whiteouts: int = 0  # .wh.<name> and opaque markers


class _Node(NamedTuple):
    """What one path is: lstat, the xattrs a layer keeps, overlay's own xattrs, a symlink's target."""

    st: os.stat_result
    xattrs: dict[str, bytes]
    overlay: dict[str, bytes]
    target: str | None


def _node(path: str) -> _Node:
    st = os.lstat(path)
    keep: dict[str, bytes] = {}
    overlay: dict[str, bytes] = {}
    try:
        names = sorted(os.listxattr(path, follow_symlinks=False))
    except OSError as e:
        if e.errno != errno.EOPNOTSUPP:
            raise
        names = []
    for name in names:
        if name in _SKIPPED_XATTRS:
            continue
        try:
            value = os.getxattr(path, name, follow_symlinks=False)
        except OSError as e:
            if e.errno == errno.ENODATA:
                continue
            raise
        (overlay if name.startswith(OVERLAY_XATTRS) else keep)[name] = value
    target = os.readlink(path) if stat.S_ISLNK(st.st_mode) else None
    return _Node(st, keep, overlay, target)


def _join(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


def _listdir(path: str) -> list[str]:
    return sorted(os.listdir(path))


def _check_name(rel: str, name: str) -> None:
    if name.startswith(WH_PREFIX):
        raise DiffError(f"{rel}: names starting with {WH_PREFIX} are reserved for whiteouts in a layer")


def _fmt_ns(ns: int) -> str:
    sec, frac = divmod(abs(ns), _NS)
    return f"{'-' if ns < 0 else ''}{sec}.{frac:09d}"


def _mtime_ns(ti: tarfile.TarInfo) -> int:
    """The exact mtime: tarfile parses the PAX value into a float, which loses the nanoseconds."""
    m = _DECIMAL.fullmatch(ti.pax_headers.get("mtime", ""))
    if m is None:
        return round(ti.mtime * _NS)
    sign, sec, frac = m.groups()
    ns = int(sec) * _NS + int((frac or "").ljust(9, "0")[:9])
    return -ns if sign else ns


def _seek(fd: int, pos: int, whence: int, size: int) -> int:
    try:
        return min(os.lseek(fd, pos, whence), size)
    except OSError as e:
        if e.errno == errno.ENXIO:  # no data after pos
            return size
        raise


class _TarOut:
    """Writes PAX tar entries to ``out``; never closes it."""

    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self._links: dict[tuple[int, int], str] = {}
        self.stats = DiffStats()

    def _write(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            view = view[self._out.write(view) :]

    def _put(self, ti: tarfile.TarInfo) -> None:
        self._write(ti.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))
        self.stats.entries += 1

    def _marker(self, name: str) -> None:
        ti = tarfile.TarInfo(name)
        ti.mode = 0o600
        self._put(ti)
        self.stats.whiteouts += 1

    def whiteout(self, rel: str) -> None:
        parent, _, base = rel.rpartition("/")
        self._marker(_join(parent, WH_PREFIX + base))

    def opaque(self, rel: str) -> None:
        self._marker(_join(rel, WH_OPAQUE))

    def entry(self, rel: str, path: str, node: _Node) -> None:
        st = node.st
        fmt = stat.S_IFMT(st.st_mode)
        name = (rel + "/" if rel else "./") if fmt == stat.S_IFDIR else rel
        ti = tarfile.TarInfo(name)
        ti.mode = stat.S_IMODE(st.st_mode)
        ti.uid, ti.gid = st.st_uid, st.st_gid
        ti.mtime = st.st_mtime_ns // _NS
        if st.st_mtime_ns % _NS:
            ti.pax_headers["mtime"] = _fmt_ns(st.st_mtime_ns)
        if fmt != stat.S_IFDIR and st.st_nlink > 1:
            first = self._links.setdefault((st.st_dev, st.st_ino), rel)
            if first != rel:
                ti.type, ti.linkname = tarfile.LNKTYPE, first
                self._put(ti)
                return
        for key, value in node.xattrs.items():
            ti.pax_headers[PAX_XATTR + key] = value.decode("utf-8", "surrogateescape")
        if fmt == stat.S_IFREG:
            ti.size = st.st_size
        elif fmt == stat.S_IFDIR:
            ti.type = tarfile.DIRTYPE
        elif fmt == stat.S_IFLNK:
            ti.type, ti.linkname = tarfile.SYMTYPE, node.target
        elif fmt == stat.S_IFIFO:
            ti.type = tarfile.FIFOTYPE
        else:
            raise DiffError(f"{rel}: a device node cannot go into a layer")
        self._put(ti)
        if fmt == stat.S_IFREG:
            self._data(rel, path, st.st_size)
            self.stats.bytes += st.st_size

    def _data(self, rel: str, path: str, size: int) -> None:
        """Copy ``size`` bytes; holes are written as zeros without being read."""
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            pos = 0
            while pos < size:
                data = _seek(fd, pos, os.SEEK_DATA, size)
                while pos < data:
                    n = min(_CHUNK, data - pos)
                    self._write(memoryview(_ZEROS)[:n])
                    pos += n
                hole = _seek(fd, pos, os.SEEK_HOLE, size) if pos < size else size
                while pos < hole:
                    buf = os.pread(fd, min(_CHUNK, hole - pos), pos)
                    if not buf:
                        raise DiffError(f"{rel}: the file shrank while it was being exported")
                    self._write(buf)
                    pos += len(buf)
        finally:
            os.close(fd)
        self._write(bytes(-size % tarfile.BLOCKSIZE))

    def close(self) -> DiffStats:
        self._write(bytes(2 * tarfile.BLOCKSIZE))
        return self.stats


def needs_naive_diff(upper: Path) -> bool:
    """Whether ``upper`` holds a redirect or metacopy xattr, i.e. is not a complete diff by itself."""
    stack = [str(upper)]
    while stack:
        path = stack.pop()
        try:
            names = os.listxattr(path, follow_symlinks=False)
        except OSError as e:
            if e.errno != errno.EOPNOTSUPP:
                raise
            names = []
        if any(name in _INCOMPLETE_XATTRS for name in names):
            return True
        if stat.S_ISDIR(os.lstat(path).st_mode):
            stack.extend(os.path.join(path, name) for name in os.listdir(path))
    return False


def export_upper(upper: Path, out: BinaryIO) -> DiffStats:
    """Write the overlay upper directory ``upper`` to ``out`` as an OCI layer tar.

    The fast path: only the upper is read. The root entry ``./`` is always
    written (an upper's root directory is its merged root). Raises ``NeedsNaiveDiff`` on meeting a
    redirect or metacopy xattr, with part of a tar already written to ``out``;
    ``export_layer`` checks first.
    """
    w = _TarOut(out)
    root = str(upper)
    node = _node(root)
    w.entry("", root, node)
    if node.overlay.get(OPAQUE_XATTR) == b"y":
        w.opaque("")
    stack = [""]
    while stack:
        parent = stack.pop()
        subdirs = []
        for name in _listdir(_join(root, parent)):
            rel = _join(parent, name)
            path = os.path.join(root, rel)
            node = _node(path)
            mode = node.st.st_mode
            if (stat.S_ISCHR(mode) and node.st.st_rdev == 0) or (
                stat.S_ISREG(mode) and node.st.st_size == 0 and "trusted.overlay.whiteout" in node.overlay
            ):
                w.whiteout(rel)
                continue
            _check_name(rel, name)
            incomplete = [x for x in _INCOMPLETE_XATTRS if x in node.overlay]
            if incomplete:
                raise NeedsNaiveDiff(f"{rel}: has {incomplete[0]}; the upper alone is an incomplete diff")
            if stat.S_ISSOCK(mode):
                w.whiteout(rel)
                continue
            w.entry(rel, path, node)
            if stat.S_ISDIR(mode):
                if node.overlay.get(OPAQUE_XATTR) == b"y":
                    w.opaque(rel)
                subdirs.append(rel)
        stack.extend(reversed(subdirs))
    return w.close()


def _link_groups(root: str) -> dict[str, frozenset[str]]:
    """For each non-directory that shares its inode with another path of the tree: all those paths."""
    by_inode: dict[tuple[int, int], list[str]] = {}
    stack = [""]
    while stack:
        parent = stack.pop()
        with os.scandir(os.path.join(root, parent)) as it:
            for entry in it:
                rel = _join(parent, entry.name)
                if entry.is_dir(follow_symlinks=False):
                    stack.append(rel)
                    continue
                st = entry.stat(follow_symlinks=False)
                if st.st_nlink > 1:
                    by_inode.setdefault((st.st_dev, st.st_ino), []).append(rel)
    return {rel: frozenset(paths) for paths in by_inode.values() if len(paths) > 1 for rel in paths}


def _same(a: _Node, b: _Node) -> bool:
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

    def __init__(self, rel: str, node: _Node, up: _Dir | None, written: bool) -> None:
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
    w = _TarOut(out)

    def write_dirs(d: _Dir | None) -> None:
        pending = []
        while d is not None and not d.written:
            pending.append(d)
            d = d.up
        for d in reversed(pending):
            w.entry(d.rel, os.path.join(new_root, d.rel), d.node)
            d.written = True

    root = _Dir("", _node(new_root), None, True)
    w.entry("", new_root, root.node)
    stack = [(root, old_root is not None)]
    while stack:
        d, old_is_dir = stack.pop()
        new_names = set(os.listdir(os.path.join(new_root, d.rel)))
        old_names = set(os.listdir(os.path.join(old_root, d.rel))) if old_is_dir else set()
        subdirs = []
        for name in sorted(new_names | old_names):
            rel = _join(d.rel, name)
            _check_name(rel, name)
            if name not in new_names:
                write_dirs(d)
                w.whiteout(rel)
                continue
            path = os.path.join(new_root, rel)
            node = _node(path)
            old = _node(os.path.join(old_root, rel)) if name in old_names else None
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
                a, b = os.pread(fa, _CHUNK, pos), os.pread(fb, _CHUNK, pos)
                if a != b:
                    return False
                if not a:
                    return True
                pos += len(a)
        finally:
            os.close(fb)
    finally:
        os.close(fa)


def export_layer(upper: Path, out: BinaryIO, *, parent: Path | None, merged: Path | None) -> DiffStats:
    """Write the layer whose upper is ``upper`` as an OCI layer tar.

    Uses the upper alone when it is a complete diff, else the naive diff of the
    merged views ``parent`` (the layers below) and ``merged`` (those plus this
    one; a read-only overlay view is enough). Raises ``NeedsNaiveDiff`` when the
    naive diff is needed and either view is missing: an upper with a redirect
    always has a parent.
    """
    if not needs_naive_diff(upper):
        return export_upper(upper, out)
    if parent is None or merged is None:
        raise NeedsNaiveDiff(f"{upper} has a renamed directory or a metacopy file: needs the merged views")
    return export_naive(parent, merged, out)


def _clean(name: str) -> str:
    """A tar member name as a path relative to the layer root ("" is the root), or DiffError."""
    if "\x00" in name:
        raise DiffError(f"{name!r}: a name with a NUL byte")
    if name.startswith("/"):
        raise DiffError(f"{name!r}: absolute names are refused")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise DiffError(f"{name!r}: names with a '..' component are refused")
    if any(p.startswith(WH_PREFIX) for p in parts[:-1]):
        raise DiffError(f"{name!r}: a directory name starting with {WH_PREFIX}")
    return "/".join(parts)


def _lstat_at(dir_fd: int, name: str) -> os.stat_result | None:
    try:
        return os.lstat(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return None


def _is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


def _write_sparse(fd: int, src: BinaryIO, size: int, rel: str) -> None:
    """Write ``size`` bytes of ``src`` to the empty file ``fd``; all-zero 4 KiB blocks become holes.
    Every ``_KICK`` bytes, what was written is handed to writeback and leaves the page
    cache: the disk writes while the tar still arrives, not all at the end (a layer
    smaller than the dirty limit would otherwise wait in memory for the final sync)."""
    pos = kicked = 0
    while pos < size:
        if pos - kicked >= _KICK:
            os.posix_fadvise(fd, kicked, pos - kicked, os.POSIX_FADV_DONTNEED)  # starts writeback
            kicked = pos
        chunk = src.read(min(_CHUNK, size - pos))
        if not chunk:
            raise DiffError(f"{rel}: the tar ends inside the file")
        n = len(chunk)
        tail = n % _BLOCK
        if chunk.find(_ZERO_BLOCK) < 0 and not (tail and chunk.count(0, n - tail) == tail):
            _pwrite_all(fd, memoryview(chunk), pos)  # no zero block to skip: one write, no scan
        elif chunk != (_ZEROS if n == _CHUNK else bytes(n)):
            view, start = memoryview(chunk), None
            for off in range(0, n + _BLOCK, _BLOCK):
                zero = off >= n or chunk.count(0, off, off + _BLOCK) == min(_BLOCK, n - off)
                if not zero and start is None:
                    start = off
                elif zero and start is not None:
                    _pwrite_all(fd, view[start : min(off, n)], pos + start)
                    start = None
        pos += n
    os.ftruncate(fd, size)


def _tar_xattrs(rel: str, ti: tarfile.TarInfo) -> dict[str, bytes]:
    xattrs = {}
    for key, value in ti.pax_headers.items():
        if not key.startswith(PAX_XATTR):
            continue
        name = key[len(PAX_XATTR) :]
        if name.startswith(OVERLAY_XATTRS):
            raise DiffError(f"{rel or '.'}: xattr {name} belongs to overlayfs and is refused in a layer")
        if name in _SKIPPED_XATTRS:
            continue  # the host's policy labels files, never a layer (as on export)
        xattrs[name] = value.encode("utf-8", "surrogateescape")
    return xattrs


class _Importer:
    """Applies tar members under one directory, never following a symlink it meets."""

    def __init__(self, upper: Path) -> None:
        self.upper = str(upper)
        self.root = os.open(upper, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.stats = DiffStats()
        self.files: set[str] = set()  # non-directories of this tar: the valid hard-link targets
        self.dir_mtimes: dict[str, int] = {}  # set last: creating children changes them
        self._cached: tuple[str, int] | None = None  # the last parent directory opened

    def close(self) -> None:
        if self._cached is not None:
            os.close(self._cached[1])
            self._cached = None
        os.close(self.root)

    def _open_dir(self, rel: str, create: bool) -> int:
        """A new fd of the directory ``rel``, made (0755, root) where missing if ``create``."""
        fd = os.dup(self.root)
        parts = rel.split("/") if rel else []
        try:
            for i, part in enumerate(parts):
                try:
                    next_fd = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise
                    os.mkdir(part, 0o755, dir_fd=fd)
                    next_fd = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except OSError as e:
                    if e.errno in (errno.ELOOP, errno.ENOTDIR):
                        where = "/".join(parts[: i + 1])
                        raise DiffError(f"{where} is not a directory but entries go below it") from e
                    raise
                os.close(fd)
                fd = next_fd
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _dir(self, rel: str) -> int:
        """The fd of directory ``rel`` (owned by the importer)."""
        if not rel:
            return self.root
        if self._cached is None or self._cached[0] != rel:
            fd = self._open_dir(rel, create=True)
            if self._cached is not None:
                os.close(self._cached[1])
            self._cached = (rel, fd)
        return self._cached[1]

    def add(self, ti: tarfile.TarInfo, tf: tarfile.TarFile) -> None:
        rel = _clean(ti.name)
        parent, _, base = rel.rpartition("/")
        self.stats.entries += 1
        if base == WH_OPAQUE:
            os.setxattr(self._dir(parent), OPAQUE_XATTR, b"y")
            self.stats.whiteouts += 1
            return
        if base.startswith(WH_META_PREFIX):
            return  # aufs bookkeeping (.wh..wh.plnk and the like), not part of the tree
        if base.startswith(WH_PREFIX):
            self._whiteout(parent, base[len(WH_PREFIX) :], rel)
            return
        if ti.ischr() or ti.isblk():
            raise DiffError(f"{rel}: device nodes are refused in a layer")
        if ti.issparse():  # its declared size is not bounded by the tar's: refused
            raise DiffError(f"{rel}: sparse tar members are refused in a layer")
        xattrs = _tar_xattrs(rel, ti)
        if not rel:
            if not ti.isdir():
                raise DiffError("the root entry is not a directory")
            self._meta_fd(self.root, ti, xattrs)
            self.dir_mtimes[""] = _mtime_ns(ti)
            return
        fd = self._dir(parent)
        old = _lstat_at(fd, base)
        if old is not None and not (ti.isdir() and stat.S_ISDIR(old.st_mode)):
            if stat.S_ISDIR(old.st_mode):
                raise DiffError(f"{rel}: a non-directory replaces a directory of the same layer")
            os.unlink(base, dir_fd=fd)  # an earlier entry or whiteout of this tar: the last one wins
            self.files.discard(rel)
        if ti.isdir():
            self._mkdir(fd, base, rel, ti, xattrs, over_whiteout=old is not None and _is_whiteout(old))
        elif ti.islnk():
            self._link(fd, base, rel, ti)
        elif ti.isreg():
            self._file(fd, base, rel, ti, xattrs, tf)
        elif ti.issym():
            if "\x00" in ti.linkname:
                raise DiffError(f"{rel}: a symlink target with a NUL byte")
            os.symlink(ti.linkname, base, dir_fd=fd)
            self._meta_at(fd, base, rel, ti, xattrs, symlink=True)
        elif ti.isfifo():
            os.mkfifo(base, 0o600, dir_fd=fd)
            self._meta_at(fd, base, rel, ti, xattrs, symlink=False)
        else:
            raise DiffError(f"{rel}: unsupported tar entry type {ti.type!r}")
        if not ti.isdir():
            self.files.add(rel)

    def _whiteout(self, parent: str, name: str, rel: str) -> None:
        if name in ("", ".", ".."):
            raise DiffError(f"{rel}: a whiteout without a name")
        fd = self._dir(parent)
        old = _lstat_at(fd, name)
        if old is None:
            os.mknod(name, stat.S_IFCHR, os.makedev(0, 0), dir_fd=fd)
        elif stat.S_ISDIR(old.st_mode):
            # The layer's own directory stays, but hides its lower namesake: the whiteout applies below.
            self._set_opaque(fd, name)
        self.stats.whiteouts += 1

    def _set_opaque(self, fd: int, name: str) -> None:
        dfd = os.open(name, _DIR_FLAGS, dir_fd=fd)
        try:
            os.setxattr(dfd, OPAQUE_XATTR, b"y")
        finally:
            os.close(dfd)

    def _mkdir(
        self, fd: int, base: str, rel: str, ti: tarfile.TarInfo, xattrs: dict[str, bytes], over_whiteout: bool
    ) -> None:
        if _lstat_at(fd, base) is None:
            os.mkdir(base, 0o700, dir_fd=fd)
        dfd = os.open(base, _DIR_FLAGS, dir_fd=fd)
        try:
            if over_whiteout:
                os.setxattr(dfd, OPAQUE_XATTR, b"y")
            self._meta_fd(dfd, ti, xattrs)
        finally:
            os.close(dfd)
        self.dir_mtimes[rel] = _mtime_ns(ti)

    def _link(self, fd: int, base: str, rel: str, ti: tarfile.TarInfo) -> None:
        target = _clean(ti.linkname)
        if target not in self.files:
            raise DiffError(f"{rel}: hard link to {ti.linkname!r}, which is no earlier file of this layer")
        target_parent, _, target_base = target.rpartition("/")
        tfd = self._open_dir(target_parent, create=False)
        try:
            os.link(target_base, base, src_dir_fd=tfd, dst_dir_fd=fd, follow_symlinks=False)
        finally:
            os.close(tfd)

    def _file(
        self,
        fd: int,
        base: str,
        rel: str,
        ti: tarfile.TarInfo,
        xattrs: dict[str, bytes],
        tf: tarfile.TarFile,
    ) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        ffd = os.open(base, flags, 0o600, dir_fd=fd)
        try:
            src = tf.extractfile(ti)
            assert src is not None
            _write_sparse(ffd, src, ti.size, rel)
            self.stats.bytes += ti.size
            self._meta_fd(ffd, ti, xattrs)  # after the data: writing clears setuid bits and capabilities
            ns = _mtime_ns(ti)
            os.utime(ffd, ns=(ns, ns))
        finally:
            os.close(ffd)

    @staticmethod
    def _meta_fd(fd: int, ti: tarfile.TarInfo, xattrs: dict[str, bytes]) -> None:
        os.fchown(fd, ti.uid, ti.gid)  # first: chown clears setuid bits and capabilities
        for name, value in xattrs.items():
            os.setxattr(fd, name, value)
        os.fchmod(fd, ti.mode & 0o7777)

    def _meta_at(
        self, fd: int, base: str, rel: str, ti: tarfile.TarInfo, xattrs: dict[str, bytes], symlink: bool
    ) -> None:
        os.chown(base, ti.uid, ti.gid, dir_fd=fd, follow_symlinks=False)
        for name, value in xattrs.items():
            # By path: the parents are directories this importer made, checked not to be symlinks.
            os.setxattr(os.path.join(self.upper, rel), name, value, follow_symlinks=False)
        if not symlink:
            os.chmod(base, ti.mode & 0o7777, dir_fd=fd)  # a FIFO just made here
        ns = _mtime_ns(ti)
        os.utime(base, ns=(ns, ns), dir_fd=fd, follow_symlinks=False)

    def finish(self) -> None:
        for rel, ns in self.dir_mtimes.items():
            if not rel:
                os.utime(self.root, ns=(ns, ns))
                continue
            parent, _, base = rel.rpartition("/")
            os.utime(base, ns=(ns, ns), dir_fd=self._dir(parent), follow_symlinks=False)


def import_as_upper(tar: BinaryIO, upper: Path, max_entries: int = 0) -> DiffStats:
    """Apply the OCI layer tar ``tar`` to the empty directory ``upper``, making it an overlay upper.

    ``.wh.<name>`` becomes a whiteout (char device 0:0), ``.wh..wh..opq`` the
    opaque xattr of its directory. Member names are untrusted: absolute names,
    ``..``, entries below a symlink, hard links to anything but an earlier file
    of the same tar, device nodes and ``trusted.overlay.*`` xattrs raise
    ``DiffError``; nothing is written outside ``upper``. Directories a member
    needs but the tar does not list are made 0755, owned by root.

    Not atomic: on any error ``upper`` holds part of the layer. Build into a
    scratch directory, rename it into place on success, discard it on error.
    ``tar`` is read as a stream (a pipe will do); it must be uncompressed.
    ``max_entries`` (0: no limit): more entries raise ``TooManyEntries``.
    """
    with os.scandir(upper) as it:
        if next(it, None) is not None:
            raise ValueError(f"{upper} is not empty")
    imp = _Importer(upper)
    try:
        try:
            with tarfile.open(
                fileobj=tar, mode="r|", bufsize=_CHUNK, encoding="utf-8", errors="surrogateescape"
            ) as tf:
                while (ti := tf.next()) is not None:
                    tf.members.clear()  # a stream TarFile keeps every header otherwise
                    _limit(imp.stats.entries + 1, max_entries)
                    imp.add(ti, tf)
        except tarfile.TarError as e:
            raise DiffError(f"not a valid layer tar: {e}") from e
        imp.finish()
    finally:
        imp.close()
    return imp.stats


def _limit(entries: int, max_entries: int) -> None:
    if max_entries and entries > max_entries:
        raise TooManyEntries(f"holds more than {max_entries} entries")


def count_tar(tar: BinaryIO, max_entries: int) -> DiffStats:
    """A first, read-only pass over a layer tar: its entries and regular-file bytes.

    Writes nothing; raises ``TooManyEntries`` as soon as the tar holds more than
    ``max_entries`` entries, ``DiffError`` when it is no valid tar, so that an
    import can be admitted (bytes and inodes) before anything is made of it."""
    stats = DiffStats()
    try:
        with tarfile.open(
            fileobj=tar, mode="r|", bufsize=_CHUNK, encoding="utf-8", errors="surrogateescape"
        ) as tf:
            while (ti := tf.next()) is not None:
                tf.members.clear()
                stats.entries += 1
                if stats.entries > max_entries:
                    raise TooManyEntries(f"holds more than {max_entries} entries (the per-layer limit)")
                if ti.name.rstrip("/").rpartition("/")[2].startswith(WH_PREFIX):
                    stats.whiteouts += 1
                elif ti.isreg():
                    stats.bytes += ti.size
    except tarfile.TarError as e:
        raise DiffError(f"not a valid layer tar: {e}") from e
    return stats


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
        with tarfile.open(
            fileobj=tar, mode="r|", bufsize=_CHUNK, encoding="utf-8", errors="surrogateescape"
        ) as tf:
            while (ti := tf.next()) is not None:
                _limit(stats.entries + 1, max_entries)
                rel = _clean(ti.name)
                parent, _, base = rel.rpartition("/")
                stats.entries += 1
                folder = _inside(tree, parent)
                if base == WH_OPAQUE or (base.startswith(WH_PREFIX) and not base.startswith(WH_META_PREFIX)):
                    stats.whiteouts += 1
                    if base == WH_OPAQUE:
                        children = folder.iterdir() if folder.is_dir() else ()
                        doomed = [c for c in children if _join(parent, c.name) not in written]
                    else:
                        name = base[len(WH_PREFIX) :]
                        if name in ("", ".", ".."):
                            raise DiffError(f"{rel}: a whiteout without a name")
                        doomed = [folder / name] if _join(parent, name) not in written else []
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
                    linked = _inside(tree, _clean(ti.linkname))
                    if linked.is_symlink() or not linked.is_file():
                        raise DiffError(f"{rel}: a hard link to {ti.linkname!r}, which is no file here")
                # names, parents and link targets are checked above: ownership, modes and
                # symlinks to anywhere are kept as a layer holds them
                xattrs = _tar_xattrs(rel, ti)
                tf.extract(ti, tree, numeric_owner=True, filter="fully_trusted")
                written.add(rel)
                dest = folder / base if rel else tree
                # xattrs after the owner (a chown drops a capability); a hard link's inode has them
                for name, value in xattrs.items() if not ti.islnk() else ():
                    os.setxattr(dest, name, value, follow_symlinks=False)
                if ti.isdir():
                    dir_mtimes[dest] = _mtime_ns(ti)
                else:  # tarfile sets a float's mtime (a hard link's too), and none on a symlink
                    os.utime(dest, ns=(_mtime_ns(ti), _mtime_ns(ti)), follow_symlinks=False)
    except tarfile.TarError as e:
        raise DiffError(f"not a valid layer tar: {e}") from e
    for path, mtime in sorted(dir_mtimes.items(), key=lambda x: -len(x[0].parts)):
        if path.is_dir() and not path.is_symlink():  # not removed by a later entry
            os.utime(path, ns=(mtime, mtime))
    return stats
