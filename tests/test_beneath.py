"""host.beneath: node paths opened beneath a root, acted on by the fd opened."""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from csi_driver import host
from csi_driver.errors import CommandFailed
from csi_driver.host import beneath, fsmount, mountopts
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


# ---- new mounts: made detached (fsopen, fsconfig, fsmount), moved onto the fd ----


def test_mount_options_are_read_once_for_every_way_of_mounting():
    opts = mountopts.parse(
        ["ro", "nosuid", "noatime", "sync", "lazytime", "discard", "data=writeback", f"context={CONTEXT}"]
    )
    # fsmount(2) and mount_setattr(2): the mount's own flags
    assert (
        opts.attr_set
        == mountopts.MOUNT_ATTR_RDONLY | mountopts.MOUNT_ATTR_NOSUID | mountopts.MOUNT_ATTR_NOATIME
    )
    # fsconfig(2): the superblock's flags, then the file system's own options; a quoted
    # value loses its quotes, as libmount's optlist drops them before fsconfig(2)
    assert opts.sb_flags == ("ro", "sync", "lazytime")
    assert opts.fs_params() == [
        ("discard", None),
        ("data", "writeback"),
        ("context", "system_u:object_r:container_file_t:s0:c1,c2"),
    ]
    # mount(2): flags, and the data string as given (its parser strips the quotes)
    assert opts.ms_flags == 0x1 | 0x2 | 0x400 | 0x10 | 0x2000000
    assert opts.data == f"discard,data=writeback,context={CONTEXT}"
    # mount_setattr(2) of a publish: rw and an atime choice clear what they replace
    change = mountopts.parse(["rw", "noexec", "strictatime"])
    assert change.attr_set == mountopts.MOUNT_ATTR_NOEXEC | mountopts.MOUNT_ATTR_STRICTATIME
    assert change.attr_clr == mountopts.MOUNT_ATTR_RDONLY | mountopts.MOUNT_ATTR__ATIME


CONTEXT = '"system_u:object_r:container_file_t:s0:c1,c2"'


@pytest.fixture
def confined(tmp_path: Path) -> Iterator[Path]:
    """A kubelet dir the node paths resolve beneath; nothing left mounted below it."""
    root = tmp_path / "k"
    (root / "pods").mkdir(parents=True)
    (root / "plugins").mkdir()
    beneath.confine(str(root))
    try:
        yield root
    finally:
        left = [m.target for m in host.mounts_under(tmp_path)]
        for target in left:
            host.umount(target, lazy=True)
        assert not left, f"left mounted: {left}"


def _options(path: Path) -> tuple[set[str], list[str]]:
    entry = host.mount_at(path)
    assert entry is not None, f"nothing mounted at {path}"
    return set(entry.options.split(",")), entry.super_options.split(",")


@pytest.mark.skipif(bool(MOUNT_SKIP), reason=MOUNT_SKIP or "")
def test_an_overlay_of_two_lowers_is_mounted_onto_the_dir_opened(tmp_path: Path, confined: Path):
    store = tmp_path / "store"
    for name in ("l1", "l2", "upper", "work"):
        (store / name).mkdir(parents=True)
    (store / "l1" / "a").write_text("nearest")
    (store / "l2" / "a").write_text("hidden")
    (store / "l2" / "b").write_text("below")
    target = confined / "plugins" / "stage"
    target.mkdir()
    opts = [
        f"lowerdir={store}/l1:{store}/l2",
        f"upperdir={store}/upper",
        f"workdir={store}/work",
        "index=off",
        "metacopy=off",
        "redirect_dir=on",
        "noatime",
        "nosuid",
        "nodev",
    ]
    with beneath.opened(str(target), os.O_PATH | os.O_DIRECTORY) as fd:
        beneath.mount_fd("overlay", "overlay", opts, fd, str(target))
    try:
        flags, sb = _options(target)
        assert {"rw", "noatime", "nosuid", "nodev"} <= flags
        assert f"lowerdir={store}/l1:{store}/l2" in sb and f"upperdir={store}/upper" in sb
        assert "redirect_dir=on" in sb
        assert (target / "a").read_text() == "nearest" and (target / "b").read_text() == "below"
        (target / "new").write_text("up")
        assert (store / "upper" / "new").read_text() == "up"
    finally:
        host.umount(target)
    # as the driver mounts a volume's view: relative layers, read-only, through
    # mount_beneath (the layers resolve against the store, in the mount thread)
    host.mount_beneath("overlay", target, "overlay", ["ro", "lowerdir=l1:l2", "nosuid"], cwd=store)
    try:
        flags, sb = _options(target)
        assert {"ro", "nosuid"} <= flags and "lowerdir=l1:l2" in sb
        with pytest.raises(OSError):
            (target / "c").write_text("refused")
    finally:
        host.umount(target)


