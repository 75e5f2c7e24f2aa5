"""The node's calls read the mount table at most once each, whatever the depth of
a volume's layer chain: parsing /proc/self/mountinfo is O(mounts), and on a busy
node it was read d+3 times per NodeStage (2d+7 per NodeUnstage)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from csi_driver import host
from driver_harness import needs_mounts

MiB = 1 << 20
pytestmark = needs_mounts


def reads_during(call: Callable[[], object]) -> int:
    before = host.MountTable.reads
    call()
    return host.MountTable.reads - before


@pytest.mark.parametrize("depth", [0, 6])
@pytest.mark.parametrize("view", ["live", "table"])
def test_node_calls_read_the_mount_table_at_most_once(driver, depth, view, monkeypatch):
    """Where the kernel answers path by path (statx + statmount, Linux 6.11) a node
    call reads the table not at all; elsewhere once."""
    monkeypatch.setattr(host.mounttable, "_live", view == "live")
    once = 0 if view == "live" else 1
    c = driver.client
    vid = c.create_volume("deep", 64 * MiB).volume_id
    for i in range(depth):  # each snapshot of a detached volume commits its upper: one more layer
        c.create_snapshot(f"s{i}", vid)
    assert len(driver.engine.chain(driver.engine.get_volume(vid).upper)) == depth + 1
    staging, target = driver.paths("deep")
    other_staging, other_target = driver.paths("other")
    other = c.create_volume("other", 64 * MiB).volume_id
    c.stage(other, other_staging)  # a node with something else mounted
    c.publish(other, other_staging, other_target)

    assert reads_during(lambda: c.stage(vid, staging)) == once
    assert reads_during(lambda: c.stage(vid, staging)) == once, "the idempotent repeat too"
    assert reads_during(lambda: c.publish(vid, staging, target)) == once
    assert reads_during(lambda: c.publish(vid, staging, target, readonly=False)) == once
    assert reads_during(lambda: c.stats(vid, target)) == once
    assert (target / "lost+found").exists() or target.is_dir()
    assert reads_during(lambda: c.unpublish(vid, target)) == once
    assert reads_during(lambda: c.unstage(vid, staging)) == once
    assert not host.is_mounted(staging) and not host.is_mounted(target)
    assert (
        not driver.engine.backend.active_layers()
        - {driver.engine.get_volume(other).upper}
        - {x.id for x in driver.engine.chain(driver.engine.get_volume(other).upper)}
    ), "every layer of the unstaged volume released"

    c.unpublish(other, other_target)
    c.unstage(other, other_staging)
