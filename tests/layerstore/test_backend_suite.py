"""The behaviour every LayerBackend must have (after containerd's snapshots/testsuite).

The suite plays the engine: it makes the ``Layer`` records, builds each layer in
a scratch dir on the state dir's file system (``<root>/tmp/<id>``, so ``install``
is a rename), installs and exposes it, and reads and writes a layer's files
through what ``mounts()`` returns (really mounted when root; a symlink to a bind
mount's source otherwise, which only a directory backend can offer).
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import stat
import tarfile
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import replace
from pathlib import Path

import pytest

from csi_driver import host
from csi_driver.errors import FailedPrecondition
from csi_driver.ids import new_id, new_link
from csi_driver.layerstore.backend import Built, LayerBackend, Unsupported
from csi_driver.layerstore.layertar import DiffError
from csi_driver.store import Layer
from driver_harness import MOUNT_SKIP

ROOT = not MOUNT_SKIP  # root with the capability to mount
MiB = 1 << 20
SIZE = 64 * MiB
#: where each backend keeps its layer dirs, and which ``describe`` entry is a layer's storage
LAYER_DIRS = {"overlay-loop": "layers", "plain-dir": "dirs"}
STORAGE = {"overlay-loop": "image", "plain-dir": "tree"}


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
        self.fs_type = "ext4" if "ext4" in backend.capabilities.fs_types else "dir"
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
    ) -> Layer:
        """Install ``build`` as a new layer over ``parent`` and expose it."""
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
        self.backend.expose(layer)
        if known:
            self.layers[layer.id] = layer
        return layer

    def prepare(self, parent: Layer | None = None) -> Layer:
        """A new active layer over ``parent``'s chain."""
        build = self.scratch()
        parents = self.chain(parent) if parent else []
        built = self.backend.prepare(build, parents, SIZE, self.fs_type)
        assert built.image_bytes >= SIZE
        return self.add(build, built, parent, active=True)

    def commit(self, layer: Layer) -> tuple[Layer, int]:
        used = self.backend.commit(layer)
        done = replace(layer, active=0, used_bytes=used)
        self.layers[layer.id] = done
        return done, used

    def open(self, layer: Layer) -> AbstractContextManager[Path]:
        """``layer``'s chain shown at a new target (see ``opened``)."""
        return opened(self.backend, self.chain(layer), self.target())

    def view(self, layer: Layer) -> dict[str, tuple]:
        with self.open(layer) as view:
            return tree(view)


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


def tree(root: Path) -> dict[str, tuple]:
    """Every entry under ``root``: its kind, mode and contents (or link target)."""
    out: dict[str, tuple] = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(dirpath, name)
            rel = str(path.relative_to(root))
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", oct(stat.S_IMODE(st.st_mode)))
            else:
                digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
                out[rel] = ("file", oct(stat.S_IMODE(st.st_mode)), digest)
    return out


def sample(root: Path) -> int:
    """A small tree with nested dirs, modes, an empty dir and a symlink."""
    n = put(root, "top.txt", "top\n")
    n += put(root, "secret", "s" * 5000, 0o600)
    n += put(root, "bin/run.sh", "#!/bin/sh\necho hi\n", 0o755)
    n += put(root, "data/deep/er/blob", os.urandom(300_000), 0o640)
    (root / "data" / "empty").mkdir()
    (root / "link").symlink_to("top.txt")
    for d in ("bin", "data", "data/deep", "data/deep/er", "data/empty"):
        (root / d).chmod(0o755)
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
    assert backend.name in LAYER_DIRS
    assert backend.capabilities.fs_types & {"ext4", "dir"}


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

    expected = renamed(renamed(without(without(before, "gone.txt"), "gone-dir"), "dir", "moved-dir"),
                       "old-name.txt", "new-name.txt")  # fmt: skip
    expected["over.txt"] = ("file", "0o644", hashlib.sha256(b"replaced by something longer").hexdigest()[:16])
    expected["secret"] = ("file", "0o640", before["secret"][2])
    expected["fresh.txt"] = ("file", "0o644", hashlib.sha256(b"fresh").hexdigest()[:16])
    assert after == expected
    assert rig.view(child) == expected  # persisted, not just cached
    assert rig.view(parent) == before

    child, _ = rig.commit(child)
    grandchild = rig.prepare(child)
    assert rig.view(grandchild) == expected
    assert rig.view(parent) == before


def test_capture_is_a_point_in_time_copy(rig: Rig) -> None:
    parent = rig.prepare()
    with rig.open(parent) as view:
        put(view, "base.txt", "base")
    parent, _ = rig.commit(parent)
    one, two = rig.prepare(parent), rig.prepare(parent)
    with rig.open(one) as v1, rig.open(two) as v2:
        written = put(v1, "before", os.urandom(MiB))
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
    assert merged["exe.sh"][1] == "0o700"

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
    assert rig.view(layer) == expected


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
    junk = rig.root / LAYER_DIRS[backend.name] / "not-a-layer"
    junk.mkdir()
    stray_link = rig.root / "l" / "ZZZZZZZZZZ"
    if backend.name == "overlay-loop":
        stray_link.symlink_to("../layers/nothing/mnt/upper")
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
    assert not os.path.lexists(stray_link)
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
    storage = Path(rig.backend.describe(layer)[STORAGE[rig.backend.name]])
    if storage.is_dir():
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
        pytest.skip(f"{rig.backend.name} keeps raw block layers")
    with pytest.raises(Unsupported):
        rig.backend.prepare_block(rig.scratch(), SIZE, None)


def test_block_layer_round_trips_bytes(rig: Rig, tmp_path: Path) -> None:
    backend = rig.backend
    if not backend.capabilities.block:
        pytest.skip(f"{backend.name} keeps no raw block layers")
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
    assert "rm-me" not in merged and "d" not in merged and merged["e/y"][0] == "file"
    assert merged["usr/bin/su"][1] == "0o4755" and merged["localtime"] == ("link", "/usr/share/zoneinfo/UTC")
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
    assert "gone" not in rig.view(rebuilt) and rig.view(rebuilt)["d"][0] == "file"


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
    assert len(view) == 6000 and view["d05999"] == ("dir", "0o755")


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
