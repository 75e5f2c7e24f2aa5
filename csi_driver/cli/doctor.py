"""``overlay-csi doctor``: its options, and the report of the checks in
``csi_driver.doctor`` (one line each, or JSON), exit status 1 when any FAILs."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from csi_driver.cli.args import DEFAULT_STATE_DIR, parse_size
from csi_driver.doctor import FAIL, OK, WARN, in_pod, run_checks
from csi_driver.engine.capture import DEFAULT_MAX_LIVE_COPY
from csi_driver.layerstore.backends import BACKENDS


def add_parser(sub: Any) -> None:
    d = sub.add_parser("doctor", help="check this host can run the driver, and say how to fix what cannot")
    d.add_argument("--state-dir", type=Path, default=Path(DEFAULT_STATE_DIR))
    d.add_argument("--kubelet-dir", type=Path, default=Path("/var/lib/kubelet"))
    d.add_argument("--pool-device", default="", metavar="DEV", help="check a disk for serve --pool-device")
    d.add_argument("--pool-file", default="", metavar="PATH", help="check a file for serve --pool-file")
    d.add_argument(
        "--max-live-snapshot-copy",
        type=parse_size,
        default=DEFAULT_MAX_LIVE_COPY,
        metavar="SIZE",
        help="serve's limit, for the cost of a snapshot of a volume in use (default 1Gi)",
    )
    d.add_argument(
        "--backend",
        default="",
        choices=sorted(BACKENDS),
        help="serve's --backend (default: the one the state dir records, else overlay)",
    )
    d.add_argument("--json", action="store_true")
    d.add_argument(
        "--no-probe", action="store_true", help="skip the mount probe (mkfs, loop, freeze, overlay)"
    )
    d.add_argument(
        "--in-pod",
        choices=["auto", "yes", "no"],
        default="auto",
        help="check mount propagation as in a pod (auto: KUBERNETES_SERVICE_HOST or a service account)",
    )


def run(args: argparse.Namespace) -> int:
    pod = in_pod() if args.in_pod == "auto" else args.in_pod == "yes"
    checks = run_checks(
        args.state_dir,
        args.kubelet_dir,
        pod,
        not args.no_probe,
        args.pool_device,
        args.pool_file,
        args.max_live_snapshot_copy,
        args.backend,
    )
    counts = {s: sum(c.status == s for c in checks) for s in (OK, WARN, FAIL)}
    if args.json:
        json.dump(
            {"ok": counts[FAIL] == 0, "summary": counts, "checks": [asdict(c) for c in checks]},
            sys.stdout,
            indent=2,
        )
        sys.stdout.write("\n")
    else:
        width = max(len(c.name) for c in checks)
        for c in checks:
            print(f"{c.status:<4}  {c.name:<{width}}  {c.message}")
            if c.fix and c.status != OK:
                print(f"{'':<4}  {'':<{width}}  fix: {c.fix}")
        print(f"\n{counts[OK]} OK, {counts[WARN]} WARN, {counts[FAIL]} FAIL")
    return 1 if counts[FAIL] else 0
