"""A raw block layer as one registry blob that keeps its holes (``MEDIA_TYPE``).

The format, all integers unsigned big-endian:

- a 32-byte header: the magic ``OCSIBLK\\0`` (8 bytes), the version (4 bytes, 1),
  4 zero bytes, the image's logical size (8 bytes), the number of data extents N (8 bytes);
- N extents of 16 bytes each, (offset, length), sorted, not overlapping, each of at
  least one byte and within the logical size;
- the extents' bytes, in the same order, nothing between them and nothing after.

The extents are where the image holds data (``SEEK_DATA``/``SEEK_HOLE``); everything
else reads as zeros and is a hole again after a restore. A blob is therefore exactly
``32 + 16 N + sum(lengths)`` bytes, which a restore checks before it writes anything.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from csi_driver import host

MEDIA_TYPE = "application/vnd.overlay-csi.block.v1.sparse"
MAGIC = b"OCSIBLK\0"
VERSION = 1
_HEADER = struct.Struct(">8sIIQQ")
_EXTENT = struct.Struct(">QQ")
#: extents a blob may list: 16 MiB of table, far more than a real image's runs of data
MAX_EXTENTS = 1 << 20
_CHUNK = 1 << 20


class BadImage(ValueError):
    """A blob that is not a valid block image in this format."""


def blob_size(extents: list[tuple[int, int]]) -> int:
    return _HEADER.size + _EXTENT.size * len(extents) + sum(n for _o, n in extents)


def write_image(image: Path, out: BinaryIO) -> tuple[int, int]:
    """Write ``image`` to ``out`` in this format; return (logical size, data bytes).
    The image must not change meanwhile (a snapshot's layer never does)."""
    with open(image, "rb") as f:
        fd = f.fileno()
        size = os.fstat(fd).st_size
        extents = host.data_extents(fd, size)
        if len(extents) > MAX_EXTENTS:
            raise BadImage(f"{len(extents)} runs of data (at most {MAX_EXTENTS})")
        out.write(_HEADER.pack(MAGIC, VERSION, 0, size, len(extents)))
        for offset, length in extents:
            out.write(_EXTENT.pack(offset, length))
        for offset, length in extents:
            done = 0
            while done < length:
                data = os.pread(fd, min(_CHUNK, length - done), offset + done)
                if not data:
                    raise BadImage(f"{image} shrank while it was exported")
                out.write(data)
                done += len(data)
    return size, sum(n for _o, n in extents)


def _read_exactly(read: Callable[[int], bytes], n: int, what: str) -> bytes:
    parts: list[bytes] = []
    left = n
    while left > 0:
        data = read(min(left, _CHUNK))
        if not data:
            raise BadImage(f"the blob ends inside {what}")
        parts.append(data)
        left -= len(data)
    return b"".join(parts)


def read_extents(read: Callable[[int], bytes], total: int, size: int) -> list[tuple[int, int]]:
    """Read and check a blob's header and extent table (untrusted): the blob is
    ``total`` bytes and holds an image of ``size`` bytes (as its manifest says)."""
    magic, version, _zero, logical, count = _HEADER.unpack(_read_exactly(read, _HEADER.size, "its header"))
    if magic != MAGIC:
        raise BadImage("not an overlay-csi block image (bad magic)")
    if version != VERSION:
        raise BadImage(f"block image format version {version} (this driver reads {VERSION})")
    if logical != size:
        raise BadImage(f"an image of {logical} bytes, where its manifest says {size}")
    if count > MAX_EXTENTS:
        raise BadImage(f"{count} extents (at most {MAX_EXTENTS})")
    table = _read_exactly(read, _EXTENT.size * count, "its extent list")
    extents = list(_EXTENT.iter_unpack(table))
    end = 0
    for offset, length in extents:
        if length == 0 or offset < end or offset + length > size:
            raise BadImage(f"extent ({offset}, {length}) is empty, unsorted, overlapping or beyond {size}")
        end = offset + length
    if blob_size(extents) != total:
        raise BadImage(f"its extents make a blob of {blob_size(extents)} bytes, not {total}")
    return extents


def restore_image(read: Callable[[int], bytes], fd: int, total: int, size: int) -> int:
    """Write a blob of ``total`` bytes into ``fd``, an empty sparse file of ``size``
    bytes: only its extents are written, so holes stay holes. Return the data bytes."""
    written = 0
    for offset, length in read_extents(read, total, size):
        done = 0
        while done < length:
            data = read(min(_CHUNK, length - done))
            if not data:
                raise BadImage("the blob ends inside an extent's data")
            view = memoryview(data)
            while view:
                n = os.pwrite(fd, view, offset + done)
                view = view[n:]
                done += n
        written += length
    return written
