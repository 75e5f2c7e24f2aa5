"""Operator commands: talk to a running driver's socket (as ``csc`` does for Go
drivers) and manage the node's base layers.

``info``, ``volume``, ``snapshot`` and ``node`` are CSI calls over
``--endpoint`` (default ``$CSI_ENDPOINT`` or ``unix:///csi/csi.sock``).
``layer`` works on the state dir directly (layers have no CSI call). Output is
a human table by default and JSON with ``--json``; an error is one line on
stderr, ``error: CODE: message``, with exit status 1.

This module connects and runs one of them; the commands live in ``info``,
``volumes``, ``snapshots``, ``node`` and ``layers``.
"""

from __future__ import annotations

import argparse
import os

import grpc

from csi_driver.cli.output import CliError, print_error
from csi_driver.client import Client

COMMANDS = ("info", "volume", "snapshot", "node", "layer")


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
        print_error(code.name, details)
    except CliError as e:
        print_error(e.code, str(e))
    except DriverError as e:
        print_error(e.code, str(e))
    except KeyboardInterrupt:
        print_error("CANCELLED", "interrupted")
        return 130
    return 1
