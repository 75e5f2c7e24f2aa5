"""The OCI image-layer tar (application/vnd.oci.image.layer.v1.tar, uncompressed) as
this driver writes and reads it, whatever keeps the layer.

A deletion is a ``.wh.<name>`` entry, a directory that hides its lower namesake
holds a ``.wh..wh..opq`` entry; xattrs travel as PAX ``SCHILY.xattr.`` records and
mtimes keep their nanoseconds in a PAX ``mtime``. Member names are untrusted:
``member_path`` refuses absolute names, ``..`` and NUL bytes.

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
import stat
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import BinaryIO, NamedTuple

WH_PREFIX = ".wh."
WH_META_PREFIX = ".wh..wh."
WH_OPAQUE = ".wh..wh..opq"
OVERLAY_XATTRS = "trusted.overlay."  # overlayfs's own: never part of a layer
SKIPPED_XATTRS = frozenset({"security.selinux"})
PAX_XATTR = "SCHILY.xattr."

CHUNK = 1 << 20
_ZEROS = bytes(CHUNK)
_NS = 10**9
_DECIMAL = re.compile(r"(-?)(\d+)(?:\.(\d*))?")


class DiffError(Exception):
    """A tree or a tar that cannot become a layer safely."""


class TooManyEntries(DiffError):
    """A tar with more entries than a layer may hold (each is an inode of its image)."""


@dataclass
class DiffStats:
    entries: int = 0  # tar entries, whiteouts and the root included
    bytes: int = 0  # regular-file payload
    whiteouts: int = 0  # .wh.<name> and opaque markers


class Node(NamedTuple):
    """What one path is: lstat, the xattrs a layer keeps, overlay's own xattrs, a symlink's target."""

    st: os.stat_result
    xattrs: dict[str, bytes]
    overlay: dict[str, bytes]
    target: str | None


def read_node(path: str) -> Node:
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
        if name in SKIPPED_XATTRS:
            continue
        try:
            value = os.getxattr(path, name, follow_symlinks=False)
        except OSError as e:
            if e.errno == errno.ENODATA:
                continue
            raise
        (overlay if name.startswith(OVERLAY_XATTRS) else keep)[name] = value
    target = os.readlink(path) if stat.S_ISLNK(st.st_mode) else None
    return Node(st, keep, overlay, target)


def join(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


def check_name(rel: str, name: str) -> None:
    if name.startswith(WH_PREFIX):
        raise DiffError(f"{rel}: names starting with {WH_PREFIX} are reserved for whiteouts in a layer")


def _fmt_ns(ns: int) -> str:
    sec, frac = divmod(abs(ns), _NS)
    return f"{'-' if ns < 0 else ''}{sec}.{frac:09d}"


def mtime_ns(ti: tarfile.TarInfo) -> int:
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


class TarWriter:
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
        self._marker(join(parent, WH_PREFIX + base))

    def opaque(self, rel: str) -> None:
        self._marker(join(rel, WH_OPAQUE))

    def entry(self, rel: str, path: str, node: Node) -> None:
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
                    n = min(CHUNK, data - pos)
                    self._write(memoryview(_ZEROS)[:n])
                    pos += n
                hole = _seek(fd, pos, os.SEEK_HOLE, size) if pos < size else size
                while pos < hole:
                    buf = os.pread(fd, min(CHUNK, hole - pos), pos)
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


def member_path(name: str) -> str:
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


def tar_xattrs(rel: str, ti: tarfile.TarInfo) -> dict[str, bytes]:
    xattrs = {}
    for key, value in ti.pax_headers.items():
        if not key.startswith(PAX_XATTR):
            continue
        name = key[len(PAX_XATTR) :]
        if name.startswith(OVERLAY_XATTRS):
            raise DiffError(f"{rel or '.'}: xattr {name} belongs to overlayfs and is refused in a layer")
        if name in SKIPPED_XATTRS:
            continue  # the host's policy labels files, never a layer (as on export)
        xattrs[name] = value.encode("utf-8", "surrogateescape")
    return xattrs


def check_entries(entries: int, max_entries: int) -> None:
    if max_entries and entries > max_entries:
        raise TooManyEntries(f"holds more than {max_entries} entries")


def count_tar(tar: BinaryIO, max_entries: int) -> DiffStats:
    """A first, read-only pass over a layer tar: its entries and regular-file bytes.

    Writes nothing; raises ``TooManyEntries`` as soon as the tar holds more than
    ``max_entries`` entries, ``DiffError`` when it is no valid tar, so that an
    import can be admitted (bytes and inodes) before anything is made of it."""
    stats = DiffStats()
    try:
        with read_stream(tar) as tf:
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


@contextmanager
def read_stream(tar: BinaryIO) -> Iterator[tarfile.TarFile]:
    """``tar`` read as a stream (a pipe will do), names decoded as they were written."""
    with tarfile.open(
        fileobj=tar, mode="r|", bufsize=CHUNK, encoding="utf-8", errors="surrogateescape"
    ) as tf:
        yield tf
