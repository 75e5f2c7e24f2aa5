"""Progress of blob transfers: a log line every few seconds with bytes and rate,
and process-wide counters the metrics endpoint reads."""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import BinaryIO

from csi_driver.registry import cancel

log = logging.getLogger("csi_driver.registry")

MiB = 1 << 20
CHUNK = 1 << 20
LOG_EVERY = 5.0  # seconds between progress lines of one transfer

_guard = threading.Lock()
_bytes: Counter[str] = Counter()  # direction -> bytes moved
_blobs: Counter[tuple[str, str]] = Counter()  # (direction, result) -> blobs


def totals() -> tuple[dict[str, int], dict[tuple[str, str], int]]:
    """Bytes by direction and blobs by (direction, result) since the process started."""
    with _guard:
        return dict(_bytes), dict(_blobs)


def count_blob(direction: str, result: str) -> None:
    """``result``: "transferred", "skipped" (the other side had it) or "failed"."""
    with _guard:
        _blobs[direction, result] += 1


def _mib(n: int) -> str:
    return f"{n / MiB:.1f} MiB"


class Meter:
    """Counts one blob's bytes as they move; logs progress and a summary."""

    def __init__(self, direction: str, digest: str, total: int, where: str) -> None:
        self.direction = direction  # "push" or "pull"
        self.digest = digest
        self.total = total
        self.where = ("to " if direction == "push" else "from ") + where
        self.done = 0
        self._transfer = cancel.current()  # counts what its transfer moved, if it runs under one
        self._start = time.monotonic()
        self._last = self._start

    def add(self, n: int) -> None:
        self.done += n
        if self._transfer is not None:
            self._transfer.moved += n
        with _guard:
            _bytes[self.direction] += n
        now = time.monotonic()
        if now - self._last >= LOG_EVERY:
            self._last = now
            self._log("pushing" if self.direction == "push" else "pulling", f"of {_mib(self.total)}")

    def finish(self) -> None:
        count_blob(self.direction, "transferred")
        seconds = max(time.monotonic() - self._start, 1e-6)
        self._log("pushed" if self.direction == "push" else "pulled", f"in {seconds:.1f} s")

    def _log(self, verb: str, so_far: str) -> None:
        """``pulled sha256:3f1c2a9b8d7e from REPO: 1024.0 MiB in 9.8 s (104.5 MiB/s)``"""
        rate = self.done / max(time.monotonic() - self._start, 1e-6)
        log.info(
            "%s %s %s: %s %s (%s/s)",
            verb,
            self.digest[:19],
            self.where,
            _mib(self.done),
            so_far,
            _mib(int(rate)),
        )


class MeteredReader:
    """A file object that counts what is read from it (a request body being sent)."""

    def __init__(self, f: BinaryIO, meter: Meter) -> None:
        self._f = f
        self._meter = meter

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self._meter.add(len(data))
        return data

    def __iter__(self) -> Iterator[bytes]:  # requests streams an iterable body in these chunks
        while data := self.read(CHUNK):
            yield data

    def __len__(self) -> int:  # requests sets Content-Length from it
        return self._meter.total - self._meter.done
