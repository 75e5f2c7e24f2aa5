"""Start-up reconciliation: make disk, mounts and loop devices agree with the store.

The store is the source of truth. Anything on disk it does not know is crash
debris and is removed; staged volumes whose mounts survived a driver restart
are adopted; loop devices backed by our images but not mounted are detached.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from csi_driver.engine import host
from csi_driver.engine.engine import Engine
from csi_driver.engine.layers import remove_tree
from csi_driver.engine.layout import ID_RE
from csi_driver.errors import CommandFailed

log = logging.getLogger(__name__)


@dataclass
class Report:
    removed_dirs: list[str] = field(default_factory=list)
    removed_links: list[str] = field(default_factory=list)
    unmounted: list[str] = field(default_factory=list)
    detached: list[str] = field(default_factory=list)
    adopted: list[str] = field(default_factory=list)
    collected: list[str] = field(default_factory=list)
    missing_images: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


def reconcile(engine: Engine) -> Report:
    rep = Report()
    layout = engine.layout

    # 1. scratch builds never survive a restart
    for entry in sorted(layout.tmp.iterdir()):
        _settle(remove_tree, entry, rep)
        rep.removed_dirs.append(str(entry))

    with engine.store.tx() as tx:
        gone = tx.collect_garbage()
        layers = {x.id: x for x in tx.layers()}
        volumes = tx.volumes()
        pubs = tx.publications()
    engine._discard_layers(gone)
    rep.collected = [x.id for x in gone]
    for layer_id in layers.keys() - {x.id for x in gone}:
        if not layout.image(layer_id).exists():
            rep.missing_images.append(layer_id)
            log.error("layer %s has no image on disk", layer_id)

    # 2. layer dirs and links the store does not know
    for entry in sorted(layout.layers.iterdir()):
        if entry.name not in layers or not ID_RE.match(entry.name):
            _settle(remove_tree, entry, rep)
            rep.removed_dirs.append(str(entry))
    known_links = {x.link for x in layers.values()}
    for entry in sorted(layout.links.iterdir()):
        if entry.name not in known_links:
            entry.unlink()
            rep.removed_links.append(entry.name)
    for layer in layers.values():
        if layout.layer_dir(layer.id).exists():
            engine._link(layer)

    # 3. adopt staged volumes whose overlay survived. An overlay of ours whose
    #    volume is not staged by the record is debris, and so is every bind of it;
    #    an overlay of a staged volume is never touched, wherever it is mounted
    #    (kubelet's subPath binds, paths reached through symlinks).
    for v in volumes:
        if v.staging_path and engine._overlay_is(v.staging_path, v):
            engine._hold_layers(v)
            rep.adopted.append(v.id)
    staged_uppers = {v.upper for v in volumes if v.staging_path}
    for m in sorted(host.mounts(), key=lambda m: m.target.count("/"), reverse=True):
        upper = _upper_of(m) if m.fstype == "overlay" else None
        if upper and upper in layers and upper not in staged_uppers:
            _settle(host.umount, m.target, rep)
            rep.unmounted.append(m.target)

    # ephemeral volumes' private staging dirs whose volume is gone
    for entry in sorted(layout.ephemeral.iterdir()):
        if entry.name not in {v.id for v in volumes}:
            _settle(remove_tree, entry, rep)
            rep.removed_dirs.append(str(entry))

    # 4. a crash while a snapshot copy held an upper frozen must not leave it frozen;
    #    then layer mounts nobody holds, then loop devices nobody mounts
    for m in host.mounts_under(layout.layers):
        host.thaw(Path(m.target))
    in_use = engine.mounts.in_use()
    for m in host.mounts_under(layout.layers):
        parts = os.path.relpath(m.target, layout.layers).split("/")
        if len(parts) == 2 and parts[1] == "mnt" and parts[0] not in in_use:
            _settle(host.umount, m.target, rep)
            rep.unmounted.append(m.target)
    mounted_sources = {m.source for m in host.mounts()}
    keep = {v.stage_options.get("device") for v in volumes if v.staging_path}
    keep |= {p.options.get("device") for p in pubs}
    ours = {host.file_id(layout.image(x)) for x in layers} - {None}
    for device, backing in host.loop_backing_ids().items():
        if backing not in ours or device in mounted_sources:
            continue
        if device in keep:
            rep.adopted.append(device)
        else:
            host.loop_detach(device)
            rep.detached.append(device)
    return rep


def _settle(action, target, rep: Report) -> None:
    """One repair; a busy mount or dir is logged and left for the next start
    rather than stopping the driver from serving what is healthy."""
    try:
        action(target)
    except (CommandFailed, OSError) as e:
        log.error("reconcile could not clean %s: %s", target, e)
        rep.failed.append(str(target))


def _upper_of(m: host.MountEntry) -> str | None:
    """The layer id of an overlay's upper, from its relative upperdir option."""
    for opt in m.super_options.split(","):
        if opt.startswith("upperdir="):
            parts = opt[len("upperdir=") :].split("/")
            if len(parts) >= 2 and parts[0] == "layers" and ID_RE.match(parts[1]):
                return parts[1]
    return None
