"""OCI layer tars from overlay layers and back (layerstore.overlay.upperdiff, layerstore.treediff,
layerstore.layertar), on real overlayfs.

Each round trip: changes made through a mounted overlay, the layer exported,
imported into a fresh upper over the same lower, and the two merged views
compared entry by entry."""

from __future__ import annotations

import errno
import hashlib
import io
import os
import shutil
import stat
import subprocess
import tarfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import pytest

from csi_driver import host
from csi_driver.layerstore import layertar, treediff
from csi_driver.layerstore.layertar import DiffError
from csi_driver.layerstore.overlay import upperdiff
from csi_driver.layerstore.overlay.upperdiff import NeedsNaiveDiff
from driver_harness import MOUNT_SKIP

pytestmark = pytest.mark.skipif(bool(MOUNT_SKIP), reason=MOUNT_SKIP or "ok")

OVERLAY_OPTS = ["index=off", "metacopy=off", "redirect_dir=on"]
GiB = 1 << 30


@contextmanager
def overlay(target: Path, lowers: list[Path], upper: Path | None = None) -> Iterator[Path]:
    """Mount an overlay (read-only without ``upper``) at ``target``; unmount it after."""
    opts = ["lowerdir=" + ":".join(map(str, lowers))]
    if upper is not None:
        work = upper.with_name(upper.name + ".work")
        work.mkdir()
        opts += [f"upperdir={upper}", f"workdir={work}"]
    target.mkdir()
    host.mount("overlay", target, "overlay", opts + OVERLAY_OPTS)
    try:
        yield target
    finally:
        host.umount(target)


def content_key(path: Path) -> str:
    """A digest of the content that does not depend on where the holes are: the non-zero 4 KiB blocks
    and their offsets. Holes are not read (reading 1 GiB of them takes seconds here)."""
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY)
    try:
        pos, size = 0, os.fstat(fd).st_size
        while pos < size:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as e:
                assert e.errno == errno.ENXIO  # only holes after pos
                break
            hole = os.lseek(fd, data, os.SEEK_HOLE)
            pos = data - data % 4096
            while pos < hole:
                chunk = os.pread(fd, min(1 << 20, hole - pos), pos)
                for off in range(0, len(chunk), 4096):
                    block = chunk[off : off + 4096]
                    if block.count(0) != len(block):
                        h.update((pos + off).to_bytes(8, "little") + block)
                pos += len(chunk)
    finally:
        os.close(fd)
    return h.hexdigest()


def snapshot(root: Path) -> dict[str, tuple]:
    """What a view shows of every entry below ``root`` and of ``root`` itself ("."), by relative path."""
    out: dict[str, tuple] = {}
    inodes: dict[tuple[int, int], list[str]] = {}
    paths = [root]
    for dirpath, dirnames, filenames in os.walk(root):
        paths += [Path(dirpath) / name for name in dirnames + filenames]
    for p in paths:
        rel = str(p.relative_to(root))
        st = os.lstat(p)
        names = os.listxattr(p, follow_symlinks=False)
        xattrs = tuple(sorted((n, os.getxattr(p, n, follow_symlinks=False)) for n in names))
        kind = stat.S_IFMT(st.st_mode)
        out[rel] = (
            kind,
            stat.S_IMODE(st.st_mode),
            st.st_uid,
            st.st_gid,
            st.st_mtime_ns,
            None if kind == stat.S_IFDIR else st.st_size,
            content_key(p) if kind == stat.S_IFREG else None,
            os.readlink(p) if kind == stat.S_IFLNK else None,
            xattrs,
        )
        if kind != stat.S_IFDIR:
            inodes.setdefault((st.st_dev, st.st_ino), []).append(rel)
    for group in inodes.values():
        for rel in group:
            out[rel] += (tuple(sorted(group)) if len(group) > 1 else None,)
    return out


def members(tar: bytes) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(tar), mode="r:") as tf:
        return {ti.name: ti for ti in tf.getmembers()}


Export = Callable[[Path, Path, BinaryIO], layertar.DiffStats]


