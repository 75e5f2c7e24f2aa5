"""Raw block volumes: a sparse image on a loop device, published as a device node.

A block volume has no file system to overlay, so it is one active layer of
kind ``block`` with no parents; snapshots, restores and clones copy only the
allocated extents of its image (no reflink on the host). Loop devices are
attached at stage, re-attached when a restarted driver or rebooted node stages
again, and detached at unstage.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from csi_driver.engine import host
from csi_driver.engine.core import VolumeStats
from csi_driver.engine.modify import ModifyOps
from csi_driver.errors import AlreadyExists, FailedPrecondition, OutOfRange, ResourceExhausted
from csi_driver.store import Publication, Volume

log = logging.getLogger(__name__)

BLOCK = "block"


class BlockOps(ModifyOps):
    def _block_build(self, dest: Path, capacity: int, source: Volume | Path | None) -> None:
        """A new block image at ``dest``: empty, or a copy of a snapshot's image
        (a path) or of a volume's current data."""
        if source is None:
            host.create_sparse(dest, capacity)
            return
        if isinstance(source, Path):
            if not host.reflink(source, dest):
                host.copy_sparse(source, dest)
        else:
            self._block_capture(source, dest)
        if os.path.getsize(dest) < capacity:
            os.truncate(dest, capacity)

    @staticmethod
    def _block_aligned(capacity: int, limit: int) -> int:
        """A loop device is whole 512-byte sectors; keep block sizes in 4 KiB blocks."""
        aligned = (capacity + 4095) // 4096 * 4096
        if limit and aligned > limit:
            raise OutOfRange(
                f"a block volume is whole 4 KiB blocks; {capacity} bytes round to {aligned}, "
                f"above limit_bytes {limit}"
            )
        return aligned

    def _block_capture(self, v: Volume, dest: Path) -> None:
        """Copy a block volume's data as of one instant.

        A detached volume's image does not change, so any copy is exact. An
        attached one is written to while we read; only a reflink (one atomic
        clone of the file, after flushing the device) is a point-in-time copy,
        and without one we refuse rather than hand out a torn image.
        """
        image = self.layout.image(v.upper)
        devices = self._loop_devices_of(v)
        for device in devices:
            host.run(["blockdev", "--flushbufs", device], check=False)
        if host.reflink(image, dest):
            return
        if devices:
            raise FailedPrecondition(
                f"volume {v.id} is an in-use block volume: a consistent copy needs reflink on the "
                "state dir's file system (xfs or btrfs); unpublish and unstage it first, or move the "
                "state dir to such a file system"
            )
        host.copy_sparse(image, dest)

    def _is_staged(self, v: Volume) -> bool:
        """The kernel, not the record, says whether a volume is in use."""
        if v.access_type == BLOCK:
            return self._block_device_ok(v, v.stage_options.get("device"))
        return (
            bool(v.staging_path)
            and host.is_mounted(v.staging_path)
            and host.is_mounted(self.layout.mnt(v.upper))
        )

    def _check_stage_limit(self, v: Volume) -> None:
        """--max-volumes-per-node: how many volumes may be in use on this node."""
        limit = self.config.max_volumes
        if not limit or v.staging_path:
            return
        with self.store.tx() as tx:
            if tx.count_staged(except_id=v.id) >= limit:
                raise ResourceExhausted(
                    f"node {self.config.node_id} already has its maximum of {limit} volumes in use"
                )

    def _block_device_ok(self, v: Volume, device: str | None) -> bool:
        return bool(device) and host.loop_devices().get(device) == str(self.layout.image(v.upper))

    def _block_stage(self, v: Volume, staging_path: str) -> None:
        if (
            v.staging_path
            and v.staging_path != staging_path
            and self._block_device_ok(v, v.stage_options.get("device"))
        ):
            raise FailedPrecondition(f"volume {v.id} is already staged at {v.staging_path}")
        if v.staging_path == staging_path and self._block_device_ok(v, v.stage_options.get("device")):
            return
        self._check_stage_limit(v)
        with self.store.tx() as tx:
            tx.update_volume(v.id, staging_path=staging_path, stage_options={})
        self._step("stage.recorded")
        Path(staging_path).mkdir(parents=True, exist_ok=True)
        device = host.loop_attach(self.layout.image(v.upper))
        with self.store.tx() as tx:
            tx.update_volume(v.id, stage_options={"device": device})
        self._apply_mutable(v)
        self._step("stage.mounted")

    def _block_unstage(self, v: Volume, staging_path: str) -> None:
        if v.staging_path and v.staging_path != staging_path:
            return  # not staged there: nothing to undo, and the real staging stays
        device = v.stage_options.get("device")
        if self._block_device_ok(v, device):
            host.loop_detach(device)
        self._step("unstage.unmounted")
        if v.staging_path in (staging_path, None):
            with self.store.tx() as tx:
                tx.update_volume(v.id, staging_path=None, stage_options={})
        self._step("unstage.done")

    def _block_target_ok(self, v: Volume, pub: Publication | None, target: str) -> bool:
        if pub is None or pub.volume_id != v.id or not host.is_mounted(target):
            return False
        return self._block_device_ok(v, pub.options.get("device"))

    def _block_publish(
        self, v: Volume, staging_path: str, target_path: str, readonly: bool, single_writer: bool
    ) -> None:
        device = v.stage_options.get("device")
        if v.staging_path != staging_path or not self._block_device_ok(v, device):
            raise FailedPrecondition(f"volume {v.id} is not staged at {staging_path}")
        with self.store.tx() as tx:
            pub = tx.publication_at(target_path)
        if host.is_mounted(target_path):
            if self._block_target_ok(v, pub, target_path) and pub.readonly == readonly:
                return
            raise AlreadyExists(f"{target_path} is already published with other arguments")
        self._check_single_writer(v, target_path, readonly, single_writer)
        if readonly:  # a read-only bind mount does not stop writes to a device node
            earlier = pub.options.get("device") if pub and pub.volume_id == v.id else None
            if self._block_device_ok(v, earlier):  # an attempt cut short by a crash: reuse its device
                device = earlier
            else:
                device = host.loop_attach(self.layout.image(v.upper), readonly=True)
        with self.store.tx() as tx:
            tx.add_publication(
                Publication(v.id, target_path, readonly, {"device": device, "single_writer": single_writer})
            )
        self._step("publish.recorded")
        target = Path(target_path)
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            target.touch(mode=0o600)
        host.bind_mount(device, target)
        self._step("publish.mounted")

    def _block_unpublish(self, v: Volume, target_path: str) -> None:
        with self.store.tx() as tx:
            pub = tx.publication_at(target_path)
        if host.is_mounted(target_path):
            if not self._block_target_ok(v, pub, target_path):
                raise FailedPrecondition(f"{target_path} holds a mount that is not volume {v.id}")
            host.umount(target_path)
        self._step("unpublish.unmounted")
        if pub and pub.readonly and self._block_device_ok(v, pub.options.get("device")):
            host.loop_detach(pub.options["device"])
        target = Path(target_path)
        # only the empty file this driver created as the mount point, never a caller's file
        if pub is not None and target.is_file() and not target.is_symlink() and target.stat().st_size == 0:
            target.unlink()
        with self.store.tx() as tx:
            tx.delete_publication(v.id, target_path)

    def _block_condition(self, v: Volume, path: str | None) -> str:
        if not self.layout.image(v.upper).exists():
            return f"the image of block volume {v.id} is missing"
        if v.staging_path and not self._block_device_ok(v, v.stage_options.get("device")):
            return f"the loop device of volume {v.id} is gone (node restarted?); stage it again"
        if path and path != v.staging_path and not host.is_mounted(path):
            return f"{path} is not published (node restarted?); publish it again"
        return ""

    def _block_stats(self, v: Volume, path: str) -> VolumeStats:
        problem = self._block_condition(v, path)
        size = os.path.getsize(self.layout.image(v.upper))
        return VolumeStats(size, 0, 0, 0, 0, 0, bool(problem), problem or "volume is healthy")

    def _block_grow(self, v: Volume, size: int) -> None:
        image = self.layout.image(v.upper)
        if size > os.path.getsize(image):
            os.truncate(image, size)
        for device in self._loop_devices_of(v):
            host.loop_refresh(device)

    def _check_single_writer(self, v: Volume, target_path: str, readonly: bool, single_writer: bool) -> None:
        """SINGLE_NODE_SINGLE_WRITER: while published read-write, nowhere else."""
        with self.store.tx() as tx:
            others = [p for p in tx.publications(v.id) if p.target_path != target_path]
        if single_writer and others:
            raise FailedPrecondition(
                f"volume {v.id} is single-writer and already published at {others[0].target_path}"
            )
        if any(p.options.get("single_writer") and not p.readonly for p in others):
            raise FailedPrecondition(f"volume {v.id} has a single writer at {others[0].target_path}")
