"""Kernel features and privileges: CAP_SYS_ADMIN to mount, CAP_SYS_RESOURCE to
grow a mounted ext4, overlayfs, and a free loop device."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from csi_driver.doctor.check import FAIL, OK, WARN, Check
from csi_driver.doctor.procfs import CAP_SYS_ADMIN, CAP_SYS_RESOURCE, has_cap

LOOP_CTL_GET_FREE = 0x4C82


def check_privileges() -> list[Check]:
    out = []
    if has_cap(CAP_SYS_ADMIN):
        out.append(Check("privileges", OK, f"CAP_SYS_ADMIN present (uid {os.geteuid()}): can mount"))
    else:
        out.append(
            Check(
                "privileges",
                FAIL,
                "no CAP_SYS_ADMIN: the driver cannot mount",
                "run as root on the host, or in a container with securityContext.privileged: true",
            )
        )
    if has_cap(CAP_SYS_RESOURCE):
        out.append(Check("cap_sys_resource", OK, "CAP_SYS_RESOURCE present: online ext4 growth works"))
    else:
        out.append(
            Check(
                "cap_sys_resource",
                WARN,
                "no CAP_SYS_RESOURCE: growing a mounted ext4 volume fails with FAILED_PRECONDITION",
                "run the node plugin privileged (or add capability SYS_RESOURCE), or use fsType xfs, "
                "which grows online without it",
            )
        )
    return out


def check_overlayfs() -> Check:
    if "overlay" in Path("/proc/filesystems").read_text().split():
        return Check("overlayfs", OK, "overlay is in /proc/filesystems")
    release = os.uname().release
    modules = Path(f"/lib/modules/{release}")
    if modules.is_dir() and any(modules.rglob("overlay.ko*")):
        return Check(
            "overlayfs",
            WARN,
            "the overlay module is available but not loaded",
            "modprobe overlay (and add 'overlay' to /etc/modules-load.d/ so it loads at boot)",
        )
    return Check(
        "overlayfs",
        FAIL,
        f"kernel {release} has no overlayfs",
        "use a kernel built with CONFIG_OVERLAY_FS (every distribution kernel since 4.0 has it)",
    )


def check_loop() -> Check:
    ctl = Path("/dev/loop-control")
    if not ctl.exists():
        return Check(
            "loop_devices",
            FAIL,
            "/dev/loop-control does not exist",
            "modprobe loop; in a container, mount the host's /dev (hostPath /dev) and run privileged",
        )
    try:
        fd = os.open(ctl, os.O_RDWR)
    except OSError as e:
        return Check(
            "loop_devices",
            FAIL,
            f"cannot open /dev/loop-control: {e.strerror}",
            "run as root / privileged so the driver can attach loop devices",
        )
    try:
        free = fcntl.ioctl(fd, LOOP_CTL_GET_FREE)
    except OSError as e:
        return Check(
            "loop_devices",
            FAIL,
            f"no free loop device: {e.strerror}",
            "detach unused ones (losetup -D) or raise max_loop (modprobe loop max_loop=N)",
        )
    finally:
        os.close(fd)
    attached = len(list(Path("/sys/block").glob("loop*/loop/backing_file")))
    return Check(
        "loop_devices",
        OK,
        f"/dev/loop{free} is free ({attached} attached); a staged volume holds one per layer in its chain",
    )
