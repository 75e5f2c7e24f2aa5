"""bench/data_path.py runs end to end (tiny sizes, one round): every workload prints
a figure for both sides and the bench leaves no mount or loop device behind.
No figure is judged here: targets live in the bench, not in a timed test."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from driver_harness import MOUNT_SKIP, REPO, leftovers

pytestmark = [
    pytest.mark.skipif(bool(MOUNT_SKIP), reason=MOUNT_SKIP or "ok"),
    pytest.mark.skipif(shutil.which("fio") is None, reason="fio is not installed (scripts/setup.sh --test)"),
]

ROW = re.compile(r"^(?P<name>.+?)\s+(?P<base>-?\d+\.\d\d)\s+(?P<vol>-?\d+\.\d\d)\s*(?P<ratio>\d+\.\d\dx)?$")


def bench(tmp_path: Path, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """``python -m bench.data_path ARGS`` with its scratch in ``tmp_path``."""
    env = {**os.environ, "BENCH_DIR": str(tmp_path), "OVERLAY_CSI_BENCH_NS": ""}
    argv = [sys.executable, "-m", "bench.data_path", *args]
    return subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def tiny_run(
    tmp_path: Path, *args: str
) -> tuple[subprocess.CompletedProcess[str], dict[str, dict[str, re.Match]]]:
    """A successful one-round bench at tiny sizes, and its rows by table title and row name."""
    tiny = ("--rounds", "1", "--size-mib", "16", "--seconds", "1", "--files", "100")
    proc = bench(tmp_path, *tiny, *args, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    tables: dict[str, dict[str, re.Match]] = {}
    title = ""
    for line in proc.stdout.splitlines():
        if "interleaved rounds" in line:
            title = line.split(":")[0]
            tables[title] = {}
        elif title and (m := ROW.match(line)):
            tables[title][m["name"]] = m
    return proc, tables


def test_data_path_bench_prints_every_workload_for_every_kind(tmp_path: Path):
    proc, tables = tiny_run(tmp_path)
    assert set(tables) == {"ext4 volume", "xfs volume", "block volume"}, proc.stdout
    fs_rows = {
        "seq write MB/s",
        "page cache / data",
        "4k O_DIRECT rand read IOPS",
        "4k rand write+fsync IOPS",
        "small files/s",
        "lower-layer read MB/s",
    }
    for kind in ("ext4 volume", "xfs volume"):
        assert set(tables[kind]) == fs_rows, proc.stdout
    assert set(tables["block volume"]) == fs_rows - {"small files/s", "lower-layer read MB/s"}
    for rows in tables.values():
        for name, m in rows.items():
            if name != "page cache / data":
                assert float(m["vol"]) > 0 and float(m["base"]) > 0, m.string
    assert leftovers(tmp_path) == ([], [])


def test_data_path_bench_measures_a_pool_file_beside_the_default_and_removes_it(tmp_path: Path):
    pool = tmp_path / "pool.img"
    proc, tables = tiny_run(
        tmp_path,
        "--kinds",
        "ext4,block",
        "--pool-file",
        str(pool),
        "--pool-file-size",
        "32Gi",  # sparse; the bench's three ext4 volumes are 8 GiB each, as pods' mostly free claims
    )
    kinds = ("ext4 volume", "block volume")
    expected = {
        f"{k}{t}" for k in kinds for t in ("", " on the pool file", ", pool file against the default")
    }
    assert set(tables) == expected, proc.stdout
    for kind in kinds:
        assert set(tables[f"{kind} on the pool file"]) == set(tables[kind]), proc.stdout
        against = tables[f"{kind}, pool file against the default"]
        assert set(against) == set(tables[kind]), proc.stdout
        # the default's volume is the base of the comparison: its figure is the one in the first table
        for name, m in against.items():
            assert m["base"] == tables[kind][name]["vol"], proc.stdout
            assert m["vol"] == tables[f"{kind} on the pool file"][name]["vol"], proc.stdout
    assert "pool file: " in proc.stdout
    assert not pool.exists(), "the bench removes its pool file"
    assert leftovers(tmp_path) == ([], [])


def test_data_path_bench_refuses_an_existing_pool_file(tmp_path: Path):
    pool = tmp_path / "precious.img"
    pool.write_bytes(b"keep me")
    proc = bench(tmp_path, "--pool-file", str(pool), timeout=60)
    assert proc.returncode != 0 and "exists" in proc.stderr, proc.stdout + proc.stderr
    assert pool.read_bytes() == b"keep me"