def through_pipe(export: Callable[[BinaryIO], layertar.DiffStats], dest: Path):
    """Export in a thread into a pipe that import_as_upper(dest) reads: neither side may seek."""
    r, w = os.pipe()
    result: list = []

    def produce() -> None:
        with open(w, "wb") as out:
            try:
                result.append(export(out))
            except BaseException as e:
                result.append(e)

    thread = threading.Thread(target=produce)
    thread.start()
    try:
        with open(r, "rb") as tar:
            imported = upperdiff.import_as_upper(tar, dest)
    finally:
        thread.join()
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0], imported


def round_trip(
    tmp_path: Path,
    populate: Callable[[Path], None],
    change: Callable[[Path], None],
    export: Export,
    pipe: bool = False,
) -> tuple[bytes, Path, dict[str, tuple]]:
    """Build a lower, change it through an overlay, export(upper, lower, out), import into a fresh
    upper, mount that over the same lower: both views must be equal. Returns the tar (b"" when piped),
    the imported upper and the view's snapshot."""
    lower, upper, imported = tmp_path / "lower", tmp_path / "upper", tmp_path / "imported"
    for d in (lower, upper, imported):
        d.mkdir()
    populate(lower)
    with overlay(tmp_path / "merged", [lower], upper) as merged:
        change(merged)
        before = snapshot(merged)
    if pipe:
        tar = b""
        exported, stats = through_pipe(lambda out: export(upper, lower, out), imported)
        assert (exported.entries, exported.bytes) == (stats.entries, stats.bytes)
    else:
        buf = io.BytesIO()
        export(upper, lower, buf)
        tar = buf.getvalue()
        stats = upperdiff.import_as_upper(io.BytesIO(tar), imported)
        assert stats.entries == len(members(tar))
    with overlay(tmp_path / "merged2", [lower], imported) as merged2:
        after = snapshot(merged2)
    assert after.keys() == before.keys()
    for rel in before:
        assert after[rel] == before[rel], rel
    return tar, imported, after


