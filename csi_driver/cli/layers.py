"""``overlay-csi layer import|list|inspect|delete``: the node's shared base
layers. These work on the state dir directly (layers have no CSI call), so
they need no running driver; ``import`` reports progress on stderr."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from csi_driver.cli.args import DEFAULT_STATE_DIR, add_command, local_engine
from csi_driver.cli.import_progress import ImportProgress
from csi_driver.cli.output import CliError, emit, fields, fmt_bytes, fmt_time, table
from csi_driver.statedir import StateDir


def _layer_engine(args: argparse.Namespace, create: bool = False) -> Any:
    from csi_driver import logs

    if not create and not (args.state_dir / "state.db").exists():
        raise CliError("NOT_FOUND", f"no overlay-csi state in {args.state_dir} (wrong --state-dir?)")
    import logging

    logs.setup(logging.WARNING)
    return local_engine(args)


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
        progress = ImportProgress(args.path, engine.state.tmp, interval, sys.stderr)
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

    engine = _layer_engine(args)
    try:
        layers = engine.layers()
        rows = [_layer_dict(x, engine.backend.usage(x)) for x in layers]
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


def _some(ids: list[str]) -> str:
    """How many, and the first ten."""
    return f"{len(ids)}" + (": " + ", ".join(ids[:10]) if ids else "") + (" ..." if len(ids) > 10 else "")


def cmd_layer_inspect(args: argparse.Namespace) -> int:
    from csi_driver import host

    engine = _layer_engine(args)
    try:
        with engine.store.read() as tx:
            layer = tx.layer_by_name(args.layer)
            if layer is None and len(args.layer) == 32:
                layer = tx.layer(args.layer)
            if layer is None:
                raise CliError("NOT_FOUND", f"layer {args.layer!r} does not exist (by name or id)")
            chain = tx.chain(layer.id)
            dependents = tx.dependents(layer.id)
        where = engine.backend.describe(layer)
        mount = host.mount_at(where["mountpoint"]) if "mountpoint" in where else None
        disk = engine.backend.usage(layer)
    finally:
        engine.close()
    d = _layer_dict(layer, disk)
    d.update(
        {
            **where,
            "chain": [x.id for x in chain],
            "children": dependents.children,
            "volume": dependents.owner,
            "volumes": dependents.volumes,
            "snapshots": dependents.snapshots,
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
                ("children", len(dependents.children)),
                ("volumes", _some(dependents.volumes)),
                ("snapshots", _some(dependents.snapshots)),
            ]
        )

    return emit(args, d, human)


def cmd_layer_delete(args: argparse.Namespace) -> int:
    engine = _layer_engine(args)
    try:
        engine.delete_named_layer(args.name, collect=not StateDir(args.state_dir).served())
    finally:
        engine.close()
    return emit(
        args,
        {"deleted": args.name},
        lambda: f"deleted {args.name} (its blocks are freed once no volume or snapshot uses them)",
    )


def add_parser(sub: Any) -> None:
    lay_common = argparse.ArgumentParser(add_help=False)
    lay_common.add_argument("--state-dir", default=Path(DEFAULT_STATE_DIR), type=Path)
    lay_common.add_argument("--json", action="store_true", help="print JSON for scripts")
    lay = sub.add_parser("layer", help="shared base layers on this node (works on the state dir)")
    lsub = lay.add_subparsers(dest="layer_command", required=True)

    def layer_command(name: str, handler: Callable[..., int], help: str) -> argparse.ArgumentParser:
        return add_command(lsub, name, handler, help, lay_common, local=True)  # local: no socket

    p = layer_command("import", cmd_layer_import, "import a directory or tar archive as a named layer")
    p.add_argument("name")
    p.add_argument("path", type=Path)
    p.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")
    p.add_argument(
        "--progress-interval",
        type=float,
        default=0,
        help="seconds between progress lines (default 1, 5 if not a tty)",
    )
    layer_command("list", cmd_layer_list, "list layers")
    p = layer_command("inspect", cmd_layer_inspect, "one layer: chain, image, mount and who uses it")
    p.add_argument("layer", help="a layer name or id")
    p = layer_command("delete", cmd_layer_delete, "forget a named layer (reclaimed once unused)")
    p.add_argument("name")
    from csi_driver.cli.transfer import add_layer_pull

    add_layer_pull(lsub)
