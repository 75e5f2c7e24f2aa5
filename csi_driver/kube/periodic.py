"""A pass that repeats on a daemon thread until stopped (the API server may be away: a failed
pass is logged, and the next one tries again)."""

from __future__ import annotations

import logging
import threading
from typing import Any

log = logging.getLogger(__name__)


class Periodic:
    what = "a periodic pass"  # for the log line of a failed pass

    def __init__(self, interval: float, name: str) -> None:
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def once(self) -> Any:
        raise NotImplementedError

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=15)

    def _run(self) -> None:
        while True:
            try:
                self.once()
            except Exception as e:
                log.warning("%s failed: %s", self.what, str(e)[:300])
            if self._stop.wait(self.interval):
                return
