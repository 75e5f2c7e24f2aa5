"""Shared test harness (imported by conftest.py and tests).

Tests that mount run in a private mount namespace (entered
once, at import), so nothing they mount can outlive the test process; each
fixture also unmounts and checks for leaks itself."""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
CLONE_NEWNS = 0x00020000


CAP_SYS_ADMIN = 21


def effective_caps() -> int:
    status = Path("/proc/self/status").read_text()
    return int(next(x for x in status.splitlines() if x.startswith("CapEff:")).split()[1], 16)


def _can_mount() -> str:
    if os.geteuid() != 0 or not effective_caps() >> CAP_SYS_ADMIN & 1:
        return "needs root: the node plugin mounts overlay and loop file systems"
    if "overlay" not in Path("/proc/filesystems").read_text():
        return "the kernel has no overlayfs"
    for tool in ("mount", "losetup", "mkfs.ext4", "fsfreeze", "resize2fs"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    return ""


MOUNT_SKIP = _can_mount()


def _enter_private_namespace() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNS) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNS) failed")
    subprocess.run(["mount", "--make-rprivate", "/"], check=True)


if not MOUNT_SKIP and os.environ.get("OVERLAY_CSI_TEST_NS") != str(os.getpid()):
    _enter_private_namespace()
    os.environ["OVERLAY_CSI_TEST_NS"] = str(os.getpid())

needs_mounts = pytest.mark.skipif(bool(MOUNT_SKIP), reason=MOUNT_SKIP or "ok")

CAP_SYS_RESOURCE = 24
FULL_UID_MAP = ["0", "0", "4294967295"]


def online_ext4_growth_missing() -> str:
    """'' when this process (and so the in-process driver) can grow a mounted ext4; else
    exactly what a privileged node must show instead. EXT4_IOC_RESIZE_FS checks
    capable(CAP_SYS_RESOURCE) against the initial user namespace, so the capability must be
    effective and the process must not be in a child user namespace."""
    status = Path("/proc/self/status").read_text()
    cap_eff = int(next(x for x in status.splitlines() if x.startswith("CapEff:")).split()[1], 16)
    uid_map = Path("/proc/self/uid_map").read_text().split()
    if cap_eff >> CAP_SYS_RESOURCE & 1 and uid_map == FULL_UID_MAP:
        return ""
    return (
        "online ext4 growth needs CAP_SYS_RESOURCE in the initial user namespace; a privileged "
        "node plugin shows bit 24 (0x1000000) set in the CapEff line of /proc/self/status "
        "(e.g. 'CapEff: 000001ffffffffff') and '0 0 4294967295' in /proc/self/uid_map; here CapEff "
        f"is {cap_eff:016x} and uid_map is {' '.join(uid_map)!r}"
    )


def digest(path: Path) -> str:
    """The sha256 (hex) of a file's bytes."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def available(path: Path) -> int:
    """The bytes still free to an unprivileged writer on ``path``'s file system, once
    what is written has reached it (a sync first)."""
    os.sync()
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def entries(root: Path) -> Iterator[tuple[str, Path, os.stat_result]]:
    """Every entry below ``root`` in a stable order, but ``root``'s lost+found: its path
    relative to ``root``, its path, and its lstat."""
    for dirpath, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(dirs + files):
            path = Path(dirpath, name)
            rel = str(path.relative_to(root))
            if rel == "lost+found":
                continue
            yield rel, path, path.lstat()


def leftovers(root: Path) -> tuple[list[str], list[str]]:
    """Mounts below ``root`` and loop devices backed by files below it."""
    from csi_driver import host

    mounts = [m.target for m in host.mounts_under(root)]
    return mounts, host.loops_under(root)


def cleanup(root: Path) -> tuple[list[str], list[str]]:
    """Tear down whatever a test left under ``root``; report what there was."""
    from csi_driver import host

    found = leftovers(root)
    for target in found[0]:
        # a frozen file system unmounted lazily keeps its superblock and loop device for
        # good (nothing can reach it to thaw it): thaw first; a no-op for anything else
        host.thaw(Path(target))
        host.umount(target, lazy=True)
    for dev in found[1]:
        host.loop_detach(dev)
    return found


class Driver:
    """A real server on a temp socket, in this process."""

    def __init__(self, root: Path, node_id: str = "node-1", **opts) -> None:
        from csi_driver.client import Client
        from csi_driver.server import ServeOptions, Server

        self.root = root
        self.state = root / "state"
        self.sock = root / "csi.sock"
        self.kubelet = root / "kubelet"
        self.kubelet.mkdir(exist_ok=True)
        self.server = Server(ServeOptions(endpoint=f"unix://{self.sock}", state_dir=self.state,
                                          node_id=node_id, **opts))
        self.server.start()
        self.client = Client(self.sock)
        self.client.wait_ready()
        self.engine = self.server.engine

    def paths(self, name: str) -> tuple[Path, Path]:
        staging = self.kubelet / "staging" / name
        staging.mkdir(parents=True, exist_ok=True)
        target = self.kubelet / "pods" / name / "mount"
        target.parent.mkdir(parents=True, exist_ok=True)
        return staging, target

    def published(self, name: str, size: int) -> tuple[str, Path, Path]:
        """A new mount volume staged and published at ``paths(name)``: its id, staging dir and target."""
        vid = self.client.create_volume(name, size).volume_id
        staging, target = self.paths(name)
        self.client.stage(vid, staging)
        self.client.publish(vid, staging, target)
        return vid, staging, target

    def stop(self) -> None:
        self.client.close()
        self.server.stop(grace=5)


@contextmanager
def staged(d: Driver, volume_id: str) -> Iterator[Path]:
    """The volume staged at a path of its own for the block's length (its files at hand)."""
    staging, _ = d.paths("s-" + volume_id)
    d.client.stage(volume_id, staging)
    try:
        yield staging
    finally:
        d.client.unstage(volume_id, staging)


