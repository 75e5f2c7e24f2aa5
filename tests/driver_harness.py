"""Shared test harness (imported by conftest.py and tests).

Tests that mount run in a private mount namespace (entered
once, at import), so nothing they mount can outlive the test process; each
fixture also unmounts and checks for leaks itself."""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
CLONE_NEWNS = 0x00020000


def _can_mount() -> str:
    if os.geteuid() != 0:
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


def leftovers(root: Path) -> tuple[list[str], list[str]]:
    """Mounts below ``root`` and loop devices backed by files below it."""
    from csi_driver.engine import host

    mounts = [m.target for m in host.mounts_under(root)]
    loops = [d for d, f in host.loop_devices().items() if f.startswith(str(root) + "/")]
    return mounts, loops


def cleanup(root: Path) -> tuple[list[str], list[str]]:
    """Tear down whatever a test left under ``root``; report what there was."""
    from csi_driver.engine import host

    found = leftovers(root)
    for target in found[0]:
        host.umount(target, lazy=True)
    for dev in found[1]:
        host.loop_detach(dev)
    return found


class Driver:
    """A real server on a temp socket, in this process."""

    def __init__(self, root: Path, **opts) -> None:
        from csi_driver.client import Client
        from csi_driver.server import ServeOptions, Server

        self.root = root
        self.state = root / "state"
        self.sock = root / "csi.sock"
        self.kubelet = root / "kubelet"
        self.kubelet.mkdir(exist_ok=True)
        self.server = Server(ServeOptions(endpoint=f"unix://{self.sock}", state_dir=self.state,
                                          node_id="node-1", **opts))
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

    def stop(self) -> None:
        self.client.close()
        self.server.stop(grace=5)


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
