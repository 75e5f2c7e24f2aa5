"""A blob uploaded as it is made: the writer side (an export, compressed and hashed
on the way) hands chunks to the request body that a sending thread streams.

Why: a blob spooled to a file first is written, read back and only then sent, so
a push takes the export's time plus the upload's, and needs free space for the
whole blob. Streamed, the export and the upload overlap, and nothing is spooled.

Either side may fail. The writer learns of a failed upload at its next write
(``UploadStopped``); the body learns of a failed export from ``abort`` and raises
inside the request, which drops the connection, so the registry never completes
an upload that was not whole (and the digest, given only at the end, is checked
by the registry anyway).
"""

from __future__ import annotations

import hashlib
import queue
from collections.abc import Callable, Iterator

from csi_driver.registry.progress import CHUNK

#: chunks in flight between writer and sender: bounds the memory a push holds
DEPTH = 8
#: how often a blocked side looks whether the other one stopped
POLL_SECONDS = 0.25


class UploadStopped(Exception):
    """The sending side stopped (its error is the one to report)."""


class Aborted(Exception):
    """Raised inside the request body: the writer failed, the upload must not complete."""


_END = b""


class StreamBody:
    """Bytes written on one thread, sent as a chunked request body on another; the
    written bytes are hashed (sha256) and counted."""

    def __init__(self, sent: Callable[[int], None] = lambda n: None, depth: int = DEPTH) -> None:
        self.sha = hashlib.sha256()
        self.size = 0
        self._sent = sent
        self._queue: queue.Queue[bytes | BaseException] = queue.Queue(depth)
        self._buffer = bytearray()
        self._stopped = False  # set by the sender when it ends early
        self._closed = False

    # ---- the writer's side ----------------------------------------------------
    def write(self, data: bytes | memoryview) -> int:
        n = len(data)
        self.sha.update(data)
        self.size += n
        self._buffer += data
        if len(self._buffer) >= CHUNK:
            self._put(bytes(self._buffer))
            self._buffer.clear()
        return n

    def flush(self) -> None:
        """Nothing to do: chunks go out when full, the rest at ``close``."""

    def close(self) -> None:
        """All is written: send what is buffered, then the end of the body (once)."""
        if self._closed:
            return
        self._closed = True
        if self._buffer:
            self._put(bytes(self._buffer))
            self._buffer.clear()
        self._put(_END)

    def abort(self, why: BaseException) -> None:
        """The writer failed: the body raises instead of ending (never blocks)."""
        while True:
            try:
                self._queue.put_nowait(Aborted(str(why)))
                return
            except queue.Full:
                try:
                    self._queue.get_nowait()  # the sender will not need what the writer made
                except queue.Empty:
                    pass

    def digest(self) -> str:
        return "sha256:" + self.sha.hexdigest()

    def _put(self, item: bytes) -> None:
        while True:
            if self._stopped:
                raise UploadStopped("the upload stopped")
            try:
                self._queue.put(item, timeout=POLL_SECONDS)
                return
            except queue.Full:
                continue

    # ---- the sender's side ----------------------------------------------------
    def chunks(self) -> Iterator[bytes]:
        """The request body: chunks as they are written, until the end or an abort."""
        while True:
            item = self._queue.get()
            if isinstance(item, BaseException):
                raise item
            if item == _END:
                return
            yield item
            self._sent(len(item))

    def stop(self) -> None:
        """The sender ended (done or failed): a writer still writing gets UploadStopped."""
        self._stopped = True
