"""pytest fixtures; the harness itself lives in driver_harness.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from driver_harness import Driver, serving


@pytest.fixture
def driver(tmp_path: Path) -> Iterator[Driver]:
    with serving(tmp_path) as d:
        yield d
