"""``overlay-csi serve``: run the CSI driver (as root; it mounts file systems)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
from pathlib import Path
from typing import Any

from csi_driver import logs
from csi_driver.cli.args import (
    DEFAULT_ENDPOINT,
    DEFAULT_STATE_DIR,
    add_insecure_registry_option,
    parse_duration,
    parse_share,
    parse_size,
)
from csi_driver.engine.capacity import CapacityPolicy, Share
from csi_driver.engine.capture import DEFAULT_MAX_LIVE_COPY
from csi_driver.engine.context import EngineConfig
from csi_driver.layerstore.backends import BACKENDS
from csi_driver.layerstore.backends import DEFAULT as DEFAULT_BACKEND

DEFAULT_DRIVER_NAME = "overlay.csi.dev"


def add_parser(sub: Any) -> None:
    s = sub.add_parser("serve", help="run the CSI driver")
    s.add_argument("--endpoint", default=DEFAULT_ENDPOINT)
    s.add_argument("--node-id", default=socket.gethostname())
    s.add_argument("--state-dir", default=DEFAULT_STATE_DIR, type=Path)
    s.add_argument("--driver-name", default=DEFAULT_DRIVER_NAME)
    s.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    s.add_argument("--log-format", default="text", choices=["text", "json"])
    s.add_argument("-v", "--v", dest="verbosity", type=int, default=0, help="klog-style verbosity")
    s.add_argument("--max-volumes-per-node", type=int, default=0, help="0: no limit")
    s.add_argument("--max-volume-size", type=parse_size, default=0, help="e.g. 100Gi; 0: no limit")
    s.add_argument(
        "--max-ephemeral-size",
        type=parse_size,
        default=EngineConfig.max_ephemeral_size,
        help="the most all inline ephemeral volumes of the node may hold together (default 1Gi); "
        "0: refuse inline volumes",
    )
    s.add_argument(
        "--max-snapshots-per-volume", type=int, default=0, help="snapshots one volume may have; 0: no limit"
    )
    s.add_argument(
        "--max-layer-depth",
        type=int,
        default=EngineConfig.max_depth,
        help="layers under a volume before its chain is flattened",
    )
    s.add_argument(
        "--backend",
        default=DEFAULT_BACKEND,
        choices=sorted(BACKENDS),
        help="how layers are kept: overlay (ext4/xfs images on loop devices, stacked by overlayfs; "
        "the default) or plaindir (plain directories: enforces no capacity, for development clusters)",
    )
    s.add_argument(
        "--default-fs-type",
        default=EngineConfig.fs_type,
        metavar="TYPE",
        help="file system of a volume's upper when the capability names none, one the backend "
        "offers (default: the backend's; overlay: ext4, or xfs; plaindir: dir)",
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
        help="controller-expand: the central controller for cluster-wide sidecars (the resizer's "
        "expansion and VolumeAttributesClass changes, the registry snapshotter's exported snapshots)",
    )
    s.add_argument(
        "--kubernetes",
        default="auto",
        choices=["auto", "off"],
        help="auto: use the in-cluster Kubernetes API when running in a pod (VolumeAttributesClass "
        "changes reach the volume's node through its PersistentVolume); off: never",
    )
    s.add_argument(
        "--registry-snapshotter-node",
        default="",
        metavar="NAME",
        help="controller-expand mode: label pre-provisioned VolumeSnapshotContents that name an "
        "exported snapshot managed-by NAME, the NODE_NAME of the csi-snapshotter beside this instance",
    )
    s.add_argument(
        "--kubelet-dir",
        default="",
        help="refuse staging/target paths that do not resolve under this dir, e.g. /var/lib/kubelet "
        "(default: no confinement)",
    )
    s.add_argument(
        "--pool-device",
        default="",
        metavar="DEV",
        help="a disk for the state dir: formatted xfs with reflink when empty (snapshots of volumes "
        "in use become clones), refused when it holds anything else, mounted at --state-dir",
    )
    s.add_argument(
        "--pool-devices",
        default="",
        metavar="FILE",
        help='JSON {"NODE": "DEV", ...}: the pool device of --node-id (the chart\'s pool.devices)',
    )
    s.add_argument(
        "--pool-device-wipe",
        action="store_true",
        help="format the pool device even when it holds a file system or partition table (destroys it)",
    )
    s.add_argument(
        "--pool-file",
        default="",
        metavar="PATH",
        help="a sparse file on the host for the state dir (outside it): created, attached as a "
        "direct-I/O loop device, formatted xfs with reflink and mounted at --state-dir, so snapshots "
        "of volumes in use are clones; found again after a restart or a reboot, refused when it holds "
        "anything else. A state dir with volumes on the host's file system is served as it is",
    )
    s.add_argument(
        "--pool-file-size",
        type=parse_size,
        default=0,
        metavar="SIZE",
        help="size of a new pool file, e.g. 200Gi (default: the host file system's size; it is "
        "sparse, and --host-reserve keeps the host's free space honest)",
    )
    s.add_argument(
        "--host-reserve",
        type=_share,
        default="10%",
        metavar="PCT|SIZE",
        help="with --pool-file: the host file system's free space volumes are never given (default "
        "10%%, kubelet's hard eviction threshold nodefs.available<10%%; raise it with the threshold)",
    )
    s.add_argument(
        "--max-live-snapshot-copy",
        type=parse_size,
        default=DEFAULT_MAX_LIVE_COPY,
        metavar="SIZE",
        help="where the state dir cannot clone, a snapshot of a volume in use copies its data while "
        "its writes wait: refuse (FAILED_PRECONDITION) beyond this much (default 1Gi; 0: no limit). "
        "A VolumeSnapshotClass's liveCopyLimit may lower it",
    )
    add_insecure_registry_option(s)
    s.add_argument(
        "--registry-transfer-timeout",
        type=parse_duration,
        default="1h",
        metavar="DURATION",
        help="how long one pull or push of a registry may run (default 1h; e.g. 30m, 2h; more "
        "than 0). It goes on after its caller's deadline, which is answered ABORTED (the sidecar "
        "retries and gets the result); past this it is cancelled and leaves nothing",
    )
    s.add_argument(
        "--overprovision-ratio",
        type=float,
        default=1.0,
        metavar="R",
        help="promise up to R times what the state dir's disk holds (default 1.0: every volume "
        "can fill its capacity); GetCapacity reports what is left",
    )
    s.add_argument(
        "--reserve",
        type=_share,
        default="1%",
        metavar="PCT|SIZE",
        help="space on the state dir's file system never promised (default 1%%)",
    )
    s.add_argument(
        "--low-space-watermark",
        type=_share,
        default="10%",
        metavar="PCT|SIZE",
        help="below this much free space, refuse new volumes, snapshots and clones and report "
        "volumes abnormal (default 10%%)",
    )
    s.add_argument(
        "--metrics-address",
        default="",
        metavar="HOST:PORT",
        help="serve Prometheus metrics over HTTP here, e.g. :9808 (default: off)",
    )


def _pool_device_of(path: str, node_id: str) -> str:
    """This node's device in a JSON map of node names to devices ("" when none)."""
    if not path:
        return ""
    with open(path) as f:
        devices = json.load(f)
    if not isinstance(devices, dict) or not all(isinstance(v, str) for v in devices.values()):
        raise ValueError('expected a JSON object {"NODE": "/dev/..."}')
    return devices.get(node_id, "")


