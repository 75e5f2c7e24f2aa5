"""Storage under the state dir: where it is (and whether it survives a reboot
or the pod), free space, sparse files and reflink."""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import tempfile
from pathlib import Path

from csi_driver.doctor.check import FAIL, OK, WARN, Check, GiB, MiB, fmt_gib
from csi_driver.doctor.kubernetes import in_pod
from csi_driver.doctor.procfs import mount_of

FICLONE = 0x40049409


def existing_ancestor(path: Path) -> Path:
    p = path.absolute()
    while not p.exists():
        p = p.parent
    return p


def check_state_dir(state_dir: Path) -> list[Check]:
    out = []
    base = existing_ancestor(state_dir)
    m = mount_of(str(base))
    fs = f"{m.fstype} on {m.source} (mounted at {m.target})" if m else "unknown file system"
    if state_dir.exists():
        if not os.access(state_dir, os.W_OK | os.X_OK):
            out.append(Check("state_dir", FAIL, f"{state_dir} is not writable", "run as root"))
        else:
            out.append(Check("state_dir", OK, f"{state_dir}: {fs}"))
    else:
        out.append(
            Check(
                "state_dir",
                OK,
                f"{state_dir} does not exist yet (created at first start); it will be on {fs}",
            )
        )
    if m and m.fstype in ("tmpfs", "ramfs"):
        out.append(
            Check(
                "state_dir_persistence",
                WARN,
                f"{state_dir} is on {m.fstype}: every volume is lost at reboot",
                "put --state-dir on a disk (a hostPath such as /var/lib/overlay-csi)",
            )
        )
    elif m and m.fstype == "overlay" and in_pod():
        out.append(
            Check(
                "state_dir_persistence",
                FAIL,
                f"{state_dir} is on the container's own overlay root: volumes vanish with the pod",
                "mount a hostPath volume (type DirectoryOrCreate) at the state dir",
            )
        )
    st = os.statvfs(base)
    free, size = st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize
    msg = f"{fmt_gib(free)} free of {fmt_gib(size)} on {base}"
    if free < GiB:
        out.append(Check("free_space", FAIL, msg, "free space or move --state-dir to a larger disk"))
    elif free < 10 * GiB or free < size // 10:
        out.append(
            Check(
                "free_space",
                WARN,
                msg + " (under 10 GiB or 10%)",
                "free space: volumes are thin, and a full backing disk makes their writes fail",
            )
        )
    else:
        out.append(Check("free_space", OK, msg))
    return out


def check_sparse_and_reflink(state_dir: Path) -> list[Check]:
    base = existing_ancestor(state_dir)
    tmp_parent = state_dir / "tmp" if (state_dir / "tmp").is_dir() else base
    out = []
    try:
        d = Path(tempfile.mkdtemp(prefix="doctor-", dir=tmp_parent))
    except OSError as e:
        return [Check("sparse_files", FAIL, f"cannot write in {tmp_parent}: {e.strerror}", "run as root")]
    try:
        a, b = d / "a", d / "b"
        with open(a, "wb") as f:
            f.truncate(256 * MiB)
            f.seek(MiB)
            f.write(b"x" * 4096)
        used = a.stat().st_blocks * 512
        if used <= 4 * MiB:
            out.append(
                Check(
                    "sparse_files",
                    OK,
                    f"sparse files: a 256 MiB image costs {used // 1024} KiB until written",
                )
            )
        else:
            out.append(
                Check(
                    "sparse_files",
                    WARN,
                    f"the state dir's file system allocated {used // MiB} MiB for an "
                    "empty 256 MiB file: volumes cost their full size",
                    "put --state-dir on ext4, xfs or btrfs",
                )
            )
        with open(a, "rb") as src, open(b, "wb") as dst:
            try:
                fcntl.ioctl(dst.fileno(), FICLONE, src.fileno())
                out.append(
                    Check(
                        "reflink",
                        OK,
                        "reflink (FICLONE) works: a snapshot or clone of a volume in use is a clone of "
                        "its image (milliseconds, costs only what is written after it)",
                    )
                )
            except OSError as e:
                why = (
                    "not supported"
                    if e.errno in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL, errno.EXDEV)
                    else e.strerror
                )
                out.append(
                    Check(
                        "reflink",
                        WARN,
                        f"reflink (FICLONE) {why} on the state dir's file system: a snapshot of a volume "
                        "in use copies all of its upper's data while its writes wait (seconds per GiB) "
                        "(detached volumes are never copied)",
                        "give the driver a pool: serve --pool-file PATH (chart: node.poolFile, on by "
                        "default) or --pool-device DEV (chart: node.poolDevices), formatted xfs with "
                        "reflink; or put --state-dir on xfs (reflink=1) or btrfs",
                    )
                )
    finally:
        shutil.rmtree(d, ignore_errors=True)
    return out
