"""pytest fixtures; the harness itself lives in driver_harness.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from driver_harness import MOUNT_SKIP, Driver, cleanup


@pytest.fixture
def driver(tmp_path: Path) -> Iterator[Driver]:
    if MOUNT_SKIP:
        pytest.skip(MOUNT_SKIP)
    d = Driver(tmp_path)
    try:
        yield d
    finally:
        d.stop()
        mounts, loops = cleanup(tmp_path)
    assert not mounts and not loops, f"test leaked mounts {mounts} or loop devices {loops}"
