"""Everything the driver asks of the host, and nothing about volumes or layers:
the mount table, mounting, loop devices, image files and host tools. Every
function is safe to repeat.

- ``mounttable``: what is mounted where (MountTable, LiveMounts, is_mount_point)
- ``mounting``: mount(2), umount2(2), binds, freeze and thaw; node paths by fd
- ``beneath``: node paths opened beneath a root (openat2), acted on by that fd
- ``fsmount``: a new mount made detached (fsopen, fsconfig, fsmount)
- ``mountopts``: a mount option list read once for mount(2), fsmount and fsconfig
- ``mount_manager``: mounts and loop devices as data (``Mount``), and the one
  ``MountManager`` that performs and undoes them
- ``loopdev``: direct-I/O loop devices set up with one ioctl
- ``loops``: loop devices as sysfs and losetup list them
- ``files``: sparse images, copies, reflinks, ext4 superblocks
- ``fsreserve``: an ext4's reserved clusters (sysfs)
- ``tools``: the host programs (mkfs, resize2fs, tune2fs, blockdev, blkid)
"""

from csi_driver.host import beneath, fsreserve, loopdev, mount_manager
from csi_driver.host.files import (
    FICLONE,
    allocate,
    allocated_bytes,
    can_reflink,
    copy_sparse,
    create_sparse,
    data_extents,
    data_map,
    ext4_superblock,
    file_id,
    fs_used_bytes,
    reflink,
    release_unwritten,
    sector_size_of,
    tree_bytes,
    tree_usage,
    unshare,
)
from csi_driver.host.loops import (
    count_loops_under,
    loop_attach,
    loop_backing_file,
    loop_backing_ids,
    loop_detach,
    loop_devices,
    loop_refresh,
    loops_under,
)
from csi_driver.host.mounting import (
    UMOUNT_BUSY_RETRIES,
    bind_beneath,
    bind_mount,
    freeze,
    mount,
    mount_beneath,
    mount_device,
    mount_image,
    remount,
    remount_bind,
    remount_bind_beneath,
    remove_tree,
    thaw,
    umount,
    umount_beneath,
)
from csi_driver.host.mounttable import (
    LiveMounts,
    MountEntry,
    Mounts,
    MountTable,
    device_of,
    is_mount_point,
    is_mounted,
    mount_at,
    mount_of_fd,
    mount_view,
    mounts,
    mounts_under,
)
from csi_driver.host.tools import (
    e2fsck,
    e2fsck_repair,
    ext4_metadata,
    flush_buffers,
    grow_fs,
    mkfs,
    mkfs_pool,
    probe_signature,
    resize2fs,
    run,
    set_read_ahead,
    tune2fs_reserved,
)

__all__ = [
    "FICLONE",
    "UMOUNT_BUSY_RETRIES",
    "LiveMounts",
    "MountEntry",
    "MountTable",
    "Mounts",
    "allocate",
    "allocated_bytes",
    "beneath",
    "bind_beneath",
    "bind_mount",
    "can_reflink",
    "copy_sparse",
    "data_extents",
    "create_sparse",
    "data_map",
    "device_of",
    "e2fsck",
    "e2fsck_repair",
    "ext4_metadata",
    "ext4_superblock",
    "file_id",
    "flush_buffers",
    "freeze",
    "fsreserve",
    "fs_used_bytes",
    "grow_fs",
    "is_mount_point",
    "is_mounted",
    "loop_attach",
    "loop_backing_file",
    "loop_backing_ids",
    "loop_detach",
    "loop_devices",
    "count_loops_under",
    "loop_refresh",
    "loopdev",
    "loops_under",
    "mkfs",
    "mkfs_pool",
    "mount",
    "mount_at",
    "mount_beneath",
    "mount_of_fd",
    "mount_device",
    "mount_image",
    "mount_view",
    "mount_manager",
    "mounts",
    "mounts_under",
    "probe_signature",
    "reflink",
    "release_unwritten",
    "remount",
    "remount_bind",
    "remount_bind_beneath",
    "remove_tree",
    "resize2fs",
    "run",
    "sector_size_of",
    "set_read_ahead",
    "thaw",
    "tree_bytes",
    "tree_usage",
    "tune2fs_reserved",
    "umount",
    "umount_beneath",
    "unshare",
]
