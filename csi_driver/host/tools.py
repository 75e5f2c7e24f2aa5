"""Host tools, run with their errors as CommandFailed: mkfs, resize, tune2fs,
blockdev, blkid. Every call is safe to repeat."""

from __future__ import annotations

import logging
import re
import subprocess
from pathlib import Path

from csi_driver.errors import CommandFailed
from csi_driver.host import loopdev

log = logging.getLogger(__name__)


def run(
    argv: list[str], *, cwd: str | Path | None = None, check: bool = True, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Run a host tool; raise CommandFailed with its stderr when it fails."""
    log.debug("exec %s", " ".join(argv))
    try:
        proc = subprocess.run(
            argv, cwd=cwd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired as e:
        raise CommandFailed(argv, -1, f"timed out after {timeout:g} s") from e
    if check and proc.returncode != 0:
        raise CommandFailed(argv, proc.returncode, proc.stderr or proc.stdout)
    return proc


def mkfs(
    image: Path, fstype: str, populate: Path | None = None, journal_mib: int = 0, inodes: int = 0
) -> None:
    """Make a file system in a sparse image without writing its empty tables;
    ``populate`` is a tree to copy in (ext4) or a protofile (xfs); ``inodes``:
    at least this many inodes (ext4: ``-N`` where one per 16 KiB is fewer; xfs
    allocates inodes as it goes)."""
    if fstype == "ext4":
        argv = [
            "mkfs.ext4",
            "-q",
            "-F",
            "-m",
            "0",
            "-b",
            "4096",
            "-i",
            "16384",
            "-I",
            "256",
            "-E",
            "lazy_itable_init=1,lazy_journal_init=1,nodiscard",
        ]
        if populate is not None:
            argv += ["-d", str(populate)]
        if journal_mib:
            argv += ["-J", f"size={journal_mib}"]
        if inodes:
            argv += ["-N", str(inodes)]
        run(argv + [str(image)])
    elif fstype == "xfs":
        argv = ["mkfs.xfs", "-q", "-f", "-K", "-s", f"size={loopdev.FS_SECTOR}"]
        if populate is not None:  # a protofile: the directories to make, no mount needed
            argv += ["-p", str(populate)]
        run(argv + [str(image)])
    else:
        raise ValueError(f"unsupported fs type {fstype}")


_AT = re.compile(r"(?:superblock|descriptors?|GDT blocks|bitmap|table) at (\d+)(?:-(\d+))?")
_EXTENT = re.compile(r"\(\d+(?:-\d+)?\):(\d+)(?:-(\d+))?")


def ext4_metadata(source: str | Path) -> list[tuple[int, int]]:
    """Where an ext4 keeps metadata at fixed places: superblocks, group
    descriptors (and those reserved for growth), bitmaps, inode tables and the
    journal, as merged (offset, length) byte ranges. ``source``: an image, or the
    loop device of a mounted one (its cache holds what the kernel just wrote)."""
    groups = run(["dumpe2fs", str(source)]).stdout
    m = re.search(r"^Block size:\s+(\d+)", groups, re.M)
    if m is None:
        raise CommandFailed(["dumpe2fs", str(source)], 0, "no block size in its output")
    block = int(m.group(1))
    journal = run(["debugfs", "-R", "stat <8>", str(source)]).stdout.partition("EXTENTS:")[2]
    spans = sorted((int(a), int(b or a)) for a, b in [*_AT.findall(groups), *_EXTENT.findall(journal)])
    merged: list[list[int]] = []
    for first, last in spans:
        if merged and first <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], last)
        else:
            merged.append([first, last])
    return [(first * block, (last - first + 1) * block) for first, last in merged]


def grow_fs(fstype: str, device: str, mountpoint: Path) -> None:
    if fstype == "xfs":
        run(["xfs_growfs", str(mountpoint)])
    else:
        run(["resize2fs", device])


def tune2fs_reserved(target: str | Path, percent: int) -> None:
    """Blocks of an ext4 (image or device) reserved for root, in percent."""
    run(["tune2fs", "-m", str(percent), str(target)])


def set_read_ahead(device: str, kib: int) -> None:
    run(["blockdev", "--setra", str(kib * 2), device])


def flush_buffers(device: str) -> None:
    run(["blockdev", "--flushbufs", device], check=False)


def e2fsck(image: Path, *, journal_only: bool = False) -> None:
    """Replay the journal only, or check and repair what is safe (-p), forced."""
    argv = ["e2fsck", "-p", "-E", "journal_only"] if journal_only else ["e2fsck", "-f", "-p"]
    run(argv + [str(image)], check=False)


def e2fsck_repair(image: Path) -> None:
    """Replay the journal and repair what is wrong (-p, then -y for what -p leaves);
    CommandFailed when the file system still has errors after that."""
    for mode in ("-p", "-y"):
        proc = run(["e2fsck", "-f", mode, str(image)], check=False, timeout=3600)
        if 0 <= proc.returncode < 4:  # 0 clean, 1-2 repaired; < 0: killed by a signal
            if proc.returncode:
                log.warning("e2fsck %s repaired %s: %s", mode, image, proc.stdout.strip()[-2000:])
            return
    raise CommandFailed(["e2fsck", "-f", "-y", str(image)], proc.returncode, proc.stdout + proc.stderr)


def resize2fs(target: str | Path) -> None:
    run(["resize2fs", str(target)])


def probe_signature(device: str) -> dict[str, str]:
    """What ``blkid -p`` (low-level probing, no cache) finds on a device: TYPE,
    LABEL, PTTYPE ...; empty when it finds no signature at all."""
    proc = run(["blkid", "-p", "-o", "export", device], check=False)
    if proc.returncode == 2:  # nothing found
        return {}
    if proc.returncode != 0:
        raise CommandFailed(["blkid", "-p", device], proc.returncode, proc.stderr or proc.stdout)
    pairs = (line.partition("=") for line in proc.stdout.splitlines() if "=" in line)
    return {key: value for key, _, value in pairs}


def mkfs_pool(device: str, label: str, options: list[str]) -> None:
    """An xfs over a whole device, with ``options`` (the pool's: reflink, for clones
    of image files)."""
    run(["mkfs.xfs", "-q", "-f", *options, "-L", label, device])