def make_driver(tmp_path: Path, **opts) -> Driver:
    return Driver(tmp_path, **opts)


class DriverProcess:
    """``overlay-csi serve`` as a child process (restart and crash tests)."""

    def __init__(self, root: Path, extra_env: dict[str, str] | None = None, *args: str) -> None:
        self.root = root
        self.state = root / "state"
        self.sock = root / "csi.sock"
        self.log = root / "driver.log"
        self.args = list(args)
        self.env = {**os.environ, **(extra_env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, wait: bool = True) -> None:
        from csi_driver.client import Client

        argv = [sys.executable, "-m", "csi_driver", "serve", "--endpoint", f"unix://{self.sock}",
                "--state-dir", str(self.state), "--node-id", "node-1", *self.args]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=log, env=self.env, cwd=REPO)
        if wait:
            deadline = time.monotonic() + 30
            while not self.sock.exists():
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"driver did not start:\n{self.log.read_text()[-3000:]}")
                time.sleep(0.05)
            with Client(self.sock) as c:
                c.wait_ready(30)

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def terminate(self) -> int:
        assert self.proc is not None
        self.proc.terminate()
        return self.proc.wait(timeout=60)


# ---- state invariants (crash, restart, concurrency and hostile-input tests) ----

SPEC_ERROR_CODES = frozenset(
    {
        "INVALID_ARGUMENT",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "FAILED_PRECONDITION",
        "OUT_OF_RANGE",
        "ABORTED",
        "RESOURCE_EXHAUSTED",
    }
)


def store_dump(state: Path) -> dict[str, list[dict]]:
    """Every row of every table of ``state/state.db``, opened read-only (the driver
    may be running); rows sorted so two dumps compare equal iff nothing changed."""
    import sqlite3

    conn = sqlite3.connect(f"file:{state / 'state.db'}?mode=ro", uri=True, timeout=30)
    conn.row_factory = sqlite3.Row
    try:
        tables = [
            r[0]
            for r in conn.execute(
                "SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%' ORDER BY name"
            )
        ]
        return {t: sorted((dict(r) for r in conn.execute(f"SELECT * FROM {t}")), key=repr) for t in tables}
    finally:
        conn.close()


def disk_dump(state: Path) -> dict[str, list[str]]:
    """What the state dir holds on disk (layer dirs, links, scratch)."""
    return {
        d: sorted(p.name for p in (state / d).iterdir()) if (state / d).is_dir() else []
        for d in ("layers", "l", "tmp")
    }


def _overlay_upper(super_options: str) -> str | None:
    for opt in super_options.split(","):
        if opt.startswith("upperdir=layers/"):
            return opt[len("upperdir=layers/") :].split("/")[0]
    return None


