"""How a layer tar travels as a blob: uncompressed, gzip or zstd.

A push compresses with the codec its VolumeSnapshotClass names (``compression``),
on all the node's cores: gzip with ISA-L's threaded writer (``isal``), zstd with
zstd's own worker threads (``zstandard``). A restore reads every layer media type
the OCI image spec names (and Docker's gzip layer); any other is refused by the
caller. What a reader expands to is bounded by the caller (``_Bounded``).
"""

from __future__ import annotations

import gzip
import os
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import BinaryIO, Protocol

import zstandard
from isal import igzip_threaded

NONE, GZIP, ZSTD = "none", "gzip", "zstd"
COMPRESSIONS = (NONE, GZIP, ZSTD)  # what a VolumeSnapshotClass may say

LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
LAYER_GZIP = LAYER_TAR + "+gzip"
LAYER_ZSTD = LAYER_TAR + "+zstd"
_NONDISTRIBUTABLE = "application/vnd.oci.image.layer.nondistributable.v1.tar"

#: The media type a push gives its blob, by codec
MEDIA_TYPES = {NONE: LAYER_TAR, GZIP: LAYER_GZIP, ZSTD: LAYER_ZSTD}
#: What a restore reads: the OCI image spec's layer media types (the non-distributable
#: ones included: a registry that serves them is read like any) and Docker's gzip layer
READABLE = {
    LAYER_TAR: NONE,
    LAYER_GZIP: GZIP,
    LAYER_ZSTD: ZSTD,
    _NONDISTRIBUTABLE: NONE,
    _NONDISTRIBUTABLE + "+gzip": GZIP,
    _NONDISTRIBUTABLE + "+zstd": ZSTD,
    "application/vnd.docker.image.rootfs.diff.tar.gzip": GZIP,
}
#: What a compressed stream that is not one raises while it is read
DECODE_ERRORS: tuple[type[BaseException], ...] = (gzip.BadGzipFile, zlib.error, EOFError, zstandard.ZstdError)

GZIP_LEVEL = 1  # ISA-L's levels are 0-3; 1 is close to zlib's 6 in size, several times faster
ZSTD_LEVEL = 3  # zstd's default


class Writer(Protocol):
    def write(self, data: bytes | memoryview, /) -> int: ...


def codec_of(media_type: str) -> str | None:
    """The codec a layer blob of ``media_type`` is read with; None: not a layer we read."""
    return READABLE.get(media_type)


def threads() -> int:
    """The cores this process may run on (compression uses them all)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


@contextmanager
def compressing(out: Writer, compression: str) -> Iterator[Writer]:
    """A writer that compresses into ``out`` with ``compression``; the stream is complete
    when the context ends without an error."""
    if compression == NONE:
        yield out
        return
    stream: BinaryIO
    if compression == GZIP:
        stream = igzip_threaded.open(out, "wb", compresslevel=GZIP_LEVEL, threads=threads())
    elif compression == ZSTD:
        compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL, threads=threads())
        stream = compressor.stream_writer(out, closefd=False)  # type: ignore[assignment]
    else:
        raise ValueError(f"unknown compression {compression!r}")
    try:
        yield stream
    finally:
        stream.close()  # the end of the stream (and an error its workers met) comes here


def decompressing(raw: BinaryIO, codec: str) -> BinaryIO:
    """``raw`` (a blob of ``codec``) as its tar; the caller bounds what it reads."""
    if codec == NONE:
        return raw
    if codec == GZIP:
        return gzip.open(raw)  # type: ignore[return-value]
    if codec == ZSTD:
        # a window of at most 128 MiB (zstd's default limit): a hostile frame header
        # cannot make the decoder allocate more
        reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True, closefd=False)
        return reader  # type: ignore[return-value]
    raise ValueError(f"unknown codec {codec!r}")
