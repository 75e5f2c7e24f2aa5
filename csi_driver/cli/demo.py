"""``overlay-csi demo``: the command line of the live demo in ``csi_driver.demo``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from csi_driver.cli.args import parse_size


def add_parser(sub: Any) -> None:
    d = sub.add_parser("demo", help="a live demo of a volume's life (needs root)")
    d.add_argument("--state-dir", type=Path, default=None, help="default: a temp dir")
    d.add_argument("--size", type=parse_size, default=1 << 30)
    d.add_argument("--in-namespace", action="store_true", help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    from csi_driver.demo import run_demo

    return run_demo(args)
