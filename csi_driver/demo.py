"""``overlay-csi demo``: a live volume's life on embedded defaults.

Runs the real server on a temp socket inside a private mount namespace, then
drives it over gRPC like a kubelet and the sidecars would: create, stage,
publish, write, snapshot, clone, restore; shows the layers and the disk used,
then tears everything down.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from csi_driver import logs

MiB = 1 << 20


def _say(msg: str) -> None:
    print(msg, flush=True)


def run_demo(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        print(
            "overlay-csi demo needs root: it mounts overlay and loop file systems.\n"
            "Run it as root (sudo) on a Linux host with overlayfs and loop devices.",
            file=sys.stderr,
        )
        return 2
    if not args.in_namespace:
        # A private mount namespace: whatever happens, no mount outlives the demo.
        argv = [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            sys.executable,
            "-m",
            "csi_driver",
            "demo",
            "--in-namespace",
            "--size",
            str(args.size),
        ]
        if args.state_dir:
            argv += ["--state-dir", str(args.state_dir)]
        os.execvp("unshare", argv)
    logs.setup(logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="overlay-csi-demo-"))
    state = args.state_dir or work / "state"
    try:
        return _demo(work, Path(state), args.size)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _demo(work: Path, state: Path, size: int) -> int:
    from csi_driver.client import Client
    from csi_driver.server import ServeOptions, Server

    sock = work / "csi.sock"
    server = Server(ServeOptions(endpoint=f"unix://{sock}", state_dir=state, node_id="demo-node"))
    server.start()
    client = Client(sock)
    try:
        client.wait_ready()
        info = client.identity.GetPluginInfo(
            __import__("csi_driver.proto.csi_pb2", fromlist=["x"]).GetPluginInfoRequest()
        )
        _say(f"== {info.name} {info.vendor_version}, state dir {state}")

        t = time.monotonic()
        vol = client.create_volume("demo-data", size)
        _say(
            f"1. CreateVolume demo-data: {vol.volume_id}, {vol.capacity_bytes / 2**30:.2f} GiB "
            f"in {1000 * (time.monotonic() - t):.0f} ms; host disk used: "
            f"{server.engine.disk_usage() / MiB:.1f} MiB"
        )

        staging, target = work / "staging", work / "pod" / "mount"
        staging.mkdir()
        client.stage(vol.volume_id, staging)
        client.publish(vol.volume_id, staging, target)
        _say(f"2. NodeStage + NodePublish: overlay at {staging}, bind-mounted at {target}")

        payload = os.urandom(64 * MiB)
        (target / "data.bin").write_bytes(payload)
        (target / "hello.txt").write_text("written before the snapshot\n")
        os.sync()
        _say("3. the pod wrote 64 MiB data.bin and hello.txt")

        t = time.monotonic()
        snap = client.create_snapshot("demo-snap", vol.volume_id)
        _say(
            f"4. CreateSnapshot of the in-use volume (frozen copy): {snap.snapshot_id}, "
            f"{snap.size_bytes / MiB:.1f} MiB, {1000 * (time.monotonic() - t):.0f} ms"
        )

        (target / "hello.txt").write_text("written after the snapshot\n")
        client.unpublish(vol.volume_id, target)
        client.unstage(vol.volume_id, staging)

        t = time.monotonic()
        clone = client.create_volume("demo-clone", size, volume=vol.volume_id)
        _say(
            f"5. CreateVolume from volume (clone, detached source: O(1) commit): "
            f"{clone.volume_id} in {1000 * (time.monotonic() - t):.0f} ms"
        )
        t = time.monotonic()
        restored = client.create_volume("demo-restore", 2 * size, snapshot=snap.snapshot_id)
        _say(
            f"6. CreateVolume from snapshot (restore, 2x larger): {restored.volume_id} in "
            f"{1000 * (time.monotonic() - t):.0f} ms"
        )

        for name, vid, want in (
            ("clone", clone.volume_id, "written after the snapshot\n"),
            ("restore", restored.volume_id, "written before the snapshot\n"),
        ):
            path = work / f"stage-{name}"
            path.mkdir()
            client.stage(vid, path)
            got = (path / "hello.txt").read_text()
            same = (path / "data.bin").read_bytes() == payload
            usage = client.stats(vid, path).usage[0]  # what kubelet reports for the PVC
            _say(
                f"   {name}: hello.txt = {got.strip()!r} ({'ok' if got == want else 'WRONG'}), "
                f"data.bin {'identical' if same else 'DIFFERENT'}, "
                f"{usage.used / MiB:.0f} MiB used of {usage.total / 2**30:.2f} GiB"
            )
            client.unstage(vid, path)

        _say("7. layers on this node:")
        with server.engine.store.read() as tx:
            users = {x.upper: x.name for x in tx.volumes()}
            snaps = {s.layer: s.name for s in tx.snapshots()}
        for layer in server.engine.layers():
            role = (
                f"upper of {users[layer.id]}"
                if layer.id in users
                else f"snapshot {snaps[layer.id]}"
                if layer.id in snaps
                else "shared"
            )
            _say(
                f"   {layer.id[:12]} parent={str(layer.parent)[:12]:12} depth={layer.depth} "
                f"{'active   ' if layer.active else 'committed'} "
                f"{server.engine.backend.usage(layer) / MiB:7.1f} MiB  {role}"
            )
        provisioned = size * 3 + size
        _say(
            f"8. disk: {provisioned / 2**30:.0f} GiB provisioned across 3 volumes, "
            f"{server.engine.disk_usage() / MiB:.1f} MiB really used on the host"
        )

        for vid in (clone.volume_id, restored.volume_id, vol.volume_id):
            client.delete_volume(vid)
        client.delete_snapshot(snap.snapshot_id)
        left = server.engine.backend.walk()
        _say(f"9. deleted everything: {len(left)} layers left on disk")
        return 0 if not left else 1
    finally:
        client.close()
        server.stop(grace=5)