def invariant_problems(
    state: Path, client=None, *, root: Path | None = None, quiescent: bool = True
) -> list[str]:
    """Everything that is wrong with a state dir; [] when the store, the disk, the
    mount table, the loop devices and (with ``client``) the driver's answers agree.

    ``root``: the test's temp dir; overlays of our layers mounted below it must be
    recorded staging paths or targets. ``quiescent``: no call is in flight, so
    scratch must be empty and every staged volume must hold exactly its layers.
    """
    from csi_driver import host

    state = state.resolve()
    import json

    problems: list[str] = []
    dump = store_dump(state)
    storage = {x["layer"]: x for x in dump.get("layer_storage", [])}  # the backend's fields
    layers = {x["id"]: {**storage.get(x["id"], {}), **x} for x in dump["layers"]}
    for x in layers.values():
        if "link" not in x:
            problems.append(f"layer {x['id']} has no storage row")
            x["link"] = ""
    volumes = {x["id"]: x for x in dump["volumes"]}
    snapshots = {x["id"]: x for x in dump["snapshots"]}
    pubs = dump["publications"]

    # -- the store agrees with itself
    def chain(top: str) -> list[str]:
        out: list[str] = []
        while top:
            if top in out or top not in layers:
                problems.append(f"layer chain broken at {top} (from {out[:1]})")
                return out
            out.append(top)
            top = layers[top]["parent"]
        return out

    uppers = [v["upper"] for v in volumes.values()]
    if len(uppers) != len(set(uppers)):
        problems.append("two volumes share one upper layer")
    for v in volumes.values():
        if v["upper"] not in layers or not layers[v["upper"]]["active"]:
            problems.append(f"volume {v['id']} has no active upper layer {v['upper']}")
        chain(v["upper"])
    for s in snapshots.values():
        if s["layer"] not in layers or layers[s["layer"]]["active"]:
            problems.append(f"snapshot {s['id']} has no committed layer {s['layer']}")
        chain(s["layer"])
    for p in pubs:
        if p["volume_id"] not in volumes:
            problems.append(f"publication {p['target_path']} of unknown volume {p['volume_id']}")
    referenced = set(uppers) | {s["layer"] for s in snapshots.values()}
    referenced |= {x["parent"] for x in layers.values() if x["parent"]}
    for x in layers.values():
        if x["id"] not in referenced and not x["name"]:
            problems.append(f"layer {x['id']} is referenced by nothing and was not reclaimed")

    # -- the disk agrees with the store
    for x in layers.values():
        image = state / "layers" / x["id"] / "image"
        if not image.is_file():
            problems.append(f"layer {x['id']} has no image on disk")
        link = state / "l" / x["link"]
        if not link.is_symlink() or os.readlink(link) != f"../layers/{x['id']}/mnt/upper":
            problems.append(f"layer {x['id']} has no link l/{x['link']}")
    for entry in (state / "layers").iterdir():
        if entry.name not in layers:
            problems.append(f"layers/{entry.name} is not a layer the store knows")
    links = {x["link"]: x["id"] for x in layers.values()}
    for entry in (state / "l").iterdir():
        if entry.name not in links:
            problems.append(f"l/{entry.name} is a link the store does not know")
        elif not (state / "layers" / links[entry.name]).is_dir():
            problems.append(f"l/{entry.name} dangles")
    if quiescent and any((state / "tmp").iterdir()):
        problems.append(f"scratch left in tmp/: {sorted(p.name for p in (state / 'tmp').iterdir())}")
    if not (state / "empty").is_dir() or any((state / "empty").iterdir()):
        problems.append("state/empty is missing or not empty")

    # -- mounts: layer mounts only for staged volumes, overlays only where recorded
    mounts = host.mounts()
    by_target: dict[str, list] = {}
    for m in mounts:
        by_target.setdefault(m.target, []).append(m)
    staged_layers: dict[str, bool] = {}  # layer id -> read-write
    recorded: dict[str, str] = {}  # path -> volume id
    for v in volumes.values():
        if v["staging_path"]:
            recorded[v["staging_path"]] = v["id"]
            top = by_target.get(os.path.realpath(v["staging_path"]), [None])[-1]
            if top is not None and _overlay_upper(top.super_options) == v["upper"]:
                for i, layer_id in enumerate(chain(v["upper"])):
                    staged_layers[layer_id] = i == 0
    for p in pubs:
        recorded[p["target_path"]] = p["volume_id"]
    layer_root = str(state / "layers") + "/"
    for m in host.mounts_under(state):
        rel = m.target[len(layer_root) :].split("/") if m.target.startswith(layer_root) else []
        if m.target in recorded and m.target.startswith(f"{state}/ephemeral/"):
            continue  # an inline volume's private staging path
        if len(rel) != 2 or rel[1] != "mnt":
            problems.append(f"stray mount under the state dir: {m.target} ({m.fstype})")
        elif rel[0] not in staged_layers and quiescent:
            problems.append(f"layer {rel[0]} is mounted but no staged volume uses it")
        elif len(by_target[m.target]) > 1:
            problems.append(f"{len(by_target[m.target])} mounts stacked at {m.target}")
        elif rel[0] in staged_layers and ("rw" in m.options.split(",")) != staged_layers[rel[0]]:
            problems.append(f"layer {rel[0]} mounted {m.options.split(',')[0]}, expected the opposite")
    if quiescent:
        for layer_id in staged_layers:
            if not any(m.target == f"{layer_root}{layer_id}/mnt" for m in mounts):
                problems.append(f"layer {layer_id} of a staged volume is not mounted")
    for m in mounts:
        upper = _overlay_upper(m.super_options) if m.fstype == "overlay" else None
        if upper is None:
            continue
        if upper not in layers:
            if root is not None and m.target.startswith(str(root) + "/"):
                problems.append(f"overlay at {m.target} has an upper the store does not know")
            continue
        owner = recorded.get(m.target)
        if owner is None or volumes[owner]["upper"] != upper:
            problems.append(f"overlay of layer {upper} at {m.target} is no recorded staging path or target")

    # -- loop devices: each backs a mounted image of a known layer, or is a block volume's device
    sources = {m.source for m in mounts}
    devices = {}  # device -> the upper layer of the block volume it was attached for
    for v in volumes.values():
        opts = json.loads(v["stage_options"] or "{}")
        if v["access_type"] == "block" and v["staging_path"] and opts.get("device"):
            devices[opts["device"]] = v["upper"]
    for p in pubs:
        opts = json.loads(p["options"] or "{}")
        if opts.get("device") and p["volume_id"] in volumes:
            devices[opts["device"]] = volumes[p["volume_id"]]["upper"]
    for dev, backing in host.loop_devices().items():
        if not backing.startswith(str(state) + "/"):
            continue
        parts = backing[len(str(state)) + 1 :].split("/")
        if dev in devices:
            if backing != str(state / "layers" / devices[dev] / "image"):
                problems.append(f"block device {dev} is backed by {backing}, not its volume's image")
        elif dev not in sources:
            problems.append(f"loop device {dev} ({backing}) is attached but not mounted")
        elif len(parts) != 3 or parts[0] != "layers" or parts[1] not in layers or parts[2] != "image":
            problems.append(f"loop device {dev} is backed by {backing}, not a known layer image")

    # -- the driver reports what is on disk
    if client is not None:
        problems += _answers_problems(client, volumes, snapshots)
    return problems


