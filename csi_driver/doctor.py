"""``overlay-csi doctor``: check that this host (or pod) can run the driver.

Each check prints one line, ``OK``, ``WARN`` or ``FAIL``, with what was found
and, when it is not OK, how to fix it. Exit status 1 when any check FAILs.
With root, a functional probe builds a small ext4 image, loop-mounts it,
freezes and thaws it and mounts an overlay on it, in a private mount namespace
(a forked child), so nothing it mounts can outlive it.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import fcntl
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

OK, WARN, FAIL = "OK", "WARN", "FAIL"
GiB = 1 << 30
MiB = 1 << 20

CAP_SYS_ADMIN = 21
CAP_SYS_RESOURCE = 24
LOOP_CTL_GET_FREE = 0x4C82
FICLONE = 0x40049409
CLONE_NEWNS = 0x00020000

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


@dataclass
class Check:
    name: str
    status: str
    message: str
    fix: str = ""


# ---------------------------------------------------------------- helpers


def capabilities() -> int:
    """The effective capability mask of this process."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return 0


def has_cap(cap: int) -> bool:
    return bool(capabilities() >> cap & 1)


@dataclass
class MountInfo:
    target: str
    fstype: str
    source: str
    optional: list[str]  # e.g. ["shared:1"], ["master:3"], []


def mountinfo(path: str = "/proc/self/mountinfo") -> list[MountInfo]:
    out = []
    for line in Path(path).read_text(errors="surrogateescape").splitlines():
        left, _, right = line.partition(" - ")
        a, b = left.split(" "), right.split(" ")
        target = (
            a[4].replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")
        )
        out.append(MountInfo(target, b[0], b[1] if len(b) > 1 else "", a[6:]))
    return out


def mount_of(path: str) -> MountInfo | None:
    """The mount holding ``path``: the longest matching target, the last mounted on a tie."""
    real = os.path.realpath(path)
    best: MountInfo | None = None
    for m in mountinfo():
        t = m.target
        if t == "/" or real == t or real.startswith(t + "/"):
            if best is None or len(t) >= len(best.target):
                best = m
    return best


def existing_ancestor(path: Path) -> Path:
    p = path.absolute()
    while not p.exists():
        p = p.parent
    return p


def in_pod() -> bool:
    return (
        bool(os.environ.get("KUBERNETES_SERVICE_HOST"))
        or Path("/var/run/secrets/kubernetes.io/serviceaccount").exists()
    )


def fmt_gib(n: int) -> str:
    return f"{n / GiB:.1f} GiB"


# ---------------------------------------------------------------- checks


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


def check_store(state_dir: Path) -> list[Check]:
    db = state_dir / "state.db"
    if not db.exists():
        return [Check("store", OK, "no store yet (a new node)")]
    out = []
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        try:
            version = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0]
            vols, provisioned = conn.execute(
                "SELECT COUNT(*), COALESCE(SUM(capacity_bytes), 0) FROM volumes"
            ).fetchone()
            snaps = conn.execute("SELECT COUNT(*) FROM snapshots").fetchone()[0]
            layers = conn.execute("SELECT COUNT(*) FROM layers").fetchone()[0]
            integrity = conn.execute("PRAGMA quick_check").fetchone()[0]
        finally:
            conn.close()
    except sqlite3.Error as e:
        return [
            Check(
                "store",
                FAIL,
                f"{db} cannot be read: {e}",
                "restore the state dir from a backup (docs/operations.md); keep the broken copy for analysis",
            )
        ]
    if integrity != "ok":
        out.append(
            Check(
                "store",
                FAIL,
                f"{db} fails its integrity check: {integrity}",
                "stop the driver and restore the state dir from a backup (docs/operations.md)",
            )
        )
    else:
        out.append(
            Check("store", OK, f"schema {version}: {vols} volumes, {snaps} snapshots, {layers} layers")
        )
    st = os.statvfs(state_dir)
    free = st.f_bavail * st.f_frsize
    allocated = sum(p.stat().st_blocks * 512 for p in (state_dir / "layers").glob("*/image") if p.is_file())
    if provisioned > free + allocated:
        out.append(
            Check(
                "thin_provisioning",
                WARN,
                f"{fmt_gib(provisioned)} provisioned, {fmt_gib(allocated)} allocated, {fmt_gib(free)} free: "
                "if volumes fill up, the backing disk runs out first",
                "add space, cap volumes with --max-volume-size, or watch "
                "overlay_csi_backing_free_bytes (docs/operations.md, capacity planning)",
            )
        )
    else:
        ratio = f"{provisioned / allocated:.1f}x" if allocated else "-"
        out.append(
            Check(
                "thin_provisioning",
                OK,
                f"{fmt_gib(provisioned)} provisioned, {fmt_gib(allocated)} allocated (ratio {ratio}); "
                f"{fmt_gib(free)} free covers it",
            )
        )
    lock = state_dir / "lock"
    if lock.exists():
        fd = os.open(lock, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
            out.append(Check("driver", OK, "no driver is serving this state dir now"))
        except BlockingIOError:
            pid = lock.read_text().strip() or "?"
            out.append(Check("driver", OK, f"a driver (pid {pid}) is serving this state dir"))
        finally:
            os.close(fd)
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
                    Check("reflink", OK, "reflink (FICLONE) works: copies of in-use volumes share extents")
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
                        "in use copies the data written since its last snapshot (detached volumes are "
                        "never copied)",
                        "optional: put --state-dir on xfs (mkfs.xfs -m reflink=1) or btrfs",
                    )
                )
    finally:
        shutil.rmtree(d, ignore_errors=True)
    return out