def _share(text: str) -> Share:
    try:
        return parse_share(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def _metrics_installed() -> bool:
    try:
        import prometheus_client  # noqa: F401 - the 'metrics' extra
    except ImportError:
        return False
    return True


def options(args: argparse.Namespace, pool_device: str, policy: CapacityPolicy) -> Any:
    """The parsed flags as the server's ``ServeOptions`` (``pool_device``: this node's, when
    ``--pool-devices`` names one; ``policy``: the capacity flags, checked)."""
    from csi_driver.server import ServeOptions

    return ServeOptions(
        endpoint=args.endpoint,
        state_dir=args.state_dir,
        node_id=args.node_id,
        driver_name=args.driver_name,
        max_volumes_per_node=args.max_volumes_per_node,
        max_volume_size=args.max_volume_size,
        max_ephemeral_size=args.max_ephemeral_size,
        max_snapshots_per_volume=args.max_snapshots_per_volume,
        max_layer_depth=args.max_layer_depth,
        backend=args.backend,
        default_fs_type=args.default_fs_type,
        hidden_capabilities=tuple(args.hide_capability),
        mode=args.mode,
        kubelet_dir=args.kubelet_dir,
        metrics_address=args.metrics_address,
        pool_device=pool_device,
        pool_device_wipe=args.pool_device_wipe,
        pool_file=args.pool_file,
        pool_file_size=args.pool_file_size,
        host_reserve=args.host_reserve,
        max_live_snapshot_copy=args.max_live_snapshot_copy,
        capacity=policy,
        insecure_registries=frozenset(args.insecure_registry),
        registry_transfer_timeout=args.registry_transfer_timeout,
        kubernetes=args.kubernetes,
        registry_snapshotter_node=args.registry_snapshotter_node,
    )


def run(args: argparse.Namespace) -> int:
    from csi_driver.engine.engine import BadConfig
    from csi_driver.pool import PoolError
    from csi_driver.server import AlreadyRunning, Server

    logs.setup(logs.level_from(args.log_level, args.verbosity), args.log_format)
    if os.geteuid() != 0:
        logging.error("overlay-csi serve needs root (it mounts file systems)")
        return 2
    if args.metrics_address and not _metrics_installed():
        logging.error("--metrics-address needs prometheus-client: pip install 'overlay-csi[metrics]'")
        return 2
    try:
        pool_device = args.pool_device or _pool_device_of(args.pool_devices, args.node_id)
    except (OSError, ValueError) as e:
        logging.error("--pool-devices %s: %s", args.pool_devices, e)
        return 2
    if pool_device and args.pool_file:
        logging.info("this node has pool device %s: --pool-file %s is not used", pool_device, args.pool_file)
    try:
        policy = CapacityPolicy(args.overprovision_ratio, args.reserve, args.low_space_watermark)
    except ValueError as e:
        logging.error("%s", e)
        return 2
    opts = options(args, pool_device, policy)
    try:
        server = Server(opts)
    except AlreadyRunning as e:
        logging.error("%s", e)
        return 1
    except (PoolError, BadConfig) as e:
        logging.error("%s", e)
        return 2
    server.serve_forever()
    return 0
