"""A file system image is never attached read-write twice (two writers would corrupt
it): the check finds what an earlier run left attached, and what this process
attaches, without scanning every loop device each time."""

from __future__ import annotations

import os

import pytest

from csi_driver import host
from csi_driver.errors import FailedPrecondition
from csi_driver.host import loopdev
from driver_harness import needs_mounts

pytestmark = needs_mounts


def test_a_second_read_write_attach_is_refused(tmp_path):
    image = tmp_path / "image"
    image.touch()
    os.truncate(image, 64 << 20)
    host.mkfs(image, "ext4")
    # attached by "an earlier run": a tool, before this registry's first look
    earlier = host.run(["losetup", "--find", "--show", str(image)]).stdout.strip()
    registry = loopdev._Attachments()
    try:
        assert registry.read_write(image) == earlier
        host.loop_detach(earlier)
        assert registry.read_write(image) is None, "a detached device is forgotten"

        device = loopdev.attach(image)  # this process attaches it
        assert loopdev.attached_read_write(image) == device
        (tmp_path / "mnt").mkdir()
        with pytest.raises(FailedPrecondition, match="already attached read-write"):
            host.mount_image(image, tmp_path / "mnt", "ext4", ["rw"], readonly=False)
        assert not host.is_mount_point(tmp_path / "mnt")
        host.loop_detach(device)
        assert loopdev.attached_read_write(image) is None
    finally:
        for device in host.loops_under(tmp_path):
            host.loop_detach(device)
