"""Empty upper images built ahead of time, so that CreateVolume takes one by a
rename instead of running mkfs on the call path.

Which sizes to keep is learnt from the calls: after an image of a (file system,
size) is taken or asked for, a background thread builds replacements until
``keep`` of that kind wait, for the ``kinds`` most recently asked. A spare is
complete once it has its final name (it is built under ``.build-*`` and renamed);
start-up cleanup removes unfinished builds. Each spare costs what an empty
volume costs on the host (a few MiB; 36 MiB for 1 GiB where metadata is
held), and it counts as used space like any file; none is built while less than
a tenth of the state dir's file system is free.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

from csi_driver.ids import new_id

log = logging.getLogger(__name__)

Builder = Callable[[Path, int, str], object]  # (image path, size, fs type)
MIN_FREE = 0.10  # of the file system: below it, spares would spend what volumes need


class SpareImages:
    def __init__(self, root: Path, build: Builder, keep: int = 2, kinds: int = 4) -> None:
        self.root = root
        self._build = build
        self.keep = keep
        self.kinds = kinds
        self._wanted: OrderedDict[tuple[str, int], None] = OrderedDict()
        self._guard = threading.Lock()
        self._wake = threading.Event()
        self._stopped = False
        self._worker: threading.Thread | None = None

    def _prefix(self, fs_type: str, size: int) -> str:
        return f"{fs_type}-{size}-"

    def _ready(self, fs_type: str, size: int) -> list[Path]:
        prefix = self._prefix(fs_type, size)
        return sorted(p for p in self.root.iterdir() if p.name.startswith(prefix))

    def take(self, fs_type: str, size: int, dest: Path) -> bool:
        """Move a ready image of this kind to ``dest``; False when none is ready."""
        self.want(fs_type, size)
        with self._guard:
            for spare in self._ready(fs_type, size):
                try:
                    os.rename(spare, dest)
                    return True
                except FileNotFoundError:  # taken by a concurrent call
                    continue
        return False

    def want(self, fs_type: str, size: int) -> None:
        with self._guard:
            self._wanted[(fs_type, size)] = None
            self._wanted.move_to_end((fs_type, size))
            while len(self._wanted) > self.kinds:
                old = self._wanted.popitem(last=False)[0]
                for spare in self._ready(*old):
                    spare.unlink(missing_ok=True)
            if self._stopped:
                return
            if self._worker is None:
                self._worker = threading.Thread(target=self._run, name="spare-images", daemon=True)
                self._worker.start()
        self._wake.set()

    def stop(self) -> None:
        """Let a build in progress finish, then build no more (the driver stops)."""
        with self._guard:
            self._stopped = True
            worker = self._worker
        self._wake.set()
        if worker is not None:
            worker.join(timeout=60)

    def cleanup(self) -> list[str]:
        """Remove unfinished builds (a crash or a stop cut them short)."""
        removed = []
        for p in self.root.iterdir():
            if p.name.startswith(".build-"):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(str(p))
        return removed

    def _run(self) -> None:
        while not self._stopped:
            self._wake.wait()
            self._wake.clear()
            with self._guard:
                kinds = list(reversed(self._wanted))
            for fs_type, size in kinds:
                while not self._stopped and self._still_wanted(fs_type, size):
                    if len(self._ready(fs_type, size)) >= self.keep or not self._make(fs_type, size):
                        break

    def _still_wanted(self, fs_type: str, size: int) -> bool:
        with self._guard:
            return (fs_type, size) in self._wanted

    def _make(self, fs_type: str, size: int) -> bool:
        st = os.statvfs(self.root)
        if st.f_bavail < st.f_blocks * MIN_FREE:
            return False
        work = self.root / f".build-{new_id()}"
        try:
            work.mkdir()
            self._build(work / "image", size, fs_type)
            with self._guard:  # a kind dropped meanwhile gets no spare
                if (fs_type, size) not in self._wanted:
                    return False
                os.rename(work / "image", self.root / (self._prefix(fs_type, size) + new_id()))
            return True
        except Exception as e:  # a full disk, say: the call path builds its own then
            log.warning("could not build a spare %s image of %d bytes: %s", fs_type, size, e)
            return False
        finally:
            shutil.rmtree(work, ignore_errors=True)
