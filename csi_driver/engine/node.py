"""The node side: stage (mount the layers' stack), publish (bind it), stats and health.

Each call reads the mount table once (``Mounter.table``) and asks that reading
every question; layers are activated through the backend, which checks its own
mounts without the table.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from pathlib import Path

from csi_driver import host
from csi_driver.engine.block import BlockVolumes
from csi_driver.engine.capacity import Capacity
from csi_driver.engine.context import BLOCK, CrashHook, VolumeStats
from csi_driver.engine.modify import Modifier
from csi_driver.engine.mounter import Mounter
from csi_driver.engine.node_checks import NodeChecks
from csi_driver.engine.records import Records
from csi_driver.errors import Aborted, AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from csi_driver.layerstore.backend import LayerBackend, Mount
from csi_driver.store import Layer, Publication, Store, Volume

log = logging.getLogger(__name__)

SELINUX_ENFORCE = Path("/sys/fs/selinux/enforce")
SELINUX_CONTEXT = "context="
# kubelet's own paths for a block volume (csi_block.go): the publish path, its bind
# mount in the global map path (util.MapBlockVolume), and the staging path
_BLOCK_PUBLISH = "plugins/kubernetes.io/csi/volumeDevices/publish/{pv}/"
_BLOCK_MAP = "plugins/kubernetes.io/csi/volumeDevices/{pv}/dev/"
_BLOCK_STAGING = "plugins/kubernetes.io/csi/volumeDevices/staging/"


def selinux_enabled() -> bool:
    return SELINUX_ENFORCE.exists()


def without_selinux_context(flags: list[str] | None) -> list[str]:
    return [f for f in flags or [] if not f.startswith(SELINUX_CONTEXT)]


def stage_mount_flags(flags: list[str] | None) -> list[str]:
    """The flags of the stage mount: kubelet's seLinuxMount ``context="..."`` labels the
    whole mount, so it applies here only, and only on a host with SELinux enabled."""
    kept = without_selinux_context(flags)
    dropped = [f for f in flags or [] if f not in kept]
    if dropped and not selinux_enabled():
        log.debug("SELinux is not enabled on this host; ignoring mount flag %s", dropped[0])
        return kept
    return [*kept, *dropped]


class NodePublisher:
    def __init__(
        self,
        store: Store,
        backend: LayerBackend,
        records: Records,
        checks: NodeChecks,
        capacity: Capacity,
        mounter: Mounter,
        block: BlockVolumes,
        modifier: Modifier,
        step: CrashHook,
    ) -> None:
        self.store = store
        self.backend = backend
        self.records = records
        self.checks = checks
        self.capacity = capacity
        self.mounter = mounter
        self.block = block
        self.modifier = modifier
        self.step = step
        self._held: set[str] = set()  # volumes whose layers this process holds activated

    # ---- what the kernel shows ----------------------------------------------
    def shows(self, table: host.Mounts, path: str, v: Volume) -> bool:
        """Whether ``path`` holds a mount of the volume's layers (its overlay, or a bind of it)."""
        entry = table.at(path)
        return entry is not None and self.backend.mounted_layer(entry) == v.upper

    def holds(self, entry: host.MountEntry | None, v: Volume, root_fd: int | None = None) -> bool:
        """Whether ``entry`` (the mount an opened path lies on) is the volume's layers,
        and ``root_fd`` (if given) is that mount's root."""
        if entry is None or self.backend.mounted_layer(entry) != v.upper:
            return False
        return root_fd is None or host.beneath.is_mount_root(root_fd)

    def is_staged(self, v: Volume, table: host.Mounts | None = None) -> bool:
        """The kernel, not the record, says whether a volume is in use."""
        if v.access_type == BLOCK:
            return self.block.is_staged(v)
        if not v.staging_path:
            return False
        return self.shows(table or self.mounter.table(), v.staging_path, v)

    def live_publications(self, volume_id: str, table: host.Mounts) -> list[str]:
        with self.store.read() as tx:
            pubs = tx.publications(volume_id)
        return [p.target_path for p in pubs if table.is_mounted(p.target_path)]

    # ---- layer activation ---------------------------------------------------
    def hold(self, v: Volume, chain: list[Layer]) -> None:
        """Activate the volume's layers (its lowers read-only, its upper read-write)."""
        done: list[Layer] = []
        try:
            for layer in chain:
                self.backend.activate(layer)
                done.append(layer)
        except Exception:
            for layer in done:
                self.backend.deactivate(layer)
            raise
        self._held.add(v.id)

    def drop(self, v: Volume, chain: list[Layer] | None = None) -> None:
        if v.id not in self._held:
            return
        self._held.discard(v.id)
        for layer in chain or self.records.chain(v.upper):
            self.backend.deactivate(layer)

    def forget(self, volume_id: str) -> None:
        """A deleted volume is held no more (its layers' storage goes with it)."""
        self._held.discard(volume_id)

    # ---- stage / unstage ----------------------------------------------------
    def stage(self, volume_id: str, staging_path: str, mount_flags: list[str] | None = None) -> None:
        v = self.records.volume(volume_id)
        if v.access_type == BLOCK:
            return self.block.stage(v, staging_path)
        table = self.mounter.table()
        chain = self.records.chain(v.upper)
        if v.staging_path and v.staging_path != staging_path and self.shows(table, v.staging_path, v):
            raise FailedPrecondition(f"volume {volume_id} is already staged at {v.staging_path}")
        if self.shows(table, staging_path, v):
            if v.id not in self._held:
                self.hold(v, chain)
            return
        if table.is_mounted(staging_path):
            raise FailedPrecondition(f"{staging_path} already has another mount")
        self.checks.hides_nothing(staging_path)
        self.checks.stage_limit(v)
        with self.store.tx() as tx:
            tx.update_volume(
                volume_id, staging_path=staging_path, stage_options={"mount_flags": mount_flags or []}
            )
        self.step("stage.recorded")
        try:
            host.beneath.mkdir_beneath(staging_path)
            if v.id in self._held and not all(self.backend.is_active(x) for x in chain):
                self.drop(v, chain)  # a stale hold: its mounts vanished (node reboot, manual umount)
            if v.id not in self._held:
                self.hold(v, chain)
            flags = stage_mount_flags(mount_flags)
            for m in self.backend.mounts(chain):
                self.mounter.mount(Mount(m.type, m.source, (*m.options, *flags), m.cwd), staging_path)
            self.modifier.apply(v)
        except Exception:
            self.mounter.umount(staging_path)
            self.drop(v, chain)
            self.forget_staging(volume_id, staging_path)
            raise
        self.step("stage.mounted")

    def forget_staging(self, volume_id: str, staging_path: str) -> None:
        """A stage that failed (nothing is mounted, nothing is held) leaves no record:
        a stale staging path would make later calls at or above it refuse."""
        with self.store.tx() as tx:
            current = tx.volume(volume_id)
            if current is not None and current.staging_path == staging_path:
                tx.update_volume(volume_id, staging_path=None, stage_options={})

    def unstage(self, volume_id: str, staging_path: str) -> None:
        v = self.records.volume(volume_id)
        table = self.mounter.table()
        live = self.live_publications(volume_id, table)
        if live:
            raise FailedPrecondition(f"volume {volume_id} is still published at {live[0]}")
        if v.access_type == BLOCK:
            return self.block.unstage(v, staging_path)
        if v.staging_path not in (None, staging_path) and self.shows(table, v.staging_path, v):
            return  # staged at another path: nothing is staged at this one, and its layers stay held
        if self.shows(table, staging_path, v):
            self.mounter.umount(staging_path)
        self.step("unstage.unmounted")
        self.drop(v)
        if v.staging_path == staging_path or v.staging_path is None:
            with self.store.tx() as tx:
                tx.update_volume(volume_id, staging_path=None, stage_options={})
        self.step("unstage.done")

    def release_orphan_staging(self, staging_path: str) -> bool:
        """Unstage of a volume that no longer exists (deleted while the node was down,
        kubelet then reconstructs and unstages it): done if nothing is mounted at the
        staging path, which is left as it is (kubelet removes its own dir)."""
        return not self.mounter.table().is_mounted(staging_path)

    # ---- publish / unpublish ------------------------------------------------
    def publish(
        self,
        volume_id: str,
        staging_path: str,
        target_path: str,
        readonly: bool,
        mount_flags: list[str] | None = None,
        single_writer: bool = False,
    ) -> None:
        v = self.records.volume(volume_id)
        table = self.mounter.table()
        if v.access_type == BLOCK:
            return self.block.publish(v, staging_path, target_path, readonly, single_writer, table)
        if v.staging_path != staging_path or not self.shows(table, staging_path, v):
            raise FailedPrecondition(f"volume {volume_id} is not staged at {staging_path}")
        # a bind shares the staging mount's SELinux context; a remount cannot change it
        mount_flags = without_selinux_context(mount_flags)
        want = (["ro"] if readonly else []) + list(mount_flags or [])
        entry = table.at(target_path)
        if entry is not None:
            with self.store.read() as tx:
                pub = tx.publication_at(target_path)
            if (
                pub
                and pub.volume_id == volume_id
                and pub.readonly == readonly
                and self.shows(table, target_path, v)
            ):
                have = set(entry.options.split(","))
                if any(flag not in have for flag in want):  # a crash cut the publish short
                    self.mounter.remount_bind(target_path, ["ro" if readonly else "rw", *(mount_flags or [])])
                return
            raise AlreadyExists(f"{target_path} is already published with other arguments")
        self.checks.single_writer(
            v, target_path, readonly, single_writer, live=lambda p: self.shows(table, p.target_path, v)
        )
        self.checks.hides_nothing(target_path)
        with self.store.tx() as tx:
            tx.add_publication(
                Publication(
                    volume_id,
                    target_path,
                    readonly,
                    {"mount_flags": mount_flags or [], "single_writer": single_writer},
                )
            )
        self.step("publish.recorded")
        made = not os.path.lexists(target_path)
        try:
            host.beneath.mkdir_beneath(target_path)
            # the staging path as opened must still hold the volume's overlay
            self.mounter.bind(staging_path, target_path, source_ok=lambda e: self.holds(e, v))
            self.step("publish.mounted")
            if want:  # a bind takes the staging mount's flags; ro and the pod's flags are its own
                self.mounter.remount_bind(target_path, ["ro" if readonly else "rw", *(mount_flags or [])])
        except Exception:
            # a failed publish leaves nothing behind: no mount, no record, no dir it made
            self.mounter.umount(target_path)
            if made:
                with contextlib.suppress(OSError, host.beneath.PathRaced):
                    host.beneath.rmdir_beneath(target_path)
            with self.store.tx() as tx:
                tx.delete_publication(volume_id, target_path)
            raise

    def unpublish(self, volume_id: str, target_path: str) -> None:
        v = self.records.volume(volume_id)
        table = self.mounter.table()
        if v.access_type == BLOCK:
            return self.block.unpublish(v, target_path, table)
        if v.staging_path and os.path.normpath(target_path) == os.path.normpath(v.staging_path):
            raise FailedPrecondition(
                f"{target_path} is where volume {volume_id} is staged, not published; "
                "NodeUnstageVolume unmounts it"
            )
        if table.is_mounted(target_path):
            if not self.shows(table, target_path, v):
                raise FailedPrecondition(f"{target_path} holds a mount that is not volume {volume_id}")
            self.mounter.umount(target_path)
        self.step("unpublish.unmounted")
        with self.store.read() as tx:
            pub = tx.publication_at(target_path)
        # only the mount dir of a publication of this volume, never a caller's dir (nor
        # what a symlink swapped in for it names: removed by name in its parent's fd)
        if pub is not None and pub.volume_id == volume_id:
            try:
                host.beneath.rmdir_beneath(target_path)
            except FileNotFoundError:
                pass
            except OSError as e:
                if e.errno == errno.EBUSY:  # still mounted: the path changed under the check
                    raise Aborted(f"{target_path} changed while it was unpublished; try again") from e
                log.warning("could not remove target %s: %s", target_path, e)
        with self.store.tx() as tx:
            tx.delete_publication(volume_id, target_path)

    def set_mount_group(self, volume_id: str, group: str, readonly: bool = False) -> None:
        """VOLUME_MOUNT_GROUP without a recursive chown: the volume's root becomes
        group-owned and setgid, so everything the pod creates inherits the group."""
        if not (group.isascii() and group.isdigit()) or int(group) > 0xFFFFFFFE:
            raise InvalidArgument(f"volume_mount_group {group[:40]!r} is not a numeric group id")
        v = self.records.volume(volume_id)
        if readonly or v.access_type == BLOCK or not v.staging_path:
            return  # like kubelet's own fsGroup handling, never change a volume for a read-only pod
        if not self.shows(self.mounter.table(), v.staging_path, v):
            return
        # the volume's root as opened beneath the kubelet dir, and only if that is
        # still the volume's overlay: never a dir swapped in after the check
        with host.beneath.opened(v.staging_path, os.O_RDONLY | os.O_DIRECTORY) as fd:
            if not self.holds(host.mount_of_fd(fd), v, root_fd=fd):
                raise host.beneath.PathRaced(
                    f"{v.staging_path} is not the mount of volume {volume_id} it was checked to be; refused"
                )
            st = os.fstat(fd)
            if st.st_gid != int(group) or not st.st_mode & 0o2070 == 0o2070:
                os.fchown(fd, -1, int(group))
                os.fchmod(fd, (st.st_mode & 0o7777) | 0o2070)

    def release_orphan_target(self, target_path: str, remove: str = "") -> bool:
        """Unpublish of a volume that no longer exists: fine if nothing is mounted
        at the target; False if something is. ``remove`` is what the caller's check of
        the path's shape allows to go: "dir" (an empty mount dir), "file" (an empty
        block publish file) or "" (nothing: the driver cannot know it made it)."""
        if self.mounter.table().is_mounted(target_path):
            return False
        # by name in the parent's fd: a symlink stays as it is
        with contextlib.suppress(OSError, host.beneath.PathRaced):
            if remove == "dir":
                host.beneath.rmdir_beneath(target_path)
            elif remove == "file":
                host.beneath.unlink_empty_file_beneath(target_path)
        return True

    # ---- stats and health ---------------------------------------------------
    def volume_paths(self, v: Volume) -> set[str]:
        with self.store.read() as tx:
            paths = {p.target_path for p in tx.publications(v.id)}
        if v.staging_path:
            paths.add(v.staging_path)
        return paths

    def block_expand_path_ok(self, v: Volume, volume_path: str, staging_path: str) -> bool:
        """NodeExpandVolume of a staged block volume: kubelet's GenerateExpandInUseVolumeFunc
        sends the device path recorded when the first pod mapped it (that pod may be gone)
        and the staging path. Accept the staging path the volume is staged at, or a path
        shaped like kubelet's publish or map path for the same PV beside that staging
        path. The path is never opened nor mounted: block growth works on the image."""
        if v.access_type != BLOCK or not v.staging_path or not self.block.is_staged(v):
            return False
        if staging_path and os.path.normpath(staging_path) == v.staging_path:
            return True
        root, sep, pv = v.staging_path.rpartition("/" + _BLOCK_STAGING)
        if not sep or not pv or "/" in pv:
            return False
        path = os.path.normpath(volume_path)
        for shape in (_BLOCK_PUBLISH, _BLOCK_MAP):
            prefix = f"{root}/{shape.format(pv=pv)}"
            rest = path[len(prefix) :] if path.startswith(prefix) else ""
            if rest and "/" not in rest:
                return True
        return False

    def stats(self, volume_id: str, path: str) -> VolumeStats:
        v = self.records.volume(volume_id)
        known = os.path.normpath(path) in self.volume_paths(v)
        if not known and not (v.access_type == BLOCK and self.block.shows_device(v, path)):
            raise NotFound(f"{path} is not a path of volume {volume_id}")
        table = self.mounter.table()
        if v.access_type == BLOCK:
            return self.block.stats(v, self.condition(v, path, table))
        try:
            chain = self.records.chain(v.upper)
        except LookupError:  # deleted while we looked
            return VolumeStats(0, 0, 0, 0, 0, 0, True, f"volume {v.id} is being deleted")
        condition = self.condition(v, path, table, chain[0])
        # An overlay reports its upper's file system, so the upper's own figures are
        # the volume's even when the path is gone (kubelet drops a stats answer
        # without usage before it reads the condition).
        fs = self.backend.fs_usage(chain[0])
        if fs is None:
            return VolumeStats(0, 0, 0, 0, 0, 0, True, condition or f"volume {v.id} is not staged")
        # used: the data in the volume's own layers plus its upper, against its capacity;
        # available: what the upper can still take (it always has the full capacity,
        # so files of the layers can be copied up). Used above total is reported as is.
        held = sum(x.used_bytes for x in chain[1:] if x.name is None)
        return VolumeStats(
            v.capacity_bytes,
            held + fs.used_bytes,
            fs.available_bytes,
            fs.total_inodes,
            fs.used_inodes,
            fs.available_inodes,
            bool(condition),
            condition or "volume is healthy",
        )

    def conditions(self, vols: list[Volume]) -> dict[str, str]:
        """The condition of many volumes (ListVolumes) from one reading of the mount
        table and one of the layers."""
        table = self.mounter.table()
        with self.store.read() as tx:
            layers = {x.id: x for x in tx.layers()}
        low = self.capacity.low()
        return {v.id: self.condition(v, None, table, layers.get(v.upper), low) for v in vols}

    def condition(
        self,
        v: Volume,
        path: str | None = None,
        table: host.Mounts | None = None,
        upper: Layer | None = None,
        low: str | None = None,
    ) -> str:
        """An empty string when healthy, else what is wrong."""
        problem = self._problem(v, path, table or self.mounter.table(), upper)
        if problem:
            return problem
        low = self.capacity.low() if low is None else low
        return f"{low}; writes to this volume may fail before it is full" if low else ""

    def _problem(self, v: Volume, path: str | None, table: host.Mounts, upper: Layer | None) -> str:
        if v.access_type == BLOCK:
            return self.block.condition(v, path, table)
        upper = upper or self.records.layer(v.upper)
        if upper is None:  # deleted while we looked (ListVolumes is not serialised per volume)
            return f"volume {v.id} is being deleted"
        problem = self.backend.health(upper, table if v.staging_path else None)
        if problem:
            return f"the upper of volume {v.id}: {problem}"
        for p in [path] if path else ([v.staging_path] if v.staging_path else []):
            if not self.shows(table, p, v):
                return f"{p} is not mounted (node restarted?); stage and publish again"
        return ""
