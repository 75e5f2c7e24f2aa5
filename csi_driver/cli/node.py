"""``overlay-csi node stage|publish|unpublish|unstage|stats|expand``: CSI node
calls, made by hand as kubelet makes them. Paths are made absolute first."""

from __future__ import annotations

import argparse
import os
from typing import Any

from csi_driver.cli.args import add_capability_options, add_command, capability, client_options, parse_size
from csi_driver.cli.output import emit, fmt_bytes, table
from csi_driver.cli.volumes import condition_dict, condition_text
from csi_driver.client import Client
from csi_driver.proto import csi_pb2 as csi


def _abs(path: str) -> str:
    return os.path.abspath(path)


def cmd_node_stage(args: argparse.Namespace, c: Client) -> int:
    path = _abs(args.staging_path)
    c.node.NodeStageVolume(
        csi.NodeStageVolumeRequest(
            volume_id=args.volume_id, staging_target_path=path, volume_capability=capability(args)
        ),
        timeout=args.timeout,
    )
    return emit(
        args,
        {"volume_id": args.volume_id, "staging_target_path": path},
        lambda: f"staged {args.volume_id} at {path}",
    )


def cmd_node_publish(args: argparse.Namespace, c: Client) -> int:
    staging, target = _abs(args.staging_path), _abs(args.target_path)
    c.node.NodePublishVolume(
        csi.NodePublishVolumeRequest(
            volume_id=args.volume_id,
            staging_target_path=staging,
            target_path=target,
            readonly=args.readonly,
            volume_capability=capability(args),
        ),
        timeout=args.timeout,
    )
    mode = "read-only" if args.readonly else "read-write"
    return emit(
        args,
        {"volume_id": args.volume_id, "target_path": target, "readonly": args.readonly},
        lambda: f"published {args.volume_id} at {target} ({mode})",
    )


def cmd_node_unpublish(args: argparse.Namespace, c: Client) -> int:
    target = _abs(args.target_path)
    c.node.NodeUnpublishVolume(
        csi.NodeUnpublishVolumeRequest(volume_id=args.volume_id, target_path=target), timeout=args.timeout
    )
    return emit(
        args,
        {"volume_id": args.volume_id, "target_path": target},
        lambda: f"unpublished {args.volume_id} from {target}",
    )


def cmd_node_unstage(args: argparse.Namespace, c: Client) -> int:
    path = _abs(args.staging_path)
    c.node.NodeUnstageVolume(
        csi.NodeUnstageVolumeRequest(volume_id=args.volume_id, staging_target_path=path), timeout=args.timeout
    )
    return emit(
        args,
        {"volume_id": args.volume_id, "staging_target_path": path},
        lambda: f"unstaged {args.volume_id} from {path}",
    )


def cmd_node_stats(args: argparse.Namespace, c: Client) -> int:
    path = _abs(args.path)
    resp = c.node.NodeGetVolumeStats(
        csi.NodeGetVolumeStatsRequest(volume_id=args.volume_id, volume_path=path), timeout=args.timeout
    )
    usage = {
        csi.VolumeUsage.Unit.Name(u.unit).lower(): {
            "total": u.total,
            "used": u.used,
            "available": u.available,
        }
        for u in resp.usage
    }
    d = {
        "volume_id": args.volume_id,
        "volume_path": path,
        "usage": usage,
        "condition": condition_dict(resp.volume_condition) if resp.HasField("volume_condition") else None,
    }

    def human() -> str:
        rows = [
            [
                kind.upper(),
                *(fmt_bytes(u[k]) if kind == "bytes" else str(u[k]) for k in ("total", "used", "available")),
            ]
            for kind, u in usage.items()
        ]
        return (
            table(["UNIT", "TOTAL", "USED", "AVAILABLE"], rows)
            + "\ncondition: "
            + condition_text(d["condition"])
        )

    return emit(args, d, human)


def cmd_node_expand(args: argparse.Namespace, c: Client) -> int:
    path = _abs(args.path)
    req = csi.NodeExpandVolumeRequest(volume_id=args.volume_id, volume_path=path)
    if args.size:
        req.capacity_range.required_bytes = args.size
    resp = c.node.NodeExpandVolume(req, timeout=args.timeout)
    return emit(
        args,
        {"volume_id": args.volume_id, "capacity_bytes": resp.capacity_bytes},
        lambda: f"{args.volume_id}: file system at {path} is {fmt_bytes(resp.capacity_bytes)}",
    )


def add_parser(sub: Any) -> None:
    common = client_options()
    node = sub.add_parser("node", help="CSI node calls, as kubelet makes them").add_subparsers(
        dest="node_command", required=True
    )
    p = add_command(node, "stage", cmd_node_stage, "NodeStageVolume", common)
    p.add_argument("volume_id")
    p.add_argument("staging_path")
    add_capability_options(p)
    p = add_command(node, "publish", cmd_node_publish, "NodePublishVolume", common)
    p.add_argument("volume_id")
    p.add_argument("staging_path")
    p.add_argument("target_path")
    p.add_argument("--readonly", action="store_true")
    add_capability_options(p)
    p = add_command(node, "unpublish", cmd_node_unpublish, "NodeUnpublishVolume", common)
    p.add_argument("volume_id")
    p.add_argument("target_path")
    p = add_command(node, "unstage", cmd_node_unstage, "NodeUnstageVolume", common)
    p.add_argument("volume_id")
    p.add_argument("staging_path")
    p = add_command(node, "stats", cmd_node_stats, "NodeGetVolumeStats", common)
    p.add_argument("volume_id")
    p.add_argument("path", help="a staging or target path of the volume")
    p = add_command(node, "expand", cmd_node_expand, "NodeExpandVolume", common)
    p.add_argument("volume_id")
    p.add_argument("path", help="a staging or target path of the volume")
    p.add_argument("size", nargs="?", type=parse_size, default=0)
