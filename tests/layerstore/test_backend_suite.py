"""The behaviour every LayerBackend must have (after containerd's snapshots/testsuite).

The suite plays the engine: it makes the ``Layer`` records, builds each layer in
a scratch dir on the state dir's file system (``<root>/tmp/<id>``, so ``install``
is a rename), installs and exposes it, and reads and writes a layer's files
through what ``mounts()`` returns (really mounted when root; a symlink to a bind
mount's source otherwise, which only a directory backend can offer).

Every case runs against every backend of ``conftest.BACKENDS`` and adapts only to
what a backend declares in ``backend.capabilities``, never to its name.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import shutil
import stat
import struct
import tarfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import pytest

from csi_driver import host
from csi_driver.engine.engine import EngineConfig
from csi_driver.errors import FailedPrecondition
from csi_driver.ids import new_id, new_link
from csi_driver.layerstore.backend import Built, FsUsage, LayerBackend, Unsupported
from csi_driver.layerstore.layertar import DiffError
from csi_driver.store import Layer
from driver_harness import MOUNT_SKIP

ROOT = not MOUNT_SKIP  # root with the capability to mount (and to chown, set file capabilities)
MiB = 1 << 20
SIZE = 64 * MiB
DEPTH = EngineConfig.max_depth  # the engine flattens a chain deeper than this
T0 = 1_500_000_000  # a time in whole seconds, long before any test ran
#: a file capability (security.capability, VFS_CAP_REVISION_2): cap_net_bind_service, effective
CAPABILITY = struct.pack("<5I", 0x02000001, 1 << 10, 0, 0, 0)


# ---- the engine's part ------------------------------------------------------


@contextmanager
def opened(backend: LayerBackend, chain: Sequence[Layer], target: Path) -> Iterator[Path]:
    """``chain`` (nearest first) shown at ``target`` while inside: each layer
    activated, then what ``backend.mounts(chain)`` returns mounted (as root) or,
    without root, ``target`` a symlink to a bind mount's source."""
    activated: list[Layer] = []
    mounted = False
    try:
        for layer in chain:
            backend.activate(layer)
            activated.append(layer)
        for m in backend.mounts(chain):
            if ROOT:
                target.mkdir(exist_ok=True)
                if m.type == "bind":
                    host.bind_mount(m.source, target, readonly="ro" in m.options)
                else:
                    host.mount(m.source, target, m.type, list(m.options), cwd=m.cwd)
                mounted = True
            else:
                assert m.type == "bind", f"without root only a bind mount can be shown, not {m}"
                target.symlink_to(m.source, target_is_directory=True)
        yield target
    finally:
        if mounted:
            host.umount(target)
        elif target.is_symlink():
            target.unlink()
        for layer in reversed(activated):
            backend.deactivate(layer)


class Rig:
    """Layer records and builds, as the engine's store would keep them."""

    def __init__(self, backend: LayerBackend, root: Path, tmp: Path) -> None:
        self.backend = backend
        self.root = root
        self.tmp = tmp
        self.fs_type = backend.capabilities.default_fs_type
        self.layers: dict[str, Layer] = {}
        self._views = 0

    def scratch(self) -> Path:
        build = self.root / "tmp" / new_id()
        build.mkdir(parents=True)
        return build

    def target(self) -> Path:
        self._views += 1
        return self.tmp / f"view{self._views}"

    def chain(self, layer: Layer) -> list[Layer]:
        out = [layer]
        while out[-1].parent is not None:
            out.append(self.layers[out[-1].parent])
        return out

    def add(
        self,
        build: Path,
        built: Built,
        parent: Layer | None,
        *,
        active: bool,
        fs_type: str | None = None,
        known: bool = True,
        expose: bool = True,
    ) -> Layer:
        """Install ``build`` as a new layer over ``parent`` and expose it (unless
        ``expose`` is False: a crash came between the two)."""
        layer = Layer(
            id=new_id(),
            parent=parent.id if parent else None,
            link=new_link(),
            name=None,
            active=int(active),
            fs_type=fs_type or built.fs_type or self.fs_type,
            depth=parent.depth + 1 if parent else 1,
            image_bytes=built.image_bytes,
            used_bytes=0 if active else built.used_bytes,
            created_at=time.time(),
            base_bytes=built.base_bytes,
        )
        self.backend.install(build, layer)
        assert not build.exists(), "install must move the build into place"
        if expose:
            self.backend.expose(layer)
        if known:
            self.layers[layer.id] = layer
        return layer

    def prepare(self, parent: Layer | None = None, size: int = SIZE) -> Layer:
        """A new active layer over ``parent``'s chain, of ``size`` bytes."""
        build = self.scratch()
        parents = self.chain(parent) if parent else []
        built = self.backend.prepare(build, parents, size, self.fs_type)
        assert built.image_bytes >= size
        return self.add(build, built, parent, active=True)

    def resize(self, layer: Layer, size: int) -> Layer:
        """Give an active layer ``size`` bytes, and grow its file system into them."""
        self.backend.resize(layer, size)
        layer = self.layers[layer.id] = replace(layer, image_bytes=size)
        self.backend.grow_fs(layer)
        return layer

    def commit(self, layer: Layer) -> tuple[Layer, int]:
        used = self.backend.commit(layer)
        done = replace(layer, active=0, used_bytes=used)
        self.layers[layer.id] = done
        return done, used

    def open(self, layer: Layer) -> AbstractContextManager[Path]:
        """``layer``'s chain shown at a new target (see ``opened``)."""
        return opened(self.backend, self.chain(layer), self.target())

    def view(self, layer: Layer) -> dict[str, Entry]:
        with self.open(layer) as view:
            return tree(view)

    def committed_sample(self) -> Layer:
        """A committed layer with no parent that holds ``sample``."""
        layer = self.prepare()
        with self.open(layer) as view:
            sample(view)
        return self.commit(layer)[0]


@pytest.fixture
def rig(backend: LayerBackend, tmp_path: Path) -> Rig:
    return Rig(backend, (tmp_path / "state").resolve(), tmp_path)


