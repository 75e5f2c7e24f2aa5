"""The data path: what a pod's I/O costs on a volume against the same disk bare.

Each workload runs with fio (psync) on a staged and published volume and on a
plain directory of the same host file system (what local-path or host-path give a
pod), in interleaved rounds (the order flips every round), and prints the median
of each side and their ratio. ext4 and xfs volumes are measured against the plain
directory, a raw block volume against a raw file of the same size.

Targets (issue 11): sequential write >= 0.9x, O_DIRECT 4 KiB random read >= 0.9x,
fsync'd 4 KiB random write >= 0.5x, small files >= 0.9x, a file read from a lower
layer >= 0.9x, page cache growth <= 1.1x the data written.

With ``--pool-file PATH`` a second driver keeps its state dir on a pool file
made there by the driver, as ``serve --pool-file`` does on a node (a sparse file
on the host file system, a direct-I/O loop device, xfs), and each kind is also
measured on it in the same interleaved rounds (the order rotates every round);
one more table gives the pool file against today's default side by side. The
pool file is removed at the end.

Usage: python -m bench.data_path [--rounds 5] [--size-mib 1024] [--seconds 8]
       [--kinds ext4,xfs,block] [--pool-file PATH [--pool-file-size 64Gi]]
       (BENCH_DIR picks the host file system; /var/tmp)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import POOL_FILE_SIZE, pool_file, reexec_in_private_namespace, running_driver
from csi_driver.cli.args import parse_size
from csi_driver.client import mount_capability
from csi_driver.engine.capacity import CapacityPolicy
from csi_driver.proto import csi_pb2 as csi

MiB = 1 << 20
GiB = 1 << 30


class Teardown:
    """What the bench staged and published, undone in reverse order at the end."""

    def __init__(self, client) -> None:
        self.client = client
        self.steps: list[Callable[[], None]] = []

    def stage(self, vol: str, stg: Path, cap: csi.VolumeCapability) -> None:
        self.client.stage(vol, stg, cap)
        self.steps.append(lambda: self.client.unstage(vol, stg))

    def publish(self, vol: str, stg: Path, tgt: Path, cap: csi.VolumeCapability) -> None:
        self.client.publish(vol, stg, tgt, cap=cap)
        self.steps.append(lambda: self.client.unpublish(vol, tgt))

    def run(self) -> None:
        while self.steps:
            self.steps.pop()()


@dataclass
class Settings:
    size: int
    seconds: int
    files: int


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def page_cache() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("Cached:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no Cached: line in /proc/meminfo")


def fio(target: Path, *args: str, directory: bool = True) -> dict:
    where = f"--directory={target}" if directory else f"--filename={target}"
    argv = ["fio", "--name=bench", where, "--ioengine=psync", "--output-format=json", *args]
    out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
    return json.loads(out[out.index("{") :])["jobs"][0]


def wall(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


# ---- workloads: each returns (value, unit); higher is better ----------------


def seq_write(target: Path, s: Settings, block: bool = False) -> dict[str, float]:
    """1 MiB blocks, fsync at the end; also the page cache it leaves behind."""
    if not block:
        (target / "bench.0.0").unlink(missing_ok=True)
    drop_caches()
    before = page_cache()
    extra = ["--direct=1"] if block else []
    dt = wall(
        lambda: fio(
            target, "--rw=write", "--bs=1M", f"--size={s.size}", "--end_fsync=1", *extra, directory=not block
        )
    )
    return {"seq write MB/s": s.size / dt / 1e6, "page cache / data": (page_cache() - before) / s.size}


def rand_read(target: Path, s: Settings, block: bool = False) -> dict[str, float]:
    """4 KiB O_DIRECT random reads of a file laid out earlier, caches dropped."""
    if not block:
        fio(target, "--rw=write", "--bs=1M", f"--size={s.size}", "--filename=rr", "--end_fsync=1")
    drop_caches()
    job = fio(
        target,
        "--rw=randread",
        "--bs=4k",
        "--direct=1",
        f"--size={s.size}",
        f"--runtime={s.seconds}",
        "--time_based",
        *([] if block else ["--filename=rr"]),
        directory=not block,
    )
    return {"4k O_DIRECT rand read IOPS": job["read"]["iops"]}


def fsync_write(target: Path, s: Settings, block: bool = False) -> dict[str, float]:
    """4 KiB random writes, each followed by fsync (a database's commit)."""
    size = min(s.size, 256 * MiB)
    job = fio(
        target,
        "--rw=randwrite",
        "--bs=4k",
        "--fsync=1",
        f"--size={size}",
        f"--runtime={s.seconds}",
        "--time_based",
        *(["--direct=1"] if block else ["--filename=fw"]),
        directory=not block,
    )
    return {"4k rand write+fsync IOPS": job["write"]["iops"]}


def small_files(target: Path, s: Settings) -> dict[str, float]:
    """Create ``s.files`` files of 4 KiB, then sync."""
    d = target / "small"
    shutil.rmtree(d, ignore_errors=True)
    os.sync()
    payload = os.urandom(4096)

    def create() -> None:
        d.mkdir()
        for i in range(s.files):
            with open(d / str(i), "wb") as f:
                f.write(payload)
        os.sync()

    dt = wall(create)
    shutil.rmtree(d)
    return {"small files/s": s.files / dt}


def lower_read(target: Path, s: Settings) -> dict[str, float]:
    """Sequential read, cold, of a file that lives in a lower layer."""
    drop_caches()
    dt = wall(
        lambda: fio(
            target / "lower.bin", "--rw=read", "--bs=1M", f"--size={s.size}", "--readonly", directory=False
        )
    )
    return {"lower-layer read MB/s": s.size / dt / 1e6}


# ---- sides ---------------------------------------------------------------------


@dataclass
class Side:
    name: str
    path: Path
    block: bool = False
    results: dict[str, list[float]] = field(default_factory=dict)

    def record(self, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.results.setdefault(k, []).append(v)


def write_file(path: Path, size: int) -> None:
    chunk = os.urandom(MiB)
    with open(path, "wb") as f:
        for _ in range(size // MiB):
            f.write(chunk)
        os.fsync(f.fileno())


def fs_volume(client, t: Teardown, work: Path, kind: str, s: Settings) -> tuple[Path, Path]:
    """A published volume, and one restored from a snapshot whose lower layer holds lower.bin."""
    cap = mount_capability(fs_type=kind)
    size = max(8 * GiB, 4 * s.size)  # as a pod's claim would be: mostly free (a full fs fragments)
    vol = client.create_volume(f"bench-{kind}", size, cap=cap).volume_id
    stg, tgt = work / f"{kind}-staging", work / f"{kind}-target"
    stg.mkdir()
    t.stage(vol, stg, cap)
    t.publish(vol, stg, tgt, cap)
    src = client.create_volume(f"bench-{kind}-src", size, cap=cap).volume_id
    src_stg = work / f"{kind}-src"
    src_stg.mkdir()
    client.stage(src, src_stg, cap)
    write_file(src_stg / "lower.bin", s.size)
    client.unstage(src, src_stg)
    snap = client.create_snapshot(f"bench-{kind}-snap", src).snapshot_id
    low = client.create_volume(f"bench-{kind}-low", size, cap=cap, snapshot=snap).volume_id
    low_stg = work / f"{kind}-low"
    low_stg.mkdir()
    t.stage(low, low_stg, cap)
    return tgt, low_stg


def block_volume(client, t: Teardown, work: Path, s: Settings) -> Path:
    cap = csi.VolumeCapability(
        block=csi.VolumeCapability.BlockVolume(),
        access_mode=csi.VolumeCapability.AccessMode(mode=csi.VolumeCapability.AccessMode.SINGLE_NODE_WRITER),
    )
    vol = client.create_volume("bench-block", s.size, cap=cap).volume_id
    stg, tgt = work / "block-staging", work / "block-target"
    stg.mkdir()
    t.stage(vol, stg, cap)
    t.publish(vol, stg, tgt, cap)
    return tgt


def run_rounds(sides: tuple[Side, ...], workloads, s: Settings, rounds: int, only: str = "") -> None:
    """Each round runs every workload on every side; the order rotates every round,
    so noise from the rest of the machine falls on all sides alike."""
    workloads = [w for w in workloads if not only or w.__name__ in only.split(",")]
    for r in range(rounds if workloads else 0):
        shift = r % len(sides)
        order = sides[shift:] + sides[:shift]
        for workload in workloads:
            for side in order:
                if side.block:
                    side.record(workload(side.path, s, block=True))
                else:
                    side.record(workload(side.path, s))
        print(f"  round {r + 1}/{rounds} done", flush=True)


def report(title: str, base: Side, vol: Side) -> None:
    if not vol.results:
        return
    print(f"\n{title}: medians of {len(next(iter(vol.results.values())))} interleaved rounds")
    print(f"{'workload':28} {base.name:>14} {vol.name:>14} {'ratio':>7}")
    for key, values in vol.results.items():
        b, v = statistics.median(base.results[key]), statistics.median(values)
        ratio = f"{v / b:.2f}x" if key != "page cache / data" else ""
        print(f"{key:28} {b:14.2f} {v:14.2f} {ratio:>7}")


@dataclass
class Driver:
    """One running driver the volumes are made on; ``where`` names its sides
    ("volume": today's default, "on pool": the pool file)."""

    where: str
    client: object
    teardown: Teardown
    work: Path


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--size-mib", type=int, default=1024)
    p.add_argument("--seconds", type=int, default=8)
    p.add_argument("--files", type=int, default=20000)
    p.add_argument("--kinds", default="ext4,xfs,block")
    p.add_argument("--only", default="", help="comma-separated workload functions, e.g. fsync_write")
    p.add_argument("--pool-file", type=Path, help="also measure on a pool file made at this (new) path")
    p.add_argument("--pool-file-size", type=parse_size, default=parse_size(POOL_FILE_SIZE))
    args = p.parse_args()
    if shutil.which("fio") is None:
        raise SystemExit("fio is not installed (bash scripts/setup.sh --test installs it)")
    if args.pool_file and args.pool_file.exists():
        raise SystemExit(f"{args.pool_file} exists: the bench makes its pool file and removes it after")
    reexec_in_private_namespace()
    s = Settings(args.size_mib * MiB, args.seconds, args.files)
    with ExitStack() as stack:
        drivers = [_driver(stack, "volume")]
        if args.pool_file:
            pool = stack.enter_context(pool_file(args.pool_file, args.pool_file_size))
            drivers.append(_driver(stack, "on pool", **pool))
        measure(drivers, s, args)


def _driver(stack: ExitStack, where: str, **opts) -> Driver:
    # each volume is sized for headroom it never fills (8 GiB for 1 GiB of data), and a
    # pool file admits against the host's free space less its reserve: overprovision
    _server, client, work = stack.enter_context(running_driver(capacity=CapacityPolicy(4.0), **opts))
    teardown = Teardown(client)
    stack.callback(teardown.run)
    return Driver(where, client, teardown, work)


def measure(drivers: list[Driver], s: Settings, args: argparse.Namespace) -> None:
    kinds = args.kinds.split(",")
    work = drivers[0].work
    plain = work / "plain"
    plain.mkdir()
    fs = subprocess.run(["findmnt", "-no", "FSTYPE", "-T", str(work)], capture_output=True, text=True).stdout
    print(
        f"host file system: {work} ({fs.strip()}); data {args.size_mib} MiB, {args.seconds} s per timed run",
        flush=True,
    )
    if len(drivers) > 1:
        print(f"pool file: {args.pool_file} ({args.pool_file_size / GiB:g} GiB, sparse)", flush=True)
    if {"ext4", "xfs"} & set(kinds):
        write_file(plain / "lower.bin", s.size)
    for kind in [k for k in kinds if k in ("ext4", "xfs")]:
        print(f"{kind} volume vs plain directory", flush=True)
        base, lbase = Side("plain dir", plain), Side("plain dir", plain)
        vols, lows = [], []
        for d in drivers:
            tgt, low = fs_volume(d.client, d.teardown, d.work, kind, s)
            vols.append(Side(f"{kind} {d.where}", tgt))
            lows.append(Side(f"{kind} {d.where}", low))
        run_rounds((base, *vols), (seq_write, rand_read, fsync_write, small_files), s, args.rounds, args.only)
        run_rounds((lbase, *lows), (lower_read,), s, args.rounds, args.only)
        for vol, low in zip(vols, lows, strict=True):
            vol.results.update(low.results)
        base.results.update(lbase.results)
        report_all(f"{kind} volume", base, vols)
    if "block" in kinds:
        print("raw block volume vs raw file", flush=True)
        raw = work / "raw.img"
        raw.touch()
        os.truncate(raw, s.size)
        base = Side("raw file", raw, block=True)
        vols = [
            Side(f"block {d.where}", block_volume(d.client, d.teardown, d.work, s), block=True)
            for d in drivers
        ]
        run_rounds((base, *vols), (seq_write, rand_read, fsync_write), s, args.rounds, args.only)
        report_all("block volume", base, vols)


def report_all(title: str, base: Side, vols: list[Side]) -> None:
    """Each volume against the bare side; with a pool file, also the pool file's
    volume against today's default (its ratio is the one issue 26 judges)."""
    report(title, base, vols[0])
    for vol in vols[1:]:
        report(f"{title} on the pool file", base, vol)
        report(f"{title}, pool file against the default", vols[0], vol)


if __name__ == "__main__":
    main()
