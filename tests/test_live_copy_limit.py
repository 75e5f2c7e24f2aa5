"""Where the state dir cannot clone (ext4), a snapshot of a volume in use copies its
written data while its writes wait: beyond ``--max-live-snapshot-copy`` (or a
VolumeSnapshotClass's lower ``liveCopyLimit``) it is refused with
FAILED_PRECONDITION, a message that says what to do, and nothing changed.

The caller is csi-snapshotter's sidecar controller (v8.6.0, createSnapshotWrapper):
isCSIFinalError counts FAILED_PRECONDITION as final, so the content records the error
and no CreateSnapshot is left "in progress"; RESOURCE_EXHAUSTED would not be."""

from __future__ import annotations

import os

import grpc
import pytest
from test_pool_file import host_fs  # noqa: F401 - the fixture

from csi_driver.doctor.check import WARN
from csi_driver.doctor.setup import check_setup
from driver_harness import Driver, available, needs_mounts

MiB = 1 << 20
pytestmark = needs_mounts


def layer_dirs(d: Driver) -> set[str]:
    return {p.name for p in (d.state / "layers").iterdir()}


def test_a_live_copy_beyond_the_limit_is_refused_with_nothing_changed(tmp_path, host_fs):  # noqa: F811
    hostdir = host_fs(512 * MiB)  # ext4: no reflink
    root = hostdir / "node"
    root.mkdir()
    d = Driver(root, max_live_snapshot_copy=32 * MiB)
    doctor = check_setup(d.state, max_live_copy=32 * MiB)
    assert doctor.status == WARN and "plain state dir on ext4, which cannot clone" in doctor.message
    assert "up to 32 MiB" in doctor.message and "--pool-file" in doctor.fix
    try:
        c = d.client
        vid, staging, target = d.published("pvc", 128 * MiB)
        (target / "small.bin").write_bytes(os.urandom(8 * MiB))
        os.sync()
        assert c.create_snapshot("small", vid).snapshot_id, "under the limit: copied"

        (target / "big.bin").write_bytes(os.urandom(40 * MiB))
        os.sync()
        layers, free = layer_dirs(d), available(hostdir)
        with pytest.raises(grpc.RpcError) as e:
            c.create_snapshot("big", vid)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        message = e.value.details()
        for said in (
            vid,
            "more than the 32 MiB limit",
            "--max-live-snapshot-copy",
            "liveCopyLimit",
            "detach the volume",
            "--pool-file",
        ):
            assert said in message, message
        assert [s.name for s in d.engine.list_snapshots(0, 0)] == ["small"]
        assert layer_dirs(d) == layers and abs(available(hostdir) - free) < 4 * MiB, "nothing changed"

        # a class may ask for less than the node allows
        with pytest.raises(grpc.RpcError) as e:
            c.create_snapshot("lower", vid, parameters={"liveCopyLimit": "4Mi"})
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "4 MiB limit" in e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            c.create_snapshot("bad", vid, parameters={"liveCopyLimit": "lots"})
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT

        # detached, a snapshot is a commit, never a copy: no limit applies
        c.unpublish(vid, target)
        c.unstage(vid, staging)
        assert c.create_snapshot("big", vid, parameters={"liveCopyLimit": "4Mi"}).snapshot_id
    finally:
        d.stop()
