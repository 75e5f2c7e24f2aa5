"""Host tools: every program the driver runs is on PATH, and mkfs.ext4 can
populate an image (``-d``)."""

from __future__ import annotations

import shutil
import subprocess

from csi_driver.doctor.check import FAIL, OK, WARN, Check

# tool -> (required?, Debian package, what breaks without it)
TOOLS = {
    "mount": (True, "mount", "every stage and publish"),
    "umount": (True, "mount", "every unstage and unpublish"),
    "losetup": (True, "mount", "listing and refreshing loop devices"),
    "mkfs.ext4": (True, "e2fsprogs", "creating volumes"),
    "e2fsck": (True, "e2fsprogs", "snapshots and offline growth of detached volumes"),
    "resize2fs": (True, "e2fsprogs", "volume expansion"),
    "fsfreeze": (True, "util-linux", "snapshots of volumes in use"),
    "mkfs.xfs": (False, "xfsprogs", "volumes with fsType xfs"),
    "xfs_growfs": (False, "xfsprogs", "expansion of xfs volumes"),
}


def check_tools() -> list[Check]:
    out = []
    for tool, (required, package, needed_for) in TOOLS.items():
        path = shutil.which(tool)
        if path is None:
            elsewhere = shutil.which(tool, path="/usr/sbin:/sbin:/usr/bin:/bin")
            where = f"{elsewhere} exists but is not on PATH" if elsewhere else "not found on PATH"
            out.append(
                Check(
                    tool,
                    FAIL if required else WARN,
                    f"{where}; needed for {needed_for}",
                    f"apt-get install {package} (or the package holding {tool}); keep sbin dirs on PATH",
                )
            )
            continue
        if tool == "mkfs.ext4":
            ok, version = mkfs_populates(path)
            if not ok:
                out.append(
                    Check(
                        tool,
                        FAIL,
                        f"{path} ({version}) cannot populate images (-d needs e2fsprogs 1.43+)",
                        "upgrade e2fsprogs to 1.43 or newer",
                    )
                )
                continue
            path += f" ({version})"
        out.append(Check(tool, OK, path))
    return out


def mkfs_populates(path: str) -> tuple[bool, str]:
    """Whether mkfs.ext4 supports ``-d`` (e2fsprogs 1.43+), and its version."""
    proc = subprocess.run([path, "-V"], capture_output=True, text=True)
    text = (proc.stderr or proc.stdout).splitlines()
    first = text[0] if text else ""
    parts = first.split()
    version = parts[1] if len(parts) > 1 else "unknown version"
    try:
        nums = tuple(int(x) for x in version.split(".")[:2])
    except ValueError:
        return True, version
    return nums >= (1, 43), f"e2fsprogs {version}"
