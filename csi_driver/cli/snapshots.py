"""``overlay-csi snapshot create|list|get|delete``: CSI controller calls on
snapshots, and how a snapshot is shown."""

from __future__ import annotations

import argparse
from typing import Any

from csi_driver.cli.args import add_command, client_options, parse_kv
from csi_driver.cli.output import emit, fmt_bytes, fmt_time, table
from csi_driver.cli.transfer import add_snapshot_transfer, registry_secrets
from csi_driver.client import Client
from csi_driver.proto import csi_pb2 as csi


def snapshot_dict(s: csi.Snapshot) -> dict[str, Any]:
    return {
        "snapshot_id": s.snapshot_id,
        "source_volume_id": s.source_volume_id,
        "size_bytes": s.size_bytes,
        "creation_time": fmt_time(s.creation_time.ToNanoseconds() / 1e9)
        if s.HasField("creation_time")
        else "",
        "ready_to_use": s.ready_to_use,
        "group_snapshot_id": s.group_snapshot_id,
    }


def _snapshot_table(snaps: list[dict[str, Any]]) -> str:
    return table(
        ["SNAPSHOT ID", "SOURCE VOLUME", "SIZE", "READY", "CREATED"],
        [
            [
                s["snapshot_id"],
                s["source_volume_id"],
                fmt_bytes(s["size_bytes"]),
                "yes" if s["ready_to_use"] else "no",
                s["creation_time"],
            ]
            for s in snaps
        ],
    )


def cmd_snapshot_create(args: argparse.Namespace, c: Client) -> int:
    snap = c.controller.CreateSnapshot(
        csi.CreateSnapshotRequest(
            name=args.name,
            source_volume_id=args.volume_id,
            parameters=parse_kv(args.param, "parameter"),
            secrets=registry_secrets(),  # for --param repository=...
        ),
        timeout=args.timeout,
    ).snapshot
    d = snapshot_dict(snap)
    return emit(args, d, lambda: _snapshot_table([d]))


def cmd_snapshot_list(args: argparse.Namespace, c: Client) -> int:
    snaps: list[dict[str, Any]] = []
    token = ""
    while True:
        resp = c.controller.ListSnapshots(
            csi.ListSnapshotsRequest(
                max_entries=args.page_size,
                starting_token=token,
                source_volume_id=args.volume or "",
                snapshot_id=args.id or "",
            ),
            timeout=args.timeout,
        )
        snaps += [snapshot_dict(e.snapshot) for e in resp.entries]
        token = resp.next_token
        if not token:
            break
    return emit(args, snaps, lambda: _snapshot_table(snaps))


def cmd_snapshot_get(args: argparse.Namespace, c: Client) -> int:
    snap = c.controller.GetSnapshot(
        csi.GetSnapshotRequest(snapshot_id=args.snapshot_id), timeout=args.timeout
    ).snapshot
    d = snapshot_dict(snap)
    return emit(args, d, lambda: _snapshot_table([d]))


def cmd_snapshot_delete(args: argparse.Namespace, c: Client) -> int:
    for sid in args.snapshot_id:
        c.controller.DeleteSnapshot(
            csi.DeleteSnapshotRequest(snapshot_id=sid, secrets=registry_secrets()), timeout=args.timeout
        )
    return emit(
        args, {"deleted": args.snapshot_id}, lambda: "\n".join(f"deleted {s}" for s in args.snapshot_id)
    )


def add_parser(sub: Any) -> None:
    common = client_options()
    snap = sub.add_parser("snapshot", help="CSI snapshots").add_subparsers(
        dest="snapshot_command", required=True
    )
    p = add_command(snap, "create", cmd_snapshot_create, "CreateSnapshot", common)
    p.add_argument("name")
    p.add_argument("volume_id", help="the source volume")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE")
    p = add_command(snap, "list", cmd_snapshot_list, "ListSnapshots (every page)", common)
    p.add_argument("--volume", help="only snapshots of this source volume")
    p.add_argument("--id", help="only this snapshot")
    p.add_argument("--page-size", type=int, default=0)
    p = add_command(snap, "get", cmd_snapshot_get, "GetSnapshot", common)
    p.add_argument("snapshot_id")
    p = add_command(snap, "delete", cmd_snapshot_delete, "DeleteSnapshot", common)
    p.add_argument("snapshot_id", nargs="+")
    add_snapshot_transfer(snap)