def check_propagation(kubelet_dir: Path, pod: bool) -> Check:
    if not pod:
        return Check(
            "mount_propagation",
            OK,
            "not running in a pod: the driver's mounts are the host's, no propagation needed",
        )
    if not kubelet_dir.exists():
        return Check(
            "mount_propagation",
            FAIL,
            f"{kubelet_dir} is not visible in this pod",
            f"mount the host's {kubelet_dir} into the node plugin (hostPath) "
            "with mountPropagation: Bidirectional",
        )
    m = mount_of(str(kubelet_dir))
    tags = m.optional if m else []
    shared = any(t.startswith("shared:") for t in tags)
    slave = any(t.startswith("master:") for t in tags)
    where = f"{kubelet_dir} (mount at {m.target if m else '?'}: {' '.join(tags) or 'private'})"
    if shared:
        return Check("mount_propagation", OK, f"{where} is shared: kubelet sees the driver's mounts")
    fix = (
        f"set mountPropagation: Bidirectional on the {kubelet_dir} volume mount of the node plugin "
        "container (needs privileged: true), and make sure the host's mount is shared "
        f"(mount --make-rshared {kubelet_dir}, which systemd hosts already are)"
    )
    if slave:
        return Check(
            "mount_propagation",
            FAIL,
            f"{where} only receives mounts (HostToContainer): pods would see empty volumes",
            fix,
        )
    return Check(
        "mount_propagation", FAIL, f"{where} is private: kubelet never sees the driver's mounts", fix
    )


# ---------------------------------------------------------------- functional probe


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
    p = run(["mount", "-t", "ext4", "-o", "loop,rw,discard", str(image), str(mnt)])
    if p.returncode:
        return [
            Check(
                "probe_loop_mount",
                FAIL,
                f"loop-mounting an ext4 image failed: {p.stderr.strip()[:200]}",
                "check loop_devices above; in a container, run privileged with the host's /dev",
            )
        ]
    try:
        out.append(Check("probe_loop_mount", OK, "an ext4 image loop-mounts read-write"))
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


# ---------------------------------------------------------------- entry point


def run_checks(state_dir: Path, kubelet_dir: Path, pod: bool, do_probe: bool = True) -> list[Check]:
    checks = check_privileges()
    checks.append(check_overlayfs())
    checks.append(check_loop())
    checks += check_tools()
    checks += check_state_dir(state_dir)
    checks += check_sparse_and_reflink(state_dir)
    if do_probe:
        checks += probe(state_dir)
    checks += check_store(state_dir)
    checks.append(check_propagation(kubelet_dir, pod))
    return checks


def add_parser(sub: Any, default_state_dir: str) -> None:
    d = sub.add_parser("doctor", help="check this host can run the driver, and say how to fix what cannot")
    d.add_argument("--state-dir", type=Path, default=Path(default_state_dir))
    d.add_argument("--kubelet-dir", type=Path, default=Path("/var/lib/kubelet"))
    d.add_argument("--json", action="store_true")
    d.add_argument(
        "--no-probe", action="store_true", help="skip the mount probe (mkfs, loop, freeze, overlay)"
    )
    d.add_argument(
        "--in-pod",
        choices=["auto", "yes", "no"],
        default="auto",
        help="check mount propagation as in a pod (auto: KUBERNETES_SERVICE_HOST or a service account)",
    )


def run(args: argparse.Namespace) -> int:
    pod = in_pod() if args.in_pod == "auto" else args.in_pod == "yes"
    checks = run_checks(args.state_dir, args.kubelet_dir, pod, not args.no_probe)
    counts = {s: sum(c.status == s for c in checks) for s in (OK, WARN, FAIL)}
    if args.json:
        json.dump(
            {"ok": counts[FAIL] == 0, "summary": counts, "checks": [asdict(c) for c in checks]},
            sys.stdout,
            indent=2,
        )
        sys.stdout.write("\n")
    else:
        width = max(len(c.name) for c in checks)
        for c in checks:
            print(f"{c.status:<4}  {c.name:<{width}}  {c.message}")
            if c.fix and c.status != OK:
                print(f"{'':<4}  {'':<{width}}  fix: {c.fix}")
        print(f"\n{counts[OK]} OK, {counts[WARN]} WARN, {counts[FAIL]} FAIL")
    return 1 if counts[FAIL] else 0
