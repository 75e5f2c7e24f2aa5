"""A busy node, over gRPC as the sidecars and kubelet call it: how long a pod waits
for its volume as the node fills up, and what the driver costs at that load.

The driver runs as its own process (``overlay-csi serve``), so its RSS and its
restart are its own. At 0, 100 and 250 volumes staged and published (and, last,
3,000 volumes existing), it measures, as medians of ``--samples`` runs:

- pod start: CreateVolume + NodeStageVolume + NodePublishVolume of a new volume
- teardown: NodeUnpublishVolume + NodeUnstageVolume + DeleteVolume of it
- CreateVolume alone

then ListVolumes of every volume, a restart to Probe-ready (every mount
adopted), the driver's RSS, and 32 concurrent callers staging and publishing
different volumes against one caller doing the same.

Targets (issue 15): pod start <= 10 ms p50 idle and <= 1.2x that at 250 staged
and 3,000 existing, teardown likewise; CreateVolume <= 3 ms; ListVolumes of
3,000 <= 100 ms; restart <= 1 s; RSS <= 60 MB; 32 callers scale with cores.

3,000 volumes of 64 MiB are more than a development VM's disk holds, so the node
is overprovisioned (``--overprovision-ratio``, default 10); its ext4 uppers then
hold their fixed metadata (docs/operations.md, capacity).

Usage: python -m bench.busy_node [--samples 30] [--staged 0,100,250] [--existing 3000]
       [--overprovision-ratio 10] (BENCH_DIR picks the state dir's file system; /var/tmp)
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.common import reexec_in_private_namespace
from csi_driver import host
from csi_driver.client import Client
from csi_driver.proto import csi_pb2 as csi

MiB = 1 << 20


class Node:
    """The driver process, a client, and the kubelet paths of the volumes it uses."""

    def __init__(self, work: Path, ratio: float) -> None:
        self.work = work
        self.ratio = ratio
        self.proc: subprocess.Popen | None = None
        self.client: Client | None = None
        self.n = 0

    def start(self) -> float:
        t = time.perf_counter()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "csi_driver", "serve", "--endpoint", f"unix://{self.work}/csi.sock",
             "--state-dir", str(self.work / "state"), "--node-id", "bench", "--log-level", "warning",
             "--overprovision-ratio", str(self.ratio)],
        )  # fmt: skip
        self.client = Client(self.work / "csi.sock")
        self.client.wait_ready(120)
        while not self.client.identity.Probe(csi.ProbeRequest()).ready.value:
            time.sleep(0.005)
        return time.perf_counter() - t

    def stop(self) -> None:
        assert self.proc is not None and self.client is not None
        self.client.close()
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=60)

    def rss_mb(self) -> float:
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def paths(self, name: str) -> tuple[Path, Path]:
        staging, target = self.work / "staging" / name, self.work / "pods" / name
        staging.mkdir(parents=True, exist_ok=True)
        target.mkdir(parents=True, exist_ok=True)
        return staging, target

    def pod_start(self, name: str) -> tuple[str, float, float]:
        """A new volume up to the pod: (volume id, seconds for all three, for CreateVolume)."""
        c = self.client
        staging, target = self.paths(name)
        t0 = time.perf_counter()
        vid = c.create_volume(name, 64 * MiB).volume_id
        t1 = time.perf_counter()
        c.stage(vid, staging)
        c.publish(vid, staging, target)
        return vid, time.perf_counter() - t0, t1 - t0

    def teardown(self, vid: str, name: str) -> float:
        c = self.client
        staging, target = self.paths(name)
        t = time.perf_counter()
        c.unpublish(vid, target)
        c.unstage(vid, staging)
        c.delete_volume(vid)
        return time.perf_counter() - t


def median_ms(xs: list[float]) -> float:
    return statistics.median(xs) * 1000


def measure(node: Node, samples: int, tag: str) -> dict[str, float]:
    start, create, down = [], [], []
    for i in range(samples):
        name = f"probe-{tag}-{i}"
        vid, t_all, t_create = node.pod_start(name)
        start.append(t_all)
        create.append(t_create)
        down.append(node.teardown(vid, name))
    return {"start": median_ms(start), "teardown": median_ms(down), "create": median_ms(create)}


def fill_staged(node: Node, want: int, have: list[str]) -> None:
    while len(have) < want:
        name = f"staged-{len(have)}"
        vid, _, _ = node.pod_start(name)
        have.append(vid)


def concurrency(node: Node, callers: int, per_caller: int) -> float:
    """Stage+publish operations per second with ``callers`` threads on different volumes."""
    c = node.client
    names = [f"conc-{callers}-{i}" for i in range(callers * per_caller)]
    vids = [c.create_volume(n, 64 * MiB).volume_id for n in names]

    def work(i: int) -> None:
        staging, target = node.paths(names[i])
        c.stage(vids[i], staging)
        c.publish(vids[i], staging, target)

    t = time.perf_counter()
    with ThreadPoolExecutor(callers) as pool:
        list(pool.map(work, range(len(names))))
    rate = len(names) / (time.perf_counter() - t)
    for i, vid in enumerate(vids):
        node.teardown(vid, names[i])
    return rate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=30)
    p.add_argument("--staged", default="0,100,250")
    p.add_argument("--existing", type=int, default=3000)
    p.add_argument("--overprovision-ratio", type=float, default=10.0)
    args = p.parse_args()
    reexec_in_private_namespace()
    work = Path(tempfile.mkdtemp(prefix="overlay-csi-busy-", dir=os.environ.get("BENCH_DIR", "/var/tmp")))
    node = Node(work, args.overprovision_ratio)
    node.start()
    results: dict[str, dict[str, float]] = {}
    staged: list[str] = []
    try:
        for n in [int(x) for x in args.staged.split(",")]:
            fill_staged(node, n, staged)
            results[f"{n} staged"] = measure(node, args.samples, f"s{n}")
            print(f"  measured at {n} staged", file=sys.stderr, flush=True)
        existing = len(staged)
        while existing < args.existing:
            node.client.create_volume(f"idle-{existing}", 64 * MiB)
            existing += 1
        label = f"{len(staged)} staged, {existing} volumes"
        results[label] = measure(node, args.samples, "full")
        lists = []
        for _ in range(5):
            t = time.perf_counter()
            listed = node.client.controller.ListVolumes(csi.ListVolumesRequest()).entries
            lists.append(time.perf_counter() - t)
        rss = node.rss_mb()
        node.stop()
        restart = node.start()
        one = concurrency(node, 1, 32)
        many = concurrency(node, 32, 1)

        cols = list(results)
        print(f"\n{'p50, ms':24}" + "".join(f"{c:>26}" for c in cols))
        for key, label_ in (("start", "pod start (create+stage+publish)"), ("teardown", "teardown"),
                            ("create", "CreateVolume alone")):  # fmt: skip
            print(f"{label_[:24]:24}" + "".join(f"{results[c][key]:>26.1f}" for c in cols))
        print(f"\nListVolumes of {len(listed)}: {median_ms(lists):.0f} ms (median of 5)")
        print(f"restart to Probe-ready with {label}: {restart:.2f} s")
        print(f"driver RSS at {label}: {rss:.0f} MB")
        print(f"stage+publish: {one:.0f}/s with 1 caller, {many:.0f}/s with 32 callers ({many / one:.2f}x)")
    finally:
        if node.proc and node.proc.poll() is None:
            node.stop()
        for m in host.mounts_under(work):
            host.umount(m.target, lazy=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
