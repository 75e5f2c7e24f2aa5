"""Shared bench plumbing: run the real server in a private mount namespace, on
the host's file system or on a pool file."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from csi_driver import host
from csi_driver.client import Client
from csi_driver.pool_file import attached_loop
from csi_driver.server import ServeOptions, Server

#: A pool file's virtual size unless the bench is told otherwise: sparse, so it
#: costs only what the pool's file system writes.
POOL_FILE_SIZE = "64Gi"


def reexec_in_private_namespace() -> None:
    """Mounts made by a bench vanish with it, whatever happens."""
    if os.geteuid() != 0:
        sys.exit("benchmarks need root (they mount file systems)")
    if os.environ.get("OVERLAY_CSI_BENCH_NS") != "1":
        os.environ["OVERLAY_CSI_BENCH_NS"] = "1"
        os.execvp("unshare", ["unshare", "--mount", "--propagation", "private", *sys.orig_argv])


@contextmanager
def running_driver(**opts) -> Iterator[tuple[Server, Client, Path]]:
    work = Path(tempfile.mkdtemp(prefix="overlay-csi-bench-", dir=os.environ.get("BENCH_DIR")))
    server = Server(
        ServeOptions(endpoint=f"unix://{work}/csi.sock", state_dir=work / "state", node_id="bench", **opts)
    )
    server.start()
    client = Client(work / "csi.sock")
    client.wait_ready()
    try:
        yield server, client, work
    finally:
        client.close()
        server.stop(grace=5)
        for m in host.mounts_under(work):
            host.umount(m.target, lazy=True)
        for device in host.loops_under(work):  # block volumes' devices stay otherwise
            host.loop_detach(device)
        shutil.rmtree(work, ignore_errors=True)


@contextmanager
def pool_file(path: Path, size: int) -> Iterator[dict[str, object]]:
    """The driver options that keep its state dir on a new pool file at ``path`` of
    ``size`` bytes: the driver makes it as on a node (``serve --pool-file``:
    created, attached, formatted, mounted). Afterwards, once the driver is gone,
    the pool's mounts are undone, its loop device detached and the file removed."""
    try:
        yield {"pool_file": str(path), "pool_file_size": size}
    finally:
        device = attached_loop(path) if path.exists() else ""
        if device:
            for m in reversed(host.MountTable.read().entries):
                if m.source == device:
                    host.umount(m.target, lazy=True)
            host.loop_detach(device)
        path.unlink(missing_ok=True)
