"""``overlay-csi doctor``: check that this host (or pod) can run the driver.

Each check prints one line, ``OK``, ``WARN`` or ``FAIL``, with what was found
and, when it is not OK, how to fix it. Exit status 1 when any check FAILs.
With root, a functional probe builds a small ext4 image, loop-mounts it,
freezes and thaws it and mounts an overlay on it, in a private mount namespace
(a forked child), so nothing it mounts can outlive it.

The checks, by topic: ``backend`` (how layers are kept; the plain-directory backend
enforces no capacity), ``kernel`` (privileges, overlayfs, loop devices),
``tools`` (host programs), ``pool`` (a disk for the state dir), ``setup`` (pool file,
pool device or plain state dir, and what a snapshot of a volume in use costs there), ``state_dir``
(file system, space, sparse files, reflink), ``probe`` (mounts for real),
``store`` (the driver's database) and ``kubernetes`` (mount propagation in a
pod). The command itself, its options and its report, is ``csi_driver.cli.doctor``.
"""

from __future__ import annotations

from pathlib import Path

from csi_driver.doctor.backend import check_backend
from csi_driver.doctor.check import FAIL, OK, WARN, Check
from csi_driver.doctor.kernel import check_loop, check_overlayfs, check_privileges
from csi_driver.doctor.kubernetes import check_propagation, in_pod
from csi_driver.doctor.pool import check_pool
from csi_driver.doctor.probe import probe
from csi_driver.doctor.setup import check_setup
from csi_driver.doctor.state_dir import check_sparse_and_reflink, check_state_dir
from csi_driver.doctor.store import check_store
from csi_driver.doctor.tools import check_tools

__all__ = ["FAIL", "OK", "WARN", "Check", "in_pod", "run_checks"]


def run_checks(
    state_dir: Path,
    kubelet_dir: Path,
    pod: bool,
    do_probe: bool = True,
    pool_device: str = "",
    pool_file: str = "",
    max_live_copy: int = 1 << 30,
    backend: str = "",
) -> list[Check]:
    checks = [check_backend(state_dir, backend)]
    checks += check_privileges()
    checks.append(check_overlayfs())
    checks.append(check_loop())
    checks += check_tools()
    if pool_device:
        checks.append(check_pool(pool_device, state_dir))
    checks += check_state_dir(state_dir)
    checks += check_sparse_and_reflink(state_dir)
    checks.append(check_setup(state_dir, "" if pool_device else pool_file, max_live_copy))
    if do_probe:
        checks += probe(state_dir)
    checks += check_store(state_dir)
    checks.append(check_propagation(kubelet_dir, pod))
    return checks
