"""Snapshots of a volume in use: how long they take, how long a pod's writes stall,
what they cost on disk, and whether the restore is byte-identical.

A writer process stands for the pod: it writes 4 KiB and fsyncs every 2 ms into
the published volume and logs when each write returned. Meanwhile two snapshots
are taken over gRPC, one second apart. The stall is the longest gap between two
of the writer's writes while a snapshot ran; the disk cost is what the state
dir's file system lost in free space across each snapshot (after a sync).

Targets (issue 13): <= 0.2 s per snapshot with 1 GiB and with 10 GiB of data,
the writer stalls <= 100 ms, <= 16 MiB of disk per snapshot plus what is
written after it, and the restore byte-identical.

Usage: python -m bench.live_snapshot --state-dir DIR [--data-gib 1]
       python -m bench.live_snapshot --pool-device /dev/loopN [--data-gib 1]
       python -m bench.live_snapshot --pool-file PATH [--pool-file-size 64Gi] [--data-gib 1]
The state dir's file system is what is measured: put DIR on ext4, on xfs
(reflink=1) or btrfs; ``--pool-device`` formats (if empty) and mounts a disk
the way ``overlay-csi serve --pool-device`` does; with ``--pool-file`` the
driver makes a new pool file at PATH as ``serve --pool-file`` does, and the
bench removes it all at the end.
The disk cost is what the state dir's file system lost; with a pool file also
what the pool file grew by on the host (its allocated blocks).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from bench.common import POOL_FILE_SIZE, pool_file, reexec_in_private_namespace
from csi_driver import host
from csi_driver.cli.args import parse_size
from csi_driver.client import Client
from csi_driver.server import ServeOptions, Server

MiB = 1 << 20
GiB = 1 << 30

WRITER = r"""
import os, sys, time
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT, 0o644)
block = b"w" * 4096
stamps = []
i = 0
while not os.path.exists(sys.argv[2]):
    os.pwrite(fd, block, (i % 1024) * 4096)
    os.fsync(fd)
    stamps.append(time.monotonic())
    i += 1
    time.sleep(0.002)
with open(sys.argv[3], "w") as f:
    f.write("\n".join(repr(t) for t in stamps))
"""


def free_bytes(path: Path) -> int:
    os.sync()
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def pool_file_bytes(args: argparse.Namespace) -> int:
    """What the pool file holds on the host (0 without one), after a sync."""
    if not args.pool_file:
        return 0
    os.sync()
    return host.allocated_bytes(args.pool_file)


def fs_type(path: Path) -> str:
    real = str(path.resolve())
    entry = max(
        (m for m in host.mounts() if real == m.target or real.startswith(m.target.rstrip("/") + "/")),
        key=lambda m: len(m.target),
    )
    return entry.fstype


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 * MiB):
            h.update(chunk)
    return h.hexdigest()


def longest_gap(stamps: list[float], start: float, end: float) -> float:
    """The longest time without a completed write that overlaps [start, end]."""
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False) if b >= start and a <= end]
    return max(gaps, default=0.0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--state-dir", type=Path, help="a directory on the file system to measure")
    where.add_argument("--pool-device", help="a disk (or loop device) for the driver to format and mount")
    where.add_argument("--pool-file", type=Path, help="a new pool file to make here (removed after)")
    p.add_argument("--pool-file-size", type=parse_size, default=parse_size(POOL_FILE_SIZE))
    p.add_argument("--data-gib", type=float, default=1.0)
    args = p.parse_args()
    if args.pool_file and args.pool_file.exists():
        raise SystemExit(f"{args.pool_file} exists: the bench makes its pool file and removes it after")
    reexec_in_private_namespace()
    with ExitStack() as stack:
        pool = {"pool_device": args.pool_device or ""}
        if args.pool_file:
            pool = stack.enter_context(pool_file(args.pool_file, args.pool_file_size))
        measure(args, pool)


def measure(args: argparse.Namespace, pool: dict[str, object]) -> None:
    work = Path(tempfile.mkdtemp(prefix="overlay-csi-live-"))
    state = (args.state_dir / f"live-snapshot-{os.getpid()}") if args.state_dir else work / "pool"
    opts = ServeOptions(
        endpoint=f"unix://{work}/csi.sock",
        state_dir=state,
        node_id="bench",
        **pool,
        max_live_snapshot_copy=0,  # a state dir that cannot clone: measure the copy, however long
    )
    server = Server(opts)
    server.start()
    client = Client(work / "csi.sock")
    client.wait_ready()
    data = int(args.data_gib * GiB)
    try:
        vol = client.create_volume("live", data + GiB).volume_id
        staging, target = work / "staging", work / "target"
        staging.mkdir()
        client.stage(vol, staging)
        client.publish(vol, staging, target)
        chunk = os.urandom(MiB)
        with open(target / "data.bin", "wb") as f:
            for _ in range(data // MiB):
                f.write(chunk)
            os.fsync(f.fileno())
        digest = sha256(target / "data.bin")

        stop, log = work / "stop", work / "stamps"
        writer = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(target / "pod.log"), str(stop), str(log)]
        )
        time.sleep(1)
        rows = []
        snaps = []
        for name in ("first", "second"):
            before, host_before = free_bytes(state), pool_file_bytes(args)
            t0 = time.monotonic()
            snaps.append(client.create_snapshot(name, vol).snapshot_id)
            t1 = time.monotonic()
            time.sleep(1)  # the pod goes on writing: that is in the next snapshot's cost
            rows.append((name, t0, t1, before - free_bytes(state), pool_file_bytes(args) - host_before))
        stop.touch()
        writer.wait(timeout=30)
        stamps = [float(x) for x in log.read_text().split()]

        restored = client.create_volume("restored", data + GiB, snapshot=snaps[0]).volume_id
        rstaging = work / "rstaging"
        rstaging.mkdir()
        client.stage(restored, rstaging)
        identical = sha256(rstaging / "data.bin") == digest
        client.unstage(restored, rstaging)
        client.unpublish(vol, target)
        client.unstage(vol, staging)
        for v in (restored, vol):  # a pool device keeps its state: leave it empty
            client.delete_volume(v)
        for s in snaps:
            client.delete_snapshot(s)

        kind = f"pool device ({fs_type(state)})" if args.pool_device else fs_type(state)
        kind = f"pool file {args.pool_file} ({fs_type(state)})" if args.pool_file else kind
        print(f"state dir on {kind}, {args.data_gib:g} GiB of data, writer: 4 KiB + fsync every 2 ms")
        print(f"{'snapshot':8} {'time':>8} {'longest stall':>14} {'disk cost':>10}")
        for name, t0, t1, cost, host_cost in rows:
            stall = longest_gap(stamps, t0, t1)
            grown = f"   pool file grew {host_cost / MiB:.1f} MiB" if args.pool_file else ""
            print(f"{name:8} {t1 - t0:>7.3f}s {stall * 1000:>11.0f} ms {cost / MiB:>7.1f} MiB{grown}")
        print(f"restore of the first byte-identical: {'yes' if identical else 'NO'}")
    finally:
        client.close()
        server.stop(grace=5)
        for m in host.mounts_under(work):
            host.umount(m.target, lazy=True)
        if args.state_dir:
            for m in host.mounts_under(state):
                host.umount(m.target, lazy=True)
            shutil.rmtree(state, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
