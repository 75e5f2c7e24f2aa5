"""A mount option list (``["ro", "noatime", "data=writeback", 'context="..."']``)
read once, for every way the driver mounts: mount(2)'s flags and data string,
fsmount(2)'s and mount_setattr(2)'s per-mount attributes, and fsconfig(2)'s
superblock flags and file-system parameters."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MOUNT_ATTR_NOEXEC = 0x8
MOUNT_ATTR__ATIME = 0x70
MOUNT_ATTR_RELATIME = 0x0
MOUNT_ATTR_NOATIME = 0x10
MOUNT_ATTR_STRICTATIME = 0x20
MOUNT_ATTR_NODIRATIME = 0x80

#: the mount's own flags: each mount of one file system may differ
ATTR_FLAGS = {
    "ro": MOUNT_ATTR_RDONLY,
    "nosuid": MOUNT_ATTR_NOSUID,
    "nodev": MOUNT_ATTR_NODEV,
    "noexec": MOUNT_ATTR_NOEXEC,
    "nodiratime": MOUNT_ATTR_NODIRATIME,
}
ATIME = {
    "relatime": MOUNT_ATTR_RELATIME,
    "noatime": MOUNT_ATTR_NOATIME,
    "strictatime": MOUNT_ATTR_STRICTATIME,
}
#: the file system's (superblock's) generic flags, fsconfig(2) FSCONFIG_SET_FLAG keys
#: the VFS takes for any file system; "ro" is both the mount's and its superblock's
SB_FLAGS = ("ro", "sync", "dirsync", "lazytime")
#: mount(2)'s flags for the names above
MS_FLAGS = {
    "ro": 0x1,
    "nosuid": 0x2,
    "nodev": 0x4,
    "noexec": 0x8,
    "sync": 0x10,
    "dirsync": 0x80,
    "noatime": 0x400,
    "nodiratime": 0x800,
    "relatime": 0x200000,
    "strictatime": 0x1000000,
    "lazytime": 0x2000000,
}


@dataclass(frozen=True)
class MountOptions:
    """What a list of mount options asks of each layer of the kernel."""

    attr_set: int = 0  # MOUNT_ATTR_* to set (fsmount(2), mount_setattr(2))
    attr_clr: int = 0  # MOUNT_ATTR_* to clear (mount_setattr(2): "rw", an atime choice)
    sb_flags: tuple[str, ...] = ()  # superblock flags, as fsconfig(2) keys
    fs_options: tuple[str, ...] = ()  # the file system's own, as given: "key" or "key=value"
    ms_flags: int = 0  # mount(2)'s flags

    @property
    def data(self) -> str:
        """mount(2)'s data string."""
        return ",".join(self.fs_options)

    def fs_params(self) -> list[tuple[str, str | None]]:
        """The file system's options as fsconfig(2) parameters."""
        return [fs_param(o) for o in self.fs_options]


def fs_param(option: str) -> tuple[str, str | None]:
    """``key=value`` as (key, value), a bare ``flag`` as (flag, None). A value in
    double quotes (kubelet's ``context="user:role:type:level"``, quoted so its
    commas stay in it) loses them: mount(2)'s parser strips them, fsconfig(2) takes
    the value as is."""
    key, eq, value = option.partition("=")
    if not eq:
        return key, None
    if len(value) >= 2 and value[0] == value[-1] == '"':
        value = value[1:-1]
    return key, value


def parse(options: Iterable[str]) -> MountOptions:
    attr_set = attr_clr = ms_flags = 0
    sb_flags: list[str] = []
    fs_options: list[str] = []
    for opt in options:
        if opt == "rw":
            attr_clr |= MOUNT_ATTR_RDONLY
            continue
        if opt in MS_FLAGS:
            ms_flags |= MS_FLAGS[opt]
        if opt in ATTR_FLAGS:
            attr_set |= ATTR_FLAGS[opt]
        elif opt in ATIME:
            attr_clr |= MOUNT_ATTR__ATIME
            attr_set = attr_set & ~MOUNT_ATTR__ATIME | ATIME[opt]
        if opt in SB_FLAGS:
            if opt not in sb_flags:
                sb_flags.append(opt)
        elif opt not in MS_FLAGS:
            fs_options.append(opt)
    attr_clr &= ~attr_set | MOUNT_ATTR__ATIME
    return MountOptions(attr_set, attr_clr, tuple(sb_flags), tuple(fs_options), ms_flags)
