"""The functional probe: with root, build a small ext4 image, mount it on a
direct-I/O loop device as the driver does, freeze and thaw it and mount an
overlay on it, in a private mount namespace (a forked child), so nothing it
mounts can outlive it."""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import asdict
from pathlib import Path

from csi_driver import host
from csi_driver.doctor.check import FAIL, OK, WARN, Check, MiB
from csi_driver.doctor.procfs import CAP_SYS_ADMIN, has_cap
from csi_driver.doctor.state_dir import existing_ancestor
from csi_driver.errors import CommandFailed
from csi_driver.host import loopdev
from csi_driver.layerstore.overlay.images import mount_options

CLONE_NEWNS = 0x00020000


def _loop_mode(device: str | None) -> Check:
    mode = loopdev.direct_io(device) if device else None
    if mode is None:
        return Check("probe_loop_mount", OK, "an ext4 image mounts read-write (its loop device not found)")
    if mode:
        return Check("probe_loop_mount", OK, "an ext4 image mounts read-write on a direct-I/O loop device")
    return Check(
        "probe_loop_mount",
        WARN,
        "an ext4 image mounts read-write, but its loop device runs buffered: the kernel refused "
        "direct I/O on the state dir's file system, so volumes cache every page twice",
        "put the state dir on a file system that supports O_DIRECT (ext4, xfs, btrfs)",
    )


def _probe_steps(work: Path) -> list[Check]:
    """Runs in a private mount namespace: mkfs, loop mount, freeze, overlay."""
    out = []

    def run(argv: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(argv, capture_output=True, text=True)

    image, mnt, merged, empty = work / "image", work / "mnt", work / "merged", work / "empty"
    for d in (mnt, merged, empty):
        d.mkdir()
    with open(image, "wb") as f:
        f.truncate(64 * MiB)
    p = run(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=1,lazy_journal_init=1,nodiscard", str(image)])
    if p.returncode:
        return [
            Check("probe_mkfs", FAIL, f"mkfs.ext4 failed: {p.stderr.strip()[:200]}", "see mkfs.ext4 above")
        ]
    try:  # the driver's own way: a direct-I/O loop device that goes with the mount
        host.mount_image(image, mnt, "ext4", mount_options("ext4", readonly=False), readonly=False)
    except (OSError, CommandFailed) as e:
        return [
            Check(
                "probe_loop_mount",
                FAIL,
                f"loop-mounting an ext4 image failed: {str(e).strip()[:200]}",
                "check loop_devices above; in a container, run privileged with the host's /dev",
            )
        ]
    try:
        out.append(_loop_mode(host.device_of(mnt)))
        p = run(["fsfreeze", "--freeze", str(mnt)])
        if p.returncode:
            out.append(
                Check(
                    "fsfreeze",
                    FAIL,
                    f"fsfreeze failed on a loop-mounted ext4: {p.stderr.strip()[:200]}",
                    "needs CAP_SYS_ADMIN; run privileged",
                )
            )
        else:
            run(["fsfreeze", "--unfreeze", str(mnt)])
            out.append(
                Check("fsfreeze", OK, "freeze and thaw work: snapshots of volumes in use are consistent")
            )
        (mnt / "upper").mkdir()
        (mnt / "work").mkdir()
        opts = f"lowerdir={empty},upperdir={mnt / 'upper'},workdir={mnt / 'work'}"
        p = run(["mount", "-t", "overlay", "-o", opts, "overlay", str(merged)])
        if p.returncode:
            out.append(
                Check(
                    "probe_overlay",
                    FAIL,
                    f"an overlay on a loop-mounted upper failed: {p.stderr.strip()[:200]}",
                    "check overlayfs above; dmesg tells why the kernel refused",
                )
            )
        else:
            try:
                (merged / "probe").write_text("ok")
                seen = (mnt / "upper" / "probe").read_text()
                out.append(
                    Check(
                        "probe_overlay",
                        OK if seen == "ok" else FAIL,
                        "an overlay with a loop-mounted upper mounts and writes through",
                    )
                )
            finally:
                run(["umount", str(merged)])
    finally:
        run(["umount", str(mnt)])
    return out


def probe(state_dir: Path) -> list[Check]:
    """Run the functional probe in a forked child inside its own mount namespace."""
    if os.geteuid() != 0 or not has_cap(CAP_SYS_ADMIN):
        return [Check("probe", WARN, "skipped: needs root", "run doctor as root to test mounts for real")]
    if not all(shutil.which(t) for t in ("mount", "umount", "mkfs.ext4", "fsfreeze")):
        return [Check("probe", WARN, "skipped: tools missing (see above)", "install the tools above")]
    parent = state_dir / "tmp" if (state_dir / "tmp").is_dir() else existing_ancestor(state_dir)
    work = Path(tempfile.mkdtemp(prefix="doctor-probe-", dir=parent))
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        code = 0
        try:
            os.close(r)
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.unshare(CLONE_NEWNS) != 0:
                raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNS)")
            subprocess.run(["mount", "--make-rprivate", "/"], check=True, capture_output=True)
            result = [asdict(c) for c in _probe_steps(work)]
        except Exception as e:  # report, never raise out of the fork
            result = [asdict(Check("probe", FAIL, f"probe crashed: {e}", "report a bug"))]
            code = 1
        os.write(w, json.dumps(result).encode())
        os._exit(code)
    os.close(w)
    chunks = []
    while chunk := os.read(r, 65536):
        chunks.append(chunk)
    os.close(r)
    os.waitpid(pid, 0)
    shutil.rmtree(work, ignore_errors=True)
    try:
        return [Check(**c) for c in json.loads(b"".join(chunks) or b"[]")]
    except (ValueError, TypeError):
        return [Check("probe", FAIL, "the probe died without a report", "run doctor again; check dmesg")]