PAGE_SIZE = 3  # small, so a handful of objects already takes several pages


def list_pages(call, request, expected: int, page_size: int = PAGE_SIZE, timeout: float = 60) -> list:
    """Every entry of a paged List call (``ListVolumes``, ``ListSnapshots``), ``page_size`` a
    page, for about ``expected`` entries. Bounded: a driver that ignores ``starting_token``,
    or hands a token back twice, fails here within a few calls instead of paging until the
    test's timeout; one that pages on past ``expected // page_size + 2`` pages fails too."""
    what = type(request).__name__.removesuffix("Request")
    limit = expected // page_size + 2
    entries: list = []
    seen: set[str] = set()
    token = ""
    for n in range(1, limit + 1):
        req = type(request)()
        req.CopyFrom(request)
        req.max_entries, req.starting_token = page_size, token
        page = call(req, timeout=timeout)
        entries += page.entries
        token = page.next_token
        if not token:
            return entries
        assert token not in seen, (
            f"{what} handed back next_token {token!r} a second time (page {n}, {len(entries)} entries "
            f"so far, {expected} expected): it ignores starting_token, the paging would never end"
        )
        seen.add(token)
    raise AssertionError(
        f"{what} still gave a next_token ({token!r}) after {limit} pages of {page_size} "
        f"({len(entries)} entries, {expected} expected): the paging does not end"
    )


def _answers_problems(client, volumes: dict, snapshots: dict) -> list[str]:
    from csi_driver.proto import csi_pb2 as csi

    problems: list[str] = []
    pages = list_pages(client.controller.ListVolumes, csi.ListVolumesRequest(), len(volumes))
    listed = {e.volume.volume_id: e.volume.capacity_bytes for e in pages}
    if listed != {v["id"]: v["capacity_bytes"] for v in volumes.values()}:
        problems.append(f"ListVolumes {sorted(listed)} != store {sorted(volumes)}")
    pages = list_pages(client.controller.ListSnapshots, csi.ListSnapshotsRequest(), len(snapshots))
    snaps = {e.snapshot.snapshot_id for e in pages}
    if snaps != set(snapshots):
        problems.append(f"ListSnapshots {sorted(snaps)} != store {sorted(snapshots)}")
    for vid in volumes:
        client.controller.ControllerGetVolume(csi.ControllerGetVolumeRequest(volume_id=vid))
    for sid in snapshots:
        client.controller.GetSnapshot(csi.GetSnapshotRequest(snapshot_id=sid))
    return problems


