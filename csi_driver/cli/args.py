"""Argument types and option groups the commands share: sizes, shares and durations, ``KEY=VALUE``
pairs, the options every socket command takes (``--endpoint``, ``--json``,
``--timeout``) and the options that make a volume capability."""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Callable
from typing import Any

from csi_driver.cli.output import CliError
from csi_driver.client import mount_capability
from csi_driver.engine.capacity import Share
from csi_driver.proto import csi_pb2 as csi

DEFAULT_STATE_DIR = "/var/lib/overlay-csi"
DEFAULT_ENDPOINT = "unix:///csi/csi.sock"
_SIZE_RE = re.compile(r"^(\d+)([KMGTP]i?)?B?$", re.IGNORECASE)

AccessMode = csi.VolumeCapability.AccessMode
ACCESS_MODES = {
    AccessMode.Mode.Name(m).lower().replace("_", "-"): m
    for m in AccessMode.Mode.values()
    if m != AccessMode.UNKNOWN
}


_SHIFT = {"": 0, "K": 10, "M": 20, "G": 30, "T": 40, "P": 50}  # binary units either way
_SHARE_RE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*(%|[kKmMgGtT]i?)?\s*", re.ASCII)


def parse_size(text: str) -> int:
    """'10Gi', '512M', '1073741824' -> bytes (binary units either way)."""
    m = _SIZE_RE.match(text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}")
    n, unit = int(m.group(1)), (m.group(2) or "").upper().rstrip("I")
    return n << _SHIFT[unit]


def parse_share(text: str) -> Share:
    """A part of the state dir's file system: ``10%``, ``512Mi``, ``2G`` or ``0``
    (ValueError otherwise)."""
    m = _SHARE_RE.fullmatch(text)
    if not m:
        raise ValueError(f"{text!r} is neither a percentage (10%) nor a size (512Mi)")
    number, unit = float(m.group(1)), (m.group(2) or "")
    if unit == "%":
        if number > 100:
            raise ValueError(f"{text!r} is more than 100%")
        return Share(percent=number)
    return Share(fixed=int(number * (1 << _SHIFT[unit[:1].upper()])))


_DURATION_PART_RE = re.compile(r"([0-9]+(?:\.[0-9]+)?)([hms])", re.ASCII)
_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0}


def parse_duration(text: str) -> float:
    """'1h', '90m', '1h30m', '45s' (Go's units, as the sidecars' --timeout) or plain
    seconds -> seconds, more than 0."""
    text = text.strip()
    try:
        seconds = float(text)
    except ValueError:
        parts = _DURATION_PART_RE.findall(text)
        if not parts or "".join(n + u for n, u in parts) != text:
            raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 1h, 90m, 45s)") from None
        seconds = sum(float(n) * _SECONDS[u] for n, u in parts)
    if not seconds > 0 or seconds == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: a duration must be more than 0")
    return seconds


def parse_kv(items: list[str], what: str) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CliError("INVALID_ARGUMENT", f"{what} {item!r} is not KEY=VALUE")
        out[key] = value
    return out


def local_engine(args: argparse.Namespace) -> Any:
    """An engine on ``--state-dir`` for the commands that work on it directly (no driver
    serving it): this host's name as the node, the serving defaults otherwise."""
    from csi_driver.engine.engine import Engine, EngineConfig

    insecure = frozenset(getattr(args, "insecure_registry", ()))
    return Engine(
        EngineConfig(state_dir=args.state_dir, node_id=os.uname().nodename, insecure_registries=insecure)
    )


def add_insecure_registry_option(p: argparse.ArgumentParser) -> None:
    """``--insecure-registry HOST[:PORT]``, for ``serve`` and the commands that reach registries."""
    p.add_argument(
        "--insecure-registry",
        action="append",
        default=[],
        metavar="HOST[:PORT]",
        help="reach this registry over plain HTTP, not HTTPS (repeatable; for a registry on a trusted "
        "network only)",
    )


def client_options() -> argparse.ArgumentParser:
    """The parent parser of every command that talks to the driver's socket."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--endpoint",
        default=os.environ.get("CSI_ENDPOINT", DEFAULT_ENDPOINT),
        help="the driver's socket (default: $CSI_ENDPOINT or %(default)s)",
    )
    common.add_argument("--json", action="store_true", help="print JSON for scripts")
    common.add_argument("--timeout", type=float, default=300, help="seconds per call (default %(default)s)")
    return common


def add_command(
    sub: Any,
    name: str,
    handler: Callable[..., int],
    help: str,
    parent: argparse.ArgumentParser,
    **defaults: Any,
) -> argparse.ArgumentParser:
    """A leaf command under ``sub`` that ``runner.run`` calls as ``handler``."""
    p = sub.add_parser(name, help=help, parents=[parent])
    p.set_defaults(handler=handler, **defaults)
    return p


def add_capability_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--fs-type",
        default="",
        help="one the node's backend makes: ext4 or xfs (overlay), dir (plaindir); default: the driver's",
    )
    p.add_argument("--mount-flag", action="append", default=[], metavar="FLAG")
    p.add_argument("--block", action="store_true", help="a raw block volume")
    p.add_argument("--access-mode", default="single-node-writer", choices=sorted(ACCESS_MODES))


def capability(args: argparse.Namespace) -> csi.VolumeCapability:
    """The volume capability the options of ``add_capability_options`` describe."""
    mode = ACCESS_MODES[args.access_mode]
    if args.block:
        return csi.VolumeCapability(
            block=csi.VolumeCapability.BlockVolume(), access_mode=AccessMode(mode=mode)
        )
    return mount_capability(mode, args.fs_type, list(args.mount_flag))
