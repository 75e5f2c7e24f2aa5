"""``overlay-csi layer pull`` and ``overlay-csi snapshot push|pull``: layers to and
from OCI registries, on the state dir directly (no CSI call moves layers).

Credentials come from ``$OVERLAY_CSI_REGISTRY_USERNAME`` and
``$OVERLAY_CSI_REGISTRY_PASSWORD`` (never from the command line, where other
users could read them in the process list), for the one registry host that
``$OVERLAY_CSI_REGISTRY`` names: they are never sent to another. Progress lines
go to stderr.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any

from csi_driver.cli.args import DEFAULT_STATE_DIR, add_command, add_insecure_registry_option, local_engine
from csi_driver.cli.output import CliError, emit, fmt_bytes
from csi_driver.registry import codec
from csi_driver.registry.credentials import Credentials, registry_host
from csi_driver.registry.reference import BadReference, Reference, Repository
from csi_driver.statedir import StateDir

USER_ENV = "OVERLAY_CSI_REGISTRY_USERNAME"
PASSWORD_ENV = "OVERLAY_CSI_REGISTRY_PASSWORD"
REGISTRY_ENV = "OVERLAY_CSI_REGISTRY"  # the registry host they are for, as the Secret's `registry`


def registry_secrets() -> dict[str, str]:
    """The credentials in the environment as a CSI request's secrets (none: {}), bound
    to the host ``$OVERLAY_CSI_REGISTRY`` names."""
    user, password = os.environ.get(USER_ENV, ""), os.environ.get(PASSWORD_ENV, "")
    if not user and not password:
        return {}
    if not user or not password:
        raise CliError("INVALID_ARGUMENT", f"set both ${USER_ENV} and ${PASSWORD_ENV}, or neither")
    registry = os.environ.get(REGISTRY_ENV, "").strip()
    if not registry:
        raise CliError(
            "FAILED_PRECONDITION",
            f"set ${REGISTRY_ENV} to the registry (HOST[:PORT]) the credentials are for: "
            "credentials are never sent to a host they were not given for",
        )
    if registry_host(registry) is None:
        raise CliError(
            "FAILED_PRECONDITION",
            f"${REGISTRY_ENV} must name a registry host (HOST[:PORT], e.g. registry.example.com:5000), "
            f"not {registry[:80]!r}",
        )
    return {"username": user, "password": password, "registry": registry}


def _credentials() -> Credentials | None:
    return Credentials.from_secrets(registry_secrets())


def _engine(args: argparse.Namespace) -> Any:
    from csi_driver import logs

    logs.setup(logging.WARNING)
    logging.getLogger("csi_driver.registry").setLevel(logging.INFO)  # progress lines
    return local_engine(args)


def _parse(kind: type, text: str) -> Any:
    try:
        return kind.parse(text)
    except BadReference as e:
        raise CliError("INVALID_ARGUMENT", str(e)) from e


def cmd_layer_pull(args: argparse.Namespace) -> int:
    ref = _parse(Reference, args.reference)
    engine = _engine(args)
    try:
        layer = engine.transfers.pull_image(ref, _credentials(), refresh=args.refresh)
        chain = engine.chain(layer.id)
    finally:
        engine.close()
    data = sum(x.used_bytes for x in chain)
    d = {"name": layer.name, "id": layer.id, "layers": len(chain), "bytes": data}
    return emit(args, d, lambda: f"pulled {layer.name}: {len(chain)} layers, {fmt_bytes(data)} (base layer)")


def cmd_snapshot_push(args: argparse.Namespace) -> int:
    repository = _parse(Repository, args.repository)
    if StateDir(args.state_dir).served():
        raise CliError(
            "FAILED_PRECONDITION",
            "a driver serves this state dir and holds its layers' mounts: take an exported snapshot "
            f"through it instead: overlay-csi snapshot create NAME VOLUME --param repository={repository}",
        )
    engine = _engine(args)
    try:
        snap = engine.get_snapshot(args.snapshot_id)
        if snap is None:
            raise CliError("NOT_FOUND", f"snapshot {args.snapshot_id!r} does not exist on this node")
        ref = engine.transfers.push_snapshot(snap, _credentials(), repository, args.compression)
    finally:
        engine.close()
    d = {"snapshot_id": snap.id, "reference": str(ref)}
    return emit(args, d, lambda: f"pushed {snap.id}; restore it on any node as snapshot {ref}")


def cmd_snapshot_pull(args: argparse.Namespace) -> int:
    ref = _parse(Reference, args.reference)
    engine = _engine(args)
    try:
        snap = engine.transfers.pull_snapshot(str(ref), _credentials())
    finally:
        engine.close()
    d = {"snapshot_id": snap.id, "size_bytes": snap.size_bytes, "source_volume_id": snap.source_volume_id}
    return emit(
        args, d, lambda: f"pulled snapshot {snap.id} ({fmt_bytes(snap.size_bytes)}); kept on this node"
    )


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--state-dir", default=Path(DEFAULT_STATE_DIR), type=Path)
    common.add_argument("--json", action="store_true", help="print JSON for scripts")
    add_insecure_registry_option(common)
    return common


def add_layer_pull(lsub: Any) -> None:
    p = add_command(
        lsub, "pull", cmd_layer_pull, "pull an OCI image as a base layer named by REF", _common(), local=True
    )
    p.add_argument("reference", help="HOST[:PORT]/PATH:TAG or HOST[:PORT]/PATH@sha256:...")
    p.add_argument("--refresh", action="store_true", help="ask the registry again even if it is here")


def add_snapshot_transfer(ssub: Any) -> None:
    common = _common()
    p = add_command(
        ssub, "push", cmd_snapshot_push, "push a snapshot's layers to a registry", common, local=True
    )
    p.add_argument("snapshot_id")
    p.add_argument("repository", help="HOST[:PORT]/PATH")
    p.add_argument(
        "--compression",
        choices=codec.COMPRESSIONS,
        default=codec.NONE,
        help="how new layer blobs are compressed, as a VolumeSnapshotClass's `compression` (default: none)",
    )
    p = add_command(
        ssub, "pull", cmd_snapshot_pull, "keep a copy of an exported snapshot here", common, local=True
    )
    p.add_argument("reference", help="an exported snapshot's id: HOST[:PORT]/PATH:snap-...")
