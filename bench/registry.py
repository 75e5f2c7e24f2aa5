"""Push and restore of a 1 GiB layer through a real OCI registry, against a plain
upload and a plain download of the same blobs.

A registry (Debian's docker-registry, distribution 2.8) runs on 127.0.0.1 with
its storage on the same disk. Node A's volume holds ``--data-mib`` of random
data in 16 MiB files and is snapshotted once, detached. Each round, interleaved
(the order of driver and plain flipped every round):

- driver push: node A pushes that snapshot to a new repository (the layer is
  exported to an OCI layer tar, hashed and uploaded as it is made, in one chunked
  PATCH: nothing is skipped, nothing spooled);
- plain upload: ``requests`` sends the same tar, already on disk, to another
  new repository (POST, then one monolithic PUT of the file);
- driver restore: node B (its own state dir) restores a volume from the pushed
  snapshot: manifest, the blob read ahead on a thread and hashed as it arrives,
  written into the new layer's image (its writeback started every 8 MiB), the
  digest checked, the layer installed (its image on disk), the volume created;
  the volume is deleted again, and its layers with it;
- plain download: ``requests`` GETs every blob of the same manifest to a file
  in the same state dir's file system; again with an fsync at the end (the
  restored layer is on disk when the restore returns: its image is written
  through a direct-I/O loop device); and, as a floor, to /dev/null.

Page cache is flushed (``sync``) between steps. Medians of ``--rounds`` rounds,
in MiB/s of the layer tar, and the driver's ratio to the plain transfer. Then a
live volume's second export: ``--live-mib`` written to a volume in use, a
snapshot exported, 1 MiB more written, a second snapshot exported, and the
bytes each added to the registry (0 skips it).

``--compression`` measures instead, apart from the figures above, what a
VolumeSnapshotClass's ``compression`` costs and saves: for a compressible dataset
(log-like text lines) and for random data, each ``--data-mib`` in 16 MiB files on
a detached volume snapshotted once, a push with each codec (none, gzip, zstd) to a
new repository (bytes sent: the blob the registry stores; time of the push) and a
restore of it on node B (time).
Usage: python -m bench.registry [--data-mib 1024] [--rounds 3] [--live-mib 128] [--compression]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import BinaryIO

import requests

from bench.common import reexec_in_private_namespace, running_driver
from csi_driver.registry.artifact import EMPTY_CONFIG as EMPTY
from csi_driver.registry.reference import Reference, Repository

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from registry_harness import LocalRegistry  # noqa: E402 - the tests' registry runner

MiB = 1 << 20
GiB = 1 << 30


class HashingWriter:
    """A write-only file that hashes what goes through it (the tar a plain upload sends)."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes | memoryview) -> int:
        n = self._f.write(data)
        self.sha.update(data[:n])
        self.size += n
        return n

    def flush(self) -> None:
        """Nothing is buffered here (a compressor's writer flushes through it)."""


def plain_upload(url: str, path: str, tar: Path, digest: str) -> None:
    """A monolithic upload with requests alone."""
    r = requests.post(f"{url}/v2/{path}/blobs/uploads/", headers={"Content-Length": "0"})
    assert r.status_code == 202, r.status_code
    location = requests.compat.urljoin(url, r.headers["Location"])
    sep = "&" if "?" in location else "?"
    with open(tar, "rb") as f:
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(tar.stat().st_size)}
        r = requests.put(f"{location}{sep}digest={digest}", data=f, headers=headers)
    assert r.status_code == 201, r.status_code


