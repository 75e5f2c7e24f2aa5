"""csi-sanity (kubernetes-csi/csi-test v5.4.0) against the real driver.

Runs when a csi-sanity binary is found (``CSI_SANITY`` or PATH); skips otherwise.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from driver_harness import MOUNT_SKIP, DriverProcess, cleanup

SANITY = os.environ.get("CSI_SANITY") or shutil.which("csi-sanity")
MiB = 1 << 20

pytestmark = [
    pytest.mark.skipif(not SANITY, reason="no csi-sanity binary (set CSI_SANITY or put it on PATH)"),
    pytest.mark.skipif(bool(MOUNT_SKIP), reason=MOUNT_SKIP or "ok"),
]


def run_sanity(tmp_path: Path, *extra: str, driver_args: tuple[str, ...] = ()) -> tuple[dict, str]:
    # csi-sanity v5.4.0 predates GET_SNAPSHOT (CSI 1.10) and fails any capability it
    # does not know, so that one is hidden from it; GetSnapshot itself is tested elsewhere.
    d = DriverProcess(tmp_path, None, "--hide-capability", "GET_SNAPSHOT", "--max-volumes-per-node", "8",
                      *driver_args)
    mutable = tmp_path / "mutable.yaml"
    mutable.write_text('readAheadKiB: "512"\n')
    d.start()
    try:
        proc = subprocess.run(
            [SANITY, "--csi.endpoint", str(d.sock), "--csi.mountdir", str(tmp_path / "mnt"),
             "--csi.stagingdir", str(tmp_path / "staging"),
             "--csi.testvolumesize", str(64 * MiB), "--csi.testvolumeexpandsize", str(128 * MiB),
             "--csi.testvolumemutableparameters", str(mutable), "--csi.testnodevolumeattachlimit",
             "--ginkgo.no-color", *extra],
            capture_output=True, text=True, timeout=900)
    finally:
        assert d.terminate() == 0
        mounts, loops = cleanup(tmp_path)
    out = proc.stdout + proc.stderr
    m = re.search(r"(\d+) Passed \| (\d+) Failed \| (\d+) Pending \| (\d+) Skipped", out)
    assert m, out[-3000:]
    counts = dict(zip(("passed", "failed", "pending", "skipped"), map(int, m.groups()), strict=True))
    assert not mounts and not loops, f"sanity run leaked {mounts} {loops}"
    return counts, out


@pytest.mark.parametrize("access_type", ["mount", "block"])
def test_csi_sanity(tmp_path: Path, access_type: str):
    """Every capability advertised: 0 failed and no spec skipped for a capability we lack."""
    counts, out = run_sanity(tmp_path, "--csi.testvolumeaccesstype", access_type)
    failed = re.findall(r"\[FAIL\] (.*)", out)
    assert counts["failed"] == 0, failed
    assert counts["skipped"] == 0, re.findall(r"\[SKIPPED\] (.*)", out)
    assert counts["passed"] >= 90
