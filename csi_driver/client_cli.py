"""Operator commands: talk to a running driver's socket (as ``csc`` does for Go
drivers) and manage the node's base layers.

``info``, ``volume``, ``snapshot`` and ``node`` are CSI calls over
``--endpoint`` (default ``$CSI_ENDPOINT`` or ``unix:///csi/csi.sock``).
``layer`` works on the state dir directly (layers have no CSI call). Output is
a human table by default and JSON with ``--json``; an error is one line on
stderr, ``error: CODE: message``, with exit status 1.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import grpc

from csi_driver.client import Client, mount_capability
from csi_driver.proto import csi_pb2 as csi

DEFAULT_ENDPOINT = "unix:///csi/csi.sock"
COMMANDS = ("info", "volume", "snapshot", "node", "layer")
AccessMode = csi.VolumeCapability.AccessMode
ACCESS_MODES = {
    AccessMode.Mode.Name(m).lower().replace("_", "-"): m
    for m in AccessMode.Mode.values()
    if m != AccessMode.UNKNOWN
}


class CliError(Exception):
    """A failure to report as ``error: CODE: message``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


# ---------------------------------------------------------------- formatting


def fmt_bytes(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    for unit, shift in (("PiB", 50), ("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            v = n / (1 << shift)
            return f"{v:.0f} {unit}" if v == int(v) else f"{v:.1f} {unit}"
    return f"{n} B"  # unreachable


def fmt_time(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(c) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    lines = [[h.ljust(w) for h, w in zip(headers, widths, strict=True)]]
    lines += [[c.ljust(w) for c, w in zip(r, widths, strict=True)] for r in cells]
    return "\n".join("  ".join(line).rstrip() for line in lines)


def fields(pairs: Sequence[tuple[str, Any]]) -> str:
    width = max(len(k) for k, _ in pairs)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in pairs)


def emit(args: argparse.Namespace, data: Any, human: Callable[[], str]) -> int:
    if args.json:
        json.dump(data, sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
    else:
        text = human()
        if text:
            print(text)
    return 0


# ---------------------------------------------------------------- messages -> dicts


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


def _condition(c: csi.VolumeCondition) -> dict[str, Any]:
    return {"abnormal": c.abnormal, "message": c.message}


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


def _snapshot_rows(snaps: list[dict[str, Any]]) -> str:
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


def parse_kv(items: list[str], what: str) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CliError("INVALID_ARGUMENT", f"{what} {item!r} is not KEY=VALUE")
        out[key] = value
    return out


def capability(args: argparse.Namespace) -> csi.VolumeCapability:
    mode = ACCESS_MODES[args.access_mode]
    if args.block:
        return csi.VolumeCapability(
            block=csi.VolumeCapability.BlockVolume(), access_mode=AccessMode(mode=mode)
        )
    return mount_capability(mode, args.fs_type, list(args.mount_flag))


def _abs(path: str) -> str:
    return os.path.abspath(path)


# ---------------------------------------------------------------- connecting


def connect(args: argparse.Namespace) -> Client:
    endpoint = args.endpoint
    if not endpoint.startswith("unix://"):
        raise CliError("INVALID_ARGUMENT", f"endpoint {endpoint!r} must be unix:///path/to/csi.sock")
    path = endpoint[len("unix://") :]
    if not os.path.exists(path):
        raise CliError(
            "UNAVAILABLE",
            f"no driver socket at {path} (is the driver running? set --endpoint or CSI_ENDPOINT)",
        )
    return Client(path, timeout=args.timeout)


def _optional(call: Callable[[], Any]) -> Any:
    """None when the driver does not serve that service (e.g. controller-expand mode)."""
    try:
        return call()
    except grpc.RpcError as e:
        if e.code() is grpc.StatusCode.UNIMPLEMENTED:
            return None
        raise


# ---------------------------------------------------------------- info


def cmd_info(args: argparse.Namespace, c: Client) -> int:
    t = args.timeout
    plugin = c.identity.GetPluginInfo(csi.GetPluginInfoRequest(), timeout=t)
    caps = c.identity.GetPluginCapabilities(csi.GetPluginCapabilitiesRequest(), timeout=t)
    probe = c.identity.Probe(csi.ProbeRequest(), timeout=t)
    plugin_caps = []
    for cap in caps.capabilities:
        if cap.HasField("service"):
            plugin_caps.append(csi.PluginCapability.Service.Type.Name(cap.service.type))
        elif cap.HasField("volume_expansion"):
            name = csi.PluginCapability.VolumeExpansion.Type.Name(cap.volume_expansion.type)
            plugin_caps.append(f"{name}_EXPANSION")
    ctrl = _optional(
        lambda: c.controller.ControllerGetCapabilities(csi.ControllerGetCapabilitiesRequest(), timeout=t)
    )
    node_caps = _optional(lambda: c.node.NodeGetCapabilities(csi.NodeGetCapabilitiesRequest(), timeout=t))
    node = _optional(lambda: c.node.NodeGetInfo(csi.NodeGetInfoRequest(), timeout=t))
    capacity = None
    if ctrl is not None and any(
        x.rpc.type == csi.ControllerServiceCapability.RPC.GET_CAPACITY for x in ctrl.capabilities
    ):
        capacity = c.controller.GetCapacity(csi.GetCapacityRequest(), timeout=t)
    data: dict[str, Any] = {
        "name": plugin.name,
        "vendor_version": plugin.vendor_version,
        "ready": probe.ready.value if probe.HasField("ready") else True,
        "plugin_capabilities": plugin_caps,
        "controller_capabilities": (
            [csi.ControllerServiceCapability.RPC.Type.Name(x.rpc.type) for x in ctrl.capabilities]
            if ctrl is not None
            else None
        ),
        "node_capabilities": (
            [csi.NodeServiceCapability.RPC.Type.Name(x.rpc.type) for x in node_caps.capabilities]
            if node_caps is not None
            else None
        ),
        "node": (
            {
                "node_id": node.node_id,
                "max_volumes_per_node": node.max_volumes_per_node,
                "topology": dict(node.accessible_topology.segments),
            }
            if node is not None
            else None
        ),
        "capacity": (
            {
                "available_capacity": capacity.available_capacity,
                "maximum_volume_size": capacity.maximum_volume_size.value,
                "minimum_volume_size": capacity.minimum_volume_size.value,
            }
            if capacity is not None
            else None
        ),
    }

    def human() -> str:
        rows: list[tuple[str, Any]] = [
            ("driver", f"{data['name']} {data['vendor_version']}"),
            ("ready", "yes" if data["ready"] else "NO"),
        ]
        if node is not None:
            limit = node.max_volumes_per_node or "no limit"
            topo = ", ".join(f"{k}={v}" for k, v in data["node"]["topology"].items())
            rows += [("node", f"{node.node_id} (max volumes: {limit})"), ("topology", topo or "-")]
        if capacity is not None:
            cap = data["capacity"]
            rows.append(
                (
                    "capacity",
                    f"{fmt_bytes(cap['available_capacity'])} available, volumes "
                    f"{fmt_bytes(cap['minimum_volume_size'])} to {fmt_bytes(cap['maximum_volume_size'])}",
                )
            )
        rows.append(("plugin", ", ".join(plugin_caps)))
        ctrl_list = data["controller_capabilities"]
        node_list = data["node_capabilities"]
        rows.append(("controller", ", ".join(ctrl_list) if ctrl_list is not None else "(not served)"))
        rows.append(("node service", ", ".join(node_list) if node_list is not None else "(not served)"))
        return fields(rows)

    return emit(args, data, human)


# ---------------------------------------------------------------- volumes


def _volume_table(vols: list[dict[str, Any]]) -> str:
    return table(
        ["VOLUME ID", "CAPACITY", "SOURCE", "PUBLISHED ON", "CONDITION"],
        [
            [
                v["volume_id"],
                fmt_bytes(v["capacity_bytes"]),
                _source(v),
                ",".join(v.get("published_node_ids") or []) or "-",
                _condition_text(v.get("condition")),
            ]
            for v in vols
        ],
    )


def _condition_text(c: dict[str, Any] | None) -> str:
    if not c:
        return "-"
    return f"ABNORMAL: {c['message']}" if c["abnormal"] else "healthy"


def cmd_volume_create(args: argparse.Namespace, c: Client) -> int:
    if args.from_snapshot and args.from_volume:
        raise CliError("INVALID_ARGUMENT", "give --from-snapshot or --from-volume, not both")
    req = csi.CreateVolumeRequest(
        name=args.name,
        capacity_range=csi.CapacityRange(required_bytes=args.size, limit_bytes=args.limit),
        volume_capabilities=[capability(args)],
        parameters=parse_kv(args.param, "parameter"),
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
                _condition(e.status.volume_condition) if e.status.HasField("volume_condition") else None
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
        _condition(resp.status.volume_condition) if resp.status.HasField("volume_condition") else None
    )

    def human() -> str:
        return fields(
            [
                ("volume id", d["volume_id"]),
                ("capacity", f"{fmt_bytes(d['capacity_bytes'])} ({d['capacity_bytes']} bytes)"),
                ("source", _source(d)),
                ("topology", ", ".join(f"{k}={v}" for t in d["accessible_topology"] for k, v in t.items())),
                ("published on", ",".join(d["published_node_ids"]) or "-"),
                ("condition", _condition_text(d["condition"])),
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


# ---------------------------------------------------------------- snapshots


def cmd_snapshot_create(args: argparse.Namespace, c: Client) -> int:
    snap = c.controller.CreateSnapshot(
        csi.CreateSnapshotRequest(
            name=args.name, source_volume_id=args.volume_id, parameters=parse_kv(args.param, "parameter")
        ),
        timeout=args.timeout,
    ).snapshot
    d = snapshot_dict(snap)
    return emit(args, d, lambda: _snapshot_rows([d]))


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
    return emit(args, snaps, lambda: _snapshot_rows(snaps))


def cmd_snapshot_get(args: argparse.Namespace, c: Client) -> int:
    snap = c.controller.GetSnapshot(
        csi.GetSnapshotRequest(snapshot_id=args.snapshot_id), timeout=args.timeout
    ).snapshot
    d = snapshot_dict(snap)
    return emit(args, d, lambda: _snapshot_rows([d]))


def cmd_snapshot_delete(args: argparse.Namespace, c: Client) -> int:
    for sid in args.snapshot_id:
        c.controller.DeleteSnapshot(csi.DeleteSnapshotRequest(snapshot_id=sid), timeout=args.timeout)
    return emit(
        args, {"deleted": args.snapshot_id}, lambda: "\n".join(f"deleted {s}" for s in args.snapshot_id)
    )


# ---------------------------------------------------------------- node


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
        "condition": _condition(resp.volume_condition) if resp.HasField("volume_condition") else None,
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
            + _condition_text(d["condition"])
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


# ---------------------------------------------------------------- layers (state dir, no socket)


class ImportProgress(threading.Thread):
    """Reports a layer import's progress on ``stream`` every ``interval`` seconds.

    It watches from the outside, so the engine needs no hook: while the archive
    is being read, its file offset (``/proc/self/fdinfo``) against its size;
    then the bytes the new layer image holds against the extracted data.
    """

    def __init__(self, source: Path, tmp_dir: Path, interval: float, stream: TextIO) -> None:
        super().__init__(name="import-progress", daemon=True)
        self.source = os.path.realpath(source)
        self.is_file = os.path.isfile(self.source)
        self.total = os.path.getsize(self.source) if self.is_file else 0
        self.tmp_dir = tmp_dir
        self.interval = interval
        self.stream = stream
        self.tty = stream.isatty()
        self.started = time.monotonic()
        self._done = threading.Event()
        self._data_bytes: dict[str, int] = {}
        self.reported = 0

    def run(self) -> None:
        while not self._done.wait(self.interval):
            self.report(self.status())

    def stop(self) -> None:
        self._done.set()
        self.join(timeout=5)
        if self.tty and self.reported:
            self.stream.write("\r\x1b[K")
            self.stream.flush()

    def report(self, line: str) -> None:
        elapsed = time.monotonic() - self.started
        text = f"{line} [{elapsed:.0f}s]"
        if self.tty:
            self.stream.write("\r\x1b[K" + text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()
        self.reported += 1

    def _archive_offset(self) -> int | None:
        try:
            fds = os.listdir("/proc/self/fd")
        except OSError:
            return None
        for fd in fds:
            try:
                if os.readlink(f"/proc/self/fd/{fd}") != self.source:
                    continue
                with open(f"/proc/self/fdinfo/{fd}") as f:
                    for line in f:
                        if line.startswith("pos:"):
                            return int(line.split()[1])
            except (OSError, ValueError):
                continue
        return None

    def _scratch(self) -> Path | None:
        dirs = [Path(p) for p in glob.glob(str(self.tmp_dir / "*"))]
        dirs = [d for d in dirs if (d / "root").is_dir()]
        return max(dirs, key=lambda d: d.stat().st_mtime, default=None)

    def _data_size(self, upper: Path) -> int:
        key = str(upper)
        if key not in self._data_bytes:
            total = 0
            for root, _dirs, files in os.walk(upper):
                for name in files:
                    try:
                        total += os.lstat(os.path.join(root, name)).st_blocks * 512
                    except OSError:
                        pass
            self._data_bytes[key] = total
        return self._data_bytes[key]

    def status(self) -> str:
        if self.is_file:
            pos = self._archive_offset()
            if pos is not None and self.total:
                rate = pos / max(time.monotonic() - self.started, 1e-3)
                pct = min(100.0, 100.0 * pos / self.total)
                return (
                    f"extracting {os.path.basename(self.source)}: {pct:5.1f}% "
                    f"({fmt_bytes(pos)} of {fmt_bytes(self.total)}, {fmt_bytes(int(rate))}/s)"
                )
        scratch = self._scratch()
        image = scratch / "layer" / "image" if scratch else None
        if scratch is None or image is None or not image.exists():
            return "preparing"
        written = os.stat(image).st_blocks * 512
        data = self._data_size(scratch / "root" / "upper")
        pct = min(99.0, 100.0 * written / data) if data else 0.0
        return f"writing layer image: {pct:5.1f}% ({fmt_bytes(written)} of ~{fmt_bytes(data)})"


def _layer_engine(args: argparse.Namespace, create: bool = False) -> Any:
    from csi_driver import logs
    from csi_driver.engine.engine import Engine, EngineConfig

    if not create and not (args.state_dir / "state.db").exists():
        raise CliError("NOT_FOUND", f"no overlay-csi state in {args.state_dir} (wrong --state-dir?)")
    import logging

    logs.setup(logging.WARNING)
    return Engine(EngineConfig(state_dir=args.state_dir, node_id=os.uname().nodename))


def _layer_dict(x: Any, disk: int) -> dict[str, Any]:
    return {
        "id": x.id,
        "name": x.name,
        "parent": x.parent,
        "state": "active" if x.active else ("base" if x.name else "committed"),
        "fs_type": x.fs_type,
        "depth": x.depth,
        "image_bytes": x.image_bytes,
        "allocated_bytes": disk,
        "created": fmt_time(x.created_at),
    }


def cmd_layer_import(args: argparse.Namespace) -> int:
    from csi_driver.service.validate import LAYER_NAME_RE

    if not LAYER_NAME_RE.match(args.name):
        raise CliError(
            "INVALID_ARGUMENT", "layer names are [a-zA-Z0-9._-], at most 63, starting alphanumeric"
        )
    if not args.path.exists():
        raise CliError("NOT_FOUND", f"{args.path} does not exist")
    engine = _layer_engine(args, create=True)
    progress = None
    if not args.no_progress:
        interval = args.progress_interval or (1.0 if sys.stderr.isatty() else 5.0)
        progress = ImportProgress(args.path, engine.layout.tmp, interval, sys.stderr)
        progress.start()
    start = time.monotonic()
    try:
        layer = engine.import_layer(args.name, args.path)
    finally:
        if progress:
            progress.stop()
        engine.close()
    took = time.monotonic() - start
    d = _layer_dict(layer, layer.used_bytes)
    d["seconds"] = round(took, 3)
    return emit(
        args,
        d,
        lambda: (
            f"imported {args.name}: layer {layer.id}, {fmt_bytes(layer.used_bytes)} on disk in {took:.1f}s"
        ),
    )


def cmd_layer_list(args: argparse.Namespace) -> int:
    from csi_driver.engine import host

    engine = _layer_engine(args)
    try:
        layers = engine.layers()
        rows = [_layer_dict(x, host.allocated_bytes(engine.layout.image(x.id))) for x in layers]
    finally:
        engine.close()
    return emit(
        args,
        rows,
        lambda: table(
            ["NAME", "ID", "PARENT", "DEPTH", "STATE", "FS", "IMAGE", "ON DISK"],
            [
                [
                    r["name"] or "-",
                    r["id"],
                    (r["parent"] or "-")[:12],
                    r["depth"],
                    r["state"],
                    r["fs_type"],
                    fmt_bytes(r["image_bytes"]),
                    fmt_bytes(r["allocated_bytes"]),
                ]
                for r in rows
            ],
        ),
    )


def cmd_layer_inspect(args: argparse.Namespace) -> int:
    from csi_driver.engine import host

    engine = _layer_engine(args)
    try:
        with engine.store.tx() as tx:
            layer = tx.layer_by_name(args.layer)
            if layer is None and len(args.layer) == 32:
                layer = tx.layer(args.layer)
            if layer is None:
                raise CliError("NOT_FOUND", f"layer {args.layer!r} does not exist (by name or id)")
            chain = tx.chain(layer.id)
            # every layer stacked on this one, then who uses those
            above = (
                "WITH RECURSIVE d(id) AS (SELECT ? UNION SELECT l.id FROM layers l JOIN d ON l.parent = d.id)"
            )
            volumes = [
                r[0]
                for r in tx.c.execute(
                    above + " SELECT v.id FROM volumes v WHERE v.upper IN d ORDER BY v.seq", (layer.id,)
                )
            ]
            snapshots = [
                r[0]
                for r in tx.c.execute(
                    above + " SELECT s.id FROM snapshots s WHERE s.layer IN d ORDER BY s.seq", (layer.id,)
                )
            ]
            children = [r[0] for r in tx.c.execute("SELECT id FROM layers WHERE parent=?", (layer.id,))]
            owner = tx.c.execute("SELECT id FROM volumes WHERE upper=?", (layer.id,)).fetchone()
        mount = host.mount_at(engine.layout.mnt(layer.id))
        disk = host.allocated_bytes(engine.layout.image(layer.id))
        link = engine.layout.link(layer.link)
    finally:
        engine.close()
    d = _layer_dict(layer, disk)
    d.update(
        {
            "link": str(link),
            "image": str(engine.layout.image(layer.id)),
            "chain": [x.id for x in chain],
            "children": children,
            "volume": owner[0] if owner else None,
            "volumes": volumes,
            "snapshots": snapshots,
            "mounted": (
                {"target": mount.target, "device": mount.source, "options": mount.options} if mount else None
            ),
        }
    )

    def human() -> str:
        return fields(
            [
                ("name", d["name"] or "-"),
                ("id", d["id"]),
                ("state", d["state"] + (f" (upper of {d['volume']})" if d["volume"] else "")),
                ("file system", d["fs_type"]),
                ("depth", d["depth"]),
                ("chain", " <- ".join(x[:12] for x in d["chain"])),
                ("image", f"{d['image']} ({fmt_bytes(d['image_bytes'])} virtual, {fmt_bytes(disk)} on disk)"),
                ("link", d["link"]),
                ("mounted", f"{mount.source} at {mount.target} ({mount.options})" if mount else "no"),
                ("created", d["created"]),
                ("children", len(children)),
                (
                    "volumes",
                    f"{len(volumes)}"
                    + (": " + ", ".join(volumes[:10]) if volumes else "")
                    + (" ..." if len(volumes) > 10 else ""),
                ),
                (
                    "snapshots",
                    f"{len(snapshots)}"
                    + (": " + ", ".join(snapshots[:10]) if snapshots else "")
                    + (" ..." if len(snapshots) > 10 else ""),
                ),
            ]
        )

    return emit(args, d, human)


def cmd_layer_delete(args: argparse.Namespace) -> int:
    engine = _layer_engine(args)
    try:
        engine.delete_named_layer(args.name)
    finally:
        engine.close()
    return emit(
        args,
        {"deleted": args.name},
        lambda: f"deleted {args.name} (its blocks are freed once no volume or snapshot uses them)",
    )


# ---------------------------------------------------------------- parser


def add_parsers(sub: Any, default_state_dir: str, parse_size: Callable[[str], int]) -> None:
    """Register info, volume, snapshot, node and layer under ``sub``."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--endpoint",
        default=os.environ.get("CSI_ENDPOINT", DEFAULT_ENDPOINT),
        help="the driver's socket (default: $CSI_ENDPOINT or %(default)s)",
    )
    common.add_argument("--json", action="store_true", help="print JSON for scripts")
    common.add_argument("--timeout", type=float, default=300, help="seconds per call (default %(default)s)")

    def leaf(parent: Any, name: str, fn: Callable[..., int], help: str, **kw: Any) -> argparse.ArgumentParser:
        p = parent.add_parser(name, help=help, parents=[common], **kw)
        p.set_defaults(handler=fn)
        return p

    def cap_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--fs-type", default="", help="ext4 or xfs (default: the driver's)")
        p.add_argument("--mount-flag", action="append", default=[], metavar="FLAG")
        p.add_argument("--block", action="store_true", help="a raw block volume")
        p.add_argument("--access-mode", default="single-node-writer", choices=sorted(ACCESS_MODES))

    leaf(sub, "info", cmd_info, "the driver's identity, capabilities, node and capacity")

    vol = sub.add_parser("volume", help="CSI volumes (controller calls)").add_subparsers(
        dest="volume_command", required=True
    )
    p = leaf(vol, "create", cmd_volume_create, "CreateVolume")
    p.add_argument("name")
    p.add_argument("--size", type=parse_size, default=0, help="required bytes, e.g. 10Gi (default: 1Gi)")
    p.add_argument("--limit", type=parse_size, default=0, help="limit bytes")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="e.g. baseLayer=NAME")
    p.add_argument("--from-snapshot", metavar="SNAPSHOT_ID", default="")
    p.add_argument("--from-volume", metavar="VOLUME_ID", default="")
    cap_options(p)
    p = leaf(vol, "list", cmd_volume_list, "ListVolumes (every page)")
    p.add_argument("--page-size", type=int, default=0)
    p = leaf(vol, "get", cmd_volume_get, "ControllerGetVolume")
    p.add_argument("volume_id")
    p = leaf(vol, "delete", cmd_volume_delete, "DeleteVolume")
    p.add_argument("volume_id", nargs="+")
    p = leaf(vol, "expand", cmd_volume_expand, "ControllerExpandVolume")
    p.add_argument("volume_id")
    p.add_argument("size", type=parse_size)

    snap = sub.add_parser("snapshot", help="CSI snapshots").add_subparsers(
        dest="snapshot_command", required=True
    )
    p = leaf(snap, "create", cmd_snapshot_create, "CreateSnapshot")
    p.add_argument("name")
    p.add_argument("volume_id", help="the source volume")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE")
    p = leaf(snap, "list", cmd_snapshot_list, "ListSnapshots (every page)")
    p.add_argument("--volume", help="only snapshots of this source volume")
    p.add_argument("--id", help="only this snapshot")
    p.add_argument("--page-size", type=int, default=0)
    p = leaf(snap, "get", cmd_snapshot_get, "GetSnapshot")
    p.add_argument("snapshot_id")
    p = leaf(snap, "delete", cmd_snapshot_delete, "DeleteSnapshot")
    p.add_argument("snapshot_id", nargs="+")

    node = sub.add_parser("node", help="CSI node calls, as kubelet makes them").add_subparsers(
        dest="node_command", required=True
    )
    p = leaf(node, "stage", cmd_node_stage, "NodeStageVolume")
    p.add_argument("volume_id")
    p.add_argument("staging_path")
    cap_options(p)
    p = leaf(node, "publish", cmd_node_publish, "NodePublishVolume")
    p.add_argument("volume_id")
    p.add_argument("staging_path")
    p.add_argument("target_path")
    p.add_argument("--readonly", action="store_true")
    cap_options(p)
    p = leaf(node, "unpublish", cmd_node_unpublish, "NodeUnpublishVolume")
    p.add_argument("volume_id")
    p.add_argument("target_path")
    p = leaf(node, "unstage", cmd_node_unstage, "NodeUnstageVolume")
    p.add_argument("volume_id")
    p.add_argument("staging_path")
    p = leaf(node, "stats", cmd_node_stats, "NodeGetVolumeStats")
    p.add_argument("volume_id")
    p.add_argument("path", help="a staging or target path of the volume")
    p = leaf(node, "expand", cmd_node_expand, "NodeExpandVolume")
    p.add_argument("volume_id")
    p.add_argument("path", help="a staging or target path of the volume")
    p.add_argument("size", nargs="?", type=parse_size, default=0)

    lay_common = argparse.ArgumentParser(add_help=False)
    lay_common.add_argument("--state-dir", default=Path(default_state_dir), type=Path)
    lay_common.add_argument("--json", action="store_true", help="print JSON for scripts")
    lay = sub.add_parser("layer", help="shared base layers on this node (works on the state dir)")
    lsub = lay.add_subparsers(dest="layer_command", required=True)

    def lleaf(name: str, fn: Callable[..., int], help: str) -> argparse.ArgumentParser:
        p = lsub.add_parser(name, help=help, parents=[lay_common])
        p.set_defaults(handler=fn, local=True)
        return p

    p = lleaf("import", cmd_layer_import, "import a directory or tar archive as a named layer")
    p.add_argument("name")
    p.add_argument("path", type=Path)
    p.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")
    p.add_argument(
        "--progress-interval",
        type=float,
        default=0,
        help="seconds between progress lines (default 1, 5 if not a tty)",
    )
    lleaf("list", cmd_layer_list, "list layers")
    p = lleaf("inspect", cmd_layer_inspect, "one layer: chain, image, mount and who uses it")
    p.add_argument("layer", help="a layer name or id")
    p = lleaf("delete", cmd_layer_delete, "forget a named layer (reclaimed once unused)")
    p.add_argument("name")


def run(args: argparse.Namespace) -> int:
    """Run a client command; errors become one line on stderr and exit status 1."""
    from csi_driver.errors import DriverError

    try:
        if getattr(args, "local", False):
            return args.handler(args)
        with connect(args) as client:
            return args.handler(args, client)
    except grpc.RpcError as e:
        code = e.code()
        details = e.details() or ""
        if code is grpc.StatusCode.UNAVAILABLE:
            details = f"cannot reach the driver at {args.endpoint}: {details}"
        print(f"error: {code.name}: {details}", file=sys.stderr)
    except CliError as e:
        print(f"error: {e.code}: {e}", file=sys.stderr)
    except DriverError as e:
        print(f"error: {e.code}: {e}", file=sys.stderr)
    except KeyboardInterrupt:
        print("error: CANCELLED: interrupted", file=sys.stderr)
        return 130
    return 1
