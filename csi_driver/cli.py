"""overlay-csi serve|demo|doctor, and the operator commands info|volume|snapshot|node|layer."""

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
    s.add_argument(
        "--kubelet-dir",
        default="",
        help="refuse staging/target paths that do not resolve under this dir, e.g. /var/lib/kubelet "
        "(default: no confinement)",
    )
    s.add_argument(
        "--metrics-address",
        default="",
        metavar="HOST:PORT",
        help="serve Prometheus metrics over HTTP here, e.g. :9808 (default: off)",
    )

    d = sub.add_parser("demo", help="a live demo of a volume's life (needs root)")
    d.add_argument("--state-dir", type=Path, default=None, help="default: a temp dir")
    d.add_argument("--size", type=parse_size, default=1 << 30)
    d.add_argument("--in-namespace", action="store_true", help=argparse.SUPPRESS)

    from csi_driver import client_cli, doctor

    client_cli.add_parsers(sub, DEFAULT_STATE_DIR, parse_size)  # info volume snapshot node layer
    doctor.add_parser(sub, DEFAULT_STATE_DIR)
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
        kubelet_dir=args.kubelet_dir,
        metrics_address=args.metrics_address,
    )
    try:
        server = Server(opts)
    except AlreadyRunning as e:
        logging.error("%s", e)
        return 1
    server.serve_forever()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    if args.command == "demo":
        from csi_driver.demo import run_demo

        return run_demo(args)
    if args.command == "doctor":
        from csi_driver.doctor import run as run_doctor

        return run_doctor(args)
    from csi_driver import client_cli

    if args.command in client_cli.COMMANDS:
        return client_cli.run(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