def write(path: Path, data: bytes | str = b"", mode: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    if mode is not None:
        os.chmod(path, mode)
    return path


def base_tree(lower: Path) -> None:
    write(lower / "keep.txt", "keep")
    write(lower / "mod.txt", "old content")
    write(lower / "del.txt", "bye")
    write(lower / "meta.txt", "meta", 0o644)
    write(lower / "deldir/a", "a")
    write(lower / "deldir/b/c", "c")
    write(lower / "repl/old1", "1")
    write(lower / "repl/sub/old2", "2")
    write(lower / "linked1", "shared")
    os.link(lower / "linked1", lower / "linked2")
    write(lower / "d1/f", "f")
    write(lower / "d1/sub/g", "g")
    write(lower / "d3/h", "h")


def common_changes(m: Path) -> None:
    write(m / "new.txt", "new")
    os.setxattr(m / "new.txt", "user.bin", b"\xff\x00\x01 not utf-8")
    os.setxattr(m / "new.txt", "trusted.csi-test", b"t")
    write(m / "mod.txt", "new content, longer")
    (m / "del.txt").unlink()
    shutil.rmtree(m / "deldir")
    shutil.rmtree(m / "repl")
    write(m / "repl/fresh", "fresh")
    os.chown(m / "meta.txt", 1234, 5678)
    os.chmod(m / "meta.txt", 0o4750)  # after chown, which clears setuid
    os.setxattr(m / "keep.txt", "user.note", b"copied up for an xattr")
    write(m / "newdir/deep/h1", "hard")
    os.link(m / "newdir/deep/h1", m / "h2")
    os.link(m / "newdir/deep/h1", m / "newdir/h3")
    os.symlink("new.txt", m / "sl")
    os.symlink("/nonexistent/target", m / "dangling")
    os.symlink("newdir", m / "dirlink")
    os.mkfifo(m / "fifo", 0o640)
    os.utime(m / "newdir", ns=(1_600_000_000_123_456_789, 1_600_000_000_123_456_789))


def test_clean_upper_takes_the_fast_path_with_whiteouts_and_opaque_dirs(tmp_path, monkeypatch):
    def no_naive(*args):
        raise AssertionError("the naive diff ran for a complete upper")

    monkeypatch.setattr(treediff, "export_naive", no_naive)

    def export(upper: Path, lower: Path, out: BinaryIO) -> layertar.DiffStats:
        assert not upperdiff.needs_naive_diff(upper)
        stats = upperdiff.export_layer(upper, out, parent=None, merged=None)
        # del.txt, deldir, repl replaced; newdir too: overlay marks the directories it makes in a merged
        # directory opaque (it saves lookups below), harmless where the lower has no namesake.
        whiteouts = [n for n in members(out.getvalue()) if n.rpartition("/")[2].startswith(".wh.")]
        assert stats.whiteouts == len(whiteouts) == 4
        return stats

    tar, imported, view = round_trip(tmp_path, base_tree, common_changes, export)
    names = members(tar)
    assert {".wh.del.txt", ".wh.deldir", "repl/.wh..wh..opq", "repl/fresh"} <= names.keys()
    assert not any(n.startswith(("deldir/", "repl/old1", "repl/sub", "d1", "linked")) for n in names)
    assert names["."].isdir() and names["fifo"].isfifo() and names["dangling"].issym()
    assert names["h2"].isreg()  # the first of the group in tar order; the others link to it
    assert names["newdir/h3"].linkname == names["newdir/deep/h1"].linkname == "h2"
    # The views compared equal; make sure they did hold what the test is about.
    assert view["h2"][-1] == ("h2", "newdir/deep/h1", "newdir/h3")
    assert view["linked1"][-1] == ("linked1", "linked2")
    assert ("user.bin", b"\xff\x00\x01 not utf-8") in view["new.txt"][8]
    assert view["meta.txt"][1:4] == (0o4750, 1234, 5678)
    assert names["new.txt"].pax_headers["SCHILY.xattr.user.bin"].encode("utf-8", "surrogateescape") == (
        b"\xff\x00\x01 not utf-8"
    )
    pax_keys = [key for ti in names.values() for key in ti.pax_headers]
    assert not any(key.startswith("SCHILY.xattr.trusted.overlay.") for key in pax_keys)
    assert stat.S_ISCHR(os.lstat(imported / "del.txt").st_mode)
    assert os.getxattr(imported / "repl", "trusted.overlay.opaque") == b"y"


def test_renamed_directory_needs_the_naive_diff_and_round_trips(tmp_path):
    def change(m: Path) -> None:
        os.rename(m / "d1", m / "d1renamed")
        os.rename(m / "d3", m / "newparent")
        (m / "newparent" / "h").unlink()
        write(m / "newparent/h2", "h2")
        common_changes(m)
        assert not (m / "d1").exists()

    def export(upper: Path, lower: Path, out: BinaryIO) -> layertar.DiffStats:
        assert os.getxattr(upper / "d1renamed", "trusted.overlay.redirect")
        assert upperdiff.needs_naive_diff(upper)
        with pytest.raises(NeedsNaiveDiff):
            upperdiff.export_upper(upper, io.BytesIO())
        with pytest.raises(NeedsNaiveDiff):
            upperdiff.export_layer(upper, io.BytesIO(), parent=lower, merged=None)
        with overlay(tmp_path / "view", [upper, lower]) as view:
            return upperdiff.export_layer(upper, out, parent=lower, merged=view)

    tar, _, view = round_trip(tmp_path, base_tree, change, export)
    assert "d1" not in view and view["d1renamed/sub/g"][0] == stat.S_IFREG
    names = members(tar)
    assert {".wh.d1", "d1renamed", "d1renamed/f", "d1renamed/sub/g", ".wh.d3", "newparent/h2"} <= names.keys()
    assert "newparent/h" not in names and ".wh.h" not in names
    assert "keep.txt" in names and "linked1" not in names  # changed vs unchanged


def test_sparse_file_streams_through_a_pipe_and_stays_sparse(tmp_path):
    def change(m: Path) -> None:
        write(m / "small", "small")
        with open(m / "big.img", "wb") as f:
            f.truncate(GiB)
            for off in (0, 512 << 20, GiB - 3000):
                f.seek(off)
                f.write(os.urandom(3000))

    def export(upper: Path, lower: Path, out: BinaryIO) -> layertar.DiffStats:
        return upperdiff.export_layer(upper, out, parent=None, merged=None)

    _, imported, _ = round_trip(tmp_path, lambda lower: None, change, export, pipe=True)
    st = os.lstat(imported / "big.img")
    assert st.st_size == GiB and st.st_blocks * 512 <= 64 << 10


def test_naive_diff_between_plain_trees(tmp_path):
    """Type changes, a hard-link group that changed, metadata-only changes, unchanged files left out."""
    parent, new, upper = tmp_path / "parent", tmp_path / "new", tmp_path / "upper"
    write(parent / "same.txt", "same")
    write(parent / "chmod.txt", "x", 0o644)
    write(parent / "file2dir", "was a file")
    write(parent / "dir2file/x", "x")
    os.symlink("a", parent / "linkchange")
    write(parent / "grp1", "g")
    write(parent / "grp2", "g")
    write(parent / "gone/deep/z", "z")
    write(parent / "sub/kept", "k")
    write(parent / "sub/inner/changed", "1")
    subprocess.run(["cp", "-a", str(parent), str(new)], check=True)
    os.chmod(new / "chmod.txt", 0o600)
    (new / "file2dir").unlink()
    write(new / "file2dir/y", "y")
    shutil.rmtree(new / "dir2file")
    write(new / "dir2file", "now a file")
    (new / "linkchange").unlink()
    os.symlink("b", new / "linkchange")
    (new / "grp2").unlink()
    os.link(new / "grp1", new / "grp2")
    shutil.rmtree(new / "gone")
    write(new / "sub/inner/changed", "22")
    st = os.stat(parent / "sub")
    os.utime(new / "sub", ns=(st.st_atime_ns, st.st_mtime_ns))  # sub itself unchanged
    os.mknod(new / "sock", stat.S_IFSOCK | 0o600)  # not representable: left out

    buf = io.BytesIO()
    stats = treediff.export_naive(parent, new, buf)
    names = members(buf.getvalue())
    assert set(names) == {
        ".", "chmod.txt", "file2dir", "file2dir/y", "dir2file", "linkchange", "grp1", "grp2", ".wh.gone",
        "sub", "sub/inner", "sub/inner/changed",
    }
    assert names["grp2"].islnk() and names["grp2"].linkname == "grp1"
    sec, ns = divmod(st.st_mtime_ns, 10**9)  # sub: written for its child, with its own metadata
    assert names["sub"].pax_headers["mtime"] == f"{sec}.{ns:09d}"
    assert stats.whiteouts == 1 and stats.bytes == len("x") + 1 + len("now a file") + 1 + 2

    upper.mkdir()
    upperdiff.import_as_upper(io.BytesIO(buf.getvalue()), upper)
    root = os.stat(new)
    (new / "sock").unlink()
    os.utime(new, ns=(root.st_atime_ns, root.st_mtime_ns))
    expected = snapshot(new)
    with overlay(tmp_path / "merged", [parent], upper) as merged:
        got = snapshot(merged)
    assert got.keys() == expected.keys()
    for rel in expected:
        # st_dev differs between the views, the inode-free entries must match exactly
        assert got[rel] == expected[rel], rel

    everything = io.BytesIO()
    treediff.export_naive(None, new, everything)
    assert {"same.txt", "sub/kept"} <= members(everything.getvalue()).keys()
    assert not any(n.startswith(".wh.") for n in members(everything.getvalue()))


@pytest.mark.parametrize("kind", ["chardev", "blockdev", "whiteout-name"])
def test_export_refuses_what_a_layer_cannot_hold(tmp_path, kind):
    upper = tmp_path / "upper"
    upper.mkdir()
    if kind == "chardev":
        os.mknod(upper / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    elif kind == "blockdev":
        os.mknod(upper / "loop", stat.S_IFBLK | 0o600, os.makedev(7, 0))
    else:
        write(upper / "dir/.wh.sneaky", "x")
    with pytest.raises(DiffError) as e:
        upperdiff.export_upper(upper, io.BytesIO())
    assert not isinstance(e.value, NeedsNaiveDiff)
    with pytest.raises(DiffError):
        treediff.export_naive(None, upper, io.BytesIO())


def test_export_upper_sockets_become_whiteouts_and_fifos_stay(tmp_path):
    upper = tmp_path / "upper"
    upper.mkdir()
    os.mknod(upper / "sock", stat.S_IFSOCK | 0o600)
    os.mkfifo(upper / "fifo")
    os.mknod(upper / "gone", stat.S_IFCHR, os.makedev(0, 0))
    buf = io.BytesIO()
    stats = upperdiff.export_upper(upper, buf)
    names = members(buf.getvalue())
    assert set(names) == {".", ".wh.sock", "fifo", ".wh.gone"} and names["fifo"].isfifo()
    assert stats.whiteouts == 2


def tar_of(*entries: tuple[tarfile.TarInfo, bytes]) -> io.BytesIO:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for ti, data in entries:
            ti.size = len(data) if ti.isreg() else 0
            tf.addfile(ti, io.BytesIO(data) if ti.isreg() else None)
    buf.seek(0)
    return buf


def info(name: str, kind: bytes = tarfile.REGTYPE, **attrs) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    for key, value in attrs.items():
        setattr(ti, key, value)
    return ti


def test_import_turns_oci_whiteouts_into_overlay_ones(tmp_path):
    upper = tmp_path / "upper"
    upper.mkdir()
    tar = tar_of(
        (info("d", tarfile.DIRTYPE), b""),
        (info("d/.wh..wh..opq"), b""),
        (info(".wh.gone"), b""),
        (info("f"), b"data"),
        (info("h", tarfile.LNKTYPE, linkname="f"), b""),
        (info("both", tarfile.DIRTYPE), b""),
        (info(".wh.both"), b""),  # same layer: hides the lower 'both' only, the layer's stays
        (info(".wh.later"), b""),
        (info("later"), b"replaces the whiteout before it"),
        (info("implicit/child"), b"c"),
    )
    stats = upperdiff.import_as_upper(tar, upper)
    assert stats.whiteouts == 4 and stats.bytes == 4 + 31 + 1
    assert os.getxattr(upper / "d", "trusted.overlay.opaque") == b"y"
    assert os.getxattr(upper / "both", "trusted.overlay.opaque") == b"y"
    gone = os.lstat(upper / "gone")
    assert stat.S_ISCHR(gone.st_mode) and gone.st_rdev == 0
    assert os.lstat(upper / "h").st_ino == os.lstat(upper / "f").st_ino
    assert (upper / "later").read_bytes().startswith(b"replaces")
    assert (upper / "implicit").is_dir()
    with pytest.raises(ValueError):
        upperdiff.import_as_upper(tar, upper)  # not empty


def unsafe_tars(outside: Path) -> dict[str, io.BytesIO]:
    secret = str(outside / "secret")
    return {
        "dotdot": tar_of((info("../x"), b"x")),
        "dotdot-inside": tar_of((info("a", tarfile.DIRTYPE), b""), (info("a/../../x"), b"x")),
        "absolute": tar_of((info(str(outside / "abs")), b"x")),
        "symlink-parent": tar_of(
            (info("a", tarfile.SYMTYPE, linkname=str(outside)), b""), (info("a/x"), b"x")
        ),
        "symlink-parent-dir": tar_of(
            (info("a", tarfile.SYMTYPE, linkname=str(outside)), b""), (info("a/d", tarfile.DIRTYPE), b"")
        ),
        "symlink-parent-whiteout": tar_of(
            (info("a", tarfile.SYMTYPE, linkname=str(outside)), b""), (info("a/.wh.secret"), b"")
        ),
        "hardlink-missing": tar_of((info("l", tarfile.LNKTYPE, linkname="missing"), b"")),
        "hardlink-absolute": tar_of((info("l", tarfile.LNKTYPE, linkname=secret), b"")),
        "hardlink-dotdot": tar_of((info("l", tarfile.LNKTYPE, linkname="../outside/secret"), b"")),
        "chardev": tar_of((info("null", tarfile.CHRTYPE, devmajor=1, devminor=3), b"")),
        "blockdev": tar_of((info("sda", tarfile.BLKTYPE, devmajor=8, devminor=0), b"")),
        "overlay-xattr": tar_of(
            (info("d", tarfile.DIRTYPE, pax_headers={"SCHILY.xattr.trusted.overlay.opaque": "y"}), b"")
        ),
        "whiteout-no-name": tar_of((info(".wh.."), b"")),
        "not-a-tar": io.BytesIO(b"hello" * 300),
        "truncated": io.BytesIO(tar_of((info("f"), b"x" * 5000)).getvalue()[:2048]),
    }


@pytest.mark.parametrize("case", list(unsafe_tars(Path("/x"))))
def test_import_refuses_unsafe_tars_and_writes_nothing_outside(tmp_path, case):
    outside, box = tmp_path / "outside", tmp_path / "box"
    outside.mkdir()
    write(outside / "secret", "secret")
    dest = box / "dest"
    dest.mkdir(parents=True)
    before = os.stat(outside / "secret")
    before = (before.st_nlink, before.st_mode, before.st_ctime_ns)
    with pytest.raises(DiffError):
        upperdiff.import_as_upper(unsafe_tars(outside)[case], dest)
    assert sorted(os.listdir(outside)) == ["secret"] and os.listdir(box) == ["dest"]
    after = os.stat(outside / "secret")
    assert (after.st_nlink, after.st_mode, after.st_ctime_ns) == before  # no link, chmod, chown, write
    assert (outside / "secret").read_text() == "secret"


def test_count_tar_counts_entries_and_bytes_and_stops_at_the_limit() -> None:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for i in range(10):
            ti = tarfile.TarInfo(f"f{i}")
            ti.size = i
            tar.addfile(ti, io.BytesIO(b"x" * i))
        tar.addfile(tarfile.TarInfo(".wh.gone"))
    raw.seek(0)
    stats = layertar.count_tar(raw, 11)
    assert (stats.entries, stats.bytes, stats.whiteouts) == (11, 45, 1)
    raw.seek(0)
    with pytest.raises(layertar.TooManyEntries, match="more than 10 entries"):
        layertar.count_tar(raw, 10)
    with pytest.raises(DiffError, match="not a valid layer tar"):
        layertar.count_tar(io.BytesIO(b"\x01" * 1024), 10)


def test_import_keeps_no_selinux_label_from_a_layer(tmp_path):
    """A layer's security.selinux is the other host's label: the importing host's policy labels
    files, so it is not applied (as export drops it); other xattrs are kept."""
    upper = tmp_path / "upper"
    upper.mkdir()
    ti = info("f", pax_headers={"SCHILY.xattr.security.selinux": "system_u:object_r:shadow_t:s0",
                                "SCHILY.xattr.user.note": "kept"})
    upperdiff.import_as_upper(tar_of((ti, b"x")), upper)
    assert os.getxattr(upper / "f", "user.note") == b"kept"
    names = os.listxattr(upper / "f")
    assert "security.selinux" not in names or os.getxattr(upper / "f", "security.selinux") != (
        b"system_u:object_r:shadow_t:s0")


def test_naive_diff_compares_contents_only_when_asked(tmp_path):
    """A file rewritten to the same size and mtime is unchanged by its metadata; an
    incremental export's ``same_data`` tells it from the untouched ones."""
    parent, new = tmp_path / "parent", tmp_path / "new"
    write(parent / "rewritten", "aaaa")
    write(parent / "untouched", "bbbb")
    subprocess.run(["cp", "-a", str(parent), str(new)], check=True)
    st = os.stat(new / "rewritten")
    (new / "rewritten").write_text("cccc")
    os.utime(new / "rewritten", ns=(st.st_atime_ns, st.st_mtime_ns))

    by_metadata = io.BytesIO()
    treediff.export_naive(parent, new, by_metadata)
    assert set(members(by_metadata.getvalue())) == {"."}

    asked: list[str] = []

    def same_data(rel: str, old: str, new_path: str) -> bool:
        asked.append(rel)
        return treediff.same_content(old, new_path)

    by_contents = io.BytesIO()
    treediff.export_naive(parent, new, by_contents, same_data=same_data)
    assert set(members(by_contents.getvalue())) == {".", "rewritten"}
    assert sorted(asked) == ["rewritten", "untouched"]
