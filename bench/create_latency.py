"""CreateVolume latency at 0, 1,000 and 3,000 existing volumes, over gRPC.

Usage: python -m bench.create_latency [--samples 50] [--sizes 0,1000,3000]
"""

from __future__ import annotations

import argparse
import statistics
import time

from bench.common import reexec_in_private_namespace, running_driver

GiB = 1 << 30


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--samples", type=int, default=50)
    p.add_argument("--sizes", default="0,1000,3000")
    args = p.parse_args()
    reexec_in_private_namespace()
    with running_driver() as (_server, client, _work):
        existing = 0
        print(f"{'existing volumes':>17} {'median ms':>10} {'p90 ms':>8}")
        for target in [int(x) for x in args.sizes.split(",")]:
            while existing < target:
                client.create_volume(f"fill-{existing}", GiB)
                existing += 1
            times = []
            for i in range(args.samples):
                t = time.perf_counter()
                vol = client.create_volume(f"probe-{target}-{i}", GiB)
                times.append((time.perf_counter() - t) * 1000)
                client.delete_volume(vol.volume_id)
            times.sort()
            print(f"{target:>17} {statistics.median(times):>10.2f} {times[int(len(times) * 0.9)]:>8.2f}",
                  flush=True)


if __name__ == "__main__":
    main()