def plain_download(url: str, path: str, digests: list[str], dest: Path | None, durable: bool = False) -> None:
    """Every blob with requests alone, to ``dest`` (a file, overwritten; ``durable``:
    fsync'd before it counts as done) or /dev/null."""
    for digest in digests:
        with requests.get(f"{url}/v2/{path}/blobs/{digest}", stream=True) as r:
            assert r.status_code == 200, r.status_code
            with open(dest if dest is not None else os.devnull, "wb") as out:
                for chunk in r.iter_content(1 << 20):
                    out.write(chunk)
                if durable:
                    os.fsync(out.fileno())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data-mib", type=int, default=1024)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--live-mib", type=int, default=128)
    p.add_argument("--compression", action="store_true", help="only the compression figures")
    args = p.parse_args()
    reexec_in_private_namespace()
    if args.compression:
        compression_figures(args.data_mib)
        return
    work = Path(tempfile.mkdtemp(prefix="overlay-csi-registry-bench-", dir=os.environ.get("BENCH_DIR")))
    with LocalRegistry(work / "registry") as reg:
        insecure = frozenset({reg.host})
        with (
            running_driver(insecure_registries=insecure) as (a, ca, wa),
            running_driver(insecure_registries=insecure) as (b, cb, wb),
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

            # the tar the plain upload sends: the same layer, exported once
            tar = work / "layer.tar"
            chain = a.engine.chain(snap.layer)
            views = wa / "views"
            views.mkdir()
            with open(tar, "wb") as f:
                out = HashingWriter(f)
                a.engine.backend.export_diff(chain, views, out)  # type: ignore[arg-type]
            digest, size = "sha256:" + out.sha.hexdigest(), out.size

            kinds = (
                "driver push",
                "plain upload",
                "driver restore",
                "plain download",
                "plain + fsync",
                "plain to /dev/null",
            )
            times: dict[str, list[float]] = {k: [] for k in kinds}
            blobs = [digest, EMPTY.digest]
            pulled = wb / "pulled"
            refs: dict[int, Reference] = {}

            def step(kind: str, r: int) -> None:
                driver, plain = f"bench/driver{r}", f"bench/plain{r}"
                if kind == "driver push":
                    refs[r] = a.engine.transfers.push_snapshot(snap, None, Repository(reg.host, driver))
                elif kind == "plain upload":
                    plain_upload(reg.url, plain, tar, digest)
                elif kind == "driver restore":
                    cb.create_volume(f"restore{r}", args.data_mib * MiB + GiB, snapshot=str(refs[r]))
                elif kind == "plain to /dev/null":
                    plain_download(reg.url, driver, blobs, None)
                else:
                    plain_download(reg.url, driver, blobs, pulled, durable=kind == "plain + fsync")
                    pulled.unlink()

            for r in range(args.rounds):
                order = list(kinds) if r % 2 == 0 else [kinds[1], kinds[0], *kinds[3:], kinds[2]]
                for kind in order:
                    os.sync()
                    t = time.perf_counter()
                    step(kind, r)
                    times[kind].append(time.perf_counter() - t)
                for v in b.engine.list_volumes(0, 10):
                    cb.delete_volume(v.id)
                os.sync()

            print(f"layer tar: {size / MiB:.0f} MiB ({args.data_mib} MiB of files), {args.rounds} rounds")
            med = {k: statistics.median(v) for k, v in times.items()}
            for k, v in times.items():
                runs = ", ".join(f"{x:.2f}" for x in v)
                print(f"{k:18s} median {med[k]:6.2f} s  {size / MiB / med[k]:7.1f} MiB/s  (runs: {runs})")
            print(f"push / plain upload: {med['driver push'] / med['plain upload']:.2f}x the time")
            restore = med["driver restore"]
            print(f"restore / plain download: {restore / med['plain download']:.2f}x the time")
            print(f"restore / plain download, fsync'd: {restore / med['plain + fsync']:.2f}x")
            print(f"restore / plain download to /dev/null: {restore / med['plain to /dev/null']:.2f}x")
            if args.live_mib:
                first, second = live_second_export(reg, ca, wa, args.live_mib)
                print(
                    f"live volume, {args.live_mib} MiB written: first export {first / MiB:.1f} MiB; "
                    f"second export after 1 MiB more: {second / MiB:.2f} MiB"
                )
    shutil.rmtree(work, ignore_errors=True)


def text_like(size: int, seed: int) -> bytes:
    """``size`` bytes of log-like lines (timestamps, counters, a few words)."""
    lines = []
    n = 0
    words = ("GET /api/v1/orders", "POST /api/v1/users", "GET /healthz", "PUT /api/v1/items")
    while n < size:
        i = seed + len(lines)
        line = f"2026-12-07T{i % 24:02d}:{i % 60:02d}:{i * 7 % 60:02d}.{i % 1000:03d}Z INFO {words[i % 4]} "
        line += f"status=200 bytes={i * 37 % 100000} took={i % 97}ms id={i:012x}\n"
        lines.append(line)
        n += len(line)
    return "".join(lines).encode()[:size]


def compression_figures(data_mib: int) -> None:
    """Bytes sent and time taken by a push with each codec, and the restore's time, for a
    compressible dataset and for random data."""
    work = Path(tempfile.mkdtemp(prefix="overlay-csi-registry-bench-", dir=os.environ.get("BENCH_DIR")))
    rows = []
    with LocalRegistry(work / "registry") as reg:
        insecure = frozenset({reg.host})
        with (
            running_driver(insecure_registries=insecure) as (a, ca, wa),
            running_driver(insecure_registries=insecure) as (_b, cb, _wb),
        ):
            for dataset in ("text", "random"):
                vol = ca.create_volume(dataset, data_mib * MiB + GiB).volume_id
                staging = wa / f"staging-{dataset}"
                staging.mkdir()
                ca.stage(vol, staging)
                for i in range(max(1, data_mib // 16)):
                    data = text_like(16 * MiB, i << 20) if dataset == "text" else os.urandom(16 * MiB)
                    (staging / f"f{i:03d}").write_bytes(data)
                ca.unstage(vol, staging)
                snap = a.engine.snapshots.create_snapshot(f"snap-{dataset}", vol)
                for codec in ("none", "gzip", "zstd"):
                    repo = f"bench/{dataset}-{codec}"
                    os.sync()
                    t = time.perf_counter()
                    ref = a.engine.transfers.push_snapshot(
                        snap, None, Repository(reg.host, repo), compression=codec
                    )
                    pushed = time.perf_counter() - t
                    sent = reg.blob_bytes(repo) - EMPTY.size
                    os.sync()
                    t = time.perf_counter()
                    restored = cb.create_volume(f"r-{repo[6:]}", data_mib * MiB + GiB, snapshot=str(ref))
                    restore = time.perf_counter() - t
                    cb.delete_volume(restored.volume_id)
                    rows.append((dataset, codec, sent, pushed, restore))
                a.engine.snapshots.delete_snapshot(snap.id)
                ca.delete_volume(vol)
    shutil.rmtree(work, ignore_errors=True)
    print(f"{data_mib} MiB of files per dataset, {os.cpu_count()} cores; one run each")
    print(f"{'dataset':8s} {'codec':5s} {'bytes sent':>12s} {'of none':>8s} {'push s':>7s} {'restore s':>9s}")
    plain = {d: sent for d, c, sent, _p, _r in rows if c == "none"}
    for dataset, codec, sent, pushed, restore in rows:
        share = sent / plain[dataset]
        print(f"{dataset:8s} {codec:5s} {sent / MiB:8.1f} MiB {share:7.1%} {pushed:7.2f} {restore:9.2f}")


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
        first = reg.blob_bytes(repo)
        (staging / "more").write_bytes(os.urandom(MiB))
        s2 = client.create_snapshot("live2", vol, parameters=params)
        second = reg.blob_bytes(repo) - first
    finally:
        client.unstage(vol, staging)
    for snap in (s1, s2):
        client.delete_snapshot(snap.snapshot_id)
    client.delete_volume(vol)
    return first, second


if __name__ == "__main__":
    main()
