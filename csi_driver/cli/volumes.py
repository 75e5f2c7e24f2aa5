"""``overlay-csi volume create|list|get|delete|expand``: CSI controller calls on
volumes, and how a volume (and its condition) is shown."""

from __future__ import annotations

import argparse
from typing import Any

from csi_driver.cli.args import (
    add_capability_options,
    add_command,
    capability,
    client_options,
    parse_kv,
    parse_size,
)
from csi_driver.cli.output import CliError, emit, fields, fmt_bytes, table
from csi_driver.cli.transfer import registry_secrets
from csi_driver.client import Client
from csi_driver.proto import csi_pb2 as csi


def volume_dict(v: csi.Volume) -> dict[str, Any]:
    src = v.content_source.WhichOneof("type") if v.HasField("content_source") else None
    return {
        "volume_id": v.volume_id,
        "capacity_bytes": v.capacity_bytes,
        "content_source": (
            {"snapshot_id": v.content_source.snapshot.snapshot_id}
            if src == "snapshot"
            else {"volume_id": v.content_source.volume.volume_id}
            if src == "volume"
            else None
        ),
        "volume_context": dict(v.volume_context),
        "accessible_topology": [dict(t.segments) for t in v.accessible_topology],
    }


def _source(d: dict[str, Any]) -> str:
    src = d["content_source"]
    return next(iter(src.values())) if src else "-"


def condition_dict(c: csi.VolumeCondition) -> dict[str, Any]:
    return {"abnormal": c.abnormal, "message": c.message}


def condition_text(c: dict[str, Any] | None) -> str:
    if not c:
        return "-"
    return f"ABNORMAL: {c['message']}" if c["abnormal"] else "healthy"


def _volume_table(vols: list[dict[str, Any]]) -> str:
    return table(
        ["VOLUME ID", "CAPACITY", "SOURCE", "PUBLISHED ON", "CONDITION"],
        [
            [
                v["volume_id"],
                fmt_bytes(v["capacity_bytes"]),
                _source(v),
                ",".join(v.get("published_node_ids") or []) or "-",
                condition_text(v.get("condition")),
            ]
            for v in vols
        ],
    )


def cmd_volume_create(args: argparse.Namespace, c: Client) -> int:
    if args.from_snapshot and args.from_volume:
        raise CliError("INVALID_ARGUMENT", "give --from-snapshot or --from-volume, not both")
    req = csi.CreateVolumeRequest(
        name=args.name,
        capacity_range=csi.CapacityRange(required_bytes=args.size, limit_bytes=args.limit),
        volume_capabilities=[capability(args)],
        parameters=parse_kv(args.param, "parameter"),
        secrets=registry_secrets(),  # for a snapshot or an image pulled from a registry
    )
    if args.from_snapshot:
        req.volume_content_source.snapshot.snapshot_id = args.from_snapshot
    if args.from_volume:
        req.volume_content_source.volume.volume_id = args.from_volume
    vol = volume_dict(c.controller.CreateVolume(req, timeout=args.timeout).volume)
    return emit(args, vol, lambda: _volume_table([vol]))


def cmd_volume_list(args: argparse.Namespace, c: Client) -> int:
    vols: list[dict[str, Any]] = []
    token = ""
    while True:
        resp = c.controller.ListVolumes(
            csi.ListVolumesRequest(max_entries=args.page_size, starting_token=token), timeout=args.timeout
        )
        for e in resp.entries:
            d = volume_dict(e.volume)
            d["published_node_ids"] = list(e.status.published_node_ids)
            d["condition"] = (
                condition_dict(e.status.volume_condition) if e.status.HasField("volume_condition") else None
            )
            vols.append(d)
        token = resp.next_token
        if not token:
            break
    return emit(args, vols, lambda: _volume_table(vols))


def cmd_volume_get(args: argparse.Namespace, c: Client) -> int:
    resp = c.controller.ControllerGetVolume(
        csi.ControllerGetVolumeRequest(volume_id=args.volume_id), timeout=args.timeout
    )
    d = volume_dict(resp.volume)
    d["published_node_ids"] = list(resp.status.published_node_ids)
    d["condition"] = (
        condition_dict(resp.status.volume_condition) if resp.status.HasField("volume_condition") else None
    )

    def human() -> str:
        return fields(
            [
                ("volume id", d["volume_id"]),
                ("capacity", f"{fmt_bytes(d['capacity_bytes'])} ({d['capacity_bytes']} bytes)"),
                ("source", _source(d)),
                ("topology", ", ".join(f"{k}={v}" for t in d["accessible_topology"] for k, v in t.items())),
                ("published on", ",".join(d["published_node_ids"]) or "-"),
                ("condition", condition_text(d["condition"])),
            ]
        )

    return emit(args, d, human)


def cmd_volume_delete(args: argparse.Namespace, c: Client) -> int:
    for vid in args.volume_id:
        c.controller.DeleteVolume(csi.DeleteVolumeRequest(volume_id=vid), timeout=args.timeout)
    return emit(args, {"deleted": args.volume_id}, lambda: "\n".join(f"deleted {v}" for v in args.volume_id))


def cmd_volume_expand(args: argparse.Namespace, c: Client) -> int:
    resp = c.controller.ControllerExpandVolume(
        csi.ControllerExpandVolumeRequest(
            volume_id=args.volume_id, capacity_range=csi.CapacityRange(required_bytes=args.size)
        ),
        timeout=args.timeout,
    )
    d = {
        "volume_id": args.volume_id,
        "capacity_bytes": resp.capacity_bytes,
        "node_expansion_required": resp.node_expansion_required,
    }

    def human() -> str:
        line = f"{args.volume_id}: capacity {fmt_bytes(resp.capacity_bytes)}"
        if resp.node_expansion_required:
            line += (
                "\nthe volume is in use: its mounted file system grows at NodeExpandVolume "
                f"(kubelet does it; by hand: overlay-csi node expand {args.volume_id} STAGING_PATH)"
            )
        return line

    return emit(args, d, human)


def add_parser(sub: Any) -> None:
    common = client_options()
    vol = sub.add_parser("volume", help="CSI volumes (controller calls)").add_subparsers(
        dest="volume_command", required=True
    )
    p = add_command(vol, "create", cmd_volume_create, "CreateVolume", common)
    p.add_argument("name")
    p.add_argument("--size", type=parse_size, default=0, help="required bytes, e.g. 10Gi (default: 1Gi)")
    p.add_argument("--limit", type=parse_size, default=0, help="limit bytes")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="e.g. baseLayer=NAME")
    p.add_argument("--from-snapshot", metavar="SNAPSHOT_ID", default="")
    p.add_argument("--from-volume", metavar="VOLUME_ID", default="")
    add_capability_options(p)
    p = add_command(vol, "list", cmd_volume_list, "ListVolumes (every page)", common)
    p.add_argument("--page-size", type=int, default=0)
    p = add_command(vol, "get", cmd_volume_get, "ControllerGetVolume", common)
    p.add_argument("volume_id")
    p = add_command(vol, "delete", cmd_volume_delete, "DeleteVolume", common)
    p.add_argument("volume_id", nargs="+")
    p = add_command(vol, "expand", cmd_volume_expand, "ControllerExpandVolume", common)
    p.add_argument("volume_id")
    p.add_argument("size", type=parse_size)
