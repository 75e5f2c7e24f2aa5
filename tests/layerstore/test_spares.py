"""Spare empty images: built ahead by the background thread, taken by a rename,
refilled after, and unfinished builds removed at start-up."""

from __future__ import annotations

import time
from pathlib import Path

from csi_driver.layerstore.overlay.spares import SpareImages


def fake_build(calls: list[tuple[int, str]]):
    def build(image: Path, size: int, fs_type: str) -> None:
        calls.append((size, fs_type))
        image.write_bytes(f"{fs_type}:{size}".encode())

    return build


def wait_for(cond, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not cond():
        assert time.monotonic() < deadline, "the spares were not built in time"
        time.sleep(0.01)


def test_a_wanted_kind_is_built_ahead_taken_by_rename_and_refilled(tmp_path):
    calls: list[tuple[int, str]] = []
    spares = SpareImages(tmp_path, fake_build(calls), keep=2)
    try:
        assert not spares.take("ext4", 100, tmp_path / "first"), "nothing is ready at the first call"
        wait_for(lambda: len(spares._ready("ext4", 100)) == 2)
        assert spares.take("ext4", 100, tmp_path / "taken")
        assert (tmp_path / "taken").read_bytes() == b"ext4:100"
        assert not spares.take("xfs", 100, tmp_path / "other"), "another kind is another spare"
        wait_for(lambda: len(spares._ready("ext4", 100)) == 2 and len(spares._ready("xfs", 100)) == 2)
        assert calls.count((100, "ext4")) == 3, "two ahead, one to replace the one taken"
    finally:
        spares.stop()


def test_only_the_most_recent_kinds_are_kept(tmp_path):
    spares = SpareImages(tmp_path, fake_build([]), keep=1, kinds=2)
    try:
        for size in (1, 2, 3):
            spares.want("ext4", size)
            wait_for(lambda size=size: len(spares._ready("ext4", size)) == 1)
        assert spares._ready("ext4", 1) == [], "the oldest kind's spares are dropped"
    finally:
        spares.stop()


def test_unfinished_builds_are_removed_and_a_failing_build_stops_quietly(tmp_path):
    (tmp_path / ".build-x").mkdir()
    (tmp_path / ".build-x" / "image").write_bytes(b"half")

    def broken(image: Path, size: int, fs_type: str) -> None:
        raise OSError(28, "No space left on device")

    spares = SpareImages(tmp_path, broken)
    try:
        assert spares.cleanup() == [str(tmp_path / ".build-x")]
        assert not spares.take("ext4", 1, tmp_path / "t")
        time.sleep(0.2)
        assert [p.name for p in tmp_path.iterdir()] == [], "nothing half-built is left"
    finally:
        spares.stop()
