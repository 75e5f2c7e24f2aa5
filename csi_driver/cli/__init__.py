"""overlay-csi serve|demo|doctor, and the operator commands info|volume|snapshot|node|layer."""

from __future__ import annotations

import argparse

from csi_driver import __version__
from csi_driver.cli import demo, doctor, info, layers, node, runner, serve, snapshots, volumes


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="overlay-csi", description=__doc__)
    p.add_argument("--version", action="version", version=f"overlay-csi {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    serve.add_parser(sub)
    demo.add_parser(sub)
    info.add_parser(sub)
    volumes.add_parser(sub)
    snapshots.add_parser(sub)
    node.add_parser(sub)
    layers.add_parser(sub)
    doctor.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return serve.run(args)
    if args.command == "demo":
        return demo.run(args)
    if args.command == "doctor":
        return doctor.run(args)
    if args.command in runner.COMMANDS:
        return runner.run(args)
    return 2
