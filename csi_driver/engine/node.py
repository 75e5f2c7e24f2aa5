"""The node side: stage (mount the overlay), publish (bind it), stats and health."""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

from csi_driver.engine import host
from csi_driver.engine.block import BLOCK, BlockOps
from csi_driver.engine.compose import overlay_options
from csi_driver.engine.core import VolumeStats
from csi_driver.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from csi_driver.store import Publication, Volume

log = logging.getLogger(__name__)


class NodeOps(BlockOps):
    def _overlay_is(self, path: str, v: Volume) -> bool:
        entry = host.mount_at(path)
        return (
            entry is not None
            and entry.fstype == "overlay"
            and f"upperdir=layers/{v.upper}/mnt/upper" in entry.super_options
        )

    def _hold_layers(self, v: Volume) -> None:
        """Mount (count) the volume's lowers read-only and its upper read-write."""
        with self.store.tx() as tx:
            chain = tx.chain(v.upper)
        done: list[str] = []
        try:
            for layer in chain:
                self.mounts.acquire(layer.id, layer.fs_type, readonly=not layer.active)
                done.append(layer.id)
        except Exception:
            for layer_id in done:
                self.mounts.release(layer_id)
            raise
        self._staged.add(v.id)

    def _layers_mounted(self, v: Volume) -> bool:
        with self.store.tx() as tx:
            chain = tx.chain(v.upper)
        return all(host.is_mounted(self.layout.mnt(layer.id)) for layer in chain)

    def _drop_layers(self, v: Volume) -> None:
        if v.id not in self._staged:
            return
        self._staged.discard(v.id)
        with self.store.tx() as tx:
            chain = tx.chain(v.upper)
        for layer in chain:
            self.mounts.release(layer.id)

    def stage(self, volume_id: str, staging_path: str, mount_flags: list[str] | None = None) -> None:
        v = self.get_volume(volume_id)
        if v.access_type == BLOCK:
            return self._block_stage(v, staging_path)
        if v.staging_path and v.staging_path != staging_path and self._overlay_is(v.staging_path, v):
            raise FailedPrecondition(f"volume {volume_id} is already staged at {v.staging_path}")
        if self._overlay_is(staging_path, v):
            if v.id not in self._staged:
                self._hold_layers(v)
            return
        if host.is_mounted(staging_path):
            raise FailedPrecondition(f"{staging_path} already has another mount")
        self._check_stage_limit(v)
        with self.store.tx() as tx:
            tx.update_volume(
                volume_id, staging_path=staging_path, stage_options={"mount_flags": mount_flags or []}
            )
        self._step("stage.recorded")
        Path(staging_path).mkdir(parents=True, exist_ok=True)
        if v.id in self._staged and not self._layers_mounted(v):
            self._drop_layers(v)  # a stale hold: its mounts vanished (node reboot, manual umount)
        if v.id not in self._staged:
            self._hold_layers(v)
        try:
            with self.store.tx() as tx:
                links = [x.link for x in tx.chain(v.upper)[1:]]
            opts = overlay_options(links, v.upper) + list(mount_flags or [])
            host.mount("overlay", staging_path, "overlay", opts, cwd=self.layout.root)
            self._apply_mutable(v)
        except Exception:
            host.umount(staging_path)
            self._drop_layers(v)
            raise
        self._step("stage.mounted")

    def unstage(self, volume_id: str, staging_path: str) -> None:
        v = self.get_volume(volume_id)
        with self.store.tx() as tx:
            live = [p.target_path for p in tx.publications(volume_id) if host.is_mounted(p.target_path)]
        if live:
            raise FailedPrecondition(f"volume {volume_id} is still published at {live[0]}")
        if v.access_type == BLOCK:
            return self._block_unstage(v, staging_path)
        if v.staging_path not in (None, staging_path) and self._overlay_is(v.staging_path, v):
            return  # staged at another path: nothing is staged at this one, and its layers stay held
        if self._overlay_is(staging_path, v):
            host.umount(staging_path)
        self._step("unstage.unmounted")
        self._drop_layers(v)
        if v.staging_path == staging_path or v.staging_path is None:
            with self.store.tx() as tx:
                tx.update_volume(volume_id, staging_path=None, stage_options={})
        self._step("unstage.done")

    def publish(
        self,
        volume_id: str,
        staging_path: str,
        target_path: str,
        readonly: bool,
        mount_flags: list[str] | None = None,
        single_writer: bool = False,
    ) -> None:
        v = self.get_volume(volume_id)
        if v.access_type == BLOCK:
            return self._block_publish(v, staging_path, target_path, readonly, single_writer)
        if v.staging_path != staging_path or not self._overlay_is(staging_path, v):
            raise FailedPrecondition(f"volume {volume_id} is not staged at {staging_path}")
        if host.is_mounted(target_path):
            with self.store.tx() as tx:
                pub = tx.publication_at(target_path)
            if (
                pub
                and pub.volume_id == volume_id
                and pub.readonly == readonly
                and self._overlay_is(target_path, v)
            ):
                self._settle_bind(target_path, readonly, mount_flags or [])  # a crash may have cut it short
                return
            raise AlreadyExists(f"{target_path} is already published with other arguments")
        self._check_single_writer(v, target_path, readonly, single_writer)
        with self.store.tx() as tx:
            tx.add_publication(
                Publication(
                    volume_id,
                    target_path,
                    readonly,
                    {"mount_flags": mount_flags or [], "single_writer": single_writer},
                )
            )
        self._step("publish.recorded")
        Path(target_path).mkdir(parents=True, exist_ok=True)
        host.bind_mount(staging_path, target_path)
        self._step("publish.mounted")
        self._settle_bind(target_path, readonly, mount_flags or [])

    @staticmethod
    def _settle_bind(target_path: str, readonly: bool, mount_flags: list[str]) -> None:
        """Make a bind mount's per-mount flags (ro, noexec, ...) what was asked."""
        entry = host.mount_at(target_path)
        have = set(entry.options.split(",")) if entry else set()
        want = (["ro"] if readonly else []) + list(mount_flags)
        if any(flag not in have for flag in want):
            host.run(
                [
                    "mount",
                    "-o",
                    "remount,bind," + ",".join(["ro" if readonly else "rw", *mount_flags]),
                    target_path,
                ]
            )

    def unpublish(self, volume_id: str, target_path: str) -> None:
        v = self.get_volume(volume_id)
        if v.access_type == BLOCK:
            return self._block_unpublish(v, target_path)
        if host.is_mounted(target_path):
            if not self._overlay_is(target_path, v):
                raise FailedPrecondition(f"{target_path} holds a mount that is not volume {volume_id}")
            host.umount(target_path)
        self._step("unpublish.unmounted")
        target = Path(target_path)
        if target.is_dir() and not target.is_symlink():
            try:
                target.rmdir()
            except OSError as e:
                log.warning("could not remove target %s: %s", target_path, e)
        with self.store.tx() as tx:
            tx.delete_publication(volume_id, target_path)

    def set_mount_group(self, volume_id: str, group: str, readonly: bool = False) -> None:
        """VOLUME_MOUNT_GROUP without a recursive chown: the volume's root becomes
        group-owned and setgid, so everything the pod creates inherits the group."""
        if not group.isdigit() or int(group) > 0xFFFFFFFE:
            raise InvalidArgument(f"volume_mount_group {group[:40]!r} is not a numeric group id")
        v = self.get_volume(volume_id)
        if (
            readonly
            or v.access_type == BLOCK
            or not v.staging_path
            or not self._overlay_is(v.staging_path, v)
        ):
            return  # like kubelet's own fsGroup handling, never change a volume for a read-only pod
        root = v.staging_path
        st = os.stat(root)
        if st.st_gid != int(group) or not st.st_mode & 0o2070 == 0o2070:
            os.chown(root, -1, int(group))
            os.chmod(root, (st.st_mode & 0o7777) | 0o2070)

    def release_orphan_target(self, target_path: str) -> bool:
        """Unpublish of a volume that no longer exists: fine if nothing is mounted
        at the target (its empty dir or file is removed); False if something is."""
        if host.is_mounted(target_path):
            return False
        target = Path(target_path)
        with contextlib.suppress(OSError):
            if target.is_dir() and not target.is_symlink():
                target.rmdir()
            elif target.is_file() and not target.is_symlink() and target.stat().st_size == 0:
                target.unlink()
        return True

    def volume_paths(self, v: Volume) -> set[str]:
        with self.store.tx() as tx:
            paths = {p.target_path for p in tx.publications(v.id)}
        if v.staging_path:
            paths.add(v.staging_path)
        return paths

    def stats(self, volume_id: str, path: str) -> VolumeStats:
        v = self.get_volume(volume_id)
        if os.path.normpath(path) not in self.volume_paths(v):
            raise NotFound(f"{path} is not a path of volume {volume_id}")
        if v.access_type == BLOCK:
            return self._block_stats(v, path)
        condition = self.condition(v, path)
        # An overlay reports its upper's file system, so when the path itself is
        # gone the upper's own mount still gives the volume's usage (kubelet
        # drops a stats answer without usage before it reads the condition).
        source = path if not condition else self.layout.mnt(v.upper)
        if condition and not host.is_mounted(source):
            return VolumeStats(0, 0, 0, 0, 0, 0, True, condition)
        st = os.statvfs(source)
        # used: the data in the volume's own layers plus its upper, against its capacity;
        # available: what the upper can still take (it always has the full capacity,
        # so files of the layers can be copied up). Used above total is reported as is.
        held = self._chain_data(self._parent_of_upper(v))
        used = held + (st.f_blocks - st.f_bfree) * st.f_frsize
        return VolumeStats(
            v.capacity_bytes,
            used,
            st.f_bavail * st.f_frsize,
            st.f_files,
            st.f_files - st.f_ffree,
            st.f_favail,
            bool(condition),
            condition or "volume is healthy",
        )

    def condition(self, v: Volume, path: str | None = None) -> str:
        """An empty string when healthy, else what is wrong."""
        if v.access_type == BLOCK:
            return self._block_condition(v, path)
        if not self.layout.image(v.upper).exists():
            return f"the upper image of volume {v.id} is missing"
        for p in [path] if path else ([v.staging_path] if v.staging_path else []):
            if not self._overlay_is(p, v):
                return f"{p} is not mounted (node restarted?); stage and publish again"
        upper = host.mount_at(self.layout.mnt(v.upper))
        if v.staging_path and upper is not None and "ro" in upper.options.split(","):
            return f"the file system of volume {v.id} was remounted read-only after an I/O error"
        return ""