# ---- file trees -------------------------------------------------------------


def put(root: Path, rel: str, data: bytes | str, mode: int = 0o644) -> int:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = data.encode() if isinstance(data, str) else data
    path.write_bytes(raw)
    path.chmod(mode)
    return len(raw)


class Entry(NamedTuple):
    """One path of a tree, as a layer must keep it."""

    kind: str  # "file", "dir", "link" or "special"
    mode: str  # permission bits in octal ("" for a symlink)
    data: str  # a file's digest, a symlink's target, a device's number
    owner: tuple[int, int]
    mtime_ns: int
    xattrs: tuple[tuple[str, bytes], ...]
    links: str  # a hard link: the first (sorted) of the paths sharing its inode; else ""


def tree(root: Path) -> dict[str, Entry]:
    """Every entry under ``root``: its kind, mode, contents (or target), owner,
    mtime, xattrs and which paths are one file (hard links)."""
    out: dict[str, Entry] = {}
    inodes: dict[tuple[int, int], list[str]] = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(dirpath, name)
            rel = str(path.relative_to(root))
            st = path.lstat()
            mode = oct(stat.S_IMODE(st.st_mode))
            if stat.S_ISLNK(st.st_mode):
                kind, mode, data = "link", "", os.readlink(path)
            elif stat.S_ISDIR(st.st_mode):
                kind, data = "dir", ""
            elif stat.S_ISREG(st.st_mode):
                kind, data = "file", hashlib.sha256(path.read_bytes()).hexdigest()[:16]
            else:
                kind, data = "special", f"{stat.S_IFMT(st.st_mode):o}:{st.st_rdev}"
            if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1:
                inodes.setdefault((st.st_dev, st.st_ino), []).append(rel)
            out[rel] = Entry(kind, mode, data, (st.st_uid, st.st_gid), st.st_mtime_ns, xattrs(path), "")
    for names in inodes.values():
        if len(names) > 1:
            for rel in names:
                out[rel] = out[rel]._replace(links=min(names))
    return out


def xattrs(path: Path) -> tuple[tuple[str, bytes], ...]:
    """A path's xattrs but its SELinux label (the host's, not the layer's) and
    overlayfs's own (an overlay hides them; a bind of an upper shows them to root)."""
    names = sorted(
        x
        for x in os.listxattr(path, follow_symlinks=False)
        if x != "security.selinux" and not x.startswith("trusted.overlay.")
    )
    return tuple((x, os.getxattr(path, x, follow_symlinks=False)) for x in names)


def shape(view: dict[str, Entry]) -> dict[str, tuple[str, str, str]]:
    """Kind, mode and contents of each entry: what a hand-made expectation names."""
    return {rel: (e.kind, e.mode, e.data) for rel, e in view.items()}


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def sample(root: Path) -> int:
    """A small tree with nested dirs, modes, an empty dir, a symlink, a hard link,
    xattrs and old mtimes; as root, other owners and a file capability too."""
    n = put(root, "top.txt", "top\n")
    n += put(root, "secret", "s" * 5000, 0o600)
    n += put(root, "bin/run.sh", "#!/bin/sh\necho hi\n", 0o755)
    n += put(root, "data/deep/er/blob", os.urandom(300_000), 0o640)
    (root / "data" / "empty").mkdir()
    (root / "link").symlink_to("top.txt")
    os.link(root / "top.txt", root / "hard")
    os.setxattr(root / "secret", "user.note", b"kept")
    os.setxattr(root / "data", "user.dir", b"a directory's")
    if ROOT:
        os.lchown(root / "secret", 1234, 5678)
        os.lchown(root / "data" / "deep", 4321, 8765)
        os.lchown(root / "link", 1234, 5678)
        os.setxattr(root / "bin" / "run.sh", "security.capability", CAPABILITY)
    for d in ("bin", "data", "data/deep", "data/deep/er", "data/empty"):
        (root / d).chmod(0o755)
    paths = sorted((p for p in root.rglob("*")), key=lambda p: -len(p.parts))  # deepest first
    for k, path in enumerate(paths):
        os.utime(path, ns=(T0 * 10**9, (T0 + k) * 10**9), follow_symlinks=False)
    return n


def renamed(view: dict[str, tuple], old: str, new: str) -> dict[str, tuple]:
    """``view`` after ``old`` (and everything below it) was renamed to ``new``."""
    out = {}
    for rel, entry in view.items():
        if rel == old or rel.startswith(old + "/"):
            rel = new + rel[len(old) :]
        out[rel] = entry
    return out


def without(view: dict[str, tuple], gone: str) -> dict[str, tuple]:
    return {k: v for k, v in view.items() if k != gone and not k.startswith(gone + "/")}


# ---- the cases --------------------------------------------------------------


def test_conforms_to_the_protocol(backend: LayerBackend) -> None:
    assert isinstance(backend, LayerBackend)
    assert backend.name
    caps = backend.capabilities
    assert caps.default_fs_type in caps.fs_types and "block" not in caps.fs_types
    assert caps.artifact_fs_types


def test_sizes(rig: Rig) -> None:
    for fs_type in rig.backend.capabilities.fs_types:
        assert rig.backend.size_for(SIZE, fs_type) >= SIZE
    layer = rig.prepare()
    assert rig.backend.size(layer) == layer.image_bytes


def test_child_sees_committed_parent(rig: Rig) -> None:
    parent = rig.prepare()
    with rig.open(parent) as view:
        sample(view)
        written = tree(view)
    parent, _ = rig.commit(parent)
    child = rig.prepare(parent)
    assert rig.view(child) == written
    assert rig.view(parent) == written


