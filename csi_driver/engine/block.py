"""Raw block volumes: a device the backend describes, published as a device node.

A block volume has no file system to overlay, so it is one active layer of
kind ``block`` with no parents; snapshots, restores and clones copy only the
allocated extents of its file (a reflink where the host can clone). What its
device is made of is the backend's answer (``block_mount``: Mount data, a loop
device over its file); the mount manager attaches it at stage, again when a
restarted driver or rebooted node stages again, and detaches it at unstage.
The device is recorded with the staging (and with a read-only publication's own
device); the manager says whether a recorded device still is the volume's.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
from pathlib import Path

from csi_driver import host
from csi_driver.engine.context import CrashHook, VolumeStats
from csi_driver.engine.modify import Modifier
from csi_driver.engine.mounter import Mounter
from csi_driver.engine.node_checks import NodeChecks
from csi_driver.engine.records import Records
from csi_driver.errors import Aborted, AlreadyExists, FailedPrecondition, OutOfRange
from csi_driver.layerstore.backend import LayerBackend, Mount
from csi_driver.store import Layer, Publication, Store, Volume

log = logging.getLogger(__name__)


def block_aligned(capacity: int, limit: int) -> int:
    """A loop device is whole 512-byte sectors; keep block sizes in 4 KiB blocks."""
    aligned = (capacity + 4095) // 4096 * 4096
    if limit and aligned > limit:
        raise OutOfRange(
            f"a block volume is whole 4 KiB blocks; {capacity} bytes round to {aligned}, "
            f"above limit_bytes {limit}"
        )
    return aligned


class BlockVolumes:
    def __init__(
        self,
        store: Store,
        backend: LayerBackend,
        records: Records,
        checks: NodeChecks,
        modifier: Modifier,
        mounter: Mounter,
        step: CrashHook,
    ) -> None:
        self.store = store
        self.backend = backend
        self.records = records
        self.checks = checks
        self.modifier = modifier
        self.mounter = mounter
        self.step = step

    def file(self, v: Volume) -> Path:
        return self.backend.block_file(self.records.upper_of(v))

    def device_of(self, v: Volume, readonly: bool = False, upper: Layer | None = None) -> Mount:
        """What the volume's device is made of (``upper``: its layer, when known)."""
        return self.backend.block_mount(upper or self.records.upper_of(v), readonly)

    def device_ok(self, v: Volume, device: str | None, readonly: bool = False) -> bool:
        """Whether ``device`` still is the volume's (read-only) device."""
        return bool(device) and self.mounter.holds(device, self.device_of(v, readonly))

    def is_staged(self, v: Volume) -> bool:
        return self.device_ok(v, v.stage_options.get("device"))

    def stage(self, v: Volume, staging_path: str) -> None:
        want = self.device_of(v)
        staged = self.mounter.holds(v.stage_options.get("device"), want)
        if v.staging_path and v.staging_path != staging_path and staged:
            raise FailedPrecondition(f"volume {v.id} is already staged at {v.staging_path}")
        if v.staging_path == staging_path and staged:
            return
        self.checks.hides_nothing(staging_path)
        self.checks.stage_limit(v)
        with self.store.tx() as tx:
            tx.update_volume(v.id, staging_path=staging_path, stage_options={})
        self.step("stage.recorded")
        try:
            host.beneath.mkdir_beneath(staging_path)
            device = self.mounter.attach(want)
        except Exception:  # a failed stage leaves no record behind
            with self.store.tx() as tx:
                tx.update_volume(v.id, staging_path=None, stage_options={})
            raise
        with self.store.tx() as tx:
            tx.update_volume(v.id, stage_options={"device": device})
        self.modifier.apply(v)
        self.step("stage.mounted")

    def unstage(self, v: Volume, staging_path: str) -> None:
        if v.staging_path and v.staging_path != staging_path:
            return  # not staged there: nothing to undo, and the real staging stays
        device = v.stage_options.get("device")
        if self.device_ok(v, device):
            self.mounter.detach(device)
        self.step("unstage.unmounted")
        if v.staging_path in (staging_path, None):
            with self.store.tx() as tx:
                tx.update_volume(v.id, staging_path=None, stage_options={})
        self.step("unstage.done")

    def _target_ok(self, v: Volume, pub: Publication | None, target: str, table: host.Mounts) -> bool:
        if pub is None or pub.volume_id != v.id or not table.is_mounted(target):
            return False
        return self.device_ok(v, pub.options.get("device"), pub.readonly)

    def publish(
        self,
        v: Volume,
        staging_path: str,
        target_path: str,
        readonly: bool,
        single_writer: bool,
        table: host.Mounts,
    ) -> None:
        device = v.stage_options.get("device")
        if v.staging_path != staging_path or not self.device_ok(v, device):
            raise FailedPrecondition(f"volume {v.id} is not staged at {staging_path}")
        with self.store.read() as tx:
            pub = tx.publication_at(target_path)
        if table.is_mounted(target_path):
            if pub is not None and self._target_ok(v, pub, target_path, table) and pub.readonly == readonly:
                return
            raise AlreadyExists(f"{target_path} is already published with other arguments")

        def live(p: Publication) -> bool:
            return self._target_ok(v, p, p.target_path, table)

        self.checks.single_writer(v, target_path, readonly, single_writer, live=live)
        self.checks.hides_nothing(target_path)
        target = Path(target_path)
        made = not os.path.lexists(target_path)
        if not made and not (target.is_file() and not target.is_symlink() and target.stat().st_size == 0):
            # the device is bound over the target: never over a caller's file or dir
            raise FailedPrecondition(
                f"{target_path} exists and is not an empty file; a block volume is published "
                "only at a new or empty file"
            )
        attached = None
        if readonly:  # a read-only bind mount does not stop writes to a device node
            earlier = pub.options.get("device") if pub and pub.volume_id == v.id else None
            ro = self.device_of(v, readonly=True)
            if self.mounter.holds(earlier, ro):  # an attempt cut short by a crash: reuse its device
                device = earlier
            else:
                device = attached = self.mounter.attach(ro)
        with self.store.tx() as tx:
            tx.add_publication(
                Publication(v.id, target_path, readonly, {"device": device, "single_writer": single_writer})
            )
        self.step("publish.recorded")
        try:
            # made, opened and bound by fd beneath the kubelet dir: never over what a
            # symlink swapped in names
            host.beneath.mkdir_beneath(os.path.dirname(target_path))
            host.beneath.create_empty_file_beneath(target_path)
            self.mounter.bind_device(device, target_path)
        except Exception:  # a failed publish leaves nothing behind: no record, no file it made
            self.mounter.umount(target_path)
            if made:
                with contextlib.suppress(OSError, host.beneath.PathRaced):
                    host.beneath.unlink_empty_file_beneath(target_path)
            if attached:
                self.mounter.detach(attached)
            with self.store.tx() as tx:
                tx.delete_publication(v.id, target_path)
            raise
        self.step("publish.mounted")

    def unpublish(self, v: Volume, target_path: str, table: host.Mounts) -> None:
        with self.store.read() as tx:
            pub = tx.publication_at(target_path)
        if table.is_mounted(target_path):
            if not self._target_ok(v, pub, target_path, table):
                raise FailedPrecondition(f"{target_path} holds a mount that is not volume {v.id}")
            self.mounter.umount(target_path)
        self.step("unpublish.unmounted")
        if pub and pub.readonly and self.device_ok(v, pub.options.get("device"), readonly=True):
            self.mounter.detach(pub.options["device"])
        # only the empty file this driver created as the mount point, never a caller's
        # file (nor what a symlink swapped in names: removed by name in its parent's fd)
        if pub is not None:
            try:
                host.beneath.unlink_empty_file_beneath(target_path)
            except FileNotFoundError:
                pass
            except OSError as e:
                if e.errno == errno.EBUSY:  # still mounted: the path changed under the check
                    raise Aborted(f"{target_path} changed while it was unpublished; try again") from e
                raise
        with self.store.tx() as tx:
            tx.delete_publication(v.id, target_path)

    def condition(self, v: Volume, path: str | None, table: host.Mounts) -> str:
        upper = self.records.layer(v.upper)
        if upper is None:  # deleted while we looked
            return f"volume {v.id} is being deleted"
        image = self.backend.block_file(upper)
        if not image.exists():
            return f"the image of block volume {v.id} is missing"
        if v.staging_path and not self.mounter.holds(
            v.stage_options.get("device"), self.device_of(v, upper=upper)
        ):
            return f"the loop device of volume {v.id} is gone (node restarted?); stage it again"
        if path and path != v.staging_path and not table.is_mounted(path):
            return f"{path} is not published (node restarted?); publish it again"
        return ""

    def devices(self, v: Volume, pubs: list[Publication] | None = None) -> list[str]:
        """The devices attached for the volume now: its staging one (read-write) and
        those its publications name, a read-only one's its own (``pubs``: its
        publications, when read)."""
        if pubs is None:
            with self.store.read() as tx:
                pubs = tx.publications(v.id)
        upper = self.records.upper_of(v)
        rw, ro = self.device_of(v, upper=upper), self.device_of(v, readonly=True, upper=upper)
        found = [(v.stage_options.get("device"), rw)]
        found += [(p.options.get("device"), ro if p.readonly else rw) for p in pubs]
        return list(dict.fromkeys(d for d, m in found if d and self.mounter.holds(d, m)))

    def shows_device(self, v: Volume, path: str) -> bool:
        """Whether ``path`` itself (not followed if a symlink) is a block device node of one
        of the volume's own loop devices: kubelet asks stats at its bind mount of the publish
        path (csi_plugin.go NewBlockVolumeMapper, util.MapBlockVolume), not at a path the
        driver knows."""
        try:
            st = os.lstat(path)
        except (OSError, ValueError):
            return False
        if not stat.S_ISBLK(st.st_mode):
            return False
        for device in self.devices(v):
            try:
                if os.stat(device).st_rdev == st.st_rdev:
                    return True
            except OSError:
                continue
        return False

    def stats(self, v: Volume, condition: str) -> VolumeStats:
        """The device's size, with the volume's condition (``NodePublisher.condition``)."""
        size = os.path.getsize(self.file(v))
        return VolumeStats(size, 0, 0, 0, 0, 0, bool(condition), condition or "volume is healthy")

    def grow(self, v: Volume, size: int) -> None:
        """Make the file at least ``size`` bytes; either way its devices learn its size."""
        upper = self.records.upper_of(v)
        current = os.path.getsize(self.backend.block_file(upper))
        self.backend.resize(upper, max(size, current))
