"""The state dir's own paths; each layer backend lays out its part below ``root``."""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class StateDir:
    root: Path

    @property
    def db(self) -> Path:
        return self.root / "state.db"

    @property
    def lockfile(self) -> Path:
        return self.root / "lock"

    @property
    def tmp(self) -> Path:
        """Scratch builds: never survive a restart (on the layers' file system, so
        installing a build is a rename)."""
        return self.root / "tmp"

    @property
    def ephemeral(self) -> Path:
        """Private staging dirs of ephemeral inline volumes."""
        return self.root / "ephemeral"

    def served(self) -> bool:
        """Whether a driver holds the state dir's lock (it serves this state dir)."""
        try:
            fd = os.open(self.lockfile, os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    def ensure(self) -> None:
        for d in (self.root, self.tmp, self.ephemeral):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.root.chmod(0o700)