def test_owners_xattrs_times_and_hard_links_are_kept(rig: Rig) -> None:
    """What ``tree`` compares, made explicit: a copy-up or a copy that lost any of
    it would change what a pod's files mean (a setuid helper, a capability, a
    hard-linked file written through one name)."""
    parent = rig.committed_sample()
    child = rig.prepare(parent)
    with rig.open(child) as view:
        seen = tree(view)
        assert os.stat(view / "hard").st_ino == os.stat(view / "top.txt").st_ino
        put(view, "own/one", "one")
        os.link(view / "own" / "one", view / "own" / "two")
        (view / "own" / "one").chmod(0o4755)
        os.setxattr(view / "top.txt", "user.added", b"in the child")
        os.utime(view / "own" / "two", ns=(T0 * 10**9, T0 * 10**9 + 123_456_789))
        if ROOT:
            os.lchown(view / "own", 2222, 3333)
        written = tree(view)
    assert seen["hard"].links == seen["top.txt"].links == "hard"
    assert seen["secret"].xattrs == (("user.note", b"kept"),)
    assert seen["data"].xattrs == (("user.dir", b"a directory's"),)
    assert {e.mtime_ns // 10**9 for e in seen.values()} <= set(range(T0, T0 + len(seen)))
    if ROOT:
        assert seen["secret"].owner == seen["link"].owner == (1234, 5678)
        assert seen["data/deep"].owner == (4321, 8765)
        assert seen["bin/run.sh"].xattrs == (("security.capability", CAPABILITY),)
    child, _ = rig.commit(child)
    after = rig.view(child)
    assert after == written
    assert after["own/one"].links == after["own/two"].links == "own/one"
    assert after["own/two"].mode == "0o4755" and after["own/two"].mtime_ns == T0 * 10**9 + 123_456_789
    assert ("user.added", b"in the child") in after["top.txt"].xattrs
    assert rig.view(rig.prepare(child)) == written


def test_commit_returns_at_least_the_bytes_written(rig: Rig) -> None:
    layer = rig.prepare()
    with rig.open(layer) as view:
        written = put(view, "big", os.urandom(4 * MiB)) + sample(view)
    _, used = rig.commit(layer)
    assert used >= written
    empty = rig.prepare()
    with rig.open(empty):
        pass
    _, nothing = rig.commit(empty)
    assert 0 <= nothing < MiB, "an empty layer holds nothing beyond its baseline"


def test_child_changes_show_in_its_view_only(rig: Rig) -> None:
    parent = rig.prepare()
    with rig.open(parent) as view:
        sample(view)
        put(view, "gone.txt", "gone")
        put(view, "old-name.txt", "moved", 0o600)
        put(view, "over.txt", "original")
        put(view, "dir/a", "a")
        put(view, "dir/sub/b", "b")
        put(view, "gone-dir/x", "x")
        before = tree(view)
    parent, _ = rig.commit(parent)

    child = rig.prepare(parent)
    with rig.open(child) as view:
        (view / "gone.txt").unlink()
        (view / "old-name.txt").rename(view / "new-name.txt")
        (view / "dir").rename(view / "moved-dir")
        put(view, "over.txt", "replaced by something longer")
        shutil.rmtree(view / "gone-dir")
        (view / "secret").chmod(0o640)
        put(view, "fresh.txt", "fresh")
        after = tree(view)

    expected = renamed(renamed(without(without(shape(before), "gone.txt"), "gone-dir"), "dir", "moved-dir"),
                       "old-name.txt", "new-name.txt")  # fmt: skip
    expected["over.txt"] = ("file", "0o644", digest(b"replaced by something longer"))
    expected["secret"] = ("file", "0o640", before["secret"].data)
    expected["fresh.txt"] = ("file", "0o644", digest(b"fresh"))
    assert shape(after) == expected
    for rel in ("top.txt", "hard", "link", "bin/run.sh", "data/deep/er/blob", "data/empty"):
        assert after[rel] == before[rel], f"{rel}: untouched in the child, yet changed"
    assert after["new-name.txt"] == before["old-name.txt"], "a rename keeps what the file was"
    assert rig.view(child) == after  # persisted, not just cached
    assert rig.view(parent) == before

    child, _ = rig.commit(child)
    grandchild = rig.prepare(child)
    assert rig.view(grandchild) == after
    assert rig.view(parent) == before


def test_capture_is_a_point_in_time_copy(rig: Rig) -> None:
    parent = rig.prepare()
    with rig.open(parent) as view:
        put(view, "base.txt", "base")
    parent, _ = rig.commit(parent)
    one, two = rig.prepare(parent), rig.prepare(parent)
    with rig.open(one) as v1, rig.open(two) as v2:
        written = put(v1, "before", os.urandom(MiB)) + sample(v1)
        put(v1, "base.txt", "changed in one")
        put(v2, "two-only", "two")
        (v2 / "base.txt").unlink()
        at_capture = {one.id: tree(v1), two.id: tree(v2)}
        builds = {one.id: rig.scratch(), two.id: rig.scratch()}
        instants: list[float] = []
        built = rig.backend.capture(builds, [one, two], lambda: instants.append(time.time()))
        assert len(instants) == 1, "the frozen hook runs once, at the one instant"
        put(v1, "after", "written after the capture")
        put(v1, "before", "overwritten after the capture")
        put(v2, "two-only", "changed after the capture")
        later = {one.id: tree(v1), two.id: tree(v2)}
    assert later[one.id] != at_capture[one.id] and later[two.id] != at_capture[two.id]
    assert built[one.id].used_bytes >= written
    for layer in (one, two):
        copy = rig.add(builds[layer.id], built[layer.id], parent, active=False, fs_type=layer.fs_type)
        assert rig.view(copy) == at_capture[layer.id]
        assert rig.view(layer) == later[layer.id]  # the layer itself kept what came after


def test_squash_equals_the_merged_view(rig: Rig) -> None:
    one = rig.prepare()
    with rig.open(one) as view:
        sample(view)
        put(view, "a.txt", "1")
        put(view, "d/x", "x1")
        put(view, "d/y", "y1")
        put(view, "rm-me", "r")
        put(view, "exe.sh", "#!/bin/sh\n", 0o755)
    one, _ = rig.commit(one)
    two = rig.prepare(one)
    with rig.open(two) as view:
        put(view, "a.txt", "2")
        (view / "rm-me").unlink()
        put(view, "b.txt", "b")
        (view / "d").rename(view / "e")
        (view / "exe.sh").chmod(0o700)
    two, _ = rig.commit(two)
    three = rig.prepare(two)
    with rig.open(three) as view:
        put(view, "e/z", "z3")
        (view / "e" / "x").unlink()
        put(view, "c.txt", "c", 0o600)
        (view / "l").symlink_to("a.txt")
        shutil.rmtree(view / "data" / "deep")
    three, _ = rig.commit(three)

    merged = rig.view(three)
    assert {"a.txt", "b.txt", "c.txt", "e/y", "e/z", "l", "data/empty"} <= merged.keys()
    assert not {"rm-me", "d", "d/x", "e/x", "data/deep"} & merged.keys()
    assert merged["exe.sh"].mode == "0o700"

    build = rig.scratch()
    built = rig.backend.squash(build, rig.chain(three))
    assert built.used_bytes > 0 and built.fs_type in rig.backend.capabilities.fs_types
    flat = rig.add(build, built, None, active=False)
    assert rig.view(flat) == merged


def test_import_tree_from_a_directory(rig: Rig, tmp_path: Path) -> None:
    source = tmp_path / "source"
    written = sample(source)
    expected = tree(source)
    build = rig.scratch()
    built = rig.backend.import_tree(build, source)
    assert built.used_bytes >= written and built.fs_type in rig.backend.capabilities.fs_types
    layer = rig.add(build, built, None, active=False)
    assert rig.view(layer) == expected
    assert tree(source) == expected  # the source is left as it was, and not mounted
    assert host.MountTable.read().at(source) is None


def test_import_tree_from_a_tar(rig: Rig, tmp_path: Path) -> None:
    source = tmp_path / "source"
    sample(source)
    expected = tree(source)
    archive = tmp_path / "layer.tar"
    with tarfile.open(archive, "w") as tar:
        for rel in sorted(expected):
            tar.add(source / rel, arcname=rel, recursive=False)
    build = rig.scratch()
    built = rig.backend.import_tree(build, archive)
    layer = rig.add(build, built, None, active=False)
    assert shape(rig.view(layer)) == shape(expected)  # a tar keeps no xattrs; "data" extraction no owners


def test_import_tree_refuses_a_tar_that_escapes(rig: Rig, tmp_path: Path) -> None:
    archive = tmp_path / "evil.tar"
    with tarfile.open(archive, "w") as tar:
        member = tarfile.TarInfo("../escape.txt")
        member.size = 4
        tar.addfile(member, io.BytesIO(b"evil"))
    with pytest.raises(tarfile.FilterError):
        rig.backend.import_tree(rig.scratch(), archive)
    assert not list(tmp_path.rglob("escape.txt"))


def test_activation_is_counted(rig: Rig) -> None:
    backend = rig.backend
    layer = rig.prepare()
    assert not backend.is_active(layer)
    backend.activate(layer)
    backend.activate(layer)
    try:
        backend.deactivate(layer)
        assert backend.is_active(layer)
        assert layer.id in backend.active_layers()
    finally:
        backend.deactivate(layer)
    assert not backend.is_active(layer)
    assert layer.id not in backend.active_layers()


def test_remove_is_idempotent(rig: Rig) -> None:
    layer, _ = rig.commit(rig.prepare())
    paths = [Path(p) for p in rig.backend.describe(layer).values()]
    assert layer.id in rig.backend.walk()
    rig.backend.remove(layer)
    rig.backend.remove(layer)
    assert layer.id not in rig.backend.walk()
    assert not [p for p in paths if os.path.lexists(p)]


def test_cleanup_removes_only_what_the_store_does_not_know(rig: Rig) -> None:
    backend = rig.backend
    kept = rig.prepare()
    with rig.open(kept) as view:
        sample(view)
        kept_view = tree(view)
    kept, _ = rig.commit(kept)
    busy = rig.prepare(kept)
    with rig.open(busy) as view:
        put(view, "busy.txt", "busy")
        busy_view = tree(view)
    build = rig.scratch()
    unknown = rig.add(build, backend.prepare(build, [], SIZE, rig.fs_type), None, active=True, known=False)
    unknown_paths = [Path(p) for p in backend.describe(unknown).values()]
    # every dir the backend keeps a layer's entries in gets an entry of no layer
    layer_dirs = {p.parent.parent for p in unknown_paths if p.parent.name == unknown.id}
    other_dirs = {p.parent for p in unknown_paths if p.parent.name != unknown.id}
    assert len(layer_dirs) == 1, "describe names a layer's own dir"
    junk = layer_dirs.pop() / "not-a-layer"
    junk.mkdir()
    strays = [d / "ZZZZZZZZZZ" for d in other_dirs]
    for stray in strays:
        stray.symlink_to("../nothing")
    assert unknown.id in backend.walk()

    backend.activate(busy)  # as the engine re-activates what staged volumes use
    try:
        report = backend.cleanup({x.id: x for x in (kept, busy)}, set())
        assert backend.is_active(busy)
    finally:
        backend.deactivate(busy)

    assert str(junk) in report.removed and not junk.exists()
    assert unknown.id not in backend.walk()
    assert not [p for p in unknown_paths if os.path.lexists(p)]
    assert not [x for x in strays if os.path.lexists(x)]
    assert not report.failed
    assert {kept.id, busy.id} <= set(backend.walk())
    assert rig.view(kept) == kept_view
    assert rig.view(busy) == busy_view


def test_usage_grows_with_data(rig: Rig) -> None:
    layer = rig.prepare()
    before = rig.backend.usage(layer)
    with rig.open(layer) as view:
        with open(view / "data", "wb") as f:
            for _ in range(8):
                f.write(os.urandom(MiB))
            os.fsync(f.fileno())
    assert rig.backend.usage(layer) >= before + 8 * MiB
    other = rig.prepare()
    assert rig.backend.usages([layer.id, other.id]) == {
        layer.id: rig.backend.usage(layer),
        other.id: rig.backend.usage(other),
    }, "the same figures by id, as capacity sums them"


def test_fs_usage_only_while_active(rig: Rig) -> None:
    layer = rig.prepare()
    assert rig.backend.fs_usage(layer) is None
    with rig.open(layer) as view:
        put(view, "data", os.urandom(MiB))
        usage = rig.backend.fs_usage(layer)
        assert usage is not None
        assert usage.total_bytes >= usage.available_bytes > 0
        assert 0 < usage.used_bytes <= usage.total_bytes
        assert 0 < usage.used_inodes <= usage.total_inodes
    assert rig.backend.fs_usage(layer) is None


def test_health_sees_storage_deleted_behind_its_back(rig: Rig) -> None:
    layer = rig.prepare()
    assert rig.backend.health(layer, host.MountTable.read()) == ""
    assert rig.backend.health(layer) == ""
    for storage in (Path(p) for p in rig.backend.describe(layer).values()):
        if storage.parent.name != layer.id or not os.path.lexists(storage):
            continue  # not the layer's own (a link to it, say), or not made yet
        if storage.is_dir() and not storage.is_symlink():
            shutil.rmtree(storage)
        else:
            storage.unlink()
    assert rig.backend.health(layer) != ""
    assert rig.backend.health(layer, host.MountTable.read()) != ""


def test_mounted_layer_ignores_an_unrelated_mount(backend: LayerBackend) -> None:
    root = host.MountTable.read().at("/")
    assert root is not None
    assert backend.mounted_layer(root) is None


@pytest.mark.skipif(not ROOT, reason="mounting a layer's view needs root")
def test_mounted_layer_recognises_a_mount_of_an_active_layer(rig: Rig) -> None:
    parent, _ = rig.commit(rig.prepare())
    layer = rig.prepare(parent)
    with rig.open(layer) as view:
        entry = host.MountTable.read().at(view)
        assert entry is not None
        assert rig.backend.mounted_layer(entry) == layer.id


def test_prepare_block_is_unsupported_without_block_layers(rig: Rig) -> None:
    if rig.backend.capabilities.block:
        pytest.skip("the backend keeps raw block layers")
    with pytest.raises(Unsupported):
        rig.backend.prepare_block(rig.scratch(), SIZE, None)


def test_block_layer_round_trips_bytes(rig: Rig, tmp_path: Path) -> None:
    backend = rig.backend
    if not backend.capabilities.block:
        pytest.skip("the backend keeps no raw block layers")
    build = rig.scratch()
    layer = rig.add(build, backend.prepare_block(build, 8 * MiB, None), None, active=True, fs_type="block")
    chunks = {0: os.urandom(4096), 5 * MiB + 512: os.urandom(10_000), 8 * MiB - 4096: os.urandom(4096)}
    with open(backend.block_file(layer), "r+b") as f:
        for offset, data in chunks.items():
            f.seek(offset)
            f.write(data)
    expected = backend.block_file(layer).read_bytes()
    assert len(expected) == 8 * MiB

    build = rig.scratch()
    built = backend.block_capture(layer, build, [])
    assert built.image_bytes == 8 * MiB
    copy = rig.add(build, built, None, active=False, fs_type="block")
    assert backend.block_file(copy).read_bytes() == expected

    build = rig.scratch()
    source = backend.block_file(copy)
    clone = rig.add(build, backend.prepare_block(build, 8 * MiB, source), None, active=True, fs_type="block")
    assert backend.block_file(clone).read_bytes() == expected

    device = host.loop_attach(backend.block_file(layer))
    try:
        build = rig.scratch()
        try:
            built = backend.block_capture(layer, build, [device])
        except FailedPrecondition:  # no reflink here: an in-use image is refused, not torn
            pass
        else:
            attached = rig.add(build, built, None, active=False, fs_type="block")
            assert backend.block_file(attached).read_bytes() == expected
    finally:
        host.loop_detach(device)


def test_diffs_export_and_import_a_chain(rig: Rig, tmp_path: Path) -> None:
    """Each layer of a chain out as an OCI layer tar and back in over the chain
    rebuilt so far: every level shows the same tree. Layer two renames a
    directory, which an overlay upper cannot express by itself (naive diff)."""
    one = rig.prepare()
    with rig.open(one) as view:
        sample(view)
        put(view, "d/x", "x1")
        put(view, "d/y", "y1")
        put(view, "rm-me", "r")
        put(view, "usr/bin/su", "#!/bin/sh\n", 0o4755)  # setuid, as images hold it
        (view / "localtime").symlink_to("/usr/share/zoneinfo/UTC")  # absolute, out of the tree
    one, _ = rig.commit(one)
    two = rig.prepare(one)
    with rig.open(two) as view:
        (view / "rm-me").unlink()
        (view / "d").rename(view / "e")
        put(view, "top.txt", "changed\n")
        shutil.rmtree(view / "data" / "deep")
    two, _ = rig.commit(two)
    three = rig.prepare(two)
    with rig.open(three) as view:
        (view / "data" / "deep").mkdir()  # again, empty: the lower's must not show through
        put(view, "e/z", "z3")
    three, _ = rig.commit(three)

    copy: Layer | None = None
    for n, original in enumerate((one, two, three)):
        chain = rig.chain(original)
        views = rig.scratch()
        archive = tmp_path / f"{original.id}.tar"
        with open(archive, "wb") as out:
            rig.backend.export_diff(chain, views, out)
        assert not host.MountTable.read().under(views), "the export's views are unmounted"
        build = rig.scratch()
        hint = archive.stat().st_size if n != 1 else 0  # with and without a size: both ways in
        with open(archive, "rb") as diff:
            built = rig.backend.import_diff(build, diff, rig.chain(copy) if copy else [], hint)
        copy = rig.add(build, built, copy, active=False)
        assert rig.view(copy) == rig.view(original)
    assert copy is not None
    merged = rig.view(copy)
    assert "rm-me" not in merged and "d" not in merged and merged["e/y"].kind == "file"
    assert merged["usr/bin/su"].mode == "0o4755" and merged["localtime"].data == "/usr/share/zoneinfo/UTC"
    assert not any(k.startswith("data/deep/") for k in merged)


def test_a_diff_over_another_chain_rebuilds_the_chain_on_top_of_it(rig: Rig, tmp_path: Path) -> None:
    """Two siblings over one parent (two captures of an upper): the second as a diff over
    the first, imported over a copy of the first, shows the second's tree."""
    base = rig.prepare()
    with rig.open(base) as view:
        sample(view)
        put(view, "d/x", "x")
    base, _ = rig.commit(base)
    first = rig.prepare(base)
    with rig.open(first) as view:
        put(view, "kept", "k")
        put(view, "gone", "g")
        put(view, "d/new", "n1")
        (view / "top.txt").unlink()
    first, _ = rig.commit(first)
    second = rig.prepare(base)
    with rig.open(second) as view:
        put(view, "kept", "k")
        put(view, "d/new", "n2", 0o600)
        put(view, "top.txt", "back\n")
        shutil.rmtree(view / "d")
        put(view, "d", "a file now")

    second, _ = rig.commit(second)
    copy: Layer | None = None
    for original in (base, first):  # the first export: the chain as it is
        archive = tmp_path / f"{original.id}.tar"
        with open(archive, "wb") as out:
            rig.backend.export_diff(rig.chain(original), rig.scratch(), out)
        build = rig.scratch()
        with open(archive, "rb") as diff:
            built = rig.backend.import_diff(build, diff, rig.chain(copy) if copy else [])
        copy = rig.add(build, built, copy, active=False)
    archive = tmp_path / "second.tar"
    views = rig.scratch()
    with open(archive, "wb") as out:
        rig.backend.export_diff_over(rig.chain(first), rig.chain(second), views, out)
    assert not host.MountTable.read().under(views), "the export's views are unmounted"
    build = rig.scratch()
    with open(archive, "rb") as diff:
        built = rig.backend.import_diff(build, diff, rig.chain(copy))
    rebuilt = rig.add(build, built, copy, active=False)
    assert rig.view(rebuilt) == rig.view(second)
    assert "gone" not in rig.view(rebuilt) and rig.view(rebuilt)["d"].kind == "file"


def test_import_diff_refuses_a_tar_that_escapes(rig: Rig, tmp_path: Path) -> None:
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w") as tar:
        link = tarfile.TarInfo("out")
        link.type, link.linkname = tarfile.SYMTYPE, str(tmp_path)
        tar.addfile(link)
        member = tarfile.TarInfo("out/escape.txt")
        member.size = 4
        tar.addfile(member, io.BytesIO(b"evil"))
    archive.seek(0)
    with pytest.raises(DiffError):
        rig.backend.import_diff(rig.scratch(), archive, [])
    assert not list(tmp_path.rglob("escape.txt"))


def test_import_diff_of_many_directories_beyond_its_size_hint(rig: Rig) -> None:
    """A tar of empty directories needs more room as a file system than as a tar
    (a block and an inode each): a build sized from the tar must still succeed."""
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w") as tar:
        for i in range(6000):
            d = tarfile.TarInfo(f"d{i:05d}")
            d.type, d.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(d)
    size = archive.tell()
    archive.seek(0)
    build = rig.scratch()
    built = rig.backend.import_diff(build, archive, [], size)
    layer = rig.add(build, built, None, active=False)
    view = rig.view(layer)
    assert len(view) == 6000 and shape(view)["d05999"] == ("dir", "0o755", "")


def test_import_tree_of_many_small_files(rig: Rig, tmp_path: Path) -> None:
    """An image made from a tree gets an inode per entry: 20,000 empty files are
    more than the one inode per 16 KiB of an image sized by their bytes."""
    source = tmp_path / "source"
    source.mkdir()
    for i in range(20_000):
        (source / f"f{i}").touch()
    build = rig.scratch()
    built = rig.backend.import_tree(build, source)
    layer = rig.add(build, built, None, active=False)
    view = rig.view(layer)
    assert len(view) == 20_000 and "f19999" in view


# ---- the accounting contract ------------------------------------------------


def test_a_layer_counts_its_change_over_the_parent_not_the_parents_data(rig: Rig, tmp_path: Path) -> None:
    """The accounting contract (backend.py): a child of a parent holding N bytes
    that writes M reports about M, whichever way it is made (commit, capture,
    import of its diff, its file system figures while active), never N + M:
    the engine adds these figures up along a chain."""
    parent = rig.prepare()
    with rig.open(parent) as view:
        n = put(view, "base", os.urandom(24 * MiB)) + put(view, "rewritten", os.urandom(MiB))
    parent, parent_used = rig.commit(parent)
    assert parent_used >= n
    empty = rig.prepare()
    with rig.open(empty):
        overhead = rig.backend.fs_usage(empty)
    assert overhead is not None  # an empty layer's own file system figures, for scale

    def changes(view: Path) -> int:
        return put(view, "new", os.urandom(2 * MiB)) + put(view, "rewritten", os.urandom(MiB))

    child, other = rig.prepare(parent), rig.prepare(parent)
    with rig.open(child) as view, rig.open(other) as other_view:
        m = changes(view)
        changes(other_view)
        (other_view / "gone").mkdir()  # a dir only, and the parent's file untouched
        active = rig.backend.fs_usage(child)
        assert active is not None
        own = active.used_bytes - overhead.used_bytes
        assert m <= own < m + MiB, f"an active layer: {own} bytes of its own for {m} written over {n}"
        build = rig.scratch()
        captured = rig.backend.capture({other.id: build}, [other])[other.id]
    assert m <= captured.used_bytes < m + MiB, "a capture holds only the layer's own data"
    copy = rig.add(build, captured, parent, active=False, fs_type=other.fs_type)
    child, used = rig.commit(child)
    assert m <= used < m + MiB, f"committed: {used} bytes for {m} written over {n}"

    archive = tmp_path / "child.tar"
    with open(archive, "wb") as out:
        rig.backend.export_diff(rig.chain(child), rig.scratch(), out)
    build = rig.scratch()
    with open(archive, "rb") as diff:
        imported = rig.backend.import_diff(build, diff, rig.chain(parent), archive.stat().st_size)
    assert m <= imported.used_bytes < m + MiB, "an imported diff holds only what the tar changes"
    again = rig.add(build, imported, parent, active=False)
    assert shape(rig.view(again)) == shape(rig.view(child))
    assert shape(rig.view(copy))["gone"] == ("dir", "0o755", "")


# ---- what a volume is promised ------------------------------------------------


@pytest.mark.skipif(not ROOT, reason="a view is read-only only as a real read-only mount")
def test_a_read_only_view_refuses_writes(rig: Rig) -> None:
    """A committed layer, alone or as the top of a chain, is shown read-only:
    every kind of write fails with EROFS and nothing changes."""
    one = rig.committed_sample()
    two = rig.prepare(one)
    with rig.open(two) as view:
        put(view, "two.txt", "two")
    two, _ = rig.commit(two)
    writes: list[Callable[[Path], object]] = [
        lambda v: put(v, "new.txt", "new"),
        lambda v: (v / "top.txt").write_text("over"),
        lambda v: (v / "top.txt").unlink(),
        lambda v: (v / "data").rename(v / "moved"),
        lambda v: (v / "made").mkdir(),
        lambda v: (v / "secret").chmod(0o644),
        lambda v: os.setxattr(v / "secret", "user.new", b"x"),
        lambda v: os.utime(v / "top.txt", (0, 0)),
        lambda v: os.truncate(v / "top.txt", 0),
    ]
    for top in (one, two):
        before = rig.view(top)
        with rig.open(top) as view:
            for write in writes:
                with pytest.raises(OSError) as e:
                    write(view)
                assert e.value.errno == errno.EROFS, e.value
        assert rig.view(top) == before


def test_a_chain_at_the_depth_cap_mounts_and_reads_right(rig: Rig) -> None:
    """``DEPTH`` layers, the engine's cap, each adding, replacing and removing a file:
    the active top over all the others, and the whole chain committed and shown
    read-only, each show exactly what the last layer to touch a path left."""
    expected: dict[str, str] = {}
    layer: Layer | None = None
    with ExitStack() as held:  # the lowers stay activated: one activation each, not one per level
        for n in range(DEPTH):
            layer = rig.prepare(layer)
            with rig.open(layer) as view:
                put(view, f"level/{n:02d}", f"level {n}")
                put(view, "top.txt", f"written by {n}")
                expected[f"level/{n:02d}"] = f"level {n}"
                expected["top.txt"] = f"written by {n}"
                if n % 3 == 2:  # a file of a layer two below goes
                    (view / "level" / f"{n - 2:02d}").unlink()
                    del expected[f"level/{n - 2:02d}"]
            if n < DEPTH - 1:
                layer, _ = rig.commit(layer)
                rig.backend.activate(layer)
                held.callback(rig.backend.deactivate, layer)
        assert layer is not None and len(rig.chain(layer)) == DEPTH
        files = {rel: ("file", "0o644", digest(data.encode())) for rel, data in expected.items()}
        with rig.open(layer) as view:
            put(view, "level/top", "the top writes")
            files["level/top"] = ("file", "0o644", digest(b"the top writes"))
            seen = {k: v for k, v in shape(tree(view)).items() if k != "level"}
            assert seen == files
        layer, _ = rig.commit(layer)
        assert {k: v for k, v in shape(rig.view(layer)).items() if k != "level"} == files


def test_a_volume_holds_its_size(rig: Rig) -> None:
    """A layer of S bytes refuses the writes past S (ENOSPC, in the writer's own
    volume) where the backend enforces capacity; one that does not says so in its
    capabilities, and then the writes go through."""
    size = rig.backend.size_for(8 * MiB, rig.fs_type)
    layer = rig.prepare(size=size)
    with rig.open(layer) as view:

        def fill() -> None:
            with open(view / "fill", "wb") as f:
                for _ in range(16):
                    f.write(os.urandom(MiB))
                os.fsync(f.fileno())

        if rig.backend.capabilities.enforces_capacity:
            with pytest.raises(OSError) as e:
                fill()
            assert e.value.errno in (errno.ENOSPC, errno.EDQUOT)
            (view / "fill").unlink()
            put(view, "small", "a volume that was full still takes what fits after a delete")
        else:
            fill()
            assert (view / "fill").stat().st_size == 16 * MiB


def _filled(rig: Rig, view: Path, layer: Layer) -> tuple[dict, FsUsage]:
    """The sample and 4 MiB written into ``view``: (its tree, the layer's usage then)."""
    sample(view)
    put(view, "payload", os.urandom(4 * MiB))
    old = rig.backend.fs_usage(layer)
    assert old is not None
    return tree(view), old


def test_resize_grows_a_volume_and_keeps_its_data(rig: Rig) -> None:
    """Grown while detached: the data stays, the new size shows, and where
    capacity is enforced the room past the old size is writable."""
    layer = rig.prepare(size=rig.backend.size_for(8 * MiB, rig.fs_type))
    with rig.open(layer) as view:
        before, old = _filled(rig, view, layer)
    bigger = rig.backend.size_for(32 * MiB, rig.fs_type)
    layer = rig.resize(layer, bigger)
    assert rig.backend.size(layer) == bigger
    with rig.open(layer) as view:
        assert tree(view) == before
        _room_past_the_old_size(rig, view, layer, old)
        after = tree(view)
    assert rig.view(layer) == after


def _room_past_the_old_size(rig: Rig, view: Path, layer: Layer, old: FsUsage) -> None:
    """Where capacity is enforced, a grown layer has room past its old size: it
    reports the new total and takes 16 MiB more than the old one held."""
    if rig.backend.capabilities.enforces_capacity:
        usage = rig.backend.fs_usage(layer)
        assert usage is not None and usage.total_bytes > old.total_bytes + 16 * MiB
        put(view, "more", os.urandom(16 * MiB))  # past the old size


def test_resize_grows_a_volume_in_use(rig: Rig) -> None:
    """Grown while mounted (online), as an expansion of a published volume."""
    layer = rig.prepare(size=rig.backend.size_for(8 * MiB, rig.fs_type))
    with rig.open(layer) as view:
        before, old = _filled(rig, view, layer)
        bigger = rig.backend.size_for(32 * MiB, rig.fs_type)
        try:
            layer = rig.resize(layer, bigger)
        except FailedPrecondition as e:  # the backend says what growing online needs
            pytest.skip(str(e))
        assert rig.backend.size(layer) == bigger
        assert tree(view) == before
        _room_past_the_old_size(rig, view, layer, old)
        after = tree(view)
    assert {k: v for k, v in after.items() if k != "more"} == before
    assert rig.view(layer) == after


# ---- safe to repeat after a crash -------------------------------------------


def test_prepare_repeated_after_a_crash_before_install(rig: Rig) -> None:
    """A crash between ``prepare`` and the transaction that installs it leaves a
    build the engine discards at the next start; the same prepare again, over
    the same parent, makes a layer that shows the parent and is alone on disk."""
    parent = rig.prepare()
    with rig.open(parent) as view:
        sample(view)
        written = tree(view)
    parent, _ = rig.commit(parent)
    lost = rig.scratch()
    rig.backend.prepare(lost, rig.chain(parent), SIZE, rig.fs_type)
    host.remove_tree(lost)  # as the engine discards an unfinished build
    known = set(rig.backend.walk())
    layer = rig.prepare(parent)
    assert set(rig.backend.walk()) == known | {layer.id}
    assert rig.view(layer) == written
    assert rig.view(parent) == written


def test_commit_repeated_after_a_crash_before_the_row_flips(rig: Rig) -> None:
    """The engine commits a layer, then flips its row: a crash between leaves the
    row active, the volume keeps writing to it, and commit runs again later.
    Each run reports what the layer holds then; the data survives both."""
    parent = rig.committed_sample()
    layer = rig.prepare(parent)
    with rig.open(layer) as view:
        first = put(view, "first", os.urandom(2 * MiB))
    used = rig.backend.commit(layer)
    assert rig.backend.commit(layer) == used, "a repeated commit reports the same"
    with rig.open(layer) as view:  # still active in the store: still a volume's writable upper
        assert (view / "first").stat().st_size == first
        second = put(view, "second", os.urandom(3 * MiB))
        written = tree(view)
    done, again = rig.commit(layer)
    assert again >= used + second and used >= first
    assert rig.view(done) == written
    assert rig.view(rig.prepare(done)) == written


def test_expose_is_repeatable_and_a_missed_one_is_redone_by_cleanup(rig: Rig) -> None:
    """A crash after the transaction that adds a layer's row, before ``expose``:
    cleanup at the next start makes it usable as a lower; expose twice is fine."""
    layer = rig.prepare()
    with rig.open(layer) as view:
        sample(view)
        written = tree(view)
    layer, used = rig.commit(layer)
    build = rig.scratch()
    built = rig.backend.squash(build, rig.chain(layer))
    flat = rig.add(build, built, None, active=False, expose=False)
    rig.backend.cleanup(dict(rig.layers), set())
    assert rig.view(rig.prepare(flat)) == written
    rig.backend.expose(flat)
    rig.backend.expose(flat)
    assert rig.view(rig.prepare(flat)) == written


def test_a_failed_capture_thaws_and_can_be_repeated(rig: Rig) -> None:
    """A capture cut short at its instant (the crash tests stop there) leaves
    the layer writable and nothing held; a repeat into a new build works."""
    layer = rig.prepare()
    with rig.open(layer) as view:
        sample(view)

        def crash() -> None:
            raise RuntimeError("crashed at the frozen instant")

        with pytest.raises(RuntimeError):
            rig.backend.capture({layer.id: rig.scratch()}, [layer], crash)
        put(view, "after", "written after the failed capture")
        written = tree(view)
        build = rig.scratch()
        built = rig.backend.capture({layer.id: build}, [layer])[layer.id]
    copy = rig.add(build, built, None, active=False, fs_type=layer.fs_type)
    assert rig.view(copy) == written


def test_a_failed_build_holds_nothing_and_can_be_repeated(rig: Rig, tmp_path: Path) -> None:
    """An import that fails half-way (an untrusted tar) leaves nothing mounted;
    the engine discards the build and the same import of a good tar, repeated
    into a new build over the same parent, works."""
    parent = rig.prepare()
    with rig.open(parent) as view:
        sample(view)
        put(view, "dir/x", "x")
    parent, _ = rig.commit(parent)
    good, bad = io.BytesIO(), io.BytesIO()
    with tarfile.open(fileobj=good, mode="w") as tar:
        member = tarfile.TarInfo("dir/y")
        member.size = 1
        tar.addfile(member, io.BytesIO(b"y"))
    with tarfile.open(fileobj=bad, mode="w") as tar:
        member = tarfile.TarInfo("dir/y")
        member.size = 1
        tar.addfile(member, io.BytesIO(b"y"))
        member = tarfile.TarInfo("../escape")
        member.size = 1
        tar.addfile(member, io.BytesIO(b"e"))
    expected = shape(rig.view(parent)) | {"dir/y": ("file", "0o644", digest(b"y"))}
    for archive in (bad, bad, good):
        archive.seek(0)
        build = rig.scratch()
        try:
            built = rig.backend.import_diff(build, archive, rig.chain(parent), len(archive.getvalue()))
        except DiffError:
            assert not host.MountTable.read().under(build), "a failed build is left unmounted"
            host.remove_tree(build)  # as the engine discards it
            continue
        layer = rig.add(build, built, parent, active=False)
        assert shape(rig.view(layer)) == expected
