"""The server process: stale sockets, single instance per state dir, draining on SIGTERM."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from csi_driver.client import Client
from csi_driver.proto import csi_pb2 as csi
from driver_harness import MOUNT_SKIP, REPO, DriverProcess, cleanup

pytestmark = pytest.mark.skipif(bool(MOUNT_SKIP), reason=MOUNT_SKIP or "ok")
MiB = 1 << 20


def test_stale_socket_is_replaced_and_second_instance_refused(tmp_path: Path):
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(tmp_path / "csi.sock"))
    stale.close()  # the file stays behind, as after a crash
    d = DriverProcess(tmp_path)
    d.start()
    try:
        with Client(d.sock) as c:
            assert c.create_volume("v", MiB).volume_id
        second = subprocess.run(
            [sys.executable, "-m", "csi_driver", "serve", "--endpoint", f"unix://{tmp_path}/other.sock",
             "--state-dir", str(d.state), "--node-id", "node-1"],
            capture_output=True, text=True, timeout=60, cwd=REPO)
        assert second.returncode == 1
        assert "refusing to start" in second.stderr and str(d.state) in second.stderr
        assert not (tmp_path / "other.sock").exists()
    finally:
        assert d.terminate() == 0
        cleanup(tmp_path)


def test_sigterm_drains_in_flight_calls(tmp_path: Path):
    d = DriverProcess(tmp_path, {"OVERLAY_CSI_SLOW_AT": "create.built:2"})
    d.start()
    result: dict = {}

    def create() -> None:
        with Client(d.sock) as c:
            result["volume"] = c.create_volume("slow", MiB)

    t = threading.Thread(target=create)
    t.start()
    time.sleep(0.7)  # the call is inside CreateVolume now
    started = time.monotonic()
    assert d.terminate() == 0, "SIGTERM exits 0"
    t.join(10)
    assert result.get("volume") is not None, "the in-flight call finished"
    assert time.monotonic() - started >= 1.0
    assert not d.sock.exists(), "the socket is removed on exit"
    d2 = DriverProcess(tmp_path)
    d2.start()
    try:
        with Client(d2.sock) as c:
            names = [e.volume.volume_id for e in c.controller.ListVolumes(csi.ListVolumesRequest()).entries]
        assert names == [result["volume"].volume_id]
    finally:
        assert d2.terminate() == 0
        cleanup(tmp_path)


def test_metrics_without_the_extra_say_what_to_install(tmp_path: Path):
    """No traceback: one line naming the extra, exit 2, nothing started."""
    code = ("import sys; sys.modules['prometheus_client'] = None\n"
            "from csi_driver.cli import main\n"
            "sys.exit(main(sys.argv[1:]))")
    proc = subprocess.run(
        [sys.executable, "-c", code, "serve", "--endpoint", f"unix://{tmp_path}/csi.sock",
         "--state-dir", str(tmp_path / "state"), "--metrics-address", "127.0.0.1:0"],
        capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "pip install 'overlay-csi[metrics]'" in proc.stderr
    assert not (tmp_path / "csi.sock").exists() and not (tmp_path / "state").exists()


def test_a_lock_left_for_a_moment_is_waited_for(tmp_path: Path):
    """A driver killed a moment ago may leave a child between fork and exec that holds
    the state dir's lock until it execs: the next start waits for it (up to 5 s) instead
    of refusing."""
    import fcntl
    import os

    from csi_driver.server import AlreadyRunning, lock_state_dir
    from csi_driver.statedir import StateDir

    state = tmp_path / "state"
    state.mkdir()
    held = os.open(StateDir(state).lockfile, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(held, fcntl.LOCK_EX)
    threading.Timer(1.0, os.close, (held,)).start()  # the child execs: its copy closes
    start = time.monotonic()
    fd = lock_state_dir(state)
    try:
        assert time.monotonic() - start > 0.8, "it waited for the lock, and got it"
    finally:
        os.close(fd)
    held = os.open(StateDir(state).lockfile, os.O_RDWR)
    fcntl.flock(held, fcntl.LOCK_EX)
    try:
        with pytest.raises(AlreadyRunning):
            lock_state_dir(state, wait=0.3)  # a lock that stays held is refused, as before
    finally:
        os.close(held)
