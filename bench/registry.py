"""Push and pull throughput of a 1 GiB layer through a real OCI registry,
against copying the same blob with a registry client alone.

A registry (Debian's docker-registry, distribution 2.8) runs on 127.0.0.1 with
its storage on the same disk. Node A's volume holds ``--data-mib`` of random
data in 16 MiB files and is snapshotted once, detached. Each round, interleaved:

- driver push: node A pushes that snapshot to a new repository (the layer is
  exported to an OCI layer tar and hashed, then uploaded: nothing is skipped);
- client push: oras-py's own ``upload_blob`` sends the same tar, already on
  disk, to another new repository;
- driver pull: node B (its own state dir) restores a volume from the pushed
  snapshot: download, sha256 check, the layer built, the volume created; the
  volume is deleted again, and its layers with it;
- client pull: oras-py's ``download_blob`` fetches the same blob to a file.

Medians of ``--rounds`` rounds, in MiB/s of the layer tar, and the driver's
ratio to the client alone. Then a live volume's second export: ``--live-mib``
written to a volume in use, a snapshot exported, 1 MiB more written, a second
snapshot exported, and the bytes each added to the registry (0 skips it).
Usage: python -m bench.registry [--data-mib 1024] [--rounds 3] [--live-mib 128]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import oras.provider

from bench.common import reexec_in_private_namespace, running_driver
from csi_driver.engine.transfers import HashingWriter
from csi_driver.registry.reference import Repository

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from registry_harness import LocalRegistry  # noqa: E402 - the tests' registry runner

MiB = 1 << 20
GiB = 1 << 30


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data-mib", type=int, default=1024)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--live-mib", type=int, default=128)
    args = p.parse_args()
    reexec_in_private_namespace()
    work = Path(tempfile.mkdtemp(prefix="overlay-csi-registry-bench-", dir=os.environ.get("BENCH_DIR")))
    with LocalRegistry(work / "registry") as reg:
        insecure = frozenset({reg.host})
        with (
            running_driver(insecure_registries=insecure) as (a, ca, wa),
            running_driver(insecure_registries=insecure) as (_b, cb, _wb),
        ):
            vol = ca.create_volume("source", args.data_mib * MiB + GiB).volume_id
            staging = wa / "staging"
            staging.mkdir()
            ca.stage(vol, staging)
            for i in range(args.data_mib // 16):
                (staging / f"f{i:03d}").write_bytes(os.urandom(16 * MiB))
            ca.unstage(vol, staging)
            os.sync()
            snap = a.engine.snapshots.create_snapshot("snap", vol)

            # the blob the client alone copies: the same layer tar, exported once
            blob = work / "layer.tar"
            chain = a.engine.chain(snap.layer)
            views = wa / "views"
            views.mkdir()
            with open(blob, "wb") as f:
                out = HashingWriter(f)
                a.engine.backend.export_diff(chain, views, out)  # type: ignore[arg-type]
            digest, size = "sha256:" + out.sha.hexdigest(), out.size
            plain = oras.provider.Registry(hostname=reg.host, insecure=True)
            layer = {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": digest, "size": size}

            kinds = ("driver push", "client push", "driver pull", "client pull")
            times: dict[str, list[float]] = {k: [] for k in kinds}
            for r in range(args.rounds):
                t = time.perf_counter()
                ref = a.engine.transfers.push_snapshot(snap, None, Repository(reg.host, f"bench/driver{r}"))
                times["driver push"].append(time.perf_counter() - t)

                t = time.perf_counter()
                resp = plain.upload_blob(str(blob), f"{reg.host}/bench/client{r}:x", layer)
                times["client push"].append(time.perf_counter() - t)
                assert resp.status_code in (200, 201), resp.status_code

                t = time.perf_counter()
                restored = cb.create_volume(f"restore{r}", args.data_mib * MiB + GiB, snapshot=str(ref))
                times["driver pull"].append(time.perf_counter() - t)
                cb.delete_volume(restored.volume_id)

                out = work / "pulled"
                t = time.perf_counter()
                plain.download_blob(f"{reg.host}/bench/client{r}:x", digest, str(out))
                times["client pull"].append(time.perf_counter() - t)
                out.unlink()
                os.sync()

            print(f"layer tar: {size / MiB:.0f} MiB ({args.data_mib} MiB of files), {args.rounds} rounds")
            med = {k: statistics.median(v) for k, v in times.items()}
            for k, v in times.items():
                runs = ", ".join(f"{x:.2f}" for x in v)
                print(f"{k:12s} median {med[k]:6.2f} s  {size / MiB / med[k]:7.1f} MiB/s  (runs: {runs})")
            for kind in ("push", "pull"):
                ratio = med["driver " + kind] / med["client " + kind]
                print(f"driver / client alone, {kind}: {ratio:.2f}x the time")
            if args.live_mib:
                first, second = live_second_export(reg, ca, wa, args.live_mib)
                print(
                    f"live volume, {args.live_mib} MiB written: first export {first / MiB:.1f} MiB; "
                    f"second export after 1 MiB more: {second / MiB:.2f} MiB"
                )
    shutil.rmtree(work, ignore_errors=True)


def registry_bytes(reg: LocalRegistry, repository: str) -> int:
    """The bytes of every blob linked into ``repository`` of the registry's storage."""
    v2 = reg.root / "docker" / "registry" / "v2"
    total = 0
    for link in (v2 / "repositories" / repository / "_layers" / "sha256").glob("*/link"):
        name = link.parent.name
        total += (v2 / "blobs" / "sha256" / name[:2] / name / "data").stat().st_size
    return total


def live_second_export(reg: LocalRegistry, client, work: Path, data_mib: int) -> tuple[int, int]:
    """The registry bytes added by a volume in use's first export (``data_mib`` written in
    16 MiB files) and by its second one, after 1 MiB more."""
    repo = "bench/live"
    vol = client.create_volume("live", data_mib * MiB + GiB).volume_id
    staging = work / "live"
    staging.mkdir()
    client.stage(vol, staging)
    try:
        for i in range(max(1, data_mib // 16)):
            (staging / f"f{i:03d}").write_bytes(os.urandom(min(16, data_mib) * MiB))
        params = {"repository": f"{reg.host}/{repo}"}
        s1 = client.create_snapshot("live1", vol, parameters=params)
        first = registry_bytes(reg, repo)
        (staging / "more").write_bytes(os.urandom(MiB))
        s2 = client.create_snapshot("live2", vol, parameters=params)
        second = registry_bytes(reg, repo) - first
    finally:
        client.unstage(vol, staging)
    for snap in (s1, s2):
        client.delete_snapshot(snap.snapshot_id)
    client.delete_volume(vol)
    return first, second


if __name__ == "__main__":
    main()
