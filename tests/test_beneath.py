"""host.beneath: node paths opened beneath a root, acted on by the fd opened."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from csi_driver import host
from csi_driver.host import beneath
from driver_harness import MOUNT_SKIP


def test_a_symlink_or_a_way_out_is_refused(tmp_path: Path):
    root = tmp_path / "k"
    (root / "pods" / "a").mkdir(parents=True)
    (tmp_path / "out").mkdir()
    (root / "pods" / "link").symlink_to(tmp_path / "out")
    beneath.confine(str(root))
    with beneath.opened(str(root / "pods" / "a"), os.O_PATH | os.O_DIRECTORY):
        pass
    for bad in (root / "pods" / "link", root / "pods" / "link" / "x"):
        with pytest.raises(beneath.PathRaced):
            beneath.mkdir_beneath(str(bad))
        with pytest.raises(beneath.PathRaced):
            with beneath.opened(str(bad), os.O_PATH):
                pass
    assert os.listdir(tmp_path / "out") == []
    # a dir swapped for a symlink is removed as itself (the link), never what it names
    (tmp_path / "out" / "victim").mkdir()
    assert not beneath.rmdir_beneath(str(root / "pods" / "link"))
    assert (tmp_path / "out" / "victim").is_dir()
    beneath.mkdir_beneath(str(root / "pods" / "b" / "c" / "d"))
    assert (root / "pods" / "b" / "c" / "d").is_dir()
    assert beneath.rmdir_beneath(str(root / "pods" / "b" / "c" / "d"))


@pytest.mark.skipif(bool(MOUNT_SKIP), reason=MOUNT_SKIP or "")
def test_a_mount_lands_on_the_inode_opened_whatever_is_renamed_after(tmp_path: Path):
    """mount(2) through /proc/self/fd/N follows to the very dir opened: a symlink
    swapped in for it after the open does not redirect the mount."""
    root = tmp_path / "k"
    target = root / "plugins" / "t"
    target.mkdir(parents=True)
    out = tmp_path / "out"
    out.mkdir()
    beneath.confine(str(root))
    try:
        with beneath.opened(str(target), os.O_PATH | os.O_DIRECTORY) as fd:
            target.rename(root / "plugins" / "moved")
            target.symlink_to(out)
            host.mount_device("tmpfs", beneath.fd_path(fd), "tmpfs", [])
        assert not host.is_mount_point(out)
        assert host.is_mount_point(root / "plugins" / "moved")
        # the umount by name in the parent's fd does not follow the symlink either
        host.umount_beneath(target)
        assert host.is_mount_point(root / "plugins" / "moved")
    finally:
        host.umount(root / "plugins" / "moved")
    assert not host.is_mount_point(root / "plugins" / "moved")
