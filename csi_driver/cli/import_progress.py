"""Progress of ``overlay-csi layer import``, watched from outside the engine."""

from __future__ import annotations

import glob
import os
import threading
import time
from pathlib import Path
from typing import TextIO

from csi_driver.cli.output import fmt_bytes


class ImportProgress(threading.Thread):
    """Reports a layer import's progress on ``stream`` every ``interval`` seconds.

    It watches from the outside, so the engine needs no hook: while the archive
    is being read, its file offset (``/proc/self/fdinfo``) against its size;
    then the bytes the new layer image holds against the extracted data.
    """

    def __init__(self, source: Path, tmp_dir: Path, interval: float, stream: TextIO) -> None:
        super().__init__(name="import-progress", daemon=True)
        self.source = os.path.realpath(source)
        self.is_file = os.path.isfile(self.source)
        self.total = os.path.getsize(self.source) if self.is_file else 0
        self.tmp_dir = tmp_dir
        self.interval = interval
        self.stream = stream
        self.tty = stream.isatty()
        self.started = time.monotonic()
        self._done = threading.Event()
        self._data_bytes: dict[str, int] = {}
        self.reported = 0

    def run(self) -> None:
        while not self._done.wait(self.interval):
            self.report(self.status())

    def stop(self) -> None:
        self._done.set()
        self.join(timeout=5)
        if self.tty and self.reported:
            self.stream.write("\r\x1b[K")
            self.stream.flush()

    def report(self, line: str) -> None:
        elapsed = time.monotonic() - self.started
        text = f"{line} [{elapsed:.0f}s]"
        if self.tty:
            self.stream.write("\r\x1b[K" + text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()
        self.reported += 1

    def _archive_offset(self) -> int | None:
        try:
            fds = os.listdir("/proc/self/fd")
        except OSError:
            return None
        for fd in fds:
            try:
                if os.readlink(f"/proc/self/fd/{fd}") != self.source:
                    continue
                with open(f"/proc/self/fdinfo/{fd}") as f:
                    for line in f:
                        if line.startswith("pos:"):
                            return int(line.split()[1])
            except (OSError, ValueError):
                continue
        return None

    def _scratch(self) -> Path | None:
        dirs = [Path(p) for p in glob.glob(str(self.tmp_dir / "*"))]
        dirs = [d for d in dirs if (d / "layer" / "root").is_dir()]
        return max(dirs, key=lambda d: d.stat().st_mtime, default=None)

    def _data_size(self, upper: Path) -> int:
        key = str(upper)
        if key not in self._data_bytes:
            total = 0
            for root, _dirs, files in os.walk(upper):
                for name in files:
                    try:
                        total += os.lstat(os.path.join(root, name)).st_blocks * 512
                    except OSError:
                        pass
            self._data_bytes[key] = total
        return self._data_bytes[key]

    def status(self) -> str:
        if self.is_file:
            pos = self._archive_offset()
            if pos is not None and self.total:
                rate = pos / max(time.monotonic() - self.started, 1e-3)
                pct = min(100.0, 100.0 * pos / self.total)
                return (
                    f"extracting {os.path.basename(self.source)}: {pct:5.1f}% "
                    f"({fmt_bytes(pos)} of {fmt_bytes(self.total)}, {fmt_bytes(int(rate))}/s)"
                )
        scratch = self._scratch()
        image = scratch / "layer" / "image" if scratch else None
        if scratch is None or image is None or not image.exists():
            return "preparing"
        written = os.stat(image).st_blocks * 512
        data = self._data_size(scratch / "layer" / "root" / "upper")
        pct = min(99.0, 100.0 * written / data) if data else 0.0
        return f"writing layer image: {pct:5.1f}% ({fmt_bytes(written)} of ~{fmt_bytes(data)})"
