"""Start-up reconciliation: make disk, mounts and loop devices agree with the store.

The store is the source of truth. Scratch builds never survive a restart;
staged volumes whose mounts survived a driver restart are adopted; an overlay
of ours that no record stages is debris; then the backend removes what the
store does not know and releases what nobody holds.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from csi_driver import host
from csi_driver.engine.context import BLOCK
from csi_driver.engine.engine import Engine
from csi_driver.errors import CommandFailed
from csi_driver.layerstore.backend import CleanupReport
from csi_driver.store import Publication

log = logging.getLogger(__name__)


@dataclass
class Report(CleanupReport):
    """What the backend's cleanup did, and what the engine adopted and collected."""

    adopted: list[str] = field(default_factory=list)
    collected: list[str] = field(default_factory=list)
    missing_images: list[str] = field(default_factory=list)


def reconcile(engine: Engine) -> Report:
    rep = Report()
    state, backend = engine.state, engine.backend

    for entry in sorted(state.tmp.iterdir()):
        _settle(host.remove_tree, entry, rep)
        rep.removed.append(str(entry))

    with engine.store.tx() as tx:
        gone = tx.collect_garbage()
        layers = {x.id: x for x in tx.layers()}
        volumes = tx.volumes()
        pubs = tx.publications()
    engine.builds.discard(gone)
    rep.collected = [x.id for x in gone]
    for layer in layers.values():
        problem = backend.health(layer)
        if problem:
            rep.missing_images.append(layer.id)
            log.error("layer %s: %s", layer.id, problem)

    # Adopt staged volumes whose overlay survived. An overlay of ours whose volume
    # is not staged by the record is debris, and so is every bind of it; an overlay
    # of a staged volume is never touched, wherever it is mounted (kubelet's
    # subPath binds, paths reached through symlinks).
    table = engine.node.mounter.table()
    for v in volumes:
        if v.staging_path and engine.node.shows(table, v.staging_path, v):
            engine.node.hold(v, engine.chain(v.upper))
            rep.adopted.append(v.id)
    staged_uppers = {v.upper for v in volumes if v.staging_path}
    for m in sorted(table.entries, key=lambda m: m.target.count("/"), reverse=True):
        upper = backend.mounted_layer(m)
        if upper and upper in layers and upper not in staged_uppers:
            _settle(engine.node.mounter.umount, m.target, rep)
            rep.unmounted.append(m.target)

    # ephemeral volumes' private staging dirs whose volume is gone
    for entry in sorted(state.ephemeral.iterdir()):
        if entry.name not in {v.id for v in volumes}:
            _settle(host.remove_tree, entry, rep)
            rep.removed.append(str(entry))

    # Block volumes' devices: those the record names that the mount manager finds
    # still to be the volume's (sysfs, no losetup) are kept; the backend detaches
    # every other device of its layers.
    pubs_of: dict[str, list[Publication]] = {}
    for p in pubs:
        pubs_of.setdefault(p.volume_id, []).append(p)
    keep: set[str] = set()
    for v in volumes:
        if v.access_type == BLOCK and v.upper in layers and (v.staging_path or v.id in pubs_of):
            keep.update(engine.block.devices(v, pubs_of.get(v.id, [])))
    cleaned = backend.cleanup(layers, keep)
    rep.removed += cleaned.removed
    rep.unmounted += cleaned.unmounted
    rep.detached += cleaned.detached
    rep.failed += cleaned.failed
    rep.adopted += sorted(keep)
    return rep


def _settle(action, target, rep: Report) -> None:
    """One repair; a busy mount or dir is logged and left for the next start
    rather than stopping the driver from serving what is healthy."""
    try:
        action(target)
    except (CommandFailed, OSError) as e:
        log.error("reconcile could not clean %s: %s", target, e)
        rep.failed.append(str(target))
