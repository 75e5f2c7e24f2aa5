"""Shared bench plumbing: run the real server in a private mount namespace."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from csi_driver.client import Client
from csi_driver.server import ServeOptions, Server


def reexec_in_private_namespace() -> None:
    """Mounts made by a bench vanish with it, whatever happens."""
    if os.geteuid() != 0:
        sys.exit("benchmarks need root (they mount file systems)")
    if os.environ.get("OVERLAY_CSI_BENCH_NS") != "1":
        os.environ["OVERLAY_CSI_BENCH_NS"] = "1"
        os.execvp("unshare", ["unshare", "--mount", "--propagation", "private",
                              *sys.orig_argv])


@contextmanager
def running_driver(**opts) -> Iterator[tuple[Server, Client, Path]]:
    work = Path(tempfile.mkdtemp(prefix="overlay-csi-bench-", dir=os.environ.get("BENCH_DIR")))
    server = Server(ServeOptions(endpoint=f"unix://{work}/csi.sock", state_dir=work / "state",
                                 node_id="bench", **opts))
    server.start()
    client = Client(work / "csi.sock")
    client.wait_ready()
    try:
        yield server, client, work
    finally:
        client.close()
        server.stop(grace=5)
        from csi_driver import host

        for m in host.mounts_under(work):
            host.umount(m.target, lazy=True)
        for device in host.loops_under(work):  # block volumes' devices stay otherwise
            host.loop_detach(device)
        shutil.rmtree(work, ignore_errors=True)
