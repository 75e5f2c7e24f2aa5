"""Command line: ``overlay-csi serve|demo|layer ...``."""

from __future__ import annotations

import argparse
import logging
import os
import re
import socket
import sys
from pathlib import Path

from csi_driver import __version__, logs

DEFAULT_STATE_DIR = "/var/lib/overlay-csi"
DEFAULT_DRIVER_NAME = "overlay.csi.dev"
_SIZE_RE = re.compile(r"^(\d+)([KMGTP]i?)?B?$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'10Gi', '512M', '1073741824' -> bytes (binary units either way)."""
    m = _SIZE_RE.match(text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}")
    n, unit = int(m.group(1)), (m.group(2) or "").upper().rstrip("I")
    return n << {"": 0, "K": 10, "M": 20, "G": 30, "T": 40, "P": 50}[unit]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="overlay-csi", description=__doc__)
    p.add_argument("--version", action="version", version=f"overlay-csi {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the CSI driver")
    s.add_argument("--endpoint", default="unix:///csi/csi.sock")
    s.add_argument("--node-id", default=socket.gethostname())
    s.add_argument("--state-dir", default=DEFAULT_STATE_DIR, type=Path)
    s.add_argument("--driver-name", default=DEFAULT_DRIVER_NAME)
    s.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    s.add_argument("--log-format", default="text", choices=["text", "json"])
    s.add_argument("-v", "--v", dest="verbosity", type=int, default=0, help="klog-style verbosity")
    s.add_argument("--max-volumes-per-node", type=int, default=0, help="0: no limit")
    s.add_argument("--max-volume-size", type=parse_size, default=0, help="e.g. 100Gi; 0: no limit")
    s.add_argument(
        "--max-layer-depth", type=int, default=64, help="layers under a volume before its chain is flattened"
    )
    s.add_argument(
        "--default-fs-type",
        default="ext4",
        choices=["ext4", "xfs"],
        help="file system of a volume's upper when the capability names none",
    )
    s.add_argument(
        "--hide-capability",
        action="append",
        default=[],
        metavar="NAME",
        help="do not advertise this controller capability (e.g. GET_SNAPSHOT for "
        "callers that reject capabilities newer than they know); repeatable",
    )
    s.add_argument(
        "--mode",
        default="all",
        choices=["all", "node", "controller-expand"],
        help="controller-expand: serve only ControllerExpandVolume for a central resizer",
    )

    d = sub.add_parser("demo", help="a live demo of a volume's life (needs root)")
    d.add_argument("--state-dir", type=Path, default=None, help="default: a temp dir")
    d.add_argument("--size", type=parse_size, default=1 << 30)
    d.add_argument("--in-namespace", action="store_true", help=argparse.SUPPRESS)

    lay = sub.add_parser("layer", help="manage shared base layers on this node")
    lay.add_argument("--state-dir", default=DEFAULT_STATE_DIR, type=Path)
    lsub = lay.add_subparsers(dest="layer_command", required=True)
    li = lsub.add_parser("import", help="import a directory or tar archive as a named layer")
    li.add_argument("name")
    li.add_argument("path", type=Path)
    lsub.add_parser("list", help="list layers")
    ld = lsub.add_parser("delete", help="forget a named layer (reclaimed once unused)")
    ld.add_argument("name")
    return p


def _serve(args: argparse.Namespace) -> int:
    from csi_driver.server import AlreadyRunning, ServeOptions, Server

    logs.setup(logs.level_from(args.log_level, args.verbosity), args.log_format)
    if os.geteuid() != 0:
        logging.error("overlay-csi serve needs root (it mounts file systems)")
        return 2
    opts = ServeOptions(
        endpoint=args.endpoint,
        state_dir=args.state_dir,
        node_id=args.node_id,
        driver_name=args.driver_name,
        max_volumes_per_node=args.max_volumes_per_node,
        max_volume_size=args.max_volume_size,
        max_layer_depth=args.max_layer_depth,
        default_fs_type=args.default_fs_type,
        hidden_capabilities=tuple(args.hide_capability),
        mode=args.mode,
    )
    try:
        server = Server(opts)
    except AlreadyRunning as e:
        logging.error("%s", e)
        return 1
    server.serve_forever()
    return 0


def _layer(args: argparse.Namespace) -> int:
    from csi_driver.engine.engine import Engine, EngineConfig
    from csi_driver.errors import DriverError
    from csi_driver.service.validate import LAYER_NAME_RE

    logs.setup(logging.WARNING)
    engine = Engine(EngineConfig(state_dir=args.state_dir, node_id=socket.gethostname()))
    try:
        if args.layer_command == "import":
            if not LAYER_NAME_RE.match(args.name):
                print("error: layer names are [a-zA-Z0-9._-], at most 63", file=sys.stderr)
                return 1
            layer = engine.import_layer(args.name, args.path)
            print(f"imported {args.name}: layer {layer.id}, {layer.used_bytes / 2**20:.1f} MiB on disk")
        elif args.layer_command == "list":
            print(f"{'NAME':20} {'ID':32} {'PARENT':10} {'DEPTH':>5} {'STATE':9} {'DISK MiB':>9}")
            for x in engine.layers():
                print(
                    f"{x.name or '-':20} {x.id:32} {(x.parent or '-')[:10]:10} {x.depth:5} "
                    f"{'active' if x.active else 'committed':9} {x.used_bytes / 2**20:9.1f}"
                )
        elif args.layer_command == "delete":
            engine.delete_named_layer(args.name)
            print(f"deleted {args.name}")
    except DriverError as e:
        print(f"error: {e.code}: {e}", file=sys.stderr)
        return 1
    finally:
        engine.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    if args.command == "demo":
        from csi_driver.demo import run_demo

        return run_demo(args)
    if args.command == "layer":
        return _layer(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
