"""An overlay upper directory as an OCI layer tar, and a layer tar as an upper.

An overlay upper directory is nearly an OCI layer already: it marks a deletion
with a char device 0:0 where the tar has a ``.wh.<name>`` entry, and a
directory that hides its lower namesake with ``trusted.overlay.opaque=y`` where
the tar has ``<dir>/.wh..wh..opq``. ``export_upper`` translates one into the
other. The upper is a complete diff only while no directory was renamed,
though: under ``redirect_dir=on`` a renamed directory is an upper directory
that points (``trusted.overlay.redirect``) at lower contents the upper does
not hold. ``treediff.export_naive`` then compares the parent's merged view with the new
one instead, as moby's overlay2 does; ``export_layer`` picks between the two.
``import_as_upper`` goes the other way: a tar becomes a directory that works as
an overlay upper over the layer's parent. What a layer may hold: ``layertar``.
"""

from __future__ import annotations

import errno
import os
import stat
import tarfile
from pathlib import Path
from typing import BinaryIO

from csi_driver.layerstore import treediff
from csi_driver.layerstore.layertar import (
    CHUNK,
    WH_META_PREFIX,
    WH_OPAQUE,
    WH_PREFIX,
    DiffError,
    DiffStats,
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

OPAQUE_XATTR = "trusted.overlay.opaque"
_INCOMPLETE_XATTRS = ("trusted.overlay.redirect", "trusted.overlay.metacopy")

_KICK = 8 << 20  # bytes of a file written between two starts of its writeback
_BLOCK = 4096
_ZEROS = bytes(CHUNK)
_ZERO_BLOCK = bytes(_BLOCK)
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class NeedsNaiveDiff(DiffError):
    """The upper alone is an incomplete diff (a renamed directory, a metacopy file)."""


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


def _listdir(path: str) -> list[str]:
    return sorted(os.listdir(path))


def export_upper(upper: Path, out: BinaryIO) -> DiffStats:
    """Write the overlay upper directory ``upper`` to ``out`` as an OCI layer tar.

    The fast path: only the upper is read. The root entry ``./`` is always
    written (an upper's root directory is its merged root). Raises ``NeedsNaiveDiff`` on meeting a
    redirect or metacopy xattr, with part of a tar already written to ``out``;
    ``export_layer`` checks first.
    """
    w = TarWriter(out)
    root = str(upper)
    node = read_node(root)
    w.entry("", root, node)
    if node.overlay.get(OPAQUE_XATTR) == b"y":
        w.opaque("")
    stack = [""]
    while stack:
        parent = stack.pop()
        subdirs = []
        for name in _listdir(join(root, parent)):
            rel = join(parent, name)
            path = os.path.join(root, rel)
            node = read_node(path)
            mode = node.st.st_mode
            if (stat.S_ISCHR(mode) and node.st.st_rdev == 0) or (
                stat.S_ISREG(mode) and node.st.st_size == 0 and "trusted.overlay.whiteout" in node.overlay
            ):
                w.whiteout(rel)
                continue
            check_name(rel, name)
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
    return treediff.export_naive(parent, merged, out)


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
        chunk = src.read(min(CHUNK, size - pos))
        if not chunk:
            raise DiffError(f"{rel}: the tar ends inside the file")
        n = len(chunk)
        tail = n % _BLOCK
        if chunk.find(_ZERO_BLOCK) < 0 and not (tail and chunk.count(0, n - tail) == tail):
            _pwrite_all(fd, memoryview(chunk), pos)  # no zero block to skip: one write, no scan
        elif chunk != (_ZEROS if n == CHUNK else bytes(n)):
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
        rel = member_path(ti.name)
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
        xattrs = tar_xattrs(rel, ti)
        if not rel:
            if not ti.isdir():
                raise DiffError("the root entry is not a directory")
            self._meta_fd(self.root, ti, xattrs)
            self.dir_mtimes[""] = mtime_ns(ti)
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
        self.dir_mtimes[rel] = mtime_ns(ti)

    def _link(self, fd: int, base: str, rel: str, ti: tarfile.TarInfo) -> None:
        target = member_path(ti.linkname)
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
            ns = mtime_ns(ti)
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
        ns = mtime_ns(ti)
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
            with read_stream(tar) as tf:
                while (ti := tf.next()) is not None:
                    tf.members.clear()  # a stream TarFile keeps every header otherwise
                    check_entries(imp.stats.entries + 1, max_entries)
                    imp.add(ti, tf)
        except tarfile.TarError as e:
            raise DiffError(f"not a valid layer tar: {e}") from e
        imp.finish()
    finally:
        imp.close()
    return imp.stats