def assert_invariants(state: Path, client=None, **kw) -> None:
    problems = invariant_problems(state, client, **kw)
    assert not problems, "invariants violated:\n  " + "\n  ".join(problems)


def read_files(
    client, state: Path, volume_id: str, scratch: Path, block_bytes: int = 65536
) -> dict[str, bytes]:
    """The top-level files of a volume (a block volume: {"block": its first bytes}),
    read through a stage: its own when staged, else a temporary one undone afterwards."""
    import json

    from csi_driver import host
    from csi_driver.proto import csi_pb2 as csi

    vol = {v["id"]: v for v in store_dump(state)["volumes"]}[volume_id]
    block = vol["access_type"] == "block"
    path = vol["staging_path"]
    device = json.loads(vol["stage_options"] or "{}").get("device")
    live = device in host.loop_devices() if block else path is not None and host.is_mounted(path)
    own = path is None or not live
    cap = None
    if block:
        mode = csi.VolumeCapability.AccessMode(mode=csi.VolumeCapability.AccessMode.SINGLE_NODE_WRITER)
        cap = csi.VolumeCapability(block=csi.VolumeCapability.BlockVolume(), access_mode=mode)
    if own:
        path = str(scratch / f"read-{volume_id}")
        Path(path).mkdir(parents=True, exist_ok=True)
        client.stage(volume_id, path, cap)
    try:
        if block:
            vol = {v["id"]: v for v in store_dump(state)["volumes"]}[volume_id]
            with open(json.loads(vol["stage_options"])["device"], "rb") as f:
                return {"block": f.read(block_bytes)}
        return {f.name: f.read_bytes() for f in Path(path).iterdir() if f.is_file() and not f.is_symlink()}
    finally:
        if own:
            client.unstage(volume_id, path)
            Path(path).rmdir()


def teardown_all(client, state: Path) -> None:
    """Unpublish, unstage and delete everything through the driver, then check
    that nothing is left: no layer, link, mount or loop device."""
    for p in store_dump(state)["publications"]:
        client.unpublish(p["volume_id"], p["target_path"])  # an inline volume goes with it
    dump = store_dump(state)
    for v in dump["volumes"]:
        if v["staging_path"]:
            client.unstage(v["id"], v["staging_path"])
    for s in dump["snapshots"]:
        client.delete_snapshot(s["id"])
    for v in dump["volumes"]:
        client.delete_volume(v["id"])
    left = disk_dump(state)
    mounts, loops = leftovers(state)
    assert left == {"layers": [], "l": [], "tmp": []} and not mounts and not loops, (
        f"teardown left {left}, mounts {mounts}, loop devices {loops}"
    )


def unfrozen_problems(state: Path, timeout: float = 10) -> list[str]:
    """Write and sync a file on every staged volume (a frozen upper would hang)."""
    from csi_driver import host

    problems = []
    for v in store_dump(state)["volumes"]:
        path = v["staging_path"]
        if not path or not host.is_mounted(path):
            continue
        probe = Path(path) / ".overlay-csi-probe"
        try:
            subprocess.run(["sh", "-c", 'echo ok > "$1" && sync "$1" && rm "$1"', "-", str(probe)],
                           timeout=timeout, check=True)
        except subprocess.TimeoutExpired:
            problems.append(f"volume {v['id']} at {path} does not take writes (frozen upper?)")
            for m in host.mounts_under(state / "layers"):
                host.thaw(Path(m.target))
        except subprocess.CalledProcessError as e:
            problems.append(f"volume {v['id']} at {path} refuses writes: {e}")
    return problems


@contextmanager
def serving(root: Path, **opts) -> Iterator[Driver]:
    """A real in-process driver under ``root``; on exit, stop it and fail on any
    mount or loop device left behind (after tearing them down)."""
    if MOUNT_SKIP:
        pytest.skip(MOUNT_SKIP)
    d = Driver(root, **opts)
    try:
        yield d
    finally:
        d.stop()
        mounts, loops = cleanup(root)
    assert not mounts and not loops, f"test leaked mounts {mounts} or loop devices {loops}"
