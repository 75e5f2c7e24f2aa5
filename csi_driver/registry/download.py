"""One blob's bytes as they arrive, as a read-only file: hashed as they are read,
never past the size its descriptor declares, and resumed with a ``Range`` request
(``RESUMES`` times) when the connection breaks off, into the same hash. Nothing read
from it is trusted until ``finish()`` has checked its size and digest: a consumer
builds into scratch and installs only after that.

The download runs ahead of its consumer on a thread of its own (``AHEAD`` chunks):
receiving and hashing a chunk overlaps with the consumer unpacking the one before
(hashlib and socket reads release the GIL), so a restore takes about the longer of
the two, not their sum.
"""

from __future__ import annotations

import contextvars
import hashlib
import logging
import queue
import re
import threading
from collections.abc import Callable, Iterator

import requests

from csi_driver.errors import Unavailable
from csi_driver.registry import cancel
from csi_driver.registry.auth import BadContent
from csi_driver.registry.progress import CHUNK, Meter

log = logging.getLogger("csi_driver.registry")

RESUMES = 3  # a blob download that breaks off is resumed this often
AHEAD = 8  # chunks the download may run ahead of its consumer
_POLL = 0.25  # seconds between looks at whether the consumer went away
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-\d+/(?:\d+|\*)$")