@pytest.mark.skipif(bool(MOUNT_SKIP), reason=MOUNT_SKIP or "")
def test_an_ext4_mount_takes_the_vfs_flags_and_its_own_options(tmp_path: Path, confined: Path):
    image = tmp_path / "fs.img"
    host.create_sparse(image, 64 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
    target = confined / "plugins" / "ext4"
    target.mkdir()
    device = host.loop_attach(image)
    try:
        for opts, want, want_sb, not_sb in (
            (
                ["noatime", "nosuid", "discard", "commit=17"],
                {"rw", "noatime", "nosuid"},
                {"discard", "commit=17"},
                set(),
            ),
            (
                ["ro", "nodiscard", "noexec", "nodev"],
                {"ro", "noexec", "nodev", "relatime"},
                {"ro"},
                {"discard"},
            ),
        ):
            with beneath.opened(str(target), os.O_PATH | os.O_DIRECTORY) as fd:
                beneath.mount_fd("ext4", device, opts, fd, str(target))
            try:
                flags, sb = _options(target)
                assert want <= flags, (opts, flags)
                assert want_sb <= set(sb) and not not_sb & set(sb), (opts, sb)
            finally:
                host.umount(target)
    finally:
        host.loop_detach(device)
    assert not host.loops_under(tmp_path)


@pytest.mark.skipif(bool(MOUNT_SKIP), reason=MOUNT_SKIP or "")
@pytest.mark.skipif(
    not Path("/sys/fs/selinux/enforce").exists(), reason="SELinux is not enabled on this host"
)
def test_a_selinux_context_labels_the_new_mount(tmp_path: Path, confined: Path):
    """kubelet's seLinuxMount flag, quoted as kubelet sends it, reaches fsconfig(2)."""
    label = os.getxattr(tmp_path, "security.selinux").rstrip(b"\0").decode()
    target = confined / "plugins" / "labelled"
    target.mkdir()
    with beneath.opened(str(target), os.O_PATH | os.O_DIRECTORY) as fd:
        beneath.mount_fd("tmpfs", "tmpfs", [f'context="{label}"'], fd, str(target))
    try:
        assert os.getxattr(target, "security.selinux").rstrip(b"\0").decode() == label
    finally:
        host.umount(target)


@pytest.mark.skipif(bool(MOUNT_SKIP), reason=MOUNT_SKIP or "")
def test_a_refused_mount_says_what_the_kernel_logged(tmp_path: Path, confined: Path):
    target = confined / "plugins" / "bad"
    target.mkdir()
    (tmp_path / "lower").mkdir()
    opts = [f"lowerdir={tmp_path}/lower", "no_such_option"]
    with beneath.opened(str(target), os.O_PATH | os.O_DIRECTORY) as fd:
        with pytest.raises(fsmount.MountRefused, match="Unknown parameter 'no_such_option'") as e:
            beneath.mount_fd("overlay", "overlay", opts, fd, str(target))
    assert e.value.errno == errno.EINVAL
    with pytest.raises(CommandFailed, match="no_such_option"):
        host.mount_beneath("overlay", target, "overlay", opts)
    assert not host.is_mount_point(target)


@pytest.mark.skipif(bool(MOUNT_SKIP), reason=MOUNT_SKIP or "")
@pytest.mark.parametrize("kind", ["mount", "bind"])
@pytest.mark.parametrize("then", ["gone", "another dir", "a symlink out"])
def test_a_target_renamed_away_before_the_move_keeps_no_mount(
    tmp_path: Path, confined: Path, kind: str, then: str
):
    """The dir opened is renamed into another pod's dir before the mount is moved onto
    it: the mount lands there, the path shows something else (nothing, another dir,
    or a symlink out of the root), so the mount is detached again and the call refused."""
    target = confined / "pods" / "uid-1" / "volumes" / "kubernetes.io~csi" / "pv" / "mount"
    target.mkdir(parents=True)
    moved = confined / "pods" / "uid-2" / "volumes" / "kubernetes.io~csi" / "pv" / "mount"
    moved.parent.mkdir(parents=True)
    source = tmp_path / "source"
    source.mkdir()
    (tmp_path / "out").mkdir()
    with beneath.opened(str(target), os.O_PATH | os.O_DIRECTORY) as fd:
        target.rename(moved)
        if then == "another dir":
            target.mkdir()
        elif then == "a symlink out":
            target.symlink_to(tmp_path / "out")
        with pytest.raises(beneath.PathRaced, match="changed while it was"):
            if kind == "mount":
                beneath.mount_fd("tmpfs", "tmpfs", ["nosuid"], fd, str(target))
            else:
                with beneath.opened(str(source), os.O_PATH | os.O_DIRECTORY) as sfd:
                    beneath.bind_fd(sfd, fd, str(target))
    assert host.mounts_under(confined) == [] and not host.is_mount_point(tmp_path / "out")


def test_an_overlay_whose_layer_list_passes_256_bytes_is_mounted(tmp_path: Path, confined: Path):
    """fsconfig takes strings of at most 256 bytes: a deep chain goes one lowerdir+ each."""
    store = tmp_path / "store"
    lowers = [store / f"layer-with-a-long-name-{i:02d}" for i in range(20)]
    for d in [*lowers, store / "upper", store / "work"]:
        d.mkdir(parents=True)
    for i, d in enumerate(lowers):
        (d / f"f{i}").write_text(str(i))
    (lowers[0] / "f19").write_text("top wins")
    lowerdir = ":".join(str(d) for d in lowers)
    assert len(lowerdir) > 256
    target = confined / "plugins" / "deep"
    target.mkdir()
    opts = [f"lowerdir={lowerdir}", f"upperdir={store}/upper", f"workdir={store}/work"]
    with beneath.opened(str(target), os.O_PATH | os.O_DIRECTORY) as fd:
        beneath.mount_fd("overlay", "overlay", opts, fd, str(target))
    try:
        assert (target / "f7").read_text() == "7"
        assert (target / "f19").read_text() == "top wins", "the order of the layers is kept"
    finally:
        host.umount(target)
