"""CreateVolume latency at 0, 1,000 and 3,000 existing volumes, over gRPC.

3,000 volumes of 64 MiB are more than a development VM's disk holds at their
full size, so the node is overprovisioned (``--overprovision-ratio``, default 10),
as such a node would be in production; its ext4 uppers then hold their fixed
metadata (5.3 MiB each; docs/operations.md, capacity).

Usage: python -m bench.create_latency [--samples 50] [--sizes 0,1000,3000]
       [--size-mib 64] [--overprovision-ratio 10]
"""

from __future__ import annotations

import argparse
import statistics
import time

from bench.common import reexec_in_private_namespace, running_driver
from csi_driver.engine.capacity import CapacityPolicy


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--samples", type=int, default=50)
    p.add_argument("--sizes", default="0,1000,3000")
    p.add_argument("--size-mib", type=int, default=64)
    p.add_argument("--overprovision-ratio", type=float, default=10.0)
    args = p.parse_args()
    size = args.size_mib << 20
    reexec_in_private_namespace()
    with running_driver(capacity=CapacityPolicy(args.overprovision_ratio)) as (_server, client, _work):
        existing = 0
        print(f"{'existing volumes':>17} {'median ms':>10} {'p90 ms':>8}")
        for target in [int(x) for x in args.sizes.split(",")]:
            while existing < target:
                client.create_volume(f"fill-{existing}", size)
                existing += 1
            times = []
            for i in range(args.samples):
                t = time.perf_counter()
                vol = client.create_volume(f"probe-{target}-{i}", size)
                times.append((time.perf_counter() - t) * 1000)
                client.delete_volume(vol.volume_id)
            times.sort()
            print(f"{target:>17} {statistics.median(times):>10.2f} {times[int(len(times) * 0.9)]:>8.2f}",
                  flush=True)


if __name__ == "__main__":
    main()