class BlobStream:
    """Blob ``digest`` of ``size`` bytes from ``open_at(offset)``, which answers a GET of
    it from ``offset`` on (a 200 or a 206, already checked)."""

    def __init__(
        self, open_at: Callable[[int], requests.Response], digest: str, size: int, host: str, meter: Meter
    ) -> None:
        self._open_at = open_at
        self.digest = digest
        self.size = size
        self._host = host
        self._meter = meter
        self._sha = hashlib.sha256()
        self.done = 0  # bytes delivered (and hashed)
        self._response: requests.Response | None = None
        self._chunks: Iterator[bytes] | None = None
        self._pending = memoryview(b"")
        self._resumes = 0
        self._skip = 0  # bytes of a 200 answer to a range request that were delivered already
        self._ended = False
        self._what = f"download blob {digest[:19]}"
        self._ahead: queue.Queue[bytes | BaseException] | None = None
        self._fetcher: threading.Thread | None = None
        self._stop = threading.Event()
        self._delivered = False  # the consumer got the end (or an error)

    # ---- the file a consumer reads -----------------------------------------------
    def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes (all that is left for -1); b"" at the end."""
        if n < 0:
            out = bytearray(self._pending)
            self._pending = memoryview(b"")
            while chunk := self._next_chunk():
                out += chunk
            return bytes(out)
        if not self._pending:
            chunk = self._next_chunk()
            if len(chunk) <= n:  # the common case: a whole chunk, not copied
                return chunk
            self._pending = memoryview(chunk)
        data, self._pending = self._pending[:n], self._pending[n:]
        return bytes(data)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def chunks(self) -> Iterator[bytes]:
        """What is left, chunk by chunk (a copy to a file)."""
        if self._pending:
            data, self._pending = bytes(self._pending), memoryview(b"")
            yield data
        while chunk := self._next_chunk():
            yield chunk

    def finish(self) -> None:
        """Read what the consumer left (up to the declared size), then check the size and
        the digest: BadContent when either is wrong."""
        self._pending = memoryview(b"")
        while self._next_chunk():
            pass
        if self.done != self.size:
            raise BadContent(
                f"registry {self._host}: blob {self.digest[:19]} is truncated: "
                f"{self.done} of {self.size} bytes"
            )
        got = "sha256:" + self._sha.hexdigest()
        if got != self.digest:
            raise BadContent(
                f"registry {self._host}: blob {self.digest[:19]} does not match its digest "
                f"(its bytes hash to {got[:19]}); nothing was installed"
            )
        self._meter.finish()

    def close(self) -> None:
        """Stop the download (a consumer that gave up) and release its connection."""
        self._stop.set()
        if self._fetcher is not None:
            self._drop()
            # a fetcher waiting for room sees the stop at once; one in a read of a slow
            # server ends at its read timeout or the transfer's cancel, and hands nothing
            self._fetcher.join(timeout=2 * _POLL)
            self._fetcher = None
        self._drop()

    # ---- the download thread ---------------------------------------------------------
    def _next_chunk(self) -> bytes:
        """The next chunk the download thread fetched; b"" at the end; its error, raised."""
        if self._delivered:
            return b""
        if self._ahead is None:
            self._ahead = queue.Queue(AHEAD)
            run = contextvars.copy_context().run  # the transfer's cancel token goes along
            self._fetcher = threading.Thread(
                target=run, args=(self._fetch_all,), name="registry-pull", daemon=True
            )
            self._fetcher.start()
        item = self._ahead.get()
        if isinstance(item, BaseException):
            self._delivered = True
            raise item
        if not item:
            self._delivered = True
        return item

    def _fetch_all(self) -> None:
        assert self._ahead is not None
        try:
            while not self._stop.is_set():
                chunk = self._fetch_chunk()
                self._hand_over(chunk)
                if not chunk:
                    return
        except BaseException as e:  # noqa: BLE001 - the consumer raises it
            if not self._stop.is_set():
                self._hand_over(e)
        finally:
            if self._stop.is_set():
                self._drop()  # an answer opened while the consumer closed the stream

    def _hand_over(self, item: bytes | BaseException) -> None:
        assert self._ahead is not None
        while not self._stop.is_set():
            try:
                self._ahead.put(item, timeout=_POLL)
                return
            except queue.Full:
                continue

    def _drop(self) -> None:
        """Close the current answer (a resume opens another)."""
        r, self._response, self._chunks = self._response, None, None  # close() may come from the consumer
        if r is not None:
            r.close()

    # ---- the connection --------------------------------------------------------------
    def _open(self) -> None:
        r = self._open_at(self.done)
        self._skip = 0
        if self.done and r.status_code == 200:  # no ranges here: skip what was delivered
            self._skip = self.done
        elif r.status_code == 206:
            m = _CONTENT_RANGE.match(r.headers.get("Content-Range", ""))
            if m is None or int(m[1]) != self.done:
                r.close()
                raise BadContent(
                    f"registry {self._host}: {self._what}: asked for bytes from {self.done} on, "
                    f"it answered {r.headers.get('Content-Range', 'no Content-Range')[:80]!r}"
                )
        self._response = r
        self._chunks = r.iter_content(CHUNK)

    def _fetch_chunk(self) -> bytes:
        """The next bytes of the blob, counted and hashed; b"" at its end."""
        while not self._ended:
            if self._stop.is_set():  # the consumer closed the stream: no new request, no resume
                return b""
            if self._chunks is None:
                self._open()
                continue
            try:  # the transfer may break off (resumed); a consumer's error may not
                chunk = next(self._chunks, None)
            except (requests.exceptions.RequestException, OSError) as e:
                cancel.check()  # cancelled: its socket was shut down
                self._drop()
                if self.done >= self.size or self._resumes == RESUMES:
                    raise Unavailable(
                        f"registry {self._host}: {self._what} broke off after {self.done} of "
                        f"{self.size} bytes: {type(e).__name__}"
                    ) from e
                self._resumes += 1
                log.warning("%s broke off at %d of %d bytes; resuming", self._what, self.done, self.size)
                continue
            cancel.check()
            if chunk is None:
                self._drop()
                if self.done >= self.size or self._resumes == RESUMES:
                    self._ended = True
                    break
                self._resumes += 1
                log.warning("%s ended at %d of %d bytes; resuming", self._what, self.done, self.size)
                continue
            if self._skip:
                dropped = min(self._skip, len(chunk))
                chunk, self._skip = chunk[dropped:], self._skip - dropped
            if chunk:
                return self._count(chunk)
        return b""

    def _count(self, chunk: bytes) -> bytes:
        if self.done + len(chunk) > self.size:
            self._drop()
            raise BadContent(
                f"registry {self._host}: blob {self.digest[:19]} is longer "
                f"than the {self.size} bytes its manifest declares"
            )
        self._sha.update(chunk)
        self.done += len(chunk)
        self._meter.add(len(chunk))
        return chunk
