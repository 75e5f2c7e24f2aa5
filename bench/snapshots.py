"""Snapshot, restore and clone of a volume holding 1 GiB, over gRPC, with the
extra disk one snapshot + one restore + five clones cost.

Targets (issue 3): snapshot of a detached volume < 0.5 s; restore and clone
< 0.2 s each; the seven objects < 64 MiB extra disk. The reference driver
(csi-driver-host-path) on this machine: 57.7 s, 11.7 s, 2.2 s, 7,339 MiB.

Usage: python -m bench.snapshots [--data-mib 1024]
"""

from __future__ import annotations

import argparse
import os
import time

from bench.common import reexec_in_private_namespace, running_driver

MiB = 1 << 20
GiB = 1 << 30


def host_used(path) -> int:
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data-mib", type=int, default=1024)
    args = p.parse_args()
    reexec_in_private_namespace()
    with running_driver() as (server, client, work):
        vol = client.create_volume("source", 2 * GiB).volume_id
        staging = work / "staging"
        staging.mkdir()
        client.stage(vol, staging)
        chunk = os.urandom(MiB)
        with open(staging / "data.bin", "wb") as f:
            for _ in range(args.data_mib):
                f.write(chunk)
            os.fsync(f.fileno())
        client.unstage(vol, staging)  # detached: the snapshot is a commit
        os.sync()
        base_engine, base_host = server.engine.disk_usage(), host_used(work)

        t = time.perf_counter()
        snap = client.create_snapshot("snap", vol).snapshot_id
        t_snap = time.perf_counter() - t
        t = time.perf_counter()
        client.create_volume("restore", 2 * GiB, snapshot=snap)
        t_restore = time.perf_counter() - t
        t_clones = []
        for i in range(5):
            t = time.perf_counter()
            client.create_volume(f"clone{i}", 2 * GiB, volume=vol)
            t_clones.append(time.perf_counter() - t)
        os.sync()
        extra_engine = server.engine.disk_usage() - base_engine
        extra_host = host_used(work) - base_host

        client.stage(vol, staging)
        t = time.perf_counter()
        client.create_snapshot("snap-live", vol)
        t_live = time.perf_counter() - t
        client.unstage(vol, staging)

        rows = [
            ("snapshot, detached 1 GiB volume", f"{t_snap:.3f} s", "< 0.5 s", "57.7 s"),
            ("restore from that snapshot", f"{t_restore:.3f} s", "< 0.2 s", "11.7 s"),
            ("clone (max of 5)", f"{max(t_clones):.3f} s", "< 0.2 s", "2.2 s"),
            ("extra disk: 1 snap+1 restore+5 clones", f"{extra_engine / MiB:.1f} MiB",
             "< 64 MiB", "7,339 MiB"),
            ("  (host fs used delta)", f"{extra_host / MiB:.1f} MiB", "", ""),
            ("snapshot, staged volume (frozen copy)", f"{t_live:.3f} s", "", ""),
        ]
        print(f"{'measure':40} {'overlay-csi':>12} {'target':>9} {'host-path':>10}")
        for r in rows:
            print(f"{r[0]:40} {r[1]:>12} {r[2]:>9} {r[3]:>10}")


if __name__ == "__main__":
    main()
